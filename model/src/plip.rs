//! The PLIP model: both towers, the two pretext heads and the learnable logit scale, with the
//! total loss L = w_ivlc·L_ivlc + w_iap·L_iap + w_tic·L_tic + w_triplet·L_triplet +
//! w_supcon·L_supcon and the serving API (`embed_images`, `embed_texts`).
//!
//! The last two are identity-level image losses beside PLIP's three pretext tasks, on the
//! L2-normalised joint embedding — the one image and text queries are ranked by, so one gallery
//! index serves both: batch-hard triplet ([`loss::batch_hard_triplet`]) and supervised
//! image–image contrast within the P×K batch ([`loss::supcon`]), a classifier-free identity loss
//! that needs no per-identity weights, so the continuous trainer's growing set of people costs
//! nothing. Samples without a person id take part in PLIP's tasks only.

use crate::batch::Batch;
use crate::heads::{IapHead, IdHead, TicHead};
use crate::impl_params;
use crate::layers::Linear;
use crate::loss;
use crate::norm::{BnMode, BnStats};
use crate::params::{detach, scalar, Init, Mat, Vector};
use crate::preset::{JointFeature, Preset};
use crate::text::{padding_bias, TextEncoder, TokenBatch};
use crate::vision::ImageEncoder;
use dfdx::prelude::*;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// Initial logit scale s = 1/0.07 (CLIP's), stored as ln s.
pub const INIT_LOGIT_SCALE: f64 = 2.659_260_036_932_778_3; // ln(1/0.07)
/// Upper clamp of the logit scale: s ≤ 100.
pub const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092; // ln(100)

/// Which pretext tasks run and how each is weighted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskWeights {
    /// Weight of identity-level image–text contrast; 0 switches the task off.
    pub ivlc: f64,
    /// Weight of image-guided attribute prediction; 0 switches the task off.
    pub iap: f64,
    /// Weight of text-guided image colorization; 0 switches the task off.
    pub tic: f64,
    /// Weight of the batch-hard triplet loss on image embeddings; 0 switches it off.
    pub triplet: f64,
    /// Weight of supervised image–image contrast; 0 switches it off.
    pub supcon: f64,
    /// Weight of identity classification (BNNeck + classifier, label smoothing 0.1); 0
    /// switches it off; needs a preset with `id_classes`.
    pub id: f64,
    /// Weight of identity classification of the caption embeddings by the same classifier
    /// (CMPC, Zhang & Lu 2018: a caption of person P must point where P's images point);
    /// 0 switches it off.
    pub text_id: f64,
    /// Let IVLC's gradient reach the image tower. Off by default when identity losses train the
    /// image tower: the text tower then aligns to the identity-trained image embeddings instead
    /// of pulling them back towards its own near-uniform start (the trap in README "Quality":
    /// IVLC sat at its uniform value while the identity losses carried the image tower).
    pub ivlc_image_grad: bool,
    /// Normalise the captions in the caption-identity loss with the images' running statistics
    /// (neck in eval mode) instead of the caption batch's own (neck in train mode, running
    /// statistics untouched). Off by default: at an equal budget (200 `tiny` steps) the batch's
    /// own statistics made IVLC leave its uniform value and text→image retrieval learn, and
    /// image Rank-1/mAP were higher too (README "Quality", runs abA/abB).
    pub text_id_running_stats: bool,
    /// The caption-identity loss does not move the identity head (its BNNeck's γ, β and the
    /// classifier): captions align to the head the images train, and the image side learns as
    /// without the caption loss.
    pub text_id_detached: bool,
    /// Weight of caption–prototype contrast ([`loss::prototype_contrast`]): each caption against
    /// the identity prototypes of every person seen so far (running means of their joint image
    /// features, [`crate::heads::Prototypes`]); needs a preset with `id_classes`; 0 switches it
    /// off (and leaves the prototypes as they are).
    pub proto: f64,
    /// Weight of caption–feature alignment ([`loss::feature_alignment`]): each caption's unit
    /// embedding regressed (1 − cosine) onto the mean unit joint feature of its person's images
    /// in the batch, taken as constants, so only the text tower learns from it; 0 switches it
    /// off.
    pub text_align: f64,
    /// Weight of attribute prediction from the image's joint feature
    /// ([`loss::attribute_loss`], the attribute head shared with the captions); needs a preset
    /// with `attributes`; 0 switches it off.
    pub attr: f64,
    /// Weight of attribute prediction from the caption embeddings by the same head (through
    /// the BNNeck on the caption batch's statistics, as the caption identity loss): a caption
    /// naming a navy jacket must point where navy-jacket images point. 0 switches it off.
    pub text_attr: f64,
}

