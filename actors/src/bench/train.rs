//! `plipd bench train`: times full PLIP training steps (all three pretext tasks by default) on
//! synthetic batches and prints one JSON line. A peer — the same model trained with IVLC alone,
//! measured in the same run — gives a ratio that is meaningful on a noisy shared machine.

use plip_model::batch::{AttributeLabel, Batch, Sample};
use plip_model::device::{run_on, OnDevice};
use plip_model::dfdx::prelude::{Cpu, Device, Dtype};
use plip_model::optim::OptimConfig;
use plip_model::{DeviceSpec, Params, Plip, Preset, TaskWeights, Tokenizer, TrainConfig, Trainer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ops::Range;
use std::time::Instant;

/// Options of `plipd bench train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainBenchArgs {
    /// Model preset (test, tiny, rn50, small, …).
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
    /// Device: cpu, or cuda / cuda:N in a CUDA build.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The tasks the timed step runs, comma-separated from ivlc, iap, tic, triplet, supcon, id
    /// (each at its default weight; supcon at 1).
    #[arg(long, default_value = "ivlc,triplet,id,text_id")]
    pub tasks: String,
    /// Override the ResNet's four stage widths, e.g. `64,128,256,512`.
    #[arg(long)]
    pub conv_widths: Option<String>,
    /// Override the rows of the text tower's hashed bigram embedding (0 = none).
    #[arg(long)]
    pub text_bigrams: Option<usize>,
    /// Captions per image and step, as `trainer.captions_per_image` (the extra ones are the
    /// other caption style, of the same length).
    #[arg(long, default_value_t = 1)]
    pub captions_per_image: usize,
    /// Also time the PyTorch peer of the image tower in the same run (`scripts/torch_peer.py
    /// --bench`: the same ResNet, batch, identities per batch and thread count, triplet + SupCon
    /// on the pooled feature, AdamW; PyTorch installed into the git-ignored `.venv-torch` by
    /// the script on first use). Needs `--tasks triplet,supcon` and a basic-block ResNet.
    #[arg(long)]
    pub torch_peer: bool,
    /// The script that runs the PyTorch peer.
    #[arg(long, default_value = "scripts/torch-peer.sh")]
    pub torch_peer_script: std::path::PathBuf,
}

/// Why `--torch-peer` cannot measure a peer of this run, if it cannot.
fn torch_peer_mismatch(p: &Preset, tasks: &str) -> Option<String> {
    let mut t: Vec<&str> = tasks.split(',').map(str::trim).collect();
    t.sort_unstable();
    if t != ["supcon", "triplet"] {
        return Some(format!(
            "the PyTorch peer trains the image tower with triplet + SupCon only; run --tasks triplet,supcon with --torch-peer (not {tasks})"
        ));
    }
    if p.image_arch != plip_model::ImageArch::Resnet || p.conv_block != plip_model::ConvBlock::Basic
    {
        return Some(format!(
            "the PyTorch peer is a ResNet of basic blocks; preset {:?} is not",
            p.name
        ));
    }
    None
}

