//! `plip-tests`: end-to-end scenarios that span the crates, written as a user meets the
//! system — a producer publishing camera crops with `plip-ingest`'s wire types, `plipd run`
//! (the binary `plip-actors` builds, started through its own harness
//! [`plip_actors::base::launch::DaemonProcess`]), and a ReID client asking over the queue.
//!
//! The component tests live beside their crates (`actors/tests/`: the daemon against the real
//! broker area by area, the poison suite, the offline workflow, the layer check); a scenario
//! here crosses them: what a team publishes is what a consumer is answered, across restarts.
//!
//! The scenarios need the `plipd` binary built beside the test executables (`cargo test
//! --workspace` builds it; or set `PLIPD` to its path) and RabbitMQ at `PLIP_AMQP_URL`
//! (default `amqp://guest:guest@127.0.0.1:5672/%2f`).

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use plip_actors::base::launch::{free_local_addr, DaemonProcess, Spawn};
use plip_ingest::amqp::Topology;
use plip_ingest::synth::{render_all, SynthConfig};
use plip_ingest::wire::{ImageField, IngestBatch, IngestImage, Purpose};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The broker the scenarios use.
pub fn url() -> String {
    std::env::var("PLIP_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The `plipd` binary: `$PLIPD`, or the one Cargo built next to this test executable.
///
/// # Panics
/// When neither exists, saying how to build it.
pub fn plipd() -> PathBuf {
    if let Some(p) = std::env::var_os("PLIPD") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test> → target/<profile>/plipd
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(format!("plipd{}", std::env::consts::EXE_SUFFIX)))
        .expect("the target folder");
    assert!(
        bin.exists(),
        "{} does not exist: build it with `cargo build -p plip-actors --bin plipd` (cargo test \
         --workspace does), or set PLIPD",
        bin.display()
    );
    bin
}

/// One synthetic camera crop: what a producer publishes.
#[derive(Debug, Clone)]
pub struct Crop {
    pub id: String,
    pub person: String,
    pub camera: String,
    pub jpeg: Vec<u8>,
}

/// `n_ids` synthetic persons × `per_id` crops (64×128 JPEGs), seeded.
pub fn crops(n_ids: usize, per_id: usize, seed: u64) -> Vec<Crop> {
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
            let img = image::RgbImage::from_raw(128, 256, r.rgb).expect("256×128 RGB");
            let small =
                image::imageops::resize(&img, 64, 128, image::imageops::FilterType::Triangle);
            Crop {
                id: format!("s{seed}-p{}-f{}", r.person, r.frame),
                person: format!("{:04}", r.person),
                camera: format!("c{}", r.camera),
                jpeg: plip_ingest::image::to_jpeg(&small, 90).expect("JPEG encoding"),
            }
        })
        .collect()
}

/// A producer's MessagePack batch of `crops` for `purpose`.
pub fn msgpack_batch(crops: &[Crop], purpose: Purpose) -> Vec<u8> {
    let batch = IngestBatch {
        v: Some(1),
        batch_id: None,
        images: crops
            .iter()
            .map(|c| IngestImage {
                id: c.id.clone(),
                person_id: Some(c.person.clone()),
                camera_id: Some(c.camera.clone()),
                captions: None,
                attributes: None,
                purpose: Some(purpose),
                image: ImageField::Bytes(c.jpeg.clone()),
            })
            .collect(),
    };
    rmp_serde::to_vec_named(&batch).expect("a batch encodes")
}

/// A daemon on a private topology and its own state folder.
pub struct Plipd {
    pub topology: Topology,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub addr: String,
    process: Option<DaemonProcess>,
}

