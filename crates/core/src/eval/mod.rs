//! Evaluation, inference, fold ensembling and overlays (SPEC §10, §13.1–§13.4).
//!
//! * [`evaluate::run`] with [`evaluate::EvaluateOptions`] — `ultrarefiner evaluate`;
//! * [`infer::run`] with [`infer::InferOptions`] — `ultrarefiner infer`; [`infer::predict_images`] is the per-image
//!   path (also timed by the `infer-per-image` bench workload);
//! * [`model::EvalModel`] / [`model::ModelSource`] — frozen models and fold ensembles (mean of probabilities, or
//!   `coarse-then-refine`);
//! * [`postprocess`] — §13.4 rejection rules and boundary fusion;
//! * [`metrics`] — per-image metrics and aggregation; [`visualize`] — `summary.png` and overlays.

pub mod evaluate;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod postprocess;
pub mod visualize;
