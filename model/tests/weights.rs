//! Weights and optimiser state through bytes: exact round trips, exact resumption, and refusal
//! of anything that does not belong to the model.

mod common;

use common::*;
use plip_model::batch::{Augment, Batch};
use plip_model::dfdx::prelude::*;
use plip_model::optim::{AdamW, OptimConfig};
use plip_model::weights::{self, load_optimizer, load_weights, save_optimizer, save_weights};
use plip_model::{Error, Params, Plip, Preset, TrainConfig, Trainer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::BTreeMap;

fn trained(
    steps: u64,
    seed: u64,
) -> (
    Trainer<f32, Cpu>,
    Vec<plip_model::batch::Batch>,
    plip_model::Tokenizer,
) {
    let p = Preset::test();
    let tk = tokenizer(&p);
    let toys = toy_samples(&p, 4, 2, 3);
    // Augmented as the trainers build them: keyed by (seed, step), so a resumed run redraws the
    // same flips, crops and erasures.
    let samples: Vec<_> = toys.iter().map(Toy::sample).collect();
    let batches: Vec<_> = (0..5u64)
        .map(|i| {
            Batch::build_augmented(
                &samples,
                &p,
                &tk,
                0.5,
                &mut StdRng::seed_from_u64(100 + i),
                &Augment::default(),
                (seed, i),
            )
            .unwrap()
        })
        .collect();
    let cfg = TrainConfig {
        optim: OptimConfig {
            lr: 1e-3,
            warmup_steps: 2,
            ..Default::default()
        },
        // Every task, the caption–prototype contrast too, so resumption covers the prototypes.
        tasks: plip_model::TaskWeights {
            proto: 1.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut t = Trainer::new(Plip::new(&cpu(), &p, seed).unwrap(), cfg);
    for b in batches.iter().take(steps as usize) {
        assert!(!t.step(b).unwrap().skipped);
    }
    (t, batches, tk)
}

/// Every parameter and buffer (BatchNorm running statistics) with its values.
fn all_values(m: &Plip<f32, Cpu>) -> Vec<(String, Vec<f32>)> {
    m.state()
        .into_iter()
        .map(|(n, p)| (n, p.to_host()))
        .collect()
}

/// Saved weights loaded into a differently initialised model give bit-identical embeddings, and
/// the metadata comes back.
#[test]
fn save_then_load_gives_identical_embeddings() {
    let (t, batches, tk) = trained(2, 1);
    let mut extra = BTreeMap::new();
    extra.insert("map".to_string(), "0.5".to_string());
    let bytes = save_weights(&t.model, tk.fingerprint(), 2, &extra).unwrap();
    let mut fresh = Plip::<f32, Cpu>::new(&cpu(), &Preset::test(), 999).unwrap();
    assert_ne!(all_values(&fresh), all_values(&t.model));
    let meta = load_weights(&mut fresh, &bytes, tk.fingerprint()).unwrap();
    assert_eq!(
        (meta.step, meta.extra, meta.preset.name.as_str()),
        (2, extra, "test")
    );
    assert_eq!(
        fresh.embed_images(&batches[0].images, 3),
        t.model.embed_images(&batches[0].images, 3)
    );
    assert_eq!(
        fresh.embed_texts(&batches[0].tokens, 3),
        t.model.embed_texts(&batches[0].tokens, 3)
    );
}

/// Training 3 steps, saving weights and optimiser, loading both into a fresh model and training
/// 2 more equals 5 uninterrupted steps (to 1e-6 on every parameter and BatchNorm statistic of
/// the ResNet `test` preset).
#[test]
fn resume_from_bytes_equals_uninterrupted_training() {
    let (straight, batches, tk) = trained(5, 1);
    let (three, _, _) = trained(3, 1);
    let w = save_weights(
        &three.model,
        tk.fingerprint(),
        three.opt.step,
        &BTreeMap::new(),
    )
    .unwrap();
    let o = save_optimizer(&three.opt, &three.model.preset, tk.fingerprint()).unwrap();
    drop(three);

    let model = Plip::<f32, Cpu>::new(&cpu(), &Preset::test(), 77).unwrap();
    let mut resumed = Trainer::new(model, straight.cfg);
    load_weights(&mut resumed.model, &w, tk.fingerprint()).unwrap();
    load_optimizer(&mut resumed.opt, &o, &Preset::test(), tk.fingerprint()).unwrap();
    assert_eq!(resumed.opt.step, 3);
    for b in &batches[3..5] {
        resumed.step(b).unwrap();
    }
    assert_eq!(resumed.opt.step, 5);
    for ((name, a), (_, b)) in all_values(&straight.model)
        .iter()
        .zip(all_values(&resumed.model))
    {
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-6, "{name} differs by {worst}");
    }
}

/// Truncated, corrupted, foreign-preset, foreign-tokenizer, wrong-kind and newer-format blobs are
/// refused with a specific error, and a refused load leaves the model untouched.
#[test]
fn corrupt_and_mismatched_blobs_are_refused() {
    let (t, batches, tk) = trained(1, 1);
    let fp = tk.fingerprint();
    let bytes = save_weights(&t.model, fp, 1, &BTreeMap::new()).unwrap();
    let mut target = Plip::<f32, Cpu>::new(&cpu(), &Preset::test(), 5).unwrap();
    let before = target.embed_images(&batches[0].images, 8);

    let truncated = &bytes[..bytes.len() / 2];
    assert!(matches!(
        load_weights(&mut target, truncated, fp),
        Err(Error::Weights(_))
    ));
    assert!(matches!(
        load_weights(&mut target, &bytes[..5], fp),
        Err(Error::Weights(_))
    ));
    assert!(matches!(
        load_weights(&mut target, b"not a safetensors file at all", fp),
        Err(Error::Weights(_))
    ));

    let mut wrong_fp = bytes.clone();
    assert!(matches!(
        load_weights(&mut target, &wrong_fp, "0123456789abcdef"),
        Err(Error::TokenizerMismatch { .. })
    ));
    let newer = replace_once(
        &wrong_fp,
        format!("\"format_version\":\"{}\"", weights::FORMAT_VERSION).as_bytes(),
        b"\"format_version\":\"9\"",
    );
    assert!(matches!(
        load_weights(&mut target, &newer, fp),
        Err(Error::NewerFormat { found: 9, .. })
    ));
    wrong_fp.truncate(bytes.len() - 3);
    assert!(load_weights(&mut target, &wrong_fp, fp).is_err());

    let opt_bytes = save_optimizer(&t.opt, &t.model.preset, fp).unwrap();
    let err = load_weights(&mut target, &opt_bytes, fp).unwrap_err();
    assert!(err.to_string().contains("optimizer"), "{err}");

    let mut other = Preset::test();
    other.name = "other".into();
    other.mlp = 48;
    let mut foreign = Plip::<f32, Cpu>::new(&cpu(), &other, 5).unwrap();
    let err = load_weights(&mut foreign, &bytes, fp).unwrap_err();
    assert!(matches!(err, Error::PresetMismatch { .. }), "{err}");
    assert!(err.to_string().contains("preset test"), "{err}");
    let mut foreign_opt = AdamW::new(&foreign);
    assert!(load_optimizer(&mut foreign_opt, &opt_bytes, &other, fp).is_err());

    assert_eq!(
        target.embed_images(&batches[0].images, 8),
        before,
        "a refused load changed the model"
    );
    assert!(weights::read_meta(&bytes).is_ok());
}

/// Files hold convolution weights in PyTorch's `(O, I, kH, kW)` order under torchvision's
/// names; a format-1 file (the model's own `(c_out, k·k·c_in)` layout, shortcuts named
/// `downsample.conv` / `downsample.bn`) still loads to the same model.
#[test]
fn convolutions_are_stored_as_pytorch_does_and_format_1_files_still_load() {
    use safetensors::tensor::{SafeTensors, TensorView};
    let (t, batches, tk) = trained(1, 1);
    let fp = tk.fingerprint();
    let bytes = save_weights(&t.model, fp, 1, &BTreeMap::new()).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |v: &TensorView<'_>| -> Vec<f32> {
        v.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    // conv1: (8, 3, 7, 7) in the file; element [o, i, y, x] is the model's [o, (y·7 + x)·3 + i].
    let conv1 = st.tensor("image.conv1.weight").unwrap();
    assert_eq!(conv1.shape(), &[8, 3, 7, 7]);
    let file = f32s(&conv1);
    let held = t.model.image.resnet.as_ref().unwrap().conv1.weight.as_vec();
    for (o, i, y, x) in [(0, 0, 0, 0), (3, 2, 1, 5), (7, 1, 6, 6)] {
        assert_eq!(
            file[((o * 3 + i) * 7 + y) * 7 + x],
            held[o * 147 + (y * 7 + x) * 3 + i]
        );
    }
    assert!(st
        .names()
        .iter()
        .any(|n| *n == "image.layer2.0.downsample.0.weight"));

    // The same weights written as format 1 did.
    let mut shapes = Vec::new();
    t.model.visit_convs("", &mut shapes);
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let old = name
                .replace(".downsample.0.", ".downsample.conv.")
                .replace(".downsample.1.", ".downsample.bn.");
            match shapes.iter().find(|(n, _)| *n == name) {
                Some((_, shape)) => {
                    let held = weights::conv_from_torch(&f32s(&v), *shape);
                    let dims = vec![shape[0], shape[1] * shape[2] * shape[3]];
                    (
                        old,
                        dims,
                        held.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    )
                }
                None => (old, v.shape().to_vec(), v.data().to_vec()),
            }
        })
        .collect();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut md = meta.metadata().clone().unwrap();
    md.insert("format_version".into(), "1".into());
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, b)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, d.clone(), b).unwrap(),
            )
        })
        .collect();
    let v1 = safetensors::tensor::serialize(views, &Some(md)).unwrap();
    assert!(!SafeTensors::deserialize(&v1)
        .unwrap()
        .names()
        .iter()
        .any(|n| *n == "image.layer2.0.downsample.0.weight"));
    let mut fresh = Plip::<f32, Cpu>::new(&cpu(), &Preset::test(), 999).unwrap();
    let meta = load_weights(&mut fresh, &v1, fp).unwrap();
    assert_eq!(meta.format_version, 1);
    assert_eq!(all_values(&fresh), all_values(&t.model));
    assert_eq!(
        fresh.embed_images(&batches[0].images, 3),
        t.model.embed_images(&batches[0].images, 3)
    );
}

