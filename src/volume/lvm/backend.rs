//! The `lvm` volume backend: logical volumes in one volume group, driven through the LVM tools
//! (`LC_ALL=C`, JSON reports in bytes, a time limit per command, stderr in every error). It owns
//! creation rounded to the VG's real extent size and tagged with the creating job (so rollback
//! never removes an LV it did not make), activation, zeroing the part of an LV an image does not
//! cover, and removal. With `volumes.lvm.thin_pool`, new LVs are thin LVs in that pool, created
//! only while the pool's use is below `volumes.lvm.thin_pool_max_percent` (`thin.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::naming::{CLONE_TAG, GOLDEN_PREFIX, owner_tag, wipe_in_tags, wipe_tag};
use super::report::{
    LV_FIELDS, LvInfo, REPORT_ARGS, VG_FIELDS, VgInfo, extents_for, parse_lvs, parse_vgs,
};
use super::thin::{PoolUse, ThinPool};
use crate::command;
use crate::volume::backend::{Grown, NewVolume, Overwrite, VolumeBackend, VolumeInfo, VolumeKind};
use crate::volume::blockdev;
use crate::volume::error::VolumeError;
use crate::volume::names::validate_lvm_name;
use crate::volume::wipe::{Wipe, WipeMode, WipeProgress};

