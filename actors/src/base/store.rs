//! The sample store: the `samples` tree of the state folder (id → metadata and where the JPEG
//! is), the pack files holding the JPEGs ([`crate::base::packs`]), and the `arrivals` tree (arrival
//! sequence → id) that lets the trainer mix recent and older samples and lets retention evict
//! the oldest training samples first.
//!
//! Storing is idempotent by the producer's id: a redelivered or re-sent id is stored once (and
//! so trained once). Writing is two steps — [`SampleStore::stage`] appends an image's bytes to
//! a pack, [`SampleStore::commit`] makes the packs durable and then writes the records — and a
//! delivery is acknowledged only after [`SampleStore::flush`]; [`SampleStore::put_batch`] does
//! all three. Records written before pack files existed hold their JPEG inline and are read as
//! before.

use crate::base::error::{Error, Result};

use plip_ingest::captions::{find_phrases, Caption};
use plip_ingest::image::canonical_jpeg;
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
    /// Colours estimated at intake for a record stored with a captioning ticket, so the caption
    /// workers need not decode it again: written by one earlier version only (intake now
    /// captions what it stores) and still read from its state folders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colours: Option<plip_ingest::attributes::Attributes>,
    /// Where the JPEG is (absent in records written before pack files, which hold it inline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::base::packs::PackRef>,
}

/// A stored sample.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSample {
    pub meta: SampleMeta,
    /// The stored JPEG: the producer's (within 256×128, metadata stripped) or the canonical
    /// 256×128 one.
    pub jpeg: Vec<u8>,
}

/// A record: the metadata's length (8 bytes, little-endian), the metadata (JSON), then — in
/// records written before pack files only — the JPEG.
fn encode_record(meta: &SampleMeta) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(meta)?;
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// The metadata and any inline JPEG of a record.
fn decode_record(bytes: &[u8]) -> Option<(SampleMeta, &[u8])> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let meta = serde_json::from_slice(bytes.get(8..8usize.checked_add(len)?)?).ok()?;
    Some((meta, bytes.get(8 + len..)?))
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

/// An arrival sequence number handed out and not yet committed or abandoned: followers of the
/// arrivals (the gallery log) must not pass it, since concurrent deliveries commit out of
/// sequence order.
#[derive(Debug)]
struct Unsettled {
    seq: u64,
    set: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.seq);
    }
}

/// An image staged by [`SampleStore::stage`]: its bytes are in a pack, its record is ready.
#[derive(Debug)]
pub struct Staged {
    id: String,
    seq: u64,
    /// Holds `seq` among the store's unsettled arrivals until this is committed or dropped.
    _unsettled: Unsettled,
    record: Vec<u8>,
    purpose: Purpose,
    probe: bool,
    image: crate::base::packs::PackRef,
    captioned: bool,
}

/// What storing an image did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Put {
    /// The id was new (false: already stored, nothing written).
    pub fresh: bool,
    /// The daemon wrote its captions (the image came without any).
    pub captioned: bool,
}

/// The captions the daemon writes for a sample that came without any: PLIP's two styles and
/// the prompt, from `attrs` (the producer's attributes or the colours estimated in the pixels;
/// unknown attributes are left out), seeded by the arrival sequence so that a record's
/// captions are reproducible.
pub fn daemon_captions(attrs: &plip_ingest::attributes::Attributes, seq: u64) -> Vec<Caption> {
    let set = plip_ingest::captions::synthesize(attrs, seq ^ 0x9e37_79b9_7f4a_7c15);
    let mut captions = set.captions;
    captions.push(set.prompt);
    captions
}

/// Counts by purpose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub train: u64,
    pub gallery: u64,
    pub both: u64,
    pub probe: u64,
}

impl Counts {
    fn add(&mut self, m: &SampleMeta, sign: i8) {
        self.add_as(m.purpose, m.probe, sign);
    }

    fn add_as(&mut self, purpose: Purpose, probe: bool, sign: i8) {
        let slot = match purpose {
            Purpose::Train => &mut self.train,
            Purpose::Gallery => &mut self.gallery,
            Purpose::Both => &mut self.both,
        };
        step(slot, sign);
        if probe {
            step(&mut self.probe, sign);
        }
    }
}

fn step(n: &mut u64, sign: i8) {
    *n = if sign < 0 {
        n.saturating_sub(1)
    } else {
        *n + 1
    };
}

