//! What wiping a volume means, as values: what holds a volume's bytes (`VolumeKind`), the
//! modes (`WipeMode`), the default a kind of volume
//! gets (`default_for`), and the progress counter a wipe shares with whoever reports it
//! (`WipeProgress`). The wiping itself is in `blockdev.rs`. A leaf of `volume/`.

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

/// Bytes a wipe has done and has to do, shared between the blocking thread that wipes and the
/// task that reports progress.
#[derive(Debug, Default)]
pub(crate) struct WipeProgress {
    /// Bytes wiped so far.
    pub(crate) done: std::sync::atomic::AtomicU64,
    /// Bytes the wipe covers (known once the device is open).
    pub(crate) total: std::sync::atomic::AtomicU64,
}

impl WipeProgress {
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
