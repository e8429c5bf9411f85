//! AMQP topology (RabbitMQ): the exchanges and queues the daemon declares at start, durable,
//! with the arguments of DESIGN.md section 4. A declaration that conflicts with an existing
//! object (RabbitMQ answers `PRECONDITION_FAILED`) is reported naming the object.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::{Deserialize, Serialize};

/// Queue implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    Classic,
    Quorum,
}

/// Names and queue arguments; defaults are the documented names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    /// Fanout exchange producers publish image batches to.
    pub ingest_exchange: String,
    /// Queue the daemon consumes image batches from.
    pub ingest_queue: String,
    /// Fanout exchange of ReID requests.
    pub reid_exchange: String,
    /// Queue of ReID requests.
    pub reid_queue: String,
    /// Fanout exchange for replies to requests without `reply_to`.
    pub results_exchange: String,
    /// Fanout exchange announcing promoted model versions.
    pub models_exchange: String,
    /// Dead-letter exchange.
    pub dlx_exchange: String,
    /// Queue holding dead-lettered messages.
    pub dead_queue: String,
    /// `x-queue-type` of the queues.
    pub queue_type: QueueType,
    /// `x-delivery-limit` (quorum queues only): the broker's poison-message guard.
    pub delivery_limit: Option<u32>,
    /// Optional `x-max-length` of the ingest and request queues.
    pub max_length: Option<u32>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            ingest_exchange: "plip.ingest".into(),
            ingest_queue: "plip.ingest".into(),
            reid_exchange: "plip.reid".into(),
            reid_queue: "plip.reid.requests".into(),
            results_exchange: "plip.results".into(),
            models_exchange: "plip.models".into(),
            dlx_exchange: "plip.dlx".into(),
            dead_queue: "plip.dead".into(),
            queue_type: QueueType::Classic,
            delivery_limit: Some(20),
            max_length: None,
        }
    }
}

/// A topology problem.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot declare {object}: it exists with other settings ({detail}); delete it or change the configuration")]
    Mismatch { object: String, detail: String },
    #[error("cannot declare {object}: {source}")]
    Broker {
        object: String,
        source: lapin::Error,
    },
    #[error("cannot connect to the broker: {0}")]
    Connect(lapin::Error),
    #[error("cannot read the broker's CA certificate file {path}: {error}")]
    CaFile { path: String, error: String },
}

/// The environment variable naming a PEM file of CA certificates that `amqps://` broker
/// certificates are checked against (in addition to the system's roots). It is the same name
/// that overrides the daemon's `broker.tls_ca_file`, so the command-line clients and the daemon
/// read one setting.
pub const CA_FILE_ENV: &str = "PLIP__BROKER__TLS_CA_FILE";

/// Connects with the tokio runtime of the caller; an `amqps://` URL is checked against the
/// system's roots plus the CA file named by [`CA_FILE_ENV`], when set.
///
/// # Errors
/// The broker cannot be reached, refuses the credentials or its certificate, or the CA file
/// cannot be read.
pub async fn connect(url: &str) -> Result<Connection, TopologyError> {
    let ca = std::env::var_os(CA_FILE_ENV).filter(|v| !v.is_empty());
    connect_tls(url, ca.as_deref().map(std::path::Path::new)).await
}

