//! The convolutional image tower: a ResNet (He et al. 2016) of basic or bottleneck blocks, as
//! PLIP's own image encoders are ResNets, laid out channels-last on the project's im2col
//! convolution ([`crate::conv`]).
//!
//! `(b, 3, H, W)` → conv 7×7 stride 2 → BN → ReLU → max-pool 3×3 stride 2 → four stages of
//! blocks (widths and block counts per preset; the first stage keeps the resolution, the others
//! stride as the preset says — the last stage stride 1, the ReID practice) → feature map
//! `(b·h·w, C)` with `h·w` = the preset's patch grid → global average pooling `(b, C)`.
//!
//! A basic block (ResNet-18/34): x → conv 3×3 (stride s) → BN → ReLU → conv 3×3 → BN → + the
//! shortcut (x, or conv 1×1 stride s → BN when the shape changes) → ReLU.
//!
//! A bottleneck block (ResNet-50, torchvision's "v1.5": the stride on the 3×3): x → conv 1×1 to
//! the stage width → BN → ReLU → conv 3×3 (stride s) → BN → ReLU → conv 1×1 to 4× the width →
//! BN → + the shortcut → ReLU.
//!
//! Tensor names follow torchvision's `resnet` (`conv1`, `bn1`, `layer1.0.conv1`,
//! `layer2.0.downsample.0`, …) under the `image.` prefix. In memory a convolution weight is
//! `(c_out, k·k·c_in)` with columns in `(ky, kx, c_in)` order (channels last); files hold it in
//! PyTorch's `(c_out, c_in, k, k)` ([`crate::weights`]), so torchvision loads them as they are.

use crate::conv::{avg_pool, from_nchw, max_pool, Conv2d, Fmap, Window};
use crate::impl_params;
use crate::norm::{BatchNorm, BnMode};
use crate::params::{Init, Mat};
use crate::params::{ParamMut, ParamRef, Params};
use crate::preset::{ConvBlock, Preset};
use dfdx::prelude::*;

/// The 1×1 projection shortcut of a block that changes width or resolution.
#[derive(Clone, Debug)]
pub struct Downsample<E: Dtype, D: Device<E>> {
    pub conv: Conv2d<E, D>,
    pub bn: BatchNorm<E, D>,
}
// torchvision's shortcut is a `Sequential(conv, bn)`: its parts are named by position.
impl_params!(Downsample { conv as "0", bn as "1" });

impl<E: Dtype, D: Device<E>> Downsample<E, D> {
    fn new(init: &mut Init<D>, c_in: usize, c_out: usize, stride: usize) -> Self {
        Downsample {
            conv: Conv2d::new(
                init,
                c_in,
                c_out,
                Window {
                    k: 1,
                    stride,
                    pad: 0,
                },
            ),
            bn: BatchNorm::new(init, c_out),
        }
    }

    /// The shortcut of `x`.
    fn forward<T: Tape<E, D>>(&self, x: Fmap<E, D, T>, mode: BnMode<'_>) -> Mat<E, D, T> {
        self.bn.forward_train_fused(self.conv.forward(x).x, mode)
    }
}

/// A block's shortcut of its input `x`: `x` itself, or the 1×1 projection when the block
/// changes width or resolution.
fn shortcut<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    downsample: &Option<Downsample<E, D>>,
    x: Fmap<E, D, T>,
    mode: BnMode<'_>,
) -> Mat<E, D, T> {
    match downsample {
        Some(d) => d.forward(x, mode),
        None => x.x,
    }
}

/// Convolution → BN → ReLU, the step every block repeats.
fn conv_bn_relu<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    conv: &Conv2d<E, D>,
    bn: &BatchNorm<E, D>,
    x: Fmap<E, D, T>,
    mode: BnMode<'_>,
) -> Fmap<E, D, T> {
    let y = conv.forward(x);
    let (b, h, w) = (y.b, y.h, y.w);
    Fmap {
        x: bn.forward_relu(y.x, mode),
        b,
        h,
        w,
    }
}

/// A basic residual block.
#[derive(Clone, Debug)]
pub struct BasicBlock<E: Dtype, D: Device<E>> {
    pub conv1: Conv2d<E, D>,
    pub bn1: BatchNorm<E, D>,
    pub conv2: Conv2d<E, D>,
    pub bn2: BatchNorm<E, D>,
    pub downsample: Option<Downsample<E, D>>,
}
impl_params!(BasicBlock {
    conv1,
    bn1,
    conv2,
    bn2,
    downsample
});

impl<E: Dtype, D: Device<E>> BasicBlock<E, D> {
    pub fn new(init: &mut Init<D>, c_in: usize, c_out: usize, stride: usize) -> Self {
        let w3 = |stride| Window {
            k: 3,
            stride,
            pad: 1,
        };
        BasicBlock {
            conv1: Conv2d::new(init, c_in, c_out, w3(stride)),
            bn1: BatchNorm::new(init, c_out),
            conv2: Conv2d::new(init, c_out, c_out, w3(1)),
            // γ = 1, torchvision's default. The zero-γ trick (each block starting as the
            // identity) measured far worse here: Rank-1 11% against 56% after 100 steps of the
            // PyTorch peer (README, "Quality").
            bn2: BatchNorm::new(init, c_out),
            downsample: (stride != 1 || c_in != c_out)
                .then(|| Downsample::new(init, c_in, c_out, stride)),
        }
    }

