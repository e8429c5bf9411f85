//! Evaluation of a model (or the colour-histogram baseline) on a data set's query/gallery split;
//! see [`crate::eval`] for the command line.

use crate::data::{load, report_skipped, Loaded};
use crate::eval::EvalArgs;
use crate::state::State;
use plip_ingest::baseline;
use plip_ingest::synth::Split;
use plip_model::metrics::{
    cosine_matrix, market1501, text_to_image, ReidMetrics, RetrievalMetrics,
};
use plip_model::weights::read_meta;
use plip_model::{DeviceSpec, Encoder, Preset, Tokenizer};
use std::path::Path;

type Error = Box<dyn std::error::Error>;

/// A model ready to embed, with where it came from.
pub struct LoadedModel {
    /// The encoder, on the CPU unless a caller chose a device.
    pub model: Encoder,
    pub tokenizer: Tokenizer,
    pub source: serde_json::Value,
    /// The checkpoint's metadata, when it came from a state folder.
    pub checkpoint: Option<crate::state::CheckpointMeta>,
}

/// Loads a checkpoint from a state folder (`version` or the latest valid one).
pub fn from_state(dir: &Path, version: Option<u64>) -> Result<LoadedModel, Error> {
    let state = State::open(dir)?;
    from_open_state(&state, version)
}

/// As [`from_state`], on a state folder already open (the daemon's).
pub fn from_open_state(state: &State, version: Option<u64>) -> Result<LoadedModel, Error> {
    let dir = state.path();
    let tokenizer = state
        .tokenizer()?
        .ok_or("the state folder has no tokenizer (train first)")?;
    let ck = match version {
        Some(v) => state.checkpoint(v)?,
        None => state
            .latest_valid(|e| eprintln!("plipd: {e}; skipped"))?
            .ok_or("the state folder has no valid checkpoint")?,
    };
    // The blob carries the full dimensions (a preset may have been trained with overrides).
    let preset = read_meta(&ck.weights)?.preset;
    let mut model = Encoder::new(DeviceSpec::Cpu, &preset, 0)?;
    model.load_weights(&ck.weights, tokenizer.fingerprint())?;
    let source = serde_json::json!({"state": dir, "version": ck.meta.version, "step": ck.meta.step, "images_seen": ck.meta.images_seen, "preset": preset.name});
    Ok(LoadedModel {
        model,
        tokenizer,
        source,
        checkpoint: Some(ck.meta),
    })
}

/// Loads an exported weights file (its tokenizer travels in the metadata).
pub fn from_weights(path: &Path) -> Result<LoadedModel, Error> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let meta = read_meta(&bytes)?;
    let tk_json = meta
        .extra
        .get("tokenizer_json")
        .ok_or("the weights file carries no tokenizer (export it with plipd export)")?;
    let tokenizer = Tokenizer::from_bytes(tk_json.as_bytes())?;
    let mut model = Encoder::new(DeviceSpec::Cpu, &meta.preset, 0)?;
    model.load_weights(&bytes, tokenizer.fingerprint())?;
    let source =
        serde_json::json!({"weights": path, "step": meta.step, "preset": meta.preset.name});
    Ok(LoadedModel {
        model,
        tokenizer,
        source,
        checkpoint: None,
    })
}

fn split(items: Vec<plip_ingest::datasets::Item>, s: Split) -> Vec<plip_ingest::datasets::Item> {
    items.into_iter().filter(|i| i.split == Some(s)).collect()
}

fn labels(l: &[Loaded]) -> (Vec<String>, Vec<String>) {
    (
        l.iter()
            .map(|x| x.person.clone().unwrap_or_default())
            .collect(),
        l.iter()
            .map(|x| x.camera.clone().unwrap_or_default())
            .collect(),
    )
}

fn reid_json(m: &ReidMetrics) -> serde_json::Value {
    serde_json::json!({"rank1": m.cmc[0], "rank5": m.cmc.get(4), "rank10": m.cmc.get(9), "mAP": m.map, "mINP": m.minp, "valid_queries": m.valid_queries})
}

