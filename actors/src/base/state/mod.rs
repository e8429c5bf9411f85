//! The state folder: one sled database shared by the daemon and the offline commands.
//!
//! Trees ([`trees`]): `meta` (`format_version`, `latest` checkpoint version), `tokenizer`
//! (`current` → the tokenizer's JSON), `samples` and `arrivals` (see [`crate::base::store`]; the
//! images are in pack files under `packs/`, see [`crate::base::packs`]), `checkpoints` (version,
//! big-endian u64 → checkpoint blob), `evaluations` and `gallery`.
//!
//! Files: this one (opening the folder, its format, the tokenizer), `checkpoint.rs` (the blob
//! format — `PLIPCKP1`, the metadata JSON, the weights and the optimiser state (safetensors),
//! each length-prefixed, then a SHA-256 of everything before it: a corrupt checkpoint is
//! detected, reported and skipped, never loaded — and the catalogue; writing a checkpoint and
//! moving `latest` happen in one transaction, flushed before the call returns), `serving.rs`
//! (probe evaluations, serving and pinned versions, gallery embeddings).

use plip_model::Tokenizer;
use std::path::{Path, PathBuf};

mod checkpoint;
mod serving;

pub use checkpoint::{training_digest, Checkpoint, CheckpointMeta};
pub use serving::Tombstone;

/// The sled trees of a state folder, by name.
pub mod trees {
    /// `format_version`, `latest`, the serving and pinned versions, the last version in the
    /// models log, the arrival up to which the gallery log is written.
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
    /// Forgotten persons waiting to be appended to the gallery log as tombstones.
    pub const TOMBSTONES: &str = "tombstones";
}

/// Layout version of the state folder written by this build. 2: sample images in pack files
/// (`packs/`), which a build reading format 1 would not find; a format-1 folder is upgraded
/// when this build opens it (its inline images are read as before).
pub const STATE_FORMAT: u32 = 2;

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
            .map_err(|e| StateError::Other(e.to_string()))?;
        Ok(slot.insert(store).clone())
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
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
