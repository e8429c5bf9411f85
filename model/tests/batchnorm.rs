//! BatchNorm in a model that trains forever: running statistics as buffers (PyTorch's
//! conventions), explicit train and eval modes, and statistics that survive save and load.

mod common;

use common::*;
use plip_model::batch::{Augment, Batch, Sample};
use plip_model::dfdx::prelude::*;
use plip_model::norm::{apply_stats, BatchNorm, BnMode, BnStats};
use plip_model::params::Init;
use plip_model::weights::{load_weights, save_weights};
use plip_model::{Params, Plip, Preset, TaskWeights, Trainer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

fn buffers(m: &Plip<f32, Cpu>) -> Vec<(String, Vec<f32>)> {
    m.buffers()
        .into_iter()
        .map(|(n, p)| (n, p.to_host()))
        .collect()
}

fn trainer(tasks: TaskWeights) -> Trainer<f32, Cpu> {
    Trainer::new(
        Plip::new(&cpu(), &Preset::test(), 5).unwrap(),
        quick_config(tasks),
    )
}

/// Running statistics follow PyTorch: momentum 0.1 and the unbiased batch variance.
#[test]
fn running_statistics_follow_pytorch() {
    let dev = cpu();
    let mut rng = StdRng::seed_from_u64(1);
    let mut init = Init {
        dev: &dev,
        rng: &mut rng,
    };
    let mut bn: BatchNorm<f64, Cpu> = BatchNorm::new(&mut init, 3);
    let (n, c) = (10, 3);
    let mut r = StdRng::seed_from_u64(2);
    let x: Vec<f64> = (0..n * c).map(|_| r.gen_range(-2.0..3.0)).collect();
    let stats = BnStats::default();
    let y = bn.forward(
        dev.tensor_from_vec(x.clone(), (n, c)),
        BnMode::Train(Some(&stats)),
    );
    apply_stats(&mut bn, stats);
    let (rm, rv) = (bn.running_mean.as_vec(), bn.running_var.as_vec());
    let y = y.as_vec();
    for ch in 0..c {
        let col: Vec<f64> = (0..n).map(|i| x[i * c + ch]).collect();
        let mean = col.iter().sum::<f64>() / n as f64;
        let biased = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        let unbiased = biased * n as f64 / (n - 1) as f64;
        assert!((rm[ch] - 0.1 * mean).abs() < 1e-12, "running mean");
        assert!(
            (rv[ch] - (0.9 + 0.1 * unbiased)).abs() < 1e-12,
            "running var"
        );
        // The output uses the biased batch variance, as PyTorch's training mode does.
        let want = (col[0] - mean) / (biased + 1e-5).sqrt();
        assert!((y[ch] - want).abs() < 1e-9);
    }
}

/// A training step moves the running statistics; they are buffers, not parameters (the
/// optimiser never sees them); embedding in eval mode and the TIC grayscale pass leave them.
#[test]
fn statistics_move_with_training_only() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 4, 2, 3);
    let b = batch(&toys, &p, &tk, 0.5, 1);
    let mut t = trainer(TaskWeights::default());
    assert!(t
        .model
        .params()
        .iter()
        .all(|(n, _)| !n.contains("running_")));
    assert!(t.opt.names.iter().all(|n| !n.contains("running_")));
    let names: Vec<String> = buffers(&t.model).into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"image.bn1.running_mean".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"image.layer2.0.downsample.1.running_var".to_string()));

    let before = buffers(&t.model);
    t.model.embed_images(&b.images, 4);
    assert_eq!(
        before,
        buffers(&t.model),
        "eval mode changed the statistics"
    );
    assert!(!t.step(&b).unwrap().skipped);
    let after = buffers(&t.model);
    for (x, y) in before.iter().zip(&after) {
        if x.0.contains("running_") {
            assert_ne!(
                x.1, y.1,
                "every BatchNorm's statistics move with a step: {}",
                x.0
            );
        } else {
            // The identity prototypes fill only while their loss is on (off by default).
            assert_eq!(x.0, "id.prototypes");
            assert_eq!(x.1, y.1);
        }
    }

    // TIC alone runs only the grayscale pass: batch statistics, running ones untouched.
    let mut tic = trainer(TaskWeights {
        tic: 1.0,
        ..TaskWeights::none()
    });
    let before = buffers(&tic.model);
    assert!(!tic.step(&b).unwrap().skipped);
    assert_eq!(before, buffers(&tic.model));

    // A skipped step leaves them too.
    let mut bad = b.clone();
    bad.images[3] = f32::NAN;
    let before = buffers(&t.model);
    assert!(t.step(&bad).unwrap().skipped);
    assert_eq!(before, buffers(&t.model));
}

