//! `plipd run`'s continuous trainer against the real broker: checkpoints, exact resume.
//!
//! The daemon binary runs as a child process on a temporary state folder, with exchange and
//! queue names unique to each test, against the real RabbitMQ on 127.0.0.1:5672
//! (`PLIP_AMQP_URL` overrides). Shared helpers: `common/`.

mod common;

use common::*;

/// The trainer steps and checkpoints; after a restart its weights and optimiser state equal
/// the checkpoint's and the step count continues from it.
#[test]
fn trainer_checkpoints_and_resumes_exactly() {
    let _serial = serial();
    let dir = tempdir("trainer");
    let mut d = Daemon::start(&dir, &trainer_toml(10), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = d.topo.clone();
    let published = images(16, 6, 2);
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for chunk in published.chunks(16) {
            publish(&ch, &t.ingest_exchange, &batch_json(chunk), json_props()).await;
        }
    });
    let s = d.wait_for("two checkpoints", Duration::from_secs(120), |s| {
        s["trainer"]["checkpoints_written"].as_u64() >= Some(2)
    });
    // Only training samples: a model serves, but the gallery is empty.
    d.wait_for("a serving version", Duration::from_secs(60), |s| {
        s["serving"]["version"].is_u64()
    });
    let r = rt.block_on(async {
        let (_c, ch) = channel().await;
        let q = serde_json::json!({"query": {"text": "a person"}});
        ask(
            &ch,
            &t.reid_exchange,
            q.to_string().as_bytes(),
            json_props(),
        )
        .await
    });
    assert_eq!(r["error"]["code"], "empty_gallery", "{r:#}");
    assert!(s["trainer"]["loss"].as_f64().unwrap().is_finite());
    d.stop();
    // The state folder, read directly once the daemon is gone.
    let (version, step, wd, od) = {
        let state = plip_actors::base::state::State::open(&dir.join("state")).unwrap();
        let ck = state.latest_valid(|_| {}).unwrap().unwrap();
        let tk = state.tokenizer().unwrap().unwrap();
        // The checkpoint's own dimensions: `test` with the attribute head the default tasks add.
        let preset = plip_model::weights::read_meta(&ck.weights).unwrap().preset;
        assert_eq!(preset.name, "test");
        assert_eq!(
            preset.attribute_fields,
            plip_ingest::attributes::ATTRIBUTE_FIELDS
        );
        let mut model = plip_model::Plip::<f32, plip_model::dfdx::prelude::Cpu>::new(
            &Default::default(),
            &preset,
            0,
        )
        .unwrap();
        plip_model::weights::load_weights(&mut model, &ck.weights, tk.fingerprint()).unwrap();
        let mut trainer = plip_model::Trainer::new(model, Default::default());
        plip_model::weights::load_optimizer(
            &mut trainer.opt,
            &ck.optimizer,
            &preset,
            tk.fingerprint(),
        )
        .unwrap();
        let (wd, od) = plip_actors::base::state::training_digest(&trainer.model, &trainer.opt);
        (ck.meta.version, ck.meta.step, wd, od)
    };
    assert!(step >= 20, "latest checkpoint at step {step}");
    d.spawn();
    let s = d.wait_for("the resumed trainer", Duration::from_secs(60), |s| {
        s["trainer"]["resumed_from"].as_u64() == Some(version)
            && s["trainer"]["step"].as_u64() > Some(step)
    });
    assert_eq!(s["trainer"]["resumed_digest"][0], wd.as_str());
    assert_eq!(s["trainer"]["resumed_digest"][1], od.as_str());
    // The trainable count is reported after a resume, with no new sample arriving.
    assert!(
        s["trainer"]["trainable_samples"].as_u64() > Some(0),
        "{s:#}"
    );
    // Forgetting a person zeroes their identity-classifier row in the running trainer.
    let path = format!("/forget?person={}", published[0].1);
    let r = plip_actors::base::client::request(&d.http, "POST", &path)
        .unwrap()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&r).unwrap();
    assert!(r["samples_removed"].as_u64() > Some(0), "{r}");
    d.wait_for(
        "the classifier row forgotten",
        Duration::from_secs(60),
        |s| s["trainer"]["forgotten_rows"] == 1,
    );
    d.stop();
    assert_eq!(d.log_events("classifier_row_forgotten").len(), 1);
    // The JSON log names the resumed checkpoint with the same digests.
    let resumed = d.log_events("resumed");
    assert!(
        resumed
            .iter()
            .any(|e| e["version"] == version && e["weights_sha256"] == wd.as_str()),
        "{resumed:?}"
    );
    // With no daemon running, `plipd checkpoints` reads the state folder itself.
    let out = Command::new(env!("CARGO_BIN_EXE_plipd"))
        .args(["checkpoints", "--http", "127.0.0.1:1", "--state"])
        .arg(dir.join("state"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The newest `keep_checkpoints` (3), plus the serving version, which retention keeps.
    let cks = list["checkpoints"].as_array().unwrap();
    let unprotected = cks
        .iter()
        .filter(|c| c["serving"] != true && c["pinned"] != true)
        .count();
    assert!(
        (1..=3).contains(&unprotected),
        "keep_checkpoints = 3: {list:#}"
    );
    if let Some(v) = list["serving"].as_u64() {
        assert!(
            cks.iter().any(|c| c["version"] == v),
            "the serving version was pruned"
        );
    }
    assert!(list["latest"].as_u64() > Some(version));
    // A trainer that cannot start (the state holds `test` checkpoints, the configuration asks
    // for `tiny`) fails, is restarted with backoff by the supervisor, and ingest goes on.
    d.env.push(("PLIP__TRAINER__PRESET".into(), "tiny".into()));
    d.spawn();
    let s = d.wait_for("trainer restarts", Duration::from_secs(60), |s| {
        s["restarts"]["trainer"].as_u64() >= Some(2)
    });
    assert_eq!(s["trainer"]["state"], "failed", "{s:#}");
    assert!(s["trainer"]["error"]
        .as_str()
        .unwrap()
        .contains("preset \"test\""));
    assert_eq!(s["ingest"]["consuming"], true);
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
