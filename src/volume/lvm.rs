//! The `lvm` volume backend: logical volumes in one volume group, driven through the LVM tools
//! (`LC_ALL=C`, JSON reports in bytes, a time limit per command, stderr in every error). It owns
//! the reuse rules read from `lv_attr`, creation rounded to the VG's real extent size and tagged
//! with the creating job (so rollback never removes an LV it did not make), zeroing of the part
//! of an LV an image does not cover (`BLKZEROOUT`), and flushing the device. With
//! `volumes.lvm.thin_pool`, new LVs are thin LVs in that pool, created only while the pool's
//! use is below `volumes.lvm.thin_pool_max_percent` (golden images: `golden.rs`).

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{Blocker, BlockerKind, VolumeBackend, VolumeError, VolumeInfo, validate_lvm_name};
use crate::command;

/// Options every report command gets: machine-readable JSON, sizes as plain byte counts.
const REPORT_ARGS: [&str; 5] = ["--reportformat", "json", "--units", "b", "--nosuffix"];
const VG_FIELDS: &str = "vg_name,vg_extent_size,vg_extent_count,vg_free_count,vg_free,vg_size";
const LV_FIELDS: &str = "lv_name,vg_name,lv_size,lv_attr,lv_tags,origin,pool_lv,segtype,\
                         data_percent,metadata_percent,zero";
/// Prefix of the tag `lvcreate` puts on an LV a job creates (`lvp_job_<job id>`).
pub(crate) const OWNER_TAG_PREFIX: &str = "lvp_job_";
/// Tag of every golden image LV (`golden.rs`).
pub(crate) const GOLDEN_TAG: &str = "lvp_golden";
/// Prefix of golden image LV names (`lvp-golden-<16 hex of the cache key>`); reserved.
pub(crate) const GOLDEN_PREFIX: &str = "lvp-golden-";
/// Bytes zeroed per `BLKZEROOUT` call; cancellation is checked between calls.
const ZERO_CHUNK: u64 = 256 << 20;
/// How long a device node may take to appear after activation (udev in production).
const NODE_WAIT: Duration = Duration::from_secs(10);
/// How long removal waits for a transient opener (udev's probe after a write) to go away.
const OPEN_WAIT: Duration = Duration::from_secs(5);

// Block-device ioctls (linux/fs.h); BLKGETSIZE64 is declared with size_t, 8 bytes on the 64-bit
// targets this daemon runs on.
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(
    blksszget,
    nix::request_code_none!(0x12, 104),
    nix::libc::c_int
);

/// A volume group as `vgs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VgInfo {
    pub(crate) name: String,
    pub(crate) extent_size: u64,
    pub(crate) free_bytes: u64,
    pub(crate) size_bytes: u64,
}

/// A logical volume as `lvs` reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LvInfo {
    pub(crate) name: String,
    pub(crate) vg: String,
    pub(crate) size_bytes: u64,
    pub(crate) attr: LvAttr,
    pub(crate) tags: Vec<String>,
    /// Origin of a snapshot (old-style or thin); empty otherwise.
    pub(crate) origin: String,
    pub(crate) pool_lv: String,
    pub(crate) segtype: String,
    /// Thin pools and thin LVs: percent of the data (pool) or of the virtual size (thin LV)
    /// that is provisioned; `None` for other LVs.
    pub(crate) data_percent: Option<f64>,
    /// Thin pools: percent of the metadata that is used.
    pub(crate) metadata_percent: Option<f64>,
    /// Thin pools (and their thin LVs): newly provisioned chunks are zeroed (`lvs -o zero`).
    pub(crate) zero: bool,
}

/// The ten `lv_attr` characters (lvs(8), "lv_attr bits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LvAttr {
    pub(crate) volume_type: char,
    pub(crate) permissions: char,
    pub(crate) allocation: char,
    pub(crate) fixed_minor: char,
    pub(crate) state: char,
    pub(crate) open: char,
    pub(crate) target_type: char,
    pub(crate) zero: char,
    pub(crate) health: char,
    pub(crate) skip_activation: char,
}

impl LvAttr {
    /// Parses `lv_attr`; older LVM versions print fewer than ten characters (missing ones
    /// read as `-`).
    pub(crate) fn parse(s: &str) -> Result<LvAttr, String> {
        let c: Vec<char> = s.chars().collect();
        if c.len() < 6 || c.len() > 10 {
            return Err(format!("unexpected lv_attr {s:?}"));
        }
        let at = |i: usize| c.get(i).copied().unwrap_or('-');
        Ok(LvAttr {
            volume_type: at(0),
            permissions: at(1),
            allocation: at(2),
            fixed_minor: at(3),
            state: at(4),
            open: at(5),
            target_type: at(6),
            zero: at(7),
            health: at(8),
            skip_activation: at(9),
        })
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open == 'o'
    }

    pub(crate) fn is_active(&self) -> bool {
        self.state == 'a'
    }

