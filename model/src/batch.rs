//! Turning samples (pixels, a caption with its attribute-phrase spans, an identity) into the
//! host-side arrays one training step consumes: normalised images, grayscale copies and
//! colorization targets (TIC), caption tokens, phrase-masked captions and their labels (IAP), and
//! identity labels (IVLC).

use crate::preset::Preset;
use crate::text::TokenBatch;
use crate::tokenizer::Tokenizer;
use crate::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Training augmentation, the standard ReID set; no colour jitter (captions name the garment
/// colours). Each sample's draws come from its own generator seeded by (seed, step, slot), so a
/// resumed run repeats them exactly.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Probability of a horizontal flip.
    pub flip: f64,
    /// Padding on every side, as a fraction of the input width (0.125 = 8 px at 64 wide), with
    /// the normalisation mean (0 after normalising), then a random crop back to the input size;
    /// 0 turns it off.
    pub pad_crop: f64,
    /// Probability of random erasing (Zhong et al. 2020): a rectangle of 2–40% of the image,
    /// aspect 0.3–3.3, filled with N(0, 1) noise in normalised units, in the colour image only
    /// (the grayscale input and colorization target of TIC stay whole).
    pub erase: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            flip: 0.5,
            pad_crop: 0.125,
            erase: 0.5,
        }
    }
}

impl Augment {
    /// No augmentation.
    pub fn none() -> Self {
        Augment {
            flip: 0.0,
            pad_crop: 0.0,
            erase: 0.0,
        }
    }
    /// True when every augmentation is off.
    pub fn is_none(&self) -> bool {
        self.flip <= 0.0 && self.pad_crop <= 0.0 && self.erase <= 0.0
    }

    /// The generator of sample `slot` of step `step`.
    pub fn rng(seed: u64, step: u64, slot: usize) -> StdRng {
        let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
        for v in [step, slot as u64] {
            x = (x ^ v).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x ^= x >> 31;
        }
        StdRng::seed_from_u64(x)
    }

    /// Flip and pad-crop of `H×W×3` bytes; returns the new bytes.
    pub fn geometric(&self, rgb: &[u8], h: usize, w: usize, rng: &mut StdRng) -> Vec<u8> {
        let flip = rng.gen::<f64>() < self.flip;
        let pad = (self.pad_crop * w as f64).round() as isize;
        let (dy, dx) = if pad > 0 {
            (rng.gen_range(0..=2 * pad), rng.gen_range(0..=2 * pad))
        } else {
            (pad, pad)
        };
        let fill = MEAN.map(|m| (m * 255.0).round() as u8);
        let mut out = vec![0u8; h * w * 3];
        for y in 0..h {
            for x in 0..w {
                let sy = y as isize + dy - pad;
                let sx = x as isize + dx - pad;
                let px = if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                    let sx = if flip {
                        w - 1 - sx as usize
                    } else {
                        sx as usize
                    };
                    let at = (sy as usize * w + sx) * 3;
                    [rgb[at], rgb[at + 1], rgb[at + 2]]
                } else {
                    fill
                };
                out[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&px);
            }
        }
        out
    }

    /// Random erasing of a normalised `(3, H, W)` image, in place.
    pub fn erase(&self, img: &mut [f32], h: usize, w: usize, rng: &mut StdRng) {
        if rng.gen::<f64>() >= self.erase {
            return;
        }
        let area = (h * w) as f64;
        for _ in 0..10 {
            let target = rng.gen_range(0.02..0.4) * area;
            let aspect = rng.gen_range(0.3f64.ln()..3.3f64.ln()).exp();
            let eh = (target * aspect).sqrt().round() as usize;
            let ew = (target / aspect).sqrt().round() as usize;
            if eh == 0 || ew == 0 || eh >= h || ew >= w {
                continue;
            }
            let y0 = rng.gen_range(0..=h - eh);
            let x0 = rng.gen_range(0..=w - ew);
            let normal = rand_distr::StandardNormal;
            for c in 0..3 {
                for y in y0..y0 + eh {
                    for x in x0..x0 + ew {
                        img[c * h * w + y * w + x] = rng.sample::<f32, _>(normal);
                    }
                }
            }
            return;
        }
    }
}

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
    /// The person's stable key ([`person_key`] of the producer's person id), for the
    /// identity-level image losses and the identity classifier; `None` without a person id.
    pub person: Option<u64>,
    /// The sample's known attributes, for the attribute head ([`Preset::attributes`]); empty
    /// when none are known.
    pub attributes: &'a [AttributeLabel],
}

