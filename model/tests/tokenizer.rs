//! The caption tokenizer: training within capacity, fixed-length encoding, phrase spans,
//! fingerprints.

mod common;

use common::*;
use plip_model::{Preset, Tokenizer};

/// A trained vocabulary fits the capacity and has the special tokens first.
#[test]
fn trains_within_capacity_with_special_tokens() {
    let p = Preset::test();
    let tk = tokenizer(&p);
    assert!(
        tk.vocab_size() <= p.vocab && tk.vocab_size() > 20,
        "{}",
        tk.vocab_size()
    );
    assert_eq!(tk.pad_id(), 0);
    assert_eq!(tk.mask_id(), 4);
    tk.check_capacity(p.vocab).unwrap();
    assert!(tk.check_capacity(10).is_err());
    let small = Tokenizer::train(["the red shirt and the blue trousers"; 3].iter(), 30).unwrap();
    assert!(small.vocab_size() <= 30);
}

/// Encoding gives exactly the requested length, `[CLS] … [SEP]` then padding, and a mask that
/// marks the real tokens; long text is truncated and still ends with `[SEP]`.
#[test]
fn encodes_to_fixed_length_with_mask() {
    let tk = tokenizer(&Preset::test());
    let e = tk.encode("A person wearing a RED shirt", 12).unwrap();
    assert_eq!(e.ids.len(), 12);
    assert_eq!(e.ids[0], 2);
    let real = e.real_len();
    assert_eq!(e.ids[real - 1], 3);
    assert!(e.ids[real..].iter().all(|&i| i == tk.pad_id()));
    assert_eq!(e.mask.iter().filter(|&&m| m == 1.0).count(), real);
    assert_eq!(
        tk.encode("a person wearing a red shirt", 12).unwrap(),
        e,
        "lowercased"
    );
    let long = tk.encode(&"red shirt ".repeat(40), 10).unwrap();
    assert_eq!(long.real_len(), 10);
    assert_eq!(long.ids[9], 3);
    let empty = tk.encode("", 6).unwrap();
    assert_eq!(empty.real_len(), 2);
}

/// A phrase's character span maps to the positions of exactly its word pieces.
#[test]
fn phrase_spans_map_to_token_positions() {
    let tk = tokenizer(&Preset::test());
    let (caption, phrases) = caption_for(7);
    let e = tk.encode(&caption, 24).unwrap();
    for ph in &phrases {
        let pos = e.phrase_positions(ph);
        assert!(!pos.is_empty());
        let text: String = caption.chars().skip(ph.start).take(ph.len()).collect();
        let words = text.split(' ').count();
        assert!(pos.len() >= words, "{text}: {pos:?}");
        for w in pos.windows(2) {
            assert_eq!(w[1], w[0] + 1, "contiguous");
        }
        let covered: Vec<_> = pos.iter().map(|&i| e.spans[i].clone()).collect();
        assert_eq!(covered.first().unwrap().start, ph.start);
        assert_eq!(covered.last().unwrap().end, ph.end);
    }
    // A phrase cut off by truncation keeps only its surviving positions.
    let short = tk.encode(&caption, 6).unwrap();
    assert!(short.phrase_positions(&phrases[1]).is_empty());
    // Non-ASCII text: spans count characters, not bytes.
    let caption = "é person in a red shirt";
    let span = span(caption, "red shirt");
    let e = tk.encode(caption, 16).unwrap();
    let pos = e.phrase_positions(&span);
    assert_eq!(e.spans[pos[0]].start, span.start);
}

/// The fingerprint is stable across a save/load, equal exactly when two vocabularies are equal,
/// and differs for another corpus; garbage bytes are refused.
#[test]
fn fingerprint_is_stable_and_discriminating() {
    let p = Preset::test();
    let a = train_tokenizer(&p);
    let b = train_tokenizer(&p);
    assert_eq!(a.fingerprint() == b.fingerprint(), a.vocab() == b.vocab());
    assert_eq!(a.fingerprint().len(), 16);
    let loaded = Tokenizer::from_bytes(&a.to_bytes().unwrap()).unwrap();
    assert_eq!(loaded.fingerprint(), a.fingerprint());
    assert_eq!(
        loaded.encode("a red shirt", 8).unwrap(),
        a.encode("a red shirt", 8).unwrap()
    );
    let other = Tokenizer::train(["a man carrying an umbrella"].iter(), 200).unwrap();
    assert_ne!(other.fingerprint(), a.fingerprint());
    assert!(Tokenizer::from_bytes(b"{not json").is_err());
    assert!(Tokenizer::from_bytes(b"").is_err());
}
