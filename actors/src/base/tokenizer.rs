//! The tokenizer the daemon and `plipd train` start from.

use plip_model::{Preset, Tokenizer};

/// Trains a tokenizer from the caption synthesizer's vocabulary plus `extra` texts.
pub fn train_tokenizer(
    preset: &Preset,
    extra: &[String],
) -> Result<Tokenizer, Box<dyn std::error::Error>> {
    let mut corpus = plip_ingest::captions::vocabulary_corpus();
    corpus.extend(extra.iter().cloned());
    Ok(Tokenizer::train(corpus.iter(), preset.vocab)?)
}
