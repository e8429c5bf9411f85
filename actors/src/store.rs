//! The sample store: the `samples` tree of the state folder (id → metadata + canonical JPEG) and
//! the `arrivals` tree (arrival sequence → id) that lets the trainer mix recent and older
//! samples and lets retention evict the oldest training samples first.
//!
//! Storing is idempotent by the producer's id: a redelivered or re-sent id is stored once (and
//! so trained once). [`SampleStore::put_batch`] returns only after the writes are flushed, so a
//! delivery acknowledged afterwards never loses what it carried.

use plip_ingest::captions::{find_phrases, Caption};
use plip_ingest::image::{canonical, to_jpeg};
use plip_ingest::wire::{Purpose, ValidImage};
use serde::{Deserialize, Serialize};
use sled::Transactional;

/// JPEG quality of stored samples.
pub const JPEG_QUALITY: u8 = 92;

/// What is kept about a sample besides its pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleMeta {
    pub id: String,
    pub person_id: Option<String>,
    pub camera_id: Option<String>,
    /// Captions with their attribute phrases (empty until captioned).
    pub captions: Vec<Caption>,
    pub attributes: Option<plip_ingest::attributes::Attributes>,
    pub purpose: Purpose,
    /// Set aside for evaluating checkpoints, never trained on (decided by a hash of the person
    /// id, or of the sample id when there is none).
    pub probe: bool,
    /// Arrival order.
    pub seq: u64,
    /// For an image stored without captions or attributes: its colours, estimated from the
    /// pixels intake decoded anyway, so the captioner need not decode the image again (absent
    /// in records written before; the captioner then decodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colours: Option<plip_ingest::attributes::Attributes>,
}

/// A stored sample.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSample {
    pub meta: SampleMeta,
    /// The stored JPEG: the producer's (within 256×128, metadata stripped) or the canonical
    /// 256×128 one.
    pub jpeg: Vec<u8>,
}

fn encode(s: &StoredSample) -> Result<Vec<u8>, String> {
    let meta = serde_json::to_vec(&s.meta).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(8 + meta.len() + s.jpeg.len());
    out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&s.jpeg);
    Ok(out)
}

fn decode(bytes: &[u8]) -> Option<StoredSample> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let meta = serde_json::from_slice(bytes.get(8..8 + len)?).ok()?;
    Some(StoredSample {
        meta,
        jpeg: bytes.get(8 + len..)?.to_vec(),
    })
}

fn decode_meta(bytes: &[u8]) -> Option<SampleMeta> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    serde_json::from_slice(bytes.get(8..8 + len)?).ok()
}

/// FNV-1a, stable across builds and platforms (std's hasher is not).
fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether a sample belongs to the probe split (`percent` of the person ids).
pub fn is_probe(person_id: Option<&str>, id: &str, percent: u32) -> bool {
    stable_hash(person_id.unwrap_or(id)) % 100 < u64::from(percent)
}

/// Counts by purpose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub train: u64,
    pub gallery: u64,
    pub both: u64,
    pub probe: u64,
}

/// The store over a state folder's database.
#[derive(Clone)]
pub struct SampleStore {
    db: sled::Db,
    samples: sled::Tree,
    arrivals: sled::Tree,
    /// Ids of samples stored without captions, waiting for the caption workers.
    uncaptioned: sled::Tree,
    probe_percent: u32,
}

/// Environment variable naming a file whose existence makes every write fail as a full disk
/// would: the fault-injection hook of the storage-failure tests (unset in production).
pub const FAULT_FILE_ENV: &str = "PLIP_FAULT_FAIL_WRITES_FILE";

fn injected_fault() -> Result<(), String> {
    match std::env::var_os(FAULT_FILE_ENV) {
        Some(f) if std::path::Path::new(&f).exists() => {
            Err("injected write failure (No space left on device)".into())
        }
        _ => Ok(()),
    }
}

/// Environment variable naming a file whose existence makes storage calls (sample counts and
/// writes) block until it is removed, as a stuck disk would: the fault-injection hook of the
/// stuck-storage tests (unset in production).
pub const FAULT_STALL_FILE_ENV: &str = "PLIP_FAULT_STALL_FILE";