/// The `test` preset's model after three default steps on a toy batch of six images.
fn three_steps() -> (
    Preset,
    plip_model::Tokenizer,
    plip_model::batch::Batch,
    Trainer<f32, Cpu>,
) {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 3, 2, 4);
    let b = batch(&toys, &p, &tk, 0.5, 1);
    let mut t = trainer(TaskWeights::default());
    for _ in 0..3 {
        t.step(&b).unwrap();
    }
    (p, tk, b, t)
}

/// In eval mode an image embedded alone equals the same image embedded inside a batch.
#[test]
fn alone_equals_in_batch() {
    let (p, _, b, t) = three_steps();
    let all = t.model.embed_images(&b.images, 6);
    let len = p.image_len();
    for i in 0..6 {
        let one = t.model.embed_images(&b.images[i * len..(i + 1) * len], 1);
        for (a, e) in one.row(0).iter().zip(all.row(i)) {
            assert!((a - e).abs() < 1e-5, "image {i}: {a} vs {e}");
        }
    }
}

/// Running statistics go through save and load with the weights, and give the same
/// embeddings.
#[test]
fn statistics_round_trip_through_weights() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 4, 2, 3);
    let b = batch(&toys, &p, &tk, 0.5, 1);
    let mut t = trainer(TaskWeights::default());
    for _ in 0..2 {
        t.step(&b).unwrap();
    }
    let bytes = save_weights(&t.model, tk.fingerprint(), 2, &BTreeMap::new()).unwrap();
    let mut fresh = Plip::<f32, Cpu>::new(&cpu(), &p, 99).unwrap();
    assert_ne!(buffers(&fresh), buffers(&t.model));
    load_weights(&mut fresh, &bytes, tk.fingerprint()).unwrap();
    assert_eq!(buffers(&fresh), buffers(&t.model));
    assert_eq!(
        fresh.embed_images(&b.images, 4),
        t.model.embed_images(&b.images, 4)
    );
}

/// Augmentation is a function of (seed, step, slot): the same key gives the same batch, another
/// step another one; flip, pad-crop and erasing each change the pixels.
#[test]
fn augmentation_is_keyed_and_changes_pixels() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 3, 2, 4);
    let samples: Vec<Sample<'_>> = toys.iter().map(Toy::sample).collect();
    let build = |aug: &Augment, step: u64| {
        Batch::build_augmented(
            &samples,
            &p,
            &tk,
            0.5,
            &mut StdRng::seed_from_u64(0),
            aug,
            (7, step),
        )
        .unwrap()
    };
    let plain = build(&Augment::none(), 3);
    let a = build(&Augment::default(), 3);
    assert_eq!(a.images, build(&Augment::default(), 3).images);
    assert_ne!(a.images, build(&Augment::default(), 4).images);
    assert_ne!(a.images, plain.images);
    for aug in [
        Augment {
            flip: 1.0,
            ..Augment::none()
        },
        Augment {
            pad_crop: 0.25,
            ..Augment::none()
        },
        Augment {
            erase: 1.0,
            ..Augment::none()
        },
    ] {
        assert_ne!(build(&aug, 3).images, plain.images, "{aug:?}");
    }
    // Erasing touches the colour input only: TIC's grayscale input and target stay whole.
    let erased = build(
        &Augment {
            erase: 1.0,
            ..Augment::none()
        },
        3,
    );
    assert_eq!(erased.gray, plain.gray);
    assert_eq!(erased.tic_target, plain.tic_target);
}

