//! `plipd bench …`: the benchmarks, each printing one JSON line with its peer measured in the
//! same run.
//!
//! - [`train`]: `bench train` (a training step) and `bench agree`;
//! - [`conv`]: `bench conv`; [`ingest`]: `bench ingest`; [`reid`]: `bench reid`;
//!   [`search`]: `bench search`; [`replicas`]: `bench replicas`.

pub mod conv;
pub mod ingest;
pub mod reid;
pub mod replicas;
pub mod search;
pub mod train;
