//! Run directory layout and files (SPEC §11.1.5): `config.resolved.toml`, checkpoints by stem, `metrics.csv`
//! regenerated from the history, `summary.json`, `train.log`, `progress.png`; and `--resume` resolution (§11.1.6).
use super::checkpoint::{atomic_write, atomic_write_json, checkpoint_paths, Best, Phase};
use super::history::HistoryRow;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Stems of the standard checkpoints.
pub const LATEST: &str = "latest";
pub const BEST: &str = "best";
pub const FINAL: &str = "final";

/// `epoch_<e>` stem for 1-based epoch `e`.
pub fn epoch_stem(epoch_1based: u64) -> String {
    format!("epoch_{epoch_1based}")
}

/// `<output-dir>/<exp>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// The run directory `<output_dir>/<exp_name>` (not created; `exp_name` may contain `/`, e.g. `BUSI/fold_0`).
    pub fn new(output_dir: impl AsRef<Path>, exp_name: &str) -> Self {
        RunDir { root: output_dir.as_ref().join(exp_name) }
    }
    /// A run directory at an explicit path.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        RunDir { root: root.into() }
    }
    /// Creates the directory (and parents).
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.root).map_err(|e| Error::io(&self.root, e))
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// A file inside the run directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    /// `(<stem>.safetensors, <stem>.json)`.
    pub fn checkpoint(&self, stem: &str) -> (PathBuf, PathBuf) {
        checkpoint_paths(&self.root, stem)
    }
    pub fn config_path(&self) -> PathBuf {
        self.path("config.resolved.toml")
    }
    pub fn metrics_csv_path(&self) -> PathBuf {
        self.path("metrics.csv")
    }
    pub fn summary_path(&self) -> PathBuf {
        self.path("summary.json")
    }
    pub fn log_path(&self) -> PathBuf {
        self.path("train.log")
    }
    pub fn progress_png_path(&self) -> PathBuf {
        self.path("progress.png")
    }
    /// Writes `config.resolved.toml` atomically.
    pub fn write_config(&self, toml_text: &str) -> Result<()> {
        atomic_write(&self.config_path(), toml_text.as_bytes())
    }
    /// Regenerates `metrics.csv` from the whole history (atomically).
    pub fn write_metrics_csv(&self, history: &[HistoryRow]) -> Result<()> {
        let text = metrics_csv(history)?;
        atomic_write(&self.metrics_csv_path(), text.as_bytes())
    }
    /// Writes `summary.json` atomically.
    pub fn write_summary(&self, s: &Summary) -> Result<()> {
        atomic_write_json(&self.summary_path(), s)
    }
    /// Reads `summary.json` if it exists.
    pub fn read_summary(&self) -> Result<Option<Summary>> {
        let p = self.summary_path();
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        serde_json::from_str(&text).map(Some).map_err(|e| Error::file(&p, format!("invalid summary: {e}")))
    }
    /// Writes `progress.png` from the history.
    pub fn write_progress_png(&self, history: &[HistoryRow], title: &str) -> Result<()> {
        super::plot::progress_png(&self.progress_png_path(), history, title)
    }
}

/// Union of names over rows, in first-appearance order.
fn union_names<'a, F>(history: &'a [HistoryRow], f: F) -> Vec<String>
where
    F: Fn(&'a HistoryRow) -> &'a super::history::Named,
{
    let mut out: Vec<String> = Vec::new();
    for r in history {
        for n in f(r).names() {
            if !out.iter().any(|x| x == n) {
                out.push(n.to_string());
            }
        }
    }
    out
}

fn cell(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{}", super::history::round15(x)),
        Some(x) => format!("{x}"),
        None => String::new(),
    }
}