/// Forgetting a person zeroes their identity-classifier row and its optimiser moments, and
/// leaves every other row as it was.
#[test]
fn forget_zeroes_the_person_row() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 4, 2, 3);
    let b = batch(&toys, &p, &tk, 0.5, 1);
    let mut t = trainer(TaskWeights::default());
    t.step(&b).unwrap();
    let before = t.model.id.as_ref().unwrap().classifier.as_vec();
    let key = plip_model::batch::person_key("0042");
    let row = t.forget_person(key).unwrap();
    assert_eq!(row, (key % 64) as usize);
    let after = t.model.id.as_ref().unwrap().classifier.as_vec();
    let c = p.embed;
    for r in 0..64 {
        let (a, b) = (&after[r * c..(r + 1) * c], &before[r * c..(r + 1) * c]);
        if r == row {
            assert!(a.iter().all(|&x| x == 0.0));
        } else {
            assert_eq!(a, b);
        }
    }
    let i = t
        .opt
        .names
        .iter()
        .position(|n| n == "id.classifier")
        .unwrap();
    match &t.opt.moments[i] {
        plip_model::optim::Moments::Matrix(m, v) => {
            let (m, v) = (m.as_vec(), v.as_vec());
            assert!(m[row * c..(row + 1) * c].iter().all(|&x| x == 0.0));
            assert!(v[row * c..(row + 1) * c].iter().all(|&x| x == 0.0));
            assert!(m.iter().any(|&x| x != 0.0));
        }
        _ => panic!("the classifier is a matrix"),
    }
}

/// With `joint = neck` the joint embedding is the identity classifier's BNNeck of the pooled
/// feature on the running statistics: centred, the same alone as inside a batch, and not the
/// pooled feature; a preset written before the field reads as `pooled`.
#[test]
fn neck_joint_feature_uses_running_statistics() {
    use plip_model::JointFeature;
    let mut p = Preset::test();
    p.joint = JointFeature::Neck;
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 3, 2, 4);
    let b = batch(&toys, &p, &tk, 0.5, 1);
    let mut t = Trainer::new(
        Plip::new(&cpu(), &p, 5).unwrap(),
        quick_config(TaskWeights::default()),
    );
    for _ in 0..3 {
        t.step(&b).unwrap();
    }
    let m = &t.model;
    let all = m.embed_images(&b.images, 6);
    // By hand: pooled → neck on the running statistics → unit length.
    let dev = cpu();
    let imgs = dev.tensor_from_vec(b.images.clone(), (6, 3, p.image_height, p.image_width));
    let pooled = m.image.embed(imgs, BnMode::Eval);
    let neck =
        m.id.as_ref()
            .unwrap()
            .neck
            .forward(pooled.clone(), BnMode::Eval);
    let neck = neck.as_vec();
    let raw = pooled.as_vec();
    let d = p.embed;
    let mut differs = false;
    for i in 0..6 {
        let row = &neck[i * d..(i + 1) * d];
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        for (j, e) in all.row(i).iter().enumerate() {
            assert!((row[j] / norm - e).abs() < 1e-5, "image {i} dim {j}");
        }
        let rn = raw[i * d..(i + 1) * d]
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt();
        differs |= all
            .row(i)
            .iter()
            .zip(&raw[i * d..(i + 1) * d])
            .any(|(e, r)| (e - r / rn).abs() > 1e-3);
        let len = p.image_len();
        let one = m.embed_images(&b.images[i * len..(i + 1) * len], 1);
        for (a, e) in one.row(0).iter().zip(all.row(i)) {
            assert!((a - e).abs() < 1e-5, "image {i} alone: {a} vs {e}");
        }
    }
    assert!(differs, "the neck feature equals the pooled one");
    // The field picks no weights: a `neck` file loads into a `pooled` model, and a state
    // folder's checkpoints train on under the other.
    let bytes = save_weights(m, tk.fingerprint(), 3, &BTreeMap::new()).unwrap();
    let mut q = p.clone();
    q.joint = JointFeature::Pooled;
    let mut pooled = Plip::<f32, Cpu>::new(&cpu(), &q, 1).unwrap();
    load_weights(&mut pooled, &bytes, tk.fingerprint()).unwrap();
    assert_eq!(buffers(&pooled), buffers(m));
    assert!(q.mismatch(&p).is_none());
    // Files written before the field existed read as `pooled`.
    let mut json: serde_json::Value = serde_json::to_value(Preset::tiny()).unwrap();
    json.as_object_mut().unwrap().remove("joint");
    let old: Preset = serde_json::from_value(json).unwrap();
    assert_eq!(old.joint, JointFeature::Pooled);
    // The neck needs the classifier.
    let mut bad = Preset::test_vit();
    bad.joint = JointFeature::Neck;
    assert!(bad.validate().is_err());
}