/// One known attribute of a sample: its field is the range `start..start + len` of the
/// attribute head's flat value vocabulary, `value` the index of the sample's value inside it.
/// A field's values are mutually exclusive: the head's loss is a softmax over the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributeLabel {
    pub start: usize,
    pub len: usize,
    pub value: usize,
}

/// A stable 64-bit key of a person id (FNV-1a), the same in every process and run: the
/// identity classifier's row is `key mod classes`.
pub fn person_key(person_id: &str) -> u64 {
    person_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
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
    /// Person key of each sample ([`Sample::person`]).
    pub persons: Vec<Option<u64>>,
    /// Fraction of phrases masked in this batch.
    pub mask_ratio: f64,
    /// Further captions of the batch's own samples ([`Batch::add_captions`]); they feed the
    /// caption-side losses (IVLC and the caption identity loss) beside each sample's caption.
    pub extra: Option<ExtraCaptions>,
    /// Known attributes of each sample (empty where none are known, and for a preset without
    /// the attribute head).
    pub attributes: Vec<Vec<AttributeLabel>>,
}

/// Further captions of a batch's samples: more text per image at the cost of a wider text pass
/// only (the images are not run again).
#[derive(Debug, Clone)]
pub struct ExtraCaptions {
    /// Their tokens, padded to their longest.
    pub tokens: TokenBatch,
    /// The batch row (sample) each one describes.
    pub rows: Vec<usize>,
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

/// The mirror images (left and right swapped) of `(n, C, H, W)` images, any `n` and `C`.
pub fn mirror(images: &[f32], w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(images.len());
    for row in images.chunks(w.max(1)) {
        out.extend(row.iter().rev());
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
    /// Builds a batch without augmentation; `ratio` is the IAP mask ratio ([`mask_ratio`]),
    /// `rng` picks the phrases.
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
        Self::build_augmented(
            samples,
            preset,
            tokenizer,
            ratio,
            rng,
            &Augment::none(),
            (0, 0),
        )
    }

    /// As [`Batch::build`], each image augmented by `aug` with draws keyed by
    /// `(seed, step)` = `key` and the sample's slot.
    ///
    /// # Errors
    /// As [`Batch::build`].
    pub fn build_augmented<R: Rng>(
        samples: &[Sample<'_>],
        preset: &Preset,
        tokenizer: &Tokenizer,
        ratio: f64,
        rng: &mut R,
        aug: &Augment,
        key: (u64, u64),
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
            persons: Vec::with_capacity(n),
            mask_ratio: ratio,
            extra: None,
            attributes: Vec::with_capacity(n),
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
            let mut slot_rng = Augment::rng(key.0, key.1, row);
            let augmented;
            let rgb = if aug.is_none() {
                s.rgb
            } else {
                augmented = aug.geometric(s.rgb, h, w, &mut slot_rng);
                &augmented[..]
            };
            let mut img = normalize_rgb(rgb, h, w);
            batch.tic_target.extend(tic_target(&img, preset));
            if aug.erase > 0.0 {
                aug.erase(&mut img, h, w, &mut slot_rng);
            }
            batch.images.extend(img);
            batch.gray.extend(normalize_gray(rgb, h, w));
            batch.identities.push(s.identity);
            batch.persons.push(s.person);
            if preset.attributes() > 0 {
                if let Some(bad) = s.attributes.iter().find(|a| !preset.is_attribute_field(a)) {
                    return Err(crate::Error::Shape(format!(
                        "sample {row}: attribute value {} of the field at {}..{} is not one of the preset's attribute fields {:?}",
                        bad.value,
                        bad.start,
                        bad.start + bad.len,
                        preset.attribute_fields
                    )));
                }
                batch.attributes.push(s.attributes.to_vec());
            } else {
                batch.attributes.push(Vec::new());
            }

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

impl Batch {
    /// Adds further captions of the batch's samples: `(row, caption)` pairs, `row` the sample
    /// each describes. Replaces any added before.
    ///
    /// # Errors
    /// A row outside the batch, or a tokenizer failure.
    pub fn add_captions(
        &mut self,
        captions: &[(usize, &str)],
        preset: &Preset,
        tokenizer: &Tokenizer,
    ) -> Result<()> {
        if captions.is_empty() {
            self.extra = None;
            return Ok(());
        }
        if let Some(&(row, _)) = captions.iter().find(|(r, _)| *r >= self.n) {
            return Err(crate::Error::Shape(format!(
                "an extra caption names row {row} of a batch of {}",
                self.n
            )));
        }
        let encoded: Vec<_> = captions
            .iter()
            .map(|(_, c)| tokenizer.encode(c, preset.text_len))
            .collect::<Result<_>>()?;
        let len = encoded.iter().map(|e| e.real_len()).max().unwrap_or(2);
        let mut tokens = TokenBatch {
            ids: Vec::with_capacity(captions.len() * len),
            mask: Vec::with_capacity(captions.len() * len),
            batch: captions.len(),
            len,
        };
        for enc in &encoded {
            tokens.ids.extend(&enc.ids[..len]);
            tokens.mask.extend(&enc.mask[..len]);
        }
        self.extra = Some(ExtraCaptions {
            tokens,
            rows: captions.iter().map(|(r, _)| *r).collect(),
        });
        Ok(())
    }

    /// Every caption of the batch: the samples' own (rows `0..n`) then the extra ones, padded
    /// to the longest (padding does not change a caption's embedding).
    pub fn all_captions(&self) -> std::borrow::Cow<'_, TokenBatch> {
        let Some(extra) = &self.extra else {
            return std::borrow::Cow::Borrowed(&self.tokens);
        };
        let len = self.tokens.len.max(extra.tokens.len);
        let rows = self.tokens.batch + extra.tokens.batch;
        let mut out = TokenBatch {
            ids: Vec::with_capacity(rows * len),
            mask: Vec::with_capacity(rows * len),
            batch: rows,
            len,
        };
        for t in [&self.tokens, &extra.tokens] {
            for r in 0..t.batch {
                out.ids.extend(&t.ids[r * t.len..(r + 1) * t.len]);
                // Any id will do at a padded position: the mask hides it.
                out.ids.extend(std::iter::repeat_n(0, len - t.len));
                out.mask.extend(&t.mask[r * t.len..(r + 1) * t.len]);
                out.mask.extend(std::iter::repeat_n(0.0, len - t.len));
            }
        }
        std::borrow::Cow::Owned(out)
    }

    /// The sample row of each caption of [`Batch::all_captions`].
    pub fn caption_rows(&self) -> Vec<usize> {
        let mut rows: Vec<usize> = (0..self.n).collect();
        if let Some(extra) = &self.extra {
            rows.extend(&extra.rows);
        }
        rows
    }
}

/// Which of a sample's `count` captions a training step reads: one drawn at random, then up to
/// `per_image - 1` further distinct ones (fewer when the sample has fewer).
pub fn pick_captions<R: Rng>(count: usize, per_image: usize, rng: &mut R) -> Vec<usize> {
    if count == 0 {
        return Vec::new();
    }
    let first = rng.gen_range(0..count);
    if per_image <= 1 {
        return vec![first];
    }
    let mut rest: Vec<usize> = (0..count).filter(|&c| c != first).collect();
    rest.shuffle(rng);
    rest.truncate(per_image.max(1) - 1);
    std::iter::once(first).chain(rest).collect()
}
