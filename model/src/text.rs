//! The text tower: token embedding (+ hashed bigram embedding) + learned positions → pre-LN blocks with a key padding mask →
//! final LayerNorm → mean over the real (unpadded) tokens → Linear to the joint embedding.
//!
//! Sequences may be shorter than the preset's `text_len` (serving pads a batch only to its
//! longest caption); positions beyond the sequence are simply not used.

use crate::impl_params;
use crate::layers::{mask_bias, run_blocks, Block, LayerNorm, Linear};
use crate::params::{Init, Mat};
use crate::preset::Preset;
use dfdx::prelude::*;

/// Token ids `(b, s)` flattened row-major, with the attention mask (1 real, 0 padding).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBatch {
    pub ids: Vec<usize>,
    pub mask: Vec<f32>,
    pub batch: usize,
    pub len: usize,
}

impl TokenBatch {
    /// Rows `start..start + rows`, cut to the longest of them (padding never changes an
    /// embedding, and the text tower's cost grows with the length).
    pub fn rows(&self, start: usize, rows: usize) -> TokenBatch {
        let row = |r: usize| (start + r) * self.len..(start + r + 1) * self.len;
        let longest = (0..rows)
            .map(|r| {
                self.mask[row(r)]
                    .iter()
                    .rposition(|&m| m > 0.5)
                    .map_or(1, |p| p + 1)
            })
            .max()
            .unwrap_or(1);
        let mut chunk = TokenBatch {
            ids: Vec::with_capacity(rows * longest),
            mask: Vec::with_capacity(rows * longest),
            batch: rows,
            len: longest,
        };
        for r in 0..rows {
            let rg = row(r);
            chunk.ids.extend(&self.ids[rg.start..rg.start + longest]);
            chunk.mask.extend(&self.mask[rg.start..rg.start + longest]);
        }
        chunk
    }
}

/// The text encoder.
#[derive(Clone, Debug)]
pub struct TextEncoder<E: Dtype, D: Device<E>> {
    pub token_embed: Mat<E, D>,
    pub pos: Mat<E, D>,
    pub blocks: Vec<Block<E, D>>,
    pub ln: LayerNorm<E, D>,
    pub proj: Linear<E, D>,
    /// The hashed bigram embedding ([`Preset::text_bigrams`] rows), when the preset has one.
    pub bigram_embed: Option<Mat<E, D>>,
}
impl_params!(TextEncoder {
    token_embed,
    pos,
    blocks,
    ln,
    proj,
    bigram_embed
});

/// The bigram row of each position of `tokens` in a table of `rows` rows: the pair (token,
/// next real token) hashed, with an end marker after a caption's last real token, so that a
/// caption's rows are the same alone and padded inside a batch.
pub fn bigram_ids(tokens: &TokenBatch, rows: usize) -> Vec<usize> {
    const END: u64 = u32::MAX as u64;
    let s = tokens.len;
    let mut out = Vec::with_capacity(tokens.ids.len());
    for (i, &id) in tokens.ids.iter().enumerate() {
        let t = i % s.max(1);
        let next = if t + 1 < s && tokens.mask[i + 1] > 0.5 {
            tokens.ids[i + 1] as u64
        } else {
            END
        };
        // splitmix64 of the pair.
        let mut z = ((id as u64) << 32 | next).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.push((z % rows.max(1) as u64) as usize);
    }
    out
}

impl<E: Dtype, D: Device<E>> TextEncoder<E, D> {
    pub fn new(init: &mut Init<D>, p: &Preset) -> Self {
        TextEncoder {
            token_embed: init.normal(p.vocab, p.dim, 0.02),
            pos: init.normal(p.text_len, p.dim, 0.02),
            blocks: (0..p.text_layers)
                .map(|_| Block::new(init, p.dim, p.heads, p.mlp))
                .collect(),
            ln: LayerNorm::new(init, p.dim),
            proj: Linear::new(init, p.dim, p.embed),
            // Drawn by `Plip::new` after every other weight (see there).
            bigram_embed: None,
        }
    }