/// Times the PyTorch peer ([`TrainBenchArgs::torch_peer`]): its median step in ms.
fn torch_peer_ms(p: &Preset, args: &TrainBenchArgs, threads: usize) -> Result<f64, String> {
    let list = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let script = &args.torch_peer_script;
    let out = std::process::Command::new(script)
        .args(["--data", "unused", "--feature", "pooled", "--per-id", "4"])
        .args(["--bench", &args.steps.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--batch", &args.batch.to_string()])
        .args(["--widths", &list(&p.conv_widths)])
        .args(["--blocks", &list(&p.conv_blocks)])
        .args(["--strides", &list(&p.conv_strides)])
        .args(["--embed", &p.embed.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run the PyTorch peer {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "the PyTorch peer {} failed ({}): {stdout}",
            script.display(),
            out.status
        ));
    }
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["median_step_ms"].as_f64())
        .ok_or_else(|| format!("the PyTorch peer printed no median_step_ms: {stdout}"))
}

/// Task weights for a comma-separated task list: the listed tasks at their default weights, the
/// rest off.
pub fn tasks_from_list(list: &str) -> Result<TaskWeights, String> {
    let d = TaskWeights::default();
    let mut w = TaskWeights::none();
    for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match t {
            "ivlc" => w.ivlc = d.ivlc,
            "iap" => w.iap = d.iap,
            "tic" => w.tic = d.tic,
            "triplet" => w.triplet = d.triplet,
            "supcon" => w.supcon = 1.0,
            "id" => w.id = d.id,
            "text_id" => w.text_id = d.text_id,
            "proto" => w.proto = 1.0,
            "text_align" => w.text_align = 1.0,
            "attr" => w.attr = 1.0,
            "text_attr" => w.text_attr = 1.0,
            other => {
                return Err(format!(
                    "unknown task {other:?}; known: ivlc, iap, tic, triplet, supcon, id, text_id, proto, text_align, attr, text_attr"
                ))
            }
        }
    }
    Ok(w)
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

/// `count` synthetic batches of `batch` samples (random pixels, SYNTH-PEDES-length captions,
/// 4 images per identity, half the phrases masked), with a tokenizer trained on their captions.
fn synthetic_batches(
    p: &Preset,
    count: usize,
    batch: usize,
    captions_per_image: usize,
) -> plip_model::Result<Vec<Batch>> {
    let data = synthetic(p, batch * count, 7);
    let tokenizer = Tokenizer::train(data.iter().map(|s| s.caption.as_str()), p.vocab)?;
    let mut rng = StdRng::seed_from_u64(1);
    // With the attribute head, each identity's attributes: one value per field, drawn from it.
    let labels: Vec<Vec<AttributeLabel>> = data
        .iter()
        .map(|s| {
            let mut start = 0;
            p.attribute_fields
                .iter()
                .map(|&len| {
                    let value = (s.identity as usize * 7 + start) % len;
                    let l = AttributeLabel { start, len, value };
                    start += len;
                    l
                })
                .collect()
        })
        .collect();
    data.chunks(batch)
        .zip(labels.chunks(batch))
        .map(|(chunk, labels)| {
            let samples: Vec<Sample<'_>> = chunk
                .iter()
                .zip(labels)
                .map(|(s, attributes)| Sample {
                    rgb: &s.rgb,
                    caption: &s.caption,
                    phrases: &s.phrases,
                    identity: Some(s.identity),
                    person: Some(s.identity),
                    attributes,
                })
                .collect();
            let mut b = Batch::build(&samples, p, &tokenizer, 0.5, &mut rng)?;
            // The other style's caption of a neighbour stands in for a sample's further ones.
            let extra: Vec<(usize, &str)> = (0..chunk.len())
                .flat_map(|row| {
                    (1..captions_per_image)
                        .map(move |k| (row, chunk[(row + k) % chunk.len()].caption.as_str()))
                })
                .collect();
            b.add_captions(&extra, p, &tokenizer)?;
            Ok(b)
        })
        .collect()
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

/// Times steps on the device `args.device` names.
fn time_steps(
    p: &Preset,
    tasks: TaskWeights,
    batches: &[Batch],
    args: &TrainBenchArgs,
) -> plip_model::Result<(Vec<f64>, usize, f64)> {
    struct Timing<'a> {
        p: &'a Preset,
        tasks: TaskWeights,
        batches: &'a [Batch],
        args: &'a TrainBenchArgs,
    }
    impl OnDevice for Timing<'_> {
        type Output = plip_model::Result<(Vec<f64>, usize, f64)>;
        fn run<D: Device<f32>>(self, dev: D) -> Self::Output {
            time_steps_on(&dev, self.p, self.tasks, self.batches, self.args)
        }
    }
    let job = Timing {
        p,
        tasks,
        batches,
        args,
    };
    run_on(DeviceSpec::parse(&args.device)?, 0, job)?
}

