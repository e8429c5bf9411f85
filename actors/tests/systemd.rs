//! The systemd unit verifies cleanly, and the daemon speaks the notification protocol.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// `systemd-analyze verify` reports nothing for `systemd/plipd.service` and for the server
/// replicas' template `systemd/plipd-server@.service` (an instance of it), with `ExecStart`
/// pointing at the binary under test.
#[test]
fn unit_files_verify() {
    let dir = std::env::temp_dir().join(format!("plipd-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (file, exec, instance) in [
        (
            "plipd.service",
            "ExecStart=/usr/local/bin/plipd run",
            "plipd.service",
        ),
        (
            "plipd-server@.service",
            "ExecStart=/usr/local/bin/plipd run --role server",
            "plipd-server-a.service",
        ),
    ] {
        let unit = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../systemd")
            .join(file);
        let text = std::fs::read_to_string(&unit).unwrap();
        assert!(text.contains(exec), "{file}");
        let copy = dir.join(instance);
        std::fs::write(
            &copy,
            text.replace("/usr/local/bin/plipd", env!("CARGO_BIN_EXE_plipd"))
                .replace("%i", "a"),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze is needed (Debian: apt-get install systemd)");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{file}: {said}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// READY=1 after start-up, WATCHDOG=1 with STATUS lines while running, STOPPING=1 on SIGTERM,
/// exit 0.
#[test]
fn notifies_systemd() {
    let dir = std::env::temp_dir().join(format!("plipd-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tag = format!("notify{}", std::process::id());
    let topo = plip_ingest::amqp::Topology::with_suffix(&tag);
    let url = std::env::var("PLIP_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let mut child = Command::new(env!("CARGO_BIN_EXE_plipd"))
        .arg("run")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .env("PLIP__BROKER__URL", &url)
        .env("PLIP__STATE__DIR", dir.join("state"))
        .env("PLIP__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("PLIP__TRAINER__PRESET", "test")
        .envs(topo.env())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    let has = |seen: &[String], s: &str| seen.iter().any(|m| m.lines().any(|l| l.starts_with(s)));
    while !(has(&seen, "READY=1") && has(&seen, "WATCHDOG=1") && has(&seen, "STATUS="))
        && t.elapsed() < Duration::from_secs(60)
    {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(has(&seen, "READY=1"), "{seen:?}");
    assert!(has(&seen, "WATCHDOG=1"), "{seen:?}");
    assert!(has(&seen, "STATUS="), "{seen:?}");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    while !has(&seen, "STOPPING=1") && t.elapsed() < Duration::from_secs(60) {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(has(&seen, "STOPPING=1"), "{seen:?}");
    assert!(child.wait().unwrap().success());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        if let Ok(c) = plip_ingest::amqp::connect(&url).await {
            if let Ok(ch) = c.create_channel().await {
                topo.delete(&ch).await;
            }
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