    /// Token embeddings plus positions, `(b·s, dim)`; the gradient tape starts at `tape`.
    pub fn embed_tokens<T: Tape<E, D>>(
        &self,
        dev: &D,
        tokens: &TokenBatch,
        tape: T,
    ) -> Mat<E, D, T> {
        let (b, s) = (tokens.batch, tokens.len);
        let dim = self.token_embed.shape().1;
        let ids = dev.tensor_from_vec(tokens.ids.clone(), (b * s,));
        let x = self.token_embed.clone().put_tape(tape).gather(ids);
        let x = match &self.bigram_embed {
            Some(table) => {
                let rows = table.shape().0;
                let ids = dev.tensor_from_vec(bigram_ids(tokens, rows), (b * s,));
                x + table.retaped::<T>().gather(ids)
            }
            None => x,
        };
        // The first `s` rows by `gather`, not `slice`: dfdx 0.13's slice backward on the CPU
        // assigns the gradient instead of adding it, which drops every earlier contribution
        // when a step runs the text tower more than once (the captions, then IAP's masked
        // captions) — on CUDA it adds. Gather's backward adds on both.
        let rows = dev.tensor_from_vec((0..s).collect::<Vec<usize>>(), (s,));
        let pos = self
            .pos
            .retaped::<T>()
            .gather(rows)
            .broadcast_like::<_, Axis<0>>(&(b, s, dim));
        (x.reshape_like(&(b, s, dim)) + pos).reshape_like(&(b * s, dim))
    }

    /// Runs the blocks over `x` `(b·s, dim)` with the batch's padding mask; returns the final
    /// normalised hidden states `(b·s, dim)`.
    pub fn encode<T: Tape<E, D>>(
        &self,
        dev: &D,
        x: Mat<E, D, T>,
        tokens: &TokenBatch,
    ) -> Mat<E, D, T> {
        let (b, s) = (tokens.batch, tokens.len);
        let bias = padding_bias(dev, tokens);
        let x = run_blocks(&self.blocks, x, b, s, bias.as_ref());
        self.ln.forward(x)
    }

    /// Hidden states `(b·s, dim)` for a token batch.
    pub fn hidden<T: Tape<E, D>>(&self, dev: &D, tokens: &TokenBatch, tape: T) -> Mat<E, D, T> {
        let x = self.embed_tokens(dev, tokens, tape);
        self.encode(dev, x, tokens)
    }

    /// Joint-space embedding `(b, embed)`, not normalised: masked mean of the hidden states, then
    /// the projection.
    pub fn embed<T: Tape<E, D>>(&self, dev: &D, tokens: &TokenBatch, tape: T) -> Mat<E, D, T> {
        let h = self.hidden(dev, tokens, tape);
        self.proj.forward(masked_mean(dev, h, tokens))
    }
}

/// The attention bias for a token batch, or none when no token is padding.
pub fn padding_bias<E: Dtype, D: Device<E>>(dev: &D, tokens: &TokenBatch) -> Option<Mat<E, D>> {
    if tokens.mask.iter().all(|&m| m > 0.5) {
        None
    } else {
        Some(mask_bias(dev, &tokens.mask, tokens.batch, tokens.len))
    }
}

/// Mean over the real tokens of each sequence: `(b·s, d) → (b, d)`.
pub fn masked_mean<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    dev: &D,
    h: Mat<E, D, T>,
    tokens: &TokenBatch,
) -> Mat<E, D, T> {
    let (b, s) = (tokens.batch, tokens.len);
    let d = h.shape().1;
    let mask: Vec<E> = tokens
        .mask
        .iter()
        .map(|&m| crate::params::scalar(m as f64))
        .collect();
    let counts: Vec<E> = tokens
        .mask
        .chunks(s.max(1))
        .map(|row| crate::params::scalar(1.0 / row.iter().sum::<f32>().max(1.0) as f64))
        .collect();
    let mask = dev
        .tensor_from_vec(mask, (b, s))
        .broadcast_like::<_, Axis<2>>(&(b, s, d));
    let inv = dev
        .tensor_from_vec(counts, (b,))
        .broadcast_like::<_, Axis<1>>(&(b, d));
    (h.reshape_like(&(b, s, d)) * mask).sum::<(usize, usize), Axis<1>>() * inv
}
