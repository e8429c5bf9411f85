//! A small learnable toy problem shared by the model tests: two-colour "people" whose caption
//! names their colours.
#![allow(dead_code)]

use plip_model::batch::{Batch, Sample};
use plip_model::dfdx::prelude::Cpu;
use plip_model::optim::{AdamW, Grad, OptimConfig};
use plip_model::{Params, Plip, Preset, TaskWeights, Tokenizer, TrainConfig, Trainer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ops::Range;

pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [200, 30, 30]),
    ("blue", [30, 40, 200]),
    ("green", [30, 160, 40]),
    ("black", [20, 20, 20]),
    ("white", [235, 235, 235]),
    ("yellow", [220, 200, 30]),
];

pub struct Toy {
    pub rgb: Vec<u8>,
    pub caption: String,
    pub phrases: Vec<Range<usize>>,
    pub identity: u64,
}

impl Toy {
    pub fn sample(&self) -> Sample<'_> {
        Sample {
            rgb: &self.rgb,
            caption: &self.caption,
            phrases: &self.phrases,
            identity: Some(self.identity),
            person: Some(self.identity),
            attributes: &[],
        }
    }
}

/// Character span of `needle` in `hay`.
pub fn span(hay: &str, needle: &str) -> Range<usize> {
    let byte = hay.find(needle).expect("phrase in caption");
    let start = hay[..byte].chars().count();
    start..start + needle.chars().count()
}

pub fn caption_for(identity: usize) -> (String, Vec<Range<usize>>) {
    let upper = COLOURS[identity % 6].0;
    let lower = COLOURS[(identity / 6 + identity + 1) % 6].0;
    let up = format!("{upper} shirt");
    let low = format!("{lower} trousers");
    let caption = format!("a person wearing a {up} and {low}");
    let phrases = vec![span(&caption, &up), span(&caption, &low)];
    (caption, phrases)
}

pub fn toy_samples(p: &Preset, identities: usize, per_id: usize, seed: u64) -> Vec<Toy> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for id in 0..identities {
        let (caption, phrases) = caption_for(id);
        let upper = COLOURS[id % 6].1;
        let lower = COLOURS[(id / 6 + id + 1) % 6].1;
        for _ in 0..per_id {
            let mut rgb = Vec::with_capacity(p.image_height * p.image_width * 3);
            for y in 0..p.image_height {
                let c = if y < p.image_height / 2 { upper } else { lower };
                for _ in 0..p.image_width {
                    for ch in c {
                        let v = ch as i32 + rng.gen_range(-20..=20);
                        rgb.push(v.clamp(0, 255) as u8);
                    }
                }
            }
            out.push(Toy {
                rgb,
                caption: caption.clone(),
                phrases: phrases.clone(),
                identity: id as u64,
            });
        }
    }
    out
}

/// A fresh tokenizer for the toy captions.
pub fn train_tokenizer(p: &Preset) -> Tokenizer {
    let mut texts: Vec<String> = (0..36).map(|i| caption_for(i).0).collect();
    texts.push("a woman with long hair carrying a backpack".into());
    Tokenizer::train(texts.into_iter(), p.vocab).expect("tokenizer trains")
}

/// One tokenizer per test binary: training twice may tie-break merges differently (see
/// `Tokenizer::train`), and tests that compare runs must tokenize identically.
pub fn tokenizer(p: &Preset) -> Tokenizer {
    static SHARED: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    assert!(
        p.vocab == Preset::test().vocab && p.name.starts_with("test"),
        "the shared toy tokenizer is for the test presets"
    );
    SHARED.get_or_init(|| train_tokenizer(p)).clone()
}

pub fn batch(toys: &[Toy], p: &Preset, tk: &Tokenizer, ratio: f64, seed: u64) -> Batch {
    let samples: Vec<Sample<'_>> = toys.iter().map(Toy::sample).collect();
    Batch::build(&samples, p, tk, ratio, &mut StdRng::seed_from_u64(seed)).expect("batch builds")
}

pub fn cpu() -> Cpu {
    Cpu::default()
}

/// A few quick steps' configuration: lr 1e-3 from the first step, no IAP ramp.
pub fn quick_config(tasks: TaskWeights) -> TrainConfig {
    TrainConfig {
        optim: OptimConfig {
            lr: 1e-3,
            warmup_steps: 0,
            ..Default::default()
        },
        tasks,
        ramp_steps: 1,
        text_substeps: 0,
    }
}

/// Every parameter's gradient for one batch, by name, from a fresh model of `p` (seed 11), in
/// f64 for exact comparisons.
pub fn named_gradients(p: &Preset, b: &Batch, tasks: TaskWeights) -> Vec<(String, Vec<f64>)> {
    let model = Plip::<f64, Cpu>::new(&cpu(), p, 11).expect("model");
    let trainer = Trainer::new(
        model,
        TrainConfig {
            tasks,
            ..Default::default()
        },
    );
    let (g, _) = trainer.gradients(b).expect("gradients");
    let g = AdamW::gradients(&trainer.model, &g.expect("a gradient"));
    trainer
        .model
        .params()
        .into_iter()
        .zip(g)
        .map(|((n, _), g)| {
            let v = match g {
                Grad::Vector(t) => t.as_vec(),
                Grad::Matrix(t) => t.as_vec(),
            };
            (n, v)
        })
        .collect()
}
