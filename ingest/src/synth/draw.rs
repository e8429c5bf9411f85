//! The procedural drawing of one view of a person: the figure's measurements ([`Figure`]),
//! then back to front — hair behind, backpack behind, legs, torso, arms, head, carried things.

use super::identity::{rgb, Body, Identity};
use super::raster::{shade, Canvas, Rgb};
use crate::attributes::*;

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

/// The figure's measurements on the canvas for one view, computed once per image.
#[derive(Clone, Copy)]
struct Figure<'a> {
    b: &'a Body,
    pose: &'a Pose,
    head: Head,
    bel: Belongings,
    /// Figure height in pixels, top and horizontal centre.
    ph: f32,
    top: f32,
    cx: f32,
    side: bool,
    /// Half shoulder width, half hip width.
    sw: f32,
    hw: f32,
    head_r: f32,
    head_cy: f32,
    shoulder_y: f32,
    hip_y: f32,
    knee_y: f32,
    foot_y: f32,
    limb_w: f32,
    leg_w: f32,
    skin: Rgb,
    up: Rgb,
    lo: Rgb,
    kind: UpperType,
    lkind: LowerType,
    pattern: Pattern,
    hair_len: HairLength,
    hair_bottom: Option<f32>,
}

impl<'a> Figure<'a> {
    fn new(c: &Canvas, id: &'a Identity, pose: &'a Pose) -> Figure<'a> {
        let a = &id.attributes;
        let b = &id.body;
        let head = a.head.unwrap_or_default();
        let upper = a.upper.unwrap_or_default();
        let lower = a.lower.unwrap_or_default();
        let ph = c.h as f32 * b.height * pose.scale;
        let top = pose.top;
        let y = |f: f32| top + f * ph;
        let side = pose.view == View::Side;
        let hair_len = head.hair_length.unwrap_or(HairLength::Short);
        Figure {
            b,
            pose,
            head,
            bel: a.belongings.unwrap_or_default(),
            ph,
            top,
            cx: pose.cx,
            side,
            sw: 0.125 * ph * b.build * if side { 0.55 } else { 1.0 },
            hw: 0.095 * ph * b.build * if side { 0.6 } else { 1.0 },
            head_r: 0.058 * ph,
            head_cy: y(0.07),
            shoulder_y: y(0.165),
            hip_y: y(0.49),
            knee_y: y(0.72),
            foot_y: y(0.965),
            limb_w: 0.055 * ph,
            leg_w: 0.075 * ph * b.build.sqrt(),
            skin: b.skin,
            up: b.upper_tone,
            lo: b.lower_tone,
            kind: upper.kind.unwrap_or(UpperType::TShirt),
            lkind: lower.kind.unwrap_or(LowerType::Trousers),
            pattern: upper.pattern.unwrap_or(Pattern::Plain),
            hair_len,
            hair_bottom: match hair_len {
                HairLength::Long => Some(y(0.3)),
                HairLength::Medium => Some(y(0.17)),
                _ => None,
            },
        }
    }

    /// The canvas row at fraction `f` of the figure's height.
    fn y(&self, f: f32) -> f32 {
        self.top + f * self.ph
    }
}

/// Draws one view of `id` onto `c`, back to front.
pub fn draw(c: &mut Canvas, id: &Identity, pose: &Pose) {
    let f = Figure::new(c, id, pose);
    hair_behind(c, &f);
    backpack_behind(c, &f);
    legs(c, &f);
    torso(c, &f);
    let hands = arms(c, &f);
    head(c, &f);
    carried(c, &f, &hands);
}

/// Long hair hangs behind the body (seen from the back it covers the upper back).
fn hair_behind(c: &mut Canvas, f: &Figure<'_>) {
    let Figure {
        b,
        pose,
        cx,
        head_r,
        head_cy,
        hair_bottom,
        ..
    } = *f;
    // Long hair hangs behind the body (seen from the back it covers the upper back).
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
}

/// A backpack seen from the front or side sits behind the torso.
fn backpack_behind(c: &mut Canvas, f: &Figure<'_>) {
    let Figure {
        b,
        pose,
        bel,
        ph,
        cx,
        side,
        sw,
        shoulder_y,
        ..
    } = *f;
    let y = |v: f32| f.y(v);
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
}

/// Legs, shoes, and a skirt over them.
fn legs(c: &mut Canvas, f: &Figure<'_>) {
    let Figure {
        b,
        pose,
        ph,
        cx,
        side,
        hw,
        hip_y,
        knee_y,
        foot_y,
        leg_w,
        skin,
        lo,
        kind,
        lkind,
        ..
    } = *f;
    let y = |v: f32| f.y(v);
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
}

/// The torso and its garment details.
fn torso(c: &mut Canvas, f: &Figure<'_>) {
    let Figure {
        pose,
        ph,
        cx,
        sw,
        hw,
        shoulder_y,
        hip_y,
        up,
        kind,
        pattern,
        ..
    } = *f;
    let y = |v: f32| f.y(v);
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
}

/// Arms (sleeves follow the garment); returns the hands.
fn arms(c: &mut Canvas, f: &Figure<'_>) -> Vec<(f32, f32)> {
    let Figure {
        pose,
        ph,
        cx,
        side,
        sw,
        shoulder_y,
        limb_w,
        skin,
        up,
        kind,
        ..
    } = *f;
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
    hands
}

/// Neck, head, hair, hat and glasses.
fn head(c: &mut Canvas, f: &Figure<'_>) {
    let Figure {
        b,
        pose,
        head,
        cx,
        side,
        head_r,
        head_cy,
        shoulder_y,
        skin,
        hair_len,
        hair_bottom,
        ..
    } = *f;
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
}

/// Carried things: backpack straps or pack, shoulder bag, handbag, suitcase, umbrella.
fn carried(c: &mut Canvas, f: &Figure<'_>, hands: &[(f32, f32)]) {
    let Figure {
        b,
        pose,
        bel,
        ph,
        cx,
        sw,
        hw,
        shoulder_y,
        hip_y,
        foot_y,
        ..
    } = *f;
    let y = |v: f32| f.y(v);
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
