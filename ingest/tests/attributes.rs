//! The attribute schema on the wire.

use plip_ingest::attributes::*;

/// The documented example parses, round-trips, and absent groups stay unknown.
#[test]
fn example_round_trips() {
    let json = r#"{"gender": "woman",
        "head": {"hair_length": "long", "hair_colour": "black", "hat": false, "glasses": true},
        "upper": {"type": "jacket", "colour": "navy", "pattern": "plain"},
        "lower": {"type": "jeans", "colour": "denim"},
        "shoes": {"colour": "white"},
        "belongings": {"backpack": true, "handbag": false}}"#;
    let a: Attributes = serde_json::from_str(json).unwrap();
    assert_eq!(a.gender, Some(Gender::Woman));
    assert_eq!(a.upper.unwrap().kind, Some(UpperType::Jacket));
    assert_eq!(a.lower.unwrap().colour.unwrap().words(), "denim blue");
    assert_eq!(a.belongings.unwrap().carried(), vec!["backpack"]);
    let back: Attributes = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
    assert_eq!(a, back);
    let sparse: Attributes = serde_json::from_str(r#"{"upper": {"colour": "red"}}"#).unwrap();
    assert!(
        sparse.gender.is_none() && sparse.head.is_none() && sparse.upper.unwrap().kind.is_none()
    );
    assert!(serde_json::from_str::<Attributes>("{}").unwrap().is_empty());
    assert_eq!(
        serde_json::to_string(&sparse).unwrap(),
        r#"{"upper":{"colour":"red"}}"#
    );
}

/// Unknown keys and values are refused, and the message names what is accepted.
#[test]
fn unknown_keys_and_values_are_refused() {
    let err = serde_json::from_str::<Attributes>(r#"{"upper": {"colour": "teal"}}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("teal") && err.contains("navy"), "{err}");
    let err = serde_json::from_str::<Attributes>(r#"{"tattoo": true}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tattoo") && err.contains("belongings"),
        "{err}"
    );
    assert!(serde_json::from_str::<Attributes>(r#"{"head": {"hat": "yes"}}"#).is_err());
}

/// Every vocabulary value has distinct caption words (so a caption names one value only).
#[test]
fn vocabulary_words_are_distinct() {
    let mut words: Vec<&str> = Colour::ALL.iter().map(|c| c.words()).collect();
    let n = words.len();
    words.sort_unstable();
    words.dedup();
    assert_eq!(words.len(), n);
    assert_eq!(UpperType::ALL.len(), 8);
    assert_eq!(
        serde_json::to_string(&UpperType::TShirt).unwrap(),
        "\"t_shirt\""
    );
}
