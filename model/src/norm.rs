//! Batch normalisation over the channels of a channels-last feature map `(n, c)`, with running
//! statistics that survive continuous training.
//!
//! Train mode: y = (x − μ_B) / √(σ²_B + ε) · γ + β with the batch's per-channel mean and biased
//! variance (rows = every pixel of every image). Eval mode: the running statistics instead, so
//! an image embedded alone equals the same image embedded inside a batch.
//!
//! Running statistics follow PyTorch: momentum 0.1, r ← (1 − m)·r + m·s, with the *unbiased*
//! batch variance (σ²_B · n/(n−1)) in the running variance. They are buffers, not parameters:
//! saved in checkpoints and exported weights (`running_mean`, `running_var`), restored on resume,
//! never seen by the optimiser, weight decay or the gradient check. A forward pass does not write
//! them: it reports the batch statistics into a [`BnStats`] record, and the trainer applies the
//! record after an update that was not skipped ([`crate::Trainer::step`]), so a skipped step and
//! the TIC grayscale pass (which passes no record) leave them untouched.

use crate::params::{scalar, Init, Mat, ParamMut, ParamRef, Params, Vector};
use dfdx::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// PyTorch's default momentum of the running statistics.
pub const MOMENTUM: f64 = 0.1;
/// ε of the normalisation (PyTorch's default).
pub const EPS: f64 = 1e-5;

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// One layer's batch statistics: `(layer id, mean, unbiased variance)`.
pub type LayerStats = (usize, Vec<f64>, Vec<f64>);

/// Batch statistics collected by one forward pass.
#[derive(Debug, Default)]
pub struct BnStats {
    pub layers: RefCell<Vec<LayerStats>>,
    /// The batch's unit joint image features by identity row, for the identity prototypes
    /// ([`crate::heads::Prototypes`]); folded in, like the statistics, only after an applied
    /// update.
    pub prototypes: RefCell<Vec<(usize, Vec<f64>)>>,
    /// The batch's joint image features as IVLC saw them (`rows × dim`, row-major, constants),
    /// for the text substeps ([`crate::train::TrainConfig::text_substeps`]); empty when IVLC
    /// was off.
    pub joint: RefCell<(Vec<f64>, usize)>,
}

/// How BatchNorm layers normalise.
#[derive(Clone, Copy)]
pub enum BnMode<'a> {
    /// Running statistics (serving, evaluation, the swapper's probe).
    Eval,
    /// Batch statistics; reported into the record when there is one.
    Train(Option<&'a BnStats>),
}

/// BatchNorm over the columns of `(n, c)`.
#[derive(Clone, Debug)]
pub struct BatchNorm<E: Dtype, D: Device<E>> {
    pub weight: Vector<E, D>,
    pub bias: Vector<E, D>,
    pub running_mean: Vector<E, D>,
    pub running_var: Vector<E, D>,
    /// Identifies the layer in a [`BnStats`] record (unique in the process, kept by clones).
    pub id: usize,
}

impl<E: Dtype, D: Device<E>> BatchNorm<E, D> {
    /// γ = 1, β = 0, running mean 0, running variance 1 (PyTorch's initial values).
    pub fn new(init: &mut Init<D>, c: usize) -> Self {
        Self::with_gamma(init, c, 1.0)
    }

