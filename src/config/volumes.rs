//! `[volumes]` (the backend: LVM with its thin pool and golden images, or a directory with its
//! golden files; uploads) and `[libvirt]`: defaults, rules, and the plain `VolumeSpec` that
//! `volume::select` builds from.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{SettingError, check};
use crate::volume::WipeMode;

const GIB: u64 = 1 << 30;

/// Which backend holds the volumes (`volumes.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum VolumeBackendKind {
    Lvm,
    Directory,
}

/// `[volumes]`: the backend and its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VolumesSettings {
    /// `lvm` (production) or `directory` (sparse files; development and tests).
    pub(crate) backend: VolumeBackendKind,
    pub(crate) lvm: LvmSettings,
    pub(crate) directory: DirectorySettings,
    /// Largest body of `PUT /api/v1/volumes/{name}/content` (small uploads such as cloud-init
    /// seed images); 413 beyond.
    pub(crate) upload_max_bytes: u64,
    /// Glob the volume names of uploads must match (`*-cidata`); empty turns uploads off.
    pub(crate) upload_name_pattern: String,
    /// Uploads in progress at once (each holds a connection and a new volume); 429 beyond.
    pub(crate) upload_max_concurrent: usize,
    /// How a volume is wiped before `DELETE` removes it; `None`: `zero` for thick LVs,
    /// `discard` for thin LVs and files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) wipe_on_delete: Option<WipeMode>,
    /// How the part of a reused volume the image does not cover is wiped; `None`: as for
    /// `wipe_on_delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) wipe_on_reuse: Option<WipeMode>,
    /// A `DELETE` whose `zero` wipe covers more bytes than this runs as a job (202); smaller
    /// ones answer when done (200).
    #[serde(default = "default_wipe_job_min_bytes")]
    pub(crate) wipe_job_min_bytes: u64,
    /// Limits of the bulk writers (image writes, clone copies, wipes).
    #[serde(default)]
    pub(crate) io: IoSettings,
    /// Encrypted volumes.
    #[serde(default)]
    pub(crate) encryption: EncryptionSettings,
}

/// `[volumes.encryption]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct EncryptionSettings {
    /// Where the records of encrypted volumes live (0700, files 0600), and their passphrases
    /// when libvirt does not hold them (`libvirt.pool` empty); empty: `<storage.data_dir>/keys`.
    pub(crate) key_dir: PathBuf,
}

/// `[volumes.io]`: what the bulk writers may take from the disks under running VMs. Read when
/// each job (or wipe) starts: a change applies to the next ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct IoSettings {
    /// Bytes per second each bulk writer may write; 0: unlimited.
    pub(crate) write_bytes_per_second: u64,
    /// Bytes per second each bulk copy may read; 0: unlimited.
    pub(crate) read_bytes_per_second: u64,
    /// The IO scheduling class of `qemu-img` children (`ioprio_set`).
    pub(crate) priority: IoPriority,
}

impl IoSettings {
    /// The rate a copy (which reads and writes as much) may run at: the smaller of the two
    /// limits that are set; 0: unlimited.
    pub(crate) fn copy_rate(&self) -> u64 {
        match (self.read_bytes_per_second, self.write_bytes_per_second) {
            (0, w) => w,
            (r, 0) => r,
            (r, w) => r.min(w),
        }
    }
}

/// An IO scheduling class (`volumes.io.priority`); honoured by the BFQ and mq-deadline
/// schedulers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum IoPriority {
    /// The daemon's own class (inherited).
    None,
    /// Best effort at its lowest level (7): served after the VMs' best-effort IO of a higher
    /// level, never starved.
    #[default]
    BestEffort,
    /// Only when the disk is otherwise idle: may wait indefinitely on a busy disk.
    Idle,
}

impl IoPriority {
    /// The `ioprio_set` value (class << 13 | level); `None` for the inherited class.
    pub(crate) fn ioprio(self) -> Option<i32> {
        match self {
            IoPriority::None => None,
            IoPriority::BestEffort => Some((2 << 13) | 7),
            IoPriority::Idle => Some(3 << 13),
        }
    }
}

fn default_wipe_job_min_bytes() -> u64 {
    GIB
}