fn replace_once(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = hay
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern in header");
    let mut out = hay.to_vec();
    out[at..at + from.len()].copy_from_slice(to);
    out
}

/// f32 weights load into an f64 model (the gradient check's type) and back without loss.
#[test]
fn weights_cross_dtypes() {
    let (t, batches, tk) = trained(1, 1);
    let mut m64 = Plip::<f64, Cpu>::new(&cpu(), &Preset::test(), 1).unwrap();
    plip_model::weights::copy_weights(&t.model, &mut m64);
    let bytes = save_weights(&m64, tk.fingerprint(), 0, &BTreeMap::new()).unwrap();
    let mut back = Plip::<f32, Cpu>::new(&cpu(), &Preset::test(), 2).unwrap();
    load_weights(&mut back, &bytes, tk.fingerprint()).unwrap();
    assert_eq!(
        back.embed_images(&batches[0].images, 8),
        t.model.embed_images(&batches[0].images, 8)
    );
}

/// A checkpoint written without the attribute head loads into a model with one: every other
/// tensor comes from the file, the head keeps its initialisation, and its optimiser moments
/// start at zero. The other way round the checkpoint's head is refused unless the model has it.
#[test]
fn a_checkpoint_without_the_attribute_head_gains_one() {
    let (t, _, tk) = trained(2, 1);
    let fp = tk.fingerprint();
    let w = save_weights(&t.model, fp, 2, &BTreeMap::new()).unwrap();
    let o = save_optimizer(&t.opt, &t.model.preset, fp).unwrap();
    let with_head = Preset::test().with_attributes(&[3, 4]);
    assert_eq!(with_head.mismatch(&t.model.preset), None);
    let mut m = Plip::<f32, Cpu>::new(&cpu(), &with_head, 9).unwrap();
    let head_init = m.attr.as_ref().unwrap().weight.as_vec();
    load_weights(&mut m, &w, fp).unwrap();
    let mut opt = AdamW::new(&m);
    load_optimizer(&mut opt, &o, &with_head, fp).unwrap();
    assert_eq!(opt.step, t.opt.step);
    let loaded: BTreeMap<String, Vec<f32>> = m
        .params()
        .into_iter()
        .map(|(n, p)| (n, p.to_host()))
        .collect();
    for (name, p) in t.model.params() {
        assert_eq!(loaded[&name], p.to_host(), "{name}");
    }
    assert_eq!(loaded["attr.weight"], head_init);
    // A checkpoint with the head, into a model without one: refused (the trainers adopt the
    // checkpoint's head instead).
    let w2 = save_weights(&m, fp, 2, &BTreeMap::new()).unwrap();
    let mut plain = Plip::<f32, Cpu>::new(&cpu(), &Preset::test(), 9).unwrap();
    assert!(load_weights(&mut plain, &w2, fp).is_err());
    assert!(Preset::test().mismatch(&with_head).is_some());
}