    /// Why an LV of this volume type is not a plain data volume this service may overwrite or
    /// remove; `None` for linear/striped, thin, cached, mirrored and RAID volumes.
    pub(crate) fn special_type(&self) -> Option<&'static str> {
        match self.volume_type {
            '-' | 'V' | 'C' | 'm' | 'M' | 'r' | 'R' => None,
            'o' | 'O' => Some("it is the origin of snapshots"),
            's' | 'S' => Some("it is a snapshot"),
            't' => Some("it is a thin pool"),
            'T' => Some("it is thin pool data"),
            'e' => Some("it is RAID or pool metadata"),
            'd' => Some("it is a VDO pool"),
            'D' => Some("it is VDO pool data"),
            'p' => Some("it is a pvmove volume"),
            'v' => Some("it is a virtual volume"),
            'i' | 'I' => Some("it is a mirror or RAID image"),
            'l' => Some("it is a mirror log"),
            'c' => Some("it is under conversion"),
            _ => Some("it has an unknown volume type"),
        }
    }

    fn state_description(&self) -> Option<&'static str> {
        match self.state {
            'a' | '-' => None,
            's' => Some("suspended"),
            'I' => Some("an invalid snapshot"),
            'S' => Some("an invalid suspended snapshot"),
            'm' | 'M' => Some("a snapshot whose merge failed"),
            'd' => Some("mapped without tables"),
            'i' => Some("mapped with an inactive table"),
            'h' => Some("historical"),
            'c' | 'C' => Some("a thin pool that needs a check"),
            'X' => Some("in an unknown state"),
            _ => Some("in an unexpected state"),
        }
    }
}

impl LvInfo {
    fn attr_note(&self) -> String {
        let a = self.attr;
        format!(
            "lv_attr {}{}{}{}{}{}{}{}{}{}",
            a.volume_type,
            a.permissions,
            a.allocation,
            a.fixed_minor,
            a.state,
            a.open,
            a.target_type,
            a.zero,
            a.health,
            a.skip_activation
        )
    }

    /// Whether this is a golden image LV (`golden.rs`), and its cache key (the `lvp_image_`
    /// tag; the name when the tag is missing).
    pub(crate) fn golden_key(&self) -> Option<String> {
        if !self.tags.iter().any(|t| t == GOLDEN_TAG) {
            return None;
        }
        let key = self
            .tags
            .iter()
            .find_map(|t| t.strip_prefix(super::golden::KEY_TAG_PREFIX))
            .unwrap_or(&self.name);
        Some(key.to_string())
    }

    /// A thin snapshot of a golden image: it shares the golden LV's blocks but does not depend
    /// on it (dm-thin keeps shared blocks until the last user is gone), so it is a plain thin
    /// volume that may be overwritten or removed.
    fn is_golden_clone(&self) -> bool {
        self.segtype == "thin" && self.origin.starts_with(GOLDEN_PREFIX)
    }

    /// Why this LV must not be overwritten by a job (the API answers 409 with it); `None` when
    /// it may be reused.
    pub(crate) fn reuse_blocker(&self) -> Option<Blocker> {
        // Whatever forbids removal also forbids overwriting.
        if let Some(blocker) = self.removal_blocker() {
            return Some(blocker);
        }
        let note = self.attr_note();
        let unwritable = |reason: String| Some(Blocker::new(BlockerKind::Unwritable, reason));
        if self.attr.permissions != 'w' {
            return unwritable(format!("it is read-only ({note})"));
        }
        if let Some(state) = self.attr.state_description() {
            return unwritable(format!("it is {state} ({note})"));
        }
        if !matches!(self.attr.health, '-' | 'w' | 'm') {
            return unwritable(format!(
                "its health flag is {:?} (partial, failed or out of space; {note})",
                self.attr.health
            ));
        }
        if !self.attr.is_active() && self.attr.skip_activation == 'k' {
            return unwritable(format!("it has the activation skip flag set ({note})"));
        }
        None
    }

    /// Why `DELETE` must not remove this LV: open, or not a plain data volume (removing a
    /// thin pool or a snapshot origin would take other volumes with it).
    pub(crate) fn removal_blocker(&self) -> Option<Blocker> {
        let note = self.attr_note();
        if let Some(key) = self.golden_key() {
            return Some(Blocker::new(
                BlockerKind::Golden,
                format!(
                    "it is the golden image of cache entry {key}; it is removed with that entry \
                     (DELETE /api/v1/cache/images/{key}), never as a volume"
                ),
            ));
        }
        if let Some(kind) = self.attr.special_type() {
            return Some(Blocker::new(
                BlockerKind::NotAVolume,
                format!("{kind} ({note})"),
            ));
        }
        if !self.origin.is_empty() && !self.is_golden_clone() {
            return Some(Blocker::new(
                BlockerKind::NotAVolume,
                format!("it is a snapshot of {} ({note})", self.origin),
            ));
        }
        if self.attr.is_open() {
            return Some(Blocker::new(
                BlockerKind::Open,
                format!("it is open (in use by a VM or another process; {note})"),
            ));
        }
        None
    }
}

/// An LVM JSON report (`--reportformat json`).
#[derive(Deserialize)]
struct Report {
    report: Vec<ReportSection>,
}

/// One section of a report: the rows of `vgs` or `lvs`.
#[derive(Deserialize)]
struct ReportSection {
    #[serde(default)]
    vg: Vec<VgRow>,
    #[serde(default)]
    lv: Vec<LvRow>,
}

/// A `vgs` row (sizes as byte strings).
#[derive(Deserialize)]
struct VgRow {
    vg_name: String,
    vg_extent_size: String,
    vg_free: String,
    vg_size: String,
}

/// An `lvs` row (sizes as byte strings).
#[derive(Deserialize)]
struct LvRow {
    lv_name: String,
    vg_name: String,
    lv_size: String,
    lv_attr: String,
    #[serde(default)]
    lv_tags: String,
    #[serde(default)]
    origin: String,
    #[serde(default)]
    pool_lv: String,
    #[serde(default)]
    segtype: String,
    #[serde(default)]
    data_percent: String,
    #[serde(default)]
    metadata_percent: String,
    #[serde(default)]
    zero: String,
}