/// `[volumes.lvm]`: the LVM backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LvmSettings {
    /// Volume group the logical volumes are created in.
    pub(crate) volume_group: String,
    /// Time limit of one LVM command.
    #[serde(with = "humantime_serde")]
    pub(crate) command_timeout: Duration,
    /// The volume group's physical volumes: when not empty, every LVM command gets
    /// `--devices <path>` for each, so LVM opens (and scans) only these. Empty: no narrowing.
    pub(crate) devices: Vec<String>,
    /// An existing thin pool in `volume_group`: new volumes are thin LVs in it. Empty: thick
    /// (linear) LVs.
    pub(crate) thin_pool: String,
    /// With a thin pool: each cached image is written once into a read-only golden thin LV,
    /// and new volumes are thin snapshots of it.
    pub(crate) golden_images: bool,
    /// Pool data (bytes) all golden LVs together may hold; the least recently used ones are
    /// removed to make room, and an image that cannot fit is copied instead.
    pub(crate) golden_max_bytes: u64,
    /// Nothing is created in the thin pool while its data or metadata use is above this percent.
    pub(crate) thin_pool_max_percent: u8,
}

/// `[volumes.directory]`: the directory backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DirectorySettings {
    /// Directory holding the volumes as sparse raw files.
    pub(crate) path: PathBuf,
    /// On a file system that shares extents (XFS with reflink=1, btrfs): each cached image is
    /// written once into a golden file, and new volumes are reflink copies of it.
    pub(crate) golden_images: bool,
    /// File system space (bytes) all golden files together may hold; the least recently used
    /// are removed to make room, and an image that cannot fit is copied instead.
    pub(crate) golden_max_bytes: u64,
}

/// `[libvirt]`: libvirt integration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LibvirtSettings {
    /// Connection URI every `virsh` call uses (`-c`).
    pub(crate) uri: String,
    /// Storage pool of the volumes, refreshed after a volume is written or removed; when set,
    /// libvirt is also asked which running domains use a volume. Empty = no libvirt integration.
    pub(crate) pool: String,
}

