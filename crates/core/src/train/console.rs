//! Console report (SPEC §12): run header, per-epoch `[TRAIN]` tree and `[VALIDATION]` table, the Phase 3
//! performance comparison, the end-of-run block and plain progress lines. Every formatter is a pure function of its
//! inputs and a [`Style`] (colour, ASCII), so the exact strings are testable. [`Console`] prints them and appends a
//! plain copy to `train.log`.
use crate::{Error, Result};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;

/// Output style (§12.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    /// ANSI colours (only on a TTY with `NO_COLOR` unset).
    pub color: bool,
    /// Replace box-drawing characters and `★ ↑ ↓ →` with `+-|`, `*`, `^`, `v`, `=` (`--ascii`).
    pub ascii: bool,
    /// Plain mode: no colours, no progress bars, no carriage returns (not a TTY, or `--plain`).
    pub plain: bool,
}

impl Style {
    /// Plain, Unicode, no colour (the `train.log` style and the golden-test style).
    pub const PLAIN: Style = Style { color: false, ascii: false, plain: true };

    /// Detects the style for stdout: plain when stdout is not a TTY or `force_plain`; colours when not plain and
    /// `NO_COLOR` is unset.
    pub fn detect(force_plain: bool, ascii: bool) -> Style {
        let tty = std::io::stdout().is_terminal();
        let plain = force_plain || !tty;
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Style { color: !plain && !no_color, ascii, plain }
    }
}

const RESET: &str = "\x1b[0m";
const BOLD_CYAN: &str = "\x1b[1;36m";
const BLUE: &str = "\x1b[34m";
const YELLOW: &str = "\x1b[33m";
const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";

fn paint(st: &Style, code: &str, s: &str) -> String {
    if st.color {
        format!("{code}{s}{RESET}")
    } else {
        s.to_string()
    }
}

/// ASCII replacements of §12.4.
pub fn asciify(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '─' | '━' => '-',
            '│' | '┃' => '|',
            '┌' | '┐' | '└' | '┘' | '├' | '┤' | '┬' | '┴' | '┼' => '+',
            '═' => '=',
            '★' => '*',
            '↑' => '^',
            '↓' => 'v',
            '→' => '=',
            c => c,
        })
        .collect()
}

fn finish(st: &Style, s: String) -> String {
    if st.ascii {
        asciify(&s)
    } else {
        s
    }
}

/// Removes ANSI escape sequences (for `train.log`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// C-style `%.2e`: two decimals, signed exponent of at least two digits (`9.94e-03`, `1.00e+00`).
pub fn fmt_sci(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let s = format!("{x:.2e}");
    match s.split_once('e') {
        Some((m, e)) => {
            let e: i32 = e.parse().unwrap_or(0);
            let sign = if e < 0 { '-' } else { '+' };
            format!("{m}e{sign}{:02}", e.abs())
        }
        None => s,
    }
}

/// `HH:MM:SS` (hours unbounded).
pub fn fmt_hms(secs: f64) -> String {
    let s = if secs.is_finite() && secs > 0.0 { secs.round() as u64 } else { 0 };
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

const RULE_EQ: usize = 70;

fn rule(c: char, n: usize) -> String {
    std::iter::repeat(c).take(n).collect()
}

/// Run header data (§12.1).
#[derive(Debug, Clone, PartialEq)]
pub struct RunHeader {
    /// `{DS}_fold{k}` (Phase 2: the run name).
    pub experiment: String,
    pub dataset: String,
    /// `(k, n)` with 0-based `k`; printed `k+1/n`. `None` prints `-` (Phase 2).
    pub fold: Option<(u32, u32)>,
    pub n_train: usize,
    pub n_val: usize,
    /// Extra lines after `Samples:` (Phase 2/3: `Model`, `Weights`, `Device`).
    pub extra: Vec<(String, String)>,
}

fn label_line(label: &str, value: &str, width: usize) -> String {
    let l = format!("{label}:");
    if l.chars().count() < width {
        format!("{l:<width$}{value}")
    } else {
        format!("{l} {value}")
    }
}

/// §12.1 run header (ends with a newline).
pub fn run_header(h: &RunHeader, st: &Style) -> String {
    let eq = rule('=', RULE_EQ);
    let mut s = String::new();
    s += &eq;
    s += "\n";
    s += &" ".repeat(20);
    s += &paint(st, BOLD_CYAN, "ULTRAREFINER TRAINING");
    s += "\n";
    s += &eq;
    s += "\n";
    let fold = match h.fold {
        Some((k, n)) => format!("{}/{}", k + 1, n),
        None => "-".into(),
    };
    for (l, v) in [
        ("Experiment", h.experiment.clone()),
        ("Dataset", h.dataset.clone()),
        ("Fold", fold),
        ("Samples", format!("Train: {} | Val: {}", h.n_train, h.n_val)),
    ] {
        s += &label_line(l, &v, 12);
        s += "\n";
    }
    for (l, v) in &h.extra {
        s += &label_line(l, v, 12);
        s += "\n";
    }
    s += &eq;
    s += "\n";
    finish(st, s)
}

/// The `[TRAIN]` tree of one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    pub loss: f64,
    /// Extra loss components after `Loss:`, with display labels (Phase 2: `BCE`, `Dice loss`, `IoU loss`, `Change`;
    /// Phase 3: `Coarse`, `Refined`, `Anchor`).
    pub components: Vec<(String, f64)>,
    pub dice: Option<f64>,
    pub iou: Option<f64>,
    /// `(group, lr)`; one group prints `LR:`, several print `LR (<group>):` each.
    pub lrs: Vec<(String, f64)>,
}

