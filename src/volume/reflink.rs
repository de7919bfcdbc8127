//! Golden files with reflink clones, the clone store of the directory backend on a file system
//! that shares extents (XFS with `reflink=1`, btrfs): one golden raw file per cache entry in
//! `<volumes dir>/.lvp-golden/`, written once, and new volumes as `FICLONE` copies of it. A
//! clone shares the golden file's extents until the VM writes them, so it takes no time and no
//! space in proportion to the image. Whether the file system can is checked when the store
//! opens; a directory without reflinks gets no store and volumes are plain copies.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use super::backend::{NewVolume, VolumeInfo, VolumeKind};
use super::clones::{
    CloneMethod, CloneStore, Golden, GoldenBuild, GoldenSource, KeyLocks, check_key, settle,
    within_bound,
};
use super::error::VolumeError;
use crate::telemetry::metrics::metrics;

/// The folder of golden files inside the volumes directory (a reserved volume name).
pub(crate) const GOLDEN_DIR: &str = ".lvp-golden";
/// Suffix of a golden file being written (never cloned from; removed at start-up).
const PARTIAL: &str = ".partial";

/// Golden files and their reflink clones in one volumes directory.
pub(crate) struct ReflinkStore {
    /// The volumes directory (clones are created here).
    volumes: PathBuf,
    /// `<volumes>/.lvp-golden`.
    golden: PathBuf,
    /// `volumes.directory.golden_max_bytes`.
    max_bytes: u64,
    /// The file system's block size (the unit golden files hold data in).
    block: u64,
    /// Per-key locks and last uses.
    keys: KeyLocks,
}

/// Whether `dir`'s file system can reflink: clones 4 KiB between two scratch files.
fn supports_reflink(dir: &Path) -> bool {
    let a = dir.join(format!(".reflink-check-{}", std::process::id()));
    let b = dir.join(format!(".reflink-check-{}-clone", std::process::id()));
    let ok = std::fs::write(&a, [0x5au8; 4096]).is_ok() && reflink_copy::reflink(&a, &b).is_ok();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    ok
}

/// Bytes a file holds on disk.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

impl ReflinkStore {
    /// The store of volumes directory `volumes`, holding at most `max_bytes` of golden data;
    /// `None` when its file system cannot reflink.
    pub(crate) fn open(
        volumes: &Path,
        max_bytes: u64,
    ) -> Result<Option<ReflinkStore>, VolumeError> {
        let golden = volumes.join(GOLDEN_DIR);
        std::fs::create_dir_all(&golden).map_err(|e| VolumeError::io(&golden, e))?;
        let _ = std::fs::set_permissions(&golden, std::fs::Permissions::from_mode(0o700));
        if !supports_reflink(&golden) {
            let _ = std::fs::remove_dir(&golden);
            return Ok(None);
        }
        let block = nix::sys::statvfs::statvfs(&golden)
            .map(|s| s.block_size())
            .unwrap_or(4096)
            .max(512);
        Ok(Some(ReflinkStore {
            volumes: volumes.to_path_buf(),
            golden,
            max_bytes,
            block,
            keys: KeyLocks::default(),
        }))
    }

    fn path_of(&self, key: &str) -> PathBuf {
        self.golden.join(format!("{key}.img"))
    }

    fn partial_of(&self, key: &str) -> PathBuf {
        self.golden.join(format!("{key}.img{PARTIAL}"))
    }

    fn info(name: &str, path: PathBuf, size_bytes: u64, reads_zeros: bool) -> VolumeInfo {
        VolumeInfo {
            name: name.to_string(),
            path,
            size_bytes,
            reuse_blocker: None,
            reads_zeros,
            kind: VolumeKind::File,
        }
    }

    /// Complete golden files: (key, allocated bytes).
    fn complete(&self) -> Vec<(String, u64)> {
        let Ok(dir) = std::fs::read_dir(&self.golden) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let key = name.strip_suffix(".img")?.to_string();
                check_key(&key).ok()?;
                Some((key, allocated(&e.path())))
            })
            .collect()
    }

    /// Whether `source` fits the bound, after removing the least recently used golden files
    /// of other keys (none in use); `false` when it cannot fit.
    fn make_room(&self, source: &GoldenSource<'_>) -> bool {
        if !within_bound(source, self.max_bytes, "volumes.directory.golden_max_bytes") {
            return false;
        }
        let mut others: Vec<(String, u64)> = self
            .complete()
            .into_iter()
            .filter(|(key, _)| key != source.key)
            .collect();
        let mut used: u64 = others.iter().map(|(_, b)| b).sum();
        self.keys.by_last_use(&mut others);
        for (key, bytes) in others {
            if used + source.data_bytes <= self.max_bytes {
                break;
            }
            let Some(_held) = self.keys.try_lock(&key) else {
                continue;
            };
            tracing::info!(
                key,
                bytes,
                "removing the least recently used golden file (volumes.directory.golden_max_bytes)"
            );
            let _ = std::fs::remove_file(self.path_of(&key));
            used = used.saturating_sub(bytes);
        }
        used + source.data_bytes <= self.max_bytes
    }

    fn set_metrics(&self) {
        let complete = self.complete();
        let m = metrics();
        m.golden_images.set(complete.len() as i64);
        m.golden_image_bytes
            .set(complete.iter().map(|(_, b)| *b).sum::<u64>() as i64);
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
) -> Result<T, VolumeError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| VolumeError::io(path, std::io::Error::other(e)))?
}

