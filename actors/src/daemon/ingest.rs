//! The ingest consumer: owns the broker connection, declares the topology, applies the prefetch
//! and consumes `plip.ingest`.
//!
//! Per delivery: the header table measured (without recursion) → parse and validate without
//! decoding pixels (blocking pool) → each image decoded against the budget of decoded pixels in
//! flight and its bytes appended to a pack file as it goes → one commit: the pack synced, the
//! records written, sled flushed (blocking pool) → dead-letter a copy when
//! something was refused (built by `plip_ingest::dead_letter` to fit the frame,
//! publisher-confirmed) → the ingest outcome to `reply_to` (confirmed) → ack.
//!
//! Storage: below the free-space reserve the delivery is nacked back to the broker and
//! consumption stops until space returns (checked with statvfs, nothing written); a write or
//! flush that fails or stalls nacks the delivery and stops the daemon with exit status 75 for
//! its service manager to restart it (sled's errors are sticky until it is reopened). A lost
//! broker is reconnected with exponential backoff (topology re-declared, prefetch re-applied —
//! a fresh connection each time, so nothing depends on lapin's recovery).

use crate::base::error::{Error, Result};
use crate::daemon::broker::{self, publish_confirmed, Backoff};

use super::Shared;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use plip_ingest::dead_letter::{
    bounded_outcome, check_headers, clip, cut, dead_letter_properties, MAX_ECHO_BYTES,
    MAX_MESSAGE_BYTES,
};
use plip_ingest::wire::{
    parse_message, Headers, IngestOutcome, IntakeImage, Parsed, Refusal, RejectedImage, WireError,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// Reads AMQP header values as strings for the wire decoder.
struct AmqpHeaders<'a>(Option<&'a FieldTable>);

impl Headers for AmqpHeaders<'_> {
    fn get_str(&self, name: &str) -> Option<Result<String, ()>> {
        let v = self.0?.inner().get(name)?;
        Some(match v {
            AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).map_err(|_| ()),
            AMQPValue::ShortString(s) => Ok(s.as_str().to_string()),
            _ => Err(()),
        })
    }
}

/// Why the consume loop ended.
enum Stop {
    /// Shutdown requested.
    Shutdown,
    /// The broker connection or channel failed.
    Broker(Error),
    /// Free space fell below the reserve: nothing more may be consumed until it is back.
    Storage(Error),
    /// A write or flush failed or stalled: sled's errors are sticky, so the daemon exits with
    /// [`super::EXIT_STORAGE_FAILED`] for its service manager to restart it.
    StorageFailed(Error),
}

/// Runs ingest until shutdown: connect, consume, and on failure reconnect with backoff or wait
/// for storage to recover.
pub async fn run(shared: Arc<Shared>) {
    // The colour-name table that captions uncaptioned images is built before the first
    // connection (about 0.1 s of one core), not by the first delivery that needs it.
    let _ = tokio::task::spawn_blocking(plip_ingest::captions::prepare_colour_table).await;
    let mut backoff = Backoff::new(&shared.cfg.broker);
    let dir = shared.cfg.state.dir.clone();
    let reserve = shared.cfg.state.min_free_bytes;
    loop {
        if shared.stopping() {
            return;
        }
        let started = std::time::Instant::now();
        // Not even connecting while the disk is below its reserve.
        let stop = match crate::base::disk::check(&dir, reserve, 0) {
            Err(e) => Stop::Storage(e),
            Ok(()) => session(&shared).await,
        };
        {
            let mut st = shared.stats();
            st.consuming = false;
        }
        match stop {
            Stop::Shutdown => return,
            Stop::Broker(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset();
                }
                shared.stats().ingest_paused = Some(format!("broker: {e}"));
                let delay = backoff.delay();
                tracing::warn!(
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    "broker_lost"
                );
                if shared.sleep_or_stop(delay).await {
                    return;
                }
            }
            Stop::StorageFailed(e) => {
                {
                    let mut st = shared.stats();
                    st.storage_error = Some(e.to_string());
                    st.ingest_paused = Some(format!("storage: {e}"));
                }
                tracing::error!(
                    error = %e,
                    status = super::EXIT_STORAGE_FAILED,
                    "storage_failed"
                );
                shared.fail(super::EXIT_STORAGE_FAILED);
                return;
            }
            Stop::Storage(e) => {
                {
                    let mut st = shared.stats();
                    st.storage_error = Some(e.to_string());
                    st.ingest_paused = Some(format!("storage: {e}"));
                }
                tracing::error!(error = %e, "storage_paused");
                // Check the free space until it is back above the reserve; consumption stays
                // stopped meanwhile (nothing is written to probe: the check reads statvfs).
                let wait = Duration::from_millis(500);
                loop {
                    if shared.sleep_or_stop(wait).await {
                        return;
                    }
                    match crate::base::disk::check(&dir, reserve, 0) {
                        Ok(()) => break,
                        Err(e) => shared.stats().storage_error = Some(e.to_string()),
                    }
                }
                shared.stats().storage_error = None;
                tracing::info!("storage_recovered");
                backoff.reset();
            }
        }
    }
}

