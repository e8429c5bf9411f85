//! Identities: a fixed attribute set plus a body (height, build, tones), sampled with the
//! colour and garment frequencies of the synthetic data set. `draw.rs` draws them.

use super::raster::Rgb;
use crate::attributes::*;
use rand::seq::SliceRandom;
use rand::Rng;

/// What stays fixed for an identity besides its attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct Body {
    /// Height as a fraction of the crop.
    pub height: f32,
    /// Shoulder width factor (1 = average).
    pub build: f32,
    pub skin: Rgb,
    /// Exact garment tones (two people with "navy" tops differ slightly).
    pub upper_tone: Rgb,
    pub lower_tone: Rgb,
    pub shoe_tone: Rgb,
    pub hair_tone: Rgb,
    /// Colour of a hat and of bags.
    pub accessory: Rgb,
}

/// An identity: attributes (all known for synthetic people) and body.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub attributes: Attributes,
    pub body: Body,
}

/// sRGB-ish value of a colour name.
pub fn rgb(c: Colour) -> Rgb {
    let v: [u8; 3] = match c {
        Colour::Black => [22, 22, 24],
        Colour::White => [232, 232, 228],
        Colour::Grey => [128, 128, 130],
        Colour::Navy => [28, 36, 82],
        Colour::Blue => [40, 80, 190],
        Colour::LightBlue => [140, 180, 225],
        Colour::Denim => [70, 98, 140],
        Colour::Red => [185, 30, 35],
        Colour::Green => [40, 120, 55],
        Colour::Yellow => [225, 200, 40],
        Colour::Orange => [230, 120, 30],
        Colour::Pink => [230, 150, 180],
        Colour::Purple => [110, 50, 140],
        Colour::Brown => [100, 65, 40],
        Colour::Beige => [205, 185, 150],
        Colour::Khaki => [160, 150, 100],
    };
    v.map(|x| x as f32 / 255.0)
}

fn weighted<T: Copy, R: Rng>(rng: &mut R, items: &[(T, u32)]) -> T {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut r = rng.gen_range(0..total);
    for &(t, w) in items {
        if r < w {
            return t;
        }
        r -= w;
    }
    items[0].0
}

/// Garment colours with the skew of real street clothing: mostly black, grey, navy, white.
const UPPER_COLOURS: &[(Colour, u32)] = &[
    (Colour::Black, 24),
    (Colour::Grey, 14),
    (Colour::Navy, 12),
    (Colour::White, 14),
    (Colour::Blue, 6),
    (Colour::LightBlue, 3),
    (Colour::Denim, 2),
    (Colour::Red, 5),
    (Colour::Green, 4),
    (Colour::Beige, 5),
    (Colour::Brown, 3),
    (Colour::Yellow, 2),
    (Colour::Pink, 2),
    (Colour::Purple, 1),
    (Colour::Orange, 1),
    (Colour::Khaki, 1),
];
const LOWER_COLOURS: &[(Colour, u32)] = &[
    (Colour::Black, 38),
    (Colour::Grey, 14),
    (Colour::Navy, 14),
    (Colour::Beige, 9),
    (Colour::Khaki, 7),
    (Colour::Brown, 5),
    (Colour::White, 5),
    (Colour::Blue, 3),
    (Colour::Denim, 3),
    (Colour::Green, 1),
    (Colour::Red, 1),
];
const JEANS_COLOURS: &[(Colour, u32)] = &[
    (Colour::Denim, 60),
    (Colour::Black, 20),
    (Colour::LightBlue, 12),
    (Colour::Grey, 8),
];
const SHOE_COLOURS: &[(Colour, u32)] = &[
    (Colour::Black, 45),
    (Colour::White, 30),
    (Colour::Grey, 9),
    (Colour::Brown, 10),
    (Colour::Beige, 3),
    (Colour::Red, 1),
    (Colour::Blue, 2),
];
const HAIR_COLOURS: &[(Colour, u32)] = &[
    (Colour::Black, 50),
    (Colour::Brown, 28),
    (Colour::Beige, 8),
    (Colour::Grey, 7),
    (Colour::White, 3),
    (Colour::Red, 2),
    (Colour::Yellow, 2),
];
const SKIN: [[u8; 3]; 6] = [
    [241, 204, 177],
    [224, 172, 138],
    [198, 144, 105],
    [160, 110, 75],
    [120, 80, 55],
    [90, 60, 42],
];

fn jitter<R: Rng>(c: Rgb, rng: &mut R, amount: f32) -> Rgb {
    c.map(|v| (v + rng.gen_range(-amount..=amount)).clamp(0.0, 1.0))
}

