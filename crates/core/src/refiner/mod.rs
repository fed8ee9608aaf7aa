//! The differentiable refiner (SPEC §7): shared SAM preprocessing (§7.1), prompt generation (§7.2–§7.3), the SAM
//! refiner with multimask soft selection (§7.4), the end-to-end `UltraRefiner` (§7.5), the ROI-crop mode (§7.7) and
//! the optional gated residual refinement (§7.8).
pub mod gate;
pub mod preprocess;
pub mod prompts;
pub mod roi;
pub mod sam_refiner;
pub mod select;
pub mod ultra;

pub use gate::Gate;
pub use preprocess::{preprocess, SamInputs, SamNormalization};
pub use prompts::{extract_prompts, mask_prompt, MaskPromptStyle, PromptConfig, Prompts};
pub use sam_refiner::{RefinerOutput, RoiOutput, SamRefiner, SamRefinerSettings};
pub use select::{selection_weights, soft_select};
pub use ultra::{ForwardOptions, UltraOutput, UltraRefiner};