fn bytes_field(field: &str, value: &str) -> Result<u64, String> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("{field} is {value:?}, not a byte count"))
}

/// A percent column: empty for LVs it does not apply to.
fn percent_field(field: &str, value: &str) -> Result<Option<f64>, String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse::<f64>()
        .map(Some)
        .map_err(|_| format!("{field} is {value:?}, not a percent"))
}

fn parse_report(json: &str) -> Result<Vec<ReportSection>, String> {
    serde_json::from_str::<Report>(json)
        .map(|r| r.report)
        .map_err(|e| format!("unexpected LVM JSON report: {e}"))
}

/// Volume groups of a `vgs --reportformat json --units b --nosuffix` report.
pub(crate) fn parse_vgs(json: &str) -> Result<Vec<VgInfo>, String> {
    let mut out = Vec::new();
    for row in parse_report(json)?.into_iter().flat_map(|s| s.vg) {
        out.push(VgInfo {
            extent_size: bytes_field("vg_extent_size", &row.vg_extent_size)?,
            free_bytes: bytes_field("vg_free", &row.vg_free)?,
            size_bytes: bytes_field("vg_size", &row.vg_size)?,
            name: row.vg_name,
        });
    }
    Ok(out)
}

/// Logical volumes of an `lvs --reportformat json --units b --nosuffix` report.
pub(crate) fn parse_lvs(json: &str) -> Result<Vec<LvInfo>, String> {
    let mut out = Vec::new();
    for row in parse_report(json)?.into_iter().flat_map(|s| s.lv) {
        out.push(LvInfo {
            size_bytes: bytes_field("lv_size", &row.lv_size)?,
            attr: LvAttr::parse(&row.lv_attr)?,
            tags: row
                .lv_tags
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect(),
            name: row.lv_name,
            vg: row.vg_name,
            origin: row.origin,
            pool_lv: row.pool_lv,
            segtype: row.segtype,
            data_percent: percent_field("data_percent", &row.data_percent)?,
            metadata_percent: percent_field("metadata_percent", &row.metadata_percent)?,
            zero: row.zero == "zero",
        });
    }
    Ok(out)
}

/// Extents needed for `size_bytes` (rounded up); `None` for a zero extent size, a zero size,
/// or overflow.
pub(crate) fn extents_for(size_bytes: u64, extent_size: u64) -> Option<u64> {
    if extent_size == 0 || size_bytes == 0 {
        return None;
    }
    let extents = size_bytes.div_ceil(extent_size);
    extents.checked_mul(extent_size).map(|_| extents)
}

/// The tag marking an LV as created by job `owner`.
pub(crate) fn owner_tag(owner: &str) -> Result<String, VolumeError> {
    // LVM tags allow [A-Za-z0-9_+.-/=!:#&]; job ids are UUIDs.
    if owner.is_empty()
        || owner.len() > 200
        || !owner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+.-".contains(c))
    {
        return Err(VolumeError::InvalidName(format!(
            "volume owner {owner:?} cannot be an LVM tag"
        )));
    }
    Ok(format!("{OWNER_TAG_PREFIX}{owner}"))
}

/// The thin pool new LVs are created in (`volumes.lvm.thin_pool`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ThinPool {
    /// The pool's LV name in the backend's VG.
    pub(crate) name: String,
    /// `volumes.lvm.thin_pool_max_percent`.
    pub(crate) max_percent: u8,
}

/// A thin pool's use, from `lvs`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PoolUse {
    pub(crate) data_percent: f64,
    pub(crate) metadata_percent: f64,
    /// The pool zeroes newly provisioned chunks (`lvs -o zero`).
    pub(crate) zeroes: bool,
    pub(crate) size_bytes: u64,
}

/// Logical volumes of one volume group.
pub(crate) struct LvmBackend {
    vg: String,
    timeout: Duration,
    /// `volumes.lvm.devices`: when not empty, LVM may open only these devices.
    devices: Vec<String>,
    /// New LVs are thin LVs in this pool; `None`: linear LVs.
    thin: Option<ThinPool>,
    /// The VG's extent size, once read.
    extent: std::sync::OnceLock<u64>,
}

impl LvmBackend {
    /// Uses volume group `vg`; every LVM command may take `timeout`. Runs no command.
    pub(crate) fn new(vg: &str, timeout: Duration) -> Result<LvmBackend, VolumeError> {
        validate_lvm_name(vg).map_err(VolumeError::InvalidName)?;
        Ok(LvmBackend {
            vg: vg.to_string(),
            timeout,
            devices: Vec::new(),
            thin: None,
            extent: std::sync::OnceLock::new(),
        })
    }

    /// Creates new LVs as thin LVs in `pool` (an existing thin pool of the VG). Runs no command.
    pub(crate) fn with_thin_pool(mut self, pool: ThinPool) -> Result<LvmBackend, VolumeError> {
        validate_lvm_name(&pool.name).map_err(VolumeError::InvalidName)?;
        self.thin = Some(pool);
        Ok(self)
    }

    pub(crate) fn thin_pool(&self) -> Option<&ThinPool> {
        self.thin.as_ref()
    }

    /// `vg/name` of the thin pool, for messages.
    pub(crate) fn pool_arg(&self) -> String {
        self.lv_arg(self.thin.as_ref().map_or("", |p| p.name.as_str()))
    }

