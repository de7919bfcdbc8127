//! Progress estimation: the download/convert split from the last stored stage measurements,
//! and the tracker that turns stage byte counts into overall percent (never decreasing),
//! stage percent and ETA.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::model::{Progress, Stage};

/// Default rates when a stage has no history (monitoring spec): 100 MB/s download, 200 MB/s convert.
pub(crate) const DEFAULT_DOWNLOAD_BPS: f64 = 100e6;
pub(crate) const DEFAULT_CONVERT_BPS: f64 = 200e6;
/// Measurements kept per stage.
pub(crate) const HISTORY_LEN: usize = 20;
/// Overall percent reserved for the finalizing stage (flush, pool refresh).
const FINALIZE_SHARE: f64 = 1.0;
/// Below this much elapsed stage time the historical rate is used for the ETA.
const MIN_OBSERVATION_SECS: f64 = 1.0;

/// One finished stage: how many bytes it moved in how long.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct StageSample {
    pub(crate) bytes: u64,
    pub(crate) seconds: f64,
}

/// Throughput from samples (total bytes over total seconds, so short runs do not dominate),
/// or `default` without usable history.
pub(crate) fn stage_rate(samples: &[StageSample], default: f64) -> f64 {
    let recent = &samples[samples.len().saturating_sub(HISTORY_LEN)..];
    let bytes: f64 = recent.iter().map(|s| s.bytes as f64).sum();
    let secs: f64 = recent.iter().map(|s| s.seconds).sum();
    if bytes > 0.0 && secs > 0.0 {
        bytes / secs
    } else {
        default
    }
}

/// Expected throughput of the two measured stages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct StageRates {
    pub(crate) download_bps: f64,
    pub(crate) convert_bps: f64,
}

impl Default for StageRates {
    fn default() -> Self {
        StageRates {
            download_bps: DEFAULT_DOWNLOAD_BPS,
            convert_bps: DEFAULT_CONVERT_BPS,
        }
    }
}

impl StageRates {
    pub(crate) fn from_history(download: &[StageSample], convert: &[StageSample]) -> StageRates {
        StageRates {
            download_bps: stage_rate(download, DEFAULT_DOWNLOAD_BPS),
            convert_bps: stage_rate(convert, DEFAULT_CONVERT_BPS),
        }
    }

    /// Share (0..=1) of the job's time expected in the download, from the bytes to download and
    /// the bytes to convert (the virtual size for qcow2).
    pub(crate) fn download_share(&self, download_bytes: u64, convert_bytes: u64) -> f64 {
        let d = download_bytes as f64 / self.download_bps;
        let c = convert_bytes as f64 / self.convert_bps;
        if d + c <= 0.0 { 0.5 } else { d / (d + c) }
    }
}

/// Tracks one job's progress through its stages.
#[derive(Debug, Clone)]
pub(crate) struct ProgressTracker {
    progress: Progress,
    rates: StageRates,
    /// Overall percent where the current stage started, and how much it may add.
    base: f64,
    span: f64,
    stage_started: Instant,
    /// Bytes the convert stage is expected to process (for the ETA while downloading).
    convert_bytes: u64,
    /// Whether the job includes a convert stage (cache-only jobs do not).
    with_convert: bool,
}

impl ProgressTracker {
    pub(crate) fn new(rates: StageRates, with_convert: bool, now: Instant) -> ProgressTracker {
        ProgressTracker {
            progress: Progress::default(),
            rates,
            base: 0.0,
            span: 0.0,
            stage_started: now,
            convert_bytes: 0,
            with_convert,
        }
    }

    pub(crate) fn progress(&self) -> &Progress {
        &self.progress
    }

    pub(crate) fn stage_elapsed(&self, now: Instant) -> f64 {
        now.duration_since(self.stage_started).as_secs_f64()
    }

    fn enter(&mut self, stage: Stage, total: u64, end_percent: f64, now: Instant) {
        self.base = self.progress.percent;
        self.span = (end_percent - self.base).max(0.0);
        self.stage_started = now;
        self.progress.stage = stage;
        self.progress.stage_percent = 0.0;
        self.progress.bytes_processed = 0;
        self.progress.bytes_total = total;
    }

