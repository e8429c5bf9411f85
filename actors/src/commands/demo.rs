//! `plipd demo`: the whole system on one machine. Starts the daemon (`plipd run` with a
//! built-in configuration: a fresh state folder, the `tiny` preset on the CPU), publishes a
//! stream of synthetic pedestrians (training identities to train on, a disjoint gallery),
//! sends image and text queries as a client would, and shows live progress. It ends after
//! `--minutes` (or on Ctrl-C) with a summary and a report folder: loss curve, CMC curve of the
//! last serving version on the held-out query split, metrics JSON.

use crate::base::client as http;
use crate::base::launch::{DaemonProcess, Launch};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::BasicProperties;
use plip_ingest::amqp::Topology;
use plip_ingest::datasets::Item;
use plip_ingest::synth::{Split, SynthConfig};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error>;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long to run, minutes.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Broker URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub url: String,
    /// Report folder.
    #[arg(long, default_value = "reports/demo")]
    pub out: PathBuf,
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Training identities in the synthetic stream (the gallery has a quarter as many).
    #[arg(long, default_value_t = 200)]
    pub identities: usize,
    /// Images published per second.
    #[arg(long, default_value_t = 40.0)]
    pub rate: f64,
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn batch(items: &[&Item], purpose: &str, prefix: &str) -> Result<Vec<u8>, Error> {
    let images: Vec<serde_json::Value> = items
        .iter()
        .map(|it| {
            let bytes = std::fs::read(&it.path)?;
            let stem = it
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok(serde_json::json!({
                "id": format!("{prefix}{stem}"), "person_id": it.person, "camera_id": it.camera,
                "purpose": purpose, "attributes": it.attributes, "image": b64(&bytes),
            }))
        })
        .collect::<Result<_, Error>>()?;
    Ok(serde_json::json!({"v": 1, "images": images})
        .to_string()
        .into_bytes())
}

