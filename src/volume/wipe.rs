//! What wiping a volume means, as values: what holds a volume's bytes (`VolumeKind`), the
//! modes (`WipeMode`), the default a kind of volume
//! gets (`default_for`), the progress counter a wipe shares with whoever reports it
//! (`WipeProgress`, which also carries the rate limit), and the pacing of a limited wipe
//! (`Pacer`). The wiping itself is in `blockdev.rs`. A leaf of `volume/`.

/// What holds a volume's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VolumeKind {
    /// A linear (thick) LV: its extents go to the next LV made on them as they are.
    ThickLv,
    /// A thin LV: its chunks return to the pool.
    ThinLv,
    /// A file in a file system.
    File,
}

/// How old content is made unreadable (`volumes.wipe_on_delete`, `volumes.wipe_on_reuse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WipeMode {
    /// Nothing: the old bytes stay where they are.
    None,
    /// `BLKDISCARD` (a hole punched in a file): cheap, and enough where discarded blocks read
    /// zeros (thin LVs in a pool that zeroes new chunks, files); see docs/security.md.
    Discard,
    /// `BLKZEROOUT` (zeros written in a file): every block reads zeros afterwards, whatever
    /// lies below.
    Zero,
}

impl WipeMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WipeMode::None => "none",
            WipeMode::Discard => "discard",
            WipeMode::Zero => "zero",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<WipeMode> {
        [WipeMode::None, WipeMode::Discard, WipeMode::Zero]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

/// How a removal wipes (see `VolumeBackend::remove_wiped`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wipe<'a> {
    pub(crate) mode: WipeMode,
    /// Bytes done so far and the rate limit the wipe keeps to.
    pub(crate) progress: &'a std::sync::Arc<WipeProgress>,
    /// Stops the wipe early (with an error) when it fires.
    pub(crate) cancel: &'a tokio_util::sync::CancellationToken,
}

/// Bytes a wipe has done and has to do, shared between the blocking thread that wipes and the
/// task that reports progress.
#[derive(Debug, Default)]
pub(crate) struct WipeProgress {
    /// Bytes wiped so far.
    pub(crate) done: std::sync::atomic::AtomicU64,
    /// Bytes the wipe covers (known once the device is open).
    pub(crate) total: std::sync::atomic::AtomicU64,
    /// At most this many bytes per second (`volumes.io.write_bytes_per_second`); 0: unlimited.
    pub(crate) limit: std::sync::atomic::AtomicU64,
}

/// Least bytes per wipe call under a rate limit (the sleeps between calls pace the wipe).
const PACED_CHUNK_MIN: u64 = 1 << 20;

/// Paces a wipe to its progress's limit: after each range, sleeps until the bytes done so far
/// took at least as long as the limit allows.
pub(crate) struct Pacer {
    limit: u64,
    started: std::time::Instant,
    done: u64,
}

impl Pacer {
    pub(crate) fn new(progress: &WipeProgress) -> Pacer {
        Pacer {
            limit: progress.limit.load(std::sync::atomic::Ordering::Relaxed),
            started: std::time::Instant::now(),
            done: 0,
        }
    }

    /// The range to wipe per call: `max` unlimited, else about an eighth of a second's worth
    /// (whole MiB, at least one).
    pub(crate) fn chunk(&self, max: u64) -> u64 {
        if self.limit == 0 {
            return max;
        }
        (self.limit / 8 / PACED_CHUNK_MIN * PACED_CHUNK_MIN).clamp(PACED_CHUNK_MIN, max)
    }

    /// Counts `bytes` done, then sleeps (in steps, stopping early when `cancel` fires) until the
    /// rate is within the limit.
    pub(crate) fn wait(&mut self, bytes: u64, cancel: &tokio_util::sync::CancellationToken) {
        self.done += bytes;
        if self.limit == 0 {
            return;
        }
        let due = std::time::Duration::from_secs_f64(self.done as f64 / self.limit as f64);
        while !cancel.is_cancelled() {
            let Some(left) = due.checked_sub(self.started.elapsed()) else {
                return;
            };
            std::thread::sleep(left.min(std::time::Duration::from_millis(100)));
        }
    }
}

impl WipeProgress {
    /// A counter for a wipe of at most `limit` bytes per second (0: unlimited).
    pub(crate) fn limited(limit: u64) -> WipeProgress {
        let p = WipeProgress::default();
        p.limit.store(limit, std::sync::atomic::Ordering::Relaxed);
        p
    }

    pub(super) fn set_total(&self, total: u64) {
        self.total
            .store(total, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn add(&self, bytes: u64) {
        self.done
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        crate::telemetry::metrics::metrics()
            .bulk_io_bytes_total
            .with_label_values(&["wipe"])
            .inc_by(bytes);
    }

    /// (done, total) now.
    pub(crate) fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.done.load(Relaxed), self.total.load(Relaxed))
    }
}

/// The mode a volume of `kind` gets when the setting names none: thick LVs are zeroed (their
/// extents go to the next LV as they are), thin LVs and files are discarded (freed blocks
/// read zeros in a pool that zeroes new chunks, and in a file system).
pub(crate) fn default_for(kind: VolumeKind) -> WipeMode {
    match kind {
        VolumeKind::ThickLv => WipeMode::Zero,
        VolumeKind::ThinLv | VolumeKind::File => WipeMode::Discard,
    }
}

/// The mode `setting` (a `volumes.wipe_on_*` value; `None`: the default) asks for on `kind`.
pub(crate) fn effective(setting: Option<WipeMode>, kind: VolumeKind) -> WipeMode {
    setting.unwrap_or_else(|| default_for(kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limited_wipe_is_paced() {
        let cancel = tokio_util::sync::CancellationToken::new();
        let mut open = Pacer::new(&WipeProgress::default());
        assert_eq!(open.chunk(256 << 20), 256 << 20);
        let t = std::time::Instant::now();
        open.wait(1 << 30, &cancel);
        assert!(t.elapsed() < std::time::Duration::from_millis(50));
        let mut paced = Pacer::new(&WipeProgress::limited(64 << 20));
        assert_eq!(paced.chunk(256 << 20), 8 << 20);
        assert_eq!(
            Pacer::new(&WipeProgress::limited(1000)).chunk(256 << 20),
            1 << 20
        );
        for _ in 0..4 {
            paced.wait(8 << 20, &cancel);
        }
        let took = paced.started.elapsed().as_secs_f64();
        assert!(
            (0.5..0.7).contains(&took),
            "32 MiB at 64 MiB/s took {took} s"
        );
        cancel.cancel();
        let t = std::time::Instant::now();
        paced.wait(1 << 30, &cancel);
        assert!(
            t.elapsed() < std::time::Duration::from_millis(50),
            "cancel stops the wait"
        );
    }

    #[test]
    fn defaults_per_kind_and_names() {
        assert_eq!(effective(None, VolumeKind::ThickLv), WipeMode::Zero);
        assert_eq!(effective(None, VolumeKind::ThinLv), WipeMode::Discard);
        assert_eq!(effective(None, VolumeKind::File), WipeMode::Discard);
        assert_eq!(
            effective(Some(WipeMode::None), VolumeKind::ThickLv),
            WipeMode::None
        );
        for m in [WipeMode::None, WipeMode::Discard, WipeMode::Zero] {
            assert_eq!(WipeMode::parse(m.as_str()), Some(m));
        }
        assert_eq!(WipeMode::parse("shred"), None);
    }
}
