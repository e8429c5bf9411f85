//! Model presets: every size of the PLIP dual encoder, chosen at run time by name.
//!
//! | preset | image tower | input (H×W) | text width / layers (text/fusion) | heads | text tokens | vocabulary | joint dim | identity classes | parameters |
//! |---|---|---|---|---|---|---|---|---|---|
//! | `test` | ResNet, basic blocks 1-1-1-1, widths 8-16-32-32, strides 1-2-1-1 | 32×16 | 32 / 2 / 1 | 2 | 24 | 1024 | 32 | 64 | 147,049 |
//! | `test-vit` | ViT, patch 8, 2 layers, linear stem | 32×16 | 32 / 2 / 1 | 2 | 24 | 1024 | 32 | — | 129,377 |
//! | `tiny` (CPU default) | ResNet, basic blocks 2-2-2-2, widths 48-96-192-384, strides 1-2-2-1 (last stride 1) | 128×64 | 192 / 2 / 1, 8192 bigram rows | 3 | 64 | 8192 | 384 | 8192 | 15,881,649 |
//! | `tiny-vit` | ViT, patch 16, 6 layers, hMLP stem | 128×64 | 192 / 6 / 1 | 3 | 64 | 8192 | 256 | — | 9,302,177 |
//! | `small` (GPU, round 1) | ViT, patch 16, 12 layers, hMLP stem | 256×128 | 384 / 12 / 2 | 6 | 64 | 16384 | 512 | — | 60,110,337 |
//! | `rn50` (GPU) | ResNet-50: bottleneck blocks 3-4-6-3, widths 64-128-256-512 (→ 2048), strides 1-2-2-1 (last stride 1) | 256×128 | 512 / 4 / 1, 8192 bigram rows | 8 | 64 | 16384 | 2048 | 8192 | 81,109,761 |
//!
//! The ResNet's stem strides 4, so its last feature map is the patch grid (H/patch × W/patch,
//! 8×4 for `tiny`), one position per patch TIC colours. The parameter counts are checked by a
//! unit test, so this table stays true.

use serde::{Deserialize, Serialize};

