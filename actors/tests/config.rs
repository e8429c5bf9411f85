//! The daemon configuration: the documented file equals the code's defaults; environment
//! variables override; unknown keys and invalid values are refused naming the key.

use plip_actors::base::config::Config;
use std::collections::HashMap;
use std::path::PathBuf;

fn default_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/default.toml")
}

fn no_env() -> Option<HashMap<String, String>> {
    Some(HashMap::new())
}

#[test]
fn default_toml_matches_the_code() {
    let from_file = Config::load_with_env(Some(&default_file()), no_env()).unwrap();
    assert_eq!(from_file, Config::default());
}

#[test]
fn environment_overrides_the_file() {
    let env: HashMap<String, String> = [
        ("PLIP__TRAINER__PRESET", "test"),
        ("PLIP__TRAINER__BATCH", "32"),
        ("PLIP__BROKER__URL", "amqps://u:p@broker.example:5671/vh"),
        ("PLIP__LIMITS__IMAGE__MAX_PIXELS", "1000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let c = Config::load_with_env(Some(&default_file()), Some(env)).unwrap();
    assert_eq!(c.trainer.preset, "test");
    assert_eq!(c.trainer.batch, 32);
    assert_eq!(c.broker.url, "amqps://u:p@broker.example:5671/vh");
    assert_eq!(c.limits.image.max_pixels, 1000);
}

#[test]
fn unknown_keys_and_bad_values_name_the_key() {
    let dir = std::env::temp_dir().join(format!("plip-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let err = |p: PathBuf| {
        Config::load_with_env(Some(&p), no_env())
            .unwrap_err()
            .to_string()
    };
    let e = err(write("a.toml", "[trainer]\nbatchsize = 3\n"));
    assert!(e.contains("batchsize"), "{e}");
    let e = err(write("b.toml", "[trainer]\nbatch = \"many\"\n"));
    assert!(e.contains("batch"), "{e}");
    let e = err(write("c.toml", "[trainer]\npreset = \"huge\"\n"));
    assert!(e.contains("trainer.preset"), "{e}");
    let e = err(write("c2.toml", "[trainer]\njoint_feature = \"cls\"\n"));
    assert!(e.contains("trainer.joint_feature"), "{e}");
    let e = err(write(
        "c3.toml",
        "[trainer]\npreset = \"test-vit\"\njoint_feature = \"neck\"\n",
    ));
    assert!(
        e.contains("trainer.joint_feature") && e.contains("id_classes"),
        "{e}"
    );
    let e = err(write("c4.toml", "[trainer]\ntext_lr_scale = -1.0\n"));
    assert!(e.contains("trainer.text_lr_scale"), "{e}");
    let e = err(write("c5.toml", "[trainer]\nw_proto = -0.5\n"));
    assert!(e.contains("trainer.w_proto"), "{e}");
    let e = err(write("c6.toml", "[trainer]\ncaptions_per_image = 0\n"));
    assert!(e.contains("trainer.captions_per_image"), "{e}");
    let e = err(write("c7.toml", "[trainer]\nlogit_scale_lr_scale = -1.0\n"));
    assert!(e.contains("trainer.logit_scale_lr_scale"), "{e}");
    let e = err(write("c9.toml", "[trainer]\nconv_widths = [32, 64]\n"));
    assert!(e.contains("trainer.conv_widths"), "{e}");
    let e = err(write("c8.toml", "[trainer]\ntext_substeps = 17\n"));
    assert!(
        e.contains("trainer.text_substeps") && e.contains("16"),
        "{e}"
    );
    let e = err(write("c10.toml", "[trainer]\nw_text_attr = -1.0\n"));
    assert!(e.contains("trainer.w_text_attr"), "{e}");
    let e = err(write("c11.toml", "[serving]\nattribute_weight = -0.5\n"));
    assert!(e.contains("serving.attribute_weight"), "{e}");
    let e = err(write("s1.toml", "[streams]\nmax_age = \"7 days\"\n"));
    assert!(e.contains("streams.max_age"), "{e}");
    let e = err(write(
        "s2.toml",
        "[streams]\nmax_age = \"12h\"\nsnapshot_every_s = 86400\n",
    ));
    assert!(
        e.contains("streams.snapshot_every_s") && e.contains("43200"),
        "{e}"
    );
    let e = err(write("d.toml", "[broker]\nprefetch = 0\n"));
    assert!(e.contains("broker.prefetch"), "{e}");
    if !plip_model::device::CUDA_BUILT {
        let e = err(write("e.toml", "[trainer]\ndevice = \"cuda\"\n"));
        assert!(e.contains("trainer.device"), "{e}");
        assert!(e.contains("built without CUDA support"), "{e}");
    }
    let e = err(write("e2.toml", "[serving]\ndevice = \"tpu\"\n"));
    assert!(
        e.contains("serving.device") && e.contains("unknown device"),
        "{e}"
    );
    let e = err(write("f.toml", "[log]\nformat = \"xml\"\n"));
    assert!(e.contains("log.format"), "{e}");
    let e = err(write("g.toml", "[log]\nlevel = \"plip=verbose\"\n"));
    assert!(e.contains("log.level"), "{e}");
    let e = err(write(
        "h.toml",
        "[broker]\ntls_ca_file = \"/nonexistent/ca.pem\"\n",
    ));
    assert!(e.contains("broker.tls_ca_file"), "{e}");
    let e = Config::load_with_env(Some(&dir.join("missing.toml")), no_env())
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `plipd config show` prints the effective configuration with the password redacted.
#[test]
fn config_show_redacts_the_password() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plipd"))
        .args(["config", "show", "--config"])
        .arg(default_file())
        .env(
            "PLIP__BROKER__URL",
            "amqps://plipd:s3cret-pw@broker:5671/vh",
        )
        .env("PLIP__TRAINER__BATCH", "48")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("s3cret-pw"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["broker"]["url"], "amqps://plipd:***@broker:5671/vh");
    assert_eq!(v["trainer"]["batch"], 48);
    assert_eq!(v["trainer"]["preset"], "tiny");
}

/// Several invalid values are reported together, each naming its key (an operator fixes the
/// file once, not once per restart).
#[test]
fn every_invalid_value_is_reported_at_once() {
    let dir = std::env::temp_dir().join(format!("plip-config-all-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("bad.toml");
    std::fs::write(
        &p,
        "[trainer]\npreset = \"huge\"\nbatch = 1\n[broker]\nprefetch = 0\n[log]\nformat = \"xml\"\n[serving]\ngate_metric = \"accuracy\"\n",
    )
    .unwrap();
    let e = Config::load_with_env(Some(&p), no_env())
        .unwrap_err()
        .to_string();
    for key in [
        "trainer.preset",
        "trainer.batch",
        "broker.prefetch",
        "log.format",
        "serving.gate_metric",
    ] {
        assert!(e.contains(key), "{key} missing from: {e}");
    }
    // trainer.images_per_id (its default) is now more than the batch too.
    assert!(e.starts_with("6 problems"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Every key the code has a default for is written in `configs/default.toml` (the file is the
/// documentation: a key left out would still load, with the code's default, undocumented).
/// Keys whose default is "unset" cannot be written in TOML and are skipped.
#[test]
fn every_default_key_is_in_the_documented_file() {
    fn leaves(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(v, &key, out);
                }
            }
            serde_json::Value::Null => {}
            _ => out.push(prefix.to_string()),
        }
    }
    let code = serde_json::to_value(Config::default()).unwrap();
    let file: serde_json::Value = config::Config::builder()
        .add_source(config::File::from(default_file()))
        .build()
        .unwrap()
        .try_deserialize()
        .unwrap();
    let mut keys = Vec::new();
    leaves(&code, "", &mut keys);
    assert!(keys.len() > 50, "{}", keys.len());
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            k.split('.')
                .try_fold(&file, |v, part| v.get(part))
                .is_none()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "not in configs/default.toml: {missing:?}"
    );
}

/// `log.format` and `serving.gate_metric` are enums: the documented values parse to their
/// variants and back, and a configuration error is the `Config` kind of the crate's error.
#[test]
fn enum_keys_parse_to_their_variants() {
    use plip_actors::base::config::{GateMetric, LogFormat};
    let dir = std::env::temp_dir().join(format!("plip-config-enums-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("enums.toml");
    for (metric, want) in [
        ("mAP", GateMetric::MeanAp),
        ("rank1", GateMetric::Rank1),
        ("text_r1", GateMetric::TextR1),
    ] {
        std::fs::write(
            &p,
            format!("[log]\nformat = \"json\"\n[serving]\ngate_metric = \"{metric}\"\n"),
        )
        .unwrap();
        let c = Config::load_with_env(Some(&p), no_env()).unwrap();
        assert_eq!(c.serving.gate_metric, want);
        assert_eq!(c.serving.gate_metric.as_str(), metric);
        assert_eq!(c.log.format, LogFormat::Json);
        // Written back (plipd config prints it) as the same string.
        let text = serde_json::to_value(&c.serving).unwrap();
        assert_eq!(text["gate_metric"], metric);
    }
    std::fs::write(&p, "[serving]\ngate_metric = \"accuracy\"\n").unwrap();
    let e = Config::load_with_env(Some(&p), no_env()).unwrap_err();
    assert!(
        matches!(e, plip_actors::base::error::Error::Config(_)),
        "{e:?}"
    );
    assert!(e.to_string().contains("serving.gate_metric"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `x-max-age` values as RabbitMQ reads them.
#[test]
fn max_age_values() {
    use plip_actors::base::config::max_age_seconds;
    assert_eq!(max_age_seconds("7D"), Some(7 * 86_400));
    assert_eq!(max_age_seconds("12h"), Some(43_200));
    assert_eq!(max_age_seconds("30s"), Some(30));
    assert_eq!(max_age_seconds("1Y"), Some(365 * 86_400));
    for bad in ["", "D", "7", "7d", "-1h", "0s", "7 D", "1.5h"] {
        assert_eq!(max_age_seconds(bad), None, "{bad:?}");
    }
}
