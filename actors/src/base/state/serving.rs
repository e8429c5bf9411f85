//! What the ReID server keeps in the state folder: probe evaluations, the serving and pinned
//! versions, and the serving version's gallery embeddings.

use super::{trees, State, StateError};

impl State {
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

    /// A number kept under `key` in the state folder's meta tree (a follower's offsets).
    ///
    /// # Errors
    /// A database error.
    pub fn meta_u64(&self, key: &str) -> Result<Option<u64>, StateError> {
        Ok(self
            .meta
            .get(key)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Keeps `value` under `key` in the meta tree (flushed).
    ///
    /// # Errors
    /// A database error.
    pub fn set_meta_u64(&self, key: &str, value: u64) -> Result<(), StateError> {
        self.meta.insert(key, &value.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Bytes kept under `key` in the meta tree (the logs' manifest).
    ///
    /// # Errors
    /// A database error.
    pub fn meta_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.meta.get(key)?.map(|v| v.to_vec()))
    }

    /// Keeps `value` under `key` in the meta tree (flushed).
    ///
    /// # Errors
    /// A database error.
    pub fn set_meta_bytes(&self, key: &str, value: &[u8]) -> Result<(), StateError> {
        self.meta.insert(key, value)?;
        self.db.flush()?;
        Ok(())
    }

    /// Removes `key` from the meta tree (flushed).
    ///
    /// # Errors
    /// A database error.
    pub fn remove_meta(&self, key: &str) -> Result<(), StateError> {
        self.meta.remove(key)?;
        self.db.flush()?;
        Ok(())
    }

    /// The last model version appended to the models log (`streams.models_log`), if any.
    ///
    /// # Errors
    /// A database error.
    pub fn models_logged(&self) -> Result<Option<u64>, StateError> {
        Ok(self
            .meta
            .get("models_logged")?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Records that `version` was appended to the models log (flushed).
    ///
    /// # Errors
    /// A database error.
    pub fn set_models_logged(&self, version: u64) -> Result<(), StateError> {
        self.meta.insert("models_logged", &version.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// The first arrival sequence not yet considered for the gallery log (0 at first).
    ///
    /// # Errors
    /// A database error.
    pub fn gallery_logged(&self) -> Result<u64, StateError> {
        Ok(self
            .meta
            .get("gallery_logged")?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Records that every gallery sample before arrival `seq` is in the gallery log (flushed).
    ///
    /// # Errors
    /// A database error.
    pub fn set_gallery_logged(&self, seq: u64) -> Result<(), StateError> {
        self.meta.insert("gallery_logged", &seq.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Queues a tombstone for the gallery log: `person`'s samples `ids`, the highest of whose
    /// arrival numbers is `before_seq`, are being forgotten (flushed before they are deleted:
    /// the tombstone outlives a crash).
    ///
    /// # Errors
    /// A database error.
    pub fn add_tombstone(
        &self,
        person: &str,
        ids: &[String],
        before_seq: u64,
    ) -> Result<(), StateError> {
        let tree = self.db.open_tree(trees::TOMBSTONES)?;
        let key = self.db.generate_id()?;
        let value = serde_json::json!({"person": person, "ids": ids, "before_seq": before_seq});
        tree.insert(key.to_be_bytes(), value.to_string().as_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// The queued tombstones, oldest first.
    ///
    /// # Errors
    /// A database error.
    pub fn tombstones(&self) -> Result<Vec<Tombstone>, StateError> {
        let tree = self.db.open_tree(trees::TOMBSTONES)?;
        let mut out = Vec::new();
        for kv in tree.iter() {
            let (k, v) = kv?;
            let key = k.as_ref().try_into().ok().map(u64::from_be_bytes);
            let doc: Option<serde_json::Value> = serde_json::from_slice(&v).ok();
            if let (Some(key), Some(doc)) = (key, doc) {
                out.push(Tombstone {
                    key,
                    person: doc["person"].as_str().unwrap_or_default().to_string(),
                    ids: serde_json::from_value(doc["ids"].clone()).unwrap_or_default(),
                    before_seq: doc["before_seq"].as_u64().unwrap_or(0),
                });
            }
        }
        Ok(out)
    }

    /// Removes a tombstone once it is in the gallery log (flushed).
    ///
    /// # Errors
    /// A database error.
    pub fn remove_tombstone(&self, key: u64) -> Result<(), StateError> {
        self.db
            .open_tree(trees::TOMBSTONES)?
            .remove(key.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
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
}

/// A forget waiting to be appended to the gallery log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// Its key in the queue.
    pub key: u64,
    pub person: String,
    /// The samples forgotten.
    pub ids: Vec<String>,
    /// The highest arrival number among them.
    pub before_seq: u64,
}
