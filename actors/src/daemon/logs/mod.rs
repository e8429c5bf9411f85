//! The replayable logs on RabbitMQ streams (`[streams]`). Every model version that starts
//! serving — promoted by the gate or pinned by a rollback — is appended to
//! `streams.models_log` as its exported weights file (tensors, tokenizer, metadata: what
//! `plipd export` writes) in checksummed chunks ([`crate::base::chunks`]), so that a process
//! that holds no training data can replay the latest model and follow the next. Every gallery
//! sample (purpose `gallery` or `both`: the stored image bytes, id, person and camera) is
//! appended to `streams.gallery_log` in arrival order, and every forgotten person as a
//! tombstone naming the last arrival it covers.
//!
//! The logs are written from the state folder, not from the promotion or the intake itself:
//! the logger compares the serving version with the last one it appended, and the store's
//! arrivals with the last one it logged (both kept in the state folder; forgets wait in a
//! tombstone queue there, written before the samples are deleted), and appends what is
//! missing — a broker outage or a restart delays entries but never loses one (an entry may be
//! appended twice after a crash between its confirm and the cursor's write: readers apply
//! them idempotently, by id).
//! Consumers of a stream need `basic.qos` and manual acks, and read from an offset given in
//! `x-stream-offset`. Retention stays safe for a new server through gallery snapshots, the
//! serving model appended again, and a manifest of where both begin ([`snapshot`]).

use crate::base::chunks::{split, ChunkHead};
use crate::base::config::StreamsConfig;
use crate::base::error::{Error, Result};
use crate::daemon::broker::{self, publish_confirmed};
use crate::daemon::Shared;
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use std::sync::Arc;
use std::time::Duration;

mod snapshot;

use snapshot::MODEL_LOGGED_UNIX;
pub use snapshot::{
    consume_stream, delivery_offset, read_manifest, stored_manifest, Manifest, ModelRef,
    SnapshotRef,
};
use snapshot::{count_since_snapshot, locate, snapshot_due, write_manifest, write_snapshot};

/// Header names of the logs' entries.
pub mod headers {
    pub const VERSION: &str = "x-plip-version";
    pub const CHUNK: &str = "x-plip-chunk";
    pub const CHUNKS: &str = "x-plip-chunks";
    pub const BYTES: &str = "x-plip-bytes";
    pub const SHA256: &str = "x-plip-sha256";
    pub const CRC32: &str = "x-plip-crc32";
    /// JSON: the version's step, metrics, whether it was pinned, when it was appended.
    pub const META: &str = "x-plip-meta";
    /// Gallery log: `add` (the body is the stored image) or `forget` (a tombstone).
    pub const ENTRY: &str = "x-plip-entry";
    /// Gallery log: the sample's arrival sequence (`add`), or the last arrival when the person
    /// was forgotten (`forget`: samples of the person up to it are gone).
    pub const SEQ: &str = "x-plip-seq";
    pub const ID: &str = "x-plip-id";
    /// Gallery log: the entry's ordinal (1, 2, …) — what a follower's lag is counted in.
    pub const N: &str = "x-plip-n";
    pub const PERSON: &str = "x-plip-person";
    pub const CAMERA: &str = "x-plip-camera";
    /// Gallery log: the snapshot an entry belongs to (`snapshot-begin`, the additions of the
    /// snapshot, `snapshot-end`), named by the begin marker's ordinal.
    pub const SNAPSHOT: &str = "x-plip-snapshot";
}

/// One entry of the gallery log, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GalleryEntry {
    /// A gallery sample: its id, labels, arrival and the stored image bytes; `snapshot` when
    /// it is a snapshot's copy of a sample logged before (a server following the log already
    /// has it; one that started at that snapshot applies it).
    Add {
        seq: u64,
        id: String,
        person: Option<String>,
        camera: Option<String>,
        image: Vec<u8>,
        snapshot: Option<u64>,
    },
    /// A full snapshot of the gallery follows (its id is this marker's ordinal).
    SnapshotBegin { snapshot: u64 },
    /// The snapshot is complete: `samples` additions were in it.
    SnapshotEnd { snapshot: u64, samples: u64 },
    /// `person`'s samples `ids` are forgotten (the highest of their arrival numbers is
    /// `before_seq`).
    Forget {
        person: String,
        ids: Vec<String>,
        before_seq: u64,
    },
}

