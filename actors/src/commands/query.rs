//! `plipd query`: a ReID client. Sends one image or text query over the broker (RPC: an
//! exclusive reply queue, a correlation id) and prints the ranked matches.

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::BasicProperties;
use std::path::PathBuf;
use std::time::Duration;

type Error = Box<dyn std::error::Error>;

#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// A person image (JPEG, PNG or WebP).
    #[arg(long, conflicts_with = "text", required_unless_present = "text")]
    pub image: Option<PathBuf>,
    /// A description of the person.
    #[arg(long)]
    pub text: Option<String>,
    /// Matches wanted.
    #[arg(long, default_value_t = 10)]
    pub top_k: u32,
    /// Leave out gallery images of this camera.
    #[arg(long)]
    pub exclude_camera: Option<String>,
    /// Refuse an answer from a model older than this version (`model_too_old`).
    #[arg(long)]
    pub min_model_version: Option<u64>,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
    /// Broker URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub url: String,
    /// Exchange of ReID requests.
    #[arg(long, default_value = "plip.reid")]
    pub exchange: String,
    /// Seconds to wait for the answer (also sent as the request's deadline).
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
}

/// Runs `plipd query`.
pub fn run(args: &QueryArgs) -> Result<(), Error> {
    use base64::Engine;
    let query = match (&args.image, &args.text) {
        (Some(p), _) => {
            let bytes =
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            serde_json::json!({"image": base64::engine::general_purpose::STANDARD.encode(bytes)})
        }
        (None, Some(t)) => serde_json::json!({"text": t}),
        (None, None) => return Err("give --image FILE or --text \"…\"".into()),
    };
    let mut req = serde_json::json!({"v": 1, "query": query, "top_k": args.top_k, "deadline_ms": args.timeout_s * 1000});
    if let Some(c) = &args.exclude_camera {
        req["exclude_camera"] = serde_json::json!(c);
    }
    if let Some(v) = args.min_model_version {
        req["min_model_version"] = serde_json::json!(v);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = {
        let conn = rt.block_on(plip_ingest::amqp::connect(&args.url))?;
        let ch = rt.block_on(conn.create_channel())?;
        let r = ask(
            &rt,
            &ch,
            &args.exchange,
            &req,
            Duration::from_secs(args.timeout_s),
        )
        .map_err(|e| format!("{e} (is plipd run consuming {}?)", args.exchange))?;
        let _ = rt.block_on(conn.close(200, "done".into()));
        r
    };
    if args.json {
        println!("{reply}");
    } else if let Some(e) = reply.get("error").filter(|e| !e.is_null()) {
        return Err(format!(
            "{}: {}",
            e["code"].as_str().unwrap_or("?"),
            e["message"].as_str().unwrap_or("")
        )
        .into());
    } else {
        println!(
            "model version {}, gallery version {}, {:.1} ms",
            reply["model_version"],
            reply["gallery_version"],
            reply["took_ms"].as_f64().unwrap_or(0.0)
        );
        println!(
            "{:>4}  {:>7}  {:<10} {:<8} id",
            "rank", "score", "person", "camera"
        );
        for (i, m) in reply["matches"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            println!(
                "{:>4}  {:>7.4}  {:<10} {:<8} {}",
                i + 1,
                m["score"].as_f64().unwrap_or(0.0),
                m["person_id"].as_str().unwrap_or("-"),
                m["camera_id"].as_str().unwrap_or("-"),
                m["id"].as_str().unwrap_or("")
            );
        }
    }
    if reply.get("error").is_some_and(|e| !e.is_null()) {
        return Err("the daemon answered with an error".into());
    }
    Ok(())
}

/// One request-reply round trip on an open channel (a fresh exclusive reply queue, the
/// message timestamped; `timeout` at most).
///
/// # Errors
/// A broker error or no answer in time.
pub fn ask(
    rt: &tokio::runtime::Runtime,
    ch: &lapin::Channel,
    exchange: &str,
    request: &serde_json::Value,
    timeout: Duration,
) -> Result<serde_json::Value, Error> {
    rt.block_on(async {
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let corr = format!(
            "ask-{}-{}",
            std::process::id(),
            crate::base::state::now_unix()
        );
        ch.basic_publish(
            exchange.into(),
            "".into(),
            BasicPublishOptions::default(),
            request.to_string().as_bytes(),
            BasicProperties::default()
                .with_content_type(ShortString::from("application/json"))
                .with_reply_to(q.name().clone())
                .with_correlation_id(corr.as_str().into())
                .with_timestamp(crate::base::state::now_unix()),
        )
        .await?;
        let t = std::time::Instant::now();
        while t.elapsed() < timeout {
            if let Some(m) = ch
                .basic_get(
                    q.name().clone(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await?
            {
                if m.delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.as_str())
                    == Some(&corr)
                {
                    let _ = ch.queue_delete(q.name().clone(), Default::default()).await;
                    return Ok(serde_json::from_slice(&m.delivery.data)?);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!("no answer within {} s", timeout.as_secs()).into())
    })
}
