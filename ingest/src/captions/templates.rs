//! Captions from attributes: PLIP's two styles and the template prompt, with the span of every
//! attribute phrase.

use super::{Caption, CaptionSet, Group, Phrase};
use crate::attributes::{
    Attributes, Colour, Gender, HairLength, Head, Lower, Pattern, Shoes, Upper,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Appends text while recording phrase spans in characters.
struct Builder {
    text: String,
    chars: usize,
    phrases: Vec<Phrase>,
}

impl Default for Builder {
    /// Room for a typical caption (under 160 bytes, up to 7 phrases) without regrowing.
    fn default() -> Self {
        Builder {
            text: String::with_capacity(160),
            chars: 0,
            phrases: Vec::with_capacity(7),
        }
    }
}

impl Builder {
    fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self.chars += s.chars().count();
        self
    }
    fn phrase(&mut self, group: Group, s: &str) -> &mut Self {
        let start = self.chars;
        self.push(s);
        self.phrases.push(Phrase {
            group,
            span: start..self.chars,
        });
        self
    }
    fn finish(mut self) -> Caption {
        // Capitalise the first letter (no phrase starts at a capital-sensitive place otherwise).
        if let Some(first) = self.text.chars().next() {
            let upper: String = first.to_uppercase().collect();
            if upper.chars().count() == 1 {
                self.text.replace_range(..first.len_utf8(), &upper);
            }
        }
        Caption {
            text: self.text,
            phrases: self.phrases,
        }
    }
}

fn article(word: &str) -> &'static str {
    match word.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

/// Hair phrase, e.g. "long black hair"; `None` when nothing about the hair is known.
fn hair(h: &Head) -> Option<String> {
    match (h.hair_length, h.hair_colour) {
        (Some(HairLength::Bald), _) => Some("a bald head".into()),
        (None, None) => None,
        (l, c) => {
            let mut parts = Vec::new();
            if let Some(l) = l {
                parts.push(l.words());
            }
            if let Some(c) = c {
                parts.push(c.words());
            }
            parts.push("hair");
            Some(parts.join(" "))
        }
    }
}

/// Upper-body phrase with its article, e.g. "a navy striped jacket" or "a red top".
fn upper(u: &Upper) -> Option<String> {
    if u.kind.is_none() && u.colour.is_none() && u.pattern.is_none() {
        return None;
    }
    let mut parts = Vec::new();
    if let Some(c) = u.colour {
        parts.push(c.words());
    }
    if let Some(p) = u.pattern.filter(|p| *p != Pattern::Plain) {
        parts.push(p.words());
    }
    parts.push(u.kind.map_or("top", |k| k.words()));
    let s = parts.join(" ");
    Some(format!("{} {s}", article(&s)))
}

/// Lower-body phrase, e.g. "denim blue jeans" ("a … skirt" takes an article).
fn lower(l: &Lower) -> Option<String> {
    if l.kind.is_none() && l.colour.is_none() {
        return None;
    }
    let noun = l.kind.map_or("bottoms", |k| k.words());
    let s = match l.colour {
        Some(c) => format!("{} {noun}", c.words()),
        None => noun.to_string(),
    };
    Some(if noun == "skirt" {
        format!("{} {s}", article(&s))
    } else {
        s
    })
}

fn shoes(s: &Shoes) -> Option<String> {
    s.colour.map(|c| format!("{} shoes", c.words()))
}

fn carried(a: &Attributes) -> Option<String> {
    let items = a.belongings.map(|b| b.carried()).unwrap_or_default();
    if items.is_empty() {
        return None;
    }
    let with_articles: Vec<String> = items
        .iter()
        .map(|i| format!("{} {i}", article(i)))
        .collect();
    Some(join_and(&with_articles))
}

fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Writes a list of (group, phrase) items joined with commas and a final "and".
fn push_list(b: &mut Builder, items: &[(Group, &str)]) {
    for (i, (g, s)) in items.iter().enumerate() {
        if i > 0 {
            b.push(if i + 1 == items.len() { " and " } else { ", " });
        }
        b.phrase(*g, s);
    }
}

/// Each region's phrase, worded once for all three captions of a set.
struct Phrases {
    hair: Option<String>,
    upper: Option<String>,
    lower: Option<String>,
    shoes: Option<String>,
    carried: Option<String>,
}

impl Phrases {
    fn of(a: &Attributes) -> Self {
        Phrases {
            hair: a.head.as_ref().and_then(hair),
            upper: a.upper.as_ref().and_then(upper),
            lower: a.lower.as_ref().and_then(lower),
            shoes: a.shoes.as_ref().and_then(shoes),
            carried: carried(a),
        }
    }
}

