//! Model presets: every size of the PLIP dual encoder, chosen at run time by name.
//!
//! | preset | input (H×W) | patch | patches | width | layers (image/text/fusion) | heads | MLP | text tokens | vocabulary capacity | joint dim | TIC output per patch | parameters |
//! |---|---|---|---|---|---|---|---|---|---|---|---|---|
//! | `test`  | 32×16   | 8  | 8   | 32  | 2 / 2 / 1  | 2 | 64   | 24 | 1024  | 32  | 8×8×3 = 192   | 129,377 |
//! | `tiny`  | 128×64  | 16 | 32  | 192 | 6 / 6 / 1  | 3 | 768  | 64 | 8192  | 256 | 8×8×3 = 192   | 9,302,177 |
//! | `small` | 256×128 | 16 | 128 | 384 | 12 / 12 / 2 | 6 | 1536 | 64 | 16384 | 512 | 8×8×3 = 192  | 60,110,337 |
//!
//! The parameter counts are checked by a unit test, so this table stays true.

use serde::{Deserialize, Serialize};

/// The dimensions of one model size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// How pixels become patch tokens.
    #[serde(default)]
    pub stem: Stem,
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
    /// The preset for unit tests: tiny inputs, a few thousand parameters per layer.
    pub fn test() -> Self {
        Preset {
            name: "test".into(),
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
        }
    }

    /// The CPU default.
    pub fn tiny() -> Self {
        Preset {
            name: "tiny".into(),
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
        }
    }

    /// Names of all presets.
    pub const NAMES: [&'static str; 3] = ["test", "tiny", "small"];

    /// Looks a preset up by name.
    ///
    /// # Errors
    /// An unknown name, with the list of known ones.
    pub fn by_name(name: &str) -> crate::Result<Self> {
        match name {
            "test" => Ok(Self::test()),
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            other => Err(crate::Error::UnknownPreset(format!(
                "unknown model preset {other:?}; known presets: {}",
                Self::NAMES.join(", ")
            ))),
        }
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
        if self.text_len < 3 || self.vocab < 8 {
            return bad("text length or vocabulary too small".into());
        }
        Ok(())
    }
}