fn time_steps_on<D: Device<f32>>(
    dev: &D,
    p: &Preset,
    tasks: TaskWeights,
    batches: &[Batch],
    args: &TrainBenchArgs,
) -> plip_model::Result<(Vec<f64>, usize, f64)> {
    let model = Plip::<f32, D>::new(dev, p, 0)?;
    let params = model.num_params();
    let cfg = TrainConfig {
        optim: OptimConfig {
            warmup_steps: 0,
            ..Default::default()
        },
        tasks,
        ramp_steps: 1,
        text_substeps: 0,
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
    let mut p = Preset::by_name(&args.preset)?;
    if let Some(w) = &args.conv_widths {
        p = p.with_conv_widths(
            &crate::commands::train::parse_widths(w).map_err(|e| e.to_string())?,
        )?;
    }
    if let Some(rows) = args.text_bigrams {
        p = p.with_text_bigrams(rows);
    }
    if args.batch < 2 || args.steps == 0 {
        return Err("--batch must be at least 2 and --steps at least 1".into());
    }
    if args.torch_peer {
        if let Some(why) = torch_peer_mismatch(&p, &args.tasks) {
            return Err(why.into());
        }
    }
    let pool = plip_model::runtime::thread_pool(args.threads)?;
    let threads = pool.current_num_threads();
    let t0 = Instant::now();
    let tasks = tasks_from_list(&args.tasks)?;
    if tasks.attr > 0.0 || tasks.text_attr > 0.0 {
        p = p.with_attributes(plip_ingest::attributes::ATTRIBUTE_FIELDS);
    }
    let batches = synthetic_batches(&p, 2, args.batch, args.captions_per_image)?;
    let batch_build_ms = t0.elapsed().as_secs_f64() * 1e3 / batches.len() as f64;

    let (mut full, params, loss) = pool.install(|| time_steps(&p, tasks, &batches, args))?;
    let full_ms = median(&mut full);
    let mut out = serde_json::json!({
        "bench": "train",
        "preset": p.name,
        "params": params,
        "batch": args.batch,
        "input": format!("{}x{}", p.image_height, p.image_width),
        "text_tokens": batches[0].tokens.len,
        "threads": threads,
        "device": args.device,
        "tasks": args.tasks.replace(',', "+"),
        "steps": args.steps,
        "median_step_ms": (full_ms * 10.0).round() / 10.0,
        "images_per_s": (args.batch as f64 / full_ms * 1e4).round() / 10.0,
        "batch_build_ms": (batch_build_ms * 10.0).round() / 10.0,
        "last_loss": loss,
    });
    if !args.no_peer {
        let ivlc = TaskWeights {
            ivlc: 1.0,
            ..TaskWeights::none()
        };
        let (mut peer, _, _) = pool.install(|| time_steps(&p, ivlc, &batches, args))?;
        let peer_ms = median(&mut peer);
        out["peer_ivlc_only_median_step_ms"] = serde_json::json!((peer_ms * 10.0).round() / 10.0);
        out["ratio_full_to_ivlc_only"] =
            serde_json::json!((full_ms / peer_ms * 100.0).round() / 100.0);
    }
    out["peak_rss_mib"] = serde_json::json!(peak_rss_mib().map(|m| m.round()));
    if args.torch_peer {
        let peer_ms = torch_peer_ms(&p, args, threads)?;
        out["peer_pytorch_median_step_ms"] = serde_json::json!((peer_ms * 10.0).round() / 10.0);
        out["ratio_to_pytorch"] = serde_json::json!((full_ms / peer_ms * 100.0).round() / 100.0);
    }
    println!("{out}");
    Ok(())
}

/// Options of `plipd bench agree`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgreeArgs {
    /// Model preset (test, tiny, rn50, small, …).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Samples in the batch both devices see.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// The device compared with the CPU: cuda or cuda:N (or cpu, which must agree exactly).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Largest relative difference accepted outright; beyond it a quantity still agrees when
    /// the device is no further from an f64 computation than 4× the CPU's own f32 result.
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f64,
}

/// What one device computed from the shared weights and batch.
struct Outcome {
    image: Vec<f64>,
    text: Vec<f64>,
    losses: plip_model::LossValues,
    /// The gradient of every parameter, concatenated (an SGD step is −lr times it).
    grads: Vec<f64>,
    /// Each parameter's name and its range in `grads`.
    grad_ranges: Vec<(String, Range<usize>)>,
    /// The AdamW update of one step (weights after − before), concatenated.
    update: Vec<f64>,
}

fn params_host<E: Dtype, D: Device<E>>(m: &Plip<E, D>) -> Vec<f64> {
    m.params()
        .into_iter()
        .flat_map(|(_, p)| p.to_host())
        .map(|x| x.to_f64().unwrap_or(f64::NAN))
        .collect()
}

fn host_f64<E: Dtype>(v: Vec<E>) -> Vec<f64> {
    v.into_iter()
        .map(|x| x.to_f64().unwrap_or(f64::NAN))
        .collect()
}

