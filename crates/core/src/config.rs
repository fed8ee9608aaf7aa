//! Configuration: built-in defaults < preset TOML (`configs/*.toml`) < explicit CLI flags (SPEC §1.3).
//!
//! The three presets are embedded in the binary so `--config tiny` works from any directory; a path to a TOML file
//! is read from disk. Unknown keys are rejected so a typo never silently falls back to a default.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const PAPER_TOML: &str = include_str!("../../../configs/paper.toml");
pub const NARROW_TOML: &str = include_str!("../../../configs/narrow.toml");
pub const TINY_TOML: &str = include_str!("../../../configs/tiny.toml");

/// TransUNet R50-ViT-B/16 geometry (SPEC §5.1, `[model.transunet]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransUnetConfig {
    pub img_size: usize,
    /// Root channels `w`; ResNet stage outputs are 4w, 8w, 16w.
    pub resnet_width: usize,
    pub resnet_block_units: [usize; 3],
    pub gn_groups: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub mlp_dim: usize,
    pub dropout: f64,
    pub attention_dropout: f64,
    pub decoder_head_channels: usize,
    pub decoder_channels: [usize; 4],
    pub n_skip: usize,
    pub n_classes: usize,
}

impl TransUnetConfig {
    /// Token grid side: `img_size / 16`.
    pub fn grid(&self) -> usize {
        self.img_size / 16
    }
    /// Skip channels fed to the decoder blocks: `[8w, 4w, w, 0]` with entries at index ≥ `n_skip` zeroed.
    pub fn skip_channels(&self) -> [usize; 4] {
        let w = self.resnet_width;
        let mut s = [8 * w, 4 * w, w, 0];
        for (i, c) in s.iter_mut().enumerate() {
            if i >= self.n_skip {
                *c = 0;
            }
        }
        s
    }
}

/// SAM / MedSAM geometry (SPEC §6.1, `[model.sam]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamConfig {
    pub img_size: usize,
    pub patch_size: usize,
    pub encoder_embed_dim: usize,
    pub encoder_depth: usize,
    pub encoder_num_heads: usize,
    pub encoder_mlp_ratio: f64,
    pub encoder_window_size: usize,
    pub encoder_global_attn_indexes: Vec<usize>,
    pub prompt_embed_dim: usize,
    pub mask_in_chans: usize,
    pub decoder_depth: usize,
    pub decoder_num_heads: usize,
    pub decoder_mlp_dim: usize,
    pub decoder_attn_downsample: usize,
    pub num_multimask_outputs: usize,
    pub iou_head_depth: usize,
    pub iou_head_hidden_dim: usize,
}

impl SamConfig {
    /// Image-embedding grid side: `img_size / patch_size` (64 for SAM).
    pub fn embed_grid(&self) -> usize {
        self.img_size / self.patch_size
    }
    /// Mask-prompt input and low-resolution mask size: `4 · grid` (256 for SAM).
    pub fn mask_input_size(&self) -> usize {
        4 * self.embed_grid()
    }
    pub fn encoder_mlp_dim(&self) -> usize {
        (self.encoder_embed_dim as f64 * self.encoder_mlp_ratio) as usize
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub transunet: TransUnetConfig,
    pub sam: SamConfig,
}

/// Refiner settings (SPEC §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefinerConfig {
    pub mask_prompt_style: String,
    pub use_point_prompt: bool,
    pub use_box_prompt: bool,
    pub use_mask_prompt: bool,
    pub add_negative_point: bool,
    pub selection_temperature: f64,
    pub sharpen_coarse_mask: bool,
    pub sharpen_temperature: f64,
    pub sam_normalization: String,
    /// ROI-crop mode (SPEC §7.7, `--use-roi-crop`).
    pub use_roi_crop: bool,
    /// `--roi-expand-ratio r` (0.2): each side of the ROI box grows by `r·size`.
    pub roi_expand_ratio: f64,
    /// Gated residual refinement (SPEC §7.8) and its gate `γ`, `g_min`, `g_max`.
    pub use_gated_refinement: bool,
    pub gate_gamma: f64,
    pub gate_min: f64,
    pub gate_max: f64,
}