/// A gallery-log entry's ordinal (`x-plip-n`), when it carries one.
pub fn gallery_entry_n(t: &FieldTable) -> Option<u64> {
    as_u64(t.inner().get(&ShortString::from(headers::N)))
}

/// A gallery-log entry read back from its headers and body; `None` when malformed.
pub fn read_gallery_entry(t: &FieldTable, body: &[u8]) -> Option<GalleryEntry> {
    let get = |k: &str| t.inner().get(&ShortString::from(k));
    let snapshot = as_u64(get(headers::SNAPSHOT));
    match as_text(get(headers::ENTRY))?.as_str() {
        "add" => Some(GalleryEntry::Add {
            seq: as_u64(get(headers::SEQ))?,
            id: as_text(get(headers::ID))?,
            person: as_text(get(headers::PERSON)),
            camera: as_text(get(headers::CAMERA)),
            image: body.to_vec(),
            snapshot,
        }),
        "forget" => Some(GalleryEntry::Forget {
            person: as_text(get(headers::PERSON))?,
            ids: serde_json::from_slice(body).ok()?,
            before_seq: as_u64(get(headers::SEQ))?,
        }),
        "snapshot-begin" => Some(GalleryEntry::SnapshotBegin {
            snapshot: snapshot?,
        }),
        "snapshot-end" => Some(GalleryEntry::SnapshotEnd {
            snapshot: snapshot?,
            samples: serde_json::from_slice::<serde_json::Value>(body).ok()?["samples"].as_u64()?,
        }),
        _ => None,
    }
}

/// A gallery-log entry's kind (`x-plip-entry`) and snapshot (`x-plip-snapshot`), when it has
/// them.
pub fn entry_kind(t: &FieldTable) -> (Option<String>, Option<u64>) {
    let get = |k: &str| t.inner().get(&ShortString::from(k));
    (as_text(get(headers::ENTRY)), as_u64(get(headers::SNAPSHOT)))
}

pub(crate) fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

pub(crate) fn long(v: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(v).unwrap_or(i64::MAX))
}

