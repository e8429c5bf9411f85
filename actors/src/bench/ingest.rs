//! `plipd bench ingest`: images per second from the broker into durable storage, next to the
//! broker's own ceiling for the same messages on the same machine (a bare lapin consume + ack
//! loop, measured in the same run), and the daemon's peak RSS while it drains the backlog.
//!
//! The JSON also gives the median latency of a 4 KiB write + fsync on the state folder's file
//! system, measured in the same run, how many images had been captioned when the last sample
//! was flushed (intake captions what it stores), and the daemon's CPU time per image during
//! the drain next to the decode-only peer's (one thread): a ratio that what else runs on the
//! machine moves less than it moves wall-clock rates.
//!
//! A third peer needs no broker: **decode-only** — the same message bodies parsed, validated and
//! their images fully decoded by the daemon's own decoder (`plip_ingest::wire::decode_message`),
//! nothing stored, on the machine's cores (and on one thread, for scale). It is the floor for any
//! daemon that validates images.
//!
//! Two more split the daemon's cost in parts: **consume + decode** — the bare consumer that
//! also decodes each delivery on a pool of the machine's cores before its ack (the floor for any
//! consumer of this broker that validates what it takes, on the cores the broker shares) — and
//! **store-only** — the CPU time per image of the daemon's own sample store staging (captions,
//! colours, pack append), committing (pack sync, records) and flushing already decoded images.
//! Where the broker runs on this machine, its CPU time per image during each drain is given too.
//!
//! Both sides drain a backlog published beforehand (so publishing speed is not measured): the
//! peer from a plain queue, the daemon (`plipd run`, trainer off, a temporary state folder and
//! topology) from its ingest queue, timed from the first delivery to the last sample flushed.

use crate::base::launch::{DaemonProcess, Launch};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use plip_ingest::amqp::{connect, Topology};
use plip_ingest::synth::{render_all, SynthConfig};
use plip_ingest::wire::{ImageField, IngestBatch, IngestImage};
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error>;

/// Options of `plipd bench ingest`.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestBenchArgs {
    /// Broker URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub url: String,
    /// Images in the backlog (rounded up to whole batches).
    #[arg(long, default_value_t = 3200)]
    pub images: usize,
    /// Images per message.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// JPEG size as HEIGHTxWIDTH: 128x64 and 256x128 are stored as sent; larger sizes (e.g.
    /// 512x256) take the resize-and-re-encode path.
    #[arg(long, default_value = "128x64")]
    pub size: String,
    /// Prefetch of both consumers.
    #[arg(long, default_value_t = 8)]
    pub prefetch: u16,
    /// Skip the bare consume + ack peer.
    #[arg(long)]
    pub no_peer: bool,
}

