//! The pretext losses: IVLC against a hand computation, the curriculum, and each task learning.

mod common;

use common::*;
use plip_model::dfdx::prelude::*;
use plip_model::loss;
use plip_model::optim::{OptimConfig, Schedule};
use plip_model::{Plip, Preset, TaskWeights, TrainConfig, Trainer};

/// IVLC on a 3×3 batch where samples 0 and 1 share identity A and sample 2 is B, with the logit
/// scale s = 2, equals the value worked out by hand below, in each direction and averaged.
///
/// Embeddings (already unit length): v = [(1,0), (0,1), (−1,0)], t = [(1,0), (1,0), (0,1)].
/// cos(v_i, t_j) = [[1,1,0],[0,0,1],[−1,−1,0]]; logits = 2·cos.
/// q (rows normalised same-identity indicators) = [[½,½,0],[½,½,0],[0,0,1]]; ε = 1e-8.
///
/// image→text, KL_i = Σ_j p_ij (ln p_ij − ln(q_ij + ε)):
///   row 0: logits (2,2,0): p = (e², e², 1)/(2e²+1) = (0.468311, 0.468311, 0.063379)
///          KL = 2·0.468311·ln(0.468311/0.5) + 0.063379·(ln 0.063379 − ln 1e-8) = 0.931318
///   row 1: logits (0,0,2): p = (1, 1, e²)/(e²+2) = (0.106507, 0.106507, 0.786986)
///          KL = 2·0.106507·(ln 0.106507 − ln 0.5) + 0.786986·(ln 0.786986 − ln 1e-8) = 13.978896
///   row 2: logits (−2,−2,0): p = (0.106507, 0.106507, 0.786986), q = (0, 0, 1)
///          KL = 2·0.106507·(ln 0.106507 − ln 1e-8) + 0.786986·ln 0.786986 = 3.258289
///   mean = 6.056168
/// text→image uses the columns: logits (2,0,−2), (2,0,−2), (0,2,0):
///   rows 0 and 1: p = (0.866813, 0.117310, 0.015876), q = (½,½,0): KL = 0.533536 each
///   row 2: p = (0.106507, 0.786986, 0.106507), q = (0,0,1): KL = 15.793177
///   mean = 5.620083
/// IVLC = (6.056168 + 5.620083) / 2 = 5.838125.
#[test]
fn ivlc_matches_hand_computation() {
    let dev: Cpu = Default::default();
    let v = dev.tensor_from_vec(vec![1.0f64, 0.0, 0.0, 1.0, -1.0, 0.0], (3, 2));
    let t = dev.tensor_from_vec(vec![1.0f64, 0.0, 1.0, 0.0, 0.0, 1.0], (3, 2));
    let q = loss::identity_targets(&[Some(7), Some(7), Some(9)]);
    assert_eq!(q, vec![0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0]);
    let log_q = dev.tensor_from_vec(
        q.iter().map(|x| (x + 1e-8f64).ln()).collect::<Vec<_>>(),
        (3, 3),
    );
    let cos = v
        .clone()
        .matmul(t.clone().permute::<(usize, usize), Axes2<1, 0>>());
    let i2t = loss::kl_rows(cos.clone() * 2.0, &log_q).as_vec()[0];
    let t2i = loss::kl_rows(cos.permute::<(usize, usize), Axes2<1, 0>>() * 2.0, &log_q).as_vec()[0];
    assert!(
        (i2t - 6.056_167_752_771_166).abs() < 1e-9,
        "image→text {i2t}"
    );
    assert!(
        (t2i - 5.620_083_197_680_111).abs() < 1e-9,
        "text→image {t2i}"
    );
    let scale = dev.tensor(2.0f64);
    let both = loss::ivlc(v, t, scale, &q).as_vec()[0];
    assert!((both - 5.838_125_475_225_638).abs() < 1e-9, "ivlc {both}");
}

/// An unlabelled sample is its own identity: it matches only itself, even beside another
/// unlabelled sample.
#[test]
fn unlabelled_samples_are_their_own_identity() {
    let q = loss::identity_targets(&[None, None, Some(1), Some(1)]);
    assert_eq!(&q[0..4], &[1.0, 0.0, 0.0, 0.0]);
    assert_eq!(&q[4..8], &[0.0, 1.0, 0.0, 0.0]);
    assert_eq!(&q[8..12], &[0.0, 0.0, 0.5, 0.5]);
}

