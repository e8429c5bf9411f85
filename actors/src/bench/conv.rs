//! `plipd bench conv`: the two im2col forms of the convolution (the CPU custom op and the
//! gather form of other devices) timed on the `tiny` ResNet's layer shapes at one batch,
//! forward and backward, with the matrix product included. One JSON line.

use plip_model::conv::{im2col, im2col_gather, Fmap, Window};
use plip_model::dfdx::prelude::*;
use std::time::Instant;

/// Options of `plipd bench conv`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvBenchArgs {
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// (height, width, channels in, channels out, window) of the `tiny` ResNet's convolutions.
const LAYERS: [(usize, usize, usize, usize, Window); 5] = [
    (
        128,
        64,
        3,
        32,
        Window {
            k: 7,
            stride: 2,
            pad: 3,
        },
    ),
    (
        32,
        16,
        32,
        32,
        Window {
            k: 3,
            stride: 1,
            pad: 1,
        },
    ),
    (
        16,
        8,
        64,
        64,
        Window {
            k: 3,
            stride: 1,
            pad: 1,
        },
    ),
    (
        8,
        4,
        128,
        128,
        Window {
            k: 3,
            stride: 1,
            pad: 1,
        },
    ),
    (
        8,
        4,
        256,
        256,
        Window {
            k: 3,
            stride: 1,
            pad: 1,
        },
    ),
];

fn time_layer(
    dev: &Cpu,
    b: usize,
    (h, w, c, o, win): (usize, usize, usize, usize, Window),
    gather: bool,
) -> f64 {
    let x: Tensor<(usize, usize), f32, Cpu> = dev.sample_normal_like(&(b * h * w, c));
    let weight: Tensor<(usize, usize), f32, Cpu> = dev.sample_normal_like(&(win.k * win.k * c, o));
    let t0 = Instant::now();
    let fm = Fmap {
        x: x.leaky_trace(),
        b,
        h,
        w,
    };
    let (cols, _, _) = if gather {
        im2col_gather(fm, win)
    } else {
        im2col(fm, win)
    };
    let y = cols.matmul(weight.clone());
    let grads = y.square().sum::<(), _>().backward();
    let _ = grads.get(&x);
    t0.elapsed().as_secs_f64() * 1e3
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark.
///
/// # Errors
/// The thread pool cannot be created.
pub fn run(args: &ConvBenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    plip_model::runtime::tune_allocator();
    let pool = plip_model::runtime::thread_pool(args.threads)?;
    let dev = Cpu::default();
    let mut rows = Vec::new();
    let (mut host_total, mut gather_total) = (0.0, 0.0);
    pool.install(|| {
        for layer in LAYERS {
            let mut host: Vec<f64> = (0..args.reps.max(1))
                .map(|_| time_layer(&dev, args.batch, layer, false))
                .collect();
            let mut gather: Vec<f64> = (0..args.reps.max(1))
                .map(|_| time_layer(&dev, args.batch, layer, true))
                .collect();
            let (h, g) = (median(&mut host), median(&mut gather));
            host_total += h;
            gather_total += g;
            let (hh, ww, c, o, win) = layer;
            rows.push(serde_json::json!({
                "input": format!("{hh}x{ww}x{c}"), "out_channels": o, "kernel": win.k, "stride": win.stride,
                "custom_op_ms": (h * 10.0).round() / 10.0, "gather_ms": (g * 10.0).round() / 10.0,
            }));
        }
    });
    println!(
        "{}",
        serde_json::json!({
            "bench": "conv", "batch": args.batch, "threads": pool.current_num_threads(),
            "what": "im2col + matmul, forward and backward",
            "layers": rows,
            "custom_op_total_ms": (host_total * 10.0).round() / 10.0,
            "gather_total_ms": (gather_total * 10.0).round() / 10.0,
            "ratio_gather_to_custom_op": ((gather_total / host_total) * 100.0).round() / 100.0,
        })
    );
    Ok(())
}
