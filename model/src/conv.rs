//! Convolution and pooling on stable dfdx, channels-last.
//!
//! dfdx 0.13 compiles its own convolution out on stable Rust, so the project builds its own
//! from an im2col op and one matrix product — the same practice as the Linear layers (one large
//! product per layer):
//!
//! - A feature map travels as [`Fmap`]: a `(b·h·w, c)` matrix, rows in `(image, y, x)` order
//!   (NHWC). Every per-pixel op (BatchNorm, ReLU, residual sums) is then a plain matrix op, and
//!   a convolution's output comes out of the product already in this layout.
//! - [`im2col`] turns `(b·h·w, c)` into `(b·ho·wo, k·k·c)`: for every output pixel its `k×k`
//!   input neighbours' channel vectors, in `(ky, kx, c)` order, zeros outside the image.
//! - [`Conv2d`] is then `im2col(x) · Wᵀ` with `W: (c_out, k·k·c_in)`.
//!
//! Two implementations of im2col, chosen by device:
//! - **CPU**: a custom op on dfdx's tape — multi-threaded copies of contiguous channel runs
//!   (rayon, the trainer's pool), and a multi-threaded col2im (scatter-add, one image per task)
//!   as its backward. Measured against the gather form below: `plipd bench conv` (README).
//! - **Other devices (CUDA)**: only dfdx ops — a zero row appended to the input, then `gather`
//!   of one row per (output pixel, kernel offset); `gather`'s backward is the scatter-add that
//!   `Embedding` uses. The two forms are checked equal, values and gradients, in the tests.

use crate::params::{Init, Mat};
use dfdx::prelude::*;
use rayon::prelude::*;
use std::any::TypeId;

/// A feature map `(b·h·w, c)`, channels last, rows in `(image, y, x)` order.
pub struct Fmap<E: Dtype, D: Device<E>, T = NoneTape> {
    pub x: Mat<E, D, T>,
    pub b: usize,
    pub h: usize,
    pub w: usize,
}

impl<E: Dtype, D: Device<E>, T: Tape<E, D>> Fmap<E, D, T> {
    /// Channels.
    pub fn c(&self) -> usize {
        self.x.shape().1
    }
}

/// Normalised images `(b, 3, H, W)` (channels first, as the batch builder writes them) →
/// a channels-last [`Fmap`].
pub fn from_nchw<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    images: Tensor<(usize, usize, usize, usize), E, D, T>,
) -> Fmap<E, D, T> {
    let (b, c, h, w) = *images.shape();
    let x = images
        .permute::<(usize, usize, usize, usize), Axes4<0, 2, 3, 1>>()
        .reshape_like(&(b * h * w, c));
    Fmap { x, b, h, w }
}

/// A square sliding window: kernel side, stride, zero padding on every side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Window {
    /// Output side for an input side `n`: ⌊(n + 2·pad − k) / stride⌋ + 1.
    pub fn out(&self, n: usize) -> usize {
        (n + 2 * self.pad).saturating_sub(self.k) / self.stride.max(1) + 1
    }
}

/// The geometry of one im2col.
#[derive(Debug, Clone, Copy)]
struct Geo {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    ho: usize,
    wo: usize,
    win: Window,
}

impl Geo {
    /// Input row of output pixel `(bi, oy, ox)` at kernel offset `(ky, kx)`, or `None` in the
    /// padding.
    #[inline]
    fn source(&self, bi: usize, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<usize> {
        let iy = (oy * self.win.stride + ky).checked_sub(self.win.pad)?;
        let ix = (ox * self.win.stride + kx).checked_sub(self.win.pad)?;
        (iy < self.h && ix < self.w).then(|| (bi * self.h + iy) * self.w + ix)
    }
}

/// `(b·h·w, c)` → `(b·ho·wo, k·k·c)`, plus `(ho, wo)`.
pub fn im2col<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Fmap<E, D, T>,
    win: Window,
) -> (Mat<E, D, T>, usize, usize) {
    if TypeId::of::<D>() == TypeId::of::<Cpu>() && !gather_on_cpu() {
        im2col_host(x, win)
    } else {
        im2col_gather(x, win)
    }
}

