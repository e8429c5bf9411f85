//! The daemon's live counters and states: what `/status` reports and `/metrics` exports.
//!
//! The scalar counters are declared once, in [`COUNTERS`] (JSON key under `ingest`, metric
//! name, help text, and how to read it): `/status` and `/metrics` both render that table, so a
//! new counter is its field in [`Stats`] and one line there.

use serde::Serialize;
use std::collections::BTreeMap;

/// One scalar counter of [`Stats`], as `/status` and `/metrics` show it.
pub struct Counter {
    /// Key in `/status`'s `ingest` object.
    pub key: &'static str,
    /// Prometheus metric name.
    pub metric: &'static str,
    pub help: &'static str,
    pub read: fn(&Stats) -> u64,
}

/// Every scalar counter of [`Stats`].
pub const COUNTERS: &[Counter] = &[
    Counter {
        key: "connections",
        metric: "plip_broker_connections_total",
        help: "Broker connections made (1 + reconnects).",
        read: |s| s.connections,
    },
    Counter {
        key: "deliveries",
        metric: "plip_ingest_deliveries_total",
        help: "Ingest deliveries handled and acked.",
        read: |s| s.deliveries,
    },
    Counter {
        key: "stored",
        metric: "plip_ingest_stored_total",
        help: "Images stored for the first time.",
        read: |s| s.stored,
    },
    Counter {
        key: "duplicates",
        metric: "plip_ingest_duplicates_total",
        help: "Images whose id was already stored.",
        read: |s| s.duplicates,
    },
    Counter {
        key: "replies",
        metric: "plip_ingest_replies_total",
        help: "Ingest outcomes sent to producers (reply_to).",
        read: |s| s.replies,
    },
    Counter {
        key: "captioned",
        metric: "plip_captioned_total",
        help:
            "Samples the daemon captioned (at intake, or by the caption workers for older records).",
        read: |s| s.captioned,
    },
    Counter {
        key: "evicted",
        metric: "plip_samples_evicted_total",
        help: "Training samples evicted by the training-sample cap.",
        read: |s| s.evicted,
    },
];

/// Counters and states the status endpoint reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Connected to the broker and consuming.
    pub consuming: bool,
    /// Why ingest is paused, when it is (broker lost, storage failing).
    pub ingest_paused: Option<String>,
    /// Storage failure that stopped consumption, if any.
    pub storage_error: Option<String>,
    /// Broker connections made (1 + reconnects).
    pub connections: u64,
    /// Deliveries handled (acked).
    pub deliveries: u64,
    /// Images stored for the first time.
    pub stored: u64,
    /// Images whose id was already stored (redeliveries, re-sends).
    pub duplicates: u64,
    /// Images refused, by code.
    pub rejected: BTreeMap<String, u64>,
    /// Messages dead-lettered (copy on the dead-letter exchange), by code.
    pub dead_lettered: BTreeMap<String, u64>,
    /// Ingest outcomes sent to producers.
    pub replies: u64,
    /// Samples the daemon captioned (at intake; or, for records of earlier versions, by the
    /// caption workers).
    pub captioned: u64,
    /// Samples evicted by the training-sample cap.
    pub evicted: u64,
    /// The trainer.
    pub trainer: TrainerStats,
    /// The ReID server.
    pub serving: ServingStats,
    /// Child restarts by the supervisor, by child.
    pub restarts: BTreeMap<String, u64>,
    /// The last model version appended to the models log (`[streams]`).
    pub models_logged: Option<u64>,
    /// Why the logs cannot be written now, when they cannot.
    pub models_log_error: Option<String>,
    /// The first arrival not yet considered for the gallery log (every gallery sample before
    /// it is in the log).
    pub gallery_logged_seq: u64,
    /// Entries appended to the gallery log.
    pub gallery_entries_logged: u64,
    /// The last complete gallery snapshot a manifest names.
    pub snapshot: Option<crate::daemon::logs::SnapshotRef>,
    /// A server's following of the logs.
    pub follower: FollowerStats,
}

/// A server's following of the models and gallery logs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FollowerStats {
    /// Consuming both logs now.
    pub connected: bool,
    /// Why not, when not.
    pub error: Option<String>,
    /// The next offset to read on the models log.
    pub models_offset: Option<u64>,
    /// The next offset to read on the gallery log.
    pub gallery_offset: Option<u64>,
    /// The last model version received whole and verified.
    pub model_version: Option<u64>,
    /// Gallery entries applied since start.
    pub gallery_entries: u64,
    /// Model chunks refused (damaged, out of place).
    pub chunks_refused: u64,
    /// The ordinal of the last gallery entry applied.
    pub gallery_applied: u64,
    /// The last heads the trainer announced, when one has been heard.
    pub heads: Option<crate::daemon::logs::Heads>,
    /// Gallery entries the trainer has appended that this server has not applied yet.
    pub gallery_lag: Option<u64>,
    /// Has been caught up with the announced heads once (latched: `/readyz` waits for it).
    pub caught_up: bool,
    /// The manifest this server started from (an empty state folder), when there was one.
    pub started_from: Option<crate::daemon::logs::Manifest>,
    /// A manifest's snapshot was not found where it said (expired): replayed from the first
    /// offsets instead.
    pub manifest_refused: bool,
}

