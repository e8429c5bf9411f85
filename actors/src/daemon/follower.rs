//! A server's side of the logs (`role = "server"`): it holds no training data and follows the
//! trainer's models log and gallery log into its own state folder, where the serving stack
//! (swapper, request consumer) finds them as it would in a single process.
//!
//! - Models log: chunks are reassembled and verified ([`crate::base::chunks`]); a complete
//!   version is stored as a checkpoint under the trainer's version number, its tokenizer set,
//!   and the version pinned — a server serves exactly what the trainer logged last (promotion
//!   or rollback), ungated: the gate stays with the trainer. The swapper loads it and
//!   re-embeds the gallery before it swaps, so a server never answers with a model whose
//!   gallery is not embedded yet.
//! - Gallery log: an addition is stored as a gallery sample (idempotent by id; what has
//!   arrived together is written with one flush); a tombstone forgets exactly the samples it
//!   names (those the trainer deleted; it follows their additions in the log).
//! - Lag: the trainer announces the logs' heads (the last model version, the number of gallery
//!   entries) on `streams.head_exchange`; the follower compares them with what it applied
//!   (`/status` → `follower.gallery_lag`), and `/readyz` waits until it has caught up once.
//! - Offsets: the next offset of each stream is kept in the state folder after each applied
//!   entry (after a model's last chunk for the models log), so a restarted server resumes
//!   where it stopped instead of replaying everything; an entry applied again after a crash
//!   is harmless (ids and versions are idempotent).

use crate::base::chunks::Reassembler;
use crate::base::error::{Error, Result};
use crate::base::state::{Checkpoint, CheckpointMeta};
use crate::daemon::broker;
use crate::daemon::logs::{consume_stream, delivery_offset};
use crate::daemon::logs::{
    declare_heads, entry_kind, gallery_entry_n, read_chunk_headers, read_gallery_entry,
    read_manifest, GalleryEntry, Heads,
};
use crate::daemon::Shared;
use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
use std::sync::Arc;

/// Meta keys of the next offsets to read.
const MODELS_OFFSET: &str = "follow_models_offset";
const GALLERY_OFFSET: &str = "follow_gallery_offset";
/// Meta key of the ordinal of the last gallery entry applied.
const GALLERY_APPLIED: &str = "follow_gallery_applied";
/// Meta key of the gallery snapshot being applied (a server that started at it), until its
/// end marker is applied.
const FOLLOW_SNAPSHOT: &str = "follow_gallery_snapshot";

/// Runs until shutdown: follow both logs, reconnecting with backoff.
///
/// # Errors
/// A state-folder failure (the supervisor restarts the follower).
pub async fn run(shared: Arc<Shared>) -> Result<()> {
    let on_error = |e: &Error| {
        let mut st = shared.stats();
        st.follower.connected = false;
        st.follower.error = Some(e.to_string());
    };
    broker::reconnecting(
        &shared,
        "plipd follower closing",
        "follower_broker_lost",
        on_error,
        |conn| {
            let shared = shared.clone();
            async move { follow(&shared, &conn).await }
        },
    )
    .await
}

async fn consume_from(
    ch: &Channel,
    stream: &str,
    tag: &str,
    offset: Option<u64>,
) -> Result<lapin::Consumer> {
    let at = match offset {
        Some(n) => AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX)),
        None => AMQPValue::LongString("first".into()),
    };
    consume_stream(ch, stream, tag, at).await
}

/// Whether delivery `d` lies before the offset `start` consumption was asked to start at.
fn before(d: &lapin::message::Delivery, start: Option<u64>) -> bool {
    matches!((delivery_offset(d), start), (Some(o), Some(s)) if o < s)
}

