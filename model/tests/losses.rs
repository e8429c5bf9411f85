//! The pretext losses: IVLC against a hand computation, the curriculum, and each task learning.

mod common;

use common::*;
use plip_model::dfdx::prelude::*;
use plip_model::loss;
use plip_model::optim::{OptimConfig, Schedule};
use plip_model::{Params, Plip, Preset, TaskWeights, TrainConfig, Trainer};

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
        text_substeps: 0,
    };
    let mut trainer = Trainer::new(model, cfg);
    (0..steps)
        .map(|i| {
            let b = batch(&toys, &p, &tk, 0.5, i as u64);
            trainer.step(&b).unwrap().losses.total
        })
        .collect()
}

/// Every parameter's values by name, to see which ones a step moved.
fn snapshot(m: &Plip<f32, Cpu>) -> Vec<(String, Vec<f32>)> {
    m.params()
        .into_iter()
        .map(|(n, p)| (n, p.to_host()))
        .collect()
}

/// Between two snapshots: whether any text-tower parameter differs, and the names of the other
/// parameters that differ.
fn moved(before: &[(String, Vec<f32>)], after: &[(String, Vec<f32>)]) -> (bool, Vec<String>) {
    let mut text = false;
    let mut other = Vec::new();
    for ((name, a), (_, z)) in before.iter().zip(after) {
        if name.starts_with("text.") {
            text |= a != z;
        } else if a != z {
            other.push(name.clone());
        }
    }
    (text, other)
}

fn assert_falls(name: &str, losses: &[f64], factor: f64) {
    let first = losses[0];
    assert!(
        first > 0.0,
        "{name}: the toy problem starts solved ({first})"
    );
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
            ..TaskWeights::none()
        },
        60,
    );
    assert_falls("ivlc", &ivlc, 0.5);
    let iap = train_task(
        TaskWeights {
            iap: 1.0,
            ..TaskWeights::none()
        },
        60,
    );
    assert_falls("iap", &iap, 0.5);
    let tic = train_task(
        TaskWeights {
            tic: 1.0,
            ..TaskWeights::none()
        },
        60,
    );
    assert_falls("tic", &tic, 0.5);
    let id = train_task(
        TaskWeights {
            id: 1.0,
            ..TaskWeights::none()
        },
        60,
    );
    assert_falls("id", &id, 0.5);
    let supcon = train_task(
        TaskWeights {
            supcon: 1.0,
            ..TaskWeights::none()
        },
        60,
    );
    assert_falls("supcon", &supcon, 0.5);
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
        .losses(&b, &TaskWeights::none(), NoneTape)
        .unwrap_err();
    assert!(err.to_string().contains("switched off"), "{err}");
}

