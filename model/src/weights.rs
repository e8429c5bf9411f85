//! Weights and optimiser state as safetensors bytes with metadata.
//!
//! Weights files hold the parameters and the buffers (BatchNorm running statistics, named
//! `….running_mean` / `….running_var` as PyTorch names them). Tensor names are the dotted
//! paths (`image.layer1.0.conv1.weight`, `text.blocks.0.attn.q.weight`), shapes as PyTorch's
//! modules store them — `nn.Linear` `(out, in)`, `nn.Conv2d` `(out, in, kH, kW)` — so a PyTorch
//! user can load the file with `safetensors.torch.load_file`, and the ResNet image tower
//! (`image.` stripped) into torchvision's `resnet18`/`resnet50` (README, "Weights in PyTorch").
//! Optimiser files hold `m.<name>` and `v.<name>` in the model's own layout.
//!
//! Format versions: 1 stored convolution weights as the model holds them, `(c_out, k·k·c_in)`
//! channels last, and named shortcuts `downsample.conv` / `downsample.bn`; 2 (this build)
//! writes torchvision's layout and names. Both read.
//!
//! Metadata keys: `format` = `plip`, `format_version`, `kind` (`weights` | `optimizer`),
//! `preset` (name), `dims` (the preset as JSON), `tokenizer` (fingerprint), `step`, `extra`
//! (JSON object of caller-supplied strings, e.g. metrics).

use crate::optim::{AdamW, Moments};
use crate::params::{scalar, Params};
use crate::plip::Plip;
use crate::preset::Preset;
use crate::{Error, Result};
use dfdx::prelude::*;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};

/// Version of the layout written by this build.
pub const FORMAT_VERSION: u32 = 2;

/// The name a tensor had in format 1 files, where it differs (the shortcut's parts, named by
/// position since format 2 as torchvision's `Sequential` names them).
fn legacy_name(name: &str) -> Option<String> {
    let renamed = name
        .replace(".downsample.0.", ".downsample.conv.")
        .replace(".downsample.1.", ".downsample.bn.");
    (renamed != name).then_some(renamed)
}

/// `name`'s tensor in `st`, or its format-1 name's.
fn tensor<'a>(st: &'a SafeTensors<'a>, name: &str) -> Result<TensorView<'a>> {
    match st.tensor(name) {
        Ok(v) => Ok(v),
        Err(e) => legacy_name(name)
            .and_then(|old| st.tensor(&old).ok())
            .ok_or_else(|| Error::Weights(format!("tensor {name}: {e}"))),
    }
}

/// A convolution weight from the model's `(c_out, ky, kx, c_in)` to PyTorch's
/// `(c_out, c_in, ky, kx)`.
pub fn conv_to_torch<E: Copy>(v: &[E], [o, i, kh, kw]: [usize; 4]) -> Vec<E> {
    let mut out = Vec::with_capacity(v.len());
    for oc in 0..o {
        for ic in 0..i {
            for y in 0..kh {
                for x in 0..kw {
                    out.push(v[((oc * kh + y) * kw + x) * i + ic]);
                }
            }
        }
    }
    out
}

/// The inverse of [`conv_to_torch`].
pub fn conv_from_torch<E: Copy + Default>(v: &[E], [o, i, kh, kw]: [usize; 4]) -> Vec<E> {
    let mut out = vec![E::default(); v.len()];
    for oc in 0..o {
        for ic in 0..i {
            for y in 0..kh {
                for x in 0..kw {
                    out[((oc * kh + y) * kw + x) * i + ic] = v[((oc * i + ic) * kh + y) * kw + x];
                }
            }
        }
    }
    out
}

/// The model's convolution weights by name, with their PyTorch shapes.
fn conv_shapes<E: Dtype, D: Device<E>>(model: &Plip<E, D>) -> HashMap<String, [usize; 4]> {
    let mut out = Vec::new();
    model.visit_convs("", &mut out);
    out.into_iter().collect()
}

/// The one tensor a weights file may lack: the identity prototypes (a buffer added after the
/// format's first version; a file without it loads with no prototype seen).
pub const OPTIONAL_BUFFER: &str = "id.prototypes";

