//! The ReID index: exact cosine top-k over L2-normalised embeddings.
//!
//! The gallery is one row-major `(n, d)` matrix; every query is scored against every row with
//! a vectorised dot product, keeping a bounded heap of the best `k` (queries of a batch in
//! parallel; a single query's gallery split among the threads). A query
//! may exclude one camera: gallery rows of that camera never enter its ranking. Ties are broken
//! by gallery position, so the ranking is deterministic and equal to a full sort.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One ranked match: gallery row and cosine similarity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub row: usize,
    pub score: f32,
}

/// Heap entry ordered so that the heap's top is the *worst* kept hit.
#[derive(Clone, Copy)]
struct Worst(Hit);

impl PartialEq for Worst {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Worst {
    fn cmp(&self, o: &Self) -> Ordering {
        // Lower score is worse; for equal scores the later row is worse.
        o.0.score
            .total_cmp(&self.0.score)
            .then(self.0.row.cmp(&o.0.row))
    }
}

/// Embeddings of the gallery, with the camera of each row.
#[derive(Debug, Clone, Default)]
pub struct Index {
    dim: usize,
    data: Vec<f32>,
    cameras: Vec<Option<u32>>,
    /// The gallery as matrix blocks for batched queries (built at the first batch).
    blocks: std::sync::OnceLock<Vec<(usize, Block)>>,
}

type Block = plip_model::dfdx::prelude::Tensor<(usize, usize), f32, plip_model::dfdx::prelude::Cpu>;

/// Gallery rows per matrix block of the batched search.
const BLOCK_ROWS: usize = 8192;

impl Index {
    /// An empty index of `dim`-wide embeddings.
    pub fn new(dim: usize) -> Self {
        Index {
            dim,
            data: Vec::new(),
            cameras: Vec::new(),
            blocks: std::sync::OnceLock::new(),
        }
    }

    /// Appends one row (normalised here; a zero vector stays zero and scores 0).
    pub fn push(&mut self, embedding: &[f32], camera: Option<u32>) {
        assert_eq!(embedding.len(), self.dim, "embedding width");
        self.data.extend(normalized(embedding));
        self.cameras.push(camera);
        self.blocks = std::sync::OnceLock::new();
    }

    /// Rows.
    pub fn len(&self) -> usize {
        self.cameras.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.cameras.is_empty()
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Row `i` (normalised).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Top `k` per query. `queries`: row-major `(q, dim)` (normalised here); `exclude`: per
    /// query, a camera whose rows are left out. Several queries are spread over the CPU
    /// threads; a single query splits the gallery among them.
    pub fn search(&self, queries: &[f32], exclude: &[Option<u32>], k: usize) -> Vec<Vec<Hit>> {
        use rayon::prelude::*;
        let d = self.dim;
        let q = queries.len() / d.max(1);
        assert_eq!(exclude.len(), q, "one exclusion per query");
        if k == 0 {
            return vec![Vec::new(); q];
        }
        let qs: Vec<Vec<f32>> = (0..q)
            .map(|i| normalized(&queries[i * d..(i + 1) * d]))
            .collect();
        let n = self.len();
        if q == 1 {
            // One query: gallery chunks in parallel, heaps merged.
            let chunk = n.div_ceil(rayon::current_num_threads().max(1)).max(4096);
            let parts: Vec<BinaryHeap<Worst>> = (0..n.div_ceil(chunk))
                .into_par_iter()
                .map(|c| self.scan(&qs[0], exclude[0], k, c * chunk, ((c + 1) * chunk).min(n)))
                .collect();
            let mut heap = BinaryHeap::with_capacity(k + 1);
            for h in parts {
                for w in h {
                    keep(&mut heap, w, k);
                }
            }
            return vec![sorted(heap)];
        }
        self.search_batched(&qs, exclude, k)
    }

    /// Several queries: scores by matrix products (gemm, all threads) block by block, then a
    /// bounded heap per query.
    fn search_batched(&self, qs: &[Vec<f32>], exclude: &[Option<u32>], k: usize) -> Vec<Vec<Hit>> {
        use plip_model::dfdx::prelude::*;
        let (q, d) = (qs.len(), self.dim);
        let dev = Cpu::default();
        let blocks = self.blocks.get_or_init(|| {
            self.data
                .chunks(BLOCK_ROWS * d.max(1))
                .enumerate()
                .map(|(b, rows)| {
                    (
                        b * BLOCK_ROWS,
                        dev.tensor_from_vec(rows.to_vec(), (rows.len() / d, d)),
                    )
                })
                .collect()
        });
        let qt = dev.tensor_from_vec(qs.concat(), (q, d));
        let mut heaps: Vec<BinaryHeap<Worst>> =
            (0..q).map(|_| BinaryHeap::with_capacity(k + 1)).collect();
        for (start, block) in blocks {
            let rows = block.shape().0;
            let scores = qt
                .clone()
                .matmul(block.clone().permute::<(usize, usize), Axes2<1, 0>>())
                .as_vec();
            for (qi, heap) in heaps.iter_mut().enumerate() {
                for r in 0..rows {
                    let row = start + r;
                    if exclude[qi].is_some() && self.cameras[row] == exclude[qi] {
                        continue;
                    }
                    keep(
                        heap,
                        Worst(Hit {
                            row,
                            score: scores[qi * rows + r],
                        }),
                        k,
                    );
                }
            }
        }
        heaps.into_iter().map(sorted).collect()
    }

    /// The best `k` of rows `start..end` for one normalised query.
    fn scan(
        &self,
        qv: &[f32],
        exclude: Option<u32>,
        k: usize,
        start: usize,
        end: usize,
    ) -> BinaryHeap<Worst> {
        let mut heap = BinaryHeap::with_capacity(k + 1);
        for row in start..end {
            if exclude.is_some() && self.cameras[row] == exclude {
                continue;
            }
            let score = dot(qv, self.row(row));
            keep(&mut heap, Worst(Hit { row, score }), k);
        }
        heap
    }
}

/// Keeps `hit` if it is among the best `k`.
fn keep(heap: &mut BinaryHeap<Worst>, hit: Worst, k: usize) {
    if heap.len() < k {
        heap.push(hit);
    } else if let Some(top) = heap.peek() {
        // `Less` = better than the worst hit kept so far.
        if hit.cmp(top) == Ordering::Less {
            heap.pop();
            heap.push(hit);
        }
    }
}

/// Best first; equal scores by gallery position.
fn sorted(heap: BinaryHeap<Worst>) -> Vec<Hit> {
    let mut v: Vec<Hit> = heap.into_iter().map(|w| w.0).collect();
    v.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row)));
    v
}

