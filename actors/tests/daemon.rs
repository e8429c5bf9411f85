//! `plipd run` end to end against the real RabbitMQ on 127.0.0.1:5672 (`PLIP_AMQP_URL`
//! overrides): the daemon binary runs as a child process on a temporary state folder, with
//! exchange and queue names unique to each test.

mod common;

use common::*;

/// Good images are stored exactly once (re-publishing stores nothing new); every bad kind of
/// message is dead-lettered with its code; a batch with bad images keeps its good ones and
/// answers the producer; the daemon keeps consuming throughout.
#[test]
fn ingest_stores_once_and_dead_letters_every_bad_kind() {
    let _serial = serial();
    let dir = tempdir("ingest");
    let mut d = Daemon::start(&dir, NO_TRAINING, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let good = images(20, 10, 1);
    assert_eq!(good.len(), 200);
    let t = d.topo.clone();
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for chunk in good.chunks(20) {
            publish(&ch, &t.ingest_exchange, &batch_json(chunk), json_props()).await;
        }
        let png = &good[0].3;
        let img = |id: &str, bytes: &[u8]| serde_json::json!({"id": id, "image": b64(bytes)});
        let bad: Vec<(&str, Vec<u8>, BasicProperties)> = vec![
            ("malformed_body", b"{not json".to_vec(), json_props()),
            (
                "malformed_body",
                vec![0xc1, 0xc1, 0xc1],
                BasicProperties::default().with_content_type("application/msgpack".into()),
            ),
            (
                "unsupported_content_type",
                b"hello".to_vec(),
                BasicProperties::default().with_content_type("text/plain".into()),
            ),
            (
                "schema_violation",
                serde_json::json!({"images": [{"image": b64(png)}]}).to_string().into_bytes(),
                json_props(),
            ),
            (
                "schema_violation",
                serde_json::json!({"images": [{"id": "a1", "image": b64(png), "attributes": {"upper": {"colour": "teal"}}}]})
                    .to_string()
                    .into_bytes(),
                json_props(),
            ),
            (
                "invalid_id",
                serde_json::json!({"images": [img("bad id!", png)]}).to_string().into_bytes(),
                json_props(),
            ),
            (
                "invalid_id",
                serde_json::json!({"images": [img(&"x".repeat(200), png)]}).to_string().into_bytes(),
                json_props(),
            ),
            (
                "too_many_images",
                serde_json::json!({"images": (0..41).map(|i| img(&format!("m{i}"), png)).collect::<Vec<_>>()})
                    .to_string()
                    .into_bytes(),
                json_props(),
            ),
            (
                "invalid_base64",
                serde_json::json!({"images": [{"id": "b1", "image": "@@@not base64@@@"}]}).to_string().into_bytes(),
                json_props(),
            ),
            (
                "image_undecodable",
                serde_json::json!({"images": [img("u1", &png[..png.len() / 3])]}).to_string().into_bytes(),
                json_props(),
            ),
            (
                "image_too_many_pixels",
                serde_json::json!({"images": [img("p1", &png_declaring(100_000, 100_000))]}).to_string().into_bytes(),
                json_props(),
            ),
            (
                "image_zero_size",
                serde_json::json!({"images": [img("z1", &png_declaring(0, 16))]}).to_string().into_bytes(),
                json_props(),
            ),
            ("message_too_large", vec![b' '; 2_100_000], json_props()),
            (
                "invalid_caption",
                serde_json::json!({"images": [{"id": "c1", "image": b64(png), "captions": ["y".repeat(400)]}]})
                    .to_string()
                    .into_bytes(),
                json_props(),
            ),
            (
                "invalid_caption",
                // MessagePack: a caption that is binary, not UTF-8 text.
                rmp_serde::to_vec_named(&IngestBatch {
                    v: None,
                    batch_id: None,
                    images: vec![IngestImage {
                        id: "c2".into(),
                        person_id: None,
                        camera_id: None,
                        captions: Some(vec![CaptionField::Bytes(vec![0xff, 0xfe, 0x80])]),
                        attributes: None,
                        purpose: None,
                        image: ImageField::Bytes(png.clone()),
                    }],
                })
                .unwrap(),
                BasicProperties::default().with_content_type("application/msgpack".into()),
            ),
            (
                "invalid_id",
                png.clone(),
                BasicProperties::default().with_content_type("image/jpeg".into()),
            ),
        ];
        for (_, body, props) in &bad {
            publish(&ch, &t.ingest_exchange, body, props.clone()).await;
        }
        // A batch with good and bad images, asking for the outcome.
        let reply_q = exclusive_queue(&ch).await;
        let mixed = serde_json::json!({"batch_id": "mixed-1", "images": [
            img("mixed-good", png),
            img("mixed-bad", b"GIF89a not really"),
        ]});
        publish(
            &ch,
            &t.ingest_exchange,
            mixed.to_string().as_bytes(),
            json_props()
                .with_reply_to(reply_q.name().clone())
                .with_correlation_id("corr-7".into()),
        )
        .await;
        let expected_deliveries = 10 + bad.len() as u64 + 1;
        let s = d.wait_for("every delivery", Duration::from_secs(90), |s| {
            s["ingest"]["deliveries"].as_u64() == Some(expected_deliveries)
        });
        let mut got = dead_codes(&ch, &t.dead_queue).await;
        got.sort();
        assert_eq!(s["ingest"]["stored"], 201, "{s:#} {got:?}");
        assert_eq!(s["samples"]["total"], 201);
        assert_eq!(s["ingest"]["consuming"], true);
        // The producer's answer.
        let reply = loop {
            if let Some(m) = ch
                .basic_get(reply_q.name().clone(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                break m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            reply.delivery.properties.correlation_id().as_ref().map(|c| c.as_str()),
            Some("corr-7")
        );
        let outcome: serde_json::Value = serde_json::from_slice(&reply.delivery.data).unwrap();
        assert_eq!(outcome["batch_id"], "mixed-1");
        assert_eq!(outcome["accepted"], serde_json::json!(["mixed-good"]));
        assert_eq!(outcome["rejected"][0]["id"], "mixed-bad");
        assert_eq!(outcome["rejected"][0]["code"], "image_unsupported_format");
        // Every bad message (and the mixed batch) is in the dead-letter queue with its code.
        let mut want: Vec<String> = bad.iter().map(|(c, _, _)| c.to_string()).collect();
        want.push("image_unsupported_format".into());
        want.sort();
        assert_eq!(got, want);
        // Re-publishing the same ids stores nothing new.
        for chunk in good.chunks(20) {
            publish(&ch, &t.ingest_exchange, &batch_json(chunk), json_props()).await;
        }
        let s = d.wait_for("the re-sent batches", Duration::from_secs(60), |s| {
            s["ingest"]["deliveries"].as_u64() == Some(expected_deliveries + 10)
        });
        assert_eq!(s["ingest"]["stored"], 201);
        assert_eq!(s["ingest"]["duplicates"], 200);
        assert_eq!(s["samples"]["total"], 201);
        // Samples arrived without captions: they were captioned as they were stored.
        d.wait_for("captions", Duration::from_secs(60), |s| {
            s["samples"]["uncaptioned"] == 0
        });
    });
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

fn trainer_toml(every: u64) -> String {
    format!(
        "preset = \"test\"\nbatch = 16\nimages_per_id = 4\nmin_samples = 32\nwarmup_steps = 5\ncheckpoint_every_steps = {every}\ncheckpoint_every_s = 0\nkeep_checkpoints = 3\nthreads = 1\nidle_after_s = 0\n"
    )
}

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

/// The broker drops every connection mid-stream (`rabbitmqctl close_all_connections`): the
/// daemon reconnects, and every id published is stored exactly once.
#[test]
fn survives_closed_connections_without_losing_samples() {
    let _serial = serial();
    let ctl = Command::new("rabbitmqctl").arg("status").output();
    assert!(
        ctl.map(|o| o.status.success()).unwrap_or(false),
        "rabbitmqctl must work for this test (run it where the broker runs)"
    );
    let dir = tempdir("reconnect");
    let mut d = Daemon::start(&dir, NO_TRAINING, &[]);
    let good = images(30, 10, 3);
    let t = d.topo.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut conn = channel().await;
        for (k, chunk) in good.chunks(10).enumerate() {
            if k == 10 || k == 20 {
                let out = Command::new("rabbitmqctl")
                    .args(["close_all_connections", "test: broker drops connections"])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
            }
            // Publish with retry: the test's own connection is dropped too.
            loop {
                let r = async {
                    conn.1
                        .basic_publish(
                            t.ingest_exchange.as_str().into(),
                            "".into(),
                            BasicPublishOptions::default(),
                            &batch_json(chunk),
                            json_props().with_delivery_mode(2),
                        )
                        .await?
                        .await
                }
                .await;
                match r {
                    Ok(c) if c.is_ack() => break,
                    _ => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        conn = channel().await;
                    }
                }
            }
        }
    });
    let s = d.wait_for("every sample", Duration::from_secs(120), |s| {
        s["samples"]["total"].as_u64() == Some(300)
    });
    assert!(s["ingest"]["connections"].as_u64() >= Some(2), "{s:#}");
    assert_eq!(s["ingest"]["stored"], 300);
    assert_eq!(s["ingest"]["consuming"], true);
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM while a backlog is being ingested: the daemon exits 0 well within the unit's stop
/// timeout, the deliveries it had not acknowledged go back to the queue, and a restart stores
/// every image exactly once — nothing acknowledged is lost, nothing stored twice.
#[test]
fn sigterm_mid_ingest_loses_nothing() {
    let _serial = serial();
    let dir = tempdir("sigterm-ingest");
    let mut d = Daemon::start(&dir, NO_TRAINING, &[]);
    let good = images(100, 8, 11);
    let total = good.len() as u64;
    let t = d.topo.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    publish_backlog(&rt, &t.ingest_exchange, &good);
    let s = d.wait_for("ingest under way", Duration::from_secs(60), |s| {
        s["samples"]["total"].as_u64() >= Some(40)
    });
    let before = s["samples"]["total"].as_u64().unwrap();
    let t0 = Instant::now();
    d.stop();
    let stop_s = t0.elapsed().as_secs_f64();
    assert!(stop_s < 30.0, "stopping took {stop_s:.1} s");
    let left = rt.block_on(async {
        let (_c, ch) = channel().await;
        queue_depth(&ch, &t.ingest_queue).await
    });
    assert!(
        before < total && left > 0,
        "the signal must arrive mid-ingest (stored {before} of {total}, {left} messages left)"
    );
    // Every image is either stored (the count the daemon logs as it stops) or still in the
    // queue: 8 images per message.
    let stored = d
        .log_events("stopped")
        .last()
        .and_then(|e| e["samples"].as_u64())
        .expect("a stopped event with the sample count");
    assert!(stored >= before);
    assert!(
        stored + u64::from(left) * 8 >= total,
        "{stored} + {left}×8 < {total}"
    );
    d.spawn();
    let s = d.wait_for(
        "every sample after the restart",
        Duration::from_secs(120),
        |s| s["samples"]["total"].as_u64() == Some(total),
    );
    assert_eq!(s["ingest"]["dead_lettered"], serde_json::json!({}), "{s:#}");
    let left = rt.block_on(async {
        let (_c, ch) = channel().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        queue_depth(&ch, &t.ingest_queue).await
    });
    assert_eq!(left, 0);
    d.stop();
    assert_eq!(d.log_events("stopped").len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Publishes `images` in persistent messages of 8, all confirmed before returning, so the
/// daemon works through a backlog.
fn publish_backlog(
    rt: &tokio::runtime::Runtime,
    exchange: &str,
    images: &[(String, String, String, Vec<u8>)],
) {
    rt.block_on(async {
        let (_c, ch) = channel().await;
        let mut confirms = Vec::new();
        for chunk in images.chunks(8) {
            confirms.push(
                ch.basic_publish(
                    exchange.into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &batch_json(chunk),
                    json_props().with_delivery_mode(2),
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    });
}

/// kill -9 while a backlog is being stored (images in pack files, records in sled): after the
/// restart every image is stored exactly once, and offline every record's image reads back from
/// its pack and decodes (bytes a crash left without a record are reclaimed, never referenced).
#[test]
fn kill_9_mid_ingest_loses_nothing_and_every_image_reads_back() {
    let _serial = serial();
    let dir = tempdir("kill9-ingest");
    let mut d = Daemon::start(&dir, NO_TRAINING, &[]);
    let good = images(200, 8, 13);
    let total = good.len() as u64;
    let t = d.topo.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    publish_backlog(&rt, &t.ingest_exchange, &good);
    d.wait_for("ingest under way", Duration::from_secs(60), |s| {
        s["samples"]["total"].as_u64() >= Some(8)
    });
    let mut child = d.child.take().expect("running");
    child.kill().unwrap();
    child.wait().unwrap();
    d.spawn();
    let s = d.wait_for(
        "every sample after the restart",
        Duration::from_secs(120),
        |s| s["samples"]["total"].as_u64() == Some(total),
    );
    assert_eq!(s["ingest"]["dead_lettered"], serde_json::json!({}), "{s:#}");
    d.stop();
    let state = plip_actors::base::state::State::open(&dir.join("state")).unwrap();
    let store = state.samples(0).unwrap();
    let ids = store.ids_by_arrival();
    assert_eq!(ids.len() as u64, total);
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an id stored twice");
    for id in &ids {
        let sample = store.get(id).unwrap().expect("a record per arrival");
        assert!(sample.meta.image.is_some(), "{id}: not in a pack");
        plip_ingest::image::decode(&sample.jpeg, &Default::default())
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert!(!sample.meta.captions.is_empty(), "{id}: uncaptioned");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `openssl` in `dir`: a private CA and a `localhost` server certificate it signed.
fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl must be installed for this test");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=plip test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// Runs `rabbitmqctl` and asserts it worked.
fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must work for this test (run it where the broker runs)");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
}

/// Kills the TLS terminator and removes the vhost however the test ends.
struct TlsBroker {
    socat: Child,
    vhost: String,
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.socat.kill();
        let _ = self.socat.wait();
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.vhost])
            .output();
    }
}

/// An `amqps://` URL with a vhost and a private CA: a TLS terminator (`socat`, with a
/// certificate the test's own CA signed) in front of the real broker, a vhost of the test's
/// own. The daemon (`broker.tls_ca_file` from `PLIP__BROKER__TLS_CA_FILE`) and `plipd publish`
/// (the same variable) both connect and the images arrive; without the CA the certificate is
/// refused with a message saying so.
#[test]
fn amqps_with_a_private_ca_and_a_vhost() {
    let _serial = serial();
    let dir = tempdir("amqps");
    let (ca, cert, key) = private_ca(&dir);
    let vhost = format!("plip-{}", tag());
    rabbitmqctl(&["add_vhost", &vhost]);
    let port = free_port();
    let socat = Command::new("socat")
        .arg(format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
            cert.display(),
            key.display()
        ))
        .arg("TCP:127.0.0.1:5672")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("socat must be installed for this test");
    let _broker = TlsBroker {
        socat,
        vhost: vhost.clone(),
    };
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "socat did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let amqps = format!("amqps://guest:guest@localhost:{port}/{vhost}");
    let ca_s = ca.display().to_string();
    let mut d = Daemon::start(
        &dir,
        NO_TRAINING,
        &[
            ("PLIP__BROKER__URL", amqps.clone()),
            ("PLIP__BROKER__TLS_CA_FILE", ca_s.clone()),
        ],
    );
    let data = dir.join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_plipd"))
        .args([
            "synth",
            "--train-ids",
            "4",
            "--test-ids",
            "1",
            "--images-per-id",
            "3",
        ])
        .arg("--out")
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let publish = |ca: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_plipd"));
        c.args([
            "publish",
            "--url",
            &amqps,
            "--exchange",
            &d.topo.ingest_exchange,
        ])
        .args(["--split", "train", "--data"])
        .arg(&data)
        .env_remove("PLIP__BROKER__TLS_CA_FILE");
        if let Some(ca) = ca {
            c.env("PLIP__BROKER__TLS_CA_FILE", ca);
        }
        c.output().unwrap()
    };
    // Without the private CA the broker's certificate is refused, and the error says so.
    let out = publish(None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("certificate") || err.contains("issuer"),
        "{err}"
    );
    let out = publish(Some(&ca_s));
    assert!(out.status.success(), "{out:?}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["images_confirmed"], 12, "{summary:#}");
    let s = d.wait_for("the images sent over TLS", Duration::from_secs(60), |s| {
        s["samples"]["total"] == 12
    });
    assert_eq!(s["ingest"]["consuming"], true);
    // The topology lives in the test's vhost, not in the default one.
    let vhost_queues = Command::new("rabbitmqctl")
        .args(["list_queues", "-p", &vhost, "name"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&vhost_queues.stdout).contains(&d.topo.ingest_queue));
    d.stop();
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

/// While writes fail (an injected "No space left on device"), nothing is acknowledged and
/// consumption stops; once writes work again every message is stored, none lost.
#[test]
fn storage_failure_acks_nothing_unstored() {
    let _serial = serial();
    let dir = tempdir("diskfull");
    let fault = dir.join("disk-full");
    std::fs::write(&fault, b"").unwrap();
    let mut d = Daemon::start(
        &dir,
        NO_TRAINING,
        &[(
            plip_actors::base::store::FAULT_FILE_ENV,
            fault.display().to_string(),
        )],
    );
    let good = images(6, 10, 4);
    let t = d.topo.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for chunk in good.chunks(10) {
            publish(&ch, &t.ingest_exchange, &batch_json(chunk), json_props()).await;
        }
    });
    // A failed write is sticky in sled: the daemon exits with EX_TEMPFAIL for its service
    // manager to restart it, acknowledging nothing it did not store.
    let code = d.wait_exit(Duration::from_secs(60));
    assert_eq!(
        code,
        Some(plip_actors::daemon::EXIT_STORAGE_FAILED),
        "log:\n{}",
        d.log_text()
    );
    assert!(!d.log_events("storage_failed").is_empty());
    assert!(!d.log_events("exiting_after_storage_failure").is_empty());
    let waiting = rt.block_on(async {
        let (_c, ch) = channel().await;
        queue_depth(&ch, &t.ingest_queue).await
    });
    assert_eq!(waiting, 6, "every message waits in the broker");
    // Restarted with the fault gone (as systemd's Restart=on-failure would): everything is
    // stored, once.
    std::fs::remove_file(&fault).unwrap();
    d.spawn();
    let s = d.wait_for("recovery", Duration::from_secs(60), |s| {
        s["samples"]["total"].as_u64() == Some(60)
    });
    assert!(s["ingest"]["storage_error"].is_null());
    d.wait_for("the queue to drain", Duration::from_secs(30), |s| {
        s["ingest"]["deliveries"].as_u64() == Some(6)
    });
    let s = d.status().unwrap();
    assert_eq!(s["ingest"]["stored"], 60);
    assert_eq!(s["ingest"]["duplicates"], 0);
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Below the free-space reserve the daemon does not consume (the messages wait in the broker),
/// says why on /readyz, answers /status and /metrics at once and stops on SIGTERM; when space
/// returns it consumes again and stores everything once.
#[test]
fn below_the_disk_reserve_ingest_waits_and_the_daemon_stays_manageable() {
    let _serial = serial();
    let dir = tempdir("reserve");
    let free = dir.join("free-bytes");
    std::fs::write(&free, b"0").unwrap();
    let env = [(
        plip_actors::base::disk::FAULT_FREE_BYTES_ENV,
        free.display().to_string(),
    )];
    let mut d = Daemon::configure(&dir, NO_TRAINING, &env, &Extra::default());
    d.spawn_only();
    let s = d.wait_for("the pause", Duration::from_secs(30), |s| {
        s["ingest"]["storage_error"]
            .as_str()
            .is_some_and(|e| e.contains("disk space low"))
    });
    assert_eq!(s["ingest"]["consuming"], false);
    let good = images(6, 10, 5);
    let t = d.topo.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_c, ch) = channel().await;
        for chunk in good.chunks(10) {
            publish(&ch, &t.ingest_exchange, &batch_json(chunk), json_props()).await;
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let r = plip_actors::base::client::request(&d.http, "GET", "/readyz").unwrap();
    assert!(
        r.as_ref()
            .is_err_and(|e| e.contains("503") && e.contains("state.min_free_bytes")),
        "{r:?}"
    );
    let s = d.status().unwrap();
    let m = plip_actors::base::client::request(&d.http, "GET", "/metrics")
        .unwrap()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(String::from_utf8_lossy(&m).contains("plip_storage_failing 1"));
    assert_eq!(s["samples"]["total"], 0);
    assert_eq!(s["storage"]["responding"], true);
    let waiting = rt.block_on(async {
        let (_c, ch) = channel().await;
        queue_depth(&ch, &t.ingest_queue).await
    });
    assert_eq!(waiting, 6);
    // SIGTERM while paused: a prompt, clean exit; the restart pauses again.
    let t0 = Instant::now();
    d.stop();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    d.spawn_only();
    d.wait_for("the pause after a restart", Duration::from_secs(30), |s| {
        s["ingest"]["storage_error"]
            .as_str()
            .is_some_and(|e| e.contains("disk space low"))
    });
    // Space returns.
    std::fs::write(&free, (1u64 << 40).to_string()).unwrap();
    let s = d.wait_for("everything stored", Duration::from_secs(60), |s| {
        s["samples"]["total"].as_u64() == Some(60)
    });
    assert!(s["ingest"]["storage_error"].is_null(), "{s:#}");
    assert_eq!(s["ingest"]["duplicates"], 0);
    assert!(!d.log_events("storage_recovered").is_empty());
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Storage that stops answering (a stuck disk): /status and /metrics answer at once from the
/// last figures, marked stale, /readyz says 503 with the reason, SIGTERM still ends the
/// process; a write that does not return within `state.stall_timeout_s` stops the daemon with
/// status 75, and after the restart the delivery is stored.
#[test]
fn stuck_storage_never_blocks_the_endpoints_or_sigterm() {
    let _serial = serial();
    let dir = tempdir("stuck");
    let stall = dir.join("stall");
    let env = [(
        plip_actors::base::store::FAULT_STALL_FILE_ENV,
        stall.display().to_string(),
    )];
    let extra = Extra {
        stall_timeout_s: Some(5),
        ..Extra::default()
    };
    let mut d = Daemon::configure(&dir, NO_TRAINING, &env, &extra);
    d.spawn();
    assert_eq!(d.status().unwrap()["storage"]["responding"], true);
    std::fs::write(&stall, b"").unwrap();
    let t0 = Instant::now();
    let s = d.status().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert_eq!(s["storage"]["responding"], false, "{s:#}");
    assert!(s["storage"]["stale"]
        .as_str()
        .unwrap()
        .contains("did not answer"));
    // The read is still stuck: the next requests answer at once, without a second read.
    let t1 = Instant::now();
    let s = d.status().unwrap();
    let m = plip_actors::base::client::request(&d.http, "GET", "/metrics")
        .unwrap()
        .unwrap();
    let r = plip_actors::base::client::request(&d.http, "GET", "/readyz").unwrap();
    assert!(t1.elapsed() < Duration::from_secs(1), "{:?}", t1.elapsed());
    assert!(s["storage"]["stale"]
        .as_str()
        .unwrap()
        .contains("has not answered"));
    assert!(String::from_utf8_lossy(&m).contains("plip_storage_responding 0"));
    assert!(
        r.as_ref()
            .is_err_and(|e| e.contains("503") && e.contains("has not answered")),
        "{r:?}"
    );
    // SIGTERM while a storage read hangs: a prompt exit.
    let t2 = Instant::now();
    d.stop();
    assert!(t2.elapsed() < Duration::from_secs(10), "{:?}", t2.elapsed());
    // A write that hangs: exit 75 after the stall limit, nothing acked.
    d.spawn();
    let t = d.topo.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let good = images(2, 5, 6);
    rt.block_on(async {
        let (_c, ch) = channel().await;
        publish(&ch, &t.ingest_exchange, &batch_json(&good), json_props()).await;
    });
    let code = d.wait_exit(Duration::from_secs(60));
    assert_eq!(
        code,
        Some(plip_actors::daemon::EXIT_STORAGE_FAILED),
        "log:\n{}",
        d.log_text()
    );
    assert!(d.log_events("storage_failed").iter().any(|e| e["error"]
        .as_str()
        .is_some_and(|m| m.contains("has not returned"))));
    std::fs::remove_file(&stall).unwrap();
    d.spawn();
    d.wait_for(
        "the delivery stored after the restart",
        Duration::from_secs(60),
        |s| s["samples"]["total"].as_u64() == Some(10),
    );
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `plipd publish` (a producer) feeds a `plipd synth` data set to the daemon with publisher
/// confirms; the daemon captions the samples that came without captions.
#[test]
fn publish_cli_feeds_the_daemon() {
    let _serial = serial();
    let dir = tempdir("publish");
    let data = dir.join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_plipd"))
        .args([
            "synth",
            "--train-ids",
            "6",
            "--test-ids",
            "2",
            "--images-per-id",
            "5",
            "--out",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut d = Daemon::start(&dir, NO_TRAINING, &[]);
    let exchange = d.topo.ingest_exchange.clone();
    let publish = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_plipd"))
            .args([
                "publish",
                "--url",
                &url(),
                "--exchange",
                &exchange,
                "--batch",
                "8",
                "--data",
            ])
            .arg(&data)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let summary = publish(&["--split", "train", "--format", "msgpack", "--no-captions"]);
    assert_eq!(summary["images"], 30, "{summary:#}");
    assert_eq!(summary["images_confirmed"], 30);
    assert_eq!(summary["messages"], 4);
    let s = d.wait_for("30 samples captioned", Duration::from_secs(60), |s| {
        s["samples"]["total"] == 30 && s["samples"]["uncaptioned"] == 0
    });
    assert_eq!(s["samples"]["by_purpose"]["train"], 30);
    // The rest of the split goes to the gallery, captions included.
    let summary = publish(&["--split", "gallery"]);
    let gallery = summary["images"].as_u64().unwrap();
    assert!(gallery > 0);
    d.wait_for("the gallery samples", Duration::from_secs(60), |s| {
        s["samples"]["by_purpose"]["gallery"].as_u64() == Some(gallery)
    });
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

fn batch_json_purpose(imgs: &[(String, String, String, Vec<u8>)], purpose: &str) -> Vec<u8> {
    let list: Vec<serde_json::Value> = imgs
        .iter()
        .map(|(id, p, c, jpeg)| serde_json::json!({"id": id, "person_id": p, "camera_id": c, "image": b64(jpeg), "purpose": purpose}))
        .collect();
    serde_json::json!({ "images": list })
        .to_string()
        .into_bytes()
}

/// Sends one request and waits for its answer on an exclusive reply queue.
async fn ask(
    ch: &Channel,
    exchange: &str,
    body: &[u8],
    props: BasicProperties,
) -> serde_json::Value {
    let q = exclusive_queue(ch).await;
    let corr = tag();
    publish(
        ch,
        exchange,
        body,
        props
            .with_reply_to(q.name().clone())
            .with_correlation_id(corr.as_str().into()),
    )
    .await;
    let t = Instant::now();
    loop {
        if let Some(m) = ch
            .basic_get(q.name().clone(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
            assert_eq!(v["request_id"], corr.as_str());
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no answer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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

type Img = (String, String, String, Vec<u8>);

/// Asks every image as a cross-camera query (`exclude_camera` = its own camera); returns the
/// Rank-1 over the queries and every reply.
async fn rank1(ch: &Channel, exchange: &str, queries: &[Img]) -> (f64, Vec<serde_json::Value>) {
    let mut hits = 0;
    let mut replies = Vec::new();
    for (_, person, cam, jpeg) in queries {
        let body =
            serde_json::json!({"query": {"image": b64(jpeg)}, "top_k": 10, "exclude_camera": cam});
        let r = ask(ch, exchange, body.to_string().as_bytes(), json_props()).await;
        assert!(r["error"].is_null(), "{r:#}");
        if r["matches"][0]["person_id"] == person.as_str() {
            hits += 1;
        }
        replies.push(r);
    }
    (hits as f64 / queries.len() as f64, replies)
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

/// `plipd bench ingest` end to end on a small backlog against the real broker: the daemon
/// stores every image, and the JSON line carries the daemon's rate, both peers' rates (the
/// bare consume + ack loop and decode-only), the ratios, the fsync latency and the peak RSS.
#[test]
fn bench_ingest_reports_the_daemon_and_its_peers() {
    let _serial = serial();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plipd"))
        .args([
            "bench",
            "ingest",
            "--images",
            "96",
            "--batch",
            "16",
            "--url",
            &url(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let j: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap()).unwrap();
    assert_eq!(j["images"], 96);
    assert_eq!(j["messages"], 6);
    for key in [
        "daemon_images_per_s",
        "peer_images_per_s",
        "decode_only_images_per_s",
        "decode_only_1_thread_images_per_s",
        "ratio",
        "ratio_to_decode_only",
        "fsync_4k_median_us",
        "daemon_peak_rss_mib",
    ] {
        let v = j[key].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{key}: {j}");
    }
    // CPU per image (ticks of 10 ms: a 96-image drain may round to zero).
    for key in ["daemon_cpu_us_per_image", "decode_only_cpu_us_per_image"] {
        let v = j[key].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v >= 0.0, "{key}: {j}");
    }
    // Intake captions what it stores: nothing waits for a caption worker.
    assert_eq!(j["captioned_when_drained"], 96, "{j}");
    // Decoding without storing is faster than decoding and storing.
    assert!(
        j["decode_only_images_per_s"].as_f64() > j["daemon_images_per_s"].as_f64(),
        "{j}"
    );
}