fn tag() -> String {
    format!(
        "bench{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

/// The backlog's message bodies (MessagePack, raw JPEG bytes; ids unique per run).
fn messages(args: &IngestBenchArgs, run: &str) -> Result<(Vec<Vec<u8>>, usize), Error> {
    let (h, w) = args
        .size
        .split_once('x')
        .and_then(|(h, w)| Some((h.parse::<u32>().ok()?, w.parse::<u32>().ok()?)))
        .ok_or("--size must look like 128x64")?;
    let cfg = SynthConfig {
        train_ids: 16,
        test_ids: 0,
        images_per_id: 4,
        ..Default::default()
    };
    let pool: Vec<(String, String, Vec<u8>)> = render_all(&cfg)
        .into_iter()
        .map(|(r, _)| {
            let img = image::RgbImage::from_raw(128, 256, r.rgb).ok_or("render size")?;
            let img = if (h, w) == (256, 128) {
                img
            } else {
                image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle)
            };
            Ok((
                format!("{:04}", r.person),
                format!("c{}", r.camera),
                plip_ingest::image::to_jpeg(&img, 90)?,
            ))
        })
        .collect::<Result<_, Error>>()?;
    let n_msgs = args.images.div_ceil(args.batch.max(1));
    let mut bodies = Vec::with_capacity(n_msgs);
    let mut k = 0usize;
    for m in 0..n_msgs {
        let images = (0..args.batch)
            .map(|_| {
                let (p, c, jpeg) = &pool[k % pool.len()];
                k += 1;
                IngestImage {
                    id: format!("{run}-{k}"),
                    person_id: Some(p.clone()),
                    camera_id: Some(c.clone()),
                    captions: None,
                    attributes: None,
                    purpose: None,
                    image: ImageField::Bytes(jpeg.clone()),
                }
            })
            .collect();
        let batch = IngestBatch {
            v: None,
            batch_id: Some(format!("{run}-b{m}")),
            images,
        };
        bodies.push(rmp_serde::to_vec_named(&batch).map_err(|e| e.to_string())?);
    }
    Ok((bodies, k))
}

async fn publish_all(
    ch: &Channel,
    exchange: &str,
    queue: &str,
    bodies: &[Vec<u8>],
) -> Result<(), Error> {
    let props = BasicProperties::default()
        .with_content_type(ShortString::from("application/msgpack"))
        .with_delivery_mode(2);
    let mut pending = std::collections::VecDeque::new();
    for b in bodies {
        pending.push_back(
            ch.basic_publish(
                exchange.into(),
                queue.into(),
                BasicPublishOptions::default(),
                b,
                props.clone(),
            )
            .await?,
        );
        while pending.len() > 256 {
            if let Some(c) = pending.pop_front() {
                c.await?;
            }
        }
    }
    for c in pending {
        c.await?;
    }
    Ok(())
}

/// One backlog message parsed, validated and decoded as the daemon does (`decode_message`
/// with the default limits; the backlog's messages carry no headers).
fn decode_body(body: &[u8]) -> Result<plip_ingest::wire::Decoded, plip_ingest::wire::Refusal> {
    let headers = std::collections::HashMap::<String, String>::new();
    plip_ingest::wire::decode_message(
        Some("application/msgpack"),
        &headers,
        body,
        &plip_ingest::wire::WireLimits::default(),
    )
}

/// The decode-only peer: images/s of parsing and decoding every message on `threads` threads
/// (messages spread over them), nothing stored; the best of three passes.
fn decode_only(bodies: &[Vec<u8>], images: usize, threads: usize) -> Result<f64, Error> {
    use rayon::prelude::*;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let decoded: usize = pool.install(|| {
            bodies
                .par_iter()
                .map(|b| decode_body(b).map_or(0, |d| d.accepted.len()))
                .sum()
        });
        best = best.min(t.elapsed().as_secs_f64());
        if decoded != images {
            return Err(format!("decode-only peer: {decoded} of {images} images decoded").into());
        }
    }
    Ok(images as f64 / best)
}

/// A peer's drain: images/s, and the broker's CPU time per image while it lasted (where the
/// broker runs on this machine).
struct Drain {
    images_per_s: f64,
    broker_cpu_us_per_image: Option<f64>,
    /// This process's CPU time per image while the drain lasted (the consumer and, for the
    /// consume + decode peer, its decoding pool).
    cpu_us_per_image: Option<f64>,
}

/// The bare consumer: images/s of consume + ack alone.
async fn peer(args: &IngestBenchArgs, bodies: &[Vec<u8>], images: usize) -> Result<Drain, Error> {
    drain_peer(args, bodies, images, None).await
}

/// The consume + decode peer: the bare consumer that also parses and decodes every delivery
/// (`decode_message`, as the decode-only peer) on a pool of `threads` threads before its ack,
/// up to the prefetch in flight; nothing stored. What any daemon that takes these messages
/// from this broker and validates them pays at least, on the same cores as the broker.
async fn consume_decode(
    args: &IngestBenchArgs,
    bodies: &[Vec<u8>],
    images: usize,
    threads: usize,
) -> Result<Drain, Error> {
    let pool = std::sync::Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?,
    );
    drain_peer(args, bodies, images, Some(pool)).await
}

