//! The im2col convolution and the pooling ops against naive loops, on odd sizes, strides and
//! paddings; the CPU custom op against the gather form (values and gradients).

use plip_model::conv::{
    avg_pool, im2col, im2col_gather, max_pool, max_pool_composed, Conv2d, Fmap, Window,
};
use plip_model::dfdx::prelude::*;
use plip_model::params::Init;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(n: usize, seed: u64) -> Vec<f64> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.gen_range(-1.0..1.0)).collect()
}

/// Naive convolution: x `(b, h, w, c)` channels-last, weight `(o, k, k, c)`.
#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f64],
    (b, h, w, c): (usize, usize, usize, usize),
    wt: &[f64],
    o: usize,
    win: Window,
) -> (Vec<f64>, usize, usize) {
    let (ho, wo) = (win.out(h), win.out(w));
    let mut y = vec![0.0; b * ho * wo * o];
    for bi in 0..b {
        for oy in 0..ho {
            for ox in 0..wo {
                for oc in 0..o {
                    let mut acc = 0.0;
                    for ky in 0..win.k {
                        for kx in 0..win.k {
                            let iy = (oy * win.stride + ky) as isize - win.pad as isize;
                            let ix = (ox * win.stride + kx) as isize - win.pad as isize;
                            if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                                continue;
                            }
                            for ci in 0..c {
                                let xv = x[((bi * h + iy as usize) * w + ix as usize) * c + ci];
                                let wv = wt[((oc * win.k + ky) * win.k + kx) * c + ci];
                                acc += xv * wv;
                            }
                        }
                    }
                    y[((bi * ho + oy) * wo + ox) * o + oc] = acc;
                }
            }
        }
    }
    (y, ho, wo)
}

/// A convolution equals the naive loop for odd image sizes, kernels 1/3/7, strides 1/2/3 and
/// paddings 0/1/3, on both im2col paths.
#[test]
fn conv_equals_naive_convolution() {
    let dev = Cpu::default();
    let cases = [
        (
            2,
            7,
            5,
            3,
            4,
            Window {
                k: 3,
                stride: 1,
                pad: 1,
            },
        ),
        (
            1,
            9,
            6,
            2,
            3,
            Window {
                k: 3,
                stride: 2,
                pad: 1,
            },
        ),
        (
            2,
            11,
            7,
            3,
            5,
            Window {
                k: 7,
                stride: 2,
                pad: 3,
            },
        ),
        (
            1,
            8,
            5,
            4,
            2,
            Window {
                k: 1,
                stride: 2,
                pad: 0,
            },
        ),
        (
            2,
            5,
            5,
            3,
            3,
            Window {
                k: 1,
                stride: 1,
                pad: 0,
            },
        ),
        (
            1,
            10,
            9,
            2,
            2,
            Window {
                k: 3,
                stride: 3,
                pad: 0,
            },
        ),
    ];
    for (i, &(b, h, w, c, o, win)) in cases.iter().enumerate() {
        let x = random(b * h * w * c, i as u64);
        let mut rng = StdRng::seed_from_u64(5);
        let mut init = Init {
            dev: &dev,
            rng: &mut rng,
        };
        let conv: Conv2d<f64, Cpu> = Conv2d::new(&mut init, c, o, win);
        let (want, ho, wo) = naive_conv(&x, (b, h, w, c), &conv.weight.as_vec(), o, win);
        let fm = Fmap {
            x: dev.tensor_from_vec(x.clone(), (b * h * w, c)),
            b,
            h,
            w,
        };
        let y = conv.forward(fm);
        assert_eq!((y.h, y.w), (ho, wo), "case {i}");
        let got = y.x.as_vec();
        assert_eq!(got.len(), want.len());
        for (g, e) in got.iter().zip(&want) {
            assert!((g - e).abs() < 1e-9, "case {i}: {g} vs {e}");
        }
        // The two im2col forms agree.
        let a = im2col(
            Fmap {
                x: dev.tensor_from_vec(x.clone(), (b * h * w, c)),
                b,
                h,
                w,
            },
            win,
        )
        .0;
        let g = im2col_gather(
            Fmap {
                x: dev.tensor_from_vec(x, (b * h * w, c)),
                b,
                h,
                w,
            },
            win,
        )
        .0;
        assert_eq!(a.as_vec(), g.as_vec(), "case {i}");
    }
}

