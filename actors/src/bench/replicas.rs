//! `plipd bench replicas`: scale-out on one machine. A `trainer` process (training off, one
//! `tiny` checkpoint of untrained weights: speed does not depend on them) takes a gallery of
//! `--gallery` images and writes the models and gallery logs; a first `server` process is
//! started on an empty state folder and timed until it has caught up (the model and every
//! gallery image received, stored and embedded) and serves; then the same load generator
//! (`--concurrency` image requests in flight) runs against one server, and again after a second
//! server has caught up. Every process runs on this machine's cores, so two servers share them.

use super::reid::{checkpoint, image_queries, jpeg_pool, pct, publish_gallery, Client};
use crate::base::launch::{DaemonProcess, Launch};
use crate::base::state::{now_unix, State};
use plip_ingest::amqp::{connect, Topology};
use std::path::Path;
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error>;

#[derive(Debug, Clone, clap::Args)]
pub struct ReplicasBenchArgs {
    /// Broker URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub url: String,
    /// Gallery images.
    #[arg(long, default_value_t = 10_000)]
    pub gallery: usize,
    /// Requests timed per measurement.
    #[arg(long, default_value_t = 400)]
    pub requests: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
}

fn start(
    dir: &Path,
    url: &str,
    env: &[(String, String)],
    role: &str,
) -> Result<DaemonProcess, Error> {
    let mut env = env.to_vec();
    env.push(("PLIP__ROLE".into(), role.into()));
    DaemonProcess::start(Launch {
        url,
        state: &dir.join(format!("state-{role}-{}", now_unix())),
        env,
        log: None,
    })
}

/// Runs `plipd bench replicas`.
pub fn run(args: &ReplicasBenchArgs) -> Result<(), Error> {
    let tag = format!("benchrep{}-{}", std::process::id(), now_unix());
    let dir = std::env::temp_dir().join(format!("plipd-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let topo = Topology::with_suffix(&tag);
    let mut env = topo.env();
    let (models, gallery_log, manifest, heads) = (
        format!("plip.models.log.{tag}"),
        format!("plip.gallery.log.{tag}"),
        format!("plip.logs.manifest.{tag}"),
        format!("plip.logs.head.{tag}"),
    );
    for (k, v) in [
        ("PLIP__TRAINER__ENABLED", "false"),
        ("PLIP__SERVING__POLL_MS", "200"),
        ("PLIP__STREAMS__ENABLED", "true"),
        ("PLIP__STREAMS__MODELS_LOG", models.as_str()),
        ("PLIP__STREAMS__GALLERY_LOG", gallery_log.as_str()),
        ("PLIP__STREAMS__MANIFEST_LOG", manifest.as_str()),
        ("PLIP__STREAMS__HEAD_EXCHANGE", heads.as_str()),
    ] {
        env.push((k.into(), v.into()));
    }
    // The trainer's state folder holds one checkpoint before it starts.
    let trainer_dir = dir.join("trainer");
    {
        let state = State::open(&trainer_dir.join("state"))?;
        checkpoint(&state, 1)?;
    }
    let mut trainer = DaemonProcess::start(Launch {
        url: &args.url,
        state: &trainer_dir.join("state"),
        env: {
            let mut e = env.clone();
            e.push(("PLIP__ROLE".into(), "trainer".into()));
            e
        },
        log: None,
    })?;
    trainer.wait_for("the trainer", Duration::from_secs(60), |s| {
        s["ingest"]["consuming"] == true
    })?;
    let pool = jpeg_pool()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(publish_gallery(
        &args.url,
        &topo.ingest_exchange,
        &pool,
        args.gallery,
    ))?;
    let n = args.gallery as u64;
    trainer.wait_for("the gallery logged", Duration::from_secs(3600), |s| {
        s["streams"]["models_logged"] == 1
            && s["samples"]["total"].as_u64() == Some(n)
            && s["streams"]["gallery_entries_logged"].as_u64() == Some(n)
    })?;
    let caught_up = |s: &serde_json::Value| {
        s["follower"]["caught_up"] == true && s["serving"]["gallery_size"].as_u64() == Some(n)
    };
    // A new server, from nothing.
    let t = Instant::now();
    let mut one = start(&dir, &args.url, &env, "server")?;
    one.wait_for(
        "the first server to catch up",
        Duration::from_secs(3600),
        caught_up,
    )?;
    let catch_up_s = t.elapsed().as_secs_f64();
    let images = image_queries(&pool);
    let load = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let mut c = Client::new(&args.url, &topo.reid_exchange).await?;
            // A warm-up, then the timed run.
            c.concurrent(&images, args.concurrency * 2, args.concurrency)
                .await?;
            c.concurrent(&images, args.requests, args.concurrency).await
        })
    };
    let (qps_one, lat_one) = load(&rt)?;
    let t = Instant::now();
    let mut two = start(&dir, &args.url, &env, "server")?;
    two.wait_for(
        "the second server to catch up",
        Duration::from_secs(3600),
        caught_up,
    )?;
    let catch_up_two_s = t.elapsed().as_secs_f64();
    let (qps_two, lat_two) = load(&rt)?;
    two.stop();
    one.stop();
    trainer.stop();
    rt.block_on(async {
        if let Ok(conn) = connect(&args.url).await {
            if let Ok(ch) = conn.create_channel().await {
                topo.delete(&ch).await;
                for q in [&models, &gallery_log, &manifest] {
                    let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
                }
                let _ = ch
                    .exchange_delete(heads.as_str().into(), Default::default())
                    .await;
            }
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        serde_json::json!({
            "bench": "replicas", "preset": "tiny", "gallery": args.gallery,
            "concurrency": args.concurrency, "requests": args.requests,
            "catch_up_s": {"first_server": catch_up_s, "second_server": catch_up_two_s},
            "image_queries": {
                "one_server": {"qps": qps_one, "p50_ms": pct(&lat_one, 0.5), "p99_ms": pct(&lat_one, 0.99)},
                "two_servers": {"qps": qps_two, "p50_ms": pct(&lat_two, 0.5), "p99_ms": pct(&lat_two, 0.99)},
                "ratio": qps_two / qps_one,
            },
        })
    );
    Ok(())
}