impl FollowerStats {
    /// Recomputes the lag from the heads and what was applied; latches `caught_up` when the
    /// gallery is applied up to the head and the head model is the one followed.
    pub fn update_lag(&mut self) {
        let Some(h) = self.heads else { return };
        let lag = h.gallery_entries.saturating_sub(self.gallery_applied);
        self.gallery_lag = Some(lag);
        if lag == 0 && (h.model.is_none() || h.model == self.model_version) {
            self.caught_up = true;
        }
    }
}

/// The ReID server's counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServingStats {
    pub promotions: u64,
    pub refused: u64,
    pub answered: u64,
    /// Error replies by code.
    pub errors: BTreeMap<String, u64>,
    /// Request latency histogram (seconds): counts per bucket of [`LATENCY_BUCKETS`] (+Inf
    /// last), sum and count.
    pub latency_buckets: Vec<u64>,
    pub latency_sum: f64,
    pub latency_count: u64,
}

/// Upper bounds (seconds) of the request latency histogram.
pub const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl ServingStats {
    /// Records one request's latency.
    pub fn observe(&mut self, seconds: f64) {
        if self.latency_buckets.len() != LATENCY_BUCKETS.len() + 1 {
            self.latency_buckets = vec![0; LATENCY_BUCKETS.len() + 1];
        }
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[i] += 1;
        self.latency_sum += seconds;
        self.latency_count += 1;
    }
}

/// What the trainer is doing (`/status` shows it as a string: `""` before it starts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainerState {
    /// Not started yet.
    #[default]
    #[serde(rename = "")]
    NotStarted,
    /// `trainer.enabled = false`.
    Disabled,
    Starting,
    WaitingForSamples,
    Training,
    /// Nothing new arrived for `trainer.idle_after_s`.
    Idle,
    /// Ended at shutdown (after its last checkpoint).
    Stopped,
    /// Ended with an error, or restarted too often.
    Failed,
}

impl TrainerState {
    /// No trainer thread runs (or will write another checkpoint): the checkpointer may end.
    pub fn ended(self) -> bool {
        matches!(
            self,
            TrainerState::NotStarted
                | TrainerState::Stopped
                | TrainerState::Failed
                | TrainerState::Disabled
        )
    }
}

/// The trainer's live numbers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrainerStats {
    pub state: TrainerState,
    pub step: u64,
    pub images_seen: u64,
    pub loss: Option<f64>,
    pub ivlc: Option<f64>,
    pub iap: Option<f64>,
    pub tic: Option<f64>,
    pub triplet: Option<f64>,
    pub supcon: Option<f64>,
    pub id: Option<f64>,
    pub text_id: Option<f64>,
    pub proto: Option<f64>,
    pub text_align: Option<f64>,
    pub attr: Option<f64>,
    pub text_attr: Option<f64>,
    /// Mean IVLC of the last step's text substeps (`trainer.text_substeps`).
    pub text_substeps: Option<f64>,
    /// Identity-classifier rows zeroed by `forget` since the trainer started.
    pub forgotten_rows: u64,
    pub lr: Option<f64>,
    pub steps_per_s: Option<f64>,
    pub images_per_s: Option<f64>,
    /// Trainable (captioned, non-probe) samples the sampler draws from.
    pub trainable_samples: usize,
    /// Checkpoints postponed because the disk was below its reserve.
    pub checkpoints_postponed: u64,
    pub checkpoints_written: u64,
    pub last_checkpoint: Option<u64>,
    pub last_checkpoint_step: Option<u64>,
    pub resumed_from: Option<u64>,
    /// SHA-256 of the weights and of the optimiser state right after resuming.
    pub resumed_digest: Option<(String, String)>,
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::COUNTERS;

    /// Keys and metric names are unique, and every counter is a Prometheus `_total`.
    #[test]
    fn counters_are_declared_once() {
        let mut keys: Vec<&str> = COUNTERS.iter().map(|c| c.key).collect();
        let mut names: Vec<&str> = COUNTERS.iter().map(|c| c.metric).collect();
        keys.sort_unstable();
        keys.dedup();
        names.sort_unstable();
        names.dedup();
        assert_eq!(keys.len(), COUNTERS.len());
        assert_eq!(names.len(), COUNTERS.len());
        assert!(names
            .iter()
            .all(|n| n.starts_with("plip_") && n.ends_with("_total")));
    }
}
