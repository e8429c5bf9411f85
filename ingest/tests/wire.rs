//! The ingest wire format: every refusal has its code; good images of a bad batch are kept;
//! and no generated or mutated message makes the decoder panic.

use base64::Engine;
use image::{ImageFormat, Rgb, RgbImage};
use plip_ingest::image::IntakeLimits;
use plip_ingest::wire::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::Cursor;

fn img_bytes(format: ImageFormat, w: u32, h: u32) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    RgbImage::from_fn(w, h, |x, y| Rgb([x as u8, y as u8, 7]))
        .write_to(&mut out, format)
        .unwrap();
    out.into_inner()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn no_headers() -> HashMap<String, String> {
    HashMap::new()
}

fn json(v: serde_json::Value) -> Result<Decoded, Refusal> {
    decode_message(
        Some("application/json"),
        &no_headers(),
        v.to_string().as_bytes(),
        &WireLimits::default(),
    )
}

fn refused(r: Result<Decoded, Refusal>) -> Code {
    match r {
        Err(Refusal(e)) => e.code,
        Ok(d) => panic!("accepted: {} ok, {:?}", d.accepted.len(), d.rejected),
    }
}

fn only_rejection(r: Result<Decoded, Refusal>) -> Code {
    let d = r.expect("message accepted as a whole");
    assert!(d.accepted.is_empty(), "{} accepted", d.accepted.len());
    assert_eq!(d.rejected.len(), 1, "{:?}", d.rejected);
    d.rejected[0].code
}

/// A JSON batch and the same batch as MessagePack (map form, as other languages write it) both
/// decode; a bad image in a batch is rejected alone with its code while the others are kept.
#[test]
fn batches_decode_and_keep_good_images() {
    let png = img_bytes(ImageFormat::Png, 20, 40);
    let jpg = img_bytes(ImageFormat::Jpeg, 32, 64);
    let d = json(serde_json::json!({"v": 1, "batch_id": "b1", "images": [
        {"id": "a-1", "person_id": "0002", "camera_id": "c1", "image": b64(&png), "purpose": "both",
         "attributes": {"upper": {"colour": "red"}}},
        {"id": "a-2", "image": b64(&jpg), "captions": ["a man in a grey coat"]},
        {"id": "a-3", "image": "***not base64***"}
    ]}))
    .unwrap();
    assert_eq!(d.batch_id.as_deref(), Some("b1"));
    assert_eq!(
        d.accepted.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
        vec!["a-1", "a-2"]
    );
    assert_eq!(d.accepted[0].purpose, Purpose::Both);
    assert_eq!(d.accepted[0].pixels.dimensions(), (20, 40));
    assert_eq!(d.rejected.len(), 1);
    assert_eq!(
        (d.rejected[0].id.as_str(), d.rejected[0].code),
        ("a-3", Code::InvalidBase64)
    );

    let batch = IngestBatch {
        v: None,
        batch_id: None,
        images: vec![IngestImage {
            id: "m-1".into(),
            person_id: Some("7".into()),
            camera_id: None,
            captions: Some(vec!["a woman with a backpack".into()]),
            attributes: None,
            purpose: None,
            image: ImageField::Bytes(jpg.clone()),
        }],
    };
    let body = rmp_serde::to_vec_named(&batch).unwrap();
    let d = decode_message(
        Some("application/msgpack"),
        &no_headers(),
        &body,
        &WireLimits::default(),
    )
    .unwrap();
    assert_eq!(d.accepted.len(), 1);
    assert_eq!(
        d.accepted[0].captions,
        vec!["a woman with a backpack".to_string()]
    );

    let mut h = HashMap::new();
    h.insert("x-image-id".to_string(), "s-1".to_string());
    h.insert("x-caption".to_string(), "a man in black".to_string());
    h.insert("x-purpose".to_string(), "gallery".to_string());
    let d = decode_message(Some("image/png"), &h, &png, &WireLimits::default()).unwrap();
    assert_eq!(
        (d.accepted[0].id.as_str(), d.accepted[0].purpose),
        ("s-1", Purpose::Gallery)
    );
}

