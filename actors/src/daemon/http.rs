//! The HTTP listener (localhost by default): status and admin endpoints as JSON.
//!
//! A deliberately small HTTP/1.1 server on tokio (one request per connection): `GET /healthz`,
//! `/readyz`, `/metrics` (Prometheus text), `/status`, `/checkpoints`, `/export`, and the admin
//! `POST /rollback`, `/unpin`, `/forget`. The same JSON is what `plipd status` and `plipd
//! checkpoints` print; their client is [`crate::base::client`].

use crate::base::error::{Error, Result};

use super::Shared;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Binds the listener (at start, so a taken port fails the start with its address).
///
/// # Errors
/// The address is invalid or taken.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("http.listen = {addr:?}: cannot listen: {e}")))
}

/// Serves until shutdown.
///
/// # Errors
/// The listener itself failed.
pub async fn serve(shared: Arc<Shared>, listener: Arc<TcpListener>) -> Result<()> {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shared.stopped() => return Ok(()),
        };
        if shared.stopping() {
            return Ok(());
        }
        match accepted {
            Ok((stream, _)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(30), connection(shared, stream))
                            .await;
                });
            }
            Err(e) => return Err(Error::Internal(format!("accept failed: {e}"))),
        }
    }
}

/// What `/status` and `/metrics` read from the state folder.
#[derive(Debug, Clone, Default)]
pub struct StorageFigures {
    pub counts: crate::base::store::Counts,
    pub total: usize,
    pub uncaptioned: usize,
    pub latest: Option<u64>,
}

fn read_figures(shared: &Shared) -> Result<StorageFigures> {
    Ok(StorageFigures {
        counts: shared.store.counts(),
        total: shared.store.len(),
        uncaptioned: shared.store.uncaptioned_len(),
        latest: shared.state.latest_version()?,
    })
}

/// How long an endpoint waits for the state folder before answering from [`Cache`].
const STORAGE_ANSWER: Duration = Duration::from_secs(2);

/// The last figures read from the state folder, and whether a read is stuck: while one is,
/// `/status` and `/metrics` answer at once from the last figures (marked stale) and `/readyz`
/// says 503 — no request waits on a blocked storage call, and no second one is started.
#[derive(Default)]
pub struct Cache {
    figures: std::sync::Mutex<Option<(std::time::Instant, StorageFigures)>>,
    stuck_since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Cache {
    /// Seconds the outstanding storage read has been stuck, if one is.
    pub fn stuck_for(&self) -> Option<u64> {
        self.stuck_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed().as_secs())
    }

    fn last(&self) -> (StorageFigures, Option<u64>) {
        match &*self.figures.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((t, f)) => (f.clone(), Some(t.elapsed().as_secs())),
            None => (StorageFigures::default(), None),
        }
    }
}

/// Storage figures: fresh when the state folder answers within [`STORAGE_ANSWER`], otherwise
/// the last ones with a note saying how old they are.
async fn figures(shared: &Arc<Shared>) -> (StorageFigures, Option<String>) {
    let cache = &shared.http_cache;
    let stale = |why: String| {
        let (f, age) = cache.last();
        let note = match age {
            Some(a) => format!("{why}; storage figures from {a} s ago"),
            None => format!("{why}; no storage figures yet"),
        };
        (f, Some(note))
    };
    if let Some(s) = cache.stuck_for() {
        return stale(format!("the state folder has not answered for {s} s"));
    }
    let s = shared.clone();
    let read = tokio::task::spawn_blocking(move || {
        let r = read_figures(&s);
        let cache = &s.http_cache;
        if let Ok(f) = &r {
            *cache.figures.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((std::time::Instant::now(), f.clone()));
        }
        *cache.stuck_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
        r
    });
    match tokio::time::timeout(STORAGE_ANSWER, read).await {
        Ok(Ok(Ok(f))) => (f, None),
        Ok(Ok(Err(e))) => stale(format!("reading the state folder failed: {e}")),
        Ok(Err(e)) => stale(format!("reading the state folder failed: {e}")),
        Err(_) => {
            cache
                .stuck_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| {
                    std::time::Instant::now()
                        .checked_sub(STORAGE_ANSWER)
                        .unwrap_or_else(std::time::Instant::now)
                });
            stale(format!(
                "the state folder did not answer within {} s",
                STORAGE_ANSWER.as_secs()
            ))
        }
    }
}