/// Publishes every message of `batch` to the stream `name`, then waits for all their
/// confirms (one round trip per batch, not per message).
pub(crate) async fn publish_all(
    ch: &Channel,
    name: &str,
    batch: Vec<(Vec<u8>, FieldTable, &str)>,
) -> Result<()> {
    let mut confirms = Vec::with_capacity(batch.len());
    for (body, headers, content_type) in batch {
        let props = BasicProperties::default()
            .with_content_type(content_type.into())
            .with_delivery_mode(2)
            .with_headers(headers);
        confirms.push(
            ch.basic_publish(
                "".into(),
                name.into(),
                lapin::options::BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .map_err(|e| Error::Broker(format!("publish to {name:?}: {e}")))?,
        );
    }
    for c in confirms {
        let c = c
            .await
            .map_err(|e| Error::Broker(format!("confirm from {name:?}: {e}")))?;
        if c.is_nack() {
            return Err(Error::Broker(format!(
                "the broker refused an entry of {name:?}"
            )));
        }
    }
    Ok(())
}

/// The gallery-log additions of the samples `ids` (arrival, id) that are still stored and
/// are gallery samples, numbered from `n + 1` on (`n` advanced); `snapshot` tags a snapshot's
/// copies. Samples forgotten or evicted since they arrived have nothing to replicate.
pub(crate) fn additions(
    shared: &Shared,
    ids: Vec<(u64, String)>,
    n: &mut u64,
    snapshot: Option<u64>,
) -> Result<Vec<(Vec<u8>, FieldTable, &'static str)>> {
    let mut batch = Vec::new();
    for (seq, id) in ids {
        let Some(sample) = shared.store.get(&id)? else {
            continue;
        };
        if !crate::daemon::serving::is_gallery(&sample.meta) {
            continue;
        }
        *n += 1;
        let mut h = FieldTable::default();
        h.insert(headers::ENTRY.into(), text("add"));
        h.insert(headers::N.into(), long(*n));
        h.insert(headers::SEQ.into(), long(seq));
        h.insert(headers::ID.into(), text(&id));
        if let Some(sid) = snapshot {
            h.insert(headers::SNAPSHOT.into(), long(sid));
        }
        if let Some(p) = &sample.meta.person_id {
            h.insert(headers::PERSON.into(), text(p));
        }
        if let Some(c) = &sample.meta.camera_id {
            h.insert(headers::CAMERA.into(), text(c));
        }
        batch.push((sample.jpeg, h, "image/jpeg"));
    }
    Ok(batch)
}

/// A snapshot marker's headers (`snapshot-begin` / `snapshot-end`).
pub(crate) fn marker(kind: &str, n: u64, snapshot: u64) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(headers::ENTRY.into(), text(kind));
    h.insert(headers::N.into(), long(n));
    h.insert(headers::SNAPSHOT.into(), long(snapshot));
    h
}

/// Gallery samples appended per round trip.
pub(crate) const GALLERY_BATCH: usize = 256;

/// Meta key of the number of entries appended to the gallery log.
pub(crate) const GALLERY_ENTRIES: &str = "gallery_entries_logged";

/// The log heads a trainer announces on `streams.head_exchange` (a stream's tail cannot be
/// asked for over AMQP 0-9-1): a follower compares them with what it applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Heads {
    /// The last version appended to the models log.
    pub model: Option<u64>,
    /// Entries appended to the gallery log.
    pub gallery_entries: u64,
}

