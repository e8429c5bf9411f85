//! Gallery snapshots and the manifest: what keeps a new server's replay bounded once
//! retention removes the logs' oldest segments. The trainer appends a full copy of the gallery
//! between two markers, finds where it begins (a stream's offsets are neither returned to a
//! publisher nor contiguous: it reads the begin marker back from the stream's last chunk right
//! after its confirm), and appends a manifest entry naming that offset and the latest model
//! version's; a server starting on an empty state
//! folder reads the last manifest and starts there.

use super::{additions, as_u64, entry_kind, marker, publish_all, GALLERY_BATCH, GALLERY_ENTRIES};
use crate::base::config::StreamsConfig;
use crate::base::error::{Error, Result};
use crate::daemon::Shared;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Channel;
use std::sync::Arc;
use std::time::Duration;

/// Meta keys of the snapshots: bytes appended to the gallery log since the last snapshot
/// ended, when the snapshot clock started (the last snapshot, or the first entry), the last
/// snapshot's size, and the manifest as last written (JSON).
const SINCE_SNAPSHOT_BYTES: &str = "gallery_bytes_since_snapshot";
const SNAPSHOT_CLOCK: &str = "gallery_snapshot_clock_unix";
const SNAPSHOT_BYTES: &str = "gallery_snapshot_bytes";
const MANIFEST: &str = "logs_manifest";
/// Meta key of when the serving version was last appended to the models log.
pub(super) const MODEL_LOGGED_UNIX: &str = "model_logged_unix";

/// Counts `bytes` appended to the gallery log since the last snapshot, and starts the snapshot
/// clock at the first entry.
pub(super) fn count_since_snapshot(shared: &Shared, bytes: u64) -> Result<()> {
    let st = &shared.state;
    let since = st.meta_u64(SINCE_SNAPSHOT_BYTES)?.unwrap_or(0);
    st.set_meta_u64(SINCE_SNAPSHOT_BYTES, since + bytes)?;
    if st.meta_u64(SNAPSHOT_CLOCK)?.is_none() {
        st.set_meta_u64(SNAPSHOT_CLOCK, crate::base::state::now_unix())?;
    }
    Ok(())
}

/// Where a new server starts: the latest complete gallery snapshot and the latest model
/// version, each at the offset of its first entry in its log. Appended to
/// `streams.manifest_log` whenever either changes; a server reads the last one.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub gallery: Option<SnapshotRef>,
    pub model: Option<ModelRef>,
}

/// A complete snapshot in the gallery log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotRef {
    /// The snapshot's id: its begin marker's ordinal.
    pub snapshot: u64,
    /// The stream offset of the begin marker.
    pub offset: u64,
    /// Gallery samples in it.
    pub samples: u64,
    /// Bytes of image data in it.
    pub bytes: u64,
    /// When it was written (the trainer's clock).
    pub written_unix: u64,
}

/// A model version in the models log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelRef {
    pub version: u64,
    /// The stream offset of its first chunk.
    pub offset: u64,
    pub chunks: u64,
}

/// The manifest as last written by this trainer.
pub fn stored_manifest(shared: &Shared) -> Manifest {
    shared
        .state
        .meta_bytes(MANIFEST)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// A consumer of `stream` from `at` (an offset, `first`, `last`, a timestamp) on `ch`, with
/// the prefetch and manual acks stream consumers need.
///
/// # Errors
/// The broker refused (no such stream, a bad offset).
pub async fn consume_stream(
    ch: &Channel,
    stream: &str,
    tag: &str,
    at: AMQPValue,
) -> Result<lapin::Consumer> {
    ch.basic_qos(64, lapin::options::BasicQosOptions::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), at);
    Ok(ch
        .basic_consume(
            stream.into(),
            tag.into(),
            lapin::options::BasicConsumeOptions::default(),
            args,
        )
        .await?)
}

/// A stream delivery's offset (`x-stream-offset`).
pub fn delivery_offset(d: &lapin::message::Delivery) -> Option<u64> {
    let headers = d.properties.headers().as_ref()?;
    as_u64(headers.inner().get(&ShortString::from("x-stream-offset")))
}