    /// The thin pool's use in the listing `all` (the VG's LVs). Fails when the pool is missing
    /// or not a thin pool.
    pub(crate) fn pool_use_in(&self, all: &[LvInfo]) -> Result<PoolUse, VolumeError> {
        let Some(pool) = &self.thin else {
            return Err(Self::report_error(
                "lvs",
                "no thin pool is configured (volumes.lvm.thin_pool)".into(),
            ));
        };
        let lv = all.iter().find(|l| l.name == pool.name).ok_or_else(|| {
            Self::report_error(
                "lvs",
                format!(
                    "thin pool {} does not exist (volumes.lvm.thin_pool)",
                    self.pool_arg()
                ),
            )
        })?;
        if lv.segtype != "thin-pool" {
            return Err(Self::report_error(
                "lvs",
                format!(
                    "{} is a {} LV, not a thin pool (volumes.lvm.thin_pool)",
                    self.pool_arg(),
                    lv.segtype
                ),
            ));
        }
        Ok(PoolUse {
            data_percent: lv.data_percent.unwrap_or(0.0),
            metadata_percent: lv.metadata_percent.unwrap_or(0.0),
            zeroes: lv.zero,
            size_bytes: lv.size_bytes,
        })
    }

    /// Pool safety, before anything is created in the pool: its use, or `PoolOverThreshold`
    /// when data or metadata use is above `volumes.lvm.thin_pool_max_percent`.
    pub(crate) async fn check_pool(&self) -> Result<PoolUse, VolumeError> {
        self.check_pool_in(&self.lvs().await?)
    }

    /// As `check_pool`, on the listing `all` (the VG's LVs, just read).
    pub(crate) fn check_pool_in(&self, all: &[LvInfo]) -> Result<PoolUse, VolumeError> {
        let usage = self.pool_use_in(all)?;
        let max = self.thin.as_ref().map_or(100, |p| p.max_percent);
        crate::telemetry::metrics::metrics()
            .thin_pool_use(usage.data_percent, usage.metadata_percent);
        if usage.data_percent > f64::from(max) || usage.metadata_percent > f64::from(max) {
            return Err(VolumeError::PoolOverThreshold {
                pool: self.pool_arg(),
                data_percent: usage.data_percent,
                metadata_percent: usage.metadata_percent,
                max_percent: max,
            });
        }
        Ok(usage)
    }

    /// The VG's extent size (read once: it does not change).
    pub(super) async fn extent_size(&self) -> Result<u64, VolumeError> {
        if let Some(size) = self.extent.get() {
            return Ok(*size);
        }
        let size = self.vg().await?.extent_size;
        Ok(*self.extent.get_or_init(|| size))
    }

    /// Narrows every LVM command to `devices` (`--devices <path>` each, lvm2 >= 2.03.12): LVM
    /// then opens and scans only these, and the devices file is not used. Empty: no narrowing.
    pub(crate) fn with_devices(mut self, devices: &[String]) -> LvmBackend {
        self.devices = devices.to_vec();
        self
    }

