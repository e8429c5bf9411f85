//! The image tower: a ResNet ([`crate::resnet`], the CPU default) or a conv-free ViT, chosen by
//! the preset's `image_arch`.
//!
//! What the rest of the model takes from either tower:
//! - `pooled` — the global feature `(b, F)`: the ResNet's average-pooled last map (F = its
//!   width) or the ViT's mean patch state (F = `dim`);
//! - `embed` — the joint-space embedding `(b, embed)` that image and text queries are both
//!   ranked by: `proj(pooled)` for the ViT; for the ResNet the pooled feature itself (its last
//!   stage is `embed` wide, and the text tower projects into it). Why no projection on the
//!   image side: the identity losses trained through one measured 9 points of Rank-1 worse
//!   (PyTorch peer, 12,800 images: 70.8% against 79.5%, README "Quality"), and one embedding
//!   keeps one gallery index for image and text queries;
//! - `text_width(pooled)` — the feature IAP adds to the masked caption's hidden states `(b, dim)`:
//!   a Linear from the conv width to the text width for the ResNet (`image.to_text`), the
//!   feature itself for the ViT;
//! - `tokens` — the positions TIC colours `(b·N, dim)`: the ResNet's last feature map (one
//!   position per patch of the preset's grid, the total stride being the patch side) through
//!   the same `to_text` Linear, or the ViT's patch states.
//!
//! ViT: `(b, 3, H, W)` → patch tokens `(b·N, dim)` in row-major grid order by one of two stems
//! ([`Stem`]): `linear` patchifies by reshape/permute into `(b·N, 3·p·p)` (channel-major inside a
//! patch) and applies one Linear; `hmlp` cuts 4×4-pixel squares, embeds them and merges 2×2
//! neighbours twice, with LayerNorm and GELU between the stages → + learned positions
//! `(N, dim)` → pre-LN blocks → final LayerNorm → mean over patches `(b, dim)` → Linear to the
//! joint embedding `(b, embed)`.

use crate::impl_params;
use crate::layers::{gelu, mean_tokens, run_blocks, Block, LayerNorm, Linear};
use crate::norm::{BatchNorm, BnMode};
use crate::params::{join, Init, Mat, ParamMut, ParamRef, Params};
use crate::preset::{ImageArch, Preset, Stem};
use crate::resnet::ResNetBody;
use dfdx::prelude::*;

/// An image batch `(b, 3, H, W)`, normalised.
pub type Images<E, D, T = NoneTape> = Tensor<(usize, usize, usize, usize), E, D, T>;

/// The image encoder: the ViT's parts or the ResNet's, and the projection both share.
#[derive(Clone, Debug)]
pub struct ImageEncoder<E: Dtype, D: Device<E>> {
    /// The ViT's `linear` stem.
    pub patch_embed: Option<Linear<E, D>>,
    /// The ViT's `hmlp` stem.
    pub hmlp: Option<HmlpStem<E, D>>,
    /// The ViT's learned positions.
    pub pos: Option<Mat<E, D>>,
    /// The ViT's blocks (none for the ResNet).
    pub blocks: Vec<Block<E, D>>,
    /// The ViT's final LayerNorm.
    pub ln: Option<LayerNorm<E, D>>,
    /// The ResNet body; its tensors are named at the tower's level (`image.conv1`,
    /// `image.layer1.0.conv1`, … as torchvision's `resnet`).
    pub resnet: Option<ResNetBody<E, D>>,
    /// ResNet: conv width → text width, for IAP's image feature and TIC's positions.
    pub to_text: Option<Linear<E, D>>,
    /// Global feature → joint embedding (the ViT; the ResNet's pooled feature is the joint
    /// embedding).
    pub proj: Option<Linear<E, D>>,
    pub patch: usize,
}