/// Publishes the backlog to a queue of its own, then drains it with the given prefetch: each
/// delivery acked at once, or (with a pool) after its images were decoded there.
async fn drain_peer(
    args: &IngestBenchArgs,
    bodies: &[Vec<u8>],
    images: usize,
    decode: Option<std::sync::Arc<rayon::ThreadPool>>,
) -> Result<Drain, Error> {
    let conn = connect(&args.url).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let q = format!("plip.bench.peer.{}", tag());
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    publish_all(&ch, "", &q, bodies).await?;
    let cch = conn.create_channel().await?;
    cch.basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = cch
        .basic_consume(
            q.as_str().into(),
            "bench-peer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let broker = Broker::local();
    let mut t0 = None;
    let mut cpu0 = None;
    let mut n = 0;
    let mut decoded = 0usize;
    let mut inflight = tokio::task::JoinSet::new();
    while n < bodies.len() {
        let d = consumer.next().await.ok_or("consumer ended")??;
        t0.get_or_insert_with(Instant::now);
        cpu0.get_or_insert_with(|| {
            (
                broker.as_ref().and_then(Broker::cpu_seconds),
                Some(process_cpu_seconds()),
            )
        });
        n += 1;
        let Some(pool) = &decode else {
            d.acker.ack(BasicAckOptions::default()).await?;
            continue;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        pool.spawn(move || {
            let n = decode_body(&d.data).map_or(0, |m| m.accepted.len());
            let _ = tx.send((n, d.acker));
        });
        inflight.spawn(async move {
            let (n, acker) = rx.await.map_err(|e| e.to_string())?;
            acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(n)
        });
        while let Some(done) = inflight.try_join_next() {
            decoded += done??;
        }
    }
    while let Some(done) = inflight.join_next().await {
        decoded += done??;
    }
    let secs = t0.map_or(f64::NAN, |t| t.elapsed().as_secs_f64());
    let (broker0, own0) = cpu0.unwrap_or_default();
    let per_image =
        |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (b - a) * 1e6 / images as f64);
    let broker_cpu = per_image(broker0, broker.as_ref().and_then(Broker::cpu_seconds));
    let own_cpu = per_image(own0, Some(process_cpu_seconds()));
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await?;
    let _ = conn.close(200, "bench done".into()).await;
    if decode.is_some() && decoded != images {
        return Err(format!("consume + decode peer: {decoded} of {images} images decoded").into());
    }
    Ok(Drain {
        images_per_s: images as f64 / secs,
        broker_cpu_us_per_image: broker_cpu,
        cpu_us_per_image: own_cpu,
    })
}

/// The store alone: CPU time per image (this process's, sled's threads included) of staging
/// (captions, colours, the pack append), committing (the pack's sync, the records'
/// transaction) and flushing each message's decoded images in a fresh state folder under
/// `dir`, one message after the other; the decoding between them is not counted.
fn store_only(bodies: &[Vec<u8>], images: usize, dir: &std::path::Path) -> Result<StoreCpu, Error> {
    // Built before consuming, as the daemon does (0.1 s of one core, not per image).
    plip_ingest::captions::prepare_colour_table();
    let state = crate::base::state::State::open(&dir.join("store-only"))?;
    let store = state.samples(0)?;
    let mut cpu = [0.0; 3];
    let mut stored = 0usize;
    for b in bodies {
        let decoded = decode_body(b).map_err(|e| e.0.message)?;
        let t0 = process_cpu_seconds();
        let staged: Vec<_> = store
            .stage_all(&decoded.accepted)?
            .into_iter()
            .flatten()
            .collect();
        let t1 = process_cpu_seconds();
        let puts = store.commit(staged)?;
        let t2 = process_cpu_seconds();
        store.flush()?;
        let t3 = process_cpu_seconds();
        for (c, d) in cpu.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2]) {
            *c += d;
        }
        stored += puts.iter().filter(|p| p.fresh).count();
    }
    if stored != images {
        return Err(format!("store-only peer: {stored} of {images} images stored").into());
    }
    let [stage, commit, flush] = cpu.map(|c| c * 1e6 / images as f64);
    Ok(StoreCpu {
        stage,
        commit,
        flush,
    })
}