impl Plipd {
    /// Writes the configuration (`trainer` is the body of its `[trainer]` table) for a fresh
    /// state folder under a new temporary folder named after `name`.
    pub fn configure(name: &str, trainer: &str, serving: &str) -> Plipd {
        let tag = format!(
            "{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let dir = std::env::temp_dir().join(format!("plip-scenario-{tag}"));
        std::fs::create_dir_all(&dir).expect("a temporary folder");
        let t = Topology::with_suffix(&tag);
        let addr = free_local_addr().expect("a free port");
        let config = dir.join("plipd.toml");
        let toml = format!(
            "[broker]\nurl = \"{url}\"\nprefetch = 4\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n\n\
             [topology]\ningest_exchange = \"{ie}\"\ningest_queue = \"{iq}\"\nreid_exchange = \"{re}\"\n\
             reid_queue = \"{rq}\"\nresults_exchange = \"{res}\"\nmodels_exchange = \"{me}\"\n\
             dlx_exchange = \"{dx}\"\ndead_queue = \"{dq}\"\n\n\
             [state]\ndir = \"{state}\"\n\n[http]\nlisten = \"{addr}\"\n\n[log]\nformat = \"json\"\n\n\
             [trainer]\n{trainer}\n[serving]\n{serving}\n",
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
        );
        std::fs::write(&config, toml).expect("the configuration is written");
        Plipd {
            topology: t,
            log: dir.join("plipd.log"),
            dir,
            config,
            addr,
            process: None,
        }
    }

    /// Starts `plipd run` (with `env` on top of the file) and waits until it consumes.
    pub fn start(&mut self, env: &[(&str, &str)]) {
        let p = DaemonProcess::spawn(Spawn {
            program: plipd(),
            args: vec!["run".into(), "--config".into(), self.config.clone().into()],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            addr: self.addr.clone(),
            log: Some(&self.log),
        })
        .expect("plipd starts");
        self.process = Some(p);
        self.wait_for("the daemon to consume", Duration::from_secs(60), |s| {
            s["ingest"]["consuming"] == true
        });
    }

    /// `/status`, when the daemon answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        self.process.as_ref().and_then(DaemonProcess::status)
    }

    /// Polls `/status` until `pred` holds.
    ///
    /// # Panics
    /// When the daemon exits or `limit` passes first, with the last status and the log.
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let p = self.process.as_mut().expect("plipd was started");
        match p.wait_for(what, limit, pred) {
            Ok(s) => s,
            Err(e) => panic!(
                "{e}; last status {:#}\nlog:\n{}",
                p.status().unwrap_or_default(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ),
        }
    }

    /// SIGTERM; asserts a clean exit within 90 s.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let st = p.stop_within(Duration::from_secs(90));
            assert!(
                st.is_some_and(|s| s.success()),
                "plipd exited with {st:?}; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Plipd {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
        let t = self.topology.clone();
        if let Ok(rt) = tokio::runtime::Runtime::new() {
            rt.block_on(async {
                if let Ok(conn) = plip_ingest::amqp::connect(&url()).await {
                    if let Ok(ch) = conn.create_channel().await {
                        t.delete(&ch).await;
                    }
                }
            });
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A producer's or a client's confirmed channel.
pub async fn channel() -> (Connection, Channel) {
    let conn = plip_ingest::amqp::connect(&url())
        .await
        .expect("the broker answers");
    let ch = conn.create_channel().await.expect("a channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    (conn, ch)
}

/// Publishes and waits for the broker's confirm.
pub async fn publish(ch: &Channel, exchange: &str, body: &[u8], content_type: &str) {
    let props = BasicProperties::default()
        .with_content_type(content_type.into())
        .with_delivery_mode(2);
    let confirm = ch
        .basic_publish(
            exchange.into(),
            "".into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("published")
        .await
        .expect("confirmed");
    assert!(!confirm.is_nack(), "the broker refused a message");
}

/// A ReID client: sends one JSON request and waits (up to 60 s) for its reply.
pub async fn ask(ch: &Channel, exchange: &str, request: &serde_json::Value) -> serde_json::Value {
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("a reply queue");
    let corr = format!("{}", q.name());
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_reply_to(q.name().clone())
        .with_correlation_id(corr.as_str().into());
    ch.basic_publish(
        exchange.into(),
        "".into(),
        BasicPublishOptions::default(),
        request.to_string().as_bytes(),
        props,
    )
    .await
    .expect("published")
    .await
    .expect("confirmed");
    let t = Instant::now();
    loop {
        if let Some(m) = ch
            .basic_get(q.name().clone(), BasicGetOptions::default())
            .await
            .expect("a get")
        {
            let _ = ch
                .queue_delete(q.name().clone(), QueueDeleteOptions::default())
                .await;
            let v: serde_json::Value =
                serde_json::from_slice(&m.delivery.data).expect("a JSON reply");
            assert_eq!(v["request_id"], corr.as_str());
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no answer in 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An image query as a client writes it (cross-camera: its own camera left out).
pub fn image_request(c: &Crop, top_k: u32) -> serde_json::Value {
    use plip_ingest::reid::{Query, ReidRequest};
    let r = ReidRequest {
        v: Some(1),
        query: Query {
            image: Some(ImageField::Base64(b64(&c.jpeg))),
            text: None,
        },
        top_k: Some(top_k),
        exclude_camera: Some(c.camera.clone()),
        deadline_ms: None,
        min_model_version: None,
    };
    serde_json::to_value(&r).expect("a request encodes")
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}
