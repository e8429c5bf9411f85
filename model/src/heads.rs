//! The pretext heads — attribute prediction (IAP) and colorization (TIC) — and the identity
//! classifier.

use crate::impl_params;
use crate::layers::{run_blocks, Block, LayerNorm, Linear};
use crate::norm::{BatchNorm, BnMode};
use crate::params::{detach, Init, Mat, ParamMut, ParamRef, Params};
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
    /// Each row's identity prototype in the joint space (a buffer, see [`Prototypes`]).
    pub prototypes: Prototypes<E, D>,
}
impl_params!(IdHead {
    neck,
    classifier,
    prototypes
});

/// Identity prototypes: row r is a running mean of the unit joint image features of the people
/// whose key falls on row r (the classifier's rows), an all-zero row meaning no image of the row
/// seen yet. A buffer: saved with the weights (`id.prototypes`), never trained; the trainer
/// folds a batch's features in after an applied update ([`PROTOTYPE_MOMENTUM`]). The
/// caption–prototype loss ([`crate::loss::prototype_contrast`]) ranks every caption against
/// every seen row, so the text tower learns against all the people seen so far, not only the
/// batch's 16.
#[derive(Clone, Debug)]
pub struct Prototypes<E: Dtype, D: Device<E>>(pub Mat<E, D>);

/// Weight of a batch's mean feature when folded into a row already seen (a first sighting sets
/// the row). A person comes back every ~30 steps in `tiny`'s 16×4 batches over 500 people, so
/// the prototype follows the image tower closely.
pub const PROTOTYPE_MOMENTUM: f64 = 0.5;

impl<E: Dtype, D: Device<E>> Params<E, D> for Prototypes<E, D> {
    fn visit<'a>(&'a self, _name: &str, _out: &mut Vec<(String, ParamRef<'a, E, D>)>) {}
    fn visit_mut<'a>(&'a mut self, _name: &str, _out: &mut Vec<(String, ParamMut<'a, E, D>)>) {}
    fn visit_buffers<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>) {
        self.0.visit(name, out);
    }
    fn visit_buffers_mut<'a>(
        &'a mut self,
        name: &str,
        out: &mut Vec<(String, ParamMut<'a, E, D>)>,
    ) {
        self.0.visit_mut(name, out);
    }
}

impl<E: Dtype, D: Device<E>> Prototypes<E, D> {
    /// The prototypes as they would be after folding in `features` (see
    /// [`Prototypes::update`]), without changing them: the seen rows' indices and values,
    /// row-major. The loss ranks against these, so a batch's own people always have a row.
    pub fn seen_with(&self, features: &[(usize, Vec<f64>)]) -> (Vec<usize>, Vec<f64>) {
        let (r, c) = *self.0.shape();
        let mut all = self.host();
        Self::mix(&mut all, c, features);
        let mut rows = Vec::new();
        let mut values = Vec::new();
        for i in 0..r {
            let row = &all[i * c..(i + 1) * c];
            if row.iter().any(|x| *x != 0.0) {
                rows.push(i);
                values.extend_from_slice(row);
            }
        }
        (rows, values)
    }

    /// Folds in unit features `(row, feature)`: the mean of a row's features in this batch,
    /// mixed in with [`PROTOTYPE_MOMENTUM`] (or set, for a row not seen before). Rows out of
    /// range and features of the wrong width are ignored.
    pub fn update(&mut self, features: &[(usize, Vec<f64>)]) {
        if features.is_empty() {
            return;
        }
        let c = self.0.shape().1;
        let mut all = self.host();
        Self::mix(&mut all, c, features);
        let values: Vec<E> = all.iter().map(|&x| crate::params::scalar(x)).collect();
        self.0.copy_from(&values);
    }

    /// True while no row has been seen.
    pub fn is_empty(&self) -> bool {
        self.0.as_vec().iter().all(|x| *x == E::default())
    }

    /// The matrix on the host, in f64.
    fn host(&self) -> Vec<f64> {
        self.0
            .as_vec()
            .iter()
            .map(|x| x.to_f64().unwrap_or(0.0))
            .collect()
    }

    fn mix(all: &mut [f64], c: usize, features: &[(usize, Vec<f64>)]) {
        let r = all.len() / c.max(1);
        let mut sums: std::collections::BTreeMap<usize, (Vec<f64>, usize)> = Default::default();
        for (row, f) in features {
            if *row >= r || f.len() != c {
                continue;
            }
            let e = sums.entry(*row).or_insert_with(|| (vec![0.0; c], 0));
            e.0.iter_mut().zip(f).for_each(|(a, b)| *a += b);
            e.1 += 1;
        }
        for (row, (sum, k)) in sums {
            let old = &mut all[row * c..(row + 1) * c];
            let seen = old.iter().any(|x| *x != 0.0);
            for (o, s) in old.iter_mut().zip(&sum) {
                let mean = s / k as f64;
                *o = if seen {
                    (1.0 - PROTOTYPE_MOMENTUM) * *o + PROTOTYPE_MOMENTUM * mean
                } else {
                    mean
                };
            }
        }
    }

    /// Zeroes a row (forgetting a person).
    pub fn clear_row(&mut self, row: usize) {
        let (r, c) = *self.0.shape();
        if row < r {
            let mut all = self.0.as_vec();
            all[row * c..(row + 1) * c].fill(E::default());
            self.0.copy_from(&all);
        }
    }
}

impl<E: Dtype, D: Device<E>> IdHead<E, D> {
    pub fn new(init: &mut Init<D>, features: usize, classes: usize) -> Self {
        IdHead {
            neck: BatchNorm::new(init, features),
            classifier: init.normal(classes, features, 0.001),
            prototypes: Prototypes(init.zeros(classes, features)),
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
            prototypes: self.prototypes.clone(),
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
