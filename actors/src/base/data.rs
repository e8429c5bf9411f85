//! Data-set items turned into what the model consumes: pixels at the preset's input size and
//! captions with phrase spans (synthesised from attributes, or from the colours of the pixels,
//! when the data set has none).

use plip_ingest::captions::{estimate_colours, synthesize, Caption};
use plip_ingest::datasets::{BadRecord, Item};
use plip_ingest::image::{canonical, decode, pixels_at, IntakeLimits};
use plip_model::Preset;
use rayon::prelude::*;

/// The images of `loaded`, normalised for `preset` and laid end to end: the encoder's input.
pub fn normalized<'a>(loaded: impl IntoIterator<Item = &'a Loaded>, preset: &Preset) -> Vec<f32> {
    loaded
        .into_iter()
        .flat_map(|x| {
            plip_model::batch::normalize_rgb(&x.rgb, preset.image_height, preset.image_width)
        })
        .collect()
}

/// Up to `n` of `items`, spread evenly over them (every `len / n`-th).
pub fn spread<T>(items: &[T], n: usize) -> impl Iterator<Item = &T> {
    items
        .iter()
        .step_by((items.len() / n.max(1)).max(1))
        .take(n)
}

/// An item ready for the model.
pub struct Loaded {
    /// `H×W×3` bytes at the preset's input size.
    pub rgb: Vec<u8>,
    pub captions: Vec<Caption>,
    pub person: Option<String>,
    pub camera: Option<String>,
    /// The true attributes, when the data set has them (the text→image ceiling uses them).
    pub attributes: Option<plip_ingest::attributes::Attributes>,
}

/// Decodes and resizes `items` in parallel; undecodable images are returned as bad records.
pub fn load(
    items: &[Item],
    preset: &Preset,
    limits: &IntakeLimits,
    seed: u64,
) -> (Vec<Loaded>, Vec<BadRecord>) {
    let results: Vec<Result<Loaded, BadRecord>> = items
        .par_iter()
        .enumerate()
        .map(|(i, it)| {
            let bytes = std::fs::read(&it.path).map_err(|e| BadRecord {
                record: it.path.display().to_string(),
                reason: format!("unreadable: {e}"),
            })?;
            let img = decode(&bytes, limits).map_err(|e| BadRecord {
                record: it.path.display().to_string(),
                reason: format!("{} ({})", e, e.code()),
            })?;
            let canon = canonical(&img);
            let captions = if !it.captions.is_empty() {
                it.captions.clone()
            } else {
                let attrs = it.attributes.unwrap_or_else(|| estimate_colours(&canon));
                let set = synthesize(&attrs, seed ^ i as u64);
                let mut c = set.captions;
                c.push(set.prompt);
                c
            };
            Ok(Loaded {
                rgb: pixels_at(
                    &canon,
                    preset.image_height as u32,
                    preset.image_width as u32,
                ),
                captions,
                person: it.person.clone(),
                camera: it.camera.clone(),
                attributes: it.attributes,
            })
        })
        .collect();
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for r in results {
        match r {
            Ok(l) => ok.push(l),
            Err(b) => bad.push(b),
        }
    }
    (ok, bad)
}

/// Prints skipped records to stderr (the first 10 in full) and returns the count.
pub fn report_skipped(what: &str, skipped: &[BadRecord]) -> usize {
    for b in skipped.iter().take(10) {
        eprintln!("plipd: skipped {what} {}: {}", b.record, b.reason);
    }
    if skipped.len() > 10 {
        eprintln!(
            "plipd: … and {} more skipped {what} records",
            skipped.len() - 10
        );
    }
    skipped.len()
}

/// The attribute head's labels of a sample's true attributes (none when they are unknown).
pub fn attribute_labels(
    attributes: Option<&plip_ingest::attributes::Attributes>,
) -> Vec<plip_model::batch::AttributeLabel> {
    attributes
        .map(|a| {
            a.labels()
                .into_iter()
                .map(|f| plip_model::batch::AttributeLabel {
                    start: f.start,
                    len: f.len,
                    value: f.value,
                })
                .collect()
        })
        .unwrap_or_default()
}