fn text_json(m: &RetrievalMetrics) -> serde_json::Value {
    serde_json::json!({"r1": m.r1, "r5": m.r5, "r10": m.r10, "mAP": m.map, "valid_queries": m.valid_queries})
}

/// Image ReID and text→image metrics of `lm` on the query/gallery images.
pub fn evaluate_model(
    lm: &LoadedModel,
    query: &[Loaded],
    gallery: &[Loaded],
    max_rank: usize,
) -> plip_model::Result<(ReidMetrics, RetrievalMetrics)> {
    let (reid, text, _) = evaluate_with_attributes(lm, query, gallery, max_rank, &[])?;
    Ok((reid, text))
}

/// Text→image R@1 for each attribute-agreement weight: `(λ, R@1)` pairs.
pub type AttributeSweep = Vec<(f64, f64)>;

/// As [`evaluate_model`], with text→image R@1 for each attribute-agreement weight λ in
/// `weights` from the same embeddings: score = cos(caption, image) + λ · (1/F) Σ_fields Σ_v
/// p_caption(v) · p_image(v), the expected fraction of the F attribute fields on which the
/// caption's and the image's readings agree (λ = ∞: agreement alone). The sweep is `None`
/// without the attribute head or without weights.
pub fn evaluate_with_attributes(
    lm: &LoadedModel,
    query: &[Loaded],
    gallery: &[Loaded],
    max_rank: usize,
    weights: &[f64],
) -> plip_model::Result<(ReidMetrics, RetrievalMetrics, Option<AttributeSweep>)> {
    let p = &lm.model.preset();
    let norm = |l: &[Loaded]| crate::data::normalized(l, p);
    let gallery_images = norm(gallery);
    let qe = lm.model.embed_images(&norm(query), 64);
    let ge = lm.model.embed_images(&gallery_images, 64);
    let dist: Vec<f64> = cosine_matrix(&qe, &ge)
        .into_iter()
        .map(|s| 1.0 - s)
        .collect();
    let (qp, qc) = labels(query);
    let (gp, gc) = labels(gallery);
    let reid = market1501(&dist, &qp, &gp, &qc, &gc, max_rank)?;
    let mut texts = Vec::new();
    let mut tp = Vec::new();
    for q in query {
        for c in &q.captions {
            texts.push(c.text.clone());
            tp.push(q.person.clone().unwrap_or_default());
        }
    }
    let tokens = lm.tokenizer.encode_batch(&texts, p.text_len)?;
    let te = lm.model.embed_texts(&tokens, 128);
    let cos = cosine_matrix(&te, &ge);
    let text = text_to_image(&cos, &tp, &gp)?;
    if weights.is_empty() {
        return Ok((reid, text, None));
    }
    let (Some(ga), Some(ta)) = (
        lm.model.image_attributes(&gallery_images, 64),
        lm.model.text_attributes(&tokens, 128),
    ) else {
        return Ok((reid, text, None));
    };
    let (fields, values) = (p.attribute_fields.len() as f64, p.attributes());
    let agree: Vec<f64> = ta
        .chunks(values)
        .flat_map(|t| {
            ga.chunks(values)
                .map(move |g| t.iter().zip(g).map(|(a, b)| (a * b) as f64).sum::<f64>() / fields)
        })
        .collect();
    let mut sweep = Vec::new();
    for &w in weights {
        let score: Vec<f64> = if w.is_infinite() {
            agree.clone()
        } else {
            cos.iter().zip(&agree).map(|(c, a)| c + w * a).collect()
        };
        sweep.push((w, text_to_image(&score, &tp, &gp)?.r1));
    }
    Ok((reid, text, Some(sweep)))
}

/// Writes the embeddings `plipd eval --embeddings` asks for (see [`crate::eval::EvalArgs`]).
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
        let flat = crate::data::normalized(loaded, p);
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
    let labels: Vec<[usize; 3]> = crate::data::attribute_labels(sample.attributes.as_ref())
        .iter()
        .map(|a| [a.start, a.len, a.value])
        .collect();
    line["attribute_labels"] = serde_json::json!(labels);
}