/// The metadata of a weights or optimiser blob.
#[derive(Debug, Clone, PartialEq)]
pub struct BlobMeta {
    pub format_version: u32,
    pub kind: String,
    pub preset: Preset,
    pub tokenizer: String,
    pub step: u64,
    pub extra: BTreeMap<String, String>,
}

fn werr(e: impl std::fmt::Display) -> Error {
    Error::Weights(e.to_string())
}

fn to_bytes<E: Dtype>(values: &[E]) -> (StDtype, Vec<u8>) {
    if std::mem::size_of::<E>() == 8 {
        let b = values
            .iter()
            .flat_map(|x| x.to_f64().unwrap_or(f64::NAN).to_le_bytes())
            .collect();
        (StDtype::F64, b)
    } else {
        let b = values
            .iter()
            .flat_map(|x| x.to_f32().unwrap_or(f32::NAN).to_le_bytes())
            .collect();
        (StDtype::F32, b)
    }
}

fn from_view<E: Dtype>(name: &str, view: &TensorView<'_>, dims: &[usize]) -> Result<Vec<E>> {
    if view.shape() != dims {
        return Err(Error::Weights(format!(
            "tensor {name} has shape {:?}, the model expects {dims:?}",
            view.shape()
        )));
    }
    let data = view.data();
    let out: Vec<E> = match view.dtype() {
        StDtype::F32 => data
            .chunks_exact(4)
            .map(|c| scalar(f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64))
            .collect(),
        StDtype::F64 => data
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                scalar(f64::from_le_bytes(b))
            })
            .collect(),
        other => {
            return Err(Error::Weights(format!(
                "tensor {name} has unsupported dtype {other:?}"
            )))
        }
    };
    if out.len() != dims.iter().product::<usize>() {
        return Err(Error::Weights(format!("tensor {name} is truncated")));
    }
    Ok(out)
}

fn serialize(
    tensors: Vec<(String, StDtype, Vec<usize>, Vec<u8>)>,
    kind: &str,
    preset: &Preset,
    tokenizer: &str,
    step: u64,
    extra: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "plip".to_string());
    meta.insert("format_version".to_string(), FORMAT_VERSION.to_string());
    meta.insert("kind".to_string(), kind.to_string());
    meta.insert("preset".to_string(), preset.name.clone());
    meta.insert(
        "dims".to_string(),
        serde_json::to_string(preset).map_err(werr)?,
    );
    meta.insert("tokenizer".to_string(), tokenizer.to_string());
    meta.insert("step".to_string(), step.to_string());
    meta.insert(
        "extra".to_string(),
        serde_json::to_string(extra).map_err(werr)?,
    );
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, shape, data)| {
            Ok((
                n.clone(),
                TensorView::new(*dt, shape.clone(), data).map_err(werr)?,
            ))
        })
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(views, &Some(meta)).map_err(werr)
}