/// The dimensions of one model size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preset {
    /// Name the configuration selects it by.
    pub name: String,
    /// Input image height in pixels.
    pub image_height: usize,
    /// Input image width in pixels.
    pub image_width: usize,
    /// Side of the square patches the image is cut into.
    pub patch: usize,
    /// Width of both towers' hidden states.
    pub dim: usize,
    /// Transformer blocks in the image tower.
    pub image_layers: usize,
    /// Transformer blocks in the text tower.
    pub text_layers: usize,
    /// Fusion blocks of the attribute-prediction head (IAP).
    pub fusion_layers: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Hidden width of the blocks' MLP.
    pub mlp: usize,
    /// Maximum caption length in tokens, `[CLS]` and `[SEP]` included.
    pub text_len: usize,
    /// Rows of the token embedding: the trained vocabulary must not exceed it.
    pub vocab: usize,
    /// Width of the joint image/text embedding.
    pub embed: usize,
    /// The colorization head predicts each patch at `patch / tic_reduce` pixels per side.
    pub tic_reduce: usize,
    /// How pixels become patch tokens (ViT).
    #[serde(default)]
    pub stem: Stem,
    /// The image tower's architecture; files written before the ResNet existed read as `vit`.
    #[serde(default)]
    pub image_arch: ImageArch,
    /// ResNet: widths of the four stages (the stem has the first stage's width).
    #[serde(default)]
    pub conv_widths: Vec<usize>,
    /// ResNet: blocks per stage.
    #[serde(default)]
    pub conv_blocks: Vec<usize>,
    /// ResNet: the kind of block; files written before bottlenecks existed read as `basic`.
    #[serde(default)]
    pub conv_block: ConvBlock,
    /// ResNet: stride of each stage's first block; the stem strides 4, so
    /// 4·Π strides = `patch` (the last feature map is the patch grid TIC colours).
    #[serde(default)]
    pub conv_strides: Vec<usize>,
    /// Rows of the identity classifier (0 = none): a person's row is its stable key modulo
    /// this ([`crate::batch::person_key`]).
    #[serde(default)]
    pub id_classes: usize,
    /// The image feature that is the joint embedding (what image and text queries are ranked
    /// by, and what IVLC aligns captions to); files written before the field read as `pooled`.
    #[serde(default)]
    pub joint: JointFeature,
    /// Embed each image as the mean of itself and its mirror image (unit vectors, summed and
    /// normalised again) when serving and evaluating; training is unchanged. Changes no
    /// weight; files written before the field read as `false`.
    #[serde(default)]
    pub flip_average: bool,
    /// The attribute head's fields (empty = no head): the number of values of each attribute
    /// field, in order; the head has one output per value, each field a contiguous range of
    /// them (the batch's labels name a field by its range, [`crate::batch::AttributeLabel`]).
    /// Files written before the field read as empty.
    #[serde(default)]
    pub attribute_fields: Vec<usize>,
    /// Weight λ of attribute agreement in retrieval (0 = off; needs the attribute head):
    /// a caption's score against an image is cos + λ·a, a the expected fraction of attribute
    /// fields on which the head's readings of the two agree, and an image query's likewise.
    /// Index rows carry the readings after the joint feature(s) ([`Preset::index_dim`]).
    /// Changes no weight; files written before the field read as 0.
    #[serde(default)]
    pub attribute_weight: f64,
    /// Rows of the text tower's hashed bigram embedding (0 = none): each token also adds the
    /// embedding of (itself, the next token) hashed to one of these rows, so a word and its
    /// neighbour ("navy" "jacket") reach the blocks as one feature. Files written before the
    /// field read as 0.
    #[serde(default)]
    pub text_bigrams: usize,
}

/// Which image feature is the joint embedding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JointFeature {
    /// The tower's global feature (ResNet: average-pooled last map, after its ReLU).
    #[default]
    Pooled,
    /// The identity classifier's BNNeck of the pooled feature (Luo et al. 2019): batch
    /// statistics in training, running statistics when serving. Centred, so cosine similarity
    /// spreads over [-1, 1] instead of the narrow cone of non-negative pooled features. Needs
    /// `id_classes`.
    Neck,
    /// Both features in the gallery: IVLC aligns captions to the neck (as [`Self::Neck`]),
    /// text queries are ranked by the neck and image queries by the mean of the two cosine
    /// similarities (pooled and neck). A gallery row is the concatenation
    /// `[pooled ; neck] / sqrt 2` of the two unit vectors, so one index serves both kinds of
    /// query with exact cosine scores ([`Preset::index_dim`] wide). Needs `id_classes`.
    Both,
}

impl JointFeature {
    /// The name `by_name` parses.
    pub fn name(self) -> &'static str {
        match self {
            JointFeature::Pooled => "pooled",
            JointFeature::Neck => "neck",
            JointFeature::Both => "both",
        }
    }

    /// Parses `pooled` or `neck`.
    ///
    /// # Errors
    /// Any other name.
    pub fn by_name(name: &str) -> crate::Result<Self> {
        match name {
            "pooled" => Ok(JointFeature::Pooled),
            "neck" => Ok(JointFeature::Neck),
            "both" => Ok(JointFeature::Both),
            other => Err(crate::Error::InvalidPreset(format!(
                "unknown joint feature {other:?}; known: pooled, neck, both"
            ))),
        }
    }
}

/// The image tower's architecture.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageArch {
    /// The conv-free ViT (the first tower; kept selectable).
    #[default]
    Vit,
    /// A ResNet of basic blocks ([`crate::resnet`]).
    Resnet,
}