/// `PLIP_IM2COL_GATHER` set: the CPU takes the gather form too (for measuring one against the
/// other). Read once, not on every convolution.
fn gather_on_cpu() -> bool {
    static GATHER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GATHER.get_or_init(|| std::env::var_os("PLIP_IM2COL_GATHER").is_some())
}

fn geometry<E: Dtype, D: Device<E>, T: Tape<E, D>>(x: &Fmap<E, D, T>, win: Window) -> Geo {
    Geo {
        b: x.b,
        h: x.h,
        w: x.w,
        c: x.c(),
        ho: win.out(x.h),
        wo: win.out(x.w),
        win,
    }
}

/// im2col from dfdx ops only: zero row appended, one `gather` of `b·ho·wo·k·k` rows.
pub fn im2col_gather<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Fmap<E, D, T>,
    win: Window,
) -> (Mat<E, D, T>, usize, usize) {
    let g = geometry(&x, win);
    let rows = g.b * g.h * g.w;
    let k = win.k;
    let mut idx = Vec::with_capacity(g.b * g.ho * g.wo * k * k);
    for bi in 0..g.b {
        for oy in 0..g.ho {
            for ox in 0..g.wo {
                for ky in 0..k {
                    for kx in 0..k {
                        idx.push(g.source(bi, oy, ox, ky, kx).unwrap_or(rows));
                    }
                }
            }
        }
    }
    let dev = x.x.device().clone();
    let zero: Mat<E, D> = dev.zeros_like(&(1, g.c));
    let padded = (x.x, zero).concat_along(Axis::<0>);
    let n = idx.len();
    let picked = padded.gather(dev.tensor_from_vec(idx, (n,)));
    let out = picked.reshape_like(&(g.b * g.ho * g.wo, k * k * g.c));
    (out, g.ho, g.wo)
}

/// im2col as a custom op with a host kernel and a host col2im backward, both multi-threaded.
fn im2col_host<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Fmap<E, D, T>,
    win: Window,
) -> (Mat<E, D, T>, usize, usize) {
    let g = geometry(&x, win);
    let (x, mut tape) = x.x.split_tape();
    let dev = x.device().clone();
    let cols = cols_forward(&host_values(&x), &g);
    let kkc = win.k * win.k * g.c;
    let y: Mat<E, D> = dev.tensor_from_vec(cols, (g.b * g.ho * g.wo, kkc));
    if T::OWNS_TAPE {
        let y_keep = y.clone();
        let x_keep = x.clone();
        tape.add_backward_op(move |grads| {
            let gy = grad_values(grads, &y_keep)?;
            let gx = cols_backward(&gy, &g);
            accumulate_host(grads, &x_keep, gx);
            Ok(())
        });
    }
    (y.put_tape(tape), g.ho, g.wo)
}

/// The gradient of `t` inside a backward op, as host values in storage order (allocated as
/// zeros when no op wrote one): on the CPU one bulk copy of dfdx's buffer, elsewhere
/// `Gradients::get` and `as_vec` (which walk the logical index element by element).
pub fn grad_values<S: Shape, E: Dtype, D: Device<E>>(
    grads: &mut Gradients<E, D>,
    t: &Tensor<S, E, D>,
) -> Result<Vec<E>, D::Err> {
    use std::any::Any;
    grads.try_alloc_for(t)?;
    let on_cpu = (grads as &mut dyn Any).downcast_mut::<Gradients<E, Cpu>>();
    let t_cpu = (t as &dyn Any).downcast_ref::<Tensor<S, E, Cpu>>();
    if let (Some(grads), Some(t)) = (on_cpu, t_cpu) {
        return Ok(buffer(grads, t).to_vec());
    }
    Ok(grads.get(t).as_vec())
}