async fn follow(shared: &Arc<Shared>, conn: &lapin::Connection) -> Result<()> {
    let cfg = &shared.cfg.streams;
    {
        let applied = shared.state.meta_u64(GALLERY_APPLIED)?.unwrap_or(0);
        let pinned = shared.state.pinned()?;
        let mut st = shared.stats();
        st.follower.gallery_applied = applied;
        if st.follower.model_version.is_none() {
            st.follower.model_version = pinned;
        }
    }
    // Where to start: the stored offsets; on an empty state folder, the manifest's latest
    // snapshot and model (the first offsets when there is none, or it was refused).
    let mut models_at = shared.state.meta_u64(MODELS_OFFSET)?;
    let mut gallery_at = shared.state.meta_u64(GALLERY_OFFSET)?;
    let mut expect_begin = None;
    let refused = shared.stats().follower.manifest_refused;
    if models_at.is_none() && gallery_at.is_none() && !refused {
        if let Some(m) = read_manifest(conn, &cfg.manifest_log).await {
            if let Some(g) = m.gallery {
                gallery_at = Some(g.offset);
                expect_begin = Some((g.snapshot, g.offset));
                shared.state.set_meta_u64(FOLLOW_SNAPSHOT, g.snapshot)?;
            }
            if let Some(md) = m.model {
                models_at = Some(md.offset);
            }
            tracing::info!(manifest = ?m, "starting_from_manifest");
            shared.stats().follower.started_from = Some(m);
        }
    }
    let (mch, gch) = (conn.create_channel().await?, conn.create_channel().await?);
    let pid = std::process::id();
    let mut models = consume_from(
        &mch,
        &cfg.models_log,
        &format!("plipd-follow-models-{pid}"),
        models_at,
    )
    .await?;
    let mut gallery = consume_from(
        &gch,
        &cfg.gallery_log,
        &format!("plipd-follow-gallery-{pid}"),
        gallery_at,
    )
    .await?;
    // The trainer's announcements of the logs' heads, on a private queue.
    let hch = conn.create_channel().await?;
    declare_heads(&hch, cfg).await?;
    let q = hch
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    hch.queue_bind(
        q.name().clone(),
        cfg.head_exchange.as_str().into(),
        "".into(),
        lapin::options::QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut heads = hch
        .basic_consume(
            q.name().clone(),
            format!("plipd-follow-heads-{pid}").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    {
        let mut st = shared.stats();
        st.follower.connected = true;
        st.follower.error = None;
    }
    tracing::info!("following");
    let mut chunks = Reassembler::default();
    loop {
        tokio::select! {
            d = models.next() => {
                let d = d.ok_or_else(|| Error::Broker("the models log consumer was cancelled".into()))??;
                if !before(&d, models_at) {
                    apply_model_chunk(shared, &mut chunks, &d).await?;
                }
                d.ack(BasicAckOptions::default()).await?;
            }
            d = gallery.next() => {
                // What else has arrived is applied with it: one durable write per batch.
                let mut batch =
                    vec![d.ok_or_else(|| Error::Broker("the gallery log consumer was cancelled".into()))??];
                while batch.len() < GALLERY_BATCH {
                    match futures_lite::future::poll_once(gallery.next()).await {
                        Some(Some(d)) => batch.push(d?),
                        Some(None) => {
                            return Err(Error::Broker("the gallery log consumer was cancelled".into()))
                        }
                        None => break,
                    }
                }
                // A consumer attached at an offset receives the whole chunk holding it: the
                // entries before the offset asked for are not applied (again).
                let (skipped, batch): (Vec<_>, Vec<_>) =
                    batch.into_iter().partition(|d| before(d, gallery_at));
                for d in &skipped {
                    d.ack(BasicAckOptions::default()).await?;
                }
                if batch.is_empty() {
                    continue;
                }
                if let Some((id, offset)) = expect_begin.take() {
                    // Starting at a snapshot: the first entry must be its begin marker (retention
                    // may have removed it since the manifest was written).
                    let h = batch[0].properties.headers().clone().unwrap_or_default();
                    if entry_kind(&h) != (Some("snapshot-begin".into()), Some(id)) {
                        shared.state.remove_meta(FOLLOW_SNAPSHOT)?;
                        shared.stats().follower.manifest_refused = true;
                        return Err(Error::Broker(format!(
                            "the manifest's gallery snapshot {id} is not at offset {offset} any \
                             more; replaying the gallery log from its first offset"
                        )));
                    }
                }
                apply_gallery_batch(shared, &batch).await?;
                for d in &batch {
                    d.ack(BasicAckOptions::default()).await?;
                }
            }
            h = heads.next() => {
                let h = h.ok_or_else(|| Error::Broker("the heads consumer was cancelled".into()))??;
                if let Ok(h) = serde_json::from_slice::<Heads>(&h.data) {
                    let mut st = shared.stats();
                    st.follower.heads = Some(h);
                    let was = st.follower.caught_up;
                    st.follower.update_lag();
                    if st.follower.caught_up && !was {
                        tracing::info!(gallery_entries = h.gallery_entries, model = ?h.model, "caught_up");
                    }
                }
            }
            _ = shared.stopped() => return Ok(()),
        }
    }
}

async fn apply_model_chunk(
    shared: &Arc<Shared>,
    chunks: &mut Reassembler,
    d: &lapin::message::Delivery,
) -> Result<()> {
    let offset = delivery_offset(d);
    let headers = d.properties.headers().clone().unwrap_or_default();
    let Some((head, meta)) = read_chunk_headers(&headers) else {
        tracing::warn!(offset, "models_log_entry_malformed");
        return Ok(());
    };
    let weights = match chunks.push(&head, &d.data) {
        Ok(Some(w)) => w,
        Ok(None) => return Ok(()),
        Err(e) => {
            // A damaged or misplaced chunk: that version is skipped (the next one logged
            // replaces it), never served.
            tracing::error!(error = %e, "models_log_chunk_refused");
            shared.stats().follower.chunks_refused += 1;
            return Ok(());
        }
    };
    let s = shared.clone();
    let version = head.version;
    // A version appended again (the trainer refreshes the serving one against age-based
    // retention) is already stored and pinned here (pinned only once stored; never pruned).
    let have = shared.state.pinned()? == Some(version);
    if !have {
        tokio::task::spawn_blocking(move || store_model(&s, version, weights, &meta)).await??;
    }
    if let Some(o) = offset {
        shared.state.set_meta_u64(MODELS_OFFSET, o + 1)?;
        shared.stats().follower.models_offset = Some(o + 1);
    }
    {
        let mut st = shared.stats();
        st.follower.model_version = Some(version);
        st.follower.update_lag();
    }
    tracing::info!(version, "model_followed");
    Ok(())
}

/// Stores a logged model as the checkpoint `version` with its tokenizer, and pins it.
fn store_model(
    shared: &Shared,
    version: u64,
    weights: Vec<u8>,
    meta: &serde_json::Value,
) -> Result<()> {
    let wm = plip_model::weights::read_meta(&weights)?;
    let tk_json = wm.extra.get("tokenizer_json").ok_or_else(|| {
        Error::ModelSetup(format!("logged version {version} carries no tokenizer"))
    })?;
    let tokenizer = plip_model::tokenizer::Tokenizer::from_bytes(tk_json.as_bytes())?;
    let ck = Checkpoint {
        meta: CheckpointMeta {
            version,
            step: wm.step,
            preset: wm.preset.name.clone(),
            tokenizer: tokenizer.fingerprint().to_string(),
            images_seen: 0,
            created_unix: crate::base::state::now_unix(),
            metrics: serde_json::from_value(meta["metrics"].clone()).unwrap_or_default(),
        },
        weights,
        optimizer: Vec::new(),
    };
    shared.state.set_tokenizer(&tokenizer)?;
    shared.state.put_checkpoint(&ck)?;
    shared.state.set_pinned(Some(version))?;
    // Keep the served version and a few before it.
    let protect = shared.state.protected_versions()?;
    shared.state.prune(3, &protect)?;
    Ok(())
}

/// Gallery-log deliveries applied together at most.
const GALLERY_BATCH: usize = 256;

/// Applies consecutive gallery-log deliveries: additions staged and committed with one flush
/// (a tombstone first commits what precedes it), then the offsets and ordinals recorded.
async fn apply_gallery_batch(
    shared: &Arc<Shared>,
    batch: &[lapin::message::Delivery],
) -> Result<()> {
    let entries: Vec<Option<GalleryEntry>> = batch
        .iter()
        .map(|d| {
            let headers = d.properties.headers().clone().unwrap_or_default();
            let e = read_gallery_entry(&headers, &d.data);
            if e.is_none() {
                tracing::warn!(offset = delivery_offset(d), "gallery_log_entry_malformed");
            }
            e
        })
        .collect();
    let last_offset = batch.iter().filter_map(delivery_offset).max();
    let last_n = batch
        .iter()
        .filter_map(|d| d.properties.headers().as_ref().and_then(gallery_entry_n))
        .max();
    let s = shared.clone();
    let (forgot, finished) = tokio::task::spawn_blocking(move || -> Result<(bool, bool)> {
        let mut staged = Vec::new();
        let mut forgot = false;
        // The snapshot this server started at, while it is being applied; other snapshots'
        // copies are of samples this server already has.
        let mut applying = s.state.meta_u64(FOLLOW_SNAPSHOT)?;
        let mut finished = false;
        for entry in entries.into_iter().flatten() {
            match entry {
                GalleryEntry::SnapshotBegin { .. } => {}
                GalleryEntry::SnapshotEnd { snapshot, samples } => {
                    if applying == Some(snapshot) {
                        applying = None;
                        finished = true;
                        tracing::info!(snapshot, samples, "snapshot_applied");
                    }
                }
                GalleryEntry::Add { snapshot: Some(sid), .. } if applying != Some(sid) => {}
                GalleryEntry::Add {
                    id,
                    person,
                    camera,
                    image,
                    ..
                } => {
                    let limits = plip_ingest::image::IntakeLimits::default();
                    let pixels = match plip_ingest::image::decode(&image, &limits) {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::warn!(id = %id, error = %e, "gallery_log_image_undecodable");
                            continue;
                        }
                    };
                    let encoded =
                        plip_ingest::image::storable_jpeg(&image, pixels.width(), pixels.height());
                    let img = plip_ingest::wire::ValidImage {
                        id,
                        person_id: person,
                        camera_id: camera,
                        captions: Vec::new(),
                        attributes: None,
                        purpose: plip_ingest::wire::Purpose::Gallery,
                        pixels,
                        encoded,
                    };
                    staged.extend(s.store.stage(&img)?);
                }
                GalleryEntry::Forget { person, ids, .. } => {
                    s.store.commit(std::mem::take(&mut staged))?;
                    s.store.flush()?;
                    let ids = s.store.forget_ids(&ids)?;
                    s.state.remove_gallery(&ids)?;
                    tracing::info!(person = ?person, samples_removed = ids.len(), "forget_followed");
                    forgot = true;
                }
            }
        }
        s.store.commit(staged)?;
        s.store.flush()?;
        Ok((forgot, finished))
    })
    .await??;
    if forgot {
        shared
            .forgets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    if let Some(o) = last_offset {
        shared.state.set_meta_u64(GALLERY_OFFSET, o + 1)?;
    }
    if let Some(n) = last_n {
        shared.state.set_meta_u64(GALLERY_APPLIED, n)?;
    }
    if finished {
        // Only after the offset past the end marker is stored: a crash before it replays the
        // snapshot's tail, still applying it.
        shared.state.remove_meta(FOLLOW_SNAPSHOT)?;
    }
    let mut st = shared.stats();
    st.follower.gallery_entries += batch.len() as u64;
    if let Some(o) = last_offset {
        st.follower.gallery_offset = Some(o + 1);
    }
    if let Some(n) = last_n {
        st.follower.gallery_applied = st.follower.gallery_applied.max(n);
    }
    st.follower.update_lag();
    Ok(())
}
