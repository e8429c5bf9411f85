//! Finite-difference gradient check of the whole model in f64.

mod common;

use common::*;
use plip_model::dfdx::prelude::*;
use plip_model::optim::{AdamW, Grad};
use plip_model::params::{ParamMut, Params};
use plip_model::{
    ConvBlock, ImageArch, JointFeature, Plip, Preset, Stem, TaskWeights, TrainConfig, Trainer,
};

// Before this check existed, two dfdx 0.13 backward bugs went unnoticed: `accurate_gelu`'s
// derivative (off by √2 in one term) and `log_softmax` on a permuted input. Both produced
// errors thousands of times the tolerance here. A third, `slice`'s backward assigning the
// gradient instead of adding it (wrong whenever the sliced tensor has another use), was caught
// by captions.rs and is avoided with `gather` — and was still in the text tower's positions
// (used by every text pass of a step) until a CPU-vs-CUDA comparison found it (CUDA's slice
// backward adds): `text.pos` is checked here since.

/// Backpropagated gradients of the total loss (all three tasks, weights 1) agree with central
/// finite differences (h = 1e-6, f64) for parameters of both towers, both heads and the logit
/// scale: |analytic − numeric| ≤ 1e-7 + 1e-4·max(|analytic|, |numeric|).
#[test]
fn gradients_match_finite_differences_in_f64() {
    check(TaskWeights {
        ivlc: 1.0,
        iap: 1.0,
        tic: 1.0,
        triplet: 1.0,
        supcon: 1.0,
        id: 1.0,
        text_id: 1.0,
        ..TaskWeights::none()
    });
}

fn check(tasks: TaskWeights) {
    // The ViT presets have no identity classifier.
    let vit = TaskWeights { id: 0.0, ..tasks };
    if vit.ivlc + vit.iap + vit.tic + vit.triplet + vit.supcon > 0.0 {
        check_preset(vit, Preset::test_vit());
    }
    check_preset(tasks, Preset::test());
}

/// The hierarchical-MLP stem (`tiny-vit` and `small` use it) on `test-vit` dimensions with
/// 16-pixel patches: its reshapes and merges must carry gradients to every stage.
#[test]
fn hmlp_stem_gradients_match_finite_differences() {
    let p = Preset {
        patch: 16,
        stem: Stem::Hmlp,
        ..Preset::test_vit()
    };
    p.validate().unwrap();
    check_preset(
        TaskWeights {
            ivlc: 1.0,
            iap: 1.0,
            tic: 1.0,
            triplet: 1.0,
            supcon: 1.0,
            ..TaskWeights::none()
        },
        p,
    );
}

/// Bottleneck blocks (`rn50`'s) on `test` dimensions: three convolutions per block and the
/// 4× expansion, every task on.
#[test]
fn bottleneck_gradients_match_finite_differences() {
    let p = Preset {
        conv_block: ConvBlock::Bottleneck,
        ..Preset::test()
    }
    .with_conv_widths(&[8, 8, 8, 8])
    .unwrap();
    assert_eq!(p.embed, 32);
    check_preset(
        TaskWeights {
            ivlc: 1.0,
            iap: 1.0,
            tic: 1.0,
            // The finite difference sees IVLC's path into the image tower, so the gradient
            // must take it too (the default stops it there).
            ivlc_image_grad: true,
            ..TaskWeights::default()
        },
        p,
    );
}

fn check_preset(tasks: TaskWeights, p: Preset) {
    check_preset_with(tasks, p, false);
}

