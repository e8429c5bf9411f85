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
//! - [`progress`]: progress bars; [`plots`]: loss and CMC PNGs.
//! - [`data`]: data-set items → pixels and captions.
//! - [`train`]: `plipd tokenizer train`, `plipd train`.
//! - [`evaluate`]: `plipd eval --data` (model or baseline); [`export`]: `plipd export`.
//! - [`state`]: the sled state folder (tokenizer, checkpoints); [`store`]: the sample store.

pub mod bench;
pub mod bench_conv;
pub mod bench_ingest;
pub mod bench_reid;
pub mod bench_search;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod data;
pub mod demo;
pub mod disk;
pub mod eval;
pub mod evaluate;
pub mod export;
pub mod index;
pub mod packs;
pub mod plots;
pub mod progress;
pub mod publish;
pub mod query;
pub mod state;
pub mod store;
pub mod synth;
pub mod train;
