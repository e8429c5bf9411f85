//! The ingest wire format: what producers publish on `plip.ingest`, how it is decoded and
//! validated, and the stable error codes of everything that can be refused.
//!
//! A message is either a **batch** — content type `application/json` (images as base64 strings)
//! or `application/msgpack` (a map with the same field names, images as raw bytes), schema
//! [`IngestBatch`] — or a **single image**
//! — content type `image/jpeg`, `image/png` or `image/webp`, the body being the image, with the
//! headers `x-image-id` (required), `x-person-id`, `x-camera-id`, `x-caption`, `x-purpose`.
//!
//! Decoding never panics and never fails without a code: a message-level problem refuses the
//! whole message ([`Refusal`]); an image-level problem refuses only that image, and the good
//! images of the batch are kept ([`Decoded::rejected`]).

use crate::attributes::Attributes;
use crate::image::{decode, inspect, ImageError, IntakeLimits};
use base64::Engine;
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// Protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Stable error codes (snake_case on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// The content type is none of the accepted ones.
    UnsupportedContentType,
    /// The body is neither JSON nor MessagePack (as its content type says).
    MalformedBody,
    /// The body parses but breaks the schema (missing or unknown field, wrong type, unknown
    /// attribute value, invalid `purpose`).
    SchemaViolation,
    /// A protocol version newer than this daemon speaks.
    UnsupportedVersion,
    /// Missing, empty, too long or ill-formed image id.
    InvalidId,
    /// More images in one batch than allowed.
    TooManyImages,
    /// The message is larger than allowed.
    MessageTooLarge,
    /// An image field that is not valid base64 (JSON bodies).
    InvalidBase64,
    /// A caption that is not UTF-8, empty, or too long; or too many captions.
    InvalidCaption,
    /// A person or camera id that is too long or has control characters.
    InvalidLabel,
    /// Image intake: see [`ImageError::code`].
    ImageEmpty,
    ImageTooManyBytes,
    ImageUnsupportedFormat,
    ImageZeroSize,
    ImageTooManyPixels,
    ImageUndecodable,
    /// The same id twice in one batch.
    DuplicateId,
    /// ReID requests: neither or both of image and text.
    InvalidQuery,
    /// ReID requests: an empty text query.
    EmptyText,
    /// ReID requests: a text query over the character or token limit.
    TextTooLong,
    /// ReID requests: `top_k` outside 1…maximum.
    TopKOutOfRange,
    /// ReID requests: the deadline passed before the request could be served.
    DeadlinePassed,
    /// ReID requests: the gallery is empty.
    EmptyGallery,
    /// ReID requests: no encoder is serving yet.
    NoModel,
    /// ReID requests: the daemon failed to answer (a panic in the search, a tokenizer failure);
    /// the request may be retried, and the daemon logs the cause.
    Internal,
    /// Both consumers: an AMQP header table nested deeper than the daemon accepts.
    HeaderTooDeep,
    /// Both consumers: an AMQP header table larger than the daemon accepts.
    HeadersTooLarge,
    /// ReID requests: the serving model is older than the request's `min_model_version`
    /// (a replica behind a rollout); another replica, or this one later, can answer.
    ModelTooOld,
}