/// Flip averaging: an image's embedding is the normalised sum of its own and its mirror
/// image's, so the image and its mirror embed identically; a mirror twice is the image; the
/// setting changes no weight (a checkpoint loads either way).
#[test]
fn flip_average_is_the_mean_of_an_image_and_its_mirror() {
    let (p, tk, b, t) = three_steps();
    let w = p.image_width;
    let mirrored = plip_model::batch::mirror(&b.images, w);
    assert_ne!(mirrored, b.images);
    assert_eq!(plip_model::batch::mirror(&mirrored, w), b.images);
    // Row 0 of image 0's first channel, reversed.
    assert_eq!(mirrored[0], b.images[w - 1]);

    let plain = t.model.embed_images(&b.images, 6);
    let of_mirror = t.model.embed_images(&mirrored, 6);
    let mut flipping = t.model.clone();
    flipping.preset.flip_average = true;
    let averaged = flipping.embed_images(&b.images, 4);
    let averaged_mirror = flipping.embed_images(&mirrored, 4);
    for i in 0..6 {
        let sum: Vec<f32> = plain
            .row(i)
            .iter()
            .zip(of_mirror.row(i))
            .map(|(a, b)| a + b)
            .collect();
        let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
        for ((a, s), m) in averaged.row(i).iter().zip(&sum).zip(averaged_mirror.row(i)) {
            assert!(
                (a - s / norm).abs() < 1e-5,
                "image {i}: {a} vs {}",
                s / norm
            );
            assert!((a - m).abs() < 1e-5, "image {i}: {a} vs its mirror's {m}");
        }
        assert_ne!(averaged.row(i), plain.row(i));
    }
    let bytes = save_weights(&t.model, tk.fingerprint(), 3, &BTreeMap::new()).unwrap();
    load_weights(&mut flipping, &bytes, tk.fingerprint()).unwrap();
    assert!(flipping.preset.flip_average);
}

