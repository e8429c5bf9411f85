//! The pretext heads — attribute prediction (IAP) and colorization (TIC) — and the identity
//! classifier.

use crate::impl_params;
use crate::layers::{run_blocks, Block, LayerNorm, Linear};
use crate::norm::{BatchNorm, BnMode};
use crate::params::{detach, Init, Mat};
use crate::preset::Preset;
use dfdx::prelude::*;

/// IAP: fusion blocks over (masked-text hidden states + image global feature), then a linear
/// classifier over the vocabulary at the masked positions.
#[derive(Clone, Debug)]
pub struct IapHead<E: Dtype, D: Device<E>> {
    pub blocks: Vec<Block<E, D>>,
    pub ln: LayerNorm<E, D>,
    pub classifier: Linear<E, D>,
}
impl_params!(IapHead {
    blocks,
    ln,
    classifier
});

impl<E: Dtype, D: Device<E>> IapHead<E, D> {
    pub fn new(init: &mut Init<D>, p: &Preset) -> Self {
        IapHead {
            blocks: (0..p.fusion_layers)
                .map(|_| Block::new(init, p.dim, p.heads, p.mlp))
                .collect(),
            ln: LayerNorm::new(init, p.dim),
            classifier: Linear::new(init, p.dim, p.vocab),
        }
    }

    /// `text: (b·s, d)` masked-caption hidden states, `image: (b, d)` global image features,
    /// `bias` the padding bias `(b, s)`, `positions` the flat indices of the masked tokens.
    /// Returns logits `(m, vocab)` for the `m` masked positions.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<T: Tape<E, D>>(
        &self,
        dev: &D,
        text: Mat<E, D, T>,
        image: Mat<E, D, T>,
        b: usize,
        s: usize,
        bias: Option<&Mat<E, D>>,
        positions: &[usize],
    ) -> Mat<E, D, T> {
        let d = text.shape().1;
        let x = text.reshape_like(&(b, s, d)) + image.broadcast_like::<_, Axis<1>>(&(b, s, d));
        let x = run_blocks(&self.blocks, x.reshape_like(&(b * s, d)), b, s, bias);
        let x = self.ln.forward(x);
        let idx = dev.tensor_from_vec(positions.to_vec(), (positions.len(),));
        self.classifier.forward(x.gather(idx))
    }
}

/// TIC: a multimodal squeeze-excitation gate on the grayscale image's patch states, then a
/// per-patch head that predicts the patch's RGB pixels.
///
/// gate = sigmoid(W2·relu(W1·[mean(tokens); text] )) `(b, dim)`; pixels = fc2(gelu(fc1(ln(tokens ⊙
/// gate)))) `(b·N, 3·(p/r)²)`.
#[derive(Clone, Debug)]
pub struct TicHead<E: Dtype, D: Device<E>> {
    pub se1: Linear<E, D>,
    pub se2: Linear<E, D>,
    pub ln: LayerNorm<E, D>,
    pub fc1: Linear<E, D>,
    pub fc2: Linear<E, D>,
}
impl_params!(TicHead {
    se1,
    se2,
    ln,
    fc1,
    fc2
});

impl<E: Dtype, D: Device<E>> TicHead<E, D> {
    pub fn new(init: &mut Init<D>, p: &Preset) -> Self {
        TicHead {
            se1: Linear::new(init, p.dim + p.embed, p.dim),
            se2: Linear::new(init, p.dim, p.dim),
            ln: LayerNorm::new(init, p.dim),
            fc1: Linear::new(init, p.dim, p.dim),
            fc2: Linear::new(init, p.dim, p.tic_len()),
        }
    }

    /// `tokens: (b·n, d)` grayscale patch states, `text: (b, embed)` caption embedding.
    /// Returns predicted pixels `(b·n, 3·(p/r)²)`.
    pub fn forward<T: Tape<E, D>>(
        &self,
        tokens: Mat<E, D, T>,
        text: Mat<E, D, T>,
        b: usize,
        n: usize,
    ) -> Mat<E, D, T> {
        let d = tokens.shape().1;
        let (tok, tape) = tokens.split_tape();
        let pooled = crate::layers::mean_tokens(tok.clone().put_tape(tape), b, n);
        let squeezed = (pooled, text).concat_along(Axis::<1>);
        let gate = self
            .se2
            .forward(self.se1.forward(squeezed).relu())
            .sigmoid();
        let (gate, tape) = gate.split_tape();
        let gated = tok.put_tape(tape).reshape_like(&(b, n, d))
            * gate.retaped::<T>().broadcast_like::<_, Axis<1>>(&(b, n, d));
        let x = self.ln.forward(gated.reshape_like(&(b * n, d)));
        self.fc2.forward(crate::layers::gelu(self.fc1.forward(x)))
    }
}

/// The identity classifier with a BNNeck (Luo et al. 2019): logits = BN(feature)·Wᵀ,
/// `W: (classes, F)` from N(0, 0.001²), no bias. A person's row is its stable key modulo
/// `classes` ([`crate::batch::person_key`]), so the continuous trainer needs no allocation as new
/// people arrive: every row is trained as a negative from the first step (its Adam moments and
/// bias correction are those of the whole matrix), two people share a row only when their keys
/// collide (with 8192 rows and 1,000 people about 6% of them share one), and past the capacity
/// sharing grows gradually instead of failing. Forgetting a person zeroes their row.
#[derive(Clone, Debug)]
pub struct IdHead<E: Dtype, D: Device<E>> {
    pub neck: BatchNorm<E, D>,
    pub classifier: Mat<E, D>,
}
impl_params!(IdHead { neck, classifier });

impl<E: Dtype, D: Device<E>> IdHead<E, D> {
    pub fn new(init: &mut Init<D>, features: usize, classes: usize) -> Self {
        IdHead {
            neck: BatchNorm::new(init, features),
            classifier: init.normal(classes, features, 0.001),
        }
    }

    /// A copy whose parameters are new tensors: a loss through it leaves the head's own
    /// gradients alone (the captions' identity loss aligns the text tower to the image-trained
    /// head without moving it).
    pub fn detached(&self) -> Self {
        IdHead {
            neck: BatchNorm {
                weight: detach(&self.neck.weight),
                bias: detach(&self.neck.bias),
                ..self.neck.clone()
            },
            classifier: detach(&self.classifier),
        }
    }

    /// Rows of the classifier.
    pub fn classes(&self) -> usize {
        self.classifier.shape().0
    }

    /// `(n, F)` features → `(n, classes)` logits.
    pub fn forward<T: Tape<E, D>>(&self, feature: Mat<E, D, T>, mode: BnMode<'_>) -> Mat<E, D, T> {
        let w = self
            .classifier
            .retaped::<T>()
            .permute::<(usize, usize), Axes2<1, 0>>();
        self.neck.forward(feature, mode).matmul(w)
    }
}