    /// As [`BatchNorm::new`] with γ = `gamma` (0 for the last norm of a residual branch, so each
    /// block starts as the identity).
    pub fn with_gamma(init: &mut Init<D>, c: usize, gamma: f64) -> Self {
        BatchNorm {
            weight: init.fill(c, gamma),
            bias: init.fill(c, 0.0),
            running_mean: init.fill(c, 0.0),
            running_var: init.fill(c, 1.0),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// `(n, c)` → `(n, c)`.
    pub fn forward<T: Tape<E, D>>(&self, x: Mat<E, D, T>, mode: BnMode<'_>) -> Mat<E, D, T> {
        let shape = *x.shape();
        let (n, c) = shape;
        let bcast = |v: Vector<E, D, T>| v.broadcast_like::<_, Axis<0>>(&shape);
        match mode {
            BnMode::Eval => {
                // y = x·s + t with s = γ/√(r_var + ε), t = β − r_mean·s.
                let s = self.weight.retaped::<T>()
                    / (self.running_var.clone() + scalar::<E>(EPS)).sqrt();
                let t = self.bias.retaped::<T>() - s.retaped::<T>() * self.running_mean.clone();
                x * bcast(s) + bcast(t)
            }
            BnMode::Train(record) => {
                let mean = x.retaped::<T>().mean::<(usize,), Axis<0>>();
                let host_mean = record.map(|_| mean.as_vec());
                // `mean` itself (not a retaped copy) so its tape — the gradient path through
                // the batch mean — joins the output's.
                let centered = x - bcast(mean);
                let var = centered.retaped::<T>().square().mean::<(usize,), Axis<0>>();
                if let (Some(record), Some(host_mean)) = (record, host_mean) {
                    let unbias = n as f64 / (n.max(2) - 1) as f64;
                    let m: Vec<f64> = host_mean
                        .iter()
                        .map(|v| v.to_f64().unwrap_or(0.0))
                        .collect();
                    let v: Vec<f64> = var
                        .as_vec()
                        .iter()
                        .map(|v| v.to_f64().unwrap_or(1.0) * unbias)
                        .collect();
                    debug_assert_eq!(m.len(), c);
                    record.layers.borrow_mut().push((self.id, m, v));
                }
                let s = self.weight.retaped::<T>() / (var + scalar::<E>(EPS)).sqrt();
                centered * bcast(s) + bcast(self.bias.retaped::<T>())
            }
        }
    }

    /// [`BatchNorm::forward`], fused on the CPU in train mode as [`BatchNorm::forward_relu`]
    /// is, without the ReLU (the shortcuts' BatchNorms).
    pub fn forward_train_fused<T: Tape<E, D>>(
        &self,
        x: Mat<E, D, T>,
        mode: BnMode<'_>,
    ) -> Mat<E, D, T> {
        match mode {
            BnMode::Train(record) if Self::fused::<T>() => {
                self.train_host::<T, false>(x, None, record)
            }
            _ => self.forward(x, mode),
        }
    }

    /// `relu(forward(x))`. In train mode on the CPU with a tape, one fused op: per-channel
    /// statistics, normalisation, affine map and ReLU in two multi-threaded passes over the
    /// host copy of `x`, and a backward of two more (dfdx's composed form makes about twenty
    /// single-threaded passes, forward and backward; README "Performance"). Elsewhere the
    /// composed form. The two are checked equal, values and gradients, in the tests.
    pub fn forward_relu<T: Tape<E, D>>(&self, x: Mat<E, D, T>, mode: BnMode<'_>) -> Mat<E, D, T> {
        match mode {
            BnMode::Train(record) if Self::fused::<T>() => {
                self.train_host::<T, true>(x, None, record)
            }
            _ => self.forward(x, mode).relu(),
        }
    }

    /// `relu(forward(x) + residual)`: a residual block's last BatchNorm, its shortcut sum and
    /// ReLU; fused on the CPU in train mode as [`BatchNorm::forward_relu`] is.
    pub fn forward_add_relu<T: Tape<E, D>>(
        &self,
        x: Mat<E, D, T>,
        residual: Mat<E, D, T>,
        mode: BnMode<'_>,
    ) -> Mat<E, D, T> {
        match mode {
            BnMode::Train(record) if Self::fused::<T>() => {
                self.train_host::<T, true>(x, Some(residual), record)
            }
            _ => (self.forward(x, mode) + residual).relu(),
        }
    }

    /// True where the fused forms run: training with a tape, on the CPU, unless
    /// `PLIP_COMPOSED_BN` asks for the composed form.
    fn fused<T: Tape<E, D>>() -> bool {
        T::OWNS_TAPE
            && std::any::TypeId::of::<D>() == std::any::TypeId::of::<Cpu>()
            && !composed_bn_on_cpu()
    }

    /// The fused train-mode BatchNorm (+ residual) (+ ReLU when `RELU`) of
    /// [`BatchNorm::forward_relu`], [`BatchNorm::forward_add_relu`] and
    /// [`BatchNorm::forward_train_fused`].
    fn train_host<T: Tape<E, D>, const RELU: bool>(
        &self,
        x: Mat<E, D, T>,
        residual: Option<Mat<E, D, T>>,
        record: Option<&BnStats>,
    ) -> Mat<E, D, T> {
        use crate::conv::{grad_values, host_values};
        use rayon::prelude::*;
        let (n, c) = *x.shape();
        let (x, mut tape) = x.split_tape();
        // The residual's tape joins the output's; its values enter the sum before the ReLU.
        let residual = residual.map(|r| {
            let (r, r_tape) = r.split_tape();
            tape = std::mem::take(&mut tape).merge(r_tape);
            r
        });
        let rv: Vec<E> = residual.as_ref().map(host_values).unwrap_or_default();
        let dev = x.device().clone();
        let xs: Vec<E> = host_values(&x);
        let gamma: Vec<f64> = f64s(&self.weight.as_vec());
        let beta: Vec<f64> = f64s(&self.bias.as_vec());
        // Rows per task: whole rows, about 64 KiB of input each. Statistics are summed in f64
        // per task and across tasks; the per-element passes run in `E`, per-channel
        // coefficients precomputed, so they vectorise.
        let rows = (16384 / c.max(1)).max(1);
        let chunk = rows * c;
        let sums = |f: &(dyn Fn(usize, f64) -> f64 + Sync)| -> Vec<f64> {
            xs.par_chunks(chunk)
                .map(|part| {
                    let mut acc = vec![0.0f64; c];
                    for row in part.chunks_exact(c) {
                        for (j, (a, v)) in acc.iter_mut().zip(row).enumerate() {
                            *a += f(j, v.to_f64().unwrap_or(0.0));
                        }
                    }
                    acc
                })
                .reduce(|| vec![0.0; c], add)
        };
        let inv_n = 1.0 / n.max(1) as f64;
        let mean: Vec<f64> = sums(&|_, v| v).iter().map(|s| s * inv_n).collect();
        let var: Vec<f64> = sums(&|j, v| (v - mean[j]) * (v - mean[j]))
            .iter()
            .map(|s| s * inv_n)
            .collect();
        if let Some(record) = record {
            let unbias = n as f64 / (n.max(2) - 1) as f64;
            let v = var.iter().map(|v| v * unbias).collect();
            record.layers.borrow_mut().push((self.id, mean.clone(), v));
        }
        let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + EPS).sqrt()).collect();
        // y = relu(x·a + b [+ r]) with a = γ/σ, b = β − μ·a.
        let a: Vec<E> = (0..c).map(|j| scalar(gamma[j] * inv_std[j])).collect();
        let b: Vec<E> = (0..c)
            .map(|j| scalar(beta[j] - mean[j] * gamma[j] * inv_std[j]))
            .collect();
        let zero = E::default();
        let pre = move |v: E, j: usize, r: Option<E>| {
            let p = v * a[j] + b[j];
            r.map_or(p, |r| p + r)
        };
        let mut ys = vec![zero; n * c];
        ys.par_chunks_mut(chunk)
            .zip(xs.par_chunks(chunk))
            .enumerate()
            .for_each(|(k, (out, inp))| {
                let res = rv.get(k * chunk..k * chunk + inp.len());
                for (i, (o, v)) in out.chunks_exact_mut(c).zip(inp.chunks_exact(c)).enumerate() {
                    match res {
                        Some(res) => {
                            let r = &res[i * c..(i + 1) * c];
                            for j in 0..c {
                                let p = pre(v[j], j, Some(r[j]));
                                o[j] = if p > zero || !RELU { p } else { zero };
                            }
                        }
                        None => {
                            for j in 0..c {
                                let p = pre(v[j], j, None);
                                o[j] = if p > zero || !RELU { p } else { zero };
                            }
                        }
                    }
                }
            });
        let y: Mat<E, D> = dev.tensor_from_vec(ys, (n, c));
        let y_keep = y.clone();
        let (w_keep, b_keep) = (self.weight.clone(), self.bias.clone());
        tape.add_backward_op(move |grads| {
            let gy = grad_values(grads, &y_keep)?;
            let has_res = !rv.is_empty();
            // The gradient through the ReLU: zero where the output was clamped.
            let masked = |gv: E, v: E, j: usize, at: usize| {
                let r = has_res.then(|| rv[at]);
                if !RELU || pre(v, j, r) > zero {
                    gv
                } else {
                    zero
                }
            };
            // Σ g and Σ g·(x − μ) per channel, in f64 as the statistics are;
            // Σ g·x̂ = Σ g·(x − μ)/σ. β's gradient is Σ g, γ's Σ g·x̂.
            let (sum_g, sum_gxc) = gy
                .par_chunks(chunk)
                .zip(xs.par_chunks(chunk))
                .enumerate()
                .map(|(k, (gp, xp))| {
                    let (mut s1, mut s2) = (vec![0.0f64; c], vec![0.0f64; c]);
                    for (i, (gr, xr)) in gp.chunks_exact(c).zip(xp.chunks_exact(c)).enumerate() {
                        for j in 0..c {
                            let gj = masked(gr[j], xr[j], j, k * chunk + i * c + j)
                                .to_f64()
                                .unwrap_or(0.0);
                            s1[j] += gj;
                            s2[j] += gj * (xr[j].to_f64().unwrap_or(0.0) - mean[j]);
                        }
                    }
                    (s1, s2)
                })
                .reduce(
                    || (vec![0.0; c], vec![0.0; c]),
                    |(a1, b1), (a2, b2)| (add(a1, a2), add(b1, b2)),
                );
            let sum_gx: Vec<f64> = (0..c).map(|j| sum_gxc[j] * inv_std[j]).collect();
            // dx = γ/σ · (g − mean(g) − x̂·mean(g·x̂)) = A·g + B·x + C per channel, with
            // A = γ/σ, B = −A·mean(g·x̂)/σ, C = −A·mean(g) + A·μ·mean(g·x̂)/σ.
            let coef = |j: usize| {
                let big_a = gamma[j] * inv_std[j];
                let mgx = sum_gx[j] * inv_n * inv_std[j];
                (
                    big_a,
                    -big_a * mgx,
                    -big_a * sum_g[j] * inv_n + big_a * mean[j] * mgx,
                )
            };
            let ka: Vec<E> = (0..c).map(|j| scalar(coef(j).0)).collect();
            let kb: Vec<E> = (0..c).map(|j| scalar(coef(j).1)).collect();
            let kc: Vec<E> = (0..c).map(|j| scalar(coef(j).2)).collect();
            let mut gx = vec![zero; n * c];
            // The residual's gradient: the output's, through the ReLU (empty without one).
            let mut gr_out = vec![zero; if has_res { n * c } else { 0 }];
            let chunks = (n * c).div_ceil(chunk);
            let gr_chunks: Vec<Option<&mut [E]>> = if gr_out.is_empty() {
                (0..chunks).map(|_| None).collect()
            } else {
                gr_out.chunks_mut(chunk).map(Some).collect()
            };
            gx.par_chunks_mut(chunk)
                .zip(gy.par_chunks(chunk).zip(xs.par_chunks(chunk)))
                .zip(gr_chunks.into_par_iter())
                .enumerate()
                .for_each(|(k, ((out, (gp, xp)), mut gres))| {
                    for (i, (o, (gr, xr))) in out
                        .chunks_exact_mut(c)
                        .zip(gp.chunks_exact(c).zip(xp.chunks_exact(c)))
                        .enumerate()
                    {
                        for j in 0..c {
                            let gj = masked(gr[j], xr[j], j, k * chunk + i * c + j);
                            if let Some(dst) = gres.as_mut() {
                                dst[i * c + j] = gj;
                            }
                            o[j] = ka[j] * gj + kb[j] * xr[j] + kc[j];
                        }
                    }
                });
            use crate::conv::accumulate_host;
            accumulate_host(grads, &x, gx);
            if let Some(r) = &residual {
                accumulate_host(grads, r, gr_out);
            }
            let to_e = |v: Vec<f64>| v.into_iter().map(scalar::<E>).collect::<Vec<E>>();
            accumulate_host(grads, &w_keep, to_e(sum_gx));
            accumulate_host(grads, &b_keep, to_e(sum_g));
            Ok(())
        });
        y.put_tape(tape)
    }

