//! The caption tokenizer: a WordPiece vocabulary trained by the project itself (the `tokenizers`
//! crate), lowercasing BERT normalisation, fixed-length encoding with an attention mask, and the
//! mapping from an attribute phrase's character span to its token positions (IAP masks whole
//! phrases).

use crate::text::TokenBatch;
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::ops::Range;
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{AddedToken, Model, ModelWrapper, NormalizerWrapper, PreTokenizerWrapper};

/// The special tokens, in id order for a freshly trained vocabulary.
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// One caption encoded to a fixed length.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// `[CLS] tokens… [SEP] [PAD]…`, exactly the requested length.
    pub ids: Vec<usize>,
    /// 1 for real tokens (`[CLS]` and `[SEP]` included), 0 for padding.
    pub mask: Vec<f32>,
    /// Character span in the caption of each position (`0..0` for special tokens and padding).
    pub spans: Vec<Range<usize>>,
}

impl Encoded {
    /// Positions of the tokens that overlap the character span `phrase` (a truncated phrase
    /// yields only the positions that survived truncation).
    pub fn phrase_positions(&self, phrase: &Range<usize>) -> Vec<usize> {
        self.spans
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                self.mask[*i] > 0.5
                    && s.start < s.end
                    && s.start < phrase.end
                    && phrase.start < s.end
            })
            .map(|(i, _)| i)
            .collect()
    }
    /// Number of real tokens.
    pub fn real_len(&self) -> usize {
        self.mask.iter().filter(|&&m| m > 0.5).count()
    }
}

/// A trained WordPiece tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pad: usize,
    cls: usize,
    sep: usize,
    mask: usize,
    fingerprint: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Trains a vocabulary of at most `capacity` entries (the preset's `vocab`) from texts.
    ///
    /// The crate's trainer breaks ties between equally frequent merges in hash order, so training
    /// twice on the same texts may give another (equally valid) vocabulary with another
    /// fingerprint. That is why a tokenizer is trained once, stored with the state, and its
    /// fingerprint recorded in every checkpoint.
    ///
    /// # Errors
    /// The trainer's failure, or a capacity too small for the special tokens.
    pub fn train<I, S>(texts: I, capacity: usize) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if capacity < SPECIAL_TOKENS.len() + 1 {
            return Err(Error::Tokenizer(format!(
                "vocabulary capacity {capacity} is too small"
            )));
        }
        let mut tk = tokenizers::Tokenizer::new(ModelWrapper::WordPiece(WordPiece::default()));
        tk.with_normalizer(Some(NormalizerWrapper::BertNormalizer(
            BertNormalizer::new(true, true, None, true),
        )));
        tk.with_pre_tokenizer(Some(PreTokenizerWrapper::BertPreTokenizer(
            BertPreTokenizer,
        )));
        let mut trainer: TrainerWrapper = WordPieceTrainerBuilder::new()
            .vocab_size(capacity)
            .min_frequency(1)
            .show_progress(false)
            .special_tokens(
                SPECIAL_TOKENS
                    .iter()
                    .map(|t| AddedToken::from(*t, true))
                    .collect(),
            )
            .build()
            .into();
        tk.train(&mut trainer, texts).map_err(tok_err)?;
        Self::wrap(tk)
    }

    /// Loads a tokenizer saved with [`Tokenizer::to_bytes`].
    ///
    /// # Errors
    /// Bytes that are not a tokenizer, or a vocabulary without the special tokens.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::wrap(tokenizers::Tokenizer::from_bytes(bytes).map_err(tok_err)?)
    }

    /// The tokenizer as JSON bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        Ok(self.inner.to_string(false).map_err(tok_err)?.into_bytes())
    }

    fn wrap(inner: tokenizers::Tokenizer) -> Result<Self> {
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .map(|i| i as usize)
                .ok_or_else(|| Error::Tokenizer(format!("vocabulary lacks the special token {t}")))
        };
        let (pad, cls, sep, mask) = (id("[PAD]")?, id("[CLS]")?, id("[SEP]")?, id("[MASK]")?);
        id("[UNK]")?;
        let mut vocab: Vec<(String, u32)> = inner.get_vocab(true).into_iter().collect();
        vocab.sort_by_key(|(_, id)| *id);
        let mut h = Sha256::new();
        h.update(b"plip-wordpiece-lowercase-v1\n");
        for (tok, id) in &vocab {
            h.update(format!("{id}\t{tok}\n").as_bytes());
        }
        let fingerprint = h
            .finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Tokenizer {
            inner,
            pad,
            cls,
            sep,
            mask,
            fingerprint,
        })
    }

    /// The vocabulary in id order.
    pub fn vocab(&self) -> Vec<String> {
        let mut v: Vec<(String, u32)> = self.inner.get_vocab(true).into_iter().collect();
        v.sort_by_key(|(_, id)| *id);
        v.into_iter().map(|(t, _)| t).collect()
    }

    /// Entries in the vocabulary; the largest id is `vocab_size() - 1`.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_model().get_vocab_size()
    }

    /// A stable 16-hex-digit digest of the vocabulary and normalisation.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Id of `[MASK]`.
    pub fn mask_id(&self) -> usize {
        self.mask
    }
    /// Id of `[PAD]`.
    pub fn pad_id(&self) -> usize {
        self.pad
    }

    /// Checks the vocabulary fits a preset's embedding capacity.
    ///
    /// # Errors
    /// A vocabulary larger than `capacity`.
    pub fn check_capacity(&self, capacity: usize) -> Result<()> {
        if self.vocab_size() > capacity {
            return Err(Error::Tokenizer(format!(
                "vocabulary of {} entries exceeds the preset's capacity of {capacity}",
                self.vocab_size()
            )));
        }
        Ok(())
    }

    /// Encodes `text` to exactly `len` positions: `[CLS]`, the word pieces (truncated to fit),
    /// `[SEP]`, then `[PAD]`.
    ///
    /// # Errors
    /// The tokenizer's own failure (not expected for any UTF-8 text).
    pub fn encode(&self, text: &str, len: usize) -> Result<Encoded> {
        let enc = self
            .inner
            .encode_char_offsets(text, false)
            .map_err(tok_err)?;
        let room = len.saturating_sub(2);
        let mut ids = Vec::with_capacity(len);
        let mut spans = Vec::with_capacity(len);
        ids.push(self.cls);
        spans.push(0..0);
        for (id, (start, end)) in enc.get_ids().iter().zip(enc.get_offsets()).take(room) {
            ids.push(*id as usize);
            spans.push(*start..*end);
        }
        ids.push(self.sep);
        spans.push(0..0);
        let real = ids.len();
        ids.resize(len, self.pad);
        spans.resize(len, 0..0);
        let mask = (0..len).map(|i| if i < real { 1.0 } else { 0.0 }).collect();
        Ok(Encoded { ids, mask, spans })
    }

    /// Encodes several texts into one token batch of length `len`.
    ///
    /// # Errors
    /// As [`Tokenizer::encode`].
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S], len: usize) -> Result<TokenBatch> {
        let mut ids = Vec::with_capacity(texts.len() * len);
        let mut mask = Vec::with_capacity(texts.len() * len);
        for t in texts {
            let e = self.encode(t.as_ref(), len)?;
            ids.extend(e.ids);
            mask.extend(e.mask);
        }
        Ok(TokenBatch {
            ids,
            mask,
            batch: texts.len(),
            len,
        })
    }

    /// The word pieces of a text, for inspection.
    pub fn pieces(&self, text: &str) -> Result<Vec<String>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_tokens()
            .to_vec())
    }
}