/// The store-only peer's CPU time per image, microseconds, by step.
struct StoreCpu {
    /// Captions, colours, record encoding, the pack append.
    stage: f64,
    /// The pack's sync and the records' transaction.
    commit: f64,
    /// sled's flush.
    flush: f64,
}

/// This process's CPU time (every thread), in seconds, to the nanosecond.
fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The broker's process when it runs on this machine (RabbitMQ's `beam.smp`), for its CPU time.
struct Broker(u32);

impl Broker {
    fn local() -> Option<Self> {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "beam.smp").then_some(Self(pid))
        })
    }

    fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.0)
    }
}

/// Median latency of a 4 KiB write + fsync in `dir` (the state folder's file system), over 20
/// rounds, in microseconds: what each delivery's flush pays at least once before its ack.
fn fsync_latency_us(dir: &std::path::Path) -> Result<f64, Error> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let block = [0u8; 4096];
    let mut times = Vec::with_capacity(20);
    for _ in 0..20 {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn rss_peak_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system) the process has used, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after its closing ')'.
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// Runs `plipd bench ingest`.
pub fn run(args: &IngestBenchArgs) -> Result<(), Error> {
    // The peers decode and store under the daemon's allocator setting: with glibc's default,
    // each 256×128 decode maps and unmaps its buffers (page faults for every image), which
    // made the decode-only peer 17% dearer at that size than the same decode in the daemon.
    plip_model::runtime::tune_allocator();
    let run = tag();
    let (bodies, images) = messages(args, &run)?;
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let decode_ips = decode_only(&bodies, images, threads)?;
    let decode_ips_1 = decode_only(&bodies, images, 1)?;
    let bare = if args.no_peer {
        None
    } else {
        Some(rt.block_on(peer(args, &bodies, images))?)
    };
    let peer_ips = bare.as_ref().map(|d| d.images_per_s);
    let consumed = rt.block_on(consume_decode(args, &bodies, images, threads))?;
    // The daemon: its topology and backlog first, then the process.
    let dir = std::env::temp_dir().join(format!("plipd-{run}"));
    std::fs::create_dir_all(&dir)?;
    let fsync_us = fsync_latency_us(&dir)?;
    let store_cpu = store_only(&bodies, images, &dir)?;
    let _ = std::fs::remove_dir_all(dir.join("store-only"));
    let topo = Topology::with_suffix(&run);
    rt.block_on(async {
        let conn = connect(&args.url).await?;
        let ch = conn.create_channel().await?;
        topo.declare(&ch).await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        publish_all(&ch, &topo.ingest_exchange, "", &bodies).await?;
        let _ = conn.close(200, "published".into()).await;
        Ok::<_, Error>(())
    })?;
    let mut env = topo.env();
    env.push(("PLIP__BROKER__PREFETCH".into(), args.prefetch.to_string()));
    env.push(("PLIP__TRAINER__ENABLED".into(), "false".into()));
    let mut daemon = DaemonProcess::start(Launch {
        url: &args.url,
        state: &dir.join("state"),
        env,
        log: None,
    })?;
    let pid = daemon.pid();
    let deadline = Instant::now() + Duration::from_secs(3600);
    // The clock starts at the last poll that saw no delivery yet (at spawn when the first
    // answering poll already sees some), so a backlog drained between two polls is still
    // timed, to within one poll interval.
    let broker = Broker::local();
    let mut idle_since = Instant::now();
    let mut idle_cpu = cpu_seconds(pid);
    let mut idle_broker_cpu = broker.as_ref().and_then(Broker::cpu_seconds);
    let mut t0 = None;
    let mut cpu0 = None;
    let mut broker_cpu0 = None;
    let mut stored = 0u64;
    let mut captioned = 0u64;
    while Instant::now() < deadline {
        if let Some(s) = daemon.status() {
            let deliveries = s["ingest"]["deliveries"].as_u64().unwrap_or(0);
            stored = s["ingest"]["stored"].as_u64().unwrap_or(0);
            captioned = s["ingest"]["captioned"].as_u64().unwrap_or(0);
            if deliveries > 0 {
                t0.get_or_insert(idle_since);
                cpu0.get_or_insert(idle_cpu);
                broker_cpu0.get_or_insert(idle_broker_cpu);
            } else {
                idle_since = Instant::now();
                idle_cpu = cpu_seconds(pid);
                idle_broker_cpu = broker.as_ref().and_then(Broker::cpu_seconds);
            }
            if stored >= images as u64 {
                break;
            }
        }
        daemon.check_alive()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = t0.map_or(f64::NAN, |t| t.elapsed().as_secs_f64());
    let rss = rss_peak_kib(pid);
    let cpu = cpu0.flatten().zip(cpu_seconds(pid)).map(|(a, b)| b - a);
    let broker_cpu = broker_cpu0
        .flatten()
        .zip(broker.as_ref().and_then(Broker::cpu_seconds))
        .map(|(a, b)| b - a);
    daemon.stop();
    rt.block_on(async {
        if let Ok(conn) = connect(&args.url).await {
            if let Ok(ch) = conn.create_channel().await {
                topo.delete(&ch).await;
            }
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    if stored < images as u64 {
        return Err(format!("only {stored} of {images} images were stored in time").into());
    }
    let ips = images as f64 / secs;
    // CPU per image: less sensitive than wall time to what else the machine runs. The
    // decode-only peer's single thread gives its CPU per image.
    let cpu_us = cpu.map(|c| c * 1e6 / images as f64);
    let decode_cpu_us = 1e6 / decode_ips_1;
    println!(
        "{}",
        serde_json::json!({
            "bench": "ingest", "size": args.size, "batch": args.batch, "images": images,
            "messages": bodies.len(), "backlog_bytes": bytes, "prefetch": args.prefetch,
            "daemon_images_per_s": ips, "daemon_seconds": secs,
            "peer_images_per_s": peer_ips, "ratio": peer_ips.map(|p| ips / p),
            "peer_cpu_us_per_image": bare.as_ref().and_then(|d| d.cpu_us_per_image),
            "peer_broker_cpu_us_per_image": bare.as_ref().and_then(|d| d.broker_cpu_us_per_image),
            "decode_only_images_per_s": decode_ips, "decode_only_threads": threads,
            "decode_only_1_thread_images_per_s": decode_ips_1,
            "ratio_to_decode_only": ips / decode_ips,
            "daemon_peak_rss_mib": rss.map(|k| k as f64 / 1024.0),
            "daemon_cpu_us_per_image": cpu_us,
            "decode_only_cpu_us_per_image": decode_cpu_us,
            "cpu_ratio_to_decode_only": cpu_us.map(|c| decode_cpu_us / c),
            "fsync_4k_median_us": fsync_us,
            // The floor for any consumer of this broker that validates what it takes: the
            // same backlog consumed, decoded and acked, nothing stored.
            "consume_decode_images_per_s": consumed.images_per_s,
            "consume_decode_ratio_to_decode_only": consumed.images_per_s / decode_ips,
            "ratio_to_consume_decode": ips / consumed.images_per_s,
            // The broker's CPU per image during each drain, where it runs on this machine.
            "broker_cpu_us_per_image": broker_cpu.map(|c| c * 1e6 / images as f64),
            "consume_decode_broker_cpu_us_per_image": consumed.broker_cpu_us_per_image,
            "consume_decode_cpu_us_per_image": consumed.cpu_us_per_image,
            // Staging, committing and flushing decoded images, one message at a time.
            "store_only_cpu_us_per_image": store_cpu.stage + store_cpu.commit + store_cpu.flush,
            "store_only_stage_cpu_us_per_image": store_cpu.stage,
            "store_only_commit_cpu_us_per_image": store_cpu.commit,
            "store_only_flush_cpu_us_per_image": store_cpu.flush,
            // Intake captions what it stores, so every stored image is captioned when the
            // clock stops (the last sample flushed).
            "captioned_when_drained": captioned,
        })
    );
    Ok(())
}