/// Runs `plipd demo`.
pub fn run(args: &DemoArgs) -> Result<(), Error> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = tokio::signal::ctrl_c().await;
                });
                stop.store(true, Ordering::SeqCst);
            }
        });
    }
    std::fs::create_dir_all(&args.out)?;
    let work = args.out.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    eprintln!("plipd demo: rendering synthetic pedestrians…");
    let synth = SynthConfig {
        train_ids: args.identities,
        test_ids: (args.identities / 4).max(10),
        ..Default::default()
    };
    plip_ingest::synth::write(&synth, &work.join("data"), |_, _| {})?;
    let ds = plip_ingest::datasets::open(&work.join("data"))?;
    let train: Vec<&Item> = ds
        .items
        .iter()
        .filter(|i| i.split == Some(Split::Train))
        .collect();
    let gallery: Vec<&Item> = ds
        .items
        .iter()
        .filter(|i| i.split == Some(Split::Gallery))
        .collect();
    let queries: Vec<&Item> = ds
        .items
        .iter()
        .filter(|i| i.split == Some(Split::Query))
        .collect();
    let tag = format!("demo{}", std::process::id());
    let topo = Topology::with_suffix(&tag);
    let state = work.join("state");
    let mut env = topo.env();
    for (k, v) in [
        ("PLIP__TRAINER__PRESET", args.preset.clone()),
        (
            "PLIP__TRAINER__MIN_SAMPLES",
            (train.len() / 3).clamp(32, 256).to_string(),
        ),
        ("PLIP__TRAINER__CHECKPOINT_EVERY_STEPS", "25".into()),
        ("PLIP__TRAINER__CHECKPOINT_EVERY_S", "120".into()),
        // A short warm-up: ten minutes on two cores are about 130 steps.
        ("PLIP__TRAINER__WARMUP_STEPS", "20".into()),
        ("PLIP__TRAINER__IDLE_AFTER_S", "0".into()),
        ("PLIP__SERVING__POLL_MS", "1000".into()),
        ("PLIP__STATE__PROBE_PERCENT", "10".into()),
    ] {
        env.push((k.into(), v));
    }
    let mut daemon = DaemonProcess::start(Launch {
        url: &args.url,
        state: &state,
        env,
        log: Some(&args.out.join("daemon.log")),
    })?;
    let addr = daemon.addr().to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let conn = rt.block_on(plip_ingest::amqp::connect(&args.url))?;
    let ch = rt.block_on(conn.create_channel())?;
    rt.block_on(topo.declare(&ch))?;
    rt.block_on(ch.confirm_select(ConfirmSelectOptions::default()))?;
    let publish = |exchange: &str, body: &[u8], props: BasicProperties| -> Result<(), Error> {
        rt.block_on(async {
            ch.basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await?
            .await?;
            Ok::<_, Error>(())
        })
    };
    let json =
        || BasicProperties::default().with_content_type(ShortString::from("application/json"));
    // The gallery first (it is what queries search), then the training stream over time.
    for chunk in gallery.chunks(32) {
        publish(
            &topo.ingest_exchange,
            &batch(chunk, "gallery", "g-")?,
            json(),
        )?;
    }
    let t0 = Instant::now();
    let end = Duration::from_secs_f64(args.minutes * 60.0);
    let mut sent = 0usize;
    let mut losses: Vec<(u64, f64)> = Vec::new();
    let mut asked = (0usize, 0usize);
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let mut last_query = Instant::now();
    let mut k = 0usize;
    eprintln!(
        "plipd demo: daemon at http://{addr}/status, running {:.1} min (Ctrl-C ends it)",
        args.minutes
    );
    while t0.elapsed() < end && !stop.load(Ordering::SeqCst) {
        let due = (t0.elapsed().as_secs_f64() * args.rate) as usize;
        if sent < train.len() && sent < due {
            let n = (due - sent).min(32).min(train.len() - sent);
            publish(
                &topo.ingest_exchange,
                &batch(&train[sent..sent + n], "train", "t-")?,
                json(),
            )?;
            sent += n;
        }
        let s = http::get(&addr, "/status").and_then(Result::ok);
        if let Some(s) = &s {
            if let (Some(step), Some(loss)) =
                (s["trainer"]["step"].as_u64(), s["trainer"]["loss"].as_f64())
            {
                if losses.last().is_none_or(|l| l.0 != step) {
                    losses.push((step, loss));
                }
            }
            // A client's queries: an image of a query-split person, and a text.
            if s["serving"]["version"].is_u64()
                && last_query.elapsed() > Duration::from_secs(5)
                && !queries.is_empty()
            {
                last_query = Instant::now();
                let q = queries[k % queries.len()];
                k += 1;
                let body = serde_json::json!({"query": {"image": b64(&std::fs::read(&q.path)?)}, "top_k": 5, "exclude_camera": q.camera});
                let answer = crate::commands::query::ask(
                    &rt,
                    &ch,
                    &topo.reid_exchange,
                    &body,
                    Duration::from_secs(60),
                )?;
                let top = answer["matches"][0]["person_id"]
                    .as_str()
                    .unwrap_or("-")
                    .to_string();
                asked.0 += 1;
                if Some(top.as_str()) == q.person.as_deref() {
                    asked.1 += 1;
                }
                eprintln!(
                    "  query: image of person {} (camera {}) → top match person {top} ({}), version {}",
                    q.person.as_deref().unwrap_or("?"),
                    q.camera.as_deref().unwrap_or("?"),
                    if Some(top.as_str()) == q.person.as_deref() { "correct" } else { "wrong" },
                    answer["model_version"]
                );
            }
            if last_print.elapsed() > Duration::from_secs(5) {
                last_print = Instant::now();
                eprintln!(
                    "[{:>5.0}s] published {sent}/{} · stored {} · step {} · loss {} · {:.1} img/s · {} (probe Rank-1 {}, mAP {}) · gallery {}",
                    t0.elapsed().as_secs_f64(),
                    train.len(),
                    s["samples"]["total"],
                    s["trainer"]["step"],
                    s["trainer"]["loss"].as_f64().map_or("-".into(), |l| format!("{l:.2}")),
                    s["trainer"]["images_per_s"].as_f64().unwrap_or(0.0),
                    s["serving"]["version"]
                        .as_u64()
                        .map_or("no model yet".to_string(), |v| format!("serving v{v}")),
                    s["serving"]["metrics"]["rank1"].as_f64().map_or("-".into(), |v| format!("{:.1}%", 100.0 * v)),
                    s["serving"]["metrics"]["mAP"].as_f64().map_or("-".into(), |v| format!("{:.1}%", 100.0 * v)),
                    s["serving"]["gallery_size"],
                );
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let final_status = http::get(&addr, "/status")
        .and_then(Result::ok)
        .unwrap_or_default();
    let exit = daemon.stop().ok_or("the daemon's exit status is unknown")?;
    rt.block_on(topo.delete(&ch));
    // The report: loss curve, CMC of the last serving version on the held-out split, metrics.
    if losses.len() >= 2 {
        crate::base::plots::loss_curve(&losses, &args.out.join("loss.png"))?;
    }
    let mut eval = serde_json::Value::Null;
    if let Ok(lm) = crate::base::model::from_state(&state, None) {
        let (q, _) = crate::base::data::load(
            &ds.items
                .iter()
                .filter(|i| i.split == Some(Split::Query))
                .cloned()
                .collect::<Vec<_>>(),
            lm.model.preset(),
            &Default::default(),
            0,
        );
        let (g, _) = crate::base::data::load(
            &ds.items
                .iter()
                .filter(|i| i.split == Some(Split::Gallery))
                .cloned()
                .collect::<Vec<_>>(),
            lm.model.preset(),
            &Default::default(),
            0,
        );
        if let Ok((reid, text)) = crate::base::retrieval::evaluate_model(&lm, &q, &g, 20) {
            crate::base::plots::cmc_curve(
                &[("serving model", &reid.cmc)],
                &args.out.join("cmc.png"),
            )?;
            eval = serde_json::json!({"version": lm.checkpoint.as_ref().map(|c| c.version), "rank1": reid.cmc[0], "mAP": reid.map, "mINP": reid.minp, "text_r1": text.r1, "text_mAP": text.map});
        }
    }
    let summary = serde_json::json!({
        "minutes": t0.elapsed().as_secs_f64() / 60.0, "published": sent + gallery.len(),
        "stored": final_status["samples"]["total"], "steps": final_status["trainer"]["step"],
        "last_loss": final_status["trainer"]["loss"], "images_per_s": final_status["trainer"]["images_per_s"],
        "checkpoints": final_status["trainer"]["checkpoints_written"], "serving_version": final_status["serving"]["version"],
        "promotions": final_status["serving"]["promotions"], "refused": final_status["serving"]["refused"],
        "queries": asked.0, "queries_top1_correct": asked.1,
        "held_out_eval": eval, "daemon_exit": exit.code(),
    });
    std::fs::write(
        args.out.join("metrics.json"),
        serde_json::to_string_pretty(
            &serde_json::json!({"summary": summary, "final_status": final_status}),
        )?,
    )?;
    let _ = std::fs::remove_dir_all(work.join("data"));
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!(
        "plipd demo: report in {} (loss.png, cmc.png, metrics.json, daemon.log)",
        args.out.display()
    );
    Ok(())
}
