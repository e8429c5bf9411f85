//! Requests that arrive together answered as one batch: one serving version, one embedding
//! pass per kind, one search.

use crate::base::error::Error;
use crate::daemon::Shared;
use plip_ingest::image::pixels_at;
use plip_ingest::reid::{Match, QueryKind};
use plip_ingest::wire::{Code, WireError};
use plip_model::batch::normalize_rgb;
use std::sync::Arc;
use std::time::Duration;
/// A validated request waiting for the batcher, and where its result goes.
pub(super) type Pending = (
    plip_ingest::reid::ValidRequest,
    tokio::sync::oneshot::Sender<Answer>,
);

/// What a request gets: the version that answered and the matches, or an error.
pub(super) type Answer = Result<(u64, u64, Vec<Match>), WireError>;

/// Collects the requests that arrive together (up to 64, waiting at most 2 ms after the first)
/// and answers them as one batch: one serving version, one embedding pass per kind, one search.
pub(super) async fn batcher(shared: Arc<Shared>, mut rx: tokio::sync::mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + Duration::from_millis(2);
        while batch.len() < 64 {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                _ => break,
            }
        }
        let (reqs, txs): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let s = shared.clone();
        let answers = tokio::task::spawn_blocking(move || answer_batch(&s, reqs))
            .await
            .unwrap_or_else(|e| vec![Err(search_failed(&e)); txs.len()]);
        for (tx, a) in txs.into_iter().zip(answers) {
            let _ = tx.send(a);
        }
    }
}

/// The answer to every request of a batch whose search task failed (it panicked: a bug, not
/// the client's doing, so `internal`, never `no_model`).
fn search_failed(e: &tokio::task::JoinError) -> WireError {
    tracing::error!(error = %e, "search_failed");
    Error::Internal(format!("the search failed: {e}")).to_wire()
}

/// The answer to a text the tokenizer could not process: the daemon's failure (`internal`), not
/// a text over the limit.
fn tokenizer_failed(e: &dyn std::fmt::Display) -> WireError {
    tracing::error!(error = %e, "tokenizer_failed");
    Error::Internal(format!("the text could not be tokenized: {e}")).to_wire()
}

fn answer_batch(shared: &Shared, reqs: Vec<plip_ingest::reid::ValidRequest>) -> Vec<Answer> {
    let n = reqs.len();
    let Some(s) = shared.serving_snapshot() else {
        return vec![Err(Error::NoModel.to_wire()); n];
    };
    if s.index.is_empty() {
        return vec![Err(Error::EmptyGallery.to_wire()); n];
    }
    let p = s.model.preset();
    let dim = p.index_dim();
    // A request that asks for a newer model than this one is refused, not answered.
    let mut out: Vec<Option<Answer>> = reqs
        .iter()
        .map(|r| match r.min_model_version {
            Some(wanted) if wanted > s.version => Some(Err(Error::ModelTooOld {
                serving: s.version,
                wanted,
            }
            .to_wire())),
            _ => None,
        })
        .collect();
    let mut emb: Vec<Option<Vec<f32>>> = (0..n).map(|_| None).collect();
    // Images: one pass.
    let images: Vec<usize> = (0..n)
        .filter(|&i| out[i].is_none() && matches!(reqs[i].query, QueryKind::Image(_)))
        .collect();
    if !images.is_empty() {
        let flat: Vec<f32> = images
            .iter()
            .flat_map(|&i| match &reqs[i].query {
                QueryKind::Image(img) => {
                    // Straight to the model's input, as the gallery's stored images are.
                    let rgb = pixels_at(img, p.image_height as u32, p.image_width as u32);
                    normalize_rgb(&rgb, p.image_height, p.image_width)
                }
                QueryKind::Text(_) => Vec::new(),
            })
            .collect();
        let e = s.model.embed_images(&flat, 64);
        for (r, &i) in images.iter().enumerate() {
            emb[i] = Some(e.row(r).to_vec());
        }
    }
    // Texts: token limit per request, then one pass.
    let mut texts = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        if let QueryKind::Text(t) = &r.query {
            match s.tokenizer.pieces(t) {
                Ok(pieces) if pieces.len() <= p.text_len.saturating_sub(2) => {
                    texts.push((i, t.clone()))
                }
                Ok(pieces) => {
                    out[i] = Some(Err(Error::TextTooLong {
                        tokens: pieces.len(),
                        limit: p.text_len - 2,
                    }
                    .to_wire()))
                }
                Err(e) => out[i] = Some(Err(tokenizer_failed(&e))),
            }
        }
    }
    if !texts.is_empty() {
        let strs: Vec<&str> = texts.iter().map(|(_, t)| t.as_str()).collect();
        match s.tokenizer.encode_batch(&strs, p.text_len) {
            Ok(tokens) => {
                let e = s.model.embed_texts(&tokens, 64);
                for (r, (i, _)) in texts.iter().enumerate() {
                    emb[*i] = Some(e.row(r).to_vec());
                }
            }
            Err(e) => {
                let err = tokenizer_failed(&e);
                for (i, _) in &texts {
                    out[*i] = Some(Err(err.clone()));
                }
            }
        }
    }
    // One search for every embedded query, at the largest top_k; each keeps its own.
    let live: Vec<usize> = (0..n)
        .filter(|&i| out[i].is_none() && emb[i].is_some())
        .collect();
    if !live.is_empty() {
        let k = live.iter().map(|&i| reqs[i].top_k).max().unwrap_or(1);
        let mut q = Vec::with_capacity(live.len() * dim);
        let mut exclude = Vec::with_capacity(live.len());
        for &i in &live {
            q.extend_from_slice(emb[i].as_deref().unwrap_or(&[]));
            exclude.push(
                reqs[i]
                    .exclude_camera
                    .as_deref()
                    .map(|c| s.camera_number(c).unwrap_or(u32::MAX)),
            );
        }
        let hits = s.index.search(&q, &exclude, k);
        for (j, &i) in live.iter().enumerate() {
            let matches = hits[j]
                .iter()
                .take(reqs[i].top_k)
                .map(|h| Match {
                    id: s.rows[h.row].id.clone(),
                    person_id: s.rows[h.row].person_id.clone(),
                    camera_id: s.rows[h.row].camera_id.clone(),
                    score: h.score,
                })
                .collect();
            out[i] = Some(Ok((s.version, s.gallery_version, matches)));
        }
    }
    out.into_iter()
        .map(|a| {
            a.unwrap_or_else(|| {
                Err(WireError {
                    code: Code::Internal,
                    message: "not answered (the query could not be embedded)".into(),
                })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic in the search task is answered `internal` (it was `no_model`, which sends a
    /// client to wait for a promotion that will not fix anything).
    #[tokio::test]
    async fn a_panicking_search_is_answered_internal() {
        let e = tokio::task::spawn_blocking(|| -> Vec<Answer> { panic!("index out of bounds") })
            .await
            .expect_err("the task panicked");
        let w = search_failed(&e);
        assert_eq!(w.code, Code::Internal);
        assert_eq!(w.code.as_str(), "internal");
        assert!(w.message.contains("the search failed"), "{}", w.message);
    }

    /// A tokenizer failure is the daemon's (`internal`), not `text_too_long`.
    #[test]
    fn a_tokenizer_failure_is_answered_internal() {
        let w = tokenizer_failed(&"vocabulary not loaded");
        assert_eq!(w.code, Code::Internal);
        assert!(w.message.contains("vocabulary not loaded"), "{}", w.message);
    }
}
