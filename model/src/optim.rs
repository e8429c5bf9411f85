//! AdamW with checkpointable state, global-norm gradient clipping, and the learning-rate
//! schedules.
//!
//! dfdx's own `Adam` keeps its moments private, so it could not be saved; this one keeps the
//! first and second moments as tensors in the model's parameter order (names included) and the
//! step counter, and is saved next to the weights.
//!
//! Update (decoupled weight decay, as PyTorch's `AdamW`), with g already clipped:
//! m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; θ ← θ(1 − lr·wd) − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε).
//! Weight decay applies to matrices only (not to biases, LayerNorm scales or the logit scale).

use crate::params::{scalar, ParamMut, ParamRef, Params};
use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

/// How the learning rate evolves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Schedule {
    /// Linear warm-up, then cosine decay to `floor`·lr at `total_steps` (offline training).
    Cosine { total_steps: u64, floor: f64 },
    /// Linear warm-up, then constant (the continuous trainer, which never ends).
    Constant,
}

/// Optimiser settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Adam's β₁, β₂.
    pub betas: [f64; 2],
    /// Adam's ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Gradients are scaled down so their global L2 norm is at most this; 0 disables clipping.
    pub clip_norm: f64,
    /// Steps of linear warm-up from 0.
    pub warmup_steps: u64,
    /// What follows the warm-up.
    pub schedule: Schedule,
    /// The text tower's learning rate is `lr` times this (parameters named `text.*`).
    #[serde(default = "one")]
    pub text_lr_scale: f64,
    /// Clip the text side (the text tower and the logit scale) and the rest (image tower and
    /// heads) each to `clip_norm` on its own, so one side's gradient norm never scales the
    /// other's step.
    #[serde(default)]
    pub clip_per_tower: bool,
    /// The logit scale's learning rate is `lr` times this. Adam moves ln s by about the
    /// learning rate per step, so at 1× a 625-step run can lift s from its initial 14.3 to 26
    /// at most.
    #[serde(default = "one")]
    pub logit_scale_lr_scale: f64,
    /// The text tower's learning rate does not follow the schedule's decay: after the warm-up
    /// it stays at `lr × text_lr_scale` (the image side still follows `schedule`).
    #[serde(default)]
    pub text_constant_lr: bool,
}

/// True for the parameters of the text side when clipping per tower: the text tower and the
/// logit scale (which only the image–text losses train).
pub fn text_side(name: &str) -> bool {
    name.starts_with("text.") || name == "logit_scale"
}

fn one() -> f64 {
    1.0
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 3e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.05,
            clip_norm: 1.0,
            warmup_steps: 100,
            schedule: Schedule::Constant,
            text_lr_scale: 1.0,
            clip_per_tower: false,
            logit_scale_lr_scale: 1.0,
            text_constant_lr: false,
        }
    }
}

impl OptimConfig {
    /// Learning rate of 0-based step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine { total_steps, floor } => {
                let span = total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                self.lr * (floor + (1.0 - floor) * cos)
            }
        }
    }
}

impl OptimConfig {
    /// The text tower's learning rate at 0-based step `step`: `lr_at(step) × text_lr_scale`, or
    /// with `text_constant_lr` the warm-up alone and then `lr × text_lr_scale` throughout.
    pub fn text_lr_at(&self, step: u64) -> f64 {
        let base = if self.text_constant_lr {
            OptimConfig {
                schedule: Schedule::Constant,
                ..*self
            }
            .lr_at(step)
        } else {
            self.lr_at(step)
        };
        base * self.text_lr_scale
    }
}

/// Moments of one parameter.
#[derive(Clone, Debug)]
pub enum Moments<E: Dtype, D: Device<E>> {
    Vector(Tensor<(usize,), E, D>, Tensor<(usize,), E, D>),
    Matrix(Tensor<(usize, usize), E, D>, Tensor<(usize, usize), E, D>),
}

/// AdamW state: step count and moments per parameter.
#[derive(Clone, Debug)]
pub struct AdamW<E: Dtype, D: Device<E>> {
    /// Updates applied so far.
    pub step: u64,
    /// Extra updates of the text tower alone ([`AdamW::update_text_only`], the text substeps):
    /// the text tower's moments have seen `step + text_updates` updates, and their bias
    /// correction counts them all.
    pub text_updates: u64,
    /// Parameter names, in the model's order.
    pub names: Vec<String>,
    /// First and second moments, in the same order.
    pub moments: Vec<Moments<E, D>>,
}

/// The outcome of clipping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradInfo {
    /// Global L2 norm before clipping.
    pub norm: f64,
    /// Factor the gradients were multiplied by.
    pub scale: f64,
}

