//! The daemon (`plipd run`): one ractor supervisor owning the ingest consumer (with its broker
//! connection), the caption workers, the continuous trainer, the checkpointer, the serving
//! swapper and request consumer, and the HTTP listener, all sharing the state folder.
//!
//! Data flow: deliveries on `plip.ingest` → decode/validate → images appended to pack files and
//! records (with their captions) flushed into sled → ack; refused messages → a copy on
//! `plip.dlx` with `x-plip-error` → ack; trainer thread (identity-balanced batches from the
//! store) → checkpointer (sled `checkpoints` tree) → swapper (gate, gallery re-embedding,
//! hot swap) → request consumer answering `plip.reid.requests`.
//!
//! - [`supervisor`]: the actor tree, restarts and shutdown with completion guards;
//! - [`broker`]: connecting, reconnect backoff, confirmed publishing;
//! - [`ingest`]: the ingest consumer; [`captioner`]: captions for records stored before
//!   captions were written at intake (format-1 state folders);
//! - [`trainer`]: the continuous trainer and the checkpointer;
//! - [`serving`]: the gate, the swapper, the request consumer and the query batcher;
//!   [`logs`]: the models and gallery logs on RabbitMQ streams (written by a trainer);
//!   [`follower`]: a server's side of them;
//! - [`http`]: the status, metrics and admin listener; [`stats`]: the counters it renders;
//!   [`notify`]: systemd readiness and watchdog.

use crate::base::error::{Error, Result};

pub mod broker;
pub mod captioner;
pub mod follower;
pub mod http;
pub mod ingest;
pub mod logs;
pub mod notify;
pub mod serving;
pub mod stats;
pub mod supervisor;
pub mod trainer;

use crate::base::config::Config;
use crate::base::state::State;
use crate::base::store::SampleStore;
pub use stats::{ServingStats, Stats, TrainerState, TrainerStats, LATENCY_BUCKETS};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// What every part of the daemon shares.
pub struct Shared {
    pub cfg: Config,
    pub state: State,
    pub store: SampleStore,
    stats: Mutex<Stats>,
    /// Set once on SIGTERM/SIGINT: every loop winds down.
    pub shutdown: AtomicBool,
    /// Wakes waiters when `shutdown` is set.
    pub shutdown_notify: tokio::sync::Notify,
    /// Persons forgotten so far (the swapper rebuilds the gallery when it changes).
    pub forgets: std::sync::atomic::AtomicU64,
    /// Persons forgotten and not yet dropped from the trainer's identity classifier.
    pub forget_rows: Mutex<Vec<String>>,
    /// The serving encoder and gallery (swapped whole).
    pub serving: std::sync::RwLock<Option<Arc<serving::Serving>>>,
    /// The budget of decoded pixels in flight (`limits.decoded_pixels_in_flight` permits, one
    /// per pixel): ingest decodes an image only while holding its width × height.
    pub pixels: Arc<tokio::sync::Semaphore>,
    /// Pixels decoded since the allocator last gave freed memory back.
    pub decoded_since_trim: std::sync::atomic::AtomicU64,
    /// The process's exit status once stopped: 0, or [`EXIT_STORAGE_FAILED`].
    pub exit_code: std::sync::atomic::AtomicI32,
    /// The last answers of the endpoints that read the state folder, for when it does not answer.
    pub http_cache: http::Cache,
    /// This process's name in replies (`serving.instance`, or host name and process id).
    pub instance: String,
}

/// `configured`, or this host's name and the process id.
fn instance_name(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "plipd".into());
    format!("{host}-{}", std::process::id())
}

/// Exit status after a storage failure (EX_TEMPFAIL): sled's errors are sticky until the
/// database is reopened, so the daemon stops and its service manager starts it again
/// (`Restart=on-failure`); it then waits, not consuming, until space is back above the reserve.
pub const EXIT_STORAGE_FAILED: i32 = 75;

impl Shared {
    /// Opens the state folder of `cfg`.
    ///
    /// # Errors
    /// The state folder cannot be opened (another process holds it, newer format, I/O).
    pub fn open(cfg: Config) -> Result<Arc<Shared>> {
        let cfg_pixels = cfg.limits.decoded_pixels_in_flight;
        let state = State::open(&cfg.state.dir)?;
        // A server's samples are its gallery: none is held out as a probe.
        let probe_percent = match cfg.role {
            crate::base::config::Role::Server => 0,
            _ => cfg.state.probe_percent,
        };
        let store = state.samples(probe_percent)?;
        Ok(Arc::new(Shared {
            state,
            store,
            stats: Mutex::new(Stats::default()),
            shutdown: AtomicBool::new(false),
            shutdown_notify: tokio::sync::Notify::new(),
            serving: std::sync::RwLock::new(None),
            forgets: std::sync::atomic::AtomicU64::new(0),
            forget_rows: Mutex::new(Vec::new()),
            pixels: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(cfg_pixels).unwrap_or(usize::MAX >> 4),
            )),
            decoded_since_trim: std::sync::atomic::AtomicU64::new(0),
            exit_code: std::sync::atomic::AtomicI32::new(0),
            http_cache: http::Cache::default(),
            instance: instance_name(&cfg.serving.instance),
            cfg,
        }))
    }

    /// The live counters (a poisoned lock still yields them: counters cannot be half-written).
    pub fn stats(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The serving version now (a request keeps this `Arc` until it is answered).
    pub fn serving_snapshot(&self) -> Option<Arc<serving::Serving>> {
        self.serving
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The checkpoint version serving now.
    pub fn serving_version(&self) -> Option<u64> {
        self.serving_snapshot().map(|s| s.version)
    }

    /// True once shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// Begins shutdown.
    /// Stops the daemon with exit status `code` (the first failure's status is kept).
    pub fn fail(&self, code: i32) {
        let _ = self.exit_code.compare_exchange(
            0,
            code,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
        self.stop();
    }

    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.shutdown_notify.notify_waiters();
    }

    /// Resolves once shutdown has begun (never misses a `stop` that races with it).
    pub async fn stopped(&self) {
        loop {
            let notified = self.shutdown_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stopping() {
                return;
            }
            notified.await;
        }
    }

    /// Sleeps `d` or until shutdown begins; true when shutting down.
    pub async fn sleep_or_stop(&self, d: std::time::Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stopped() => {}
        }
        self.stopping()
    }
}

