//! The `plipd` subcommands other than `run` and `bench`: each a module with its clap arguments
//! and a `run`. They use [`crate::base`] and [`crate::daemon`].
//!
//! - [`train`]: `plipd tokenizer train`, `plipd train`.
//! - [`eval`]: `plipd eval` (a model or the colour-histogram baseline on a data set, or a
//!   distance-matrix file).
//! - [`export`]: `plipd export`; [`query`]: `plipd query`; [`publish`]: `plipd publish`;
//!   [`synth`]: `plipd synth`; [`demo`]: `plipd demo`.

pub mod demo;
pub mod eval;
pub mod export;
pub mod publish;
pub mod query;
pub mod synth;
pub mod train;