impl VolumesSettings {
    /// The defaults with `backend` and volume files in `directory`.
    pub(crate) fn defaults(backend: VolumeBackendKind, directory: PathBuf) -> VolumesSettings {
        VolumesSettings {
            backend,
            lvm: LvmSettings {
                volume_group: "vg0".into(),
                command_timeout: Duration::from_secs(120),
                devices: vec![],
                thin_pool: String::new(),
                golden_images: true,
                golden_max_bytes: 100 * GIB,
                thin_pool_max_percent: 90,
            },
            directory: DirectorySettings {
                path: directory,
                golden_images: true,
                golden_max_bytes: 100 * GIB,
            },
            upload_max_bytes: 64 << 20,
            upload_name_pattern: "*-cidata".into(),
            upload_max_concurrent: 4,
            wipe_on_delete: None,
            wipe_on_reuse: None,
            wipe_job_min_bytes: default_wipe_job_min_bytes(),
            io: IoSettings::default(),
            encryption: EncryptionSettings::default(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), SettingError> {
        match self.backend {
            VolumeBackendKind::Lvm => {
                crate::volume::validate_lvm_name(&self.lvm.volume_group)
                    .map_err(|e| SettingError::new("volumes.lvm.volume_group", e))?;
            }
            VolumeBackendKind::Directory => self.directory.validate()?,
        }
        check(
            (1..=1 << 40).contains(&self.upload_max_bytes),
            "volumes.upload_max_bytes",
            || "must be between 1 and 1 TiB".into(),
        )?;
        check(
            (1..=1024).contains(&self.upload_max_concurrent),
            "volumes.upload_max_concurrent",
            || "must be between 1 and 1024".into(),
        )?;
        glob::Pattern::new(&self.upload_name_pattern).map_err(|e| {
            SettingError::new(
                "volumes.upload_name_pattern",
                format!("`{}` is not a glob pattern: {e}", self.upload_name_pattern),
            )
        })?;
        self.lvm.validate()
    }

    /// What `volume::select` builds from `[volumes]` and `[libvirt]`.
    pub(crate) fn volume_spec(
        &self,
        libvirt: &LibvirtSettings,
        data_dir: &std::path::Path,
    ) -> crate::volume::spec::VolumeSpec {
        use crate::volume::spec::{
            BackendSpec, DirectorySpec, LibvirtSpec, LvmSpec, ThinPoolSpec, VolumeSpec,
        };
        let v = self;
        let backend = match v.backend {
            VolumeBackendKind::Directory => BackendSpec::Directory(DirectorySpec {
                path: v.directory.path.clone(),
                golden_images: v.directory.golden_images,
                golden_max_bytes: v.directory.golden_max_bytes,
            }),
            VolumeBackendKind::Lvm => BackendSpec::Lvm(LvmSpec {
                volume_group: v.lvm.volume_group.clone(),
                command_timeout: v.lvm.command_timeout,
                devices: v.lvm.devices.clone(),
                thin_pool: (!v.lvm.thin_pool.is_empty()).then(|| ThinPoolSpec {
                    name: v.lvm.thin_pool.clone(),
                    max_percent: v.lvm.thin_pool_max_percent,
                }),
                golden_images: v.lvm.golden_images,
                golden_max_bytes: v.lvm.golden_max_bytes,
            }),
        };
        VolumeSpec {
            backend,
            libvirt: (!libvirt.pool.is_empty()).then(|| LibvirtSpec {
                uri: libvirt.uri.clone(),
                pool: libvirt.pool.clone(),
            }),
            key_dir: if v.encryption.key_dir.as_os_str().is_empty() {
                data_dir.join("keys")
            } else {
                v.encryption.key_dir.clone()
            },
        }
    }
}

impl DirectorySettings {
    fn validate(&self) -> Result<(), SettingError> {
        check(
            !self.path.as_os_str().is_empty(),
            "volumes.directory.path",
            || "must not be empty".into(),
        )?;
        check(
            self.golden_max_bytes > 0,
            "volumes.directory.golden_max_bytes",
            || {
                "must be greater than 0 (turn golden files off with \
             volumes.directory.golden_images = false)"
                    .into()
            },
        )
    }
}

impl LvmSettings {
    fn validate(&self) -> Result<(), SettingError> {
        check(
            !self.command_timeout.is_zero(),
            "volumes.lvm.command_timeout",
            || "must be greater than 0".into(),
        )?;
        if let Some(bad) = self
            .devices
            .iter()
            .find(|d| !d.starts_with("/dev/") || d.contains(',') || d.contains(char::is_whitespace))
        {
            return Err(SettingError::new(
                "volumes.lvm.devices",
                format!("`{bad}` is not a device path (/dev/..., without commas or spaces)"),
            ));
        }
        if !self.thin_pool.is_empty() {
            crate::volume::validate_lvm_name(&self.thin_pool)
                .map_err(|e| SettingError::new("volumes.lvm.thin_pool", e))?;
        }
        check(
            self.golden_max_bytes > 0,
            "volumes.lvm.golden_max_bytes",
            || {
                "must be greater than 0 (turn golden images off with volumes.lvm.golden_images = \
             false)"
                    .into()
            },
        )?;
        check(
            (1..=100).contains(&self.thin_pool_max_percent),
            "volumes.lvm.thin_pool_max_percent",
            || {
                format!(
                    "must be between 1 and 100, got {}",
                    self.thin_pool_max_percent
                )
            },
        )
    }
}

impl Default for LibvirtSettings {
    fn default() -> Self {
        LibvirtSettings {
            uri: "qemu:///system".into(),
            pool: String::new(),
        }
    }
}

impl LibvirtSettings {
    /// Both go to `virsh` as arguments, so neither may look like an option.
    pub(crate) fn validate(&self) -> Result<(), SettingError> {
        if self.pool.is_empty() {
            return Ok(());
        }
        check(
            !(self.pool.starts_with('-')
                || self.pool.contains('/')
                || self.pool.contains(char::is_control)),
            "libvirt.pool",
            || {
                format!(
                    "`{}` is not a libvirt pool name (no leading `-`, no `/`, no control \
                     characters)",
                    self.pool.escape_debug()
                )
            },
        )?;
        check(
            !(self.uri.is_empty() || self.uri.starts_with('-')),
            "libvirt.uri",
            || {
                format!(
                    "`{}` is not a libvirt connection URI (e.g. qemu:///system)",
                    self.uri
                )
            },
        )
    }
}
