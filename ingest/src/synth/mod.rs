//! The synthetic pedestrian generator behind `plipd synth`: procedural person crops whose
//! identity is a fixed attribute set plus a body, rendered under varying camera, pose, view,
//! background clutter, occlusion and crop jitter, written in the Market-1501 folder layout with
//! a SYNTH-PEDES-style JSON of attributes and captions.
//!
//! Everything is deterministic for a seed: each image has its own random stream derived from
//! (seed, person, image index), so output bytes do not depend on the thread count.

mod draw;
mod identity;
mod raster;

pub use draw::{draw, Pose, View};
pub use identity::{sample_identity, Identity};
pub use raster::Canvas;

use crate::attributes::Attributes;
use crate::captions::{synthesize, Caption};
use crate::image::{CANONICAL_HEIGHT, CANONICAL_WIDTH};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The generator's knobs. The defaults are the data set every quality figure in the README was
/// measured on; change them only with a new measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthConfig {
    /// Seed of everything.
    pub seed: u64,
    /// Identities in `bounding_box_train/`.
    pub train_ids: usize,
    /// Identities in `query/` + `bounding_box_test/` (disjoint from the training ones).
    pub test_ids: usize,
    /// Images rendered per identity.
    pub images_per_id: usize,
    /// Query images per test identity, each from a different camera.
    pub queries_per_id: usize,
    /// Number of cameras (each has its own colour cast and white balance).
    pub cameras: usize,
    /// 0 (clean studio crops) … 1 (hard): scales every nuisance (camera, pose, clutter,
    /// occlusion, jitter, resolution loss).
    pub difficulty: f64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 7,
            train_ids: 500,
            test_ids: 200,
            images_per_id: 8,
            queries_per_id: 2,
            cameras: 6,
            difficulty: 0.7,
        }
    }
}

/// One rendered image and where it belongs.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub person: u32,
    pub camera: u32,
    pub frame: u32,
    pub split: Split,
    /// `H×W×3` bytes at the canonical 256×128.
    pub rgb: Vec<u8>,
}

/// Market-1501 folder of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Query,
    Gallery,
}

impl Split {
    /// Folder name in the Market-1501 layout.
    pub fn folder(self) -> &'static str {
        match self {
            Split::Train => "bounding_box_train",
            Split::Query => "query",
            Split::Gallery => "bounding_box_test",
        }
    }
}

/// Per-camera constants.
#[derive(Debug, Clone, Copy)]
struct Camera {
    gain: [f32; 3],
    brightness: f32,
    backdrop: [f32; 3],
}

fn cameras(cfg: &SynthConfig) -> Vec<Camera> {
    let d = cfg.difficulty as f32;
    (0..cfg.cameras)
        .map(|i| {
            let mut rng = StdRng::seed_from_u64(cfg.seed ^ (0xca3e_0000 + i as u64));
            let cast = 0.18 * d;
            Camera {
                gain: [0; 3].map(|_| 1.0 + rng.gen_range(-cast..=cast)),
                brightness: rng.gen_range(-0.08..=0.08) * d,
                backdrop: [0; 3].map(|_| rng.gen_range(0.25..0.7)),
            }
        })
        .collect()
}

fn muted<R: Rng>(rng: &mut R) -> [f32; 3] {
    let base = rng.gen_range(0.2..0.75);
    [0; 3].map(|_| (base + rng.gen_range(-0.15..0.15f32)).clamp(0.0, 1.0))
}

