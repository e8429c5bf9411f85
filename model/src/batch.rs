//! Turning samples (pixels, a caption with its attribute-phrase spans, an identity) into the
//! host-side arrays one training step consumes: normalised images, grayscale copies and
//! colorization targets (TIC), caption tokens, phrase-masked captions and their labels (IAP), and
//! identity labels (IVLC).

use crate::preset::Preset;
use crate::text::TokenBatch;
use crate::tokenizer::Tokenizer;
use crate::Result;
use rand::seq::SliceRandom;
use rand::Rng;
use std::ops::Range;

/// Per-channel mean of the normalisation (PLIP's statistics of its person crops).
pub const MEAN: [f32; 3] = [0.357, 0.323, 0.328];
/// Per-channel standard deviation of the normalisation.
pub const STD: [f32; 3] = [0.252, 0.242, 0.239];

/// One training sample as the model sees it.
#[derive(Debug, Clone)]
pub struct Sample<'a> {
    /// RGB pixels, row-major `H×W×3` bytes at the preset's input size.
    pub rgb: &'a [u8],
    /// One caption.
    pub caption: &'a str,
    /// Character spans of the caption's attribute phrases.
    pub phrases: &'a [Range<usize>],
    /// Person identity; `None` for an unlabelled sample (its own identity).
    pub identity: Option<u64>,
}

/// The host arrays of one step.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Number of samples.
    pub n: usize,
    /// Normalised images `(n, 3, H, W)`.
    pub images: Vec<f32>,
    /// Normalised grayscale images `(n, 3, H, W)` (the luminance in all three channels).
    pub gray: Vec<f32>,
    /// Colorization targets `(n·patches, 3·side²)`: the normalised colour image, averaged over
    /// `tic_reduce²` blocks, channel-major inside each patch, patches in row-major order.
    pub tic_target: Vec<f32>,
    /// Caption tokens.
    pub tokens: TokenBatch,
    /// Captions with the chosen phrases replaced by `[MASK]`.
    pub masked: TokenBatch,
    /// Flat indices (`row·len + position`) of the masked tokens.
    pub iap_positions: Vec<usize>,
    /// Original token id at each masked position.
    pub iap_labels: Vec<usize>,
    /// Identity of each sample.
    pub identities: Vec<Option<u64>>,
    /// Fraction of phrases masked in this batch.
    pub mask_ratio: f64,
}

/// The curriculum mask ratio of IAP: 0.2 + 0.6·√(step / ramp_steps), capped at 0.8.
pub fn mask_ratio(step: u64, ramp_steps: u64) -> f64 {
    let t = if ramp_steps == 0 {
        1.0
    } else {
        (step as f64 / ramp_steps as f64).min(1.0)
    };
    0.2 + 0.6 * t.sqrt()
}

