//! The three pretext losses as tensor functions.

use crate::batch::AttributeLabel;
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

/// Margin of the batch-hard triplet loss, in Euclidean distance between unit vectors.
pub const TRIPLET_MARGIN: f64 = 0.3;
/// Temperature τ of supervised contrast.
pub const SUPCON_TEMPERATURE: f64 = 0.1;

/// Who is whose positive and negative in a batch, for the identity-level image losses. Only
/// samples with a person id take part; an unlabelled sample is nobody's positive or negative.
#[derive(Debug, Clone)]
pub struct IdentityPairs {
    pub n: usize,
    /// `1` where `j ≠ i` and both share a person id, row-major `(n, n)`.
    pub positive: Vec<f64>,
    /// `1` where both have person ids and they differ.
    pub negative: Vec<f64>,
}

impl IdentityPairs {
    pub fn new(ids: &[Option<u64>]) -> Self {
        let n = ids.len();
        let mut positive = vec![0.0; n * n];
        let mut negative = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                if let (Some(a), Some(b)) = (ids[i], ids[j]) {
                    if i != j && a == b {
                        positive[i * n + j] = 1.0;
                    } else if a != b {
                        negative[i * n + j] = 1.0;
                    }
                }
            }
        }
        IdentityPairs {
            n,
            positive,
            negative,
        }
    }

    fn row_has(v: &[f64], n: usize, i: usize) -> bool {
        v[i * n..(i + 1) * n].iter().any(|&x| x > 0.0)
    }

    /// Rows with at least one positive and one negative (triplet anchors): 1 or 0.
    fn anchors(&self) -> Vec<f64> {
        (0..self.n)
            .map(|i| {
                let ok = Self::row_has(&self.positive, self.n, i)
                    && Self::row_has(&self.negative, self.n, i);
                f64::from(u8::from(ok))
            })
            .collect()
    }

    /// True when some sample has a positive and a negative.
    pub fn has_triplets(&self) -> bool {
        self.anchors().iter().any(|&a| a > 0.0)
    }

    /// True when some sample has a positive.
    pub fn has_positives(&self) -> bool {
        self.positive.iter().any(|&x| x > 0.0)
    }
}

/// `z·zᵀ`. The right factor is a copy: dfdx's matmul backward refuses two operands with one id.
fn gram<E: Dtype, D: Device<E>, T: Tape<E, D>>(z: Mat<E, D, T>) -> Mat<E, D, T> {
    let right = (z.retaped::<T>() * scalar::<E>(1.0)).permute::<(usize, usize), Axes2<1, 0>>();
    z.matmul(right)
}

fn host_mat<E: Dtype, D: Device<E>>(dev: &D, v: &[f64], r: usize, c: usize) -> Mat<E, D> {
    dev.tensor_from_vec(v.iter().map(|&x| scalar::<E>(x)).collect(), (r, c))
}

/// Caption–prototype contrast: every caption with a target against every identity prototype
/// (`prototypes`: `(m, e)` row-major, any scale), logits s·cos(t_i, p_j), cross-entropy on the
/// caption's own prototype, averaged over the captions with a target (`targets[i]`: an index
/// into the prototypes, `None` for an unlabelled caption). Unlike IVLC, whose negatives are the
/// batch's other 15 people, a caption here must pick its person among all the people seen.
/// The prototypes are constants: only the text tower (and the scale) learn from it. `None` when
/// no caption has a target.
pub fn prototype_contrast<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    text: Mat<E, D, T>,
    prototypes: &[f64],
    targets: &[Option<usize>],
    scale: Tensor<(), E, D, T>,
) -> Option<Tensor<(), E, D, T>> {
    let (n, e) = *text.shape();
    let labelled = targets.iter().filter(|t| t.is_some()).count();
    if labelled == 0 || e == 0 || prototypes.len() % e != 0 {
        return None;
    }
    let m = prototypes.len() / e;
    if m == 0 || targets.iter().flatten().any(|&j| j >= m) {
        return None;
    }
    // Unit rows, laid out transposed (e, m) so the product needs no permuted operand.
    let mut pt = vec![0.0; e * m];
    for j in 0..m {
        let row = &prototypes[j * e..(j + 1) * e];
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        for (k, x) in row.iter().enumerate() {
            pt[k * m + j] = x / norm;
        }
    }
    let dev = text.device().clone();
    let pt = host_mat::<E, D>(&dev, &pt, e, m);
    let logits = l2_normalize(text).matmul(pt) * scale.broadcast_like::<_, Axes2<0, 1>>(&(n, m));
    let mut target = vec![0.0; n * m];
    for (i, t) in targets.iter().enumerate() {
        if let Some(j) = t {
            target[i * m + j] = 1.0;
        }
    }
    let target = host_mat::<E, D>(&dev, &target, n, m);
    Some(
        (logits.log_softmax::<Axis<1>>() * target).sum::<(), Axes2<0, 1>>()
            * scalar::<E>(-1.0 / labelled as f64),
    )
}