impl Code {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::UnsupportedContentType => "unsupported_content_type",
            Code::MalformedBody => "malformed_body",
            Code::SchemaViolation => "schema_violation",
            Code::UnsupportedVersion => "unsupported_version",
            Code::InvalidId => "invalid_id",
            Code::TooManyImages => "too_many_images",
            Code::MessageTooLarge => "message_too_large",
            Code::InvalidBase64 => "invalid_base64",
            Code::InvalidCaption => "invalid_caption",
            Code::InvalidLabel => "invalid_label",
            Code::ImageEmpty => "image_empty",
            Code::ImageTooManyBytes => "image_too_many_bytes",
            Code::ImageUnsupportedFormat => "image_unsupported_format",
            Code::ImageZeroSize => "image_zero_size",
            Code::ImageTooManyPixels => "image_too_many_pixels",
            Code::ImageUndecodable => "image_undecodable",
            Code::DuplicateId => "duplicate_id",
            Code::InvalidQuery => "invalid_query",
            Code::EmptyText => "empty_text",
            Code::TextTooLong => "text_too_long",
            Code::TopKOutOfRange => "top_k_out_of_range",
            Code::DeadlinePassed => "deadline_passed",
            Code::EmptyGallery => "empty_gallery",
            Code::NoModel => "no_model",
            Code::Internal => "internal",
            Code::HeaderTooDeep => "header_too_deep",
            Code::HeadersTooLarge => "headers_too_large",
            Code::ModelTooOld => "model_too_old",
        }
    }

    /// Every code, for documentation and tests.
    pub const ALL: [Code; 28] = [
        Code::UnsupportedContentType,
        Code::MalformedBody,
        Code::SchemaViolation,
        Code::UnsupportedVersion,
        Code::InvalidId,
        Code::TooManyImages,
        Code::MessageTooLarge,
        Code::InvalidBase64,
        Code::InvalidCaption,
        Code::InvalidLabel,
        Code::ImageEmpty,
        Code::ImageTooManyBytes,
        Code::ImageUnsupportedFormat,
        Code::ImageZeroSize,
        Code::ImageTooManyPixels,
        Code::ImageUndecodable,
        Code::DuplicateId,
        Code::InvalidQuery,
        Code::EmptyText,
        Code::TextTooLong,
        Code::TopKOutOfRange,
        Code::DeadlinePassed,
        Code::EmptyGallery,
        Code::NoModel,
        Code::Internal,
        Code::HeaderTooDeep,
        Code::HeadersTooLarge,
        Code::ModelTooOld,
    ];
}

impl From<&ImageError> for Code {
    fn from(e: &ImageError) -> Self {
        match e {
            ImageError::Empty => Code::ImageEmpty,
            ImageError::TooManyBytes { .. } => Code::ImageTooManyBytes,
            ImageError::UnsupportedFormat(_) => Code::ImageUnsupportedFormat,
            ImageError::ZeroSize { .. } => Code::ImageZeroSize,
            ImageError::TooManyPixels { .. } => Code::ImageTooManyPixels,
            ImageError::Undecodable(_) => Code::ImageUndecodable,
        }
    }
}

/// `{code, message}`: the error object everywhere on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// Stable snake_case code.
    pub code: Code,
    /// Human-readable explanation.
    pub message: String,
}

/// What a sample is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Training data (the default).
    #[default]
    Train,
    /// A gallery entry for ReID queries, not trained on.
    Gallery,
    /// Both.
    Both,
}

/// The image field: a base64 string in JSON, raw bytes in MessagePack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ImageField {
    Base64(String),
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// A caption as received: text, or (MessagePack only) bytes that are not valid UTF-8, kept so
/// that they are refused with `invalid_caption` instead of failing the whole message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CaptionField {
    Text(String),
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl From<&str> for CaptionField {
    fn from(s: &str) -> Self {
        CaptionField::Text(s.to_string())
    }
}

/// One image of an ingest batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestImage {
    /// Idempotency key, `[A-Za-z0-9._:-]{1,128}`: a re-sent id is stored and trained once.
    pub id: String,
    /// Opaque person id (e.g. "0002"); absent for an unlabelled sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person_id: Option<String>,
    /// Opaque camera id (e.g. "c1").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub camera_id: Option<String>,
    /// Captions (UTF-8); when absent the daemon synthesizes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captions: Option<Vec<CaptionField>>,
    /// Attributes (see [`Attributes`]); used to synthesize captions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<Attributes>,
    /// `train` (default), `gallery` or `both`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<Purpose>,
    /// JPEG, PNG or WebP bytes (base64 in JSON).
    pub image: ImageField,
}

/// An ingest batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestBatch {
    /// Protocol version; absent means 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    /// Echoed in the ingest outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// The images.
    pub images: Vec<IngestImage>,
}

/// The answer to a producer that set `reply_to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestOutcome {
    /// The batch's `batch_id`, if it had one.
    pub batch_id: Option<String>,
    /// Ids stored durably.
    pub accepted: Vec<String>,
    /// Ids refused, each with its reason.
    pub rejected: Vec<RejectedImage>,
}

/// One refused image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedImage {
    /// The image's id as sent (possibly invalid itself).
    pub id: String,
    /// Stable code.
    pub code: Code,
    /// Explanation.
    pub message: String,
}

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WireLimits {
    /// Largest message body, bytes.
    pub max_message_bytes: usize,
    /// Most images per batch.
    pub max_images: usize,
    /// Most captions per image.
    pub max_captions: usize,
    /// Longest caption, characters.
    pub max_caption_chars: usize,
    /// Decoded pixels in flight across every delivery being ingested (width × height summed;
    /// about 8 bytes of memory each while an image is decoded and converted): images are
    /// decoded one at a time against this budget and stored as they go, so ingest memory is
    /// bounded by it, not by message sizes. At least `image.max_pixels`.
    pub decoded_pixels_in_flight: u64,
    /// Image intake limits.
    pub image: IntakeLimits,
}