/// The validation block of one epoch.
#[derive(Debug, Clone, PartialEq)]
pub enum ValidationTable {
    /// Phase 1: `(name, value)` rows.
    Single(Vec<(String, f64)>),
    /// Phases 2/3: `(name, coarse, refined)` rows; delta = refined − coarse.
    Compare(Vec<(String, f64, f64)>),
}

/// Phase 1 validation rows in the order of §12.2 (`Dice (per-img)` after `Dice` when given).
pub fn single_rows(m: &super::metrics::PooledMetrics, dice_img: Option<f64>, loss: f64) -> Vec<(String, f64)> {
    let mut v = vec![("Dice".to_string(), m.dice)];
    if let Some(d) = dice_img {
        v.push(("Dice (per-img)".into(), d));
    }
    v.extend([
        ("IoU (Jaccard)".to_string(), m.iou),
        ("Precision".into(), m.precision),
        ("Recall".into(), m.recall),
        ("Accuracy".into(), m.accuracy),
        ("Loss".into(), loss),
    ]);
    v
}

/// Phase 3 performance comparison (§11.4.1): baseline, coarse and refined Dice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerformanceComparison {
    pub baseline: f64,
    pub coarse: f64,
    pub refined: f64,
}

/// Everything printed for one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochReport {
    /// 1-based.
    pub epoch: u64,
    pub epochs: u64,
    pub train: TrainReport,
    /// `None` on epochs without validation.
    pub validation: Option<ValidationTable>,
    pub is_best: bool,
    pub comparison: Option<PerformanceComparison>,
}

fn tree_line(last: bool, label: &str, value: &str) -> String {
    let head = if last { "  └── " } else { "  ├── " };
    format!("{head}{}\n", label_line(label, value, 11))
}

fn arrow(delta: f64) -> &'static str {
    if delta.abs() < 0.005 {
        "→"
    } else if delta > 0.0 {
        "↑"
    } else {
        "↓"
    }
}

fn delta_colored(st: &Style, delta: f64, text: &str) -> String {
    if delta.abs() < 0.005 {
        text.to_string()
    } else if delta > 0.0 {
        paint(st, GREEN, text)
    } else {
        paint(st, RED, text)
    }
}

/// Coarse-degradation threshold of §11.4.1.
pub const DEGRADATION_WARNING: f64 = 0.02;

