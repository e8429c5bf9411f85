//! `plipd run` ingest end to end against the real broker: storing once, dead-lettering every bad kind, closed connections, SIGTERM and kill -9 mid-ingest, the publish command, the ingest benchmark.
//!
//! The daemon binary runs as a child process on a temporary state folder, with exchange and
//! queue names unique to each test, against the real RabbitMQ on 127.0.0.1:5672
//! (`PLIP_AMQP_URL` overrides). Shared helpers: `common/`.

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
    assert!(d.alive());
    d.kill();
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

/// `plipd bench ingest` end to end on a small backlog against the real broker: the daemon
/// stores every image, and the JSON line carries the daemon's rate, its peers' (the bare
/// consume + ack loop, decode-only, consume + decode; the store alone's CPU), the ratios, the
/// CPU per image (the broker's where it is local), the fsync latency and the peak RSS.
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
        "consume_decode_images_per_s",
        "consume_decode_ratio_to_decode_only",
        "ratio_to_consume_decode",
        "store_only_cpu_us_per_image",
        "fsync_4k_median_us",
        "daemon_peak_rss_mib",
    ] {
        let v = j[key].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "{key}: {j}");
    }
    // CPU per image (ticks of 10 ms: a 96-image drain may round to zero).
    for key in [
        "daemon_cpu_us_per_image",
        "decode_only_cpu_us_per_image",
        "consume_decode_cpu_us_per_image",
        "peer_cpu_us_per_image",
    ] {
        let v = j[key].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v >= 0.0, "{key}: {j}");
    }
    // The broker's CPU is read where it runs on this machine (the tests' broker does).
    for key in [
        "broker_cpu_us_per_image",
        "consume_decode_broker_cpu_us_per_image",
        "peer_broker_cpu_us_per_image",
    ] {
        assert!(
            j[key].is_null() || j[key].as_f64() >= Some(0.0),
            "{key}: {j}"
        );
    }
    // Intake captions what it stores: nothing waits for a caption worker.
    assert_eq!(j["captioned_when_drained"], 96, "{j}");
    // Decoding without storing is faster than decoding and storing, and taking the messages
    // from the broker costs something too.
    assert!(
        j["decode_only_images_per_s"].as_f64() > j["daemon_images_per_s"].as_f64(),
        "{j}"
    );
    assert!(
        j["consume_decode_images_per_s"].as_f64() > j["daemon_images_per_s"].as_f64(),
        "{j}"
    );
}