/// The last manifest on `stream` (read from its last chunk: everything delivered until a
/// second passes without more, five at most), or `None` when it holds none or cannot be read.
pub async fn read_manifest(conn: &lapin::Connection, stream: &str) -> Option<Manifest> {
    let r = async {
        let ch = conn.create_channel().await?;
        let last = AMQPValue::LongString("last".into());
        let mut consumer = consume_stream(&ch, stream, "plipd-manifest", last).await?;
        let mut last = None;
        // The last chunk arrives at once; a trainer appending meanwhile only adds newer
        // entries, so reading stops after a second without one or five in all.
        let mut wait = Duration::from_secs(3);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some(d)) =
            tokio::time::timeout(wait, futures_lite::StreamExt::next(&mut consumer)).await
        {
            if std::time::Instant::now() > deadline {
                break;
            }
            let d = d?;
            d.ack(lapin::options::BasicAckOptions::default()).await?;
            if let Ok(m) = serde_json::from_slice::<Manifest>(&d.data) {
                last = Some(m);
            }
            wait = Duration::from_secs(1);
        }
        let _ = ch.close(200, "manifest read".into()).await;
        Ok::<_, Error>(last)
    }
    .await;
    match r {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, stream, "manifest_unreadable: replaying the logs from their first offsets");
            None
        }
    }
}

pub(super) async fn write_manifest(
    shared: &Shared,
    ch: &Channel,
    cfg: &StreamsConfig,
    m: &Manifest,
) -> Result<()> {
    let body = serde_json::to_vec(m)?;
    publish_all(
        ch,
        &cfg.manifest_log,
        vec![(body.clone(), FieldTable::default(), "application/json")],
    )
    .await?;
    shared.state.set_meta_bytes(MANIFEST, &body)?;
    tracing::info!(manifest = %String::from_utf8_lossy(&body), "manifest_written");
    Ok(())
}

/// Records that `n` entries have been appended to the gallery log.
fn set_entries(shared: &Shared, n: u64) -> Result<()> {
    shared.state.set_meta_u64(GALLERY_ENTRIES, n)?;
    shared.stats().gallery_entries_logged = n;
    Ok(())
}

/// Whether a snapshot is due: none since the clock started (the first entry) for
/// `snapshot_every_s`, or more bytes appended since the last one than a quarter of
/// `gallery_max_length_bytes` — or than the last snapshot itself, so that snapshots never take more
/// than half of what is appended.
pub(super) fn snapshot_due(shared: &Shared, cfg: &StreamsConfig) -> Result<bool> {
    let st = &shared.state;
    let Some(clock) = st.meta_u64(SNAPSHOT_CLOCK)? else {
        return Ok(false);
    };
    let since = st.meta_u64(SINCE_SNAPSHOT_BYTES)?.unwrap_or(0);
    let last = st.meta_u64(SNAPSHOT_BYTES)?.unwrap_or(0);
    let by_bytes = since >= (cfg.gallery_max_length_bytes / 4).max(last).max(1);
    let by_time = crate::base::state::now_unix().saturating_sub(clock) >= cfg.snapshot_every_s;
    Ok(by_bytes || by_time)
}

