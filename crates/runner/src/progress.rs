//! Progress of long commands. On a terminal it is an indicatif bar; when stderr is a file or a
//! pipe (a batch scheduler's log), indicatif hides its bars, so plain lines take their place: one
//! per finished job of a sweep, one every few steps of a single image.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// An indicatif bar (stderr is a terminal).
    Bar,
    /// Plain lines on stderr (a log file or a pipe).
    Lines,
    /// Nothing.
    Hidden,
}

impl ProgressMode {
    /// A bar on a terminal, lines otherwise; `Hidden` when `show` is false.
    pub fn detect(show: bool) -> Self {
        match (show, std::io::stderr().is_terminal()) {
            (false, _) => Self::Hidden,
            (true, true) => Self::Bar,
            (true, false) => Self::Lines,
        }
    }
}

/// `h:mm:ss`.
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The remaining time at the average pace so far.
fn eta(elapsed: Duration, done: u64, total: u64) -> Duration {
    if done == 0 {
        return Duration::ZERO;
    }
    elapsed.mul_f64(total.saturating_sub(done) as f64 / done as f64)
}

/// Progress of the denoising steps of one image (`pnd generate`).
pub struct StepProgress {
    mode: ProgressMode,
    bar: ProgressBar,
    what: String,
    started: Instant,
    /// The last step a line was printed for.
    printed: Option<usize>,
}

impl StepProgress {
    pub fn new(what: &str, steps: usize, mode: ProgressMode) -> Self {
        let bar = if mode == ProgressMode::Bar {
            let b = ProgressBar::new(steps as u64);
            b.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps, ETA {eta}")
                    .expect("static template"),
            );
            b.set_message(what.to_string());
            b
        } else {
            ProgressBar::hidden()
        };
        Self {
            mode,
            bar,
            what: what.to_string(),
            started: Instant::now(),
            printed: None,
        }
    }

    /// Step `i` of `n` is done; in line mode a line every tenth of the run (and at the end).
    pub fn step(&mut self, i: usize, n: usize) {
        self.bar.set_length(n as u64);
        self.bar.set_position(i as u64);
        if self.mode != ProgressMode::Lines || n == 0 {
            return;
        }
        let every = n.div_ceil(10).max(1);
        let due = i == n || self.printed.is_none_or(|p| i >= p + every);
        if i > 0 && due && self.printed != Some(i) {
            self.printed = Some(i);
            let elapsed = self.started.elapsed();
            eprintln!(
                "{}: step {i}/{n}, {:.1}s, ETA {}",
                self.what,
                elapsed.as_secs_f64(),
                clock(eta(elapsed, i as u64, n as u64))
            );
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Progress of a sweep's jobs.
pub struct JobProgress {
    mode: ProgressMode,
    bar: ProgressBar,
    total: u64,
    done: u64,
    started: Instant,
}

impl JobProgress {
    pub fn new(total: usize, mode: ProgressMode) -> Self {
        let bar = if mode == ProgressMode::Bar {
            ProgressBar::new(total as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} jobs, ETA {eta} {msg}",
            )
            .expect("valid progress template"),
        );
        Self {
            mode,
            bar,
            total: total as u64,
            done: 0,
            started: Instant::now(),
        }
    }

    pub fn start(&self, id: &str) {
        self.bar.set_message(id.to_string());
    }

    /// A job ended after `seconds`; `failure` is its error when it failed.
    pub fn finished(&mut self, id: &str, seconds: f64, failure: Option<&str>) {
        self.done += 1;
        self.bar.inc(1);
        if self.mode != ProgressMode::Lines {
            return;
        }
        let elapsed = self.started.elapsed();
        let eta = clock(eta(elapsed, self.done, self.total));
        let (done, total) = (self.done, self.total);
        match failure {
            None => eprintln!("job {id} done in {seconds:.1}s [{done}/{total}], ETA {eta}"),
            Some(e) => {
                eprintln!("job {id} FAILED after {seconds:.1}s [{done}/{total}], ETA {eta}: {e}")
            }
        }
    }

    /// A job counted in the total was finished (or is being run) by another process.
    pub fn elsewhere(&mut self) {
        self.total = self.total.saturating_sub(1);
        self.bar.set_length(self.total);
    }

    /// Leaves the bar as it is (the run stops on an error).
    pub fn abandon(&self) {
        self.bar.abandon();
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Progress of a training run: optimizer steps with the running loss (the mean of the last 20
/// steps' losses).
pub struct TrainProgress {
    mode: ProgressMode,
    bar: ProgressBar,
    what: String,
    started: Instant,
    first: usize,
    recent: std::collections::VecDeque<f64>,
    printed: Option<usize>,
}

impl TrainProgress {
    /// A run of `steps` optimizer steps that starts after `done` (a resumed run).
    pub fn new(what: &str, done: usize, steps: usize, mode: ProgressMode) -> Self {
        let bar = if mode == ProgressMode::Bar {
            let b = ProgressBar::new(steps as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} steps, {msg}, ETA {eta}",
                )
                .expect("static template"),
            );
            b.set_prefix(what.to_string());
            b.set_position(done as u64);
            b.reset_eta();
            b
        } else {
            ProgressBar::hidden()
        };
        Self {
            mode,
            bar,
            what: what.to_string(),
            started: Instant::now(),
            first: done,
            recent: Default::default(),
            printed: None,
        }
    }

    /// Running mean of the recent losses.
    pub fn running_loss(&self) -> f64 {
        self.recent.iter().sum::<f64>() / self.recent.len().max(1) as f64
    }

    /// Step `step` of `steps` is done with mean micro-batch loss `loss`.
    pub fn step(&mut self, step: usize, steps: usize, loss: f64) {
        self.recent.push_back(loss);
        if self.recent.len() > 20 {
            self.recent.pop_front();
        }
        let msg = format!("loss {:.4}", self.running_loss());
        self.bar.set_position(step as u64);
        self.bar.set_message(msg.clone());
        if self.mode != ProgressMode::Lines {
            return;
        }
        let every = steps.div_ceil(20).max(1);
        if step == steps || self.printed.is_none_or(|p| step >= p + every) {
            self.printed = Some(step);
            let elapsed = self.started.elapsed();
            eprintln!(
                "{}: step {step}/{steps}, {msg}, {:.1}s, ETA {}",
                self.what,
                elapsed.as_secs_f64(),
                clock(eta(
                    elapsed,
                    (step - self.first) as u64,
                    (steps - self.first) as u64
                ))
            );
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The line of the null-text inversion's progress after `done` of `total` sampling steps, when
/// one is due: at every tenth step and the last (`guidance::inversion::set_progress`).
pub fn inversion_progress_line(done: usize, total: usize) -> Option<String> {
    (done == total || done % 10 == 0).then(|| format!("null-text inversion: step {done}/{total}"))
}

/// Prints [`inversion_progress_line`] on stderr (what `pnd` registers).
pub fn inversion_line(done: usize, total: usize) {
    if let Some(line) = inversion_progress_line(done, total) {
        eprintln!("{line}");
    }
}

#[cfg(test)]
mod inversion_tests {
    use super::*;

    #[test]
    fn inversion_lines_come_every_ten_steps_and_at_the_end() {
        let lines: Vec<usize> = (1..=25)
            .filter(|&i| inversion_progress_line(i, 25).is_some())
            .collect();
        assert_eq!(lines, vec![10, 20, 25]);
        assert_eq!(
            inversion_progress_line(10, 25).unwrap(),
            "null-text inversion: step 10/25"
        );
    }
}