/// Renders one image of `id` seen by `cam`.
fn render(id: &Identity, cam: &Camera, cfg: &SynthConfig, rng: &mut StdRng) -> Vec<u8> {
    let (w, h) = (CANONICAL_WIDTH as usize, CANONICAL_HEIGHT as usize);
    let d = cfg.difficulty as f32;
    let mut c = Canvas::new(w, h, cam.backdrop);
    // Background: a wall, a ground plane and clutter.
    let ground = rng.gen_range(0.7..0.9) * h as f32;
    c.rect(
        0.0,
        ground,
        w as f32,
        h as f32,
        raster::shade(cam.backdrop, 0.7),
    );
    let clutter = (rng.gen_range(0.0..6.0) * d).round() as usize;
    for _ in 0..clutter {
        let x0 = rng.gen_range(-20.0..w as f32);
        let y0 = rng.gen_range(-20.0..h as f32);
        let col = muted(rng);
        c.rect(
            x0,
            y0,
            x0 + rng.gen_range(8.0..50.0),
            y0 + rng.gen_range(8.0..90.0),
            col,
        );
    }
    // Pose, view and crop jitter.
    let view = *[View::Front, View::Front, View::Back, View::Back, View::Side]
        .choose(rng)
        .unwrap_or(&View::Front);
    let pose = Pose {
        view,
        stride: rng.gen_range(0.0..0.35) * (0.4 + d),
        swing: rng.gen_range(-0.45..0.45) * (0.4 + d),
        cx: w as f32 / 2.0 + rng.gen_range(-10.0..10.0) * d,
        top: rng.gen_range(2.0..6.0) + rng.gen_range(0.0..12.0) * d,
        scale: 1.0 + rng.gen_range(-0.08..0.04) * d,
    };
    draw(&mut c, id, &pose);
    // Partial occlusion: something in front of the legs or a side.
    if rng.gen_bool((0.35 * d as f64).clamp(0.0, 1.0)) {
        let col = muted(rng);
        if rng.gen_bool(0.5) {
            let y0 = rng.gen_range(0.6..0.85) * h as f32;
            c.rect(0.0, y0, w as f32, h as f32, col);
        } else {
            let wide = rng.gen_range(0.15..0.35) * w as f32;
            let x0 = if rng.gen_bool(0.5) {
                0.0
            } else {
                w as f32 - wide
            };
            c.rect(
                x0,
                rng.gen_range(0.0..0.5) * h as f32,
                x0 + wide,
                h as f32,
                col,
            );
        }
    }
    if rng.gen_bool(0.5) {
        c.mirror();
    }
    // Camera: colour cast, exposure, resolution loss, blur, noise.
    let brightness = cam.brightness + rng.gen_range(-0.12..0.12) * d;
    let gain = cam.gain.map(|g| g * (1.0 + rng.gen_range(-0.05..0.05) * d));
    let res = 1.0 - rng.gen_range(0.0..0.65) * d;
    if res < 0.97 {
        let small = c.resample(
            ((w as f32 * res) as usize).max(16),
            ((h as f32 * res) as usize).max(32),
        );
        c = small.resample_bilinear(w, h);
    }
    c.blur((rng.gen_range(0.0..2.2) * d) as usize);
    c.camera(gain, brightness, rng.gen_range(0.0..0.05) * d, rng);
    c.to_bytes()
}

/// The identities of a data set, train first: `(person id, identity)`.
pub fn identities(cfg: &SynthConfig) -> Vec<(u32, Identity)> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    (0..cfg.train_ids + cfg.test_ids)
        .map(|i| (i as u32 + 1, sample_identity(&mut rng)))
        .collect()
}

/// Renders every image of the data set (in parallel, deterministically).
pub fn render_all(cfg: &SynthConfig) -> Vec<(Rendered, usize)> {
    let ids = identities(cfg);
    let cams = cameras(cfg);
    let mut jobs = Vec::new();
    let mut frame = 0u32;
    for (k, (pid, _)) in ids.iter().enumerate() {
        let test = k >= cfg.train_ids;
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ (u64::from(*pid) << 20));
        let mut order: Vec<u32> = (0..cfg.cameras as u32).collect();
        order.shuffle(&mut rng);
        let queries = if test {
            cfg.queries_per_id
                .min(cfg.cameras.saturating_sub(1))
                .min(cfg.images_per_id.saturating_sub(1))
        } else {
            0
        };
        for i in 0..cfg.images_per_id {
            let camera = order[i % order.len()];
            let split = if !test {
                Split::Train
            } else if i < queries {
                Split::Query
            } else {
                Split::Gallery
            };
            frame += 1;
            jobs.push((k, *pid, camera, frame, split, i));
        }
    }
    jobs.par_iter()
        .map(|&(k, pid, camera, frame, split, i)| {
            let mut rng = StdRng::seed_from_u64(
                cfg.seed.wrapping_mul(0x9e37_79b9) ^ (u64::from(pid) << 24) ^ i as u64,
            );
            let rgb = render(&ids[k].1, &cams[camera as usize], cfg, &mut rng);
            (
                Rendered {
                    person: pid,
                    camera: camera + 1,
                    frame,
                    split,
                    rgb,
                },
                k,
            )
        })
        .collect()
}

