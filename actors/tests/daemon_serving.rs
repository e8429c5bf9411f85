//! `plipd run`'s ReID server against the real broker: queries and every bad request, the gated hot swap, rollback and forget, the Python client, the demo.
//!
//! The daemon binary runs as a child process on a temporary state folder, with exchange and
//! queue names unique to each test, against the real RabbitMQ on 127.0.0.1:5672
//! (`PLIP_AMQP_URL` overrides). Shared helpers: `common/`.

mod common;

use common::*;

/// After training, the first checkpoint is promoted, the gallery embedded, and image and text
/// queries are answered with ranked matches naming the serving version; every bad request gets
/// an error reply with its code; a request without `reply_to` is answered on `plip.results`.
#[test]
fn serves_queries_and_answers_every_bad_request() {
    let _serial = serial();
    let dir = tempdir("serving");
    // The `both` joint feature here (the other daemon tests serve the preset's pooled one): the
    // gallery holds pooled and neck side by side, and scores stay exact cosines.
    let mut d = Daemon::start(
        &dir,
        &trainer_toml(10),
        &[
            ("PLIP__SERVING__POLL_MS", "200".into()),
            ("PLIP__TRAINER__JOINT_FEATURE", "both".into()),
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = d.topo.clone();
    let all = images(16, 6, 5);
    // Listen to the model announcements before anything is trained.
    let (_models_conn, models_ch, models_q) = rt.block_on(async {
        let (c, ch) = channel().await;
        let q = exclusive_queue(&ch).await;
        ch.queue_bind(
            q.name().clone(),
            t.models_exchange.as_str().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        (c, ch, q.name().clone())
    });
    rt.block_on(async {
        let (_c, ch) = channel().await;
        // Before any checkpoint: an error reply, not silence.
        let q = serde_json::json!({"query": {"text": "a person"}});
        let r = ask(
            &ch,
            &t.reid_exchange,
            q.to_string().as_bytes(),
            json_props(),
        )
        .await;
        assert_eq!(r["error"]["code"], "no_model", "{r:#}");
        for chunk in all.chunks(16) {
            publish(
                &ch,
                &t.ingest_exchange,
                &batch_json_purpose(chunk, "both"),
                json_props(),
            )
            .await;
        }
    });
    let s = d.wait_for(
        "a serving version with its gallery",
        Duration::from_secs(120),
        |s| s["serving"]["version"].is_u64() && s["serving"]["gallery_size"] == 96,
    );
    let version = s["serving"]["version"].as_u64().unwrap();
    // Each promotion was announced on plip.models.
    let announced = rt.block_on(async {
        let t0 = Instant::now();
        loop {
            if let Some(m) = models_ch
                .basic_get(models_q.clone(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                break serde_json::from_slice::<serde_json::Value>(&m.delivery.data).unwrap();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no model announcement"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert!(
        announced["version"].as_u64() <= Some(version),
        "{announced:#}"
    );
    assert!(announced["step"].is_u64() && announced["promoted_at"].is_u64());
    assert!(announced["metrics"].is_object());
    rt.block_on(async {
        let (_c, ch) = channel().await;
        let text = serde_json::json!({"query": {"text": "a man wearing a black jacket and grey trousers"}, "top_k": 5});
        let r = ask(&ch, &t.reid_exchange, text.to_string().as_bytes(), json_props()).await;
        assert!(r["error"].is_null(), "{r:#}");
        assert!(r["model_version"].as_u64() >= Some(version));
        let m = r["matches"].as_array().unwrap();
        assert_eq!(m.len(), 5);
        let scores: Vec<f64> = m.iter().map(|x| x["score"].as_f64().unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
        let (_, _, cam, jpeg) = &all[0];
        let img = serde_json::json!({"query": {"image": b64(jpeg)}, "top_k": 100, "exclude_camera": cam});
        let r = ask(&ch, &t.reid_exchange, img.to_string().as_bytes(), json_props()).await;
        let m = r["matches"].as_array().unwrap();
        assert!(!m.is_empty() && m.len() <= 96);
        assert!(m.iter().all(|x| x["camera_id"] != cam.as_str()), "exclude_camera");
        // Without the exclusion the image finds its stored copy (the canonical JPEG of it)
        // first, at a cosine near 1: the score is a cosine, not a sum over the two features.
        let img = serde_json::json!({"query": {"image": b64(jpeg)}, "top_k": 3});
        let r = ask(&ch, &t.reid_exchange, img.to_string().as_bytes(), json_props()).await;
        let top = &r["matches"][0];
        assert_eq!(top["id"], all[0].0.as_str(), "{r:#}");
        let score = top["score"].as_f64().unwrap();
        assert!(score > 0.95 && score < 1.0 + 1e-4, "self-match score {score}");
        // Every bad request kind: an error reply with its code.
        let old = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_timestamp(1);
        let cases: Vec<(&str, Vec<u8>, BasicProperties)> = vec![
            ("malformed_body", b"{oops".to_vec(), json_props()),
            ("unsupported_content_type", b"hi".to_vec(), BasicProperties::default().with_content_type("text/plain".into())),
            ("schema_violation", serde_json::json!({"query": {"text": "x"}, "colour": 1}).to_string().into_bytes(), json_props()),
            ("invalid_query", serde_json::json!({"query": {}}).to_string().into_bytes(), json_props()),
            ("empty_text", serde_json::json!({"query": {"text": " "}}).to_string().into_bytes(), json_props()),
            ("text_too_long", serde_json::json!({"query": {"text": "word ".repeat(100)}}).to_string().into_bytes(), json_props()),
            ("top_k_out_of_range", serde_json::json!({"query": {"text": "x"}, "top_k": 101}).to_string().into_bytes(), json_props()),
            ("deadline_passed", serde_json::json!({"query": {"text": "x"}, "deadline_ms": 1000}).to_string().into_bytes(), old),
            ("invalid_base64", serde_json::json!({"query": {"image": "@@"}}).to_string().into_bytes(), json_props()),
            ("image_undecodable", serde_json::json!({"query": {"image": b64(&jpeg[..jpeg.len() / 2])}}).to_string().into_bytes(), json_props()),
        ];
        for (code, body, props) in cases {
            let r = ask(&ch, &t.reid_exchange, &body, props).await;
            assert_eq!(r["error"]["code"], code, "{r:#}");
            assert!(r["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        // No reply_to: the answer goes to plip.results.
        let q = exclusive_queue(&ch).await;
        ch.queue_bind(q.name().clone(), t.results_exchange.as_str().into(), "".into(), Default::default(), FieldTable::default())
            .await
            .unwrap();
        publish(&ch, &t.reid_exchange, text.to_string().as_bytes(), json_props().with_correlation_id("no-reply-to".into())).await;
        let t0 = Instant::now();
        let m = loop {
            if let Some(m) = ch.basic_get(q.name().clone(), BasicGetOptions::default()).await.unwrap() {
                break m;
            }
            assert!(t0.elapsed() < Duration::from_secs(30));
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
        assert_eq!(v["request_id"], "no-reply-to");
        assert_eq!(v["matches"].as_array().unwrap().len(), 5);
    });
    let s = d.status().unwrap();
    assert!(s["serving"]["answered"].as_u64() >= Some(3));
    // The ten bad kinds above and no_model before the first checkpoint.
    assert_eq!(
        s["serving"]["errors"].as_object().unwrap().len(),
        11,
        "{s:#}"
    );
    // Prometheus metrics and readiness.
    let text = String::from_utf8(
        plip_actors::base::client::request(&d.http, "GET", "/metrics")
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
    };
    assert!(value("plip_reid_answered_total ") >= 3.0);
    assert_eq!(
        value("plip_reid_errors_total{code=\"deadline_passed\"}"),
        1.0
    );
    assert_eq!(
        value("plip_reid_request_seconds_count "),
        value("plip_reid_request_seconds_bucket{le=\"+Inf\"}")
    );
    assert!(value("plip_reid_request_seconds_count ") >= 13.0);
    assert_eq!(value("plip_gallery_size "), 96.0);
    assert!(value("plip_serving_version ") >= version as f64);
    assert_eq!(value("plip_samples{purpose=\"both\"}"), 96.0);
    assert!(value("plip_train_step ") > 0.0);
    assert_eq!(value("plip_broker_connected "), 1.0);
    // Each scalar counter is declared once and shows in both documents (read after the metrics:
    // counters only grow).
    let status = d.status().expect("status");
    for c in plip_actors::daemon::stats::COUNTERS {
        let in_status = status["ingest"][c.key]
            .as_u64()
            .unwrap_or_else(|| panic!("{} not in /status", c.key));
        assert!(
            value(&format!("{} ", c.metric)) <= in_status as f64,
            "{}",
            c.key
        );
    }
    assert!(value("plip_ingest_stored_total ") >= 96.0);
    let ready = plip_actors::base::client::get(&d.http, "/readyz")
        .unwrap()
        .unwrap();
    assert_eq!(ready["ready"], true, "{ready:#}");
    // `plipd query` as a client would use it.
    let out = Command::new(env!("CARGO_BIN_EXE_plipd"))
        .args([
            "query",
            "--json",
            "--top-k",
            "3",
            "--url",
            &url(),
            "--exchange",
            &t.reid_exchange,
            "--text",
            "a person in a grey coat",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["matches"].as_array().unwrap().len(), 3, "{answer:#}");
    // A client that asks for a newer model than the one serving is refused, not answered with
    // the older one; asking for the serving version is answered.
    let serving = answer["model_version"].as_u64().expect("a version");
    let (too_old, same) = rt.block_on(async {
        let (_c, ch) = channel().await;
        let ask_min = |v: u64| {
            serde_json::json!({"query": {"text": "a person in a grey coat"}, "top_k": 2, "min_model_version": v})
                .to_string()
        };
        let a = ask(&ch, &t.reid_exchange, ask_min(serving + 1_000).as_bytes(), json_props()).await;
        let b = ask(&ch, &t.reid_exchange, ask_min(serving).as_bytes(), json_props()).await;
        (a, b)
    });
    assert_eq!(too_old["error"]["code"], "model_too_old", "{too_old:#}");
    assert!(
        too_old["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("version {} or newer", serving + 1_000))),
        "{too_old:#}"
    );
    assert!(same["error"].is_null(), "{same:#}");
    // (Training goes on: a newer version may have been promoted meanwhile.)
    assert!(same["model_version"].as_u64() >= Some(serving), "{same:#}");
    // `plipd export` goes through the daemon while it holds the state folder.
    let file = dir.join("served.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_plipd"))
        .args(["export", "--http", &d.http, "--state"])
        .arg(dir.join("state"))
        .arg("--version")
        .arg(version.to_string())
        .arg("--out")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let meta = plip_model::weights::read_meta(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        meta.extra.get("checkpoint_version"),
        Some(&version.to_string())
    );
    // A restart keeps the serving version and its gallery without re-embedding.
    d.stop();
    d.spawn();
    let s = d.wait_for(
        "the restored serving version",
        Duration::from_secs(60),
        |s| s["serving"]["version"].is_u64() && s["serving"]["gallery_size"] == 96,
    );
    assert!(s["serving"]["version"].as_u64() >= Some(version));
    assert!(!d.log_events("serving_restored").is_empty());
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The ranking a reply should have, recomputed offline with the version it names.
fn offline_ranking(
    state_dir: &Path,
    version: u64,
    query: &[u8],
    cam: &str,
    gallery: &[Img],
    k: usize,
) -> Vec<String> {
    let state = plip_actors::base::state::State::open(state_dir).unwrap();
    let lm = plip_actors::base::model::from_open_state(&state, Some(version)).unwrap();
    let p = lm.model.preset().clone();
    let embed = |jpeg: &[u8]| {
        let img = plip_ingest::image::decode(jpeg, &Default::default()).unwrap();
        let rgb = plip_ingest::image::pixels_at(&img, p.image_height as u32, p.image_width as u32);
        lm.model
            .embed_images(
                &plip_model::batch::normalize_rgb(&rgb, p.image_height, p.image_width),
                1,
            )
            .data
    };
    // The stored sample (the published JPEG, or its canonical form when larger): embed that,
    // resized straight to the model's input, as the daemon does.
    let store = state.samples(30).unwrap();
    let mut index = plip_actors::base::index::Index::new(p.index_dim());
    let mut cams = Vec::new();
    for (id, _, c, _) in gallery {
        let s = store.get(id).unwrap().unwrap();
        index.push(&embed(&s.jpeg), Some(if c == cam { 1 } else { 0 }));
        cams.push(c.clone());
    }
    let hits = index.search(&embed(query), &[Some(1)], k);
    hits[0].iter().map(|h| gallery[h.row].0.clone()).collect()
}

/// Promotion, gating, rollback, forgetting and swapping under load:
/// - while the trainer writes checkpoints, a steady stream of queries is answered in full
///   across the promotions, and replies recomputed offline with the version they name match;
/// - a re-initialised checkpoint is refused by the gate;
/// - the trained encoder's cross-camera Rank-1 beats the re-initialised one's (served by
///   rollback) by a clear margin; rollback and unpin change the serving version replies name;
/// - forgetting a person removes them from the results.
#[test]
fn swaps_gates_rolls_back_and_forgets() {
    let _serial = serial();
    let dir = tempdir("swap");
    let env = [
        ("PLIP__SERVING__POLL_MS", "200".to_string()),
        ("PLIP__STATE__PROBE_PERCENT", "30".to_string()),
    ];
    let trainer = format!(
        "{}\nkeep_checkpoints = 100\n",
        trainer_toml(25).replace("keep_checkpoints = 3\n", "")
    );
    let mut d = Daemon::start(&dir, &trainer, &env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = d.topo.clone();
    let all = images(24, 6, 6);
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
    d.wait_for("a serving version", Duration::from_secs(120), |s| {
        s["serving"]["version"].is_u64() && s["serving"]["gallery_size"] == 144
    });
    // A steady stream of queries while checkpoints are promoted.
    let stream: Vec<serde_json::Value> = rt.block_on(async {
        let (_c, ch) = channel().await;
        let mut replies = Vec::new();
        let t0 = Instant::now();
        let mut k = 0;
        loop {
            let (_, _, cam, jpeg) = &all[k % all.len()];
            k += 1;
            let body = serde_json::json!({"query": {"image": b64(jpeg)}, "top_k": 5, "exclude_camera": cam});
            let r = ask(&ch, &t.reid_exchange, body.to_string().as_bytes(), json_props()).await;
            assert!(r["error"].is_null(), "a query failed during swaps: {r:#}");
            replies.push(serde_json::json!({"k": k - 1, "reply": r}));
            let versions: BTreeSet<u64> = replies.iter().filter_map(|x| x["reply"]["model_version"].as_u64()).collect();
            if versions.len() >= 3 || t0.elapsed() > Duration::from_secs(120) {
                break;
            }
        }
        replies
    });
    let versions: BTreeSet<u64> = stream
        .iter()
        .filter_map(|x| x["reply"]["model_version"].as_u64())
        .collect();
    assert!(
        versions.len() >= 3,
        "replies saw versions {versions:?}: promotions did not happen under load"
    );
    let s = d.status().unwrap();
    assert!(s["serving"]["promotions"].as_u64() >= Some(3), "{s:#}");
    // Train on until the serving encoder is clearly better than chance on the probe split
    // (the re-initialised encoder below scores a probe mAP of 0.27 on this split; the gate
    // refuses it when the serving one is above 0.29), and the trainer has taken 1,500 steps, so
    // the serving version is the gate's best of at least that many. The trainer's step, not the
    // serving version's: a version that scores high early is never displaced by the gate, so
    // its own step can stay below any bound.
    d.wait_for("a trained serving encoder", Duration::from_secs(240), |s| {
        s["serving"]["metrics"]["mAP"].as_f64() >= Some(0.33)
            && s["trainer"]["step"].as_u64() >= Some(1500)
    });
    d.stop();
    // Replies recomputed offline with the version each names.
    let state_dir = dir.join("state");
    for x in stream.iter().step_by((stream.len() / 6).max(1)) {
        let k = x["k"].as_u64().unwrap() as usize;
        let r = &x["reply"];
        let (_, _, cam, jpeg) = &all[k % all.len()];
        let want = offline_ranking(
            &state_dir,
            r["model_version"].as_u64().unwrap(),
            jpeg,
            cam,
            &all,
            5,
        );
        let got: Vec<String> = r["matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, want, "reply {k} (version {})", r["model_version"]);
    }
    // A re-initialised checkpoint: the gate must refuse it.
    let (serving, random) = {
        let state = plip_actors::base::state::State::open(&state_dir).unwrap();
        let serving = state.serving_version().unwrap().unwrap();
        let tk = state.tokenizer().unwrap().unwrap();
        let model = plip_model::Plip::<f32, plip_model::dfdx::prelude::Cpu>::new(
            &Default::default(),
            &plip_model::Preset::test(),
            424242,
        )
        .unwrap();
        let trainer = plip_model::Trainer::new(model, Default::default());
        let weights = plip_model::weights::save_weights(
            &trainer.model,
            tk.fingerprint(),
            99_999,
            &Default::default(),
        )
        .unwrap();
        let optimizer = plip_model::weights::save_optimizer(
            &trainer.opt,
            &plip_model::Preset::test(),
            tk.fingerprint(),
        )
        .unwrap();
        let v = state
            .save_checkpoint(plip_actors::base::state::Checkpoint {
                meta: plip_actors::base::state::CheckpointMeta {
                    version: 0,
                    step: 99_999,
                    preset: "test".into(),
                    tokenizer: tk.fingerprint().to_string(),
                    images_seen: 0,
                    created_unix: 0,
                    metrics: Default::default(),
                },
                weights,
                optimizer,
            })
            .unwrap();
        (serving, v)
    };
    d.env
        .push(("PLIP__TRAINER__ENABLED".into(), "false".into()));
    d.spawn();
    let s = d.wait_for(
        "the re-initialised checkpoint refused",
        Duration::from_secs(60),
        |s| s["serving"]["refused"].as_u64() >= Some(1),
    );
    assert_eq!(s["serving"]["version"], serving, "{s:#}");
    let http = d.http.clone();
    let post = |path: &str| {
        plip_actors::base::client::request(&http, "POST", path)
            .unwrap()
            .unwrap()
    };
    let list = plip_actors::base::client::get(&http, "/checkpoints")
        .unwrap()
        .unwrap();
    assert_eq!(list["serving"], serving);
    let rand_entry = list["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["version"] == random)
        .unwrap();
    assert_eq!(rand_entry["probe"]["promoted"], false, "{rand_entry:#}");
    let (trained_r1, replies) =
        rt.block_on(rank1(&rt.block_on(channel()).1, &t.reid_exchange, &all));
    assert!(replies.iter().all(|r| r["model_version"] == serving));
    // Rollback to the re-initialised version: replies name it, and they are much worse.
    post(&format!("/rollback?version={random}"));
    d.wait_for("the rollback", Duration::from_secs(60), |s| {
        s["serving"]["version"] == random
    });
    let (random_r1, replies) = rt.block_on(async {
        let (_c, ch) = channel().await;
        rank1(&ch, &t.reid_exchange, &all).await
    });
    assert!(replies.iter().all(|r| r["model_version"] == random));
    eprintln!("cross-camera Rank-1: trained {trained_r1:.3}, re-initialised {random_r1:.3}");
    assert!(
        trained_r1 >= random_r1 + 0.15,
        "trained Rank-1 {trained_r1:.3} vs re-initialised {random_r1:.3}"
    );
    // Rollback to the trained version, then unpin: automatic promotion resumes (the random
    // one stays refused).
    post(&format!("/rollback?version={serving}"));
    d.wait_for("the second rollback", Duration::from_secs(60), |s| {
        s["serving"]["version"] == serving
    });
    post("/unpin");
    let list = plip_actors::base::client::get(&http, "/checkpoints")
        .unwrap()
        .unwrap();
    assert!(list["pinned"].is_null());
    // Forget a person: gone from the gallery and from every answer.
    let gone = all[0].1.clone();
    let r = post(&format!("/forget?person={gone}"));
    let r: serde_json::Value = serde_json::from_slice(&r).unwrap();
    assert_eq!(r["samples_removed"], 6);
    d.wait_for("the gallery without them", Duration::from_secs(60), |s| {
        s["serving"]["gallery_size"] == 138
    });
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for (_, _, _, jpeg) in all.iter().filter(|x| x.1 == gone) {
            let body = serde_json::json!({"query": {"image": b64(jpeg)}, "top_k": 100});
            let r = ask(
                &ch,
                &t.reid_exchange,
                body.to_string().as_bytes(),
                json_props(),
            )
            .await;
            let m = r["matches"].as_array().unwrap();
            assert_eq!(m.len(), 100);
            assert!(m.iter().all(|x| x["person_id"] != gone.as_str()));
        }
    });
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A virtual environment with pika for the third-party client (created once under target/).
fn python_with_pika() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py-client-venv");
    let py = venv.join("bin/python");
    let ok = |py: &Path| {
        Command::new(py)
            .args(["-c", "import pika"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !ok(&py) {
        let st = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is needed for the pika client test");
        assert!(
            st.success(),
            "python3 -m venv failed (Debian: apt-get install python3-venv)"
        );
        let st = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "pika"])
            .status()
            .unwrap();
        assert!(st.success(), "pip install pika failed");
    }
    assert!(ok(&py));
    py
}

/// The pika client (clients/python/plip_client.py) publishes a batch and gets its ingest
/// outcome, then asks an image query over RPC and gets ranked matches.
#[test]
fn python_pika_client_publishes_and_queries() {
    let _serial = serial();
    let py = python_with_pika();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/python/plip_client.py");
    let dir = tempdir("pika");
    let mut d = Daemon::start(
        &dir,
        &trainer_toml(10),
        &[("PLIP__SERVING__POLL_MS", "200".into())],
    );
    let topo = d.topo.clone();
    let client = |args: &[String]| {
        let out = Command::new(&py)
            .arg(&script)
            .args([
                "--url",
                &url(),
                "--exchange",
                &topo.ingest_exchange,
                "--reid-exchange",
                &topo.reid_exchange,
            ])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let imgs = images(12, 6, 8);
    for (p, chunk) in imgs.chunks(6).enumerate() {
        let mut files = Vec::new();
        for (i, (_, _, _, jpeg)) in chunk.iter().enumerate() {
            let f = dir.join(format!("p{p}-{i}.jpg"));
            std::fs::write(&f, jpeg).unwrap();
            files.push(f.display().to_string());
        }
        let mut args: Vec<String> = [
            "publish",
            "--id",
            &format!("py{p}"),
            "--person",
            &chunk[0].1,
            "--camera",
            &chunk[0].2,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(files);
        let (ok, out, err) = client(&args);
        assert!(ok, "{out}{err}");
        let outcome: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(
            outcome["accepted"].as_array().unwrap().len(),
            6,
            "{outcome}"
        );
    }
    d.wait_for("a serving version", Duration::from_secs(120), |s| {
        s["serving"]["version"].is_u64() && s["serving"]["gallery_size"] == 72
    });
    let query = dir.join("p0-0.jpg").display().to_string();
    let (ok, out, err) = client(&[
        "query".into(),
        "--image".into(),
        query,
        "--top-k".into(),
        "5".into(),
    ]);
    assert!(ok, "{out}{err}");
    let answer: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(answer["matches"].as_array().unwrap().len(), 5, "{answer}");
    assert!(answer["model_version"].is_u64());
    let (ok, out, _) = client(&[
        "query".into(),
        "--text".into(),
        "a person in a black jacket".into(),
    ]);
    assert!(ok);
    let answer: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(answer["matches"].as_array().unwrap().len(), 10, "{answer}");
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `plipd demo` end to end on the `test` preset: it publishes, trains, serves, queries, stops
/// the daemon cleanly and writes its report.
#[test]
fn demo_runs_and_reports() {
    let _serial = serial();
    let dir = tempdir("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_plipd"))
        .args([
            "demo",
            "--minutes",
            "0.6",
            "--preset",
            "test",
            "--identities",
            "24",
            "--rate",
            "30",
            "--url",
            &url(),
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["stored"].as_u64() > Some(100), "{summary:#}");
    assert!(summary["steps"].as_u64() > Some(0), "{summary:#}");
    assert!(summary["serving_version"].is_u64(), "{summary:#}");
    assert!(summary["queries"].as_u64() > Some(0), "{summary:#}");
    assert_eq!(summary["daemon_exit"], 0);
    assert!(summary["held_out_eval"]["rank1"].is_f64(), "{summary:#}");
    for f in ["loss.png", "cmc.png", "metrics.json"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `topology.queue_type = "quorum"` (what a RabbitMQ cluster needs for highly available
/// queues) against the local broker: `plip.ingest` and `plip.reid.requests` are declared as
/// quorum queues with the delivery limit, samples are stored through the one and queries
/// answered through the other.
#[test]
fn quorum_queues_carry_ingest_and_requests() {
    let _serial = serial();
    let dir = tempdir("quorum");
    let extra = Extra {
        topology: "queue_type = \"quorum\"\ndelivery_limit = 5\n".into(),
        ..Extra::default()
    };
    let mut d = Daemon::configure(
        &dir,
        &trainer_toml(10),
        &[("PLIP__SERVING__POLL_MS", "200".to_string())],
        &extra,
    );
    d.spawn();
    let t = d.topo.clone();
    let out = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "type",
            "arguments",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    for q in [&t.ingest_queue, &t.reid_queue] {
        let line = listing
            .lines()
            .find(|l| l.split_whitespace().next() == Some(q.as_str()))
            .unwrap_or_else(|| panic!("{q} not listed:\n{listing}"));
        assert!(line.contains("quorum"), "{line}");
        assert!(line.contains("x-delivery-limit"), "{line}");
    }
    let all = images(8, 6, 77);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for chunk in all.chunks(16) {
            publish(
                &ch,
                &t.ingest_exchange,
                &batch_json_purpose(chunk, "both"),
                json_props(),
            )
            .await;
        }
    });
    d.wait_for(
        "a serving model over quorum queues",
        Duration::from_secs(120),
        |s| s["serving"]["version"].is_u64() && s["serving"]["gallery_size"] == 48,
    );
    let reply = ask_image(&rt, &t.reid_exchange, &all[0], 3);
    assert!(reply["error"].is_null(), "{reply:#}");
    assert_eq!(
        reply["matches"].as_array().map(Vec::len),
        Some(3),
        "{reply:#}"
    );
    d.stop();
    let _ = std::fs::remove_dir_all(dir);
}

/// A consumer of `stream` from its first entry (streams need a prefetch and manual acks).
async fn stream_from_first(ch: &Channel, stream: &str, prefetch: u16) -> lapin::Consumer {
    ch.basic_qos(prefetch, lapin::options::BasicQosOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("first".into()),
    );
    ch.basic_consume(
        stream.into(),
        format!("log-reader-{}", tag()).as_str().into(),
        lapin::options::BasicConsumeOptions::default(),
        args,
    )
    .await
    .unwrap()
}

/// Reads the models log from its first entry until `want` versions are reassembled (or 60 s
/// pass): (version, metadata, weights) of each.
async fn read_models_log(
    ch: &Channel,
    stream: &str,
    want: usize,
) -> Vec<(u64, serde_json::Value, Vec<u8>)> {
    use futures_lite::StreamExt;
    use plip_actors::base::chunks::Reassembler;
    let mut consumer = stream_from_first(ch, stream, 64).await;
    let mut r = Reassembler::default();
    let mut out = Vec::new();
    let t = Instant::now();
    while out.len() < want && t.elapsed() < Duration::from_secs(60) {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await
        else {
            continue;
        };
        let headers = d.properties.headers().clone().unwrap_or_default();
        let (head, meta) =
            plip_actors::daemon::logs::read_chunk_headers(&headers).expect("chunk headers");
        if let Some(weights) = r.push(&head, &d.data).expect("an intact chunk") {
            out.push((head.version, meta, weights));
        }
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    out
}

/// With `[streams]` on, each version that starts serving — promoted, then pinned by a
/// rollback — is appended to the models log as checksummed chunks (64 KiB here, so the weights
/// span many messages); read back from the stream's first offset, each reassembles to exactly
/// the weights `/export` gives for that version.
#[test]
fn serving_versions_are_appended_to_the_models_log() {
    let _serial = serial();
    let dir = tempdir("models-log");
    let suffix = tag();
    let stream = format!("plip.models.log.{suffix}");
    let others = [
        format!("plip.gallery.log.{suffix}"),
        format!("plip.logs.manifest.{suffix}"),
    ];
    let env = [
        ("PLIP__SERVING__POLL_MS", "200".to_string()),
        ("PLIP__STREAMS__ENABLED", "true".to_string()),
        ("PLIP__STREAMS__MODELS_LOG", stream.clone()),
        ("PLIP__STREAMS__GALLERY_LOG", others[0].clone()),
        ("PLIP__STREAMS__MANIFEST_LOG", others[1].clone()),
        ("PLIP__STREAMS__CHUNK_BYTES", "65536".to_string()),
        ("PLIP__STREAMS__SEGMENT_BYTES", "1000000".to_string()),
    ];
    let trainer = format!(
        "{}\nkeep_checkpoints = 100\n",
        trainer_toml(10).replace("keep_checkpoints = 3\n", "")
    );
    let mut d = Daemon::start(&dir, &trainer, &env);
    let t = d.topo.clone();
    let all = images(8, 6, 91);
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
    let s = d.wait_for("a logged serving version", Duration::from_secs(120), |s| {
        s["streams"]["models_logged"].is_u64()
            && s["streams"]["models_logged"] == s["serving"]["version"]
    });
    let first = s["streams"]["models_logged"].as_u64().unwrap();
    // Wait for a newer version to be promoted and logged, then pin the first again: a
    // rollback is logged too.
    d.wait_for("a newer version logged", Duration::from_secs(180), |s| {
        s["streams"]["models_logged"].as_u64() > Some(first)
    });
    let pinned =
        plip_actors::base::client::request(&d.http, "POST", &format!("/rollback?version={first}"))
            .unwrap();
    assert!(pinned.is_ok(), "{pinned:?}");
    let s = d.wait_for("the rollback logged", Duration::from_secs(120), |s| {
        s["serving"]["version"] == first && s["streams"]["models_logged"] == first
    });
    assert!(s["streams"]["error"].is_null(), "{s:#}");
    let entries = rt.block_on(async {
        let (_c, ch) = channel().await;
        // Every entry up to the rollback: the log's own count of versions it logged.
        let logged = d.log_events("model_logged").len();
        read_models_log(&ch, &stream, logged).await
    });
    assert!(entries.len() >= 2, "{} entries", entries.len());
    let last = entries.last().unwrap();
    assert_eq!(last.0, first);
    assert_eq!(last.1["pinned"], true, "{}", last.1);
    assert!(entries.iter().any(|e| e.1["pinned"] == false));
    for (version, meta, weights) in &entries {
        assert_eq!(meta["version"], *version);
        assert!(
            weights.len() > 65536,
            "{} bytes: one chunk only",
            weights.len()
        );
        let exported = plip_actors::base::client::request(
            &d.http,
            "GET",
            &format!("/export?version={version}"),
        )
        .unwrap()
        .unwrap();
        // The same file as `/export` writes (safetensors keeps its header metadata in a hash
        // map, so the header's byte order may differ: compare metadata and tensors).
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&exported).unwrap(),
            safetensors::SafeTensors::deserialize(weights).expect("the log holds safetensors"),
        );
        let meta = |x: &[u8]| {
            let (_, m) = safetensors::SafeTensors::read_metadata(x).unwrap();
            m.metadata()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert_eq!(
            meta(&exported),
            meta(weights),
            "version {version}: metadata differ"
        );
        let mut names = a.names();
        names.sort();
        assert!(!names.is_empty());
        for n in names {
            let (x, y) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
            assert_eq!(
                (x.shape(), x.data()),
                (y.shape(), y.data()),
                "version {version}: {n}"
            );
        }
    }
    d.stop();
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for q in std::iter::once(&stream).chain(&others) {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
    });
    let _ = std::fs::remove_dir_all(dir);
}

/// Reads the gallery log from its first entry for up to `quiet` after the last entry arrived.
async fn read_gallery_log(
    ch: &Channel,
    stream: &str,
    quiet: Duration,
) -> Vec<plip_actors::daemon::logs::GalleryEntry> {
    use futures_lite::StreamExt;
    let mut consumer = stream_from_first(ch, stream, 256).await;
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(quiet, consumer.next()).await {
        let headers = d.properties.headers().clone().unwrap_or_default();
        out.push(
            plip_actors::daemon::logs::read_gallery_entry(&headers, &d.data)
                .expect("a well-formed entry"),
        );
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    out
}

/// A stream that already exists with other retention settings (here `x-max-age` 1h against
/// the configured 7D) cannot be declared again: the daemon says which stream, why, and how to
/// apply new settings (a policy), in `/status`, while the daemon keeps running.
#[test]
fn a_stream_with_other_settings_is_reported_with_the_way_out() {
    let _serial = serial();
    let dir = tempdir("stream-args");
    let suffix = tag();
    let names = [
        format!("plip.models.log.{suffix}"),
        format!("plip.gallery.log.{suffix}"),
        format!("plip.logs.manifest.{suffix}"),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_c, ch) = channel().await;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        args.insert("x-max-age".into(), AMQPValue::LongString("1h".into()));
        ch.queue_declare(
            names[0].as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    });
    let env = [
        ("PLIP__SERVING__POLL_MS", "200".to_string()),
        ("PLIP__STREAMS__ENABLED", "true".to_string()),
        ("PLIP__STREAMS__MODELS_LOG", names[0].clone()),
        ("PLIP__STREAMS__GALLERY_LOG", names[1].clone()),
        ("PLIP__STREAMS__MANIFEST_LOG", names[2].clone()),
    ];
    let mut d = Daemon::start(&dir, "enabled = false\n", &env);
    let s = d.wait_for("the declaration refused", Duration::from_secs(60), |s| {
        s["streams"]["error"].is_string()
    });
    let e = s["streams"]["error"].as_str().unwrap();
    assert!(
        e.contains(names[0].as_str()) && e.contains("inequivalent") && e.contains("policy"),
        "{e}"
    );
    d.stop();
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for q in &names {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
    });
    let _ = std::fs::remove_dir_all(dir);
}

/// With `[streams]` on, every gallery sample (purpose gallery or both, not train) is appended
/// to the gallery log in arrival order with its stored bytes and labels, a forget becomes a
/// tombstone covering the person's samples, and a restart appends nothing twice (the cursor
/// and the tombstone queue live in the state folder).
#[test]
fn gallery_samples_and_forgets_are_appended_to_the_gallery_log() {
    use plip_actors::daemon::logs::GalleryEntry;
    let _serial = serial();
    let dir = tempdir("gallery-log");
    let suffix = tag();
    let (models, gallery, manifest) = (
        format!("plip.models.log.{suffix}"),
        format!("plip.gallery.log.{suffix}"),
        format!("plip.logs.manifest.{suffix}"),
    );
    let env = [
        ("PLIP__SERVING__POLL_MS", "200".to_string()),
        ("PLIP__STREAMS__ENABLED", "true".to_string()),
        ("PLIP__STREAMS__MODELS_LOG", models.clone()),
        ("PLIP__STREAMS__GALLERY_LOG", gallery.clone()),
        ("PLIP__STREAMS__MANIFEST_LOG", manifest.clone()),
    ];
    let mut d = Daemon::start(&dir, "enabled = false\n", &env);
    let t = d.topo.clone();
    let all = images(6, 6, 93);
    let (g, rest) = all.split_at(12);
    let (tr, both) = rest.split_at(12);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for (chunk, purpose) in [(g, "gallery"), (tr, "train"), (both, "both")] {
            publish(
                &ch,
                &t.ingest_exchange,
                &batch_json_purpose(chunk, purpose),
                json_props(),
            )
            .await;
        }
    });
    let s = d.wait_for("the gallery logged", Duration::from_secs(60), |s| {
        s["samples"]["total"] == 36 && s["streams"]["gallery_logged_seq"].as_u64() >= Some(36)
    });
    assert!(s["streams"]["error"].is_null(), "{s:#}");
    // Forget the person of the first gallery image.
    let person = &g[0].1;
    let forgot =
        plip_actors::base::client::request(&d.http, "POST", &format!("/forget?person={person}"))
            .unwrap();
    assert!(forgot.is_ok(), "{forgot:?}");
    d.wait_for("the tombstone logged", Duration::from_secs(30), |_| {
        d_log_has(&dir, "forget_logged")
    });
    let read = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let (_c, ch) = channel().await;
            read_gallery_log(&ch, &gallery, Duration::from_secs(3)).await
        })
    };
    let entries = read(&rt);
    let adds: Vec<LoggedAdd<'_>> = entries
        .iter()
        .filter_map(|e| match e {
            GalleryEntry::Add {
                seq,
                id,
                person,
                camera,
                image,
                snapshot: None,
            } => Some((
                *seq,
                id.as_str(),
                person.as_deref(),
                camera.as_deref(),
                image.as_slice(),
            )),
            // No snapshot is due in this test (a day, or a quarter of 4 GiB).
            other => {
                assert!(
                    matches!(other, GalleryEntry::Forget { .. }),
                    "unexpected {other:?}"
                );
                None
            }
        })
        .collect();
    // Gallery and both, never train; in arrival order; the producer's bytes (64×128 JPEGs are
    // stored as sent) and labels.
    let expected: Vec<&(String, String, String, Vec<u8>)> = g.iter().chain(both).collect();
    let ids: Vec<&str> = adds.iter().map(|a| a.1).collect();
    assert_eq!(adds.len(), expected.len(), "{ids:?}");
    assert!(adds.windows(2).all(|w| w[0].0 < w[1].0));
    let by_id: std::collections::HashMap<&str, _> =
        expected.iter().map(|x| (x.0.as_str(), *x)).collect();
    for (_, id, p, c, image) in &adds {
        let x = by_id
            .get(id)
            .unwrap_or_else(|| panic!("{id} is not a gallery sample"));
        assert_eq!((*p, *c), (Some(x.1.as_str()), Some(x.2.as_str())));
        assert!(*image == x.3.as_slice(), "{id}: bytes differ");
    }
    let forgets: Vec<_> = entries
        .iter()
        .filter_map(|e| match e {
            GalleryEntry::Forget {
                person,
                ids,
                before_seq,
            } => Some((person.clone(), ids.clone(), *before_seq)),
            _ => None,
        })
        .collect();
    assert_eq!(forgets.len(), 1, "{forgets:?}");
    assert_eq!(&forgets[0].0, person);
    // The tombstone names exactly the person's samples.
    let mut named = forgets[0].1.clone();
    named.sort();
    let mut theirs: Vec<String> = adds
        .iter()
        .filter(|a| a.2 == Some(person.as_str()))
        .map(|a| a.1.to_string())
        .collect();
    theirs.sort();
    assert_eq!(named, theirs);
    let last_of_person = adds
        .iter()
        .filter(|a| a.2 == Some(person.as_str()))
        .map(|a| a.0)
        .max()
        .unwrap();
    assert_eq!(forgets[0].2, last_of_person, "{forgets:?}");
    // A restart appends nothing again.
    d.stop();
    d.spawn();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(read(&rt).len(), entries.len());
    d.stop();
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for q in [&models, &gallery, &manifest] {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
    });
    let _ = std::fs::remove_dir_all(dir);
}

/// A gallery-log addition: (arrival, id, person, camera, image bytes).
type LoggedAdd<'a> = (u64, &'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

/// True once the daemon's log in `dir` holds the event `name`.
fn d_log_has(dir: &Path, name: &str) -> bool {
    std::fs::read_to_string(dir.join("plipd.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|e| e["message"] == name)
}