/// Batch-hard triplet loss (Hermans et al. 2017) on raw embeddings `(n, e)` (not normalised:
/// on unit vectors the same margin measured far worse — PyTorch peer, README "Quality"): for
/// each anchor with a positive and a negative in the batch,
/// max(0, max_p d(a, p) − min_n d(a, n) + margin), d the Euclidean distance, averaged over
/// those anchors.
pub fn batch_hard_triplet<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    emb: Mat<E, D, T>,
    pairs: &IdentityPairs,
    margin: f64,
) -> Tensor<(), E, D, T> {
    let n = pairs.n;
    let dev = emb.device().clone();
    // d² = |a|² + |b|² − 2 a·b
    let sq = emb.retaped::<T>().square().sum::<(usize,), Axis<1>>();
    // A broadcast keeps its source's id, and dfdx's binary ops refuse two operands with one
    // id: the column copy is a new tensor.
    let rows = (sq.retaped::<T>() * scalar::<E>(1.0)).broadcast_like::<_, Axis<1>>(&(n, n));
    let cols = sq.broadcast_like::<_, Axis<0>>(&(n, n));
    let dist = (rows + cols - gram(emb) * scalar::<E>(2.0))
        .clamp(1e-12, f64::MAX)
        .sqrt();
    // Distances are ≥ 0, so zeroing the non-positives keeps the row maximum a positive's.
    let hardest_pos = (dist.retaped::<T>() * host_mat::<E, D>(&dev, &pairs.positive, n, n))
        .max::<(usize,), Axis<1>>();
    // Non-negatives pushed past every real distance before the row minimum.
    let far_value = 1e6;
    let far: Vec<f64> = pairs
        .negative
        .iter()
        .map(|&m| (1.0 - m) * far_value)
        .collect();
    let hardest_neg = (dist + host_mat::<E, D>(&dev, &far, n, n)).min::<(usize,), Axis<1>>();
    let anchors = pairs.anchors();
    let count = anchors.iter().sum::<f64>().max(1.0);
    let w: Tensor<(usize,), E, D> =
        dev.tensor_from_vec(anchors.iter().map(|&a| scalar::<E>(a)).collect(), (n,));
    let hinge = (hardest_pos - hardest_neg + scalar::<E>(margin)).relu() * w;
    hinge.sum::<(), Axis<0>>() * scalar::<E>(1.0 / count)
}

/// Supervised contrastive loss (Khosla et al. 2020) on L2-normalised embeddings `(n, e)` at
/// temperature τ: for each sample i with positives P(i),
/// −1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) ), averaged over the
/// samples that have a positive. Unlabelled samples are in no denominator: they are masked out
/// of every row, as the anchor itself is.
pub fn supcon<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    emb: Mat<E, D, T>,
    pairs: &IdentityPairs,
    temperature: f64,
) -> Tensor<(), E, D, T> {
    let n = pairs.n;
    let dev = emb.device().clone();
    let z = l2_normalize(emb);
    let logits = gram(z) * scalar::<E>(1.0 / temperature);
    // Each row's softmax runs over the labelled others: −1e4 (exp → 0) on the anchor itself and
    // on samples that are neither positive nor negative.
    let mask: Vec<f64> = (0..n * n)
        .map(|k| {
            if pairs.positive[k] > 0.0 || pairs.negative[k] > 0.0 {
                0.0
            } else {
                -1e4
            }
        })
        .collect();
    let log_p = (logits + host_mat::<E, D>(&dev, &mask, n, n)).log_softmax::<Axis<1>>();
    let mut target = vec![0.0; n * n];
    let mut rows = 0.0;
    for i in 0..n {
        let count: f64 = pairs.positive[i * n..(i + 1) * n].iter().sum();
        if count > 0.0 {
            rows += 1.0;
            for j in 0..n {
                target[i * n + j] = pairs.positive[i * n + j] / count;
            }
        }
    }
    (log_p * host_mat::<E, D>(&dev, &target, n, n)).sum::<(), Axes2<0, 1>>()
        * scalar::<E>(-1.0 / f64::max(rows, 1.0))
}

/// Label smoothing of the identity loss.
pub const ID_LABEL_SMOOTHING: f64 = 0.1;