    /// `(b·h·w, c_in)` → `(b·ho·wo, c_out)`.
    pub fn forward<T: Tape<E, D>>(&self, x: Fmap<E, D, T>, mode: BnMode<'_>) -> Fmap<E, D, T> {
        let Fmap { x, b, h, w } = x;
        // The same tensor with an empty tape: the shortcut's gradient reaches `x` through the
        // merge of the two tapes at the sum.
        let shortcut_in = x.retaped::<T>();
        let y = conv_bn_relu(&self.conv1, &self.bn1, Fmap { x, b, h, w }, mode);
        let y = self.conv2.forward(y);
        let (ho, wo) = (y.h, y.w);
        let s = shortcut(
            &self.downsample,
            Fmap {
                x: shortcut_in,
                b,
                h,
                w,
            },
            mode,
        );
        Fmap {
            x: self.bn2.forward_add_relu(y.x, s, mode),
            b,
            h: ho,
            w: wo,
        }
    }
}

/// A bottleneck residual block (torchvision's `Bottleneck`, expansion 4).
#[derive(Clone, Debug)]
pub struct Bottleneck<E: Dtype, D: Device<E>> {
    pub conv1: Conv2d<E, D>,
    pub bn1: BatchNorm<E, D>,
    pub conv2: Conv2d<E, D>,
    pub bn2: BatchNorm<E, D>,
    pub conv3: Conv2d<E, D>,
    pub bn3: BatchNorm<E, D>,
    pub downsample: Option<Downsample<E, D>>,
}
impl_params!(Bottleneck {
    conv1,
    bn1,
    conv2,
    bn2,
    conv3,
    bn3,
    downsample
});

/// Output channels of a bottleneck block per channel of its stage width.
pub const BOTTLENECK_EXPANSION: usize = 4;

impl<E: Dtype, D: Device<E>> Bottleneck<E, D> {
    /// A block from `c_in` channels through `width` to `width · 4`.
    pub fn new(init: &mut Init<D>, c_in: usize, width: usize, stride: usize) -> Self {
        let c_out = width * BOTTLENECK_EXPANSION;
        let w = |k, stride| Window {
            k,
            stride,
            pad: k / 2,
        };
        Bottleneck {
            conv1: Conv2d::new(init, c_in, width, w(1, 1)),
            bn1: BatchNorm::new(init, width),
            conv2: Conv2d::new(init, width, width, w(3, stride)),
            bn2: BatchNorm::new(init, width),
            conv3: Conv2d::new(init, width, c_out, w(1, 1)),
            // γ = 1, torchvision's default (`zero_init_residual = False`), as the basic block.
            bn3: BatchNorm::new(init, c_out),
            downsample: (stride != 1 || c_in != c_out)
                .then(|| Downsample::new(init, c_in, c_out, stride)),
        }
    }

    /// `(b·h·w, c_in)` → `(b·ho·wo, 4·width)`.
    pub fn forward<T: Tape<E, D>>(&self, x: Fmap<E, D, T>, mode: BnMode<'_>) -> Fmap<E, D, T> {
        let Fmap { x, b, h, w } = x;
        let shortcut_in = x.retaped::<T>();
        let y = conv_bn_relu(&self.conv1, &self.bn1, Fmap { x, b, h, w }, mode);
        let y = conv_bn_relu(&self.conv2, &self.bn2, y, mode);
        let (ho, wo) = (y.h, y.w);
        let y = self.conv3.forward(y).x;
        let s = shortcut(
            &self.downsample,
            Fmap {
                x: shortcut_in,
                b,
                h,
                w,
            },
            mode,
        );
        Fmap {
            x: self.bn3.forward_add_relu(y, s, mode),
            b,
            h: ho,
            w: wo,
        }
    }
}

/// One residual block of either kind (the preset's [`ConvBlock`]).
// A model holds a few dozen blocks: the variants' size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Block<E: Dtype, D: Device<E>> {
    Basic(BasicBlock<E, D>),
    Bottleneck(Bottleneck<E, D>),
}

impl<E: Dtype, D: Device<E>> Block<E, D> {
    /// The block's output channels.
    pub fn out_width(&self) -> usize {
        match self {
            Block::Basic(b) => b.bn2.weight.shape().0,
            Block::Bottleneck(b) => b.bn3.weight.shape().0,
        }
    }

    /// `(b·h·w, c_in)` → `(b·ho·wo, c_out)`.
    pub fn forward<T: Tape<E, D>>(&self, x: Fmap<E, D, T>, mode: BnMode<'_>) -> Fmap<E, D, T> {
        match self {
            Block::Basic(b) => b.forward(x, mode),
            Block::Bottleneck(b) => b.forward(x, mode),
        }
    }