/// How long a device node may take to appear after activation (udev in production).
const NODE_WAIT: Duration = Duration::from_secs(10);
/// How long removal waits for a transient opener (udev's probe after a write) to go away.
const OPEN_WAIT: Duration = Duration::from_secs(5);

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

    /// Pool safety, before anything is created in the pool: its use, or `PoolOverThreshold`
    /// when data or metadata use is above `volumes.lvm.thin_pool_max_percent`.
    pub(crate) async fn check_pool(&self) -> Result<PoolUse, VolumeError> {
        match &self.thin {
            Some(pool) => pool.check_in(&self.vg, &self.lvs().await?),
            None => Err(no_pool()),
        }
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
            kind: if lv.segtype == "thin" {
                VolumeKind::ThinLv
            } else {
                VolumeKind::ThickLv
            },
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
        let pool_arg = self.thin.as_ref().map(|p| p.arg(&self.vg));
        let placement = match &pool_arg {
            Some(pool) => Placement::Thin { pool, bytes: need },
            None => Placement::Linear { extents },
        };
        let args = self.lvcreate_args(name, &placement, tags);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
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
            extents,
            extent_size,
            thin_pool = pool_arg.as_deref().unwrap_or(""),
            "logical volume created"
        );
        let mut info = self.info(&lv);
        info.reads_zeros = pool.is_some_and(|p| p.zeroes);
        Ok(info)
    }

    /// The arguments of `lvcreate` for `name` placed as `placement`, tagged with `tags`.
    fn lvcreate_args(&self, name: &str, placement: &Placement<'_>, tags: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["--yes", "--activate", "y", "--name", name]
            .map(String::from)
            .to_vec();
        match placement {
            // Unprovisioned thin blocks read zeros: nothing to wipe (and lvcreate refuses
            // `--zero` here). Thin LVs never get the activation skip flag: a VM's disk must
            // activate at boot.
            Placement::Thin { pool, bytes } => args.extend([
                "--setactivationskip".into(),
                "n".into(),
                "--virtualsize".into(),
                format!("{bytes}b"),
                "--thinpool".into(),
                pool.to_string(),
            ]),
            Placement::Linear { extents } => args.extend([
                "--wipesignatures".into(),
                "y".into(),
                "--zero".into(),
                "y".into(),
                "--extents".into(),
                extents.to_string(),
            ]),
        }
        for tag in tags {
            args.extend(["--addtag".into(), tag.to_string()]);
        }
        if matches!(placement, Placement::Linear { .. }) {
            args.push(self.vg.clone());
        }
        args
    }

    /// A new volume `new.name` of at least `new.size_bytes`: a thin snapshot of `golden` (a
    /// golden image, or a thin LV being cloned), activated (no activation skip), writable,
    /// extended to the size, tagged as created by `new.owner` and with `extra_tags`. Checks
    /// the pool first. `Conflict` when an LV of that name exists.
    pub(super) async fn thin_snapshot(
        &self,
        golden: &VolumeInfo,
        new: &NewVolume<'_>,
        extra_tags: &[&str],
    ) -> Result<VolumeInfo, VolumeError> {
        let (name, size_bytes, owner) = (new.name, new.size_bytes, new.owner);
        validate_lvm_name(name).map_err(VolumeError::InvalidName)?;
        let tag = owner_tag(owner)?;
        self.check_pool().await?;
        let origin = self.lv_arg(&golden.name);
        let mut args = vec![
            "--yes",
            "--snapshot",
            "--setactivationskip",
            "n",
            "--activate",
            "y",
            "--name",
            name,
            "--addtag",
            &tag,
        ];
        for t in extra_tags {
            args.extend(["--addtag", t]);
        }
        args.push(&origin);
        let created = self.run("lvcreate", &args).await;
        if let Err(e) = created {
            if let Ok(Some(lv)) = self.lv(name).await
                && !lv.tags.contains(&tag)
            {
                return Err(VolumeError::Conflict(format!(
                    "volume {name} already exists in VG {}",
                    self.vg_name()
                )));
            }
            return Err(e);
        }
        let vg = self.vg().await?;
        let extents = extents_for(size_bytes, vg.extent_size).ok_or_else(|| {
            Self::report_error(
                "lvextend",
                format!(
                    "cannot size {size_bytes} bytes in extents of {}",
                    vg.extent_size
                ),
            )
        })?;
        let volume = self.lv_arg(name);
        if extents * vg.extent_size > golden.size_bytes {
            let extents = extents.to_string();
            self.run("lvextend", &["--yes", "--extents", &extents, &volume])
                .await?;
        }
        let lv = self.lv(name).await?.ok_or_else(|| {
            Self::report_error("lvs", format!("{name} is not listed after lvcreate"))
        })?;
        if lv.attr.skip_activation == 'k' {
            self.run("lvchange", &["--setactivationskip", "n", &volume])
                .await?;
        }
        if !lv.attr.is_active() {
            self.activate(name).await?;
        }
        if lv.attr.permissions != 'w' {
            self.run("lvchange", &["--permission", "rw", &volume])
                .await?;
        }
        self.wait_for_node(name).await?;
        tracing::info!(volume = %volume, origin = %origin, bytes = lv.size_bytes, "thin snapshot created");
        Ok(self.info(&lv))
    }

    /// Start-up: the thin pool's use into the metrics, and a warning when it does not zero
    /// newly provisioned chunks.
    pub(crate) async fn report_pool(&self) {
        let Some(pool) = &self.thin else {
            return;
        };
        let pool_arg = pool.arg(&self.vg);
        let usage = match self.lvs().await {
            Ok(all) => pool.use_in(&self.vg, &all),
            Err(e) => Err(e),
        };
        match usage {
            Ok(usage) => {
                crate::telemetry::metrics::metrics()
                    .thin_pool_use(usage.data_percent, usage.metadata_percent);
                if !usage.zeroes {
                    tracing::warn!(
                        thin_pool = %pool_arg,
                        "thin pool {pool_arg} does not zero newly provisioned chunks (lvs -o zero): \
                         the parts of a chunk a volume has not written may show data of deleted \
                         volumes to its VM. Images are written in full (no --target-is-zero); turn \
                         zeroing on with `lvchange --zero y {pool_arg}`"
                    );
                }
            }
            Err(e) => tracing::warn!(thin_pool = %pool_arg, error = %e, "thin pool is not usable"),
        }
    }
}

