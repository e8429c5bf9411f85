//! The daemon tests' harness: a `plipd run` child process (the crate's own
//! [`DaemonProcess`]) on a temporary state folder with a
//! private topology on the real broker, synthetic images, and publishing helpers.
#![allow(dead_code, unused_imports)]

pub mod raw_amqp;

pub use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
pub use lapin::types::{AMQPValue, FieldTable, ShortString};
pub use lapin::{BasicProperties, Channel, Connection};
pub use plip_actors::base::launch::{DaemonProcess, Spawn};
pub use plip_ingest::amqp::{connect, Topology};
pub use plip_ingest::image::to_jpeg;
pub use plip_ingest::synth::{render_all, SynthConfig};
pub use plip_ingest::wire::{CaptionField, ImageField, IngestBatch, IngestImage};
pub use std::collections::BTreeSet;
pub use std::path::{Path, PathBuf};
pub use std::process::{Child, Command, Stdio};
pub use std::time::{Duration, Instant};

pub fn url() -> String {
    std::env::var("PLIP_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn tag() -> String {
    format!(
        "t{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

pub fn topology(tag: &str) -> Topology {
    Topology::with_suffix(tag)
}

/// The daemon tests run one at a time: one of them makes the broker drop every connection.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon child process (over the crate's own harness, [`DaemonProcess`]), with the test
/// configuration it was started with.
pub struct Daemon {
    pub process: Option<DaemonProcess>,
    pub http: String,
    pub dir: PathBuf,
    pub topo: Topology,
    pub config: PathBuf,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
}

impl Daemon {
    /// Writes the configuration (the `test` preset, quick checkpoints) and starts the daemon.
    pub fn start(dir: &Path, trainer: &str, env: &[(&str, String)]) -> Daemon {
        let mut d = Daemon::configure(dir, trainer, env, &Extra::default());
        d.spawn();
        d
    }

    /// Writes the configuration with `extra` settings, without starting the daemon.
    pub fn configure(dir: &Path, trainer: &str, env: &[(&str, String)], extra: &Extra) -> Daemon {
        let t = extra
            .same_topology
            .clone()
            .unwrap_or_else(|| topology(&tag()));
        let http = format!("127.0.0.1:{}", free_port());
        let config = dir.join("plipd.toml");
        let toml = format!(
            r#"
[broker]
url = "{url}"
prefetch = 4
reconnect_min_ms = 100
reconnect_max_ms = 1000

[topology]
ingest_exchange = "{ie}"
ingest_queue = "{iq}"
reid_exchange = "{re}"
reid_queue = "{rq}"
results_exchange = "{res}"
models_exchange = "{me}"
dlx_exchange = "{dx}"
dead_queue = "{dq}"
{topology_extra}

[limits]
max_message_bytes = {max_message_bytes}
max_images = 40
max_captions = 4
max_caption_chars = 300

[state]
dir = "{state}"
min_free_bytes = {min_free}
stall_timeout_s = {stall}

[http]
listen = "{http}"

[log]
format = "json"

[trainer]
{trainer}
"#,
            url = url(),
            ie = t.ingest_exchange,
            iq = t.ingest_queue,
            re = t.reid_exchange,
            rq = t.reid_queue,
            res = t.results_exchange,
            me = t.models_exchange,
            dx = t.dlx_exchange,
            dq = t.dead_queue,
            state = dir.join("state").display(),
            max_message_bytes = extra.max_message_bytes.unwrap_or(2_000_000),
            min_free = extra.min_free_bytes.unwrap_or(16 << 20),
            stall = extra.stall_timeout_s.unwrap_or(60),
            topology_extra = extra.topology,
        );
        std::fs::write(&config, toml).unwrap();
        let d = Daemon {
            process: None,
            http,
            dir: dir.to_path_buf(),
            topo: t,
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            log: dir.join("plipd.log"),
        };
        d
    }

    /// Starts the daemon and waits until it consumes.
    pub fn spawn(&mut self) {
        self.spawn_only();
        self.wait_for("the daemon to consume", Duration::from_secs(60), |s| {
            s["ingest"]["consuming"] == true
        });
    }

    /// Starts the daemon and waits until its HTTP listener answers.
    pub fn spawn_only(&mut self) {
        let process = DaemonProcess::spawn(Spawn {
            program: env!("CARGO_BIN_EXE_plipd").into(),
            args: vec!["run".into(), "--config".into(), self.config.clone().into()],
            env: self.env.clone(),
            addr: self.http.clone(),
            log: Some(&self.log),
        })
        .unwrap();
        self.process = Some(process);
        self.wait_for("the daemon to answer", Duration::from_secs(60), |_| true);
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, DaemonProcess::pid)
    }

    /// True while the daemon process runs.
    pub fn alive(&mut self) -> bool {
        self.process.as_mut().is_some_and(DaemonProcess::running)
    }

    /// Waits up to `limit` for the daemon to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let st = self.process.as_mut()?.wait_exit(limit)?;
        self.process = None;
        st.code()
    }

    /// kill -9, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// A value of /proc/PID/status in KiB (`VmRSS`, `VmHWM`).
    pub fn proc_kib(&self, field: &str) -> u64 {
        let text =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Settings a test changes from the harness's defaults.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// Lines added to the `[topology]` table (e.g. `queue_type = "quorum"`).
    pub topology: String,
    /// Another daemon's topology, to share its queues (a trainer and its servers); a fresh
    /// private one when `None`.
    pub same_topology: Option<Topology>,
    pub max_message_bytes: Option<u64>,
    pub min_free_bytes: Option<u64>,
    pub stall_timeout_s: Option<u64>,
}

impl Daemon {
    pub fn status(&self) -> Option<serde_json::Value> {
        plip_actors::base::client::get(&self.http, "/status").and_then(Result::ok)
    }

    /// Polls the status until `pred` holds; panics with the last status and the log otherwise.
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let t = Instant::now();
        let mut last = serde_json::Value::Null;
        while t.elapsed() < limit {
            if let Some(st) = self.process.as_mut().and_then(DaemonProcess::try_wait) {
                panic!(
                    "plipd exited ({st}) while waiting for {what}; log:\n{}",
                    self.log_text()
                );
            }
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
                last = s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for {what}; last status {last:#}\nlog:\n{}",
            self.log_text()
        );
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            match p.stop_within(Duration::from_secs(90)) {
                Some(st) => assert!(
                    st.success(),
                    "plipd exited with {st}; log:\n{}",
                    self.log_text()
                ),
                None => panic!("plipd did not stop within 90 s; log:\n{}", self.log_text()),
            }
        }
    }

    /// The JSON log lines whose event (`message`) is `name`.
    pub fn log_events(&self, name: &str) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["message"] == name)
            .collect()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        let t = self.topo.clone();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            if let Ok(conn) = connect(&url()).await {
                if let Ok(ch) = conn.create_channel().await {
                    t.delete(&ch).await;
                }
            }
        });
        let _ = &self.dir;
    }
}

