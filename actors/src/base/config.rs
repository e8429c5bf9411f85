//! The daemon's configuration: a TOML file (`configs/default.toml` documents every key) merged
//! with `PLIP__SECTION__KEY` environment variables; unknown keys and invalid values are refused
//! at start, naming the key.

use crate::base::error::{Error, Result};

use plip_ingest::amqp::Topology;
use plip_ingest::wire::WireLimits;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The most text substeps a step may take (`trainer.text_substeps`, `plipd train
/// --text-substeps`): each is one more text pass per step.
pub const MAX_TEXT_SUBSTEPS: u32 = 16;

/// Everything `plipd run` reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// What this process does: `all` (everything, one process: the default), `trainer`
    /// (ingest, training, the gate; writes the logs of `[streams]`) or `server` (answers ReID
    /// requests from what it follows on the logs; holds no training data).
    pub role: Role,
    pub broker: BrokerConfig,
    pub topology: Topology,
    pub limits: WireLimits,
    pub state: StateConfig,
    pub captions: CaptionConfig,
    pub trainer: TrainerConfig,
    pub serving: ServingConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub streams: StreamsConfig,
}

/// The role of a `plipd run` process (`role`, or `plipd run --role`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Ingest, training, the gate and serving in one process.
    #[default]
    All,
    /// Ingest, captions, storage, training, checkpoints, the gate; appends promoted models and
    /// the gallery to the streams; answers no ReID request.
    Trainer,
    /// Follows the models and gallery logs and answers ReID requests.
    Server,
}

impl Role {
    /// The role's name as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Trainer => "trainer",
            Role::Server => "server",
        }
    }
}

/// The replayable logs on RabbitMQ streams (RabbitMQ ≥ 3.9, feature flag `stream_queue`):
/// every promoted or rolled-back model version, its weights in chunks, on `models_log`; every
/// gallery sample and every forget on `gallery_log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// Append to the logs (off: nothing is declared or written).
    pub enabled: bool,
    /// The stream of model versions.
    pub models_log: String,
    /// The stream of gallery additions (image bytes and labels) and forgets (tombstones).
    pub gallery_log: String,
    /// Fanout exchange on which the trainer announces the logs' heads (how far each is
    /// written), from which a server measures how far behind it is.
    pub head_exchange: String,
    /// Largest chunk of weights per message, bytes (the broker's message limit is not
    /// negotiated: keep it well under `max_message_size`, 128 MiB by default).
    pub chunk_bytes: usize,
    /// Retention: the stream keeps at most this many bytes (`x-max-length-bytes`; only closed
    /// segments are removed).
    pub max_length_bytes: u64,
    /// Segment size (`x-stream-max-segment-size-bytes`): retention removes whole segments.
    pub segment_bytes: u64,
    /// Retention of the gallery log (`x-max-length-bytes`; `max_length_bytes` is the models
    /// log's): at least twice the stored gallery plus a segment, so that the latest complete
    /// snapshot is always kept.
    pub gallery_max_length_bytes: u64,
    /// Retention by age (`x-max-age`: a number and one of Y, M, D, h, m, s — `7D`); empty:
    /// none. Closed segments older than this are removed.
    pub max_age: String,
    /// The stream of manifest entries: where the latest gallery snapshot and the latest model
    /// begin in their logs, so that a new server replays from there.
    pub manifest_log: String,
    /// A full snapshot of the gallery is appended to the gallery log at least this often
    /// (seconds), and whenever the entries appended since the last one exceed a quarter of
    /// `gallery_max_length_bytes` (or the last snapshot's own size, if larger).
    pub snapshot_every_s: u64,
}

/// `x-max-age`'s value in seconds (`7D`, `12h`, …); `None` when malformed.
pub fn max_age_seconds(v: &str) -> Option<u64> {
    let unit = v.chars().last()?;
    let n: u64 = v[..v.len() - unit.len_utf8()].parse().ok()?;
    let per = match unit {
        'Y' => 365 * 86_400,
        'M' => 30 * 86_400,
        'D' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return None,
    };
    (n > 0).then_some(n * per)
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            enabled: false,
            models_log: "plip.models.log".into(),
            gallery_log: "plip.gallery.log".into(),
            head_exchange: "plip.logs.head".into(),
            chunk_bytes: 1 << 20,
            max_length_bytes: 4 << 30,
            segment_bytes: 100 << 20,
            gallery_max_length_bytes: 4 << 30,
            max_age: "7D".into(),
            manifest_log: "plip.logs.manifest".into(),
            snapshot_every_s: 86_400,
        }
    }
}