impl GradInfo {
    fn of(norm: f64, clip_norm: f64) -> Self {
        let scale = if clip_norm > 0.0 && norm > clip_norm {
            clip_norm / (norm + 1e-6)
        } else {
            1.0
        };
        GradInfo { norm, scale }
    }
}

impl<E: Dtype, D: Device<E>> AdamW<E, D> {
    /// Zero moments for every parameter of `model`.
    pub fn new<M: Params<E, D>>(model: &M) -> Self {
        let mut names = Vec::new();
        let mut moments = Vec::new();
        for (name, p) in model.params() {
            names.push(name);
            moments.push(match p {
                ParamRef::Vector(t) => {
                    Moments::Vector(t.device().zeros_like(t), t.device().zeros_like(t))
                }
                ParamRef::Matrix(t) => {
                    Moments::Matrix(t.device().zeros_like(t), t.device().zeros_like(t))
                }
            });
        }
        AdamW {
            step: 0,
            text_updates: 0,
            names,
            moments,
        }
    }

    /// Collects the gradients of `model`'s parameters, in order.
    pub fn gradients<M: Params<E, D>>(model: &M, grads: &Gradients<E, D>) -> Vec<Grad<E, D>> {
        model
            .params()
            .into_iter()
            .map(|(_, p)| match p {
                ParamRef::Vector(t) => Grad::Vector(grads.get(t)),
                ParamRef::Matrix(t) => Grad::Matrix(grads.get(t)),
            })
            .collect()
    }

    /// Global norm and clip factor of a gradient set.
    pub fn clip_info(grads: &[Grad<E, D>], clip_norm: f64) -> GradInfo {
        let sq: f64 = grads.iter().map(Self::square_norm).sum();
        GradInfo::of(sq.sqrt(), clip_norm)
    }

    /// Norms and clip factors of the text side ([`text_side`], by `names`) and of the rest:
    /// `(rest, text)`.
    pub fn clip_info_per_tower(
        grads: &[Grad<E, D>],
        names: &[String],
        clip_norm: f64,
    ) -> (GradInfo, GradInfo) {
        let (mut rest, mut text) = (0.0, 0.0);
        for (g, name) in grads.iter().zip(names) {
            if text_side(name) {
                text += Self::square_norm(g);
            } else {
                rest += Self::square_norm(g);
            }
        }
        (
            GradInfo::of(rest.sqrt(), clip_norm),
            GradInfo::of(text.sqrt(), clip_norm),
        )
    }

    fn square_norm(g: &Grad<E, D>) -> f64 {
        let sq = match g {
            Grad::Vector(t) => t.clone().square().sum::<(), Axis<0>>().as_vec()[0],
            Grad::Matrix(t) => t.clone().square().sum::<(), Axes2<0, 1>>().as_vec()[0],
        };
        sq.to_f64().unwrap_or(f64::NAN)
    }

    /// Applies one update with learning rate `lr` to `model`, gradients multiplied by
    /// `grad_scale` (the clip factor).
    ///
    /// # Errors
    /// Gradients or state that do not match the model's parameters.
    pub fn update<M: Params<E, D>>(
        &mut self,
        model: &mut M,
        grads: Vec<Grad<E, D>>,
        grad_scale: f64,
        lr: f64,
        cfg: &OptimConfig,
    ) -> crate::Result<()> {
        self.update_sides(model, grads, (grad_scale, grad_scale), lr, cfg)
    }

    /// As [`AdamW::update`], with the clip factors `(rest, text side)` ([`text_side`]).
    ///
    /// # Errors
    /// As [`AdamW::update`].
    pub fn update_sides<M: Params<E, D>>(
        &mut self,
        model: &mut M,
        grads: Vec<Grad<E, D>>,
        grad_scales: (f64, f64),
        lr: f64,
        cfg: &OptimConfig,
    ) -> crate::Result<()> {
        let params = model.params_mut();
        self.check_matches(params.len(), grads.len())?;
        self.step += 1;
        let h = Self::hyper(self.step, lr, grad_scales.0, cfg);
        let text_h = Hyper {
            lr: self.text_lr(lr, cfg),
            gs: grad_scales.1,
            ..self.text_bias_correction(h, cfg)
        };
        // The logit scale: its own learning rate, the text side's clip factor.
        let scale_h = Hyper {
            lr: lr * cfg.logit_scale_lr_scale,
            gs: grad_scales.1,
            ..h
        };
        self.apply(params, grads, cfg, |name| {
            Some(if name.starts_with("text.") {
                text_h
            } else if text_side(name) {
                scale_h
            } else {
                h
            })
        })
    }