/// Reads and checks a blob's metadata.
///
/// # Errors
/// Not a plip blob, a truncated header, or a newer format.
pub fn read_meta(bytes: &[u8]) -> Result<BlobMeta> {
    let (_, md) = SafeTensors::read_metadata(bytes).map_err(werr)?;
    let m = md
        .metadata()
        .as_ref()
        .ok_or_else(|| werr("no metadata: not a plip file"))?;
    let get = |k: &str| {
        m.get(k)
            .ok_or_else(|| Error::Weights(format!("metadata lacks {k:?}")))
    };
    if get("format")? != "plip" {
        return Err(werr("not a plip file"));
    }
    let format_version: u32 = get("format_version")?.parse().map_err(werr)?;
    if format_version > FORMAT_VERSION {
        return Err(Error::NewerFormat {
            found: format_version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(BlobMeta {
        format_version,
        kind: get("kind")?.clone(),
        preset: serde_json::from_str(get("dims")?).map_err(werr)?,
        tokenizer: get("tokenizer")?.clone(),
        step: get("step")?.parse().map_err(werr)?,
        extra: serde_json::from_str(get("extra")?).map_err(werr)?,
    })
}

fn check_meta(meta: &BlobMeta, kind: &str, preset: &Preset, tokenizer: &str) -> Result<()> {
    if meta.kind != kind {
        return Err(Error::Weights(format!(
            "a {} file, expected {kind}",
            meta.kind
        )));
    }
    // The joint feature picks which of the same weights' outputs is the embedding, so a file
    // loads whichever one the model uses (a `pooled` checkpoint serves as `neck` and back).
    // Flip averaging likewise.
    // A file written without the attribute head loads into a model with one: the head keeps
    // its initialisation.
    let same_weights = Preset {
        joint: preset.joint,
        flip_average: preset.flip_average,
        attribute_fields: preset.adds_attribute_head(&meta.preset),
        attribute_weight: preset.attribute_weight,
        text_bigrams: preset.adds_text_bigrams(&meta.preset),
        ..meta.preset.clone()
    };
    if same_weights != *preset {
        return Err(Error::PresetMismatch {
            expected: preset.name.clone(),
            found: meta.preset.name.clone(),
        });
    }
    if meta.tokenizer != tokenizer {
        return Err(Error::TokenizerMismatch {
            expected: tokenizer.into(),
            found: meta.tokenizer.clone(),
        });
    }
    Ok(())
}

/// True for a parameter of the attribute head when `stored` (a file's preset) has none, and
/// for the text tower's bigram table when `stored` has none: added after the file was written.
fn added_head(stored: &Preset, name: &str) -> bool {
    (stored.attribute_fields.is_empty() && name.starts_with("attr."))
        || (stored.text_bigrams == 0 && name == BIGRAMS)
}

/// The text tower's hashed bigram table. Gained by a file written without it, it starts at
/// zero, so that the model's embeddings are at first exactly the file's.
const BIGRAMS: &str = "text.bigram_embed";

/// The model's weights as safetensors bytes.
///
/// # Errors
/// Serialisation failure (not expected).
pub fn save_weights<E: Dtype, D: Device<E>>(
    model: &Plip<E, D>,
    tokenizer: &str,
    step: u64,
    extra: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let convs = conv_shapes(model);
    let tensors = model
        .state()
        .into_iter()
        .map(|(name, p)| match convs.get(&name) {
            Some(&shape) => {
                let (dt, data) = to_bytes(&conv_to_torch(&p.to_host(), shape));
                (name, dt, shape.to_vec(), data)
            }
            None => {
                let (dt, data) = to_bytes(&p.to_host());
                (name, dt, p.dims(), data)
            }
        })
        .collect();
    serialize(tensors, "weights", &model.preset, tokenizer, step, extra)
}

/// Loads weights into `model`; nothing is changed unless every tensor is present and valid.
///
/// # Errors
/// A truncated or corrupt blob, another preset, another tokenizer, a newer format.
pub fn load_weights<E: Dtype, D: Device<E>>(
    model: &mut Plip<E, D>,
    bytes: &[u8],
    tokenizer: &str,
) -> Result<BlobMeta> {
    let meta = read_meta(bytes)?;
    check_meta(&meta, "weights", &model.preset, tokenizer)?;
    let st = SafeTensors::deserialize(bytes).map_err(werr)?;
    let convs = conv_shapes(model);
    let mut values = Vec::new();
    for (name, p) in model.state() {
        if name == OPTIONAL_BUFFER && !st.names().iter().any(|n| *n == OPTIONAL_BUFFER) {
            // Written before the identity prototypes existed: none seen yet.
            values.push(vec![E::default(); p.len()]);
            continue;
        }
        if added_head(&meta.preset, &name) {
            values.push(if name == BIGRAMS {
                vec![E::default(); p.len()]
            } else {
                p.to_host()
            });
            continue;
        }
        let view = tensor(&st, &name)?;
        values.push(match convs.get(&name) {
            // Format 2: PyTorch's (O, I, kH, kW); format 1 files hold the model's own layout.
            Some(&shape) if view.shape().len() == 4 => {
                conv_from_torch(&from_view::<E>(&name, &view, &shape)?, shape)
            }
            _ => from_view::<E>(&name, &view, &p.dims())?,
        });
    }
    model.for_each_state_mut(|i, _, mut p| p.copy_from_host(&values[i]));
    Ok(meta)
}

/// The optimiser blob's metadata key for [`AdamW::text_updates`] (absent when 0, as in blobs
/// written before the text substeps).
const TEXT_UPDATES: &str = "text_updates";

fn text_updates_extra(n: u64) -> BTreeMap<String, String> {
    let mut extra = BTreeMap::new();
    if n > 0 {
        extra.insert(TEXT_UPDATES.to_string(), n.to_string());
    }
    extra
}

/// The optimiser state as safetensors bytes.
///
/// # Errors
/// Serialisation failure (not expected).
pub fn save_optimizer<E: Dtype, D: Device<E>>(
    opt: &AdamW<E, D>,
    preset: &Preset,
    tokenizer: &str,
) -> Result<Vec<u8>> {
    let mut tensors = Vec::new();
    for (name, m) in opt.names.iter().zip(&opt.moments) {
        let (m1, m2, dims) = match m {
            Moments::Vector(a, b) => (a.as_vec(), b.as_vec(), vec![a.shape().0]),
            Moments::Matrix(a, b) => (a.as_vec(), b.as_vec(), vec![a.shape().0, a.shape().1]),
        };
        let (dt, d1) = to_bytes(&m1);
        let (_, d2) = to_bytes(&m2);
        tensors.push((format!("m.{name}"), dt, dims.clone(), d1));
        tensors.push((format!("v.{name}"), dt, dims, d2));
    }
    serialize(
        tensors,
        "optimizer",
        preset,
        tokenizer,
        opt.step,
        &text_updates_extra(opt.text_updates),
    )
}

/// Loads optimiser state saved by [`save_optimizer`] into `opt` (built for the same model).
///
/// # Errors
/// As [`load_weights`].
pub fn load_optimizer<E: Dtype, D: Device<E>>(
    opt: &mut AdamW<E, D>,
    bytes: &[u8],
    preset: &Preset,
    tokenizer: &str,
) -> Result<BlobMeta> {
    let meta = read_meta(bytes)?;
    check_meta(&meta, "optimizer", preset, tokenizer)?;
    let st = SafeTensors::deserialize(bytes).map_err(werr)?;
    let mut values = Vec::new();
    for (name, m) in opt.names.iter().zip(&opt.moments) {
        let dims = match m {
            Moments::Vector(a, _) => vec![a.shape().0],
            Moments::Matrix(a, _) => vec![a.shape().0, a.shape().1],
        };
        let get = |k: String| -> Result<Vec<E>> {
            let view = tensor(&st, &k)?;
            from_view::<E>(&k, &view, &dims)
        };
        if added_head(&meta.preset, name) {
            // The head is new: its moments start at zero.
            let zeros = vec![E::default(); dims.iter().product()];
            values.push((zeros.clone(), zeros));
            continue;
        }
        values.push((get(format!("m.{name}"))?, get(format!("v.{name}"))?));
    }
    for (m, (a, b)) in opt.moments.iter_mut().zip(values) {
        match m {
            Moments::Vector(x, y) => {
                x.copy_from(&a);
                y.copy_from(&b);
            }
            Moments::Matrix(x, y) => {
                x.copy_from(&a);
                y.copy_from(&b);
            }
        }
    }
    opt.step = meta.step;
    opt.text_updates = match meta.extra.get(TEXT_UPDATES) {
        Some(v) => v
            .parse()
            .map_err(|e| Error::Weights(format!("optimizer {TEXT_UPDATES} {v:?}: {e}")))?,
        None => 0,
    };
    Ok(meta)
}

/// Copies `model`'s weights into `dst` (another device or dtype) through host memory.
pub fn copy_weights<E: Dtype, D: Device<E>, E2: Dtype, D2: Device<E2>>(
    src: &Plip<E, D>,
    dst: &mut Plip<E2, D2>,
) {
    let values: Vec<Vec<E2>> = src
        .state()
        .iter()
        .map(|(_, s)| {
            s.to_host()
                .iter()
                .map(|x| scalar(x.to_f64().unwrap_or(f64::NAN)))
                .collect()
        })
        .collect();
    dst.for_each_state_mut(|i, _, mut d| d.copy_from_host(&values[i]));
}
