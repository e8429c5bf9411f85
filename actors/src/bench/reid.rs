//! `plipd bench reid`: ReID over the broker end to end, at a gallery of `--gallery` images with
//! the `tiny` preset: p50/p99 latency of sequential text and image queries, throughput with
//! `--concurrency` requests in flight, and a hot swap — the time from a new checkpoint being
//! visible to the daemon to it serving (the whole gallery re-embedded), with the latency of
//! queries answered meanwhile. The daemon (`plipd run`, trainer off) runs on a temporary state
//! folder and topology; checkpoints are written while it is stopped (untrained weights: speed
//! does not depend on them).

use crate::base::launch::{DaemonProcess, Launch};
use crate::base::state::{now_unix, Checkpoint, State};
use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use plip_ingest::amqp::{connect, Topology};
use plip_ingest::synth::{render_all, SynthConfig};
use plip_model::dfdx::prelude::Cpu;
use plip_model::{Plip, Preset, Trainer};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error>;

#[derive(Debug, Clone, clap::Args)]
pub struct ReidBenchArgs {
    /// Broker URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub url: String,
    /// Gallery images.
    #[arg(long, default_value_t = 10_000)]
    pub gallery: usize,
    /// Sequential queries timed per kind.
    #[arg(long, default_value_t = 100)]
    pub queries: usize,
    /// Requests in flight in the throughput measurement.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
}

pub(crate) fn checkpoint(state: &State, seed: u64) -> Result<u64, Error> {
    let preset = Preset::tiny();
    let tk = match state.tokenizer()? {
        Some(t) => t,
        None => {
            let t = crate::base::tokenizer::train_tokenizer(&preset, &[])?;
            state.set_tokenizer(&t)?;
            t
        }
    };
    let mut trainer = Trainer::new(
        Plip::<f32, Cpu>::new(&Cpu::default(), &preset, seed)?,
        Default::default(),
    );
    // Distinct steps tell the two versions apart in the logs.
    trainer.opt.step = seed;
    Ok(state.save_checkpoint(Checkpoint::of_trainer(
        &trainer,
        tk.fingerprint(),
        0,
        Default::default(),
    )?)?)
}

fn start(dir: &Path, url: &str, topo: &Topology) -> Result<DaemonProcess, Error> {
    let mut env = topo.env();
    for (k, v) in [
        ("PLIP__TRAINER__ENABLED", "false"),
        ("PLIP__SERVING__POLL_MS", "200"),
        ("PLIP__SERVING__GATE_MARGIN", "1.0"),
    ] {
        env.push((k.into(), v.into()));
    }
    DaemonProcess::start(Launch {
        url,
        state: &dir.join("state"),
        env,
        log: None,
    })
}

/// A client: one reply queue, requests matched by correlation id.
pub(crate) struct Client {
    ch: Channel,
    reply: ShortString,
    consumer: lapin::Consumer,
    exchange: String,
    n: u64,
}

impl Client {
    pub(crate) async fn new(url: &str, exchange: &str) -> Result<Client, Error> {
        let conn = connect(url).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                "bench".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        std::mem::forget(conn);
        Ok(Client {
            reply: q.name().clone(),
            ch,
            consumer,
            exchange: exchange.to_string(),
            n: 0,
        })
    }

    async fn send(&mut self, body: &[u8]) -> Result<String, Error> {
        self.n += 1;
        let corr = format!("b{}", self.n);
        self.ch
            .basic_publish(
                self.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_content_type(ShortString::from("application/json"))
                    .with_reply_to(self.reply.clone())
                    .with_correlation_id(corr.as_str().into()),
            )
            .await?;
        Ok(corr)
    }

    async fn recv(&mut self) -> Result<(String, serde_json::Value), Error> {
        let d = self.consumer.next().await.ok_or("reply queue closed")??;
        let corr = d
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default();
        Ok((corr, serde_json::from_slice(&d.data)?))
    }