/// §12.2 per-epoch report (starts with an empty line, ends with a newline).
pub fn epoch_report(r: &EpochReport, st: &Style) -> String {
    let mut s = String::from("\n");
    let dash = rule('─', RULE_EQ);
    s += &paint(st, BLUE, &dash);
    s += "\n";
    s += &format!("  EPOCH {}/{}\n", r.epoch, r.epochs);
    s += &paint(st, BLUE, &dash);
    s += "\n\n  [TRAIN]\n";
    let mut lines: Vec<(String, String)> = vec![("Loss".into(), format!("{:.4}", r.train.loss))];
    for (n, v) in &r.train.components {
        lines.push((n.clone(), format!("{v:.4}")));
    }
    if let Some(d) = r.train.dice {
        lines.push(("Dice".into(), format!("{d:.4}")));
    }
    if let Some(i) = r.train.iou {
        lines.push(("IoU".into(), format!("{i:.4}")));
    }
    if r.train.lrs.len() == 1 {
        lines.push(("LR".into(), fmt_sci(r.train.lrs[0].1)));
    } else {
        for (g, lr) in &r.train.lrs {
            lines.push((format!("LR ({g})"), fmt_sci(*lr)));
        }
    }
    let n = lines.len();
    for (i, (l, v)) in lines.iter().enumerate() {
        s += &tree_line(i + 1 == n, l, v);
    }
    if let Some(v) = &r.validation {
        s += "\n  [VALIDATION]";
        if r.is_best {
            s += " ";
            s += &paint(st, YELLOW, "★ BEST");
        }
        s += "\n";
        match v {
            ValidationTable::Single(rows) => {
                let line = rule('─', 40);
                s += &format!("  ┌{line}\n");
                s += &format!("  │  {:<20}Value\n", "Metric");
                s += &format!("  ├{line}\n");
                for (name, val) in rows {
                    s += &format!("  │  {name:<15} {val:>10.4}\n");
                }
                s += &format!("  └{line}\n");
            }
            ValidationTable::Compare(rows) => {
                let line = rule('─', 56);
                s += &format!("  ┌{line}\n");
                s += &format!("  │  {:<16}{:>10}{:>10}{:>10}\n", "Metric", "Coarse", "Refined", "Delta");
                s += &format!("  ├{line}\n");
                for (name, c, rf) in rows {
                    let d = rf - c;
                    let dt = format!("{d:>+10.4} {}", arrow(d));
                    s += &format!("  │  {name:<15} {c:>10.4}{rf:>10.4}{}\n", delta_colored(st, d, &dt));
                }
                s += &format!("  └{line}\n");
            }
        }
    }
    if let Some(c) = &r.comparison {
        s += "\n  [PERFORMANCE COMPARISON]\n";
        let dc = c.coarse - c.baseline;
        let dr = c.refined - c.coarse;
        s += &tree_line(false, "Baseline", &format!("{:.4}", c.baseline));
        let t = format!("{dc:+.4} vs baseline {}", arrow(dc));
        s += &tree_line(false, "Coarse", &format!("{:.4}  ({})", c.coarse, delta_colored(st, dc, &t)));
        let t = format!("{dr:+.4} vs coarse {}", arrow(dr));
        s += &tree_line(true, "Refined", &format!("{:.4}  ({})", c.refined, delta_colored(st, dr, &t)));
        if c.baseline - c.coarse > DEGRADATION_WARNING {
            let w = format!(
                "  WARNING: coarse Dice {:.4} is {:.4} below the baseline {:.4}",
                c.coarse,
                c.baseline - c.coarse,
                c.baseline
            );
            s += &paint(st, RED, &w);
            s += "\n";
        }
    }
    finish(st, s)
}

/// §12.3 end-of-run block. `best_label` e.g. `"Best Dice Score"`; `best_epoch` is printed as given (1-based).
pub fn end_of_run(best_label: &str, best_value: Option<f64>, best_epoch: Option<u64>, checkpoint: &Path, st: &Style) -> String {
    let eq = rule('=', RULE_EQ);
    let mut s = format!("{eq}\n{}{}\n{eq}\n", " ".repeat(20), paint(st, BOLD_CYAN, "TRAINING COMPLETE"));
    let v = best_value.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    let e = best_epoch.map(|e| e.to_string()).unwrap_or_else(|| "-".into());
    s += &label_line(best_label, &v, 17);
    s += "\n";
    s += &label_line("Best Epoch", &e, 17);
    s += "\n";
    s += &label_line("Checkpoint", &checkpoint.display().to_string(), 17);
    s += "\n";
    s += &eq;
    s += "\n";
    finish(st, s)
}

/// Plain-mode progress line (§12.4): `[train] epoch 3/150 step 120/409 loss 0.4512 12.3 it/s eta 00:00:33`.
/// `epoch = None` omits the epoch part; `loss = None` omits the loss.
pub fn progress_line(
    tag: &str,
    epoch: Option<(u64, u64)>,
    pos: u64,
    total: u64,
    loss: Option<f64>,
    rate: f64,
    eta_s: f64,
) -> String {
    let mut s = format!("[{tag}]");
    if let Some((e, n)) = epoch {
        s += &format!(" epoch {e}/{n}");
    }
    s += &format!(" step {pos}/{total}");
    if let Some(l) = loss {
        s += &format!(" loss {l:.4}");
    }
    s += &format!(" {rate:.1} it/s eta {}", fmt_hms(eta_s));
    s
}

