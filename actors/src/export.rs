//! `plipd export`: writes one checkpoint's weights as a `.safetensors` file a PyTorch user can
//! load (`safetensors.torch.load_file`), with the tokenizer (JSON) and the checkpoint's facts in
//! the metadata, so the file alone is enough for `plipd eval --weights`.

use plip_model::weights::save_weights;
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
    let lm = crate::evaluate::from_state(&args.state, args.version)?;
    let (model, tokenizer) = (&lm.model, &lm.tokenizer);
    let ck = lm.checkpoint.as_ref().ok_or("no checkpoint metadata")?;
    let preset = &model.preset;
    let mut extra = BTreeMap::new();
    extra.insert(
        "tokenizer_json".to_string(),
        String::from_utf8(tokenizer.to_bytes()?)?,
    );
    extra.insert("checkpoint_version".to_string(), ck.version.to_string());
    extra.insert("images_seen".to_string(), ck.images_seen.to_string());
    extra.insert("metrics".to_string(), serde_json::to_string(&ck.metrics)?);
    let bytes = save_weights(model, tokenizer.fingerprint(), ck.step, &extra)?;
    std::fs::write(&args.out, &bytes)
        .map_err(|e| format!("cannot write {}: {e}", args.out.display()))?;
    println!(
        "{}",
        serde_json::json!({"out": args.out, "version": ck.version, "step": ck.step, "preset": preset.name, "bytes": bytes.len(), "tokenizer": tokenizer.fingerprint()})
    );
    Ok(())
}
