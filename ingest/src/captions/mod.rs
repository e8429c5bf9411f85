//! Caption synthesis: attributes → captions in two styles plus a template "prompt caption", with
//! the character span of every attribute phrase (IAP masks whole phrases). Deterministic for a
//! seed, varied across seeds (templates, verbs, order, connectives). Unknown attributes are left
//! out, never invented; when a sample comes with no attributes at all, [`estimate_colours`]
//! names the colours of its head, upper-body, lower-body and shoe regions from the pixels.
//!
//! Files: this one (the caption types), `templates.rs` (the two styles and the prompt),
//! `colour.rs` (colour names of pixels and regions), `phrases.rs` (attribute phrases found in a
//! producer's caption).

mod colour;
mod phrases;
mod templates;

pub use colour::{estimate_colours, name_colour, name_colour_by_table, prepare_colour_table};
pub use phrases::find_phrases;
pub use templates::{synthesize, vocabulary_corpus};

use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The attribute group a phrase describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    Gender,
    Head,
    Upper,
    Lower,
    Shoes,
    Belongings,
}

/// One attribute phrase of a caption: its group and character span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phrase {
    pub group: Group,
    /// Character (not byte) offsets into the caption.
    pub span: Range<usize>,
}

/// A caption with its attribute phrases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caption {
    pub text: String,
    pub phrases: Vec<Phrase>,
}

impl Caption {
    /// The text of phrase `i`.
    pub fn phrase_text(&self, i: usize) -> String {
        let s = &self.phrases[i].span;
        self.text
            .chars()
            .skip(s.start)
            .take(s.end - s.start)
            .collect()
    }
}

/// The captions of one sample: two styles and the prompt caption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptionSet {
    pub captions: Vec<Caption>,
    pub prompt: Caption,
}