/// `metrics.csv` text: `epoch, time_s, lr_<group>…, train_loss, train_<component>…, train_dice, train_iou, val_loss,
/// val_dice, val_iou, val_precision, val_recall, val_accuracy, val_specificity, val_dice_img, <phase-specific>…,
/// is_best` (empty cell = not computed; `is_best` is 1/0; numbers rounded to 15 significant digits, see
/// [`round15`](super::history::round15)).
pub fn metrics_csv(history: &[HistoryRow]) -> Result<String> {
    let groups = union_names(history, |r| &r.lr);
    let comps = union_names(history, |r| &r.components);
    let extras = union_names(history, |r| &r.extra);
    let mut header: Vec<String> = vec!["epoch".into(), "time_s".into()];
    header.extend(groups.iter().map(|g| format!("lr_{g}")));
    header.push("train_loss".into());
    header.extend(comps.iter().map(|c| format!("train_{c}")));
    header.extend(["train_dice", "train_iou"].map(String::from));
    if let Some(r) = history.first() {
        header.extend(r.val_columns().iter().map(|(n, _)| n.to_string()));
    } else {
        header.extend(HistoryRow::default().val_columns().iter().map(|(n, _)| n.to_string()));
    }
    header.extend(extras.iter().cloned());
    header.push("is_best".into());
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(&header).map_err(|e| Error::msg(format!("metrics.csv: {e}")))?;
    for r in history {
        let mut rec: Vec<String> = vec![r.epoch.to_string(), cell(Some(r.time_s))];
        rec.extend(groups.iter().map(|g| cell(r.lr.get(g))));
        rec.push(cell(r.train_loss));
        rec.extend(comps.iter().map(|c| cell(r.components.get(c))));
        rec.push(cell(r.train_dice));
        rec.push(cell(r.train_iou));
        rec.extend(r.val_columns().iter().map(|(_, v)| cell(*v)));
        rec.extend(extras.iter().map(|e| cell(r.extra.get(e))));
        rec.push(if r.is_best { "1".into() } else { "0".into() });
        w.write_record(&rec).map_err(|e| Error::msg(format!("metrics.csv: {e}")))?;
    }
    let bytes = w.into_inner().map_err(|e| Error::msg(format!("metrics.csv: {e}")))?;
    String::from_utf8(bytes).map_err(|e| Error::msg(format!("metrics.csv: {e}")))
}

/// `summary.json` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Complete,
    Failed,
    /// Stopped by SIGTERM/SIGUSR1 (exit 75); `latest` holds the last completed epoch.
    Interrupted,
}

/// Durations in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Durations {
    /// Sum of epoch times over the whole history (all sessions).
    pub total_s: f64,
    pub mean_epoch_s: f64,
    /// Wall time of this process so far.
    pub this_session_s: f64,
}

impl Durations {
    pub fn from_history(history: &[HistoryRow], this_session_s: f64) -> Self {
        let total: f64 = history.iter().map(|r| r.time_s).sum();
        let mean = if history.is_empty() { 0.0 } else { total / history.len() as f64 };
        Durations { total_s: total, mean_epoch_s: mean, this_session_s }
    }
}

/// Versions recorded in `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Versions {
    pub ultrarefiner: String,
    pub candle: String,
}

impl Default for Versions {
    fn default() -> Self {
        Versions { ultrarefiner: env!("CARGO_PKG_VERSION").to_string(), candle: "0.11.1".to_string() }
    }
}

/// `summary.json` (§11.1.5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub status: RunStatus,
    pub kind: Phase,
    pub experiment: String,
    pub best: Best,
    /// The last history row (final metrics so far).
    pub final_metrics: Option<HistoryRow>,
    /// Completed epochs.
    pub epochs: u64,
    pub max_epochs: u64,
    pub durations: Durations,
    pub device: String,
    pub versions: Versions,
    /// RFC 3339 UTC time of this write.
    pub updated: String,
    /// Error text for `failed`, reason for `interrupted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Outcome of `--resume` resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeDecision {
    /// `summary.json` says `complete`: print "already complete" and exit 0.
    AlreadyComplete,
    /// Resume from this checkpoint (`.safetensors` path).
    Resume(PathBuf),
    /// Start from scratch.
    Fresh,
}