    /// Download of `total` bytes begins; `expected_convert_bytes` is the best guess of what the
    /// convert stage will process (refined by `start_convert`).
    pub(crate) fn start_download(&mut self, total: u64, expected_convert_bytes: u64, now: Instant) {
        self.convert_bytes = expected_convert_bytes;
        let share = if self.with_convert {
            self.rates.download_share(total, expected_convert_bytes)
        } else {
            1.0
        };
        let end = (100.0 - FINALIZE_SHARE) * share;
        self.enter(Stage::Downloading, total, end, now);
        self.update_bytes(0, now);
    }

    /// Conversion of an image of `virtual_size` bytes begins; it spans what is left up to the
    /// finalizing share (all of 0..99 on a cache hit).
    pub(crate) fn start_convert(&mut self, virtual_size: u64, now: Instant) {
        self.convert_bytes = virtual_size;
        self.enter(Stage::Converting, virtual_size, 100.0 - FINALIZE_SHARE, now);
        self.update_bytes(0, now);
    }

    /// Flush and pool refresh; the byte counts of the conversion stay visible.
    pub(crate) fn start_finalize(&mut self, now: Instant) {
        let (done, total) = (self.progress.bytes_processed, self.progress.bytes_total);
        self.enter(Stage::Finalizing, total, 100.0, now);
        self.progress.bytes_processed = done;
        self.progress.stage_percent = 0.0;
        self.progress.eta_seconds = Some(0.0);
    }

    /// Bytes done in the current stage.
    pub(crate) fn update_bytes(&mut self, done: u64, now: Instant) {
        let total = self.progress.bytes_total;
        let done = if total > 0 { done.min(total) } else { done };
        self.progress.bytes_processed = self.progress.bytes_processed.max(done);
        let fraction = if total > 0 {
            done as f64 / total as f64
        } else {
            0.0
        };
        self.apply_fraction(fraction, now);
    }

    /// Fraction (0..=1) of the current stage done, for stages that report a percentage (qemu-img).
    pub(crate) fn update_fraction(&mut self, fraction: f64, now: Instant) {
        let fraction = fraction.clamp(0.0, 1.0);
        let bytes = (self.progress.bytes_total as f64 * fraction) as u64;
        self.progress.bytes_processed = self.progress.bytes_processed.max(bytes);
        self.apply_fraction(fraction, now);
    }

    fn apply_fraction(&mut self, fraction: f64, now: Instant) {
        let stage_percent = (fraction * 100.0).max(self.progress.stage_percent);
        self.progress.stage_percent = stage_percent;
        let overall = self.base + self.span * stage_percent / 100.0;
        self.progress.percent = self.progress.percent.max(overall).min(100.0);
        self.progress.eta_seconds = self.eta(now);
    }

    /// Current stage throughput in bytes per second, once measurable.
    pub(crate) fn current_rate(&self, now: Instant) -> Option<f64> {
        let elapsed = self.stage_elapsed(now);
        let done = self.progress.bytes_processed as f64;
        (elapsed >= MIN_OBSERVATION_SECS && done > 0.0).then(|| done / elapsed)
    }

