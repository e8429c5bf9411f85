//! Image intake shared by every path (queue, data-set readers, queries): the checks every image
//! passes before it is decoded, the decode itself with explicit `image` crate limits, and the
//! canonical form samples are stored in.
//!
//! Order of checks: byte size → empty → format (JPEG, PNG, WebP only, from the magic bytes) →
//! declared dimensions from the header alone (zero size, pixel limit: a decompression bomb is
//! refused before anything is allocated for its pixels) → decode under `max_alloc`.

use image::{ImageFormat, ImageReader, Limits, RgbImage};
use std::io::Cursor;

/// Width of the canonical stored sample (the largest preset's input).
pub const CANONICAL_WIDTH: u32 = 128;
/// Height of the canonical stored sample.
pub const CANONICAL_HEIGHT: u32 = 256;

/// Limits applied to every incoming image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeLimits {
    /// Largest encoded image accepted, in bytes.
    pub max_bytes: usize,
    /// Largest width × height accepted, read from the header before decoding.
    pub max_pixels: u64,
}

impl Default for IntakeLimits {
    fn default() -> Self {
        IntakeLimits {
            max_bytes: 16 << 20,
            max_pixels: 4096 * 4096,
        }
    }
}

/// Why an image was refused. [`ImageError::code`] is the stable code producers see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("the image is empty (0 bytes)")]
    Empty,
    #[error("the image is {bytes} bytes, over the limit of {limit}")]
    TooManyBytes { bytes: usize, limit: usize },
    #[error("unsupported image format {0}; JPEG, PNG and WebP are accepted")]
    UnsupportedFormat(String),
    #[error("the image declares a zero size ({width}×{height})")]
    ZeroSize { width: u32, height: u32 },
    #[error("the image declares {width}×{height} pixels, over the limit of {limit}")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("the image cannot be decoded: {0}")]
    Undecodable(String),
}

impl ImageError {
    /// Stable snake_case code of the reason.
    pub fn code(&self) -> &'static str {
        match self {
            ImageError::Empty => "image_empty",
            ImageError::TooManyBytes { .. } => "image_too_many_bytes",
            ImageError::UnsupportedFormat(_) => "image_unsupported_format",
            ImageError::ZeroSize { .. } => "image_zero_size",
            ImageError::TooManyPixels { .. } => "image_too_many_pixels",
            ImageError::Undecodable(_) => "image_undecodable",
        }
    }
}

fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, ImageError> {
    let r = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Undecodable(e.to_string()))?;
    match r.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) => Ok(r),
        Some(other) => Err(ImageError::UnsupportedFormat(format!("{other:?}"))),
        None => Err(ImageError::UnsupportedFormat("(unrecognised bytes)".into())),
    }
}

/// Checks the encoded bytes and the header's dimensions without decoding the pixels.
///
/// # Errors
/// The first limit the image breaks.
pub fn inspect(bytes: &[u8], limits: &IntakeLimits) -> Result<(ImageFormat, u32, u32), ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes {
            bytes: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let r = reader(bytes)?;
    let format = r.format().unwrap_or(ImageFormat::Png);
    // PNG decoders refuse a zero dimension as a generic format error; read IHDR directly so the
    // producer learns the actual reason.
    if format == ImageFormat::Png && bytes.len() >= 24 && &bytes[12..16] == b"IHDR" {
        let width = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        let height = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        if width == 0 || height == 0 {
            return Err(ImageError::ZeroSize { width, height });
        }
    }
    // A JPEG's dimensions are read from its frame header directly: the decoder's header pass
    // also builds every Huffman table (a fifth of a 128×64 image's decode), which `decode`
    // does once more anyway.
    let declared = (format == ImageFormat::Jpeg)
        .then(|| jpeg_dimensions(bytes))
        .flatten();
    let (width, height) = match declared {
        Some(d) => d,
        None => r
            .into_dimensions()
            .map_err(|e| ImageError::Undecodable(e.to_string()))?,
    };
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSize { width, height });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    Ok((format, width, height))
}

