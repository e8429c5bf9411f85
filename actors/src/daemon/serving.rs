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

use super::Shared;
use crate::data::Loaded;
use crate::evaluate::{evaluate_model, LoadedModel};
use crate::index::Index;
use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use plip_ingest::dead_letter::{
    bounded_error, check_headers, dead_letter_properties, properties_without_headers,
};
use plip_ingest::image::{decode, pixels_at, IntakeLimits};
use plip_ingest::reid::{decode_request, Match, QueryKind, ReidErrorReply, ReidReply};
use plip_ingest::wire::{Code, Purpose, WireError};
use plip_model::batch::normalize_rgb;
use plip_model::weights::read_meta;
use plip_model::{DeviceSpec, Encoder, Tokenizer};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    fn camera_number(&self, name: &str) -> Option<u32> {
        self.cameras.get(name).copied()
    }
}

/// Loads checkpoint `version` of the state into an encoder.
fn load_version(shared: &Shared, version: u64) -> Result<(Encoder, Tokenizer, u64), String> {
    let ck = shared
        .state
        .checkpoint(version)
        .map_err(|e| e.to_string())?;
    let tokenizer = shared
        .state
        .tokenizer()
        .map_err(|e| e.to_string())?
        .ok_or("the state folder has no tokenizer")?;
    let preset = read_meta(&ck.weights).map_err(|e| e.to_string())?.preset;
    let spec = DeviceSpec::parse(&shared.cfg.serving.device)
        .map_err(|e| format!("serving.device: {e}"))?;
    let mut model = Encoder::new(spec, &preset, 0).map_err(|e| e.to_string())?;
    model
        .load_weights(&ck.weights, tokenizer.fingerprint())
        .map_err(|e| e.to_string())?;
    model.set_flip_average(shared.cfg.serving.flip_average);
    model.set_attribute_weight(shared.cfg.serving.attribute_weight);
    Ok((model, tokenizer, ck.meta.step))
}

