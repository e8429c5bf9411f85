//! Large payloads (model weights) as a sequence of messages: the broker's message size limit
//! is not negotiated, so a payload is split into chunks of a configured size, each carrying the
//! payload's identity, its place, its own CRC-32 and the whole payload's SHA-256; the reader
//! reassembles them in order and uses the payload only when every chunk arrived intact and the
//! whole matches its digest.
//!
//! The chunks of one payload are written consecutively by one writer (a stream has one writer:
//! the trainer), so reassembly needs no buffering across payloads: a chunk 0 starts a payload,
//! anything out of place or damaged discards the partial one and is reported.

use sha2::{Digest, Sha256};

/// What each chunk says about itself and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHead {
    /// The payload's identity (a model version).
    pub version: u64,
    /// This chunk's place, from 0.
    pub index: u32,
    /// Chunks in the payload.
    pub count: u32,
    /// The payload's length in bytes.
    pub total_bytes: u64,
    /// The payload's SHA-256, lower-case hex.
    pub sha256: String,
    /// CRC-32 of this chunk's bytes.
    pub crc32: u32,
}

/// Why a chunk or a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {index} of version {version} is damaged (CRC-32 mismatch)")]
    Corrupt { version: u64, index: u32 },
    #[error("chunk {index} of version {version} arrived out of place (expected {expected})")]
    OutOfPlace {
        version: u64,
        index: u32,
        expected: String,
    },
    #[error(
        "version {version}: the reassembled payload does not match its SHA-256 (or its length)"
    )]
    Checksum { version: u64 },
    #[error("chunk {index} of version {version}: a header is inconsistent ({why})")]
    BadHead {
        version: u64,
        index: u32,
        why: &'static str,
    },
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Splits `payload` (identified by `version`) into chunks of at most `chunk_bytes` bytes (one
/// empty chunk for an empty payload).
pub fn split(version: u64, payload: &[u8], chunk_bytes: usize) -> Vec<(ChunkHead, &[u8])> {
    let size = chunk_bytes.max(1);
    let parts: Vec<&[u8]> = if payload.is_empty() {
        vec![payload]
    } else {
        payload.chunks(size).collect()
    };
    let sha256 = sha256_hex(payload);
    let count = u32::try_from(parts.len()).unwrap_or(u32::MAX);
    parts
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            (
                ChunkHead {
                    version,
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                    count,
                    total_bytes: payload.len() as u64,
                    sha256: sha256.clone(),
                    crc32: crc32fast::hash(body),
                },
                body,
            )
        })
        .collect()
}

/// A payload being reassembled.
#[derive(Debug)]
struct Partial {
    head: ChunkHead,
    next: u32,
    bytes: Vec<u8>,
}

/// Reassembles the chunks of consecutive payloads.
#[derive(Debug, Default)]
pub struct Reassembler {
    partial: Option<Partial>,
}