impl Default for TaskWeights {
    fn default() -> Self {
        TaskWeights {
            ivlc: 1.0,
            iap: 0.1,
            tic: 0.02,
            triplet: 1.0,
            supcon: 0.0,
            id: 1.0,
            text_id: 1.0,
            ivlc_image_grad: false,
            text_id_running_stats: false,
            text_id_detached: false,
            proto: 0.0,
            text_align: 0.0,
            // Attribute prediction from both sides (with a preset that has the attribute head):
            // image mAP 90.95% against 88.9%, text→image R@1 52.8% against 48.25% at 40,000
            // images (README "Quality", runs a1, b1 against w1).
            attr: 1.0,
            text_attr: 1.0,
        }
    }
}

impl TaskWeights {
    /// Every task off (IVLC's image gradient on): a base for `TaskWeights { ivlc: 1.0,
    /// ..TaskWeights::none() }`.
    pub fn none() -> Self {
        TaskWeights {
            ivlc: 0.0,
            iap: 0.0,
            tic: 0.0,
            triplet: 0.0,
            supcon: 0.0,
            id: 0.0,
            text_id: 0.0,
            ivlc_image_grad: true,
            text_id_running_stats: false,
            text_id_detached: false,
            proto: 0.0,
            text_align: 0.0,
            attr: 0.0,
            text_attr: 0.0,
        }
    }

    /// PLIP's three pretext tasks only (the paper's weights), no identity-level image losses.
    pub fn plip_only() -> Self {
        TaskWeights {
            triplet: 0.0,
            supcon: 0.0,
            id: 0.0,
            text_id: 0.0,
            attr: 0.0,
            text_attr: 0.0,
            ivlc_image_grad: true,
            ..Default::default()
        }
    }
    /// True when an identity-level image loss is on.
    pub fn image_losses(&self) -> bool {
        self.triplet > 0.0 || self.supcon > 0.0 || self.id > 0.0 || self.attr > 0.0
    }
}

/// The values of one evaluation of the losses (unweighted per task, weighted total).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LossValues {
    pub ivlc: Option<f64>,
    pub iap: Option<f64>,
    pub tic: Option<f64>,
    pub triplet: Option<f64>,
    pub supcon: Option<f64>,
    pub id: Option<f64>,
    pub text_id: Option<f64>,
    pub proto: Option<f64>,
    pub text_align: Option<f64>,
    #[serde(default)]
    pub attr: Option<f64>,
    #[serde(default)]
    pub text_attr: Option<f64>,
    /// Mean IVLC of the step's text substeps (the text tower alone against earlier batches'
    /// image features); not part of `total`.
    #[serde(default)]
    pub text_substeps: Option<f64>,
    pub total: f64,
}