/// `v / |v|` (a zero vector stays zero).
pub fn normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
    v.iter().map(|x| x * inv).collect()
}

/// Dot product over 16-wide chunks (vectorised by the compiler).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        let (x, y): (&[f32; 16], &[f32; 16]) = match (x.try_into(), y.try_into()) {
            (Ok(x), Ok(y)) => (x, y),
            _ => continue,
        };
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The blocked heap search equals a full sort of every score, with camera exclusion.
    #[test]
    fn equals_brute_force() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let d = 24;
        let mut idx = Index::new(d);
        let mut rows = Vec::new();
        for i in 0..1500 {
            let v: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            // Duplicates exercise the tie-break.
            let v = if i % 97 == 0 {
                rows.last().cloned().unwrap_or(v)
            } else {
                v
            };
            idx.push(&v, Some(i as u32 % 6));
            rows.push(v);
        }
        let q = 7;
        let queries: Vec<f32> = (0..q * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let exclude: Vec<Option<u32>> = (0..q)
            .map(|i| (i % 2 == 0).then_some(i as u32 % 6))
            .collect();
        for k in [1, 10, 100] {
            let got = idx.search(&queries, &exclude, k);
            for qi in 0..q {
                let mut all: Vec<Hit> = (0..idx.len())
                    .filter(|&r| exclude[qi].is_none() || Some(r as u32 % 6) != exclude[qi])
                    .map(|r| Hit {
                        row: r,
                        score: dot(&normalized(&queries[qi * d..(qi + 1) * d]), idx.row(r)),
                    })
                    .collect();
                all.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row)));
                all.truncate(k);
                // The batched path scores by gemm: equal rows, scores equal to rounding.
                let rows = |v: &[Hit]| v.iter().map(|h| h.row).collect::<Vec<_>>();
                assert_eq!(rows(&got[qi]), rows(&all), "query {qi}, k {k}");
                for (g, w) in got[qi].iter().zip(&all) {
                    assert!((g.score - w.score).abs() < 1e-5, "{g:?} vs {w:?}");
                }
                assert!(got[qi]
                    .iter()
                    .all(|h| Some(h.row as u32 % 6) != exclude[qi]));
            }
        }
    }

    /// A single query over a gallery large enough to be split among threads.
    #[test]
    fn single_query_split_equals_brute_force() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let d = 16;
        let mut idx = Index::new(d);
        for i in 0..20_000 {
            let v: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            idx.push(&v, Some(i % 3));
        }
        let q: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let qn = normalized(&q);
        for ex in [None, Some(1)] {
            let got = idx.search(&q, &[ex], 50);
            let mut all: Vec<Hit> = (0..idx.len())
                .filter(|&r| ex.is_none() || Some(r as u32 % 3) != ex)
                .map(|r| Hit {
                    row: r,
                    score: dot(&qn, idx.row(r)),
                })
                .collect();
            all.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row)));
            all.truncate(50);
            assert_eq!(got[0], all);
        }
    }
}
