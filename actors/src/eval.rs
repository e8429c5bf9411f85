//! `plipd eval`: retrieval metrics.
//!
//! - `--data DIR --state DIR [--version V]` or `--data DIR --weights FILE`: a trained model on
//!   the data set's query/gallery split — image ReID (Market-1501 protocol: Rank-1/5/10, mAP,
//!   mINP) and text→image retrieval with the query images' captions (R@1/5/10, mAP) — JSON on
//!   stdout and a CMC-curve PNG in `--report`.
//! - `--data DIR --baseline color-histogram`: the same image ReID metrics for the
//!   colour-histogram descriptor, the floor.
//! - `--distmat FILE.json`: a distance matrix in the reference fixture format (`distmat`,
//!   `q_pids`, `g_pids`, `q_camids`, `g_camids`, optional `max_rank`; any `expected` field is
//!   ignored), so the implementation can be checked against other tools.

use plip_model::metrics::market1501;
use serde::Deserialize;
use std::path::PathBuf;

/// Options of `plipd eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// A distance-matrix JSON file (rows = queries, columns = gallery; smaller = closer).
    #[arg(long, value_name = "FILE.json")]
    pub distmat: Option<PathBuf>,
    /// Ranks of the CMC curve to report (overrides the file's `max_rank`; default 50).
    #[arg(long)]
    pub max_rank: Option<usize>,
    /// Data-set folder with query and gallery images.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// State folder whose checkpoint to evaluate.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Checkpoint version (default: the latest valid one).
    #[arg(long)]
    pub version: Option<u64>,
    /// An exported weights file (with its tokenizer inside) instead of a state folder.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Rank by this joint image feature instead of the checkpoint's (`pooled`, `neck` or `both`; the
    /// weights are the same).
    #[arg(long)]
    pub joint_feature: Option<String>,
    /// Embed every image as the mean of itself and its mirror image (`true`), or not
    /// (`false`); default: as the checkpoint says.
    #[arg(long)]
    pub flip_average: Option<bool>,
    /// Weight of attribute agreement in the rankings (models with the attribute head; 0 =
    /// off); default: as the checkpoint says.
    #[arg(long)]
    pub attribute_weight: Option<f64>,
    /// Also write every embedding to this JSON-lines file: one line per query and gallery
    /// image (`kind` "image", `split`, `row` within it, `person`, `camera`, `attributes` when
    /// known, `embedding`) and per query caption (`kind` "caption", `query_row` of its image,
    /// `person`, `text`, `embedding`), for analysis outside plipd. With the attribute head,
    /// each line also holds the head's per-field probabilities (`attribute_readings`) and the
    /// sample's true attributes as `[start, len, value]` triples (`attribute_labels`).
    #[arg(long, value_name = "FILE.jsonl")]
    pub embeddings: Option<PathBuf>,
    /// Re-estimate the BNNeck's running statistics from this many clean training images of
    /// the data set (spread over its training split) before evaluating; 0 = as stored.
    #[arg(long, value_name = "N")]
    pub calibrate_neck: Option<usize>,
    /// Evaluate a baseline instead of a model: `color-histogram`.
    #[arg(long)]
    pub baseline: Option<String>,
    /// Folder for the CMC-curve PNG.
    #[arg(long, default_value = "reports")]
    pub report: PathBuf,
    /// CPU threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Pids and camera ids may be numbers or strings in the file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum Label {
    Int(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
struct DistmatFile {
    distmat: Vec<Vec<f64>>,
    q_pids: Vec<Label>,
    g_pids: Vec<Label>,
    q_camids: Vec<Label>,
    g_camids: Vec<Label>,
    max_rank: Option<usize>,
}

/// Runs `plipd eval` and prints its JSON on stdout.
///
/// # Errors
/// No mode given, an unreadable or malformed file, inconsistent sizes.
pub fn run(args: &EvalArgs) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(data) = &args.data {
        return crate::evaluate::run(args, data);
    }
    let Some(path) = &args.distmat else {
        return Err("nothing to evaluate: give --data DIR with --state, --weights or --baseline, or --distmat FILE.json".into());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let f: DistmatFile = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a distance-matrix file: {e}", path.display()))?;
    let ng = f.g_pids.len();
    if let Some((i, row)) = f.distmat.iter().enumerate().find(|(_, r)| r.len() != ng) {
        return Err(format!(
            "distmat row {i} has {} entries, the gallery has {ng}",
            row.len()
        )
        .into());
    }
    let max_rank = args.max_rank.or(f.max_rank).unwrap_or(50).min(ng.max(1));
    let dist: Vec<f64> = f.distmat.concat();
    let m = market1501(
        &dist,
        &f.q_pids,
        &f.g_pids,
        &f.q_camids,
        &f.g_camids,
        max_rank,
    )?;
    let at = |k: usize| m.cmc.get(k - 1).copied();
    let out = serde_json::json!({
        "protocol": "market1501",
        "queries": f.q_pids.len(),
        "gallery": ng,
        "valid_queries": m.valid_queries,
        "rank1": at(1),
        "rank5": at(5),
        "rank10": at(10),
        "mAP": m.map,
        "mINP": m.minp,
        "cmc": m.cmc,
    });
    println!("{out}");
    Ok(())
}
