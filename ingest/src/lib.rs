//! `plip-ingest`: everything about samples before they reach a tensor — the wire format of the
//! messages producers publish, validation, image decoding, caption synthesis, the synthetic
//! pedestrian generator, and the data-set readers. It does not depend on `plip-model`.
//!
//! # Layout
//! - [`attributes`]: the six-group attribute schema with closed vocabularies.
//! - [`captions`]: caption synthesis with attribute-phrase spans; colour naming from pixels.
//! - [`image`]: intake limits, decoding with explicit limits, the canonical 256×128 sample.
//!
//! Still to come: synthetic pedestrians, data-set readers,
//! the AMQP wire format.

pub mod attributes;
pub mod captions;
pub mod image;
