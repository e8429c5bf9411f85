//! One training step: losses → backward → skip if non-finite → clip → AdamW at the scheduled
//! learning rate. The `Trainer` owns the model, the optimiser and the counters that a
//! checkpoint must carry.

use crate::batch::{mask_ratio, Batch};
use crate::norm::{apply_stats, BnStats};
use crate::optim::{AdamW, OptimConfig};
use crate::params::{ParamMut, ParamRef, Params};
use crate::plip::{LossValues, Plip, TaskWeights, MAX_LOGIT_SCALE};
use crate::text::TokenBatch;
use crate::Result;
use dfdx::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Everything that shapes training besides the data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub optim: OptimConfig,
    pub tasks: TaskWeights,
    /// Steps over which the IAP mask ratio rises from 0.2 to 0.8 (√ curriculum).
    pub ramp_steps: u64,
    /// Text substeps: after each step the text tower alone takes one more update against each
    /// of the last `text_substeps` batches' captions and their (then) joint image features,
    /// kept in memory; no image is read or encoded for them (0 = off). The memory starts
    /// empty in a new process, so a resumed run differs from an uninterrupted one in the first
    /// `text_substeps` steps after the restart.
    #[serde(default)]
    pub text_substeps: u32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optim: OptimConfig::default(),
            tasks: TaskWeights::default(),
            ramp_steps: 10_000,
            text_substeps: 0,
        }
    }
}

impl TrainConfig {
    /// The IAP mask ratio for the batch of step `step`.
    pub fn mask_ratio(&self, step: u64) -> f64 {
        mask_ratio(step, self.ramp_steps)
    }
}

/// The gradients of one batch (none when the loss was not finite), the loss values, and the
/// BatchNorm batch statistics.
pub type StepGradients<E, D> = (Option<Gradients<E, D>>, LossValues, BnStats);

/// What one call to [`Trainer::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Updates applied so far (unchanged when the step was skipped).
    pub step: u64,
    /// Learning rate used.
    pub lr: f64,
    pub losses: LossValues,
    /// Global gradient norm before clipping (NaN when the loss itself was non-finite).
    pub grad_norm: f64,
    /// True when the loss or the gradients were not finite and nothing was updated.
    pub skipped: bool,
}

/// Model + optimiser + counters.
pub struct Trainer<E: Dtype, D: Device<E>> {
    pub model: Plip<E, D>,
    pub opt: AdamW<E, D>,
    pub cfg: TrainConfig,
    /// Steps skipped because of a non-finite loss or gradient.
    pub skipped_steps: u64,
    /// The last batches' captions and joint image features, newest last, for the text
    /// substeps ([`TrainConfig::text_substeps`]).
    pub text_memory: VecDeque<TextMemory>,
}

/// One batch remembered for the text substeps: its captions, their identities and the joint
/// image feature of each caption's image as the batch's step computed it.
#[derive(Debug, Clone)]
pub struct TextMemory {
    pub captions: TokenBatch,
    pub ids: Vec<Option<u64>>,
    /// `captions.batch × dim`, row-major.
    pub features: Vec<f64>,
    pub dim: usize,
}

impl<E: Dtype, D: Device<E>> Trainer<E, D> {
    pub fn new(model: Plip<E, D>, cfg: TrainConfig) -> Self {
        let opt = AdamW::new(&model);
        Trainer {
            model,
            opt,
            cfg,
            skipped_steps: 0,
            text_memory: VecDeque::new(),
        }
    }

    /// A gradient record with a zeroed slot for every parameter, so parameters a disabled task
    /// does not reach still get a (zero) gradient.
    pub fn start_tape(&self) -> Result<OwnedTape<E, D>> {
        let mut grads = Gradients::leaky();
        for (_, p) in self.model.params() {
            match p {
                ParamRef::Vector(t) => grads.try_alloc_for(t),
                ParamRef::Matrix(t) => grads.try_alloc_for(t),
            }
            .map_err(|e| crate::Error::Device(format!("{e:?}")))?;
        }
        let (_, tape) = ZerosTensor::<E>::zeros_like(&self.model.dev, &())
            .traced(grads)
            .split_tape();
        Ok(tape)
    }

    /// Gradients of the weighted total loss for one batch, and the loss values.
    ///
    /// # Errors
    /// A batch that does not fit the model.
    pub fn gradients(&self, batch: &Batch) -> Result<(Option<Gradients<E, D>>, LossValues)> {
        let (grads, values, _) = self.gradients_and_stats(batch)?;
        Ok((grads, values))
    }

    /// As [`Trainer::gradients`], with the BatchNorm batch statistics of the colour pass.
    ///
    /// # Errors
    /// As [`Trainer::gradients`].
    pub fn gradients_and_stats(&self, batch: &Batch) -> Result<StepGradients<E, D>> {
        let stats = BnStats::default();
        let (total, values) = self.model.losses_with_stats(
            batch,
            &self.cfg.tasks,
            self.start_tape()?,
            Some(&stats),
        )?;
        if !values.total.is_finite() {
            return Ok((None, values, stats));
        }
        Ok((Some(total.backward()), values, stats))
    }