    /// The arguments of an LVM command: the device narrowing first, then `args`.
    fn command_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all: Vec<&str> = self
            .devices
            .iter()
            .flat_map(|d| ["--devices", d.as_str()])
            .collect();
        all.extend_from_slice(args);
        all
    }

    /// Runs an LVM command within `volumes.lvm.command_timeout` and returns its stdout.
    pub(super) async fn run(&self, program: &str, args: &[&str]) -> Result<String, VolumeError> {
        let args = self.command_args(args);
        let limit = command::Limit {
            timeout: self.timeout,
            setting: Some("volumes.lvm.command_timeout"),
        };
        Ok(command::run(program, &args, limit).await?)
    }

    pub(super) fn report_error(command: &str, detail: String) -> VolumeError {
        VolumeError::Report {
            command: command.to_string(),
            detail,
        }
    }

    /// The volume group, from `vgs`.
    pub(crate) async fn vg(&self) -> Result<VgInfo, VolumeError> {
        let mut args = REPORT_ARGS.to_vec();
        args.extend(["-o", VG_FIELDS, &self.vg]);
        let out = self.run("vgs", &args).await?;
        parse_vgs(&out)
            .map_err(|e| Self::report_error("vgs", e))?
            .into_iter()
            .find(|v| v.name == self.vg)
            .ok_or_else(|| {
                Self::report_error("vgs", format!("volume group {} is not listed", self.vg))
            })
    }

    /// The LV called `name`, if any. Lists the whole VG (a missing LV is then a normal answer,
    /// not an error to tell apart from others).
    pub(crate) async fn lv(&self, name: &str) -> Result<Option<LvInfo>, VolumeError> {
        Ok(self.lvs().await?.into_iter().find(|lv| lv.name == name))
    }

    /// Every LV of the VG.
    pub(crate) async fn lvs(&self) -> Result<Vec<LvInfo>, VolumeError> {
        let mut args = REPORT_ARGS.to_vec();
        args.extend(["-o", LV_FIELDS, &self.vg]);
        let out = self.run("lvs", &args).await?;
        Ok(parse_lvs(&out)
            .map_err(|e| Self::report_error("lvs", e))?
            .into_iter()
            .filter(|lv| lv.vg == self.vg)
            .collect())
    }

    pub(super) fn vg_name(&self) -> &str {
        &self.vg
    }

    pub(super) fn lv_arg(&self, name: &str) -> String {
        format!("{}/{name}", self.vg)
    }

    pub(super) fn info(&self, lv: &LvInfo) -> VolumeInfo {
        VolumeInfo {
            name: lv.name.clone(),
            path: self.volume_path(&lv.name),
            size_bytes: lv.size_bytes,
            reuse_blocker: lv.reuse_blocker(),
            reads_zeros: false,
        }
    }

    pub(super) async fn activate(&self, name: &str) -> Result<(), VolumeError> {
        self.run(
            "lvchange",
            &["--activate", "y", "--yes", &self.lv_arg(name)],
        )
        .await?;
        Ok(())
    }

    /// Waits until the device node exists (udev creates it in production).
    pub(super) async fn wait_for_node(&self, name: &str) -> Result<PathBuf, VolumeError> {
        let path = self.volume_path(name);
        let deadline = tokio::time::Instant::now() + NODE_WAIT;
        loop {
            if tokio::fs::metadata(&path).await.is_ok() {
                return Ok(path);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VolumeError::io(
                    &path,
                    std::io::Error::other(format!(
                        "device node did not appear within {NODE_WAIT:?} after activation"
                    )),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates the LV (tagged with `tags`): a thin LV in the thin pool when one is configured
    /// (after the pool safety check), else a linear LV (after the free-space check).
    pub(super) async fn create_lv(
        &self,
        name: &str,
        size_bytes: u64,
        tags: &[&str],
    ) -> Result<VolumeInfo, VolumeError> {
        validate_lvm_name(name).map_err(VolumeError::InvalidName)?;
        // Thin LVs take pool space (checked here), linear ones VG space (checked below).
        let (pool, vg) = match &self.thin {
            Some(_) => (Some(self.check_pool().await?), None),
            None => (None, Some(self.vg().await?)),
        };
        let extent_size = match &vg {
            Some(vg) => *self.extent.get_or_init(|| vg.extent_size),
            None => self.extent_size().await?,
        };
        let extents = extents_for(size_bytes, extent_size).ok_or_else(|| {
            Self::report_error(
                "lvcreate",
                format!("cannot size {size_bytes} bytes in extents of {extent_size} bytes"),
            )
        })?;
        let need = extents * extent_size;
        if let Some(vg) = &vg
            && need > vg.free_bytes
        {
            return Err(VolumeError::InsufficientSpace {
                need,
                have: vg.free_bytes,
                place: format!("VG {}", vg.name),
            });
        }
        let extents = extents.to_string();
        let virtual_size = format!("{need}b");
        let mut args = vec!["--yes", "--activate", "y", "--name", name];
        let pool_arg = self.pool_arg();
        if pool.is_some() {
            // Unprovisioned thin blocks read zeros: nothing to wipe (and lvcreate refuses
            // `--zero` here). Thin LVs never get the activation skip flag: a VM's disk must
            // activate at boot.
            args.extend([
                "--setactivationskip",
                "n",
                "--virtualsize",
                &virtual_size,
                "--thinpool",
                &pool_arg,
            ]);
        } else {
            args.extend([
                "--wipesignatures",
                "y",
                "--zero",
                "y",
                "--extents",
                &extents,
            ]);
        }
        for tag in tags {
            args.extend(["--addtag", tag]);
        }
        if pool.is_none() {
            args.push(&self.vg);
        }
        if let Err(e) = self.run("lvcreate", &args).await {
            // An LV of that name that is not ours: someone else's volume, never touched.
            if let Ok(Some(lv)) = self.lv(name).await
                && (tags.is_empty() || !tags.iter().all(|t| lv.tags.iter().any(|x| x == t)))
            {
                return Err(VolumeError::Conflict(format!(
                    "volume {name} already exists in VG {}",
                    self.vg
                )));
            }
            return Err(e);
        }
        let lv = self.lv(name).await?.ok_or_else(|| {
            Self::report_error(
                "lvs",
                format!("{name} is not listed after lvcreate succeeded"),
            )
        })?;
        self.wait_for_node(name).await?;
        tracing::info!(
            volume = %self.lv_arg(name),
            bytes = lv.size_bytes,
            extents = %extents,
            extent_size,
            thin_pool = pool.map(|_| pool_arg.as_str()).unwrap_or(""),
            "logical volume created"
        );
        let mut info = self.info(&lv);
        info.reads_zeros = pool.is_some_and(|p| p.zeroes);
        Ok(info)
    }
}

/// Zeroes `path` (a block device) from `start` (rounded down to its logical block size) to its
/// end, checking `cancel` between chunks.
pub(super) fn zero_from(
    path: &Path,
    start: u64,
    cancel: &CancellationToken,
) -> Result<(), VolumeError> {
    let io = |e: std::io::Error| VolumeError::io(path, e);
    let errno = |what: &str, e: nix::errno::Errno| {
        VolumeError::io(
            path,
            std::io::Error::other(format!("{what}: {}", std::io::Error::from(e))),
        )
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    let fd = file.as_raw_fd();
    let mut size = 0u64;
    // SAFETY: fd is open for the duration of the call; the kernel writes one u64.
    unsafe { blkgetsize64(fd, &mut size) }.map_err(|e| errno("BLKGETSIZE64", e))?;
    let mut sector: nix::libc::c_int = 0;
    // SAFETY: as above; the kernel writes one int.
    unsafe { blksszget(fd, &mut sector) }.map_err(|e| errno("BLKSSZGET", e))?;
    let sector = u64::try_from(sector).unwrap_or(512).max(512);
    let mut off = start / sector * sector;
    while off < size {
        if cancel.is_cancelled() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "zeroing stopped",
            )));
        }
        let len = ZERO_CHUNK.min(size - off);
        let range = [off, len];
        // SAFETY: range is a valid [start, length] pair for the duration of the call.
        unsafe { blkzeroout(fd, &range) }.map_err(|e| errno("BLKZEROOUT", e))?;
        off += len;
    }
    Ok(())
}

