//! `plip-actors`: the running PLIP system and the `plipd` binary.
//!
//! # Layers
//! Each layer imports only from the layers below it; `actors/tests/layers.rs` fails on an
//! upward `use`.
//! 1. [`base`]: what everything shares — configuration, the error type, the state folder
//!    (checkpoints, the sample store and its pack files, free space), model loading and
//!    export, retrieval evaluation, the tokenizer's training, the P×K sampler, the
//!    exact-search index, data-set loading, plots, progress bars, the admin client of a
//!    running daemon, and `plipd run` as a child process.
//! 2. [`daemon`]: `plipd run` — supervisor, broker, ingest, captioner, trainer, serving,
//!    notify, HTTP, stats.
//! 3. [`commands`]: the other `plipd` subcommands (train, eval, export, query, publish, synth,
//!    demo).
//! 4. [`bench`]: `plipd bench …`.
//! 5. [`cli`]: the command line that dispatches to all of them.

pub mod base;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod daemon;
