//! The swapper: promotes checkpoints through the gate (load before unload) and keeps the
//! gallery current.

use crate::base::error::Result;

use super::*;
use crate::daemon::broker;
use crate::daemon::Shared;
use lapin::options::ConfirmSelectOptions;
use lapin::types::ShortString;
use lapin::BasicProperties;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
/// The swapper: promotes checkpoints and keeps the gallery current. Blocking work runs on the
/// blocking pool; the old version serves throughout.
pub async fn swapper(shared: Arc<Shared>) -> Result<()> {
    let mut refused: HashSet<u64> = HashSet::new();
    let mut gallery_seen: HashSet<String> = HashSet::new();
    // After a restart: the stored serving version and its gallery, without re-embedding.
    let restored = {
        let s = shared.clone();
        tokio::task::spawn_blocking(move || restore(&s)).await?
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
        let outcome =
            tokio::task::spawn_blocking(move || step(&s, &refused_now, &seen, unchanged)).await?;
        match outcome {
            Ok(Step::Idle) => {}
            Ok(Step::Refused(v)) => {
                refused.insert(v);
            }
            Ok(Step::Swapped(v)) => {
                gallery_seen = v.rows.iter().map(|r| r.id.clone()).collect();
                let promoted = v.version;
                let announce = serde_json::json!({"version": v.version, "step": v.step, "metrics": v.metrics, "promoted_at": crate::base::state::now_unix(), "gallery_version": v.gallery_version, "gallery": v.rows.len()});
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

fn restore(shared: &Shared) -> Result<Option<Serving>> {
    let Some(version) = shared.state.serving_version()? else {
        return Ok(None);
    };
    let (model, tokenizer, step) = load_version(shared, version)?;
    let embeddings = shared.state.gallery(version)?;
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
) -> Result<Step> {
    let current = shared.serving_snapshot();
    let latest = shared.state.latest_version()?;
    let pinned = shared.state.pinned()?;
    let (candidate, gated) = match super::gate::candidate(
        current.as_ref().map(|c| c.version),
        latest,
        pinned,
        refused,
    ) {
        Some((v, gated)) => (Some(v), gated),
        None => (None, false),
    };
    // Nothing to promote and nothing stored or forgotten since the last look: no scan.
    if candidate.is_none() && (current.is_none() || store_unchanged) {
        return Ok(Step::Idle);
    }
    let metas: HashMap<String, crate::base::store::SampleMeta> = shared
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
            let margin = shared.cfg.serving.gate_margin;
            if let Some(r) = super::gate::refuses(gate.as_str(), &metrics, &cur.metrics, margin) {
                let doc = serde_json::json!({"version": v, "gate": gate.as_str(), "candidate": r.candidate, "serving": r.serving, "serving_version": cur.version});
                let _ = shared.state.record_evaluation(v, &serde_json::json!({"metrics": metrics, "promoted": false, "against": cur.version}));
                tracing::info!(version = v, decision = %doc, "refused");
                shared.stats().serving.refused += 1;
                return Ok(Step::Refused(v));
            }
        }
        // Re-embed the whole gallery with the candidate while the old version serves.
        let gallery = loaded(shared, &model, is_gallery);
        let rgb: Vec<Vec<u8>> = gallery.iter().map(|(_, l)| l.rgb.clone()).collect();
        let emb = embed_rgb(&model, &rgb);
        let embeddings: Vec<(String, Vec<f32>)> =
            gallery.iter().map(|(m, _)| m.id.clone()).zip(emb).collect();
        shared.state.set_serving(v, &embeddings)?;
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
    let new: Vec<&crate::base::store::SampleMeta> = metas
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
    shared.state.add_gallery(cur.version, &added)?;
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

async fn announce_model(shared: &Shared, body: &serde_json::Value) -> Result<()> {
    let conn = broker::connect(&shared.cfg.broker).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let props = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2);
    let r = broker::publish_confirmed(
        &ch,
        &shared.cfg.topology.models_exchange,
        "",
        body.to_string().as_bytes(),
        props,
    )
    .await;
    broker::close(&conn, "announced").await;
    r
}