impl<E: Dtype, D: Device<E>> Params<E, D> for ImageEncoder<E, D> {
    fn visit<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>) {
        self.patch_embed.visit(&join(name, "patch_embed"), out);
        self.hmlp.visit(&join(name, "hmlp"), out);
        self.pos.visit(&join(name, "pos"), out);
        self.blocks.visit(&join(name, "blocks"), out);
        self.ln.visit(&join(name, "ln"), out);
        self.resnet.visit(name, out);
        self.to_text.visit(&join(name, "to_text"), out);
        self.proj.visit(&join(name, "proj"), out);
    }
    fn visit_mut<'a>(&'a mut self, name: &str, out: &mut Vec<(String, ParamMut<'a, E, D>)>) {
        self.patch_embed.visit_mut(&join(name, "patch_embed"), out);
        self.hmlp.visit_mut(&join(name, "hmlp"), out);
        self.pos.visit_mut(&join(name, "pos"), out);
        self.blocks.visit_mut(&join(name, "blocks"), out);
        self.ln.visit_mut(&join(name, "ln"), out);
        self.resnet.visit_mut(name, out);
        self.to_text.visit_mut(&join(name, "to_text"), out);
        self.proj.visit_mut(&join(name, "proj"), out);
    }
    fn visit_buffers<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>) {
        self.resnet.visit_buffers(name, out);
    }
    fn visit_buffers_mut<'a>(
        &'a mut self,
        name: &str,
        out: &mut Vec<(String, ParamMut<'a, E, D>)>,
    ) {
        self.resnet.visit_buffers_mut(name, out);
    }
    fn batchnorms_mut<'a>(&'a mut self, out: &mut Vec<&'a mut BatchNorm<E, D>>) {
        self.resnet.batchnorms_mut(out);
    }
    fn visit_convs(&self, name: &str, out: &mut Vec<(String, [usize; 4])>) {
        self.resnet.visit_convs(name, out);
    }
}

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
        if p.image_arch == ImageArch::Resnet {
            let body = ResNetBody::new(init, p);
            let width = body.out_dim();
            return ImageEncoder {
                patch_embed: None,
                hmlp: None,
                pos: None,
                blocks: Vec::new(),
                ln: None,
                to_text: Some(Linear::new(init, width, p.dim)),
                proj: None,
                resnet: Some(body),
                patch: p.patch,
            };
        }
        ImageEncoder {
            patch_embed: (p.stem == Stem::Linear).then(|| Linear::new(init, p.patch_len(), p.dim)),
            hmlp: (p.stem == Stem::Hmlp).then(|| HmlpStem::new(init, p.dim)),
            pos: Some(init.normal(p.num_patches(), p.dim, 0.02)),
            blocks: (0..p.image_layers)
                .map(|_| Block::new(init, p.dim, p.heads, p.mlp))
                .collect(),
            ln: Some(LayerNorm::new(init, p.dim)),
            resnet: None,
            to_text: None,
            proj: Some(Linear::new(init, p.dim, p.embed)),
            patch: p.patch,
        }
    }

    /// Per-position states `(b·N, dim)`: the ViT's patch states after its final LayerNorm, or
    /// the ResNet's last feature map through `to_text`.
    pub fn tokens<T: Tape<E, D>>(
        &self,
        images: Images<E, D, T>,
        mode: BnMode<'_>,
    ) -> ImageOutput<E, D, T> {
        if let (Some(body), Some(to_text)) = (&self.resnet, &self.to_text) {
            let map = body.forward(images, mode);
            let (b, n) = (map.b, map.h * map.w);
            return ImageOutput {
                tokens: to_text.forward(map.x),
                b,
                n,
            };
        }
        let (b, _, h, w) = *images.shape();
        let p = self.patch;
        let n = (h / p) * (w / p);
        let x = match (&self.patch_embed, &self.hmlp) {
            (Some(linear), _) => linear.forward(patchify(images, p)),
            (None, Some(hmlp)) => hmlp.forward(images),
            (None, None) => unreachable!("a ViT image encoder always has a stem"),
        };
        let dim = x.shape().1;
        let x = match &self.pos {
            Some(pos) => {
                x.reshape_like(&(b, n, dim))
                    + pos
                        .retaped::<T>()
                        .broadcast_like::<_, Axis<0>>(&(b, n, dim))
            }
            None => x.reshape_like(&(b, n, dim)),
        };
        let x = x.reshape_like(&(b * n, dim));
        let x = run_blocks(&self.blocks, x, b, n, None);
        let x = match &self.ln {
            Some(ln) => ln.forward(x),
            None => x,
        };
        ImageOutput { tokens: x, b, n }
    }

    /// Global feature `(b, F)` before the projection: the ResNet's average-pooled last map, or
    /// the ViT's mean patch state.
    pub fn pooled<T: Tape<E, D>>(&self, images: Images<E, D, T>, mode: BnMode<'_>) -> Mat<E, D, T> {
        if let Some(body) = &self.resnet {
            return body.pooled(images, mode);
        }
        let out = self.tokens(images, mode);
        mean_tokens(out.tokens, out.b, out.n)
    }

    /// The global feature at the text width, for IAP: `to_text(pooled)` for the ResNet, the
    /// feature itself for the ViT.
    pub fn text_width<T: Tape<E, D>>(&self, pooled: Mat<E, D, T>) -> Mat<E, D, T> {
        match &self.to_text {
            Some(l) => l.forward(pooled),
            None => pooled,
        }
    }

    /// Joint-space embedding `(b, embed)`, not normalised.
    pub fn embed<T: Tape<E, D>>(&self, images: Images<E, D, T>, mode: BnMode<'_>) -> Mat<E, D, T> {
        self.project(self.pooled(images, mode))
    }

    /// The global feature into the joint space (the identity for the ResNet).
    pub fn project<T: Tape<E, D>>(&self, pooled: Mat<E, D, T>) -> Mat<E, D, T> {
        match &self.proj {
            Some(p) => p.forward(pooled),
            None => pooled,
        }
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