/// `n_ids` synthetic persons × `per_id` JPEGs: (id, person, camera, jpeg).
pub fn images(n_ids: usize, per_id: usize, seed: u64) -> Vec<(String, String, String, Vec<u8>)> {
    let cfg = SynthConfig {
        seed,
        train_ids: n_ids,
        test_ids: 0,
        images_per_id: per_id,
        ..Default::default()
    };
    render_all(&cfg)
        .into_iter()
        .map(|(r, _)| {
            let img = image::RgbImage::from_raw(128, 256, r.rgb).unwrap();
            let small =
                image::imageops::resize(&img, 64, 128, image::imageops::FilterType::Triangle);
            (
                format!("s{seed}-p{}-f{}", r.person, r.frame),
                format!("{:04}", r.person),
                format!("c{}", r.camera),
                to_jpeg(&small, 90).unwrap(),
            )
        })
        .collect()
}

pub fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub fn batch_json(imgs: &[(String, String, String, Vec<u8>)]) -> Vec<u8> {
    let list: Vec<serde_json::Value> = imgs
        .iter()
        .map(|(id, p, c, jpeg)| serde_json::json!({"id": id, "person_id": p, "camera_id": c, "image": b64(jpeg)}))
        .collect();
    serde_json::json!({ "images": list })
        .to_string()
        .into_bytes()
}

pub async fn channel() -> (Connection, Channel) {
    let conn = connect(&url()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, ch)
}

pub async fn publish(ch: &Channel, exchange: &str, body: &[u8], props: BasicProperties) {
    ch.basic_publish(
        exchange.into(),
        "".into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// A server-named exclusive queue (replies, announcements).
pub async fn exclusive_queue(ch: &Channel) -> lapin::Queue {
    ch.queue_declare(
        "".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
}

pub fn json_props() -> BasicProperties {
    BasicProperties::default().with_content_type(ShortString::from("application/json"))
}

/// CRC-32 (PNG's), to forge valid chunk checksums.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A real PNG whose header declares `width × height`.
pub fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9]));
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// A dead-lettered copy as the suite reads it.
#[derive(Debug)]
pub struct Dead {
    pub code: String,
    pub message: String,
    pub headers_dropped: bool,
    pub omitted: Option<u32>,
    pub header_bytes: usize,
}