impl Default for WireLimits {
    fn default() -> Self {
        WireLimits {
            max_message_bytes: 64 << 20,
            max_images: 256,
            max_captions: 8,
            max_caption_chars: 1000,
            decoded_pixels_in_flight: 2 * 4096 * 4096,
            image: IntakeLimits::default(),
        }
    }
}

/// A validated image, ready to store.
#[derive(Debug, Clone)]
pub struct ValidImage {
    pub id: String,
    pub person_id: Option<String>,
    pub camera_id: Option<String>,
    pub captions: Vec<String>,
    pub attributes: Option<Attributes>,
    pub purpose: Purpose,
    /// Decoded pixels (any size; the store resizes to the canonical 256×128).
    pub pixels: RgbImage,
    /// The producer's bytes when they may be stored as they are
    /// ([`crate::image::storable_jpeg`]: a JPEG within 256×128, metadata stripped); `None`
    /// when the store must encode the canonical form from `pixels`.
    pub encoded: Option<Vec<u8>>,
}

/// An image that passed every check that needs no pixel decoding (id, labels, captions, the
/// encoded size and the dimensions its header declares): the second phase, [`IntakeImage::decode`],
/// decodes it. The daemon decodes one image at a time against its budget of decoded pixels in
/// flight, so a batch's memory is one image's pixels, not the batch's.
#[derive(Debug, Clone)]
pub struct IntakeImage {
    pub id: String,
    pub person_id: Option<String>,
    pub camera_id: Option<String>,
    pub captions: Vec<String>,
    pub attributes: Option<Attributes>,
    pub purpose: Purpose,
    /// The encoded image (base64 already decoded).
    pub bytes: Vec<u8>,
    /// Dimensions declared by the image's header (within the pixel limit).
    pub width: u32,
    pub height: u32,
}

impl IntakeImage {
    /// Width × height, the cost of decoding this image against a pixel budget.
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    /// Decodes the pixels.
    ///
    /// # Errors
    /// The refusal of this image (truncated or undecodable data).
    pub fn decode(self, limits: &IntakeLimits) -> Result<ValidImage, RejectedImage> {
        match decode(&self.bytes, limits) {
            Ok(pixels) => Ok(ValidImage {
                encoded: crate::image::storable_jpeg(&self.bytes, pixels.width(), pixels.height()),
                id: self.id,
                person_id: self.person_id,
                camera_id: self.camera_id,
                captions: self.captions,
                attributes: self.attributes,
                purpose: self.purpose,
                pixels,
            }),
            Err(e) => Err(RejectedImage {
                id: self.id,
                code: Code::from(&e),
                message: e.to_string(),
            }),
        }
    }
}

/// A message that passed the checks of [`parse_message`]: its images still encoded.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub batch_id: Option<String>,
    pub accepted: Vec<IntakeImage>,
    pub rejected: Vec<RejectedImage>,
}

/// A message refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub WireError);

impl Refusal {
    fn new(code: Code, message: impl Into<String>) -> Self {
        Refusal(WireError {
            code,
            message: message.into(),
        })
    }
}

/// The result of decoding one message.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub batch_id: Option<String>,
    pub accepted: Vec<ValidImage>,
    pub rejected: Vec<RejectedImage>,
}

/// Message headers the single-image form reads (AMQP header table values as strings; a
/// non-string value is passed as `None`… and refused where required).
pub trait Headers {
    fn get_str(&self, name: &str) -> Option<Result<String, ()>>;
}

impl Headers for std::collections::HashMap<String, String> {
    fn get_str(&self, name: &str) -> Option<Result<String, ()>> {
        self.get(name).map(|v| Ok(v.clone()))
    }
}

/// True for a valid idempotency key: `[A-Za-z0-9._:-]{1,128}`.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn valid_label(s: &str) -> bool {
    (1..=128).contains(&s.chars().count()) && !s.chars().any(char::is_control)
}

