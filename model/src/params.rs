//! Named parameter tensors: how the model's structs expose their weights to the optimiser, the
//! weight (de)serialiser and the gradient check, without dfdx's compile-time module machinery.
//!
//! Every parameter is a rank-1 or rank-2 tensor with run-time dimensions. A struct lists its
//! fields once with [`impl_params!`](crate::impl_params) and gets both an immutable and a mutable
//! walk; names are dotted paths (`image.blocks.0.attn.q.weight`), the same names the safetensors
//! file uses.

use dfdx::prelude::*;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

/// A rank-2 tensor with run-time dimensions.
pub type Mat<E, D, T = NoneTape> = Tensor<(usize, usize), E, D, T>;
/// A rank-1 tensor with a run-time length.
pub type Vector<E, D, T = NoneTape> = Tensor<(usize,), E, D, T>;

/// A copy of `t`'s values with a tensor id of its own and no tape: a loss through it sends no
/// gradient to `t` (dfdx accumulates gradients by tensor id, so a plain clone would).
pub fn detach<S: Shape, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    t: &Tensor<S, E, D, T>,
) -> Tensor<S, E, D> {
    t.device().tensor_from_vec(t.as_vec(), *t.shape())
}

/// A parameter seen read-only.
pub enum ParamRef<'a, E: Dtype, D: Device<E>> {
    Vector(&'a Vector<E, D>),
    Matrix(&'a Mat<E, D>),
}

/// A parameter seen for update.
pub enum ParamMut<'a, E: Dtype, D: Device<E>> {
    Vector(&'a mut Vector<E, D>),
    Matrix(&'a mut Mat<E, D>),
}

impl<E: Dtype, D: Device<E>> ParamRef<'_, E, D> {
    /// The tensor's dimensions.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            ParamRef::Vector(t) => vec![t.shape().0],
            ParamRef::Matrix(t) => vec![t.shape().0, t.shape().1],
        }
    }
    /// The tensor's values, row-major, copied to the host.
    pub fn to_host(&self) -> Vec<E> {
        match self {
            ParamRef::Vector(t) => t.as_vec(),
            ParamRef::Matrix(t) => t.as_vec(),
        }
    }
    /// Number of scalars.
    pub fn len(&self) -> usize {
        self.dims().iter().product()
    }
    /// True for a tensor without elements (never the case for a built model).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<E: Dtype, D: Device<E>> ParamMut<'_, E, D> {
    /// The tensor's dimensions.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            ParamMut::Vector(t) => vec![t.shape().0],
            ParamMut::Matrix(t) => vec![t.shape().0, t.shape().1],
        }
    }
    /// Overwrites the values from host memory (row-major, exact length).
    pub fn copy_from_host(&mut self, values: &[E]) {
        match self {
            ParamMut::Vector(t) => t.copy_from(values),
            ParamMut::Matrix(t) => t.copy_from(values),
        }
    }
    /// The tensor's values, row-major, copied to the host.
    pub fn to_host(&self) -> Vec<E> {
        match self {
            ParamMut::Vector(t) => t.as_vec(),
            ParamMut::Matrix(t) => t.as_vec(),
        }
    }
}