fn outcome_on<E: Dtype, D: Device<E>>(
    dev: &D,
    reference: &Plip<f32, Cpu>,
    batch: &Batch,
) -> plip_model::Result<Outcome> {
    let mut model = Plip::<E, D>::new(dev, &reference.preset, 1)?;
    plip_model::weights::copy_weights(reference, &mut model);
    let image = host_f64(model.embed_images(&batch.images, batch.n).data);
    let text = host_f64(model.embed_texts(&batch.tokens, batch.n).data);
    let cfg = TrainConfig {
        optim: OptimConfig {
            warmup_steps: 0,
            ..Default::default()
        },
        tasks: TaskWeights::default(),
        ramp_steps: 1,
        text_substeps: 0,
    };
    let mut trainer = Trainer::new(model, cfg);
    let (grads, losses) = trainer.gradients(batch)?;
    let grads = grads.ok_or_else(|| plip_model::Error::Device("non-finite loss".into()))?;
    let names: Vec<String> = trainer.model.params().into_iter().map(|(n, _)| n).collect();
    let mut g = Vec::new();
    let mut grad_ranges = Vec::new();
    for (name, grad) in names
        .into_iter()
        .zip(plip_model::optim::AdamW::gradients(&trainer.model, &grads))
    {
        let v = match grad {
            plip_model::optim::Grad::Vector(t) => t.as_vec(),
            plip_model::optim::Grad::Matrix(t) => t.as_vec(),
        };
        let start = g.len();
        g.extend(v.into_iter().map(|x| x.to_f64().unwrap_or(f64::NAN)));
        grad_ranges.push((name, start..g.len()));
    }
    let before = params_host(&trainer.model);
    trainer.step(batch)?;
    let after = params_host(&trainer.model);
    Ok(Outcome {
        image,
        text,
        losses,
        grads: g,
        grad_ranges,
        update: after.iter().zip(&before).map(|(a, b)| a - b).collect(),
    })
}

/// ‖a − b‖ / ‖a‖ (0 when both are zero).
fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let n: f64 = a.iter().map(|x| x * x).sum();
    if n == 0.0 {
        d.sqrt()
    } else {
        (d / n).sqrt()
    }
}

fn rel(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / a.abs().max(1e-12)
    }
}

/// `plipd bench agree`: the same weights and the same batch on the CPU and on another device —
/// embeddings, each loss, the gradients (one SGD step's update up to −lr) and the norm of one
/// AdamW update compared; one JSON line, exit status 1 when any exceeds the tolerance. Each
/// sample brings a second caption, so the extra-caption path is compared too.
///
/// # Errors
/// An unknown preset, an unusable device, a failed step.
pub fn agree(args: &AgreeArgs) -> Result<bool, Box<dyn std::error::Error>> {
    plip_model::runtime::tune_allocator();
    let p = Preset::by_name(&args.preset)?;
    let spec = DeviceSpec::parse(&args.device)?;
    let flat = synthetic_batches(&p, 1, args.batch.max(2), 2)?
        .pop()
        .ok_or("no batch")?;
    let reference = Plip::<f32, Cpu>::new(&Cpu::default(), &p, 0)?;
    // The synthetic figures are flat colour regions: windows of max pooling hold exact ties,
    // whose gradient (every tied input receives it) changes wherever the two devices' rounding
    // turns a tie into a near-tie. Camera images have no such ties; the judged batch is the
    // same one with ±0.02 of seeded noise on every normalised pixel.
    let mut dithered = flat.clone();
    let mut rng = StdRng::seed_from_u64(5);
    for x in &mut dithered.images {
        *x += rng.gen_range(-0.02f32..0.02);
    }
    let (judged, cpu, other, exact) = compare(spec, &reference, &dithered, args.tolerance)?;
    let (ties, ..) = compare(spec, &reference, &flat, args.tolerance)?;
    let ok = judged.pass;
    let mut out = serde_json::json!({
        "bench": "agree",
        "preset": p.name,
        "batch": dithered.n,
        "device": spec.to_string(),
        "tolerance": args.tolerance,
        "pass": ok,
        "losses_cpu": cpu.losses,
        "losses_device": other.losses,
        "losses_f64": exact.losses,
        // Informational: AdamW's first step is about lr·sign(g), so gradients near zero may
        // flip sign between devices; the norm is the stable comparison.
        "adamw_update_rel_l2": rel_l2(&cpu.update, &other.update),
    });
    let mut section = |key: &str, a: &Agreement| {
        for c in &a.checks {
            out[key]["relative_difference"][c.name] = serde_json::json!(c.between);
            out[key]["error_vs_f64"]["cpu"][c.name] = serde_json::json!(c.cpu_error);
            out[key]["error_vs_f64"]["device"][c.name] = serde_json::json!(c.device_error);
            if !c.pass {
                out[key]["failed"][c.name] = serde_json::json!(c.between);
            }
        }
        out[key]["pass"] = serde_json::json!(a.pass);
    };
    section("judged", &judged);
    section("flat_images", &ties);
    // The parameters whose gradients differ most (absolute share of the difference), each with
    // its relative difference and both devices' errors against f64.
    let mut per_param: Vec<(f64, f64, f64, f64, &str)> = cpu
        .grad_ranges
        .iter()
        .map(|(name, r)| {
            let (c, d, e) = (
                &cpu.grads[r.clone()],
                &other.grads[r.clone()],
                &exact.grads[r.clone()],
            );
            let abs: f64 = c.iter().zip(d).map(|(x, y)| (x - y) * (x - y)).sum();
            (
                abs.sqrt(),
                rel_l2(c, d),
                rel_l2(e, c),
                rel_l2(e, d),
                name.as_str(),
            )
        })
        .collect();
    per_param.sort_by(|a, b| b.0.total_cmp(&a.0));
    out["worst_gradients"] = per_param
        .iter()
        .take(6)
        .map(|(abs, between, ce, de, name)| {
            serde_json::json!({"param": name, "abs_l2": abs, "between": between, "cpu_vs_f64": ce, "device_vs_f64": de})
        })
        .collect();
    out["relative_difference"] = out["judged"]["relative_difference"].clone();
    println!("{out}");
    Ok(ok)
}