/// A non-finite loss skips the step, is counted, and leaves the weights untouched — and so does
/// a non-finite activation that a ReLU would hide from the loss (the ResNet): its BatchNorm
/// statistics are not finite, and the running statistics must never take them.
#[test]
fn non_finite_loss_skips_the_step() {
    for p in [Preset::test_vit(), Preset::test()] {
        let tk = tokenizer(&p);
        let toys = toy_samples(&p, 2, 2, 1);
        let model = Plip::<f32, Cpu>::new(&cpu(), &p, 3).unwrap();
        // The prototypes (fed by the caption–prototype loss) must not take the NaN either.
        let cfg = TrainConfig {
            tasks: plip_model::TaskWeights {
                proto: 1.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut trainer = Trainer::new(model, cfg);
        let mut b = batch(&toys, &p, &tk, 0.5, 0);
        b.images[5] = f32::NAN;
        let before = trainer
            .model
            .embed_images(&batch(&toys, &p, &tk, 0.5, 0).images, 8);
        let buffers_before: Vec<Vec<f32>> = trainer
            .model
            .buffers()
            .iter()
            .map(|(_, t)| t.to_host())
            .collect();
        let r = trainer.step(&b).unwrap();
        assert!(r.skipped, "{}", p.name);
        if p.name == "test-vit" {
            assert!(!r.losses.total.is_finite());
        }
        assert_eq!(trainer.skipped_steps, 1);
        assert_eq!(trainer.opt.step, 0);
        let after = trainer
            .model
            .embed_images(&batch(&toys, &p, &tk, 0.5, 0).images, 8);
        assert_eq!(before, after);
        let buffers_after: Vec<Vec<f32>> = trainer
            .model
            .buffers()
            .iter()
            .map(|(_, t)| t.to_host())
            .collect();
        assert_eq!(buffers_before, buffers_after);
    }
}

/// Batch-hard triplet on hand-made embeddings: each anchor's farthest positive and nearest
/// negative, hinge at the margin, averaged over anchors that have both; unlabelled samples are
/// nobody's positive or negative.
#[test]
fn batch_hard_triplet_values() {
    let dev = cpu();
    // Points on a line: a0 = 0, a1 = 1 (person 1); b0 = 1.2, b1 = 3 (person 2); u = 0.1 (none).
    let x = [0.0f64, 1.0, 1.2, 3.0, 0.1];
    let emb: Tensor<(usize, usize), f64, Cpu> = dev.tensor_from_vec(x.to_vec(), (5, 1));
    let ids = [Some(1), Some(1), Some(2), Some(2), None];
    let pairs = loss::IdentityPairs::new(&ids);
    let got = loss::batch_hard_triplet(emb, &pairs, 0.3).as_vec()[0];
    // a0: pos 1, neg 1.2 → 0.1; a1: pos 1, neg 0.2 → 1.1; b0: pos 1.8, neg 0.2 → 1.9;
    // b1: pos 1.8, neg 2 → 0.1. Mean 0.8.
    assert!((got - 0.8).abs() < 1e-9, "{got}");
}

/// Identity classification with label smoothing on hand-made logits.
#[test]
fn id_loss_values() {
    let dev = cpu();
    let logits: Tensor<(usize, usize), f64, Cpu> =
        dev.tensor_from_vec(vec![2.0, 0.0, 0.0, 0.0, 1.0, 3.0], (2, 3));
    // Row 0 is person key 3 → class 0; row 1 is unlabelled and counts nothing.
    let l = loss::id_loss(logits, &[Some(3), None], 0.1)
        .unwrap()
        .as_vec()[0];
    let z = (2f64.exp() + 2.0).ln();
    let logp = [2.0 - z, -z, -z];
    let want = -(0.9 + 0.1 / 3.0) * logp[0] - (0.1 / 3.0) * (logp[1] + logp[2]);
    assert!((l - want).abs() < 1e-12, "{l} vs {want}");
}

/// `text_lr_scale` multiplies the text tower's learning rate only: at 0 the text tower stays
/// where it was while the image tower moves.
#[test]
fn text_learning_rate_scale_reaches_the_text_tower_only() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 3, 2, 4);
    let b = batch(&toys, &p, &tk, 0.5, 1);
    let mut cfg = quick_config(TaskWeights::default());
    cfg.optim.text_lr_scale = 0.0;
    let mut t = Trainer::new(Plip::<f32, Cpu>::new(&cpu(), &p, 3).unwrap(), cfg);
    let before = snapshot(&t.model);
    t.step(&b).unwrap();
    let after = snapshot(&t.model);
    let (mut text_moved, mut image_moved) = (false, false);
    for ((name, a), (_, z)) in before.iter().zip(&after) {
        if name.starts_with("text.") {
            text_moved |= a != z;
        } else if name.starts_with("image.") {
            image_moved |= a != z;
        }
    }
    assert!(!text_moved, "a text parameter moved at text_lr_scale 0");
    assert!(image_moved, "no image parameter moved");
}

