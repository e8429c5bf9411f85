//! What goes back to the broker about a refused message, built in one place so that nothing a
//! producer sent can make it too large or unreadable:
//!
//! - [`clip`]: every producer string echoed into a header, a reply, a log line or an error
//!   message is escaped (control characters and `\` as Rust escapes, so an id holding `\n`
//!   cannot split a text log line) and bounded at a character boundary, with an ellipsis and
//!   the original length.
//! - [`measure`]: the depth and encoded size of an AMQP header table, computed with an explicit
//!   stack — a table nested 18,000 deep (what a 128 KiB frame can carry) must not recurse on the
//!   daemon's threads. [`check_headers`] refuses tables deeper than [`MAX_HEADER_DEPTH`]
//!   (`header_too_deep`) or larger than [`MAX_HEADER_BYTES`] (`headers_too_large`).
//! - [`dead_letter_properties`]: the properties of a dead-letter copy — the original headers
//!   when they are shallow, at most [`MAX_HEADER_BYTES`] and fit, plus `x-plip-error = {code, message}` and
//!   `x-plip-rejected` (one `{id, code, message}` per refused image within a byte budget,
//!   `x-plip-rejected-omitted` counting the rest) — sized to fit the negotiated frame whatever
//!   the message held; when the original headers cannot stay, they are dropped and
//!   `x-plip-error.headers_dropped` says why.
//! - [`bounded_outcome`] and [`bounded_error`]: the replies' producer strings, clipped.

use crate::wire::{Code, IngestOutcome, RejectedImage, WireError};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

