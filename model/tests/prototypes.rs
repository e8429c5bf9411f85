//! Identity prototypes (running means of each person's joint image feature, a buffer) and the
//! caption–prototype contrast that trains the text tower against them.

mod common;

use common::*;
use plip_model::dfdx::prelude::*;
use plip_model::heads::{Prototypes, PROTOTYPE_MOMENTUM};
use plip_model::loss::prototype_contrast;
use plip_model::params::Init;
use plip_model::weights::{load_weights, save_weights, OPTIONAL_BUFFER};
use plip_model::{Plip, Preset, TaskWeights, Trainer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::BTreeMap;

fn prototypes(rows: usize, dim: usize) -> Prototypes<f64, Cpu> {
    let dev = cpu();
    let mut rng = StdRng::seed_from_u64(0);
    let mut init = Init {
        dev: &dev,
        rng: &mut rng,
    };
    Prototypes(init.zeros(rows, dim))
}

/// A first sighting sets a row to the batch's mean feature; later batches mix in with the
/// momentum; `seen_with` shows the result without writing it; rows out of range and features
/// of the wrong width are ignored; a cleared row is unseen again.
#[test]
fn prototypes_fold_in_each_batch_mean() {
    let mut p = prototypes(4, 2);
    p.update(&[
        (1, vec![1.0, 0.0]),
        (1, vec![0.0, 1.0]),
        (3, vec![0.0, 2.0]),
        (9, vec![1.0, 1.0]),
        (2, vec![1.0]),
    ]);
    assert_eq!(p.0.as_vec(), vec![0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 2.0]);
    let m = PROTOTYPE_MOMENTUM;
    let (rows, values) = p.seen_with(&[(1, vec![1.0, 0.0]), (0, vec![0.0, 1.0])]);
    assert_eq!(rows, vec![0, 1, 3]);
    let expected_1 = [(1.0 - m) * 0.5 + m, (1.0 - m) * 0.5];
    assert_eq!(
        values,
        vec![0.0, 1.0, expected_1[0], expected_1[1], 0.0, 2.0]
    );
    // Looking did not write.
    assert_eq!(p.0.as_vec()[..2], [0.0, 0.0]);
    p.update(&[(1, vec![1.0, 0.0]), (0, vec![0.0, 1.0])]);
    assert_eq!(p.0.as_vec()[..4], [0.0, 1.0, expected_1[0], expected_1[1]]);
    p.clear_row(1);
    assert_eq!(p.seen_with(&[]).0, vec![0, 3]);
}

/// The loss on hand-made vectors: cross-entropy of s·cos(caption, prototype) on the caption's
/// own prototype, averaged over the captions that have one.
#[test]
fn prototype_contrast_values() {
    let dev = cpu();
    let text: Tensor<(usize, usize), f64, Cpu> =
        dev.tensor_from_vec(vec![1.0, 0.0, 3.0, 4.0, 0.0, 2.0], (3, 2));
    // Prototypes of any scale: only their directions count.
    let protos = [2.0, 0.0, 0.0, 1.0, 3.0, 3.0];
    let s = 10.0;
    let scale = dev.tensor(s);
    let l = prototype_contrast(text, &protos, &[Some(2), None, Some(1)], scale).expect("a loss");
    let cos = |t: [f64; 2], p: [f64; 2]| {
        (t[0] * p[0] + t[1] * p[1]) / ((t[0].hypot(t[1])) * p[0].hypot(p[1]))
    };
    let ps = [[2.0, 0.0], [0.0, 1.0], [3.0, 3.0]];
    let ce = |t: [f64; 2], target: usize| {
        let logits: Vec<f64> = ps.iter().map(|&p| s * cos(t, p)).collect();
        let lse = logits.iter().map(|x| x.exp()).sum::<f64>().ln();
        lse - logits[target]
    };
    let expected = (ce([1.0, 0.0], 2) + ce([0.0, 2.0], 1)) / 2.0;
    assert!(
        (l.array() - expected).abs() < 1e-12,
        "{} vs {expected}",
        l.array()
    );
    // Nothing to learn from: no target, or no prototype.
    let text: Tensor<(usize, usize), f64, Cpu> = dev.tensor_from_vec(vec![1.0, 0.0], (1, 2));
    assert!(prototype_contrast(text.clone(), &protos, &[None], dev.tensor(s)).is_none());
    assert!(prototype_contrast(text, &[], &[Some(0)], dev.tensor(s)).is_none());
}

/// The prototypes are constants: the loss teaches the text tower (and the logit scale), not
/// the image tower or the identity head.
#[test]
fn caption_prototype_loss_trains_the_text_tower_only() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let b = batch(&toy_samples(&p, 3, 2, 5), &p, &tk, 0.5, 9);
    let grads = named_gradients(
        &p,
        &b,
        TaskWeights {
            proto: 1.0,
            ..TaskWeights::none()
        },
    );
    let moved = |prefix: &str| {
        grads
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .any(|(_, g)| g.iter().any(|x| *x != 0.0))
    };
    assert!(moved("text."));
    assert!(moved("logit_scale"));
    assert!(!moved("image."));
    assert!(!moved("id."));
}

