//! Caption synthesis: attributes → captions in two styles plus a template "prompt caption", with
//! the character span of every attribute phrase (IAP masks whole phrases). Deterministic for a
//! seed, varied across seeds (templates, verbs, order, connectives). Unknown attributes are left
//! out, never invented; when a sample comes with no attributes at all, [`estimate_colours`]
//! names the colours of its head, upper-body, lower-body and shoe regions from the pixels.

use crate::attributes::{
    Attributes, Colour, Gender, HairLength, Head, Lower, Pattern, Shoes, Upper,
};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
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

/// Appends text while recording phrase spans in characters.
#[derive(Default)]
struct Builder {
    text: String,
    chars: usize,
    phrases: Vec<Phrase>,
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
fn push_list(b: &mut Builder, items: &[(Group, String)]) {
    for (i, (g, s)) in items.iter().enumerate() {
        if i > 0 {
            b.push(if i + 1 == items.len() { " and " } else { ", " });
        }
        b.phrase(*g, s);
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
fn style_one(a: &Attributes, rng: &mut StdRng) -> Caption {
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
    if let Some(h) = hair(&head) {
        with.push((Group::Head, h));
    }
    if head.glasses == Some(true) {
        with.push((Group::Head, "glasses".into()));
    }
    if head.hat == Some(true) {
        with.push((Group::Head, "a hat".into()));
    }
    if !with.is_empty() {
        b.push(" with ");
        push_list(&mut b, &with);
    }
    let mut clothes = Vec::new();
    if let Some(u) = a.upper.as_ref().and_then(upper) {
        clothes.push((Group::Upper, u));
    }
    if let Some(l) = a.lower.as_ref().and_then(lower) {
        clothes.push((Group::Lower, l));
    }
    if let Some(s) = a.shoes.as_ref().and_then(shoes) {
        clothes.push((Group::Shoes, s));
    }
    if !clothes.is_empty() {
        b.push([", wearing ", " is wearing ", ", dressed in "][rng.gen_range(0..3)]);
        push_list(&mut b, &clothes);
    }
    if let Some(c) = carried(a) {
        b.push([", carrying ", " and carries ", ", with "][rng.gen_range(0..3)]);
        b.phrase(Group::Belongings, &c);
    }
    b.push(".");
    b.finish()
}

/// Style 2: sentences about one region each, in a seed-dependent order: "The man has short grey
/// hair. His upper body is covered by a white shirt. He wears black trousers and grey shoes."
fn style_two(a: &Attributes, rng: &mut StdRng) -> Caption {
    let (noun, pronoun) = subject(a, rng);
    let possessive = match pronoun {
        "she" => "her",
        "he" => "his",
        _ => "their",
    };
    let mut sentences: Vec<Vec<(Option<Group>, String)>> = Vec::new();
    let head = a.head.unwrap_or_default();
    if let Some(h) = hair(&head) {
        let verb = if pronoun == "they" { "have" } else { "has" };
        let mut s = vec![(None, format!("{pronoun} {verb} ")), (Some(Group::Head), h)];
        if head.glasses == Some(true) {
            s.push((None, " and wears ".into()));
            s.push((Some(Group::Head), "glasses".into()));
        }
        sentences.push(s);
    }
    if let Some(u) = a.upper.as_ref().and_then(upper) {
        let wears = if pronoun == "they" { "wear" } else { "wears" };
        let lead = [
            "{p} top is ",
            "{p} upper body is covered by ",
            "on top {n} {w} ",
        ][rng.gen_range(0..3)];
        let lead = lead
            .replace("{p}", possessive)
            .replace("{n}", pronoun)
            .replace("{w}", wears);
        sentences.push(vec![(None, lead), (Some(Group::Upper), u)]);
    }
    let mut below = Vec::new();
    if let Some(l) = a.lower.as_ref().and_then(lower) {
        below.push((Group::Lower, l));
    }
    if let Some(s) = a.shoes.as_ref().and_then(shoes) {
        below.push((Group::Shoes, s));
    }
    if !below.is_empty() {
        let verb = if pronoun == "they" { "wear" } else { "wears" };
        let mut s = vec![(None, format!("{pronoun} {verb} "))];
        for (i, (g, p)) in below.iter().enumerate() {
            if i > 0 {
                s.push((None, " and ".into()));
            }
            s.push((Some(*g), p.clone()));
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
    if let Some(c) = carried(a) {
        let verb = if pronoun == "they" {
            "are carrying "
        } else {
            "is carrying "
        };
        sentences.push(vec![
            (None, format!("{pronoun} {verb}")),
            (Some(Group::Belongings), c),
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
            let t = if i == 0 { capitalise(t) } else { t.clone() };
            match g {
                Some(g) => b.phrase(*g, &t),
                None => b.push(&t),
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
fn prompt(a: &Attributes, rng: &mut StdRng) -> Caption {
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
    if let Some(h) = a.head.as_ref().and_then(hair) {
        items.push((Group::Head, h));
    }
    if let Some(u) = a.upper.as_ref().and_then(upper) {
        items.push((Group::Upper, u));
    }
    if let Some(l) = a.lower.as_ref().and_then(lower) {
        items.push((Group::Lower, l));
    }
    if let Some(s) = a.shoes.as_ref().and_then(shoes) {
        items.push((Group::Shoes, s));
    }
    if let Some(c) = carried(a) {
        items.push((Group::Belongings, c));
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
    let one = style_one(a, &mut rng);
    let two = style_two(a, &mut rng);
    let prompt = prompt(a, &mut rng);
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

/// Names the dominant colour of a region, or `None` when no colour covers at least 35% of it.
fn region_colour(img: &RgbImage, y0: f32, y1: f32, x0: f32, x1: f32) -> Option<Colour> {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let mut counts = [0usize; 16];
    let mut total = 0usize;
    let table = ColourTable::get();
    let width = img.width() as usize;
    let (xs, xe) = ((x0 * w) as usize, ((x1 * w) as usize).min(width));
    let raw = img.as_raw();
    for y in (y0 * h) as usize..((y1 * h) as usize).min(img.height() as usize) {
        let Some(row) = raw.get((y * width + xs) * 3..(y * width + xe) * 3) else {
            continue;
        };
        for px in row.chunks_exact(3) {
            counts[table.name([px[0], px[1], px[2]])] += 1;
            total += 1;
        }
    }
    let (best, &n) = counts.iter().enumerate().max_by_key(|(_, &n)| n)?;
    (total > 0 && n as f32 >= 0.35 * total as f32).then(|| Colour::ALL[best])
}

/// Every colour's name, as [`name_colour`] gives it, in two levels: for each of the 32,768
/// cells of 8×8×8 colours, the name all its colours share (`Colour as u16`), or — where a
/// name boundary crosses the cell — 16 + the index of a block holding the cell's 512 names.
/// Built on first use (every one of the 2²⁴ colours named once, ~0.1 s) and kept: 64 KiB of
/// cells and 512 bytes per crossed cell (about 3 MiB), against 16 MiB for a flat table.
struct ColourTable {
    cells: Vec<u16>,
    blocks: Vec<u8>,
}

impl ColourTable {
    fn get() -> &'static ColourTable {
        static TABLE: std::sync::OnceLock<ColourTable> = std::sync::OnceLock::new();
        TABLE.get_or_init(|| {
            let mut cells = vec![0u16; 1 << 15];
            let mut blocks = Vec::new();
            let mut names = [0u8; 512];
            for (i, cell) in cells.iter_mut().enumerate() {
                let [r, g, b] =
                    [(i >> 10) as u8 & 31, (i >> 5) as u8 & 31, i as u8 & 31].map(|c| c << 3);
                for (k, n) in names.iter_mut().enumerate() {
                    let (dr, dg, db) = ((k >> 6) as u8, ((k >> 3) & 7) as u8, (k & 7) as u8);
                    *n = name_colour([r | dr, g | dg, b | db]) as u8;
                }
                *cell = if names.iter().all(|&n| n == names[0]) {
                    u16::from(names[0])
                } else {
                    let k = blocks.len() / 512;
                    blocks.extend_from_slice(&names);
                    16 + k as u16
                };
            }
            ColourTable { cells, blocks }
        })
    }

    fn name(&self, [r, g, b]: [u8; 3]) -> usize {
        let cell = (usize::from(r >> 3) << 10) | (usize::from(g >> 3) << 5) | usize::from(b >> 3);
        match self.cells[cell] {
            c @ 0..16 => usize::from(c),
            c => {
                let sub =
                    (usize::from(r & 7) << 6) | (usize::from(g & 7) << 3) | usize::from(b & 7);
                usize::from(self.blocks[usize::from(c - 16) * 512 + sub])
            }
        }
    }
}

/// The name of one pixel as [`estimate_colours`] finds it (a table look-up); equal to
/// [`name_colour`] for every colour.
pub fn name_colour_by_table(p: [u8; 3]) -> Colour {
    Colour::ALL[ColourTable::get().name(p)]
}

/// The nearest colour name of one pixel (HSV rules).
pub fn name_colour([r, g, b]: [u8; 3]) -> Colour {
    let (r, g, b) = (r as f32 / 255.0, g as f32 / 255.0, b as f32 / 255.0);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let v = max;
    let s = if max > 0.0 { (max - min) / max } else { 0.0 };
    let hue = if max == min {
        0.0
    } else if max == r {
        // In [-1, 1]: `rem_euclid(6.0)` of it, without a call to fmod.
        let x = (g - b) / (max - min);
        60.0 * if x < 0.0 { x + 6.0 } else { x }
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

/// Colour attributes estimated from an upright person crop: the dominant colour of the top of
/// the head (hair), the torso, the legs and the feet, each from the central columns to avoid
/// the background. A region without a dominant colour stays unknown.
pub fn estimate_colours(img: &RgbImage) -> Attributes {
    let hair = region_colour(img, 0.02, 0.09, 0.38, 0.62);
    let top = region_colour(img, 0.22, 0.48, 0.3, 0.7);
    let legs = region_colour(img, 0.56, 0.84, 0.32, 0.68);
    let feet = region_colour(img, 0.92, 0.99, 0.3, 0.7);
    Attributes {
        head: hair.map(|c| Head {
            hair_colour: Some(c),
            ..Default::default()
        }),
        upper: top.map(|c| Upper {
            colour: Some(c),
            ..Default::default()
        }),
        lower: legs.map(|c| Lower {
            colour: Some(c),
            ..Default::default()
        }),
        shoes: feet.map(|c| Shoes { colour: Some(c) }),
        ..Default::default()
    }
}

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
