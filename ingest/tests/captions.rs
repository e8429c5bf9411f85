//! Caption synthesis: exactly the given attributes, correct spans, determinism, colour naming.

use image::{Rgb, RgbImage};
use plip_ingest::attributes::*;
use plip_ingest::captions::{
    estimate_colours, name_colour, synthesize, vocabulary_corpus, Caption, Group,
};

fn full() -> Attributes {
    Attributes {
        gender: Some(Gender::Woman),
        head: Some(Head {
            hair_length: Some(HairLength::Long),
            hair_colour: Some(Colour::Brown),
            hat: Some(false),
            glasses: Some(true),
        }),
        upper: Some(Upper {
            kind: Some(UpperType::Jacket),
            colour: Some(Colour::Navy),
            pattern: Some(Pattern::Striped),
        }),
        lower: Some(Lower {
            kind: Some(LowerType::Skirt),
            colour: Some(Colour::Grey),
        }),
        shoes: Some(Shoes {
            colour: Some(Colour::White),
        }),
        belongings: Some(Belongings {
            backpack: Some(true),
            umbrella: Some(true),
            ..Default::default()
        }),
    }
}

fn phrases_of(c: &Caption, g: Group) -> Vec<String> {
    (0..c.phrases.len())
        .filter(|&i| c.phrases[i].group == g)
        .map(|i| c.phrase_text(i))
        .collect()
}

fn check_spans(c: &Caption) {
    let mut last = 0;
    for (i, p) in c.phrases.iter().enumerate() {
        assert!(p.span.start >= last && p.span.end > p.span.start, "{c:?}");
        last = p.span.end;
        let t = c.phrase_text(i);
        assert_eq!(t.trim(), t, "phrase with surrounding spaces: {t:?}");
        assert!(c.text.contains(&t));
    }
}

/// Every known attribute appears in a phrase of its own group in all three captions.
#[test]
fn captions_contain_every_given_attribute_in_its_phrase() {
    let a = full();
    for seed in 0..20 {
        let set = synthesize(&a, seed);
        for c in set.captions.iter().chain(std::iter::once(&set.prompt)) {
            check_spans(c);
            let has = |g: Group, w: &str| phrases_of(c, g).iter().any(|p| p.contains(w));
            assert!(has(Group::Gender, "woman"), "{}", c.text);
            assert!(has(Group::Head, "long brown hair"), "{}", c.text);
            assert!(has(Group::Upper, "navy striped jacket"), "{}", c.text);
            assert!(has(Group::Lower, "grey skirt"), "{}", c.text);
            assert!(has(Group::Shoes, "white shoes"), "{}", c.text);
            assert!(
                has(Group::Belongings, "backpack") && has(Group::Belongings, "umbrella"),
                "{}",
                c.text
            );
            assert!(!c.text.contains("hat"), "hat is known absent: {}", c.text);
        }
    }
}

/// Only what is known is said: with just an upper-body colour, no other colour, garment,
/// hair, shoe, gender or belonging word appears.
#[test]
fn unknown_attributes_are_left_out() {
    let a = Attributes {
        upper: Some(Upper {
            colour: Some(Colour::Red),
            ..Default::default()
        }),
        ..Default::default()
    };
    for seed in 0..20 {
        let set = synthesize(&a, seed);
        for c in set.captions.iter().chain(std::iter::once(&set.prompt)) {
            check_spans(c);
            let t = c.text.to_lowercase();
            assert!(
                phrases_of(c, Group::Upper)
                    .iter()
                    .any(|p| p.contains("red")),
                "{t}"
            );
            for col in Colour::ALL.iter().filter(|&&c| c != Colour::Red) {
                assert!(!t.contains(col.words()), "{t} mentions {}", col.words());
            }
            for w in [
                "hair", "shoes", "woman", " man", "backpack", "bag", "jacket", "jeans", "trousers",
                "glasses",
            ] {
                assert!(!t.contains(w), "{t} mentions {w}");
            }
            assert_eq!(c.phrases.len(), 1, "{t}");
        }
    }
    let none = synthesize(&Attributes::default(), 3);
    assert!(none.captions.iter().all(|c| c.phrases.is_empty()));
}

/// Same seed, same captions; different seeds, varied captions; two distinct styles.
#[test]
fn deterministic_for_a_seed_and_varied_across_seeds() {
    let a = full();
    assert_eq!(synthesize(&a, 5), synthesize(&a, 5));
    let mut seen = std::collections::HashSet::new();
    for seed in 0..10 {
        let set = synthesize(&a, seed);
        assert_ne!(set.captions[0].text, set.captions[1].text);
        seen.insert(set.captions[0].text.clone());
        seen.insert(set.captions[1].text.clone());
    }
    assert!(
        seen.len() >= 8,
        "only {} distinct captions over 10 seeds",
        seen.len()
    );
}

