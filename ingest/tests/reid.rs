//! The ReID request decoder: good image and text queries, and one code per bad kind.

use image::{ImageFormat, RgbImage};
use plip_ingest::reid::{decode_request, QueryKind, ReidLimits};
use plip_ingest::wire::Code;

fn jpeg() -> Vec<u8> {
    let img = RgbImage::from_fn(32, 64, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 3) as u8, 90])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), ImageFormat::Jpeg)
        .unwrap();
    out
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn json(v: serde_json::Value) -> Result<plip_ingest::reid::ValidRequest, Code> {
    decode_request(
        Some("application/json"),
        v.to_string().as_bytes(),
        &ReidLimits::default(),
    )
    .map_err(|e| e.code)
}

#[test]
fn good_requests_decode() {
    let r = json(serde_json::json!({"query": {"text": "a man in a navy jacket"}})).unwrap();
    assert!(matches!(r.query, QueryKind::Text(ref t) if t == "a man in a navy jacket"));
    assert_eq!(r.top_k, 10);
    let r = json(serde_json::json!({"v": 1, "query": {"image": b64(&jpeg())}, "top_k": 100, "exclude_camera": "c3", "deadline_ms": 500}))
        .unwrap();
    assert!(matches!(r.query, QueryKind::Image(ref i) if i.width() == 32));
    assert_eq!(
        (r.top_k, r.exclude_camera.as_deref(), r.deadline_ms),
        (100, Some("c3"), Some(500))
    );
    // MessagePack with raw image bytes.
    let req = plip_ingest::reid::ReidRequest {
        v: None,
        query: plip_ingest::reid::Query {
            image: Some(plip_ingest::wire::ImageField::Bytes(jpeg())),
            text: None,
        },
        top_k: Some(5),
        exclude_camera: None,
        deadline_ms: None,
        min_model_version: Some(7),
    };
    let body = rmp_serde::to_vec_named(&req).unwrap();
    let r = decode_request(Some("application/msgpack"), &body, &ReidLimits::default()).unwrap();
    assert_eq!((r.top_k, r.min_model_version), (5, Some(7)));
    // JSON: absent means any version; a string is a schema violation.
    let r = json(serde_json::json!({"query": {"text": "x"}})).unwrap();
    assert_eq!(r.min_model_version, None);
    let r = json(serde_json::json!({"query": {"text": "x"}, "min_model_version": 3})).unwrap();
    assert_eq!(r.min_model_version, Some(3));
    let e =
        json(serde_json::json!({"query": {"text": "x"}, "min_model_version": "3"})).unwrap_err();
    assert_eq!(e, Code::SchemaViolation);
}

#[test]
fn bad_requests_have_codes() {
    let img = b64(&jpeg());
    let cases = [
        (serde_json::json!({"query": {}}), Code::InvalidQuery),
        (
            serde_json::json!({"query": {"text": "x", "image": img}}),
            Code::InvalidQuery,
        ),
        (
            serde_json::json!({"query": {"text": "   "}}),
            Code::EmptyText,
        ),
        (
            serde_json::json!({"query": {"text": "y".repeat(1001)}}),
            Code::TextTooLong,
        ),
        (
            serde_json::json!({"query": {"text": "x"}, "top_k": 0}),
            Code::TopKOutOfRange,
        ),
        (
            serde_json::json!({"query": {"text": "x"}, "top_k": 101}),
            Code::TopKOutOfRange,
        ),
        (
            serde_json::json!({"query": {"text": "x"}, "colour": "red"}),
            Code::SchemaViolation,
        ),
        (
            serde_json::json!({"query": {"text": "x", "video": 1}}),
            Code::SchemaViolation,
        ),
        (
            serde_json::json!({"query": {"text": "x"}, "top_k": "ten"}),
            Code::SchemaViolation,
        ),
        (
            serde_json::json!({"v": 9, "query": {"text": "x"}}),
            Code::UnsupportedVersion,
        ),
        (
            serde_json::json!({"query": {"image": "@@"}}),
            Code::InvalidBase64,
        ),
        (
            serde_json::json!({"query": {"image": b64(b"GIF89a....")}}),
            Code::ImageUnsupportedFormat,
        ),
        (
            serde_json::json!({"query": {"text": "x"}, "exclude_camera": ""}),
            Code::InvalidLabel,
        ),
    ];
    for (v, code) in cases {
        assert_eq!(json(v.clone()).err(), Some(code), "{v}");
    }
    let lim = ReidLimits::default();
    let e = |ct: Option<&str>, body: &[u8]| decode_request(ct, body, &lim).unwrap_err().code;
    assert_eq!(e(Some("application/json"), b"{nope"), Code::MalformedBody);
    assert_eq!(e(Some("application/msgpack"), &[0xc1]), Code::MalformedBody);
    assert_eq!(e(Some("text/plain"), b"hi"), Code::UnsupportedContentType);
    assert_eq!(e(None, b"hi"), Code::UnsupportedContentType);
    let small = ReidLimits {
        max_message_bytes: 10,
        ..lim
    };
    assert_eq!(
        decode_request(Some("application/json"), &[b' '; 11], &small)
            .unwrap_err()
            .code,
        Code::MessageTooLarge
    );
}
