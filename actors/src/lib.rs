//! `plip-actors`: the running PLIP system and the `plipd` binary.
//!
//! For now this crate holds the command line and the training benchmark; the daemon's actors
//! (ingest, captioning, trainer, checkpointer, ReID server, HTTP listener) arrive with the
//! pipeline and serving work.
//!
//! # Layout
//! - [`cli`]: the `plipd` command line.
//! - [`bench`]: `plipd bench train`, the training-step benchmark.
//! - [`eval`]: `plipd eval --distmat`, metrics of a distance matrix.
//! - [`synth`]: `plipd synth`, the synthetic data set.
//! - [`progress`]: progress bars.

pub mod bench;
pub mod cli;
pub mod eval;
pub mod progress;
pub mod synth;