/// A checkpoint written without the text tower's bigram table loads into a model with one: the
/// table starts at zero (captions embed exactly as the checkpoint embeds them), its moments at
/// zero, every other tensor from the file; the other way round is refused with a message
/// naming the setting.
#[test]
fn a_checkpoint_without_the_bigram_table_gains_one_at_zero() {
    use plip_model::dfdx::prelude::NoneTape;
    let (t, _, tk) = trained(2, 1);
    let fp = tk.fingerprint();
    let w = save_weights(&t.model, fp, 2, &BTreeMap::new()).unwrap();
    let o = save_optimizer(&t.opt, &t.model.preset, fp).unwrap();
    let with = Preset::test().with_text_bigrams(32);
    assert_eq!(with.mismatch(&t.model.preset), None);
    let mut m = Plip::<f32, Cpu>::new(&cpu(), &with, 9).unwrap();
    load_weights(&mut m, &w, fp).unwrap();
    let mut opt = AdamW::new(&m);
    load_optimizer(&mut opt, &o, &with, fp).unwrap();
    assert_eq!(opt.step, t.opt.step);
    let loaded: BTreeMap<String, Vec<f32>> = m
        .params()
        .into_iter()
        .map(|(n, p)| (n, p.to_host()))
        .collect();
    for (name, p) in t.model.params() {
        assert_eq!(loaded[&name], p.to_host(), "{name}");
    }
    assert!(loaded["text.bigram_embed"].iter().all(|&x| x == 0.0));
    let tokens = tk
        .encode_batch(&["a woman in a navy jacket and grey trousers"], 24)
        .unwrap();
    let dev = cpu();
    assert_eq!(
        m.text.embed(&dev, &tokens, NoneTape).as_vec(),
        t.model.text.embed(&dev, &tokens, NoneTape).as_vec()
    );
    let w2 = save_weights(&m, fp, 2, &BTreeMap::new()).unwrap();
    let mut plain = Plip::<f32, Cpu>::new(&cpu(), &Preset::test(), 9).unwrap();
    assert!(load_weights(&mut plain, &w2, fp).is_err());
    let why = Preset::test().mismatch(&with).unwrap();
    assert!(why.contains("text_bigrams = 32"), "{why}");
}