/// The CPU op's backward (a multi-threaded col2im) equals the gather form's scatter-add.
#[test]
fn im2col_gradients_match_the_gather_form() {
    let dev = Cpu::default();
    for (i, win) in [
        Window {
            k: 3,
            stride: 1,
            pad: 1,
        },
        Window {
            k: 3,
            stride: 2,
            pad: 1,
        },
        Window {
            k: 7,
            stride: 2,
            pad: 3,
        },
    ]
    .into_iter()
    .enumerate()
    {
        let (b, h, w, c) = (2, 9, 7, 3);
        let x: Tensor<(usize, usize), f64, Cpu> =
            dev.tensor_from_vec(random(b * h * w * c, 10 + i as u64), (b * h * w, c));
        let rows = b * win.out(h) * win.out(w);
        let weights: Tensor<(usize, usize), f64, Cpu> = dev.tensor_from_vec(
            random(rows * win.k * win.k * c, 20 + i as u64),
            (rows, win.k * win.k * c),
        );
        let grad_of = |gather: bool| {
            let fm = Fmap {
                x: x.leaky_trace(),
                b,
                h,
                w,
            };
            let cols = if gather {
                im2col_gather(fm, win).0
            } else {
                im2col(fm, win).0
            };
            let loss = (cols * weights.clone()).square().sum::<(), _>();
            loss.backward().get(&x).as_vec()
        };
        let (host, gather) = (grad_of(false), grad_of(true));
        for (a, e) in host.iter().zip(&gather) {
            assert!((a - e).abs() < 1e-9, "window {win:?}: {a} vs {e}");
        }
    }
}

/// Max pooling 3×3 stride 2 padding 1 on non-negative input equals the naive maximum; global
/// average pooling equals the mean over positions.
#[test]
fn pooling_equals_naive() {
    let dev = Cpu::default();
    let (b, h, w, c) = (2, 9, 6, 3);
    let x: Vec<f64> = random(b * h * w * c, 3).into_iter().map(f64::abs).collect();
    let win = Window {
        k: 3,
        stride: 2,
        pad: 1,
    };
    let y = max_pool(
        Fmap {
            x: dev.tensor_from_vec(x.clone(), (b * h * w, c)),
            b,
            h,
            w,
        },
        win,
    );
    let (ho, wo) = (win.out(h), win.out(w));
    assert_eq!((y.h, y.w), (ho, wo));
    let got = y.x.as_vec();
    for bi in 0..b {
        for oy in 0..ho {
            for ox in 0..wo {
                for ci in 0..c {
                    let mut m = f64::MIN;
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let iy = (oy * 2 + ky) as isize - 1;
                            let ix = (ox * 2 + kx) as isize - 1;
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                m = m.max(x[((bi * h + iy as usize) * w + ix as usize) * c + ci]);
                            }
                        }
                    }
                    assert_eq!(got[((bi * ho + oy) * wo + ox) * c + ci], m);
                }
            }
        }
    }
    let avg = avg_pool(Fmap {
        x: dev.tensor_from_vec(x.clone(), (b * h * w, c)),
        b,
        h,
        w,
    })
    .as_vec();
    for bi in 0..b {
        for ci in 0..c {
            let mean: f64 = (0..h * w)
                .map(|p| x[(bi * h * w + p) * c + ci])
                .sum::<f64>()
                / (h * w) as f64;
            assert!((avg[bi * c + ci] - mean).abs() < 1e-12);
        }
    }
}

