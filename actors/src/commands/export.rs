//! `plipd export`: writes one checkpoint's weights as a `.safetensors` file a PyTorch user can
//! load (`safetensors.torch.load_file`), with the tokenizer (JSON) and the checkpoint's facts in
//! the metadata, so the file alone is enough for `plipd eval --weights`.

use crate::base::model::export_bytes;
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
    /// A running daemon's HTTP listener, used when it holds the state folder.
    #[arg(long)]
    pub http: Option<String>,
}

/// Runs `plipd export`: from the state folder, or — when a daemon holds it — through the
/// daemon's HTTP listener (`--http`, default the configuration's).
pub fn run(args: &ExportArgs) -> Result<(), Box<dyn std::error::Error>> {
    let (bytes, summary) = match crate::base::state::State::open(&args.state) {
        Ok(state) => export_bytes(&state, args.version)?,
        Err(crate::base::state::StateError::Open { .. }) => {
            let cfg = crate::base::config::Config::load(None)?;
            let addr = args.http.clone().unwrap_or(cfg.http.listen);
            let path = match args.version {
                Some(v) => format!("/export?version={v}"),
                None => "/export".to_string(),
            };
            let bytes = crate::base::client::request(&addr, "GET", &path).ok_or_else(|| {
                format!("the state folder is in use and no daemon answers at {addr}")
            })??;
            let meta = plip_model::weights::read_meta(&bytes)?;
            let summary = serde_json::json!({"version": meta.extra.get("checkpoint_version"), "step": meta.step, "preset": meta.preset.name, "bytes": bytes.len(), "via": addr});
            (bytes, summary)
        }
        Err(e) => return Err(e.into()),
    };
    std::fs::write(&args.out, &bytes)
        .map_err(|e| format!("cannot write {}: {e}", args.out.display()))?;
    let mut summary = summary;
    summary["out"] = serde_json::json!(args.out);
    println!("{summary}");
    Ok(())
}