/// Draws a random identity.
pub fn sample_identity<R: Rng>(rng: &mut R) -> Identity {
    let gender = if rng.gen_bool(0.5) {
        Gender::Woman
    } else {
        Gender::Man
    };
    let woman = gender == Gender::Woman;
    let hair_length = if woman {
        weighted(
            rng,
            &[
                (HairLength::Long, 50),
                (HairLength::Medium, 30),
                (HairLength::Short, 20),
            ],
        )
    } else {
        weighted(
            rng,
            &[
                (HairLength::Short, 75),
                (HairLength::Medium, 12),
                (HairLength::Bald, 8),
                (HairLength::Long, 5),
            ],
        )
    };
    let hair_colour = weighted(rng, HAIR_COLOURS);
    let upper_kind = if woman {
        weighted(
            rng,
            &[
                (UpperType::TShirt, 20),
                (UpperType::Shirt, 14),
                (UpperType::Sweater, 12),
                (UpperType::Hoodie, 9),
                (UpperType::Jacket, 15),
                (UpperType::Coat, 12),
                (UpperType::Vest, 6),
                (UpperType::Dress, 12),
            ],
        )
    } else {
        weighted(
            rng,
            &[
                (UpperType::TShirt, 24),
                (UpperType::Shirt, 18),
                (UpperType::Sweater, 13),
                (UpperType::Hoodie, 12),
                (UpperType::Jacket, 18),
                (UpperType::Coat, 10),
                (UpperType::Vest, 5),
            ],
        )
    };
    let pattern = weighted(
        rng,
        &[
            (Pattern::Plain, 58),
            (Pattern::Striped, 14),
            (Pattern::Checked, 11),
            (Pattern::Logo, 12),
            (Pattern::Floral, 5),
        ],
    );
    let lower_kind = if woman {
        weighted(
            rng,
            &[
                (LowerType::Trousers, 28),
                (LowerType::Jeans, 30),
                (LowerType::Shorts, 10),
                (LowerType::Skirt, 20),
                (LowerType::Leggings, 12),
            ],
        )
    } else {
        weighted(
            rng,
            &[
                (LowerType::Trousers, 45),
                (LowerType::Jeans, 40),
                (LowerType::Shorts, 15),
            ],
        )
    };
    let upper_colour = weighted(rng, UPPER_COLOURS);
    let lower_colour = if lower_kind == LowerType::Jeans {
        weighted(rng, JEANS_COLOURS)
    } else {
        weighted(rng, LOWER_COLOURS)
    };
    let shoe_colour = weighted(rng, SHOE_COLOURS);
    let attributes = Attributes {
        gender: Some(gender),
        head: Some(Head {
            hair_length: Some(hair_length),
            hair_colour: if hair_length == HairLength::Bald {
                None
            } else {
                Some(hair_colour)
            },
            hat: Some(rng.gen_bool(0.14)),
            glasses: Some(rng.gen_bool(0.2)),
        }),
        upper: Some(Upper {
            kind: Some(upper_kind),
            colour: Some(upper_colour),
            pattern: Some(pattern),
        }),
        lower: Some(Lower {
            kind: Some(lower_kind),
            colour: Some(lower_colour),
        }),
        shoes: Some(Shoes {
            colour: Some(shoe_colour),
        }),
        belongings: Some(Belongings {
            backpack: Some(rng.gen_bool(0.3)),
            handbag: Some(rng.gen_bool(if woman { 0.25 } else { 0.05 })),
            shoulder_bag: Some(rng.gen_bool(0.12)),
            umbrella: Some(rng.gen_bool(0.06)),
            suitcase: Some(rng.gen_bool(0.04)),
        }),
    };
    let skin = SKIN[rng.gen_range(0..SKIN.len())].map(|v| v as f32 / 255.0);
    let body = Body {
        height: rng.gen_range(0.80..0.95) * if woman { 0.97 } else { 1.0 },
        build: rng.gen_range(0.85..1.2) * if woman { 0.92 } else { 1.0 },
        skin: jitter(skin, rng, 0.03),
        upper_tone: jitter(rgb(upper_colour), rng, 0.05),
        lower_tone: jitter(rgb(lower_colour), rng, 0.05),
        shoe_tone: jitter(rgb(shoe_colour), rng, 0.04),
        hair_tone: jitter(rgb(hair_colour), rng, 0.04),
        accessory: jitter(
            *[
                rgb(Colour::Black),
                rgb(Colour::Brown),
                rgb(Colour::Grey),
                rgb(Colour::Navy),
                rgb(Colour::Red),
            ]
            .choose(rng)
            .unwrap_or(&[0.1; 3]),
            rng,
            0.04,
        ),
    };
    Identity { attributes, body }
}
