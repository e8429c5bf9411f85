//! `plipd tokenizer train` and `plipd train`: offline training from a data-set folder into a
//! state folder — identity-balanced batches, the three pretext tasks, warm-up + cosine schedule,
//! periodic checkpoints, resumption from the latest valid checkpoint, a JSON line of losses
//! every N steps, and a loss curve at the end.

use crate::base::data::{load, report_skipped, Loaded};
use crate::base::sampler::PkSampler;
use crate::base::state::{Checkpoint, State};
use crate::base::tokenizer::train_tokenizer;
use plip_ingest::synth::Split;
use plip_model::batch::{person_key, Augment, Batch, Sample};
use plip_model::dfdx::prelude::Device;
use plip_model::optim::{OptimConfig, Schedule};
use plip_model::weights::{load_optimizer, load_weights};
use plip_model::{DeviceSpec, Plip, Preset, TaskWeights, TrainConfig, Trainer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

type Error = Box<dyn std::error::Error>;

/// Options of `plipd tokenizer train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenizerArgs {
    /// Store the tokenizer in this state folder.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Or write it to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Preset whose vocabulary capacity bounds the vocabulary.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Extra text files (one caption per line) to learn from.
    #[arg(long = "text")]
    pub texts: Vec<PathBuf>,
}

/// Runs `plipd tokenizer train`.
pub fn run_tokenizer(args: &TokenizerArgs) -> Result<(), Error> {
    if args.state.is_none() && args.out.is_none() {
        return Err("give --state DIR or --out FILE".into());
    }
    let preset = Preset::by_name(&args.preset)?;
    let mut extra = Vec::new();
    for f in &args.texts {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        extra.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    let tk = train_tokenizer(&preset, &extra)?;
    if let Some(out) = &args.out {
        std::fs::write(out, tk.to_bytes()?)
            .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    }
    if let Some(dir) = &args.state {
        State::open(dir)?.set_tokenizer(&tk)?;
    }
    println!(
        "{}",
        serde_json::json!({"vocab_size": tk.vocab_size(), "capacity": preset.vocab, "fingerprint": tk.fingerprint(), "extra_lines": extra.len()})
    );
    Ok(())
}

/// Options of `plipd train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Data-set folder (synthpedes.json, reid_raw.json or Market-1501 folders).
    #[arg(long)]
    pub data: PathBuf,
    /// State folder (created if absent; training resumes from its latest checkpoint).
    #[arg(long)]
    pub state: PathBuf,
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Override the preset's image stem (`linear` or `hmlp`).
    #[arg(long)]
    pub stem: Option<String>,
    /// Override the ResNet's four stage widths, e.g. `64,128,256,512`.
    #[arg(long)]
    pub conv_widths: Option<String>,
    /// Override the number of transformer blocks of the text tower.
    #[arg(long)]
    pub text_layers: Option<usize>,
    /// Re-estimate the BNNeck's running statistics from this many clean training images
    /// before every evaluation and checkpoint (0 = keep the training batches' running
    /// averages); changes no weight and no training step.
    #[arg(long, default_value_t = 512)]
    pub calibrate_neck: usize,
    /// Override the rows of the text tower's hashed bigram embedding (0 = none).
    #[arg(long)]
    pub text_bigrams: Option<usize>,
    /// Override the preset's joint image feature (`pooled`, `neck` or `both`).
    #[arg(long)]
    pub joint_feature: Option<String>,
    /// Evaluate and save checkpoints that embed every image as the mean of itself and its
    /// mirror image (`true`) or not (`false`); training is the same either way.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub flip_average: bool,
    /// Evaluate and save checkpoints that rank by attribute agreement with this weight beside
    /// the joint feature (with the attribute head; 0 = off); training is the same either way.
    #[arg(long, default_value_t = 0.0)]
    pub attribute_weight: f64,
    /// Samples per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Images of each identity in a batch (identity-balanced sampling).
    #[arg(long, default_value_t = 4)]
    pub images_per_id: usize,
    /// Total optimisation steps (the schedule's length; 625 × 64 = 40,000 images).
    #[arg(long, default_value_t = 625)]
    pub steps: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// The text tower's learning rate as a multiple of `--lr`.
    #[arg(long, default_value_t = 0.3)]
    pub text_lr_scale: f64,
    /// Keep the text tower's learning rate at `--lr × --text-lr-scale` after the warm-up
    /// (`true`, the default: text→image R@1 kept rising where the cosine had stalled it) or
    /// decay it with the image side's cosine (`false`). The daemon's schedule is constant
    /// anyway.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub text_constant_lr: bool,
    /// Clip the text side's gradient and the image side's each on its own (`true`, the
    /// default), or both under one global norm (`false`: with the text tower's constant
    /// learning rate the text gradient then took the image tower's steps, run h2).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub clip_per_tower: bool,
    /// The logit scale's learning rate as a multiple of `--lr`.
    #[arg(long, default_value_t = 1.0)]
    pub logit_scale_lr_scale: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 50)]
    pub warmup: u64,
    /// Task weights; 0 turns a task off.
    #[arg(long, default_value_t = 1.0)]
    pub w_ivlc: f64,
    #[arg(long, default_value_t = 0.0)]
    pub w_iap: f64,
    #[arg(long, default_value_t = 0.0)]
    pub w_tic: f64,
    /// Weight of the batch-hard triplet loss on image embeddings (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub w_triplet: f64,
    /// Weight of supervised image–image contrast (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub w_supcon: f64,
    /// Weight of identity classification (BNNeck + classifier, label smoothing 0.1; 0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub w_id: f64,
    /// Weight of identity classification of captions by the same classifier (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub w_text_id: f64,
    /// Let IVLC's gradient reach the image tower even when identity losses train it.
    #[arg(long)]
    pub ivlc_image_grad: bool,
    /// Normalise captions in the caption-identity loss with the images' running statistics
    /// (default: the caption batch's own statistics).
    #[arg(long)]
    pub text_id_running_stats: bool,
    /// The caption-identity loss leaves the identity head (neck and classifier) to the images.
    #[arg(long)]
    pub text_id_detached: bool,
    /// Weight of caption–prototype contrast: each caption against the running-mean image
    /// feature of every person seen so far (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub w_proto: f64,
    /// Weight of caption–feature alignment: each caption regressed (1 − cosine) onto the mean
    /// joint feature of its person's images in the batch, constants (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub w_text_align: f64,
    /// Weight of attribute prediction from the image's joint feature, by an attribute head
    /// shared with the captions (data sets with true attributes; 0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub w_attr: f64,
    /// Weight of attribute prediction from the caption embeddings by the same head (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub w_text_attr: f64,
    /// Text substeps: after each step the text tower alone takes one more update against each
    /// of the last N batches' captions and their image features, kept in memory — more text
    /// updates without reading or encoding an image (0 = off).
    #[arg(long, default_value_t = 0)]
    pub text_substeps: u32,
    /// Captions read per image and step (up to the sample's count): the first feeds every
    /// task, the others the caption-side losses (IVLC, caption identity) at the cost of a wider
    /// text pass only.
    #[arg(long, default_value_t = 1)]
    pub captions_per_image: usize,
    /// Augmentation: probability of a horizontal flip.
    #[arg(long, default_value_t = 0.5)]
    pub aug_flip: f64,
    /// Augmentation: pad by this fraction of the width, then a random crop (0 = off).
    #[arg(long, default_value_t = 0.125)]
    pub aug_pad_crop: f64,
    /// Augmentation: probability of random erasing.
    #[arg(long, default_value_t = 0.5)]
    pub aug_erase: f64,
    /// Steps over which the IAP mask ratio rises from 0.2 to 0.8.
    #[arg(long, default_value_t = 500)]
    pub ramp_steps: u64,
    /// Print a JSON line of losses every N steps.
    #[arg(long, default_value_t = 20)]
    pub log_every: u64,
    /// Write a checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 200)]
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 5)]
    pub keep: usize,
    /// Device: cpu, or cuda / cuda:N in a CUDA build (scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the loss curve goes.
    #[arg(long, default_value = "reports")]
    pub report: PathBuf,
    /// Evaluate on the data set's query/gallery split every N steps and at the end (0 = never);
    /// the metrics go into the JSON log and the checkpoint.
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
}

