//! Building blocks shared by both towers and the heads: `Linear`, `LayerNorm`, multi-head
//! attention with a padding mask, the pre-LN transformer block.
//!
//! Token sequences travel as 2-D `(batch·tokens, dim)` matrices so every `Linear` is one large
//! matrix product (dfdx runs a 3-D input as one small product per batch row, about 2× slower);
//! attention reshapes to `(batch, heads, tokens, head_dim)` only around its two batched products.

use crate::impl_params;
use crate::params::{Init, Mat, Vector};
use dfdx::prelude::*;

/// `y = x·Wᵀ + b`, `W: (out, in)` (PyTorch's layout), `x: (n, in)`, `y: (n, out)`.
#[derive(Clone, Debug)]
pub struct Linear<E: Dtype, D: Device<E>> {
    pub weight: Mat<E, D>,
    pub bias: Vector<E, D>,
}
impl_params!(Linear { weight, bias });

impl<E: Dtype, D: Device<E>> Linear<E, D> {
    /// Weights from N(0, 0.02²) (BERT/ViT practice), zero bias.
    pub fn new(init: &mut Init<D>, input: usize, output: usize) -> Self {
        Linear {
            weight: init.normal(output, input, 0.02),
            bias: init.fill(output, 0.0),
        }
    }
    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.weight.shape().0
    }
    /// `(n, in) → (n, out)`.
    pub fn forward<T: Tape<E, D>>(&self, x: Mat<E, D, T>) -> Mat<E, D, T> {
        let n = x.shape().0;
        let out = self.out_dim();
        let w = self
            .weight
            .retaped::<T>()
            .permute::<(usize, usize), Axes2<1, 0>>();
        x.matmul(w)
            + self
                .bias
                .retaped::<T>()
                .broadcast_like::<_, Axis<0>>(&(n, out))
    }
}

/// Layer normalisation over the last axis with a learned scale and shift.
#[derive(Clone, Debug)]
pub struct LayerNorm<E: Dtype, D: Device<E>> {
    pub weight: Vector<E, D>,
    pub bias: Vector<E, D>,
}
impl_params!(LayerNorm { weight, bias });

impl<E: Dtype, D: Device<E>> LayerNorm<E, D> {
    pub fn new(init: &mut Init<D>, dim: usize) -> Self {
        LayerNorm {
            weight: init.fill(dim, 1.0),
            bias: init.fill(dim, 0.0),
        }
    }
    /// `(n, d) → (n, d)`, ε = 1e-5 as in PyTorch.
    pub fn forward<T: Tape<E, D>>(&self, x: Mat<E, D, T>) -> Mat<E, D, T> {
        let shape = *x.shape();
        x.normalize::<Axis<1>>(1e-5)
            * self
                .weight
                .retaped::<T>()
                .broadcast_like::<_, Axis<0>>(&shape)
            + self
                .bias
                .retaped::<T>()
                .broadcast_like::<_, Axis<0>>(&shape)
    }
}

/// GELU in the sigmoid form CLIP uses ("QuickGELU"): x·σ(1.702·x); in PyTorch
/// `x * torch.sigmoid(1.702 * x)`.
///
/// Why not the others: dfdx 0.13's `accurate_gelu` (erf form) has a wrong derivative
/// (x/√π·e^(−x²/2) instead of x/√(2π)·e^(−x²/2)), which the gradient check caught, and its
/// `fast_gelu` (tanh form) spends its time in libm's `tanhf`: 2.3× slower than this one on a
/// (2560, 768) activation, forward + backward, and about a fifth of a `tiny` training step.
pub fn gelu<E: Dtype, D: Device<E>, T: Tape<E, D>>(x: Mat<E, D, T>) -> Mat<E, D, T> {
    let gate = (x.retaped::<T>() * crate::params::scalar::<E>(1.702)).sigmoid();
    gate * x
}

/// Linear → GELU ([`gelu`]) → Linear.
#[derive(Clone, Debug)]
pub struct Mlp<E: Dtype, D: Device<E>> {
    pub fc1: Linear<E, D>,
    pub fc2: Linear<E, D>,
}
impl_params!(Mlp { fc1, fc2 });

impl<E: Dtype, D: Device<E>> Mlp<E, D> {
    pub fn new(init: &mut Init<D>, dim: usize, hidden: usize) -> Self {
        Mlp {
            fc1: Linear::new(init, dim, hidden),
            fc2: Linear::new(init, hidden, dim),
        }
    }
    pub fn forward<T: Tape<E, D>>(&self, x: Mat<E, D, T>) -> Mat<E, D, T> {
        self.fc2.forward(gelu(self.fc1.forward(x)))
    }
}