/// One connection's life: returns why it ended.
async fn session(shared: &Arc<Shared>) -> Stop {
    let cfg = &shared.cfg;
    let conn = match broker::connect(&cfg.broker).await {
        Ok(c) => c,
        Err(e) => return Stop::Broker(e),
    };
    let result = consume(shared, &conn).await;
    broker::close(&conn, "plipd ingest closing").await;
    result
}

async fn setup(shared: &Arc<Shared>, conn: &Connection) -> Result<Channel> {
    let cfg = &shared.cfg;
    let channel = conn.create_channel().await?;
    cfg.topology.declare(&channel).await?;
    // lapin's own recovery would not restore the prefetch; a fresh connection sets it each time.
    channel
        .basic_qos(cfg.broker.prefetch, BasicQosOptions::default())
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

async fn consume(shared: &Arc<Shared>, conn: &Connection) -> Stop {
    let channel = match setup(shared, conn).await {
        Ok(c) => c,
        Err(e) => return Stop::Broker(e),
    };
    let frame_max = conn.configuration().frame_max();
    let tag = format!("plipd-ingest-{}", std::process::id());
    let mut consumer = match channel
        .basic_consume(
            shared.cfg.topology.ingest_queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return Stop::Broker(e.into()),
    };
    {
        let mut st = shared.stats();
        st.consuming = true;
        st.connections += 1;
        st.ingest_paused = None;
    }
    tracing::info!(
        queue = %shared.cfg.topology.ingest_queue,
        prefetch = shared.cfg.broker.prefetch,
        "consuming"
    );
    // Deliveries are handled concurrently; the prefetch bounds how many are in flight.
    let mut inflight: JoinSet<Result<(), Stop>> = JoinSet::new();
    let stop = loop {
        tokio::select! {
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let shared = shared.clone();
                    let channel = channel.clone();
                    inflight.spawn(async move { handle(&shared, &channel, delivery, frame_max).await });
                }
                Some(Err(e)) => break Stop::Broker(e.into()),
                None => break Stop::Broker(Error::Broker("the consumer was cancelled by the broker".into())),
            },
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(stop)) => break stop,
                    Err(e) => break Stop::Broker(Error::Internal(format!("a delivery handler failed: {e}"))),
                }
            }
            _ = shared.stopped() => break Stop::Shutdown,
        }
        if shared.stopping() {
            break Stop::Shutdown;
        }
    };
    // Stop taking new deliveries, then let the ones in flight finish (each acks only what it
    // stored; whatever is left unacked returns to the broker when the channel closes).
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    let mut stop = stop;
    while let Some(done) = inflight.join_next().await {
        match done {
            Ok(Err(Stop::StorageFailed(e))) => stop = Stop::StorageFailed(e),
            Ok(Err(Stop::Storage(e))) if matches!(stop, Stop::Broker(_)) => stop = Stop::Storage(e),
            _ => {}
        }
    }
    stop
}