/// `logit_scale_lr_scale` multiplies the logit scale's learning rate alone: Adam's first step
/// moves a parameter by about its learning rate, so ln s moves ten times as far at 10×, and
/// nothing else moves differently.
#[test]
fn logit_scale_learning_rate_scale() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 3, 2, 4);
    let b = batch(&toys, &p, &tk, 0.5, 1);
    let run = |mult: f64| {
        let mut cfg = quick_config(TaskWeights::default());
        cfg.optim.logit_scale_lr_scale = mult;
        let mut t = Trainer::new(Plip::<f32, Cpu>::new(&cpu(), &p, 3).unwrap(), cfg);
        let before = t.model.logit_scale_value().ln();
        t.step(&b).unwrap();
        let rest: Vec<(String, Vec<f32>)> = t
            .model
            .params()
            .into_iter()
            .filter(|(n, _)| n != "logit_scale")
            .map(|(n, p)| (n, p.to_host()))
            .collect();
        (t.model.logit_scale_value().ln() - before, rest)
    };
    let (one, rest1) = run(1.0);
    let (ten, rest10) = run(10.0);
    assert!(
        one.abs() > 0.5e-3 && one.abs() < 1.5e-3,
        "ln s moved {one} at 1x"
    );
    assert!(
        (ten / one - 10.0).abs() < 0.5,
        "ln s moved {ten} at 10x, {one} at 1x"
    );
    assert_eq!(rest1, rest10);
}

/// `clip_per_tower`: the text side is clipped on its own, so however large its gradient, the
/// image tower and the heads take the same steps (three steps, so Adam sees the clip factors
/// change); with one global clip a hundredfold image–text loss changes the image tower's steps.
#[test]
fn per_tower_clipping_keeps_the_image_steps_from_the_text_gradient() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let batches: Vec<_> = (0..3)
        .map(|i| batch(&toy_samples(&p, 3, 2, 10 + i), &p, &tk, 0.5, i))
        .collect();
    let image_after = |ivlc: f64, per_tower: bool| -> Vec<(String, Vec<f32>)> {
        let mut cfg = quick_config(TaskWeights {
            ivlc,
            iap: 0.0,
            tic: 0.0,
            text_id: 0.0,
            ..TaskWeights::default()
        });
        cfg.optim.clip_norm = 0.1;
        cfg.optim.clip_per_tower = per_tower;
        let mut t = Trainer::new(Plip::<f32, Cpu>::new(&cpu(), &p, 3).unwrap(), cfg);
        for b in &batches {
            assert!(!t.step(b).unwrap().skipped);
        }
        t.model
            .params()
            .into_iter()
            .filter(|(n, _)| !plip_model::optim::text_side(n))
            .map(|(n, p)| (n, p.to_host()))
            .collect()
    };
    assert_eq!(image_after(1.0, true), image_after(100.0, true));
    assert_ne!(image_after(1.0, false), image_after(100.0, false));
}

/// Caption–feature alignment: targets are the normalised means of the unit features of each
/// caption's person (its own image's alone without a person id), the loss is the mean of
/// 1 − cosine, and its gradient with respect to the captions matches finite differences.
///
/// Features (rows): a = (3, 0), b = (0, 2), c = (0, −1); persons 7, 7, none; captions of rows
/// 0, 2 and 1. Targets: person 7 → (1, 0) + (0, 1) normalised = (√½, √½) for rows 0 and 1;
/// row 2 → (0, −1). Captions t = (1, 0), (0, −2), (1, 1): cosines √½, 1, 1 → loss
/// = ((1 − √½) + 0 + 0) / 3 = 0.097631.
#[test]
fn feature_alignment_matches_hand_computation() {
    let features = [3.0, 0.0, 0.0, 2.0, 0.0, -1.0];
    let persons = [Some(7), Some(7), None];
    let targets = loss::person_means(&features, 2, &persons, &[0, 2, 1]);
    let h = std::f64::consts::FRAC_1_SQRT_2;
    let want = [h, h, 0.0, -1.0, h, h];
    for (g, w) in targets.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{targets:?}");
    }
    let dev: Cpu = Default::default();
    let text = vec![1.0f64, 0.0, 0.0, -2.0, 1.0, 1.0];
    let value = |t: &[f64]| {
        loss::feature_alignment(dev.tensor_from_vec(t.to_vec(), (3, 2)), &targets).as_vec()[0]
    };
    let l = value(&text);
    assert!((l - (1.0 - h) / 3.0).abs() < 1e-12, "loss {l}");
    // Gradient against central differences.
    let leaf = dev.tensor_from_vec(text.clone(), (3, 2));
    let g = loss::feature_alignment(leaf.leaky_trace(), &targets).backward();
    let analytic = g.get(&leaf).as_vec();
    for i in 0..text.len() {
        let (mut up, mut down) = (text.clone(), text.clone());
        up[i] += 1e-6;
        down[i] -= 1e-6;
        let numeric = (value(&up) - value(&down)) / 2e-6;
        assert!(
            (numeric - analytic[i]).abs() < 1e-7,
            "d/dt[{i}]: analytic {} numeric {numeric}",
            analytic[i]
        );
    }
}