    /// One optimisation step.
    ///
    /// # Errors
    /// A batch that does not fit the model.
    pub fn step(&mut self, batch: &Batch) -> Result<StepReport> {
        let lr = self.cfg.optim.lr_at(self.opt.step);
        let (grads, losses, stats) = self.gradients_and_stats(batch)?;
        let mut report = StepReport {
            step: self.opt.step,
            lr,
            losses,
            grad_norm: f64::NAN,
            skipped: true,
        };
        // A non-finite activation can vanish from the loss behind a ReLU (max(0, NaN) = 0) but
        // not from the batch statistics: either skips the step.
        let Some(grads) = grads.filter(|_| stats.is_finite()) else {
            self.skipped_steps += 1;
            return Ok(report);
        };
        let g = AdamW::gradients(&self.model, &grads);
        drop(grads);
        let info = AdamW::<E, D>::clip_info(&g, self.cfg.optim.clip_norm);
        report.grad_norm = info.norm;
        if !info.norm.is_finite() {
            self.skipped_steps += 1;
            return Ok(report);
        }
        let scales = if self.cfg.optim.clip_per_tower {
            let (rest, text) =
                AdamW::<E, D>::clip_info_per_tower(&g, &self.opt.names, self.cfg.optim.clip_norm);
            (rest.scale, text.scale)
        } else {
            (info.scale, info.scale)
        };
        self.opt
            .update_sides(&mut self.model, g, scales, lr, &self.cfg.optim)?;
        // Running statistics and prototypes move only with an applied update (a skipped step
        // leaves them).
        let prototypes = stats.prototypes.take();
        let (joint, dim) = stats.joint.take();
        apply_stats(&mut self.model, stats);
        if let Some(head) = self.model.id.as_mut() {
            head.prototypes.update(&prototypes);
        }
        self.clamp_logit_scale();
        report.step = self.opt.step;
        report.skipped = false;
        if self.cfg.text_substeps > 0 {
            report.losses.text_substeps = self.text_substeps(lr)?;
            self.remember(batch, joint, dim);
        }
        Ok(report)
    }

    /// Keeps the batch's captions and joint features for the next steps' text substeps.
    fn remember(&mut self, batch: &Batch, joint: Vec<f64>, dim: usize) {
        let rows = batch.caption_rows();
        if dim == 0 || joint.len() != batch.n * dim || joint.iter().any(|x| !x.is_finite()) {
            return;
        }
        let features = rows
            .iter()
            .flat_map(|&r| joint[r * dim..(r + 1) * dim].iter().copied())
            .collect();
        self.text_memory.push_back(TextMemory {
            captions: batch.all_captions().into_owned(),
            ids: rows.iter().map(|&r| batch.identities[r]).collect(),
            features,
            dim,
        });
        while self.text_memory.len() > self.cfg.text_substeps as usize {
            self.text_memory.pop_front();
        }
    }

    /// One update of the text tower alone per remembered batch, oldest first, at the text
    /// tower's learning rate of the step just applied (`lr` its scheduled rate); the mean loss,
    /// or `None` when nothing is remembered yet. A substep whose loss or gradient is not finite
    /// is skipped.
    fn text_substeps(&mut self, lr: f64) -> Result<Option<f64>> {
        let memory = std::mem::take(&mut self.text_memory);
        let result = self.text_substeps_on(&memory, lr);
        self.text_memory = memory;
        result
    }

    fn text_substeps_on(&mut self, memory: &VecDeque<TextMemory>, lr: f64) -> Result<Option<f64>> {
        let mut sum = 0.0;
        let mut count = 0usize;
        for m in memory {
            let loss = self.model.text_substep_loss(
                &m.captions,
                &m.features,
                m.dim,
                &m.ids,
                self.start_tape()?,
            )?;
            let value = loss.as_vec()[0].to_f64().unwrap_or(f64::NAN);
            if !value.is_finite() {
                continue;
            }
            let grads = loss.backward();
            let g = AdamW::gradients(&self.model, &grads);
            drop(grads);
            let (_, text) =
                AdamW::<E, D>::clip_info_per_tower(&g, &self.opt.names, self.cfg.optim.clip_norm);
            if !text.norm.is_finite() {
                continue;
            }
            self.opt
                .update_text_only(&mut self.model, g, text.scale, lr, &self.cfg.optim)?;
            sum += value;
            count += 1;
        }
        Ok((count > 0).then(|| sum / count as f64))
    }

    /// Forgets a person in the identity classifier: zeroes their row (`key mod classes`, see
    /// [`crate::batch::person_key`]), its Adam moments and its prototype, so no trace of the row's training
    /// remains. Returns the row, or `None` for a model without a classifier. (The rest of the
    /// network cannot unlearn what the person's images taught it.)
    pub fn forget_person(&mut self, key: u64) -> Option<usize> {
        let classes = self.model.id.as_ref()?.classes();
        let row = (key % classes as u64) as usize;
        let zero_row = |t: &mut crate::params::Mat<E, D>| {
            let (r, c) = *t.shape();
            let mut v = t.as_vec();
            if row < r {
                v[row * c..(row + 1) * c].fill(E::default());
                t.copy_from(&v);
            }
        };
        if let Some(head) = self.model.id.as_mut() {
            zero_row(&mut head.classifier);
            head.prototypes.clear_row(row);
        }
        if let Some(i) = self.opt.names.iter().position(|n| n == "id.classifier") {
            if let crate::optim::Moments::Matrix(m, v) = &mut self.opt.moments[i] {
                zero_row(m);
                zero_row(v);
            }
        }
        Some(row)
    }

    /// Keeps ln s ≤ ln 100 in the stored parameter too (CLIP's practice).
    fn clamp_logit_scale(&mut self) {
        if let Some((_, ParamMut::Vector(t))) = self
            .model
            .params_mut()
            .into_iter()
            .find(|(n, _)| n == "logit_scale")
        {
            let v = t.as_vec();
            if v.iter()
                .any(|x| x.to_f64().unwrap_or(0.0) > MAX_LOGIT_SCALE)
            {
                let clamped: Vec<E> = v
                    .iter()
                    .map(|x| crate::params::scalar(x.to_f64().unwrap_or(0.0).min(MAX_LOGIT_SCALE)))
                    .collect();
                t.copy_from(&clamped);
            }
        }
    }
}
