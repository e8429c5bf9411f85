//! Scale-out roles against the real broker: a `trainer` process writes the models and gallery
//! logs (RabbitMQ streams), a `server` process with its own state folder follows them and
//! answers the ReID requests — promotions, rollbacks and forgets included — and resumes from
//! its stored offsets after a restart.

mod common;

use common::*;

/// Every setting a trainer and its servers share: the streams (private names per test).
fn streams_env(suffix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("PLIP__STREAMS__ENABLED", "true".to_string()),
        (
            "PLIP__STREAMS__MODELS_LOG",
            format!("plip.models.log.{suffix}"),
        ),
        (
            "PLIP__STREAMS__GALLERY_LOG",
            format!("plip.gallery.log.{suffix}"),
        ),
        (
            "PLIP__STREAMS__MANIFEST_LOG",
            format!("plip.logs.manifest.{suffix}"),
        ),
        ("PLIP__STREAMS__CHUNK_BYTES", "65536".to_string()),
        ("PLIP__STREAMS__SEGMENT_BYTES", "1000000".to_string()),
        ("PLIP__SERVING__POLL_MS", "200".to_string()),
    ]
}

fn with(
    mut env: Vec<(&'static str, String)>,
    k: &'static str,
    v: &str,
) -> Vec<(&'static str, String)> {
    env.push((k, v.to_string()));
    env
}

/// The `[trainer]` table of the role tests: a checkpoint every 10 steps, every version kept
/// (a rollback target stays).
fn trainer_keeping_versions() -> String {
    format!(
        "{}\nkeep_checkpoints = 100\n",
        trainer_toml(10).replace("keep_checkpoints = 3\n", "")
    )
}

/// A server (role `server`, no training) on `dir`, sharing the trainer's topology `t`,
/// started (not waited for).
fn start_server(dir: &Path, env: &[(&'static str, String)], t: &Topology) -> Daemon {
    let extra = Extra {
        same_topology: Some(t.clone()),
        ..Extra::default()
    };
    let mut d = Daemon::configure(
        dir,
        "enabled = false\n",
        &with(env.to_vec(), "PLIP__ROLE", "server"),
        &extra,
    );
    d.spawn_only();
    d
}

/// A trainer (role `trainer`, `trainer` its `[trainer]` table) that has taken 8 persons × 6
/// crops (purpose both, seeded) and logged a model and the whole gallery.
fn trainer_with_gallery(
    dir: &Path,
    trainer: &str,
    env: &[(&'static str, String)],
    seed: u64,
) -> (Daemon, Vec<Img>, tokio::runtime::Runtime) {
    let mut tr = Daemon::configure(
        dir,
        trainer,
        &with(env.to_vec(), "PLIP__ROLE", "trainer"),
        &Extra::default(),
    );
    tr.spawn();
    let t = tr.topo.clone();
    let all = images(8, 6, seed);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for chunk in all.chunks(24) {
            publish(
                &ch,
                &t.ingest_exchange,
                &batch_json_purpose(chunk, "both"),
                json_props(),
            )
            .await;
        }
    });
    tr.wait_for("the trainer's logs", Duration::from_secs(120), |s| {
        s["streams"]["models_logged"].is_u64()
            && s["streams"]["gallery_logged_seq"].as_u64() >= Some(48)
    });
    (tr, all, rt)
}

#[test]
fn a_server_follows_the_trainer_and_answers() {
    let _serial = serial();
    let suffix = tag();
    let (tdir, sdir) = (tempdir("role-trainer"), tempdir("role-server"));
    let trainer_cfg = trainer_keeping_versions();
    let env = streams_env(&suffix);
    let (mut tr, all, rt) = trainer_with_gallery(&tdir, &trainer_cfg, &env, 97);
    let t = tr.topo.clone();
    let s = tr.status().unwrap();
    assert_eq!(s["role"], "trainer");
    let v1 = s["streams"]["models_logged"].as_u64().unwrap();

    // A server started now catches up from the logs alone.
    let mut sv = start_server(&sdir, &env, &t);
    let s = sv.wait_for("the server to catch up", Duration::from_secs(120), |s| {
        s["serving"]["version"].as_u64() >= Some(v1) && s["serving"]["gallery_size"] == 48
    });
    assert_eq!(s["role"], "server");
    assert_eq!(s["samples"]["total"], 48, "{s:#}");
    let ready = plip_actors::base::client::get(&sv.http, "/readyz")
        .unwrap()
        .unwrap();
    assert_eq!(ready["ready"], true, "{ready:#}");

    // Only the server consumes the requests; its reply names the version it follows.
    let ask_k =
        |rt: &tokio::runtime::Runtime, k: usize| ask_image(rt, &t.reid_exchange, &all[k], 10);
    // A damaged chunk on the models log (a version 999 of two chunks, the second altered after
    // its CRC was computed) is refused and that version never served.
    let models_log = format!("plip.models.log.{suffix}");
    rt.block_on(async {
        let (_c, ch) = channel().await;
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for (head, body) in plip_actors::base::chunks::split(999, &payload, 60_000) {
            let mut body = body.to_vec();
            if head.index == 1 {
                body[10] ^= 0xff;
            }
            let mut h = FieldTable::default();
            use plip_actors::daemon::logs::headers as hd;
            h.insert(hd::VERSION.into(), AMQPValue::LongLongInt(999));
            h.insert(hd::CHUNK.into(), AMQPValue::LongUInt(head.index));
            h.insert(hd::CHUNKS.into(), AMQPValue::LongUInt(head.count));
            h.insert(hd::BYTES.into(), AMQPValue::LongLongInt(100_000));
            h.insert(
                hd::SHA256.into(),
                AMQPValue::LongString(head.sha256.as_str().into()),
            );
            h.insert(hd::CRC32.into(), AMQPValue::LongUInt(head.crc32));
            h.insert(hd::META.into(), AMQPValue::LongString("{}".into()));
            ch.basic_publish(
                "".into(),
                models_log.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_headers(h),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    });
    let s = sv.wait_for("the damaged chunk refused", Duration::from_secs(30), |s| {
        s["follower"]["chunks_refused"].as_u64() >= Some(1)
    });
    assert_ne!(s["serving"]["version"], 999);
    assert_ne!(s["follower"]["model_version"], 999);
    // The trainer goes on checkpointing, so the server may swap between the status reads and
    // the answer: the answer's version lies between what it served before and after.
    let served_before = sv.status().unwrap()["serving"]["version"].as_u64();
    let r = ask_k(&rt, 0);
    assert!(r["error"].is_null(), "{r:#}");
    let served_after = sv.status().unwrap()["serving"]["version"].as_u64();
    let answered = r["model_version"].as_u64();
    assert!(
        answered.is_some() && served_before <= answered && answered <= served_after,
        "{served_before:?} <= {answered:?} <= {served_after:?}: {r:#}"
    );
    assert!(
        r["served_by"]
            .as_str()
            .is_some_and(|s| s.ends_with(&format!("-{}", sv.pid()))),
        "{r:#}"
    );
    assert_eq!(
        tr.status().unwrap()["serving"]["answered"]
            .as_u64()
            .unwrap_or(0),
        0
    );

    // A promotion and a rollback on the trainer are followed.
    let s = tr.wait_for("a newer version logged", Duration::from_secs(180), |s| {
        s["streams"]["models_logged"].as_u64() > Some(v1)
    });
    let v2 = s["streams"]["models_logged"].as_u64().unwrap();
    sv.wait_for(
        "the server to follow the promotion",
        Duration::from_secs(120),
        |s| s["serving"]["version"].as_u64() >= Some(v2),
    );
    let pinned =
        plip_actors::base::client::request(&tr.http, "POST", &format!("/rollback?version={v1}"))
            .unwrap();
    assert!(pinned.is_ok(), "{pinned:?}");
    sv.wait_for(
        "the server to follow the rollback",
        Duration::from_secs(120),
        |s| s["serving"]["version"] == v1,
    );

    // Forget goes to the trainer; a server refuses it with a pointer there.
    let person = all[0].1.clone();
    let refused =
        plip_actors::base::client::request(&sv.http, "POST", &format!("/forget?person={person}"))
            .unwrap();
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("409") && e.to_string().contains("trainer")),
        "{refused:?}"
    );
    let forgot =
        plip_actors::base::client::request(&tr.http, "POST", &format!("/forget?person={person}"))
            .unwrap();
    assert!(forgot.is_ok(), "{forgot:?}");
    sv.wait_for(
        "the forget to reach the server",
        Duration::from_secs(60),
        |s| s["serving"]["gallery_size"] == 42 && s["samples"]["total"] == 42,
    );
    let r = ask_k(&rt, 1);
    assert!(r["error"].is_null(), "{r:#}");
    assert!(
        r["matches"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["person_id"] != person.as_str()),
        "{r:#}"
    );

    // A restarted server resumes from its offsets: nothing replayed, same version, same gallery.
    sv.stop();
    sv.spawn_only();
    let s = sv.wait_for("the restarted server", Duration::from_secs(120), |s| {
        s["serving"]["version"] == v1 && s["serving"]["gallery_size"] == 42
    });
    assert!(
        s["follower"]["gallery_entries"].as_u64() <= Some(1),
        "{:#}",
        s["follower"]
    );
    sv.stop();
    tr.stop();
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for (_, v) in streams_env(&suffix)
            .iter()
            .filter(|(k, _)| k.contains("_LOG"))
        {
            let _ = ch.queue_delete(v.as_str().into(), Default::default()).await;
        }
    });
    let _ = std::fs::remove_dir_all(tdir);
    let _ = std::fs::remove_dir_all(sdir);
}

/// Publishes one request per query image without waiting; returns (reply queue, correlation).
async fn send_all(
    ch: &Channel,
    exchange: &str,
    queries: &[(String, String, String, Vec<u8>)],
) -> Vec<(lapin::Queue, String)> {
    let mut out = Vec::new();
    for (_, _, cam, jpeg) in queries {
        let q = exclusive_queue(ch).await;
        let corr = tag();
        let body =
            serde_json::json!({"query": {"image": b64(jpeg)}, "top_k": 5, "exclude_camera": cam});
        publish(
            ch,
            exchange,
            body.to_string().as_bytes(),
            json_props()
                .with_reply_to(q.name().clone())
                .with_correlation_id(corr.as_str().into()),
        )
        .await;
        out.push((q, corr));
    }
    out
}

/// Waits (up to 90 s in all) for the reply on each queue.
async fn collect(ch: &Channel, sent: &[(lapin::Queue, String)]) -> Vec<serde_json::Value> {
    let t = Instant::now();
    let mut out = Vec::new();
    for (q, corr) in sent {
        loop {
            if let Some(m) = ch
                .basic_get(q.name().clone(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
                assert_eq!(v["request_id"], corr.as_str());
                out.push(v);
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "a request was never answered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    out
}

/// Two servers share the request queue (both answer); one killed with -9 while requests are
/// in flight loses none (the broker redelivers what it held to the other); restarted, it
/// resumes from its offsets; a third started later catches up from the logs alone and ranks
/// exactly as the first two did at the same version.
#[test]
fn replicas_share_queries_survive_a_kill_and_a_late_one_answers_alike() {
    let _serial = serial();
    let suffix = tag();
    let dirs: Vec<PathBuf> = ["rep-trainer", "rep-a", "rep-b", "rep-c"]
        .iter()
        .map(|n| tempdir(n))
        .collect();
    let env = streams_env(&suffix);
    let (mut tr, all, rt) = trainer_with_gallery(&dirs[0], &trainer_toml(10), &env, 99);
    let t = tr.topo.clone();
    let s = tr.status().unwrap();
    // One version for the whole test: pinned on the trainer.
    let v = s["streams"]["models_logged"].as_u64().unwrap();
    let pinned =
        plip_actors::base::client::request(&tr.http, "POST", &format!("/rollback?version={v}"))
            .unwrap();
    assert!(pinned.is_ok(), "{pinned:?}");
    let server = |dir: &Path, gallery: u64| {
        let mut d = start_server(dir, &env, &t);
        d.wait_for("a caught-up server", Duration::from_secs(120), |s| {
            s["follower"]["caught_up"] == true
                && s["serving"]["version"] == v
                && s["serving"]["gallery_size"] == gallery
        });
        d
    };
    let mut a = server(&dirs[1], 48);
    let mut b = server(&dirs[2], 48);

    // Both answer from the shared queue.
    let queries: Vec<_> = all.iter().step_by(2).cloned().collect();
    let first = rt.block_on(async {
        let (_c, ch) = channel().await;
        let sent = send_all(&ch, &t.reid_exchange, &queries).await;
        collect(&ch, &sent).await
    });
    let by: BTreeSet<String> = first
        .iter()
        .map(|r| {
            assert!(r["error"].is_null(), "{r:#}");
            assert_eq!(r["model_version"], v);
            r["served_by"].as_str().unwrap().to_string()
        })
        .collect();
    let names = |d: &Daemon| {
        let pid = d.pid();
        by.iter().any(|s| s.ends_with(&format!("-{pid}")))
    };
    assert!(names(&a) && names(&b), "served by {by:?}");

    // A forget sent to the trainer reaches both replicas.
    let person = all[47].1.clone();
    let forgot =
        plip_actors::base::client::request(&tr.http, "POST", &format!("/forget?person={person}"))
            .unwrap();
    assert!(forgot.is_ok(), "{forgot:?}");
    for d in [&mut a, &mut b] {
        d.wait_for(
            "the forget on every replica",
            Duration::from_secs(60),
            |s| s["serving"]["gallery_size"] == 42 && s["samples"]["total"] == 42,
        );
    }
    // What the two answer now: the reference for a server started later.
    let baseline = rt.block_on(async {
        let (_c, ch) = channel().await;
        let sent = send_all(&ch, &t.reid_exchange, &queries).await;
        collect(&ch, &sent).await
    });
    for r in &baseline {
        assert!(r["error"].is_null(), "{r:#}");
        assert!(
            r["matches"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["person_id"] != person.as_str()),
            "{r:#}"
        );
    }

    // kill -9 one while requests are in flight: every one is answered.
    let answers = rt.block_on(async {
        let (_c, ch) = channel().await;
        let sent = send_all(&ch, &t.reid_exchange, &all).await;
        a.kill();
        collect(&ch, &sent).await
    });
    assert_eq!(answers.len(), all.len());
    for r in &answers {
        assert!(r["error"].is_null(), "{r:#}");
    }
    // Restarted, it resumes from its offsets (nothing replayed).
    a.spawn_only();
    let s = a.wait_for("the restarted server", Duration::from_secs(120), |s| {
        s["follower"]["caught_up"] == true && s["serving"]["gallery_size"] == 42
    });
    assert!(
        s["follower"]["gallery_entries"].as_u64() <= Some(1),
        "{:#}",
        s["follower"]
    );

    // A third, started later, alone on the queue, ranks as the first two did.
    a.stop();
    b.stop();
    let mut c = server(&dirs[3], 42);
    let late = rt.block_on(async {
        let (_c, ch) = channel().await;
        let sent = send_all(&ch, &t.reid_exchange, &queries).await;
        collect(&ch, &sent).await
    });
    for (x, y) in baseline.iter().zip(&late) {
        assert!(names_pid(y, c.pid()), "{y:#}");
        let ids = |r: &serde_json::Value| {
            r["matches"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["id"].as_str().unwrap().to_string(),
                        m["score"].as_f64().unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let (p, q) = (ids(x), ids(y));
        assert_eq!(
            p.iter().map(|m| &m.0).collect::<Vec<_>>(),
            q.iter().map(|m| &m.0).collect::<Vec<_>>()
        );
        for (m, n) in p.iter().zip(&q) {
            assert!((m.1 - n.1).abs() < 1e-5, "{} vs {}", m.1, n.1);
        }
    }
    c.stop();
    tr.stop();
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for (_, v) in streams_env(&suffix)
            .iter()
            .filter(|(k, _)| k.contains("_LOG"))
        {
            let _ = ch.queue_delete(v.as_str().into(), Default::default()).await;
        }
    });
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// True when the reply was served by the process `pid`.
fn names_pid(r: &serde_json::Value, pid: u32) -> bool {
    r["served_by"]
        .as_str()
        .is_some_and(|s| s.ends_with(&format!("-{pid}")))
}

/// The first offset the stream still holds (retention removes whole old segments).
async fn first_offset(ch: &Channel, stream: &str) -> Option<u64> {
    use futures_lite::StreamExt;
    ch.basic_qos(1, Default::default()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("first".into()),
    );
    let tag = format!("first-offset-{}", tag());
    let mut c = ch
        .basic_consume(stream.into(), tag.as_str().into(), Default::default(), args)
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), c.next())
        .await
        .ok()??
        .ok()?;
    let _ = ch
        .basic_cancel(tag.as_str().into(), Default::default())
        .await;
    let h = d.properties.headers().clone()?;
    plip_actors::daemon::logs::as_u64(h.inner().get(&ShortString::from("x-stream-offset")))
}

/// Bounded replay: the trainer appends a full gallery snapshot every second (a short
/// `snapshot_every_s`) to a gallery log whose retention is small, so the oldest segments —
/// offset 0 with the first additions — are removed. A server started on an empty state folder
/// reads the manifest, starts at the latest snapshot and ends with exactly the trainer's
/// gallery (the person forgotten before the snapshot absent), having applied far fewer entries
/// than the log ever held.
#[test]
fn a_new_server_starts_from_the_latest_snapshot_after_retention() {
    let _serial = serial();
    let suffix = tag();
    let (tdir, sdir) = (tempdir("snap-trainer"), tempdir("snap-server"));
    let trainer_cfg = trainer_keeping_versions();
    let mut env = streams_env(&suffix);
    for (k, v) in [
        ("PLIP__STREAMS__SEGMENT_BYTES", "50000"),
        ("PLIP__STREAMS__GALLERY_MAX_LENGTH_BYTES", "600000"),
        ("PLIP__STREAMS__SNAPSHOT_EVERY_S", "1"),
        ("PLIP__STREAMS__MAX_AGE", "1h"),
    ] {
        env.retain(|(key, _)| *key != k);
        env = with(env, k, v);
    }
    let (mut tr, all, rt) = trainer_with_gallery(&tdir, &trainer_cfg, &env, 71);
    let t = tr.topo.clone();
    let gallery_log = format!("plip.gallery.log.{suffix}");
    let person = all[0].1.clone();
    let forgot =
        plip_actors::base::client::request(&tr.http, "POST", &format!("/forget?person={person}"))
            .unwrap();
    assert!(forgot.is_ok(), "{forgot:?}");
    // Snapshots of the 42 remaining samples pile up until retention removes the log's start.
    let deadline = Instant::now() + Duration::from_secs(120);
    let first = loop {
        let s = tr.status().unwrap();
        let first = rt.block_on(async {
            let (_c, ch) = channel().await;
            first_offset(&ch, &gallery_log).await
        });
        if s["streams"]["snapshot"]["samples"] == 42 && first > Some(0) {
            break first.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "retention never removed the log's start: first offset {first:?}, {:#}",
            s["streams"]
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let logged = tr.status().unwrap()["streams"]["gallery_entries_logged"]
        .as_u64()
        .unwrap();
    assert!(logged > first, "{logged} entries, first offset {first}");

    let mut sv = start_server(&sdir, &env, &t);
    let s = sv.wait_for("the server to catch up", Duration::from_secs(120), |s| {
        s["serving"]["gallery_size"] == 42
            && s["samples"]["total"] == 42
            && s["serving"]["version"].is_u64()
            && s["follower"]["caught_up"] == true
    });
    let f = &s["follower"];
    eprintln!(
        "gallery log: {logged} entries, first offset still held {first}; the server started from {} and applied {} entries",
        f["started_from"], f["gallery_entries"]
    );
    assert!(f["started_from"]["gallery"]["snapshot"].is_u64(), "{f:#}");
    assert!(f["started_from"]["model"]["version"].is_u64(), "{f:#}");
    assert_eq!(f["manifest_refused"], false, "{f:#}");
    assert!(
        f["gallery_entries"].as_u64().unwrap() < logged,
        "applied {} entries of the {logged} logged: not started from the snapshot ({f:#})",
        f["gallery_entries"]
    );
    // Its answers never name the forgotten person.
    let r = ask_image(&rt, &t.reid_exchange, &all[1], 50);
    assert!(r["error"].is_null(), "{r:#}");
    let matches = r["matches"].as_array().unwrap();
    assert!(!matches.is_empty());
    assert!(
        matches.iter().all(|m| m["person_id"] != person.as_str()),
        "{r:#}"
    );
    sv.stop();
    tr.stop();
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for (_, v) in env.iter().filter(|(k, _)| k.ends_with("_LOG")) {
            let _ = ch.queue_delete(v.as_str().into(), Default::default()).await;
        }
    });
    let _ = std::fs::remove_dir_all(tdir);
    let _ = std::fs::remove_dir_all(sdir);
}
