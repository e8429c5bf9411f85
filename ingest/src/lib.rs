//! `plip-ingest`: everything about samples before they reach a tensor — the wire format of the
//! messages producers publish, validation, image decoding, caption synthesis, the synthetic
//! pedestrian generator, and the data-set readers. It does not depend on `plip-model`.
//!
//! # Layout
//! - [`amqp`]: the RabbitMQ topology (exchanges, queues, arguments) and connecting.
//! - [`attributes`]: the six-group attribute schema with closed vocabularies.
//! - [`baseline`]: the colour-histogram ReID baseline.
//! - [`captions`]: caption synthesis with attribute-phrase spans; colour naming from pixels.
//! - [`datasets`]: readers for SYNTH-PEDES, CUHK-PEDES and Market-1501.
//! - [`dead_letter`]: bounded echoes of producer strings, header tables measured without
//!   recursion, dead-letter copies and replies that fit the frame.
//! - [`image`]: intake limits, decoding with explicit limits, the canonical 256×128 sample.
//! - [`synth`]: the synthetic pedestrian generator (`plipd synth`).
//! - [`wire`]: the ingest wire format, decoding and validation, stable error codes.
//!
//! Still to come: publish/consume helpers.

pub mod amqp;
pub mod attributes;
pub mod baseline;
pub mod captions;
pub mod datasets;
pub mod dead_letter;
pub mod image;
pub mod reid;
pub mod synth;
pub mod wire;