/// The IAP mask ratio follows 0.2 + 0.6·√(step/ramp) and stays at 0.8 after the ramp.
#[test]
fn mask_ratio_curriculum() {
    use plip_model::batch::mask_ratio;
    assert!((mask_ratio(0, 100) - 0.2).abs() < 1e-12);
    assert!((mask_ratio(25, 100) - 0.5).abs() < 1e-12);
    assert!((mask_ratio(100, 100) - 0.8).abs() < 1e-12);
    assert!((mask_ratio(10_000, 100) - 0.8).abs() < 1e-12);
}

/// Warm-up is linear; cosine ends at the floor; the continuous schedule stays constant.
#[test]
fn learning_rate_schedules() {
    let mut c = OptimConfig {
        lr: 1.0,
        warmup_steps: 10,
        ..Default::default()
    };
    assert!((c.lr_at(0) - 0.1).abs() < 1e-12);
    assert!((c.lr_at(9) - 1.0).abs() < 1e-12);
    assert_eq!(c.lr_at(1_000_000), 1.0);
    c.schedule = Schedule::Cosine {
        total_steps: 110,
        floor: 0.1,
    };
    assert!((c.lr_at(10) - 1.0).abs() < 1e-12);
    assert!((c.lr_at(60) - 0.55).abs() < 1e-12);
    assert!((c.lr_at(110) - 0.1).abs() < 1e-12);
    assert!((c.lr_at(500) - 0.1).abs() < 1e-12);
}

fn train_task(weights: TaskWeights, steps: usize) -> Vec<f64> {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 8, 2, 1);
    let model = Plip::<f32, Cpu>::new(&cpu(), &p, 3).unwrap();
    let cfg = TrainConfig {
        optim: OptimConfig {
            lr: 2e-3,
            warmup_steps: 0,
            weight_decay: 0.0,
            ..Default::default()
        },
        tasks: weights,
        ramp_steps: 0,
    };
    let mut trainer = Trainer::new(model, cfg);
    (0..steps)
        .map(|i| {
            let b = batch(&toys, &p, &tk, 0.5, i as u64);
            trainer.step(&b).unwrap().losses.total
        })
        .collect()
}

fn assert_falls(name: &str, losses: &[f64], factor: f64) {
    let first = losses[0];
    let last: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(
        losses.iter().all(|l| l.is_finite()),
        "{name}: non-finite loss {losses:?}"
    );
    assert!(
        last < factor * first,
        "{name}: loss went from {first} to {last} (wanted < {factor}×)"
    );
}

/// Each pretext task alone drives its own loss down on the toy problem.
#[test]
fn each_loss_falls_on_a_toy_problem() {
    let ivlc = train_task(
        TaskWeights {
            ivlc: 1.0,
            iap: 0.0,
            tic: 0.0,
        },
        60,
    );
    assert_falls("ivlc", &ivlc, 0.5);
    let iap = train_task(
        TaskWeights {
            ivlc: 0.0,
            iap: 1.0,
            tic: 0.0,
        },
        60,
    );
    assert_falls("iap", &iap, 0.5);
    let tic = train_task(
        TaskWeights {
            ivlc: 0.0,
            iap: 0.0,
            tic: 1.0,
        },
        60,
    );
    assert_falls("tic", &tic, 0.5);
    let all = train_task(TaskWeights::default(), 60);
    assert_falls("all", &all, 0.6);
}

/// Switching every task off is refused with a clear error rather than a silent zero loss.
#[test]
fn all_tasks_off_is_an_error() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 2, 2, 1);
    let model = Plip::<f32, Cpu>::new(&cpu(), &p, 3).unwrap();
    let b = batch(&toys, &p, &tk, 0.5, 0);
    let err = model
        .losses(
            &b,
            &TaskWeights {
                ivlc: 0.0,
                iap: 0.0,
                tic: 0.0,
            },
            NoneTape,
        )
        .unwrap_err();
    assert!(err.to_string().contains("switched off"), "{err}");
}

/// A non-finite loss skips the step, is counted, and leaves the weights untouched.
#[test]
fn non_finite_loss_skips_the_step() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 2, 2, 1);
    let model = Plip::<f32, Cpu>::new(&cpu(), &p, 3).unwrap();
    let mut trainer = Trainer::new(model, TrainConfig::default());
    let mut b = batch(&toys, &p, &tk, 0.5, 0);
    b.images[5] = f32::NAN;
    let before = trainer
        .model
        .embed_images(&batch(&toys, &p, &tk, 0.5, 0).images, 8);
    let r = trainer.step(&b).unwrap();
    assert!(r.skipped && !r.losses.total.is_finite());
    assert_eq!(trainer.skipped_steps, 1);
    assert_eq!(trainer.opt.step, 0);
    let after = trainer
        .model
        .embed_images(&batch(&toys, &p, &tk, 0.5, 0).images, 8);
    assert_eq!(before, after);
}