    fn inner(&self) -> &dyn Params<E, D> {
        match self {
            Block::Basic(b) => b,
            Block::Bottleneck(b) => b,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Params<E, D> {
        match self {
            Block::Basic(b) => b,
            Block::Bottleneck(b) => b,
        }
    }
}

// A block saves under its own fields' names (`layer1.0.conv1`), as torchvision's do.
impl<E: Dtype, D: Device<E>> Params<E, D> for Block<E, D> {
    fn visit<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>) {
        self.inner().visit(name, out);
    }
    fn visit_mut<'a>(&'a mut self, name: &str, out: &mut Vec<(String, ParamMut<'a, E, D>)>) {
        self.inner_mut().visit_mut(name, out);
    }
    fn visit_buffers<'a>(&'a self, name: &str, out: &mut Vec<(String, ParamRef<'a, E, D>)>) {
        self.inner().visit_buffers(name, out);
    }
    fn visit_buffers_mut<'a>(
        &'a mut self,
        name: &str,
        out: &mut Vec<(String, ParamMut<'a, E, D>)>,
    ) {
        self.inner_mut().visit_buffers_mut(name, out);
    }
    fn batchnorms_mut<'a>(&'a mut self, out: &mut Vec<&'a mut BatchNorm<E, D>>) {
        match self {
            Block::Basic(b) => b.batchnorms_mut(out),
            Block::Bottleneck(b) => b.batchnorms_mut(out),
        }
    }
    fn visit_convs(&self, name: &str, out: &mut Vec<(String, [usize; 4])>) {
        self.inner().visit_convs(name, out);
    }
}

/// The convolutional body: stem and four stages.
#[derive(Clone, Debug)]
pub struct ResNetBody<E: Dtype, D: Device<E>> {
    pub conv1: Conv2d<E, D>,
    pub bn1: BatchNorm<E, D>,
    pub layer1: Vec<Block<E, D>>,
    pub layer2: Vec<Block<E, D>>,
    pub layer3: Vec<Block<E, D>>,
    pub layer4: Vec<Block<E, D>>,
}
impl_params!(ResNetBody {
    conv1,
    bn1,
    layer1,
    layer2,
    layer3,
    layer4
});

impl<E: Dtype, D: Device<E>> ResNetBody<E, D> {
    pub fn new(init: &mut Init<D>, p: &Preset) -> Self {
        let widths = &p.conv_widths;
        let stem = widths[0];
        let mut c_in = stem;
        let mut stage = |i: usize, init: &mut Init<D>| -> Vec<Block<E, D>> {
            (0..p.conv_blocks[i])
                .map(|j| {
                    let stride = if j == 0 { p.conv_strides[i] } else { 1 };
                    let b = match p.conv_block {
                        ConvBlock::Basic => {
                            Block::Basic(BasicBlock::new(init, c_in, widths[i], stride))
                        }
                        ConvBlock::Bottleneck => {
                            Block::Bottleneck(Bottleneck::new(init, c_in, widths[i], stride))
                        }
                    };
                    c_in = b.out_width();
                    b
                })
                .collect()
        };
        let conv1 = Conv2d::new(
            init,
            3,
            stem,
            Window {
                k: 7,
                stride: 2,
                pad: 3,
            },
        );
        let bn1 = BatchNorm::new(init, stem);
        let layer1 = stage(0, init);
        let layer2 = stage(1, init);
        let layer3 = stage(2, init);
        let layer4 = stage(3, init);
        ResNetBody {
            conv1,
            bn1,
            layer1,
            layer2,
            layer3,
            layer4,
        }
    }

    /// Width of the last feature map.
    pub fn out_dim(&self) -> usize {
        self.layer4
            .last()
            .or(self.layer3.last())
            .or(self.layer2.last())
            .or(self.layer1.last())
            .map_or(self.bn1.weight.shape().0, Block::out_width)
    }

    /// Normalised images `(b, 3, H, W)` → the last feature map `(b·h·w, C)`.
    pub fn forward<T: Tape<E, D>>(
        &self,
        images: Tensor<(usize, usize, usize, usize), E, D, T>,
        mode: BnMode<'_>,
    ) -> Fmap<E, D, T> {
        let Fmap { x, b, h, w } = self.conv1.forward_input(from_nchw(images));
        let x = self.bn1.forward_relu(x, mode);
        let mut x = max_pool(
            Fmap { x, b, h, w },
            Window {
                k: 3,
                stride: 2,
                pad: 1,
            },
        );
        for block in self
            .layer1
            .iter()
            .chain(&self.layer2)
            .chain(&self.layer3)
            .chain(&self.layer4)
        {
            x = block.forward(x, mode);
        }
        x
    }

    /// Globally pooled feature `(b, C)`.
    pub fn pooled<T: Tape<E, D>>(
        &self,
        images: Tensor<(usize, usize, usize, usize), E, D, T>,
        mode: BnMode<'_>,
    ) -> Mat<E, D, T> {
        avg_pool(self.forward(images, mode))
    }
}
