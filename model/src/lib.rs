//! `plip-model`: the PLIP dual image/text encoder, its three pretext losses, the optimiser and
//! one training step, the caption tokenizer, weight (de)serialisation and the retrieval metrics —
//! tensors only: no file or network I/O, no async.
//!
//! The method is PLIP ("Language-Image Pre-training for Person Representation Learning", Zuo
//! et al.): a ViT image tower and a transformer text tower trained with identity-level
//! image–text contrast (IVLC), image-guided attribute-phrase prediction (IAP) and text-guided
//! colorization (TIC). Everything is generic over the dfdx float type and device (f32 on the CPU
//! by default; CUDA behind the `cuda` feature; f64 for the gradient check).
//!
//! # Layout
//! - [`preset`]: the model sizes (`test`, `tiny`, `small`), chosen by name at run time.
//! - [`params`]: named parameter tensors and their walk (optimiser, weights, gradient check).
//! - [`layers`]: Linear, LayerNorm, masked multi-head attention, the pre-LN block.
//! - [`vision`], [`text`]: the two towers; [`heads`]: the IAP and TIC heads.
//! - [`loss`]: IVLC (CMPM), masked cross-entropy, L2.
//! - [`metrics`]: Market-1501 CMC/mAP/mINP and text→image R@k/mAP.
//! - [`plip`]: the whole model, the weighted total loss, `embed_images` / `embed_texts`.
//! - [`batch`]: samples → the host arrays of one step (normalisation, phrase masking).
//! - [`optim`], [`train`]: AdamW with saveable state, clipping, schedules, the training step.
//! - [`tokenizer`]: the WordPiece caption tokenizer.
//! - [`weights`]: safetensors bytes with metadata.
//! - [`runtime`]: thread pool and allocator settings for CPU speed.
//! - [`device`]: the device by name (`cpu`, `cuda:N`), checked opening, a device-agnostic
//!   encoder.

pub mod batch;
pub mod conv;
pub mod device;
mod error;
pub mod heads;
pub mod layers;
pub mod loss;
pub mod metrics;
pub mod norm;
pub mod optim;
pub mod params;
pub mod plip;
pub mod preset;
pub mod resnet;
pub mod runtime;
pub mod text;
pub mod tokenizer;
pub mod train;
pub mod vision;
pub mod weights;

pub use device::{DeviceSpec, Encoder};
pub use dfdx;
pub use error::{Error, Result};
pub use params::Params;
pub use plip::{Embeddings, LossValues, Plip, TaskWeights};
pub use preset::{ConvBlock, ImageArch, JointFeature, Preset, Stem};
pub use tokenizer::Tokenizer;
pub use train::{StepReport, TrainConfig, Trainer};