/// The tokenizer corpus covers every vocabulary word.
#[test]
fn vocabulary_corpus_covers_every_word() {
    let corpus = vocabulary_corpus().join(" ");
    for c in Colour::ALL {
        assert!(corpus.contains(c.words()), "{}", c.words());
    }
    for u in UpperType::ALL {
        assert!(corpus.contains(u.words()), "{}", u.words());
    }
    for w in [
        "suitcase",
        "umbrella",
        "shoulder bag",
        "handbag",
        "glasses",
        "hat",
        "bald",
    ] {
        assert!(corpus.contains(w), "{w}");
    }
}

/// Colour naming of pixels, and of the regions of an upright crop; a region without a dominant
/// colour is left unknown.
#[test]
fn colours_are_estimated_from_pixels() {
    assert_eq!(name_colour([10, 10, 12]), Colour::Black);
    assert_eq!(name_colour([240, 240, 238]), Colour::White);
    assert_eq!(name_colour([128, 128, 130]), Colour::Grey);
    assert_eq!(name_colour([200, 20, 25]), Colour::Red);
    assert_eq!(name_colour([20, 30, 90]), Colour::Navy);
    assert_eq!(name_colour([30, 150, 40]), Colour::Green);
    assert_eq!(name_colour([230, 210, 30]), Colour::Yellow);
    let img = RgbImage::from_fn(64, 128, |x, y| {
        let edge = !(16..48).contains(&x);
        let c = match y {
            _ if edge => [30, 150, 40],
            0..=14 => [15, 15, 15],
            15..=27 => [200, 160, 130],
            28..=69 => [200, 20, 25],
            70..=113 => [20, 30, 90],
            114..=116 => [128, 128, 128],
            _ => [240, 240, 240],
        };
        Rgb(c)
    });
    let a = estimate_colours(&img);
    // Regions are read on a grid about 64 rows high: the same crop at twice and at three
    // quarters of the size is named alike.
    for (w, h) in [(128, 256), (48, 96)] {
        let scaled = image::imageops::resize(&img, w, h, image::imageops::FilterType::Nearest);
        assert_eq!(estimate_colours(&scaled), a, "at {w}×{h}");
    }
    assert_eq!(a.head.unwrap().hair_colour, Some(Colour::Black));
    assert_eq!(a.upper.unwrap().colour, Some(Colour::Red));
    assert_eq!(a.lower.unwrap().colour, Some(Colour::Navy));
    assert_eq!(a.shoes.unwrap().colour, Some(Colour::White));
    assert!(a.gender.is_none() && a.upper.unwrap().kind.is_none());
    let noise = RgbImage::from_fn(64, 128, |x, y| {
        Rgb([
            ((x * 37 + y * 91) % 256) as u8,
            ((x * 53) % 256) as u8,
            ((y * 29) % 256) as u8,
        ])
    });
    let n = estimate_colours(&noise);
    assert!(n.upper.is_none() && n.lower.is_none(), "{n:?}");
}

/// Phrases are found in captions that come without spans, with their modifiers.
#[test]
fn phrases_are_found_in_free_text() {
    let text = "A woman with long black hair wears a navy striped jacket, blue jeans and white sneakers. She carries a red bag.";
    let found: Vec<(Group, String)> = plip_ingest::captions::find_phrases(text)
        .into_iter()
        .map(|p| {
            (
                p.group,
                text.chars().skip(p.span.start).take(p.span.len()).collect(),
            )
        })
        .collect();
    assert_eq!(
        found,
        vec![
            (Group::Gender, "woman".to_string()),
            (Group::Head, "long black hair".to_string()),
            (Group::Upper, "navy striped jacket".to_string()),
            (Group::Lower, "blue jeans".to_string()),
            (Group::Shoes, "white sneakers".to_string()),
            (Group::Belongings, "red bag".to_string()),
        ]
    );
    // The synthesizer's own phrases are found again in its captions.
    let set = synthesize(&full(), 1);
    let again = plip_ingest::captions::find_phrases(&set.captions[0].text);
    for p in &set.captions[0].phrases {
        // Same phrase end (the noun); the synthesizer's span may also cover the article.
        assert!(
            again.iter().any(|q| q.span.end == p.span.end
                && q.span.start >= p.span.start
                && q.group == p.group),
            "{p:?} in {}",
            set.captions[0].text
        );
    }
}