/// As [`connect`], with the CA file given explicitly (`None`: the system's roots only).
///
/// # Errors
/// As [`connect`].
pub async fn connect_tls(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<Connection, TopologyError> {
    let mut tls = lapin::tcp::OwnedTLSConfig::default();
    if let Some(path) = ca_file {
        let pem = std::fs::read_to_string(path).map_err(|e| TopologyError::CaFile {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(TopologyError::CaFile {
                path: path.display().to_string(),
                error: "no PEM certificate in it".into(),
            });
        }
        tls.cert_chain = Some(pem);
    }
    Connection::connect_with_config(
        url,
        ConnectionProperties::default(),
        tls,
        async_rs::Runtime::tokio_current(),
    )
    .await
    .map_err(TopologyError::Connect)
}

fn classify(object: String, e: lapin::Error) -> TopologyError {
    let text = e.to_string();
    if text.contains("PRECONDITION") || text.contains("inequivalent") {
        TopologyError::Mismatch {
            object,
            detail: text,
        }
    } else {
        TopologyError::Broker { object, source: e }
    }
}

impl Topology {
    /// The default names with `.suffix` appended to every exchange and queue: a private
    /// topology on a shared broker (tests, benchmarks).
    pub fn with_suffix(suffix: &str) -> Self {
        let d = Topology::default();
        Topology {
            ingest_exchange: format!("{}.{suffix}", d.ingest_exchange),
            ingest_queue: format!("{}.{suffix}", d.ingest_queue),
            reid_exchange: format!("{}.{suffix}", d.reid_exchange),
            reid_queue: format!("{}.{suffix}", d.reid_queue),
            results_exchange: format!("{}.{suffix}", d.results_exchange),
            models_exchange: format!("{}.{suffix}", d.models_exchange),
            dlx_exchange: format!("{}.{suffix}", d.dlx_exchange),
            dead_queue: format!("{}.{suffix}", d.dead_queue),
            ..d
        }
    }

    /// `PLIP__TOPOLOGY__…` environment variables that give a daemon these names.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("INGEST_EXCHANGE", &self.ingest_exchange),
            ("INGEST_QUEUE", &self.ingest_queue),
            ("REID_EXCHANGE", &self.reid_exchange),
            ("REID_QUEUE", &self.reid_queue),
            ("RESULTS_EXCHANGE", &self.results_exchange),
            ("MODELS_EXCHANGE", &self.models_exchange),
            ("DLX_EXCHANGE", &self.dlx_exchange),
            ("DEAD_QUEUE", &self.dead_queue),
        ]
        .into_iter()
        .map(|(k, v)| (format!("PLIP__TOPOLOGY__{k}"), v.clone()))
        .collect()
    }

    /// The five exchanges.
    pub fn exchanges(&self) -> [&String; 5] {
        [
            &self.ingest_exchange,
            &self.reid_exchange,
            &self.results_exchange,
            &self.models_exchange,
            &self.dlx_exchange,
        ]
    }

    /// Deletes every queue and exchange of this topology (errors ignored: best effort).
    pub async fn delete(&self, channel: &Channel) {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        for q in [&self.ingest_queue, &self.reid_queue, &self.dead_queue] {
            let _ = channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for ex in self.exchanges() {
            let _ = channel
                .exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }

    fn queue_args(&self, dead_letter: bool) -> FieldTable {
        let mut t = FieldTable::default();
        let kind = match self.queue_type {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        };
        t.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
        if dead_letter {
            t.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.dlx_exchange.as_str().into()),
            );
            if let Some(n) = self.max_length {
                t.insert("x-max-length".into(), AMQPValue::LongLongInt(i64::from(n)));
            }
            if let (QueueType::Quorum, Some(n)) = (self.queue_type, self.delivery_limit) {
                t.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongLongInt(i64::from(n)),
                );
            }
        }
        t
    }

    /// Declares every exchange, queue and binding (idempotent when nothing conflicts).
    ///
    /// # Errors
    /// The first object that conflicts with an existing one, named.
    pub async fn declare(&self, channel: &Channel) -> Result<(), TopologyError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for ex in self.exchanges() {
            channel
                .exchange_declare(
                    ex.as_str().into(),
                    ExchangeKind::Fanout,
                    durable,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| classify(format!("exchange {ex}"), e))?;
        }
        let queues = [
            (&self.ingest_queue, &self.ingest_exchange, true),
            (&self.reid_queue, &self.reid_exchange, true),
            (&self.dead_queue, &self.dlx_exchange, false),
        ];
        for (q, ex, dead_letter) in queues {
            channel
                .queue_declare(
                    q.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    self.queue_args(dead_letter),
                )
                .await
                .map_err(|e| classify(format!("queue {q}"), e))?;
            channel
                .queue_bind(
                    q.as_str().into(),
                    ex.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| classify(format!("binding {ex} → {q}"), e))?;
        }
        Ok(())
    }
}
