//! Retrieval evaluation of a model on query/gallery images: image ReID (Market-1501 protocol)
//! and text→image retrieval with the query images' captions, the attribute-agreement sweep, and
//! the text→image ceiling the captions allow. Used by `plipd eval`, `plipd train`, the daemon's
//! probe evaluations and the demo.

use super::data::Loaded;
use super::model::LoadedModel;
use plip_model::metrics::{
    cosine_matrix, market1501, text_to_image, ReidMetrics, RetrievalMetrics,
};

/// The person and camera labels of loaded images (empty where unknown).
pub fn labels(l: &[Loaded]) -> (Vec<String>, Vec<String>) {
    (
        l.iter()
            .map(|x| x.person.clone().unwrap_or_default())
            .collect(),
        l.iter()
            .map(|x| x.camera.clone().unwrap_or_default())
            .collect(),
    )
}

/// Image ReID metrics as the commands print them.
pub fn reid_json(m: &ReidMetrics) -> serde_json::Value {
    serde_json::json!({"rank1": m.cmc[0], "rank5": m.cmc.get(4), "rank10": m.cmc.get(9), "mAP": m.map, "mINP": m.minp, "valid_queries": m.valid_queries})
}

/// Text→image metrics as the commands print them.
pub fn text_json(m: &RetrievalMetrics) -> serde_json::Value {
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
    let norm = |l: &[Loaded]| super::data::normalized(l, p);
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
