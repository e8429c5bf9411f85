//! A camera team publishes crops, `plipd` learns and serves them, a consumer asks; after the
//! daemon restarts on the same state folder the consumer is answered exactly as before: the
//! same model version, the same gallery, the same ranked matches with the same scores.

use plip_ingest::wire::Purpose;
use plip_tests::{ask, channel, crops, image_request, msgpack_batch, publish, Plipd};
use std::collections::HashMap;
use std::time::Duration;

const TRAINER: &str = "preset = \"test\"\nbatch = 16\nimages_per_id = 4\nmin_samples = 32\n\
    warmup_steps = 5\ncheckpoint_every_steps = 20\ncheckpoint_every_s = 0\nkeep_checkpoints = 3\n\
    threads = 1\nidle_after_s = 0\n";

/// (model version, gallery version, [(id, person, score)]) of every reply.
type Answers = Vec<(u64, u64, Vec<(String, String, f64)>)>;

fn answers(replies: &[serde_json::Value]) -> Answers {
    replies
        .iter()
        .map(|r| {
            assert!(r["error"].is_null(), "{r:#}");
            let matches = r["matches"]
                .as_array()
                .expect("matches")
                .iter()
                .map(|m| {
                    (
                        m["id"].as_str().unwrap_or_default().to_string(),
                        m["person_id"].as_str().unwrap_or_default().to_string(),
                        m["score"].as_f64().unwrap_or(f64::NAN),
                    )
                })
                .collect();
            (
                r["model_version"].as_u64().expect("model_version"),
                r["gallery_version"].as_u64().expect("gallery_version"),
                matches,
            )
        })
        .collect()
}

#[test]
fn a_restarted_daemon_answers_as_before() {
    let mut d = Plipd::configure("restart", TRAINER, "poll_ms = 200\n");
    d.start(&[]);
    let all = crops(12, 6, 41);
    let t = d.topology.clone();
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for chunk in all.chunks(18) {
            let body = msgpack_batch(chunk, Purpose::Both);
            publish(&ch, &t.ingest_exchange, &body, "application/msgpack").await;
        }
    });
    let s = d.wait_for("a serving model", Duration::from_secs(180), |s| {
        s["serving"]["version"].is_u64() && s["serving"]["gallery_size"] == 72
    });
    // Pin what serves, so that the training going on cannot promote another version between
    // the two rounds of questions.
    let v = s["serving"]["version"].as_u64().expect("a version");
    let pinned =
        plip_actors::base::client::request(&d.addr, "POST", &format!("/rollback?version={v}"))
            .expect("the listener answers");
    assert!(pinned.is_ok(), "{pinned:?}");
    d.wait_for(
        "the pinned version to serve",
        Duration::from_secs(60),
        |s| s["serving"]["version"] == v,
    );

    let ask_all = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let (_c, ch) = channel().await;
            let mut replies = Vec::new();
            for c in all.iter().step_by(9) {
                replies.push(ask(&ch, &t.reid_exchange, &image_request(c, 5)).await);
            }
            for text in ["a person in a red top", "a woman with a backpack"] {
                let req = serde_json::json!({"query": {"text": text}, "top_k": 5});
                replies.push(ask(&ch, &t.reid_exchange, &req).await);
            }
            replies
        })
    };
    let before = answers(&ask_all(&rt));
    assert_eq!(before.len(), 10);
    // What the consumer is answered is what the team published: every match is a published
    // crop, named with the person it was published with.
    let published: HashMap<&str, &str> = all
        .iter()
        .map(|c| (c.id.as_str(), c.person.as_str()))
        .collect();
    for (version, _, matches) in &before {
        assert_eq!(*version, v);
        assert_eq!(matches.len(), 5);
        for (id, person, score) in matches {
            assert_eq!(published.get(id.as_str()), Some(&person.as_str()), "{id}");
            assert!(score.is_finite());
        }
    }

    d.stop();
    // The restart trains no further: nothing may change what serves.
    d.start(&[("PLIP__TRAINER__ENABLED", "false")]);
    d.wait_for(
        "the same version to serve again",
        Duration::from_secs(120),
        |s| s["serving"]["version"] == v && s["serving"]["gallery_size"] == 72,
    );
    let after = answers(&ask_all(&rt));
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((b.0, b.1), (a.0, a.1), "versions differ");
        let ids = |x: &[(String, String, f64)]| x.iter().map(|m| m.0.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&b.2), ids(&a.2), "ranking differs");
        for (mb, ma) in b.2.iter().zip(&a.2) {
            assert!((mb.2 - ma.2).abs() < 1e-5, "score {} vs {}", mb.2, ma.2);
        }
    }
    d.stop();
}
