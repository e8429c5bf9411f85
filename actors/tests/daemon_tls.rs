//! `plipd run` over AMQPS with a private CA and a vhost (a TLS listener added to the local broker).
//!
//! The daemon binary runs as a child process on a temporary state folder, with exchange and
//! queue names unique to each test, against the real RabbitMQ on 127.0.0.1:5672
//! (`PLIP_AMQP_URL` overrides). Shared helpers: `common/`.

mod common;

use common::*;

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
