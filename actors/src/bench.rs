//! `plipd bench train`: times full PLIP training steps (all three pretext tasks by default) on
//! synthetic batches and prints one JSON line. A peer — the same model trained with IVLC alone,
//! measured in the same run — gives a ratio that is meaningful on a noisy shared machine.

use plip_model::batch::{Batch, Sample};
use plip_model::dfdx::prelude::Cpu;
use plip_model::optim::OptimConfig;
use plip_model::{Params, Plip, Preset, TaskWeights, Tokenizer, TrainConfig, Trainer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ops::Range;
use std::time::Instant;

/// Options of `plipd bench train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainBenchArgs {
    /// Model preset (test, tiny, small).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Samples per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Skip the IVLC-only peer measurement.
    #[arg(long)]
    pub no_peer: bool,
}

const COLOURS: [&str; 8] = [
    "black", "grey", "navy", "white", "blue", "red", "green", "beige",
];
const UPPER: [&str; 4] = ["t-shirt", "jacket", "shirt", "coat"];
const LOWER: [&str; 3] = ["trousers", "jeans", "skirt"];
const HAIR: [&str; 3] = ["short", "long", "shoulder-length"];
const BAGS: [&str; 3] = ["backpack", "handbag", "shoulder bag"];

struct Synthetic {
    rgb: Vec<u8>,
    caption: String,
    phrases: Vec<Range<usize>>,
    identity: u64,
}

/// Captions of SYNTH-PEDES length (about 30 tokens, six attribute phrases) in two styles, so the
/// text tower does the work it does on real data.
fn synthetic(p: &Preset, n: usize, seed: u64) -> Vec<Synthetic> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pick = |list: &[&'static str]| list[rng.gen_range(0..list.len())];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let gender = if i % 3 == 0 { "woman" } else { "man" };
        let hair = format!("{} {} hair", pick(&HAIR), pick(&COLOURS[..4]));
        let up = format!("{} {}", pick(&COLOURS), pick(&UPPER));
        let low = format!("{} {}", pick(&COLOURS), pick(&LOWER));
        let shoes = format!("{} shoes", pick(&COLOURS));
        let bag = format!("a {}", pick(&BAGS));
        let caption = if i % 2 == 0 {
            format!("A {gender} with {hair}, wearing a {up}, {low} and {shoes}, carrying {bag}.")
        } else {
            format!("The {gender} is wearing a {up} with {low}. The person has {hair} and {shoes}, and carries {bag}.")
        };
        let at = |s: &str| {
            let b = caption.find(s).unwrap_or(0);
            let c = caption[..b].chars().count();
            c..c + s.chars().count()
        };
        let phrases = vec![
            at(gender),
            at(&hair),
            at(&up),
            at(&low),
            at(&shoes),
            at(&bag),
        ];
        out.push(Synthetic {
            rgb: Vec::new(),
            caption,
            phrases,
            identity: (i / 4) as u64,
        });
    }
    for s in &mut out {
        s.rgb = (0..p.image_height * p.image_width * 3)
            .map(|_| rng.gen())
            .collect();
    }
    out
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn time_steps(
    p: &Preset,
    tasks: TaskWeights,
    batches: &[Batch],
    args: &TrainBenchArgs,
) -> plip_model::Result<(Vec<f64>, usize, f64)> {
    let model = Plip::<f32, Cpu>::new(&Cpu::default(), p, 0)?;
    let params = model.num_params();
    let cfg = TrainConfig {
        optim: OptimConfig {
            warmup_steps: 0,
            ..Default::default()
        },
        tasks,
        ramp_steps: 1,
    };
    let mut trainer = Trainer::new(model, cfg);
    let mut times = Vec::new();
    let mut last_loss = f64::NAN;
    for i in 0..args.warmup + args.steps {
        let b = &batches[i % batches.len()];
        let t0 = Instant::now();
        let r = trainer.step(b)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        last_loss = r.losses.total;
        if i >= args.warmup {
            times.push(ms);
        }
        eprintln!("step {:>3} {:>9.1} ms  loss {:.4}", i, ms, r.losses.total);
    }
    Ok((times, params, last_loss))
}

/// Runs the benchmark and prints its JSON line on stdout (progress goes to stderr).
///
/// # Errors
/// An unknown preset or a failed step.
pub fn train(args: &TrainBenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    plip_model::runtime::tune_allocator();
    let p = Preset::by_name(&args.preset)?;
    if args.batch < 2 || args.steps == 0 {
        return Err("--batch must be at least 2 and --steps at least 1".into());
    }
    let pool = plip_model::runtime::thread_pool(args.threads)?;
    let threads = pool.current_num_threads();
    let data = synthetic(&p, args.batch * 2, 7);
    let tokenizer = Tokenizer::train(data.iter().map(|s| s.caption.as_str()), p.vocab)?;
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    let batches: Vec<Batch> = data
        .chunks(args.batch)
        .map(|chunk| {
            let samples: Vec<Sample<'_>> = chunk
                .iter()
                .map(|s| Sample {
                    rgb: &s.rgb,
                    caption: &s.caption,
                    phrases: &s.phrases,
                    identity: Some(s.identity),
                })
                .collect();
            Batch::build(&samples, &p, &tokenizer, 0.5, &mut rng)
        })
        .collect::<Result<_, _>>()?;
    let batch_build_ms = t0.elapsed().as_secs_f64() * 1e3 / batches.len() as f64;

    let (mut full, params, loss) =
        pool.install(|| time_steps(&p, TaskWeights::default(), &batches, args))?;
    let full_ms = median(&mut full);
    let mut out = serde_json::json!({
        "bench": "train",
        "preset": p.name,
        "params": params,
        "batch": args.batch,
        "input": format!("{}x{}", p.image_height, p.image_width),
        "text_tokens": batches[0].tokens.len,
        "threads": threads,
        "tasks": "ivlc+iap+tic",
        "steps": args.steps,
        "median_step_ms": (full_ms * 10.0).round() / 10.0,
        "images_per_s": (args.batch as f64 / full_ms * 1e4).round() / 10.0,
        "batch_build_ms": (batch_build_ms * 10.0).round() / 10.0,
        "last_loss": loss,
    });
    if !args.no_peer {
        let ivlc = TaskWeights {
            ivlc: 1.0,
            iap: 0.0,
            tic: 0.0,
        };
        let (mut peer, _, _) = pool.install(|| time_steps(&p, ivlc, &batches, args))?;
        let peer_ms = median(&mut peer);
        out["peer_ivlc_only_median_step_ms"] = serde_json::json!((peer_ms * 10.0).round() / 10.0);
        out["ratio_full_to_ivlc_only"] =
            serde_json::json!((full_ms / peer_ms * 100.0).round() / 100.0);
    }
    out["peak_rss_mib"] = serde_json::json!(peak_rss_mib().map(|m| m.round()));
    println!("{out}");
    Ok(())
}
