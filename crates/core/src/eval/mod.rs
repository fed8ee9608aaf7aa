//! Evaluation, inference, fold ensembling and overlays (SPEC §10, §13.1–§13.3).
//!
//! * [`evaluate::run`] with [`evaluate::EvaluateOptions`] — `ultrarefiner evaluate`;
//! * [`model::EvalModel`] / [`model::ModelSource`] — frozen models and fold ensembles (mean of probabilities);
//! * [`metrics`] — per-image metrics and aggregation; [`visualize`] — `summary.png` and overlays.

pub mod evaluate;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod visualize;
