//! The HTTP listener (localhost by default): status and admin endpoints.
//!
//! A deliberately small HTTP/1.1 server on tokio (one request per connection): `GET /healthz`,
//! `/readyz`, `/metrics` (Prometheus text), `/status`, `/checkpoints`, `/export`, and the admin
//! `POST /rollback`, `/unpin`, `/forget`. The same JSON is what `plipd status` and `plipd
//! checkpoints` print; their client is [`crate::base::client`].
//!
//! - this file: binding, connections, routing and the admin actions;
//! - [`figures`]: the storage figures every document reads, with a cache that keeps the
//!   endpoints answering while the state folder is stuck;
//! - [`status`]: the `/status` and `/checkpoints` documents and `/readyz`;
//! - [`metrics`]: the Prometheus text of `/metrics`.

mod figures;
mod metrics;
mod status;

pub use figures::{Cache, StorageFigures};
pub use metrics::metrics;
pub use status::{checkpoints, list_checkpoints, readiness, status};

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
        ("POST", "/forget") if shared.cfg.role == crate::base::config::Role::Server => Body::Json(
            409,
            error(
                "this server follows the trainer's gallery log and holds no samples of its own: \
                 send forget to the trainer (role trainer or all); the tombstone reaches every \
                 server through the log",
            ),
        ),
        ("POST", "/forget") => match query_param(query, "person").map(unescape) {
            Some(p) if !p.is_empty() => {
                // With the logs on, the tombstone naming exactly the samples deleted is queued
                // first: a crash after it re-sends a tombstone for samples already gone, never
                // leaves replicas holding them.
                let r = if shared.cfg.streams.enabled {
                    let (ids, before_seq) = shared.store.person_ids(&p);
                    shared
                        .state
                        .add_tombstone(&p, &ids, before_seq)
                        .map_err(Error::from)
                        .and_then(|()| shared.store.forget_ids(&ids))
                } else {
                    shared.store.forget_person(&p)
                }
                .and_then(|ids| {
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
        figures::figures(&shared).await
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