/// Additive attention bias for padded keys: `(batch, tokens)`, 0 where a token is real and a
/// large negative number where it is padding, so padded keys get exactly zero weight.
pub fn mask_bias<E: Dtype, D: Device<E>>(
    dev: &D,
    mask: &[f32],
    batch: usize,
    len: usize,
) -> Mat<E, D> {
    let data: Vec<E> = mask
        .iter()
        .map(|&m| {
            if m > 0.5 {
                E::default()
            } else {
                crate::params::scalar(-1e9)
            }
        })
        .collect();
    dev.tensor_from_vec(data, (batch, len))
}

/// Multi-head self-attention, with an optional key padding mask.
#[derive(Clone, Debug)]
pub struct Attention<E: Dtype, D: Device<E>> {
    pub q: Linear<E, D>,
    pub k: Linear<E, D>,
    pub v: Linear<E, D>,
    pub o: Linear<E, D>,
    pub heads: usize,
}
impl_params!(Attention { q, k, v, o });

impl<E: Dtype, D: Device<E>> Attention<E, D> {
    pub fn new(init: &mut Init<D>, dim: usize, heads: usize) -> Self {
        Attention {
            q: Linear::new(init, dim, dim),
            k: Linear::new(init, dim, dim),
            v: Linear::new(init, dim, dim),
            o: Linear::new(init, dim, dim),
            heads,
        }
    }

    /// `x: (b·s, d)` → `(b·s, d)`. `bias`: `(b, s)` from [`mask_bias`], or none when no token
    /// is padding. softmax(q·kᵀ/√d_h + bias)·v per head.
    pub fn forward<T: Tape<E, D>>(
        &self,
        x: Mat<E, D, T>,
        b: usize,
        s: usize,
        bias: Option<&Mat<E, D>>,
    ) -> Mat<E, D, T> {
        let d = x.shape().1;
        let h = self.heads;
        let hd = d / h;
        let q = self.q.forward(x.retaped::<T>());
        let k = self.k.forward(x.retaped::<T>());
        let v = self.v.forward(x);
        let q = q
            .reshape_like(&(b, s, h, hd))
            .permute::<(usize, usize, usize, usize), Axes4<0, 2, 1, 3>>();
        let k = k
            .reshape_like(&(b, s, h, hd))
            .permute::<(usize, usize, usize, usize), Axes4<0, 2, 3, 1>>();
        let v = v
            .reshape_like(&(b, s, h, hd))
            .permute::<(usize, usize, usize, usize), Axes4<0, 2, 1, 3>>();
        let scale = crate::params::scalar::<E>(1.0 / (hd as f64).sqrt());
        let mut scores = q.matmul(k) * scale;
        if let Some(bias) = bias {
            scores = scores + bias.clone().broadcast_like::<_, Axes2<1, 2>>(&(b, h, s, s));
        }
        let att = scores.softmax::<Axis<3>>();
        let out = att
            .matmul(v)
            .permute::<(usize, usize, usize, usize), Axes4<0, 2, 1, 3>>()
            .reshape_like(&(b * s, d));
        self.o.forward(out)
    }
}

/// Pre-LN transformer block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Clone, Debug)]
pub struct Block<E: Dtype, D: Device<E>> {
    pub ln1: LayerNorm<E, D>,
    pub attn: Attention<E, D>,
    pub ln2: LayerNorm<E, D>,
    pub mlp: Mlp<E, D>,
}
impl_params!(Block {
    ln1,
    attn,
    ln2,
    mlp
});

impl<E: Dtype, D: Device<E>> Block<E, D> {
    pub fn new(init: &mut Init<D>, dim: usize, heads: usize, mlp: usize) -> Self {
        Block {
            ln1: LayerNorm::new(init, dim),
            attn: Attention::new(init, dim, heads),
            ln2: LayerNorm::new(init, dim),
            mlp: Mlp::new(init, dim, mlp),
        }
    }
    /// `(b·s, d) → (b·s, d)`.
    pub fn forward<T: Tape<E, D>>(
        &self,
        x: Mat<E, D, T>,
        b: usize,
        s: usize,
        bias: Option<&Mat<E, D>>,
    ) -> Mat<E, D, T> {
        let h = self
            .attn
            .forward(self.ln1.forward(x.retaped::<T>()), b, s, bias);
        let x = x + h;
        let h = self.mlp.forward(self.ln2.forward(x.retaped::<T>()));
        x + h
    }
}

/// A stack of blocks.
pub fn run_blocks<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    blocks: &[Block<E, D>],
    mut x: Mat<E, D, T>,
    b: usize,
    s: usize,
    bias: Option<&Mat<E, D>>,
) -> Mat<E, D, T> {
    for block in blocks {
        x = block.forward(x, b, s, bias);
    }
    x
}

/// Mean over the tokens of each sequence: `(b·s, d) → (b, d)`.
pub fn mean_tokens<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Mat<E, D, T>,
    b: usize,
    s: usize,
) -> Mat<E, D, T> {
    let d = x.shape().1;
    x.reshape_like(&(b, s, d)).mean::<(usize, usize), Axis<1>>()
}
