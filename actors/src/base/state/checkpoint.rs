//! Checkpoints: the blob format (magic, metadata, weights, optimiser state, SHA-256) and the
//! catalogue in the `checkpoints` tree (save, load, latest valid, prune).

use super::{now_unix, State, StateError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

const MAGIC: &[u8; 8] = b"PLIPCKP1";

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

impl State {
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

    /// Stores a checkpoint under its own version (a follower's copy of the trainer's), moving
    /// `latest` forward when it is newer; flushed.
    ///
    /// # Errors
    /// A database error.
    pub fn put_checkpoint(&self, ck: &Checkpoint) -> Result<(), StateError> {
        let version = ck.meta.version;
        self.checkpoints
            .insert(version.to_be_bytes(), ck.encode()?.as_slice())?;
        if self.latest_version()?.is_none_or(|l| version > l) {
            self.meta.insert("latest", &version.to_be_bytes())?;
        }
        self.db.flush()?;
        Ok(())
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
