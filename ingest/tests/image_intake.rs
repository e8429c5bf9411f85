//! Image intake limits: every reason an image is refused has its own code, and a decompression
//! bomb is refused from its header.

use image::{ImageFormat, Rgb, RgbImage};
use plip_ingest::image::{
    canonical, canonical_jpeg, decode, inspect, storable_jpeg, to_jpeg, ImageError, IntakeLimits,
};
use std::io::Cursor;
use std::time::Instant;

fn sample() -> RgbImage {
    RgbImage::from_fn(40, 90, |x, y| Rgb([(x * 6) as u8, (y * 2) as u8, 100]))
}

fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

/// CRC-32 (PNG's) so the tests can forge valid chunk checksums.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A real PNG whose IHDR is rewritten to declare `width × height` (with a valid CRC).
fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut png = encode(&sample(), ImageFormat::Png);
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// JPEG, PNG and WebP decode to the same size; the canonical sample is 256×128.
#[test]
fn accepted_formats_decode() {
    let limits = IntakeLimits::default();
    for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
        let img = decode(&encode(&sample(), format), &limits)
            .unwrap_or_else(|e| panic!("{format:?}: {e}"));
        assert_eq!(img.dimensions(), (40, 90), "{format:?}");
        let c = canonical(&img);
        assert_eq!(c.dimensions(), (128, 256));
    }
    let jpeg = to_jpeg(&sample(), 90).unwrap();
    assert_eq!(
        inspect(&jpeg, &limits).unwrap(),
        (ImageFormat::Jpeg, 40, 90)
    );
}

/// Each refusal has its own code.
#[test]
fn refusals_have_codes() {
    let limits = IntakeLimits {
        max_bytes: 1 << 20,
        max_pixels: 10_000,
    };
    let code = |bytes: &[u8]| decode(bytes, &limits).unwrap_err().code();
    assert_eq!(code(b""), "image_empty");
    assert_eq!(
        code(b"this is not an image at all"),
        "image_unsupported_format"
    );
    assert_eq!(
        code(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"),
        "image_unsupported_format"
    );
    assert_eq!(code(&vec![0u8; (1 << 20) + 1]), "image_too_many_bytes");
    let png = encode(&sample(), ImageFormat::Png);
    assert_eq!(code(&png[..png.len() / 2]), "image_undecodable");
    // The JPEG decoder pads a truncated scan with grey; intake refuses it.
    let jpeg = encode(&sample(), ImageFormat::Jpeg);
    assert!(decode(&jpeg, &limits).is_ok());
    assert_eq!(code(&jpeg[..jpeg.len() * 2 / 3]), "image_undecodable");
    assert_eq!(
        code(&encode(&RgbImage::new(200, 100), ImageFormat::Png)),
        "image_too_many_pixels"
    );
    let zero = decode(&png_declaring(0, 90), &limits).unwrap_err();
    assert_eq!(zero.code(), "image_zero_size", "{zero}");
}

/// A 100,000 × 100,000 PNG header (40 GB of pixels) over a few hundred bytes is refused from the
/// header: quickly, and without the decoder ever allocating for it.
#[test]
fn bomb_header_is_refused_without_decoding() {
    let bomb = png_declaring(100_000, 100_000);
    assert!(bomb.len() < 20_000);
    let t = Instant::now();
    let err = decode(&bomb, &IntakeLimits::default()).unwrap_err();
    assert_eq!(
        err,
        ImageError::TooManyPixels {
            width: 100_000,
            height: 100_000,
            limit: 4096 * 4096
        }
    );
    assert!(t.elapsed().as_millis() < 500, "took {:?}", t.elapsed());
}

/// The colour-histogram descriptor: 6 stripes × 72 bins, each stripe summing to 1; identical
/// images are at distance 0, differently coloured ones far apart.
#[test]
fn colour_histogram_baseline() {
    use plip_ingest::baseline::{cosine_distance, descriptor, BINS, STRIPES};
    let red = RgbImage::from_pixel(16, 36, Rgb([200, 20, 20]));
    let blue = RgbImage::from_pixel(16, 36, Rgb([20, 20, 200]));
    let d = descriptor(&red);
    assert_eq!(d.len(), BINS * STRIPES);
    for s in d.chunks(BINS) {
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    assert!(cosine_distance(&d, &descriptor(&red)) < 1e-9);
    assert!(cosine_distance(&d, &descriptor(&blue)) > 0.99);
}

/// A JPEG of `w × h` with varied pixels, and the same bytes with an Exif APP1 segment (a GPS
/// tag's worth of text) and a comment inserted after the start-of-image marker.
fn jpeg_with_metadata(w: u32, h: u32) -> (Vec<u8>, Vec<u8>) {
    let img = RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 3 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    });
    let plain = encode(&img, ImageFormat::Jpeg);
    let mut tagged = plain[..2].to_vec();
    let exif = b"Exif\0\0GPS 51.5N 0.12W camera serial 12345";
    tagged.extend_from_slice(&[0xff, 0xe1]);
    tagged.extend_from_slice(&((exif.len() + 2) as u16).to_be_bytes());
    tagged.extend_from_slice(exif);
    let comment = b"taken at the north gate";
    tagged.extend_from_slice(&[0xff, 0xfe]);
    tagged.extend_from_slice(&((comment.len() + 2) as u16).to_be_bytes());
    tagged.extend_from_slice(comment);
    tagged.extend_from_slice(&plain[2..]);
    (plain, tagged)
}

