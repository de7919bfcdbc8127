//! The seam every volume backend implements (`VolumeBackend`), what a backend reports about a
//! volume (`VolumeInfo`, `Blocker`), and the reuse rule shared by every backend.

use std::path::PathBuf;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::error::VolumeError;
pub(crate) use super::wipe::VolumeKind;
use super::wipe::{Wipe, WipeMode};

/// An existing volume is reused when its size is within this fraction of the request.
pub(crate) const REUSE_TOLERANCE: f64 = 0.05;

/// What a backend knows about an existing volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeInfo {
    pub(crate) name: String,
    /// Path the volume is written through (`/dev/<vg>/<name>` or a file).
    pub(crate) path: PathBuf,
    pub(crate) size_bytes: u64,
    /// Why this volume must not be overwritten (open by a VM, a snapshot, not a regular
    /// file...); `None` when it may be reused.
    pub(crate) reuse_blocker: Option<Blocker>,
    /// Every block reads zeros until written: set by `create` for a thin LV in a pool that
    /// zeroes newly provisioned chunks (the writer may then skip zeros, and nothing past the
    /// image needs zeroing). Never set for an existing volume.
    pub(crate) reads_zeros: bool,
    /// What holds the volume's bytes (decides the default wipe and how it grows).
    pub(crate) kind: VolumeKind,
}

/// A volume to make: its name, its least size and who makes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewVolume<'a> {
    pub(crate) name: &'a str,
    /// At least this many bytes (backends round up to their unit).
    pub(crate) size_bytes: u64,
    /// The job (or upload) making it; backends that can record it (LVM: a tag) do, so that
    /// `remove_created` never removes a volume someone else made under the same name.
    pub(crate) owner: &'a str,
}

/// A volume to make ready for writing (see `VolumeBackend::prepare`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Overwrite<'a> {
    pub(crate) volume: &'a VolumeInfo,
    /// The image's size: the writer covers everything before it.
    pub(crate) image_size: u64,
    /// How everything from `image_size` to the end is wiped.
    pub(crate) tail: WipeMode,
    /// Stops the wipe early (with an error) when it fires.
    pub(crate) cancel: &'a CancellationToken,
}

/// A grown volume.
#[derive(Debug, Clone)]
pub(crate) struct Grown {
    /// Its size now (rounded up to the backend's unit).
    pub(crate) size_bytes: u64,
    /// The running (or paused) libvirt domain that was told the new size (`blockresize`), so
    /// its guest sees it without a reboot.
    pub(crate) live_domain: Option<String>,
}

/// What kind of reason keeps a volume from being reused; decides whether it may be deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockerKind {
    /// Something has it open (a running VM, another process): neither reused nor deleted.
    Open,
    /// Whether something has it open cannot be determined: neither reused nor deleted.
    Unknown,
    /// Not a plain data volume (a symbolic link, a directory, a snapshot, a thin pool...):
    /// never touched.
    NotAVolume,
    /// A plain volume that cannot be written now (read-only, suspended, unhealthy...): it may
    /// still be deleted.
    Unwritable,
    /// A golden image (read-only origin of thin snapshots): it goes with its cache entry,
    /// never through the volumes API.
    Golden,
}

/// Why an existing volume is not reused; its `Display` is the reason the API shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub(crate) struct Blocker {
    pub(crate) kind: BlockerKind,
    pub(crate) reason: String,
}

impl Blocker {
    pub(crate) fn new(kind: BlockerKind, reason: impl Into<String>) -> Blocker {
        Blocker {
            kind,
            reason: reason.into(),
        }
    }

    /// Whether `DELETE` must refuse the volume too.
    pub(crate) fn forbids_removal(&self) -> bool {
        self.kind != BlockerKind::Unwritable
    }
}

/// A place volumes live in. Every method is safe to call for any validated name.
#[async_trait]
pub(crate) trait VolumeBackend: Send + Sync {
    /// Backend-specific name rules on top of the contract's (e.g. LVM's reserved names).
    fn validate_name(&self, _name: &str) -> Result<(), String> {
        Ok(())
    }

    /// The path a volume of this name has (whether or not it exists).
    fn volume_path(&self, name: &str) -> PathBuf;

    /// The volume, if it exists.
    async fn inspect(&self, name: &str) -> Result<Option<VolumeInfo>, VolumeError>;