/// The daemon's log lines (stderr; the journal keeps them under systemd).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (one readable line per event) or `json` (one JSON object per line).
    pub format: LogFormat,
    /// A `tracing` filter: a level (`info`) or per-module directives (`info,plip_actors=debug`).
    /// The `RUST_LOG` environment variable, when set, replaces it. The broker client's own
    /// events are off by default: the daemon reports every broker failure itself
    /// (`broker_lost`, `reid_broker_lost`), and lapin logs an error for a channel closing
    /// during a clean shutdown.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info,lapin=off".into(),
        }
    }
}

/// The ReID server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServingConfig {
    /// Serve ReID queries at all.
    pub enabled: bool,
    /// Device of the serving encoder: `cpu`, or `cuda` / `cuda:N` in a CUDA build.
    pub device: String,
    /// Requests in flight (AMQP prefetch of the request queue).
    pub prefetch: u16,
    /// How often to look for a new checkpoint or new gallery samples, milliseconds.
    pub poll_ms: u64,
    /// Metric that gates a promotion: `mAP`, `rank1` or `text_r1` (probe split).
    pub gate_metric: GateMetric,
    /// This process's name in replies (`served_by`); empty: the host name and process id.
    pub instance: String,
    /// A candidate is promoted unless its gate metric is worse than the serving version's by
    /// more than this.
    pub gate_margin: f64,
    /// Embed every image (gallery, probe split, image queries) as the normalised sum of its
    /// own and its mirror image's embedding: twice the embedding work per image.
    pub flip_average: bool,
    /// Weight λ of attribute agreement in every ranking (models with the attribute head; 0 =
    /// off): a score is cos + λ·(fraction of attribute fields on which the head's readings of
    /// query and image agree); the index rows carry the readings.
    pub attribute_weight: f64,
    /// Request limits.
    pub limits: plip_ingest::reid::ReidLimits,
}

impl Default for ServingConfig {
    fn default() -> Self {
        ServingConfig {
            enabled: true,
            device: "cpu".into(),
            prefetch: 16,
            poll_ms: 2000,
            gate_metric: GateMetric::MeanAp,
            instance: String::new(),
            gate_margin: 0.02,
            flip_average: false,
            attribute_weight: 0.0,
            limits: plip_ingest::reid::ReidLimits::default(),
        }
    }
}

/// The RabbitMQ connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `amqp://user:password@host:port/vhost` (or `amqps://` for TLS).
    pub url: String,
    /// Unacknowledged ingest deliveries in flight (AMQP prefetch); the rest waits in the broker.
    pub prefetch: u16,
    /// First reconnect delay after the broker is lost, milliseconds (doubles up to the maximum).
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, milliseconds.
    pub reconnect_max_ms: u64,
    /// PEM file of CA certificates an `amqps://` broker's certificate is checked against, in
    /// addition to the system's roots (a private CA). Unset: the system's roots only.
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefetch: 8,
            reconnect_min_ms: 200,
            reconnect_max_ms: 30_000,
            tls_ca_file: None,
        }
    }
}

/// The state folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// The sled folder (created if absent).
    pub dir: PathBuf,
    /// Percentage of person ids set aside as the probe split (never trained on).
    pub probe_percent: u32,
    /// Most training samples kept; the oldest are evicted first (0 = no cap).
    pub max_training_samples: usize,
    /// Bytes kept free on the state folder's file system: ingest stops consuming (messages
    /// wait in the broker) and checkpoints are postponed while less is free.
    pub min_free_bytes: u64,
    /// Seconds a storage write or flush may take before the daemon treats storage as failed.
    pub stall_timeout_s: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: PathBuf::from("state"),
            probe_percent: 10,
            max_training_samples: 500_000,
            min_free_bytes: 512 << 20,
            stall_timeout_s: 60,
        }
    }
}