/// Handles one delivery end to end; `Err` stops the consumer.
async fn handle(
    shared: &Arc<Shared>,
    channel: &Channel,
    delivery: lapin::message::Delivery,
    frame_max: u32,
) -> Result<(), Stop> {
    let limits = shared.cfg.limits;
    let lapin::message::Delivery {
        properties: props,
        data,
        acker,
        ..
    } = delivery;
    let body = Arc::new(data);
    // The header table is measured without recursion before anything copies or walks it: a
    // deep or huge one is refused as a whole and its dead-letter copy goes without it.
    let decoded = match check_headers(props.headers().as_ref()) {
        Err(e) => Err(Refusal(e)),
        Ok(()) => {
            let content_type = props
                .content_type()
                .as_ref()
                .map(|s| s.as_str().to_string());
            let headers = props.headers().clone();
            let body = body.clone();
            tokio::task::spawn_blocking(move || {
                parse_message(
                    content_type.as_deref(),
                    &AmqpHeaders(headers.as_ref()),
                    &body,
                    &limits,
                )
            })
            .await
            .map_err(|e| Stop::Broker(Error::Internal(format!("decoder task failed: {e}"))))?
        }
    };
    let (outcome, dead) = match decoded {
        Err(refusal) => {
            let err = refusal.0;
            let outcome = IngestOutcome {
                batch_id: None,
                accepted: vec![],
                rejected: vec![],
            };
            (outcome, Some((err, vec![])))
        }
        Ok(Parsed {
            batch_id,
            accepted: images,
            mut rejected,
        }) => {
            let ids = match store_images(shared, images, &mut rejected).await {
                Ok(stored) => stored,
                Err(stop) => {
                    // Nothing of this delivery was acknowledged: back to the broker with it
                    // (what was written is found again by id and not stored twice).
                    let _ = acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await;
                    return Err(stop);
                }
            };
            {
                // `stored` and `duplicates` were counted as each image was written.
                let mut st = shared.stats();
                for r in &rejected {
                    *st.rejected.entry(r.code.as_str().to_string()).or_default() += 1;
                }
            }
            let dead = (!rejected.is_empty()).then(|| {
                let first = &rejected[0];
                let err = WireError {
                    code: first.code,
                    message: format!(
                        "{} of {} images refused; first: {}: {}",
                        rejected.len(),
                        rejected.len() + ids.len(),
                        cut(&first.id, MAX_ECHO_BYTES),
                        cut(&first.message, MAX_ECHO_BYTES)
                    ),
                };
                (err, rejected.clone())
            });
            (
                IngestOutcome {
                    batch_id,
                    accepted: ids,
                    rejected,
                },
                dead,
            )
        }
    };
    if let Some((err, images)) = &dead {
        dead_letter(shared, channel, &props, &body, err, images, frame_max).await?;
        let mut st = shared.stats();
        *st.dead_lettered
            .entry(err.code.as_str().to_string())
            .or_default() += 1;
        if images.is_empty() {
            *st.rejected
                .entry(err.code.as_str().to_string())
                .or_default() += 1;
        }
    }
    if let Some(reply_to) = props.reply_to() {
        let mut outcome = outcome;
        if let (Some((err, _)), true) = (&dead, outcome.accepted.is_empty()) {
            if outcome.rejected.is_empty() {
                // A message refused as a whole: report it under the message's own id.
                outcome.rejected.push(RejectedImage {
                    id: String::new(),
                    code: err.code,
                    message: err.message.clone(),
                });
            }
        }
        reply(shared, channel, &props, reply_to.as_str(), outcome).await?;
        shared.stats().replies += 1;
    }
    match acker.ack(BasicAckOptions::default()).await {
        Ok(_) => {
            shared.stats().deliveries += 1;
            give_back_decoded_memory(shared);
            Ok(())
        }
        Err(e) => Err(Stop::Broker(Error::Broker(format!("ack failed: {e}")))),
    }
}