/// Max pooling's gradient goes to each window's maximum (compared with a naive loop).
#[test]
fn max_pool_gradient_goes_to_the_maxima() {
    let dev = Cpu::default();
    let (b, h, w, c) = (2, 7, 6, 3);
    let x: Vec<f64> = random(b * h * w * c, 8).into_iter().map(f64::abs).collect();
    let win = Window {
        k: 3,
        stride: 2,
        pad: 1,
    };
    let (ho, wo) = (win.out(h), win.out(w));
    let up = random(b * ho * wo * c, 9);
    let xt: Tensor<(usize, usize), f64, Cpu> = dev.tensor_from_vec(x.clone(), (b * h * w, c));
    let y = max_pool(
        Fmap {
            x: xt.leaky_trace(),
            b,
            h,
            w,
        },
        win,
    );
    let upt: Tensor<(usize, usize), f64, Cpu> = dev.tensor_from_vec(up.clone(), (b * ho * wo, c));
    let g = (y.x * upt).sum::<(), _>().backward().get(&xt).as_vec();
    let mut want = vec![0.0; x.len()];
    for bi in 0..b {
        for oy in 0..ho {
            for ox in 0..wo {
                for ci in 0..c {
                    let mut best = (f64::MIN, 0);
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let iy = (oy * 2 + ky) as isize - 1;
                            let ix = (ox * 2 + kx) as isize - 1;
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                let at = ((bi * h + iy as usize) * w + ix as usize) * c + ci;
                                if x[at] > best.0 {
                                    best = (x[at], at);
                                }
                            }
                        }
                    }
                    want[best.1] += up[((bi * ho + oy) * wo + ox) * c + ci];
                }
            }
        }
    }
    for (a, e) in g.iter().zip(&want) {
        assert!((a - e).abs() < 1e-12, "{a} vs {e}");
    }
}

/// Values, input gradient and weight gradient of `conv` on `x` by one form: `fused` (the CPU
/// op) or composed (im2col + dfdx's product). The loss also uses `x` directly, so the
/// convolution's input gradient must add to what is there, not overwrite it.
fn conv_and_grads(
    conv: &Conv2d<f64, Cpu>,
    x: &Tensor<(usize, usize), f64, Cpu>,
    (b, h, w): (usize, usize, usize),
    fused: bool,
    input_grad: bool,
) -> (Vec<f64>, Option<Vec<f64>>, Vec<f64>) {
    let dev = Cpu::default();
    let traced = x.leaky_trace();
    let fm = Fmap {
        x: traced.retaped(),
        b,
        h,
        w,
    };
    let y = match (fused, input_grad) {
        (true, grad) => conv.forward_fused(fm, grad),
        (false, true) => conv.forward_composed(fm),
        (false, false) => {
            // The composed form of `forward_input`: the input off the tape.
            let Fmap { x, b, h, w } = fm;
            let (x, _) = x.split_tape();
            conv.forward_composed(Fmap {
                x: x.leaky_traced(),
                b,
                h,
                w,
            })
        }
    };
    let values = y.x.as_vec();
    let up: Tensor<(usize, usize), f64, Cpu> =
        dev.tensor_from_vec(random(values.len(), 77), *y.x.shape());
    let loss = (y.x * up).sum::<(), _>() + traced.square().sum::<(), _>();
    let grads = loss.backward();
    let gx = input_grad.then(|| grads.get(x).as_vec());
    (values, gx, grads.get(&conv.weight).as_vec())
}

/// The fused CPU convolution (`Conv2d::forward_fused`: im2col and gemm in one op, gradients
/// written into dfdx's buffers) equals the composed form — values, the input's gradient and
/// the weight's — for 1×1, 3×3 and 7×7 kernels, strides 1–3 and paddings 0/1/3; without the
/// input gradient (the stem's `forward_input`) the weight's gradient is the same.
#[test]
fn fused_convolution_matches_the_composed_form() {
    let dev = Cpu::default();
    let win = |k, stride, pad| Window { k, stride, pad };
    let cases = [
        (2, 7, 5, 3, 4, win(3, 1, 1)),
        (1, 9, 6, 2, 3, win(3, 2, 1)),
        (2, 11, 7, 3, 5, win(7, 2, 3)),
        (1, 8, 5, 4, 2, win(1, 2, 0)),
        (2, 5, 5, 3, 6, win(1, 1, 0)),
        (1, 10, 9, 2, 2, win(3, 3, 0)),
    ];
    for (i, &(b, h, w, c, o, win)) in cases.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(50 + i as u64);
        let mut init = Init {
            dev: &dev,
            rng: &mut rng,
        };
        let conv: Conv2d<f64, Cpu> = Conv2d::new(&mut init, c, o, win);
        let x: Tensor<(usize, usize), f64, Cpu> =
            dev.tensor_from_vec(random(b * h * w * c, 60 + i as u64), (b * h * w, c));
        for input_grad in [true, false] {
            let (fv, fgx, fgw) = conv_and_grads(&conv, &x, (b, h, w), true, input_grad);
            let (cv, cgx, cgw) = conv_and_grads(&conv, &x, (b, h, w), false, input_grad);
            let close = |a: &[f64], e: &[f64], what: &str| {
                assert_eq!(a.len(), e.len(), "case {i} {what}");
                for (a, e) in a.iter().zip(e) {
                    assert!((a - e).abs() < 1e-9, "case {i} {what}: {a} vs {e}");
                }
            };
            close(&fv, &cv, "values");
            close(&fgw, &cgw, "weight gradient");
            assert!(
                fgw.iter().any(|v| v.abs() > 1e-6),
                "case {i}: no weight gradient"
            );
            if let (Some(f), Some(c)) = (fgx, cgx) {
                close(&f, &c, "input gradient");
            }
        }
    }
}