/// The ResNet's residual block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvBlock {
    /// Two 3×3 convolutions (ResNet-18/34); a stage's output is its width.
    #[default]
    Basic,
    /// 1×1, 3×3, 1×1 (ResNet-50/101); a stage's output is 4× its width.
    Bottleneck,
}

/// The image tower's patch embedding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// One linear map of each flattened `patch × patch` square (the original ViT).
    #[default]
    Linear,
    /// Hierarchical MLP stem (Touvron et al. 2022, "three things about ViTs"): 4×4-pixel
    /// squares → Linear → LayerNorm → GELU, then two 2×2 merges (Linear → LayerNorm → GELU,
    /// then Linear to the width). Equivalent to a stride-equals-kernel convolutional stem: it
    /// gives the tower locality without overlapping convolutions (which dfdx compiles out on
    /// stable Rust). Needs 16-pixel patches.
    Hmlp,
}

impl Stem {
    /// Parses `linear` or `hmlp`.
    ///
    /// # Errors
    /// Any other name.
    pub fn by_name(name: &str) -> crate::Result<Self> {
        match name {
            "linear" => Ok(Stem::Linear),
            "hmlp" => Ok(Stem::Hmlp),
            other => Err(crate::Error::InvalidPreset(format!(
                "unknown stem {other:?}; known stems: linear, hmlp"
            ))),
        }
    }
}

impl Preset {
    /// The preset for unit tests: tiny inputs, a small ResNet image tower.
    pub fn test() -> Self {
        Preset {
            name: "test".into(),
            image_arch: ImageArch::Resnet,
            conv_widths: vec![8, 16, 32, 32],
            conv_blocks: vec![1, 1, 1, 1],
            conv_block: ConvBlock::Basic,
            conv_strides: vec![1, 2, 1, 1],
            id_classes: 64,
            joint: JointFeature::Pooled,
            flip_average: false,
            ..Self::test_vit()
        }
    }

    /// The unit-test preset with the ViT image tower.
    pub fn test_vit() -> Self {
        Preset {
            name: "test-vit".into(),
            image_height: 32,
            image_width: 16,
            patch: 8,
            dim: 32,
            image_layers: 2,
            text_layers: 2,
            fusion_layers: 1,
            heads: 2,
            mlp: 64,
            text_len: 24,
            vocab: 1024,
            embed: 32,
            tic_reduce: 1,
            stem: Stem::Linear,
            image_arch: ImageArch::Vit,
            conv_widths: Vec::new(),
            conv_blocks: Vec::new(),
            conv_block: ConvBlock::Basic,
            conv_strides: Vec::new(),
            id_classes: 0,
            joint: JointFeature::Pooled,
            flip_average: false,
            attribute_fields: Vec::new(),
            attribute_weight: 0.0,
            text_bigrams: 0,
        }
    }

    /// The CPU default: a ResNet-18-shaped image tower (basic blocks 2-2-2-2, last stage
    /// stride 1) at three quarters of ResNet-18's widths, 128×64 input, a 384-wide joint space,
    /// and the `tiny-vit` text tower at two blocks.
    pub fn tiny() -> Self {
        Preset {
            name: "tiny".into(),
            image_arch: ImageArch::Resnet,
            // 48-96-192-384 against half widths (32-64-128-256): image Rank-1 96.25% / mAP
            // 88.9% against 94.0% / 84.5% at 40,000 images, text→image R@1 48.25% against
            // 45.1%, at a 1.5× dearer step (README "Quality", runs w1, h1).
            conv_widths: vec![48, 96, 192, 384],
            embed: 384,
            conv_blocks: vec![2, 2, 2, 2],
            conv_block: ConvBlock::Basic,
            conv_strides: vec![1, 2, 2, 1],
            id_classes: 8192,
            // Captions align to the BNNeck and queries rank by it: text→image R@1 41% against
            // 36% ranked by the pooled feature from the same weights, image Rank-1 the same
            // (README "Quality", runs f1, h1).
            joint: JointFeature::Neck,
            flip_average: false,
            // Two blocks learn captions at least as fast per step as six, at a third of the
            // cost (README "Quality", runs tx1–tx4, abK, r7).
            text_layers: 2,
            // Captions bind colours to garments through the word pairs: text→image R@1 21.75%
            // against 7.1% at 8,000 images (README "Quality", runs k1, b2; g0/g1 train the
            // caption attribute loss alone: 0.155 against 0.334 at step 160).
            text_bigrams: 8192,
            ..Self::tiny_vit()
        }
    }