impl Default for RefinerConfig {
    fn default() -> Self {
        Self {
            mask_prompt_style: "direct".into(),
            use_point_prompt: true,
            use_box_prompt: true,
            use_mask_prompt: true,
            add_negative_point: true,
            selection_temperature: 0.1,
            sharpen_coarse_mask: false,
            sharpen_temperature: 10.0,
            sam_normalization: "sam".into(),
            use_roi_crop: false,
            roi_expand_ratio: 0.2,
            use_gated_refinement: false,
            gate_gamma: 1.0,
            gate_min: 0.0,
            gate_max: 0.8,
        }
    }
}

/// Synthetic phantom dataset (SPEC §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PhantomConfig {
    pub count: usize,
    pub height_range: [usize; 2],
    pub width_range: [usize; 2],
}

impl Default for PhantomConfig {
    fn default() -> Self {
        Self {
            count: 120,
            height_range: [280, 400],
            width_range: [360, 520],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    pub target_samples: usize,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            target_samples: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub n_splits: usize,
    pub test_ratio: f64,
    pub seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            n_splits: 5,
            test_ratio: 0.2,
            seed: 42,
        }
    }
}

/// Per-phase training defaults (SPEC §11). Only the keys a preset changes are listed here; the phase trainers
/// hold their own flag structs and read these as defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PhaseConfig {
    pub max_epochs: usize,
    pub batch_size: usize,
    /// `[phase1]` only: default of `phase1 --base-lr` (absent: the SPEC §11.2 default 0.01). Phases 2 and 3 take
    /// their rates from `--lr` and reject this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_lr: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of the preset this configuration came from (`paper`, `narrow`, `tiny` or a file path).
    #[serde(default)]
    pub preset: String,
    pub model: ModelConfig,
    #[serde(default)]
    pub refiner: RefinerConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub phantom: PhantomConfig,
    #[serde(default)]
    pub augment: AugmentConfig,
    #[serde(default = "default_phase1")]
    pub phase1: PhaseConfig,
    #[serde(default = "default_phase2")]
    pub phase2: PhaseConfig,
    #[serde(default = "default_phase3")]
    pub phase3: PhaseConfig,
}

impl Default for PhaseConfig {
    fn default() -> Self {
        default_phase1()
    }
}
fn default_phase1() -> PhaseConfig {
    PhaseConfig {
        max_epochs: 150,
        batch_size: 24,
        base_lr: None,
    }
}
fn default_phase2() -> PhaseConfig {
    PhaseConfig {
        max_epochs: 50,
        batch_size: 4,
        base_lr: None,
    }
}
fn default_phase3() -> PhaseConfig {
    PhaseConfig {
        max_epochs: 100,
        batch_size: 8,
        base_lr: None,
    }
}

