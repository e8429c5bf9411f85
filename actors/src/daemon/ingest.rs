//! The ingest consumer: owns the broker connection, declares the topology, applies the prefetch
//! and consumes `plip.ingest`.
//!
//! Per delivery: decode and validate (on the blocking pool) → store the good images and flush
//! (blocking pool) → dead-letter a copy when something was refused (`x-plip-error` header,
//! publisher-confirmed) → the ingest outcome to `reply_to` (confirmed) → ack. A storage failure
//! nacks the delivery back to the broker, cancels consumption and waits until a write succeeds
//! again; a lost broker is reconnected with exponential backoff (topology re-declared, prefetch
//! re-applied — a fresh connection each time, so nothing depends on lapin's recovery).

use super::Shared;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use plip_ingest::amqp::connect_tls;
use plip_ingest::wire::{
    decode_message, Decoded, Headers, IngestOutcome, RejectedImage, WireError,
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
    Broker(String),
    /// A write to the state folder failed: nothing more may be consumed until it works again.
    Storage(String),
}

/// Runs ingest until shutdown: connect, consume, and on failure reconnect with backoff or wait
/// for storage to recover.
pub async fn run(shared: Arc<Shared>) {
    let min = Duration::from_millis(shared.cfg.broker.reconnect_min_ms.max(1));
    let max = Duration::from_millis(shared.cfg.broker.reconnect_max_ms.max(1));
    let mut delay = min;
    loop {
        if shared.stopping() {
            return;
        }
        let started = std::time::Instant::now();
        let stop = session(&shared).await;
        {
            let mut st = shared.stats();
            st.consuming = false;
        }
        match stop {
            Stop::Shutdown => return,
            Stop::Broker(e) => {
                if started.elapsed() > Duration::from_secs(30) {
                    delay = min;
                }
                shared.stats().ingest_paused = Some(format!("broker: {e}"));
                tracing::warn!(
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    "broker_lost"
                );
                if shared.sleep_or_stop(delay).await {
                    return;
                }
                delay = (delay * 2).min(max);
            }
            Stop::Storage(e) => {
                shared.stats().storage_error = Some(e.clone());
                shared.stats().ingest_paused = Some(format!("storage: {e}"));
                tracing::error!(error = %e, "storage_failed");
                // Probe until a write succeeds; consumption stays stopped meanwhile.
                let mut wait = min.max(Duration::from_millis(500));
                loop {
                    if shared.sleep_or_stop(wait).await {
                        return;
                    }
                    let store = shared.store.clone();
                    let ok = tokio::task::spawn_blocking(move || store.probe_write())
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r);
                    match ok {
                        Ok(()) => break,
                        Err(e) => shared.stats().storage_error = Some(e),
                    }
                    wait = (wait * 2).min(max);
                }
                shared.stats().storage_error = None;
                tracing::info!("storage_recovered");
                delay = min;
            }
        }
    }
}

/// One connection's life: returns why it ended.
async fn session(shared: &Arc<Shared>) -> Stop {
    let cfg = &shared.cfg;
    let conn = match connect_tls(&cfg.broker.url, cfg.broker.tls_ca_file.as_deref()).await {
        Ok(c) => c,
        Err(e) => return Stop::Broker(e.to_string()),
    };
    let result = consume(shared, &conn).await;
    let _ = conn.close(200, "plipd ingest closing".into()).await;
    result
}

async fn setup(shared: &Arc<Shared>, conn: &Connection) -> Result<Channel, String> {
    let cfg = &shared.cfg;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    cfg.topology
        .declare(&channel)
        .await
        .map_err(|e| e.to_string())?;
    // lapin's own recovery would not restore the prefetch; a fresh connection sets it each time.
    channel
        .basic_qos(cfg.broker.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(channel)
}

async fn consume(shared: &Arc<Shared>, conn: &Connection) -> Stop {
    let channel = match setup(shared, conn).await {
        Ok(c) => c,
        Err(e) => return Stop::Broker(e),
    };
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
        Err(e) => return Stop::Broker(e.to_string()),
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
                    inflight.spawn(async move { handle(&shared, &channel, delivery).await });
                }
                Some(Err(e)) => break Stop::Broker(e.to_string()),
                None => break Stop::Broker("the consumer was cancelled by the broker".into()),
            },
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(stop)) => break stop,
                    Err(e) => break Stop::Broker(format!("a delivery handler failed: {e}")),
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
        if let Ok(Err(Stop::Storage(e))) = done {
            if !matches!(stop, Stop::Shutdown) {
                stop = Stop::Storage(e);
            }
        }
    }
    stop
}