    /// One extra update of the text tower's parameters (`text.*`) alone, at the text tower's
    /// learning rate of the step last applied (`lr` is that step's scheduled rate), gradients
    /// multiplied by `grad_scale`; every other parameter and moment is left as it is.
    ///
    /// # Errors
    /// Gradients or state that do not match the model's parameters.
    pub fn update_text_only<M: Params<E, D>>(
        &mut self,
        model: &mut M,
        grads: Vec<Grad<E, D>>,
        grad_scale: f64,
        lr: f64,
        cfg: &OptimConfig,
    ) -> crate::Result<()> {
        let params = model.params_mut();
        self.check_matches(params.len(), grads.len())?;
        self.text_updates += 1;
        let h = Hyper {
            lr: self.text_lr(lr, cfg),
            ..self.text_bias_correction(Self::hyper(self.step, lr, grad_scale, cfg), cfg)
        };
        self.apply(params, grads, cfg, |name| {
            name.starts_with("text.").then_some(h)
        })
    }

    fn check_matches(&self, params: usize, grads: usize) -> crate::Result<()> {
        if params != self.moments.len() || grads != params {
            return Err(crate::Error::Shape(format!(
                "optimiser holds {} moments, model has {params} parameters, {grads} gradients",
                self.moments.len(),
            )));
        }
        Ok(())
    }

    /// The hyper-parameters of update number `t` (1-based) at learning rate `lr`.
    fn hyper(t: u64, lr: f64, grad_scale: f64, cfg: &OptimConfig) -> Hyper {
        let [b1, b2] = cfg.betas;
        Hyper {
            b1,
            b2,
            c1: 1.0 - b1.powi(t as i32),
            c2: 1.0 - b2.powi(t as i32),
            lr,
            eps: cfg.eps,
            gs: grad_scale,
        }
    }

    /// The text tower's learning rate of the step last counted in `self.step` (`lr` its
    /// scheduled rate).
    fn text_lr(&self, lr: f64, cfg: &OptimConfig) -> f64 {
        if cfg.text_constant_lr {
            // `self.step` was already counted: the 0-based step being applied is one less.
            cfg.text_lr_at(self.step.saturating_sub(1))
        } else {
            lr * cfg.text_lr_scale
        }
    }

    /// `h` with the bias correction of the text tower's moments, which the text substeps update
    /// more often than the rest.
    fn text_bias_correction(&self, h: Hyper, cfg: &OptimConfig) -> Hyper {
        let t = (self.step + self.text_updates) as i32;
        let [b1, b2] = cfg.betas;
        Hyper {
            c1: 1.0 - b1.powi(t),
            c2: 1.0 - b2.powi(t),
            ..h
        }
    }

    /// One AdamW update of each parameter `hyper` gives settings for (by name); the others and
    /// their moments stay as they are.
    fn apply(
        &mut self,
        params: Vec<(String, ParamMut<'_, E, D>)>,
        grads: Vec<Grad<E, D>>,
        cfg: &OptimConfig,
        hyper: impl Fn(&str) -> Option<Hyper>,
    ) -> crate::Result<()> {
        for (((name, p), m), g) in params.into_iter().zip(self.moments.iter_mut()).zip(grads) {
            let Some(h) = hyper(&name) else {
                continue;
            };
            match (p, m, g) {
                (ParamMut::Vector(p), Moments::Vector(m, v), Grad::Vector(g)) => {
                    adamw_one(p, m, v, g, &h, 0.0)
                }
                (ParamMut::Matrix(p), Moments::Matrix(m, v), Grad::Matrix(g)) => {
                    adamw_one(p, m, v, g, &h, cfg.weight_decay)
                }
                _ => {
                    return Err(crate::Error::Shape(
                        "optimiser state does not match the model".into(),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// A parameter's gradient.
pub enum Grad<E: Dtype, D: Device<E>> {
    Vector(Tensor<(usize,), E, D>),
    Matrix(Tensor<(usize, usize), E, D>),
}

#[derive(Clone, Copy)]
struct Hyper {
    b1: f64,
    b2: f64,
    c1: f64,
    c2: f64,
    lr: f64,
    eps: f64,
    gs: f64,
}

fn adamw_one<S: Shape, E: Dtype, D: Device<E>>(
    p: &mut Tensor<S, E, D>,
    m: &mut Tensor<S, E, D>,
    v: &mut Tensor<S, E, D>,
    g: Tensor<S, E, D>,
    h: &Hyper,
    wd: f64,
) {
    m.axpy(h.b1, &g, (1.0 - h.b1) * h.gs);
    v.axpy(h.b2, &g.square(), (1.0 - h.b2) * h.gs * h.gs);
    let denom = (v.clone() * scalar::<E>(1.0 / h.c2)).sqrt() + scalar::<E>(h.eps);
    let step = m.clone() * scalar::<E>(h.lr / h.c1) / denom;
    p.axpy(1.0 - h.lr * wd, &step, -1.0);
}