    /// Folds a batch's statistics into the running ones.
    pub fn update_running(&mut self, mean: &[f64], var: &[f64], momentum: f64) {
        let mix = |r: &mut Vector<E, D>, s: &[f64]| {
            let old = r.as_vec();
            let new: Vec<E> = old
                .iter()
                .zip(s)
                .map(|(o, s)| scalar((1.0 - momentum) * o.to_f64().unwrap_or(0.0) + momentum * s))
                .collect();
            r.copy_from(&new);
        };
        mix(&mut self.running_mean, mean);
        mix(&mut self.running_var, var);
    }
}

fn f64s<E: Dtype>(v: &[E]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64().unwrap_or(0.0)).collect()
}

fn add(mut a: Vec<f64>, b: Vec<f64>) -> Vec<f64> {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
    a
}

/// `PLIP_COMPOSED_BN` set: the CPU takes dfdx's composed BatchNorm + ReLU too (for measuring
/// one against the other). Read once.
fn composed_bn_on_cpu() -> bool {
    static COMPOSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *COMPOSED.get_or_init(|| std::env::var_os("PLIP_COMPOSED_BN").is_some())
}

impl<E: Dtype, D: Device<E>> Params<E, D> for BatchNorm<E, D> {
    fn visit<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>) {
        self.weight.visit(&crate::params::join(name, "weight"), out);
        self.bias.visit(&crate::params::join(name, "bias"), out);
    }
    fn visit_mut<'a>(&'a mut self, name: &str, out: &mut Vec<(String, ParamMut<'a, E, D>)>) {
        self.weight
            .visit_mut(&crate::params::join(name, "weight"), out);
        self.bias.visit_mut(&crate::params::join(name, "bias"), out);
    }
    fn visit_buffers<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>) {
        self.running_mean
            .visit(&crate::params::join(name, "running_mean"), out);
        self.running_var
            .visit(&crate::params::join(name, "running_var"), out);
    }
    fn visit_buffers_mut<'a>(
        &'a mut self,
        name: &str,
        out: &mut Vec<(String, ParamMut<'a, E, D>)>,
    ) {
        self.running_mean
            .visit_mut(&crate::params::join(name, "running_mean"), out);
        self.running_var
            .visit_mut(&crate::params::join(name, "running_var"), out);
    }
    fn batchnorms_mut<'a>(&'a mut self, out: &mut Vec<&'a mut BatchNorm<E, D>>) {
        out.push(self);
    }
}

impl BnStats {
    /// True when every recorded statistic is finite.
    pub fn is_finite(&self) -> bool {
        self.layers
            .borrow()
            .iter()
            .all(|(_, m, v)| m.iter().chain(v).all(|x| x.is_finite()))
            && self
                .prototypes
                .borrow()
                .iter()
                .all(|(_, f)| f.iter().all(|x| x.is_finite()))
    }
}

/// Applies a forward pass's record to the model's BatchNorm layers.
pub fn apply_stats<E: Dtype, D: Device<E>, M: Params<E, D>>(model: &mut M, stats: BnStats) {
    let layers = stats.layers.into_inner();
    if layers.is_empty() {
        return;
    }
    let mut norms = Vec::new();
    model.batchnorms_mut(&mut norms);
    for (id, mean, var) in layers {
        if let Some(bn) = norms.iter_mut().find(|b| b.id == id) {
            bn.update_running(&mean, &var, MOMENTUM);
        }
    }
}
