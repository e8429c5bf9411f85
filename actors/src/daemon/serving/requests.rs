//! The request consumer of `plip.reid.requests`: decode, deadline, answer through the
//! batcher, publish confirmed, ack; dead-letter what cannot be answered.

use crate::base::error::{Error, Result};

use super::batcher::{batcher, Pending};
use crate::daemon::broker::{self, publish_confirmed};
use crate::daemon::Shared;
use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use plip_ingest::dead_letter::{
    bounded_error, check_headers, dead_letter_properties, properties_without_headers,
};
use plip_ingest::reid::{decode_request, ReidErrorReply, ReidReply};
use std::sync::Arc;
use std::time::Instant;
/// The request consumer: runs until shutdown, reconnecting with backoff.
pub async fn requests(shared: Arc<Shared>) -> Result<()> {
    broker::reconnecting(
        &shared,
        "plipd reid closing",
        "reid_broker_lost",
        |_| {},
        |conn| {
            let shared = shared.clone();
            async move { serve(&shared, &conn).await }
        },
    )
    .await
}

async fn serve(shared: &Arc<Shared>, conn: &Connection) -> Result<()> {
    let frame_max = conn.configuration().frame_max();
    let ch = conn.create_channel().await?;
    shared.cfg.topology.declare(&ch).await?;
    ch.basic_qos(shared.cfg.serving.prefetch, BasicQosOptions::default())
        .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            shared.cfg.topology.reid_queue.as_str().into(),
            format!("plipd-reid-{}", std::process::id()).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (btx, brx) =
        tokio::sync::mpsc::channel::<Pending>(usize::from(shared.cfg.serving.prefetch).max(1));
    let batch_task = tokio::spawn(batcher(shared.clone(), brx));
    let _abort_batcher = AbortOnDrop(batch_task);
    let mut inflight = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            next = consumer.next() => match next {
                Some(Ok(d)) => {
                    let shared = shared.clone();
                    let ch = ch.clone();
                    let btx = btx.clone();
                    inflight.spawn(async move { answer(&shared, &ch, &btx, d, frame_max).await });
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(Error::Internal("the request consumer was cancelled".into())),
            },
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                if let Ok(Err(e)) = done {
                    return Err(e);
                }
            }
            _ = shared.stopped() => {
                while inflight.join_next().await.is_some() {}
                return Ok(());
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Answers one request (matches or an error) and acks it.
async fn answer(
    shared: &Arc<Shared>,
    ch: &Channel,
    batcher: &tokio::sync::mpsc::Sender<Pending>,
    d: lapin::message::Delivery,
    frame_max: u32,
) -> Result<()> {
    let t0 = Instant::now();
    let arrived = now_ms();
    // The header table is measured without recursion before anything copies it: a deep or
    // huge one is answered with its code and dead-lettered without it.
    let header_refusal = check_headers(d.properties.headers().as_ref()).err();
    let props = if header_refusal.is_some() {
        properties_without_headers(&d.properties)
    } else {
        d.properties.clone()
    };
    let request_id = props
        .correlation_id()
        .as_ref()
        .map(|c| c.as_str().to_string())
        .unwrap_or_else(|| format!("plipd-{}-{}", std::process::id(), d.delivery_tag));
    let shared2 = shared.clone();
    let body = d.data.clone();
    let ct = props
        .content_type()
        .as_ref()
        .map(|c| c.as_str().to_string());
    // The deadline: AMQP expiration (ms) or deadline_ms, counted from the message timestamp
    // (seconds) when there is one, otherwise from arrival.
    let sent_ms = props.timestamp().map(|s| s * 1000).unwrap_or(arrived);
    let expiration: Option<u64> = props
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse().ok());
    let refused = header_refusal.clone();
    let result = tokio::task::spawn_blocking(move || {
        if let Some(e) = refused {
            return Err(e);
        }
        let limits = shared2.cfg.serving.limits;
        let req = decode_request(ct.as_deref(), &body, &limits)?;
        let budget = req.deadline_ms.or(expiration);
        if let Some(b) = budget {
            if now_ms() > sent_ms.saturating_add(b) {
                return Err(Error::DeadlinePassed { budget_ms: b }.to_wire());
            }
        }
        Ok(req)
    })
    .await?;
    let result = match result {
        Ok(req) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if batcher.send((req, tx)).await.is_err() {
                return Err(Error::Internal("the query batcher is gone".into()));
            }
            rx.await
                .map_err(|_| Error::Internal("the query batcher dropped a request".into()))?
        }
        Err(e) => Err(e),
    };
    let took_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let body = match &result {
        Ok((model_version, gallery_version, matches)) => serde_json::to_vec(&ReidReply {
            request_id: request_id.clone(),
            model_version: *model_version,
            gallery_version: *gallery_version,
            took_ms,
            matches: matches.clone(),
            served_by: Some(shared.instance.clone()),
        }),
        Err(e) => serde_json::to_vec(&ReidErrorReply {
            request_id: request_id.clone(),
            error: bounded_error(e),
        }),
    }?;
    {
        let mut st = shared.stats();
        st.serving.observe(took_ms / 1000.0);
        match &result {
            Ok(_) => st.serving.answered += 1,
            Err(e) => {
                *st.serving
                    .errors
                    .entry(e.code.as_str().to_string())
                    .or_default() += 1
            }
        }
    }
    let out = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_correlation_id(request_id.as_str().into());
    let (exchange, key) = match props.reply_to() {
        Some(r) => (String::new(), r.as_str().to_string()),
        None => (shared.cfg.topology.results_exchange.clone(), String::new()),
    };
    publish_confirmed(ch, &exchange, &key, &body, out).await?;
    if let Some(e) = &header_refusal {
        let copy = dead_letter_properties(&d.properties, e, &[], frame_max);
        publish_confirmed(ch, &shared.cfg.topology.dlx_exchange, "", &d.data, copy).await?;
        tracing::warn!(code = e.code.as_str(), reason = %e.message, "request_dead_lettered");
    }
    d.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}
