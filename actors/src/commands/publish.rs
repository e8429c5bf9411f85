//! `plipd publish`: a producer. Reads a data set (SYNTH-PEDES json, CUHK-PEDES json, Market-1501
//! folders, or `plipd synth` output), publishes it on the ingest exchange in batches with
//! publisher confirms, shows a progress bar and prints the confirmed count.

type Error = Box<dyn std::error::Error>;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::BasicProperties;
use plip_ingest::datasets::{open, Item};
use plip_ingest::synth::Split;
use plip_ingest::wire::{CaptionField, ImageField, IngestBatch, IngestImage, Purpose};
use std::collections::VecDeque;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// Data-set folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Broker URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub url: String,
    /// Exchange to publish to.
    #[arg(long, default_value = "plip.ingest")]
    pub exchange: String,
    /// Images per message.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Body encoding: `json` (base64 images) or `msgpack` (raw bytes).
    #[arg(long, default_value = "json")]
    pub format: String,
    /// Which part of a data set with a split: `train`, `query`, `gallery` or `all`.
    #[arg(long, default_value = "all")]
    pub split: String,
    /// Purpose of the samples: `auto` (training split → train, the others → gallery), `train`,
    /// `gallery` or `both`.
    #[arg(long, default_value = "auto")]
    pub purpose: String,
    /// Leave the data set's captions out (the daemon then writes its own).
    #[arg(long)]
    pub no_captions: bool,
    /// Publish at most this many images (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Prefix of the sample ids (the id is the prefix + the file name without extension).
    #[arg(long, default_value = "")]
    pub id_prefix: String,
    /// Unconfirmed messages in flight.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
}

fn purpose_of(args: &PublishArgs, it: &Item) -> Result<Purpose, Error> {
    Ok(match args.purpose.as_str() {
        "train" => Purpose::Train,
        "gallery" => Purpose::Gallery,
        "both" => Purpose::Both,
        "auto" => match it.split {
            None | Some(Split::Train) => Purpose::Train,
            Some(_) => Purpose::Gallery,
        },
        other => {
            return Err(
                format!("--purpose {other:?}: expected auto, train, gallery or both").into(),
            )
        }
    })
}

/// Builds the messages' images for `items`.
///
/// # Errors
/// An unreadable image file.
pub fn to_images(args: &PublishArgs, items: &[&Item]) -> Result<Vec<IngestImage>, Error> {
    let json = args.format == "json";
    items
        .iter()
        .map(|it| {
            let bytes = std::fs::read(&it.path)
                .map_err(|e| format!("cannot read {}: {e}", it.path.display()))?;
            let stem = it
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok(IngestImage {
                id: format!("{}{stem}", args.id_prefix),
                person_id: it.person.clone(),
                camera_id: it.camera.clone(),
                captions: (!args.no_captions && !it.captions.is_empty()).then(|| {
                    it.captions
                        .iter()
                        .map(|c| CaptionField::Text(c.text.clone()))
                        .collect()
                }),
                attributes: it.attributes,
                purpose: Some(purpose_of(args, it)?),
                image: if json {
                    use base64::Engine;
                    ImageField::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    ImageField::Bytes(bytes)
                },
            })
        })
        .collect()
}

/// Encodes one batch in the chosen format; returns (content type, body).
///
/// # Errors
/// An unknown format.
pub fn encode(format: &str, batch: &IngestBatch) -> Result<(&'static str, Vec<u8>), Error> {
    match format {
        "json" => Ok(("application/json", serde_json::to_vec(batch)?)),
        "msgpack" => Ok((
            "application/msgpack",
            rmp_serde::to_vec_named(batch).map_err(|e| e.to_string())?,
        )),
        other => Err(format!("--format {other:?}: expected json or msgpack").into()),
    }
}

/// Runs `plipd publish`.
pub fn run(args: &PublishArgs) -> Result<(), Error> {
    let ds = open(&args.data)?;
    crate::base::data::report_skipped("records", &ds.skipped);
    let wanted = |it: &&Item| match args.split.as_str() {
        "all" => true,
        "train" => matches!(it.split, None | Some(Split::Train)),
        "query" => it.split == Some(Split::Query),
        "gallery" => it.split == Some(Split::Gallery),
        _ => false,
    };
    if !["all", "train", "query", "gallery"].contains(&args.split.as_str()) {
        return Err(format!(
            "--split {:?}: expected train, query, gallery or all",
            args.split
        )
        .into());
    }
    let mut items: Vec<&Item> = ds.items.iter().filter(wanted).collect();
    if args.limit > 0 {
        items.truncate(args.limit);
    }
    if items.is_empty() {
        return Err("nothing to publish".into());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let total = items.len();
    let bar = crate::base::progress::bar(total as u64, "publishing");
    let result = rt.block_on(async {
        let conn = plip_ingest::amqp::connect(&args.url).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut pending: VecDeque<(lapin::PublisherConfirm, usize)> = VecDeque::new();
        let (mut messages, mut confirmed, mut confirmed_images, mut nacked) =
            (0usize, 0usize, 0usize, 0usize);
        let settle = |c: Result<lapin::Confirmation, lapin::Error>,
                      n: usize,
                      confirmed: &mut usize,
                      confirmed_images: &mut usize,
                      nacked: &mut usize|
         -> Result<(), Error> {
            match c? {
                lapin::Confirmation::Nack(_) => *nacked += 1,
                _ => {
                    *confirmed += 1;
                    *confirmed_images += n;
                }
            }
            Ok(())
        };
        for (k, chunk) in items.chunks(args.batch.max(1)).enumerate() {
            let batch = IngestBatch {
                v: Some(plip_ingest::wire::PROTOCOL_VERSION),
                batch_id: Some(format!("{}{k}", args.id_prefix)),
                images: to_images(args, chunk)?,
            };
            let (ct, body) = encode(&args.format, &batch)?;
            let props = BasicProperties::default()
                .with_content_type(ShortString::from(ct))
                .with_delivery_mode(2);
            let confirm = ch
                .basic_publish(
                    args.exchange.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await?;
            messages += 1;
            pending.push_back((confirm, chunk.len()));
            while pending.len() > args.window.max(1) {
                if let Some((c, n)) = pending.pop_front() {
                    settle(
                        c.await,
                        n,
                        &mut confirmed,
                        &mut confirmed_images,
                        &mut nacked,
                    )?;
                    bar.inc(n as u64);
                }
            }
        }
        while let Some((c, n)) = pending.pop_front() {
            settle(
                c.await,
                n,
                &mut confirmed,
                &mut confirmed_images,
                &mut nacked,
            )?;
            bar.inc(n as u64);
        }
        let _ = conn.close(200, "done".into()).await;
        Ok::<_, Error>(serde_json::json!({
            "messages": messages, "confirmed": confirmed, "nacked": nacked,
            "images": total, "images_confirmed": confirmed_images, "exchange": args.exchange,
        }))
    });
    bar.finish_and_clear();
    let summary = result?;
    println!("{summary}");
    if summary["nacked"].as_u64().unwrap_or(0) > 0 {
        return Err("the broker refused some messages (see \"nacked\")".into());
    }
    Ok(())
}
