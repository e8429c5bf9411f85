//! The ReID index: exact cosine top-k over L2-normalised embeddings.
//!
//! The gallery is one row-major `(n, d)` matrix; a batch of queries `(q, d)` is scored against
//! it block by block (`block` gallery rows at a time, every query of the batch against the
//! block while it is in cache), keeping a bounded min-heap of the best `k` per query. A query
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
}

impl Index {
    /// An empty index of `dim`-wide embeddings.
    pub fn new(dim: usize) -> Self {
        Index {
            dim,
            data: Vec::new(),
            cameras: Vec::new(),
        }
    }

    /// Appends one row (normalised here; a zero vector stays zero and scores 0).
    pub fn push(&mut self, embedding: &[f32], camera: Option<u32>) {
        assert_eq!(embedding.len(), self.dim, "embedding width");
        self.data.extend(normalized(embedding));
        self.cameras.push(camera);
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
    /// query, a camera whose rows are left out.
    pub fn search(&self, queries: &[f32], exclude: &[Option<u32>], k: usize) -> Vec<Vec<Hit>> {
        const BLOCK: usize = 512;
        let d = self.dim;
        let q = queries.len() / d.max(1);
        assert_eq!(exclude.len(), q, "one exclusion per query");
        let qs: Vec<Vec<f32>> = (0..q)
            .map(|i| normalized(&queries[i * d..(i + 1) * d]))
            .collect();
        let mut heaps: Vec<BinaryHeap<Worst>> =
            (0..q).map(|_| BinaryHeap::with_capacity(k + 1)).collect();
        if k == 0 {
            return vec![Vec::new(); q];
        }
        let n = self.len();
        let mut start = 0;
        while start < n {
            let end = (start + BLOCK).min(n);
            for (qi, qv) in qs.iter().enumerate() {
                let heap = &mut heaps[qi];
                for row in start..end {
                    if exclude[qi].is_some() && self.cameras[row] == exclude[qi] {
                        continue;
                    }
                    let score = dot(qv, self.row(row));
                    let hit = Worst(Hit { row, score });
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
            }
            start = end;
        }
        heaps
            .into_iter()
            .map(|h| {
                let mut v: Vec<Hit> = h.into_iter().map(|w| w.0).collect();
                v.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row)));
                v
            })
            .collect()
    }
}

/// `v / |v|` (a zero vector stays zero).
pub fn normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
    v.iter().map(|x| x * inv).collect()
}

/// Dot product with eight accumulators (the compiler vectorises it).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for j in 0..8 {
            acc[j] += a[c * 8 + j] * b[c * 8 + j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
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
                assert_eq!(got[qi], all, "query {qi}, k {k}");
                assert!(got[qi]
                    .iter()
                    .all(|h| Some(h.row as u32 % 6) != exclude[qi]));
            }
        }
    }
}
