//! The image tower: a conv-free ViT.
//!
//! `(b, 3, H, W)` → patch tokens `(b·N, dim)` in row-major grid order by one of two stems
//! ([`Stem`]): `linear` patchifies by reshape/permute into `(b·N, 3·p·p)` (channel-major inside a
//! patch) and applies one Linear; `hmlp` cuts 4×4-pixel squares, embeds them and merges 2×2
//! neighbours twice, with LayerNorm and GELU between the stages → + learned positions
//! `(N, dim)` → pre-LN blocks → final LayerNorm → mean over patches `(b, dim)` → Linear to the
//! joint embedding `(b, embed)`.

use crate::impl_params;
use crate::layers::{gelu, mean_tokens, run_blocks, Block, LayerNorm, Linear};
use crate::params::{Init, Mat};
use crate::preset::{Preset, Stem};
use dfdx::prelude::*;

/// An image batch `(b, 3, H, W)`, normalised.
pub type Images<E, D, T = NoneTape> = Tensor<(usize, usize, usize, usize), E, D, T>;

/// The ViT image encoder.
#[derive(Clone, Debug)]
pub struct ImageEncoder<E: Dtype, D: Device<E>> {
    /// The `linear` stem.
    pub patch_embed: Option<Linear<E, D>>,
    /// The `hmlp` stem.
    pub hmlp: Option<HmlpStem<E, D>>,
    pub pos: Mat<E, D>,
    pub blocks: Vec<Block<E, D>>,
    pub ln: LayerNorm<E, D>,
    pub proj: Linear<E, D>,
    pub patch: usize,
}
impl_params!(ImageEncoder {
    patch_embed,
    hmlp,
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
            patch_embed: (p.stem == Stem::Linear).then(|| Linear::new(init, p.patch_len(), p.dim)),
            hmlp: (p.stem == Stem::Hmlp).then(|| HmlpStem::new(init, p.dim)),
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
        let (b, _, h, w) = *images.shape();
        let p = self.patch;
        let n = (h / p) * (w / p);
        let x = match (&self.patch_embed, &self.hmlp) {
            (Some(linear), _) => linear.forward(patchify(images, p)),
            (None, Some(hmlp)) => hmlp.forward(images),
            (None, None) => unreachable!("an image encoder always has a stem"),
        };
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

/// `(b, c, H, W)` → `(b·(H/p)·(W/p), c·p·p)`: squares in row-major grid order, channel-major
/// inside a square.
fn patchify<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    images: Images<E, D, T>,
    p: usize,
) -> Mat<E, D, T> {
    let (b, c, h, w) = *images.shape();
    let (gh, gw) = (h / p, w / p);
    images
        .reshape_like(&(b, c, gh, p, gw, p))
        .permute::<(usize, usize, usize, usize, usize, usize), Axes6<0, 2, 4, 1, 3, 5>>()
        .reshape_like(&(b * gh * gw, c * p * p))
}

/// `(b·gh·gw, d)` tokens in row-major grid order → `(b·(gh/2)·(gw/2), 4·d)`: each 2×2
/// neighbourhood concatenated (top-left, top-right, bottom-left, bottom-right), the coarser grid
/// again in row-major order.
fn merge2x2<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Mat<E, D, T>,
    b: usize,
    gh: usize,
    gw: usize,
) -> Mat<E, D, T> {
    let d = x.shape().1;
    x.reshape_like(&(b * gh / 2, 2, gw / 2, 2, d))
        .permute::<(usize, usize, usize, usize, usize), Axes5<0, 2, 1, 3, 4>>()
        .reshape_like(&(b * (gh / 2) * (gw / 2), 4 * d))
}

/// The hierarchical MLP stem ([`Stem::Hmlp`]) for 16-pixel patches: 4×4-pixel squares →
/// Linear(48, dim/4) → LayerNorm → GELU → 2×2 merge → Linear(dim, dim/4) → LayerNorm → GELU →
/// 2×2 merge → Linear(dim, dim).
#[derive(Clone, Debug)]
pub struct HmlpStem<E: Dtype, D: Device<E>> {
    pub embed: Linear<E, D>,
    pub norm1: LayerNorm<E, D>,
    pub merge1: Linear<E, D>,
    pub norm2: LayerNorm<E, D>,
    pub merge2: Linear<E, D>,
}
impl_params!(HmlpStem {
    embed,
    norm1,
    merge1,
    norm2,
    merge2
});

impl<E: Dtype, D: Device<E>> HmlpStem<E, D> {
    pub fn new(init: &mut Init<D>, dim: usize) -> Self {
        let inner = (dim / 4).max(1);
        HmlpStem {
            embed: Linear::new(init, 3 * 4 * 4, inner),
            norm1: LayerNorm::new(init, inner),
            merge1: Linear::new(init, 4 * inner, inner),
            norm2: LayerNorm::new(init, inner),
            merge2: Linear::new(init, 4 * inner, dim),
        }
    }

    /// `(b, 3, H, W)` → `(b·(H/16)·(W/16), dim)`.
    pub fn forward<T: Tape<E, D>>(&self, images: Images<E, D, T>) -> Mat<E, D, T> {
        let (b, _, h, w) = *images.shape();
        let (gh, gw) = (h / 4, w / 4);
        let x = gelu(self.norm1.forward(self.embed.forward(patchify(images, 4))));
        let x = gelu(
            self.norm2
                .forward(self.merge1.forward(merge2x2(x, b, gh, gw))),
        );
        self.merge2.forward(merge2x2(x, b, gh / 2, gw / 2))
    }
}