/// Parses a comma-separated list of four stage widths.
pub fn parse_widths(list: &str) -> Result<Vec<usize>, Error> {
    let w: Vec<usize> = list
        .split(',')
        .map(|v| v.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--conv-widths {list:?}: {e}"))?;
    if w.len() != 4 {
        return Err(format!("--conv-widths {list:?}: give four widths").into());
    }
    Ok(w)
}

/// The offline P×K sampler: [`PkSampler`] over the loaded items with its own seeded draw.
struct Sampler {
    pk: PkSampler,
    rng: StdRng,
    per_id: usize,
}

impl Sampler {
    fn new(items: &[Loaded], per_id: usize, seed: u64) -> Self {
        Sampler {
            pk: PkSampler::new(items.iter().map(|it| it.person.as_deref())),
            rng: StdRng::seed_from_u64(seed),
            per_id,
        }
    }

    fn next(&mut self, batch: usize) -> Vec<(usize, u64)> {
        self.pk.draw(batch, self.per_id, 0.0, &mut self.rng)
    }
}

/// The training configuration of these options.
pub fn train_config(args: &TrainArgs) -> TrainConfig {
    TrainConfig {
        optim: OptimConfig {
            lr: args.lr,
            warmup_steps: args.warmup,
            text_lr_scale: args.text_lr_scale,
            text_constant_lr: args.text_constant_lr,
            clip_per_tower: args.clip_per_tower,
            logit_scale_lr_scale: args.logit_scale_lr_scale,
            schedule: Schedule::Cosine {
                total_steps: args.steps,
                floor: 0.05,
            },
            ..Default::default()
        },
        tasks: TaskWeights {
            ivlc: args.w_ivlc,
            iap: args.w_iap,
            tic: args.w_tic,
            triplet: args.w_triplet,
            supcon: args.w_supcon,
            id: args.w_id,
            text_id: args.w_text_id,
            ivlc_image_grad: args.ivlc_image_grad,
            text_id_running_stats: args.text_id_running_stats,
            text_id_detached: args.text_id_detached,
            proto: args.w_proto,
            text_align: args.w_text_align,
            attr: args.w_attr,
            text_attr: args.w_text_attr,
        },
        ramp_steps: args.ramp_steps,
        text_substeps: args.text_substeps,
    }
}

/// Runs `plipd train`.
pub fn run(args: &TrainArgs) -> Result<(), Error> {
    plip_model::runtime::tune_allocator();
    let mut preset = Preset::by_name(&args.preset)?;
    if let Some(stem) = &args.stem {
        preset.stem = plip_model::Stem::by_name(stem)?;
        preset.validate()?;
    }
    if let Some(w) = &args.conv_widths {
        preset = preset.with_conv_widths(&parse_widths(w)?)?;
    }
    if let Some(layers) = args.text_layers {
        if layers == 0 {
            return Err("--text-layers must be at least 1".into());
        }
        preset = preset.with_text_layers(layers)?;
    }
    if let Some(rows) = args.text_bigrams {
        preset = preset.with_text_bigrams(rows);
    }
    if let Some(j) = &args.joint_feature {
        preset = preset.with_joint(j)?;
    }
    preset.flip_average = args.flip_average;
    if !(args.attribute_weight >= 0.0 && args.attribute_weight.is_finite()) {
        return Err("--attribute-weight must be a number ≥ 0".into());
    }
    preset.attribute_weight = args.attribute_weight;
    if args.w_attr > 0.0 || args.w_text_attr > 0.0 {
        preset = preset.with_attributes(plip_ingest::attributes::ATTRIBUTE_FIELDS);
    }
    if args.batch < 2 || args.steps == 0 {
        return Err("--batch must be at least 2 and --steps at least 1".into());
    }
    if args.captions_per_image == 0 {
        return Err("--captions-per-image must be at least 1".into());
    }
    if args.text_substeps > crate::base::config::MAX_TEXT_SUBSTEPS {
        return Err(format!(
            "--text-substeps must be at most {} (each is one more text pass per step)",
            crate::base::config::MAX_TEXT_SUBSTEPS
        )
        .into());
    }
    let ds = plip_ingest::datasets::open(&args.data)?;
    report_skipped("record", &ds.skipped);
    // One read of the data set: training items, and the query/gallery split for --eval-every.
    let (items, held_out): (Vec<_>, Vec<_>) = ds
        .items
        .into_iter()
        .partition(|i| matches!(i.split, None | Some(Split::Train)));
    if items.is_empty() {
        return Err(format!("{} has no training images", args.data.display()).into());
    }
    let state = State::open(&args.state)?;
    let tokenizer = match state.tokenizer()? {
        Some(t) => t,
        None => {
            let captions: Vec<String> = items
                .iter()
                .flat_map(|i| i.captions.iter().map(|c| c.text.clone()))
                .collect();
            let t = train_tokenizer(&preset, &captions)?;
            state.set_tokenizer(&t)?;
            t
        }
    };
    tokenizer.check_capacity(preset.vocab)?;
    eprintln!(
        "plipd: loading {} training images ({} format)…",
        items.len(),
        ds.format
    );
    let (loaded, bad) = load(&items, &preset, &Default::default(), args.seed);
    report_skipped("image", &bad);
    if loaded.is_empty() {
        return Err("no training image could be decoded".into());
    }
    let eval_split = if args.eval_every > 0 {
        let q: Vec<_> = held_out
            .iter()
            .filter(|i| i.split == Some(Split::Query))
            .cloned()
            .collect();
        let g: Vec<_> = held_out
            .iter()
            .filter(|i| i.split == Some(Split::Gallery))
            .cloned()
            .collect();
        if q.is_empty() || g.is_empty() {
            return Err("--eval-every needs a query/gallery split in the data set".into());
        }
        let (q, _) = load(&q, &preset, &Default::default(), 0);
        let (g, _) = load(&g, &preset, &Default::default(), 0);
        Some((q, g))
    } else {
        None
    };
    let setup = Setup {
        args,
        state,
        preset,
        tokenizer,
        loaded,
        eval_split,
    };
    let spec = DeviceSpec::parse(&args.device)?;
    if let DeviceSpec::Cuda(n) = spec {
        eprintln!(
            "plipd: training on {}",
            plip_model::device::cuda_describe(n)?
        );
    }
    plip_model::device::run_on(spec, args.seed, setup)?
}

/// What `plipd train` prepared before choosing the device.
struct Setup<'a> {
    args: &'a TrainArgs,
    state: State,
    preset: Preset,
    tokenizer: plip_model::Tokenizer,
    loaded: Vec<crate::base::data::Loaded>,
    eval_split: Option<(
        Vec<crate::base::data::Loaded>,
        Vec<crate::base::data::Loaded>,
    )>,
}

