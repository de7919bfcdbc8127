//! Volume backends: the trait LVM and directory volumes implement, the name rules of the API
//! contract, the shared reuse rule, and selecting the configured backend.

pub(crate) mod directory;
pub(crate) mod golden;
pub(crate) mod libvirt;
pub(crate) mod lvm;

use std::path::PathBuf;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

pub(crate) const GIB: u64 = 1 << 30;
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

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VolumeError {
    #[error("invalid volume name: {0}")]
    InvalidName(String),
    /// The volume exists and cannot be used for this request (API: 409).
    #[error("{0}")]
    Conflict(String),
    #[error("not enough space for volume: need {need} bytes, have {have} bytes in {place}")]
    InsufficientSpace { need: u64, have: u64, place: String },
    /// The thin pool's data or metadata use is above `volumes.lvm.thin_pool_max_percent`.
    #[error(
        "thin pool {pool} is too full to create anything in: data {data_percent:.2}% and \
         metadata {metadata_percent:.2}% used, above volumes.lvm.thin_pool_max_percent = \
         {max_percent}%; extend the pool (lvextend) or remove volumes"
    )]
    PoolOverThreshold {
        pool: String,
        data_percent: f64,
        metadata_percent: f64,
        max_percent: u8,
    },
    /// An LVM command failed, timed out or could not start.
    #[error(transparent)]
    Command(#[from] crate::command::CommandError),
    /// An LVM command succeeded but its report is not what was expected.
    #[error("{command}: {detail}")]
    Report { command: String, detail: String },
    #[error("volume I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl VolumeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> VolumeError {
        VolumeError::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether the error is a lack of space (a refused size, a full pool, or a write that
    /// met ENOSPC or a quota): the API answers 507.
    pub(crate) fn is_out_of_space(&self) -> bool {
        match self {
            VolumeError::InsufficientSpace { .. } | VolumeError::PoolOverThreshold { .. } => true,
            VolumeError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(code) if code == nix::libc::ENOSPC || code == nix::libc::EDQUOT
            ),
            _ => false,
        }
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

    /// Creates a new volume of at least `size_bytes` on behalf of `owner` (a job id), which
    /// the backend records where it can (LVM: a tag) so that `remove_created` can tell the
    /// volume from one someone else made under the same name. Fails with `Conflict` if a
    /// volume of that name exists.
    async fn create(
        &self,
        name: &str,
        size_bytes: u64,
        owner: &str,
    ) -> Result<VolumeInfo, VolumeError>;

    /// Makes a volume (new or reused) ready to be written: everything from `image_size` to
    /// the end must read as zeros afterwards (the writer covers the rest, zeros included).
    /// Stops early with an error when `cancel` fires.
    async fn prepare_overwrite(
        &self,
        volume: &VolumeInfo,
        image_size: u64,
        cancel: &CancellationToken,
    ) -> Result<(), VolumeError>;

    /// Flushes written data to stable storage.
    async fn flush(&self, volume: &VolumeInfo) -> Result<(), VolumeError>;

    /// Removes a volume; absent is success. `Conflict` when it must not be removed (open, or
    /// a kind of volume other volumes depend on).
    async fn remove(&self, name: &str) -> Result<(), VolumeError>;

    /// Rollback: removes the volume only if `owner` created it (absent is success). A backend
    /// that records owners answers `Conflict` for a volume without `owner`'s record.
    async fn remove_created(&self, name: &str, owner: &str) -> Result<(), VolumeError>;

    /// Whether the backend is usable now (the `lvm` dependency of the readiness probe).
    async fn probe(&self) -> Result<(), VolumeError>;
}

/// Volume name rules of the API contract: `[A-Za-z0-9+_.-]`, 1..=127 characters, not `.` or
/// `..`, no leading `-`.
pub(crate) fn validate_volume_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 127 {
        return Err(format!(
            "volume_name must be 1 to 127 characters, got {}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err("volume_name must not be \".\" or \"..\"".into());
    }
    if name.starts_with('-') {
        return Err("volume_name must not start with \"-\"".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "+_.-".contains(*c)))
    {
        return Err(format!(
            "volume_name contains {c:?}; allowed are letters, digits and + _ . -"
        ));
    }
    Ok(())
}

/// LVM names (volume groups and logical volumes): the contract's rules plus LVM's reserved
/// prefixes and suffixes.
pub(crate) fn validate_lvm_name(name: &str) -> Result<(), String> {
    validate_volume_name(name)?;
    if name.starts_with("snapshot") || name.starts_with("pvmove") {
        return Err(format!(
            "`{name}`: LVM reserves names starting with snapshot or pvmove"
        ));
    }
    for reserved in [
        "_cdata", "_cmeta", "_corig", "_iorig", "_mimage", "_mlog", "_pmspare", "_rimage",
        "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
    ] {
        if name.contains(reserved) {
            return Err(format!(
                "`{name}`: LVM reserves names containing {reserved}"
            ));
        }
    }
    Ok(())
}

/// Bytes of a request in GiB.
pub(crate) fn gib_to_bytes(gib: u64) -> Option<u64> {
    gib.checked_mul(GIB)
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

    #[test]
    fn volume_names() {
        for ok in ["vm-disk-001", "a", "A.b+c_d-e", &"x".repeat(127)] {
            assert!(validate_volume_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-x",
            "a/b",
            "a b",
            "ä",
            &"x".repeat(128),
            "a\0",
        ] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_lvm_name("snapshot1").is_err());
        assert!(validate_lvm_name("x_tmeta").is_err());
        assert!(validate_lvm_name("vg0").is_ok());
    }

    #[test]
    fn reuse_within_five_percent() {
        let v = |size| VolumeInfo {
            name: "v".into(),
            path: "/x".into(),
            size_bytes: size,
            reuse_blocker: None,
            reads_zeros: false,
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
