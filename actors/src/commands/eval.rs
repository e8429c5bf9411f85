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

use crate::base::data::{load, report_skipped, Loaded};
use crate::base::model::{from_state_on, from_weights_on, LoadedModel};
use crate::base::retrieval::{evaluate_model, labels, reid_json, text_ceiling_r1, text_json};
use plip_ingest::baseline;
use plip_ingest::synth::Split;
use plip_model::metrics::market1501;
use plip_model::Preset;
use serde::Deserialize;
use std::path::{Path, PathBuf};

type Error = Box<dyn std::error::Error>;

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
    /// Device that embeds the images and captions: `cpu`, or `cuda` / `cuda:N` in a CUDA build
    /// (checkpoints load on either).
    #[arg(long, default_value = "cpu")]
    pub device: String,
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
        return run_data(args, data);
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

fn split(items: Vec<plip_ingest::datasets::Item>, s: Split) -> Vec<plip_ingest::datasets::Item> {
    items.into_iter().filter(|i| i.split == Some(s)).collect()
}

/// Writes the embeddings `plipd eval --embeddings` asks for (see [`EvalArgs`]).
fn write_embeddings(
    lm: &LoadedModel,
    query: &[Loaded],
    gallery: &[Loaded],
    path: &Path,
) -> Result<(), Error> {
    use std::io::Write;
    let p = lm.model.preset();
    let values = p.attributes();
    let file = std::fs::File::create(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut write = |v: serde_json::Value| -> Result<(), Error> {
        writeln!(out, "{v}").map_err(|e| format!("cannot write {}: {e}", path.display()).into())
    };
    for (split, loaded) in [("query", query), ("gallery", gallery)] {
        let flat = crate::base::data::normalized(loaded, p);
        let e = lm.model.embed_images(&flat, 64);
        let readings = lm.model.image_attributes(&flat, 64);
        for (r, l) in loaded.iter().enumerate() {
            let mut line = serde_json::json!({"kind": "image", "split": split, "row": r,
                "person": l.person, "camera": l.camera, "attributes": l.attributes,
                "embedding": e.row(r)});
            with_attribute_fields(&mut line, readings.as_deref(), r, values, l);
            write(line)?;
        }
    }
    let mut texts = Vec::new();
    let mut owners = Vec::new();
    for (r, l) in query.iter().enumerate() {
        for c in &l.captions {
            texts.push(c.text.clone());
            owners.push((r, l.person.clone()));
        }
    }
    let tokens = lm.tokenizer.encode_batch(&texts, p.text_len)?;
    let e = lm.model.embed_texts(&tokens, 128);
    let readings = lm.model.text_attributes(&tokens, 128);
    for (r, (text, (row, person))) in texts.iter().zip(owners).enumerate() {
        let mut line = serde_json::json!({"kind": "caption", "query_row": row,
            "person": person, "text": text, "embedding": e.row(r)});
        with_attribute_fields(&mut line, readings.as_deref(), r, values, &query[row]);
        write(line)?;
    }
    out.flush()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// Adds to an embeddings line, for a model with the attribute head, the head's per-field
/// probabilities (`attribute_readings`, row `r` of `readings`) and the sample's true attributes
/// as `[start, len, value]` triples of the head's value vocabulary (`attribute_labels`).
fn with_attribute_fields(
    line: &mut serde_json::Value,
    readings: Option<&[f32]>,
    r: usize,
    values: usize,
    sample: &Loaded,
) {
    let Some(row) = readings.and_then(|x| x.get(r * values..(r + 1) * values)) else {
        return;
    };
    line["attribute_readings"] = serde_json::json!(row);
    let labels: Vec<[usize; 3]> = crate::base::data::attribute_labels(sample.attributes.as_ref())
        .iter()
        .map(|a| [a.start, a.len, a.value])
        .collect();
    line["attribute_labels"] = serde_json::json!(labels);
}

/// `plipd eval --data DIR …`.
fn run_data(args: &EvalArgs, data: &Path) -> Result<(), Error> {
    plip_model::runtime::tune_allocator();
    let ds = plip_ingest::datasets::open(data)?;
    report_skipped("record", &ds.skipped);
    let query_items = split(ds.items.clone(), Split::Query);
    let gallery_items = split(ds.items.clone(), Split::Gallery);
    if query_items.is_empty() || gallery_items.is_empty() {
        return Err(format!(
            "{} has no query/gallery split (Market-1501 query/ and bounding_box_test/)",
            data.display()
        )
        .into());
    }
    let pool = plip_model::runtime::thread_pool(args.threads)?;
    std::fs::create_dir_all(&args.report)
        .map_err(|e| format!("cannot create {}: {e}", args.report.display()))?;
    let max_rank = args.max_rank.unwrap_or(50).min(gallery_items.len());
    if let Some(b) = &args.baseline {
        if b != "color-histogram" {
            return Err(format!("unknown baseline {b:?}; known: color-histogram").into());
        }
        let canon = Preset {
            image_height: 256,
            image_width: 128,
            ..Preset::test()
        };
        let (q, bq) = load(&query_items, &canon, &Default::default(), 0);
        let (g, bg) = load(&gallery_items, &canon, &Default::default(), 0);
        report_skipped("image", &[bq, bg].concat());
        let desc = |l: &[Loaded]| -> Vec<Vec<f32>> {
            l.iter()
                .map(|x| {
                    image::RgbImage::from_raw(128, 256, x.rgb.clone())
                        .map(|i| baseline::descriptor(&i))
                        .unwrap_or_default()
                })
                .collect()
        };
        let (qd, gd) = (desc(&q), desc(&g));
        let dist: Vec<f64> = qd
            .iter()
            .flat_map(|a| gd.iter().map(move |b| baseline::cosine_distance(a, b)))
            .collect();
        let (qp, qc) = labels(&q);
        let (gp, gc) = labels(&g);
        let reid = market1501(&dist, &qp, &gp, &qc, &gc, max_rank)?;
        let png = args.report.join("cmc-color-histogram.png");
        crate::base::plots::cmc_curve(&[("colour histogram", &reid.cmc)], &png)?;
        println!(
            "{}",
            serde_json::json!({"method": "color-histogram", "queries": q.len(), "gallery": g.len(), "image": reid_json(&reid), "cmc_png": png})
        );
        return Ok(());
    }
    let spec = plip_model::DeviceSpec::parse(&args.device).map_err(|e| format!("--device: {e}"))?;
    let mut lm = match (&args.state, &args.weights) {
        (Some(s), None) => from_state_on(s, args.version, spec)?,
        (None, Some(w)) => from_weights_on(w, spec)?,
        _ => {
            return Err(
                "give exactly one of --state DIR, --weights FILE or --baseline color-histogram"
                    .into(),
            )
        }
    };
    if let Some(j) = &args.joint_feature {
        lm.model.set_joint(j)?;
    }
    if let Some(w) = args.attribute_weight {
        if !(w >= 0.0 && w.is_finite()) {
            return Err("--attribute-weight must be a number ≥ 0".into());
        }
        lm.model.set_attribute_weight(w);
    }
    if let Some(f) = args.flip_average {
        lm.model.set_flip_average(f);
    }
    let (q, bq) = load(&query_items, lm.model.preset(), &Default::default(), 0);
    let (g, bg) = load(&gallery_items, lm.model.preset(), &Default::default(), 0);
    report_skipped("image", &[bq, bg].concat());
    let calibrated = match args.calibrate_neck {
        Some(n) if n > 0 => {
            let train: Vec<_> = ds
                .items
                .iter()
                .filter(|i| matches!(i.split, None | Some(Split::Train)))
                .collect();
            let picked: Vec<_> = crate::base::data::spread(&train, n)
                .map(|&i| i.clone())
                .collect();
            let (t, bt) = load(&picked, lm.model.preset(), &Default::default(), 0);
            report_skipped("image", &bt);
            let flat = crate::base::data::normalized(&t, lm.model.preset());
            pool.install(|| lm.model.calibrate_neck(&flat, 64))
        }
        _ => 0,
    };
    let (reid, text) = pool.install(|| evaluate_model(&lm, &q, &g, max_rank))?;
    if let Some(path) = &args.embeddings {
        pool.install(|| write_embeddings(&lm, &q, &g, path).map_err(|e| e.to_string()))?;
    }
    let png = args.report.join("cmc.png");
    crate::base::plots::cmc_curve(&[("PLIP image ReID", &reid.cmc)], &png)?;
    let mut text_out = text_json(&text);
    if let Some(ceiling) = text_ceiling_r1(&q, &g) {
        text_out["r1_ceiling"] = serde_json::json!(ceiling);
        text_out["r1_of_ceiling"] = serde_json::json!(text.r1 / ceiling);
    }
    println!(
        "{}",
        serde_json::json!({"method": "plip", "model": lm.source, "joint_feature": lm.model.preset().joint, "flip_average": lm.model.preset().flip_average, "attribute_weight": lm.model.preset().attribute_weight, "neck_calibrated_on": calibrated, "queries": q.len(), "gallery": g.len(),
            "image": reid_json(&reid), "text_to_image": text_out, "cmc_png": png})
    );
    Ok(())
}