    /// The ViT the project started with, at the `tiny` size.
    pub fn tiny_vit() -> Self {
        Preset {
            name: "tiny-vit".into(),
            image_height: 128,
            image_width: 64,
            patch: 16,
            dim: 192,
            image_layers: 6,
            text_layers: 6,
            fusion_layers: 1,
            heads: 3,
            mlp: 768,
            text_len: 64,
            vocab: 8192,
            embed: 256,
            tic_reduce: 2,
            stem: Stem::Hmlp,
            image_arch: ImageArch::Vit,
            conv_widths: Vec::new(),
            conv_blocks: Vec::new(),
            conv_block: ConvBlock::Basic,
            conv_strides: Vec::new(),
            id_classes: 0,
            joint: JointFeature::Pooled,
            flip_average: false,
            attribute_fields: Vec::new(),
            attribute_weight: 0.0,
            text_bigrams: 0,
        }
    }

    /// The GPU preset, at the ReID standard input size.
    pub fn small() -> Self {
        Preset {
            name: "small".into(),
            image_height: 256,
            image_width: 128,
            patch: 16,
            dim: 384,
            image_layers: 12,
            text_layers: 12,
            fusion_layers: 2,
            heads: 6,
            mlp: 1536,
            text_len: 64,
            vocab: 16384,
            embed: 512,
            tic_reduce: 2,
            stem: Stem::Hmlp,
            image_arch: ImageArch::Vit,
            conv_widths: Vec::new(),
            conv_blocks: Vec::new(),
            conv_block: ConvBlock::Basic,
            conv_strides: Vec::new(),
            id_classes: 0,
            joint: JointFeature::Pooled,
            flip_average: false,
            attribute_fields: Vec::new(),
            attribute_weight: 0.0,
            text_bigrams: 0,
        }
    }

    /// The GPU preset of the paper's RN50 shape: ResNet-50 (bottleneck blocks 3-4-6-3, widths
    /// 64-128-256-512 → 2048, last stride 1) at the ReID standard 256×128, a 2048-wide joint
    /// space (the pooled feature, as `tiny`'s) and a 4-block, 512-wide text tower; `tiny`'s
    /// recipe otherwise (identity classifier, BNNeck joint feature, bigram table).
    pub fn rn50() -> Self {
        Preset {
            name: "rn50".into(),
            image_height: 256,
            image_width: 128,
            patch: 16,
            dim: 512,
            text_layers: 4,
            fusion_layers: 1,
            heads: 8,
            mlp: 2048,
            text_len: 64,
            vocab: 16384,
            conv_widths: vec![64, 128, 256, 512],
            conv_blocks: vec![3, 4, 6, 3],
            conv_block: ConvBlock::Bottleneck,
            conv_strides: vec![1, 2, 2, 1],
            embed: 512 * crate::resnet::BOTTLENECK_EXPANSION,
            ..Self::tiny()
        }
    }