/// With caption–feature alignment alone the image side is a constant target: a step moves the
/// text tower and no image parameter (no weight decay here, so a parameter without gradient
/// stays put), and on the toy problem the loss falls.
#[test]
fn feature_alignment_teaches_the_text_tower_only() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 3, 2, 4);
    let b = batch(&toys, &p, &tk, 0.5, 1);
    let weights = TaskWeights {
        text_align: 1.0,
        ..TaskWeights::none()
    };
    let mut cfg = quick_config(weights);
    cfg.optim.weight_decay = 0.0;
    let mut t = Trainer::new(Plip::<f32, Cpu>::new(&cpu(), &p, 3).unwrap(), cfg);
    let before = snapshot(&t.model);
    let report = t.step(&b).unwrap();
    assert!(report.losses.text_align.is_some());
    let after = snapshot(&t.model);
    let (text_moved, other_moved) = moved(&before, &after);
    assert!(text_moved, "no text parameter moved");
    assert!(other_moved.is_empty(), "moved: {other_moved:?}");
    let losses = train_task(weights, 60);
    assert_falls("text_align", &losses, 0.5);
}

/// `text_constant_lr`: the text tower's learning rate follows the warm-up and then stays at
/// `lr × text_lr_scale` while the rest decays. On a cosine schedule that reaches 0 at the
/// second step, that step has learning rate 0: without the switch nothing moves, with it the text tower
/// still does and nothing else.
#[test]
fn text_constant_learning_rate_outlasts_the_cosine() {
    let cosine = OptimConfig {
        lr: 1e-3,
        warmup_steps: 2,
        text_lr_scale: 0.5,
        text_constant_lr: true,
        schedule: Schedule::Cosine {
            total_steps: 6,
            floor: 0.0,
        },
        ..Default::default()
    };
    assert!((cosine.text_lr_at(0) - 0.25e-3).abs() < 1e-15);
    assert!((cosine.text_lr_at(6) - 0.5e-3).abs() < 1e-15);
    assert_eq!(cosine.lr_at(6), 0.0);
    let decayed = OptimConfig {
        text_constant_lr: false,
        ..cosine
    };
    assert!((decayed.text_lr_at(4) - 0.5 * decayed.lr_at(4)).abs() < 1e-15);
    assert_eq!(decayed.text_lr_at(6), 0.0);

    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 3, 2, 4);
    let b = batch(&toys, &p, &tk, 0.5, 1);
    let moved = |constant: bool| -> (bool, Vec<String>) {
        let mut cfg = quick_config(TaskWeights::default());
        cfg.optim.warmup_steps = 0;
        cfg.optim.text_constant_lr = constant;
        cfg.optim.schedule = Schedule::Cosine {
            total_steps: 1,
            floor: 0.0,
        };
        let mut t = Trainer::new(Plip::<f32, Cpu>::new(&cpu(), &p, 3).unwrap(), cfg);
        t.step(&b).unwrap();
        let before = snapshot(&t.model);
        assert_eq!(t.cfg.optim.lr_at(1), 0.0);
        t.step(&b).unwrap();
        let mut text = false;
        let mut other = Vec::new();
        for ((name, a), (_, p)) in before.iter().zip(t.model.params()) {
            if *a != p.to_host() {
                if name.starts_with("text.") {
                    text = true;
                } else {
                    other.push(name.clone());
                }
            }
        }
        (text, other)
    };
    assert_eq!(moved(false), (false, vec![]));
    assert_eq!(moved(true), (true, vec![]));
}

