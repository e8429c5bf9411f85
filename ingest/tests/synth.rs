//! The synthetic pedestrian generator: determinism, disjoint splits, the Market-1501 layout and
//! a JSON that matches the files.

use plip_ingest::synth::{render_all, write, Record, Split, SynthConfig, JSON_NAME};
use std::collections::{HashMap, HashSet};

fn small(seed: u64) -> SynthConfig {
    SynthConfig {
        seed,
        train_ids: 6,
        test_ids: 4,
        images_per_id: 5,
        queries_per_id: 2,
        cameras: 4,
        difficulty: 0.7,
    }
}

/// The same seed gives the same bytes, whatever the thread count; another seed differs.
#[test]
fn same_seed_same_bytes() {
    let a = render_all(&small(3));
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let b = one.install(|| render_all(&small(3)));
    assert_eq!(a.len(), 50);
    for ((x, _), (y, _)) in a.iter().zip(&b) {
        assert_eq!(
            (x.person, x.camera, x.frame, x.split),
            (y.person, y.camera, y.frame, y.split)
        );
        assert!(x.rgb == y.rgb, "image {} differs between runs", x.frame);
    }
    let c = render_all(&small(4));
    assert!(a.iter().zip(&c).any(|((x, _), (y, _))| x.rgb != y.rgb));
}

/// Train and test identities are disjoint; every query has a gallery image of its person from
/// another camera; images of one person vary.
#[test]
fn splits_are_disjoint_and_queries_answerable() {
    let r = render_all(&small(5));
    let train: HashSet<u32> = r
        .iter()
        .filter(|(x, _)| x.split == Split::Train)
        .map(|(x, _)| x.person)
        .collect();
    let test: HashSet<u32> = r
        .iter()
        .filter(|(x, _)| x.split != Split::Train)
        .map(|(x, _)| x.person)
        .collect();
    assert_eq!((train.len(), test.len()), (6, 4));
    assert!(train.is_disjoint(&test));
    for (q, _) in r.iter().filter(|(x, _)| x.split == Split::Query) {
        assert!(r.iter().any(|(g, _)| g.split == Split::Gallery
            && g.person == q.person
            && g.camera != q.camera));
    }
    let first: Vec<_> = r
        .iter()
        .filter(|(x, _)| x.person == 1)
        .map(|(x, _)| &x.rgb)
        .collect();
    assert!(
        first.windows(2).all(|w| w[0] != w[1]),
        "two identical images of one person"
    );
}

/// The written folder has the Market-1501 names and a JSON record per file with captions that
/// name the identity's attributes.
#[test]
fn writes_market_layout_and_json() {
    let dir = std::env::temp_dir().join(format!("plip-synth-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let w = write(&small(6), &dir, |_, _| {}).unwrap();
    assert_eq!(
        (w.train_images, w.query_images, w.gallery_images),
        (30, 8, 12)
    );
    let records: Vec<Record> =
        serde_json::from_slice(&std::fs::read(dir.join(JSON_NAME)).unwrap()).unwrap();
    assert_eq!(records.len(), 50);
    let mut per_person: HashMap<u32, HashSet<String>> = HashMap::new();
    for rec in &records {
        let path = dir.join(&rec.file_path);
        assert!(path.is_file(), "{}", rec.file_path);
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.starts_with(&format!("{:04}_c{}s1_", rec.id, rec.camera))
                && name.ends_with("_00.jpg"),
            "{name}"
        );
        assert!(rec.file_path.starts_with(rec.split.folder()));
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (128, 256));
        let upper = rec.attributes.upper.unwrap();
        assert!(
            rec.captions
                .iter()
                .all(|c| c.contains(upper.colour.unwrap().words())),
            "{:?}",
            rec.captions
        );
        assert_eq!(rec.caption_phrases.len(), rec.captions.len());
        per_person
            .entry(rec.id)
            .or_default()
            .insert(serde_json::to_string(&rec.attributes).unwrap());
    }
    assert!(
        per_person.values().all(|a| a.len() == 1),
        "an identity's attributes changed between images"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// With the default distribution, colour alone rarely identifies a person while the full
/// attribute set mostly does (over 500 identities).
#[test]
fn colour_is_not_identity_but_attributes_mostly_are() {
    let cfg = SynthConfig {
        train_ids: 500,
        test_ids: 0,
        ..Default::default()
    };
    let ids = plip_ingest::synth::identities(&cfg);
    let mut by_colour: HashMap<String, usize> = HashMap::new();
    let mut by_all: HashMap<String, usize> = HashMap::new();
    for (_, id) in &ids {
        let a = id.attributes;
        let colours = format!("{:?}{:?}", a.upper.unwrap().colour, a.lower.unwrap().colour);
        *by_colour.entry(colours).or_default() += 1;
        *by_all
            .entry(serde_json::to_string(&a).unwrap())
            .or_default() += 1;
    }
    let unique = |m: &HashMap<String, usize>| {
        m.values().filter(|&&n| n == 1).count() as f64 / ids.len() as f64
    };
    assert!(
        unique(&by_colour) < 0.2,
        "upper+lower colour identifies {:.0}%",
        100.0 * unique(&by_colour)
    );
    assert!(
        unique(&by_all) > 0.8,
        "full attributes identify only {:.0}%",
        100.0 * unique(&by_all)
    );
}
