//! `plipd eval --distmat` as a user runs it.

use std::process::Command;

fn plipd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_plipd"))
        .args(args)
        .output()
        .expect("plipd runs")
}

/// The reference fixture's numbers come out of the command line (its `expected` field is not
/// read: the command prints what it computes).
#[test]
fn eval_distmat_prints_the_reference_numbers() {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../model/tests/fixtures/reid-eval/market1501-seed7-case0.json"
    );
    let out = plipd(&["eval", "--distmat", file]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let e = &fixture["expected"];
    assert!((v["mAP"].as_f64().unwrap() - e["mAP"].as_f64().unwrap()).abs() < 1e-6);
    assert!((v["mINP"].as_f64().unwrap() - e["mINP"].as_f64().unwrap()).abs() < 1e-6);
    assert!((v["rank1"].as_f64().unwrap() - e["cmc"][0].as_f64().unwrap()).abs() < 1e-6);
    assert_eq!(v["valid_queries"], e["valid_queries"]);
}

/// A missing file, malformed JSON and a ragged matrix each fail with a message naming the
/// problem.
#[test]
fn eval_distmat_reports_bad_input() {
    let dir = std::env::temp_dir().join(format!("plipd-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.json");
    let out = plipd(&["eval", "--distmat", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));

    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{\"distmat\": [[1, 2]]").unwrap();
    let out = plipd(&["eval", "--distmat", bad.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a distance-matrix file"));

    let ragged = dir.join("ragged.json");
    std::fs::write(
        &ragged,
        r#"{"distmat": [[1, 2], [3]], "q_pids": [1, 2], "g_pids": [1, 2], "q_camids": [1, 1], "g_camids": [2, 2]}"#,
    )
    .unwrap();
    let out = plipd(&["eval", "--distmat", ragged.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("row 1 has 1 entries"));
    let _ = std::fs::remove_dir_all(&dir);
}