/// A small JPEG is kept as the producer sent it, its metadata segments removed: the result
/// has no Exif or comment bytes, is the plain encoding byte for byte, and decodes to the same
/// pixels. Larger images, PNGs and broken marker layouts are not kept (the store encodes the
/// canonical form for them).
#[test]
fn small_jpegs_are_kept_without_their_metadata() {
    let limits = IntakeLimits::default();
    let (plain, tagged) = jpeg_with_metadata(64, 128);
    let kept = storable_jpeg(&tagged, 64, 128).expect("a 128×64 JPEG is kept");
    assert_eq!(kept, plain);
    assert!(!kept.windows(4).any(|w| w == b"Exif"));
    assert!(!kept.windows(10).any(|w| w == b"north gate"));
    assert_eq!(
        decode(&kept, &limits).unwrap().as_raw(),
        decode(&tagged, &limits).unwrap().as_raw()
    );
    // At the canonical size exactly: kept; one pixel wider or taller: not.
    let (_, at_size) = jpeg_with_metadata(128, 256);
    assert!(storable_jpeg(&at_size, 128, 256).is_some());
    let (_, wide) = jpeg_with_metadata(129, 100);
    assert!(storable_jpeg(&wide, 129, 100).is_none());
    let (_, tall) = jpeg_with_metadata(100, 257);
    assert!(storable_jpeg(&tall, 100, 257).is_none());
    let png = encode(&sample(), ImageFormat::Png);
    assert!(storable_jpeg(&png, 8, 8).is_none());
    // A segment length running past the end: not followed, not kept.
    let mut broken = tagged.clone();
    broken[4] = 0xff;
    broken[5] = 0xff;
    assert!(storable_jpeg(&broken, 64, 128).is_none());
}

/// A JPEG's dimensions are read from its frame header without the decoder's header pass:
/// the same as the decoder reads, through metadata segments and fill bytes before markers;
/// a second frame header is refused at decoding (by the decoder; `decode` also checks the
/// decoded size against the declared one, which the budget of decoded pixels was charged for).
#[test]
fn jpeg_dimensions_come_from_the_frame_header() {
    let limits = IntakeLimits::default();
    for (w, h) in [(1, 1), (64, 128), (300, 17), (128, 256), (513, 1025)] {
        let (plain, tagged) = jpeg_with_metadata(w, h);
        let decoded = image::load_from_memory(&plain).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (w, h));
        assert_eq!(inspect(&plain, &limits).unwrap(), (ImageFormat::Jpeg, w, h));
        assert_eq!(
            inspect(&tagged, &limits).unwrap(),
            (ImageFormat::Jpeg, w, h)
        );
        // Fill bytes (0xFF) before a marker are allowed.
        let mut filled = plain[..2].to_vec();
        filled.extend_from_slice(&[0xff, 0xff, 0xff]);
        filled.extend_from_slice(&plain[2..]);
        assert_eq!(
            inspect(&filled, &limits).unwrap(),
            (ImageFormat::Jpeg, w, h)
        );
        assert_eq!(decode(&filled, &limits).unwrap().dimensions(), (w, h));
    }
    // A frame header that declares more pixels than allowed is refused before decoding.
    let (plain, _) = jpeg_with_metadata(64, 128);
    let sof = plain.windows(2).position(|m| m == [0xff, 0xc0]).unwrap();
    let mut huge = plain.clone();
    huge[sof + 5..sof + 9].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(
        inspect(&huge, &limits),
        Err(ImageError::TooManyPixels {
            width: 65535,
            height: 65535,
            ..
        })
    ));
    // A frame header too short to hold the size is not read past its end: the decoder
    // measures the file, and refuses it.
    let mut short = plain.clone();
    short[sof + 2..sof + 4].copy_from_slice(&[0, 4]);
    assert!(matches!(
        inspect(&short, &limits),
        Err(ImageError::Undecodable(_))
    ));
    // A second frame header declaring another size: refused, not decoded at either size.
    let mut two = plain[..2].to_vec();
    two.extend_from_slice(&[
        0xff, 0xc0, 0, 17, 8, 0, 32, 0, 16, 3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1,
    ]);
    two.extend_from_slice(&plain[2..]);
    match decode(&two, &limits) {
        Err(ImageError::Undecodable(m)) => assert!(m.contains("Frame"), "{m}"),
        other => panic!("a JPEG with two frame headers decoded: {other:?}"),
    }
}

/// The stored form of a large image (SIMD resize and encoder) is a 256×128 JPEG whose pixels
/// are those of the generic path (`canonical`, then `to_jpeg`) up to resampling rounding and
/// JPEG loss; an image already at 256×128 is encoded without resizing.
#[test]
fn large_images_are_stored_at_the_canonical_size() {
    let limits = IntakeLimits::default();
    let img = RgbImage::from_fn(300, 700, |x, y| {
        Rgb([
            (x * 255 / 300) as u8,
            (y * 255 / 700) as u8,
            ((x / 20 + y / 20) % 2 * 200) as u8,
        ])
    });
    let fast = decode(&canonical_jpeg(&img, 90).unwrap(), &limits).unwrap();
    let generic = decode(&to_jpeg(&canonical(&img), 90).unwrap(), &limits).unwrap();
    assert_eq!(fast.dimensions(), (128, 256));
    let diff: f64 = fast
        .as_raw()
        .iter()
        .zip(generic.as_raw())
        .map(|(a, b)| f64::from((i16::from(*a) - i16::from(*b)).abs()))
        .sum::<f64>()
        / fast.as_raw().len() as f64;
    assert!(diff < 2.0, "mean absolute difference {diff}");
    let at_size = canonical(&img);
    let kept = decode(&canonical_jpeg(&at_size, 95).unwrap(), &limits).unwrap();
    assert_eq!(kept.dimensions(), (128, 256));
}
