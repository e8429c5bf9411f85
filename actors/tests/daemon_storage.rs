//! `plipd run` when storage fails, fills up or gets stuck: nothing unstored is acknowledged, ingest waits, the endpoints and SIGTERM never wait on storage.
//!
//! The daemon binary runs as a child process on a temporary state folder, with exchange and
//! queue names unique to each test, against the real RabbitMQ on 127.0.0.1:5672
//! (`PLIP_AMQP_URL` overrides). Shared helpers: `common/`.

mod common;

use common::*;

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
        r.as_ref().is_err_and(
            |e| e.to_string().contains("503") && e.to_string().contains("state.min_free_bytes")
        ),
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
        r.as_ref().is_err_and(
            |e| e.to_string().contains("503") && e.to_string().contains("has not answered")
        ),
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
