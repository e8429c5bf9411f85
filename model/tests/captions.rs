//! Several captions per image: the extra captions of a batch feed IVLC and the caption identity
//! loss beside each sample's own.

mod common;

use common::*;
use plip_model::batch::pick_captions;
use plip_model::dfdx::prelude::*;
use plip_model::loss::{identity_targets, ivlc};
use plip_model::norm::BnMode;
use plip_model::{Plip, Preset, TaskWeights};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn tasks() -> TaskWeights {
    TaskWeights {
        ivlc: 1.0,
        triplet: 1.0,
        id: 1.0,
        text_id: 1.0,
        ivlc_image_grad: false,
        ..TaskWeights::none()
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-10 * (1.0 + a.abs().max(b.abs()))
}

/// Each sample's own caption once more: the caption identity loss runs over the doubled batch
/// (same mean, same variance), so it and every gradient without IVLC stay the same; IVLC is
/// CMPM over the doubled matrix — each image row stands twice — computed here by hand from the
/// towers' outputs. (Not IVLC's value alone: the ε of ln(q + ε) weighs a negative's probability
/// by the number of columns, so doubling them shifts it.)
#[test]
fn a_repeated_caption_doubles_the_caption_rows() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 4, 2, 3);
    let plain = batch(&toys, &p, &tk, 0.5, 1);
    let mut doubled = plain.clone();
    let extra: Vec<(usize, &str)> = toys
        .iter()
        .enumerate()
        .map(|(i, t)| (i, t.caption.as_str()))
        .collect();
    doubled.add_captions(&extra, &p, &tk).unwrap();
    assert_eq!(doubled.all_captions().batch, 2 * plain.n);

    let no_ivlc = TaskWeights {
        ivlc: 0.0,
        ..tasks()
    };
    let model = Plip::<f64, Cpu>::new(&cpu(), &p, 11).unwrap();
    let (_, a) = model.losses(&plain, &tasks(), NoneTape).unwrap();
    let (_, b) = model.losses(&doubled, &tasks(), NoneTape).unwrap();
    for (name, x, y) in [
        ("text_id", a.text_id, b.text_id),
        ("id", a.id, b.id),
        ("triplet", a.triplet, b.triplet),
    ] {
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!(close(x, y), "{name}: {x} alone, {y} repeated");
    }
    let ga = named_gradients(&p, &plain, no_ivlc);
    let gb = named_gradients(&p, &doubled, no_ivlc);
    for ((name, x), (_, y)) in ga.iter().zip(&gb) {
        for (u, v) in x.iter().zip(y) {
            assert!(close(*u, *v), "{name}: gradient {u} alone, {v} repeated");
        }
    }

    // IVLC by hand: image rows 0..n twice against the captions 0..n twice.
    let dev = cpu();
    let n = plain.n;
    let images: Vec<f64> = plain.images.iter().map(|&x| f64::from(x)).collect();
    let images = dev.tensor_from_vec(images, (n, 3, p.image_height, p.image_width));
    let img = model
        .image
        .project(model.image.pooled(images, BnMode::Train(None)));
    let txt = model.text.embed(&dev, &plain.tokens, NoneTape);
    let twice = |m: Tensor<(usize, usize), f64, Cpu>| {
        let (r, c) = *m.shape();
        let mut v = m.as_vec();
        v.extend_from_within(..);
        dev.tensor_from_vec(v, (2 * r, c))
    };
    let mut ids = plain.identities.clone();
    ids.extend_from_within(..);
    let expected = ivlc(
        twice(img),
        twice(txt),
        model.scale::<NoneTape>(),
        &identity_targets(&ids),
    );
    let (e, got) = (expected.as_vec()[0], b.ivlc.unwrap());
    assert!(close(e, got), "IVLC {got}, by hand {e}");
    assert!(
        !close(e, a.ivlc.unwrap()),
        "the doubled matrix should shift IVLC"
    );
}

/// Differently worded captions move the caption-side losses and the text tower's gradient;
/// the image losses, and (IVLC stopping at the image embedding) the image tower's gradient,
/// stay exactly as they were.
#[test]
fn other_captions_reach_the_text_side_only() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 4, 2, 3);
    let plain = batch(&toys, &p, &tk, 0.5, 1);
    let reworded: Vec<String> = toys
        .iter()
        .map(|t| t.caption.replace("a person wearing", "someone in"))
        .collect();
    let extra: Vec<(usize, &str)> = reworded.iter().map(String::as_str).enumerate().collect();
    let mut more = plain.clone();
    more.add_captions(&extra, &p, &tk).unwrap();

    let model = Plip::<f64, Cpu>::new(&cpu(), &p, 11).unwrap();
    let (_, a) = model.losses(&plain, &tasks(), NoneTape).unwrap();
    let (_, b) = model.losses(&more, &tasks(), NoneTape).unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(a.triplet, b.triplet);
    assert_ne!(a.ivlc, b.ivlc);
    assert_ne!(a.text_id, b.text_id);

    let ga = named_gradients(&p, &plain, tasks());
    let gb = named_gradients(&p, &more, tasks());
    let mut text_moved = false;
    for ((name, x), (_, y)) in ga.iter().zip(&gb) {
        if name.starts_with("image.") {
            assert_eq!(x, y, "{name}: the image tower's gradient changed");
        }
        if name.starts_with("text.") && x != y {
            text_moved = true;
        }
    }
    assert!(text_moved, "the text tower's gradient did not change");
}

#[test]
fn a_caption_for_a_row_outside_the_batch_is_refused() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 2, 2, 3);
    let mut b = batch(&toys, &p, &tk, 0.5, 1);
    let err = b
        .add_captions(&[(4, "a person")], &p, &tk)
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 4 of a batch of 4"), "{err}");
    assert!(b.extra.is_none());
    b.add_captions(&[(3, "a person")], &p, &tk).unwrap();
    assert_eq!(b.caption_rows(), vec![0, 1, 2, 3, 3]);
    b.add_captions(&[], &p, &tk).unwrap();
    assert!(b.extra.is_none());
    assert_eq!(b.caption_rows(), vec![0, 1, 2, 3]);
}

#[test]
fn picks_are_distinct_and_bounded() {
    let mut rng = StdRng::seed_from_u64(5);
    let mut firsts = [0usize; 3];
    for _ in 0..300 {
        for per in [0, 1, 2, 3, 7] {
            let c = pick_captions(3, per, &mut rng);
            assert_eq!(c.len(), per.clamp(1, 3));
            let mut d = c.clone();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), c.len(), "{c:?} repeats a caption");
            assert!(c.iter().all(|&i| i < 3));
            if per == 1 {
                firsts[c[0]] += 1;
            }
        }
    }
    // The first caption is drawn uniformly: each of three ~100 times in 300.
    assert!(firsts.iter().all(|&f| f > 60), "{firsts:?}");
    assert!(pick_captions(0, 3, &mut rng).is_empty());
}
