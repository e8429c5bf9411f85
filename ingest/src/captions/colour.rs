//! Colour names of pixels (HSV rules, looked up in a table) and of a person crop's regions.

use crate::attributes::{Attributes, Colour, Head, Lower, Shoes, Upper};
use image::RgbImage;

/// Names the dominant colour of a region, or `None` when no colour covers at least 35% of it.
/// The region is sampled on a grid of every `step`-th row and column.
fn region_colour(
    img: &RgbImage,
    step: usize,
    y0: f32,
    y1: f32,
    x0: f32,
    x1: f32,
) -> Option<Colour> {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let mut counts = [0usize; 16];
    let mut total = 0usize;
    let table = ColourTable::get();
    let width = img.width() as usize;
    let (xs, xe) = ((x0 * w) as usize, ((x1 * w) as usize).min(width));
    let raw = img.as_raw();
    for y in ((y0 * h) as usize..((y1 * h) as usize).min(img.height() as usize)).step_by(step) {
        let Some(row) = raw.get((y * width + xs) * 3..(y * width + xe) * 3) else {
            continue;
        };
        for px in row.chunks_exact(3).step_by(step) {
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
    let step = sample_step(img.height());
    let hair = region_colour(img, step, 0.02, 0.09, 0.38, 0.62);
    let top = region_colour(img, step, 0.22, 0.48, 0.3, 0.7);
    let legs = region_colour(img, step, 0.56, 0.84, 0.32, 0.68);
    let feet = region_colour(img, step, 0.92, 0.99, 0.3, 0.7);
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

/// Rows (and columns) between two sampled pixels: the regions are read on a grid about 64 rows
/// high whatever the image's size (every 2nd pixel of a 128×64 crop, every 4th of the canonical
/// 256×128), enough to find a colour that covers a third of a region at a quarter of the
/// look-ups or less (measured: colour naming was 8–11% of intake's CPU for 128×64 JPEGs with
/// every pixel read).
fn sample_step(height: u32) -> usize {
    (height as usize / 64).max(1)
}

/// Builds the colour-name table now rather than on the first image that needs it (about 0.1 s
/// on one core): intake calls it before it starts consuming.
pub fn prepare_colour_table() {
    ColourTable::get();
}
