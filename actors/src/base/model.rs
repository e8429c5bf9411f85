//! Models loaded for use: a checkpoint of a state folder, or an exported weights file (its
//! tokenizer inside), and the export file of a checkpoint.

use super::state::State;
use plip_model::weights::read_meta;
use plip_model::{DeviceSpec, Encoder, Tokenizer};
use std::collections::BTreeMap;
use std::path::Path;

type Error = Box<dyn std::error::Error>;

/// A model ready to embed, with where it came from.
pub struct LoadedModel {
    /// The encoder, on the CPU unless a caller chose a device.
    pub model: Encoder,
    pub tokenizer: Tokenizer,
    pub source: serde_json::Value,
    /// The checkpoint's metadata, when it came from a state folder.
    pub checkpoint: Option<super::state::CheckpointMeta>,
}

/// Loads a checkpoint from a state folder (`version` or the latest valid one), on the CPU.
pub fn from_state(dir: &Path, version: Option<u64>) -> Result<LoadedModel, Error> {
    from_state_on(dir, version, DeviceSpec::Cpu)
}

/// As [`from_state`], on the device `spec`.
pub fn from_state_on(
    dir: &Path,
    version: Option<u64>,
    spec: DeviceSpec,
) -> Result<LoadedModel, Error> {
    let state = State::open(dir)?;
    from_open_state_on(&state, version, spec)
}

/// As [`from_state`], on a state folder already open (the daemon's).
pub fn from_open_state(state: &State, version: Option<u64>) -> Result<LoadedModel, Error> {
    from_open_state_on(state, version, DeviceSpec::Cpu)
}

/// As [`from_open_state`], on the device `spec`.
pub fn from_open_state_on(
    state: &State,
    version: Option<u64>,
    spec: DeviceSpec,
) -> Result<LoadedModel, Error> {
    let dir = state.path();
    let tokenizer = state
        .tokenizer()?
        .ok_or("the state folder has no tokenizer (train first)")?;
    let ck = match version {
        Some(v) => state.checkpoint(v)?,
        None => state
            .latest_valid(|e| eprintln!("plipd: {e}; skipped"))?
            .ok_or("the state folder has no valid checkpoint")?,
    };
    // The blob carries the full dimensions (a preset may have been trained with overrides).
    let preset = read_meta(&ck.weights)?.preset;
    let mut model = Encoder::new(spec, &preset, 0)?;
    model.load_weights(&ck.weights, tokenizer.fingerprint())?;
    let source = serde_json::json!({"state": dir, "version": ck.meta.version, "step": ck.meta.step, "images_seen": ck.meta.images_seen, "preset": preset.name});
    Ok(LoadedModel {
        model,
        tokenizer,
        source,
        checkpoint: Some(ck.meta),
    })
}

/// Loads an exported weights file (its tokenizer travels in the metadata), on the CPU.
pub fn from_weights(path: &Path) -> Result<LoadedModel, Error> {
    from_weights_on(path, DeviceSpec::Cpu)
}

/// As [`from_weights`], on the device `spec`.
pub fn from_weights_on(path: &Path, spec: DeviceSpec) -> Result<LoadedModel, Error> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let meta = read_meta(&bytes)?;
    let tk_json = meta
        .extra
        .get("tokenizer_json")
        .ok_or("the weights file carries no tokenizer (export it with plipd export)")?;
    let tokenizer = Tokenizer::from_bytes(tk_json.as_bytes())?;
    let mut model = Encoder::new(spec, &meta.preset, 0)?;
    model.load_weights(&bytes, tokenizer.fingerprint())?;
    let source =
        serde_json::json!({"weights": path, "step": meta.step, "preset": meta.preset.name});
    Ok(LoadedModel {
        model,
        tokenizer,
        source,
        checkpoint: None,
    })
}

/// The export file of `version` (default the latest valid) and a summary.
///
/// # Errors
/// A missing or corrupt checkpoint.
pub fn export_bytes(
    state: &super::state::State,
    version: Option<u64>,
) -> Result<(Vec<u8>, serde_json::Value), Box<dyn std::error::Error>> {
    let lm = from_open_state(state, version)?;
    let (model, tokenizer) = (&lm.model, &lm.tokenizer);
    let ck = lm.checkpoint.as_ref().ok_or("no checkpoint metadata")?;
    let preset = model.preset();
    let mut extra = BTreeMap::new();
    extra.insert(
        "tokenizer_json".to_string(),
        String::from_utf8(tokenizer.to_bytes()?)?,
    );
    extra.insert("checkpoint_version".to_string(), ck.version.to_string());
    extra.insert("images_seen".to_string(), ck.images_seen.to_string());
    extra.insert("metrics".to_string(), serde_json::to_string(&ck.metrics)?);
    let bytes = model.save_weights(tokenizer.fingerprint(), ck.step, &extra)?;
    let summary = serde_json::json!({"version": ck.version, "step": ck.step, "preset": preset.name, "bytes": bytes.len(), "tokenizer": tokenizer.fingerprint()});
    Ok((bytes, summary))
}