/// A response body.
enum Body {
    Json(u16, serde_json::Value),
    Bytes(Vec<u8>),
    Text(String),
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Percent-decoding of a query value (`+` is a space).
fn unescape(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(
    shared: &Shared,
    method: &str,
    path: &str,
    query: &str,
    figures: (StorageFigures, Option<String>),
) -> Body {
    let ok = |v: Result<serde_json::Value>| match v {
        Ok(v) => Body::Json(200, v),
        Err(e) => Body::Json(500, error(&e.to_string())),
    };
    let bad = |m: &str| Body::Json(400, error(m));
    let version = query_param(query, "version").map(|v| v.parse::<u64>());
    match (method, path) {
        ("GET", "/healthz") => Body::Json(200, serde_json::json!({"ok": true})),
        ("GET", "/readyz") => {
            let (ready, reasons) = readiness(shared);
            Body::Json(
                if ready { 200 } else { 503 },
                serde_json::json!({"ready": ready, "reasons": reasons}),
            )
        }
        ("GET", "/metrics") => Body::Text(metrics(shared, &figures.0, figures.1.is_none())),
        ("GET", "/status") => Body::Json(200, status(shared, &figures.0, figures.1.as_deref())),
        ("GET", "/checkpoints") => ok(checkpoints(shared)),
        ("GET", "/export") => {
            let v = match version {
                Some(Ok(v)) => Some(v),
                Some(Err(_)) => return bad("version must be a number"),
                None => None,
            };
            match crate::base::model::export_bytes(&shared.state, v) {
                Ok((bytes, _)) => Body::Bytes(bytes),
                Err(e) => Body::Json(404, error(&e.to_string())),
            }
        }
        ("POST", "/rollback") => match version {
            Some(Ok(v)) => match shared.state.set_pinned(Some(v)) {
                Ok(()) => {
                    tracing::info!(version = v, "pinned");
                    Body::Json(200, serde_json::json!({"pinned": v}))
                }
                Err(e) => Body::Json(404, error(&e.to_string())),
            },
            _ => bad("POST /rollback?version=V"),
        },
        ("POST", "/unpin") => match shared.state.set_pinned(None) {
            Ok(()) => {
                tracing::info!("unpinned");
                Body::Json(200, serde_json::json!({"pinned": null}))
            }
            Err(e) => Body::Json(500, error(&e.to_string())),
        },
        ("POST", "/forget") => match query_param(query, "person").map(unescape) {
            Some(p) if !p.is_empty() => {
                let r = shared.store.forget_person(&p).and_then(|ids| {
                    shared.state.remove_gallery(&ids)?;
                    Ok(ids)
                });
                match r {
                    Ok(ids) => {
                        shared
                            .forgets
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        shared
                            .forget_rows
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(p.clone());
                        tracing::info!(
                            person = %plip_ingest::dead_letter::clip(
                                &p,
                                plip_ingest::dead_letter::MAX_ECHO_BYTES
                            ),
                            samples = ids.len(),
                            "forgot"
                        );
                        Body::Json(
                            200,
                            serde_json::json!({"person": p, "samples_removed": ids.len(), "note": "samples and gallery entries are deleted and the person's identity-classifier row is zeroed at the trainer's next step; the rest of the trained weights cannot unlearn"}),
                        )
                    }
                    Err(e) => Body::Json(500, error(&e.to_string())),
                }
            }
            _ => bad("POST /forget?person=PERSON_ID"),
        },
        (
            _,
            "/healthz" | "/status" | "/checkpoints" | "/export" | "/rollback" | "/unpin"
            | "/forget",
        ) => Body::Json(405, error("method not allowed")),
        _ => Body::Json(404, error("no such endpoint")),
    }
}

async fn connection(shared: Arc<Shared>, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 16 * 1024 {
            return respond(
                &mut stream,
                Body::Json(431, error("request headers too large")),
            )
            .await;
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let (path, query) = (path.to_string(), query.to_string());
    let figures = if method == "GET" && matches!(path.as_str(), "/status" | "/metrics") {
        figures(&shared).await
    } else {
        (StorageFigures::default(), None)
    };
    // Routes that need only memory answer at once; the others run on the blocking pool.
    let body = if method == "GET"
        && matches!(
            path.as_str(),
            "/healthz" | "/readyz" | "/status" | "/metrics"
        ) {
        route(&shared, &method, &path, &query, figures)
    } else {
        tokio::task::spawn_blocking(move || route(&shared, &method, &path, &query, figures))
            .await
            .unwrap_or_else(|e| Body::Json(500, error(&e.to_string())))
    };
    respond(&mut stream, body).await
}

fn error(message: &str) -> serde_json::Value {
    serde_json::json!({"error": {"code": "http", "message": message}})
}

async fn respond(stream: &mut TcpStream, body: Body) -> std::io::Result<()> {
    let (code, ctype, bytes) = match body {
        Body::Json(code, v) => (code, "application/json", format!("{v}\n").into_bytes()),
        Body::Bytes(b) => (200, "application/octet-stream", b),
        Body::Text(t) => (200, "text/plain; version=0.0.4", t.into_bytes()),
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        bytes.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&bytes).await?;
    stream.shutdown().await
}

/// Ready = consuming from the broker, storage writable, and (when serving) a model serving.
pub fn readiness(shared: &Shared) -> (bool, Vec<String>) {
    let st = shared.stats().clone();
    let mut reasons = Vec::new();
    if !st.consuming {
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

/// Prometheus text exposition of the daemon's counters (names prefixed `plip_`).
pub fn metrics(shared: &Shared, figures: &StorageFigures, fresh: bool) -> String {
    use std::fmt::Write;
    let st = shared.stats().clone();
    let counts = figures.counts;
    let serving = shared.serving_snapshot();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    let by = |label: &str, m: &std::collections::BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| (format!("{{{label}=\"{k}\"}}"), *v as f64))
            .collect::<Vec<_>>()
    };
    metric(
        "plip_broker_connected",
        "gauge",
        "1 while consuming from the broker.",
        one(f64::from(u8::from(st.consuming))),
    );
    for c in super::stats::COUNTERS {
        metric(c.metric, "counter", c.help, one((c.read)(&st) as f64));
    }
    metric(
        "plip_ingest_rejected_total",
        "counter",
        "Images or messages refused, by code.",
        by("code", &st.rejected),
    );
    metric(
        "plip_dead_lettered_total",
        "counter",
        "Messages dead-lettered with a reason, by code.",
        by("code", &st.dead_lettered),
    );
    metric(
        "plip_storage_failing",
        "gauge",
        "1 while writes to the state folder fail.",
        one(f64::from(u8::from(st.storage_error.is_some()))),
    );
    metric(
        "plip_storage_responding",
        "gauge",
        "1 when the state folder answered this scrape's reads in time (0: the sample figures are the last known).",
        one(f64::from(u8::from(fresh))),
    );
    metric(
        "plip_samples",
        "gauge",
        "Stored samples by purpose (probe: set aside for evaluation).",
        vec![
            ("{purpose=\"train\"}".into(), counts.train as f64),
            ("{purpose=\"gallery\"}".into(), counts.gallery as f64),
            ("{purpose=\"both\"}".into(), counts.both as f64),
            ("{purpose=\"probe\"}".into(), counts.probe as f64),
        ],
    );
    metric(
        "plip_samples_uncaptioned",
        "gauge",
        "Samples waiting for captions.",
        one(figures.uncaptioned as f64),
    );
    let t = &st.trainer;
    metric(
        "plip_train_step",
        "gauge",
        "Optimiser steps taken.",
        one(t.step as f64),
    );
    metric(
        "plip_train_images_seen",
        "gauge",
        "Images trained on.",
        one(t.images_seen as f64),
    );
    let mut losses = Vec::new();
    for (task, v) in [
        ("total", t.loss),
        ("ivlc", t.ivlc),
        ("iap", t.iap),
        ("tic", t.tic),
        ("triplet", t.triplet),
        ("supcon", t.supcon),
        ("id", t.id),
        ("text_id", t.text_id),
        ("proto", t.proto),
        ("text_align", t.text_align),
        ("attr", t.attr),
        ("text_attr", t.text_attr),
        ("text_substeps", t.text_substeps),
    ] {
        if let Some(v) = v {
            losses.push((format!("{{task=\"{task}\"}}"), v));
        }
    }
    metric(
        "plip_train_loss",
        "gauge",
        "Loss of the last step, by task.",
        losses,
    );
    metric(
        "plip_train_steps_per_second",
        "gauge",
        "Training steps per second (recent).",
        one(t.steps_per_s.unwrap_or(0.0)),
    );
    metric(
        "plip_train_images_per_second",
        "gauge",
        "Training images per second (recent).",
        one(t.images_per_s.unwrap_or(0.0)),
    );
    metric(
        "plip_checkpoints_written_total",
        "counter",
        "Checkpoints written.",
        one(t.checkpoints_written as f64),
    );
    metric(
        "plip_promotions_total",
        "counter",
        "Checkpoints promoted to serving.",
        one(st.serving.promotions as f64),
    );
    metric(
        "plip_promotions_refused_total",
        "counter",
        "Checkpoints refused by the gate.",
        one(st.serving.refused as f64),
    );
    metric(
        "plip_serving_version",
        "gauge",
        "Checkpoint version serving (0: none).",
        one(serving.as_ref().map_or(0.0, |s| s.version as f64)),
    );
    metric(
        "plip_gallery_size",
        "gauge",
        "Gallery images searchable.",
        one(serving.as_ref().map_or(0.0, |s| s.rows.len() as f64)),
    );
    metric(
        "plip_reid_answered_total",
        "counter",
        "ReID requests answered with matches.",
        one(st.serving.answered as f64),
    );
    metric(
        "plip_reid_errors_total",
        "counter",
        "ReID requests answered with an error, by code.",
        by("code", &st.serving.errors),
    );
    let mut hist = Vec::new();
    let mut cum = 0u64;
    for (i, b) in super::LATENCY_BUCKETS.iter().enumerate() {
        cum += st.serving.latency_buckets.get(i).copied().unwrap_or(0);
        hist.push((format!("_bucket{{le=\"{b}\"}}"), cum as f64));
    }
    cum += st.serving.latency_buckets.last().copied().unwrap_or(0);
    hist.push(("_bucket{le=\"+Inf\"}".into(), cum as f64));
    hist.push(("_sum".into(), st.serving.latency_sum));
    hist.push(("_count".into(), st.serving.latency_count as f64));
    metric(
        "plip_reid_request_seconds",
        "histogram",
        "Time the daemon spent on a ReID request.",
        hist,
    );
    let restarts: u64 = st.restarts.values().sum();
    metric(
        "plip_child_restarts_total",
        "counter",
        "Supervised children restarted.",
        one(restarts as f64),
    );
    out
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
    for c in super::stats::COUNTERS {
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