/// The fused convolution in f32 (gemm's single-precision kernels) equals the f64 naive loop.
#[test]
fn fused_convolution_in_f32_equals_naive() {
    let dev = Cpu::default();
    let (b, h, w, c, o) = (2, 9, 7, 5, 6);
    let win = Window {
        k: 3,
        stride: 2,
        pad: 1,
    };
    let x = random(b * h * w * c, 90);
    let wt = random(o * 9 * c, 91);
    let conv: Conv2d<f32, Cpu> = Conv2d {
        weight: dev.tensor_from_vec(wt.iter().map(|v| *v as f32).collect(), (o, 9 * c)),
        win,
    };
    let y = conv.forward_fused(
        Fmap {
            x: dev.tensor_from_vec(x.iter().map(|v| *v as f32).collect(), (b * h * w, c)),
            b,
            h,
            w,
        },
        true,
    );
    let (want, ho, wo) = naive_conv(&x, (b, h, w, c), &wt, o, win);
    assert_eq!((y.h, y.w), (ho, wo));
    for (g, e) in y.x.as_vec().iter().zip(&want) {
        assert!((*g as f64 - e).abs() < 1e-4, "{g} vs {e}");
    }
}

/// The CPU max-pooling op (`max_pool`, one output row per task) equals the composed form
/// (im2col + dfdx's maximum), values and the input's gradient, on non-negative input with
/// windows over the padding and with exact ties (values on a coarse grid, as flat image
/// regions give): every tied maximum receives the gradient in both.
#[test]
fn host_max_pool_matches_the_composed_form() {
    let dev = Cpu::default();
    for (i, win) in [
        Window {
            k: 3,
            stride: 2,
            pad: 1,
        },
        Window {
            k: 2,
            stride: 2,
            pad: 0,
        },
    ]
    .into_iter()
    .enumerate()
    {
        let (b, h, w, c) = (3, 9, 7, 5);
        let x: Tensor<(usize, usize), f64, Cpu> = dev.tensor_from_vec(
            random(b * h * w * c, 30 + i as u64)
                .into_iter()
                .map(|v| (v.abs() * 4.0).round() / 4.0)
                .collect(),
            (b * h * w, c),
        );
        let run = |host: bool| {
            let fm = Fmap {
                x: x.leaky_trace(),
                b,
                h,
                w,
            };
            let y = if host {
                max_pool(fm, win)
            } else {
                max_pool_composed(fm, win)
            };
            let values = y.x.as_vec();
            let up: Tensor<(usize, usize), f64, Cpu> =
                dev.tensor_from_vec(random(values.len(), 40), *y.x.shape());
            let g = (y.x * up).sum::<(), _>().backward().get(&x).as_vec();
            (values, g)
        };
        let ((hv, hg), (cv, cg)) = (run(true), run(false));
        assert_eq!(hv, cv, "window {win:?}");
        for (a, e) in hg.iter().zip(&cg) {
            assert!((a - e).abs() < 1e-12, "window {win:?}: {a} vs {e}");
        }
        assert!(hg.iter().any(|v| *v != 0.0));
    }
}
