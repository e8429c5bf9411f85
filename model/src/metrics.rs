//! Retrieval metrics as pure functions: the Market-1501 image ReID protocol (CMC, mAP, mINP) and
//! text→image retrieval (R@1/5/10, mAP).
//!
//! Market-1501 protocol (as torchreid's and fast-reid's `eval_market1501`): rank the gallery by
//! ascending distance; per query remove the gallery entries with the query's person id **and**
//! camera; skip a query left with no true match; CMC = cumulative matches clipped to 1, cut at
//! `max_rank`; AP = mean over the true matches of precision at their ranks; mINP = (number of true
//! matches) / (rank of the last one); everything averaged over the valid queries only.
//!
//! Text→image (CUHK-PEDES style): every caption queries all gallery images, no camera
//! filtering; a caption whose identity has no image in the gallery is skipped.

use serde::{Deserialize, Serialize};

/// Image ReID results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReidMetrics {
    /// CMC at ranks 1..=max_rank.
    pub cmc: Vec<f64>,
    #[serde(rename = "mAP")]
    pub map: f64,
    #[serde(rename = "mINP")]
    pub minp: f64,
    /// Queries that had at least one true match left after filtering.
    pub valid_queries: usize,
}

/// Text→image retrieval results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalMetrics {
    pub r1: f64,
    pub r5: f64,
    pub r10: f64,
    #[serde(rename = "mAP")]
    pub map: f64,
    /// Captions whose identity has at least one gallery image.
    pub valid_queries: usize,
}

/// Per-query statistics of a ranked list of match flags.
struct Ranked {
    cmc: Vec<f64>,
    ap: f64,
    inp: f64,
}

fn rank_stats(matches: &[bool], max_rank: usize) -> Option<Ranked> {
    let num_rel = matches.iter().filter(|&&m| m).count();
    if num_rel == 0 {
        return None;
    }
    let mut cum = 0usize;
    let mut precision_sum = 0.0;
    let mut last = 0usize;
    let mut cmc = Vec::with_capacity(max_rank);
    for (i, &m) in matches.iter().enumerate() {
        if m {
            cum += 1;
            precision_sum += cum as f64 / (i + 1) as f64;
            last = i;
        }
        if i < max_rank {
            cmc.push(if cum > 0 { 1.0 } else { 0.0 });
        }
    }
    // A gallery shorter than max_rank: the curve stays at its last value.
    while cmc.len() < max_rank {
        cmc.push(*cmc.last().unwrap_or(&0.0));
    }
    Some(Ranked {
        cmc,
        ap: precision_sum / num_rel as f64,
        inp: num_rel as f64 / (last + 1) as f64,
    })
}

/// Indices of `row` sorted by ascending value (ties keep gallery order).
fn argsort(row: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[a].total_cmp(&row[b]));
    idx
}

/// The Market-1501 protocol on a `(queries × gallery)` distance matrix (row-major; smaller is
/// closer).
///
/// # Errors
/// Mismatched lengths, or no query with a true match left.
pub fn market1501<P: PartialEq, C: PartialEq>(
    distmat: &[f64],
    q_pids: &[P],
    g_pids: &[P],
    q_cams: &[C],
    g_cams: &[C],
    max_rank: usize,
) -> crate::Result<ReidMetrics> {
    let (nq, ng) = (q_pids.len(), g_pids.len());
    if distmat.len() != nq * ng || q_cams.len() != nq || g_cams.len() != ng || max_rank == 0 {
        return Err(crate::Error::Shape(format!(
            "distance matrix of {} values for {nq} queries × {ng} gallery entries ({} query cameras, {} gallery cameras, max_rank {max_rank})",
            distmat.len(),
            q_cams.len(),
            g_cams.len()
        )));
    }
    let mut cmc = vec![0.0; max_rank];
    let (mut ap, mut inp, mut valid) = (0.0, 0.0, 0usize);
    for q in 0..nq {
        let order = argsort(&distmat[q * ng..(q + 1) * ng]);
        let matches: Vec<bool> = order
            .iter()
            .filter(|&&g| !(g_pids[g] == q_pids[q] && g_cams[g] == q_cams[q]))
            .map(|&g| g_pids[g] == q_pids[q])
            .collect();
        if let Some(r) = rank_stats(&matches, max_rank) {
            valid += 1;
            ap += r.ap;
            inp += r.inp;
            for (c, v) in cmc.iter_mut().zip(r.cmc) {
                *c += v;
            }
        }
    }
    if valid == 0 {
        return Err(crate::Error::Shape(
            "no query has a true match in the gallery".into(),
        ));
    }
    let n = valid as f64;
    Ok(ReidMetrics {
        cmc: cmc.iter().map(|c| c / n).collect(),
        map: ap / n,
        minp: inp / n,
        valid_queries: valid,
    })
}

/// Text→image retrieval on a `(captions × images)` **similarity** matrix (larger is closer).
///
/// # Errors
/// Mismatched lengths, or no caption whose identity is in the gallery.
pub fn text_to_image<P: PartialEq>(
    similarity: &[f64],
    q_pids: &[P],
    g_pids: &[P],
) -> crate::Result<RetrievalMetrics> {
    let (nq, ng) = (q_pids.len(), g_pids.len());
    if similarity.len() != nq * ng {
        return Err(crate::Error::Shape(format!(
            "similarity matrix of {} values for {nq} captions × {ng} images",
            similarity.len()
        )));
    }
    let (mut r, mut ap, mut valid) = ([0.0; 3], 0.0, 0usize);
    for q in 0..nq {
        let neg: Vec<f64> = similarity[q * ng..(q + 1) * ng]
            .iter()
            .map(|s| -s)
            .collect();
        let matches: Vec<bool> = argsort(&neg)
            .iter()
            .map(|&g| g_pids[g] == q_pids[q])
            .collect();
        if let Some(s) = rank_stats(&matches, 10) {
            valid += 1;
            ap += s.ap;
            r[0] += s.cmc[0];
            r[1] += s.cmc[4];
            r[2] += s.cmc[9];
        }
    }
    if valid == 0 {
        return Err(crate::Error::Shape(
            "no caption's identity has an image in the gallery".into(),
        ));
    }
    let n = valid as f64;
    Ok(RetrievalMetrics {
        r1: r[0] / n,
        r5: r[1] / n,
        r10: r[2] / n,
        map: ap / n,
        valid_queries: valid,
    })
}

/// Cosine similarity matrix of two sets of L2-normalised rows: `(a.rows × b.rows)`.
pub fn cosine_matrix(a: &crate::Embeddings, b: &crate::Embeddings) -> Vec<f64> {
    let mut out = Vec::with_capacity(a.rows * b.rows);
    for i in 0..a.rows {
        let x = a.row(i);
        for j in 0..b.rows {
            out.push(x.iter().zip(b.row(j)).map(|(p, q)| (p * q) as f64).sum());
        }
    }
    out
}