/// A struct made of parameter tensors.
pub trait Params<E: Dtype, D: Device<E>> {
    /// Appends `(name, tensor)` for every parameter, in a fixed order.
    fn visit<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>);
    /// Appends `(name, tensor)` for every parameter, in the same order as [`Params::visit`].
    fn visit_mut<'a>(&'a mut self, name: &str, out: &mut Vec<(String, ParamMut<'a, E, D>)>);
    /// Appends `(name, tensor)` for every buffer: state that is saved with the weights but not
    /// trained (BatchNorm's running statistics). None by default.
    fn visit_buffers<'a>(&'a self, _name: &str, _out: &mut Vec<(String, ParamRef<'a, E, D>)>) {}
    /// The buffers for update, in the order of [`Params::visit_buffers`].
    fn visit_buffers_mut<'a>(
        &'a mut self,
        _name: &str,
        _out: &mut Vec<(String, ParamMut<'a, E, D>)>,
    ) {
    }
    /// Every BatchNorm layer, for applying running-statistics updates.
    fn batchnorms_mut<'a>(&'a mut self, _out: &mut Vec<&'a mut crate::norm::BatchNorm<E, D>>) {}
    /// Appends `(name, [c_out, c_in, k, k])` for every convolution weight: held in memory as
    /// `(c_out, k·k·c_in)` with columns in `(ky, kx, c_in)` order, written to files in
    /// PyTorch's `(O, I, kH, kW)` order ([`crate::weights`]). None by default.
    fn visit_convs(&self, _name: &str, _out: &mut Vec<(String, [usize; 4])>) {}

    /// All parameters with their names.
    fn params(&self) -> Vec<(String, ParamRef<'_, E, D>)> {
        let mut out = Vec::new();
        self.visit("", &mut out);
        out
    }
    /// All parameters with their names, for update.
    fn params_mut(&mut self) -> Vec<(String, ParamMut<'_, E, D>)> {
        let mut out = Vec::new();
        self.visit_mut("", &mut out);
        out
    }
    /// Every buffer with its name.
    fn buffers(&self) -> Vec<(String, ParamRef<'_, E, D>)> {
        let mut out = Vec::new();
        self.visit_buffers("", &mut out);
        out
    }
    /// Every buffer with its name, for update.
    fn buffers_mut(&mut self) -> Vec<(String, ParamMut<'_, E, D>)> {
        let mut out = Vec::new();
        self.visit_buffers_mut("", &mut out);
        out
    }
    /// Parameters then buffers: everything a weights file holds.
    fn state(&self) -> Vec<(String, ParamRef<'_, E, D>)> {
        let mut out = self.params();
        self.visit_buffers("", &mut out);
        out
    }
    /// Calls `f` on every parameter then every buffer, for update, in the order of
    /// [`Params::state`].
    fn for_each_state_mut(&mut self, mut f: impl FnMut(usize, &str, ParamMut<'_, E, D>))
    where
        Self: Sized,
    {
        let mut i = 0;
        for (name, p) in self.params_mut() {
            f(i, &name, p);
            i += 1;
        }
        for (name, p) in self.buffers_mut() {
            f(i, &name, p);
            i += 1;
        }
    }
    /// Total number of scalars.
    fn num_params(&self) -> usize {
        self.params().iter().map(|(_, p)| p.len()).sum()
    }
}

/// Joins a dotted prefix and a field name.
pub fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

impl<E: Dtype, D: Device<E>> Params<E, D> for Vector<E, D> {
    fn visit<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>) {
        out.push((name.to_string(), ParamRef::Vector(self)));
    }
    fn visit_mut<'a>(&'a mut self, name: &str, out: &mut Vec<(String, ParamMut<'a, E, D>)>) {
        out.push((name.to_string(), ParamMut::Vector(self)));
    }
}

impl<E: Dtype, D: Device<E>> Params<E, D> for Mat<E, D> {
    fn visit<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>) {
        out.push((name.to_string(), ParamRef::Matrix(self)));
    }
    fn visit_mut<'a>(&'a mut self, name: &str, out: &mut Vec<(String, ParamMut<'a, E, D>)>) {
        out.push((name.to_string(), ParamMut::Matrix(self)));
    }
}

impl<E: Dtype, D: Device<E>, P: Params<E, D>> Params<E, D> for Vec<P> {
    fn visit<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>) {
        for (i, p) in self.iter().enumerate() {
            p.visit(&join(name, &i.to_string()), out);
        }
    }
    fn visit_mut<'a>(&'a mut self, name: &str, out: &mut Vec<(String, ParamMut<'a, E, D>)>) {
        for (i, p) in self.iter_mut().enumerate() {
            p.visit_mut(&join(name, &i.to_string()), out);
        }
    }
    fn visit_buffers<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>) {
        for (i, p) in self.iter().enumerate() {
            p.visit_buffers(&join(name, &i.to_string()), out);
        }
    }
    fn visit_buffers_mut<'a>(
        &'a mut self,
        name: &str,
        out: &mut Vec<(String, ParamMut<'a, E, D>)>,
    ) {
        for (i, p) in self.iter_mut().enumerate() {
            p.visit_buffers_mut(&join(name, &i.to_string()), out);
        }
    }
    fn batchnorms_mut<'a>(&'a mut self, out: &mut Vec<&'a mut crate::norm::BatchNorm<E, D>>) {
        for p in self.iter_mut() {
            p.batchnorms_mut(out);
        }
    }
    fn visit_convs(&self, name: &str, out: &mut Vec<(String, [usize; 4])>) {
        for (i, p) in self.iter().enumerate() {
            p.visit_convs(&join(name, &i.to_string()), out);
        }
    }
}

impl<E: Dtype, D: Device<E>, P: Params<E, D>> Params<E, D> for Option<P> {
    fn visit<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>) {
        if let Some(p) = self {
            p.visit(name, out);
        }
    }
    fn visit_mut<'a>(&'a mut self, name: &str, out: &mut Vec<(String, ParamMut<'a, E, D>)>) {
        if let Some(p) = self {
            p.visit_mut(name, out);
        }
    }
    fn visit_buffers<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>) {
        if let Some(p) = self {
            p.visit_buffers(name, out);
        }
    }
    fn visit_buffers_mut<'a>(
        &'a mut self,
        name: &str,
        out: &mut Vec<(String, ParamMut<'a, E, D>)>,
    ) {
        if let Some(p) = self {
            p.visit_buffers_mut(name, out);
        }
    }
    fn batchnorms_mut<'a>(&'a mut self, out: &mut Vec<&'a mut crate::norm::BatchNorm<E, D>>) {
        if let Some(p) = self {
            p.batchnorms_mut(out);
        }
    }
    fn visit_convs(&self, name: &str, out: &mut Vec<(String, [usize; 4])>) {
        if let Some(p) = self {
            p.visit_convs(name, out);
        }
    }
}

