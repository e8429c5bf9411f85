//! The poison suite: what a hostile or careless producer can send, against `plipd run` and the
//! real broker. Every case asserts that the daemon stays up, that the poison is dead-lettered
//! with its code, and that good messages published after it are stored.

mod common;

use common::*;

fn props(content_type: &str) -> BasicProperties {
    BasicProperties::default().with_content_type(ShortString::from(content_type))
}

fn single_image_props(id: &str) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert(
        "x-image-id".into(),
        AMQPValue::LongString(id.as_bytes().to_vec().into()),
    );
    props("image/jpeg").with_headers(h)
}

/// One poison case: what is published, and the code its dead-letter copy must carry.
struct Case {
    name: &'static str,
    code: &'static str,
    publish: Box<dyn Fn(&Daemon)>,
}

fn amqp_host_port() -> String {
    let u = std::env::var("PLIP_AMQP_URL").unwrap_or_default();
    if u.is_empty() {
        "127.0.0.1:5672".into()
    } else {
        let rest = u.split('@').nth(1).unwrap_or("127.0.0.1:5672");
        rest.split('/')
            .next()
            .unwrap_or("127.0.0.1:5672")
            .to_string()
    }
}

/// A table `{"a": {"a": …}}` nested as deep as the broker's frame allows, published with the
/// raw client (no library serializes one without recursing per level).
fn publish_deepest(exchange: &str, content_type: &str, body: &[u8]) -> usize {
    let depth = raw_amqp::deepest_for_frame(131_072, content_type.len());
    let table = raw_amqp::nested_table(depth);
    let frame = raw_amqp::publish(
        &amqp_host_port(),
        "guest",
        "guest",
        exchange,
        "",
        content_type,
        &table,
        body,
    )
    .unwrap_or_else(|e| panic!("publishing a table nested {depth} deep: {e}"));
    assert_eq!(
        frame, 131_072,
        "the suite assumes RabbitMQ's default frame size"
    );
    depth
}