/// The caption workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionConfig {
    /// Worker threads captioning the samples an older (format-1) state folder holds without
    /// captions; intake captions every sample it stores.
    pub workers: usize,
}

impl Default for CaptionConfig {
    fn default() -> Self {
        CaptionConfig { workers: 1 }
    }
}

/// The continuous trainer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    /// Train at all (a serving-only daemon sets false).
    pub enabled: bool,
    /// Model preset: `tiny` (CPU default, ResNet-18-shaped), `rn50` (GPU, ResNet-50), `tiny-vit`,
    /// `small` (the round-1 GPU ViT), `test`, `test-vit`.
    pub preset: String,
    /// The joint image feature image and text queries are ranked by: `pooled`, `neck` or `both`
    /// (empty: the preset's own). Changes no weight: an existing state trains on under either.
    pub joint_feature: String,
    /// Blocks of the text tower (0: the preset's). Checkpoints made with another depth are
    /// refused with an error that names this key.
    pub text_layers: usize,
    /// Rows of the text tower's hashed bigram embedding (absent: the preset's own; 0 = none).
    /// A checkpoint made without the table gains one, starting at zero (the embeddings are
    /// at first exactly the checkpoint's).
    pub text_bigrams: Option<usize>,
    /// The ResNet image tower's four stage widths (empty: the preset's own); the joint
    /// embedding is as wide as the last. Checkpoints made with other widths are refused with an
    /// error that names this key.
    pub conv_widths: Vec<usize>,
    /// Device: `cpu` (a build with the `cuda` feature also takes `cuda` / `cuda:N`).
    pub device: String,
    /// Samples per step.
    pub batch: usize,
    /// Images of one identity per batch (P identities × this).
    pub images_per_id: usize,
    /// Peak learning rate (after the warm-up it stays constant).
    pub lr: f64,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Steps over which the IAP mask ratio rises from 0.2 to 0.8.
    pub ramp_steps: u64,
    /// Task weights (0 turns a task off): PLIP's image–text contrast, attribute prediction and
    /// colorization, then the identity-level image losses (batch-hard triplet, supervised
    /// image–image contrast, identity classification) on samples that carry a person id.
    pub w_ivlc: f64,
    pub w_iap: f64,
    pub w_tic: f64,
    pub w_triplet: f64,
    pub w_supcon: f64,
    pub w_id: f64,
    /// Identity classification of captions by the image classifier (CMPC).
    pub w_text_id: f64,
    /// Let IVLC's gradient reach the image tower even when identity losses train it.
    pub ivlc_image_grad: bool,
    /// Normalise captions in the caption-identity loss with the images' running statistics
    /// (false: with the caption batch's own statistics).
    pub text_id_running_stats: bool,
    /// The caption-identity loss leaves the identity head (neck and classifier) to the images.
    pub text_id_detached: bool,
    /// Caption–prototype contrast: each caption against the running-mean image feature of
    /// every person seen so far (needs a preset with the identity classifier).
    pub w_proto: f64,
    /// Caption–feature alignment: each caption regressed onto the mean joint feature of its
    /// person's images in the batch (only the text tower learns from it).
    pub w_text_align: f64,
    /// Attribute prediction from the image's joint feature by an attribute head shared with the
    /// captions; samples whose producer sent attributes carry its labels.
    pub w_attr: f64,
    /// Attribute prediction from the caption embeddings by the same head.
    pub w_text_attr: f64,
    /// Text substeps: after each step the text tower alone takes one more update against each
    /// of the last N batches' captions and image features, kept in memory (0 = off).
    pub text_substeps: u32,
    /// The text tower's learning rate as a multiple of `lr`.
    pub text_lr_scale: f64,
    /// Clip the text side's gradient (text tower, logit scale) and the rest's each on its own.
    pub clip_per_tower: bool,
    /// The logit scale's learning rate as a multiple of `lr`.
    pub logit_scale_lr_scale: f64,
    /// Captions read per image and step (up to the sample's count; at least 1): the others
    /// feed the caption-side losses at the cost of a wider text pass only.
    pub captions_per_image: usize,
    /// Augmentation: probability of a horizontal flip.
    pub aug_flip: f64,
    /// Augmentation: pad by this fraction of the width, then a random crop (0 = off).
    pub aug_pad_crop: f64,
    /// Augmentation: probability of random erasing.
    pub aug_erase: f64,
    /// Captioned training samples needed before the first step.
    pub min_samples: usize,
    /// Share of each batch's identities drawn from the most recent arrivals (the rest uniformly
    /// from everything stored, so the model does not forget).
    pub recent_fraction: f64,
    /// How many of the newest training samples count as recent.
    pub recent_window: usize,
    /// Pause when no new sample has arrived for this many seconds (0 = never pause).
    pub idle_after_s: u64,
    /// Checkpoint every N steps …
    pub checkpoint_every_steps: u64,
    /// … or every T seconds, whichever comes first.
    pub checkpoint_every_s: u64,
    /// Checkpoints kept (newest first).
    pub keep_checkpoints: usize,
    /// CPU threads of the training step (0 = one per core).
    pub threads: usize,
    /// Seed of the initial weights and the sampler.
    pub seed: u64,
    /// Before each checkpoint, re-estimate the BNNeck's running statistics from up to this
    /// many of the most recently trained images, un-augmented (0 = keep the training batches'
    /// running averages). Changes no weight; the checkpoint (and the model served from it)
    /// then normalises clean images as training normalised its batches.
    pub calibrate_neck: usize,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            enabled: true,
            preset: "tiny".into(),
            joint_feature: String::new(),
            text_layers: 0,
            text_bigrams: None,
            conv_widths: Vec::new(),
            device: "cpu".into(),
            batch: 64,
            images_per_id: 4,
            lr: 1e-3,
            warmup_steps: 50,
            ramp_steps: 10_000,
            w_ivlc: 1.0,
            w_iap: 0.0,
            w_tic: 0.0,
            w_triplet: 1.0,
            w_supcon: 0.0,
            w_id: 1.0,
            w_text_id: 1.0,
            ivlc_image_grad: false,
            text_id_running_stats: false,
            text_id_detached: false,
            w_proto: 0.0,
            w_text_align: 0.0,
            w_attr: 1.0,
            w_text_attr: 1.0,
            text_substeps: 0,
            text_lr_scale: 0.3,
            clip_per_tower: true,
            logit_scale_lr_scale: 1.0,
            captions_per_image: 1,
            aug_flip: 0.5,
            aug_pad_crop: 0.125,
            aug_erase: 0.5,
            min_samples: 256,
            recent_fraction: 0.5,
            recent_window: 2048,
            idle_after_s: 3600,
            checkpoint_every_steps: 200,
            checkpoint_every_s: 600,
            keep_checkpoints: 5,
            threads: 0,
            seed: 0,
            calibrate_neck: 512,
        }
    }
}