/// Decodes and validates one delivery, pixels included: [`parse_message`], then
/// [`IntakeImage::decode`] for every image.
///
/// # Errors
/// A [`Refusal`] when the whole message is unusable.
pub fn decode_message(
    content_type: Option<&str>,
    headers: &dyn Headers,
    body: &[u8],
    limits: &WireLimits,
) -> Result<Decoded, Refusal> {
    let parsed = parse_message(content_type, headers, body, limits)?;
    let mut out = Decoded {
        batch_id: parsed.batch_id,
        accepted: Vec::with_capacity(parsed.accepted.len()),
        rejected: parsed.rejected,
    };
    for img in parsed.accepted {
        match img.decode(&limits.image) {
            Ok(v) => out.accepted.push(v),
            Err(r) => out.rejected.push(r),
        }
    }
    Ok(out)
}

/// Parses and validates one delivery without decoding any pixels: the schema, ids, labels,
/// captions, and each image's encoded size and declared dimensions.
///
/// # Errors
/// A [`Refusal`] when the whole message is unusable.
pub fn parse_message(
    content_type: Option<&str>,
    headers: &dyn Headers,
    body: &[u8],
    limits: &WireLimits,
) -> Result<Parsed, Refusal> {
    check_size("message", body.len(), limits.max_message_bytes).map_err(Refusal)?;
    let ct = media_type(content_type);
    let batch: IngestBatch = match ct.as_str() {
        "application/json" => parse(serde_json::from_slice::<serde_json::Value>(body).map_err(|e| e.to_string()), |v| {
            serde_json::from_value::<IngestBatch>(v).map_err(|e| e.to_string())
        })?,
        "application/msgpack" | "application/x-msgpack" => {
            let value = rmp_serde::from_slice::<rmpv_value::Value>(body).map_err(|e| e.to_string());
            parse(value, |_| rmp_serde::from_slice::<IngestBatch>(body).map_err(|e| e.to_string()))?
        }
        "image/jpeg" | "image/png" | "image/webp" => single(headers, body)?,
        "" => return Err(Refusal::new(Code::UnsupportedContentType, "no content type; use application/json, application/msgpack or image/jpeg|png|webp")),
        other => {
            return Err(Refusal::new(
                Code::UnsupportedContentType,
                format!("content type {other:?} is not accepted; use application/json, application/msgpack or image/jpeg|png|webp"),
            ))
        }
    };
    validate(batch, limits)
}