/// The store's figures, kept as samples come and go: counting them in sled is a scan of the
/// whole database (sled's `len` iterates), which `/status` and `/metrics` must not pay per call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    counts: Counts,
    total: u64,
    uncaptioned: u64,
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
    /// Counted once when the store is opened, then updated by every write that commits.
    tally: std::sync::Arc<std::sync::Mutex<Tally>>,
    packs: std::sync::Arc<crate::base::packs::Packs>,
    /// Arrival numbers staged and not yet committed (or abandoned).
    unsettled: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
}

/// Environment variable naming a file whose existence makes every write fail as a full disk
/// would: the fault-injection hook of the storage-failure tests (unset in production).
pub const FAULT_FILE_ENV: &str = "PLIP_FAULT_FAIL_WRITES_FILE";

fn injected_fault() -> Result<()> {
    match std::env::var_os(FAULT_FILE_ENV) {
        Some(f) if std::path::Path::new(&f).exists() => Err(Error::Storage(
            "injected write failure (No space left on device)".into(),
        )),
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
    /// Opens the trees in `db` and the pack files under `dir` (the state folder), reclaiming
    /// pack bytes no record references (see [`crate::base::packs`]).
    ///
    /// # Errors
    /// A database error, or pack files that cannot be read or written.
    pub fn open(db: &sled::Db, dir: &std::path::Path, probe_percent: u32) -> Result<Self> {
        let samples = db.open_tree(super::state::trees::SAMPLES)?;
        let uncaptioned = db.open_tree(super::state::trees::UNCAPTIONED)?;
        // One scan at open: the figures (every later write keeps them) and the pack entries
        // the records reference.
        let mut tally = Tally {
            uncaptioned: uncaptioned.len() as u64,
            ..Tally::default()
        };
        let mut referenced = Vec::new();
        for v in samples.iter().values() {
            tally.total += 1;
            if let Some(m) = decode_meta(&v?) {
                tally.counts.add(&m, 1);
                referenced.extend(m.image);
            }
        }
        let (packs, recovered) =
            crate::base::packs::Packs::open(dir, referenced, crate::base::packs::PACK_MAX_BYTES)
                .map_err(|e| {
                    Error::Storage(format!("opening the pack files in {}: {e}", dir.display()))
                })?;
        if recovered != crate::base::packs::Recovered::default() {
            tracing::info!(
                packs_deleted = recovered.packs_deleted,
                orphan_bytes = recovered.orphan_bytes,
                "pack_space_reclaimed"
            );
        }
        Ok(SampleStore {
            samples,
            arrivals: db.open_tree(super::state::trees::ARRIVALS)?,
            uncaptioned,
            db: db.clone(),
            probe_percent,
            tally: std::sync::Arc::new(std::sync::Mutex::new(tally)),
            unsettled: std::sync::Arc::default(),
            packs: std::sync::Arc::new(packs),
        })
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        // The figures stay usable when a holder panicked: each update is a few additions.
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores validated images (new ids only) and flushes. Returns, per image, whether it was
    /// new. Captions given by the producer keep their phrases found in the text; images without
    /// captions are captioned as they are stored ([`daemon_captions`]).
    ///
    /// # Errors
    /// A failed write or flush: nothing of this batch may be acknowledged.
    pub fn put_batch(&self, images: &[ValidImage]) -> Result<Vec<bool>> {
        let mut staged = Vec::with_capacity(images.len());
        let mut fresh = Vec::with_capacity(images.len());
        for s in self.stage_all(images)? {
            fresh.push(s.is_some());
            staged.extend(s);
        }
        let committed = self.commit(staged)?;
        self.flush()?;
        // An id stored twice in one batch is new only once.
        let mut it = committed.iter();
        Ok(fresh
            .into_iter()
            .map(|f| f && it.next().is_some_and(|p| p.fresh))
            .collect())
    }

    /// Stores one validated image and flushes (see [`SampleStore::put_batch`]).
    ///
    /// # Errors
    /// A failed write or flush.
    pub fn put_one(&self, img: &ValidImage) -> Result<Put> {
        let put = match self.stage(img)? {
            None => Put {
                fresh: false,
                captioned: false,
            },
            Some(s) => self.commit(vec![s])?[0],
        };
        self.flush()?;
        Ok(put)
    }

    /// First step of storing an image: its record is prepared and its JPEG (the producer's
    /// when it is within 256×128, metadata stripped at intake; otherwise the canonical 256×128
    /// form, encoded once) appended to a pack — not yet durable, not yet visible. An image that
    /// came without captions is captioned here, from the producer's attributes or from the
    /// colours of the pixels intake decoded anyway ([`daemon_captions`]): a few microseconds,
    /// where a later caption worker would read and rewrite the whole record. `None`: the id is
    /// already stored (nothing written).
    ///
    /// # Errors
    /// A failed write.
    pub fn stage(&self, img: &ValidImage) -> Result<Option<Staged>> {
        Ok(self.stage_all(std::slice::from_ref(img))?.pop().flatten())
    }

    /// [`SampleStore::stage`] for several images, their JPEGs appended to the pack with one
    /// write. One entry per image, `None` where the id is already stored.
    ///
    /// # Errors
    /// A failed write.
    pub fn stage_all(&self, imgs: &[ValidImage]) -> Result<Vec<Option<Staged>>> {
        injected_stall();
        injected_fault()?;
        struct Prepared<'a> {
            unsettled: Unsettled,
            jpeg: std::borrow::Cow<'a, [u8]>,
            captions: Vec<Caption>,
            captioned: bool,
        }
        let mut prepared = Vec::with_capacity(imgs.len());
        for img in imgs {
            if self.samples.contains_key(img.id.as_bytes())? {
                prepared.push(None);
                continue;
            }
            // Numbered and registered as unsettled in one step, so that no follower of the
            // arrivals sees a later number settled while this one is not yet registered.
            let unsettled = {
                let mut set = self
                    .unsettled
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let seq = self.db.generate_id()?;
                set.insert(seq);
                Unsettled {
                    seq,
                    set: self.unsettled.clone(),
                }
            };
            let jpeg = match &img.encoded {
                Some(bytes) => std::borrow::Cow::Borrowed(bytes.as_slice()),
                None => std::borrow::Cow::Owned(
                    canonical_jpeg(&img.pixels, JPEG_QUALITY)
                        .map_err(|e| Error::Storage(e.to_string()))?,
                ),
            };
            let captioned = img.captions.is_empty();
            let captions = if captioned {
                let attrs = img
                    .attributes
                    .unwrap_or_else(|| plip_ingest::captions::estimate_colours(&img.pixels));
                daemon_captions(&attrs, unsettled.seq)
            } else {
                img.captions
                    .iter()
                    .map(|t| Caption {
                        text: t.clone(),
                        phrases: find_phrases(t),
                    })
                    .collect()
            };
            prepared.push(Some(Prepared {
                unsettled,
                jpeg,
                captions,
                captioned,
            }));
        }
        let bytes: Vec<&[u8]> = prepared.iter().flatten().map(|p| p.jpeg.as_ref()).collect();
        let mut refs = self
            .packs
            .append_all(&bytes)
            .map_err(|e| Error::Storage(format!("writing a pack file: {e}")))?
            .into_iter();
        let mut out = Vec::with_capacity(imgs.len());
        for (img, p) in imgs.iter().zip(prepared) {
            let Some(p) = p else {
                out.push(None);
                continue;
            };
            let image = refs.next().ok_or_else(|| {
                Error::Internal("a pack append returned too few references".into())
            })?;
            let seq = p.unsettled.seq;
            let meta = SampleMeta {
                id: img.id.clone(),
                person_id: img.person_id.clone(),
                camera_id: img.camera_id.clone(),
                captions: p.captions,
                attributes: img.attributes,
                purpose: img.purpose,
                probe: is_probe(img.person_id.as_deref(), &img.id, self.probe_percent),
                seq,
                colours: None,
                image: Some(image),
            };
            out.push(Some(Staged {
                record: encode_record(&meta)?,
                id: meta.id,
                seq,
                _unsettled: p.unsettled,
                purpose: meta.purpose,
                probe: meta.probe,
                image,
                captioned: p.captioned,
            }));
        }
        Ok(out)
    }

    /// Second step: makes the staged images' bytes durable (one `fdatasync` of the pack, shared
    /// with concurrent callers), then writes their records and arrival entries in one
    /// transaction. Not flushed: a delivery may be acknowledged only after
    /// [`SampleStore::flush`]. An id stored meanwhile by another delivery is not stored again
    /// (its bytes are given back).
    ///
    /// # Errors
    /// A failed sync or write.
    pub fn commit(&self, staged: Vec<Staged>) -> Result<Vec<Put>> {
        injected_stall();
        injected_fault()?;
        let Some(last) = staged
            .iter()
            .map(|s| s.image)
            .max_by_key(|r| (r.pack, r.offset))
        else {
            return Ok(vec![]);
        };
        self.packs
            .sync_upto(&last)
            .map_err(|e| Error::Storage(format!("syncing a pack file: {e}")))?;
        let fresh = (&self.samples, &self.arrivals)
            .transaction(|(samples, arrivals)| {
                let mut fresh = Vec::with_capacity(staged.len());
                for s in &staged {
                    if samples.get(s.id.as_bytes())?.is_some() {
                        fresh.push(false);
                        continue;
                    }
                    samples.insert(s.id.as_bytes(), s.record.as_slice())?;
                    arrivals.insert(&s.seq.to_be_bytes(), s.id.as_bytes())?;
                    fresh.push(true);
                }
                Ok(fresh)
            })
            .map_err(|e: sled::transaction::TransactionError<()>| {
                Error::Storage(format!("{e:?}"))
            })?;
        let mut out = Vec::with_capacity(staged.len());
        for (s, fresh) in staged.iter().zip(fresh) {
            if fresh {
                let mut t = self.tally();
                t.total += 1;
                t.counts.add_as(s.purpose, s.probe, 1);
            } else {
                self.packs
                    .release(&s.image)
                    .map_err(|e| Error::Storage(format!("releasing pack bytes: {e}")))?;
            }
            out.push(Put {
                fresh,
                captioned: fresh && s.captioned,
            });
        }
        Ok(out)
    }

    /// One sample by id (its JPEG read from its pack, or from the record for records written
    /// before pack files).
    ///
    /// # Errors
    /// A database error, or JPEG bytes that cannot be read back or fail their checksum.
    pub fn get(&self, id: &str) -> Result<Option<StoredSample>> {
        let Some(v) = self.samples.get(id.as_bytes())? else {
            return Ok(None);
        };
        let Some((meta, inline)) = decode_record(&v) else {
            return Ok(None);
        };
        let jpeg = match &meta.image {
            None => inline.to_vec(),
            Some(r) => self.packs.read(r).map_err(|e| {
                Error::Storage(format!("sample {id}: its image cannot be read: {e}"))
            })?,
        };
        Ok(Some(StoredSample { meta, jpeg }))
    }

    /// Replaces a sample's captions (from the caption workers) and clears its captioning
    /// ticket, in one transaction.
    ///
    /// # Errors
    /// A database error.
    pub fn set_captions(&self, id: &str, captions: Vec<Caption>) -> Result<()> {
        injected_fault()?;
        let record = self.samples.get(id.as_bytes())?;
        let Some((mut meta, inline)) = record.as_deref().and_then(decode_record) else {
            if self.uncaptioned.remove(id.as_bytes())?.is_some() {
                step(&mut self.tally().uncaptioned, -1);
            }
            return Ok(());
        };
        meta.captions = captions;
        let mut value = encode_record(&meta)?;
        value.extend_from_slice(inline);
        let ticket = (&self.samples, &self.uncaptioned)
            .transaction(|(samples, uncaptioned)| {
                samples.insert(id.as_bytes(), value.as_slice())?;
                Ok(uncaptioned.remove(id.as_bytes())?.is_some())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| {
                Error::Storage(format!("{e:?}"))
            })?;
        if ticket {
            step(&mut self.tally().uncaptioned, -1);
        }
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
        self.tally().uncaptioned as usize
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
    pub fn forget_person(&self, person: &str) -> Result<Vec<String>> {
        self.forget_where(|m| m.person_id.as_deref() == Some(person))
    }

    /// The ids of `person`'s samples (what [`SampleStore::forget_person`] would delete now) and
    /// the highest arrival number among them.
    pub fn person_ids(&self, person: &str) -> (Vec<String>, u64) {
        let metas: Vec<SampleMeta> = self
            .metas()
            .into_iter()
            .filter(|m| m.person_id.as_deref() == Some(person))
            .collect();
        let last = metas.iter().map(|m| m.seq).max().unwrap_or(0);
        (metas.into_iter().map(|m| m.id).collect(), last)
    }

    /// Deletes the samples with these ids (those stored; the rest are ignored), flushed;
    /// returns the ids deleted.
    ///
    /// # Errors
    /// A database error.
    pub fn forget_ids(&self, ids: &[String]) -> Result<Vec<String>> {
        let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
        self.forget_where(|m| wanted.contains(m.id.as_str()))
    }

    fn forget_where(&self, doomed: impl Fn(&SampleMeta) -> bool) -> Result<Vec<String>> {
        let doomed: Vec<SampleMeta> = self.metas().into_iter().filter(|m| doomed(m)).collect();
        for m in &doomed {
            let (sample, ticket) = (&self.samples, &self.arrivals, &self.uncaptioned)
                .transaction(|(samples, arrivals, uncaptioned)| {
                    let sample = samples.remove(m.id.as_bytes())?.is_some();
                    arrivals.remove(&m.seq.to_be_bytes())?;
                    Ok((sample, uncaptioned.remove(m.id.as_bytes())?.is_some()))
                })
                .map_err(|e: sled::transaction::TransactionError<()>| {
                    Error::Storage(format!("{e:?}"))
                })?;
            self.removed(m, sample, ticket)?;
        }
        self.db.flush()?;
        Ok(doomed.into_iter().map(|m| m.id).collect())
    }

    /// Flushes everything written so far.
    ///
    /// # Errors
    /// The flush failed: what was written since the last flush may not be durable.
    pub fn flush(&self) -> Result<()> {
        injected_fault()?;
        self.db.flush().map(|_| ()).map_err(Error::from)
    }

    /// Number of stored samples.
    pub fn len(&self) -> usize {
        self.tally().total as usize
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Counts by purpose and probe (kept as samples come and go, not counted per call).
    pub fn counts(&self) -> Counts {
        injected_stall();
        self.tally().counts
    }

    /// Updates the figures for a sample removed (`sample`: its record was there; `ticket`: so
    /// was its captioning ticket).
    /// Its image bytes are punched out of their pack at once (a forgotten person's images do
    /// not stay on disk).
    fn removed(&self, m: &SampleMeta, sample: bool, ticket: bool) -> Result<()> {
        {
            let mut t = self.tally();
            if sample {
                step(&mut t.total, -1);
                t.counts.add(m, -1);
            }
            if ticket {
                step(&mut t.uncaptioned, -1);
            }
        }
        match (&m.image, sample) {
            (Some(r), true) => self
                .packs
                .release(r)
                .map_err(|e| Error::Storage(format!("removing the image of {}: {e}", m.id))),
            _ => Ok(()),
        }
    }

    /// Every arrival below this number is settled: committed, or abandoned and never to appear
    /// (`u64::MAX` when nothing is being stored).
    pub fn settled_below(&self) -> u64 {
        self.unsettled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .first()
            .copied()
            .unwrap_or(u64::MAX)
    }

    /// Up to `limit` (arrival sequence, id) pairs from arrival `seq` on, oldest first.
    pub fn arrivals_from(&self, seq: u64, limit: usize) -> Vec<(u64, String)> {
        self.arrivals
            .range(seq.to_be_bytes()..)
            .filter_map(|kv| kv.ok())
            .filter_map(|(k, v)| {
                let seq = k.as_ref().try_into().ok().map(u64::from_be_bytes)?;
                Some((seq, String::from_utf8_lossy(&v).into_owned()))
            })
            .take(limit)
            .collect()
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
    pub fn evict_training(&self, cap: usize) -> Result<usize> {
        let trainable: Vec<(sled::IVec, SampleMeta)> = self
            .arrivals
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(k, v)| {
                let m = decode_meta(&self.samples.get(&v).ok().flatten()?)?;
                (m.purpose == Purpose::Train && !m.probe).then_some((k, m))
            })
            .collect();
        let excess = trainable.len().saturating_sub(cap);
        for (k, m) in trainable.iter().take(excess) {
            let sample = self.samples.remove(m.id.as_bytes())?.is_some();
            self.arrivals.remove(k)?;
            let ticket = self.uncaptioned.remove(m.id.as_bytes())?.is_some();
            self.removed(m, sample, ticket)?;
        }
        self.db.flush()?;
        Ok(excess)
    }
}
