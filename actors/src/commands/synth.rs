//! `plipd synth`: writes a synthetic pedestrian data set (Market-1501 folders + SYNTH-PEDES-style
//! JSON) with a progress bar, and prints a JSON summary.

use plip_ingest::synth::{self, SynthConfig};
use std::path::PathBuf;

/// Options of `plipd synth`; defaults are `SynthConfig::default()`.
#[derive(Debug, Clone, clap::Args)]
pub struct SynthArgs {
    /// Output folder (created; existing images with the same names are overwritten).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Training identities.
    #[arg(long)]
    pub train_ids: Option<usize>,
    /// Test identities (query + gallery), disjoint from the training ones.
    #[arg(long)]
    pub test_ids: Option<usize>,
    #[arg(long)]
    pub images_per_id: Option<usize>,
    #[arg(long)]
    pub queries_per_id: Option<usize>,
    #[arg(long)]
    pub cameras: Option<usize>,
    /// 0 (easy) … 1 (hard).
    #[arg(long)]
    pub difficulty: Option<f64>,
}

impl SynthArgs {
    /// The generator configuration these options describe.
    pub fn config(&self) -> Result<SynthConfig, String> {
        let d = SynthConfig::default();
        let cfg = SynthConfig {
            seed: self.seed.unwrap_or(d.seed),
            train_ids: self.train_ids.unwrap_or(d.train_ids),
            test_ids: self.test_ids.unwrap_or(d.test_ids),
            images_per_id: self.images_per_id.unwrap_or(d.images_per_id),
            queries_per_id: self.queries_per_id.unwrap_or(d.queries_per_id),
            cameras: self.cameras.unwrap_or(d.cameras),
            difficulty: self.difficulty.unwrap_or(d.difficulty),
        };
        if !(0.0..=1.0).contains(&cfg.difficulty) {
            return Err(format!(
                "--difficulty must be within 0..1, got {}",
                cfg.difficulty
            ));
        }
        if cfg.cameras < 2 || cfg.images_per_id < 2 {
            return Err("--cameras and --images-per-id must be at least 2 (queries need a gallery image from another camera)".into());
        }
        if cfg.train_ids + cfg.test_ids == 0 || cfg.train_ids + cfg.test_ids > 9999 {
            return Err(
                "between 1 and 9999 identities in all (Market-1501 names have four digits)".into(),
            );
        }
        Ok(cfg)
    }
}

/// Runs `plipd synth`.
///
/// # Errors
/// Invalid options or an unwritable folder.
pub fn run(args: &SynthArgs) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = args.config()?;
    let bar = crate::base::progress::bar(
        (cfg.train_ids + cfg.test_ids) as u64 * cfg.images_per_id as u64,
        "rendering",
    );
    let written = synth::write(&cfg, &args.out, |done, _| bar.set_position(done as u64))
        .map_err(|e| format!("cannot write the data set to {}: {e}", args.out.display()))?;
    bar.finish_and_clear();
    println!(
        "{}",
        serde_json::json!({"out": args.out, "config": cfg, "written": written})
    );
    Ok(())
}