    /// Sequential round trips: latencies in ms.
    async fn sequential(&mut self, bodies: &[Vec<u8>]) -> Result<Vec<f64>, Error> {
        let mut lat = Vec::new();
        for b in bodies {
            let t = Instant::now();
            let corr = self.send(b).await?;
            loop {
                let (c, v) = self.recv().await?;
                if c == corr {
                    if !v["error"].is_null() {
                        return Err(format!("error reply: {v}").into());
                    }
                    break;
                }
            }
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(lat)
    }

    /// `total` requests with `inflight` outstanding: (requests per second, latencies).
    pub(crate) async fn concurrent(
        &mut self,
        bodies: &[Vec<u8>],
        total: usize,
        inflight: usize,
    ) -> Result<(f64, Vec<f64>), Error> {
        let t0 = Instant::now();
        let mut sent: HashMap<String, Instant> = HashMap::new();
        let mut lat = Vec::new();
        let mut k = 0;
        while lat.len() < total {
            while sent.len() < inflight && k < total {
                let c = self.send(&bodies[k % bodies.len()]).await?;
                sent.insert(c, Instant::now());
                k += 1;
            }
            let (c, v) = self.recv().await?;
            if let Some(t) = sent.remove(&c) {
                if !v["error"].is_null() {
                    return Err(format!("error reply: {v}").into());
                }
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        Ok((total as f64 / t0.elapsed().as_secs_f64(), lat))
    }
}

pub(crate) fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// 512 synthetic person crops (64 identities × 8) as 256×128 JPEGs: the benchmarks' gallery
/// and query images.
pub(crate) fn jpeg_pool() -> Result<Vec<Vec<u8>>, Error> {
    render_all(&SynthConfig {
        train_ids: 64,
        test_ids: 0,
        images_per_id: 8,
        ..Default::default()
    })
    .into_iter()
    .map(|(r, _)| {
        let img = image::RgbImage::from_raw(128, 256, r.rgb).ok_or("render size")?;
        Ok(plip_ingest::image::to_jpeg(&img, 90)?)
    })
    .collect()
}

/// Publishes a gallery of `n` images (`g0`…, cycling through `pool`) to `exchange` in batches
/// of 64, waiting for every confirm.
pub(crate) async fn publish_gallery(
    url: &str,
    exchange: &str,
    pool: &[Vec<u8>],
    n: usize,
) -> Result<(), Error> {
    use base64::Engine;
    let conn = connect(url).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut pending = Vec::new();
    for start in (0..n).step_by(64) {
        let images: Vec<serde_json::Value> = (start..(start + 64).min(n))
            .map(|i| {
                serde_json::json!({"id": format!("g{i}"), "person_id": format!("p{}", i / 8), "camera_id": format!("c{}", i % 6),
                    "purpose": "gallery", "captions": ["a person walking"],
                    "image": base64::engine::general_purpose::STANDARD.encode(&pool[i % pool.len()])})
            })
            .collect();
        let body = serde_json::json!({"images": images}).to_string();
        pending.push(
            ch.basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_content_type(ShortString::from("application/json")),
            )
            .await?,
        );
    }
    for p in pending {
        p.await?;
    }
    Ok(())
}

/// Image requests (the first 32 crops of `pool`, top 10, camera c1 left out).
pub(crate) fn image_queries(pool: &[Vec<u8>]) -> Vec<Vec<u8>> {
    use base64::Engine;
    pool.iter()
        .take(32)
        .map(|j| serde_json::json!({"query": {"image": base64::engine::general_purpose::STANDARD.encode(j)}, "top_k": 10, "exclude_camera": "c1"}).to_string().into_bytes())
        .collect()
}

/// Runs `plipd bench reid`.
pub fn run(args: &ReidBenchArgs) -> Result<(), Error> {
    let tag = format!("benchreid{}-{}", std::process::id(), now_unix());
    let dir = std::env::temp_dir().join(format!("plipd-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let topo = Topology::with_suffix(&tag);
    {
        let state = State::open(&dir.join("state"))?;
        checkpoint(&state, 1)?;
    }
    let pool = jpeg_pool()?;
    let mut daemon = start(&dir, &args.url, &topo)?;
    daemon.wait_for("the daemon", Duration::from_secs(60), |s| {
        s["ingest"]["consuming"] == true
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The gallery.
    let t_gallery = Instant::now();
    rt.block_on(publish_gallery(
        &args.url,
        &topo.ingest_exchange,
        &pool,
        args.gallery,
    ))?;
    let n = args.gallery as u64;
    daemon.wait_for("the gallery embedded", Duration::from_secs(3600), |s| {
        s["serving"]["gallery_size"].as_u64() == Some(n)
    })?;
    let gallery_s = t_gallery.elapsed().as_secs_f64();

    let texts: Vec<Vec<u8>> = [
        "a man in a black jacket and blue jeans",
        "a woman with long hair in a red coat carrying a handbag",
        "a person in a white t-shirt and grey trousers with a backpack",
    ]
    .iter()
    .map(|t| {
        serde_json::json!({"query": {"text": t}, "top_k": 10})
            .to_string()
            .into_bytes()
    })
    .collect();
    let images = image_queries(&pool);
    let q = args.queries;
    let (text_lat, image_lat, (text_qps, text_conc), (image_qps, image_conc)) =
        rt.block_on(async {
            let mut c = Client::new(&args.url, &topo.reid_exchange).await?;
            let tb: Vec<Vec<u8>> = (0..q).map(|i| texts[i % texts.len()].clone()).collect();
            let ib: Vec<Vec<u8>> = (0..q).map(|i| images[i % images.len()].clone()).collect();
            let tl = c.sequential(&tb).await?;
            let il = c.sequential(&ib).await?;
            let tc = c.concurrent(&texts, q * 2, args.concurrency).await?;
            let ic = c.concurrent(&images, q * 2, args.concurrency).await?;
            Ok::<_, Error>((tl, il, tc, ic))
        })?;
    // The swap: a new checkpoint, written while the daemon is stopped; at restart version 1 is
    // restored with its stored gallery, then version 2 is evaluated, the gallery re-embedded
    // and swapped in, while image queries keep coming.
    daemon.stop();
    {
        let state = State::open(&dir.join("state"))?;
        checkpoint(&state, 2)?;
    }
    let mut daemon = start(&dir, &args.url, &topo)?;
    daemon.wait_for("version 1 restored", Duration::from_secs(600), |s| {
        s["serving"]["version"] == 1 && s["serving"]["gallery_size"].as_u64() == Some(n)
    })?;
    let restored = Instant::now();
    let (during, swapped_at) = rt.block_on(async {
        let mut c = Client::new(&args.url, &topo.reid_exchange).await?;
        let mut lat = Vec::new();
        loop {
            lat.extend(c.sequential(&images[..4]).await?);
            if daemon
                .status()
                .is_some_and(|s| s["serving"]["version"] == 2)
            {
                return Ok::<_, Error>((lat, Instant::now()));
            }
            if restored.elapsed() > Duration::from_secs(1800) {
                return Err("the swap did not happen".into());
            }
        }
    })?;
    let swap_s = swapped_at.duration_since(restored).as_secs_f64();
    let daemon_swap_s = daemon
        .status()
        .and_then(|s| s["serving"]["metrics"]["swap_seconds"].as_f64());
    daemon.stop();
    rt.block_on(async {
        if let Ok(conn) = connect(&args.url).await {
            if let Ok(ch) = conn.create_channel().await {
                topo.delete(&ch).await;
            }
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        serde_json::json!({
            "bench": "reid", "preset": "tiny", "gallery": args.gallery, "gallery_ingest_and_embed_s": gallery_s,
            "text": {"p50_ms": pct(&text_lat, 0.5), "p99_ms": pct(&text_lat, 0.99), "qps_concurrent": text_qps, "p50_ms_concurrent": pct(&text_conc, 0.5), "p99_ms_concurrent": pct(&text_conc, 0.99)},
            "image": {"p50_ms": pct(&image_lat, 0.5), "p99_ms": pct(&image_lat, 0.99), "qps_concurrent": image_qps, "p50_ms_concurrent": pct(&image_conc, 0.5), "p99_ms_concurrent": pct(&image_conc, 0.99)},
            "concurrency": args.concurrency,
            "swap": {"visible_to_serving_s": swap_s, "daemon_swap_s": daemon_swap_s, "queries_during": during.len(), "p50_ms_during": pct(&during, 0.5), "p99_ms_during": pct(&during, 0.99), "max_ms_during": pct(&during, 1.0)},
        })
    );
    Ok(())
}
