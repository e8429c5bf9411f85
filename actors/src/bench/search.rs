//! `plipd bench search`: top-k queries per second of the exact cosine index, single and
//! batched, on random unit vectors; `--dump FILE` writes the same vectors for a peer (FAISS
//! `IndexFlatIP`, `scripts/bench-search.sh`) to measure on this machine in the same run.

use crate::base::index::{normalized, Index};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct SearchBenchArgs {
    /// Gallery size.
    #[arg(long, default_value_t = 10_000)]
    pub gallery: usize,
    /// Embedding width (the `tiny` preset's is 256).
    #[arg(long, default_value_t = 256)]
    pub dim: usize,
    /// Queries timed.
    #[arg(long, default_value_t = 500)]
    pub queries: usize,
    /// Queries per batch in the batched measurement.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Matches per query.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Write the vectors (u64 n, q, d; then n·d and q·d little-endian f32) to this file.
    #[arg(long)]
    pub dump: Option<PathBuf>,
}

/// Runs `plipd bench search`.
pub fn run(args: &SearchBenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let mut vec = |n: usize| -> Vec<f32> {
        (0..n)
            .flat_map(|_| {
                let v: Vec<f32> = (0..args.dim).map(|_| rng.sample(StandardNormal)).collect();
                normalized(&v)
            })
            .collect()
    };
    let gallery = vec(args.gallery);
    let queries = vec(args.queries);
    if let Some(p) = &args.dump {
        let mut f = std::io::BufWriter::new(std::fs::File::create(p)?);
        for x in [args.gallery, args.queries, args.dim] {
            f.write_all(&(x as u64).to_le_bytes())?;
        }
        for x in gallery.iter().chain(&queries) {
            f.write_all(&x.to_le_bytes())?;
        }
        f.flush()?;
    }
    let mut index = Index::new(args.dim);
    for r in gallery.chunks(args.dim) {
        index.push(r, None);
    }
    let d = args.dim;
    // Warm-up, then single queries.
    let _ = index.search(&queries[..d], &[None], args.k);
    let t = Instant::now();
    let mut checksum = 0.0f64;
    for q in queries.chunks(d) {
        checksum += f64::from(index.search(q, &[None], args.k)[0][0].score);
    }
    let single = args.queries as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for qs in queries.chunks(d * args.batch.max(1)) {
        let n = qs.len() / d;
        let hits = index.search(qs, &vec![None; n], args.k);
        checksum += f64::from(hits[0][0].score);
    }
    let batched = args.queries as f64 / t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bench": "search", "gallery": args.gallery, "dim": args.dim, "k": args.k,
            "queries": args.queries, "batch": args.batch, "threads": rayon::current_num_threads(),
            "single_qps": single, "batched_qps": batched, "checksum": checksum,
        })
    );
    Ok(())
}