#[async_trait]
impl VolumeBackend for LvmBackend {
    fn validate_name(&self, name: &str) -> Result<(), String> {
        validate_lvm_name(name)
    }

    fn volume_path(&self, name: &str) -> PathBuf {
        PathBuf::from("/dev").join(&self.vg).join(name)
    }

    async fn inspect(&self, name: &str) -> Result<Option<VolumeInfo>, VolumeError> {
        validate_lvm_name(name).map_err(VolumeError::InvalidName)?;
        Ok(self.lv(name).await?.map(|lv| self.info(&lv)))
    }

    async fn create(
        &self,
        name: &str,
        size_bytes: u64,
        owner: &str,
    ) -> Result<VolumeInfo, VolumeError> {
        let tag = owner_tag(owner)?;
        if name.starts_with(GOLDEN_PREFIX) {
            return Err(VolumeError::Conflict(format!(
                "volume names starting with {GOLDEN_PREFIX} are reserved for golden images; \
                 choose another volume_name"
            )));
        }
        self.create_lv(name, size_bytes, &[&tag]).await
    }

    async fn prepare_overwrite(
        &self,
        volume: &VolumeInfo,
        image_size: u64,
        cancel: &CancellationToken,
    ) -> Result<(), VolumeError> {
        // Fresh state: the LV may have changed since it was inspected.
        let lv = self.lv(&volume.name).await?.ok_or_else(|| {
            VolumeError::Conflict(format!("volume {} no longer exists", volume.name))
        })?;
        if let Some(reason) = lv.reuse_blocker() {
            return Err(VolumeError::Conflict(format!(
                "volume {} cannot be overwritten: {reason}",
                volume.name
            )));
        }
        if lv.size_bytes != volume.size_bytes {
            return Err(VolumeError::Conflict(format!(
                "volume {} changed size from {} to {} bytes",
                volume.name, volume.size_bytes, lv.size_bytes
            )));
        }
        if !lv.attr.is_active() {
            tracing::info!(volume = %self.lv_arg(&lv.name), "activating logical volume");
            self.activate(&lv.name).await?;
        }
        let path = self.wait_for_node(&lv.name).await?;
        if volume.reads_zeros {
            // A new thin LV in a zeroing pool: everything the image does not cover is
            // unprovisioned and reads zeros. Writing zeros would provision it all.
            return Ok(());
        }
        let cancel = cancel.clone();
        let started = std::time::Instant::now();
        let p = path.clone();
        tokio::task::spawn_blocking(move || zero_from(&p, image_size, &cancel))
            .await
            .map_err(|e| VolumeError::io(&path, std::io::Error::other(e)))??;
        tracing::info!(
            volume = %path.display(),
            from = image_size,
            bytes = lv.size_bytes.saturating_sub(image_size),
            seconds = started.elapsed().as_secs_f64(),
            "zeroed the part of the volume the image does not cover"
        );
        Ok(())
    }

