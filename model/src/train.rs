//! One training step: losses → backward → skip if non-finite → clip → AdamW at the scheduled
//! learning rate. The `Trainer` owns the model, the optimiser and the counters that a
//! checkpoint must carry.

use crate::batch::{mask_ratio, Batch};
use crate::norm::{apply_stats, BnStats};
use crate::optim::{AdamW, OptimConfig};
use crate::params::{ParamMut, ParamRef, Params};
use crate::plip::{LossValues, Plip, TaskWeights, MAX_LOGIT_SCALE};
use crate::Result;
use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

/// Everything that shapes training besides the data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub optim: OptimConfig,
    pub tasks: TaskWeights,
    /// Steps over which the IAP mask ratio rises from 0.2 to 0.8 (√ curriculum).
    pub ramp_steps: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optim: OptimConfig::default(),
            tasks: TaskWeights::default(),
            ramp_steps: 10_000,
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
}

impl<E: Dtype, D: Device<E>> Trainer<E, D> {
    pub fn new(model: Plip<E, D>, cfg: TrainConfig) -> Self {
        let opt = AdamW::new(&model);
        Trainer {
            model,
            opt,
            cfg,
            skipped_steps: 0,
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
        apply_stats(&mut self.model, stats);
        if let Some(head) = self.model.id.as_mut() {
            head.prototypes.update(&prototypes);
        }
        self.clamp_logit_scale();
        report.step = self.opt.step;
        report.skipped = false;
        Ok(report)
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
