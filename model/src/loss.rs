//! The three pretext losses as tensor functions.

use crate::params::{scalar, Mat};
use dfdx::prelude::*;

/// Target matrix of identity-level contrast: `q_ij = y_ij / Σ_k y_ik`, where `y_ij = 1` when
/// samples `i` and `j` share an identity. `None` is an unlabelled sample: its own identity only.
pub fn identity_targets(ids: &[Option<u64>]) -> Vec<f64> {
    let n = ids.len();
    let mut q = vec![0.0; n * n];
    for i in 0..n {
        let same = |j: usize| i == j || (ids[i].is_some() && ids[i] == ids[j]);
        let count = (0..n).filter(|&j| same(j)).count() as f64;
        for j in 0..n {
            if same(j) {
                q[i * n + j] = 1.0 / count;
            }
        }
    }
    q
}

/// Row-wise L2 normalisation `(n, d) → (n, d)`.
pub fn l2_normalize<E: Dtype, D: Device<E>, T: Tape<E, D>>(x: Mat<E, D, T>) -> Mat<E, D, T> {
    let shape = *x.shape();
    let norm = x
        .retaped::<T>()
        .square()
        .sum::<(usize,), Axis<1>>()
        .sqrt()
        .clamp(1e-12, f64::MAX)
        .broadcast_like::<_, Axis<1>>(&shape);
    x / norm
}

/// One direction of CMPM: mean over rows i of KL(p_i ‖ q_i) = Σ_j p_ij (log p_ij − log(q_ij + ε)),
/// p_i = softmax_j(logits_ij); `log_q` holds log(q + ε).
pub fn kl_rows<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    logits: Mat<E, D, T>,
    log_q: &Mat<E, D>,
) -> Tensor<(), E, D, T> {
    let n = logits.shape().0;
    let log_p = logits.log_softmax::<Axis<1>>();
    let p = log_p.retaped::<T>().exp();
    let kl = p * (log_p - log_q.clone());
    kl.sum::<(), Axes2<0, 1>>() * scalar::<E>(1.0 / n as f64)
}

/// IVLC (identity-based vision-language contrast, the CMPM loss of PLIP).
///
/// `image`, `text`: `(n, e)` embeddings (normalised here), `scale`: the logit scale s as a
/// scalar tensor, `q`: [`identity_targets`]. logits = s·cos(v_i, t_j); the loss averages
/// KL(p‖q) over the image→text rows and the text→image rows (logitsᵀ), ε = 1e-8.
pub fn ivlc<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    image: Mat<E, D, T>,
    text: Mat<E, D, T>,
    scale: Tensor<(), E, D, T>,
    q: &[f64],
) -> Tensor<(), E, D, T> {
    let n = image.shape().0;
    let dev = image.device().clone();
    let v = l2_normalize(image);
    let t = l2_normalize(text);
    let bcast = |s: Tensor<(), E, D, T>| s.broadcast_like::<_, Axes2<0, 1>>(&(n, n));
    // Two products instead of one transposed: dfdx 0.13's (log_)softmax backward is wrong on a
    // non-contiguous (permuted) input, which the gradient check caught.
    let i2t_logits = v
        .retaped::<T>()
        .matmul(t.retaped::<T>().permute::<(usize, usize), Axes2<1, 0>>())
        * bcast(scale.retaped::<T>());
    let t2i_logits = t.matmul(v.permute::<(usize, usize), Axes2<1, 0>>()) * bcast(scale);
    let log_q: Vec<E> = q.iter().map(|&x| scalar::<E>((x + 1e-8).ln())).collect();
    let log_q = dev.tensor_from_vec(log_q, (n, n));
    // q is symmetric for identity labels, so the text→image targets are the same matrix.
    let i2t = kl_rows(i2t_logits, &log_q);
    let t2i = kl_rows(t2i_logits, &log_q);
    (i2t + t2i) * scalar::<E>(0.5)
}

/// Mean cross-entropy of `logits: (m, vocab)` against `labels` (one class per row).
pub fn cross_entropy<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    logits: Mat<E, D, T>,
    labels: &[usize],
) -> Tensor<(), E, D, T> {
    let m = logits.shape().0;
    let dev = logits.device().clone();
    let idx = dev.tensor_from_vec(labels.to_vec(), (m,));
    let picked = logits.log_softmax::<Axis<1>>().select(idx);
    picked.sum::<(), Axis<0>>() * scalar::<E>(-1.0 / m.max(1) as f64)
}

/// Mean squared error against a constant target of the same shape.
pub fn mse<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    pred: Mat<E, D, T>,
    target: Mat<E, D>,
) -> Tensor<(), E, D, T> {
    let (r, c) = *pred.shape();
    (pred - target).square().sum::<(), Axes2<0, 1>>() * scalar::<E>(1.0 / (r * c).max(1) as f64)
}