/// Declares the heads exchange (fanout, durable; the announcements themselves are transient).
///
/// # Errors
/// The broker refused.
pub async fn declare_heads(ch: &Channel, cfg: &StreamsConfig) -> Result<()> {
    ch.exchange_declare(
        cfg.head_exchange.as_str().into(),
        lapin::ExchangeKind::Fanout,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

async fn announce_heads(ch: &Channel, cfg: &StreamsConfig, heads: Heads) -> Result<()> {
    let body = serde_json::to_vec(&heads)?;
    let props = BasicProperties::default().with_content_type("application/json".into());
    publish_confirmed(ch, &cfg.head_exchange, "", &body, props).await
}

/// Appends the gallery samples that arrived since the logged cursor (in arrival order, in
/// batches, the cursor advanced after each confirmed batch) and the queued tombstones, each
/// tombstone right after the last arrival it covers — so that the log's order is the arrival
/// order and a follower applying a tombstone forgets exactly the samples it covers. Returns
/// how many entries were appended.
async fn append_gallery(shared: &Arc<Shared>, ch: &Channel, cfg: &StreamsConfig) -> Result<usize> {
    let mut appended = 0;
    let mut tombs = std::collections::VecDeque::from(shared.state.tombstones()?);
    loop {
        let s = shared.clone();
        let upto = tombs.front().map(|t| t.before_seq);
        let (batch, last, n_after) = tokio::task::spawn_blocking(move || -> Result<_> {
            let from = s.state.gallery_logged()?;
            let mut n = s.state.meta_u64(GALLERY_ENTRIES)?.unwrap_or(0);
            // Only settled arrivals: a delivery still being stored holds a lower number than
            // some already committed, and the cursor must not pass it.
            let settled = s.store.settled_below();
            let ids: Vec<(u64, String)> = s
                .store
                .arrivals_from(from, GALLERY_BATCH)
                .into_iter()
                .take_while(|(seq, _)| *seq < settled)
                .filter(|(seq, _)| upto.is_none_or(|u| *seq <= u))
                .collect();
            let last = ids.last().map(|(seq, _)| *seq);
            let batch = additions(&s, ids, &mut n, None)?;
            Ok((batch, last, n))
        })
        .await??;
        if let Some(last) = last {
            appended += batch.len();
            let bytes: u64 = batch.iter().map(|(b, ..)| b.len() as u64).sum();
            publish_all(ch, &cfg.gallery_log, batch).await?;
            count_since_snapshot(shared, bytes)?;
            shared.state.set_meta_u64(GALLERY_ENTRIES, n_after)?;
            shared.state.set_gallery_logged(last + 1)?;
            let mut st = shared.stats();
            st.gallery_logged_seq = last + 1;
            st.gallery_entries_logged = n_after;
            continue;
        }
        // Every settled arrival the oldest tombstone covers is logged; once none it covers is
        // still being stored, the tombstone follows (otherwise at the next round).
        let Some(tomb) = tombs.front() else {
            break;
        };
        if shared.store.settled_below() <= tomb.before_seq {
            break;
        }
        let Some(tomb) = tombs.pop_front() else {
            break;
        };
        let (person, before_seq) = (tomb.person.clone(), tomb.before_seq);
        let n = shared.state.meta_u64(GALLERY_ENTRIES)?.unwrap_or(0) + 1;
        let mut h = FieldTable::default();
        h.insert(headers::ENTRY.into(), text("forget"));
        h.insert(headers::N.into(), long(n));
        h.insert(headers::SEQ.into(), long(before_seq));
        h.insert(headers::PERSON.into(), text(&person));
        let body = serde_json::to_vec(&tomb.ids)?;
        let bytes = body.len() as u64;
        publish_all(ch, &cfg.gallery_log, vec![(body, h, "application/json")]).await?;
        count_since_snapshot(shared, bytes)?;
        shared.state.set_meta_u64(GALLERY_ENTRIES, n)?;
        shared.state.remove_tombstone(tomb.key)?;
        shared.stats().gallery_entries_logged = n;
        appended += 1;
        tracing::info!(person = ?person, before_seq, "forget_logged");
    }
    Ok(appended)
}

/// Declares both streams (idempotent with the same settings).
///
/// # Errors
/// The broker refused: with a pointer to the `stream_queue` feature flag when streams are
/// not available.
pub async fn declare(ch: &Channel, cfg: &StreamsConfig) -> Result<()> {
    // The manifest stream holds small entries: its own modest bounds.
    let manifest_segment = cfg.segment_bytes.min(4 << 20);
    for (name, max_length, segment) in [
        (&cfg.models_log, cfg.max_length_bytes, cfg.segment_bytes),
        (
            &cfg.gallery_log,
            cfg.gallery_max_length_bytes,
            cfg.segment_bytes,
        ),
        (&cfg.manifest_log, 16 << 20, manifest_segment),
    ] {
        declare_stream(ch, name, cfg, max_length, segment).await?;
    }
    Ok(())
}

async fn declare_stream(
    ch: &Channel,
    name: &str,
    cfg: &StreamsConfig,
    max_length: u64,
    segment: u64,
) -> Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    args.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(max_length).unwrap_or(i64::MAX)),
    );
    args.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(segment).unwrap_or(i64::MAX)),
    );
    if !cfg.max_age.is_empty() {
        args.insert(
            "x-max-age".into(),
            AMQPValue::LongString(cfg.max_age.as_str().into()),
        );
    }
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .map_err(|e| {
        let text = e.to_string();
        let hint = if text.contains("inequivalent arg") {
            "the stream exists with other settings: a stream's retention arguments cannot be \
             changed by declaring it again — set the old values back, apply the new ones with a \
             policy (rabbitmqctl set_policy … '{\"max-age\": …}' --apply-to queues), or delete \
             the stream"
        } else {
            "streams need RabbitMQ 3.9 or later with the stream_queue feature flag enabled: \
             rabbitmqctl enable_feature_flag stream_queue"
        };
        Error::Broker(format!(
            "cannot declare the stream {name:?}: {text} ({hint})"
        ))
    })?;
    Ok(())
}