/// `extra_captions`: every sample also brings a second, differently worded caption (the
/// caption-side losses then run over both).
fn check_preset_with(tasks: TaskWeights, p: Preset, extra_captions: bool) {
    let all_on = tasks.ivlc > 0.0 && tasks.iap > 0.0 && tasks.tic > 0.0;
    let resnet = p.image_arch == ImageArch::Resnet;
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 3, 2, 5);
    let mut b = batch(&toys, &p, &tk, 0.5, 9);
    if extra_captions {
        let reworded: Vec<String> = toys
            .iter()
            .map(|t| t.caption.replace("a person wearing", "someone in"))
            .collect();
        let extra: Vec<(usize, &str)> = reworded.iter().map(String::as_str).enumerate().collect();
        b.add_captions(&extra, &p, &tk).unwrap();
    }
    assert!(!b.iap_positions.is_empty());
    let mut model = Plip::<f64, Cpu>::new(&cpu(), &p, 11).unwrap();
    if resnet {
        // Distinct γ per channel, so a scale error in any channel's path would show.
        for (name, mut t) in model.params_mut() {
            if name.contains("bn") && name.ends_with("weight") {
                let n = t.to_host().len();
                let v: Vec<f64> = (0..n).map(|i| 0.5 + 0.1 * (i % 7) as f64).collect();
                t.copy_from_host(&v);
            }
        }
    }
    let cfg = TrainConfig {
        tasks,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, cfg);
    let (grads, _) = trainer.gradients(&b).unwrap();
    let grads = AdamW::gradients(&trainer.model, &grads.unwrap());
    let names: Vec<String> = trainer.model.params().into_iter().map(|(n, _)| n).collect();

    let tower: &[&str] = match (p.image_arch, p.stem) {
        (ImageArch::Resnet, _) => &[
            "image.conv1.weight",
            "image.bn1.weight",
            "image.bn1.bias",
            "image.layer1.0.conv1.weight",
            "image.layer1.0.bn2.weight",
            "image.layer2.0.conv2.weight",
            "image.layer2.0.downsample.0.weight",
            "image.layer2.0.downsample.1.bias",
            "image.layer4.0.conv1.weight",
            "image.to_text.weight",
            "id.neck.weight",
            "id.classifier",
        ],
        (ImageArch::Vit, Stem::Linear) => &[
            "image.patch_embed.weight",
            "image.pos",
            "image.blocks.0.attn.q.weight",
            "image.blocks.1.mlp.fc1.weight",
            "image.proj.weight",
        ],
        (ImageArch::Vit, Stem::Hmlp) => &[
            "image.hmlp.embed.weight",
            "image.hmlp.norm1.weight",
            "image.hmlp.merge1.weight",
            "image.hmlp.merge2.bias",
            "image.pos",
            "image.proj.weight",
        ],
    };
    let checked = [
        "text.token_embed",
        // Used by every text pass of a step (the captions, and IAP's masked captions).
        "text.pos",
        "text.blocks.0.attn.k.weight",
        "text.blocks.1.ln2.weight",
        "text.proj.bias",
        "iap.blocks.0.attn.v.weight",
        "iap.classifier.weight",
        "tic.se1.weight",
        "tic.fc2.weight",
        "logit_scale",
    ];
    let bottleneck: &[&str] = if p.conv_block == ConvBlock::Bottleneck {
        &[
            "image.layer1.0.conv3.weight",
            "image.layer1.0.bn3.bias",
            "image.layer3.0.conv2.weight",
            "image.layer4.0.conv3.weight",
        ]
    } else {
        &[]
    };
    let checked = tower.iter().chain(bottleneck).copied().chain(checked);
    let loss_of =
        |t: &Trainer<f64, Cpu>| t.model.losses(&b, &t.cfg.tasks, NoneTape).unwrap().1.total;
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for name in checked {
        let idx = names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no parameter {name}"));
        let analytic = match &grads[idx] {
            Grad::Vector(g) => g.as_vec(),
            Grad::Matrix(g) => g.as_vec(),
        };
        // The three elements with the largest gradient, so the check is not dominated by zeros.
        let mut order: Vec<usize> = (0..analytic.len()).collect();
        order.sort_by(|&a, &b| analytic[b].abs().total_cmp(&analytic[a].abs()));
        if analytic[order[0]].abs() <= 1e-12 {
            // A parameter the enabled tasks do not reach: its gradient must be exactly zero.
            assert!(!all_on, "{name}: zero gradient with every task on");
            continue;
        }
        for &e in order.iter().take(3) {
            let base = {
                let ps = trainer.model.params_mut();
                ps[idx].1.to_host()
            };
            let eval = |delta: f64, t: &mut Trainer<f64, Cpu>| {
                let mut v = base.clone();
                v[e] += delta;
                let mut ps = t.model.params_mut();
                let p: &mut ParamMut<'_, f64, Cpu> = &mut ps[idx].1;
                p.copy_from_host(&v);
                drop(ps);
                loss_of(t)
            };
            let up = eval(h, &mut trainer);
            let down = eval(-h, &mut trainer);
            eval(0.0, &mut trainer);
            let numeric = (up - down) / (2.0 * h);
            let a = analytic[e];
            let err = (a - numeric).abs();
            let tol = 1e-7 + 1e-4 * a.abs().max(numeric.abs());
            worst = worst.max(err / tol);
            assert!(
                err <= tol,
                "{name}[{e}]: analytic {a:e}, numeric {numeric:e}"
            );
        }
    }
    eprintln!("worst error / tolerance = {worst:.3}");
}