#[async_trait]
impl CloneStore for ReflinkStore {
    fn keys(&self) -> &KeyLocks {
        &self.keys
    }

    fn method(&self) -> CloneMethod {
        CloneMethod::Reflink
    }

    fn granule(&self) -> u64 {
        self.block
    }

    async fn golden_held(
        &self,
        source: &GoldenSource<'_>,
        held: OwnedMutexGuard<()>,
    ) -> Result<Golden, VolumeError> {
        let path = self.path_of(source.key);
        if let Ok(meta) = std::fs::metadata(&path) {
            self.keys.touch(source.key);
            return Ok(Golden::Ready(Self::info(
                source.key,
                path,
                meta.len(),
                false,
            )));
        }
        let partial = self.partial_of(source.key);
        let _ = std::fs::remove_file(&partial);
        if !self.make_room(source) {
            return Ok(Golden::Skip);
        }
        let size = source.virtual_size;
        let p = partial.clone();
        blocking(&partial, move || {
            let file = super::blockdev::create_new_file(&p).map_err(|e| VolumeError::io(&p, e))?;
            file.set_len(size).map_err(|e| VolumeError::io(&p, e))
        })
        .await?;
        tracing::info!(path = %partial.display(), key = source.key, "building golden file");
        Ok(Golden::Build(GoldenBuild {
            // A new sparse file reads zeros everywhere.
            target: Self::info(source.key, partial, size, true),
            key: source.key.to_string(),
            virtual_size: size,
            _held: held,
        }))
    }

    async fn seal(&self, build: GoldenBuild) -> Result<VolumeInfo, VolumeError> {
        let (partial, path, dir) = (
            build.target.path.clone(),
            self.path_of(&build.key),
            self.golden.clone(),
        );
        let final_path = path.clone();
        let sealed = blocking(&partial.clone(), move || {
            let io = |e| VolumeError::io(&partial, e);
            std::fs::File::open(&partial)
                .and_then(|f| f.sync_all())
                .map_err(io)?;
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o400))
                .map_err(io)?;
            std::fs::rename(&partial, &final_path).map_err(io)?;
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| VolumeError::io(&dir, e))
        })
        .await;
        let build = settle(self, &self.keys, build, sealed).await?;
        self.set_metrics();
        tracing::info!(path = %path.display(), key = build.key, "golden file complete");
        Ok(Self::info(&build.key, path, build.virtual_size, false))
    }

    async fn discard(&self, target: &VolumeInfo) -> Result<(), VolumeError> {
        match std::fs::remove_file(&target.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(VolumeError::io(&target.path, e))
            }
            _ => Ok(()),
        }
    }

    async fn clone_to(
        &self,
        golden: &VolumeInfo,
        new: &NewVolume<'_>,
    ) -> Result<VolumeInfo, VolumeError> {
        let (name, size_bytes) = (new.name, new.size_bytes);
        let target = self.volumes.join(name);
        let (source, t, dir) = (golden.path.clone(), target.clone(), self.volumes.clone());
        let size = size_bytes.max(golden.size_bytes);
        blocking(&target, move || {
            // As for every file volume: the file system must be able to fill it later.
            super::blockdev::require_free(&dir, size)?;
            if std::fs::symlink_metadata(&t).is_ok() {
                return Err(VolumeError::Conflict(format!(
                    "volume file {} already exists",
                    t.display()
                )));
            }
            reflink_copy::reflink(&source, &t).map_err(|e| VolumeError::io(&t, e))?;
            let io = |e| VolumeError::io(&t, e);
            std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&t)
                .map_err(io)?;
            file.set_len(size).map_err(io)?;
            file.sync_all().map_err(io)
        })
        .await?;
        tracing::info!(volume = %target.display(), golden = %golden.path.display(), bytes = size, "reflink clone of the golden file created");
        Ok(Self::info(name, target, size, false))
    }

    async fn forget(&self, key: &str) -> Result<bool, VolumeError> {
        check_key(key)?;
        let _held = self.keys.lock(key, &CancellationToken::new()).await;
        self.keys.forget(key);
        let path = self.path_of(key);
        let removed = match std::fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(VolumeError::io(&path, e)),
        };
        if removed {
            self.set_metrics();
        }
        Ok(removed)
    }

    async fn recover(&self, cached_keys: &HashSet<String>) {
        let Ok(dir) = std::fs::read_dir(&self.golden) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let reason = if name.ends_with(PARTIAL) {
                "its build did not finish"
            } else if name
                .strip_suffix(".img")
                .is_some_and(|key| !cached_keys.contains(key))
            {
                "its cache entry is gone"
            } else {
                continue;
            };
            tracing::warn!(file = %entry.path().display(), reason, "removing golden file");
            let _ = std::fs::remove_file(entry.path());
        }
        self.set_metrics();
    }
}