/// Adds host values `g` (row-major, `x`'s logical order) to the gradient of `x` inside a
/// backward op. On the CPU they are added into dfdx's gradient buffer directly, in parallel
/// (`Gradients::get_or_alloc_mut`); elsewhere through [`accumulate`]. `x` must be laid out
/// contiguously (a fresh op output, as every input of the project's custom ops is): the
/// buffer is in `x`'s storage order.
pub fn accumulate_host<S: Shape, E: Dtype, D: Device<E>>(
    grads: &mut Gradients<E, D>,
    x: &Tensor<S, E, D>,
    g: Vec<E>,
) {
    use std::any::Any;
    let on_cpu = (grads as &mut dyn Any).downcast_mut::<Gradients<E, Cpu>>();
    let x_cpu = (x as &dyn Any).downcast_ref::<Tensor<S, E, Cpu>>();
    if let (Some(grads), Some(x)) = (on_cpu, x_cpu) {
        if let Ok(buf) = grads.get_or_alloc_mut(x) {
            if buf.len() == g.len() {
                buf.par_chunks_mut(1 << 14)
                    .zip(g.par_chunks(1 << 14))
                    .for_each(|(d, s)| {
                        for (d, s) in d.iter_mut().zip(s) {
                            *d += *s;
                        }
                    });
                return;
            }
        }
    }
    let g = x.device().tensor_from_vec(g, *x.shape());
    accumulate(grads, x, g);
}

/// Adds `g` to the gradient of `x` inside a backward op, through dfdx's own product rule:
/// d/dx Σ(x ⊙ g) = g. dfdx gives crates no way to write into a gradient buffer directly, so the
/// sum is traced on the same [`Gradients`] and backpropagated. Needs a leaky gradient record
/// (the project's): a record with leaf ids would drop the other intermediates' gradients here.
pub fn accumulate<S: Shape, E: Dtype, D: Device<E>>(
    grads: &mut Gradients<E, D>,
    x: &Tensor<S, E, D>,
    g: Tensor<S, E, D>,
) {
    let record = std::mem::replace(grads, Gradients::leaky());
    let product = (x.clone().traced(record) * g).sum::<(), _>();
    *grads = product.backward();
}

fn cols_forward<E: Dtype>(x: &[E], g: &Geo) -> Vec<E> {
    let kkc = g.win.k * g.win.k * g.c;
    let mut out = vec![E::default(); g.b * g.ho * g.wo * kkc];
    out.par_chunks_mut(kkc * g.wo)
        .enumerate()
        .for_each(|(row, chunk)| {
            let (bi, oy) = (row / g.ho, row % g.ho);
            for ox in 0..g.wo {
                let dst = &mut chunk[ox * kkc..(ox + 1) * kkc];
                for ky in 0..g.win.k {
                    for kx in 0..g.win.k {
                        let o = (ky * g.win.k + kx) * g.c;
                        if let Some(src) = g.source(bi, oy, ox, ky, kx) {
                            dst[o..o + g.c].copy_from_slice(&x[src * g.c..(src + 1) * g.c]);
                        }
                    }
                }
            }
        });
    out
}

fn cols_backward<E: Dtype>(gy: &[E], g: &Geo) -> Vec<E> {
    let mut gx = vec![E::default(); g.b * g.h * g.w * g.c];
    cols_backward_into(gy, g, &mut gx);
    gx
}