/// Wipes the block device `path` from `start` as `mode` says, off the async threads.
async fn wipe_blocking(
    path: &std::path::Path,
    start: u64,
    wipe: &Wipe<'_>,
) -> Result<(), VolumeError> {
    let (p, mode) = (path.to_path_buf(), wipe.mode);
    let (cancel, progress) = (wipe.cancel.clone(), wipe.progress.clone());
    tokio::task::spawn_blocking(move || blockdev::wipe_device(&p, start, mode, &cancel, &progress))
        .await
        .map_err(|e| VolumeError::io(path, std::io::Error::other(e)))?
}

/// Where `lvcreate` puts a new LV.
enum Placement<'a> {
    /// A thin LV of `bytes` in the thin pool `pool` (`vg/pool`).
    Thin { pool: &'a str, bytes: u64 },
    /// A linear LV of `extents` in the VG.
    Linear { extents: u64 },
}

/// The error of a pool operation on a backend without a thin pool.
fn no_pool() -> VolumeError {
    VolumeError::Report {
        command: "lvs".into(),
        detail: "no thin pool is configured (volumes.lvm.thin_pool)".into(),
    }
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

    async fn create(&self, new: &NewVolume<'_>) -> Result<VolumeInfo, VolumeError> {
        let (name, size_bytes) = (new.name, new.size_bytes);
        let tag = owner_tag(new.owner)?;
        if name.starts_with(GOLDEN_PREFIX) {
            return Err(VolumeError::Conflict(format!(
                "volume names starting with {GOLDEN_PREFIX} are reserved for golden images; \
                 choose another volume_name"
            )));
        }
        self.create_lv(name, size_bytes, &[&tag]).await
    }

    async fn prepare(&self, overwrite: &Overwrite<'_>) -> Result<(), VolumeError> {
        let Overwrite {
            volume,
            image_size,
            tail,
            cancel,
        } = *overwrite;
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
        let started = std::time::Instant::now();
        let progress = Arc::new(WipeProgress::default());
        let wipe = Wipe {
            mode: tail,
            progress: &progress,
            cancel,
        };
        wipe_blocking(&path, image_size, &wipe).await?;
        tracing::info!(
            volume = %path.display(),
            from = image_size,
            bytes = lv.size_bytes.saturating_sub(image_size),
            mode = tail.as_str(),
            seconds = started.elapsed().as_secs_f64(),
            "wiped the part of the volume the image does not cover"
        );
        Ok(())
    }

    async fn flush(&self, volume: &VolumeInfo) -> Result<(), VolumeError> {
        blockdev::sync_path(&volume.path).await
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

    async fn remove_wiped(&self, name: &str, wipe: &Wipe<'_>) -> Result<(), VolumeError> {
        validate_lvm_name(name).map_err(VolumeError::InvalidName)?;
        let mode = wipe.mode;
        let Some(lv) = self.lv(name).await? else {
            return Ok(());
        };
        if mode != WipeMode::None {
            if let Some(reason) = lv.removal_blocker() {
                return Err(VolumeError::Conflict(format!(
                    "volume {name} is not removed: {reason}"
                )));
            }
            // The intent first, durably on the LV itself: a crash from here on leaves an LV
            // that is never reused and that start-up finishes (`unfinished_wipes`).
            let tag = wipe_tag(mode);
            if !lv.tags.contains(&tag) {
                self.run("lvchange", &["--addtag", &tag, &self.lv_arg(name)])
                    .await?;
            }
            if !lv.attr.is_active() {
                self.activate(name).await?;
            }
            let path = self.wait_for_node(name).await?;
            let started = std::time::Instant::now();
            wipe_blocking(&path, 0, wipe).await?;
            tracing::info!(
                volume = %self.lv_arg(name),
                bytes = lv.size_bytes,
                mode = mode.as_str(),
                seconds = started.elapsed().as_secs_f64(),
                "wiped logical volume before removal"
            );
        }
        self.remove(name).await
    }

    async fn unfinished_wipes(&self) -> Result<Vec<(String, WipeMode)>, VolumeError> {
        Ok(self
            .lvs()
            .await?
            .into_iter()
            .filter_map(|lv| wipe_in_tags(&lv.tags).map(|mode| (lv.name, mode)))
            .collect())
    }

    /// The LV itself carries the intent: only an LV still tagged is wiped.
    async fn finish_wipe(&self, name: &str, wipe: &Wipe<'_>) -> Result<(), VolumeError> {
        match self.lv(name).await? {
            Some(lv) if wipe_in_tags(&lv.tags).is_some() => self.remove_wiped(name, wipe).await,
            _ => Ok(()),
        }
    }

    async fn check_room(&self, size_bytes: u64) -> Result<(), VolumeError> {
        if self.thin.is_some() {
            return self.check_pool().await.map(|_| ());
        }
        let vg = self.vg().await?;
        let need = extents_for(size_bytes, vg.extent_size)
            .map(|e| e * vg.extent_size)
            .unwrap_or(u64::MAX);
        if need > vg.free_bytes {
            return Err(VolumeError::InsufficientSpace {
                need,
                have: vg.free_bytes,
                place: format!("VG {}", vg.name),
            });
        }
        Ok(())
    }

    /// `lvextend` to whole extents, after the space check of a new LV of the added size (the
    /// thin pool's threshold, the VG's free extents).
    async fn grow(
        &self,
        volume: &VolumeInfo,
        size_bytes: u64,
        _header_bytes: u64,
    ) -> Result<Grown, VolumeError> {
        let extent_size = self.extent_size().await?;
        let need = extents_for(size_bytes, extent_size)
            .map(|e| e * extent_size)
            .ok_or_else(|| {
                Self::report_error("lvextend", format!("cannot size {size_bytes} bytes"))
            })?;
        let added = need.saturating_sub(volume.size_bytes);
        if volume.kind == VolumeKind::ThinLv {
            // Only the configured pool has a threshold; a thin LV of another pool grows as
            // lvextend allows.
            if self.thin.is_some() {
                self.check_pool().await?;
            }
        } else {
            let vg = self.vg().await?;
            if added > vg.free_bytes {
                return Err(VolumeError::InsufficientSpace {
                    need: added,
                    have: vg.free_bytes,
                    place: format!("VG {}", vg.name),
                });
            }
        }
        let size = format!("{need}b");
        self.run("lvextend", &["--size", &size, &self.lv_arg(&volume.name)])
            .await?;
        let lv = self.lv(&volume.name).await?.ok_or_else(|| {
            Self::report_error(
                "lvs",
                format!("{} is not listed after lvextend", volume.name),
            )
        })?;
        tracing::info!(volume = %self.lv_arg(&volume.name), from = volume.size_bytes, to = lv.size_bytes, "logical volume extended");
        Ok(Grown {
            size_bytes: lv.size_bytes,
            live_domain: None,
        })
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

    /// Thin LVs are snapshotted when a thin pool is configured (its threshold is checked
    /// first); thick LVs are copied.
    fn can_snapshot(&self, source: &VolumeInfo) -> bool {
        source.kind == VolumeKind::ThinLv && self.thin.is_some()
    }

    /// A thin snapshot of `source`, tagged as a clone so that it counts as a plain volume.
    async fn snapshot(
        &self,
        source: &VolumeInfo,
        new: &NewVolume<'_>,
    ) -> Result<VolumeInfo, VolumeError> {
        if new.name.starts_with(GOLDEN_PREFIX) {
            return Err(VolumeError::Conflict(format!(
                "volume names starting with {GOLDEN_PREFIX} are reserved for golden images"
            )));
        }
        self.thin_snapshot(source, new, &[CLONE_TAG]).await
    }

    async fn probe(&self) -> Result<(), VolumeError> {
        self.vg().await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let err = rt
            .block_on(b.create(&NewVolume {
                name: "-x",
                size_bytes: 1 << 30,
                owner: "job",
            }))
            .unwrap_err();
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
