//! The bottom layer: what the daemon, the commands and the benchmarks share. Imports nothing
//! of the crate outside itself.
//!
//! - [`config`]: the configuration (file, environment, validation); [`error`]: the error type
//!   of the core and the daemon, with the wire code of each kind.
//! - [`state`]: the sled state folder (tokenizer, checkpoints, gallery, serving records);
//!   [`store`]: the sample store; [`packs`]: the images' pack files; [`disk`]: free space.
//! - [`model`]: models loaded from a checkpoint or a weights file, and exports;
//!   [`retrieval`]: retrieval evaluation; [`tokenizer`]: the tokenizer's training.
//! - [`index`]: exact top-k search; [`data`]: data-set items → pixels and captions;
//!   [`sampler`]: the P×K batch sampler of offline and continuous training.
//! - [`client`]: requests to a running daemon's HTTP listener; [`launch`]: `plipd run` as a
//!   child process (the benchmarks and the demo).
//! - [`plots`]: loss and CMC PNGs; [`progress`]: progress bars.

pub mod chunks;
pub mod client;
pub mod config;
pub mod data;
pub mod disk;
pub mod error;
pub mod index;
pub mod launch;
pub mod model;
pub mod packs;
pub mod plots;
pub mod progress;
pub mod retrieval;
pub mod sampler;
pub mod state;
pub mod store;
pub mod tokenizer;