/// The media type of a content-type header value, lower case, parameters dropped.
pub(crate) fn media_type(content_type: Option<&str>) -> String {
    content_type
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// `message_too_large` when a body of `len` bytes exceeds `limit`.
pub(crate) fn check_size(what: &str, len: usize, limit: usize) -> Result<(), WireError> {
    if len > limit {
        return Err(WireError {
            code: Code::MessageTooLarge,
            message: format!("{what} of {len} bytes exceeds the limit of {limit}"),
        });
    }
    Ok(())
}

/// Two-stage parse: syntax (→ `malformed_body`), then schema (→ `schema_violation`).
fn parse<V>(
    syntax: Result<V, String>,
    schema: impl FnOnce(V) -> Result<IngestBatch, String>,
) -> Result<IngestBatch, Refusal> {
    let v = syntax
        .map_err(|e| Refusal::new(Code::MalformedBody, format!("the body does not parse: {e}")))?;
    schema(v).map_err(|e| Refusal::new(Code::SchemaViolation, e))
}

/// A generic MessagePack value, to tell a syntax error from a schema error.
mod rmpv_value {
    use serde::Deserialize;
    /// Any MessagePack value (only its well-formedness matters).
    #[derive(Deserialize)]
    #[serde(transparent)]
    pub struct Value(#[allow(dead_code)] serde::de::IgnoredAny);
}

fn single(headers: &dyn Headers, body: &[u8]) -> Result<IngestBatch, Refusal> {
    let text = |name: &str| -> Result<Option<String>, Refusal> {
        match headers.get_str(name) {
            None => Ok(None),
            Some(Ok(s)) => Ok(Some(s)),
            Some(Err(())) if name == "x-caption" => Err(Refusal::new(
                Code::InvalidCaption,
                "header x-caption must be UTF-8 text",
            )),
            Some(Err(())) => Err(Refusal::new(
                Code::SchemaViolation,
                format!("header {name} must be a UTF-8 string"),
            )),
        }
    };
    let id = text("x-image-id")?.ok_or_else(|| {
        Refusal::new(
            Code::InvalidId,
            "a single-image message needs the header x-image-id",
        )
    })?;
    let purpose = match text("x-purpose")?.as_deref() {
        None => None,
        Some("train") => Some(Purpose::Train),
        Some("gallery") => Some(Purpose::Gallery),
        Some("both") => Some(Purpose::Both),
        Some(other) => {
            return Err(Refusal::new(
                Code::SchemaViolation,
                format!("x-purpose {other:?}: expected train, gallery or both"),
            ))
        }
    };
    Ok(IngestBatch {
        v: None,
        batch_id: None,
        images: vec![IngestImage {
            id,
            person_id: text("x-person-id")?,
            camera_id: text("x-camera-id")?,
            captions: text("x-caption")?.map(|c| vec![CaptionField::Text(c)]),
            attributes: None,
            purpose,
            image: ImageField::Bytes(body.to_vec()),
        }],
    })
}

fn validate(batch: IngestBatch, limits: &WireLimits) -> Result<Parsed, Refusal> {
    let v = batch.v.unwrap_or(PROTOCOL_VERSION);
    if v > PROTOCOL_VERSION {
        return Err(Refusal::new(
            Code::UnsupportedVersion,
            format!("protocol version {v}; this daemon speaks up to {PROTOCOL_VERSION}"),
        ));
    }
    if batch.images.is_empty() {
        return Err(Refusal::new(
            Code::SchemaViolation,
            "a batch needs at least one image",
        ));
    }
    if batch.images.len() > limits.max_images {
        return Err(Refusal::new(
            Code::TooManyImages,
            format!(
                "{} images in one batch; at most {}",
                batch.images.len(),
                limits.max_images
            ),
        ));
    }
    let mut out = Parsed {
        batch_id: batch.batch_id,
        accepted: Vec::new(),
        rejected: Vec::new(),
    };
    let mut seen = std::collections::HashSet::new();
    for img in batch.images {
        let id = img.id.clone();
        match validate_image(img, limits) {
            Ok(ok) if !seen.insert(ok.id.clone()) => out.rejected.push(RejectedImage {
                id,
                code: Code::DuplicateId,
                message: "the same id appears twice in this batch".into(),
            }),
            Ok(ok) => out.accepted.push(ok),
            Err(e) => out.rejected.push(RejectedImage {
                id,
                code: e.code,
                message: e.message,
            }),
        }
    }
    Ok(out)
}

fn validate_image(img: IngestImage, limits: &WireLimits) -> Result<IntakeImage, WireError> {
    let err = |code: Code, message: String| WireError { code, message };
    if !valid_id(&img.id) {
        return Err(err(
            Code::InvalidId,
            "id must match [A-Za-z0-9._:-]{1,128}".into(),
        ));
    }
    for (name, label) in [("person_id", &img.person_id), ("camera_id", &img.camera_id)] {
        if let Some(l) = label {
            if !valid_label(l) {
                return Err(err(
                    Code::InvalidLabel,
                    format!("{name} must be 1–128 characters without control characters"),
                ));
            }
        }
    }
    let raw = img.captions.unwrap_or_default();
    if raw.len() > limits.max_captions {
        return Err(err(
            Code::InvalidCaption,
            format!("{} captions; at most {}", raw.len(), limits.max_captions),
        ));
    }
    let mut captions = Vec::with_capacity(raw.len());
    for c in raw {
        captions.push(match c {
            CaptionField::Text(t) => t,
            CaptionField::Bytes(b) => String::from_utf8(b)
                .map_err(|_| err(Code::InvalidCaption, "a caption is not UTF-8".into()))?,
        });
    }
    for c in &captions {
        let n = c.chars().count();
        if n == 0 || n > limits.max_caption_chars {
            return Err(err(
                Code::InvalidCaption,
                format!(
                    "a caption of {n} characters; 1 to {} allowed",
                    limits.max_caption_chars
                ),
            ));
        }
    }
    let bytes = match img.image {
        ImageField::Bytes(b) => b,
        ImageField::Base64(s) => base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| {
                err(
                    Code::InvalidBase64,
                    format!("image is not valid base64: {e}"),
                )
            })?,
    };
    let (_, width, height) =
        inspect(&bytes, &limits.image).map_err(|e| err(Code::from(&e), e.to_string()))?;
    Ok(IntakeImage {
        id: img.id,
        person_id: img.person_id,
        camera_id: img.camera_id,
        captions,
        attributes: img.attributes,
        purpose: img.purpose.unwrap_or_default(),
        bytes,
        width,
        height,
    })
}