/// The HTTP listener (status and admin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on; localhost by default (the admin endpoints have no authentication).
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:7878".into(),
        }
    }
}

impl Config {
    /// Reads `file` (when given) and the `PLIP__…` environment variables over the defaults.
    ///
    /// # Errors
    /// An unreadable file, an unknown key or an invalid value, naming it.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        Self::load_with_env(file, None)
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_with_env(
        file: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Config> {
        let mut b = config::Config::builder();
        if let Some(f) = file {
            if !f.exists() {
                return Err(Error::Config(format!(
                    "configuration file {} does not exist",
                    f.display()
                )));
            }
            b = b.add_source(config::File::from(f).format(config::FileFormat::Toml));
        }
        let envsrc = config::Environment::with_prefix("PLIP")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(env);
        let raw = b
            .add_source(envsrc)
            .build()
            .map_err(|e| Error::Config(format!("configuration: {e}")))?;
        let cfg: Config = raw
            .try_deserialize()
            .map_err(|e| Error::Config(format!("configuration: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values serde cannot.
    ///
    /// # Errors
    /// Every invalid value, each naming its key, in one message.
    pub fn validate(&self) -> Result<()> {
        let problems = self.problems();
        match problems.len() {
            0 => Ok(()),
            1 => Err(Error::Config(problems[0].clone())),
            n => Err(Error::Config(format!(
                "{n} problems in the configuration:\n  - {}",
                problems.join("\n  - ")
            ))),
        }
    }

    /// Every invalid value, each naming its key.
    fn problems(&self) -> Vec<String> {
        let mut bad = Vec::new();
        let t = &self.trainer;
        let preset = plip_model::Preset::by_name(&t.preset)
            .map_err(|e| format!("trainer.preset: {e}"))
            .and_then(|p| {
                p.with_text_layers(t.text_layers)
                    .map_err(|e| format!("trainer.text_layers: {e}"))
            })
            .and_then(|p| {
                p.with_conv_widths(&t.conv_widths)
                    .map_err(|e| format!("trainer.conv_widths: {e}"))
            });
        match preset {
            Err(e) => bad.push(e),
            Ok(preset) => {
                if !t.joint_feature.is_empty() {
                    if let Err(e) = preset.with_joint(&t.joint_feature) {
                        bad.push(format!("trainer.joint_feature: {e}"));
                    }
                }
            }
        }
        if let Err(e) = plip_model::DeviceSpec::parse(&t.device) {
            bad.push(format!("trainer.device: {e}"));
        }
        if let Err(e) = plip_model::DeviceSpec::parse(&self.serving.device) {
            bad.push(format!("serving.device: {e}"));
        }
        if let LogFormat::Unknown(f) = &self.log.format {
            bad.push(format!("log.format = {f:?}: expected \"text\" or \"json\""));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            bad.push(format!("log.level = {:?}: {e}", self.log.level));
        }
        if let Some(ca) = &self.broker.tls_ca_file {
            if !ca.is_file() {
                bad.push(format!(
                    "broker.tls_ca_file = {:?}: no such file",
                    ca.display().to_string()
                ));
            }
        }
        let l = &self.limits;
        if l.decoded_pixels_in_flight < l.image.max_pixels || l.decoded_pixels_in_flight > 1 << 32 {
            bad.push(format!(
                "limits.decoded_pixels_in_flight = {} must be at least limits.image.max_pixels ({}) and at most 4294967296",
                l.decoded_pixels_in_flight, l.image.max_pixels
            ));
        }
        if t.batch < 2 {
            bad.push("trainer.batch must be at least 2".into());
        }
        if t.images_per_id == 0 || t.images_per_id > t.batch {
            bad.push("trainer.images_per_id must be between 1 and trainer.batch".into());
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            bad.push("trainer.lr must be a positive number".into());
        }
        if !(t.w_proto >= 0.0 && t.w_proto.is_finite()) {
            bad.push("trainer.w_proto must be a number ≥ 0".into());
        }
        if !(t.w_text_align >= 0.0 && t.w_text_align.is_finite()) {
            bad.push("trainer.w_text_align must be a number ≥ 0".into());
        }
        if !(t.w_attr >= 0.0 && t.w_attr.is_finite()) {
            bad.push("trainer.w_attr must be a number ≥ 0".into());
        }
        if !(t.w_text_attr >= 0.0 && t.w_text_attr.is_finite()) {
            bad.push("trainer.w_text_attr must be a number ≥ 0".into());
        }
        if !(t.logit_scale_lr_scale >= 0.0 && t.logit_scale_lr_scale.is_finite()) {
            bad.push("trainer.logit_scale_lr_scale must be a number ≥ 0".into());
        }
        if t.text_substeps > MAX_TEXT_SUBSTEPS {
            bad.push(format!(
                "trainer.text_substeps must be at most {MAX_TEXT_SUBSTEPS} (each is one more text pass per step)"
            ));
        }
        if t.captions_per_image == 0 {
            bad.push("trainer.captions_per_image must be at least 1".into());
        }
        if !(t.text_lr_scale >= 0.0 && t.text_lr_scale.is_finite()) {
            bad.push("trainer.text_lr_scale must be a number ≥ 0".into());
        }
        if !(0.0..=1.0).contains(&t.recent_fraction) {
            bad.push("trainer.recent_fraction must be between 0 and 1".into());
        }
        if t.checkpoint_every_steps == 0 && t.checkpoint_every_s == 0 {
            bad.push(
                "trainer.checkpoint_every_steps and trainer.checkpoint_every_s cannot both be 0"
                    .into(),
            );
        }
        if t.keep_checkpoints == 0 {
            bad.push("trainer.keep_checkpoints must be at least 1".into());
        }
        if self.broker.prefetch == 0 {
            bad.push("broker.prefetch must be at least 1".into());
        }
        if self.state.probe_percent > 50 {
            bad.push("state.probe_percent must be at most 50".into());
        }
        if self.role != Role::All && !self.streams.enabled {
            bad.push(format!(
                "role = {:?} needs streams.enabled = true (the trainer writes the logs the servers follow)",
                self.role.as_str()
            ));
        }
        if self.role == Role::Server && !self.serving.enabled {
            bad.push("role = \"server\" needs serving.enabled = true".into());
        }
        if self.streams.chunk_bytes == 0 || self.streams.chunk_bytes > 64 << 20 {
            bad.push("streams.chunk_bytes must be between 1 and 67108864".into());
        }
        if self.streams.enabled
            && (self.streams.models_log.is_empty() || self.streams.gallery_log.is_empty())
        {
            bad.push("streams.models_log and streams.gallery_log must name streams".into());
        }
        if !self.streams.max_age.is_empty() {
            match max_age_seconds(&self.streams.max_age) {
                None => bad.push(format!(
                    "streams.max_age {:?} must be a number and one of Y, M, D, h, m, s (\"7D\"), or empty",
                    self.streams.max_age
                )),
                Some(age) if self.streams.snapshot_every_s >= age => bad.push(format!(
                    "streams.snapshot_every_s ({}) must be shorter than streams.max_age ({age} s): \
                     retention would remove the only snapshot",
                    self.streams.snapshot_every_s
                )),
                Some(_) => {}
            }
        }
        if self.streams.snapshot_every_s == 0 {
            bad.push("streams.snapshot_every_s must be at least 1".into());
        }
        if self.streams.enabled && self.streams.manifest_log.is_empty() {
            bad.push("streams.manifest_log must name a stream".into());
        }
        if let GateMetric::Unknown(_) = self.serving.gate_metric {
            bad.push("serving.gate_metric must be mAP, rank1 or text_r1".into());
        }
        if !(self.serving.attribute_weight >= 0.0 && self.serving.attribute_weight.is_finite()) {
            bad.push("serving.attribute_weight must be a number ≥ 0".into());
        }
        if self.serving.prefetch == 0 {
            bad.push("serving.prefetch must be at least 1".into());
        }
        if self.captions.workers == 0 {
            bad.push("captions.workers must be at least 1".into());
        }
        bad
    }
}

/// `log.format`: how the daemon writes its log lines. A value outside the two is kept as
/// [`LogFormat::Unknown`] so that [`Config::validate`] can report it with every other bad key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per line.
    Json,
    /// Anything else (refused by validation).
    Unknown(String),
}

impl From<String> for LogFormat {
    fn from(s: String) -> Self {
        match s.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => LogFormat::Unknown(s),
        }
    }
}

impl From<LogFormat> for String {
    fn from(f: LogFormat) -> String {
        match f {
            LogFormat::Text => "text".into(),
            LogFormat::Json => "json".into(),
            LogFormat::Unknown(s) => s,
        }
    }
}

/// `serving.gate_metric`: the probe-split metric that gates a promotion. A value outside the
/// three is kept as [`GateMetric::Unknown`] for [`Config::validate`] to report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum GateMetric {
    /// `mAP`: mean average precision of image queries.
    MeanAp,
    /// `rank1`: Rank-1 of image queries.
    Rank1,
    /// `text_r1`: Rank-1 of text queries.
    TextR1,
    /// Anything else (refused by validation).
    Unknown(String),
}

impl GateMetric {
    /// The metric's name: its configuration value and its key in an evaluation's metrics.
    pub fn as_str(&self) -> &str {
        match self {
            GateMetric::MeanAp => "mAP",
            GateMetric::Rank1 => "rank1",
            GateMetric::TextR1 => "text_r1",
            GateMetric::Unknown(s) => s,
        }
    }
}

impl std::fmt::Display for GateMetric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for GateMetric {
    fn from(s: String) -> Self {
        match s.as_str() {
            "mAP" => GateMetric::MeanAp,
            "rank1" => GateMetric::Rank1,
            "text_r1" => GateMetric::TextR1,
            _ => GateMetric::Unknown(s),
        }
    }
}

impl From<GateMetric> for String {
    fn from(g: GateMetric) -> String {
        g.as_str().to_string()
    }
}
