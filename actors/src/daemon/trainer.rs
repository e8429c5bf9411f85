//! The continuous trainer (its own OS thread, never the async runtime) and the checkpointer
//! (an async task writing what the trainer hands it into sled).
//!
//! The trainer resumes from the latest valid checkpoint (weights and optimiser state; a corrupt
//! checkpoint is reported and skipped), waits until `trainer.min_samples` captioned training
//! samples exist, then steps forever with the warm-up + constant schedule on identity-balanced
//! batches: P identities × `images_per_id`, a `recent_fraction` of the identities drawn from the
//! newest `recent_window` samples and the rest from everything stored, so new data is learnt
//! without forgetting the old. With no new sample for `idle_after_s` it pauses. Every
//! `checkpoint_every_steps` steps or `checkpoint_every_s` seconds — and at shutdown — it hands a
//! checkpoint (weights + optimiser + step + metrics) to the checkpointer and waits for the
//! flushed write, so at most one checkpoint is ever in memory.

use crate::base::config::TrainerConfig;
use crate::base::error::{Error, Result};
use crate::base::sampler::PkSampler;

use super::{Shared, TrainerState};
use crate::base::state::Checkpoint;
use plip_ingest::captions::Caption;
use plip_ingest::image::{decode, pixels_at, IntakeLimits};
use plip_ingest::wire::Purpose;
use plip_model::batch::{
    normalize_rgb, person_key, pick_captions, AttributeLabel, Augment, Batch, Sample,
};
use plip_model::device::{run_on, OnDevice};
use plip_model::dfdx::prelude::Device;
use plip_model::optim::{OptimConfig, Schedule};
use plip_model::weights::{load_optimizer, load_weights, read_meta};
use plip_model::DeviceSpec;
use plip_model::{Plip, Preset, TaskWeights, TrainConfig, Trainer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A checkpoint to write, and where to say it is durable.
pub struct Job {
    pub checkpoint: Checkpoint,
    pub done: oneshot::Sender<Result<u64>>,
}

/// The checkpointer: writes each job (flushed transaction) and prunes old versions.
pub async fn checkpointer(
    shared: Arc<Shared>,
    jobs: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
) -> Result<()> {
    let mut rx = jobs.lock().await;
    let trainer_done = |shared: &Shared| shared.stats().trainer.state.ended();
    loop {
        let job = if shared.stopping() {
            // The trainer writes a last checkpoint at shutdown: serve until it has ended.
            if trainer_done(&shared) {
                return Ok(());
            }
            match tokio::time::timeout(std::time::Duration::from_millis(100), rx.recv()).await {
                Ok(j) => j,
                Err(_) => continue,
            }
        } else {
            tokio::select! {
                j = rx.recv() => j,
                _ = shared.stopped() => continue,
            }
        };
        let Some(job) = job else { return Ok(()) };
        let s = shared.clone();
        let keep = shared.cfg.trainer.keep_checkpoints;
        let result = tokio::task::spawn_blocking(move || {
            let v = s.state.save_checkpoint(job.checkpoint)?;
            // Never the new one, the serving one or a pinned one.
            let mut protect = s.state.protected_versions()?;
            protect.push(v);
            s.state.prune(keep, &protect)?;
            Ok::<u64, Error>(v)
        })
        .await
        .map_err(Error::from)
        .and_then(|r| r);
        let _ = job.done.send(result);
    }
}

/// A trainable sample as the sampler sees it.
struct Entry {
    id: String,
    seq: u64,
}

/// The trainable samples (not probe, captioned, purpose train or both) and their P×K sampler,
/// with the newest `recent_window` of them marked recent.
struct TrainingSet {
    entries: Vec<Entry>,
    sampler: PkSampler,
    last_seq: u64,
}

impl TrainingSet {
    fn build(shared: &Shared) -> TrainingSet {
        let window = shared.cfg.trainer.recent_window;
        let metas = shared.store.metas();
        let last_seq = metas.last().map_or(0, |m| m.seq);
        let mut entries = Vec::new();
        let mut people = Vec::new();
        for m in metas {
            let trainable = !m.probe
                && !m.captions.is_empty()
                && matches!(m.purpose, Purpose::Train | Purpose::Both);
            if trainable {
                people.push(m.person_id);
                entries.push(Entry {
                    id: m.id,
                    seq: m.seq,
                });
            }
        }
        let cutoff = entries.len().saturating_sub(window);
        let mut newest: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        newest.sort_unstable();
        let threshold = newest.get(cutoff).copied().unwrap_or(u64::MAX);
        let sampler = PkSampler::new(people.iter().map(Option::as_deref))
            .with_recent(|i| entries[i].seq >= threshold);
        TrainingSet {
            entries,
            sampler,
            last_seq,
        }
    }
}

fn set_state(shared: &Shared, state: TrainerState) {
    shared.stats().trainer.state = state;
}

/// The trainer thread's body. Returns when shutdown begins (after the final checkpoint).
///
/// # Errors
/// A model, tokenizer or storage failure (the supervisor restarts the trainer).
pub fn run(shared: Arc<Shared>, jobs: mpsc::Sender<Job>) -> Result<()> {
    set_state(&shared, TrainerState::Starting);
    let spec = DeviceSpec::parse(&shared.cfg.trainer.device)
        .map_err(|e| Error::Config(format!("trainer.device: {e}")))?;
    let seed = shared.cfg.trainer.seed;
    tracing::info!(device = %spec, "training");
    run_on(spec, seed, Training { shared, jobs })
        .map_err(|e| Error::Config(format!("trainer.device: {e}")))?
}

/// The trainer's loop, on whichever device is configured.
struct Training {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
}

impl OnDevice for Training {
    type Output = Result<()>;
    fn run<D: Device<f32>>(self, dev: D) -> Self::Output {
        train_loop(dev, self.shared, self.jobs)
    }
}

/// The training loop on device `dev`.
fn train_loop<D: Device<f32>>(dev: D, shared: Arc<Shared>, jobs: mpsc::Sender<Job>) -> Result<()> {
    let tc = shared.cfg.trainer.clone();
    let mut preset = configured_preset(&tc)?;
    let tokenizer = match shared.state.tokenizer()? {
        Some(t) => t,
        None => {
            let t = crate::base::tokenizer::train_tokenizer(&preset, &[]).map_err(Error::model)?;
            shared.state.set_tokenizer(&t)?;
            tracing::info!(
                vocab = t.vocab_size(),
                fingerprint = %t.fingerprint(),
                "tokenizer_trained"
            );
            t
        }
    };
    tokenizer.check_capacity(preset.vocab)?;
    let cfg = train_config(&tc);
    let augment = Augment {
        flip: tc.aug_flip,
        pad_crop: tc.aug_pad_crop,
        erase: tc.aug_erase,
    };
    let pool = plip_model::runtime::thread_pool(tc.threads)?;
    let model = Plip::<f32, D>::new(&dev, &preset, tc.seed)?;
    let mut trainer = Trainer::new(model, cfg);
    let mut images_seen = 0u64;
    let resumed = shared
        .state
        .latest_valid(|e| tracing::warn!(error = %e, "checkpoint_skipped"))?;
    if let Some(ck) = resumed {
        let stored = read_meta(&ck.weights)?.preset;
        if let Some(why) = preset.mismatch(&stored) {
            return Err(Error::ModelSetup(format!(
                "trainer.preset = {:?}: {why}",
                preset.name
            )));
        }
        if preset.attribute_fields.is_empty() && !stored.attribute_fields.is_empty() {
            // The checkpoints have the attribute head: it stays (untrained while its tasks are
            // off).
            preset = preset.with_attributes(&stored.attribute_fields);
            let model = Plip::<f32, D>::new(&dev, &preset, tc.seed)?;
            trainer = Trainer::new(model, trainer.cfg);
        }
        load_weights(&mut trainer.model, &ck.weights, tokenizer.fingerprint())?;
        load_optimizer(
            &mut trainer.opt,
            &ck.optimizer,
            &preset,
            tokenizer.fingerprint(),
        )?;
        images_seen = ck.meta.images_seen;
        let (wd, od) = crate::base::state::training_digest(&trainer.model, &trainer.opt);
        let mut st = shared.stats();
        st.trainer.resumed_digest = Some((wd.clone(), od.clone()));
        st.trainer.resumed_from = Some(ck.meta.version);
        st.trainer.step = ck.meta.step;
        st.trainer.images_seen = images_seen;
        st.trainer.last_checkpoint = Some(ck.meta.version);
        st.trainer.last_checkpoint_step = Some(ck.meta.step);
        drop(st);
        tracing::info!(
            version = ck.meta.version,
            step = ck.meta.step,
            weights_sha256 = %wd,
            optimizer_sha256 = %od,
            "resumed"
        );
    }
    shared.stats().trainer.error = None;
    let mut rng = StdRng::seed_from_u64(tc.seed ^ trainer.opt.step.wrapping_mul(0x9e37));
    let mut set = TrainingSet::build(&shared);
    // Reported from the first build, not only when new samples arrive: after a resume the
    // store may hold everything already.
    shared.stats().trainer.trainable_samples = set.entries.len();
    let mut last_new = Instant::now();
    let mut last_ckpt = (Instant::now(), trainer.opt.step);
    let mut window = (Instant::now(), 0u64);
    let mut last_loss = f64::NAN;
    let last_size = std::cell::Cell::new(0u64);
    // Ok(None): postponed, the disk being below its reserve (tried again when next due).
    let checkpoint =
        |trainer: &Trainer<f32, D>, images_seen: u64, loss: f64| -> Result<Option<u64>> {
            if let Err(e) = crate::base::disk::check(
                &shared.cfg.state.dir,
                shared.cfg.state.min_free_bytes,
                last_size.get(),
            ) {
                shared.stats().trainer.checkpoints_postponed += 1;
                tracing::warn!(step = trainer.opt.step, reason = %e, "checkpoint_postponed");
                return Ok(None);
            }
            let mut metrics = BTreeMap::new();
            if loss.is_finite() {
                metrics.insert("loss".to_string(), loss);
            }
            let (done, wait) = oneshot::channel();
            let job = Job {
                checkpoint: Checkpoint::of_trainer(
                    trainer,
                    tokenizer.fingerprint(),
                    images_seen,
                    metrics,
                )?,
                done,
            };
            // sled writes a value once in its log and again when it compacts.
            last_size
                .set(2 * (job.checkpoint.weights.len() + job.checkpoint.optimizer.len()) as u64);
            jobs.blocking_send(job)
                .map_err(|_| Error::Internal("the checkpointer is gone".into()))?;
            let v = wait
                .blocking_recv()
                .map_err(|_| Error::Internal("the checkpointer dropped a checkpoint".into()))??;
            let mut st = shared.stats();
            st.trainer.checkpoints_written += 1;
            st.trainer.last_checkpoint = Some(v);
            st.trainer.last_checkpoint_step = Some(trainer.opt.step);
            drop(st);
            tracing::info!(
                version = v,
                step = trainer.opt.step,
                images_seen,
                loss = %serde_json::json!(loss),
                "checkpoint"
            );
            Ok(Some(v))
        };
    // The most recently trained images, un-augmented, for the neck calibration before each
    // checkpoint (`trainer.calibrate_neck`).
    let mut recent: std::collections::VecDeque<Vec<u8>> =
        std::collections::VecDeque::with_capacity(tc.calibrate_neck);
    let calibrate = |trainer: &mut Trainer<f32, D>,
                     recent: &std::collections::VecDeque<Vec<u8>>| {
        // Fewer than a batch's worth of images would give noisy statistics: keep the old ones.
        if recent.len() < 64 || trainer.model.id.is_none() {
            return;
        }
        let flat: Vec<f32> = recent
            .iter()
            .flat_map(|rgb| normalize_rgb(rgb, preset.image_height, preset.image_width))
            .collect();
        let n = plip_model::runtime::install(&pool, || trainer.model.calibrate_neck(&flat, 64));
        tracing::debug!(images = n, "neck_calibrated");
    };
    while !shared.stopping() {
        let forgotten: Vec<String> =
            std::mem::take(&mut *shared.forget_rows.lock().unwrap_or_else(|e| e.into_inner()));
        for person in forgotten {
            if let Some(row) = trainer.forget_person(person_key(&person)) {
                shared.stats().trainer.forgotten_rows += 1;
                tracing::info!(person = ?person, row, "classifier_row_forgotten");
            }
        }
        let seq = shared.store.last_seq();
        if seq != set.last_seq || trainer.opt.step % 50 == 0 {
            if seq != set.last_seq {
                last_new = Instant::now();
            }
            set = TrainingSet::build(&shared);
            shared.stats().trainer.trainable_samples = set.entries.len();
        }
        if set.entries.len() < tc.min_samples.max(1) || set.sampler.groups() == 0 {
            set_state(&shared, TrainerState::WaitingForSamples);
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        if tc.idle_after_s > 0 && last_new.elapsed() > Duration::from_secs(tc.idle_after_s) {
            set_state(&shared, TrainerState::Idle);
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        set_state(&shared, TrainerState::Training);
        let picks = set
            .sampler
            .draw(tc.batch, tc.images_per_id, tc.recent_fraction, &mut rng);
        let Picked {
            loaded,
            labels,
            extra_captions,
        } = load_picks(&shared, &set, picks, &tc, &preset, &mut rng);
        if loaded.len() < 2 {
            set = TrainingSet::build(&shared);
            continue;
        }
        let spans: Vec<Vec<std::ops::Range<usize>>> = loaded
            .iter()
            .map(|(_, c, _, _)| c.phrases.iter().map(|p| p.span.clone()).collect())
            .collect();
        let samples: Vec<Sample<'_>> = loaded
            .iter()
            .zip(&spans)
            .zip(&labels)
            .map(|(((rgb, c, g, person), sp), attributes)| Sample {
                rgb,
                caption: &c.text,
                phrases: sp,
                identity: Some(*g),
                person: *person,
                attributes,
            })
            .collect();
        let ratio = trainer.cfg.mask_ratio(trainer.opt.step);
        let mut batch = Batch::build_augmented(
            &samples,
            &preset,
            &tokenizer,
            ratio,
            &mut rng,
            &augment,
            (tc.seed, trainer.opt.step),
        )?;
        let extra: Vec<(usize, &str)> = extra_captions
            .iter()
            .map(|(row, c)| (*row, c.as_str()))
            .collect();
        batch.add_captions(&extra, &preset, &tokenizer)?;
        let report = plip_model::runtime::install(&pool, || trainer.step(&batch))?;
        images_seen += samples.len() as u64;
        if tc.calibrate_neck > 0 {
            for (rgb, ..) in &loaded {
                if recent.len() == tc.calibrate_neck {
                    recent.pop_front();
                }
                recent.push_back(rgb.clone());
            }
        }
        window.1 += 1;
        if !report.skipped {
            last_loss = report.losses.total;
        }
        record_step(
            &shared,
            &report,
            (trainer.opt.step, images_seen),
            samples.len(),
            &mut window,
        );
        let due_steps = tc.checkpoint_every_steps > 0
            && trainer.opt.step >= last_ckpt.1 + tc.checkpoint_every_steps;
        let due_time = tc.checkpoint_every_s > 0
            && last_ckpt.0.elapsed() >= Duration::from_secs(tc.checkpoint_every_s);
        if (due_steps || due_time) && trainer.opt.step > last_ckpt.1 {
            // Written or postponed, the next one is due an interval from now.
            calibrate(&mut trainer, &recent);
            checkpoint(&trainer, images_seen, last_loss)?;
            last_ckpt = (Instant::now(), trainer.opt.step);
        }
    }
    if trainer.opt.step > last_ckpt.1 {
        calibrate(&mut trainer, &recent);
        checkpoint(&trainer, images_seen, last_loss)?;
    }
    set_state(&shared, TrainerState::Stopped);
    Ok(())
}

/// The model preset the trainer configuration describes.
fn configured_preset(tc: &TrainerConfig) -> Result<Preset> {
    let mut preset = Preset::by_name(&tc.preset)
        .and_then(|p| p.with_text_layers(tc.text_layers))
        .and_then(|p| p.with_conv_widths(&tc.conv_widths))
        .map(|p| match tc.text_bigrams {
            Some(rows) => p.with_text_bigrams(rows),
            None => p,
        })?;
    if !tc.joint_feature.is_empty() {
        preset = preset.with_joint(&tc.joint_feature)?;
    }
    if tc.w_attr > 0.0 || tc.w_text_attr > 0.0 {
        preset = preset.with_attributes(plip_ingest::attributes::ATTRIBUTE_FIELDS);
    }
    Ok(preset)
}

/// The continuous schedule (warm-up, then constant) and the task weights of the
/// configuration.
fn train_config(tc: &TrainerConfig) -> TrainConfig {
    TrainConfig {
        optim: OptimConfig {
            lr: tc.lr,
            warmup_steps: tc.warmup_steps,
            schedule: Schedule::Constant,
            text_lr_scale: tc.text_lr_scale,
            clip_per_tower: tc.clip_per_tower,
            logit_scale_lr_scale: tc.logit_scale_lr_scale,
            ..Default::default()
        },
        tasks: TaskWeights {
            ivlc: tc.w_ivlc,
            iap: tc.w_iap,
            tic: tc.w_tic,
            triplet: tc.w_triplet,
            supcon: tc.w_supcon,
            id: tc.w_id,
            text_id: tc.w_text_id,
            ivlc_image_grad: tc.ivlc_image_grad,
            text_id_running_stats: tc.text_id_running_stats,
            text_id_detached: tc.text_id_detached,
            proto: tc.w_proto,
            text_align: tc.w_text_align,
            attr: tc.w_attr,
            text_attr: tc.w_text_attr,
        },
        ramp_steps: tc.ramp_steps,
        text_substeps: tc.text_substeps,
    }
}

/// A batch's samples read from the store: pixels at the model's input size, the caption
/// drawn for each and its identity group and person, attribute labels, and any further
/// captions (row, text) for `trainer.captions_per_image`.
struct Picked {
    loaded: Vec<(Vec<u8>, Caption, u64, Option<u64>)>,
    labels: Vec<Vec<AttributeLabel>>,
    extra_captions: Vec<(usize, String)>,
}

/// Reads the drawn samples; one evicted, forgotten, unreadable or uncaptioned since the set
/// was built is left out.
fn load_picks(
    shared: &Shared,
    set: &TrainingSet,
    picks: Vec<(usize, u64)>,
    tc: &TrainerConfig,
    preset: &Preset,
    rng: &mut StdRng,
) -> Picked {
    let mut loaded: Vec<(Vec<u8>, Caption, u64, Option<u64>)> = Vec::with_capacity(picks.len());
    let mut labels: Vec<Vec<AttributeLabel>> = Vec::with_capacity(picks.len());
    let mut extra_captions: Vec<(usize, String)> = Vec::new();
    for (i, g) in picks {
        let s = match shared.store.get(&set.entries[i].id) {
            Ok(Some(s)) => s,
            Ok(None) => continue, // evicted or forgotten since the set was built
            Err(e) => {
                // One unreadable image (a damaged pack entry) is skipped, not fatal.
                tracing::warn!(error = %e, "sample_unreadable");
                continue;
            }
        };
        let Ok(img) = decode(&s.jpeg, &IntakeLimits::default()) else {
            continue;
        };
        if s.meta.captions.is_empty() {
            continue;
        }
        let chosen = pick_captions(s.meta.captions.len(), tc.captions_per_image, rng);
        let c = s.meta.captions[chosen[0]].clone();
        extra_captions.extend(
            chosen[1..]
                .iter()
                .map(|&k| (loaded.len(), s.meta.captions[k].text.clone())),
        );
        loaded.push((
            pixels_at(&img, preset.image_height as u32, preset.image_width as u32),
            c,
            g,
            s.meta.person_id.as_deref().map(person_key),
        ));
        labels.push(if preset.attributes() > 0 {
            crate::base::data::attribute_labels(s.meta.attributes.as_ref())
        } else {
            Vec::new()
        });
    }
    Picked {
        loaded,
        labels,
        extra_captions,
    }
}

/// The step's figures into the trainer's stats (losses of a step that was not skipped; the
/// rates over windows of at least 5 s).
fn record_step(
    shared: &Shared,
    report: &plip_model::StepReport,
    (step, images_seen): (u64, u64),
    batch: usize,
    window: &mut (Instant, u64),
) {
    let secs = window.0.elapsed().as_secs_f64();
    let mut st = shared.stats();
    let t = &mut st.trainer;
    t.step = step;
    t.images_seen = images_seen;
    if !report.skipped {
        t.loss = Some(report.losses.total);
        t.ivlc = report.losses.ivlc;
        t.iap = report.losses.iap;
        t.tic = report.losses.tic;
        t.triplet = report.losses.triplet;
        t.supcon = report.losses.supcon;
        t.id = report.losses.id;
        t.text_id = report.losses.text_id;
        t.proto = report.losses.proto;
        t.text_align = report.losses.text_align;
        t.attr = report.losses.attr;
        t.text_attr = report.losses.text_attr;
        t.text_substeps = report.losses.text_substeps;
        t.lr = Some(report.lr);
    }
    if secs >= 5.0 || t.steps_per_s.is_none() {
        t.steps_per_s = Some(window.1 as f64 / secs);
        t.images_per_s = Some(window.1 as f64 * batch as f64 / secs);
        *window = (Instant::now(), 0);
    }
}