/// Normalised `(3, H, W)` floats from `H×W×3` bytes.
pub fn normalize_rgb(rgb: &[u8], h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0; 3 * h * w];
    for (i, px) in rgb.chunks_exact(3).take(h * w).enumerate() {
        for c in 0..3 {
            out[c * h * w + i] = (px[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

/// Normalised grayscale `(3, H, W)`: Y = 0.299 R + 0.587 G + 0.114 B in every channel.
pub fn normalize_gray(rgb: &[u8], h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0; 3 * h * w];
    for (i, px) in rgb.chunks_exact(3).take(h * w).enumerate() {
        let y = (0.299 * px[0] as f32 + 0.587 * px[1] as f32 + 0.114 * px[2] as f32) / 255.0;
        for c in 0..3 {
            out[c * h * w + i] = (y - MEAN[c]) / STD[c];
        }
    }
    out
}

/// Colorization target of one normalised `(3, H, W)` image: `(patches, 3·side²)`.
pub fn tic_target(image: &[f32], p: &Preset) -> Vec<f32> {
    let (h, w, ps, r) = (p.image_height, p.image_width, p.patch, p.tic_reduce);
    let side = ps / r;
    let mut out = Vec::with_capacity(p.num_patches() * p.tic_len());
    let inv = 1.0 / (r * r) as f32;
    for gy in 0..p.grid_h() {
        for gx in 0..p.grid_w() {
            for c in 0..3 {
                for sy in 0..side {
                    for sx in 0..side {
                        let mut acc = 0.0;
                        for dy in 0..r {
                            for dx in 0..r {
                                let y = gy * ps + sy * r + dy;
                                let x = gx * ps + sx * r + dx;
                                acc += image[c * h * w + y * w + x];
                            }
                        }
                        out.push(acc * inv);
                    }
                }
            }
        }
    }
    out
}

impl Batch {
    /// Builds a batch; `ratio` is the IAP mask ratio ([`mask_ratio`]), `rng` picks the phrases.
    ///
    /// # Errors
    /// An image of the wrong size, or a tokenizer failure.
    pub fn build<R: Rng>(
        samples: &[Sample<'_>],
        preset: &Preset,
        tokenizer: &Tokenizer,
        ratio: f64,
        rng: &mut R,
    ) -> Result<Self> {
        let (h, w, len) = (preset.image_height, preset.image_width, preset.text_len);
        let n = samples.len();
        let mut batch = Batch {
            n,
            images: Vec::with_capacity(n * preset.image_len()),
            gray: Vec::with_capacity(n * preset.image_len()),
            tic_target: Vec::with_capacity(n * preset.num_patches() * preset.tic_len()),
            tokens: TokenBatch {
                ids: Vec::new(),
                mask: Vec::new(),
                batch: n,
                len,
            },
            masked: TokenBatch {
                ids: Vec::new(),
                mask: Vec::new(),
                batch: n,
                len,
            },
            iap_positions: Vec::new(),
            iap_labels: Vec::new(),
            identities: Vec::with_capacity(n),
            mask_ratio: ratio,
        };
        // Captions are padded only to the longest one in the batch (padding never changes the
        // result, and the text tower's cost grows with the length).
        let encoded: Vec<_> = samples
            .iter()
            .map(|s| tokenizer.encode(s.caption, len))
            .collect::<Result<_>>()?;
        let len = encoded.iter().map(|e| e.real_len()).max().unwrap_or(2);
        batch.tokens.len = len;
        batch.masked.len = len;
        for (row, (s, enc)) in samples.iter().zip(encoded).enumerate() {
            if s.rgb.len() != h * w * 3 {
                return Err(crate::Error::Shape(format!(
                    "sample {row}: {} bytes of pixels, expected {h}×{w}×3 = {}",
                    s.rgb.len(),
                    h * w * 3
                )));
            }
            let img = normalize_rgb(s.rgb, h, w);
            batch.tic_target.extend(tic_target(&img, preset));
            batch.images.extend(img);
            batch.gray.extend(normalize_gray(s.rgb, h, w));
            batch.identities.push(s.identity);

            let mut masked_ids = enc.ids[..len].to_vec();
            let mut phrases: Vec<Vec<usize>> = s
                .phrases
                .iter()
                .map(|ph| enc.phrase_positions(ph))
                .filter(|pos| !pos.is_empty())
                .collect();
            phrases.shuffle(rng);
            let k = ((phrases.len() as f64 * ratio).round() as usize)
                .clamp(usize::from(!phrases.is_empty()), phrases.len());
            let mut chosen: Vec<usize> = phrases.into_iter().take(k).flatten().collect();
            chosen.sort_unstable();
            chosen.dedup();
            for pos in chosen {
                batch.iap_positions.push(row * len + pos);
                batch.iap_labels.push(enc.ids[pos]);
                masked_ids[pos] = tokenizer.mask_id();
            }
            batch.tokens.ids.extend(&enc.ids[..len]);
            batch.tokens.mask.extend(&enc.mask[..len]);
            batch.masked.ids.extend(masked_ids);
            batch.masked.mask.extend(&enc.mask[..len]);
        }
        Ok(batch)
    }
}
