//! The crate's layers (see `actors/src/lib.rs`): `base` < `daemon` < `commands` < `bench` <
//! `cli`. A module may use its own layer and those below it; this test reads every source file
//! and fails on a `crate::…` (or `super::…` reaching the crate root) path into a layer above.

use std::path::{Path, PathBuf};

const LAYERS: [&str; 5] = ["base", "daemon", "commands", "bench", "cli"];

/// The layer of a top-level module name (`lib`, `main` and `cli` are the top).
fn rank(module: &str) -> Option<usize> {
    match module {
        "lib" | "main" => Some(LAYERS.len() - 1),
        m => LAYERS.iter().position(|&l| l == m),
    }
}

/// The top-level module a source file (relative to `src/`) belongs to.
fn module_of(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    first.trim_end_matches(".rs").to_string()
}

/// Top-level modules a file's code names: `crate::m`, the first names of `crate::{m, …}`, and
/// `super::m` where `super` is the crate root (a folder's `mod.rs`). Comments are skipped.
fn named_modules(rel: &Path, source: &str) -> Vec<(usize, String)> {
    let at_root_via_super = rel.components().count() == 2 && rel.ends_with("mod.rs");
    let mut out = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                for item in group.split('}').next().unwrap_or("").split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    out.push((n + 1, name));
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.push((n + 1, name));
            }
        }
        if at_root_via_super {
            let mut rest = code;
            while let Some(i) = rest.find("super::") {
                rest = &rest[i + "super::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.push((n + 1, name));
            }
        }
    }
    out
}

/// Every upward path of one file, as `file:line: layer → layer`.
fn violations(rel: &Path, source: &str) -> Vec<String> {
    let own = module_of(rel);
    let Some(own_rank) = rank(&own) else {
        return vec![format!(
            "{}: module {own:?} is in no layer (add it to LAYERS)",
            rel.display()
        )];
    };
    named_modules(rel, source)
        .into_iter()
        .filter_map(|(line, name)| {
            let r = rank(&name)?;
            (r > own_rank).then(|| format!("{}:{line}: {own} uses {name}", rel.display()))
        })
        .collect()
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_uses_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "{files:?}");
    let mut bad = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let text = std::fs::read_to_string(f).expect("read");
        bad.extend(violations(rel, &text));
    }
    assert!(bad.is_empty(), "upward uses:\n{}", bad.join("\n"));
}

/// The checker itself finds what it must: an upward `use`, one inside a `crate::{…}` group, and
/// one through `super::` from a layer's `mod.rs`; not a downward one, nor one in a comment.
#[test]
fn the_checker_catches_upward_paths() {
    let base = Path::new("base/state.rs");
    assert_eq!(
        violations(base, "use crate::daemon::Shared;\n"),
        vec!["base/state.rs:1: base uses daemon"]
    );
    assert_eq!(
        violations(base, "use crate::{base::store, commands::export};\n").len(),
        1
    );
    assert!(violations(base, "// see crate::daemon\nuse crate::base::disk;\n").is_empty());
    assert_eq!(
        violations(Path::new("base/mod.rs"), "use super::bench::train;\n").len(),
        1
    );
    assert!(violations(Path::new("bench/ingest.rs"), "use crate::daemon::Shared;\n").is_empty());
    assert_eq!(violations(Path::new("stray.rs"), "").len(), 1);
}
