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
    let cols = cols_forward(&x.as_vec(), &g);
    let kkc = win.k * win.k * g.c;
    let y: Mat<E, D> = dev.tensor_from_vec(cols, (g.b * g.ho * g.wo, kkc));
    if T::OWNS_TAPE {
        let y_keep = y.clone();
        let x_keep = x.clone();
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&y_keep)?;
            let gy = grads.get(&y_keep).as_vec();
            let gx = cols_backward(&gy, &g);
            accumulate_host(grads, &x_keep, gx);
            Ok(())
        });
    }
    (y.put_tape(tape), g.ho, g.wo)
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
    let kkc = g.win.k * g.win.k * g.c;
    let per_image = g.h * g.w * g.c;
    let mut gx = vec![E::default(); g.b * per_image];
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
    gx
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

    /// `(b·h·w, c_in)` → `(b·ho·wo, c_out)`. A 1×1 stride-1 convolution skips im2col.
    pub fn forward<T: Tape<E, D>>(&self, x: Fmap<E, D, T>) -> Fmap<E, D, T> {
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

/// Max pooling over `win` with zero padding. The ResNet stem pools after a ReLU, where every
/// value is ≥ 0 and every window holds at least one real pixel, so zero padding equals
/// PyTorch's −∞ padding there; callers elsewhere must keep that precondition.
pub fn max_pool<E: Dtype, D: Device<E>, T: Tape<E, D>>(
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