/// One record of the SYNTH-PEDES-style JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Person id.
    pub id: u32,
    /// Path relative to the data-set folder.
    pub file_path: String,
    /// The identity's attributes.
    pub attributes: Attributes,
    /// Two captions in different styles.
    pub captions: Vec<String>,
    /// The template caption.
    pub prompt_caption: String,
    /// Attribute-phrase spans of each caption (same order as `captions`).
    pub caption_phrases: Vec<Vec<crate::captions::Phrase>>,
    /// Camera number (1-based).
    pub camera: u32,
    /// Market-1501 folder.
    pub split: Split,
}

/// Market-1501 file name: `0002_c1s1_000451_00.jpg`.
pub fn market_name(person: u32, camera: u32, frame: u32) -> String {
    format!("{person:04}_c{camera}s1_{frame:06}_00.jpg")
}

/// Name of the JSON written next to the folders.
pub const JSON_NAME: &str = "synthpedes.json";

/// Counts of what [`write`] produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Written {
    pub train_images: usize,
    pub query_images: usize,
    pub gallery_images: usize,
    pub train_ids: usize,
    pub test_ids: usize,
}

/// Renders the data set into `dir` (Market-1501 folders, JPEG quality 92, plus
/// [`JSON_NAME`]). `progress` is called with (done, total) as images are written.
///
/// # Errors
/// A file that cannot be written.
pub fn write(
    cfg: &SynthConfig,
    dir: &Path,
    mut progress: impl FnMut(usize, usize),
) -> std::io::Result<Written> {
    for s in [Split::Train, Split::Query, Split::Gallery] {
        std::fs::create_dir_all(dir.join(s.folder()))?;
    }
    let ids = identities(cfg);
    let rendered = render_all(cfg);
    let total = rendered.len();
    let mut records = Vec::with_capacity(total);
    let mut written = Written {
        train_ids: cfg.train_ids,
        test_ids: cfg.test_ids,
        ..Default::default()
    };
    for (n, (r, k)) in rendered.into_iter().enumerate() {
        let name = market_name(r.person, r.camera, r.frame);
        let rel = PathBuf::from(r.split.folder()).join(&name);
        let img = image::RgbImage::from_raw(CANONICAL_WIDTH, CANONICAL_HEIGHT, r.rgb)
            .ok_or_else(|| std::io::Error::other("rendered image has the wrong size"))?;
        let jpeg = crate::image::to_jpeg(&img, 92).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(&rel), jpeg)?;
        let attrs = ids[k].1.attributes;
        let set = synthesize(&attrs, cfg.seed ^ (u64::from(r.frame) << 8));
        let (texts, phrases): (Vec<String>, Vec<Vec<_>>) = set
            .captions
            .into_iter()
            .map(|c: Caption| (c.text, c.phrases))
            .unzip();
        records.push(Record {
            id: r.person,
            file_path: rel.to_string_lossy().replace('\\', "/"),
            attributes: attrs,
            captions: texts,
            prompt_caption: set.prompt.text,
            caption_phrases: phrases,
            camera: r.camera,
            split: r.split,
        });
        match r.split {
            Split::Train => written.train_images += 1,
            Split::Query => written.query_images += 1,
            Split::Gallery => written.gallery_images += 1,
        }
        progress(n + 1, total);
    }
    let json = serde_json::to_vec_pretty(&records).map_err(std::io::Error::other)?;
    std::fs::write(dir.join(JSON_NAME), json)?;
    Ok(written)
}