/// Every message-level refusal has its own code.
#[test]
fn message_refusals_have_codes() {
    let png = img_bytes(ImageFormat::Png, 8, 8);
    let lim = WireLimits::default();
    let h = no_headers();
    assert_eq!(
        refused(decode_message(
            Some("application/json"),
            &h,
            b"{not json",
            &lim
        )),
        Code::MalformedBody
    );
    assert_eq!(
        refused(decode_message(
            Some("application/msgpack"),
            &h,
            &[0xc1, 0x00],
            &lim
        )),
        Code::MalformedBody
    );
    assert_eq!(
        refused(decode_message(Some("text/plain"), &h, b"hi", &lim)),
        Code::UnsupportedContentType
    );
    assert_eq!(
        refused(decode_message(None, &h, b"{}", &lim)),
        Code::UnsupportedContentType
    );
    assert_eq!(
        refused(json(serde_json::json!({"batch": []}))),
        Code::SchemaViolation
    );
    assert_eq!(
        refused(json(serde_json::json!({"images": []}))),
        Code::SchemaViolation
    );
    assert_eq!(
        refused(json(
            serde_json::json!({"images": [{"id": "x", "image": b64(&png), "attributes": {"upper": {"colour": "teal"}}}]})
        )),
        Code::SchemaViolation
    );
    assert_eq!(
        refused(json(
            serde_json::json!({"images": [{"id": "x", "image": b64(&png), "purpose": "eat"}]})
        )),
        Code::SchemaViolation
    );
    assert_eq!(
        refused(json(
            serde_json::json!({"v": 2, "images": [{"id": "x", "image": b64(&png)}]})
        )),
        Code::UnsupportedVersion
    );
    let three: Vec<_> = (0..3)
        .map(|i| serde_json::json!({"id": format!("i{i}"), "image": b64(&png)}))
        .collect();
    let small = WireLimits {
        max_images: 2,
        ..Default::default()
    };
    let body = serde_json::json!({ "images": three }).to_string();
    assert_eq!(
        refused(decode_message(
            Some("application/json"),
            &h,
            body.as_bytes(),
            &small
        )),
        Code::TooManyImages
    );
    let tiny = WireLimits {
        max_message_bytes: 10,
        ..Default::default()
    };
    assert_eq!(
        refused(decode_message(
            Some("application/json"),
            &h,
            body.as_bytes(),
            &tiny
        )),
        Code::MessageTooLarge
    );
    assert_eq!(
        refused(decode_message(Some("image/jpeg"), &h, &png, &lim)),
        Code::InvalidId
    );
    for c in Code::ALL {
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(s, format!("\"{}\"", c.as_str()));
    }
}

/// Every image-level refusal has its own code.
#[test]
fn image_refusals_have_codes() {
    let png = img_bytes(ImageFormat::Png, 8, 8);
    let one =
        |fields: serde_json::Value| only_rejection(json(serde_json::json!({ "images": [fields] })));
    assert_eq!(
        one(serde_json::json!({"id": "has space", "image": b64(&png)})),
        Code::InvalidId
    );
    assert_eq!(
        one(serde_json::json!({"id": "x".repeat(129), "image": b64(&png)})),
        Code::InvalidId
    );
    assert_eq!(
        one(serde_json::json!({"id": "", "image": b64(&png)})),
        Code::InvalidId
    );
    assert_eq!(
        one(serde_json::json!({"id": "a", "image": "@@@"})),
        Code::InvalidBase64
    );
    assert_eq!(
        one(serde_json::json!({"id": "a", "image": b64(b"plain text, no image")})),
        Code::ImageUnsupportedFormat
    );
    assert_eq!(
        one(serde_json::json!({"id": "a", "image": b64(&png[..png.len() / 2])})),
        Code::ImageUndecodable
    );
    assert_eq!(
        one(serde_json::json!({"id": "a", "image": ""})),
        Code::ImageEmpty
    );
    let big = img_bytes(ImageFormat::Png, 300, 300);
    let lim = WireLimits {
        image: IntakeLimits {
            max_pixels: 10_000,
            ..Default::default()
        },
        ..Default::default()
    };
    let body = serde_json::json!({"images": [{"id": "a", "image": b64(&big)}]}).to_string();
    assert_eq!(
        only_rejection(decode_message(
            Some("application/json"),
            &no_headers(),
            body.as_bytes(),
            &lim
        )),
        Code::ImageTooManyPixels
    );
    let mut zero = png.clone();
    zero[16..20].copy_from_slice(&0u32.to_be_bytes());
    assert_eq!(
        one(serde_json::json!({"id": "a", "image": b64(&zero)})),
        Code::ImageZeroSize
    );
    assert_eq!(
        one(serde_json::json!({"id": "a", "image": b64(&png), "captions": [""]})),
        Code::InvalidCaption
    );
    assert_eq!(
        one(serde_json::json!({"id": "a", "image": b64(&png), "captions": ["x".repeat(1001)]})),
        Code::InvalidCaption
    );
    assert_eq!(
        one(serde_json::json!({"id": "a", "image": b64(&png), "captions": vec!["x"; 9]})),
        Code::InvalidCaption
    );
    assert_eq!(
        one(serde_json::json!({"id": "a", "image": b64(&png), "person_id": "bad\u{0007}"})),
        Code::InvalidLabel
    );
    let d = json(serde_json::json!({"images": [{"id": "a", "image": b64(&png)}, {"id": "a", "image": b64(&png)}]})).unwrap();
    assert_eq!(
        (d.accepted.len(), d.rejected[0].code),
        (1, Code::DuplicateId)
    );
    // A caption that is not UTF-8 (MessagePack can carry one).
    let batch = IngestBatch {
        v: None,
        batch_id: None,
        images: vec![IngestImage {
            id: "u".into(),
            person_id: None,
            camera_id: None,
            captions: Some(vec![CaptionField::Bytes(vec![0xff, 0xfe, 0x41])]),
            attributes: None,
            purpose: None,
            image: ImageField::Bytes(png.clone()),
        }],
    };
    let body = rmp_serde::to_vec_named(&batch).unwrap();
    assert_eq!(
        only_rejection(decode_message(
            Some("application/msgpack"),
            &no_headers(),
            &body,
            &WireLimits::default()
        )),
        Code::InvalidCaption
    );
}