fn proto_trainer() -> Trainer<f32, Cpu> {
    Trainer::new(
        Plip::new(&cpu(), &Preset::test(), 5).unwrap(),
        quick_config(TaskWeights {
            proto: 1.0,
            ..Default::default()
        }),
    )
}

fn prototype_rows(t: &Trainer<f32, Cpu>) -> Vec<Vec<f32>> {
    let head = t.model.id.as_ref().unwrap();
    let dim = head.prototypes.0.shape().1;
    head.prototypes
        .0
        .as_vec()
        .chunks(dim)
        .map(<[f32]>::to_vec)
        .collect()
}

/// A step fills the rows of the batch's people (unit features averaged: norm at most 1) and no
/// other; the prototypes travel with the weights; a file written before they existed loads with
/// none seen; forgetting a person clears their row.
#[test]
fn prototypes_fill_save_load_and_forget() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 4, 2, 3);
    let b = batch(&toys, &p, &tk, 0.5, 1);
    let mut t = proto_trainer();
    assert!(prototype_rows(&t)
        .iter()
        .all(|r| r.iter().all(|x| *x == 0.0)));
    let r = t.step(&b).unwrap();
    assert!(!r.skipped);
    assert!(r.losses.proto.is_some_and(f64::is_finite));
    let classes = p.id_classes as u64;
    let people: Vec<usize> = (0..4u64).map(|k| (k % classes) as usize).collect();
    for (i, row) in prototype_rows(&t).iter().enumerate() {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if people.contains(&i) {
            assert!(norm > 0.1 && norm <= 1.0 + 1e-5, "row {i}: {norm}");
        } else {
            assert_eq!(norm, 0.0, "row {i}");
        }
    }
    // Round trip through the weights.
    let bytes = save_weights(&t.model, tk.fingerprint(), 1, &BTreeMap::new()).unwrap();
    let mut other = Plip::<f32, Cpu>::new(&cpu(), &p, 9).unwrap();
    load_weights(&mut other, &bytes, tk.fingerprint()).unwrap();
    assert_eq!(
        other.id.as_ref().unwrap().prototypes.0.as_vec(),
        t.model.id.as_ref().unwrap().prototypes.0.as_vec()
    );
    // The same file without the prototypes (as written before them): loads, none seen.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != OPTIONAL_BUFFER)
        .collect();
    assert_eq!(kept.len() + 1, st.len());
    let old = safetensors::serialize(kept, &meta.metadata().clone()).unwrap();
    let mut older = Plip::<f32, Cpu>::new(&cpu(), &p, 9).unwrap();
    load_weights(&mut older, &old, tk.fingerprint()).unwrap();
    assert!(older.id.as_ref().unwrap().prototypes.is_empty());
    assert_eq!(
        older.embed_images(&b.images, 8),
        t.model.embed_images(&b.images, 8)
    );
    // Forgetting person 2 clears row 2 only.
    let before = prototype_rows(&t);
    let row = t.forget_person(2).unwrap();
    let after = prototype_rows(&t);
    for (i, (a, b)) in after.iter().zip(&before).enumerate() {
        if i == row {
            assert!(a.iter().all(|x| *x == 0.0));
        } else {
            assert_eq!(a, b);
        }
    }
}

/// With the loss off, the prototypes stay empty (and cost nothing).
#[test]
fn prototypes_stay_empty_when_the_loss_is_off() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let b = batch(&toy_samples(&p, 4, 2, 3), &p, &tk, 0.5, 1);
    let mut t = Trainer::new(
        Plip::<f32, Cpu>::new(&cpu(), &p, 5).unwrap(),
        quick_config(TaskWeights::default()),
    );
    let r = t.step(&b).unwrap();
    assert!(r.losses.proto.is_none());
    assert!(t.model.id.as_ref().unwrap().prototypes.is_empty());
}