/// The `both` joint feature: a gallery row is `[pooled ; neck] / sqrt 2` of the two unit
/// features, so an image row's dot product with another is the mean of the pooled and the neck
/// cosine similarities, and a caption row's is exactly the caption's cosine with the neck;
/// training aligns captions to the neck as `neck` does (the same losses), flip averaging
/// averages each feature on its own, and the field picks no weights.
#[test]
fn both_joint_feature_ranks_images_by_both_and_captions_by_the_neck() {
    use plip_model::JointFeature;
    let (p, tk, b, t) = three_steps();
    let with = |j: JointFeature, flip: bool| {
        let mut m = t.model.clone();
        m.preset.joint = j;
        m.preset.flip_average = flip;
        m
    };
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let tokens = &b.tokens;
    for flip in [false, true] {
        let (both, pooled, neck) = (
            with(JointFeature::Both, flip),
            with(JointFeature::Pooled, flip),
            with(JointFeature::Neck, flip),
        );
        assert_eq!(both.preset.index_dim(), 2 * p.embed);
        let g = both.embed_images(&b.images, 4);
        let (gp, gn) = (
            pooled.embed_images(&b.images, 4),
            neck.embed_images(&b.images, 4),
        );
        assert_eq!(g.dim, 2 * p.embed);
        let te = both.embed_texts(tokens, 4);
        let tn = neck.embed_texts(tokens, 4);
        assert_eq!(te.dim, 2 * p.embed);
        for i in 0..6 {
            assert!(
                (dot(g.row(i), g.row(i)) - 1.0).abs() < 1e-5,
                "row {i} is not unit"
            );
            for j in 0..6 {
                let mean = 0.5 * (dot(gp.row(i), gp.row(j)) + dot(gn.row(i), gn.row(j)));
                let got = dot(g.row(i), g.row(j));
                assert!((got - mean).abs() < 1e-5, "images {i},{j}: {got} vs {mean}");
                let text = dot(tn.row(i), gn.row(j));
                let got = dot(te.row(i), g.row(j));
                assert!(
                    (got - text).abs() < 1e-5,
                    "caption {i}, image {j}: {got} vs {text}"
                );
            }
        }
    }
    // Training sees the neck either way: the same losses as `neck`.
    let both = with(JointFeature::Both, false);
    let neck = with(JointFeature::Neck, false);
    let w = TaskWeights::default();
    let (_, lb) = both.losses(&b, &w, NoneTape).unwrap();
    let (_, ln) = neck.losses(&b, &w, NoneTape).unwrap();
    assert!(lb.ivlc.is_some());
    assert_eq!(lb.ivlc, ln.ivlc);
    assert_eq!(lb.total, ln.total);
    // The field picks no weights, and the classifier is needed.
    let bytes = save_weights(&both, tk.fingerprint(), 3, &BTreeMap::new()).unwrap();
    let mut pooled = with(JointFeature::Pooled, false);
    load_weights(&mut pooled, &bytes, tk.fingerprint()).unwrap();
    assert_eq!(p.with_joint("both").unwrap().joint, JointFeature::Both);
    let mut bad = Preset::test_vit();
    bad.joint = JointFeature::Both;
    assert!(bad.validate().is_err());
}

/// Neck calibration: the running statistics become the mean and unbiased variance of the clean
/// images' eval-mode pooled features, so their neck features come out with mean β and variance
/// γ² per channel; the other buffers and every parameter stay as they were.
#[test]
fn calibrate_neck_normalises_clean_images_as_a_batch() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 4, 3, 4);
    let b = batch(&toys, &p, &tk, 0.5, 1);
    let mut t = trainer(TaskWeights::default());
    for _ in 0..3 {
        t.step(&b).unwrap();
    }
    let mut m = t.model;
    let params_before: Vec<Vec<f32>> = m.params().iter().map(|(_, p)| p.to_host()).collect();
    let buffers_before = buffers(&m);
    let n = b.images.len() / p.image_len();
    assert_eq!(
        m.calibrate_neck(&b.images, 5),
        n,
        "every image used, 5 at a time"
    );
    assert_eq!(
        m.calibrate_neck(&b.images[..p.image_len()], 5),
        0,
        "one image is refused"
    );

    let params_after: Vec<Vec<f32>> = m.params().iter().map(|(_, p)| p.to_host()).collect();
    assert_eq!(
        params_before, params_after,
        "calibration changes no parameter"
    );
    let mut changed = Vec::new();
    for ((name, before), (_, after)) in buffers_before.iter().zip(buffers(&m)) {
        if *before != after {
            changed.push(name.clone());
        }
    }
    assert_eq!(changed, ["id.neck.running_mean", "id.neck.running_var"]);

    let dev = cpu();
    let imgs = dev.tensor_from_vec(b.images.clone(), (n, 3, p.image_height, p.image_width));
    let head = m.id.as_ref().unwrap();
    let neck = head
        .neck
        .forward(m.image.embed(imgs, BnMode::Eval), BnMode::Eval)
        .as_vec();
    let (gamma, beta) = (head.neck.weight.as_vec(), head.neck.bias.as_vec());
    let d = p.embed;
    for j in 0..d {
        let col: Vec<f64> = (0..n).map(|i| neck[i * d + j] as f64).collect();
        let mean = col.iter().sum::<f64>() / n as f64;
        let var = col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        assert!(
            (mean - beta[j] as f64).abs() < 1e-3,
            "channel {j}: mean {mean}"
        );
        let want = (gamma[j] as f64).powi(2);
        // ε = 1e-5 in the denominator: the variance lands just under γ².
        assert!(
            (var - want).abs() < 1e-2 * want.max(1e-3),
            "channel {j}: var {var} vs {want}"
        );
    }
}

