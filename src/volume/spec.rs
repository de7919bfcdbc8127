//! What the daemon asks of volumes, as plain values: the wiring builds a `VolumeSpec` from the
//! settings (`volume/` reads no settings type), and `select.rs` turns it into the backend, its
//! clone store and its probes. A leaf of `volume/`.

use std::path::PathBuf;
use std::time::Duration;

/// Everything `select` needs.
#[derive(Debug, Clone)]
pub(crate) struct VolumeSpec {
    pub(crate) backend: BackendSpec,
    /// libvirt integration (`libvirt.pool` set): running domains are asked before a volume is
    /// reused or deleted, and the pool is refreshed after changes.
    pub(crate) libvirt: Option<LibvirtSpec>,
    /// The key directory of encrypted volumes (`volumes.encryption.key_dir`, resolved).
    pub(crate) key_dir: PathBuf,
}

/// Which backend, with its own settings.
#[derive(Debug, Clone)]
pub(crate) enum BackendSpec {
    Directory(DirectorySpec),
    Lvm(LvmSpec),
}

/// `[volumes.directory]`.
#[derive(Debug, Clone)]
pub(crate) struct DirectorySpec {
    /// The directory volumes are files in.
    pub(crate) path: PathBuf,
    /// Golden files and reflink clones when the directory's file system shares extents.
    pub(crate) golden_images: bool,
    /// Most file system space the golden files may hold.
    pub(crate) golden_max_bytes: u64,
}

/// `[volumes.lvm]`.
#[derive(Debug, Clone)]
pub(crate) struct LvmSpec {
    pub(crate) volume_group: String,
    /// Time limit of every LVM command.
    pub(crate) command_timeout: Duration,
    /// When not empty, LVM may open only these devices.
    pub(crate) devices: Vec<String>,
    /// New LVs are thin LVs in this pool.
    pub(crate) thin_pool: Option<ThinPoolSpec>,
    /// Golden images on the thin pool (only with one).
    pub(crate) golden_images: bool,
    /// Most pool data golden images may hold.
    pub(crate) golden_max_bytes: u64,
}

/// The thin pool of `[volumes.lvm]`.
#[derive(Debug, Clone)]
pub(crate) struct ThinPoolSpec {
    pub(crate) name: String,
    /// Nothing is created above this data or metadata use (percent).
    pub(crate) max_percent: u8,
}

/// `[libvirt]`.
#[derive(Debug, Clone)]
pub(crate) struct LibvirtSpec {
    pub(crate) uri: String,
    pub(crate) pool: String,
}