impl Config {
    /// Parses a TOML document (a preset or a user file).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        let mut c: Config =
            toml::from_str(text).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        if c.preset.is_empty() {
            c.preset = origin.to_string();
        }
        c.validate()
            .map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        Ok(c)
    }

    /// `paper`, `narrow`, `tiny` (embedded) or a path to a `.toml` file.
    pub fn load(name_or_path: &str) -> Result<Self> {
        match name_or_path {
            "paper" => Self::from_toml_str(PAPER_TOML, "paper"),
            "narrow" => Self::from_toml_str(NARROW_TOML, "narrow"),
            "tiny" => Self::from_toml_str(TINY_TOML, "tiny"),
            p => {
                let path = Path::new(p);
                if !path.exists() {
                    return Err(Error::Config(format!(
                        "`{p}` is neither a preset (paper, narrow, tiny) nor an existing TOML file"
                    )));
                }
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                Self::from_toml_str(&text, p)
            }
        }
    }

    pub fn paper() -> Self {
        Self::load("paper").expect("embedded paper preset is valid")
    }
    pub fn narrow() -> Self {
        Self::load("narrow").expect("embedded narrow preset is valid")
    }
    pub fn tiny() -> Self {
        Self::load("tiny").expect("embedded tiny preset is valid")
    }

    /// The resolved configuration as TOML (written as `config.resolved.toml` into run directories).
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::Config(e.to_string()))
    }

    /// Geometry constraints that, if broken, would only surface deep inside a forward pass.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let t = &self.model.transunet;
        if t.img_size == 0 || !t.img_size.is_multiple_of(16) {
            return Err(format!(
                "model.transunet.img_size must be a positive multiple of 16, got {}",
                t.img_size
            ));
        }
        if t.num_heads == 0 || !t.hidden_size.is_multiple_of(t.num_heads) {
            return Err("model.transunet.hidden_size must be divisible by num_heads".into());
        }
        if t.gn_groups == 0 || !t.resnet_width.is_multiple_of(t.gn_groups) {
            return Err("model.transunet.resnet_width must be divisible by gn_groups".into());
        }
        if t.n_skip > 3 {
            return Err("model.transunet.n_skip must be at most 3".into());
        }
        let s = &self.model.sam;
        if s.patch_size == 0 || !s.img_size.is_multiple_of(s.patch_size) {
            return Err("model.sam.img_size must be a multiple of patch_size".into());
        }
        if s.encoder_num_heads == 0 || !s.encoder_embed_dim.is_multiple_of(s.encoder_num_heads) {
            return Err(
                "model.sam.encoder_embed_dim must be divisible by encoder_num_heads".into(),
            );
        }
        if s.decoder_num_heads == 0 || !s.prompt_embed_dim.is_multiple_of(s.decoder_num_heads) {
            return Err("model.sam.prompt_embed_dim must be divisible by decoder_num_heads".into());
        }
        if let Some(&i) = s
            .encoder_global_attn_indexes
            .iter()
            .find(|&&i| i >= s.encoder_depth)
        {
            return Err(format!(
                "model.sam.encoder_global_attn_indexes entry {i} is not below encoder_depth"
            ));
        }
        if let Some(lr) = self.phase1.base_lr {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(format!(
                    "phase1.base_lr must be a positive number, got {lr}"
                ));
            }
        }
        if self.phase2.base_lr.is_some() || self.phase3.base_lr.is_some() {
            return Err(
                "base_lr is a [phase1] key; phases 2 and 3 take their rate from --lr".into(),
            );
        }
        if !["direct", "gaussian"].contains(&self.refiner.mask_prompt_style.as_str()) {
            return Err(format!(
                "refiner.mask_prompt_style must be direct or gaussian, got {}",
                self.refiner.mask_prompt_style
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_validate() {
        for p in ["paper", "narrow", "tiny"] {
            let c = Config::load(p).unwrap();
            assert_eq!(c.preset, p);
            let back = Config::from_toml_str(&c.to_toml_string().unwrap(), p).unwrap();
            assert_eq!(back, c, "{p} round trip");
        }
    }

    #[test]
    fn paper_is_r50_vit_b16_and_sam_vit_b() {
        let c = Config::paper();
        assert_eq!(c.model.transunet.skip_channels(), [512, 256, 64, 0]);
        assert_eq!(c.model.transunet.grid(), 14);
        assert_eq!(c.model.sam.embed_grid(), 64);
        assert_eq!(c.model.sam.mask_input_size(), 256);
        assert_eq!(c.model.sam.encoder_mlp_dim(), 3072);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let text = NARROW_TOML.replace("[model.transunet]", "[model.transunet]\nhiden_size = 3");
        let err = Config::from_toml_str(&text, "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("hiden_size"), "{err}");
    }

    #[test]
    fn phase1_base_lr_default_is_per_preset_and_phase1_only() {
        // paper keeps the SPEC §11.2 defaults (0.01 / 24 / 150); tiny sets its own.
        let p = Config::paper().phase1;
        assert_eq!((p.base_lr, p.batch_size, p.max_epochs), (None, 24, 150));
        assert_eq!(Config::tiny().phase1.base_lr, Some(0.05));
        let text = TINY_TOML.replace("[phase2]", "[phase2]\nbase_lr = 0.1");
        let err = Config::from_toml_str(&text, "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("base_lr"), "{err}");
        let text = TINY_TOML.replace("base_lr = 0.05", "base_lr = -1.0");
        assert!(Config::from_toml_str(&text, "x.toml").is_err());
    }

    #[test]
    fn missing_preset_file_names_it() {
        let err = Config::load("no/such/file.toml").unwrap_err().to_string();
        assert!(err.contains("no/such/file.toml"), "{err}");
    }
}
