//! The HTTP listener (localhost by default): status and admin endpoints as JSON.
//!
//! A deliberately small HTTP/1.1 server on tokio (one request per connection, `GET` only so
//! far): `GET /status`, `GET /checkpoints`, `GET /healthz`. The same JSON is what `plipd status`
//! and `plipd checkpoints` print.

use super::Shared;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Binds the listener (at start, so a taken port fails the start with its address).
///
/// # Errors
/// The address is invalid or taken.
pub async fn bind(addr: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("http.listen = {addr:?}: cannot listen: {e}"))
}

/// Serves until shutdown.
///
/// # Errors
/// The listener itself failed.
pub async fn serve(shared: Arc<Shared>, listener: Arc<TcpListener>) -> Result<(), String> {
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
            Err(e) => return Err(format!("accept failed: {e}")),
        }
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
            return respond(&mut stream, 431, &error("request headers too large")).await;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" {
        return respond(&mut stream, 405, &error("only GET is supported")).await;
    }
    let body = match path {
        "/healthz" => Ok(serde_json::json!({"ok": true})),
        "/status" => {
            let s = shared.clone();
            tokio::task::spawn_blocking(move || status(&s))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        }
        "/checkpoints" => {
            let s = shared.clone();
            tokio::task::spawn_blocking(move || checkpoints(&s))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        }
        _ => return respond(&mut stream, 404, &error("no such endpoint")).await,
    };
    match body {
        Ok(v) => respond(&mut stream, 200, &v).await,
        Err(e) => respond(&mut stream, 500, &error(&e)).await,
    }
}

fn error(message: &str) -> serde_json::Value {
    serde_json::json!({"error": {"code": "http", "message": message}})
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    body: &serde_json::Value,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    };
    let body = format!("{body}\n");
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The status document.
///
/// # Errors
/// A storage error.
pub fn status(shared: &Shared) -> Result<serde_json::Value, String> {
    let counts = shared.store.counts();
    let stats = shared.stats().clone();
    let latest = shared.state.latest_version().map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "state_dir": shared.cfg.state.dir,
        "samples": {
            "total": shared.store.len(),
            "by_purpose": counts,
            "uncaptioned": shared.store.uncaptioned_len(),
        },
        "ingest": {
            "consuming": stats.consuming,
            "paused": stats.ingest_paused,
            "storage_error": stats.storage_error,
            "connections": stats.connections,
            "deliveries": stats.deliveries,
            "stored": stats.stored,
            "duplicates": stats.duplicates,
            "rejected": stats.rejected,
            "dead_lettered": stats.dead_lettered,
            "replies": stats.replies,
            "captioned": stats.captioned,
            "evicted": stats.evicted,
        },
        "trainer": stats.trainer,
        "serving": {
            "version": shared.serving_snapshot().map(|s| s.version),
            "step": shared.serving_snapshot().map(|s| s.step),
            "gallery_version": shared.serving_snapshot().map(|s| s.gallery_version),
            "gallery_size": shared.serving_snapshot().map_or(0, |s| s.rows.len()),
            "metrics": shared.serving_snapshot().map(|s| s.metrics.clone()),
            "promotions": stats.serving.promotions,
            "refused": stats.serving.refused,
            "answered": stats.serving.answered,
            "errors": stats.serving.errors,
        },
        "latest_checkpoint": latest,
        "restarts": stats.restarts,
    }))
}

/// The checkpoint list (oldest first; corrupt ones with their error).
///
/// # Errors
/// A storage error.
pub fn checkpoints(shared: &Shared) -> Result<serde_json::Value, String> {
    list_checkpoints(&shared.state)
}

/// The checkpoint list of a state folder.
///
/// # Errors
/// A storage error.
pub fn list_checkpoints(state: &crate::state::State) -> Result<serde_json::Value, String> {
    let latest = state.latest_version().map_err(|e| e.to_string())?;
    let list: Vec<serde_json::Value> = state
        .list()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|r| match r {
            Ok(m) => serde_json::json!({"version": m.version, "step": m.step, "preset": m.preset, "images_seen": m.images_seen, "created_unix": m.created_unix, "metrics": m.metrics}),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        })
        .collect();
    Ok(serde_json::json!({"latest": latest, "checkpoints": list}))
}

/// A `GET` to a running daemon's listener; `None` when nothing listens there.
pub fn get(addr: &str, path: &str) -> Option<Result<serde_json::Value, String>> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    if let Err(e) = s.write_all(req.as_bytes()) {
        return Some(Err(e.to_string()));
    }
    let mut out = String::new();
    if let Err(e) = s.read_to_string(&mut out) {
        return Some(Err(e.to_string()));
    }
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Some(serde_json::from_str(body).map_err(|e| format!("bad answer from {addr}: {e}")))
}
