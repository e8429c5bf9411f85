//! The `rn50` preset (ResNet-50, the GPU preset) on the CPU: it trains a few steps, exports,
//! and the exported file evaluates as the state folder does; and where a Python with torch and
//! torchvision is at hand (`.venv-torch`, made by `scripts/torchvision-check.sh`, or
//! `PLIP_TORCH_PYTHON`), torchvision's `resnet50` loaded from the file embeds every image as
//! plipd does, to 1e-4.

mod cli;

use cli::{json_lines, plipd, s};

use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    cli::tmp("rn50", name)
}

/// A Python that imports torch, torchvision and safetensors, if there is one.
fn torch_python() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = [
        std::env::var_os("PLIP_TORCH_PYTHON").map(PathBuf::from),
        Some(repo.join(".venv-torch/bin/python")),
    ];
    candidates.into_iter().flatten().find(|py| {
        Command::new(py)
            .args(["-c", "import torch, torchvision, safetensors, PIL, numpy"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn rn50_trains_exports_and_torchvision_reproduces_its_embeddings() {
    let data = tmp("data");
    let state = tmp("state");
    let report = tmp("report");
    plipd(&[
        "synth",
        "--out",
        s(&data),
        "--train-ids",
        "4",
        "--test-ids",
        "3",
        "--images-per-id",
        "2",
        "--cameras",
        "2",
        "--queries-per-id",
        "1",
    ]);
    plipd(&[
        "tokenizer",
        "train",
        "--state",
        s(&state),
        "--preset",
        "rn50",
    ]);
    let train = json_lines(&plipd(&[
        "train",
        "--data",
        s(&data),
        "--state",
        s(&state),
        "--preset",
        "rn50",
        "--batch",
        "4",
        "--images-per-id",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--log-every",
        "1",
        "--calibrate-neck",
        "0",
        "--report",
        s(&report),
    ]));
    assert_eq!(train.last().unwrap()["step"], 2);
    assert!(train
        .iter()
        .all(|l| l["loss"].as_f64().is_some_and(f64::is_finite)));

    let file = report.join("rn50.safetensors");
    let ex = json_lines(&plipd(&["export", "--state", s(&state), "--out", s(&file)]));
    assert_eq!(
        (ex[0]["preset"].as_str(), ex[0]["step"].as_u64()),
        (Some("rn50"), Some(2))
    );
    let eval = |source: &[&str], data: &Path, extra: &[&str]| {
        let mut args = vec!["eval", "--data", s(data), "--report", s(&report)];
        args.extend_from_slice(source);
        args.extend_from_slice(extra);
        json_lines(&plipd(&args)).remove(0)
    };
    let from_state = eval(&["--state", s(&state)], &data, &[]);
    let from_file = eval(&["--weights", s(&file)], &data, &[]);
    assert_eq!(from_state["image"], from_file["image"]);
    assert_eq!(from_state["text_to_image"], from_file["text_to_image"]);
    assert_eq!(from_file["queries"], 3);

    let Some(py) = torch_python() else {
        eprintln!(
            "SKIPPED the torchvision comparison: no Python with torch and torchvision \
             (run scripts/torchvision-check.sh once to make .venv-torch, or set PLIP_TORCH_PYTHON)"
        );
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/torchvision_check.py");
    let python = |args: &[&str]| {
        let out = Command::new(&py)
            .arg(&script)
            .args(args)
            .output()
            .expect("python runs");
        assert!(
            out.status.success(),
            "torchvision_check.py {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        json_lines(&out).remove(0)
    };
    // PNGs at the model's input size: both sides decode the same pixels and resize nothing.
    let pngs = tmp("pngs");
    python(&["pngs", s(&data), s(&pngs), "256", "128"]);
    let pooled = report.join("pooled.jsonl");
    let neck = report.join("neck.jsonl");
    for (feature, out) in [("pooled", &pooled), ("neck", &neck)] {
        eval(
            &["--weights", s(&file)],
            &pngs,
            &["--joint-feature", feature, "--embeddings", s(out)],
        );
    }
    let cmp = python(&["compare", s(&file), s(&pngs), s(&pooled), s(&neck)]);
    eprintln!("{cmp}");
    assert_eq!(cmp["ok"], true, "{cmp}");
    assert!(cmp["images"].as_u64() >= Some(6), "{cmp}");
}
