//! The image tower: a conv-free ViT.
//!
//! `(b, 3, H, W)` → patchify by reshape/permute into `(b·N, 3·p·p)` (channel-major inside a
//! patch, patches in row-major grid order) → Linear to `dim` → + learned positions `(N, dim)` →
//! pre-LN blocks → final LayerNorm → mean over patches `(b, dim)` → Linear to the joint
//! embedding `(b, embed)`.

use crate::impl_params;
use crate::layers::{mean_tokens, run_blocks, Block, LayerNorm, Linear};
use crate::params::{Init, Mat};
use crate::preset::Preset;
use dfdx::prelude::*;

/// An image batch `(b, 3, H, W)`, normalised.
pub type Images<E, D, T = NoneTape> = Tensor<(usize, usize, usize, usize), E, D, T>;

/// The ViT image encoder.
#[derive(Clone, Debug)]
pub struct ImageEncoder<E: Dtype, D: Device<E>> {
    pub patch_embed: Linear<E, D>,
    pub pos: Mat<E, D>,
    pub blocks: Vec<Block<E, D>>,
    pub ln: LayerNorm<E, D>,
    pub proj: Linear<E, D>,
    pub patch: usize,
}
impl_params!(ImageEncoder {
    patch_embed,
    pos,
    blocks,
    ln,
    proj
});

/// What one pass of the image tower yields.
pub struct ImageOutput<E: Dtype, D: Device<E>, T> {
    /// Normalised patch states `(b·N, dim)`.
    pub tokens: Mat<E, D, T>,
    /// Batch size and patches per image.
    pub b: usize,
    pub n: usize,
}

impl<E: Dtype, D: Device<E>> ImageEncoder<E, D> {
    pub fn new(init: &mut Init<D>, p: &Preset) -> Self {
        ImageEncoder {
            patch_embed: Linear::new(init, p.patch_len(), p.dim),
            pos: init.normal(p.num_patches(), p.dim, 0.02),
            blocks: (0..p.image_layers)
                .map(|_| Block::new(init, p.dim, p.heads, p.mlp))
                .collect(),
            ln: LayerNorm::new(init, p.dim),
            proj: Linear::new(init, p.dim, p.embed),
            patch: p.patch,
        }
    }

    /// Patch states after the final LayerNorm.
    pub fn tokens<T: Tape<E, D>>(&self, images: Images<E, D, T>) -> ImageOutput<E, D, T> {
        let (b, c, h, w) = *images.shape();
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let n = gh * gw;
        let x = images
            .reshape_like(&(b, c, gh, p, gw, p))
            .permute::<(usize, usize, usize, usize, usize, usize), Axes6<0, 2, 4, 1, 3, 5>>()
            .reshape_like(&(b * n, c * p * p));
        let x = self.patch_embed.forward(x);
        let dim = x.shape().1;
        let x = x.reshape_like(&(b, n, dim))
            + self
                .pos
                .retaped::<T>()
                .broadcast_like::<_, Axis<0>>(&(b, n, dim));
        let x = x.reshape_like(&(b * n, dim));
        let x = run_blocks(&self.blocks, x, b, n, None);
        ImageOutput {
            tokens: self.ln.forward(x),
            b,
            n,
        }
    }

    /// Mean-pooled global feature `(b, dim)` (before the projection).
    pub fn pooled<T: Tape<E, D>>(&self, images: Images<E, D, T>) -> Mat<E, D, T> {
        let out = self.tokens(images);
        mean_tokens(out.tokens, out.b, out.n)
    }

    /// Joint-space embedding `(b, embed)`, not normalised.
    pub fn embed<T: Tape<E, D>>(&self, images: Images<E, D, T>) -> Mat<E, D, T> {
        self.proj.forward(self.pooled(images))
    }
}
