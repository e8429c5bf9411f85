//! `plip-ingest`: everything about samples before they reach a tensor — the wire format of the
//! messages producers publish, validation, image decoding, caption synthesis, the synthetic
//! pedestrian generator, and the data-set readers.
//!
//! # Layout
//! Empty so far: the data and pipeline work fills it (see the repository's README for what is
//! built). It deliberately does not depend on `plip-model`.