/// Samples with their decoded pixels at the preset's size.
fn loaded(
    shared: &Shared,
    model: &Encoder,
    filter: impl Fn(&crate::store::SampleMeta) -> bool,
) -> Vec<(crate::store::SampleMeta, Loaded)> {
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
fn probe_metrics(shared: &Shared, model: &Encoder, tokenizer: &Tokenizer) -> BTreeMap<String, f64> {
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

fn embed_rgb(model: &Encoder, rgb: &[Vec<u8>]) -> Vec<Vec<f32>> {
    let p = model.preset();
    let flat: Vec<f32> = rgb
        .iter()
        .flat_map(|x| normalize_rgb(x, p.image_height, p.image_width))
        .collect();
    let e = model.embed_images(&flat, 64);
    (0..e.rows).map(|r| e.row(r).to_vec()).collect()
}

fn is_gallery(m: &crate::store::SampleMeta) -> bool {
    matches!(m.purpose, Purpose::Gallery | Purpose::Both)
}

/// Builds a serving version from stored embeddings.
#[allow(clippy::too_many_arguments)]
fn build(
    version: u64,
    step: u64,
    gallery_version: u64,
    model: Arc<Encoder>,
    tokenizer: Arc<Tokenizer>,
    embeddings: Vec<(String, Vec<f32>)>,
    metas: &HashMap<String, crate::store::SampleMeta>,
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

/// The swapper: promotes checkpoints and keeps the gallery current. Blocking work runs on the
/// blocking pool; the old version serves throughout.
pub async fn swapper(shared: Arc<Shared>) -> Result<(), String> {
    let mut refused: HashSet<u64> = HashSet::new();
    let mut gallery_seen: HashSet<String> = HashSet::new();
    // After a restart: the stored serving version and its gallery, without re-embedding.
    let restored = {
        let s = shared.clone();
        tokio::task::spawn_blocking(move || restore(&s))
            .await
            .map_err(|e| e.to_string())?
    };
    match restored {
        Ok(Some(v)) => {
            gallery_seen = v.rows.iter().map(|r| r.id.clone()).collect();
            tracing::info!(
                version = v.version,
                gallery = v.rows.len(),
                metrics = %serde_json::json!(v.metrics),
                "serving_restored"
            );
            *shared.serving.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(v));
        }
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "serving_restore_failed"),
    }
    let poll = Duration::from_millis(shared.cfg.serving.poll_ms.max(50));
    let mut last_mark: Option<(u64, u64)> = None;
    loop {
        if shared.sleep_or_stop(poll).await {
            return Ok(());
        }
        let s = shared.clone();
        let refused_now = refused.clone();
        let seen = gallery_seen.clone();
        let mark = (
            shared.store.last_seq(),
            shared.forgets.load(std::sync::atomic::Ordering::SeqCst),
        );
        let unchanged = last_mark == Some(mark);
        last_mark = shared.serving_snapshot().map(|_| mark);
        let outcome = tokio::task::spawn_blocking(move || step(&s, &refused_now, &seen, unchanged))
            .await
            .map_err(|e| e.to_string())?;
        match outcome {
            Ok(Step::Idle) => {}
            Ok(Step::Refused(v)) => {
                refused.insert(v);
            }
            Ok(Step::Swapped(v)) => {
                gallery_seen = v.rows.iter().map(|r| r.id.clone()).collect();
                let promoted = v.version;
                let announce = serde_json::json!({"version": v.version, "step": v.step, "metrics": v.metrics, "promoted_at": crate::state::now_unix(), "gallery_version": v.gallery_version, "gallery": v.rows.len()});
                let changed_model = shared.serving_version() != Some(promoted);
                *shared.serving.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::from(v));
                if changed_model {
                    shared.stats().serving.promotions += 1;
                    tracing::info!(
                        version = promoted,
                        announcement = %announce,
                        "promoted"
                    );
                    if let Err(e) = announce_model(&shared, &announce).await {
                        tracing::warn!(error = %e, "announce_failed");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "swap_failed"),
        }
    }
}

enum Step {
    Idle,
    Refused(u64),
    Swapped(Box<Serving>),
}

fn restore(shared: &Shared) -> Result<Option<Serving>, String> {
    let Some(version) = shared.state.serving_version().map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let (model, tokenizer, step) = load_version(shared, version)?;
    let embeddings = shared.state.gallery(version).map_err(|e| e.to_string())?;
    let metas: HashMap<String, _> = shared
        .store
        .metas()
        .into_iter()
        .map(|m| (m.id.clone(), m))
        .collect();
    // The gate compares candidates with the serving version's probe metrics: measure them.
    let metrics = probe_metrics(shared, &model, &tokenizer);
    Ok(Some(build(
        version,
        step,
        1,
        Arc::new(model),
        Arc::new(tokenizer),
        embeddings,
        &metas,
        metrics,
    )))
}

fn step(
    shared: &Shared,
    refused: &HashSet<u64>,
    seen: &HashSet<String>,
    store_unchanged: bool,
) -> Result<Step, String> {
    let current = shared.serving_snapshot();
    let latest = shared.state.latest_version().map_err(|e| e.to_string())?;
    let pinned = shared.state.pinned().map_err(|e| e.to_string())?;
    // A pinned version (rollback) is served as is; otherwise the newest checkpoint is a
    // candidate, gated on the probe metrics.
    let (candidate, gated) = match pinned {
        Some(p) => (
            Some(p).filter(|p| current.as_ref().is_none_or(|c| c.version != *p)),
            false,
        ),
        None => (
            latest.filter(|v| {
                !refused.contains(v) && current.as_ref().is_none_or(|c| *v > c.version)
            }),
            true,
        ),
    };
    // Nothing to promote and nothing stored or forgotten since the last look: no scan.
    if candidate.is_none() && (current.is_none() || store_unchanged) {
        return Ok(Step::Idle);
    }
    let metas: HashMap<String, crate::store::SampleMeta> = shared
        .store
        .metas()
        .into_iter()
        .map(|m| (m.id.clone(), m))
        .collect();
    if let Some(v) = candidate {
        let t = Instant::now();
        let (model, tokenizer, step) = load_version(shared, v)?;
        let metrics = probe_metrics(shared, &model, &tokenizer);
        let gate = &shared.cfg.serving.gate_metric;
        if let (Some(cur), true) = (&current, gated) {
            let (new, old) = (metrics.get(gate), cur.metrics.get(gate));
            if let (Some(new), Some(old)) = (new, old) {
                if *new < old - shared.cfg.serving.gate_margin {
                    let doc = serde_json::json!({"version": v, "gate": gate, "candidate": new, "serving": old, "serving_version": cur.version});
                    let _ = shared.state.record_evaluation(v, &serde_json::json!({"metrics": metrics, "promoted": false, "against": cur.version}));
                    tracing::info!(version = v, decision = %doc, "refused");
                    shared.stats().serving.refused += 1;
                    return Ok(Step::Refused(v));
                }
            }
        }
        // Re-embed the whole gallery with the candidate while the old version serves.
        let gallery = loaded(shared, &model, is_gallery);
        let rgb: Vec<Vec<u8>> = gallery.iter().map(|(_, l)| l.rgb.clone()).collect();
        let emb = embed_rgb(&model, &rgb);
        let embeddings: Vec<(String, Vec<f32>)> =
            gallery.iter().map(|(m, _)| m.id.clone()).zip(emb).collect();
        shared
            .state
            .set_serving(v, &embeddings)
            .map_err(|e| e.to_string())?;
        let gv = current.as_ref().map_or(1, |c| c.gallery_version + 1);
        let mut metrics = metrics;
        metrics.insert("swap_seconds".into(), t.elapsed().as_secs_f64());
        return Ok(Step::Swapped(Box::new(build(
            v,
            step,
            gv,
            Arc::new(model),
            Arc::new(tokenizer),
            embeddings,
            &metas,
            metrics,
        ))));
    }
    // New gallery samples: embed them with the serving encoder and publish a new gallery.
    let Some(cur) = current else {
        return Ok(Step::Idle);
    };
    let new: Vec<&crate::store::SampleMeta> = metas
        .values()
        .filter(|m| is_gallery(m) && !seen.contains(&m.id))
        .collect();
    let gone = cur.rows.iter().any(|r| !metas.contains_key(&r.id));
    if new.is_empty() && !gone {
        return Ok(Step::Idle);
    }
    let ids: HashSet<&str> = new.iter().map(|m| m.id.as_str()).collect();
    let fresh = loaded(shared, &cur.model, |m| ids.contains(m.id.as_str()));
    let rgb: Vec<Vec<u8>> = fresh.iter().map(|(_, l)| l.rgb.clone()).collect();
    let emb = embed_rgb(&cur.model, &rgb);
    let added: Vec<(String, Vec<f32>)> = fresh.iter().map(|(m, _)| m.id.clone()).zip(emb).collect();
    shared
        .state
        .add_gallery(cur.version, &added)
        .map_err(|e| e.to_string())?;
    let mut all: Vec<(String, Vec<f32>)> = (0..cur.rows.len())
        .map(|i| (cur.rows[i].id.clone(), cur.index.row(i).to_vec()))
        .collect();
    all.extend(added);
    Ok(Step::Swapped(Box::new(build(
        cur.version,
        cur.step,
        cur.gallery_version + 1,
        cur.model.clone(),
        cur.tokenizer.clone(),
        all,
        &metas,
        cur.metrics.clone(),
    ))))
}

async fn announce_model(shared: &Shared, body: &serde_json::Value) -> Result<(), String> {
    let conn = plip_ingest::amqp::connect_tls(
        &shared.cfg.broker.url,
        shared.cfg.broker.tls_ca_file.as_deref(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let props = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2);
    let r = super::ingest::publish_confirmed(
        &ch,
        &shared.cfg.topology.models_exchange,
        "",
        body.to_string().as_bytes(),
        props,
    )
    .await;
    let _ = conn.close(200, "announced".into()).await;
    r
}

/// The request consumer: runs until shutdown, reconnecting with backoff.
pub async fn requests(shared: Arc<Shared>) -> Result<(), String> {
    let min = Duration::from_millis(shared.cfg.broker.reconnect_min_ms.max(1));
    let max = Duration::from_millis(shared.cfg.broker.reconnect_max_ms.max(1));
    let mut delay = min;
    loop {
        if shared.stopping() {
            return Ok(());
        }
        let r = match plip_ingest::amqp::connect_tls(
            &shared.cfg.broker.url,
            shared.cfg.broker.tls_ca_file.as_deref(),
        )
        .await
        {
            Ok(conn) => {
                let r = serve(&shared, &conn).await;
                let _ = conn.close(200, "plipd reid closing".into()).await;
                r
            }
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    "reid_broker_lost"
                );
                if shared.sleep_or_stop(delay).await {
                    return Ok(());
                }
                delay = (delay * 2).min(max);
            }
        }
    }
}

async fn serve(shared: &Arc<Shared>, conn: &Connection) -> Result<(), String> {
    let frame_max = conn.configuration().frame_max();
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    shared
        .cfg
        .topology
        .declare(&ch)
        .await
        .map_err(|e| e.to_string())?;
    ch.basic_qos(shared.cfg.serving.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut consumer = ch
        .basic_consume(
            shared.cfg.topology.reid_queue.as_str().into(),
            format!("plipd-reid-{}", std::process::id()).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let (btx, brx) =
        tokio::sync::mpsc::channel::<Pending>(usize::from(shared.cfg.serving.prefetch).max(1));
    let batch_task = tokio::spawn(batcher(shared.clone(), brx));
    let _abort_batcher = AbortOnDrop(batch_task);
    let mut inflight = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            next = consumer.next() => match next {
                Some(Ok(d)) => {
                    let shared = shared.clone();
                    let ch = ch.clone();
                    let btx = btx.clone();
                    inflight.spawn(async move { answer(&shared, &ch, &btx, d, frame_max).await });
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the request consumer was cancelled".into()),
            },
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                if let Ok(Err(e)) = done {
                    return Err(e);
                }
            }
            _ = shared.stopped() => {
                while inflight.join_next().await.is_some() {}
                return Ok(());
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A validated request waiting for the batcher, and where its result goes.
type Pending = (
    plip_ingest::reid::ValidRequest,
    tokio::sync::oneshot::Sender<Answer>,
);

/// What a request gets: the version that answered and the matches, or an error.
type Answer = Result<(u64, u64, Vec<Match>), WireError>;

/// Collects the requests that arrive together (up to 64, waiting at most 2 ms after the first)
/// and answers them as one batch: one serving version, one embedding pass per kind, one search.
async fn batcher(shared: Arc<Shared>, mut rx: tokio::sync::mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + Duration::from_millis(2);
        while batch.len() < 64 {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                _ => break,
            }
        }
        let (reqs, txs): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let s = shared.clone();
        let answers = tokio::task::spawn_blocking(move || answer_batch(&s, reqs))
            .await
            .unwrap_or_else(|e| {
                vec![
                    Err(WireError {
                        code: Code::NoModel,
                        message: format!("the search failed: {e}")
                    });
                    txs.len()
                ]
            });
        for (tx, a) in txs.into_iter().zip(answers) {
            let _ = tx.send(a);
        }
    }
}

fn answer_batch(shared: &Shared, reqs: Vec<plip_ingest::reid::ValidRequest>) -> Vec<Answer> {
    let n = reqs.len();
    let Some(s) = shared.serving_snapshot() else {
        let e = WireError {
            code: Code::NoModel,
            message: "no encoder is serving yet (the first checkpoint has not been promoted)"
                .into(),
        };
        return vec![Err(e); n];
    };
    if s.index.is_empty() {
        let e = WireError {
            code: Code::EmptyGallery,
            message: "the gallery is empty: publish samples with purpose gallery or both".into(),
        };
        return vec![Err(e); n];
    }
    let p = s.model.preset();
    let dim = p.index_dim();
    let mut out: Vec<Option<Answer>> = (0..n).map(|_| None).collect();
    let mut emb: Vec<Option<Vec<f32>>> = (0..n).map(|_| None).collect();
    // Images: one pass.
    let images: Vec<usize> = (0..n)
        .filter(|&i| matches!(reqs[i].query, QueryKind::Image(_)))
        .collect();
    if !images.is_empty() {
        let flat: Vec<f32> = images
            .iter()
            .flat_map(|&i| match &reqs[i].query {
                QueryKind::Image(img) => {
                    // Straight to the model's input, as the gallery's stored images are.
                    let rgb = pixels_at(img, p.image_height as u32, p.image_width as u32);
                    normalize_rgb(&rgb, p.image_height, p.image_width)
                }
                QueryKind::Text(_) => Vec::new(),
            })
            .collect();
        let e = s.model.embed_images(&flat, 64);
        for (r, &i) in images.iter().enumerate() {
            emb[i] = Some(e.row(r).to_vec());
        }
    }
    // Texts: token limit per request, then one pass.
    let mut texts = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        if let QueryKind::Text(t) = &r.query {
            match s.tokenizer.pieces(t) {
                Ok(pieces) if pieces.len() <= p.text_len.saturating_sub(2) => {
                    texts.push((i, t.clone()))
                }
                Ok(pieces) => {
                    out[i] = Some(Err(WireError {
                        code: Code::TextTooLong,
                        message: format!(
                            "the text is {} tokens; at most {}",
                            pieces.len(),
                            p.text_len - 2
                        ),
                    }))
                }
                Err(e) => {
                    out[i] = Some(Err(WireError {
                        code: Code::TextTooLong,
                        message: e.to_string(),
                    }))
                }
            }
        }
    }
    if !texts.is_empty() {
        let strs: Vec<&str> = texts.iter().map(|(_, t)| t.as_str()).collect();
        match s.tokenizer.encode_batch(&strs, p.text_len) {
            Ok(tokens) => {
                let e = s.model.embed_texts(&tokens, 64);
                for (r, (i, _)) in texts.iter().enumerate() {
                    emb[*i] = Some(e.row(r).to_vec());
                }
            }
            Err(e) => {
                for (i, _) in &texts {
                    out[*i] = Some(Err(WireError {
                        code: Code::TextTooLong,
                        message: e.to_string(),
                    }));
                }
            }
        }
    }
    // One search for every embedded query, at the largest top_k; each keeps its own.
    let live: Vec<usize> = (0..n)
        .filter(|&i| out[i].is_none() && emb[i].is_some())
        .collect();
    if !live.is_empty() {
        let k = live.iter().map(|&i| reqs[i].top_k).max().unwrap_or(1);
        let mut q = Vec::with_capacity(live.len() * dim);
        let mut exclude = Vec::with_capacity(live.len());
        for &i in &live {
            q.extend_from_slice(emb[i].as_deref().unwrap_or(&[]));
            exclude.push(
                reqs[i]
                    .exclude_camera
                    .as_deref()
                    .map(|c| s.camera_number(c).unwrap_or(u32::MAX)),
            );
        }
        let hits = s.index.search(&q, &exclude, k);
        for (j, &i) in live.iter().enumerate() {
            let matches = hits[j]
                .iter()
                .take(reqs[i].top_k)
                .map(|h| Match {
                    id: s.rows[h.row].id.clone(),
                    person_id: s.rows[h.row].person_id.clone(),
                    camera_id: s.rows[h.row].camera_id.clone(),
                    score: h.score,
                })
                .collect();
            out[i] = Some(Ok((s.version, s.gallery_version, matches)));
        }
    }
    out.into_iter()
        .map(|a| {
            a.unwrap_or_else(|| {
                Err(WireError {
                    code: Code::NoModel,
                    message: "not answered".into(),
                })
            })
        })
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Answers one request (matches or an error) and acks it.
async fn answer(
    shared: &Arc<Shared>,
    ch: &Channel,
    batcher: &tokio::sync::mpsc::Sender<Pending>,
    d: lapin::message::Delivery,
    frame_max: u32,
) -> Result<(), String> {
    let t0 = Instant::now();
    let arrived = now_ms();
    // The header table is measured without recursion before anything copies it: a deep or
    // huge one is answered with its code and dead-lettered without it.
    let header_refusal = check_headers(d.properties.headers().as_ref()).err();
    let props = if header_refusal.is_some() {
        properties_without_headers(&d.properties)
    } else {
        d.properties.clone()
    };
    let request_id = props
        .correlation_id()
        .as_ref()
        .map(|c| c.as_str().to_string())
        .unwrap_or_else(|| format!("plipd-{}-{}", std::process::id(), d.delivery_tag));
    let shared2 = shared.clone();
    let body = d.data.clone();
    let ct = props
        .content_type()
        .as_ref()
        .map(|c| c.as_str().to_string());
    // The deadline: AMQP expiration (ms) or deadline_ms, counted from the message timestamp
    // (seconds) when there is one, otherwise from arrival.
    let sent_ms = props.timestamp().map(|s| s * 1000).unwrap_or(arrived);
    let expiration: Option<u64> = props
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse().ok());
    let refused = header_refusal.clone();
    let result = tokio::task::spawn_blocking(move || {
        if let Some(e) = refused {
            return Err(e);
        }
        let limits = shared2.cfg.serving.limits;
        let req = decode_request(ct.as_deref(), &body, &limits)?;
        let budget = req.deadline_ms.or(expiration);
        if let Some(b) = budget {
            if now_ms() > sent_ms.saturating_add(b) {
                return Err(WireError {
                    code: Code::DeadlinePassed,
                    message: format!(
                        "the request's deadline of {b} ms passed before it was served"
                    ),
                });
            }
        }
        Ok(req)
    })
    .await
    .map_err(|e| e.to_string())?;
    let result = match result {
        Ok(req) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if batcher.send((req, tx)).await.is_err() {
                return Err("the query batcher is gone".into());
            }
            rx.await
                .map_err(|_| "the query batcher dropped a request".to_string())?
        }
        Err(e) => Err(e),
    };
    let took_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let body = match &result {
        Ok((model_version, gallery_version, matches)) => serde_json::to_vec(&ReidReply {
            request_id: request_id.clone(),
            model_version: *model_version,
            gallery_version: *gallery_version,
            took_ms,
            matches: matches.clone(),
        }),
        Err(e) => serde_json::to_vec(&ReidErrorReply {
            request_id: request_id.clone(),
            error: bounded_error(e),
        }),
    }
    .map_err(|e| e.to_string())?;
    {
        let mut st = shared.stats();
        st.serving.observe(took_ms / 1000.0);
        match &result {
            Ok(_) => st.serving.answered += 1,
            Err(e) => {
                *st.serving
                    .errors
                    .entry(e.code.as_str().to_string())
                    .or_default() += 1
            }
        }
    }
    let out = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_correlation_id(request_id.as_str().into());
    let (exchange, key) = match props.reply_to() {
        Some(r) => (String::new(), r.as_str().to_string()),
        None => (shared.cfg.topology.results_exchange.clone(), String::new()),
    };
    super::ingest::publish_confirmed(ch, &exchange, &key, &body, out).await?;
    if let Some(e) = &header_refusal {
        let copy = dead_letter_properties(&d.properties, e, &[], frame_max);
        super::ingest::publish_confirmed(ch, &shared.cfg.topology.dlx_exchange, "", &d.data, copy)
            .await?;
        tracing::warn!(code = e.code.as_str(), reason = %e.message, "request_dead_lettered");
    }
    d.acker
        .ack(BasicAckOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
