//! The daemon's side of the broker, shared by ingest, the request consumer and the model
//! announcements: connecting with the configured TLS settings, the reconnect backoff, and
//! publishing with a confirm.

use crate::base::config::BrokerConfig;
use crate::base::error::{Error, Result};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection};
use std::time::Duration;

/// Opens a connection to the configured broker (`broker.url`, `broker.tls_ca_file`).
///
/// # Errors
/// The broker cannot be reached, refuses the login, or the CA file cannot be read.
pub async fn connect(cfg: &BrokerConfig) -> Result<Connection> {
    Ok(plip_ingest::amqp::connect_tls(&cfg.url, cfg.tls_ca_file.as_deref()).await?)
}

/// Closes a connection, saying why; a connection that is already gone is not an error.
pub async fn close(conn: &Connection, reason: &str) {
    let _ = conn.close(200, reason.into()).await;
}

/// Runs `session` on a fresh connection until it returns `Ok` (shutdown) or the daemon stops.
/// Broker trouble — a failed connect or a session's error — is logged as `event`, handed to
/// `on_error` (for `/status`), and retried after the backoff; a state-folder failure ends it
/// (the supervisor restarts the task). The connection is closed (`closing`) after each session.
///
/// # Errors
/// A state-folder failure.
pub async fn reconnecting<F, Fut>(
    shared: &crate::daemon::Shared,
    closing: &str,
    event: &str,
    mut on_error: impl FnMut(&Error),
    mut session: F,
) -> Result<()>
where
    F: FnMut(std::sync::Arc<Connection>) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut backoff = Backoff::new(&shared.cfg.broker);
    while !shared.stopping() {
        let r = match connect(&shared.cfg.broker).await {
            Ok(conn) => {
                let conn = std::sync::Arc::new(conn);
                let r = session(conn.clone()).await;
                close(&conn, closing).await;
                r
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => return Ok(()),
            Err(Error::State(e)) => return Err(Error::State(e)),
            Err(e) => {
                let delay = backoff.delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "{event}");
                on_error(&e);
                if shared.sleep_or_stop(delay).await {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// The delay before the next reconnect: from `broker.reconnect_min_ms`, doubling after each
/// failure up to `broker.reconnect_max_ms`, back to the minimum after a healthy session.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(cfg: &BrokerConfig) -> Backoff {
        let min = Duration::from_millis(cfg.reconnect_min_ms.max(1));
        let max = Duration::from_millis(cfg.reconnect_max_ms.max(1)).max(min);
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay to wait now (the caller sleeps it); the one after is twice as long.
    pub fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// The delay the next failure waits, without consuming it (for the log line).
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Back to the minimum (after a session that was healthy long enough).
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Publishes and waits for the broker's confirm (the channel is in confirm mode); a nack is an
/// error.
///
/// # Errors
/// The publish or the confirm failed, or the broker refused the message.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<()> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .map_err(|e| Error::Broker(format!("publish to {exchange:?}: {e}")))?
        .await
        .map_err(|e| Error::Broker(format!("confirm from {exchange:?}: {e}")))?;
    if confirm.is_nack() {
        return Err(Error::Broker(format!(
            "the broker refused a message for {exchange:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets() {
        let cfg = BrokerConfig {
            reconnect_min_ms: 100,
            reconnect_max_ms: 500,
            ..BrokerConfig::default()
        };
        let mut b = Backoff::new(&cfg);
        let got: Vec<u64> = (0..5).map(|_| b.delay().as_millis() as u64).collect();
        assert_eq!(got, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
        // A maximum below the minimum is the minimum.
        let mut b = Backoff::new(&BrokerConfig {
            reconnect_min_ms: 300,
            reconnect_max_ms: 10,
            ..BrokerConfig::default()
        });
        assert_eq!(b.delay(), b.delay());
    }
}
