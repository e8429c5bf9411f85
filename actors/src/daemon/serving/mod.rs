//! The ReID server: the serving encoder with its gallery index, the swapper that promotes new
//! checkpoints (load before unload), and the request consumer.
//!
//! **Swapper.** Every `serving.poll_ms` it looks at the newest checkpoint. A new one is loaded
//! into a shadow encoder and evaluated on the probe split (samples set aside at ingest, never
//! trained on): image ReID mAP / Rank-1 and text→image R@1. It is promoted when it is the first,
//! or when its gate metric is not worse than the serving version's by more than
//! `serving.gate_margin`; otherwise it is refused (and not tried again). Promotion re-embeds the
//! whole gallery with the shadow encoder while the old version keeps answering, stores the
//! embeddings and the serving version in sled in one transaction, then swaps encoder and index
//! in one step (an `Arc` behind a lock: a request holds exactly one version from start to end).
//! New gallery samples are embedded with the serving encoder and appended (a new gallery
//! version). After a restart the stored gallery is used as is — nothing is re-embedded.
//!
//! **Requests** (`plip.reid.requests`): decoded and validated (stable error codes), checked
//! against their deadline (AMQP `expiration` or `deadline_ms`, from the message timestamp or
//! arrival), embedded and searched on the blocking pool, answered to `reply_to` (or on
//! `plip.results` when there is none) with publisher confirms, then acked. Every request gets
//! an answer: matches, or `{request_id, error: {code, message}}`.
//!
//! Files: this one (the serving type and what builds it), [`gate`] (which checkpoint to try and
//! whether it may replace the serving one: pure functions), [`swapper`], [`requests`] (the
//! request consumer), [`batcher`] (requests answered together).

use crate::base::error::{Error, Result};

mod batcher;
pub mod gate;
mod requests;
mod swapper;

pub use requests::requests;
pub use swapper::swapper;

use crate::base::data::Loaded;
use crate::base::index::Index;
use crate::base::model::LoadedModel;
use crate::base::retrieval::evaluate_model;
use crate::daemon::Shared;
use plip_ingest::image::{decode, pixels_at, IntakeLimits};
use plip_ingest::wire::Purpose;
use plip_model::batch::normalize_rgb;
use plip_model::weights::read_meta;
use plip_model::{DeviceSpec, Encoder, Tokenizer};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
/// Metadata of one gallery row.
#[derive(Debug, Clone)]
pub struct GalleryRow {
    pub id: String,
    pub person_id: Option<String>,
    pub camera_id: Option<String>,
}

/// One serving version: encoder + gallery, immutable once built.
pub struct Serving {
    pub version: u64,
    pub step: u64,
    pub gallery_version: u64,
    pub model: Arc<Encoder>,
    pub tokenizer: Arc<Tokenizer>,
    pub index: Index,
    pub rows: Vec<GalleryRow>,
    /// Camera name → number used in the index.
    pub cameras: HashMap<String, u32>,
    /// Probe metrics at promotion.
    pub metrics: BTreeMap<String, f64>,
}

impl Serving {
    pub(super) fn camera_number(&self, name: &str) -> Option<u32> {
        self.cameras.get(name).copied()
    }
}

/// Loads checkpoint `version` of the state into an encoder.
pub(super) fn load_version(shared: &Shared, version: u64) -> Result<(Encoder, Tokenizer, u64)> {
    let ck = shared.state.checkpoint(version)?;
    let tokenizer = shared
        .state
        .tokenizer()?
        .ok_or_else(|| Error::ModelSetup("the state folder has no tokenizer".into()))?;
    let preset = read_meta(&ck.weights)?.preset;
    let spec = DeviceSpec::parse(&shared.cfg.serving.device)
        .map_err(|e| Error::Config(format!("serving.device: {e}")))?;
    let mut model = Encoder::new(spec, &preset, 0)?;
    model.load_weights(&ck.weights, tokenizer.fingerprint())?;
    model.set_flip_average(shared.cfg.serving.flip_average);
    model.set_attribute_weight(shared.cfg.serving.attribute_weight);
    Ok((model, tokenizer, ck.meta.step))
}

