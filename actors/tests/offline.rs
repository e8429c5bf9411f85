//! The offline workflow a newcomer runs, end to end on the `test` preset:
//! synth → tokenizer train → train → eval → export → eval --weights.

mod cli;

use cli::{json_lines, plipd, plipd_any, s};
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    cli::tmp("offline", name)
}

/// The outputs exist, the loss fell, and the exported file's tensors are the state's.
#[test]
fn synth_tokenizer_train_eval_export() {
    let data = tmp("data");
    let state = tmp("state");
    let report = tmp("report");
    plipd(&[
        "synth",
        "--out",
        s(&data),
        "--train-ids",
        "12",
        "--test-ids",
        "10",
        "--images-per-id",
        "4",
        "--cameras",
        "3",
        "--queries-per-id",
        "2",
    ]);
    let tk = json_lines(&plipd(&[
        "tokenizer",
        "train",
        "--state",
        s(&state),
        "--preset",
        "test",
    ]));
    assert!(tk[0]["vocab_size"].as_u64().unwrap() <= 1024);

    let train = plipd(&[
        "train",
        "--data",
        s(&data),
        "--state",
        s(&state),
        "--preset",
        "test",
        "--batch",
        "16",
        "--steps",
        "60",
        "--lr",
        "2e-3",
        "--warmup",
        "5",
        // The bounds below were measured with the text tower at the image tower's rate; at the
        // CLI's default 0.3× this 60-step `test` run lands lower (Rank-1 0.20–0.35, mAP
        // 0.32–0.46 over four runs), too close to the bounds for a test.
        "--text-lr-scale",
        "1",
        "--log-every",
        "10",
        "--checkpoint-every",
        "30",
        "--report",
        s(&report),
    ]);
    let lines = json_lines(&train);
    assert_eq!(lines.len(), 6);
    let first = lines[0]["loss"].as_f64().unwrap();
    let last = lines[5]["loss"].as_f64().unwrap();
    assert!(last < first, "loss did not fall: {first} → {last}");
    assert_eq!(lines[5]["step"], 60);
    assert!(report.join("loss.png").is_file());

    let eval_args = [
        "eval",
        "--data",
        s(&data),
        "--state",
        s(&state),
        "--report",
        s(&report),
    ];
    let eval = json_lines(&plipd(&eval_args));
    let e = &eval[0];
    assert_eq!(e["queries"], 20);
    for k in ["rank1", "mAP", "mINP"] {
        let v = e["image"][k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    assert!(e["text_to_image"]["r1"].as_f64().is_some());
    assert!(report.join("cmc.png").is_file());

    // The embeddings file: one line per query and gallery image and per query caption, each
    // with the attribute head's readings (a probability distribution per field) and the
    // sample's true attributes.
    let file = report.join("embeddings.jsonl");
    plipd(&[
        "eval",
        "--data",
        s(&data),
        "--state",
        s(&state),
        "--report",
        s(&report),
        "--embeddings",
        s(&file),
    ]);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let kinds = |k: &str| lines.iter().filter(|l| l["kind"] == k).count();
    assert_eq!(
        kinds("image"),
        20 + 20,
        "10 test people: 20 queries, 20 gallery images"
    );
    assert!(kinds("caption") >= 20, "{} captions", kinds("caption"));
    for l in &lines {
        let readings: Vec<f64> = serde_json::from_value(l["attribute_readings"].clone())
            .unwrap_or_else(|e| panic!("no readings in {l}: {e}"));
        assert_eq!(readings.len(), 102);
        let labels: Vec<[usize; 3]> =
            serde_json::from_value(l["attribute_labels"].clone()).unwrap();
        assert!(labels.len() >= 12, "{labels:?}");
        for [start, len, value] in labels {
            assert!(value < len && start + len <= 102);
            let field: f64 = readings[start..start + len].iter().sum();
            assert!(
                (field - 1.0).abs() < 1e-4,
                "field at {start} sums to {field}"
            );
        }
    }
    // 60 steps of the ResNet `test` preset learn: 20 queries against the gallery of 10 people
    // put chance Rank-1 near 1/10, so 4 of 20 right is twice chance (training is not
    // bit-reproducible across runs — thread scheduling and the tokenizer trainer — so the
    // bounds sit under the 0.25–0.35 Rank-1 and 0.38–0.45 mAP measured over repeated runs).
    let (r1, map) = (
        e["image"]["rank1"].as_f64().unwrap(),
        e["image"]["mAP"].as_f64().unwrap(),
    );
    assert!(
        r1 >= 0.2 && map > 0.3,
        "Rank-1 {r1}, mAP {map}: no better than chance"
    );

    let file = report.join("model.safetensors");
    let ex = json_lines(&plipd(&["export", "--state", s(&state), "--out", s(&file)]));
    assert_eq!(ex[0]["step"], 60);
    let again = json_lines(&plipd(&[
        "eval",
        "--data",
        s(&data),
        "--weights",
        s(&file),
        "--report",
        s(&report),
    ]));
    assert_eq!(
        again[0]["image"], e["image"],
        "exported weights evaluate differently from the state's"
    );
    assert_eq!(again[0]["text_to_image"], e["text_to_image"]);

    // The evaluation device: `--device cpu` is the default's result; a CUDA device in a
    // build without CUDA, or an unknown one, is refused with the reason.
    let eval_on = |device: &str| plipd_any(&[&eval_args[..], &["--device", device]].concat());
    let out = eval_on("cpu");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json_lines(&out)[0]["image"], e["image"]);
    for (device, why) in [("cuda:0", "cuda:0"), ("gpu", "unknown device")] {
        let out = eval_on(device);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{device}: {err}");
        if device == "cuda:0" && !plip_model::device::CUDA_BUILT {
            assert!(err.contains("built without CUDA support"), "{err}");
        }
    }

    let base = json_lines(&plipd(&[
        "eval",
        "--data",
        s(&data),
        "--baseline",
        "color-histogram",
        "--report",
        s(&report),
    ]));
    assert!(base[0]["image"]["rank1"].as_f64().is_some());

    // Resuming a finished run does nothing; a longer schedule resumes from step 60.
    let more = plipd(&[
        "train",
        "--data",
        s(&data),
        "--state",
        s(&state),
        "--preset",
        "test",
        "--batch",
        "16",
        "--steps",
        "70",
        "--log-every",
        "10",
        "--report",
        s(&report),
    ]);
    assert!(String::from_utf8_lossy(&more.stderr).contains("resuming from checkpoint"));
    assert_eq!(json_lines(&more).last().unwrap()["step"], 70);

    // A one-block text tower and the caption–prototype loss: the overridden preset and the
    // prototypes travel through checkpoints, export and evaluation, and resuming needs the
    // same override.
    let state2 = tmp("state-text1");
    let run = |steps: &str, layers: &str| {
        plipd_any(&[
            "train",
            "--data",
            s(&data),
            "--state",
            s(&state2),
            "--preset",
            "test",
            "--batch",
            "16",
            "--steps",
            steps,
            "--log-every",
            "10",
            "--text-layers",
            layers,
            "--w-proto",
            "1",
            "--captions-per-image",
            "3",
            "--report",
            s(&report),
        ])
    };
    let first = run("20", "1");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let lines = json_lines(&first);
    assert!(lines[1]["proto"].as_f64().is_some_and(f64::is_finite));
    let refused = run("30", "2");
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("--text-layers 1"), "{why}");
    let resumed = run("30", "1");
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(json_lines(&resumed).last().unwrap()["step"], 30);
    let file2 = report.join("text1.safetensors");
    plipd(&["export", "--state", s(&state2), "--out", s(&file2)]);
    let from_state = json_lines(&plipd(&[
        "eval",
        "--data",
        s(&data),
        "--state",
        s(&state2),
        "--report",
        s(&report),
    ]));
    let from_file = json_lines(&plipd(&[
        "eval",
        "--data",
        s(&data),
        "--weights",
        s(&file2),
        "--report",
        s(&report),
    ]));
    assert_eq!(from_state[0]["image"], from_file[0]["image"]);
    assert_eq!(
        from_state[0]["text_to_image"],
        from_file[0]["text_to_image"]
    );
    for d in [data, state, state2, report] {
        let _ = std::fs::remove_dir_all(d);
    }
}
