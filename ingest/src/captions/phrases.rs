//! Attribute phrases in a caption's text (a producer's caption: its spans are found, not
//! known).

use super::{Group, Phrase};
use crate::attributes::{Colour, HairLength, Pattern};
use std::ops::Range;

/// What a caption word says, for [`find_phrases`].
#[derive(Clone, Copy, PartialEq)]
enum Tag {
    Modifier,
    Noun(Group),
}

fn tag(word: &str) -> Option<Tag> {
    use crate::attributes::{LowerType, UpperType};
    let w = word.to_lowercase();
    let w = w.as_str();
    if Colour::ALL
        .iter()
        .any(|c| c.words().split(' ').any(|p| p == w))
        || Pattern::ALL.iter().any(|p| p.words() == w)
        || HairLength::ALL.iter().any(|h| h.words() == w)
        || matches!(
            w,
            "dark"
                | "light"
                | "bright"
                | "long-sleeved"
                | "short-sleeved"
                | "sleeveless"
                | "plaid"
                | "blonde"
                | "blond"
        )
    {
        return Some(Tag::Modifier);
    }
    let group = if matches!(
        w,
        "man" | "woman" | "boy" | "girl" | "lady" | "gentleman" | "male" | "female"
    ) {
        Group::Gender
    } else if matches!(
        w,
        "hair" | "glasses" | "sunglasses" | "hat" | "cap" | "head"
    ) {
        Group::Head
    } else if UpperType::ALL.iter().any(|u| u.words() == w)
        || matches!(
            w,
            "top" | "blouse" | "sweatshirt" | "cardigan" | "tshirt" | "t-shirts"
        )
    {
        Group::Upper
    } else if LowerType::ALL.iter().any(|l| l.words() == w) || matches!(w, "pants" | "bottoms") {
        Group::Lower
    } else if matches!(w, "shoes" | "sneakers" | "boots" | "sandals" | "heels") {
        Group::Shoes
    } else if matches!(
        w,
        "backpack" | "handbag" | "bag" | "purse" | "umbrella" | "suitcase" | "luggage"
    ) {
        Group::Belongings
    } else {
        return None;
    };
    Some(Tag::Noun(group))
}

/// Finds attribute phrases in any caption (for captions that come without spans: producers',
/// SYNTH-PEDES's, CUHK-PEDES's): a noun of one of the six groups together with the colour,
/// pattern and length words right before it ("navy striped jacket", "long black hair").
pub fn find_phrases(text: &str) -> Vec<Phrase> {
    // Words with their character spans.
    let mut words: Vec<(String, Range<usize>)> = Vec::new();
    let mut cur = String::new();
    let mut start = 0;
    for (i, ch) in text.chars().enumerate() {
        if ch.is_alphanumeric() || ch == '-' {
            if cur.is_empty() {
                start = i;
            }
            cur.push(ch);
        } else if !cur.is_empty() {
            words.push((std::mem::take(&mut cur), start..i));
        }
    }
    if !cur.is_empty() {
        let n = text.chars().count();
        words.push((cur, start..n));
    }
    let mut out = Vec::new();
    let mut run_start: Option<usize> = None;
    for (w, span) in &words {
        match tag(w) {
            Some(Tag::Modifier) => {
                run_start.get_or_insert(span.start);
            }
            Some(Tag::Noun(group)) => {
                let s = run_start.take().unwrap_or(span.start);
                out.push(Phrase {
                    group,
                    span: s..span.end,
                });
            }
            None => run_start = None,
        }
    }
    out
}