/// Normalised phrase text: lower case, single spaces, without a leading article.
fn phrase_key(text: &str) -> String {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    let words = match words.first() {
        Some(&("a" | "an" | "the")) => &words[1..],
        _ => &words[..],
    };
    words.join(" ")
}

/// The text→image R@1 that the captions themselves allow: each query caption ranks the gallery
/// by how many of its attribute phrases each image's true attributes also produce (phrases of
/// captions synthesised from the image's attributes in every style, over 16 seeds), and scores
/// the expected R@1 of that ranking with ties broken uniformly at random (true matches among
/// the top-scored images ÷ top-scored images). The synthetic captions name attributes that many
/// people share, so even a perfect model of the captions cannot exceed this. `None` when the
/// gallery has no attributes.
pub fn text_ceiling_r1(query: &[Loaded], gallery: &[Loaded]) -> Option<f64> {
    use std::collections::{HashMap, HashSet};
    let mut by_attrs: HashMap<String, HashSet<String>> = HashMap::new();
    let mut phrase_sets = Vec::with_capacity(gallery.len());
    for g in gallery {
        let a = g.attributes?;
        let key = serde_json::to_string(&a).unwrap_or_default();
        let set = by_attrs.entry(key).or_insert_with(|| {
            let mut set = HashSet::new();
            for seed in 0..16 {
                let cs = plip_ingest::captions::synthesize(&a, seed);
                for c in cs.captions.iter().chain(std::iter::once(&cs.prompt)) {
                    for i in 0..c.phrases.len() {
                        set.insert(phrase_key(&c.phrase_text(i)));
                    }
                }
            }
            set
        });
        phrase_sets.push(set.clone());
    }
    let mut total = 0.0;
    let mut count = 0usize;
    for q in query {
        let Some(person) = &q.person else { continue };
        for c in &q.captions {
            let phrases: Vec<String> = (0..c.phrases.len())
                .map(|i| phrase_key(&c.phrase_text(i)))
                .collect();
            let scores: Vec<usize> = phrase_sets
                .iter()
                .map(|set| phrases.iter().filter(|p| set.contains(*p)).count())
                .collect();
            let best = scores.iter().copied().max().unwrap_or(0);
            let top: Vec<usize> = (0..gallery.len()).filter(|&g| scores[g] == best).collect();
            let hits = top
                .iter()
                .filter(|&&g| gallery[g].person.as_ref() == Some(person))
                .count();
            if gallery.iter().any(|g| g.person.as_ref() == Some(person)) {
                total += hits as f64 / top.len().max(1) as f64;
                count += 1;
            }
        }
    }
    (count > 0).then(|| total / count as f64)
}

/// `plipd eval --data DIR …`.
pub fn run(args: &EvalArgs, data: &Path) -> Result<(), Error> {
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
        crate::plots::cmc_curve(&[("colour histogram", &reid.cmc)], &png)?;
        println!(
            "{}",
            serde_json::json!({"method": "color-histogram", "queries": q.len(), "gallery": g.len(), "image": reid_json(&reid), "cmc_png": png})
        );
        return Ok(());
    }
    let mut lm = match (&args.state, &args.weights) {
        (Some(s), None) => from_state(s, args.version)?,
        (None, Some(w)) => from_weights(w)?,
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
            let picked: Vec<_> = crate::data::spread(&train, n).map(|&i| i.clone()).collect();
            let (t, bt) = load(&picked, lm.model.preset(), &Default::default(), 0);
            report_skipped("image", &bt);
            let flat = crate::data::normalized(&t, lm.model.preset());
            pool.install(|| lm.model.calibrate_neck(&flat, 64))
        }
        _ => 0,
    };
    let (reid, text) = pool.install(|| evaluate_model(&lm, &q, &g, max_rank))?;
    if let Some(path) = &args.embeddings {
        pool.install(|| write_embeddings(&lm, &q, &g, path).map_err(|e| e.to_string()))?;
    }
    let png = args.report.join("cmc.png");
    crate::plots::cmc_curve(&[("PLIP image ReID", &reid.cmc)], &png)?;
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
