//! Readers for the data sets users have, so they train and evaluate unchanged:
//! SYNTH-PEDES JSON (and the synthetic sets `plipd synth` writes in that format), CUHK-PEDES
//! `reid_raw.json`, and Market-1501 folders. Bad records (missing file, malformed name or entry)
//! are reported with the record, skipped and counted; a long run never stops on one, and never
//! skips one silently.

use crate::attributes::Attributes;
use crate::captions::{find_phrases, Caption};
use crate::synth::Split;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// One image of a data set.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The image file.
    pub path: PathBuf,
    /// Person id as the data set writes it (e.g. "0002"); `None` when unlabelled.
    pub person: Option<String>,
    /// Camera id (e.g. "c1"), when known.
    pub camera: Option<String>,
    /// Captions with their attribute phrases (empty when the data set has none).
    pub captions: Vec<Caption>,
    /// Attributes, when the data set has them.
    pub attributes: Option<Attributes>,
    /// Market-1501 role, when the data set has one.
    pub split: Option<Split>,
}

/// A record that was skipped, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRecord {
    /// The record as found (a file name, or the JSON entry).
    pub record: String,
    pub reason: String,
}

/// A data set: its images and what was skipped.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub items: Vec<Item>,
    pub skipped: Vec<BadRecord>,
    /// Which reader produced it.
    pub format: &'static str,
}

/// Reader failures that stop a whole data set (an unreadable index file, an unknown layout).
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid {what}: {message}")]
    Format {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("{0} holds no known data set (synthpedes.json, reid_raw.json, or Market-1501 folders bounding_box_train/, query/, bounding_box_test/)")]
    Unknown(PathBuf),
}

fn read(path: &Path) -> Result<Vec<u8>, DatasetError> {
    std::fs::read(path).map_err(|source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn caption(text: &str, phrases: Option<&Vec<crate::captions::Phrase>>) -> Caption {
    Caption {
        text: text.to_string(),
        phrases: phrases.cloned().unwrap_or_else(|| find_phrases(text)),
    }
}

/// Attributes as SYNTH-PEDES writes them (one string of six items) or as our JSON object.
#[derive(Deserialize)]
#[serde(untagged)]
enum AttributeField {
    Object(Attributes),
    Text(#[allow(dead_code)] String),
}

#[derive(Deserialize)]
struct SynthPedesRecord {
    id: serde_json::Value,
    file_path: String,
    #[serde(default)]
    attributes: Option<AttributeField>,
    #[serde(default)]
    captions: Vec<String>,
    #[serde(default)]
    prompt_caption: Option<String>,
    #[serde(default)]
    caption_phrases: Option<Vec<Vec<crate::captions::Phrase>>>,
    #[serde(default)]
    camera: Option<serde_json::Value>,
    #[serde(default)]
    split: Option<Split>,
}

fn id_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// SYNTH-PEDES JSON (`id, file_path, attributes, captions, prompt_caption`); `root` holds the
/// images. Our own extra fields (`caption_phrases`, `camera`, `split`) are used when present;
/// otherwise phrases are found in the caption text.
///
/// # Errors
/// An unreadable or non-JSON index file.
pub fn read_synthpedes(json: &Path, root: &Path) -> Result<Dataset, DatasetError> {
    read_records(
        json,
        "SYNTH-PEDES JSON (a list of records)",
        "synthpedes",
        |rec: SynthPedesRecord| {
            let path = existing(root, &rec.file_path)?;
            let mut captions: Vec<Caption> = rec
                .captions
                .iter()
                .enumerate()
                .map(|(k, t)| caption(t, rec.caption_phrases.as_ref().and_then(|p| p.get(k))))
                .collect();
            if let Some(p) = &rec.prompt_caption {
                captions.push(caption(p, None));
            }
            let attributes = match rec.attributes {
                Some(AttributeField::Object(a)) => Some(a),
                // The six-item string form carries no closed values we can trust: the captions'
                // phrases carry that information instead.
                Some(AttributeField::Text(_)) | None => None,
            };
            Ok(Item {
                path,
                person: id_string(&rec.id),
                camera: rec.camera.as_ref().and_then(id_string).map(|c| {
                    if c.starts_with('c') {
                        c
                    } else {
                        format!("c{c}")
                    }
                }),
                captions,
                attributes,
                split: rec.split,
            })
        },
    )
}

/// The path of an image that must exist.
fn existing(root: &Path, rel: &str) -> Result<PathBuf, String> {
    let path = root.join(rel);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("missing file {}", path.display()))
    }
}

/// Reads a JSON list of records of type `R`; each becomes an item or a reported bad record.
fn read_records<R: serde::de::DeserializeOwned>(
    json: &Path,
    what: &'static str,
    format: &'static str,
    mut item: impl FnMut(R) -> Result<Item, String>,
) -> Result<Dataset, DatasetError> {
    let bytes = read(json)?;
    let raw: Vec<serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|e| DatasetError::Format {
            path: json.to_path_buf(),
            what,
            message: e.to_string(),
        })?;
    let mut ds = Dataset {
        format,
        ..Default::default()
    };
    for (i, entry) in raw.into_iter().enumerate() {
        let parsed = serde_json::from_value::<R>(entry.clone())
            .map_err(|e| format!("malformed record: {e}"));
        match parsed.and_then(&mut item) {
            Ok(it) => ds.items.push(it),
            Err(reason) => ds.skipped.push(BadRecord {
                record: format!("record {i}: {}", truncate(&entry.to_string())),
                reason,
            }),
        }
    }
    Ok(ds)
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 200 {
        format!("{}…", s.chars().take(200).collect::<String>())
    } else {
        s.to_string()
    }
}

