//! The data-set readers on small fixtures written here, bad records included.

use plip_ingest::captions::Group;
use plip_ingest::datasets::{
    open, parse_market_name, read_cuhk_pedes, read_market, read_synthpedes,
};
use plip_ingest::synth::Split;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("plip-ds-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn jpeg(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(8, 16, image::Rgb([90, 10, 10]))
        .save(path)
        .unwrap();
}

/// SYNTH-PEDES records: the good one is read with phrases found in its captions; a missing file
/// and a malformed record are skipped, counted and shown.
#[test]
fn synthpedes_reader() {
    let d = tmp("sp");
    jpeg(&d.join("imgs/a.jpg"));
    let json = r#"[
      {"id": 12, "file_path": "imgs/a.jpg", "attributes": "woman, long hair, red coat, black trousers, white shoes, backpack",
       "captions": ["A woman in a red coat and black trousers.", "She wears white shoes."], "prompt_caption": "A photo of a woman with a backpack."},
      {"id": 13, "file_path": "imgs/missing.jpg", "captions": []},
      {"id": 14, "captions": ["no path"]}
    ]"#;
    std::fs::write(d.join("synthpedes.json"), json).unwrap();
    let ds = read_synthpedes(&d.join("synthpedes.json"), &d).unwrap();
    assert_eq!(ds.items.len(), 1);
    assert_eq!(ds.skipped.len(), 2);
    assert!(
        ds.skipped[0].reason.contains("missing file") && ds.skipped[0].record.contains("record 1")
    );
    assert!(ds.skipped[1].reason.contains("malformed"));
    let it = &ds.items[0];
    assert_eq!(it.person.as_deref(), Some("12"));
    assert_eq!(it.captions.len(), 3);
    let c = &it.captions[0];
    let groups: Vec<Group> = c.phrases.iter().map(|p| p.group).collect();
    assert_eq!(groups, vec![Group::Gender, Group::Upper, Group::Lower]);
    assert_eq!(c.phrase_text(1), "red coat");
    assert!(open(&d).unwrap().format == "synthpedes");
    assert!(read_synthpedes(&d.join("nope.json"), &d).is_err());
    std::fs::write(d.join("bad.json"), "{").unwrap();
    assert!(read_synthpedes(&d.join("bad.json"), &d)
        .unwrap_err()
        .to_string()
        .contains("not valid"));
}

/// CUHK-PEDES reid_raw.json: train items and test items (as gallery), missing files skipped.
#[test]
fn cuhk_pedes_reader() {
    let d = tmp("cuhk");
    jpeg(&d.join("imgs/CUHK01/0001.png"));
    jpeg(&d.join("imgs/test/0002.png"));
    let json = r#"[
      {"split": "train", "captions": ["A man in a grey jacket."], "file_path": "CUHK01/0001.png", "processed_tokens": [], "id": 1},
      {"split": "test", "captions": ["A woman with a handbag."], "file_path": "test/0002.png", "processed_tokens": [], "id": 2},
      {"split": "val", "captions": ["x"], "file_path": "gone.png", "processed_tokens": [], "id": 3},
      {"split": "train", "captions": "not a list", "file_path": "CUHK01/0001.png", "id": 4}
    ]"#;
    std::fs::write(d.join("reid_raw.json"), json).unwrap();
    let ds = open(&d).unwrap();
    assert_eq!(ds.format, "cuhk-pedes");
    assert_eq!(ds.items.len(), 2);
    assert_eq!(ds.skipped.len(), 2);
    assert_eq!(ds.items[0].split, Some(Split::Train));
    assert_eq!(ds.items[1].split, Some(Split::Gallery));
    assert_eq!(ds.items[1].captions[0].phrase_text(1), "handbag");
    let direct = read_cuhk_pedes(&d.join("reid_raw.json"), &d.join("imgs")).unwrap();
    assert_eq!(direct.items.len(), 2);
}

/// Market-1501 folders: ids and cameras from names, junk (−1) dropped, distractors (0) kept,
/// malformed names reported, other files ignored.
#[test]
fn market_reader() {
    let d = tmp("market");
    for f in [
        "bounding_box_train/0002_c1s1_000451_03.jpg",
        "bounding_box_train/0007_c2s3_070952_01.jpg",
        "query/0002_c3s1_000551_00.jpg",
        "bounding_box_test/0000_c1s1_000001_00.jpg",
        "bounding_box_test/-1_c1s1_000401_03.jpg",
        "bounding_box_test/garbage.jpg",
        "bounding_box_test/0002_x1s1_000002_00.jpg",
    ] {
        jpeg(&d.join(f));
    }
    std::fs::write(d.join("bounding_box_test/Thumbs.db"), "x").unwrap();
    let ds = read_market(&d).unwrap();
    assert_eq!(ds.items.len(), 4);
    assert_eq!(ds.skipped.len(), 3, "{:?}", ds.skipped);
    assert!(ds.skipped.iter().any(|b| b.reason.contains("junk")));
    assert_eq!(
        ds.skipped
            .iter()
            .filter(|b| b.reason.contains("malformed"))
            .count(),
        2
    );
    let q: Vec<_> = ds
        .items
        .iter()
        .filter(|i| i.split == Some(Split::Query))
        .collect();
    assert_eq!(
        (q[0].person.as_deref(), q[0].camera.as_deref()),
        (Some("0002"), Some("c3"))
    );
    assert!(ds.items.iter().any(|i| i.person.as_deref() == Some("0000")));
    assert_eq!(
        parse_market_name("0002_c1s1_000451_03.jpg"),
        Some(("0002".into(), "c1".into()))
    );
    assert_eq!(
        parse_market_name("0002_c12s1_000451_03.jpg"),
        Some(("0002".into(), "c12".into()))
    );
    assert_eq!(parse_market_name("abcd_c1s1.jpg"), None);
    assert!(open(&tmp("empty"))
        .unwrap_err()
        .to_string()
        .contains("no known data set"));
}

/// The synthetic set written by the generator reads back with exact phrases and splits.
#[test]
fn synthetic_set_reads_back() {
    let d = tmp("synth");
    let cfg = plip_ingest::synth::SynthConfig {
        train_ids: 3,
        test_ids: 2,
        images_per_id: 3,
        queries_per_id: 1,
        cameras: 3,
        ..Default::default()
    };
    plip_ingest::synth::write(&cfg, &d, |_, _| {}).unwrap();
    let ds = open(&d).unwrap();
    assert_eq!(ds.items.len(), 15);
    assert!(ds.skipped.is_empty());
    assert_eq!(
        ds.items
            .iter()
            .filter(|i| i.split == Some(Split::Query))
            .count(),
        2
    );
    for it in &ds.items {
        assert!(it.attributes.is_some() && it.camera.as_deref().unwrap_or("").starts_with('c'));
        assert_eq!(it.captions.len(), 3);
        assert!(!it.captions[0].phrases.is_empty());
    }
}
