//! `VolumeError`: why a volume operation failed, typed so callers decide on variants (a
//! conflict is a 409, lack of space a 507). A leaf of `volume/`.

use std::path::PathBuf;

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
    /// An encrypted volume cannot be made or used as asked (a caller's secret unknown, of
    /// another usage or private; libvirt down; an image that is not qcow2 or raw; a volume
    /// that exists). API: 409, reason `encryption_refused`.
    #[error("{0}")]
    EncryptionRefused(String),
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