/// Pixels decoded since the last trim above which the end of a burst gives memory back.
const TRIM_AFTER_PIXELS: u64 = 4 << 20;

/// When no image is being decoded any more and a burst decoded more than
/// [`TRIM_AFTER_PIXELS`], hands the freed pixel buffers back to the OS: the allocator setting
/// the trainer needs keeps freed memory in the heap otherwise.
fn give_back_decoded_memory(shared: &Shared) {
    use std::sync::atomic::Ordering;
    let budget = usize::try_from(shared.cfg.limits.decoded_pixels_in_flight).unwrap_or(usize::MAX);
    if shared.decoded_since_trim.load(Ordering::Relaxed) < TRIM_AFTER_PIXELS
        || shared.pixels.available_permits() < budget.min(usize::MAX >> 4)
    {
        return;
    }
    let pixels = shared.decoded_since_trim.swap(0, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || {
        let before = resident_mib();
        plip_model::runtime::trim_allocator();
        tracing::info!(
            pixels,
            rss_before_mib = before,
            rss_after_mib = resident_mib(),
            "allocator_trimmed"
        );
    });
}

/// This process's resident memory, MiB (0 where /proc is not there).
fn resident_mib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096 / (1 << 20))
}

/// Stores a delivery's checked images: in groups that fit the budget of decoded pixels in
/// flight, each image decoded and its bytes appended to a pack as it goes; then one commit
/// (pack sync, records) and one flush that make them durable. Returns the stored ids (new or
/// already stored, each counted); images that fail to decode join `rejected`.
///
/// # Errors
/// [`Stop::Storage`] when the disk is below its reserve (nothing written), or
/// [`Stop::StorageFailed`] when a write or the flush failed or stalled: the caller nacks.
async fn store_images(
    shared: &Arc<Shared>,
    images: Vec<IntakeImage>,
    rejected: &mut Vec<RejectedImage>,
) -> Result<Vec<String>, Stop> {
    let mut ids = Vec::with_capacity(images.len());
    let mut staged = Vec::with_capacity(images.len());
    if images.is_empty() {
        return Ok(ids);
    }
    let (cfg, limits) = (&shared.cfg.state, shared.cfg.limits);
    // Room for what this delivery may add, above the reserve.
    let need = images.iter().map(|i| i.bytes.len() as u64).sum::<u64>();
    crate::base::disk::check(&cfg.dir, cfg.min_free_bytes, need).map_err(Stop::Storage)?;
    let stall = Duration::from_secs(cfg.stall_timeout_s.max(1));
    let budget = limits.decoded_pixels_in_flight.min(u64::from(u32::MAX));
    // Groups of images whose pixels together fit the budget, each group decoded and stored in
    // one blocking task (one task per image cost more in hand-offs than a small image's
    // decode); deliveries in flight run their groups side by side on both cores.
    let mut rest = images.into_iter().peekable();
    while rest.peek().is_some() {
        let mut group = Vec::new();
        let mut cost = 0u64;
        while let Some(img) =
            rest.next_if(|img| group.is_empty() || cost + img.pixels().clamp(1, budget) <= budget)
        {
            cost += img.pixels().clamp(1, budget);
            group.push(img);
        }
        let permit = shared
            .pixels
            .clone()
            .acquire_many_owned(cost as u32)
            .await
            .map_err(|e| Stop::Broker(Error::Internal(format!("pixel budget closed: {e}"))))?;
        shared
            .decoded_since_trim
            .fetch_add(cost, std::sync::atomic::Ordering::Relaxed);
        let counted = shared.clone();
        let image_limits = limits.image;
        // The group's images are decoded, then their bytes appended to a pack with one write
        // (not durable yet); duplicates are counted here, stored images when their records are
        // committed below.
        let (decoded_ids, refused, stage) = blocking_storage(stall, move || {
            let _permit = permit;
            let (mut valid, mut refused) = (Vec::with_capacity(group.len()), Vec::new());
            for img in group {
                match img.decode(&image_limits) {
                    Ok(v) => valid.push(v),
                    Err(r) => refused.push(r),
                }
            }
            let stage = counted.store.stage_all(&valid)?;
            let duplicates = stage.iter().filter(|s| s.is_none()).count() as u64;
            if duplicates > 0 {
                counted.stats().duplicates += duplicates;
            }
            // The pixels are freed here, inside the budget that was charged for them.
            let ids: Vec<String> = valid.into_iter().map(|v| v.id).collect();
            Ok((ids, refused, stage))
        })
        .await
        .map_err(Stop::StorageFailed)?;
        ids.extend(decoded_ids);
        staged.extend(stage.into_iter().flatten());
        rejected.extend(refused);
    }
    if !ids.is_empty() {
        // One pack sync (shared with the deliveries committing alongside), the records in one
        // transaction, then sled's flush: only then may the delivery be acknowledged. Counted
        // inside the task, which runs to its end even when the delivery's task is dropped (a
        // closed connection); what it wrote is found again by id on redelivery.
        let store = shared.clone();
        blocking_storage(stall, move || {
            let puts = store.store.commit(staged)?;
            {
                let mut st = store.stats();
                for p in puts {
                    if p.fresh {
                        st.stored += 1;
                    } else {
                        st.duplicates += 1;
                    }
                    if p.captioned {
                        st.captioned += 1;
                    }
                }
            }
            store.store.flush()
        })
        .await
        .map_err(Stop::StorageFailed)?;
    }
    Ok(ids)
}