/// A chunk's headers.
fn chunk_headers(h: &ChunkHead, meta: &str) -> FieldTable {
    let mut t = FieldTable::default();
    let long = |v: u64| AMQPValue::LongLongInt(i64::try_from(v).unwrap_or(i64::MAX));
    t.insert(headers::VERSION.into(), long(h.version));
    t.insert(headers::CHUNK.into(), AMQPValue::LongUInt(h.index));
    t.insert(headers::CHUNKS.into(), AMQPValue::LongUInt(h.count));
    t.insert(headers::BYTES.into(), long(h.total_bytes));
    t.insert(
        headers::SHA256.into(),
        AMQPValue::LongString(h.sha256.as_str().into()),
    );
    t.insert(headers::CRC32.into(), AMQPValue::LongUInt(h.crc32));
    t.insert(headers::META.into(), AMQPValue::LongString(meta.into()));
    t
}

/// A header value as a number, whatever integer type the sender used.
pub fn as_u64(v: Option<&AMQPValue>) -> Option<u64> {
    match v? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::Timestamp(n) => Some(*n),
        _ => None,
    }
}

fn as_text(v: Option<&AMQPValue>) -> Option<String> {
    match v? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// A chunk's head and metadata read back from its headers; `None` when one is missing.
pub fn read_chunk_headers(t: &FieldTable) -> Option<(ChunkHead, serde_json::Value)> {
    let get = |k: &str| t.inner().get(&ShortString::from(k));
    let head = ChunkHead {
        version: as_u64(get(headers::VERSION))?,
        index: u32::try_from(as_u64(get(headers::CHUNK))?).ok()?,
        count: u32::try_from(as_u64(get(headers::CHUNKS))?).ok()?,
        total_bytes: as_u64(get(headers::BYTES))?,
        sha256: as_text(get(headers::SHA256))?,
        crc32: u32::try_from(as_u64(get(headers::CRC32))?).ok()?,
    };
    let meta = as_text(get(headers::META))
        .and_then(|m| serde_json::from_str(&m).ok())
        .unwrap_or(serde_json::Value::Null);
    Some((head, meta))
}

/// Appends one model version — its weights in chunks, each confirmed — to the models log;
/// returns the number of chunks and the offset of the first (read back), when found.
///
/// # Errors
/// A publish or a confirm failed (the caller appends the whole version again later).
pub async fn append_model(
    conn: &lapin::Connection,
    ch: &Channel,
    cfg: &StreamsConfig,
    version: u64,
    weights: &[u8],
    meta: &serde_json::Value,
) -> Result<(usize, Option<u64>)> {
    let meta = meta.to_string();
    let chunks = split(version, weights, cfg.chunk_bytes);
    let n = chunks.len();
    let mut first = None;
    for (head, body) in chunks {
        let props = BasicProperties::default()
            .with_content_type("application/octet-stream".into())
            .with_delivery_mode(2)
            .with_headers(chunk_headers(&head, &meta));
        publish_confirmed(ch, "", &cfg.models_log, body, props).await?;
        if head.index == 0 {
            // Where the version begins, for the manifest: read back while it is the last entry.
            let is_first = |t: &FieldTable| {
                read_chunk_headers(t).is_some_and(|(h, _)| h.version == version && h.index == 0)
            };
            first = locate(conn, &cfg.models_log, is_first).await?;
        }
    }
    Ok((n, first))
}

/// What the logger appends for the serving version: the same self-contained weights file
/// `plipd export` writes (tensors, the tokenizer, the checkpoint's version, step and metrics),
/// which is all a process holding no state folder needs to serve it.
fn serving_entry(shared: &Shared, version: u64) -> Result<(Vec<u8>, serde_json::Value)> {
    let (bytes, summary) =
        crate::base::model::export_bytes(&shared.state, Some(version)).map_err(Error::model)?;
    let pinned = shared.state.pinned()? == Some(version);
    let meta = serde_json::json!({
        "version": version,
        "step": summary["step"],
        "preset": summary["preset"],
        "tokenizer": summary["tokenizer"],
        "pinned": pinned,
        "appended_unix": crate::base::state::now_unix(),
    });
    Ok((bytes, meta))
}

/// The models logger: runs until shutdown, appending each new serving version.
///
/// # Errors
/// Never for broker trouble (it waits and tries again); a state-folder failure ends it (the
/// supervisor restarts it).
pub async fn models_logger(shared: Arc<Shared>) -> Result<()> {
    let cfg = shared.cfg.streams.clone();
    let poll = Duration::from_millis(shared.cfg.serving.poll_ms.max(50));
    broker::reconnecting(
        &shared,
        "plipd models log closing",
        "models_log_broker_lost",
        |e| shared.stats().models_log_error = Some(e.to_string()),
        |conn| {
            let (shared, cfg) = (shared.clone(), cfg.clone());
            async move { follow(&shared, &conn, &cfg, poll).await }
        },
    )
    .await
}

/// One connection's life: declare, then append whatever serving version is not logged yet.
async fn follow(
    shared: &Arc<Shared>,
    conn: &lapin::Connection,
    cfg: &StreamsConfig,
    poll: Duration,
) -> Result<()> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    declare(&ch, cfg).await?;
    declare_heads(&ch, cfg).await?;
    // The last snapshot a manifest names, also after a restart.
    let snapshot = stored_manifest(shared).gallery;
    {
        let mut st = shared.stats();
        st.models_log_error = None;
        st.snapshot = snapshot;
    }
    loop {
        let serving = shared.serving_version();
        let logged = shared.state.models_logged()?;
        // The serving version is appended again when its last append is older than
        // `snapshot_every_s`, so that age-based retention never leaves the log without it.
        let stale = shared.state.meta_u64(MODEL_LOGGED_UNIX)?.is_some_and(|t| {
            crate::base::state::now_unix().saturating_sub(t) >= cfg.snapshot_every_s
        });
        if let Some(v) = serving.filter(|&v| Some(v) != logged || stale) {
            let s = shared.clone();
            let (weights, meta) =
                tokio::task::spawn_blocking(move || serving_entry(&s, v)).await??;
            let (chunks, located) = append_model(conn, &ch, cfg, v, &weights, &meta).await?;
            shared.state.set_models_logged(v)?;
            shared
                .state
                .set_meta_u64(MODEL_LOGGED_UNIX, crate::base::state::now_unix())?;
            shared.stats().models_logged = Some(v);
            tracing::info!(version = v, chunks, bytes = weights.len(), "model_logged");
            match located {
                Some(offset) => {
                    let mut m = stored_manifest(shared);
                    m.model = Some(ModelRef {
                        version: v,
                        offset,
                        chunks: chunks as u64,
                    });
                    write_manifest(shared, &ch, cfg, &m).await?;
                }
                None => tracing::warn!(version = v, "model_not_located: no manifest names it"),
            }
        }
        let n = append_gallery(shared, &ch, cfg).await?;
        if n > 0 {
            tracing::debug!(entries = n, "gallery_logged");
        }
        if snapshot_due(shared, cfg)? {
            write_snapshot(shared, conn, &ch, cfg).await?;
        }
        let heads = Heads {
            model: shared.state.models_logged()?,
            gallery_entries: shared.state.meta_u64(GALLERY_ENTRIES)?.unwrap_or(0),
        };
        announce_heads(&ch, cfg, heads).await?;
        if shared.sleep_or_stop(poll).await {
            return Ok(());
        }
    }
}
