//! The matrix products of the `tiny` tower's training step at batch 64, by gemm (dfdx 0.13's
//! product crate, which the fused convolution calls): one JSON line per shape with the best of
//! five times and the rate. `scripts/tower_flops.py` times the same shapes in PyTorch.
//!
//! `cargo run --release -p plip-model --example gemm_rate [threads]`

use std::time::Instant;

/// (what, m, n, k, lhs transposed): the forward product `cols · Wᵀ`, the input gradient
/// `gy · W` and the weight gradient `gyᵀ · cols` of layer 1's and layer 4's 3×3 convolutions.
const SHAPES: [(&str, usize, usize, usize, bool); 6] = [
    ("layer1 forward", 32768, 48, 432, false),
    ("layer1 input gradient", 32768, 432, 48, false),
    ("layer1 weight gradient", 48, 432, 32768, true),
    ("layer4 forward", 2048, 384, 3456, false),
    ("layer4 input gradient", 2048, 3456, 384, false),
    ("layer4 weight gradient", 384, 3456, 2048, true),
];

fn main() {
    let threads = std::env::args()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: thread pool: {e}");
            std::process::exit(1);
        }
    };
    for (what, m, n, k, transposed) in SHAPES {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0.0f32; m * n];
        let (a_cs, a_rs) = if transposed { (m, 1) } else { (1, k) };
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            pool.install(|| {
                // SAFETY: a holds m·k values, b k·n, c m·n, addressed by these strides.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        a_cs as isize,
                        a_rs as isize,
                        b.as_ptr(),
                        1,
                        n as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    )
                }
            });
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{}",
            serde_json::json!({
                "bench": "gemm", "what": what, "m": m, "n": n, "k": k, "threads": threads,
                "ms": (best * 1e4).round() / 10.0,
                "gflop_per_s": (2.0 * (m * n * k) as f64 / best / 1e8).round() / 10.0,
            })
        );
    }
}