/// Runs a storage call on the blocking pool; one that has not returned after `stall` counts
/// as failed (it is abandoned, and the daemon stops: see [`Stop::StorageFailed`]).
async fn blocking_storage<T: Send + 'static>(
    stall: Duration,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::time::timeout(stall, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(Error::Storage(format!("a storage task failed: {e}"))),
        Err(_) => Err(Error::Storage(format!(
            "a storage write has not returned for {} s (state.stall_timeout_s)",
            stall.as_secs()
        ))),
    }
}

/// Publishes a copy of the delivery (body and properties) on the dead-letter exchange with
/// `x-plip-error` = `{code, message}` (and, for a batch refused in part, `x-plip-rejected` =
/// one `{id, code, message}` per refused image), built by
/// [`plip_ingest::dead_letter::dead_letter_properties`] to fit the frame, and waits for the
/// broker's confirm.
async fn dead_letter(
    shared: &Shared,
    channel: &Channel,
    props: &BasicProperties,
    body: &[u8],
    err: &WireError,
    images: &[RejectedImage],
    frame_max: u32,
) -> Result<(), Stop> {
    let props = dead_letter_properties(props, err, images, frame_max);
    publish_confirmed(channel, &shared.cfg.topology.dlx_exchange, "", body, props)
        .await
        .map_err(Stop::Broker)?;
    tracing::warn!(
        code = err.code.as_str(),
        reason = %clip(&err.message, MAX_MESSAGE_BYTES),
        images = images.len(),
        "dead_lettered"
    );
    Ok(())
}

async fn reply(
    _shared: &Shared,
    channel: &Channel,
    props: &BasicProperties,
    reply_to: &str,
    outcome: IngestOutcome,
) -> Result<(), Stop> {
    let body = serde_json::to_vec(&bounded_outcome(outcome)).map_err(|e| Stop::Broker(e.into()))?;
    let mut out =
        BasicProperties::default().with_content_type(ShortString::from("application/json"));
    if let Some(c) = props.correlation_id() {
        out = out.with_correlation_id(c.clone());
    }
    publish_confirmed(channel, "", reply_to, &body, out)
        .await
        .map_err(Stop::Broker)
}
