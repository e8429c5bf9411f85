//! Helpers of the tests that drive the `plipd` binary's offline commands (no broker): run it,
//! read its JSON lines, make temporary folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `plipd args…`, whatever its exit status.
pub fn plipd_any(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_plipd"))
        .args(args)
        .output()
        .expect("plipd runs")
}

/// `plipd args…`, which must succeed.
pub fn plipd(args: &[&str]) -> Output {
    let out = plipd_any(args);
    assert!(
        out.status.success(),
        "plipd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every line of standard output, parsed as JSON.
pub fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// A fresh temporary path `plipd-{suite}-{name}-{pid}` (removed if it exists).
pub fn tmp(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("plipd-{suite}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A path as the `&str` an argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
