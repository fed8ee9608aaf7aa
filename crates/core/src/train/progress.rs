//! Progress reporting for training/validation and long tool loops (SPEC §12.4): an `indicatif` bar on a TTY
//! (position/total, it/s, ETA, running mean loss), plain lines otherwise — one every 10% of the loop and at least
//! every 60 s, no carriage returns.
use super::console::{progress_line, Console};
use std::time::{Duration, Instant};

/// Minimum interval between plain progress lines.
pub const PLAIN_MAX_INTERVAL: Duration = Duration::from_secs(60);

/// A running progress reporter; create it with [`Console::progress`].
pub struct Progress<'a> {
    console: &'a Console,
    tag: String,
    epoch: Option<(u64, u64)>,
    total: u64,
    pos: u64,
    loss_sum: f64,
    loss_n: u64,
    start: Instant,
    last_line: Instant,
    next_decile: u64,
    bar: Option<indicatif::ProgressBar>,
}

impl<'a> Progress<'a> {
    pub(crate) fn new(console: &'a Console, tag: &str, epoch: Option<(u64, u64)>, total: u64) -> Self {
        let bar = if console.style().plain {
            None
        } else {
            let b = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stdout());
            let tpl = "{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}";
            if let Ok(s) = indicatif::ProgressStyle::with_template(tpl) {
                let chars = if console.style().ascii { "=> " } else { "█▉ " };
                b.set_style(s.progress_chars(chars));
            }
            let mut prefix = format!("[{tag}]");
            if let Some((e, n)) = epoch {
                prefix += &format!(" epoch {e}/{n}");
            }
            b.set_prefix(prefix);
            Some(b)
        };
        let now = Instant::now();
        Progress {
            console,
            tag: tag.to_string(),
            epoch,
            total,
            pos: 0,
            loss_sum: 0.0,
            loss_n: 0,
            start: now,
            last_line: now,
            next_decile: 1,
            bar,
        }
    }

    /// Running mean of the losses passed to [`Progress::step`].
    pub fn mean_loss(&self) -> Option<f64> {
        (self.loss_n > 0).then(|| self.loss_sum / self.loss_n as f64)
    }

    fn rate_eta(&self) -> (f64, f64) {
        let el = self.start.elapsed().as_secs_f64();
        let rate = if el > 0.0 { self.pos as f64 / el } else { 0.0 };
        let eta = if rate > 0.0 { (self.total.saturating_sub(self.pos)) as f64 / rate } else { 0.0 };
        (rate, eta)
    }

    /// The current plain line.
    pub fn line(&self) -> String {
        let (rate, eta) = self.rate_eta();
        progress_line(&self.tag, self.epoch, self.pos, self.total, self.mean_loss(), rate, eta)
    }

    /// Advances by one step, optionally recording that step's loss.
    pub fn step(&mut self, loss: Option<f64>) {
        self.pos += 1;
        if let Some(l) = loss {
            self.loss_sum += l;
            self.loss_n += 1;
        }
        match &self.bar {
            Some(b) => {
                b.set_position(self.pos);
                if let Some(m) = self.mean_loss() {
                    b.set_message(format!("loss {m:.4}"));
                }
            }
            None => {
                let mut due = false;
                while self.total > 0 && self.next_decile <= 10 && self.pos * 10 >= self.next_decile * self.total {
                    self.next_decile += 1;
                    due = true;
                }
                if self.last_line.elapsed() >= PLAIN_MAX_INTERVAL {
                    due = true;
                }
                if due {
                    self.last_line = Instant::now();
                    self.console.print(&self.line());
                }
            }
        }
    }

    /// Ends the loop: clears the bar (its final state goes to `train.log`); plain mode prints nothing more (the 100%
    /// line was already printed).
    pub fn finish(self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
            self.console.log_only(&self.line());
        }
    }
}

/// Plain-mode decile schedule, exposed for tests: the step positions at which a line is printed (ignoring the 60 s
/// rule).
pub fn plain_line_positions(total: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut next = 1u64;
    for pos in 1..=total {
        let mut due = false;
        while next <= 10 && pos * 10 >= next * total {
            next += 1;
            due = true;
        }
        if due {
            out.push(pos);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::console::Style;

    #[test]
    fn deciles() {
        assert_eq!(plain_line_positions(10), (1..=10).collect::<Vec<_>>());
        assert_eq!(plain_line_positions(409).len(), 10);
        assert_eq!(*plain_line_positions(409).last().unwrap(), 409);
        assert_eq!(plain_line_positions(3), vec![1, 2, 3]);
    }

    #[test]
    fn plain_progress_writes_log_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train.log");
        let c = Console::new(Style::PLAIN);
        c.open_log(&p).unwrap();
        let mut pr = c.progress("val", Some((1, 2)), 20);
        for i in 0..20 {
            pr.step(Some(i as f64));
        }
        assert_eq!(pr.mean_loss(), Some(9.5));
        pr.finish();
        let log = std::fs::read_to_string(&p).unwrap();
        assert_eq!(log.lines().count(), 10);
        assert!(log.lines().last().unwrap().starts_with("[val] epoch 1/2 step 20/20 loss 9.5000 "));
        assert!(!log.contains('\r'));
    }
}