/// One batch on the CPU in f32 and f64 and on `spec` in f32, compared.
fn compare(
    spec: DeviceSpec,
    reference: &Plip<f32, Cpu>,
    batch: &Batch,
    tolerance: f64,
) -> Result<(Agreement, Outcome, Outcome, Outcome), Box<dyn std::error::Error>> {
    let cpu = outcome_on::<f32, _>(&Cpu::default(), reference, batch)?;
    // The same computation in f64 on the CPU: how far f32 arithmetic itself is from exact.
    let exact = outcome_on::<f64, _>(&Cpu::default(), reference, batch)?;
    struct Compare<'a> {
        reference: &'a Plip<f32, Cpu>,
        batch: &'a Batch,
    }
    impl OnDevice for Compare<'_> {
        type Output = plip_model::Result<Outcome>;
        fn run<D: Device<f32>>(self, dev: D) -> Self::Output {
            outcome_on::<f32, _>(&dev, self.reference, self.batch)
        }
    }
    let other = run_on(spec, 0, Compare { reference, batch })??;
    Ok((
        agreement(&cpu, &other, &exact, tolerance),
        cpu,
        other,
        exact,
    ))
}

/// How much further from the exact value a device may be than the CPU's own f32 arithmetic
/// before a difference beyond the tolerance counts as a disagreement.
const F32_ERROR_FACTOR: f64 = 4.0;

/// One compared quantity.
#[derive(Debug)]
struct Check {
    name: &'static str,
    /// Relative difference between the CPU's and the device's f32 results.
    between: f64,
    /// Relative error of the CPU's f32 result against the f64 computation.
    cpu_error: f64,
    /// Relative error of the device's result against the f64 computation.
    device_error: f64,
    pass: bool,
}

#[derive(Debug)]
struct Agreement {
    checks: Vec<Check>,
    pass: bool,
}

