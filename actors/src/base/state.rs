//! The state folder: one sled database shared by the daemon and the offline commands.
//!
//! Trees: `meta` (`format_version`, `latest` checkpoint version), `tokenizer` (`current` → the
//! tokenizer's JSON), `samples` and `arrivals` (see [`crate::base::store`]; the images are in pack
//! files under `packs/`, see [`crate::base::packs`]), `checkpoints` (version, big-endian u64 → checkpoint blob). A checkpoint
//! blob is `PLIPCKP1`, the metadata JSON, the weights (safetensors), the optimiser state
//! (safetensors), each length-prefixed, then a SHA-256 of everything before it: a corrupt
//! checkpoint is detected, reported and skipped, never loaded. Writing a checkpoint and moving
//! `latest` happen in one transaction, flushed before the call returns.

use plip_model::Tokenizer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The sled trees of a state folder, by name.
pub mod trees {
    /// `format_version`, `latest`, the serving and pinned versions.
    pub const META: &str = "meta";
    /// `current` → the tokenizer's JSON.
    pub const TOKENIZER: &str = "tokenizer";
    /// Version (big-endian u64) → checkpoint blob.
    pub const CHECKPOINTS: &str = "checkpoints";
    /// Probe evaluations of versions.
    pub const EVALUATIONS: &str = "evaluations";
    /// Gallery embeddings of the serving version.
    pub const GALLERY: &str = "gallery";
    /// Sample id → record (see `crate::base::store`).
    pub const SAMPLES: &str = "samples";
    /// Arrival sequence (big-endian u64) → sample id.
    pub const ARRIVALS: &str = "arrivals";
    /// Ids of samples waiting for the caption workers (format-1 folders).
    pub const UNCAPTIONED: &str = "uncaptioned";
}

/// Layout version of the state folder written by this build. 2: sample images in pack files
/// (`packs/`), which a build reading format 1 would not find; a format-1 folder is upgraded
/// when this build opens it (its inline images are read as before).
pub const STATE_FORMAT: u32 = 2;
const MAGIC: &[u8; 8] = b"PLIPCKP1";

/// Why the state folder could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open the state folder {path}: {source} (is another plipd using it?)")]
    Open { path: PathBuf, source: sled::Error },
    #[error("state folder: {0}")]
    Db(#[from] sled::Error),
    #[error("the state folder {path} has format {found}; this plipd reads up to {supported}: upgrade plipd")]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("checkpoint {version} is corrupt: {reason}")]
    Corrupt { version: u64, reason: String },
    #[error("no checkpoint {0} in the state folder")]
    Missing(u64),
    #[error("{0}")]
    Other(String),
}

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub version: u64,
    pub step: u64,
    pub preset: String,
    pub tokenizer: String,
    pub images_seen: u64,
    pub created_unix: u64,
    /// Loss values and evaluation results, by name.
    pub metrics: BTreeMap<String, f64>,
}

/// A checkpoint: metadata, weights and optimiser state.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub weights: Vec<u8>,
    pub optimizer: Vec<u8>,
}

impl Checkpoint {
    /// A trainer's weights and optimiser state as a checkpoint (its version is assigned when
    /// it is saved).
    ///
    /// # Errors
    /// Serialisation of the tensors failed.
    pub fn of_trainer<D: plip_model::dfdx::prelude::Device<f32>>(
        trainer: &plip_model::Trainer<f32, D>,
        tokenizer: &str,
        images_seen: u64,
        metrics: BTreeMap<String, f64>,
    ) -> plip_model::Result<Checkpoint> {
        let preset = &trainer.model.preset;
        let step = trainer.opt.step;
        Ok(Checkpoint {
            meta: CheckpointMeta {
                version: 0,
                step,
                preset: preset.name.clone(),
                tokenizer: tokenizer.to_string(),
                images_seen,
                created_unix: now_unix(),
                metrics,
            },
            weights: plip_model::weights::save_weights(
                &trainer.model,
                tokenizer,
                step,
                &BTreeMap::new(),
            )?,
            optimizer: plip_model::weights::save_optimizer(&trainer.opt, preset, tokenizer)?,
        })
    }

    /// The blob stored in the `checkpoints` tree.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let meta = serde_json::to_vec(&self.meta).map_err(|e| StateError::Other(e.to_string()))?;
        let mut out =
            Vec::with_capacity(meta.len() + self.weights.len() + self.optimizer.len() + 64);
        out.extend_from_slice(MAGIC);
        for part in [&meta, &self.weights, &self.optimizer] {
            out.extend_from_slice(&(part.len() as u64).to_le_bytes());
            out.extend_from_slice(part);
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }

