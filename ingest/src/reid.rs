//! The ReID query protocol: what clients publish on `plip.reid` and what they get back.
//!
//! A request is `application/json` (image as base64) or `application/msgpack` (raw bytes):
//! `{v?: 1, query: {image} | {text}, top_k?, exclude_camera?, deadline_ms?,
//! min_model_version?}`. The reply is
//! [`ReidReply`] or [`ReidErrorReply`], sent to `reply_to` with the request's correlation id.
//! Decoding never panics; every refusal carries a stable code.

use crate::image::{decode, IntakeLimits};
use crate::wire::{check_size, media_type, Code, ImageField, WireError, PROTOCOL_VERSION};
use base64::Engine;
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// A ReID request as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReidRequest {
    /// Protocol version; absent means 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    /// What to look for: exactly one of an image or a text.
    pub query: Query,
    /// Matches wanted (default 10, at most the configured maximum, 100 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Leave out gallery images of this camera (cross-camera search).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_camera: Option<String>,
    /// Milliseconds after publication by which the answer is useless; an AMQP `expiration`
    /// does the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Answer only with this model version or a newer one: a client that was answered by
    /// version V asks for at least V, so that a replica still behind a rollout refuses
    /// (`model_too_old`) instead of answering with an older model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_model_version: Option<u64>,
}

/// The query of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// A person image (JPEG/PNG/WebP): base64 in JSON, bytes in MessagePack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageField>,
    /// A description of the person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// One ranked gallery match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Match {
    /// The gallery sample's id.
    pub id: String,
    /// Its person id, when known.
    pub person_id: Option<String>,
    /// Its camera id, when known.
    pub camera_id: Option<String>,
    /// Cosine similarity in the joint embedding space.
    pub score: f32,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReidReply {
    /// The request's correlation id (generated when it had none).
    pub request_id: String,
    /// The checkpoint version of the encoder that computed every score of this reply.
    pub model_version: u64,
    /// The gallery version searched (changes with every promotion and every gallery change).
    pub gallery_version: u64,
    /// Time spent on the request by the daemon, milliseconds.
    pub took_ms: f64,
    /// Best first.
    pub matches: Vec<Match>,
    /// The process that answered (`serving.instance`; by default host name and process id):
    /// with several servers on one queue, which replica it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_by: Option<String>,
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReidErrorReply {
    /// The request's correlation id (generated when it had none).
    pub request_id: String,
    /// Why.
    pub error: WireError,
}

/// Limits of the request decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReidLimits {
    /// Largest request body, bytes.
    pub max_message_bytes: usize,
    /// Largest `top_k`.
    pub max_top_k: u32,
    /// Longest text query, characters (the token limit is checked by the encoder).
    pub max_text_chars: usize,
    /// Image intake limits.
    pub image: IntakeLimits,
}

impl Default for ReidLimits {
    fn default() -> Self {
        ReidLimits {
            max_message_bytes: 16 << 20,
            max_top_k: 100,
            max_text_chars: 1000,
            image: IntakeLimits::default(),
        }
    }
}

/// A query ready to embed.
#[derive(Debug, Clone)]
pub enum QueryKind {
    Image(RgbImage),
    Text(String),
}

/// A validated request.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub query: QueryKind,
    pub top_k: usize,
    pub exclude_camera: Option<String>,
    pub deadline_ms: Option<u64>,
    pub min_model_version: Option<u64>,
}

fn err(code: Code, message: impl Into<String>) -> WireError {
    WireError {
        code,
        message: message.into(),
    }
}

/// Decodes and validates one request.
///
/// # Errors
/// The first problem found, with its code.
pub fn decode_request(
    content_type: Option<&str>,
    body: &[u8],
    limits: &ReidLimits,
) -> Result<ValidRequest, WireError> {
    check_size("request", body.len(), limits.max_message_bytes)?;
    let ct = media_type(content_type);
    let req: ReidRequest = match ct.as_str() {
        "application/json" => {
            let v: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| err(Code::MalformedBody, format!("the body does not parse: {e}")))?;
            serde_json::from_value(v).map_err(|e| err(Code::SchemaViolation, e.to_string()))?
        }
        "application/msgpack" | "application/x-msgpack" => {
            rmp_serde::from_slice::<serde::de::IgnoredAny>(body)
                .map_err(|e| err(Code::MalformedBody, format!("the body does not parse: {e}")))?;
            rmp_serde::from_slice(body).map_err(|e| err(Code::SchemaViolation, e.to_string()))?
        }
        other => {
            return Err(err(
                Code::UnsupportedContentType,
                format!("content type {other:?} is not accepted; use application/json or application/msgpack"),
            ))
        }
    };
    if req.v.unwrap_or(PROTOCOL_VERSION) > PROTOCOL_VERSION {
        return Err(err(
            Code::UnsupportedVersion,
            format!(
                "protocol version {:?}; this daemon speaks {PROTOCOL_VERSION}",
                req.v
            ),
        ));
    }
    let top_k = req.top_k.unwrap_or(10);
    if top_k == 0 || top_k > limits.max_top_k {
        return Err(err(
            Code::TopKOutOfRange,
            format!("top_k = {top_k}; 1 to {} allowed", limits.max_top_k),
        ));
    }
    let query = match (req.query.image, req.query.text) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(err(
                Code::InvalidQuery,
                "a query has exactly one of image or text",
            ))
        }
        (None, Some(t)) => {
            let n = t.trim().chars().count();
            if n == 0 {
                return Err(err(Code::EmptyText, "the text query is empty"));
            }
            if t.chars().count() > limits.max_text_chars {
                return Err(err(
                    Code::TextTooLong,
                    format!(
                        "a text of {} characters; at most {}",
                        t.chars().count(),
                        limits.max_text_chars
                    ),
                ));
            }
            QueryKind::Text(t)
        }
        (Some(img), None) => {
            let bytes = match img {
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
            let pixels =
                decode(&bytes, &limits.image).map_err(|e| err(Code::from(&e), e.to_string()))?;
            QueryKind::Image(pixels)
        }
    };
    if let Some(c) = &req.exclude_camera {
        if c.is_empty() || c.chars().count() > 128 || c.chars().any(char::is_control) {
            return Err(err(
                Code::InvalidLabel,
                "exclude_camera must be 1 to 128 printable characters",
            ));
        }
    }
    Ok(ValidRequest {
        query,
        top_k: top_k as usize,
        exclude_camera: req.exclude_camera,
        deadline_ms: req.deadline_ms,
        min_model_version: req.min_model_version,
    })
}
