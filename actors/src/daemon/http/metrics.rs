//! `/metrics`: the Prometheus text exposition of the daemon's counters and gauges.

use super::figures::StorageFigures;
use crate::daemon::Shared;

/// Prometheus text exposition of the daemon's counters (names prefixed `plip_`).
pub fn metrics(shared: &Shared, figures: &StorageFigures, fresh: bool) -> String {
    use std::fmt::Write;
    let st = shared.stats().clone();
    let counts = figures.counts;
    let serving = shared.serving_snapshot();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    let by = |label: &str, m: &std::collections::BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| (format!("{{{label}=\"{k}\"}}"), *v as f64))
            .collect::<Vec<_>>()
    };
    metric(
        "plip_broker_connected",
        "gauge",
        "1 while consuming from the broker.",
        one(f64::from(u8::from(st.consuming))),
    );
    for c in crate::daemon::stats::COUNTERS {
        metric(c.metric, "counter", c.help, one((c.read)(&st) as f64));
    }
    if shared.cfg.role == crate::base::config::Role::Server {
        let f = &st.follower;
        metric(
            "plip_follower_connected",
            "gauge",
            "1 while following the models and gallery logs.",
            one(f64::from(u8::from(f.connected))),
        );
        metric(
            "plip_follower_caught_up",
            "gauge",
            "1 once caught up with the logs' heads the trainer announced.",
            one(f64::from(u8::from(f.caught_up))),
        );
        metric(
            "plip_follower_gallery_lag",
            "gauge",
            "Gallery-log entries the trainer appended that this server has not applied (-1: no head heard yet).",
            one(f.gallery_lag.map_or(-1.0, |l| l as f64)),
        );
        metric(
            "plip_follower_model_version",
            "gauge",
            "The model version received whole from the models log (-1: none).",
            one(f.model_version.map_or(-1.0, |v| v as f64)),
        );
    }
    metric(
        "plip_ingest_rejected_total",
        "counter",
        "Images or messages refused, by code.",
        by("code", &st.rejected),
    );
    metric(
        "plip_dead_lettered_total",
        "counter",
        "Messages dead-lettered with a reason, by code.",
        by("code", &st.dead_lettered),
    );
    metric(
        "plip_storage_failing",
        "gauge",
        "1 while writes to the state folder fail.",
        one(f64::from(u8::from(st.storage_error.is_some()))),
    );
    metric(
        "plip_storage_responding",
        "gauge",
        "1 when the state folder answered this scrape's reads in time (0: the sample figures are the last known).",
        one(f64::from(u8::from(fresh))),
    );
    metric(
        "plip_samples",
        "gauge",
        "Stored samples by purpose (probe: set aside for evaluation).",
        vec![
            ("{purpose=\"train\"}".into(), counts.train as f64),
            ("{purpose=\"gallery\"}".into(), counts.gallery as f64),
            ("{purpose=\"both\"}".into(), counts.both as f64),
            ("{purpose=\"probe\"}".into(), counts.probe as f64),
        ],
    );
    metric(
        "plip_samples_uncaptioned",
        "gauge",
        "Samples waiting for captions.",
        one(figures.uncaptioned as f64),
    );
    let t = &st.trainer;
    metric(
        "plip_train_step",
        "gauge",
        "Optimiser steps taken.",
        one(t.step as f64),
    );
    metric(
        "plip_train_images_seen",
        "gauge",
        "Images trained on.",
        one(t.images_seen as f64),
    );
    let mut losses = Vec::new();
    for (task, v) in [
        ("total", t.loss),
        ("ivlc", t.ivlc),
        ("iap", t.iap),
        ("tic", t.tic),
        ("triplet", t.triplet),
        ("supcon", t.supcon),
        ("id", t.id),
        ("text_id", t.text_id),
        ("proto", t.proto),
        ("text_align", t.text_align),
        ("attr", t.attr),
        ("text_attr", t.text_attr),
        ("text_substeps", t.text_substeps),
    ] {
        if let Some(v) = v {
            losses.push((format!("{{task=\"{task}\"}}"), v));
        }
    }
    metric(
        "plip_train_loss",
        "gauge",
        "Loss of the last step, by task.",
        losses,
    );
    metric(
        "plip_train_steps_per_second",
        "gauge",
        "Training steps per second (recent).",
        one(t.steps_per_s.unwrap_or(0.0)),
    );
    metric(
        "plip_train_images_per_second",
        "gauge",
        "Training images per second (recent).",
        one(t.images_per_s.unwrap_or(0.0)),
    );
    metric(
        "plip_checkpoints_written_total",
        "counter",
        "Checkpoints written.",
        one(t.checkpoints_written as f64),
    );
    metric(
        "plip_promotions_total",
        "counter",
        "Checkpoints promoted to serving.",
        one(st.serving.promotions as f64),
    );
    metric(
        "plip_promotions_refused_total",
        "counter",
        "Checkpoints refused by the gate.",
        one(st.serving.refused as f64),
    );
    metric(
        "plip_serving_version",
        "gauge",
        "Checkpoint version serving (0: none).",
        one(serving.as_ref().map_or(0.0, |s| s.version as f64)),
    );
    metric(
        "plip_gallery_size",
        "gauge",
        "Gallery images searchable.",
        one(serving.as_ref().map_or(0.0, |s| s.rows.len() as f64)),
    );
    metric(
        "plip_reid_answered_total",
        "counter",
        "ReID requests answered with matches.",
        one(st.serving.answered as f64),
    );
    metric(
        "plip_reid_errors_total",
        "counter",
        "ReID requests answered with an error, by code.",
        by("code", &st.serving.errors),
    );
    let mut hist = Vec::new();
    let mut cum = 0u64;
    for (i, b) in crate::daemon::LATENCY_BUCKETS.iter().enumerate() {
        cum += st.serving.latency_buckets.get(i).copied().unwrap_or(0);
        hist.push((format!("_bucket{{le=\"{b}\"}}"), cum as f64));
    }
    cum += st.serving.latency_buckets.last().copied().unwrap_or(0);
    hist.push(("_bucket{le=\"+Inf\"}".into(), cum as f64));
    hist.push(("_sum".into(), st.serving.latency_sum));
    hist.push(("_count".into(), st.serving.latency_count as f64));
    metric(
        "plip_reid_request_seconds",
        "histogram",
        "Time the daemon spent on a ReID request.",
        hist,
    );
    let restarts: u64 = st.restarts.values().sum();
    metric(
        "plip_child_restarts_total",
        "counter",
        "Supervised children restarted.",
        one(restarts as f64),
    );
    out
}