fn injected_stall() {
    if let Some(f) = std::env::var_os(FAULT_STALL_FILE_ENV) {
        while std::path::Path::new(&f).exists() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl SampleStore {
    /// Opens the trees in `db`.
    ///
    /// # Errors
    /// A database error.
    pub fn open(db: &sled::Db, probe_percent: u32) -> Result<Self, sled::Error> {
        Ok(SampleStore {
            samples: db.open_tree("samples")?,
            arrivals: db.open_tree("arrivals")?,
            uncaptioned: db.open_tree("uncaptioned")?,
            db: db.clone(),
            probe_percent,
        })
    }

    /// Stores validated images (new ids only) and flushes. Returns, per image, whether it was
    /// new. Captions given by the producer keep their phrases found in the text; images without
    /// captions are stored uncaptioned (the caption workers fill them in).
    ///
    /// # Errors
    /// A failed write or flush: nothing of this batch may be acknowledged.
    pub fn put_batch(&self, images: &[ValidImage]) -> Result<Vec<bool>, String> {
        let fresh = images
            .iter()
            .map(|img| self.put_one(img))
            .collect::<Result<Vec<bool>, String>>()?;
        self.flush()?;
        Ok(fresh)
    }

    /// Stores one validated image (the producer's JPEG or the canonical one, metadata, arrival
    /// entry and captioning ticket in one transaction) without flushing; returns whether its id was new. A delivery may be
    /// acknowledged only after [`SampleStore::flush`] has returned.
    ///
    /// # Errors
    /// A failed write.
    pub fn put_one(&self, img: &ValidImage) -> Result<bool, String> {
        injected_stall();
        injected_fault()?;
        let seq = self.db.generate_id().map_err(|e| e.to_string())?;
        // The producer's JPEG when it is small enough (metadata stripped at intake); otherwise
        // the canonical 256×128 form, encoded once. Readers decode and resize at use.
        let jpeg = match &img.encoded {
            Some(bytes) => bytes.clone(),
            None => to_jpeg(&canonical(&img.pixels), JPEG_QUALITY).map_err(|e| e.to_string())?,
        };
        let meta = SampleMeta {
            id: img.id.clone(),
            person_id: img.person_id.clone(),
            camera_id: img.camera_id.clone(),
            captions: img
                .captions
                .iter()
                .map(|t| Caption {
                    text: t.clone(),
                    phrases: find_phrases(t),
                })
                .collect(),
            attributes: img.attributes,
            purpose: img.purpose,
            probe: is_probe(img.person_id.as_deref(), &img.id, self.probe_percent),
            seq,
            colours: (img.captions.is_empty() && img.attributes.is_none())
                .then(|| plip_ingest::captions::estimate_colours(&img.pixels)),
        };
        let needs_captions = meta.captions.is_empty();
        let value = encode(&StoredSample { meta, jpeg })?;
        // The sample, its arrival entry and its captioning ticket are written together or
        // not at all.
        (&self.samples, &self.arrivals, &self.uncaptioned)
            .transaction(|(samples, arrivals, uncaptioned)| {
                if samples.get(img.id.as_bytes())?.is_some() {
                    return Ok(false);
                }
                samples.insert(img.id.as_bytes(), value.as_slice())?;
                arrivals.insert(&seq.to_be_bytes(), img.id.as_bytes())?;
                if needs_captions {
                    uncaptioned.insert(img.id.as_bytes(), &[])?;
                }
                Ok(true)
            })
            .map_err(|e: sled::transaction::TransactionError<()>| format!("{e:?}"))
    }

    /// One sample by id.
    pub fn get(&self, id: &str) -> Result<Option<StoredSample>, String> {
        Ok(self
            .samples
            .get(id.as_bytes())
            .map_err(|e| e.to_string())?
            .and_then(|v| decode(&v)))
    }

    /// Replaces a sample's captions (from the caption workers) and clears its captioning
    /// ticket, in one transaction.
    pub fn set_captions(&self, id: &str, captions: Vec<Caption>) -> Result<(), String> {
        injected_fault()?;
        let Some(mut s) = self.get(id)? else {
            self.uncaptioned
                .remove(id.as_bytes())
                .map_err(|e| e.to_string())?;
            return Ok(());
        };
        s.meta.captions = captions;
        let value = encode(&s)?;
        (&self.samples, &self.uncaptioned)
            .transaction(|(samples, uncaptioned)| {
                samples.insert(id.as_bytes(), value.as_slice())?;
                uncaptioned.remove(id.as_bytes())?;
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| format!("{e:?}"))?;
        Ok(())
    }

    /// Up to `n` ids waiting for captions whose stable hash falls in `shard` of `shards`.
    pub fn uncaptioned(&self, n: usize, shard: usize, shards: usize) -> Vec<String> {
        self.uncaptioned
            .iter()
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .filter(|id| stable_hash(id) as usize % shards.max(1) == shard)
            .take(n)
            .collect()
    }

    /// Samples waiting for captions.
    pub fn uncaptioned_len(&self) -> usize {
        self.uncaptioned.len()
    }

    /// The newest arrival sequence number (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.arrivals
            .last()
            .ok()
            .flatten()
            .and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0)
    }

    /// Metadata of every sample, in arrival order (pixels not read).
    pub fn metas(&self) -> Vec<SampleMeta> {
        self.arrivals
            .iter()
            .values()
            .filter_map(|v| v.ok())
            .filter_map(|id| self.samples.get(&id).ok().flatten())
            .filter_map(|v| decode_meta(&v))
            .collect()
    }

    /// Deletes every sample of `person` (samples, arrival entries, captioning tickets), flushed.
    /// Returns the ids removed.
    ///
    /// # Errors
    /// A database error.
    pub fn forget_person(&self, person: &str) -> Result<Vec<String>, String> {
        let doomed: Vec<SampleMeta> = self
            .metas()
            .into_iter()
            .filter(|m| m.person_id.as_deref() == Some(person))
            .collect();
        for m in &doomed {
            (&self.samples, &self.arrivals, &self.uncaptioned)
                .transaction(|(samples, arrivals, uncaptioned)| {
                    samples.remove(m.id.as_bytes())?;
                    arrivals.remove(&m.seq.to_be_bytes())?;
                    uncaptioned.remove(m.id.as_bytes())?;
                    Ok(())
                })
                .map_err(|e: sled::transaction::TransactionError<()>| format!("{e:?}"))?;
        }
        self.db.flush().map_err(|e| e.to_string())?;
        Ok(doomed.into_iter().map(|m| m.id).collect())
    }

    /// Flushes everything written so far.
    ///
    /// # Errors
    /// The flush failed: what was written since the last flush may not be durable.
    pub fn flush(&self) -> Result<(), String> {
        injected_fault()?;
        self.db.flush().map(|_| ()).map_err(|e| e.to_string())
    }

    /// Number of stored samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Counts by purpose and probe.
    pub fn counts(&self) -> Counts {
        injected_stall();
        let mut c = Counts::default();
        for m in self
            .samples
            .iter()
            .values()
            .filter_map(|v| v.ok())
            .filter_map(|v| decode_meta(&v))
        {
            match m.purpose {
                Purpose::Train => c.train += 1,
                Purpose::Gallery => c.gallery += 1,
                Purpose::Both => c.both += 1,
            }
            if m.probe {
                c.probe += 1;
            }
        }
        c
    }

    /// Ids in arrival order, oldest first.
    pub fn ids_by_arrival(&self) -> Vec<String> {
        self.arrivals
            .iter()
            .values()
            .filter_map(|v| v.ok())
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .collect()
    }

    /// Evicts the oldest training-only, non-probe samples until at most `cap` of them remain.
    /// Gallery and probe samples are never evicted. Returns how many were removed (flushed).
    pub fn evict_training(&self, cap: usize) -> Result<usize, String> {
        let trainable: Vec<(sled::IVec, String)> = self
            .arrivals
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(k, v)| {
                let id = String::from_utf8_lossy(&v).into_owned();
                let m = decode_meta(&self.samples.get(&v).ok().flatten()?)?;
                (m.purpose == Purpose::Train && !m.probe).then_some((k, id))
            })
            .collect();
        let excess = trainable.len().saturating_sub(cap);
        for (k, id) in trainable.iter().take(excess) {
            self.samples
                .remove(id.as_bytes())
                .map_err(|e| e.to_string())?;
            self.arrivals.remove(k).map_err(|e| e.to_string())?;
            self.uncaptioned
                .remove(id.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        self.db.flush().map_err(|e| e.to_string())?;
        Ok(excess)
    }
}
