//! The `/status` document, the checkpoint list and the readiness verdict.

use super::figures::StorageFigures;
use crate::base::error::Result;
use crate::daemon::Shared;

/// Ready = consuming from the broker (a server: following the logs), storage writable, and
/// (when serving) a model serving.
pub fn readiness(shared: &Shared) -> (bool, Vec<String>) {
    let st = shared.stats().clone();
    let mut reasons = Vec::new();
    if shared.cfg.role == crate::base::config::Role::Server {
        if !st.follower.connected {
            reasons.push(format!(
                "not following the logs: {}",
                st.follower.error.as_deref().unwrap_or("not connected yet")
            ));
        } else if !st.follower.caught_up {
            reasons.push(match (st.follower.heads, st.follower.gallery_lag) {
                (None, _) => "catching up: no announcement of the logs' heads heard yet".into(),
                (Some(_), Some(lag)) if lag > 0 => {
                    format!("catching up: {lag} gallery entries behind the trainer")
                }
                _ => "catching up: the trainer's latest model is not loaded yet".into(),
            });
        }
    } else if !st.consuming {
        reasons.push(
            st.ingest_paused
                .clone()
                .unwrap_or_else(|| "not connected to the broker".into()),
        );
    }
    if let Some(e) = &st.storage_error {
        reasons.push(format!("storage: {e}"));
    }
    if let Some(s) = shared.http_cache.stuck_for() {
        reasons.push(format!(
            "storage: the state folder has not answered for {s} s"
        ));
    }
    if shared.cfg.serving.enabled && shared.serving_snapshot().is_none() {
        reasons.push("no model serving yet".into());
    }
    (reasons.is_empty(), reasons)
}

/// The status document: live figures from memory, storage figures as read (`stale` says why
/// and how old when the state folder did not answer).
pub fn status(shared: &Shared, figures: &StorageFigures, stale: Option<&str>) -> serde_json::Value {
    let counts = figures.counts;
    let stats = shared.stats().clone();
    let latest = figures.latest;
    // One snapshot: the figures describe one serving version.
    let serving = shared.serving_snapshot();
    let mut ingest = serde_json::json!({
        "consuming": stats.consuming,
        "paused": stats.ingest_paused,
        "storage_error": stats.storage_error,
        "rejected": stats.rejected,
        "dead_lettered": stats.dead_lettered,
    });
    for c in crate::daemon::stats::COUNTERS {
        ingest[c.key] = serde_json::json!((c.read)(&stats));
    }
    serde_json::json!({
        "state_dir": shared.cfg.state.dir,
        "samples": {
            "total": figures.total,
            "by_purpose": counts,
            "uncaptioned": figures.uncaptioned,
        },
        "storage": {
            "responding": stale.is_none(),
            "stale": stale,
        },
        "ingest": ingest,
        "trainer": stats.trainer,
        "serving": {
            "version": serving.as_ref().map(|s| s.version),
            "step": serving.as_ref().map(|s| s.step),
            "gallery_version": serving.as_ref().map(|s| s.gallery_version),
            "gallery_size": serving.as_ref().map_or(0, |s| s.rows.len()),
            "metrics": serving.as_ref().map(|s| s.metrics.clone()),
            "promotions": stats.serving.promotions,
            "refused": stats.serving.refused,
            "answered": stats.serving.answered,
            "errors": stats.serving.errors,
        },
        "latest_checkpoint": latest,
        "restarts": stats.restarts,
        "role": shared.cfg.role.as_str(),
        "follower": stats.follower,
        "streams": {
            "enabled": shared.cfg.streams.enabled,
            "models_log": shared.cfg.streams.models_log,
            "models_logged": stats.models_logged,
            "gallery_log": shared.cfg.streams.gallery_log,
            "gallery_logged_seq": stats.gallery_logged_seq,
            "gallery_entries_logged": stats.gallery_entries_logged,
            "manifest_log": shared.cfg.streams.manifest_log,
            "snapshot": stats.snapshot,
            "error": stats.models_log_error,
        },
    })
}

/// The checkpoint list (oldest first; corrupt ones with their error).
///
/// # Errors
/// A storage error.
pub fn checkpoints(shared: &Shared) -> Result<serde_json::Value> {
    list_checkpoints(&shared.state)
}

/// The checkpoint list of a state folder.
///
/// # Errors
/// A storage error.
pub fn list_checkpoints(state: &crate::base::state::State) -> Result<serde_json::Value> {
    let latest = state.latest_version()?;
    let serving = state.serving_version()?;
    let pinned = state.pinned()?;
    let list: Vec<serde_json::Value> = state
        .list()
        ?
        .into_iter()
        .map(|r| match r {
            Ok(m) => {
                let evaluation = state.evaluation(m.version).ok().flatten();
                serde_json::json!({"version": m.version, "step": m.step, "preset": m.preset, "images_seen": m.images_seen, "created_unix": m.created_unix, "metrics": m.metrics, "probe": evaluation, "serving": serving == Some(m.version), "pinned": pinned == Some(m.version)})
            }
            Err(e) => serde_json::json!({"error": e.to_string()}),
        })
        .collect();
    Ok(
        serde_json::json!({"latest": latest, "serving": serving, "pinned": pinned, "checkpoints": list}),
    )
}
