//! Retrieval metrics against the reference implementation's numbers and hand-worked cases.

use plip_model::metrics::{market1501, text_to_image};
use serde_json::Value;

fn nums(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// Every fixture case of the reference Market-1501 evaluation is reproduced to 1e-6: CMC at
/// each rank, mAP, mINP and the number of valid queries.
#[test]
fn market1501_reproduces_reference_fixtures() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/reid-eval");
    let mut cases = 0;
    for entry in std::fs::read_dir(dir).expect("fixture folder") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        let dist: Vec<f64> = v["distmat"]
            .as_array()
            .expect("rows")
            .iter()
            .flat_map(nums)
            .collect();
        let m = market1501(
            &dist,
            &nums(&v["q_pids"]),
            &nums(&v["g_pids"]),
            &nums(&v["q_camids"]),
            &nums(&v["g_camids"]),
            v["max_rank"].as_u64().expect("max_rank") as usize,
        )
        .expect("metrics");
        let e = &v["expected"];
        let name = path.display();
        for (k, (got, want)) in m.cmc.iter().zip(nums(&e["cmc"])).enumerate() {
            assert!(
                (got - want).abs() < 1e-6,
                "{name}: rank-{} {got} vs {want}",
                k + 1
            );
        }
        assert!(
            (m.map - e["mAP"].as_f64().expect("mAP")).abs() < 1e-6,
            "{name}: mAP {}",
            m.map
        );
        assert!(
            (m.minp - e["mINP"].as_f64().expect("mINP")).abs() < 1e-6,
            "{name}: mINP {}",
            m.minp
        );
        assert_eq!(
            m.valid_queries as u64,
            e["valid_queries"].as_u64().expect("valid"),
            "{name}"
        );
        cases += 1;
    }
    assert!(cases >= 3, "only {cases} fixture cases found");
}

/// A hand-worked case: one query (person 1, camera 1); gallery by ascending distance:
/// [p1 c1 (same camera: removed), p2 c2, p1 c2, p3 c1, p1 c3]. After filtering the matches are
/// [no, yes, no, yes]: rank-1 0, rank-2 1; AP = (1/2 + 2/4) / 2 = 0.5; mINP = 2/4 = 0.5.
/// A second query (person 9) has no true match and is skipped.
#[test]
fn market1501_hand_worked() {
    let g_pids = [1, 2, 1, 3, 1];
    let g_cams = [1, 2, 2, 1, 3];
    let dist = [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.4, 0.3, 0.2, 0.1];
    let m = market1501(&dist, &[1, 9], &g_pids, &[1, 1], &g_cams, 3).unwrap();
    assert_eq!(m.valid_queries, 1);
    assert_eq!(m.cmc, vec![0.0, 1.0, 1.0]);
    assert!((m.map - 0.5).abs() < 1e-12 && (m.minp - 0.5).abs() < 1e-12);
    assert!(market1501(&dist, &[9, 9], &g_pids, &[1, 1], &g_cams, 3).is_err());
    assert!(market1501(&dist[..9], &[1, 9], &g_pids, &[1, 1], &g_cams, 3).is_err());
}

/// Text→image: caption A's images rank 1st and 3rd of 12 → R@1 = 1, AP = (1 + 2/3)/2; caption
/// B's only image ranks 6th → R@1 = 0, R@5 = 0, R@10 = 1, AP = 1/6. No camera filtering.
#[test]
fn text_to_image_hand_worked() {
    let g: Vec<u32> = vec![7, 1, 7, 2, 3, 4, 5, 8, 9, 10, 11, 12];
    let mut sim = Vec::new();
    sim.extend((0..12).map(|j| 1.0 - j as f64 * 0.01)); // caption A (person 7): gallery order
    let b_rank = [4usize, 0, 1, 2, 3, 6, 7, 5, 8, 9, 10, 11]; // image 7 (person 8) 6th
    sim.extend(b_rank.iter().map(|&r| 1.0 - r as f64 * 0.01));
    let m = text_to_image(&sim, &[7, 8], &g).unwrap();
    assert_eq!(m.valid_queries, 2);
    assert!((m.r1 - 0.5).abs() < 1e-12);
    assert!((m.r5 - 0.5).abs() < 1e-12);
    assert!((m.r10 - 1.0).abs() < 1e-12);
    let want = ((1.0 + 2.0 / 3.0) / 2.0 + 1.0 / 6.0) / 2.0;
    assert!((m.map - want).abs() < 1e-12, "{}", m.map);
}