#[derive(Deserialize)]
struct CuhkRecord {
    id: serde_json::Value,
    file_path: String,
    #[serde(default)]
    captions: Vec<String>,
    #[serde(default)]
    split: Option<String>,
}

/// CUHK-PEDES `reid_raw.json` (`split, captions, file_path, processed_tokens, id`); `root` is the
/// `imgs` folder the paths are relative to. `split` "test"/"val" items become gallery images.
///
/// # Errors
/// An unreadable or non-JSON index file.
pub fn read_cuhk_pedes(json: &Path, root: &Path) -> Result<Dataset, DatasetError> {
    read_records(
        json,
        "CUHK-PEDES reid_raw.json",
        "cuhk-pedes",
        |rec: CuhkRecord| {
            let path = existing(root, &rec.file_path)?;
            let split = match rec.split.as_deref() {
                Some("train") | None => Some(Split::Train),
                Some(_) => Some(Split::Gallery),
            };
            Ok(Item {
                path,
                person: id_string(&rec.id),
                camera: None,
                captions: rec.captions.iter().map(|t| caption(t, None)).collect(),
                attributes: None,
                split,
            })
        },
    )
}

/// Person id and camera of a Market-1501 file name (`0002_c1s1_000451_03.jpg` → ("0002", "c1");
/// `-1_c1s1_…` → id "-1").
pub fn parse_market_name(name: &str) -> Option<(String, String)> {
    let stem = name.rsplit_once('.')?.0;
    let mut parts = stem.split('_');
    let pid = parts.next()?;
    let cam = parts.next()?;
    let pid_ok = pid == "-1" || (!pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()));
    let cam_no: String = cam
        .strip_prefix('c')?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    if !pid_ok || cam_no.is_empty() {
        return None;
    }
    Some((pid.to_string(), format!("c{cam_no}")))
}

/// Market-1501 folders under `root`: `bounding_box_train/`, `query/`, `bounding_box_test/`.
/// Junk images (id −1) are dropped (counted as skipped), distractors (id 0) kept; malformed names
/// are reported and skipped.
///
/// # Errors
/// A folder that cannot be listed.
pub fn read_market(root: &Path) -> Result<Dataset, DatasetError> {
    let mut ds = Dataset {
        format: "market1501",
        ..Default::default()
    };
    for split in [Split::Train, Split::Query, Split::Gallery] {
        let dir = root.join(split.folder());
        if !dir.is_dir() {
            continue;
        }
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| DatasetError::Io {
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        names.sort();
        for path in names {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let ext = name
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            if !matches!(ext.as_str(), "jpg" | "jpeg" | "png" | "webp") {
                continue;
            }
            match parse_market_name(&name) {
                Some((pid, _)) if pid == "-1" => ds.skipped.push(BadRecord {
                    record: path.display().to_string(),
                    reason: "junk image (person id -1)".into(),
                }),
                Some((pid, cam)) => ds.items.push(Item {
                    path,
                    person: Some(pid),
                    camera: Some(cam),
                    captions: Vec::new(),
                    attributes: None,
                    split: Some(split),
                }),
                None => ds.skipped.push(BadRecord {
                    record: path.display().to_string(),
                    reason: "malformed Market-1501 name (expected PPPP_cNsM_FFFFFF_BB.jpg)".into(),
                }),
            }
        }
    }
    Ok(ds)
}

/// Opens whatever data set `dir` holds: `synthpedes.json`, then `reid_raw.json` (images under
/// `imgs/` when that folder exists), then Market-1501 folders.
///
/// # Errors
/// No known data set in `dir`, or a reader failure.
pub fn open(dir: &Path) -> Result<Dataset, DatasetError> {
    let sp = dir.join(crate::synth::JSON_NAME);
    if sp.is_file() {
        return read_synthpedes(&sp, dir);
    }
    let cuhk = dir.join("reid_raw.json");
    if cuhk.is_file() {
        let imgs = dir.join("imgs");
        return read_cuhk_pedes(&cuhk, if imgs.is_dir() { &imgs } else { dir });
    }
    if [Split::Train, Split::Query, Split::Gallery]
        .iter()
        .any(|s| dir.join(s.folder()).is_dir())
    {
        return read_market(dir);
    }
    Err(DatasetError::Unknown(dir.to_path_buf()))
}