/// Text substeps: the first step has nothing remembered and equals a step without them; from
/// the second on, the text tower alone takes one more update per remembered batch (every other
/// parameter stays where the plain trainer puts it), the memory keeps the last N batches, and
/// the text tower's extra update count — its moments' bias correction — survives the
/// optimiser's save and load.
#[test]
fn text_substeps_train_the_text_tower_alone_against_remembered_batches() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 4, 2, 4);
    let batches: Vec<_> = (1..=3).map(|s| batch(&toys, &p, &tk, 0.5, s)).collect();
    let trainer = |substeps: u32| {
        let mut cfg = quick_config(TaskWeights::default());
        cfg.text_substeps = substeps;
        Trainer::new(Plip::<f32, Cpu>::new(&cpu(), &p, 3).unwrap(), cfg)
    };
    let (mut plain, mut sub) = (trainer(0), trainer(2));

    let r = sub.step(&batches[0]).unwrap();
    plain.step(&batches[0]).unwrap();
    assert_eq!(r.losses.text_substeps, None);
    assert_eq!(snapshot(&sub.model), snapshot(&plain.model));
    assert_eq!(sub.text_memory.len(), 1);
    assert_eq!(sub.opt.text_updates, 0);

    let r = sub.step(&batches[1]).unwrap();
    plain.step(&batches[1]).unwrap();
    let l = r.losses.text_substeps.expect("a substep ran");
    assert!(l.is_finite() && l > 0.0, "substep loss {l}");
    let (text_moved, other_moved) = moved(&snapshot(&plain.model), &snapshot(&sub.model));
    assert!(text_moved, "the substep moved no text parameter");
    assert!(other_moved.is_empty(), "moved: {other_moved:?}");
    assert_eq!(sub.opt.text_updates, 1);
    assert_eq!(sub.text_memory.len(), 2);

    sub.step(&batches[2]).unwrap();
    assert_eq!(
        sub.text_memory.len(),
        2,
        "the memory keeps the last 2 batches"
    );
    assert_eq!(sub.opt.text_updates, 3);
    assert_eq!(plain.opt.text_updates, 0);

    let bytes = plip_model::weights::save_optimizer(&sub.opt, &p, "tk").unwrap();
    let mut loaded = plip_model::optim::AdamW::new(&sub.model);
    plip_model::weights::load_optimizer(&mut loaded, &bytes, &p, "tk").unwrap();
    assert_eq!((loaded.step, loaded.text_updates), (3, 3));
}

/// Attribute prediction against a hand computation: 5 values in two fields (0..2 and 2..5);
/// row 0 knows both fields, row 1 only the second. Each (row, field) pair is a softmax over
/// its field alone, averaged over the 3 pairs.
#[test]
fn attribute_loss_values() {
    use plip_model::batch::AttributeLabel;
    let dev = cpu();
    let logits: Tensor<(usize, usize), f64, Cpu> = dev.tensor_from_vec(
        vec![
            0.5, -1.0, 2.0, 0.0, 1.0, /* row 1 */ 3.0, 3.0, -2.0, 0.5, 1.5,
        ],
        (2, 5),
    );
    let a = |value| AttributeLabel {
        start: 0,
        len: 2,
        value,
    };
    let b = |value| AttributeLabel {
        start: 2,
        len: 3,
        value,
    };
    let row0 = [a(1), b(0)];
    let row1 = [b(2)];
    let l = loss::attribute_loss(logits.clone(), &[&row0, &row1])
        .unwrap()
        .as_vec()[0];
    let lse = |xs: &[f64]| xs.iter().map(|x| x.exp()).sum::<f64>().ln();
    let want = ((lse(&[0.5, -1.0]) + 1.0)
        + (lse(&[2.0, 0.0, 1.0]) - 2.0)
        + (lse(&[-2.0, 0.5, 1.5]) - 1.5))
        / 3.0;
    assert!((l - want).abs() < 1e-9, "{l} vs {want}");
    // No known attribute anywhere: no loss.
    assert!(loss::attribute_loss(logits, &[&[], &[]]).is_none());
}