/// The fused CPU BatchNorm + ReLU of training (with a residual summed before the ReLU, and
/// without the ReLU as the shortcuts use it) equals dfdx's composed form: outputs, the batch statistics it reports, and the gradients of
/// a loss through it for the input, γ and β.
#[test]
fn fused_batchnorm_relu_equals_the_composed_form() {
    let dev = cpu();
    let mut rng = StdRng::seed_from_u64(3);
    let mut init = Init {
        dev: &dev,
        rng: &mut rng,
    };
    let mut bn: BatchNorm<f64, Cpu> = BatchNorm::new(&mut init, 5);
    bn.weight.copy_from(&[0.5, 1.5, -0.7, 1.0, 2.0]);
    bn.bias.copy_from(&[0.1, -0.2, 0.3, 0.0, -1.0]);
    let n = 3000; // more rows than one task's chunk, so the per-chunk sums are reduced
    let xs: Vec<f64> = (0..n * 5)
        .map(|i| ((i * 37 % 101) as f64 / 17.0).sin() * (1.0 + (i % 5) as f64))
        .collect();
    let weights: Vec<f64> = (0..n * 5).map(|i| ((i % 13) as f64 - 6.0) / 7.0).collect();
    let residual: Vec<f64> = (0..n * 5)
        .map(|i| ((i * 11 % 23) as f64 - 11.0) / 9.0)
        .collect();
    // with_residual: relu(bn(x) + r), the block's last norm, where r is a function of x too (as
    // an identity shortcut is), so both paths of x's gradient meet.
    // variant 0: relu(bn(x)); 1: relu(bn(x) + r); 2: bn(x) alone (the shortcuts').
    let run = |fused: bool, variant: u8| {
        let x: Tensor<(usize, usize), f64, Cpu> = dev.tensor_from_vec(xs.clone(), (n, 5));
        let r0: Tensor<(usize, usize), f64, Cpu> = dev.tensor_from_vec(residual.clone(), (n, 5));
        let w = dev.tensor_from_vec(weights.clone(), (n, 5));
        let stats = BnStats::default();
        let mode = BnMode::Train(Some(&stats));
        let xt = x.clone().leaky_traced();
        let y = match (fused, variant) {
            (true, 0) => bn.forward_relu(xt, mode),
            (false, 0) => bn.forward(xt, mode).relu(),
            (true, 2) => bn.forward_train_fused(xt, mode),
            (false, 2) => bn.forward(xt, mode),
            (fused, _) => {
                let r = xt.retaped::<OwnedTape<f64, Cpu>>() * 0.5 + r0;
                if fused {
                    bn.forward_add_relu(xt, r, mode)
                } else {
                    (bn.forward(xt, mode) + r).relu()
                }
            }
        };
        let values = y.as_vec();
        let loss = (y * w).sum::<(), _>();
        let g = loss.backward();
        let grads = (
            g.get(&x).as_vec(),
            g.get(&bn.weight).as_vec(),
            g.get(&bn.bias).as_vec(),
        );
        let layers = stats.layers.borrow().clone();
        (values, grads, layers)
    };
    for variant in [0, 1, 2] {
        let (v1, (gx1, gw1, gb1), s1) = run(true, variant);
        let (v2, (gx2, gw2, gb2), s2) = run(false, variant);
        let close = |a: &[f64], b: &[f64], what: &str| {
            assert_eq!(a.len(), b.len(), "{what}");
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-9, "{what}: differs by {worst}");
        };
        close(&v1, &v2, "outputs");
        if variant == 2 {
            assert!(v1.iter().any(|&v| v < 0.0), "no ReLU on the plain form");
        } else {
            assert!(v1.contains(&0.0) && v1.iter().any(|&v| v > 0.0));
        }
        close(&gx1, &gx2, "input gradient");
        close(&gw1, &gw2, "γ gradient");
        close(&gb1, &gb2, "β gradient");
        assert_eq!(s1.len(), 1);
        close(&s1[0].1, &s2[0].1, "batch mean");
        close(&s1[0].2, &s2[0].2, "batch variance");
    }
}