/// Samples with their decoded pixels at the preset's size.
pub(super) fn loaded(
    shared: &Shared,
    model: &Encoder,
    filter: impl Fn(&crate::base::store::SampleMeta) -> bool,
) -> Vec<(crate::base::store::SampleMeta, Loaded)> {
    let p = model.preset();
    shared
        .store
        .metas()
        .into_iter()
        .filter(|m| filter(m))
        .filter_map(|m| {
            let s = shared.store.get(&m.id).ok().flatten()?;
            let img = decode(&s.jpeg, &IntakeLimits::default()).ok()?;
            let l = Loaded {
                rgb: pixels_at(&img, p.image_height as u32, p.image_width as u32),
                captions: s.meta.captions.clone(),
                person: m.person_id.clone(),
                camera: m.camera_id.clone(),
                attributes: None,
            };
            Some((m, l))
        })
        .collect()
}

/// Probe-split metrics of an encoder (empty when the probe split has too few samples).
pub(super) fn probe_metrics(
    shared: &Shared,
    model: &Encoder,
    tokenizer: &Tokenizer,
) -> BTreeMap<String, f64> {
    let probe: Vec<Loaded> = loaded(shared, model, |m| m.probe && !m.captions.is_empty())
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    let mut out = BTreeMap::new();
    if probe.len() < 2 {
        return out;
    }
    let lm = LoadedModel {
        model: model.clone(),
        tokenizer: tokenizer.clone(),
        source: serde_json::Value::Null,
        checkpoint: None,
    };
    if let Ok((reid, text)) = evaluate_model(&lm, &probe, &probe, 10) {
        if reid.valid_queries > 0 {
            out.insert("rank1".into(), reid.cmc[0]);
            out.insert("mAP".into(), reid.map);
        }
        out.insert("text_r1".into(), text.r1);
        out.insert("probe_samples".into(), probe.len() as f64);
    }
    out
}

pub(super) fn embed_rgb(model: &Encoder, rgb: &[Vec<u8>]) -> Vec<Vec<f32>> {
    let p = model.preset();
    let flat: Vec<f32> = rgb
        .iter()
        .flat_map(|x| normalize_rgb(x, p.image_height, p.image_width))
        .collect();
    let e = model.embed_images(&flat, 64);
    (0..e.rows).map(|r| e.row(r).to_vec()).collect()
}

pub(super) fn is_gallery(m: &crate::base::store::SampleMeta) -> bool {
    matches!(m.purpose, Purpose::Gallery | Purpose::Both)
}

/// Builds a serving version from stored embeddings.
#[allow(clippy::too_many_arguments)]
pub(super) fn build(
    version: u64,
    step: u64,
    gallery_version: u64,
    model: Arc<Encoder>,
    tokenizer: Arc<Tokenizer>,
    embeddings: Vec<(String, Vec<f32>)>,
    metas: &HashMap<String, crate::base::store::SampleMeta>,
    metrics: BTreeMap<String, f64>,
) -> Serving {
    let mut index = Index::new(model.preset().index_dim());
    let mut rows = Vec::new();
    let mut cameras = HashMap::new();
    for (id, e) in embeddings {
        let Some(m) = metas.get(&id) else { continue };
        if e.len() != index.dim() {
            continue;
        }
        let cam = m.camera_id.as_ref().map(|c| {
            let n = cameras.len() as u32;
            *cameras.entry(c.clone()).or_insert(n)
        });
        index.push(&e, cam);
        rows.push(GalleryRow {
            id,
            person_id: m.person_id.clone(),
            camera_id: m.camera_id.clone(),
        });
    }
    Serving {
        version,
        step,
        gallery_version,
        model,
        tokenizer,
        index,
        rows,
        cameras,
        metrics,
    }
}
