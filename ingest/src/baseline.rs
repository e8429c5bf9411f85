//! The colour-histogram ReID baseline, the floor every learned result is shown against: HSV
//! histograms (8 hue × 3 saturation × 3 value bins) over 6 equal horizontal stripes, each stripe
//! L1-normalised, concatenated (432 values); compared by cosine distance.

use image::RgbImage;

/// Bins of one stripe.
pub const BINS: usize = 8 * 3 * 3;
/// Horizontal stripes.
pub const STRIPES: usize = 6;

/// Hue in [0, 360), saturation and value in [0, 1].
pub fn hsv([r, g, b]: [u8; 3]) -> (f32, f32, f32) {
    let (r, g, b) = (r as f32 / 255.0, g as f32 / 255.0, b as f32 / 255.0);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let h = if d == 0.0 {
        0.0
    } else if max == r {
        60.0 * ((g - b) / d).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / d + 2.0)
    } else {
        60.0 * ((r - g) / d + 4.0)
    };
    (h, if max > 0.0 { d / max } else { 0.0 }, max)
}

/// The 432-value descriptor of an image.
pub fn descriptor(img: &RgbImage) -> Vec<f32> {
    let mut out = vec![0.0f32; BINS * STRIPES];
    let h = img.height().max(1);
    for (_, y, p) in img.enumerate_pixels() {
        let stripe = ((y as usize * STRIPES) / h as usize).min(STRIPES - 1);
        let (hu, s, v) = hsv(p.0);
        let hb = ((hu / 45.0) as usize).min(7);
        let sb = ((s * 3.0) as usize).min(2);
        let vb = ((v * 3.0) as usize).min(2);
        out[stripe * BINS + hb * 9 + sb * 3 + vb] += 1.0;
    }
    for stripe in out.chunks_mut(BINS) {
        let sum: f32 = stripe.iter().sum();
        if sum > 0.0 {
            stripe.iter_mut().for_each(|v| *v /= sum);
        }
    }
    out
}

/// Cosine distance `1 − cos(a, b)`.
pub fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        1.0
    } else {
        1.0 - dot / (na * nb)
    }
}
