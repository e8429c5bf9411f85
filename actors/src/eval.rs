//! `plipd eval`: retrieval metrics. `--distmat FILE.json` evaluates a distance matrix in the
//! reference fixture format (`distmat`, `q_pids`, `g_pids`, `q_camids`, `g_camids`, optional
//! `max_rank`; any `expected` field is ignored) with the Market-1501 protocol, so the
//! implementation can be checked against other tools.

use plip_model::metrics::market1501;
use serde::Deserialize;
use std::path::PathBuf;

/// Options of `plipd eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// A distance-matrix JSON file (rows = queries, columns = gallery; smaller = closer).
    #[arg(long, value_name = "FILE.json")]
    pub distmat: Option<PathBuf>,
    /// Ranks of the CMC curve to report (overrides the file's `max_rank`).
    #[arg(long)]
    pub max_rank: Option<usize>,
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
    let Some(path) = &args.distmat else {
        return Err("nothing to evaluate: give --distmat FILE.json".into());
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
