//! The `plipd` command line.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// plipd — continual PLIP pre-training and person re-identification.
#[derive(Debug, Parser)]
#[command(name = "plipd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Retrieval metrics (Market-1501 CMC/mAP/mINP) of a distance matrix; prints JSON.
    Eval(crate::commands::eval::EvalArgs),
    /// Writes a synthetic pedestrian data set (Market-1501 layout + SYNTH-PEDES-style JSON).
    Synth(crate::commands::synth::SynthArgs),
    /// Trains the model offline from a data-set folder into a state folder.
    Train(Box<crate::commands::train::TrainArgs>),
    /// The caption tokenizer.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Writes a checkpoint's weights (with its tokenizer) as a .safetensors file.
    Export(crate::commands::export::ExportArgs),
    /// Runs the daemon: ingest from RabbitMQ, caption, train continuously, checkpoint.
    Run(RunArgs),
    /// Publishes a data set onto the ingest exchange (a producer), with publisher confirms.
    Publish(crate::commands::publish::PublishArgs),
    /// Status of a running daemon (through its HTTP listener), or of a state folder.
    Status(AdminArgs),
    /// Checkpoints of a running daemon, or of a state folder (gate metrics, serving, pinned).
    Checkpoints(AdminArgs),
    /// Pins a checkpoint version: the daemon serves it until `plipd unpin`.
    Rollback(RollbackArgs),
    /// Returns to automatic promotion of new checkpoints.
    Unpin(AdminArgs),
    /// Deletes a person's samples and gallery entries (trained weights cannot unlearn).
    Forget(ForgetArgs),
    /// Sends a ReID query (image or text) over the broker and prints the ranked matches.
    Query(crate::commands::query::QueryArgs),
    /// The configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The whole system on this machine: daemon, synthetic producer, queries, live progress,
    /// a report at the end.
    Demo(crate::commands::demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Prints the effective configuration (file + PLIP__… variables + defaults) as JSON, with
    /// the broker password redacted.
    Show(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// The checkpoint version to serve.
    #[arg(long)]
    pub version: u64,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, clap::Args)]
pub struct ForgetArgs {
    /// The person id whose samples are deleted.
    #[arg(long)]
    pub person: String,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Configuration file (TOML; see configs/default.toml). `PLIP__SECTION__KEY` environment
    /// variables override it.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// The process's role (overrides the configuration's `role`).
    #[arg(long, value_enum)]
    pub role: Option<crate::base::config::Role>,
}

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// Configuration file (for the listener address and the state folder).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Address of a running daemon's HTTP listener (default: the configuration's).
    #[arg(long)]
    pub http: Option<String>,
    /// State folder to open directly when no daemon answers (default: the configuration's).
    #[arg(long)]
    pub state: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Trains a WordPiece vocabulary from the caption synthesizer's vocabulary and optional texts.
    Train(crate::commands::train::TokenizerArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Median training-step time and images/s on synthetic batches; prints one JSON line.
    Train(crate::bench::train::TrainBenchArgs),
    /// The convolution's two im2col forms on the `tiny` ResNet's layer shapes.
    Conv(crate::bench::conv::ConvBenchArgs),
    /// CPU-vs-device agreement on one batch (embeddings, losses, SGD and AdamW updates); prints
    /// one JSON line and fails when a difference exceeds the tolerance.
    Agree(crate::bench::train::AgreeArgs),
    /// Ingest throughput (broker → durable samples) next to its peers — decode-only, consume +
    /// decode, the store alone, a bare consume + ack loop — and the daemon's peak RSS; prints
    /// one JSON line.
    Ingest(crate::bench::ingest::IngestBenchArgs),
    /// Top-k queries per second of the ReID index, single and batched; prints one JSON line.
    Search(crate::bench::search::SearchBenchArgs),
    /// ReID over the broker: latency, throughput and a hot swap at a 10k gallery; prints JSON.
    Reid(crate::bench::reid::ReidBenchArgs),
    /// Scale-out: a trainer and one, then two, server processes — a new server's catch-up
    /// time at the gallery size, and queries per second with one and with two; prints JSON.
    Replicas(crate::bench::replicas::ReplicasBenchArgs),
}