impl plip_model::device::OnDevice for Setup<'_> {
    type Output = Result<(), Error>;
    fn run<D: Device<f32>>(self, dev: D) -> Self::Output {
        train_on(dev, self)
    }
}

/// The training loop on device `dev`.
fn train_on<D: Device<f32>>(dev: D, setup: Setup<'_>) -> Result<(), Error> {
    let Setup {
        args,
        state,
        mut preset,
        tokenizer,
        loaded,
        eval_split,
    } = setup;
    let cfg = train_config(args);
    let augment = Augment {
        flip: args.aug_flip,
        pad_crop: args.aug_pad_crop,
        erase: args.aug_erase,
    };
    let pool = plip_model::runtime::thread_pool(args.threads)?;
    let model = Plip::<f32, D>::new(&dev, &preset, args.seed)?;
    let mut trainer = Trainer::new(model, cfg);
    let mut images_seen = 0u64;
    let resumed = state.latest_valid(|e| eprintln!("plipd: {e}; skipped"))?;
    if let Some(ck) = resumed {
        let stored = plip_model::weights::read_meta(&ck.weights)?.preset;
        if let Some(why) = preset.mismatch(&stored) {
            return Err(format!("--preset {}: {why}", preset.name).into());
        }
        if preset.attribute_fields.is_empty() && !stored.attribute_fields.is_empty() {
            // The checkpoints have the attribute head: it stays (untrained while its tasks are
            // off).
            preset = preset.with_attributes(&stored.attribute_fields);
            let model = Plip::<f32, D>::new(&dev, &preset, args.seed)?;
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
        eprintln!(
            "plipd: resuming from checkpoint {} at step {}",
            ck.meta.version, ck.meta.step
        );
    }
    // The attribute head's labels: the true attributes of the data set's samples.
    let labels: Vec<Vec<plip_model::batch::AttributeLabel>> = loaded
        .iter()
        .map(|l| {
            if preset.attributes() > 0 {
                crate::base::data::attribute_labels(l.attributes.as_ref())
            } else {
                Vec::new()
            }
        })
        .collect();
    let start = trainer.opt.step;
    if start >= args.steps {
        eprintln!(
            "plipd: already trained {start} of {} steps; nothing to do",
            args.steps
        );
        return Ok(());
    }
    let mut sampler = Sampler::new(&loaded, args.images_per_id, args.seed ^ start);
    let mut rng = StdRng::seed_from_u64(args.seed ^ start.wrapping_mul(31));
    let bar = crate::base::progress::bar(args.steps, "training");
    bar.set_position(start);
    let mut history: Vec<(u64, f64)> = Vec::new();
    let t0 = Instant::now();
    let mut window = (Instant::now(), 0u64);
    let mut last = None;
    let text_ceiling = eval_split
        .as_ref()
        .and_then(|(q, g)| crate::base::retrieval::text_ceiling_r1(q, g));
    let evaluate = |trainer: &Trainer<f32, D>,
                    images_seen: u64|
     -> Result<BTreeMap<String, f64>, Error> {
        let mut m = BTreeMap::new();
        if let Some((q, g)) = &eval_split {
            let lm = crate::base::model::LoadedModel {
                model: plip_model::Encoder::Cpu(trainer.model.to_cpu()?),
                tokenizer: tokenizer.clone(),
                source: serde_json::Value::Null,
                checkpoint: None,
            };
            // Text R@1 with attribute agreement beside it, for a few weights (models with the
            // attribute head), from the same embeddings.
            let (reid, text, sweep) = pool.install(|| {
                crate::base::retrieval::evaluate_with_attributes(
                    &lm,
                    q,
                    g,
                    10,
                    &[0.5, 1.0, 2.0, 4.0, f64::INFINITY],
                )
            })?;
            m.insert("rank1".to_string(), reid.cmc[0]);
            m.insert("mAP".to_string(), reid.map);
            m.insert("text_r1".to_string(), text.r1);
            m.insert("text_mAP".to_string(), text.map);
            if let Some(c) = text_ceiling {
                m.insert("text_r1_ceiling".to_string(), c);
            }
            for (w, r1) in sweep.unwrap_or_default() {
                m.insert(format!("text_r1_attr_{w}"), r1);
            }
            println!(
                "{}",
                serde_json::json!({"eval": m, "step": trainer.opt.step, "images_seen": images_seen, "logit_scale": trainer.model.logit_scale_value()})
            );
        }
        Ok(m)
    };
    let save = |trainer: &Trainer<f32, D>,
                images_seen: u64,
                loss: f64,
                evaluated: BTreeMap<String, f64>|
     -> Result<u64, Error> {
        let mut metrics = evaluated;
        metrics.insert("loss".to_string(), loss);
        let v = state.save_checkpoint(Checkpoint::of_trainer(
            trainer,
            tokenizer.fingerprint(),
            images_seen,
            metrics,
        )?)?;
        state.prune(args.keep, &state.protected_versions()?)?;
        Ok(v)
    };
    // Clean training images (spread over the set) the BNNeck's running statistics are
    // re-estimated from before every evaluation and checkpoint (`Plip::calibrate_neck`): the
    // statistics then describe un-augmented images in eval mode, as the served ones are. Only
    // running statistics change, which no training loss reads: training is the same either
    // way, and a checkpoint's statistics depend only on its weights (resume equivalence).
    let calibration: Vec<f32> = if args.calibrate_neck > 0 && trainer.model.id.is_some() {
        crate::base::data::normalized(
            crate::base::data::spread(&loaded, args.calibrate_neck),
            &preset,
        )
    } else {
        Vec::new()
    };
    let calibrate = |trainer: &mut Trainer<f32, D>| {
        if !calibration.is_empty() {
            plip_model::runtime::install(&pool, || trainer.model.calibrate_neck(&calibration, 64));
        }
    };
    while trainer.opt.step < args.steps {
        let picks = sampler.next(args.batch);
        let caption_picks: Vec<Vec<usize>> = picks
            .iter()
            .map(|&(i, _)| {
                plip_model::batch::pick_captions(
                    loaded[i].captions.len(),
                    args.captions_per_image,
                    &mut rng,
                )
            })
            .collect();
        let chosen: Vec<(usize, u64, usize)> = picks
            .iter()
            .zip(&caption_picks)
            .map(|(&(i, g), c)| (i, g, c[0]))
            .collect();
        let spans: Vec<Vec<std::ops::Range<usize>>> = chosen
            .iter()
            .map(|&(i, _, c)| {
                loaded[i].captions[c]
                    .phrases
                    .iter()
                    .map(|p| p.span.clone())
                    .collect()
            })
            .collect();
        let samples: Vec<Sample<'_>> = chosen
            .iter()
            .zip(&spans)
            .map(|(&(i, g, c), sp)| Sample {
                rgb: &loaded[i].rgb,
                caption: &loaded[i].captions[c].text,
                phrases: sp,
                identity: Some(g),
                person: loaded[i].person.as_deref().map(person_key),
                attributes: &labels[i],
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
            (args.seed, trainer.opt.step),
        )?;
        let mut extra: Vec<(usize, &str)> = Vec::new();
        for (row, (&(i, _), c)) in picks.iter().zip(&caption_picks).enumerate() {
            extra.extend(
                c[1..]
                    .iter()
                    .map(|&k| (row, loaded[i].captions[k].text.as_str())),
            );
        }
        batch.add_captions(&extra, &preset, &tokenizer)?;
        let report = plip_model::runtime::install(&pool, || trainer.step(&batch))?;
        images_seen += samples.len() as u64;
        window.1 += 1;
        bar.set_position(trainer.opt.step);
        if report.skipped {
            eprintln!(
                "plipd: step skipped (non-finite loss or gradient); {} skipped so far",
                trainer.skipped_steps
            );
            continue;
        }
        history.push((trainer.opt.step, report.losses.total));
        last = Some(report);
        if trainer.opt.step % args.log_every == 0 || trainer.opt.step == args.steps {
            let secs = window.0.elapsed().as_secs_f64();
            let l = report.losses;
            println!(
                "{}",
                serde_json::json!({
                    "step": trainer.opt.step, "images_seen": images_seen, "loss": l.total,
                    "ivlc": l.ivlc, "iap": l.iap, "tic": l.tic, "triplet": l.triplet, "supcon": l.supcon, "id": l.id, "text_id": l.text_id, "proto": l.proto, "text_align": l.text_align, "attr": l.attr, "text_attr": l.text_attr, "text_substeps": l.text_substeps, "lr": report.lr, "grad_norm": report.grad_norm,
                    "mask_ratio": ratio, "steps_per_s": window.1 as f64 / secs,
                    "images_per_s": window.1 as f64 * args.batch as f64 / secs, "elapsed_s": t0.elapsed().as_secs_f64(),
                    "logit_scale": trainer.model.logit_scale_value(),
                })
            );
            window = (Instant::now(), 0);
        }
        let eval_now = args.eval_every > 0
            && trainer.opt.step % args.eval_every == 0
            && trainer.opt.step < args.steps;
        let save_now =
            trainer.opt.step % args.checkpoint_every == 0 && trainer.opt.step < args.steps;
        if eval_now || save_now {
            calibrate(&mut trainer);
        }
        let evaluated = if eval_now {
            evaluate(&trainer, images_seen)?
        } else {
            BTreeMap::new()
        };
        if save_now {
            save(&trainer, images_seen, report.losses.total, evaluated)?;
        }
    }
    bar.finish_and_clear();
    let loss = last.map_or(f64::NAN, |r| r.losses.total);
    calibrate(&mut trainer);
    let evaluated = if args.eval_every > 0 {
        evaluate(&trainer, images_seen)?
    } else {
        BTreeMap::new()
    };
    let v = save(&trainer, images_seen, loss, evaluated)?;
    std::fs::create_dir_all(&args.report)
        .map_err(|e| format!("cannot create {}: {e}", args.report.display()))?;
    let png = args.report.join("loss.png");
    crate::base::plots::loss_curve(&history, &png)?;
    eprintln!(
        "plipd: trained to step {} ({} images, {:.0} s); checkpoint {v}; loss curve {}",
        trainer.opt.step,
        images_seen,
        t0.elapsed().as_secs_f64(),
        png.display()
    );
    Ok(())
}