/// The name a field of [`impl_params!`](crate::impl_params) is saved under: its own, or the
/// `as` literal (`downsample.0` where torchvision's `Sequential` numbers its parts).
#[doc(hidden)]
#[macro_export]
macro_rules! param_name {
    ($field:ident) => {
        stringify!($field)
    };
    ($field:ident, $alias:literal) => {
        $alias
    };
}

/// Implements [`Params`] for a struct `Name<E, D>` by listing its parameter fields in order;
/// `field as "0"` saves a field under another name.
#[macro_export]
macro_rules! impl_params {
    ($ty:ident { $($field:ident $(as $alias:literal)?),* $(,)? }) => {
        impl<E: dfdx::prelude::Dtype, D: dfdx::prelude::Device<E>> $crate::params::Params<E, D>
            for $ty<E, D>
        {
            fn visit<'a>(
                &'a self,
                name: &str,
                out: &mut Vec<(String, $crate::params::ParamRef<'a, E, D>)>,
            ) {
                $( self.$field.visit(&$crate::params::join(name, $crate::param_name!($field $(, $alias)?)), out); )*
            }
            fn visit_mut<'a>(
                &'a mut self,
                name: &str,
                out: &mut Vec<(String, $crate::params::ParamMut<'a, E, D>)>,
            ) {
                $( self.$field.visit_mut(&$crate::params::join(name, $crate::param_name!($field $(, $alias)?)), out); )*
            }
            fn visit_buffers<'a>(
                &'a self,
                name: &str,
                out: &mut Vec<(String, $crate::params::ParamRef<'a, E, D>)>,
            ) {
                $( self.$field.visit_buffers(&$crate::params::join(name, $crate::param_name!($field $(, $alias)?)), out); )*
            }
            fn visit_buffers_mut<'a>(
                &'a mut self,
                name: &str,
                out: &mut Vec<(String, $crate::params::ParamMut<'a, E, D>)>,
            ) {
                $( self.$field.visit_buffers_mut(&$crate::params::join(name, $crate::param_name!($field $(, $alias)?)), out); )*
            }
            fn batchnorms_mut<'a>(
                &'a mut self,
                out: &mut Vec<&'a mut $crate::norm::BatchNorm<E, D>>,
            ) {
                $( self.$field.batchnorms_mut(out); )*
            }
            fn visit_convs(&self, name: &str, out: &mut Vec<(String, [usize; 4])>) {
                $( self.$field.visit_convs(&$crate::params::join(name, $crate::param_name!($field $(, $alias)?)), out); )*
            }
        }
    };
}

/// Converts an `f64` constant to the model's float type.
pub fn scalar<E: Dtype>(x: f64) -> E {
    // Dtype requires FromPrimitive; every float type the model runs in represents f64 constants.
    E::from_f64(x).unwrap_or_default()
}

/// Host-side initialisation, so a seed gives the same weights on every device.
pub struct Init<'a, D> {
    pub dev: &'a D,
    pub rng: &'a mut StdRng,
}

impl<D> Init<'_, D> {
    /// A (rows, cols) matrix drawn from N(0, std²).
    pub fn normal<E: Dtype>(&mut self, rows: usize, cols: usize, std: f64) -> Mat<E, D>
    where
        D: Device<E>,
    {
        let dist = Normal::new(0.0, std).unwrap_or_else(|_| Normal::new(0.0, 0.02).expect("std"));
        let data: Vec<E> = (0..rows * cols)
            .map(|_| scalar::<E>(dist.sample(&mut *self.rng)))
            .collect();
        self.dev.tensor_from_vec(data, (rows, cols))
    }
    /// A (rows, cols) matrix of zeros (draws nothing from the generator).
    pub fn zeros<E: Dtype>(&mut self, rows: usize, cols: usize) -> Mat<E, D>
    where
        D: Device<E>,
    {
        self.dev
            .tensor_from_vec(vec![E::default(); rows * cols], (rows, cols))
    }
    /// A vector filled with one value.
    pub fn fill<E: Dtype>(&mut self, len: usize, value: f64) -> Vector<E, D>
    where
        D: Device<E>,
    {
        self.dev
            .tensor_from_vec(vec![scalar::<E>(value); len], (len,))
    }
}