/// The attribute head is shared: from the captions alone (`text_attr`) a step moves the text
/// tower and the head but no image parameter; from the images alone (`attr`) the image tower
/// and the head but no text parameter; and on the toy problem (attributes that follow the
/// identity) each loss falls.
#[test]
fn attribute_prediction_trains_one_head_from_either_side() {
    use plip_model::batch::{AttributeLabel, Batch, Sample};
    use rand::SeedableRng;
    let p = Preset::test().with_attributes(&[3, 4]);
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 4, 2, 4);
    // Two fields: 0..3 and 3..7, values keyed by the identity.
    let labels: Vec<[AttributeLabel; 2]> = (0..4)
        .map(|i| {
            [
                AttributeLabel {
                    start: 0,
                    len: 3,
                    value: i % 3,
                },
                AttributeLabel {
                    start: 3,
                    len: 4,
                    value: (i + 1) % 4,
                },
            ]
        })
        .collect();
    let batch_of = |seed: u64| {
        let samples: Vec<Sample<'_>> = toys
            .iter()
            .map(|t| Sample {
                attributes: &labels[t.identity as usize % 4],
                ..t.sample()
            })
            .collect();
        Batch::build(
            &samples,
            &p,
            &tk,
            0.5,
            &mut rand::rngs::StdRng::seed_from_u64(seed),
        )
        .unwrap()
    };
    for (weights, text_side) in [
        (
            TaskWeights {
                text_attr: 1.0,
                ..TaskWeights::none()
            },
            true,
        ),
        (
            TaskWeights {
                attr: 1.0,
                ..TaskWeights::none()
            },
            false,
        ),
    ] {
        let mut cfg = quick_config(weights);
        cfg.optim.weight_decay = 0.0;
        cfg.optim.lr = 2e-3;
        let mut t = Trainer::new(Plip::<f32, Cpu>::new(&cpu(), &p, 3).unwrap(), cfg);
        let before = snapshot(&t.model);
        let first = t.step(&batch_of(0)).unwrap();
        let value = if text_side {
            first.losses.text_attr
        } else {
            first.losses.attr
        };
        assert!(value.is_some(), "{weights:?}: no attribute loss");
        let after = snapshot(&t.model);
        let (text_moved, other) = moved(&before, &after);
        assert_eq!(
            text_moved, text_side,
            "{weights:?}: text moved {text_moved}"
        );
        assert!(other.iter().any(|n| n.starts_with("attr.")), "{other:?}");
        assert_eq!(
            other.iter().any(|n| n.starts_with("image.")),
            !text_side,
            "{weights:?}: {other:?}"
        );
        let losses: Vec<f64> = std::iter::once(first.losses.total)
            .chain((1..60).map(|i| t.step(&batch_of(i)).unwrap().losses.total))
            .collect();
        assert_falls(if text_side { "text_attr" } else { "attr" }, &losses, 0.5);
    }
    // A label outside the preset's vocabulary is refused when the batch is built.
    let wide = [AttributeLabel {
        start: 5,
        len: 3,
        value: 0,
    }];
    let samples: Vec<Sample<'_>> = toys
        .iter()
        .map(|t| Sample {
            attributes: &wide,
            ..t.sample()
        })
        .collect();
    let err = Batch::build(
        &samples,
        &p,
        &tk,
        0.5,
        &mut rand::rngs::StdRng::seed_from_u64(0),
    )
    .unwrap_err();
    assert!(err.to_string().contains("attribute"), "{err}");
}