#[test]
fn poison_messages_are_dead_lettered_and_the_queue_keeps_draining() {
    let _serial = serial();
    let dir = tempdir("poison");
    let mut d = Daemon::start(&dir, NO_TRAINING, &[]);
    let t = d.topo.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_conn, ch) = rt.block_on(channel());
    let jpeg = images(1, 1, 40).remove(0).3;
    let long_id = "A/".repeat(35_000);
    let pub_json = {
        let ch = ch.clone();
        let ex = t.ingest_exchange.clone();
        let handle = rt.handle().clone();
        move |body: Vec<u8>, p: BasicProperties| {
            handle.block_on(publish(&ch, &ex, &body, p));
        }
    };
    let pj = std::rc::Rc::new(pub_json);
    let b64j = b64(&jpeg);
    let mut cases: Vec<Case> = Vec::new();
    macro_rules! json_case {
        ($name:expr, $code:expr, $body:expr) => {{
            let pj = pj.clone();
            let body: Vec<u8> = $body;
            cases.push(Case {
                name: $name,
                code: $code,
                publish: Box::new(move |_| pj(body.clone(), json_props())),
            });
        }};
    }
    json_case!(
        "a 70 KB id",
        "invalid_id",
        serde_json::json!({"images": [{"id": long_id, "image": b64j}]})
            .to_string()
            .into_bytes()
    );
    json_case!(
        "a 70 KB unknown field name",
        "schema_violation",
        format!(r#"{{"images":[{{"id":"x1","image":"{b64j}","{long_id}":1}}]}}"#).into_bytes()
    );
    json_case!(
        "a 70 KB purpose",
        "schema_violation",
        serde_json::json!({"images": [{"id": "x2", "image": b64j, "purpose": long_id}]})
            .to_string()
            .into_bytes()
    );
    json_case!(
        "a 70 KB protocol version",
        "schema_violation",
        serde_json::json!({"v": long_id, "images": [{"id": "x3", "image": b64j}]})
            .to_string()
            .into_bytes()
    );
    json_case!(
        "an id holding a newline",
        "invalid_id",
        serde_json::json!({"images": [{"id": "evil\nid", "image": b64j}]})
            .to_string()
            .into_bytes()
    );
    json_case!(
        "30 refused images with 50 KB ids",
        "invalid_id",
        serde_json::json!({"images": (0..30)
            .map(|i| serde_json::json!({"id": format!("{}{i}", "B".repeat(50_000)), "image": b64j}))
            .collect::<Vec<_>>()})
        .to_string()
        .into_bytes()
    );
    // The existing malformed kinds.
    json_case!("not JSON", "malformed_body", b"{not json".to_vec());
    json_case!(
        "bad base64",
        "invalid_base64",
        br#"{"images":[{"id":"x4","image":"%%%"}]}"#.to_vec()
    );
    json_case!(
        "a truncated JPEG",
        "image_undecodable",
        serde_json::json!({"images": [{"id": "x5", "image": b64(&jpeg[..jpeg.len() / 2])}]})
            .to_string()
            .into_bytes()
    );
    json_case!(
        "a decompression bomb's header",
        "image_too_many_pixels",
        serde_json::json!({"images": [{"id": "x6", "image": b64(&png_declaring(100_000, 100_000))}]})
            .to_string()
            .into_bytes()
    );
    json_case!(
        "too many images",
        "too_many_images",
        serde_json::json!({"images": (0..41)
            .map(|i| serde_json::json!({"id": format!("m{i}"), "image": "AA=="}))
            .collect::<Vec<_>>()})
        .to_string()
        .into_bytes()
    );
    {
        let pj = pj.clone();
        cases.push(Case {
            name: "text/plain",
            code: "unsupported_content_type",
            publish: Box::new(move |_| pj(b"hello".to_vec(), props("text/plain"))),
        });
    }
    {
        let pj = pj.clone();
        let jpeg = jpeg.clone();
        let id = "C".repeat(50_000);
        cases.push(Case {
            name: "a 50 KB x-image-id header",
            code: "invalid_id",
            publish: Box::new(move |_| pj(jpeg.clone(), single_image_props(&id))),
        });
    }
    {
        let pj = pj.clone();
        let jpeg = jpeg.clone();
        let id = "D".repeat(100_000);
        cases.push(Case {
            name: "a 100 KB header table",
            code: "headers_too_large",
            publish: Box::new(move |_| pj(jpeg.clone(), single_image_props(&id))),
        });
    }
    {
        let body = serde_json::json!({"images": [{"id": "deep1", "image": b64j}]})
            .to_string()
            .into_bytes();
        let ex = t.ingest_exchange.clone();
        cases.push(Case {
            name: "headers nested as deep as a frame allows (ingest)",
            code: "header_too_deep",
            publish: Box::new(move |_| {
                let depth = publish_deepest(&ex, "application/json", &body);
                assert!(depth > 18_000, "{depth}");
            }),
        });
    }
    {
        let ex = t.reid_exchange.clone();
        cases.push(Case {
            name: "headers nested as deep as a frame allows (ReID requests)",
            code: "header_too_deep",
            publish: Box::new(move |_| {
                publish_deepest(&ex, "application/json", br#"{"text":"a man"}"#);
            }),
        });
    }

    let mut stored = 0u64;
    for (i, case) in cases.iter().enumerate() {
        (case.publish)(&d);
        // Good messages after the poison are stored.
        let good = images(2, 2, 100 + i as u64);
        rt.block_on(publish(
            &ch,
            &t.ingest_exchange,
            &batch_json(&good),
            json_props(),
        ));
        stored += good.len() as u64;
        d.wait_for(case.name, Duration::from_secs(60), |s| {
            s["samples"]["total"].as_u64() == Some(stored)
        });
        assert!(
            d.alive(),
            "{}: the daemon died; log:\n{}",
            case.name,
            d.log_text()
        );
        let dead = rt.block_on(async {
            let t0 = Instant::now();
            loop {
                let got = dead_letters(&ch, &t.dead_queue).await;
                if !got.is_empty() || t0.elapsed() > Duration::from_secs(20) {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        assert_eq!(dead.len(), 1, "{}: {dead:?}", case.name);
        let dl = &dead[0];
        assert_eq!(dl.code, case.code, "{}: {dl:?}", case.name);
        assert!(
            dl.message.len() <= 1024,
            "{}: {}",
            case.name,
            dl.message.len()
        );
        assert!(dl.header_bytes < 131_072 - 4096, "{}: {dl:?}", case.name);
        match case.name {
            "a 70 KB id" => assert!(dl.message.contains("(70000 bytes)"), "{dl:?}"),
            "30 refused images with 50 KB ids" => {
                assert!(dl.omitted.is_some_and(|n| n > 0), "{dl:?}")
            }
            "a 100 KB header table" => assert!(dl.headers_dropped, "{dl:?}"),
            n if n.starts_with("headers nested") => assert!(dl.headers_dropped, "{dl:?}"),
            _ => {}
        }
    }
    // The queue is empty and nothing was stored twice.
    let s = d.status().unwrap();
    assert_eq!(s["ingest"]["stored"].as_u64(), Some(stored));
    assert_eq!(s["ingest"]["duplicates"], 0);
    let depth = rt.block_on(queue_depth(&ch, &t.ingest_queue));
    assert_eq!(depth, 0);
    // Producer strings in log fields are escaped: the newline arrives as `\n`, two characters.
    let reasons: Vec<String> = d
        .log_events("dead_lettered")
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("evil\\nid")),
        "{reasons:?}"
    );
    assert!(reasons.iter().all(|r| !r.contains('\n') && r.len() <= 1024));
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A real 4096×4096 PNG of flat blocks: it compresses to tens of KB, so a batch of 32 is a
/// small message that decodes to 1.5 GiB of pixels.
fn big_png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(4096, 4096, |x, y| {
        image::Rgb([(x / 512 * 30) as u8, (y / 512 * 30) as u8, 90])
    });
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

/// Four batches of 32 PNGs of 4096×4096 in flight at once: peak memory follows the budget of
/// decoded pixels, not the batches, and goes back after the burst (trainer off, then on).
#[test]
fn a_burst_of_decoded_pixels_stays_within_the_budget() {
    let _serial = serial();
    let png = big_png();
    assert!(png.len() < 256 << 10, "{} bytes", png.len());
    let png = b64(&png);
    let budget_pixels: u64 = 2 * 4096 * 4096; // the default
                                              // Decoding holds the RGB image and its conversion: about 8 bytes per pixel in flight.
    let budget_mib = budget_pixels * 8 / (1 << 20);
    let margin_mib = 128;
    for (round, trainer) in [("off", NO_TRAINING.to_string()), ("on", trainer_on())] {
        let dir = tempdir(&format!("pixels-{round}"));
        let mut d = Daemon::configure(
            &dir,
            &trainer,
            &[],
            &Extra {
                max_message_bytes: Some(16 << 20),
                ..Extra::default()
            },
        );
        d.spawn();
        let t = d.topo.clone();
        let rt = tokio::runtime::Runtime::new().unwrap();
        if round == "on" {
            // The resting level of a daemon that trains: samples first, steps under way.
            let seed = images(16, 4, 77);
            rt.block_on(async {
                let (_c, ch) = channel().await;
                publish(
                    &ch,
                    &t.ingest_exchange,
                    &batch_json(&seed[..32]),
                    json_props(),
                )
                .await;
                publish(
                    &ch,
                    &t.ingest_exchange,
                    &batch_json(&seed[32..]),
                    json_props(),
                )
                .await;
            });
            d.wait_for("training", Duration::from_secs(120), |s| {
                s["trainer"]["step"].as_u64().is_some_and(|n| n >= 5)
            });
            std::thread::sleep(Duration::from_secs(10));
        } else {
            std::thread::sleep(Duration::from_secs(2));
        }
        let rest_kib = d.proc_kib("VmRSS:");
        let before = d.status().unwrap()["samples"]["total"]
            .as_u64()
            .unwrap_or(0);
        rt.block_on(async {
            let (_c, ch) = channel().await;
            for b in 0..4 {
                let body = serde_json::json!({"images": (0..32)
                    .map(|i| serde_json::json!({
                        "id": format!("big-{b}-{i}"), "person_id": format!("p{}", i % 8), "image": png
                    }))
                    .collect::<Vec<_>>()})
                .to_string()
                .into_bytes();
                publish(&ch, &t.ingest_exchange, &body, json_props()).await;
            }
        });
        d.wait_for("the burst to be stored", Duration::from_secs(600), |s| {
            s["samples"]["total"].as_u64() == Some(before + 128)
        });
        let peak_kib = d.proc_kib("VmHWM:");
        let growth_mib = peak_kib.saturating_sub(rest_kib) / 1024;
        assert!(
            growth_mib <= budget_mib + margin_mib,
            "trainer {round}: peak RSS grew {growth_mib} MiB over its resting {} MiB; budget {budget_mib} MiB + {margin_mib}",
            rest_kib / 1024
        );
        std::thread::sleep(Duration::from_secs(30));
        let after_kib = d.proc_kib("VmRSS:");
        eprintln!(
            "trainer {round}: rest {} MiB, peak {} MiB, 30 s after {} MiB",
            rest_kib / 1024,
            peak_kib / 1024,
            after_kib / 1024
        );
        assert!(
            after_kib <= rest_kib + 64 * 1024,
            "trainer {round}: RSS {} MiB 30 s after the burst, resting level {} MiB",
            after_kib / 1024,
            rest_kib / 1024
        );
        d.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn trainer_on() -> String {
    "preset = \"test\"\nbatch = 16\nimages_per_id = 4\nmin_samples = 32\nwarmup_steps = 5\ncheckpoint_every_steps = 1000\ncheckpoint_every_s = 0\nkeep_checkpoints = 2\nthreads = 1\nidle_after_s = 0\n".to_string()
}

fn mount_tmpfs(at: &Path, mib: u64) -> bool {
    std::fs::create_dir_all(at).unwrap();
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(at)
        .status()
        .is_ok_and(|s| s.success())
}

fn remount(at: &Path, mib: u64) {
    let ok = Command::new("mount")
        .args(["-o", &format!("remount,size={mib}m")])
        .arg(at)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "remount of {} failed", at.display());
}

/// Noise images (their JPEGs do not compress) to fill a small disk quickly.
fn noise_batch(n: usize, seed: u64, from: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let list: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let img = image::RgbImage::from_fn(128, 256, |_, _| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                image::Rgb([x as u8, (x >> 8) as u8, (x >> 16) as u8])
            });
            serde_json::json!({
                "id": format!("n{}", from + i),
                "person_id": format!("p{}", (from + i) % 20),
                "image": b64(&to_jpeg(&img, 95).unwrap()),
            })
        })
        .collect();
    serde_json::json!({ "images": list })
        .to_string()
        .into_bytes()
}

/// A real full disk: the state folder on a 40 MiB tmpfs. Ingest stops before the reserve is
/// reached and says so; /status, /metrics and SIGTERM stay responsive; a restart with little
/// space pauses again (reported); when the tmpfs grows, everything is stored, once.
#[test]
fn a_full_tmpfs_pauses_ingest_and_resumes_when_space_returns() {
    let _serial = serial();
    let dir = tempdir("tmpfs");
    let mnt = dir.join("state");
    if !mount_tmpfs(&mnt, 40) {
        eprintln!("skipped: mounting a tmpfs was refused (the test needs root and mount(8))");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let mut d = Daemon::configure(
        &dir,
        NO_TRAINING,
        &[],
        &Extra {
            min_free_bytes: Some(12 << 20),
            max_message_bytes: Some(8 << 20),
            ..Extra::default()
        },
    );
    d.spawn();
    let t = d.topo.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_conn, ch) = rt.block_on(channel());
    let batches = 40;
    let per = 20;
    let t0 = Instant::now();
    for b in 0..batches {
        let body = noise_batch(per, b as u64 + 1, b * per);
        rt.block_on(publish(&ch, &t.ingest_exchange, &body, json_props()));
    }
    let s = d.wait_for("the pause", Duration::from_secs(120), |s| {
        s["ingest"]["storage_error"]
            .as_str()
            .is_some_and(|e| e.contains("disk space low"))
    });
    let paused_at = s["samples"]["total"].as_u64().unwrap_or(0);
    let paused_s = t0.elapsed().as_secs_f64();
    assert!(paused_at < (batches * per) as u64, "the disk never filled");
    let t1 = Instant::now();
    let r = plip_actors::base::client::request(&d.http, "GET", "/readyz").unwrap();
    assert!(
        r.as_ref().is_err_and(|e| e.to_string().contains("503")),
        "{r:?}"
    );
    assert!(d.status().is_some());
    assert!(plip_actors::base::client::request(&d.http, "GET", "/metrics").is_some());
    assert!(t1.elapsed() < Duration::from_secs(3), "{:?}", t1.elapsed());
    // SIGTERM while paused, then a restart with as little space: paused again, and said so.
    let t2 = Instant::now();
    d.stop();
    let sigterm_s = t2.elapsed().as_secs_f64();
    assert!(sigterm_s < 15.0, "{sigterm_s}");
    d.spawn_only();
    d.wait_for("the pause after a restart", Duration::from_secs(30), |s| {
        s["ingest"]["storage_error"]
            .as_str()
            .is_some_and(|e| e.contains("disk space low"))
    });
    let r = plip_actors::base::client::request(&d.http, "GET", "/readyz").unwrap();
    assert!(
        r.as_ref().is_err_and(|e| e.to_string().contains("503")),
        "{r:?}"
    );
    // Space returns.
    remount(&mnt, 400);
    let t3 = Instant::now();
    let s = d.wait_for("everything stored", Duration::from_secs(180), |s| {
        s["samples"]["total"].as_u64() == Some((batches * per) as u64)
    });
    eprintln!(
        "{}",
        serde_json::json!({
            "tmpfs_mib": 40, "reserve_mib": 12, "published": batches * per,
            "paused_after_s": paused_s, "stored_when_paused": paused_at,
            "sigterm_exit_s": sigterm_s, "all_stored_after_remount_s": t3.elapsed().as_secs_f64(),
        })
    );
    assert!(s["ingest"]["storage_error"].is_null(), "{s:#}");
    assert_eq!(rt.block_on(queue_depth(&ch, &t.ingest_queue)), 0);
    d.stop();
    drop(_unmount);
    let _ = std::fs::remove_dir_all(&dir);
}