/// Decodes an image to RGB after [`inspect`], with the decoder's allocation bounded by the pixel
/// limit (4 bytes per pixel plus slack) as a second guard.
///
/// # Errors
/// As [`inspect`], or a decoder failure.
pub fn decode(bytes: &[u8], limits: &IntakeLimits) -> Result<RgbImage, ImageError> {
    let (format, width, height) = inspect(bytes, limits)?;
    if format == ImageFormat::Jpeg && !jpeg_complete(bytes) {
        // The JPEG decoder pads a truncated scan with grey instead of failing.
        return Err(ImageError::Undecodable(
            "truncated JPEG: no end-of-image marker after the scan data".into(),
        ));
    }
    let mut r = reader(bytes)?;
    let mut l = Limits::default();
    l.max_alloc = Some(limits.max_pixels.saturating_mul(4).saturating_add(1 << 20));
    r.limits(l);
    let img = r
        .decode()
        .map_err(|e| ImageError::Undecodable(e.to_string()))?;
    // What the budget of decoded pixels was charged for is what was decoded (a JPEG whose
    // frame headers disagree is refused).
    if (img.width(), img.height()) != (width, height) {
        return Err(ImageError::Undecodable(format!(
            "the header declares {width}×{height} pixels, the image decodes to {}×{}",
            img.width(),
            img.height()
        )));
    }
    // No copy when the decoder produced RGB already.
    Ok(img.into_rgb8())
}

/// A JPEG's (width, height) from its first frame header (SOF0–SOF15), found by walking the
/// marker segments before the first scan; `None` when the walk fails, no frame header comes
/// before the scan, or a dimension is 0 (the decoder then reads the header and reports why).
fn jpeg_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    for seg in JpegSegments::new(bytes) {
        let seg = seg?;
        match seg.code {
            0xda | 0xd9 => return None,
            // SOFn, except DHT (C4), JPG (C8) and DAC (CC): precision, height, width, ...
            0xc0..=0xcf if !matches!(seg.code, 0xc4 | 0xc8 | 0xcc) => {
                if seg.payload.len() < 6 {
                    return None;
                }
                let f = &bytes[seg.payload.start + 1..seg.payload.start + 5];
                let height = u32::from(u16::from_be_bytes([f[0], f[1]]));
                let width = u32::from(u16::from_be_bytes([f[2], f[3]]));
                return (width > 0 && height > 0).then_some((width, height));
            }
            _ => {}
        }
    }
    None
}

/// One marker segment of a JPEG: its code, where it begins (the first 0xFF, fill bytes
/// included) and its payload (after the length field; empty for markers without one). The
/// start-of-scan segment is the last one given: the entropy-coded data follows it.
struct JpegSegment {
    code: u8,
    start: usize,
    payload: std::ops::Range<usize>,
}

/// The marker segments after the start-of-image marker, up to and including the first
/// start-of-scan; `Some(None)` where the layout cannot be followed (no marker where one
/// should be, a length running past the end), after which nothing more is given.
struct JpegSegments<'a> {
    bytes: &'a [u8],
    at: usize,
    done: bool,
}

impl<'a> JpegSegments<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        JpegSegments {
            bytes,
            at: 2,
            done: !bytes.starts_with(&[0xff, 0xd8]),
        }
    }

    fn next_segment(&mut self) -> Option<JpegSegment> {
        let bytes = self.bytes;
        let start = self.at;
        // A marker: 0xFF, optional fill bytes 0xFF, then the code.
        if *bytes.get(start)? != 0xff {
            return None;
        }
        let mut code_at = start + 1;
        while *bytes.get(code_at)? == 0xff {
            code_at += 1;
        }
        let code = bytes[code_at];
        let seg = match code {
            // Markers without a length.
            0x01 | 0xd0..=0xd9 => JpegSegment {
                code,
                start,
                payload: code_at + 1..code_at + 1,
            },
            _ => {
                let len = usize::from(u16::from_be_bytes([
                    *bytes.get(code_at + 1)?,
                    *bytes.get(code_at + 2)?,
                ]));
                let end = code_at + 1 + len;
                if len < 2 || end > bytes.len() {
                    return None;
                }
                JpegSegment {
                    code,
                    start,
                    payload: code_at + 3..end,
                }
            }
        };
        self.at = seg.payload.end;
        Some(seg)
    }
}

impl Iterator for JpegSegments<'_> {
    type Item = Option<JpegSegment>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let seg = self.next_segment();
        self.done = seg.as_ref().is_none_or(|s| s.code == 0xda);
        Some(seg)
    }
}

/// True when a JPEG has an end-of-image marker (FF D9) after its first start-of-scan (FF DA).
/// Inside entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker, so an
/// FF D9 there can only be the real end of the image.
fn jpeg_complete(bytes: &[u8]) -> bool {
    let Some(sos) = bytes.windows(2).position(|w| w == [0xff, 0xda]) else {
        return false;
    };
    bytes[sos..].windows(2).any(|w| w == [0xff, 0xd9])
}