/// The hue of a red-dominant pixel is taken without `rem_euclid` (no fmod call per pixel):
/// every colour of a grid — dense where red dominates — keeps the name the previous form of
/// `name_colour` (kept here as the reference) gave it.
#[test]
fn colour_names_are_unchanged_by_the_fast_hue() {
    fn name_colour_reference([r, g, b]: [u8; 3]) -> Colour {
        let (r, g, b) = (r as f32 / 255.0, g as f32 / 255.0, b as f32 / 255.0);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let v = max;
        let s = if max > 0.0 { (max - min) / max } else { 0.0 };
        let hue = if max == min {
            0.0
        } else if max == r {
            60.0 * (((g - b) / (max - min)).rem_euclid(6.0))
        } else if max == g {
            60.0 * ((b - r) / (max - min) + 2.0)
        } else {
            60.0 * ((r - g) / (max - min) + 4.0)
        };
        if v < 0.2 {
            return Colour::Black;
        }
        if s < 0.18 {
            return if v > 0.8 { Colour::White } else { Colour::Grey };
        }
        match hue {
            h if !(15.0..345.0).contains(&h) => {
                if s < 0.45 && v > 0.7 {
                    Colour::Pink
                } else {
                    Colour::Red
                }
            }
            h if h < 40.0 => {
                if v < 0.6 {
                    Colour::Brown
                } else if s < 0.45 {
                    Colour::Beige
                } else {
                    Colour::Orange
                }
            }
            h if h < 70.0 => {
                if s < 0.45 {
                    Colour::Khaki
                } else {
                    Colour::Yellow
                }
            }
            h if h < 170.0 => Colour::Green,
            h if h < 255.0 => {
                if v < 0.45 {
                    Colour::Navy
                } else if s < 0.45 {
                    Colour::LightBlue
                } else {
                    Colour::Blue
                }
            }
            h if h < 290.0 => Colour::Purple,
            _ => Colour::Pink,
        }
    }
    let mut checked = 0;
    for r in (0..=255u8).step_by(3) {
        for g in (0..=255u8).step_by(5) {
            for b in (0..=255u8).step_by(if g <= r { 1 } else { 7 }) {
                assert_eq!(
                    name_colour([r, g, b]),
                    name_colour_reference([r, g, b]),
                    "{r} {g} {b}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 400_000, "{checked}");
}

/// Pixels are named through a two-level table of every colour, built from the HSV rules: the
/// same name as the rules for each of the 2²⁴ colours.
#[test]
fn the_colour_table_names_every_colour_as_the_rules_do() {
    use plip_ingest::captions::name_colour_by_table;
    for rgb in 0..1u32 << 24 {
        let p = [(rgb >> 16) as u8, (rgb >> 8) as u8, rgb as u8];
        assert_eq!(name_colour_by_table(p), name_colour(p), "{p:?}");
    }
}

/// The captions of a seed do not change between builds: stored samples keep the captions intake
/// wrote, and offline training regenerates them from the same seeds, so both must read alike.
/// (Pinned from the output before the phrases were worded once per set; 90,000 captions of
/// 30,000 random attribute sets compared equal across that change.)
#[test]
fn captions_of_a_seed_are_stable() {
    let set = synthesize(&full(), 1);
    let texts: Vec<&str> = set
        .captions
        .iter()
        .chain(std::iter::once(&set.prompt))
        .map(|c| c.text.as_str())
        .collect();
    let colours_only = Attributes {
        upper: Some(Upper {
            colour: Some(Colour::Red),
            ..Default::default()
        }),
        shoes: Some(Shoes {
            colour: Some(Colour::White),
        }),
        ..Default::default()
    };
    let two = synthesize(&colours_only, 2);
    let mut texts2: Vec<&str> = two.captions.iter().map(|c| c.text.as_str()).collect();
    texts2.push(&two.prompt.text);
    assert_eq!(texts, PINNED_FULL);
    assert_eq!(texts2, PINNED_COLOURS);
}
const PINNED_FULL: [&str; 3] = [
    "The woman with long brown hair and glasses, wearing a navy striped jacket, a grey skirt and white shoes, carrying a backpack and an umbrella.",
    "The woman is in view. She wears a grey skirt and white shoes. On top she wears a navy striped jacket. She has long brown hair and wears glasses. She is carrying a backpack and an umbrella.",
    "A photo of a woman, with long brown hair, a navy striped jacket, a grey skirt, white shoes and a backpack and an umbrella.",
];
const PINNED_COLOURS: [&str; 3] = [
    "The person, dressed in a red top and white shoes.",
    "The person is walking. They wear white shoes. On top they wear a red top.",
    "A surveillance crop of a person, with a red top and white shoes.",
];