fn long_str(v: Option<&AMQPValue>) -> String {
    match v {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("expected a string, got {other:?}"),
    }
}

/// Takes every dead-lettered copy from `queue`, acknowledging each.
pub async fn dead_letters(ch: &Channel, queue: &str) -> Vec<Dead> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        let headers = m.delivery.properties.headers().clone().unwrap_or_default();
        let header_bytes = plip_ingest::dead_letter::measure(&headers).bytes;
        let err = match headers.inner().get("x-plip-error") {
            Some(AMQPValue::FieldTable(t)) => t.clone(),
            other => panic!("dead-lettered message without x-plip-error: {other:?}"),
        };
        out.push(Dead {
            code: long_str(err.inner().get("code")),
            message: long_str(err.inner().get("message")),
            headers_dropped: err.inner().contains_key("headers_dropped"),
            omitted: match headers.inner().get("x-plip-rejected-omitted") {
                Some(AMQPValue::LongUInt(n)) => Some(*n),
                _ => None,
            },
            header_bytes,
        });
        m.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }
    out
}

/// The codes of everything in the dead-letter queue (from `x-plip-error`).
pub async fn dead_codes(ch: &Channel, queue: &str) -> Vec<String> {
    dead_letters(ch, queue)
        .await
        .into_iter()
        .map(|d| d.code)
        .collect()
}

pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("plipd-{name}-{}", tag()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub const NO_TRAINING: &str = "enabled = false";

/// Messages waiting in the ingest queue (a passive declare reads the count).
pub async fn queue_depth(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

// Helpers shared by the daemon test files.

pub type Img = (String, String, String, Vec<u8>);

pub fn trainer_toml(every: u64) -> String {
    format!(
        "preset = \"test\"\nbatch = 16\nimages_per_id = 4\nmin_samples = 32\nwarmup_steps = 5\ncheckpoint_every_steps = {every}\ncheckpoint_every_s = 0\nkeep_checkpoints = 3\nthreads = 1\nidle_after_s = 0\n"
    )
}

/// Runs `rabbitmqctl` and asserts it worked.
pub fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must work for this test (run it where the broker runs)");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
}

pub fn batch_json_purpose(imgs: &[(String, String, String, Vec<u8>)], purpose: &str) -> Vec<u8> {
    let list: Vec<serde_json::Value> = imgs
        .iter()
        .map(|(id, p, c, jpeg)| serde_json::json!({"id": id, "person_id": p, "camera_id": c, "image": b64(jpeg), "purpose": purpose}))
        .collect();
    serde_json::json!({ "images": list })
        .to_string()
        .into_bytes()
}

/// Sends one request and waits for its answer on an exclusive reply queue.
pub async fn ask(
    ch: &Channel,
    exchange: &str,
    body: &[u8],
    props: BasicProperties,
) -> serde_json::Value {
    let q = exclusive_queue(ch).await;
    let corr = tag();
    publish(
        ch,
        exchange,
        body,
        props
            .with_reply_to(q.name().clone())
            .with_correlation_id(corr.as_str().into()),
    )
    .await;
    let t = Instant::now();
    loop {
        if let Some(m) = ch
            .basic_get(q.name().clone(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
            assert_eq!(v["request_id"], corr.as_str());
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no answer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asks `img` as a cross-camera image query (`exclude_camera` = its camera) for the `top_k`
/// best matches, on a connection of its own; the reply.
pub fn ask_image(
    rt: &tokio::runtime::Runtime,
    exchange: &str,
    img: &Img,
    top_k: usize,
) -> serde_json::Value {
    rt.block_on(async {
        let (_c, ch) = channel().await;
        let (_, _, cam, jpeg) = img;
        let body = serde_json::json!({"query": {"image": b64(jpeg)}, "top_k": top_k, "exclude_camera": cam});
        ask(&ch, exchange, body.to_string().as_bytes(), json_props()).await
    })
}

/// Asks every image as a cross-camera query (`exclude_camera` = its own camera); returns the
/// Rank-1 over the queries and every reply.
pub async fn rank1(ch: &Channel, exchange: &str, queries: &[Img]) -> (f64, Vec<serde_json::Value>) {
    let mut hits = 0;
    let mut replies = Vec::new();
    for (_, person, cam, jpeg) in queries {
        let body =
            serde_json::json!({"query": {"image": b64(jpeg)}, "top_k": 10, "exclude_camera": cam});
        let r = ask(ch, exchange, body.to_string().as_bytes(), json_props()).await;
        assert!(r["error"].is_null(), "{r:#}");
        if r["matches"][0]["person_id"] == person.as_str() {
            hits += 1;
        }
        replies.push(r);
    }
    (hits as f64 / queries.len() as f64, replies)
}
