//! Identities (a fixed attribute set plus a body) and the procedural drawing of one view of a
//! person: pose, garments with their patterns, hair, accessories.

use super::raster::{shade, Canvas, Rgb};
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

/// The direction the person faces in one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Front,
    Back,
    Side,
}

/// Per-image pose.
#[derive(Debug, Clone, Copy)]
pub struct Pose {
    pub view: View,
    /// Leg spread angle (radians).
    pub stride: f32,
    /// Arm swing angle (radians).
    pub swing: f32,
    /// Horizontal centre, top and scale of the figure on the canvas.
    pub cx: f32,
    pub top: f32,
    pub scale: f32,
}

fn pattern_paint(base: Rgb, pattern: Pattern, x0: f32, y0: f32) -> impl FnMut(f32, f32) -> Rgb {
    let dark = shade(
        base,
        if base.iter().sum::<f32>() < 0.4 {
            2.2
        } else {
            0.55
        },
    );
    move |x, y| {
        let (u, v) = (x - x0, y - y0);
        let shaded = shade(base, 1.05 - 0.12 * (v / 60.0).clamp(0.0, 1.0));
        match pattern {
            Pattern::Striped if (v as i32).rem_euclid(8) < 3 => dark,
            Pattern::Checked if (u as i32).rem_euclid(9) < 2 || (v as i32).rem_euclid(9) < 2 => {
                dark
            }
            Pattern::Floral if (u as i32 * 7 + v as i32 * 13).rem_euclid(23) < 3 => {
                [0.9, 0.85, 0.3]
            }
            _ => shaded,
        }
    }
}

