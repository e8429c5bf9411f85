//! The state folder on real sled on disk: checkpoints, the latest pointer, corruption, format
//! versions, retention.

use plip_actors::base::state::{Checkpoint, CheckpointMeta, State, StateError};
use std::collections::BTreeMap;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("plipd-state-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn ck(step: u64) -> Checkpoint {
    Checkpoint {
        meta: CheckpointMeta {
            version: 0,
            step,
            preset: "test".into(),
            tokenizer: "0123456789abcdef".into(),
            images_seen: step * 16,
            created_unix: 1,
            metrics: BTreeMap::from([("loss".to_string(), 1.5)]),
        },
        weights: vec![step as u8; 100],
        optimizer: vec![7; 50],
    }
}

/// Versions grow, `latest` follows, and everything survives closing and reopening.
#[test]
fn checkpoints_survive_reopen() {
    let dir = tmp("reopen");
    {
        let s = State::open(&dir).unwrap();
        assert_eq!(s.latest_version().unwrap(), None);
        assert_eq!(s.save_checkpoint(ck(10)).unwrap(), 1);
        assert_eq!(s.save_checkpoint(ck(20)).unwrap(), 2);
    }
    let s = State::open(&dir).unwrap();
    assert_eq!(s.latest_version().unwrap(), Some(2));
    let latest = s
        .latest_valid(|_| panic!("nothing is corrupt"))
        .unwrap()
        .unwrap();
    assert_eq!((latest.meta.version, latest.meta.step), (2, 20));
    assert_eq!(latest.weights, vec![20u8; 100]);
    assert_eq!(s.checkpoint(1).unwrap().meta.step, 10);
    assert!(matches!(s.checkpoint(9), Err(StateError::Missing(9))));
    let _ = std::fs::remove_dir_all(dir);
}

/// A corrupt newest checkpoint is reported and skipped; the previous one is used.
#[test]
fn corrupt_checkpoint_is_skipped_with_a_report() {
    let dir = tmp("corrupt");
    let s = State::open(&dir).unwrap();
    s.save_checkpoint(ck(10)).unwrap();
    s.save_checkpoint(ck(20)).unwrap();
    let mut blob = ck(20).encode().unwrap();
    let mid = blob.len() / 2;
    blob[mid] ^= 0xff;
    s.overwrite_blob(2, &blob).unwrap();
    let mut reports = Vec::new();
    let got = s
        .latest_valid(|e| reports.push(e.to_string()))
        .unwrap()
        .unwrap();
    assert_eq!(got.meta.step, 10);
    assert_eq!(reports.len(), 1);
    assert!(
        reports[0].contains("checkpoint 2 is corrupt") && reports[0].contains("checksum"),
        "{reports:?}"
    );
    s.overwrite_blob(1, b"PLIPCKP1 short").unwrap();
    assert!(s.latest_valid(|_| {}).unwrap().is_none());
    let listed = s.list().unwrap();
    assert!(listed.iter().all(|r| r.is_err()));
    let _ = std::fs::remove_dir_all(dir);
}

/// A state folder written by a newer plipd is refused with a message.
#[test]
fn newer_format_is_refused() {
    let dir = tmp("newer");
    {
        let db = sled::open(&dir).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("format_version", "99")
            .unwrap();
        db.flush().unwrap();
    }
    let err = State::open(&dir).err().expect("refused");
    assert!(
        err.to_string().contains("format 99") && err.to_string().contains("upgrade"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Retention keeps the newest N and any protected version.
#[test]
fn prune_keeps_newest_and_protected() {
    let dir = tmp("prune");
    let s = State::open(&dir).unwrap();
    for step in 1..=6 {
        s.save_checkpoint(ck(step)).unwrap();
    }
    assert_eq!(s.prune(2, &[1]).unwrap(), 3);
    let versions: Vec<u64> = s
        .list()
        .unwrap()
        .into_iter()
        .map(|m| m.unwrap().version)
        .collect();
    assert_eq!(versions, vec![1, 5, 6]);
    assert_eq!(
        s.save_checkpoint(ck(7)).unwrap(),
        7,
        "versions never repeat"
    );
    let _ = std::fs::remove_dir_all(dir);
}