    /// Creates `new` (see `NewVolume`). Fails with `Conflict` if a volume of that name exists.
    async fn create(&self, new: &NewVolume<'_>) -> Result<VolumeInfo, VolumeError>;

    /// Makes a volume (new or reused) ready to be written: everything from `image_size` to
    /// the end is wiped as `tail` says (`Zero` for a new volume: it must read as zeros; a
    /// reused one gets `volumes.wipe_on_reuse`); the writer covers the rest, zeros included.
    /// Stops early with an error when `cancel` fires.
    async fn prepare(&self, overwrite: &Overwrite<'_>) -> Result<(), VolumeError>;

    /// `prepare` with the request spelled out (what the job code calls).
    async fn prepare_overwrite(
        &self,
        volume: &VolumeInfo,
        image_size: u64,
        tail: WipeMode,
        cancel: &CancellationToken,
    ) -> Result<(), VolumeError> {
        let overwrite = Overwrite {
            volume,
            image_size,
            tail,
            cancel,
        };
        self.prepare(&overwrite).await
    }

    /// Flushes written data to stable storage.
    async fn flush(&self, volume: &VolumeInfo) -> Result<(), VolumeError>;

    /// Removes a volume; absent is success. `Conflict` when it must not be removed (open, or
    /// a kind of volume other volumes depend on).
    async fn remove(&self, name: &str) -> Result<(), VolumeError>;

    /// Rollback: removes the volume only if `owner` created it (absent is success). A backend
    /// that records owners answers `Conflict` for a volume without `owner`'s record.
    async fn remove_created(&self, name: &str, owner: &str) -> Result<(), VolumeError>;

    /// Removes a volume like `remove`, after wiping it as `mode` says. The intent is recorded
    /// durably on the volume before the first byte is wiped (an LV tag, a move into a wiping
    /// folder), so that a wipe cut short (a crash, a stop through `cancel`) leaves a volume
    /// that is never reused and is finished by `finish_wipes` at the next start.
    async fn remove_wiped(&self, name: &str, wipe: &Wipe<'_>) -> Result<(), VolumeError>;

    /// Start-up: the names of volumes whose wipe was cut short, each with the mode it was
    /// started with.
    async fn unfinished_wipes(&self) -> Result<Vec<(String, WipeMode)>, VolumeError> {
        Ok(Vec::new())
    }

    /// Finishes a wipe `unfinished_wipes` listed (and removes what it wiped); never touches
    /// a new volume made under the name since.
    async fn finish_wipe(&self, _name: &str, _wipe: &Wipe<'_>) -> Result<(), VolumeError> {
        Ok(())
    }

    /// Whether a new volume of `size_bytes` would fit now (the VG's free space, the thin
    /// pool's threshold, the file system's free space): checked before anything is downloaded
    /// for it, so a job that cannot end well fails at once, naming the numbers.
    async fn check_room(&self, _size_bytes: u64) -> Result<(), VolumeError> {
        Ok(())
    }

    /// Grows the volume to at least `size_bytes` (backends round up to their unit); callers
    /// have checked that it exists, may be grown and is smaller. Returns the volume as it is
    /// now, and the running domain told about the new size, if one uses it. `header_bytes`:
    /// bytes at the volume's start the guest does not see (a LUKS header; 0 for a plain
    /// volume): the domain is told the size less these.
    async fn grow(
        &self,
        volume: &VolumeInfo,
        size_bytes: u64,
        header_bytes: u64,
    ) -> Result<Grown, VolumeError>;

    /// Whether `snapshot` can make a clone of `source` (an LVM thin LV: a thin snapshot).
    fn can_snapshot(&self, _source: &VolumeInfo) -> bool {
        false
    }

    /// Makes `new` as a snapshot of `source` that shares its blocks until written (an LVM
    /// thin snapshot, activated, writable, tagged as created by `new.owner`), grown to
    /// `new.size_bytes` when that is larger. Only called when `can_snapshot` said so; `Conflict`
    /// when a volume of that name exists.
    async fn snapshot(
        &self,
        source: &VolumeInfo,
        _new: &NewVolume<'_>,
    ) -> Result<VolumeInfo, VolumeError> {
        Err(VolumeError::Conflict(format!(
            "volume {} cannot be snapshotted on this backend",
            source.name
        )))
    }

    /// Whether the backend is usable now (the `lvm` dependency of the readiness probe).
    async fn probe(&self) -> Result<(), VolumeError>;
}

/// The reuse rule shared by every backend: within 5% of the requested size and not blocked.
pub(crate) fn check_reusable(volume: &VolumeInfo, requested_bytes: u64) -> Result<(), VolumeError> {
    if let Some(reason) = &volume.reuse_blocker {
        return Err(VolumeError::Conflict(format!(
            "volume {} exists and cannot be reused: {reason}",
            volume.name
        )));
    }
    let diff = volume.size_bytes.abs_diff(requested_bytes) as f64;
    if diff > requested_bytes as f64 * REUSE_TOLERANCE {
        return Err(VolumeError::Conflict(format!(
            "volume {} exists with {} bytes, not within 5% of the requested {} bytes",
            volume.name, volume.size_bytes, requested_bytes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::names::GIB;

    #[test]
    fn reuse_within_five_percent() {
        let v = |size| VolumeInfo {
            name: "v".into(),
            path: "/x".into(),
            size_bytes: size,
            reuse_blocker: None,
            reads_zeros: false,
            kind: VolumeKind::ThickLv,
        };
        let req = 100 * GIB;
        assert!(check_reusable(&v(req), req).is_ok());
        assert!(check_reusable(&v(req + 5 * GIB), req).is_ok());
        assert!(check_reusable(&v(req - 5 * GIB), req).is_ok());
        assert!(check_reusable(&v(req + 5 * GIB + 1), req).is_err());
        let mut open = v(req);
        open.reuse_blocker = Some(Blocker::new(BlockerKind::Open, "open by another process"));
        let err = check_reusable(&open, req).unwrap_err().to_string();
        assert!(err.contains("open by another process"), "{err}");
    }
}