/// Installs the daemon's `tracing` subscriber: events on stderr (the journal keeps them) as
/// readable lines or, with `log.format = "json"`, one JSON object per line whose fields are
/// top-level keys (`"message"` is the event name). `RUST_LOG`, when set and valid, replaces
/// `log.level`. A second call (a test running two daemons in one process) changes nothing.
pub fn init_logging(cfg: &crate::base::config::LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(&cfg.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if cfg.format == crate::base::config::LogFormat::Json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.try_init()
    };
}

/// Opens nothing but checks, before anything starts, that every configured CUDA device is
/// usable — so a missing driver or GPU stops the start with a message instead of a trainer
/// that fails and restarts forever.
fn check_devices(cfg: &Config) -> Result<()> {
    for (key, name, used) in [
        ("trainer.device", &cfg.trainer.device, cfg.trainer.enabled),
        ("serving.device", &cfg.serving.device, cfg.serving.enabled),
    ] {
        let spec = plip_model::DeviceSpec::parse(name)
            .map_err(|e| Error::Config(format!("{key}: {e}")))?;
        if let (plip_model::DeviceSpec::Cuda(n), true) = (spec, used) {
            let what = plip_model::device::cuda_describe(n)
                .map_err(|e| Error::Config(format!("{key}: {e}")))?;
            tracing::info!(key, device = %what, "cuda_device");
        }
    }
    Ok(())
}

/// Runs the daemon until SIGTERM/SIGINT; returns after a clean shutdown.
///
/// # Errors
/// A start-up failure (state folder, HTTP address, runtime).
pub fn run(cfg: Config) -> Result<()> {
    init_logging(&cfg.log);
    check_devices(&cfg)?;
    plip_model::runtime::tune_allocator();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("plipd-io")
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the async runtime: {e}")))?;
    let grace = Duration::from_secs(cfg.state.stall_timeout_s.clamp(5, 60));
    let result = rt.block_on(async move {
        let shared = Shared::open(cfg)?;
        let listener = http::bind(&shared.cfg.http.listen).await?;
        tracing::info!(
            state = %shared.cfg.state.dir.display(),
            http = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            broker = %redact(&shared.cfg.broker.url),
            samples = shared.store.len(),
            "started"
        );
        let running = supervisor::start(shared.clone(), listener).await?;
        let stop_signal = wait_for_signal();
        tokio::pin!(stop_signal);
        tokio::select! {
            sig = &mut stop_signal => tracing::info!(signal = sig, "signal"),
            _ = shared.stopped() => {}
        }
        shared.stop();
        notify::notify("STOPPING=1");
        let code = || shared.exit_code.load(Ordering::SeqCst);
        // Every part winds down within the grace period, whatever storage does: a call that
        // blocks in sled must not keep SIGTERM waiting (sled recovers from an exit as from a
        // kill -9: what was acknowledged was flushed).
        let tasks = running.tasks();
        let wind_down = async {
            supervisor::shutdown(running).await;
            if code() == 0 {
                let s = shared.clone();
                tokio::task::spawn_blocking(move || s.state.flush()).await??;
            }
            Ok::<(), Error>(())
        };
        match tokio::time::timeout(grace + Duration::from_secs(30), wind_down).await {
            Ok(r) => r?,
            Err(_) => tracing::error!(
                seconds = (grace + Duration::from_secs(30)).as_secs(),
                still_running = ?tasks.running(),
                "shutdown_deadline_passed"
            ),
        }
        if code() != 0 {
            tracing::error!(status = code(), "exiting_after_storage_failure");
            // Not dropping the database: after an I/O error sled's drop can block.
            std::process::exit(code());
        }
        tracing::info!(samples = shared.store.len(), "stopped");
        Ok(())
    });
    // Blocking calls still stuck in storage are abandoned, not waited for.
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

/// The broker URL with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_the_password_only() {
        assert_eq!(
            super::redact("amqps://user:secret@host:5671/vh"),
            "amqps://user:***@host:5671/vh"
        );
        assert_eq!(super::redact("amqp://host"), "amqp://host");
    }

    use super::TrainerState;

    /// `/status` keeps the strings it always showed; only the ended states let the
    /// checkpointer stop.
    #[test]
    fn trainer_states_read_as_before() {
        let json = |s: TrainerState| serde_json::to_value(s).expect("serialises");
        assert_eq!(json(TrainerState::NotStarted), "");
        assert_eq!(json(TrainerState::WaitingForSamples), "waiting_for_samples");
        assert_eq!(json(TrainerState::Failed), "failed");
        let ended: Vec<bool> = [
            TrainerState::NotStarted,
            TrainerState::Disabled,
            TrainerState::Starting,
            TrainerState::WaitingForSamples,
            TrainerState::Training,
            TrainerState::Idle,
            TrainerState::Stopped,
            TrainerState::Failed,
        ]
        .map(TrainerState::ended)
        .to_vec();
        assert_eq!(
            ended,
            [true, true, false, false, false, false, true, true].to_vec()
        );
    }
}
