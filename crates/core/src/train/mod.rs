//! Common training machinery shared by the three phase trainers (SPEC §9–§12): losses, batch-pooled metrics,
//! optimisers with exportable state, LR schedules, checkpoints, the run directory, console report, progress
//! reporting, `progress.png` and graceful stop on signals.
//!
//! Entry points: [`losses::phase1_loss`], [`losses::phase2_loss`], [`losses::phase3_loss`],
//! [`metrics::PooledMetrics`], [`optim::Sgd`], [`optim::AdamW`], [`optim::ParamGroup`], [`optim::Grads`],
//! [`schedule::poly_lr`], [`schedule::cosine_lr`], [`schedule::Schedule`], [`checkpoint::save_checkpoint`],
//! [`checkpoint::load_checkpoint`], [`checkpoint::Sidecar`], [`rundir::RunDir`], [`rundir::resolve_resume`],
//! [`console`], [`plot::progress_png`], [`signals::StopFlag`].
pub mod checkpoint;
pub mod console;
pub mod history;
pub mod losses;
pub mod metrics;
pub mod optim;
mod optim_fused;
pub mod phase1;
pub mod phase2;
pub mod phase3;
pub mod plot;
pub mod progress;
pub mod rundir;
pub mod schedule;
pub mod signals;

pub use checkpoint::{load_checkpoint, save_checkpoint, Sidecar};
pub use history::{HistoryRow, Named};
pub use losses::{phase1_loss, phase2_loss, phase3_loss, LossOutput};
pub use metrics::PooledMetrics;
pub use optim::{AdamW, Grads, Optimizer, ParamGroup, Sgd};
pub use rundir::RunDir;
pub use schedule::{cosine_lr, poly_lr, Schedule};
pub use signals::{StopFlag, EXIT_TEMPFAIL};