fn mutate(rng: &mut StdRng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.gen_range(1..6) {
        if b.is_empty() {
            b.push(rng.gen());
            continue;
        }
        let i = rng.gen_range(0..b.len());
        match rng.gen_range(0..4) {
            0 => b[i] = rng.gen(),
            1 => b.truncate(i),
            2 => b.insert(i, rng.gen()),
            _ => {
                let j = rng.gen_range(i..b.len());
                b.drain(i..j);
            }
        }
    }
    b
}

/// Thousands of generated and mutated messages (JSON, MessagePack, single images, random bytes
/// under every content type): the decoder never panics and every refusal carries a code.
/// `PLIP_FUZZ_ITERS` sets the count (default 3000; the README's longer run uses 200000).
#[test]
fn decoder_survives_generated_and_mutated_messages() {
    let iters: usize = std::env::var("PLIP_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut rng = StdRng::seed_from_u64(42);
    let png = img_bytes(ImageFormat::Png, 12, 24);
    let jpg = img_bytes(ImageFormat::Jpeg, 12, 24);
    let good_json = serde_json::json!({"v": 1, "batch_id": "f", "images": [
        {"id": "f-1", "person_id": "3", "image": b64(&png), "captions": ["a red coat"], "attributes": {"shoes": {"colour": "white"}}},
        {"id": "f-2", "image": b64(&jpg), "purpose": "gallery"}]})
    .to_string()
    .into_bytes();
    let good_mp = rmp_serde::to_vec_named(&IngestBatch {
        v: Some(1),
        batch_id: Some("f".into()),
        images: vec![IngestImage {
            id: "f-3".into(),
            person_id: None,
            camera_id: Some("c2".into()),
            captions: None,
            attributes: None,
            purpose: None,
            image: ImageField::Bytes(jpg.clone()),
        }],
    })
    .unwrap();
    let types = [
        Some("application/json"),
        Some("application/msgpack"),
        Some("image/png"),
        Some("image/jpeg"),
        Some("text/plain"),
        None,
    ];
    let mut h = HashMap::new();
    h.insert("x-image-id".to_string(), "single-1".to_string());
    let limits = WireLimits::default();
    let (mut accepted, mut refusals) = (0usize, HashMap::new());
    for i in 0..iters {
        let (ct, body) = match i % 4 {
            0 => (
                Some("application/json"),
                mutate(&mut rng, good_json.clone()),
            ),
            1 => (
                Some("application/msgpack"),
                mutate(&mut rng, good_mp.clone()),
            ),
            2 => (
                Some(if i % 8 == 2 {
                    "image/png"
                } else {
                    "image/jpeg"
                }),
                mutate(&mut rng, if i % 8 == 2 { png.clone() } else { jpg.clone() }),
            ),
            _ => (
                types[rng.gen_range(0..types.len())],
                (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect(),
            ),
        };
        match decode_message(ct, &h, &body, &limits) {
            Ok(d) => {
                accepted += d.accepted.len();
                for r in d.rejected {
                    *refusals.entry(r.code).or_insert(0usize) += 1;
                }
            }
            Err(Refusal(e)) => {
                assert!(!e.message.is_empty());
                *refusals.entry(e.code).or_insert(0usize) += 1;
            }
        }
    }
    assert!(accepted > 0, "no mutated message survived at all");
    assert!(
        refusals.len() >= 4,
        "too few kinds of refusal: {refusals:?}"
    );
}

/// The first phase decodes no pixels: it checks everything else and reads each image's declared
/// size (the cost of decoding it against the daemon's pixel budget); a truncated image passes
/// it and is refused, alone, when decoded.
#[test]
fn parsing_checks_everything_but_the_pixels() {
    let png = img_bytes(ImageFormat::Png, 20, 40);
    let jpg = img_bytes(ImageFormat::Jpeg, 32, 64);
    let body = serde_json::json!({"images": [
        {"id": "p-1", "image": b64(&png)},
        {"id": "p-2", "image": b64(&jpg[..jpg.len() - 40])},
        {"id": "bad id", "image": b64(&png)},
    ]})
    .to_string();
    let p = parse_message(
        Some("application/json"),
        &no_headers(),
        body.as_bytes(),
        &WireLimits::default(),
    )
    .unwrap();
    assert_eq!(p.accepted.len(), 2);
    assert_eq!(p.rejected.len(), 1);
    assert_eq!(p.rejected[0].code, Code::InvalidId);
    assert_eq!((p.accepted[0].width, p.accepted[0].height), (20, 40));
    assert_eq!(p.accepted[1].pixels(), 32 * 64);
    let limits = IntakeLimits::default();
    let mut it = p.accepted.into_iter();
    let ok = it.next().unwrap().decode(&limits).unwrap();
    assert_eq!(ok.pixels.dimensions(), (20, 40));
    let refused = it.next().unwrap().decode(&limits).unwrap_err();
    assert_eq!(refused.id, "p-2");
    assert_eq!(refused.code, Code::ImageUndecodable);
}