/// Parses the command line and runs the command; errors are printed, not panicked.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(BenchCommand::Train(args)) => crate::bench::train::train(&args),
        Command::Bench(BenchCommand::Conv(args)) => crate::bench::conv::run(&args),
        Command::Bench(BenchCommand::Agree(args)) => match crate::bench::train::agree(&args) {
            Ok(true) => Ok(()),
            Ok(false) => Err("the devices disagree beyond the tolerance (see the JSON)".into()),
            Err(e) => Err(e),
        },
        Command::Bench(BenchCommand::Ingest(args)) => crate::bench::ingest::run(&args),
        Command::Bench(BenchCommand::Search(args)) => crate::bench::search::run(&args),
        Command::Bench(BenchCommand::Reid(args)) => crate::bench::reid::run(&args),
        Command::Bench(BenchCommand::Replicas(args)) => crate::bench::replicas::run(&args),
        Command::Eval(args) => crate::commands::eval::run(&args),
        Command::Synth(args) => crate::commands::synth::run(&args),
        Command::Train(args) => crate::commands::train::run(&args),
        Command::Tokenizer(TokenizerCommand::Train(args)) => {
            crate::commands::train::run_tokenizer(&args)
        }
        Command::Export(args) => crate::commands::export::run(&args),
        Command::Run(args) => crate::base::config::Config::load(args.config.as_deref())
            .and_then(|mut cfg| {
                if let Some(role) = args.role {
                    cfg.role = role;
                    cfg.validate()?;
                }
                Ok(cfg)
            })
            .and_then(crate::daemon::run)
            .map_err(Into::into),
        Command::Publish(args) => crate::commands::publish::run(&args),
        Command::Status(args) => admin(&args, "/status"),
        Command::Checkpoints(args) => admin(&args, "/checkpoints"),
        Command::Rollback(a) => admin_post(&a.admin, Action::Rollback(a.version)),
        Command::Unpin(a) => admin_post(&a, Action::Unpin),
        Command::Forget(a) => admin_post(&a.admin, Action::Forget(a.person.clone())),
        Command::Query(a) => crate::commands::query::run(&a),
        Command::Config(ConfigCommand::Show(a)) => show_config(&a),
        Command::Demo(a) => crate::commands::demo::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plipd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `plipd status` / `plipd checkpoints`: asks the running daemon, or reads the state folder
/// when none answers (sled allows one process per folder, so a running daemon is only reachable
/// through its listener).
fn admin(args: &AdminArgs, path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = crate::base::config::Config::load(args.config.as_deref())?;
    let addr = args.http.clone().unwrap_or(cfg.http.listen.clone());
    if let Some(answer) = crate::base::client::get(&addr, path) {
        println!("{}", serde_json::to_string_pretty(&answer?)?);
        return Ok(());
    }
    let dir = args.state.clone().unwrap_or(cfg.state.dir.clone());
    if !dir.exists() {
        return Err(format!(
            "no daemon answers at {addr} and there is no state folder at {}",
            dir.display()
        )
        .into());
    }
    let state = crate::base::state::State::open(&dir).map_err(|e| {
        format!("no daemon answers at {addr}, and the state folder cannot be opened: {e}")
    })?;
    let doc = if path == "/status" {
        let store = state.samples(cfg.state.probe_percent)?;
        serde_json::json!({
            "daemon": null,
            "state_dir": dir,
            "samples": {"total": store.len(), "by_purpose": store.counts(), "uncaptioned": store.uncaptioned_len()},
            "latest_checkpoint": state.latest_version()?,
        })
    } else {
        crate::daemon::http::list_checkpoints(&state)?
    };
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

/// Percent-encodes a query value.
fn escape(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// An admin change.
enum Action {
    Rollback(u64),
    Unpin,
    Forget(String),
}

/// `plipd rollback` / `unpin` / `forget`: through the running daemon, or on the state folder
/// when none answers.
fn admin_post(args: &AdminArgs, action: Action) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = crate::base::config::Config::load(args.config.as_deref())?;
    let addr = args.http.clone().unwrap_or(cfg.http.listen.clone());
    let path = match &action {
        Action::Rollback(v) => format!("/rollback?version={v}"),
        Action::Unpin => "/unpin".to_string(),
        Action::Forget(p) => format!("/forget?person={}", escape(p)),
    };
    if let Some(answer) = crate::base::client::request(&addr, "POST", &path) {
        let v: serde_json::Value = serde_json::from_slice(&answer?)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let dir = args.state.clone().unwrap_or(cfg.state.dir.clone());
    let state = crate::base::state::State::open(&dir).map_err(|e| {
        format!("no daemon answers at {addr}, and the state folder cannot be opened: {e}")
    })?;
    let doc = match action {
        Action::Rollback(v) => {
            state.set_pinned(Some(v))?;
            serde_json::json!({"pinned": v})
        }
        Action::Unpin => {
            state.set_pinned(None)?;
            serde_json::json!({"pinned": null})
        }
        Action::Forget(person) => {
            let store = state.samples(cfg.state.probe_percent)?;
            let ids = store.forget_person(&person)?;
            state.remove_gallery(&ids)?;
            serde_json::json!({"person": person, "samples_removed": ids.len(), "note": "samples and gallery entries are deleted; trained weights cannot unlearn"})
        }
    };
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

/// `plipd config show`.
fn show_config(args: &RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = crate::base::config::Config::load(args.config.as_deref())?;
    cfg.broker.url = crate::daemon::redact(&cfg.broker.url);
    println!("{}", serde_json::to_string_pretty(&cfg)?);
    Ok(())
}