    async fn flush(&self, volume: &VolumeInfo) -> Result<(), VolumeError> {
        let path = volume.path.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_CLOEXEC)
                .open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| VolumeError::io(&path, e))
        })
        .await
        .map_err(|e| VolumeError::io(&volume.path, std::io::Error::other(e)))?
    }

    async fn remove(&self, name: &str) -> Result<(), VolumeError> {
        validate_lvm_name(name).map_err(VolumeError::InvalidName)?;
        let deadline = tokio::time::Instant::now() + OPEN_WAIT;
        loop {
            let Some(lv) = self.lv(name).await? else {
                return Ok(());
            };
            match lv.removal_blocker() {
                // udev probes a device briefly after it was written; wait that out.
                Some(_) if lv.attr.is_open() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                Some(reason) => {
                    return Err(VolumeError::Conflict(format!(
                        "volume {name} is not removed: {reason}"
                    )));
                }
                None => {}
            }
            return match self.run("lvremove", &["--yes", &self.lv_arg(name)]).await {
                Ok(_) => {
                    tracing::info!(volume = %self.lv_arg(name), "logical volume removed");
                    Ok(())
                }
                // Removed by someone else in between: the goal is reached.
                Err(_) if matches!(self.lv(name).await, Ok(None)) => Ok(()),
                Err(e) => Err(e),
            };
        }
    }

    async fn remove_created(&self, name: &str, owner: &str) -> Result<(), VolumeError> {
        let tag = owner_tag(owner)?;
        match self.lv(name).await? {
            None => Ok(()),
            Some(lv) if lv.tags.contains(&tag) => self.remove(name).await,
            Some(_) => Err(VolumeError::Conflict(format!(
                "volume {name} does not carry tag {tag}: it was not created by this job and is \
                 left in place"
            ))),
        }
    }

    async fn probe(&self) -> Result<(), VolumeError> {
        self.vg().await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/lvm")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn lvs() -> Vec<LvInfo> {
        parse_lvs(&fixture("lvs.json")).unwrap()
    }

    fn lv(name: &str) -> LvInfo {
        lvs().into_iter().find(|l| l.name == name).unwrap()
    }

    #[test]
    fn parses_recorded_vgs_report() {
        let vgs = parse_vgs(&fixture("vgs.json")).unwrap();
        assert_eq!(
            vgs,
            vec![VgInfo {
                name: "vgfix".into(),
                extent_size: 8 << 20,
                free_bytes: 1_644_167_168,
                size_bytes: 2_139_095_040,
            }]
        );
        // 196 free extents of 8 MiB.
        assert_eq!(vgs[0].free_bytes, 196 * (8 << 20));
        assert!(parse_vgs(&fixture("vgs-missing.json")).unwrap().is_empty());
    }

    #[test]
    fn parses_recorded_lvs_report() {
        let all = lvs();
        assert_eq!(all.len(), 11);
        let plain = lv("plain");
        assert_eq!(plain.vg, "vgfix");
        // Created with 13 extents of 8 MiB.
        assert_eq!(plain.size_bytes, 13 * (8 << 20));
        assert_eq!(
            plain.tags,
            vec!["lvp_job_00000000-0000-0000-0000-000000000001".to_string()]
        );
        assert_eq!(plain.segtype, "linear");
        assert!(lv("busy").tags.is_empty());
        assert_eq!(lv("snap1").origin, "origin");
        assert_eq!(lv("thinvol").pool_lv, "pool");
        let one = parse_lvs(&fixture("lvs-one.json")).unwrap();
        assert_eq!(one, vec![plain]);
        assert!(parse_lvs(&fixture("lvs-missing.json")).unwrap().is_empty());
    }

    #[test]
    fn rejects_reports_without_byte_units() {
        let human = r#"{"report":[{"vg":[{"vg_name":"v","vg_extent_size":"4.00m",
            "vg_free":"1.00g","vg_size":"2.00g"}]}]}"#;
        assert!(parse_vgs(human).unwrap_err().contains("not a byte count"));
        assert!(parse_lvs("not json").is_err());
        let bad_attr = r#"{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_size":"1",
            "lv_attr":"-w"}]}]}"#;
        assert!(parse_lvs(bad_attr).unwrap_err().contains("lv_attr"));
    }

    #[test]
    fn decodes_recorded_attrs() {
        let plain = lv("plain").attr;
        assert_eq!(plain.volume_type, '-');
        assert_eq!(plain.permissions, 'w');
        assert!(plain.is_active());
        assert!(!plain.is_open());
        assert!(lv("busy").attr.is_open());
        assert!(!lv("inactive").attr.is_active());
        assert_eq!(lv("pool").attr.volume_type, 't');
        assert_eq!(lv("pool").attr.zero, 'z');
        assert_eq!(lv("thinsnap").attr.skip_activation, 'k');
        assert_eq!(lv("thinvol").attr.target_type, 't');
        let short = LvAttr::parse("-wi-ao").unwrap();
        assert!(short.is_open());
        assert_eq!(short.skip_activation, '-');
    }

    #[test]
    fn reuse_rules_on_recorded_volumes() {
        assert_eq!(lv("plain").reuse_blocker(), None);
        assert_eq!(lv("inactive").reuse_blocker(), None, "activated before use");
        assert_eq!(lv("thinvol").reuse_blocker(), None);
        let blocked = |name: &str, want: &str| {
            let reason = lv(name)
                .reuse_blocker()
                .map(|b| b.to_string())
                .unwrap_or_default();
            assert!(reason.contains(want), "{name}: {reason:?} lacks {want:?}");
        };
        blocked("busy", "open");
        assert_eq!(lv("busy").reuse_blocker().unwrap().kind, BlockerKind::Open);
        assert_eq!(
            lv("pool").reuse_blocker().unwrap().kind,
            BlockerKind::NotAVolume
        );
        blocked("origin", "origin of snapshots");
        blocked("snap1", "snapshot");
        blocked("pool", "thin pool");
        blocked("thinsnap", "snapshot of thinvol");
        blocked("[pool_tmeta]", "metadata");
        blocked("busy", "lv_attr -wi-ao----");
    }

    #[test]
    fn removal_rules_on_recorded_volumes() {
        assert_eq!(lv("plain").removal_blocker(), None);
        assert_eq!(lv("inactive").removal_blocker(), None);
        assert_eq!(lv("thinvol").removal_blocker(), None);
        for name in ["busy", "origin", "snap1", "pool", "thinsnap"] {
            assert!(lv(name).removal_blocker().is_some(), "{name}");
        }
    }

    #[test]
    fn other_attr_states_block_reuse() {
        let mut v = lv("plain");
        v.attr.permissions = 'r';
        assert!(v.reuse_blocker().unwrap().to_string().contains("read-only"));
        let mut v = lv("plain");
        v.attr.state = 's';
        assert!(v.reuse_blocker().unwrap().to_string().contains("suspended"));
        let mut v = lv("plain");
        v.attr.health = 'p';
        assert!(v.reuse_blocker().unwrap().to_string().contains("health"));
        let mut v = lv("inactive");
        v.attr.skip_activation = 'k';
        assert!(
            v.reuse_blocker()
                .unwrap()
                .to_string()
                .contains("activation skip")
        );
    }

    #[test]
    fn extent_rounding_uses_the_real_extent_size() {
        const MIB: u64 = 1 << 20;
        assert_eq!(extents_for(1 << 30, 4 * MIB), Some(256));
        assert_eq!(extents_for(1 << 30, 8 * MIB), Some(128));
        // 100 MiB in the recorded VG's 8 MiB extents: 13 extents (the `plain` LV above).
        assert_eq!(extents_for(100 * MIB, 8 * MIB), Some(13));
        assert_eq!(extents_for(1, 8 * MIB), Some(1));
        assert_eq!(extents_for((1 << 30) + 1, 4 * MIB), Some(257));
        // An extent larger than the request rounds up to one whole extent.
        assert_eq!(extents_for(1 << 30, 2 << 30), Some(1));
        assert_eq!(extents_for(0, 4 * MIB), None);
        assert_eq!(extents_for(1 << 30, 0), None);
        assert_eq!(extents_for(u64::MAX, 2), None, "rounded size overflows");
    }

    #[test]
    fn pool_safety_reads_the_pools_use() {
        let json = |data: &str, meta: &str, zero: &str| {
            format!(
                r#"{{"report":[{{"lv":[{{"lv_name":"pool","vg_name":"vg0","lv_size":"4294967296",
                "lv_attr":"twi-aotz--","segtype":"thin-pool","data_percent":"{data}",
                "metadata_percent":"{meta}","zero":"{zero}"}},{{"lv_name":"lin","vg_name":"vg0",
                "lv_size":"8388608","lv_attr":"-wi-a-----","segtype":"linear"}}]}}]}}"#
            )
        };
        let b = LvmBackend::new("vg0", Duration::from_secs(1))
            .unwrap()
            .with_thin_pool(ThinPool {
                name: "pool".into(),
                max_percent: 90,
            })
            .unwrap();
        let all = parse_lvs(&json("12.50", "3.00", "zero")).unwrap();
        let usage = b.check_pool_in(&all).unwrap();
        assert_eq!(usage.data_percent, 12.5);
        assert!(usage.zeroes);
        assert!(
            !b.pool_use_in(&parse_lvs(&json("1", "1", "")).unwrap())
                .unwrap()
                .zeroes
        );
        for (data, meta) in [("90.01", "1.00"), ("10.00", "95.00")] {
            let err = b
                .check_pool_in(&parse_lvs(&json(data, meta, "zero")).unwrap())
                .unwrap_err();
            assert!(
                matches!(err, VolumeError::PoolOverThreshold { .. }),
                "{err}"
            );
            let text = err.to_string();
            assert!(
                text.contains("thin pool vg0/pool")
                    && text.contains(&format!("data {data}% and metadata {meta}% used"))
                    && text.contains("volumes.lvm.thin_pool_max_percent = 90%"),
                "{text}"
            );
        }
        assert!(
            b.check_pool_in(&parse_lvs(&json("90.00", "90.00", "zero")).unwrap())
                .is_ok()
        );
        // Missing, or not a thin pool.
        let lin = b
            .with_thin_pool(ThinPool {
                name: "lin".into(),
                max_percent: 90,
            })
            .unwrap();
        let err = lin.check_pool_in(&all).unwrap_err().to_string();
        assert!(err.contains("not a thin pool"), "{err}");
        assert!(
            lin.check_pool_in(&[])
                .unwrap_err()
                .to_string()
                .contains("does not exist")
        );
    }

    #[test]
    fn owner_tags() {
        assert_eq!(
            owner_tag("6f1c7a3e-0000-4000-8000-000000000000").unwrap(),
            "lvp_job_6f1c7a3e-0000-4000-8000-000000000000"
        );
        assert!(owner_tag("").is_err());
        assert!(owner_tag("a b").is_err());
        assert!(owner_tag("a,b").is_err());
    }

    #[test]
    fn names_are_validated_before_any_command() {
        let b = LvmBackend::new("vg0", Duration::from_secs(1)).unwrap();
        assert_eq!(b.volume_path("vm-1"), PathBuf::from("/dev/vg0/vm-1"));
        assert!(b.validate_name("snapshot-x").is_err());
        assert!(LvmBackend::new("../x", Duration::from_secs(1)).is_err());
        let rt = tokio::runtime::Runtime::new().unwrap();
        // These would fail differently (a command error) if a command ran.
        let err = rt.block_on(b.inspect("a/b")).unwrap_err();
        assert!(matches!(err, VolumeError::InvalidName(_)), "{err}");
        let err = rt.block_on(b.remove("x_tmeta")).unwrap_err();
        assert!(matches!(err, VolumeError::InvalidName(_)), "{err}");
        let err = rt.block_on(b.create("-x", 1 << 30, "job")).unwrap_err();
        assert!(matches!(err, VolumeError::InvalidName(_)), "{err}");
    }

    #[test]
    fn every_command_is_narrowed_to_the_configured_devices() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        // No devices: the arguments are passed unchanged.
        let plain = LvmBackend::new("vg0", Duration::from_secs(5)).unwrap();
        let out = rt.block_on(plain.run("echo", &["vgs", "vg0"])).unwrap();
        assert_eq!(out.trim(), "vgs vg0");
        // With devices: one `--devices <path>` per device, before the command's own arguments,
        // on the command line the program really receives.
        let devices = ["/dev/disk/by-id/nvme-a".to_string(), "/dev/vdb".to_string()];
        let b = LvmBackend::new("vg0", Duration::from_secs(5))
            .unwrap()
            .with_devices(&devices);
        let out = rt.block_on(b.run("echo", &["vg0/vm-1"])).unwrap();
        assert_eq!(
            out.trim(),
            "--devices /dev/disk/by-id/nvme-a --devices /dev/vdb vg0/vm-1"
        );
        // The command named in an error shows the narrowing too.
        let err = rt.block_on(b.run("false", &["x"])).unwrap_err().to_string();
        assert!(
            err.contains("false --devices /dev/disk/by-id/nvme-a --devices /dev/vdb x"),
            "{err}"
        );
    }
}