/// The producer's JPEG as it may be stored: when `bytes` is a JPEG (already decoded and
/// validated) no larger than the canonical size on either side, the same bytes without their
/// metadata segments — APP1 (Exif, XMP: camera, time, GPS), APP13 (IPTC) and comments — and
/// `None` otherwise (other formats, larger images, or a marker layout this parser does not
/// follow), for which the store encodes the canonical form. Decoding the result gives the
/// pixels decoding `bytes` gives: those segments carry no pixel data, and the decoder ignores
/// Exif orientation on every path alike; APP0 (JFIF), APP2 (ICC) and APP14 (Adobe: CMYK and
/// colour transform) are kept.
pub fn storable_jpeg(bytes: &[u8], width: u32, height: u32) -> Option<Vec<u8>> {
    if width > CANONICAL_WIDTH || height > CANONICAL_HEIGHT || !bytes.starts_with(&[0xff, 0xd8]) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..2]);
    for seg in JpegSegments::new(bytes) {
        let seg = seg?;
        match seg.code {
            // Start of scan: the entropy-coded data and everything after it, as they are.
            0xda => {
                out.extend_from_slice(&bytes[seg.start..]);
                return Some(out);
            }
            0xe1 | 0xed | 0xfe => {}
            _ => out.extend_from_slice(&bytes[seg.start..seg.payload.end]),
        }
    }
    None
}

/// Resizes to the canonical 256×128 (H×W) sample size (triangle filter); an image already of
/// that size is kept as it is.
pub fn canonical(img: &RgbImage) -> RgbImage {
    if img.dimensions() == (CANONICAL_WIDTH, CANONICAL_HEIGHT) {
        return img.clone();
    }
    image::imageops::resize(
        img,
        CANONICAL_WIDTH,
        CANONICAL_HEIGHT,
        image::imageops::FilterType::Triangle,
    )
}

/// Resizes RGB pixels to `height × width` and returns them row-major `H×W×3` (the model's input).
pub fn pixels_at(img: &RgbImage, height: u32, width: u32) -> Vec<u8> {
    if img.width() == width && img.height() == height {
        return img.as_raw().clone();
    }
    image::imageops::resize(img, width, height, image::imageops::FilterType::Triangle).into_raw()
}

/// The stored form of an image that is not kept as sent (larger than 256×128, or PNG/WebP): the
/// canonical 256×128 (bilinear, as [`canonical`]) encoded as JPEG at `quality`, with SIMD
/// implementations — `fast_image_resize`'s fixed-point convolution and `jpeg-encoder` — where
/// [`canonical`] and [`to_jpeg`] use `image`'s generic paths (measured: those were 70% of the
/// daemon's CPU for 512×256 JPEGs, README "Ingest throughput"). The pixels can differ from
/// [`canonical`]'s by rounding.
///
/// # Errors
/// A resizer or encoder failure (not expected for valid RGB images).
pub fn canonical_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>, ImageError> {
    use fast_image_resize as fr;
    let fail = |e: &dyn std::fmt::Display| ImageError::Undecodable(e.to_string());
    let resized;
    let pixels = if img.dimensions() == (CANONICAL_WIDTH, CANONICAL_HEIGHT) {
        img.as_raw()
    } else {
        let src =
            fr::images::ImageRef::new(img.width(), img.height(), img.as_raw(), fr::PixelType::U8x3)
                .map_err(|e| fail(&e))?;
        let mut dst =
            fr::images::Image::new(CANONICAL_WIDTH, CANONICAL_HEIGHT, fr::PixelType::U8x3);
        fr::Resizer::new()
            .resize(
                &src,
                &mut dst,
                &fr::ResizeOptions::new()
                    .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear)),
            )
            .map_err(|e| fail(&e))?;
        resized = dst.into_vec();
        &resized
    };
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, quality.clamp(1, 100))
        .encode(
            pixels,
            CANONICAL_WIDTH as u16,
            CANONICAL_HEIGHT as u16,
            jpeg_encoder::ColorType::Rgb,
        )
        .map_err(|e| fail(&e))?;
    Ok(out)
}

/// Encodes RGB pixels as JPEG at `quality` (1–100).
///
/// # Errors
/// An encoder failure (not expected for valid RGB images).
pub fn to_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
    img.write_with_encoder(enc)
        .map_err(|e| ImageError::Undecodable(e.to_string()))?;
    Ok(out)
}