/// Longest echo of one producer string (an id, a field name, a header value), bytes.
pub const MAX_ECHO_BYTES: usize = 256;
/// Longest error message in a header or reply, bytes (messages quote producer strings).
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Deepest header table accepted (tables and arrays count as levels; producers' headers are
/// flat in practice).
pub const MAX_HEADER_DEPTH: usize = 16;
/// Largest encoded header table accepted, bytes.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Byte budget of the `x-plip-rejected` list in a dead-letter copy.
pub const REJECTED_BUDGET: usize = 8 * 1024;
/// The frame size assumed when the connection reports none (0 = no limit): RabbitMQ's default.
pub const DEFAULT_FRAME_MAX: u32 = 131_072;
/// Room kept in a frame for the content header's own fields and the 13 other properties
/// (each a short string of at most 255 bytes).
const FRAME_OVERHEAD: usize = 8 * 1024;

/// Escapes control characters and `\` (Rust escapes: `\n`, `\u{1b}`, `\\`) and bounds the
/// result to `max` bytes, cut at a character boundary and marked `…(N bytes)` with the
/// original length. Strings that need neither come back unchanged.
pub fn clip(s: &str, max: usize) -> String {
    let escaped = |c: char| c.is_control() || c == '\\';
    let width = |c: char| {
        if escaped(c) {
            c.escape_debug().count()
        } else {
            c.len_utf8()
        }
    };
    let full: usize = s.chars().map(width).sum();
    // Every escape is longer than its character: equal lengths mean nothing to escape.
    if full == s.len() && full <= max {
        return s.to_string();
    }
    let marker = if full <= max {
        String::new()
    } else {
        format!("…({} bytes)", s.len())
    };
    let room = max.saturating_sub(marker.len());
    let mut out = String::with_capacity(full.min(max));
    for c in s.chars() {
        if out.len() + width(c) > room {
            break;
        }
        if escaped(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out.push_str(&marker);
    out
}

/// Bounds `s` to `max` bytes at a character boundary, marked `…(N bytes)`, without escaping:
/// for composing a message that [`clip`] escapes once where it leaves the process.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let marker = format!("…({} bytes)", s.len());
    let mut end = max.saturating_sub(marker.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{marker}", &s[..end])
}

/// The shape of a header table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableShape {
    /// Nesting depth: 1 for a flat table; each nested table or array adds one.
    pub depth: usize,
    /// Encoded size in an AMQP frame, bytes.
    pub bytes: usize,
}

/// Depth and encoded size of `table`, without recursion.
pub fn measure(table: &FieldTable) -> TableShape {
    let mut bytes = 4usize;
    let mut depth = 1usize;
    let mut stack: Vec<(&AMQPValue, usize)> = Vec::new();
    for (k, v) in table {
        bytes += 1 + k.as_str().len();
        stack.push((v, 1));
    }
    while let Some((v, level)) = stack.pop() {
        bytes += 1;
        bytes += match v {
            AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
            AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
            AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
            AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
            AMQPValue::DecimalValue(_) => 5,
            AMQPValue::ShortString(s) => 1 + s.as_str().len(),
            AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
            AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
            AMQPValue::Void => 0,
            AMQPValue::FieldArray(a) => {
                depth = depth.max(level + 1);
                for x in a.as_slice() {
                    stack.push((x, level + 1));
                }
                4
            }
            AMQPValue::FieldTable(t) => {
                depth = depth.max(level + 1);
                let mut keys = 0;
                for (k, x) in t {
                    keys += 1 + k.as_str().len();
                    stack.push((x, level + 1));
                }
                4 + keys
            }
        };
    }
    TableShape { depth, bytes }
}

/// Refuses header tables a consumer must not copy or walk recursively: deeper than
/// [`MAX_HEADER_DEPTH`] (`header_too_deep`) or larger than [`MAX_HEADER_BYTES`]
/// (`headers_too_large`).
///
/// # Errors
/// The refusal, with the measured shape in its message.
pub fn check_headers(headers: Option<&FieldTable>) -> Result<(), WireError> {
    let Some(t) = headers else { return Ok(()) };
    let s = measure(t);
    if s.depth > MAX_HEADER_DEPTH {
        return Err(WireError {
            code: Code::HeaderTooDeep,
            message: format!(
                "the header table is nested {} deep; at most {MAX_HEADER_DEPTH} levels are accepted",
                s.depth
            ),
        });
    }
    if s.bytes > MAX_HEADER_BYTES {
        return Err(WireError {
            code: Code::HeadersTooLarge,
            message: format!(
                "the header table takes {} bytes; at most {MAX_HEADER_BYTES} are accepted",
                s.bytes
            ),
        });
    }
    Ok(())
}

/// `err` with its message clipped to [`MAX_MESSAGE_BYTES`] and escaped.
pub fn bounded_error(err: &WireError) -> WireError {
    WireError {
        code: err.code,
        message: clip(&err.message, MAX_MESSAGE_BYTES),
    }
}

/// An ingest outcome whose producer strings (batch id, refused ids, messages) are clipped; the
/// accepted ids passed validation and are short already.
pub fn bounded_outcome(outcome: IngestOutcome) -> IngestOutcome {
    IngestOutcome {
        batch_id: outcome.batch_id.map(|b| clip(&b, MAX_ECHO_BYTES)),
        accepted: outcome.accepted,
        rejected: outcome
            .rejected
            .into_iter()
            .map(|r| RejectedImage {
                id: clip(&r.id, MAX_ECHO_BYTES),
                code: r.code,
                message: clip(&r.message, MAX_MESSAGE_BYTES),
            })
            .collect(),
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn error_table(code: Code, message: &str) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("code".into(), long(code.as_str()));
    t.insert("message".into(), long(&clip(message, MAX_MESSAGE_BYTES)));
    t
}

/// The properties of `original` without its headers and without `user_id` (the broker checks
/// `user_id` against the publishing connection's user, so the daemon cannot republish another
/// producer's), copied field by field so that a deep header table is never cloned.
pub fn properties_without_headers(original: &BasicProperties) -> BasicProperties {
    let mut p = BasicProperties::default();
    let s = |v: &Option<ShortString>| v.clone();
    if let Some(v) = s(original.content_type()) {
        p = p.with_content_type(v);
    }
    if let Some(v) = s(original.content_encoding()) {
        p = p.with_content_encoding(v);
    }
    if let Some(v) = *original.delivery_mode() {
        p = p.with_delivery_mode(v);
    }
    if let Some(v) = *original.priority() {
        p = p.with_priority(v);
    }
    if let Some(v) = s(original.correlation_id()) {
        p = p.with_correlation_id(v);
    }
    if let Some(v) = s(original.reply_to()) {
        p = p.with_reply_to(v);
    }
    if let Some(v) = s(original.expiration()) {
        p = p.with_expiration(v);
    }
    if let Some(v) = s(original.message_id()) {
        p = p.with_message_id(v);
    }
    if let Some(v) = *original.timestamp() {
        p = p.with_timestamp(v);
    }
    if let Some(v) = s(original.kind()) {
        p = p.with_type(v);
    }
    if let Some(v) = s(original.app_id()) {
        p = p.with_app_id(v);
    }
    if let Some(v) = s(original.cluster_id()) {
        p = p.with_cluster_id(v);
    }
    p
}

/// The properties of the dead-letter copy of a message refused with `err` (and, for a batch
/// refused in part, its refused images), persistent, fitting a frame of `frame_max` bytes.
pub fn dead_letter_properties(
    original: &BasicProperties,
    err: &WireError,
    rejected: &[RejectedImage],
    frame_max: u32,
) -> BasicProperties {
    let frame = if frame_max == 0 {
        DEFAULT_FRAME_MAX
    } else {
        frame_max
    } as usize;
    let budget = frame.saturating_sub(FRAME_OVERHEAD);

    let mut ours = FieldTable::default();
    let mut error = error_table(err.code, &err.message);
    if !rejected.is_empty() {
        let mut list = Vec::new();
        let mut used = 0usize;
        let mut omitted = 0u32;
        for r in rejected {
            let mut t = error_table(r.code, &r.message);
            t.insert("id".into(), long(&clip(&r.id, MAX_ECHO_BYTES)));
            let size = measure(&t).bytes + 1;
            if used + size > REJECTED_BUDGET {
                omitted += 1;
                continue;
            }
            used += size;
            list.push(AMQPValue::FieldTable(t));
        }
        ours.insert(
            "x-plip-rejected".into(),
            AMQPValue::FieldArray(FieldArray::from(list)),
        );
        if omitted > 0 {
            ours.insert(
                "x-plip-rejected-omitted".into(),
                AMQPValue::LongUInt(omitted),
            );
        }
    }
    let ours_bytes = measure(&ours).bytes + measure(&error).bytes + 32;

    // The original headers stay only when they are shallow and the copy still fits.
    let keep = match original.headers() {
        None => Ok(None),
        Some(h) => {
            let s = measure(h);
            if s.depth > MAX_HEADER_DEPTH {
                Err(format!(
                    "the original headers (nested {} deep) were dropped from this copy",
                    s.depth
                ))
            } else if s.bytes > MAX_HEADER_BYTES {
                Err(format!(
                    "the original headers ({} bytes, over the {MAX_HEADER_BYTES} accepted) were dropped from this copy",
                    s.bytes
                ))
            } else if s.bytes + ours_bytes > budget {
                Err(format!(
                    "the original headers ({} bytes) were dropped: with the error headers the copy would exceed the {frame}-byte frame",
                    s.bytes
                ))
            } else {
                Ok(Some(h))
            }
        }
    };
    let mut props = properties_without_headers(original).with_delivery_mode(2);
    let mut headers = match keep {
        Ok(Some(h)) => {
            let mut h = h.clone();
            // Our own keys replace a producer's of the same name.
            for k in ["x-plip-error", "x-plip-rejected", "x-plip-rejected-omitted"] {
                if h.contains_key(k) {
                    let mut rebuilt = FieldTable::default();
                    for (key, v) in &h {
                        if key.as_str() != k {
                            rebuilt.insert(key.clone(), v.clone());
                        }
                    }
                    h = rebuilt;
                }
            }
            h
        }
        Ok(None) => FieldTable::default(),
        Err(why) => {
            error.insert("headers_dropped".into(), long(&why));
            FieldTable::default()
        }
    };
    if let Some(u) = original.user_id() {
        headers.insert(
            "x-plip-original-user-id".into(),
            long(&clip(u.as_str(), MAX_ECHO_BYTES)),
        );
    }
    headers.insert("x-plip-error".into(), AMQPValue::FieldTable(error));
    for (k, v) in &ours {
        headers.insert(k.clone(), v.clone());
    }
    props = props.with_headers(headers);
    props
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_leaves_short_plain_strings_alone() {
        assert_eq!(clip("abc-01", 256), "abc-01");
        assert_eq!(clip("", 256), "");
    }

    #[test]
    fn cut_bounds_without_escaping() {
        assert_eq!(cut("a\nb", 10), "a\nb");
        let c = cut(&"é".repeat(1000), 256);
        assert!(c.len() <= 256 && c.ends_with("…(2000 bytes)"), "{c}");
        // Escaped once by clip, whatever was cut first.
        assert_eq!(clip(&cut("x\ny", 10), 100), "x\\ny");
    }

    #[test]
    fn clip_escapes_control_characters_and_backslashes() {
        assert_eq!(clip("a\nb\\c\u{1b}", 256), "a\\nb\\\\c\\u{1b}");
    }

    #[test]
    fn clip_bounds_at_a_character_boundary_with_the_length() {
        let s = "é".repeat(1000); // 2,000 bytes
        let c = clip(&s, 256);
        assert!(c.len() <= 256, "{}", c.len());
        assert!(c.ends_with("…(2000 bytes)"), "{c}");
        assert!(c.starts_with("éé"));
        let a = "A/".repeat(35_000);
        let c = clip(&a, 256);
        assert!(c.len() <= 256 && c.ends_with("…(70000 bytes)"), "{c}");
        // Escapes count towards the bound.
        let n = "\n".repeat(500);
        let c = clip(&n, 100);
        assert!(c.len() <= 100 && c.starts_with("\\n\\n"), "{c}");
    }

    fn nested(depth: usize) -> FieldTable {
        let mut t = FieldTable::default();
        for _ in 1..depth {
            let mut outer = FieldTable::default();
            outer.insert("a".into(), AMQPValue::FieldTable(t));
            t = outer;
        }
        t
    }

    #[test]
    fn measure_matches_the_encoding() {
        let mut t = FieldTable::default();
        t.insert("k".into(), long("abc")); // 1+1 key, 1 tag + 4 + 3
        t.insert("n".into(), AMQPValue::LongUInt(7)); // 2 + 1 + 4
        assert_eq!(
            measure(&t),
            TableShape {
                depth: 1,
                bytes: 4 + 10 + 7
            }
        );
        let s = measure(&nested(40));
        assert_eq!(s.depth, 40);
        // 4 for the innermost table, 7 per level around it.
        assert_eq!(s.bytes, 4 + 7 * 39);
        let mut a = FieldTable::default();
        a.insert(
            "l".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Boolean(true)])),
        );
        assert_eq!(
            measure(&a),
            TableShape {
                depth: 2,
                bytes: 4 + 2 + 1 + 4 + 2
            }
        );
    }

    #[test]
    fn deep_and_huge_tables_are_refused_with_their_codes() {
        assert!(check_headers(None).is_ok());
        assert!(check_headers(Some(&nested(MAX_HEADER_DEPTH))).is_ok());
        let deep = nested(MAX_HEADER_DEPTH + 1);
        assert_eq!(
            check_headers(Some(&deep)).unwrap_err().code,
            Code::HeaderTooDeep
        );
        let mut big = FieldTable::default();
        big.insert("x".into(), long(&"z".repeat(MAX_HEADER_BYTES)));
        assert_eq!(
            check_headers(Some(&big)).unwrap_err().code,
            Code::HeadersTooLarge
        );
        std::mem::forget(deep);
    }

    fn error(message: &str) -> WireError {
        WireError {
            code: Code::InvalidId,
            message: message.into(),
        }
    }

    #[test]
    fn dead_letter_copies_fit_the_frame_whatever_the_message_held() {
        let long_id = "A/".repeat(35_000);
        let rejected: Vec<RejectedImage> = (0..300)
            .map(|i| RejectedImage {
                id: format!("{long_id}{i}"),
                code: Code::InvalidId,
                message: format!("bad id {long_id}"),
            })
            .collect();
        // A header table that fitted the producer's frame, but not beside the error headers.
        let mut h = FieldTable::default();
        h.insert("x-image-id".into(), long(&"Z".repeat(118_000)));
        let original = BasicProperties::default()
            .with_headers(h)
            .with_user_id("someone-else".into());
        let p = dead_letter_properties(
            &original,
            &error(&format!("first: {long_id}")),
            &rejected,
            131_072,
        );
        let headers = p.headers().as_ref().unwrap();
        let s = measure(headers);
        assert!(s.bytes < 131_072 - FRAME_OVERHEAD, "{s:?}");
        let err = match headers.inner().get("x-plip-error") {
            Some(AMQPValue::FieldTable(t)) => t.clone(),
            other => panic!("{other:?}"),
        };
        assert!(
            err.inner().contains_key("headers_dropped"),
            "a 118 KB header table does not fit beside the error headers: {:?}",
            err.inner().keys().collect::<Vec<_>>()
        );
        assert!(!headers.contains_key("x-image-id"));
        assert!(matches!(
            headers.inner().get("x-plip-rejected-omitted"),
            Some(AMQPValue::LongUInt(n)) if *n > 0
        ));
        assert!(p.user_id().is_none());
        assert_eq!(*p.delivery_mode(), Some(2));
        // Small original headers stay.
        let mut small = FieldTable::default();
        small.insert("x-camera".into(), long("c1"));
        let p = dead_letter_properties(
            &BasicProperties::default().with_headers(small),
            &error("x"),
            &[],
            131_072,
        );
        let h = p.headers().as_ref().unwrap();
        assert!(h.contains_key("x-camera") && h.contains_key("x-plip-error"));
    }

    #[test]
    fn deep_original_headers_are_dropped_not_copied() {
        let deep = nested(5000);
        let original = BasicProperties::default()
            .with_headers(deep)
            .with_correlation_id("c-1".into());
        let p = dead_letter_properties(&original, &error("deep"), &[], 131_072);
        let h = p.headers().as_ref().unwrap();
        assert_eq!(measure(h).depth, 2);
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "c-1");
        // The deep table is not dropped here: its recursive destructor would need a large stack.
        std::mem::forget(original);
    }

    #[test]
    fn replies_are_bounded() {
        let o = bounded_outcome(IngestOutcome {
            batch_id: Some("b\n".repeat(10_000)),
            accepted: vec!["ok".into()],
            rejected: vec![RejectedImage {
                id: "x".repeat(100_000),
                code: Code::InvalidId,
                message: "y".repeat(100_000),
            }],
        });
        assert!(o.batch_id.unwrap().len() <= MAX_ECHO_BYTES);
        assert!(o.rejected[0].id.len() <= MAX_ECHO_BYTES);
        assert!(o.rejected[0].message.len() <= MAX_MESSAGE_BYTES);
        assert_eq!(
            bounded_error(&error(&"q".repeat(5000))).message.len(),
            MAX_MESSAGE_BYTES
        );
    }
}