impl Reassembler {
    /// Takes the next chunk: `Ok(Some(payload))` when it completes a payload that checks out,
    /// `Ok(None)` while one is incomplete.
    ///
    /// # Errors
    /// A damaged chunk, a chunk out of place, inconsistent headers, or a whole that does not
    /// match its digest: the partial payload is discarded (a later chunk 0 starts afresh).
    pub fn push(&mut self, head: &ChunkHead, body: &[u8]) -> Result<Option<Vec<u8>>, ChunkError> {
        let (version, index) = (head.version, head.index);
        if crc32fast::hash(body) != head.crc32 {
            self.partial = None;
            return Err(ChunkError::Corrupt { version, index });
        }
        if head.count == 0 || index >= head.count {
            self.partial = None;
            let why = "index not below count";
            return Err(ChunkError::BadHead {
                version,
                index,
                why,
            });
        }
        if index == 0 {
            self.partial = Some(Partial {
                head: head.clone(),
                next: 0,
                bytes: Vec::with_capacity(
                    usize::try_from(head.total_bytes).unwrap_or(0).min(1 << 30),
                ),
            });
        }
        let Some(p) = self.partial.as_mut() else {
            return Err(ChunkError::OutOfPlace {
                version,
                index,
                expected: "a chunk 0".into(),
            });
        };
        if p.head.version != version || p.next != index {
            let expected = format!("chunk {} of version {}", p.next, p.head.version);
            self.partial = None;
            return Err(ChunkError::OutOfPlace {
                version,
                index,
                expected,
            });
        }
        if p.head.count != head.count
            || p.head.sha256 != head.sha256
            || p.head.total_bytes != head.total_bytes
        {
            self.partial = None;
            let why = "count, length or digest differs from chunk 0's";
            return Err(ChunkError::BadHead {
                version,
                index,
                why,
            });
        }
        p.bytes.extend_from_slice(body);
        p.next += 1;
        if p.next < p.head.count {
            return Ok(None);
        }
        let Some(done) = self.partial.take() else {
            return Ok(None);
        };
        if done.bytes.len() as u64 != done.head.total_bytes
            || sha256_hex(&done.bytes) != done.head.sha256
        {
            return Err(ChunkError::Checksum { version });
        }
        Ok(Some(done.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn feed(
        r: &mut Reassembler,
        chunks: &[(ChunkHead, &[u8])],
    ) -> Vec<Result<Option<Vec<u8>>, ChunkError>> {
        chunks.iter().map(|(h, b)| r.push(h, b)).collect()
    }

    #[test]
    fn a_payload_larger_than_a_chunk_is_reassembled_and_verified() {
        let p = payload(1_000_003);
        let chunks = split(4, &p, 64 << 10);
        assert_eq!(chunks.len(), 16);
        assert!(chunks
            .iter()
            .all(|(h, _)| h.count == 16 && h.total_bytes == 1_000_003));
        let mut r = Reassembler::default();
        let out = feed(&mut r, &chunks);
        assert!(out[..15].iter().all(|o| matches!(o, Ok(None))));
        assert_eq!(out[15].as_ref().unwrap().as_deref(), Some(p.as_slice()));
        // The next payload follows on the same reassembler.
        let q = payload(10);
        let out = feed(&mut r, &split(5, &q, 4));
        assert_eq!(
            out.last().unwrap().as_ref().unwrap().as_deref(),
            Some(q.as_slice())
        );
        // An empty payload is one empty chunk.
        let out = feed(&mut r, &split(6, &[], 4));
        assert_eq!(out, vec![Ok(Some(Vec::new()))]);
    }

    #[test]
    fn a_damaged_chunk_is_refused_and_the_payload_dropped() {
        let p = payload(100);
        let chunks = split(9, &p, 30);
        let mut damaged = chunks[1].1.to_vec();
        damaged[3] ^= 0x40;
        let mut r = Reassembler::default();
        assert_eq!(r.push(&chunks[0].0, chunks[0].1), Ok(None));
        assert_eq!(
            r.push(&chunks[1].0, &damaged),
            Err(ChunkError::Corrupt {
                version: 9,
                index: 1
            })
        );
        // The rest of that payload is out of place now; a fresh copy reassembles.
        assert!(matches!(
            r.push(&chunks[2].0, chunks[2].1),
            Err(ChunkError::OutOfPlace { .. })
        ));
        let out = feed(&mut r, &chunks);
        assert_eq!(
            out.last().unwrap().as_ref().unwrap().as_deref(),
            Some(p.as_slice())
        );
    }

    #[test]
    fn a_whole_that_does_not_match_its_digest_is_refused() {
        let p = payload(90);
        let mut chunks: Vec<(ChunkHead, Vec<u8>)> = split(3, &p, 30)
            .into_iter()
            .map(|(h, b)| (h, b.to_vec()))
            .collect();
        // Every chunk intact by its own CRC, but one altered with its CRC rewritten to match.
        chunks[2].1[5] ^= 0x01;
        chunks[2].0.crc32 = crc32fast::hash(&chunks[2].1);
        let mut r = Reassembler::default();
        let out: Vec<_> = chunks.iter().map(|(h, b)| r.push(h, b)).collect();
        assert_eq!(out[2], Err(ChunkError::Checksum { version: 3 }));
        // Skipped or repeated chunks are out of place.
        let chunks = split(8, &p, 30);
        let mut r = Reassembler::default();
        assert_eq!(r.push(&chunks[0].0, chunks[0].1), Ok(None));
        assert!(matches!(
            r.push(&chunks[2].0, chunks[2].1),
            Err(ChunkError::OutOfPlace { .. })
        ));
        assert!(matches!(
            Reassembler::default().push(&chunks[1].0, chunks[1].1),
            Err(ChunkError::OutOfPlace { .. })
        ));
    }
}