/// Draws one view of `id` onto `c`.
pub fn draw(c: &mut Canvas, id: &Identity, pose: &Pose) {
    let a = &id.attributes;
    let b = &id.body;
    let head = a.head.unwrap_or_default();
    let upper = a.upper.unwrap_or_default();
    let lower = a.lower.unwrap_or_default();
    let bel = a.belongings.unwrap_or_default();
    let ph = c.h as f32 * b.height * pose.scale;
    let top = pose.top;
    let cx = pose.cx;
    let y = |f: f32| top + f * ph;
    let side = pose.view == View::Side;
    let sw = 0.125 * ph * b.build * if side { 0.55 } else { 1.0 }; // half shoulder width
    let hw = 0.095 * ph * b.build * if side { 0.6 } else { 1.0 }; // half hip width
    let head_r = 0.058 * ph;
    let head_cy = y(0.07);
    let (shoulder_y, hip_y, knee_y, foot_y) = (y(0.165), y(0.49), y(0.72), y(0.965));
    let limb_w = 0.055 * ph;
    let leg_w = 0.075 * ph * b.build.sqrt();
    let skin = b.skin;
    let up = b.upper_tone;
    let lo = b.lower_tone;
    let kind = upper.kind.unwrap_or(UpperType::TShirt);
    let lkind = lower.kind.unwrap_or(LowerType::Trousers);
    let pattern = upper.pattern.unwrap_or(Pattern::Plain);

    // Long hair hangs behind the body (seen from the back it covers the upper back).
    let hair_len = head.hair_length.unwrap_or(HairLength::Short);
    let hair_bottom = match hair_len {
        HairLength::Long => Some(y(0.3)),
        HairLength::Medium => Some(y(0.17)),
        _ => None,
    };
    if let (Some(hb), false) = (hair_bottom, pose.view == View::Back) {
        c.polygon(
            &[
                (cx - head_r * 1.15, head_cy),
                (cx + head_r * 1.15, head_cy),
                (cx + head_r * 1.25, hb),
                (cx - head_r * 1.25, hb),
            ],
            b.hair_tone,
        );
    }
    // Backpack seen from the front or side sits behind the torso.
    if bel.backpack == Some(true) && pose.view != View::Back {
        let off = if side { -sw * 1.6 } else { 0.0 };
        c.rect(
            cx + off - sw * 0.85,
            shoulder_y + 0.02 * ph,
            cx + off + sw * 0.85,
            y(0.42),
            b.accessory,
        );
    }
    // Legs.
    let hip_l = (cx - hw * 0.5, hip_y);
    let hip_r = (cx + hw * 0.5, hip_y);
    let dx = (foot_y - hip_y) * pose.stride.tan();
    let foot_l = (hip_l.0 - dx * 0.5, foot_y);
    let foot_r = (hip_r.0 + dx * 0.5, foot_y);
    let knee = |h: (f32, f32), f: (f32, f32)| (h.0 + (f.0 - h.0) * 0.5, knee_y);
    let (leg_colour, lower_leg) = match lkind {
        LowerType::Shorts => (lo, skin),
        LowerType::Skirt => (skin, skin),
        _ => (lo, lo),
    };
    let leg_colour = if kind == UpperType::Dress {
        skin
    } else {
        leg_colour
    };
    let lower_leg = if kind == UpperType::Dress {
        skin
    } else {
        lower_leg
    };
    for (h, f) in [(hip_l, foot_l), (hip_r, foot_r)] {
        let k = knee(h, f);
        c.limb(h, k, leg_w, leg_colour);
        c.limb(k, f, leg_w * 0.85, lower_leg);
        if lkind == LowerType::Jeans && kind != UpperType::Dress {
            c.limb(
                (k.0, k.1 + 0.05 * ph),
                (f.0, f.1 - 0.04 * ph),
                1.5,
                shade(lo, 1.25),
            );
        }
        // Shoes.
        let dir = if side { 1.0 } else { 0.0 };
        c.ellipse(
            f.0 + dir * leg_w * 0.4,
            f.1 + 0.01 * ph,
            leg_w * 0.62 + dir * leg_w * 0.3,
            0.022 * ph,
            b.shoe_tone,
        );
    }
    if lkind == LowerType::Skirt && kind != UpperType::Dress {
        c.polygon_with(
            &[
                (cx - hw * 1.05, hip_y - 0.02 * ph),
                (cx + hw * 1.05, hip_y - 0.02 * ph),
                (cx + hw * 1.5, y(0.68)),
                (cx - hw * 1.5, y(0.68)),
            ],
            |_, yy| shade(lo, 1.0 - 0.1 * ((yy - hip_y) / (0.2 * ph)).clamp(0.0, 1.0)),
        );
    }
    // Torso (a dress or a coat reaches further down).
    let torso_bottom = match kind {
        UpperType::Coat => y(0.7),
        UpperType::Dress => y(0.7),
        _ => hip_y + 0.01 * ph,
    };
    let flare = if matches!(kind, UpperType::Dress | UpperType::Coat) {
        1.45
    } else {
        1.0
    };
    let torso = [
        (cx - sw, shoulder_y),
        (cx + sw, shoulder_y),
        (cx + hw * flare * 1.1, torso_bottom),
        (cx - hw * flare * 1.1, torso_bottom),
    ];
    c.polygon_with(&torso, pattern_paint(up, pattern, cx - sw, shoulder_y));
    if pattern == Pattern::Logo && pose.view == View::Front {
        let contrast = if up.iter().sum::<f32>() > 1.5 {
            [0.15, 0.2, 0.5]
        } else {
            [0.92, 0.9, 0.85]
        };
        c.rect(cx - sw * 0.4, y(0.24), cx + sw * 0.4, y(0.32), contrast);
    }
    if pose.view == View::Front {
        match kind {
            UpperType::Jacket | UpperType::Coat => {
                c.rect(
                    cx - 0.8,
                    shoulder_y + 2.0,
                    cx + 0.8,
                    torso_bottom,
                    shade(up, 0.5),
                );
                c.polygon(
                    &[
                        (cx - sw * 0.35, shoulder_y),
                        (cx + sw * 0.35, shoulder_y),
                        (cx, y(0.27)),
                    ],
                    shade(rgb(Colour::White), 0.9),
                );
            }
            UpperType::Shirt => {
                c.polygon(
                    &[
                        (cx - sw * 0.3, shoulder_y),
                        (cx + sw * 0.3, shoulder_y),
                        (cx, y(0.21)),
                    ],
                    shade(up, 1.3),
                );
            }
            _ => {}
        }
    }
    if kind == UpperType::Hoodie {
        c.ellipse(
            cx,
            shoulder_y - 0.01 * ph,
            sw * 0.55,
            0.04 * ph,
            shade(up, 0.85),
        );
    }
    // Arms: sleeves follow the garment.
    let (sleeve_to, fore) = match kind {
        UpperType::TShirt | UpperType::Dress => (0.45, skin),
        UpperType::Vest => (0.0, skin),
        _ => (1.0, up),
    };
    let arm_len = 0.34 * ph;
    let arms: Vec<(f32, f32)> = if side {
        vec![(cx, shoulder_y + 0.02 * ph)]
    } else {
        vec![
            (cx - sw * 1.02, shoulder_y + 0.02 * ph),
            (cx + sw * 1.02, shoulder_y + 0.02 * ph),
        ]
    };
    let mut hands = Vec::new();
    for (i, &s) in arms.iter().enumerate() {
        let ang = if i == 0 { pose.swing } else { -pose.swing }
            + if side {
                0.0
            } else if i == 0 {
                0.12
            } else {
                -0.12
            };
        let hand = (s.0 - arm_len * ang.sin(), s.1 + arm_len * ang.cos());
        let elbow = (s.0 + (hand.0 - s.0) * 0.5, s.1 + (hand.1 - s.1) * 0.5);
        let upper_arm = if sleeve_to > 0.0 { up } else { skin };
        c.limb(s, elbow, limb_w, upper_arm);
        c.limb(
            elbow,
            hand,
            limb_w * 0.85,
            if sleeve_to >= 1.0 { fore } else { skin },
        );
        c.ellipse(hand.0, hand.1, limb_w * 0.5, limb_w * 0.55, skin);
        hands.push(hand);
    }
    // Neck and head.
    c.rect(
        cx - head_r * 0.4,
        head_cy + head_r * 0.8,
        cx + head_r * 0.4,
        shoulder_y + 1.0,
        skin,
    );
    c.ellipse(
        cx,
        head_cy,
        head_r * if side { 0.9 } else { 0.85 },
        head_r,
        skin,
    );
    match (hair_len, pose.view) {
        (HairLength::Bald, _) => {}
        (_, View::Back) => {
            c.ellipse(cx, head_cy, head_r * 0.9, head_r * 1.02, b.hair_tone);
            if let Some(hb) = hair_bottom {
                c.polygon(
                    &[
                        (cx - head_r, head_cy),
                        (cx + head_r, head_cy),
                        (cx + head_r * 1.1, hb),
                        (cx - head_r * 1.1, hb),
                    ],
                    b.hair_tone,
                );
            }
        }
        _ => {
            c.ellipse(
                cx,
                head_cy - head_r * 0.45,
                head_r * 0.92,
                head_r * 0.62,
                b.hair_tone,
            );
        }
    }
    if head.hat == Some(true) {
        c.rect(
            cx - head_r * 0.95,
            head_cy - head_r * 1.25,
            cx + head_r * 0.95,
            head_cy - head_r * 0.45,
            b.accessory,
        );
        c.rect(
            cx - head_r * 1.3,
            head_cy - head_r * 0.55,
            cx + head_r * 1.3,
            head_cy - head_r * 0.4,
            shade(b.accessory, 0.8),
        );
    }
    if head.glasses == Some(true) && pose.view != View::Back {
        c.rect(
            cx - head_r * 0.75,
            head_cy - head_r * 0.05,
            cx + head_r * 0.75,
            head_cy + head_r * 0.18,
            [0.05, 0.05, 0.06],
        );
    }
    // Carried things.
    if bel.backpack == Some(true) {
        match pose.view {
            View::Back => c.rect(
                cx - sw * 0.8,
                shoulder_y + 0.03 * ph,
                cx + sw * 0.8,
                y(0.41),
                b.accessory,
            ),
            View::Front => {
                c.limb(
                    (cx - sw * 0.6, shoulder_y),
                    (cx - sw * 0.55, y(0.33)),
                    2.5,
                    shade(b.accessory, 0.8),
                );
                c.limb(
                    (cx + sw * 0.6, shoulder_y),
                    (cx + sw * 0.55, y(0.33)),
                    2.5,
                    shade(b.accessory, 0.8),
                );
            }
            View::Side => {}
        }
    }
    if bel.shoulder_bag == Some(true) {
        c.limb(
            (cx - sw * 0.8, shoulder_y),
            (cx + hw * 1.2, hip_y - 0.02 * ph),
            2.0,
            shade(b.accessory, 0.7),
        );
        c.rect(
            cx + hw * 0.9,
            hip_y - 0.05 * ph,
            cx + hw * 1.9,
            hip_y + 0.05 * ph,
            b.accessory,
        );
    }
    if let Some(&hand) = hands.last() {
        if bel.handbag == Some(true) {
            c.rect(
                hand.0 - 0.04 * ph,
                hand.1,
                hand.0 + 0.04 * ph,
                hand.1 + 0.07 * ph,
                shade(b.accessory, 1.1),
            );
        }
        if bel.suitcase == Some(true) {
            let x = hand.0 + 0.02 * ph;
            c.rect(
                x,
                hand.1 + 0.06 * ph,
                x + 0.12 * ph,
                foot_y,
                [0.12, 0.14, 0.2],
            );
            c.limb(
                (hand.0, hand.1),
                (x + 0.03 * ph, hand.1 + 0.06 * ph),
                2.0,
                [0.1, 0.1, 0.1],
            );
        }
    }
    if let (Some(&hand), true) = (hands.first(), bel.umbrella == Some(true)) {
        c.limb(
            hand,
            (hand.0 - 0.03 * ph, hand.1 + 0.28 * ph),
            2.5,
            [0.08, 0.08, 0.1],
        );
        c.polygon(
            &[
                (hand.0 - 0.01 * ph, hand.1 + 0.02 * ph),
                (hand.0 + 0.03 * ph, hand.1 + 0.2 * ph),
                (hand.0 - 0.05 * ph, hand.1 + 0.2 * ph),
            ],
            shade(b.accessory, 0.9),
        );
    }
}