    /// Parses and verifies a blob.
    pub fn decode(version: u64, blob: &[u8]) -> Result<Self, StateError> {
        let bad = |reason: &str| StateError::Corrupt {
            version,
            reason: reason.to_string(),
        };
        if blob.len() < MAGIC.len() + 32 || &blob[..8] != MAGIC {
            return Err(bad("not a checkpoint blob"));
        }
        let (body, sum) = blob.split_at(blob.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(bad("checksum mismatch"));
        }
        let mut rest = &body[8..];
        let mut parts = Vec::new();
        for _ in 0..3 {
            if rest.len() < 8 {
                return Err(bad("truncated"));
            }
            let mut len = [0u8; 8];
            len.copy_from_slice(&rest[..8]);
            let len = u64::from_le_bytes(len) as usize;
            if rest.len() < 8 + len {
                return Err(bad("truncated"));
            }
            parts.push(rest[8..8 + len].to_vec());
            rest = &rest[8 + len..];
        }
        let meta: CheckpointMeta =
            serde_json::from_slice(&parts[0]).map_err(|e| bad(&format!("metadata: {e}")))?;
        let optimizer = parts.pop().unwrap_or_default();
        let weights = parts.pop().unwrap_or_default();
        Ok(Checkpoint {
            meta,
            weights,
            optimizer,
        })
    }
}

/// sled page-cache size of a state folder.
pub const SLED_CACHE_BYTES: u64 = 64 << 20;

/// An open state folder.
pub struct State {
    db: sled::Db,
    meta: sled::Tree,
    tokenizer: sled::Tree,
    checkpoints: sled::Tree,
    path: PathBuf,
    /// Opened once: its pack writer must be the folder's only one.
    samples: std::sync::Mutex<Option<crate::base::store::SampleStore>>,
}