/// `--resume` resolution (§11.1.6). `resume = None`: fresh. `Some("auto")`: complete run → [`AlreadyComplete`]
/// (with `force_retrain`: [`Fresh`], retraining from scratch); else `latest.safetensors` present → resume from it;
/// else fresh. `Some(PATH)`: resume from that checkpoint (`X.safetensors`, `X.json` or stem `X`), which must exist.
///
/// [`AlreadyComplete`]: ResumeDecision::AlreadyComplete
/// [`Fresh`]: ResumeDecision::Fresh
pub fn resolve_resume(run: &RunDir, resume: Option<&str>, force_retrain: bool) -> Result<ResumeDecision> {
    match resume {
        None => Ok(ResumeDecision::Fresh),
        Some("auto") => {
            if force_retrain {
                return Ok(ResumeDecision::Fresh);
            }
            if let Some(s) = run.read_summary()? {
                if s.status == RunStatus::Complete {
                    return Ok(ResumeDecision::AlreadyComplete);
                }
            }
            let (st, _) = run.checkpoint(LATEST);
            if st.is_file() {
                Ok(ResumeDecision::Resume(st))
            } else {
                Ok(ResumeDecision::Fresh)
            }
        }
        Some(p) => {
            let (st, js) = super::checkpoint::resolve_checkpoint(Path::new(p));
            if !st.is_file() {
                return Err(Error::Arg(format!("--resume {p}: checkpoint {} not found", st.display())));
            }
            if !js.is_file() {
                return Err(Error::Arg(format!("--resume {p}: sidecar {} not found", js.display())));
            }
            Ok(ResumeDecision::Resume(st))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::history::Named;

    pub(crate) fn row(e: u64, best: bool) -> HistoryRow {
        HistoryRow {
            epoch: e,
            time_s: 1.5,
            lr: Named(vec![("transunet".into(), 0.01)]),
            train_loss: Some(0.5),
            components: Named(vec![("ce".into(), 0.7), ("dice_loss".into(), 0.3)]),
            train_dice: Some(0.6),
            train_iou: Some(0.4),
            val_loss: Some(0.45),
            val_dice: Some(0.65),
            val_iou: None,
            val_precision: Some(0.7),
            val_recall: Some(0.6),
            val_accuracy: Some(0.9),
            val_specificity: Some(0.95),
            val_dice_img: Some(0.62),
            extra: Named::new(),
            is_best: best,
            note: None,
        }
    }

    #[test]
    fn csv_golden() {
        let mut r2 = row(2, false);
        r2.extra.set("val_coarse_dice", 0.25);
        let text = metrics_csv(&[row(1, true), r2]).unwrap();
        let want = "epoch,time_s,lr_transunet,train_loss,train_ce,train_dice_loss,train_dice,train_iou,val_loss,val_dice,val_iou,val_precision,val_recall,val_accuracy,val_specificity,val_dice_img,val_coarse_dice,is_best\n\
1,1.5,0.01,0.5,0.7,0.3,0.6,0.4,0.45,0.65,,0.7,0.6,0.9,0.95,0.62,,1\n\
2,1.5,0.01,0.5,0.7,0.3,0.6,0.4,0.45,0.65,,0.7,0.6,0.9,0.95,0.62,0.25,0\n";
        assert_eq!(text, want);
    }

    #[test]
    fn history_json_round_trip_keeps_order() {
        let mut r = row(1, true);
        r.lr = Named(vec![("transunet".into(), 1e-5), ("sam".into(), 2e-5)]);
        r.components.set("nan_one", f64::NAN);
        let j = serde_json::to_string(&r).unwrap();
        let back: HistoryRow = serde_json::from_str(&j).unwrap();
        assert_eq!(back.lr.names().collect::<Vec<_>>(), vec!["transunet", "sam"]);
        assert!(back.components.get("nan_one").unwrap().is_nan());
        assert_eq!(back.epoch, 1);
    }
}