/// Identity classification: cross-entropy of `logits: (n, classes)` against each labelled
/// sample's class (`key mod classes`) with label smoothing ε — target (1 − ε) on the class and
/// ε / classes everywhere — averaged over the labelled samples; unlabelled rows (`None`) count
/// nothing. `None` when no sample is labelled.
pub fn id_loss<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    logits: Mat<E, D, T>,
    persons: &[Option<u64>],
    smoothing: f64,
) -> Option<Tensor<(), E, D, T>> {
    let (n, classes) = *logits.shape();
    let labelled = persons.iter().filter(|p| p.is_some()).count();
    if labelled == 0 || classes == 0 {
        return None;
    }
    let mut target = vec![0.0; n * classes];
    for (i, p) in persons.iter().enumerate() {
        if let Some(key) = p {
            let row = &mut target[i * classes..(i + 1) * classes];
            row.iter_mut().for_each(|t| *t = smoothing / classes as f64);
            row[(*key % classes as u64) as usize] += 1.0 - smoothing;
        }
    }
    let dev = logits.device().clone();
    let target = host_mat::<E, D>(&dev, &target, n, classes);
    Some(
        (logits.log_softmax::<Axis<1>>() * target).sum::<(), Axes2<0, 1>>()
            * scalar::<E>(-1.0 / labelled as f64),
    )
}

/// Attribute prediction: for every known attribute of every row, the cross-entropy of a
/// softmax over that attribute's field of `logits` `(rows, values)`,
///
///   L_attr = −(1/m) Σ_{(r, f)} log softmax_{v ∈ f}(logits[r, v])[value(r, f)],
///
/// averaged over the m (row, field) pairs; `labels[r]` are row r's known attributes.
/// `None` when no row has one.
pub fn attribute_loss<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    logits: Mat<E, D, T>,
    labels: &[&[AttributeLabel]],
) -> Option<Tensor<(), E, D, T>> {
    let values = logits.shape().1;
    let items: Vec<(usize, AttributeLabel)> = labels
        .iter()
        .enumerate()
        .flat_map(|(r, ls)| ls.iter().map(move |l| (r, *l)))
        .filter(|(_, l)| l.start + l.len <= values && l.value < l.len)
        .collect();
    if items.is_empty() {
        return None;
    }
    let m = items.len();
    let dev = logits.device().clone();
    let rows = dev.tensor_from_vec(items.iter().map(|(r, _)| *r).collect(), (m,));
    // Values outside the item's field leave the softmax: a large negative bias (not −∞, which
    // would turn 0·∞ into NaN in the backward pass).
    let mut bias = vec![-1e4; m * values];
    for (i, (_, l)) in items.iter().enumerate() {
        bias[i * values + l.start..i * values + l.start + l.len].fill(0.0);
    }
    let bias = host_mat::<E, D>(&dev, &bias, m, values);
    let targets: Vec<usize> = items.iter().map(|(_, l)| l.start + l.value).collect();
    Some(cross_entropy(logits.gather(rows) + bias, &targets))
}

/// Alignment targets for [`feature_alignment`]: for each caption (its image is batch row
/// `caption_rows[c]`), the mean of the unit rows of `features` (`(n, e)` row-major) whose
/// person equals that image's person, or the image's own unit row when it has no person id;
/// each target a unit vector, `(captions, e)` row-major.
pub fn person_means(
    features: &[f64],
    e: usize,
    persons: &[Option<u64>],
    caption_rows: &[usize],
) -> Vec<f64> {
    let unit: Vec<Vec<f64>> = features
        .chunks(e.max(1))
        .map(|r| {
            let norm = r.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            r.iter().map(|x| x / norm).collect()
        })
        .collect();
    let mut out = Vec::with_capacity(caption_rows.len() * e);
    for &r in caption_rows {
        let mut mean = vec![0.0; e];
        for (j, u) in unit.iter().enumerate() {
            let same = j == r || (persons[r].is_some() && persons[j] == persons[r]);
            if same {
                mean.iter_mut().zip(u).for_each(|(m, x)| *m += x);
            }
        }
        let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        out.extend(mean.iter().map(|x| x / norm));
    }
    out
}

/// Caption–feature alignment: mean over the captions of 1 − cos(t_i, target_i), `targets`
/// `(n, e)` row-major unit vectors taken as constants ([`person_means`]): a regression of each
/// caption onto where its person's images lie, a dense signal beside IVLC's in-batch contrast.
pub fn feature_alignment<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    text: Mat<E, D, T>,
    targets: &[f64],
) -> Tensor<(), E, D, T> {
    let (n, e) = *text.shape();
    let dev = text.device().clone();
    let target = host_mat::<E, D>(&dev, targets, n, e);
    let cos = (l2_normalize(text) * target).sum::<(), Axes2<0, 1>>();
    (cos * scalar::<E>(-1.0 / n.max(1) as f64)) + scalar::<E>(1.0)
}