/// Handles one delivery end to end; `Err` stops the consumer.
async fn handle(
    shared: &Arc<Shared>,
    channel: &Channel,
    delivery: lapin::message::Delivery,
) -> Result<(), Stop> {
    let limits = shared.cfg.limits;
    let props = delivery.properties.clone();
    let body = Arc::new(delivery.data);
    let content_type = props
        .content_type()
        .as_ref()
        .map(|s| s.as_str().to_string());
    let headers = props.headers().clone();
    let decoded = {
        let body = body.clone();
        tokio::task::spawn_blocking(move || {
            decode_message(
                content_type.as_deref(),
                &AmqpHeaders(headers.as_ref()),
                &body,
                &limits,
            )
        })
        .await
        .map_err(|e| Stop::Broker(format!("decoder task failed: {e}")))?
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
        Ok(Decoded {
            batch_id,
            accepted,
            rejected,
        }) => {
            let store = shared.store.clone();
            let images = accepted;
            let ids: Vec<String> = images.iter().map(|i| i.id.clone()).collect();
            let fresh = if images.is_empty() {
                Ok(vec![])
            } else {
                tokio::task::spawn_blocking(move || store.put_batch(&images))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
            };
            let fresh = match fresh {
                Ok(f) => f,
                Err(e) => {
                    // Nothing of this delivery was acknowledged: back to the broker with it.
                    let _ = delivery
                        .acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await;
                    return Err(Stop::Storage(e));
                }
            };
            {
                let mut st = shared.stats();
                let new = fresh.iter().filter(|&&f| f).count() as u64;
                st.stored += new;
                st.duplicates += fresh.len() as u64 - new;
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
                        first.id,
                        first.message
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
        dead_letter(shared, channel, &props, &body, err, images).await?;
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
        reply(shared, channel, &props, reply_to.as_str(), &outcome).await?;
        shared.stats().replies += 1;
    }
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(_) => {
            shared.stats().deliveries += 1;
            Ok(())
        }
        Err(e) => Err(Stop::Broker(format!("ack failed: {e}"))),
    }
}

fn error_table(err: &WireError) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "code".into(),
        AMQPValue::LongString(err.code.as_str().into()),
    );
    t.insert(
        "message".into(),
        AMQPValue::LongString(err.message.as_str().into()),
    );
    t
}

/// Publishes a copy of the delivery (body and properties) on the dead-letter exchange with
/// `x-plip-error` = `{code, message}` (and, for a batch refused in part, `x-plip-rejected` =
/// one `{id, code, message}` per refused image), and waits for the broker's confirm.
async fn dead_letter(
    shared: &Shared,
    channel: &Channel,
    props: &BasicProperties,
    body: &[u8],
    err: &WireError,
    images: &[RejectedImage],
) -> Result<(), Stop> {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        "x-plip-error".into(),
        AMQPValue::FieldTable(error_table(err)),
    );
    if !images.is_empty() {
        let list: Vec<AMQPValue> = images
            .iter()
            .map(|r| {
                let mut t = error_table(&WireError {
                    code: r.code,
                    message: r.message.clone(),
                });
                t.insert("id".into(), AMQPValue::LongString(r.id.as_str().into()));
                AMQPValue::FieldTable(t)
            })
            .collect();
        headers.insert(
            "x-plip-rejected".into(),
            AMQPValue::FieldArray(FieldArray::from(list)),
        );
    }
    let props = props.clone().with_headers(headers).with_delivery_mode(2);
    publish_confirmed(channel, &shared.cfg.topology.dlx_exchange, "", body, props)
        .await
        .map_err(Stop::Broker)?;
    tracing::warn!(
        code = err.code.as_str(),
        reason = %err.message,
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
    outcome: &IngestOutcome,
) -> Result<(), Stop> {
    let body = serde_json::to_vec(outcome).map_err(|e| Stop::Broker(e.to_string()))?;
    let mut out =
        BasicProperties::default().with_content_type(ShortString::from("application/json"));
    if let Some(c) = props.correlation_id() {
        out = out.with_correlation_id(c.clone());
    }
    publish_confirmed(channel, "", reply_to, &body, out)
        .await
        .map_err(Stop::Broker)
}

/// Publishes and waits for the broker's confirm; a nack is an error.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), String> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .map_err(|e| format!("publish to {exchange:?}: {e}"))?
        .await
        .map_err(|e| format!("confirm from {exchange:?}: {e}"))?;
    if confirm.is_nack() {
        return Err(format!("the broker refused a message for {exchange:?}"));
    }
    Ok(())
}