impl State {
    /// Opens (or creates) the state folder.
    ///
    /// # Errors
    /// A folder another process holds, a database error, or a newer format.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        // sled's page cache defaults to 1 GiB and the process grows towards it as the sample
        // store grows; the samples are read sequentially by the trainer, so a small cache does.
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .map_err(|source| StateError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let meta = db.open_tree(trees::META)?;
        match meta.get("format_version")? {
            Some(v) => {
                let found = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u32::MAX);
                if found > STATE_FORMAT {
                    return Err(StateError::NewerFormat {
                        path: path.to_path_buf(),
                        found,
                        supported: STATE_FORMAT,
                    });
                }
                if found < STATE_FORMAT {
                    // Older builds must not open a folder whose records point into packs.
                    meta.insert("format_version", STATE_FORMAT.to_string().as_bytes())?;
                    db.flush()?;
                }
            }
            None => {
                meta.insert("format_version", STATE_FORMAT.to_string().as_bytes())?;
                db.flush()?;
            }
        }
        Ok(State {
            tokenizer: db.open_tree(trees::TOKENIZER)?,
            checkpoints: db.open_tree(trees::CHECKPOINTS)?,
            meta,
            db,
            path: path.to_path_buf(),
            samples: std::sync::Mutex::new(None),
        })
    }

    /// The sample store in this state folder (opened on the first call, which also sets the
    /// probe split's share; later calls share it).
    ///
    /// # Errors
    /// A database error, or pack files that cannot be opened.
    pub fn samples(
        &self,
        probe_percent: u32,
    ) -> Result<crate::base::store::SampleStore, StateError> {
        let mut slot = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let store = crate::base::store::SampleStore::open(&self.db, &self.path, probe_percent)
            .map_err(StateError::Other)?;
        Ok(slot.insert(store).clone())
    }

    /// Records the probe evaluation of a version (metrics and whether it was promoted).
    ///
    /// # Errors
    /// A database error.
    pub fn record_evaluation(
        &self,
        version: u64,
        doc: &serde_json::Value,
    ) -> Result<(), StateError> {
        let tree = self.db.open_tree(trees::EVALUATIONS)?;
        tree.insert(version.to_be_bytes(), doc.to_string().as_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// The recorded probe evaluation of a version.
    ///
    /// # Errors
    /// A database error.
    pub fn evaluation(&self, version: u64) -> Result<Option<serde_json::Value>, StateError> {
        let tree = self.db.open_tree(trees::EVALUATIONS)?;
        Ok(tree
            .get(version.to_be_bytes())?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// The pinned version (rollback), if any.
    ///
    /// # Errors
    /// A database error.
    pub fn pinned(&self) -> Result<Option<u64>, StateError> {
        Ok(self
            .meta
            .get("pinned")?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Pins `version` (it must exist and verify) or, with `None`, unpins.
    ///
    /// # Errors
    /// A missing or corrupt version, or a database error.
    pub fn set_pinned(&self, version: Option<u64>) -> Result<(), StateError> {
        match version {
            Some(v) => {
                self.checkpoint(v)?;
                self.meta.insert("pinned", &v.to_be_bytes())?;
            }
            None => {
                self.meta.remove("pinned")?;
            }
        }
        self.db.flush()?;
        Ok(())
    }

    /// Versions retention must keep: the serving and the pinned one.
    ///
    /// # Errors
    /// A database error.
    pub fn protected_versions(&self) -> Result<Vec<u64>, StateError> {
        Ok([self.serving_version()?, self.pinned()?]
            .into_iter()
            .flatten()
            .collect())
    }

    /// The version the ReID server promoted last, if any.
    ///
    /// # Errors
    /// A database error.
    pub fn serving_version(&self) -> Result<Option<u64>, StateError> {
        Ok(self
            .meta
            .get("serving")?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Records the promoted version together with the gallery embeddings computed with it
    /// (`(sample id, embedding)`), replacing the previous gallery, in one flushed transaction.
    ///
    /// # Errors
    /// A database error.
    pub fn set_serving(
        &self,
        version: u64,
        gallery: &[(String, Vec<f32>)],
    ) -> Result<(), StateError> {
        use sled::Transactional;
        let tree = self.db.open_tree(trees::GALLERY)?;
        let old: Vec<sled::IVec> = tree.iter().keys().filter_map(|k| k.ok()).collect();
        (&self.meta, &tree)
            .transaction(|(meta, g)| {
                for k in &old {
                    g.remove(k)?;
                }
                for (id, e) in gallery {
                    let mut v = Vec::with_capacity(8 + 4 * e.len());
                    v.extend_from_slice(&version.to_be_bytes());
                    for x in e {
                        v.extend_from_slice(&x.to_le_bytes());
                    }
                    g.insert(id.as_bytes(), v)?;
                }
                meta.insert("serving", &version.to_be_bytes())?;
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| {
                StateError::Other(format!("serving transaction: {e:?}"))
            })?;
        self.db.flush()?;
        Ok(())
    }

    /// Adds gallery embeddings computed with `version` (new gallery samples).
    ///
    /// # Errors
    /// A database error.
    pub fn add_gallery(
        &self,
        version: u64,
        gallery: &[(String, Vec<f32>)],
    ) -> Result<(), StateError> {
        let tree = self.db.open_tree(trees::GALLERY)?;
        for (id, e) in gallery {
            let mut v = Vec::with_capacity(8 + 4 * e.len());
            v.extend_from_slice(&version.to_be_bytes());
            for x in e {
                v.extend_from_slice(&x.to_le_bytes());
            }
            tree.insert(id.as_bytes(), v)?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Deletes gallery embeddings by sample id (forgetting a person), flushed.
    ///
    /// # Errors
    /// A database error.
    pub fn remove_gallery(&self, ids: &[String]) -> Result<(), StateError> {
        let tree = self.db.open_tree(trees::GALLERY)?;
        for id in ids {
            tree.remove(id.as_bytes())?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// The stored gallery embeddings of `version`: `(sample id, embedding)`.
    ///
    /// # Errors
    /// A database error.
    pub fn gallery(&self, version: u64) -> Result<Vec<(String, Vec<f32>)>, StateError> {
        let tree = self.db.open_tree(trees::GALLERY)?;
        let mut out = Vec::new();
        for entry in tree.iter() {
            let (k, v) = entry?;
            if v.len() < 8 || v[..8] != version.to_be_bytes() {
                continue;
            }
            let e = v[8..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            out.push((String::from_utf8_lossy(&k).into_owned(), e));
        }
        Ok(out)
    }

    /// Flushes every tree to disk.
    ///
    /// # Errors
    /// A database error.
    pub fn flush(&self) -> Result<(), StateError> {
        self.db.flush()?;
        Ok(())
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored tokenizer, if any.
    ///
    /// # Errors
    /// A database error or unreadable tokenizer bytes.
    pub fn tokenizer(&self) -> Result<Option<Tokenizer>, StateError> {
        match self.tokenizer.get("current")? {
            Some(bytes) => {
                Ok(Some(Tokenizer::from_bytes(&bytes).map_err(|e| {
                    StateError::Other(format!("stored tokenizer: {e}"))
                })?))
            }
            None => Ok(None),
        }
    }

    /// Stores the tokenizer (flushed).
    ///
    /// # Errors
    /// Checkpoints made with another tokenizer exist, or a database error.
    pub fn set_tokenizer(&self, tk: &Tokenizer) -> Result<(), StateError> {
        if let Some(old) = self.tokenizer()? {
            if old.fingerprint() != tk.fingerprint() && !self.checkpoints.is_empty() {
                return Err(StateError::Other(format!(
                    "the state folder holds checkpoints made with tokenizer {}; weights are never used with another tokenizer (use a new state folder)",
                    old.fingerprint()
                )));
            }
        }
        let bytes = tk
            .to_bytes()
            .map_err(|e| StateError::Other(e.to_string()))?;
        self.tokenizer.insert("current", bytes)?;
        self.db.flush()?;
        Ok(())
    }

    /// The newest checkpoint version, if any.
    pub fn latest_version(&self) -> Result<Option<u64>, StateError> {
        Ok(self
            .meta
            .get("latest")?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Stores a checkpoint under the next version and moves `latest` to it, in one flushed
    /// transaction. Returns the version.
    ///
    /// # Errors
    /// A database error.
    pub fn save_checkpoint(&self, mut ck: Checkpoint) -> Result<u64, StateError> {
        use sled::Transactional;
        let version = self.checkpoints.last()?.map_or(0, |(k, _)| key_version(&k)) + 1;
        ck.meta.version = version;
        let blob = ck.encode()?;
        (&self.meta, &self.checkpoints)
            .transaction(|(meta, ckpts)| {
                ckpts.insert(&version.to_be_bytes(), blob.as_slice())?;
                meta.insert("latest", &version.to_be_bytes())?;
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| {
                StateError::Other(format!("checkpoint transaction: {e:?}"))
            })?;
        self.db.flush()?;
        Ok(version)
    }

    /// Loads and verifies one checkpoint.
    ///
    /// # Errors
    /// A missing or corrupt checkpoint.
    pub fn checkpoint(&self, version: u64) -> Result<Checkpoint, StateError> {
        let blob = self
            .checkpoints
            .get(version.to_be_bytes())?
            .ok_or(StateError::Missing(version))?;
        Checkpoint::decode(version, &blob)
    }

    /// The newest checkpoint that verifies, walking back from `latest`; corrupt ones are
    /// reported through `report` and skipped.
    ///
    /// # Errors
    /// A database error.
    pub fn latest_valid(
        &self,
        mut report: impl FnMut(&StateError),
    ) -> Result<Option<Checkpoint>, StateError> {
        for entry in self.checkpoints.iter().rev() {
            let (k, blob) = entry?;
            match Checkpoint::decode(key_version(&k), &blob) {
                Ok(ck) => return Ok(Some(ck)),
                Err(e) => report(&e),
            }
        }
        Ok(None)
    }

    /// Metadata of every checkpoint, oldest first (corrupt ones are listed with an error).
    pub fn list(&self) -> Result<Vec<Result<CheckpointMeta, StateError>>, StateError> {
        let mut out = Vec::new();
        for entry in self.checkpoints.iter() {
            let (k, blob) = entry?;
            out.push(Checkpoint::decode(key_version(&k), &blob).map(|c| c.meta));
        }
        Ok(out)
    }

    /// Deletes all but the newest `keep` checkpoints, never those in `protect`.
    ///
    /// # Errors
    /// A database error.
    pub fn prune(&self, keep: usize, protect: &[u64]) -> Result<usize, StateError> {
        let versions: Vec<u64> = self
            .checkpoints
            .iter()
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| key_version(&k))
            .collect();
        let mut removed = 0;
        for v in versions.iter().rev().skip(keep) {
            if !protect.contains(v) {
                self.checkpoints.remove(v.to_be_bytes())?;
                removed += 1;
            }
        }
        self.db.flush()?;
        Ok(removed)
    }

    /// Raw access for tests of corruption handling.
    #[doc(hidden)]
    pub fn overwrite_blob(&self, version: u64, blob: &[u8]) -> Result<(), StateError> {
        self.checkpoints.insert(version.to_be_bytes(), blob)?;
        self.db.flush()?;
        Ok(())
    }
}

fn key_version(k: &[u8]) -> u64 {
    k.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// SHA-256 over a model's parameters (names and `f32` values, in order) and over the
/// optimiser's step and moments: equal digests mean equal training state. The daemon reports
/// both when it resumes, so a test can check them against the checkpoint it resumed from.
pub fn training_digest<D: plip_model::dfdx::prelude::Device<f32>>(
    model: &plip_model::Plip<f32, D>,
    opt: &plip_model::optim::AdamW<f32, D>,
) -> (String, String) {
    use plip_model::optim::Moments;
    use plip_model::Params;
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut w = Sha256::new();
    for (name, p) in model.params() {
        w.update(name.as_bytes());
        for x in p.to_host() {
            w.update(x.to_le_bytes());
        }
    }
    let mut o = Sha256::new();
    o.update(opt.step.to_le_bytes());
    for m in &opt.moments {
        let (a, b) = match m {
            Moments::Vector(a, b) => (a.as_vec(), b.as_vec()),
            Moments::Matrix(a, b) => (a.as_vec(), b.as_vec()),
        };
        for x in a.into_iter().chain(b) {
            o.update(x.to_le_bytes());
        }
    }
    (hex(&w.finalize()), hex(&o.finalize()))
}
