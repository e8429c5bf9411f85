//! A tiny float RGB canvas with the shapes the renderer draws and the camera effects it applies.

use rand::Rng;
use rand_distr::{Distribution, Normal};

/// Linear RGB in [0, 1].
pub type Rgb = [f32; 3];

/// A row-major float RGB image.
#[derive(Clone)]
pub struct Canvas {
    pub w: usize,
    pub h: usize,
    pub px: Vec<Rgb>,
}

impl Canvas {
    pub fn new(w: usize, h: usize, fill: Rgb) -> Self {
        Canvas {
            w,
            h,
            px: vec![fill; w * h],
        }
    }

    fn put(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            self.px[y as usize * self.w + x as usize] = c;
        }
    }

    /// Filled axis-aligned rectangle.
    pub fn rect(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, c: Rgb) {
        for y in y0.round() as i64..y1.round() as i64 {
            for x in x0.round() as i64..x1.round() as i64 {
                self.put(x, y, c);
            }
        }
    }

    /// Filled ellipse.
    pub fn ellipse(&mut self, cx: f32, cy: f32, rx: f32, ry: f32, c: Rgb) {
        if rx <= 0.0 || ry <= 0.0 {
            return;
        }
        for y in (cy - ry).floor() as i64..=(cy + ry).ceil() as i64 {
            for x in (cx - rx).floor() as i64..=(cx + rx).ceil() as i64 {
                let dx = (x as f32 + 0.5 - cx) / rx;
                let dy = (y as f32 + 0.5 - cy) / ry;
                if dx * dx + dy * dy <= 1.0 {
                    self.put(x, y, c);
                }
            }
        }
    }

    /// Filled convex polygon (vertices in order); `paint(x, y)` gives each pixel's colour.
    pub fn polygon_with(&mut self, pts: &[(f32, f32)], mut paint: impl FnMut(f32, f32) -> Rgb) {
        if pts.len() < 3 {
            return;
        }
        let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
        for &(x, y) in pts {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        let n = pts.len();
        for y in y0.floor() as i64..=y1.ceil() as i64 {
            for x in x0.floor() as i64..=x1.ceil() as i64 {
                let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                let mut sign = 0i8;
                let mut inside = true;
                for i in 0..n {
                    let (ax, ay) = pts[i];
                    let (bx, by) = pts[(i + 1) % n];
                    let cross = (bx - ax) * (py - ay) - (by - ay) * (px - ax);
                    let s = if cross > 0.0 {
                        1
                    } else if cross < 0.0 {
                        -1
                    } else {
                        0
                    };
                    if s != 0 {
                        if sign == 0 {
                            sign = s;
                        } else if s != sign {
                            inside = false;
                            break;
                        }
                    }
                }
                if inside {
                    self.put(x, y, paint(px, py));
                }
            }
        }
    }

    /// Filled convex polygon of one colour.
    pub fn polygon(&mut self, pts: &[(f32, f32)], c: Rgb) {
        self.polygon_with(pts, |_, _| c);
    }

    /// A segment of the given width with round ends.
    pub fn limb(&mut self, a: (f32, f32), b: (f32, f32), width: f32, c: Rgb) {
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let len = (dx * dx + dy * dy).sqrt().max(1e-3);
        let (nx, ny) = (-dy / len * width / 2.0, dx / len * width / 2.0);
        self.polygon(
            &[
                (a.0 + nx, a.1 + ny),
                (b.0 + nx, b.1 + ny),
                (b.0 - nx, b.1 - ny),
                (a.0 - nx, a.1 - ny),
            ],
            c,
        );
        self.ellipse(a.0, a.1, width / 2.0, width / 2.0, c);
        self.ellipse(b.0, b.1, width / 2.0, width / 2.0, c);
    }

    /// Mirror left–right.
    pub fn mirror(&mut self) {
        for row in self.px.chunks_mut(self.w) {
            row.reverse();
        }
    }

    /// Box blur of the given radius (0 = none).
    pub fn blur(&mut self, radius: usize) {
        if radius == 0 {
            return;
        }
        let (w, h) = (self.w, self.h);
        let mut tmp = self.px.clone();
        for y in 0..h {
            for x in 0..w {
                let mut acc = [0.0; 3];
                let mut n = 0.0;
                for xx in x.saturating_sub(radius)..(x + radius + 1).min(w) {
                    let p = self.px[y * w + xx];
                    acc = [acc[0] + p[0], acc[1] + p[1], acc[2] + p[2]];
                    n += 1.0;
                }
                tmp[y * w + x] = [acc[0] / n, acc[1] / n, acc[2] / n];
            }
        }
        for y in 0..h {
            for x in 0..w {
                let mut acc = [0.0; 3];
                let mut n = 0.0;
                for yy in y.saturating_sub(radius)..(y + radius + 1).min(h) {
                    let p = tmp[yy * w + x];
                    acc = [acc[0] + p[0], acc[1] + p[1], acc[2] + p[2]];
                    n += 1.0;
                }
                self.px[y * w + x] = [acc[0] / n, acc[1] / n, acc[2] / n];
            }
        }
    }

    /// Per-channel gain, then brightness offset, then Gaussian noise of std `sigma`.
    pub fn camera<R: Rng>(&mut self, gain: Rgb, brightness: f32, sigma: f32, rng: &mut R) {
        let noise = Normal::new(0.0f32, sigma.max(1e-6))
            .unwrap_or_else(|_| Normal::new(0.0, 1e-6).expect("std"));
        for p in &mut self.px {
            for c in 0..3 {
                let n = if sigma > 0.0 { noise.sample(rng) } else { 0.0 };
                p[c] = (p[c] * gain[c] + brightness + n).clamp(0.0, 1.0);
            }
        }
    }

    /// Nearest-neighbour resample to `w × h` (used to lose resolution and come back).
    pub fn resample(&self, w: usize, h: usize) -> Canvas {
        let mut out = Canvas::new(w, h, [0.0; 3]);
        for y in 0..h {
            for x in 0..w {
                let sx = ((x as f32 + 0.5) * self.w as f32 / w as f32) as usize;
                let sy = ((y as f32 + 0.5) * self.h as f32 / h as f32) as usize;
                out.px[y * w + x] = self.px[sy.min(self.h - 1) * self.w + sx.min(self.w - 1)];
            }
        }
        out
    }

    /// Bilinear resample (smooth upscaling after a resolution loss).
    pub fn resample_bilinear(&self, w: usize, h: usize) -> Canvas {
        let mut out = Canvas::new(w, h, [0.0; 3]);
        for y in 0..h {
            let fy = ((y as f32 + 0.5) * self.h as f32 / h as f32 - 0.5).max(0.0);
            let y0 = (fy as usize).min(self.h - 1);
            let y1 = (y0 + 1).min(self.h - 1);
            let ty = fy - y0 as f32;
            for x in 0..w {
                let fx = ((x as f32 + 0.5) * self.w as f32 / w as f32 - 0.5).max(0.0);
                let x0 = (fx as usize).min(self.w - 1);
                let x1 = (x0 + 1).min(self.w - 1);
                let tx = fx - x0 as f32;
                let p = |xx: usize, yy: usize| self.px[yy * self.w + xx];
                let mut c = [0.0; 3];
                for (k, v) in c.iter_mut().enumerate() {
                    let top = p(x0, y0)[k] * (1.0 - tx) + p(x1, y0)[k] * tx;
                    let bot = p(x0, y1)[k] * (1.0 - tx) + p(x1, y1)[k] * tx;
                    *v = top * (1.0 - ty) + bot * ty;
                }
                out.px[y * w + x] = c;
            }
        }
        out
    }

    /// 8-bit RGB bytes, row-major.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.px
            .iter()
            .flat_map(|p| p.map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8))
            .collect()
    }
}

/// Scales a colour's brightness.
pub fn shade(c: Rgb, f: f32) -> Rgb {
    [
        (c[0] * f).min(1.0),
        (c[1] * f).min(1.0),
        (c[2] * f).min(1.0),
    ]
}