/// L2-normalised embeddings, row-major `(rows, dim)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub rows: usize,
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Embeddings {
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// The dual encoder with its pretext heads.
#[derive(Clone, Debug)]
pub struct Plip<E: Dtype, D: Device<E>> {
    pub image: ImageEncoder<E, D>,
    pub text: TextEncoder<E, D>,
    pub iap: IapHead<E, D>,
    pub tic: TicHead<E, D>,
    /// The identity classifier (presets with `id_classes`).
    pub id: Option<IdHead<E, D>>,
    pub logit_scale: Vector<E, D>,
    /// The attribute head (presets with `attributes`): the joint feature → one logit per
    /// attribute value, shared by images and captions.
    pub attr: Option<Linear<E, D>>,
    pub preset: Preset,
    pub dev: D,
}
impl_params!(Plip {
    image,
    text,
    iap,
    tic,
    id,
    logit_scale,
    attr
});

impl<E: Dtype, D: Device<E>> Plip<E, D> {
    /// A freshly initialised model; the same seed gives the same weights on every device.
    ///
    /// # Errors
    /// An inconsistent preset.
    pub fn new(dev: &D, preset: &Preset, seed: u64) -> crate::Result<Self> {
        preset.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut init = Init { dev, rng: &mut rng };
        // Fields are initialised in the literal's order; the attribute head comes last, then
        // the text tower's bigram table, so the other weights are the same with and without
        // them.
        let mut plip = Plip {
            image: ImageEncoder::new(&mut init, preset),
            text: TextEncoder::new(&mut init, preset),
            iap: IapHead::new(&mut init, preset),
            tic: TicHead::new(&mut init, preset),
            id: (preset.id_classes > 0)
                .then(|| IdHead::new(&mut init, preset.embed, preset.id_classes)),
            logit_scale: init.fill(1, INIT_LOGIT_SCALE),
            attr: (preset.attributes() > 0)
                .then(|| Linear::new(&mut init, preset.embed, preset.attributes())),
            preset: preset.clone(),
            dev: dev.clone(),
        };
        if preset.text_bigrams > 0 {
            plip.text.bigram_embed = Some(init.normal(preset.text_bigrams, preset.dim, 0.02));
        }
        Ok(plip)
    }

    fn to_e(v: &[f32]) -> Vec<E> {
        v.iter().map(|&x| scalar::<E>(x as f64)).collect()
    }

    fn images_tensor(&self, data: &[f32], n: usize) -> Tensor<(usize, usize, usize, usize), E, D> {
        let p = &self.preset;
        self.dev
            .tensor_from_vec(Self::to_e(data), (n, 3, p.image_height, p.image_width))
    }

    /// The logit scale s = exp(min(ln s, ln 100)) as a scalar tensor.
    pub fn scale<T: Tape<E, D>>(&self) -> Tensor<(), E, D, T> {
        self.logit_scale
            .retaped::<T>()
            .clamp(-MAX_LOGIT_SCALE, MAX_LOGIT_SCALE)
            .exp()
            .reshape_like(&())
    }

    /// IVLC of `captions` against constant joint image features (`features`, one row of
    /// `dim` per caption; `ids` the captions' identities): the loss of a text substep, whose
    /// gradient reaches the text tower and the logit scale only.
    ///
    /// # Errors
    /// Features that do not hold one row per caption.
    pub fn text_substep_loss<T: Tape<E, D>>(
        &self,
        captions: &TokenBatch,
        features: &[f64],
        dim: usize,
        ids: &[Option<u64>],
        tape: T,
    ) -> crate::Result<Tensor<(), E, D, T>> {
        let rows = captions.batch;
        if ids.len() != rows || features.len() != rows * dim || captions.len > self.preset.text_len
        {
            return Err(crate::Error::Shape(format!(
                "text substep: {rows} captions of {} tokens, {} identities, {} feature values of width {dim}",
                captions.len,
                ids.len(),
                features.len()
            )));
        }
        let text = self.text.embed(&self.dev, captions, tape);
        let values: Vec<E> = features.iter().map(|&x| scalar::<E>(x)).collect();
        let img = self
            .dev
            .tensor_from_vec(values, (rows, dim))
            .put_tape(T::default());
        let q = loss::identity_targets(ids);
        Ok(loss::ivlc(img, text, self.scale::<T>(), &q))
    }

    /// The weighted total loss of a batch (with its tape, for `backward`) and the values.
    ///
    /// `tape` starts the gradient record (a traced tensor's tape, or `NoneTape` to evaluate).
    ///
    /// # Errors
    /// All tasks switched off, or a batch that does not match the preset.
    pub fn losses<T: Tape<E, D>>(
        &self,
        batch: &Batch,
        weights: &TaskWeights,
        tape: T,
    ) -> crate::Result<(Tensor<(), E, D, T>, LossValues)> {
        self.losses_with_stats(batch, weights, tape, None)
    }

    /// As [`Plip::losses`]; the colour pass's BatchNorm batch statistics go into `stats` (the
    /// trainer folds them into the running statistics after the update).
    ///
    /// # Errors
    /// As [`Plip::losses`].
    pub fn losses_with_stats<T: Tape<E, D>>(
        &self,
        batch: &Batch,
        weights: &TaskWeights,
        tape: T,
        stats: Option<&BnStats>,
    ) -> crate::Result<(Tensor<(), E, D, T>, LossValues)> {
        let p = &self.preset;
        let n = batch.n;
        if weights.ivlc <= 0.0
            && weights.iap <= 0.0
            && weights.tic <= 0.0
            && weights.text_id <= 0.0
            && weights.proto <= 0.0
            && weights.text_align <= 0.0
            && weights.text_attr <= 0.0
            && !weights.image_losses()
        {
            return Err(crate::Error::Config(
                "every training task is switched off".into(),
            ));
        }
        if batch.images.len() != n * p.image_len() || batch.tokens.len > p.text_len {
            return Err(crate::Error::Shape(format!(
                "batch does not match preset {}: {} image values for {n} samples, {} tokens",
                p.name,
                batch.images.len(),
                batch.tokens.len
            )));
        }
        let mut values = LossValues::default();
        let mut terms: Vec<Tensor<(), E, D, T>> = Vec::new();
        let read = |t: &Tensor<(), E, D, T>| t.as_vec()[0].to_f64().unwrap_or(f64::NAN);

        // Colour image pass: its pooled feature feeds IVLC, IAP and the image losses.
        let iap_active = weights.iap > 0.0 && !batch.iap_positions.is_empty();
        if weights.ivlc <= 0.0
            && weights.tic <= 0.0
            && weights.text_id <= 0.0
            && weights.proto <= 0.0
            && weights.text_align <= 0.0
            && weights.text_attr <= 0.0
            && !iap_active
            && !weights.image_losses()
        {
            return Err(crate::Error::Shape(
                "only IAP is on and no caption in the batch has an attribute phrase".into(),
            ));
        }
        let mut kept = tape;
        let aligned = weights.ivlc > 0.0 || weights.proto > 0.0 || weights.text_align > 0.0;
        let pooled = if aligned || iap_active || weights.image_losses() {
            let images = self.images_tensor(&batch.images, n).put_tape(T::default());
            let (pooled, tape) = self.image.pooled(images, BnMode::Train(stats)).split_tape();
            kept = kept.merge(tape);
            Some(pooled)
        } else {
            None
        };
        // The joint image embedding, shared by IVLC and the image losses.
        let img_emb = match &pooled {
            Some(pooled) if aligned || weights.image_losses() => {
                let (e, tape) = self.image.project(pooled.retaped::<T>()).split_tape();
                kept = kept.merge(tape);
                Some(e)
            }
            _ => None,
        };

        // Caption pass: its embedding feeds IVLC, TIC and the caption identity loss.
        let need_text =
            aligned || weights.tic > 0.0 || weights.text_id > 0.0 || weights.text_attr > 0.0;
        // With extra captions ([`Batch::add_captions`]) one pass embeds them all: `all_text`
        // feeds IVLC and the caption identity loss, `text_emb` (each sample's own caption)
        // the rest.
        let caption_rows = batch.caption_rows();
        let (text_emb, all_text) = if need_text {
            let (t, tape) = self
                .text
                .embed(&self.dev, &batch.all_captions(), T::default())
                .split_tape();
            kept = kept.merge(tape);
            if caption_rows.len() > n {
                // A gather, not `slice`: dfdx 0.13's slice backward assigns the slice's
                // gradient instead of adding it, wiping what the other uses of `t` put there.
                let rows = self.dev.tensor_from_vec((0..n).collect::<Vec<_>>(), (n,));
                let (own, tape) = t.retaped::<T>().gather(rows).split_tape();
                kept = kept.merge(tape);
                (Some(own), Some(t))
            } else {
                (Some(t.clone()), Some(t))
            }
        } else {
            (None, None)
        };
        let caption_ids: Vec<Option<u64>> =
            caption_rows.iter().map(|&r| batch.identities[r]).collect();
        let caption_persons: Vec<Option<u64>> =
            caption_rows.iter().map(|&r| batch.persons[r]).collect();

        if let (true, Some(text_all), Some(img)) = (weights.ivlc > 0.0, &all_text, &img_emb) {
            // The joint feature: the embedding itself, or its BNNeck on this batch's statistics
            // (the identity loss's pass already folds them into the running ones).
            let img = self.neck_joint(img.retaped::<T>(), BnMode::Train(None));
            if let Some(stats) = stats {
                let dim = img.shape().1;
                let host = img.as_vec();
                let host = host.iter().map(|x| x.to_f64().unwrap_or(f64::NAN));
                *stats.joint.borrow_mut() = (host.collect(), dim);
            }
            let img = if weights.ivlc_image_grad || !weights.image_losses() {
                img
            } else {
                // IVLC's gradient stops here.
                detach(&img).put_tape(T::default())
            };
            // One image row per caption: a sample with k captions stands k times in the
            // similarity matrix (with equal k per sample this is CMPM over all the captions).
            let img = if caption_rows.len() > n {
                let idx = self
                    .dev
                    .tensor_from_vec(caption_rows.clone(), (caption_rows.len(),));
                img.gather(idx)
            } else {
                img
            };
            let q = loss::identity_targets(&caption_ids);
            let l = loss::ivlc(img, text_all.retaped::<T>(), self.scale::<T>(), &q);
            values.ivlc = Some(read(&l));
            terms.push(l * scalar::<E>(weights.ivlc));
        }
        if let (true, Some(head), Some(text_emb), Some(img)) =
            (weights.proto > 0.0, &self.id, &text_emb, &img_emb)
        {
            // The batch's unit joint features by identity row (constants: the prototypes only
            // teach the text tower), folded into the prototypes the loss ranks against.
            let joint = self.neck_joint(detach(img), BnMode::Train(None));
            let e = joint.shape().1;
            let host = joint.as_vec();
            let classes = head.classes() as u64;
            let features: Vec<(usize, Vec<f64>)> = batch
                .persons
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    let key = (*p)?;
                    let f: Vec<f64> = host[i * e..(i + 1) * e]
                        .iter()
                        .map(|x| x.to_f64().unwrap_or(f64::NAN))
                        .collect();
                    let norm = f.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                    Some((
                        (key % classes) as usize,
                        f.iter().map(|x| x / norm).collect(),
                    ))
                })
                .collect();
            let (rows, protos) = head.prototypes.seen_with(&features);
            let targets: Vec<Option<usize>> = batch
                .persons
                .iter()
                .map(|p| {
                    let row = ((*p)? % classes) as usize;
                    rows.binary_search(&row).ok()
                })
                .collect();
            if let Some(stats) = stats {
                stats.prototypes.borrow_mut().extend(features);
            }
            let l = loss::prototype_contrast(
                text_emb.retaped::<T>(),
                &protos,
                &targets,
                self.scale::<T>(),
            );
            if let Some(l) = l {
                values.proto = Some(read(&l));
                terms.push(l * scalar::<E>(weights.proto));
            }
        }
        if let (true, Some(text_all), Some(img)) = (weights.text_align > 0.0, &all_text, &img_emb) {
            // Targets: per caption, the mean unit joint feature of its person's images in the
            // batch (its own image's when it has no person id), constants.
            let joint = self.neck_joint(detach(img), BnMode::Train(None));
            let e = joint.shape().1;
            let host: Vec<f64> = joint
                .as_vec()
                .iter()
                .map(|x| x.to_f64().unwrap_or(f64::NAN))
                .collect();
            let targets = loss::person_means(&host, e, &batch.persons, &caption_rows);
            let l = loss::feature_alignment(text_all.retaped::<T>(), &targets);
            values.text_align = Some(read(&l));
            terms.push(l * scalar::<E>(weights.text_align));
        }
        if let (true, Some(pooled)) = (iap_active, &pooled) {
            let (b, s) = (batch.masked.batch, batch.masked.len);
            let hidden = self.text.hidden(&self.dev, &batch.masked, T::default());
            let bias = padding_bias(&self.dev, &batch.masked);
            let logits = self.iap.forward(
                &self.dev,
                hidden,
                self.image.text_width(pooled.retaped::<T>()),
                b,
                s,
                bias.as_ref(),
                &batch.iap_positions,
            );
            let l = loss::cross_entropy(logits, &batch.iap_labels);
            values.iap = Some(read(&l));
            terms.push(l * scalar::<E>(weights.iap));
        }
        if let (true, Some(text_emb)) = (weights.tic > 0.0, &text_emb) {
            let gray = self.images_tensor(&batch.gray, n).put_tape(T::default());
            // Batch statistics, but the running ones are not updated by the grayscale pass.
            let out = self.image.tokens(gray, BnMode::Train(None));
            let pred = self
                .tic
                .forward(out.tokens, text_emb.retaped::<T>(), out.b, out.n);
            let target = self.dev.tensor_from_vec(
                Self::to_e(&batch.tic_target),
                (n * p.num_patches(), p.tic_len()),
            );
            let l = loss::mse(pred, target);
            values.tic = Some(read(&l));
            terms.push(l * scalar::<E>(weights.tic));
        }
        if let Some(img) = &img_emb {
            let pairs = loss::IdentityPairs::new(&batch.persons);
            if weights.triplet > 0.0 && pairs.has_triplets() {
                let l = loss::batch_hard_triplet(img.retaped::<T>(), &pairs, loss::TRIPLET_MARGIN);
                values.triplet = Some(read(&l));
                terms.push(l * scalar::<E>(weights.triplet));
            }
            if weights.supcon > 0.0 && pairs.has_positives() {
                let l = loss::supcon(img.retaped::<T>(), &pairs, loss::SUPCON_TEMPERATURE);
                values.supcon = Some(read(&l));
                terms.push(l * scalar::<E>(weights.supcon));
            }
            if let (true, Some(head)) = (weights.id > 0.0, &self.id) {
                let logits = head.forward(img.retaped::<T>(), BnMode::Train(stats));
                if let Some(l) = loss::id_loss(logits, &batch.persons, loss::ID_LABEL_SMOOTHING) {
                    values.id = Some(read(&l));
                    terms.push(l * scalar::<E>(weights.id));
                }
            }
        }
        if let (true, Some(head), Some(text_all)) = (weights.text_id > 0.0, &self.id, &all_text) {
            // By default the captions are normalised by their own batch (the running statistics
            // stay the images'); the images' running statistics instead kept IVLC at its
            // uniform value in the equal-budget A/B (see `text_id_running_stats`).
            let mode = if weights.text_id_running_stats {
                BnMode::Eval
            } else {
                BnMode::Train(None)
            };
            let logits = if weights.text_id_detached {
                head.detached().forward(text_all.retaped::<T>(), mode)
            } else {
                head.forward(text_all.retaped::<T>(), mode)
            };
            if let Some(l) = loss::id_loss(logits, &caption_persons, loss::ID_LABEL_SMOOTHING) {
                values.text_id = Some(read(&l));
                terms.push(l * scalar::<E>(weights.text_id));
            }
        }
        if let Some(head) = &self.attr {
            // The head reads unit features (scaled back to a BatchNorm output's norm), the
            // image's joint feature and the caption embedding alike: what retrieval compares,
            // and the same at serving time, where a caption has no batch to normalise with.
            let labels: Vec<&[crate::batch::AttributeLabel]> =
                batch.attributes.iter().map(Vec::as_slice).collect();
            if let (true, Some(img)) = (weights.attr > 0.0, &img_emb) {
                let feature = self.neck_joint(img.retaped::<T>(), BnMode::Train(None));
                let logits = head.forward(self.attribute_input(feature));
                if let Some(l) = loss::attribute_loss(logits, &labels) {
                    values.attr = Some(read(&l));
                    terms.push(l * scalar::<E>(weights.attr));
                }
            }
            if let (true, Some(text_all)) = (weights.text_attr > 0.0, &all_text) {
                let caption_labels: Vec<&[crate::batch::AttributeLabel]> =
                    caption_rows.iter().map(|&r| labels[r]).collect();
                let logits = head.forward(self.attribute_input(text_all.retaped::<T>()));
                if let Some(l) = loss::attribute_loss(logits, &caption_labels) {
                    values.text_attr = Some(read(&l));
                    terms.push(l * scalar::<E>(weights.text_attr));
                }
            }
        }
        let mut total = terms
            .pop()
            .ok_or_else(|| crate::Error::Shape("no loss term".into()))?;
        for t in terms {
            total = total + t;
        }
        let (total, tape) = total.split_tape();
        let total = total.put_tape(tape.merge(kept));
        values.total = read(&total);
        Ok((total, values))
    }

    /// The attribute head's input: unit rows scaled by √embed (the norm of a BatchNorm output
    /// of that width).
    fn attribute_input<T: Tape<E, D>>(&self, x: Mat<E, D, T>) -> Mat<E, D, T> {
        let scale = (self.preset.embed as f64).sqrt();
        loss::l2_normalize(x) * scalar::<E>(scale)
    }

    /// Per-field attribute probabilities `(rows, values)` of unnormalised features, row-major
    /// (each field's values sum to 1); `None` without the attribute head.
    fn attribute_probs(&self, features: Mat<E, D>) -> Option<Vec<f32>> {
        let head = self.attr.as_ref()?;
        let logits = head.forward(self.attribute_input(features));
        let values = self.preset.attributes();
        let mut out: Vec<f32> = logits
            .as_vec()
            .iter()
            .map(|x| x.to_f32().unwrap_or(f32::NAN))
            .collect();
        for row in out.chunks_mut(values) {
            let mut start = 0;
            for &len in &self.preset.attribute_fields {
                let field = &mut row[start..start + len];
                let max = field.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                field.iter_mut().for_each(|x| *x = (*x - max).exp());
                let sum: f32 = field.iter().sum();
                field.iter_mut().for_each(|x| *x /= sum);
                start += len;
            }
        }
        Some(out)
    }

    /// Re-estimates the BNNeck's running statistics from the eval-mode pooled features of
    /// `images` (normalised `(n, 3, H, W)`, clean: no augmentation), `batch_size` at a time:
    /// their mean and unbiased variance replace the running ones. During training the neck
    /// normalises each batch of *augmented* images by that batch's own statistics, and its
    /// running statistics average those; clean images embedded in eval mode sit elsewhere, so
    /// the joint feature the captions and the attribute head were trained against carries a
    /// common offset at serving time. After calibration a clean image's neck feature is
    /// normalised as a training batch's was. Returns the number of images used; nothing
    /// changes without the identity head (no neck) or with fewer than two images.
    pub fn calibrate_neck(&mut self, images: &[f32], batch_size: usize) -> usize {
        let len = self.preset.image_len();
        let n = images.len() / len.max(1);
        if n < 2 || self.id.is_none() {
            return 0;
        }
        let c = self.preset.embed;
        let mut sum = vec![0f64; c];
        let mut sq = vec![0f64; c];
        for chunk in images[..n * len].chunks(batch_size.max(1) * len) {
            let rows = chunk.len() / len;
            let pooled = self
                .image
                .embed(self.images_tensor(chunk, rows), BnMode::Eval);
            for row in pooled.as_vec().chunks(c) {
                for (j, x) in row.iter().enumerate() {
                    let x = x.to_f64().unwrap_or(0.0);
                    sum[j] += x;
                    sq[j] += x * x;
                }
            }
        }
        let nf = n as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / nf).collect();
        let var: Vec<f64> = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| ((q / nf - m * m) * nf / (nf - 1.0)).max(0.0))
            .collect();
        if let Some(head) = &mut self.id {
            // Momentum 1: the new statistics replace the old.
            head.neck.update_running(&mean, &var, 1.0);
        }
        n
    }

    /// The attribute head's per-field probabilities for normalised `(n, 3, H, W)` images
    /// (from the joint feature, eval mode), `(n, values)` row-major; `None` without the head.
    pub fn image_attributes(&self, images: &[f32], batch_size: usize) -> Option<Vec<f32>> {
        self.attr.as_ref()?;
        let len = self.preset.image_len();
        let mut out = Vec::new();
        for chunk in images.chunks(batch_size.max(1) * len) {
            let n = chunk.len() / len;
            let pooled = self.image.embed(self.images_tensor(chunk, n), BnMode::Eval);
            out.extend(self.attribute_probs(self.neck_joint(pooled, BnMode::Eval))?);
        }
        Some(out)
    }

    /// The attribute head's per-field probabilities for captions, `(rows, values)` row-major;
    /// `None` without the head.
    pub fn text_attributes(&self, tokens: &TokenBatch, batch_size: usize) -> Option<Vec<f32>> {
        self.attr.as_ref()?;
        let bs = batch_size.max(1);
        let mut out = Vec::new();
        for start in (0..tokens.batch).step_by(bs) {
            let rows = bs.min(tokens.batch - start);
            let chunk = tokens.rows(start, rows);
            let e = self.text.embed(&self.dev, &chunk, NoneTape);
            out.extend(self.attribute_probs(e)?);
        }
        Some(out)
    }

    /// The image feature captions align to: the embedding itself, or its BNNeck when the
    /// preset says `joint = neck` or `both`.
    fn neck_joint<T: Tape<E, D>>(&self, emb: Mat<E, D, T>, mode: BnMode<'_>) -> Mat<E, D, T> {
        match (self.preset.joint, &self.id) {
            (JointFeature::Neck | JointFeature::Both, Some(head)) => head.neck.forward(emb, mode),
            _ => emb,
        }
    }

    /// L2-normalised image embeddings of normalised `(n, 3, H, W)` images, `batch_size` at a
    /// time, [`Preset::index_dim`] wide (the gallery's rows and image queries alike); with
    /// [`Preset::flip_average`] the normalised sum of an image's embedding and its mirror
    /// image's. With the `both` joint feature a row is `[pooled ; neck] / sqrt 2` of the two
    /// unit features, so the dot product of two rows is the mean of the two cosine
    /// similarities.
    pub fn embed_images(&self, images: &[f32], batch_size: usize) -> Embeddings {
        let embed = self.preset.embed.max(1);
        // Each feature to a unit vector times `share`.
        let unit = |data: &mut [f32], share: f32| {
            for part in data.chunks_mut(embed) {
                let norm = part.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                part.iter_mut().for_each(|x| *x *= share / norm);
            }
        };
        let (mut out, mut readings) = self.embed_images_once(images, batch_size);
        if self.preset.flip_average {
            let w = self.preset.image_width;
            let (mut mirrored, mirrored_readings) =
                self.embed_images_once(&crate::batch::mirror(images, w), batch_size);
            unit(&mut out.data, 1.0);
            unit(&mut mirrored.data, 1.0);
            out.data
                .iter_mut()
                .zip(&mirrored.data)
                .for_each(|(a, b)| *a += b);
            if let (Some(r), Some(m)) = (&mut readings, mirrored_readings) {
                r.iter_mut().zip(m).for_each(|(a, b)| *a = 0.5 * (*a + b));
            }
        }
        // The parts scaled so that the whole row is a unit vector.
        let parts = (out.dim / embed).max(1);
        unit(&mut out.data, 1.0 / (parts as f32).sqrt());
        self.with_readings(out, readings)
    }

    /// `rows` with each row's attribute readings appended, scaled by √(λ/F), so that the dot
    /// product of two rows adds λ times the expected fraction of the F fields on which they
    /// agree ([`Preset::attribute_weight`]); `rows` unchanged when agreement does not rank.
    fn with_readings(&self, rows: Embeddings, readings: Option<Vec<f32>>) -> Embeddings {
        let values = self.preset.agreement_dim();
        let (Some(readings), true) = (readings, values > 0) else {
            return rows;
        };
        let fields = self.preset.attribute_fields.len().max(1) as f64;
        let scale = (self.preset.attribute_weight / fields).sqrt() as f32;
        let dim = rows.dim + values;
        let mut data = Vec::with_capacity(rows.rows * dim);
        for (row, reading) in rows
            .data
            .chunks(rows.dim.max(1))
            .zip(readings.chunks(values))
        {
            data.extend_from_slice(row);
            data.extend(reading.iter().map(|x| x * scale));
        }
        Embeddings {
            rows: rows.rows,
            dim,
            data,
        }
    }

    /// Each image's joint feature(s), unnormalised: `embed` wide, or pooled and neck side by
    /// side for the `both` joint feature; with the attribute readings when agreement ranks.
    fn embed_images_once(
        &self,
        images: &[f32],
        batch_size: usize,
    ) -> (Embeddings, Option<Vec<f32>>) {
        let len = self.preset.image_len();
        let rows = images.len() / len;
        let embed = self.preset.embed;
        let dim = self.preset.joint_dim();
        let agreement = self.preset.agreement_dim() > 0;
        let mut data = Vec::with_capacity(rows * dim);
        let mut readings = Vec::new();
        let host = |t: &Mat<E, D, NoneTape>| -> Vec<f32> {
            t.as_vec()
                .iter()
                .map(|x| x.to_f32().unwrap_or(f32::NAN))
                .collect()
        };
        for chunk in images.chunks(batch_size.max(1) * len) {
            let n = chunk.len() / len;
            let pooled = self.image.embed(self.images_tensor(chunk, n), BnMode::Eval);
            let joint = self.neck_joint(pooled.clone(), BnMode::Eval);
            if agreement {
                readings.extend(self.attribute_probs(joint.clone()).unwrap_or_default());
            }
            match (self.preset.joint, &self.id) {
                (JointFeature::Both, Some(_)) => {
                    let neck = host(&joint);
                    let pooled = host(&pooled);
                    for r in 0..n {
                        data.extend_from_slice(&pooled[r * embed..(r + 1) * embed]);
                        data.extend_from_slice(&neck[r * embed..(r + 1) * embed]);
                    }
                }
                _ => data.extend(host(&joint)),
            }
        }
        let readings =
            (agreement && readings.len() == rows * self.preset.attributes()).then_some(readings);
        (Embeddings { rows, dim, data }, readings)
    }

    /// L2-normalised caption embeddings, `batch_size` captions at a time; each chunk is cut to
    /// its longest caption (padding never changes an embedding). [`Preset::index_dim`] wide:
    /// with the `both` joint feature a row is `[0 ; sqrt 2 · caption]`, so its dot product
    /// with a gallery row of [`Self::embed_images`] is exactly the cosine similarity of the
    /// caption and the image's neck feature.
    pub fn embed_texts(&self, tokens: &TokenBatch, batch_size: usize) -> Embeddings {
        let both = self.preset.joint == JointFeature::Both;
        let embed = self.preset.embed;
        let mut data = Vec::with_capacity(tokens.batch * self.preset.joint_dim());
        let agreement = self.preset.agreement_dim() > 0;
        let mut readings = Vec::new();
        let bs = batch_size.max(1);
        for start in (0..tokens.batch).step_by(bs) {
            let rows = bs.min(tokens.batch - start);
            let chunk = tokens.rows(start, rows);
            let raw = self.text.embed(&self.dev, &chunk, NoneTape);
            if agreement {
                readings.extend(self.attribute_probs(raw.clone()).unwrap_or_default());
            }
            let e = loss::l2_normalize(raw);
            let e: Vec<f32> = e
                .as_vec()
                .iter()
                .map(|x| x.to_f32().unwrap_or(f32::NAN))
                .collect();
            if both {
                for row in e.chunks(embed.max(1)) {
                    data.extend(std::iter::repeat_n(0.0, embed));
                    data.extend(row.iter().map(|x| x * std::f32::consts::SQRT_2));
                }
            } else {
                data.extend(e);
            }
        }
        let rows = Embeddings {
            rows: tokens.batch,
            dim: self.preset.joint_dim(),
            data,
        };
        let readings = (agreement && readings.len() == tokens.batch * self.preset.attributes())
            .then_some(readings);
        self.with_readings(rows, readings)
    }

    /// The current logit scale s.
    pub fn logit_scale_value(&self) -> f64 {
        self.logit_scale.as_vec()[0]
            .to_f64()
            .unwrap_or(f64::NAN)
            .min(MAX_LOGIT_SCALE)
            .exp()
    }
}