/// Prints to stdout in the chosen style and appends a plain (ANSI-free) copy to `train.log`.
#[derive(Debug)]
pub struct Console {
    style: Style,
    log: Mutex<Option<std::fs::File>>,
}

impl Console {
    pub fn new(style: Style) -> Self {
        Console { style, log: Mutex::new(None) }
    }
    /// Opens (appends to) the plain-text log.
    pub fn open_log(&self, path: &Path) -> Result<()> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
        *self.log.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
        Ok(())
    }
    pub fn style(&self) -> Style {
        self.style
    }
    /// Prints `text` (a trailing newline is added if missing) and logs it.
    pub fn print(&self, text: &str) {
        let mut t = text.to_string();
        if !t.ends_with('\n') {
            t.push('\n');
        }
        {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        }
        self.log_only(&t);
    }
    /// Appends `text` to `train.log` only (ANSI stripped).
    pub fn log_only(&self, text: &str) {
        let mut g = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = g.as_mut() {
            let mut t = strip_ansi(text);
            if !t.ends_with('\n') {
                t.push('\n');
            }
            let _ = f.write_all(t.as_bytes());
            let _ = f.flush();
        }
    }
    /// A progress reporter for a loop of `total` steps (bar on a TTY, plain lines otherwise).
    pub fn progress(&self, tag: &str, epoch: Option<(u64, u64)>, total: u64) -> super::progress::Progress<'_> {
        super::progress::Progress::new(self, tag, epoch, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn sci_format() {
        assert_eq!(fmt_sci(9.94e-3), "9.94e-03");
        assert_eq!(fmt_sci(1.0), "1.00e+00");
        assert_eq!(fmt_sci(1e-5), "1.00e-05");
        assert_eq!(fmt_sci(0.0), "0.00e+00");
        assert_eq!(fmt_sci(1.234e120), "1.23e+120");
        assert_eq!(fmt_sci(-2.5e-7), "-2.50e-07");
    }

    #[test]
    fn golden_header() {
        let h = RunHeader {
            experiment: "BUSI_fold0".into(),
            dataset: "BUSI".into(),
            fold: Some((0, 5)),
            n_train: 409,
            n_val: 103,
            extra: vec![],
        };
        let want = "\
======================================================================
                    ULTRAREFINER TRAINING
======================================================================
Experiment: BUSI_fold0
Dataset:    BUSI
Fold:       1/5
Samples:    Train: 409 | Val: 103
======================================================================
";
        assert_eq!(run_header(&h, &Style::PLAIN), want);
        let mut h2 = h.clone();
        h2.fold = None;
        h2.extra = vec![("Device".into(), "cpu".into())];
        let s = run_header(&h2, &Style::PLAIN);
        assert!(s.contains("Fold:       -\n") && s.contains("Device:     cpu\n"));
        let c = run_header(&h, &Style { color: true, ascii: false, plain: false });
        assert!(c.contains("\x1b[1;36mULTRAREFINER TRAINING\x1b[0m"));
        assert_eq!(strip_ansi(&c), want);
    }

    fn spec_epoch() -> EpochReport {
        EpochReport {
            epoch: 1,
            epochs: 150,
            train: TrainReport {
                loss: 0.4523,
                components: vec![],
                dice: Some(0.7234),
                iou: Some(0.5812),
                lrs: vec![("transunet".into(), 9.94e-3)],
            },
            validation: Some(ValidationTable::Single(vec![
                ("Dice".into(), 0.7512),
                ("IoU (Jaccard)".into(), 0.6023),
                ("Precision".into(), 0.7834),
                ("Recall".into(), 0.7215),
                ("Accuracy".into(), 0.9234),
                ("Loss".into(), 0.4012),
            ])),
            is_best: true,
            comparison: None,
        }
    }

    #[test]
    fn golden_epoch_report_spec() {
        let want = "
──────────────────────────────────────────────────────────────────────
  EPOCH 1/150
──────────────────────────────────────────────────────────────────────

  [TRAIN]
  ├── Loss:      0.4523
  ├── Dice:      0.7234
  ├── IoU:       0.5812
  └── LR:        9.94e-03

  [VALIDATION] ★ BEST
  ┌────────────────────────────────────────
  │  Metric              Value
  ├────────────────────────────────────────
  │  Dice                0.7512
  │  IoU (Jaccard)       0.6023
  │  Precision           0.7834
  │  Recall              0.7215
  │  Accuracy            0.9234
  │  Loss                0.4012
  └────────────────────────────────────────
";
        assert_eq!(epoch_report(&spec_epoch(), &Style::PLAIN), want);
        let a = epoch_report(&spec_epoch(), &Style { color: false, ascii: true, plain: true });
        assert!(a.contains("  +-- Loss:      0.4523\n"));
        assert!(a.contains("  [VALIDATION] * BEST\n"));
        assert!(a.contains("  |  Dice                0.7512\n"));
        assert!(a.is_ascii());
        let c = epoch_report(&spec_epoch(), &Style { color: true, ascii: false, plain: false });
        assert!(c.contains("\x1b[33m★ BEST\x1b[0m"));
        assert!(c.contains("\x1b[34m──"));
        assert_eq!(strip_ansi(&c), want);
    }

    #[test]
    fn golden_epoch_report_phase3() {
        let r = EpochReport {
            epoch: 7,
            epochs: 100,
            train: TrainReport {
                loss: 0.3,
                components: vec![("Coarse".into(), 0.25), ("Refined".into(), 0.32)],
                dice: None,
                iou: None,
                lrs: vec![("transunet".into(), 1e-5), ("sam".into(), 2.5e-6)],
            },
            validation: Some(ValidationTable::Compare(vec![
                ("Dice".into(), 0.7012, 0.7312),
                ("IoU".into(), 0.6, 0.5),
                ("Loss".into(), 0.4, 0.402),
            ])),
            is_best: false,
            comparison: Some(PerformanceComparison { baseline: 0.75, coarse: 0.7012, refined: 0.7312 }),
        };
        let want = "
──────────────────────────────────────────────────────────────────────
  EPOCH 7/100
──────────────────────────────────────────────────────────────────────

  [TRAIN]
  ├── Loss:      0.3000
  ├── Coarse:    0.2500
  ├── Refined:   0.3200
  ├── LR (transunet): 1.00e-05
  └── LR (sam):  2.50e-06

  [VALIDATION]
  ┌────────────────────────────────────────────────────────
  │  Metric              Coarse   Refined     Delta
  ├────────────────────────────────────────────────────────
  │  Dice                0.7012    0.7312   +0.0300 ↑
  │  IoU                 0.6000    0.5000   -0.1000 ↓
  │  Loss                0.4000    0.4020   +0.0020 →
  └────────────────────────────────────────────────────────

  [PERFORMANCE COMPARISON]
  ├── Baseline:  0.7500
  ├── Coarse:    0.7012  (-0.0488 vs baseline ↓)
  └── Refined:   0.7312  (+0.0300 vs coarse ↑)
  WARNING: coarse Dice 0.7012 is 0.0488 below the baseline 0.7500
";
        assert_eq!(epoch_report(&r, &Style::PLAIN), want);
    }

    #[test]
    fn golden_end_of_run_and_progress() {
        let want = "\
======================================================================
                    TRAINING COMPLETE
======================================================================
Best Dice Score: 0.7512
Best Epoch:      37
Checkpoint:      checkpoints/transunet/BUSI/fold_0/best.safetensors
======================================================================
";
        let p = PathBuf::from("checkpoints/transunet/BUSI/fold_0/best.safetensors");
        assert_eq!(end_of_run("Best Dice Score", Some(0.7512), Some(37), &p, &Style::PLAIN), want);
        assert_eq!(
            progress_line("train", Some((3, 150)), 120, 409, Some(0.45123), 12.34, 33.2),
            "[train] epoch 3/150 step 120/409 loss 0.4512 12.3 it/s eta 00:00:33"
        );
    }

    #[test]
    fn console_log_is_plain() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.log");
        let c = Console::new(Style { color: true, ascii: false, plain: false });
        c.open_log(&p).unwrap();
        c.log_only("\x1b[33m★ BEST\x1b[0m");
        c.log_only("x\n");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "★ BEST\nx\n");
    }
}