/// Compares the devices quantity by quantity. A quantity agrees when the two f32 results
/// differ by at most `tolerance` (relative), or — where the computation is ill-conditioned,
/// so that f32 rounding alone moves it further (BatchNorm over a batch of nearly identical
/// features at initialisation, a near-tie of max pooling routing a gradient elsewhere) — when
/// the device is no further from the f64 result than [`F32_ERROR_FACTOR`] times the CPU's own
/// f32 result is. A kernel bug is far outside both.
fn agreement(cpu: &Outcome, dev: &Outcome, exact: &Outcome, tolerance: f64) -> Agreement {
    type Measure = fn(&Outcome, &Outcome) -> f64;
    let measures: [(&'static str, Measure); 11] = [
        ("image_embeddings", |a, b| rel_l2(&a.image, &b.image)),
        ("text_embeddings", |a, b| rel_l2(&a.text, &b.text)),
        ("loss_total", |a, b| rel(a.losses.total, b.losses.total)),
        ("loss_ivlc", |a, b| {
            rel(a.losses.ivlc.unwrap_or(0.0), b.losses.ivlc.unwrap_or(0.0))
        }),
        ("loss_iap", |a, b| {
            rel(a.losses.iap.unwrap_or(0.0), b.losses.iap.unwrap_or(0.0))
        }),
        ("loss_tic", |a, b| {
            rel(a.losses.tic.unwrap_or(0.0), b.losses.tic.unwrap_or(0.0))
        }),
        ("loss_triplet", |a, b| {
            rel(
                a.losses.triplet.unwrap_or(0.0),
                b.losses.triplet.unwrap_or(0.0),
            )
        }),
        ("loss_id", |a, b| {
            rel(a.losses.id.unwrap_or(0.0), b.losses.id.unwrap_or(0.0))
        }),
        ("loss_text_id", |a, b| {
            rel(
                a.losses.text_id.unwrap_or(0.0),
                b.losses.text_id.unwrap_or(0.0),
            )
        }),
        ("sgd_update", |a, b| rel_l2(&a.grads, &b.grads)),
        ("adamw_update_norm", |a, b| {
            let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            rel(n(&a.update), n(&b.update))
        }),
    ];
    let checks: Vec<Check> = measures
        .iter()
        .map(|(name, m)| {
            let between = m(cpu, dev);
            let cpu_error = m(exact, cpu);
            let device_error = m(exact, dev);
            let pass = between.is_finite()
                && (between <= tolerance || device_error <= F32_ERROR_FACTOR * cpu_error);
            Check {
                name,
                between,
                cpu_error,
                device_error,
                pass,
            }
        })
        .collect();
    let pass = checks.iter().all(|c| c.pass);
    Agreement { checks, pass }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(image: f64, id: f64, grad: f64) -> Outcome {
        Outcome {
            image: vec![image, 1.0],
            text: vec![1.0, 1.0],
            losses: plip_model::LossValues {
                id: Some(id),
                total: 10.0,
                ..Default::default()
            },
            grads: vec![grad, 1.0],
            grad_ranges: vec![("w".into(), 0..2)],
            update: vec![0.1, 0.1],
        }
    }

    fn failed(a: &Agreement) -> Vec<&str> {
        a.checks
            .iter()
            .filter(|c| !c.pass)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn agreement_within_the_tolerance_or_within_f32_rounding() {
        let exact = outcome(1.0, 9.0, 1.0);
        // Both within the tolerance.
        let a = agreement(
            &outcome(1.0, 9.0, 1.0),
            &outcome(1.0, 9.0001, 1.0),
            &exact,
            1e-3,
        );
        assert!(a.pass, "{a:?}");
        // An ill-conditioned loss: the CPU's f32 is itself 1% off the f64 value, the device
        // 1.5% on the other side — 2.5% apart, but f32 rounding, not a disagreement.
        let a = agreement(
            &outcome(1.0, 9.09, 1.0),
            &outcome(1.0, 8.865, 1.0),
            &exact,
            1e-3,
        );
        assert!(a.pass, "{a:?}");
        // The CPU is exact there and the device is 1% off: a disagreement, named.
        let a = agreement(
            &outcome(1.0, 9.0, 1.0),
            &outcome(1.0, 9.09, 1.0),
            &exact,
            1e-3,
        );
        assert!(!a.pass);
        assert_eq!(failed(&a), ["loss_id"]);
        // A gradient 10× further from exact than the CPU's: refused even though the CPU is
        // not exact.
        let a = agreement(
            &outcome(1.0, 9.0, 1.001),
            &outcome(1.0, 9.0, 0.99),
            &exact,
            1e-3,
        );
        assert_eq!(failed(&a), ["sgd_update"]);
        // Non-finite results never agree.
        let a = agreement(
            &outcome(1.0, 9.0, 1.0),
            &outcome(f64::NAN, 9.0, 1.0),
            &exact,
            1e-3,
        );
        assert_eq!(failed(&a), ["image_embeddings"]);
    }
}