    /// Names of all presets.
    pub const NAMES: [&'static str; 6] = ["test", "test-vit", "tiny", "tiny-vit", "small", "rn50"];

    /// Looks a preset up by name.
    ///
    /// # Errors
    /// An unknown name, with the list of known ones.
    pub fn by_name(name: &str) -> crate::Result<Self> {
        match name {
            "test" => Ok(Self::test()),
            "test-vit" => Ok(Self::test_vit()),
            "tiny" => Ok(Self::tiny()),
            "tiny-vit" => Ok(Self::tiny_vit()),
            "small" => Ok(Self::small()),
            "rn50" => Ok(Self::rn50()),
            other => Err(crate::Error::UnknownPreset(format!(
                "unknown model preset {other:?}; known presets: {}",
                Self::NAMES.join(", ")
            ))),
        }
    }

    /// Why weights made for `stored` cannot be used by a model built from `self`, with what to
    /// do; `None` when they match. A state folder from before `tiny` became a ResNet holds
    /// `tiny` checkpoints of the ViT: those point to `tiny-vit`.
    pub fn mismatch(&self, stored: &Preset) -> Option<String> {
        // The joint feature and flip averaging change no weight: a checkpoint trains on under
        // either.
        let same_weights = Preset {
            joint: self.joint,
            flip_average: self.flip_average,
            attribute_fields: self.adds_attribute_head(stored),
            attribute_weight: self.attribute_weight,
            text_bigrams: self.adds_text_bigrams(stored),
            ..stored.clone()
        };
        if same_weights == *self {
            return None;
        }
        let same_but_bigrams = Preset {
            text_bigrams: self.text_bigrams,
            ..same_weights.clone()
        };
        if stored.name == self.name && same_but_bigrams == *self {
            return Some(format!(
                "the checkpoints have a text bigram table of {} rows, this {:?} has {}; set trainer.text_bigrams = {} (plipd train --text-bigrams {}) to keep training them, or use a new state folder",
                stored.text_bigrams, self.name, self.text_bigrams, stored.text_bigrams, stored.text_bigrams
            ));
        }
        let same_but_text = Preset {
            text_layers: self.text_layers,
            ..same_weights.clone()
        };
        if stored.name == self.name && same_but_text == *self {
            return Some(format!(
                "the checkpoints were made with a {}-block text tower, this {:?} has {}; set trainer.text_layers = {} (plipd train --text-layers {}) to keep training them, or use a new state folder",
                stored.text_layers, self.name, self.text_layers, stored.text_layers, stored.text_layers
            ));
        }
        let same_but_widths = Preset {
            conv_widths: self.conv_widths.clone(),
            embed: self.embed,
            ..same_but_text.clone()
        };
        if stored.name == self.name && same_but_widths == *self {
            let w = stored
                .conv_widths
                .iter()
                .map(|w| w.to_string())
                .collect::<Vec<_>>();
            return Some(format!(
                "the checkpoints were made with ResNet stage widths {}, this {:?} has {:?}; set trainer.conv_widths = [{}] (plipd train --conv-widths {}) to keep training them, or use a new state folder",
                w.join(","), self.name, self.conv_widths, w.join(", "), w.join(",")
            ));
        }
        if stored.name == self.name {
            let renamed = Preset::by_name(&format!("{}-vit", stored.name))
                .ok()
                .filter(|p| p.image_arch == stored.image_arch && p.dim == stored.dim);
            return Some(match renamed {
                Some(p) => format!(
                    "the checkpoints were made by the earlier {:?} preset (a ViT image tower), now called {:?};                      use preset {:?} to keep training them, or a new state folder for the ResNet {:?}",
                    stored.name, p.name, p.name, self.name
                ),
                None => format!(
                    "the checkpoints were made with other {:?} dimensions than this build's; use a new state folder",
                    stored.name
                ),
            });
        }
        Some(format!(
            "the checkpoints are of preset {:?}, not {:?}; use preset {:?} or another state folder",
            stored.name, self.name, stored.name
        ))
    }

    /// This preset with a text tower of `layers` blocks (0: as it is).
    ///
    /// # Errors
    /// A preset that does not validate.
    pub fn with_text_layers(&self, layers: usize) -> crate::Result<Preset> {
        if layers == 0 {
            return Ok(self.clone());
        }
        let p = Preset {
            text_layers: layers,
            ..self.clone()
        };
        p.validate()?;
        Ok(p)
    }

    /// This preset with a hashed bigram embedding of `rows` rows in the text tower
    /// ([`Preset::text_bigrams`]; 0 = none).
    pub fn with_text_bigrams(&self, rows: usize) -> Preset {
        Preset {
            text_bigrams: rows,
            ..self.clone()
        }
    }

    /// Output channels of a ResNet stage per channel of its width: 4 for bottleneck blocks.
    pub fn conv_expansion(&self) -> usize {
        match self.conv_block {
            ConvBlock::Basic => 1,
            ConvBlock::Bottleneck => crate::resnet::BOTTLENECK_EXPANSION,
        }
    }

    /// This preset with the ResNet stage widths `widths` (four; empty leaves the preset's own),
    /// the joint embedding as wide as the last stage's output.
    ///
    /// # Errors
    /// Not four widths, a zero width, or a preset without the ResNet image tower.
    pub fn with_conv_widths(&self, widths: &[usize]) -> crate::Result<Preset> {
        if widths.is_empty() {
            return Ok(self.clone());
        }
        if self.image_arch != ImageArch::Resnet {
            return Err(crate::Error::InvalidPreset(format!(
                "preset {:?} has no ResNet image tower to set stage widths of",
                self.name
            )));
        }
        if widths.len() != 4 || widths.contains(&0) {
            return Err(crate::Error::InvalidPreset(format!(
                "ResNet stage widths {widths:?}: give four widths, none 0"
            )));
        }
        let p = Preset {
            conv_widths: widths.to_vec(),
            embed: widths[3] * self.conv_expansion(),
            ..self.clone()
        };
        p.validate()?;
        Ok(p)
    }

    /// This preset with the joint feature named `name` (`pooled` or `neck`).
    ///
    /// # Errors
    /// An unknown name, or `neck` on a preset without the identity classifier.
    pub fn with_joint(&self, name: &str) -> crate::Result<Preset> {
        let p = Preset {
            joint: JointFeature::by_name(name)?,
            ..self.clone()
        };
        p.validate()?;
        Ok(p)
    }

    /// This preset with an attribute head over `fields` (the number of values of each field;
    /// empty: none).
    pub fn with_attributes(&self, fields: &[usize]) -> Preset {
        Preset {
            attribute_fields: fields.to_vec(),
            ..self.clone()
        }
    }

    /// True when `label` names one of the attribute head's fields and a value inside it.
    pub fn is_attribute_field(&self, label: &crate::batch::AttributeLabel) -> bool {
        let mut start = 0;
        for &len in &self.attribute_fields {
            if start == label.start {
                return len == label.len && label.value < len;
            }
            start += len;
        }
        false
    }

    /// The attribute fields a checkpoint of `stored` has once loaded into a model of `self`:
    /// a checkpoint made without the attribute head takes `self`'s (the head is added, from
    /// its initialisation), any other keeps its own.
    pub fn adds_attribute_head(&self, stored: &Preset) -> Vec<usize> {
        if stored.attribute_fields.is_empty() {
            self.attribute_fields.clone()
        } else {
            stored.attribute_fields.clone()
        }
    }

    /// The bigram rows a checkpoint of `stored` has once loaded into a model of `self`: a
    /// checkpoint made without the table takes `self`'s (the table is added, at zero), any
    /// other keeps its own.
    pub fn adds_text_bigrams(&self, stored: &Preset) -> usize {
        if stored.text_bigrams == 0 {
            self.text_bigrams
        } else {
            stored.text_bigrams
        }
    }

    /// Outputs of the attribute head: the values of all its fields (0 = no head).
    pub fn attributes(&self) -> usize {
        self.attribute_fields.iter().sum()
    }

    /// Patches per image row.
    pub fn grid_w(&self) -> usize {
        self.image_width / self.patch
    }
    /// Patches per image column.
    pub fn grid_h(&self) -> usize {
        self.image_height / self.patch
    }
    /// Patch tokens per image.
    pub fn num_patches(&self) -> usize {
        self.grid_h() * self.grid_w()
    }
    /// Scalars in one patch (3 channels).
    pub fn patch_len(&self) -> usize {
        3 * self.patch * self.patch
    }
    /// Side of a patch as the colorization head predicts it.
    pub fn tic_side(&self) -> usize {
        self.patch / self.tic_reduce
    }
    /// Scalars the colorization head predicts per patch.
    pub fn tic_len(&self) -> usize {
        3 * self.tic_side() * self.tic_side()
    }
    /// Width of the vectors the gallery index holds: `embed`, or twice that for the `both`
    /// joint feature (pooled and neck side by side).
    pub fn index_dim(&self) -> usize {
        self.joint_dim() + self.agreement_dim()
    }

    /// Width of the joint feature(s) in an index row: `embed`, or twice that for `both`.
    pub fn joint_dim(&self) -> usize {
        if self.joint == JointFeature::Both {
            2 * self.embed
        } else {
            self.embed
        }
    }

    /// Width of the attribute readings in an index row: the head's values when attribute
    /// agreement ranks ([`Preset::attribute_weight`] > 0), else 0.
    pub fn agreement_dim(&self) -> usize {
        if self.attribute_weight > 0.0 {
            self.attributes()
        } else {
            0
        }
    }
    /// Scalars in one input image (3 channels).
    pub fn image_len(&self) -> usize {
        3 * self.image_height * self.image_width
    }

    /// Checks the dimensions fit together.
    ///
    /// # Errors
    /// The first inconsistency found.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::InvalidPreset(format!("{}: {m}", self.name)));
        if self.patch == 0
            || self.image_height % self.patch != 0
            || self.image_width % self.patch != 0
        {
            return bad(format!(
                "image {}x{} is not a whole number of {}-pixel patches",
                self.image_height, self.image_width, self.patch
            ));
        }
        if self.heads == 0 || self.dim % self.heads != 0 {
            return bad(format!(
                "width {} is not divisible by {} heads",
                self.dim, self.heads
            ));
        }
        if self.tic_reduce == 0 || self.patch % self.tic_reduce != 0 {
            return bad(format!(
                "patch {} not divisible by tic_reduce {}",
                self.patch, self.tic_reduce
            ));
        }
        if self.stem == Stem::Hmlp && self.patch != 16 {
            return bad(format!(
                "the hmlp stem needs 16-pixel patches, not {}",
                self.patch
            ));
        }
        if self.image_arch == ImageArch::Resnet {
            let four = |v: &Vec<usize>| v.len() == 4 && v.iter().all(|&x| x > 0);
            if !four(&self.conv_widths) || !four(&self.conv_blocks) || !four(&self.conv_strides) {
                return bad(
                    "a ResNet needs four positive stage widths, block counts and strides".into(),
                );
            }
            if self.conv_widths[3] * self.conv_expansion() != self.embed {
                return bad(format!(
                    "the ResNet's last stage output width {} must equal the joint width {} (its pooled feature is the joint embedding)",
                    self.conv_widths[3] * self.conv_expansion(),
                    self.embed
                ));
            }
            let stride = 4 * self.conv_strides.iter().product::<usize>();
            if stride != self.patch {
                return bad(format!(
                    "the ResNet's total stride {stride} must equal the patch side {} (TIC colours one position per patch)",
                    self.patch
                ));
            }
        }
        if self.joint != JointFeature::Pooled && self.id_classes == 0 {
            return bad(format!(
                "the {} joint feature needs the identity classifier (id_classes > 0)",
                self.joint.name()
            ));
        }
        if self.text_len < 3 || self.vocab < 8 {
            return bad("text length or vocabulary too small".into());
        }
        if self.attribute_fields.iter().any(|&n| n < 2) {
            return bad(format!(
                "attribute fields {:?}: each needs at least two values",
                self.attribute_fields
            ));
        }
        Ok(())
    }
}