fn subject(a: &Attributes, rng: &mut StdRng) -> (String, &'static str) {
    match a.gender {
        Some(g) => (
            g.words().to_string(),
            if g == Gender::Woman { "she" } else { "he" },
        ),
        None => (
            (*["person", "pedestrian"].choose(rng).unwrap_or(&"person")).to_string(),
            "they",
        ),
    }
}

/// Style 1: "A woman with long black hair, wearing a navy jacket, denim blue jeans and white
/// shoes, carrying a backpack."
fn style_one(a: &Attributes, w: &Phrases, rng: &mut StdRng) -> Caption {
    let mut b = Builder::default();
    let (noun, _) = subject(a, rng);
    b.push(["a ", "the "][rng.gen_range(0..2)]);
    if a.gender.is_some() {
        b.phrase(Group::Gender, &noun);
    } else {
        b.push(&noun);
    }
    let head = a.head.unwrap_or_default();
    let mut with = Vec::new();
    if let Some(h) = &w.hair {
        with.push((Group::Head, h.as_str()));
    }
    if head.glasses == Some(true) {
        with.push((Group::Head, "glasses"));
    }
    if head.hat == Some(true) {
        with.push((Group::Head, "a hat"));
    }
    if !with.is_empty() {
        b.push(" with ");
        push_list(&mut b, &with);
    }
    let mut clothes = Vec::new();
    if let Some(u) = &w.upper {
        clothes.push((Group::Upper, u.as_str()));
    }
    if let Some(l) = &w.lower {
        clothes.push((Group::Lower, l.as_str()));
    }
    if let Some(s) = &w.shoes {
        clothes.push((Group::Shoes, s.as_str()));
    }
    if !clothes.is_empty() {
        b.push([", wearing ", " is wearing ", ", dressed in "][rng.gen_range(0..3)]);
        push_list(&mut b, &clothes);
    }
    if let Some(c) = &w.carried {
        b.push([", carrying ", " and carries ", ", with "][rng.gen_range(0..3)]);
        b.phrase(Group::Belongings, c);
    }
    b.push(".");
    b.finish()
}

