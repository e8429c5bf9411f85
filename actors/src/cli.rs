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
    Eval(crate::eval::EvalArgs),
    /// Writes a synthetic pedestrian data set (Market-1501 layout + SYNTH-PEDES-style JSON).
    Synth(crate::synth::SynthArgs),
    /// Trains the model offline from a data-set folder into a state folder.
    Train(crate::train::TrainArgs),
    /// The caption tokenizer.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Writes a checkpoint's weights (with its tokenizer) as a .safetensors file.
    Export(crate::export::ExportArgs),
}

#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Trains a WordPiece vocabulary from the caption synthesizer's vocabulary and optional texts.
    Train(crate::train::TokenizerArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Median training-step time and images/s on synthetic batches; prints one JSON line.
    Train(crate::bench::TrainBenchArgs),
}

/// Parses the command line and runs the command; errors are printed, not panicked.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(BenchCommand::Train(args)) => crate::bench::train(&args),
        Command::Eval(args) => crate::eval::run(&args),
        Command::Synth(args) => crate::synth::run(&args),
        Command::Train(args) => crate::train::run(&args),
        Command::Tokenizer(TokenizerCommand::Train(args)) => crate::train::run_tokenizer(&args),
        Command::Export(args) => crate::export::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plipd: {e}");
            ExitCode::FAILURE
        }
    }
}
