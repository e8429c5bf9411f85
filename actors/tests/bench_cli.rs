//! The `plipd bench train` command as a user runs it.

use std::process::Command;

/// The benchmark prints exactly one JSON line on stdout with the documented fields, and the
/// figures are plausible (positive times, images/s consistent with batch and step time).
#[test]
fn bench_train_prints_one_json_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_plipd"))
        .args([
            "bench",
            "train",
            "--preset",
            "test",
            "--batch",
            "8",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--threads",
            "1",
        ])
        .output()
        .expect("plipd runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
    assert_eq!(v["preset"], "test");
    assert_eq!(v["batch"], 8);
    assert_eq!(v["threads"], 1);
    assert_eq!(v["input"], "32x16");
    let ms = v["median_step_ms"].as_f64().expect("median");
    let ips = v["images_per_s"].as_f64().expect("images/s");
    assert!(ms > 0.0);
    assert!((ips - 8.0 / ms * 1000.0).abs() / ips < 0.05, "{v}");
    // A ratio of two timings, present and positive; its size is the benchmark's business (the
    // identity losses cost about as little as IVLC alone, so it sits near 1 either side).
    let ratio = v["ratio_full_to_ivlc_only"].as_f64().expect("ratio");
    assert!(ratio.is_finite() && ratio > 0.0, "{v}");
    assert!(v["peak_rss_mib"].as_f64().expect("rss") > 1.0);
}

/// Bad options fail with a message, not a panic.
#[test]
fn bench_rejects_unknown_preset() {
    let out = Command::new(env!("CARGO_BIN_EXE_plipd"))
        .args(["bench", "train", "--preset", "enormous"])
        .output()
        .expect("plipd runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown model preset") && err.contains("tiny"),
        "{err}"
    );
}

/// `plipd bench agree` on the CPU against itself: the comparison machinery reports every
/// quantity, all exactly equal; a CUDA device in a build without CUDA is refused with the way
/// to get one (in a CUDA build on a machine without a GPU: with the device it could not open).
#[test]
fn bench_agree_compares_devices() {
    let run = |device: &str| {
        Command::new(env!("CARGO_BIN_EXE_plipd"))
            .args(["bench", "agree", "--preset", "test", "--batch", "4"])
            .args(["--device", device])
            .output()
            .expect("plipd runs")
    };
    let out = run("cpu");
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["pass"], true);
    let diffs = v["relative_difference"].as_object().expect("differences");
    for key in [
        "image_embeddings",
        "text_embeddings",
        "loss_total",
        "loss_ivlc",
        "loss_iap",
        "loss_tic",
        "sgd_update",
        "adamw_update_norm",
    ] {
        assert_eq!(diffs[key], 0.0, "{key}: {v}");
    }
    assert!(v["losses_cpu"]["total"].as_f64().expect("loss") > 0.0);
    // The f64 reference: the CPU's f32 is within rounding of it on the `test` preset (an
    // error such as a gradient that drops a contribution shows up here as on a device), on
    // the judged (dithered) batch and on the flat one.
    for section in ["judged", "flat_images"] {
        let errors = v[section]["error_vs_f64"]["cpu"]
            .as_object()
            .expect("errors against f64");
        assert!(errors.len() >= 8, "{v}");
        for (k, e) in errors {
            let e = e.as_f64().expect("number");
            assert!(e < 1e-4, "{section} {k}: {e}");
        }
        assert_eq!(v[section]["pass"], true, "{v}");
    }
    assert!(v["worst_gradients"][0]["param"].is_string(), "{v}");
    let out = run("cuda:0");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cuda:0"), "{err}");
    if !plip_model::device::CUDA_BUILT {
        assert!(err.contains("built without CUDA support"), "{err}");
    }
    let out = run("gpu");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device"));
}
