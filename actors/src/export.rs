//! `plipd export`: writes one checkpoint's weights as a `.safetensors` file a PyTorch user can
//! load (`safetensors.torch.load_file`), with the tokenizer (JSON) and the checkpoint's facts in
//! the metadata, so the file alone is enough for `plipd eval --weights`.

use crate::state::State;
use plip_model::dfdx::prelude::Cpu;
use plip_model::weights::{load_weights, save_weights};
use plip_model::{Plip, Preset};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Options of `plipd export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// State folder.
    #[arg(long)]
    pub state: PathBuf,
    /// Checkpoint version (default: the latest valid one).
    #[arg(long)]
    pub version: Option<u64>,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `plipd export`.
pub fn run(args: &ExportArgs) -> Result<(), Box<dyn std::error::Error>> {
    let state = State::open(&args.state)?;
    let tokenizer = state
        .tokenizer()?
        .ok_or("the state folder has no tokenizer")?;
    let ck = match args.version {
        Some(v) => state.checkpoint(v)?,
        None => state
            .latest_valid(|e| eprintln!("plipd: {e}; skipped"))?
            .ok_or("the state folder has no valid checkpoint")?,
    };
    let preset = Preset::by_name(&ck.meta.preset)?;
    let mut model = Plip::<f32, Cpu>::new(&Cpu::default(), &preset, 0)?;
    load_weights(&mut model, &ck.weights, tokenizer.fingerprint())?;
    let mut extra = BTreeMap::new();
    extra.insert(
        "tokenizer_json".to_string(),
        String::from_utf8(tokenizer.to_bytes()?)?,
    );
    extra.insert(
        "checkpoint_version".to_string(),
        ck.meta.version.to_string(),
    );
    extra.insert("images_seen".to_string(), ck.meta.images_seen.to_string());
    extra.insert(
        "metrics".to_string(),
        serde_json::to_string(&ck.meta.metrics)?,
    );
    let bytes = save_weights(&model, tokenizer.fingerprint(), ck.meta.step, &extra)?;
    std::fs::write(&args.out, &bytes)
        .map_err(|e| format!("cannot write {}: {e}", args.out.display()))?;
    println!(
        "{}",
        serde_json::json!({"out": args.out, "version": ck.meta.version, "step": ck.meta.step, "preset": preset.name, "bytes": bytes.len(), "tokenizer": tokenizer.fingerprint()})
    );
    Ok(())
}