/// Style 2: sentences about one region each, in a seed-dependent order: "The man has short grey
/// hair. His upper body is covered by a white shirt. He wears black trousers and grey shoes."
fn style_two(a: &Attributes, w: &Phrases, rng: &mut StdRng) -> Caption {
    let (noun, pronoun) = subject(a, rng);
    let possessive = match pronoun {
        "she" => "her",
        "he" => "his",
        _ => "their",
    };
    let mut sentences: Vec<Vec<(Option<Group>, String)>> = Vec::new();
    let head = a.head.unwrap_or_default();
    if let Some(h) = &w.hair {
        let verb = if pronoun == "they" { "have" } else { "has" };
        let mut s = vec![
            (None, format!("{pronoun} {verb} ")),
            (Some(Group::Head), h.clone()),
        ];
        if head.glasses == Some(true) {
            s.push((None, " and wears ".into()));
            s.push((Some(Group::Head), "glasses".into()));
        }
        sentences.push(s);
    }
    if let Some(u) = &w.upper {
        let wears = if pronoun == "they" { "wear" } else { "wears" };
        let lead = match rng.gen_range(0..3usize) {
            0 => format!("{possessive} top is "),
            1 => format!("{possessive} upper body is covered by "),
            _ => format!("on top {pronoun} {wears} "),
        };
        sentences.push(vec![(None, lead), (Some(Group::Upper), u.clone())]);
    }
    let mut below = Vec::new();
    if let Some(l) = &w.lower {
        below.push((Group::Lower, l));
    }
    if let Some(s) = &w.shoes {
        below.push((Group::Shoes, s));
    }
    if !below.is_empty() {
        let verb = if pronoun == "they" { "wear" } else { "wears" };
        let mut s = vec![(None, format!("{pronoun} {verb} "))];
        for (i, (g, p)) in below.iter().enumerate() {
            if i > 0 {
                s.push((None, " and ".into()));
            }
            s.push((Some(*g), (*p).clone()));
        }
        sentences.push(s);
    }
    if head.hat == Some(true) {
        let verb = if pronoun == "they" { "have" } else { "has" };
        sentences.push(vec![
            (None, format!("{pronoun} {verb} ")),
            (Some(Group::Head), "a hat".into()),
            (None, " on".into()),
        ]);
    }
    if let Some(c) = &w.carried {
        let verb = if pronoun == "they" {
            "are carrying "
        } else {
            "is carrying "
        };
        sentences.push(vec![
            (None, format!("{pronoun} {verb}")),
            (Some(Group::Belongings), c.clone()),
        ]);
    }
    sentences.shuffle(rng);
    let mut b = Builder::default();
    b.push("the ");
    if a.gender.is_some() {
        b.phrase(Group::Gender, &noun);
    } else {
        b.push(&noun);
    }
    b.push([" is walking.", " is in view.", " is seen from a distance."][rng.gen_range(0..3)]);
    for s in sentences {
        b.push(" ");
        for (i, (g, t)) in s.iter().enumerate() {
            let capital;
            let t = if i == 0 {
                capital = capitalise(t);
                capital.as_str()
            } else {
                t.as_str()
            };
            match g {
                Some(g) => b.phrase(*g, t),
                None => b.push(t),
            };
        }
        b.push(".");
    }
    b.finish()
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Prompt caption: the attributes filled into one of a few fixed templates (SYNTH-PEDES's
/// prompt captions fill one of many templates), chosen by the seed.
fn prompt(a: &Attributes, w: &Phrases, rng: &mut StdRng) -> Caption {
    let mut b = Builder::default();
    let t = rng.gen_range(0..3);
    b.push(
        [
            "a photo of ",
            "a pedestrian image of ",
            "a surveillance crop of ",
        ][t],
    );
    match a.gender {
        Some(g) => {
            b.push(article(g.words()))
                .push(" ")
                .phrase(Group::Gender, g.words());
        }
        None => {
            b.push("a person");
        }
    }
    let mut items = Vec::new();
    let regions = [
        (Group::Head, &w.hair),
        (Group::Upper, &w.upper),
        (Group::Lower, &w.lower),
        (Group::Shoes, &w.shoes),
        (Group::Belongings, &w.carried),
    ];
    for (g, p) in regions {
        if let Some(p) = p {
            items.push((g, p.as_str()));
        }
    }
    if !items.is_empty() {
        b.push(", with ");
        push_list(&mut b, &items);
    }
    b.push(".");
    b.finish()
}

/// Captions for a set of attributes: two styles and the prompt caption, deterministic for
/// `seed`. With no known attribute at all the captions only say that a person is seen.
pub fn synthesize(a: &Attributes, seed: u64) -> CaptionSet {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let words = Phrases::of(a);
    let one = style_one(a, &words, &mut rng);
    let two = style_two(a, &words, &mut rng);
    let prompt = prompt(a, &words, &mut rng);
    CaptionSet {
        captions: vec![one, two],
        prompt,
    }
}

/// Every word any caption can contain, one text per template and vocabulary value: the corpus
/// the tokenizer is trained from before the first sample arrives.
pub fn vocabulary_corpus() -> Vec<String> {
    use crate::attributes::{Belongings, LowerType, UpperType};
    let mut out = Vec::new();
    for (i, &c) in Colour::ALL.iter().enumerate() {
        let u = UpperType::ALL[i % UpperType::ALL.len()];
        let l = LowerType::ALL[i % LowerType::ALL.len()];
        let p = Pattern::ALL[i % Pattern::ALL.len()];
        let h = HairLength::ALL[i % HairLength::ALL.len()];
        let g = Gender::ALL[i % 2];
        let a = Attributes {
            gender: if i % 3 == 2 { None } else { Some(g) },
            head: Some(Head {
                hair_length: Some(h),
                hair_colour: Some(c),
                hat: Some(i % 2 == 0),
                glasses: Some(i % 3 == 0),
            }),
            upper: Some(Upper {
                kind: Some(u),
                colour: Some(c),
                pattern: Some(p),
            }),
            lower: Some(Lower {
                kind: Some(l),
                colour: Some(c),
            }),
            shoes: Some(Shoes { colour: Some(c) }),
            belongings: Some(Belongings {
                backpack: Some(i % 2 == 0),
                handbag: Some(i % 3 == 0),
                shoulder_bag: Some(i % 4 == 1),
                umbrella: Some(i % 5 == 3),
                suitcase: Some(i % 7 == 4),
            }),
        };
        for seed in 0..6 {
            let set = synthesize(&a, seed);
            out.extend(set.captions.into_iter().map(|c| c.text));
            out.push(set.prompt.text);
        }
    }
    for u in UpperType::ALL {
        out.push(format!(
            "a {} with {}",
            u.words(),
            LowerType::ALL
                .iter()
                .map(|l| l.words())
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    out
}