/// The same check with one task at a time, so an error in one loss cannot hide behind the
/// others' larger gradients.
#[test]
fn each_task_alone_matches_finite_differences() {
    check(TaskWeights {
        ivlc: 1.0,
        ..TaskWeights::none()
    });
    check(TaskWeights {
        iap: 1.0,
        ..TaskWeights::none()
    });
    check(TaskWeights {
        tic: 1.0,
        ..TaskWeights::none()
    });
    check(TaskWeights {
        triplet: 1.0,
        ..TaskWeights::none()
    });
    check(TaskWeights {
        supcon: 1.0,
        ..TaskWeights::none()
    });
    check(TaskWeights {
        id: 1.0,
        ..TaskWeights::none()
    });
    check(TaskWeights {
        text_id: 1.0,
        ..TaskWeights::none()
    });
}

/// With identity losses on, IVLC's gradient stops at the image embedding: the image tower's
/// gradients are exactly the identity losses' alone, and the text tower's are those of the
/// undetached loss.
#[test]
fn ivlc_stops_at_the_image_embedding() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 3, 2, 5);
    let b = batch(&toys, &p, &tk, 0.5, 9);
    let grads = |tasks: TaskWeights| named_gradients(&p, &b, tasks);
    let base = TaskWeights {
        ivlc: 1.0,
        triplet: 1.0,
        ivlc_image_grad: false,
        ..TaskWeights::none()
    };
    let detached = grads(base);
    let triplet_only = grads(TaskWeights { ivlc: 0.0, ..base });
    let joined = grads(TaskWeights {
        ivlc_image_grad: true,
        ..base
    });
    let close = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-12 + 1e-9 * y.abs())
    };
    let mut image_differs_when_joined = false;
    for (((name, d), (_, t)), (_, j)) in detached.iter().zip(&triplet_only).zip(&joined) {
        if name.starts_with("image.") {
            assert!(close(d, t), "{name}: IVLC reached the image tower");
            image_differs_when_joined |= !close(d, j);
        } else if name.starts_with("text.") {
            assert!(close(d, j), "{name}: the text tower's gradient changed");
        }
    }
    assert!(
        image_differs_when_joined,
        "ivlc_image_grad = true must reach the image tower"
    );
}

/// `text_id_detached`: the captions' identity loss leaves the identity head (neck γ/β and
/// classifier) and the image tower exactly as the image losses alone move them, and still
/// trains the text tower; attached, it reaches the head. With `joint = neck`, IVLC's stopped
/// gradient does not reach the neck either.
#[test]
fn caption_identity_loss_can_leave_the_head_alone() {
    for joint in [JointFeature::Pooled, JointFeature::Neck] {
        let mut p = Preset::test();
        p.joint = joint;
        let tk = tokenizer(&p);
        let toys = toy_samples(&p, 3, 2, 5);
        let b = batch(&toys, &p, &tk, 0.5, 9);
        let grads = |tasks: TaskWeights| named_gradients(&p, &b, tasks);
        let base = TaskWeights {
            ivlc: 1.0,
            id: 1.0,
            text_id: 1.0,
            text_id_detached: true,
            ivlc_image_grad: false,
            ..TaskWeights::none()
        };
        let detached = grads(base);
        let images_only = grads(TaskWeights {
            text_id: 0.0,
            ivlc: 0.0,
            ..base
        });
        let attached = grads(TaskWeights {
            text_id_detached: false,
            ..base
        });
        let close = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-12 + 1e-9 * y.abs())
        };
        let (mut head_moved_attached, mut text_trained) = (false, false);
        for (((name, d), (_, i)), (_, a)) in detached.iter().zip(&images_only).zip(&attached) {
            if name.starts_with("image.") || name.starts_with("id.") {
                assert!(close(d, i), "{joint:?} {name}: the caption loss reached it");
            }
            if name.starts_with("id.") {
                head_moved_attached |= !close(d, a);
            }
            if name.starts_with("text.") {
                text_trained |= d.iter().any(|x| x.abs() > 0.0);
            }
        }
        assert!(
            head_moved_attached,
            "{joint:?}: attached, the caption loss must reach the head"
        );
        assert!(text_trained, "{joint:?}: the text tower got no gradient");
    }
}

/// The gradient check with a second caption per sample: the rows gathered for IVLC and the
/// slice of each sample's own caption backpropagate correctly.
#[test]
fn extra_captions_match_finite_differences() {
    check_preset_with(
        TaskWeights {
            ivlc: 1.0,
            iap: 1.0,
            tic: 1.0,
            triplet: 1.0,
            id: 1.0,
            text_id: 1.0,
            ivlc_image_grad: true,
            ..TaskWeights::none()
        },
        Preset::test(),
        true,
    );
}