/// Appends a full snapshot of the gallery — a begin marker, a copy of every gallery sample
/// logged so far (arrival order), an end marker —, reads the begin marker's offset back right
/// after appending it, and once the end marker is appended, a manifest naming it. A crash midway leaves an incomplete snapshot no manifest
/// names; the next one is written after the restart.
pub(super) async fn write_snapshot(
    shared: &Arc<Shared>,
    conn: &lapin::Connection,
    ch: &Channel,
    cfg: &StreamsConfig,
) -> Result<()> {
    let started = std::time::Instant::now();
    let cursor = shared.state.gallery_logged()?;
    let mut n = shared.state.meta_u64(GALLERY_ENTRIES)?.unwrap_or(0) + 1;
    let id = n;
    let h = marker("snapshot-begin", n, id);
    publish_all(
        ch,
        &cfg.gallery_log,
        vec![(Vec::new(), h, "application/json")],
    )
    .await?;
    set_entries(shared, n)?;
    let is_begin = |t: &FieldTable| entry_kind(t) == (Some("snapshot-begin".into()), Some(id));
    let begin = locate(conn, &cfg.gallery_log, is_begin).await?;
    let (mut from, mut samples, mut bytes) = (0u64, 0u64, 0u64);
    loop {
        let s = shared.clone();
        let (batch, next, n_after) = tokio::task::spawn_blocking(move || -> Result<_> {
            let ids: Vec<(u64, String)> = s
                .store
                .arrivals_from(from, GALLERY_BATCH)
                .into_iter()
                .take_while(|(seq, _)| *seq < cursor)
                .collect();
            let next = ids.last().map(|(seq, _)| seq + 1);
            let mut n = n;
            let batch = additions(&s, ids, &mut n, Some(id))?;
            Ok((batch, next, n))
        })
        .await??;
        let Some(next) = next else { break };
        samples += batch.len() as u64;
        bytes += batch.iter().map(|(b, ..)| b.len() as u64).sum::<u64>();
        publish_all(ch, &cfg.gallery_log, batch).await?;
        set_entries(shared, n_after)?;
        n = n_after;
        from = next;
    }
    n += 1;
    let h = marker("snapshot-end", n, id);
    let body = serde_json::to_vec(&serde_json::json!({ "samples": samples }))?;
    publish_all(ch, &cfg.gallery_log, vec![(body, h, "application/json")]).await?;
    set_entries(shared, n)?;
    let st = &shared.state;
    st.set_meta_u64(SINCE_SNAPSHOT_BYTES, 0)?;
    st.set_meta_u64(SNAPSHOT_BYTES, bytes)?;
    st.set_meta_u64(SNAPSHOT_CLOCK, crate::base::state::now_unix())?;
    match begin {
        Some(offset) => {
            let mut m = stored_manifest(shared);
            m.gallery = Some(SnapshotRef {
                snapshot: id,
                offset,
                samples,
                bytes,
                written_unix: crate::base::state::now_unix(),
            });
            write_manifest(shared, ch, cfg, &m).await?;
            shared.stats().snapshot = m.gallery;
            if 2 * bytes + cfg.segment_bytes > cfg.gallery_max_length_bytes {
                tracing::warn!(
                    snapshot_bytes = bytes,
                    gallery_max_length_bytes = cfg.gallery_max_length_bytes,
                    "the gallery snapshot is too large for streams.gallery_max_length_bytes: \
                     retention may remove a snapshot before the next is complete; raise it"
                );
            }
            tracing::info!(
                snapshot = id,
                offset,
                samples,
                bytes,
                ms = started.elapsed().as_millis() as u64,
                "gallery_snapshot_written"
            );
        }
        None => tracing::warn!(
            snapshot = id,
            "gallery_snapshot_not_located: its begin marker was not found in the stream's last \
             chunk; no manifest names it (servers start from the previous one)"
        ),
    }
    Ok(())
}

/// The offset of the entry just appended to `stream` (confirmed, by its only writer: the
/// entry of the stream's last chunk that `is_it` recognises). Offsets are not returned to a
/// publisher over AMQP 0-9-1, nor are they contiguous (counting entries back from another
/// misses), so the entry is read back from the stream's last chunk (`x-stream-offset: last`).
pub(super) async fn locate(
    conn: &lapin::Connection,
    stream: &str,
    is_it: impl Fn(&FieldTable) -> bool,
) -> Result<Option<u64>> {
    let ch = conn.create_channel().await?;
    let last = AMQPValue::LongString("last".into());
    let mut consumer = consume_stream(&ch, stream, "plipd-locate", last).await?;
    let mut found = None;
    while let Ok(Some(d)) = tokio::time::timeout(
        Duration::from_secs(10),
        futures_lite::StreamExt::next(&mut consumer),
    )
    .await
    {
        let d = d?;
        d.ack(lapin::options::BasicAckOptions::default()).await?;
        if is_it(&d.properties.headers().clone().unwrap_or_default()) {
            found = delivery_offset(&d);
            break;
        }
    }
    let _ = ch.close(200, "located".into()).await;
    Ok(found)
}