/// col2im: adds the column gradient `gy` into `gx` (`(b·h·w, c)`), one image per task.
fn cols_backward_into<E: Dtype>(gy: &[E], g: &Geo, gx: &mut [E]) {
    let kkc = g.win.k * g.win.k * g.c;
    let per_image = g.h * g.w * g.c;
    gx.par_chunks_mut(per_image)
        .enumerate()
        .for_each(|(bi, img)| {
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let row = (bi * g.ho + oy) * g.wo + ox;
                    let src = &gy[row * kkc..(row + 1) * kkc];
                    for ky in 0..g.win.k {
                        for kx in 0..g.win.k {
                            if let Some(at) = g.source(bi, oy, ox, ky, kx) {
                                let at = (at - bi * g.h * g.w) * g.c;
                                let o = (ky * g.win.k + kx) * g.c;
                                for (d, s) in img[at..at + g.c].iter_mut().zip(&src[o..o + g.c]) {
                                    *d += *s;
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// A 2-D convolution without bias (a BatchNorm follows every one): `W: (c_out, k·k·c_in)`,
/// columns in `(ky, kx, c_in)` order.
#[derive(Clone, Debug)]
pub struct Conv2d<E: Dtype, D: Device<E>> {
    pub weight: Mat<E, D>,
    pub win: Window,
}

impl<E: Dtype, D: Device<E>> crate::params::Params<E, D> for Conv2d<E, D> {
    fn visit<'a>(&'a self, name: &str, out: &mut Vec<(String, crate::params::ParamRef<'a, E, D>)>) {
        self.weight.visit(&crate::params::join(name, "weight"), out);
    }
    fn visit_mut<'a>(
        &'a mut self,
        name: &str,
        out: &mut Vec<(String, crate::params::ParamMut<'a, E, D>)>,
    ) {
        self.weight
            .visit_mut(&crate::params::join(name, "weight"), out);
    }
    fn visit_convs(&self, name: &str, out: &mut Vec<(String, [usize; 4])>) {
        let (c_out, cols) = *self.weight.shape();
        let k = self.win.k;
        out.push((
            crate::params::join(name, "weight"),
            [c_out, cols / (k * k).max(1), k, k],
        ));
    }
}

impl<E: Dtype, D: Device<E>> Conv2d<E, D> {
    /// Kaiming-normal weights, fan-out mode, ReLU gain (torchvision's ResNet initialisation):
    /// N(0, 2 / (c_out·k·k)).
    pub fn new(init: &mut Init<D>, c_in: usize, c_out: usize, win: Window) -> Self {
        let std = (2.0 / (c_out * win.k * win.k) as f64).sqrt();
        Conv2d {
            weight: init.normal(c_out, win.k * win.k * c_in, std),
            win,
        }
    }

    /// `(b·h·w, c_in)` → `(b·ho·wo, c_out)`. On the CPU (f32, f64) one fused op
    /// ([`Conv2d::forward_fused`]); elsewhere [`Conv2d::forward_composed`].
    pub fn forward<T: Tape<E, D>>(&self, x: Fmap<E, D, T>) -> Fmap<E, D, T> {
        if fused_conv::<E, D>() {
            self.forward_fused(x, true)
        } else {
            self.forward_composed(x)
        }
    }

    /// im2col, then dfdx's matrix product with `Wᵀ`, each on the tape. A 1×1 stride-1
    /// convolution skips im2col.
    pub fn forward_composed<T: Tape<E, D>>(&self, x: Fmap<E, D, T>) -> Fmap<E, D, T> {
        let w = self
            .weight
            .retaped::<T>()
            .permute::<(usize, usize), Axes2<1, 0>>();
        if self.win.k == 1 && self.win.stride == 1 && self.win.pad == 0 {
            let Fmap { x, b, h, w: width } = x;
            return Fmap {
                x: x.matmul(w),
                b,
                h,
                w: width,
            };
        }
        let b = x.b;
        let (cols, ho, wo) = im2col(x, self.win);
        Fmap {
            x: cols.matmul(w),
            b,
            h: ho,
            w: wo,
        }
    }
}

impl<E: Dtype, D: Device<E>> Conv2d<E, D> {
    /// As [`Conv2d::forward`] for an input that needs no gradient (the images): im2col runs
    /// without a tape, so the backward skips col2im (the stem's is the largest of the network).
    pub fn forward_input<T: Tape<E, D>>(&self, x: Fmap<E, D, T>) -> Fmap<E, D, T> {
        if fused_conv::<E, D>() {
            return self.forward_fused(x, false);
        }
        let Fmap { x, b, h, w } = x;
        let (x, tape) = x.split_tape();
        let (cols, ho, wo) = im2col(Fmap { x, b, h, w }, self.win);
        let wt = self
            .weight
            .retaped::<T>()
            .permute::<(usize, usize), Axes2<1, 0>>();
        Fmap {
            x: cols.put_tape(tape).matmul(wt),
            b,
            h: ho,
            w: wo,
        }
    }
}

impl<E: Dtype, D: Device<E>> Conv2d<E, D> {
    /// The convolution as one custom op on dfdx's tape, on the host: im2col into a buffer the
    /// op owns, and the product `cols · Wᵀ` by `gemm` (dfdx's own product crate) straight
    /// from it. The backward reads the output's gradient once, adds `gyᵀ · cols` into the
    /// weight's gradient buffer in place, and — when `input_grad` — computes `gy · W` into a
    /// buffer of its own and scatters it (col2im) straight into the input's gradient buffer;
    /// a 1×1 stride-1 convolution has no im2col and its product lands in that buffer directly.
    ///
    /// Against the composed form this drops the column matrix's dfdx tensor and its
    /// zero-filled gradient buffer, three element-by-element copies (`as_vec`) and a sum per
    /// custom op. Only where [`fused_conv`] holds (the CPU, f32 or f64); the two forms are
    /// checked equal, values and both gradients, in the tests. `x` must be laid out
    /// contiguously, as every op output is.
    pub fn forward_fused<T: Tape<E, D>>(
        &self,
        x: Fmap<E, D, T>,
        input_grad: bool,
    ) -> Fmap<E, D, T> {
        let g = geometry(&x, self.win);
        let Fmap { x, b, .. } = x;
        let (x, tape) = x.split_tape();
        let dev = x.device().clone();
        let (c_out, kkc) = *self.weight.shape();
        let rows = g.b * g.ho * g.wo;
        let pointwise = self.win.k == 1 && self.win.stride == 1 && self.win.pad == 0;
        let xs = host_values(&x);
        let cols = if pointwise { xs } else { cols_forward(&xs, &g) };
        let w = host_values(&self.weight);
        // y (rows, c_out) = cols (rows, kkc) · Wᵀ; Wᵀ[k][n] = W[n][k].
        // SAFETY: `cols` holds rows·kkc values, `w` c_out·kkc.
        let ys = unsafe {
            product_new(
                (rows, c_out, kkc),
                (cols.as_ptr(), 1, kkc),
                (w.as_ptr(), kkc, 1),
            )
        };
        let y: Mat<E, D> = dev.tensor_from_vec(ys, (rows, c_out));
        if !T::OWNS_TAPE {
            return Fmap {
                x: y.put_tape(tape),
                b,
                h: g.ho,
                w: g.wo,
            };
        }
        let mut tape = tape;
        let y_keep = y.clone();
        let w_keep = self.weight.clone();
        tape.add_backward_op(move |grads| {
            use std::any::Any;
            // Allocation (the only fallible part) through dfdx's generic path, so its error
            // is the device's; the CPU buffers below then exist.
            grads.try_alloc_for(&y_keep)?;
            grads.try_alloc_for(&w_keep)?;
            if input_grad {
                grads.try_alloc_for(&x)?;
            }
            let grads = (grads as &mut dyn Any)
                .downcast_mut::<Gradients<E, Cpu>>()
                .expect("the fused convolution runs on the CPU only");
            let gy: Vec<E> = buffer(grads, as_cpu(&y_keep)).to_vec();
            // dW (c_out, kkc) += gyᵀ (c_out, rows) · cols (rows, kkc).
            let gw = buffer(grads, as_cpu(&w_keep));
            // SAFETY: as above; `gw` holds c_out·kkc values.
            unsafe {
                product(
                    (c_out, kkc, rows),
                    (gw.as_mut_ptr(), 1, kkc),
                    true,
                    (gy.as_ptr(), c_out, 1),
                    (cols.as_ptr(), 1, kkc),
                );
            }
            if !input_grad {
                return Ok(());
            }
            let x_cpu = as_cpu(&x);
            if pointwise {
                // dx (rows, c_in) += gy (rows, c_out) · W (c_out, c_in).
                let gx = buffer(grads, x_cpu);
                // SAFETY: as above; `gx` holds rows·c_in values.
                unsafe {
                    product(
                        (rows, kkc, c_out),
                        (gx.as_mut_ptr(), 1, kkc),
                        true,
                        (gy.as_ptr(), 1, c_out),
                        (w.as_ptr(), 1, kkc),
                    );
                }
                return Ok(());
            }
            // dcols (rows, kkc) = gy · W, then col2im into dx.
            // SAFETY: `gy` holds rows·c_out values, `w` c_out·kkc.
            let gcols = unsafe {
                product_new(
                    (rows, kkc, c_out),
                    (gy.as_ptr(), 1, c_out),
                    (w.as_ptr(), 1, kkc),
                )
            };
            drop(gy);
            let gx = buffer(grads, x_cpu);
            cols_backward_into(&gcols, &g, gx);
            Ok(())
        });
        Fmap {
            x: y.put_tape(tape),
            b,
            h: g.ho,
            w: g.wo,
        }
    }
}

/// `t` as the CPU tensor it is where the fused convolution runs.
fn as_cpu<S: Shape, E: Dtype, D: Device<E>>(t: &Tensor<S, E, D>) -> &Tensor<S, E, Cpu> {
    (t as &dyn std::any::Any)
        .downcast_ref::<Tensor<S, E, Cpu>>()
        .expect("the fused convolution runs on the CPU only")
}

/// The CPU gradient buffer of `t`, allocated beforehand.
fn buffer<'a, S: Shape, E: Dtype>(
    grads: &'a mut Gradients<E, Cpu>,
    t: &Tensor<S, E, Cpu>,
) -> &'a mut [E] {
    grads
        .get_or_alloc_mut(t)
        .expect("the gradient buffer was allocated before")
}

/// True where the host ops run — [`Conv2d::forward_fused`] and [`max_pool`]'s one-pass form:
/// the CPU, f32 or f64, unless `PLIP_COMPOSED_CONV` asks for the composed forms (read once).
pub fn fused_conv<E: Dtype, D: Device<E>>() -> bool {
    static COMPOSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    TypeId::of::<D>() == TypeId::of::<Cpu>()
        && (TypeId::of::<E>() == TypeId::of::<f32>() || TypeId::of::<E>() == TypeId::of::<f64>())
        && !*COMPOSED.get_or_init(|| std::env::var_os("PLIP_COMPOSED_CONV").is_some())
}

/// A tensor's values in storage order, by one bulk copy (dfdx's `as_vec` walks the logical
/// index element by element). The tensor must be laid out contiguously, as op outputs are.
pub fn host_values<S: Shape, E: Dtype, D: Device<E>, T>(t: &Tensor<S, E, D, T>) -> Vec<E> {
    let mut v = vec![E::default(); t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

/// `lhs (m, k) · rhs (k, n)` into a new row-major `(m, n)` buffer that gemm fills without
/// zeroing it first (it writes every element when it does not read the destination, `k = 0`
/// included).
///
/// # Safety
/// As [`product`].
unsafe fn product_new<E: Dtype>(
    (m, n, k): (usize, usize, usize),
    lhs: (*const E, usize, usize),
    rhs: (*const E, usize, usize),
) -> Vec<E> {
    let mut out: Vec<E> = Vec::with_capacity(m * n);
    if m > 0 && n > 0 {
        product((m, n, k), (out.as_mut_ptr(), 1, n), false, lhs, rhs);
        // SAFETY: gemm wrote all m·n elements (read_dst = false).
        out.set_len(m * n);
    }
    out
}

/// `dst (m, n) [+]= lhs (m, k) · rhs (k, n)`, each operand given as (pointer, column stride,
/// row stride); `accumulate` adds to `dst` instead of overwriting it. gemm on the calling
/// rayon pool's threads, as dfdx's own products run. `E` is f32 or f64 ([`fused_conv`]).
///
/// # Safety
/// Each pointer must address every element its sizes and strides reach.
unsafe fn product<E: Dtype>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut E, usize, usize),
    accumulate: bool,
    lhs: (*const E, usize, usize),
    rhs: (*const E, usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.1 as isize,
        dst.2 as isize,
        accumulate,
        lhs.0,
        lhs.1 as isize,
        lhs.2 as isize,
        rhs.0,
        rhs.1 as isize,
        rhs.2 as isize,
        E::ONE,
        E::ONE,
        false,
        false,
        false,
        gemm::Parallelism::Rayon(rayon::current_num_threads()),
    );
}

/// Max pooling over `win` with zero padding. The ResNet stem pools after a ReLU, where every
/// value is ≥ 0 and every window holds at least one real pixel, so zero padding equals
/// PyTorch's −∞ padding there; callers elsewhere must keep that precondition.
pub fn max_pool<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Fmap<E, D, T>,
    win: Window,
) -> Fmap<E, D, T> {
    if fused_conv::<E, D>() {
        max_pool_host(x, win)
    } else {
        max_pool_composed(x, win)
    }
}

/// [`max_pool`] as one custom op on the host, multi-threaded (one output row per task, one
/// image per task backward). Its gradient is the composed form's (dfdx's maximum): each
/// output's gradient goes to every input of its window equal to the maximum, so exact ties —
/// common where flat image regions give equal activations — each receive it, and training is
/// unchanged from the composed form (PyTorch would pick one).
fn max_pool_host<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Fmap<E, D, T>,
    win: Window,
) -> Fmap<E, D, T> {
    let g = geometry(&x, win);
    let (x, tape) = x.x.split_tape();
    let dev = x.device().clone();
    let c = g.c;
    let xs = host_values(&x);
    let zero = E::default();
    let mut ys = vec![zero; g.b * g.ho * g.wo * c];
    ys.par_chunks_mut(g.wo * c)
        .enumerate()
        .for_each(|(row, yrow)| {
            let (bi, oy) = (row / g.ho, row % g.ho);
            for ox in 0..g.wo {
                let best = &mut yrow[ox * c..(ox + 1) * c];
                let mut first = true;
                for ky in 0..win.k {
                    for kx in 0..win.k {
                        // Zero padding: a value of 0.
                        let src = g.source(bi, oy, ox, ky, kx);
                        for j in 0..c {
                            let v = src.map_or(zero, |s| xs[s * c + j]);
                            if first || v > best[j] {
                                best[j] = v;
                            }
                        }
                        first = false;
                    }
                }
            }
        });
    let y: Mat<E, D> = dev.tensor_from_vec(ys.clone(), (g.b * g.ho * g.wo, c));
    let mut tape = tape;
    if T::OWNS_TAPE {
        let y_keep = y.clone();
        tape.add_backward_op(move |grads| {
            let gy = grad_values(grads, &y_keep)?;
            let per_in = g.h * g.w * c;
            let mut gx = vec![zero; g.b * per_in];
            // In col2im's order (output pixel, then window position), so the sums are the
            // composed form's to the bit.
            gx.par_chunks_mut(per_in).enumerate().for_each(|(bi, img)| {
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        let o = ((bi * g.ho + oy) * g.wo + ox) * c;
                        for ky in 0..win.k {
                            for kx in 0..win.k {
                                let Some(src) = g.source(bi, oy, ox, ky, kx) else {
                                    continue;
                                };
                                let at = (src - bi * g.h * g.w) * c;
                                for j in 0..c {
                                    if xs[src * c + j] == ys[o + j] {
                                        img[at + j] += gy[o + j];
                                    }
                                }
                            }
                        }
                    }
                }
            });
            accumulate_host(grads, &x, gx);
            Ok(())
        });
    }
    Fmap {
        x: y.put_tape(tape),
        b: g.b,
        h: g.ho,
        w: g.wo,
    }
}

/// [`max_pool`] from dfdx ops: im2col, then the maximum over each window.
pub fn max_pool_composed<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    x: Fmap<E, D, T>,
    win: Window,
) -> Fmap<E, D, T> {
    let (b, c) = (x.b, x.c());
    let (cols, ho, wo) = im2col(x, win);
    let rows = b * ho * wo;
    let y = cols
        .reshape_like(&(rows, win.k * win.k, c))
        .max::<(usize, usize), Axis<1>>();
    Fmap {
        x: y,
        b,
        h: ho,
        w: wo,
    }
}

/// Global average pooling: `(b·h·w, c)` → `(b, c)`.
pub fn avg_pool<E: Dtype, D: Device<E>, T: Tape<E, D>>(x: Fmap<E, D, T>) -> Mat<E, D, T> {
    let (b, n, c) = (x.b, x.h * x.w, x.c());
    x.x.reshape_like(&(b, n, c))
        .mean::<(usize, usize), Axis<1>>()
}