    fn eta(&self, now: Instant) -> Option<f64> {
        let p = &self.progress;
        let (default_rate, later) = match p.stage {
            Stage::Downloading => (
                self.rates.download_bps,
                if self.with_convert {
                    self.convert_bytes as f64 / self.rates.convert_bps
                } else {
                    0.0
                },
            ),
            Stage::Converting => (self.rates.convert_bps, 0.0),
            Stage::Initializing => return None,
            Stage::Finalizing => return Some(0.0),
        };
        if p.bytes_total == 0 {
            return None;
        }
        let rate = self.current_rate(now).unwrap_or(default_rate);
        let remaining = p.bytes_total.saturating_sub(p.bytes_processed) as f64;
        Some(remaining / rate + later)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_defaults_without_history() {
        assert_eq!(stage_rate(&[], DEFAULT_DOWNLOAD_BPS), 100e6);
        let zero = [StageSample {
            bytes: 0,
            seconds: 0.0,
        }];
        assert_eq!(stage_rate(&zero, DEFAULT_CONVERT_BPS), 200e6);
    }

    #[test]
    fn rate_uses_only_the_last_twenty_samples_weighted_by_time() {
        let mut samples = vec![
            StageSample {
                bytes: 1,
                seconds: 1000.0
            };
            5
        ];
        samples.extend(vec![
            StageSample {
                bytes: 50_000_000,
                seconds: 1.0
            };
            20
        ]);
        assert_eq!(stage_rate(&samples, 1.0), 50e6);
        let mixed = [
            StageSample {
                bytes: 100,
                seconds: 1.0,
            },
            StageSample {
                bytes: 300,
                seconds: 3.0,
            },
        ];
        assert_eq!(stage_rate(&mixed, 1.0), 100.0);
    }

    #[test]
    fn download_share_follows_rates() {
        let r = StageRates::default();
        // 1 GB download at 100 MB/s = 10 s, 4 GB convert at 200 MB/s = 20 s.
        let share = r.download_share(1_000_000_000, 4_000_000_000);
        assert!((share - 1.0 / 3.0).abs() < 1e-9, "{share}");
        assert_eq!(r.download_share(0, 0), 0.5);
    }

    #[test]
    fn percent_never_decreases_across_stages() {
        let t0 = Instant::now();
        let mut t = ProgressTracker::new(StageRates::default(), true, t0);
        // The guess before download: convert as large as the download.
        t.start_download(1000, 1000, t0);
        let mut last = 0.0;
        for done in (0..=1000).step_by(100) {
            t.update_bytes(done, t0 + Duration::from_millis(done));
            assert!(t.progress().percent >= last);
            last = t.progress().percent;
        }
        assert!((last - 99.0 * 2.0 / 3.0).abs() < 1e-6, "{last}");
        // The real virtual size is far larger: the split changes, percent must not fall.
        t.start_convert(100_000, t0 + Duration::from_secs(2));
        assert!(t.progress().percent >= last);
        for f in [0.1, 0.05, 0.5, 0.4, 1.0] {
            t.update_fraction(f, t0 + Duration::from_secs(3));
            assert!(t.progress().percent >= last, "{f}");
            last = t.progress().percent;
        }
        assert!((last - 99.0).abs() < 1e-6);
        assert_eq!(t.progress().stage_percent, 100.0);
        t.start_finalize(t0 + Duration::from_secs(4));
        assert!(t.progress().percent >= last);
        assert!(t.progress().percent <= 100.0);
    }

    #[test]
    fn cache_hit_convert_spans_everything() {
        let t0 = Instant::now();
        let mut t = ProgressTracker::new(StageRates::default(), true, t0);
        t.start_convert(1 << 30, t0);
        t.update_fraction(0.5, t0);
        assert!((t.progress().percent - 49.5).abs() < 1e-9);
        assert_eq!(t.progress().stage, Stage::Converting);
    }

    #[test]
    fn eta_uses_history_then_observed_rate() {
        let t0 = Instant::now();
        let rates = StageRates {
            download_bps: 100.0,
            convert_bps: 50.0,
        };
        let mut t = ProgressTracker::new(rates, true, t0);
        t.start_download(1000, 500, t0);
        // No observation yet: 1000 B at 100 B/s + 500 B at 50 B/s.
        assert_eq!(t.progress().eta_seconds, Some(20.0));
        // After 2 s, 400 B done: observed 200 B/s -> 600/200 = 3 s, + 10 s convert.
        t.update_bytes(400, t0 + Duration::from_secs(2));
        assert_eq!(t.progress().eta_seconds, Some(13.0));
        t.start_convert(500, t0 + Duration::from_secs(5));
        assert_eq!(t.progress().eta_seconds, Some(10.0));
    }

    #[test]
    fn cache_only_job_gives_download_the_whole_range() {
        let t0 = Instant::now();
        let mut t = ProgressTracker::new(StageRates::default(), false, t0);
        t.start_download(100, 0, t0);
        t.update_bytes(100, t0);
        assert!((t.progress().percent - 99.0).abs() < 1e-9);
    }
}
