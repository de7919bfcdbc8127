//! The `directory` volume backend: volumes are sparse raw files in one directory
//! (development, tests, and hosts without LVM).

use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::backend::{
    Blocker, BlockerKind, Grown, NewVolume, Overwrite, VolumeBackend, VolumeInfo, VolumeKind,
};
use super::blockdev::{create_new_file, open_blocker, require_free, sync_path, wipe_file};
use super::error::VolumeError;
use super::reflink::GOLDEN_DIR;
use super::wipe::{Wipe, WipeMode};

/// Folder (inside the volumes directory) of files being wiped for deletion.
const WIPING_DIR: &str = ".lvp-wiping";

/// Flushes the directory `dir` itself (a rename in it is then durable).
async fn sync_path_dir(dir: &Path) -> Result<(), VolumeError> {
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&d).and_then(|f| f.sync_all()))
        .await
        .map_err(|e| VolumeError::io(dir, std::io::Error::other(e)))?
        .map_err(|e| VolumeError::io(dir, e))
}

/// Volumes as sparse raw files in one directory.
pub(crate) struct DirectoryBackend {
    dir: PathBuf,
}

impl DirectoryBackend {
    /// Uses (and creates) `dir`.
    pub(crate) fn new(dir: &Path) -> Result<DirectoryBackend, VolumeError> {
        std::fs::create_dir_all(dir).map_err(|e| VolumeError::io(dir, e))?;
        let dir = dir.canonicalize().map_err(|e| VolumeError::io(dir, e))?;
        Ok(DirectoryBackend { dir })
    }
}

#[async_trait]
impl VolumeBackend for DirectoryBackend {
    /// The golden files' folder and the wiping folder are not volumes.
    fn validate_name(&self, name: &str) -> Result<(), String> {
        if name == GOLDEN_DIR {
            return Err(format!("`{name}` is reserved for golden files"));
        }
        if name == WIPING_DIR {
            return Err(format!("`{name}` is reserved for volumes being wiped"));
        }
        Ok(())
    }

    fn volume_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    async fn inspect(&self, name: &str) -> Result<Option<VolumeInfo>, VolumeError> {
        let path = self.volume_path(name);
        let meta = match tokio::fs::symlink_metadata(&path).await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(VolumeError::io(&path, e)),
        };
        let ft = meta.file_type();
        let reuse_blocker = if ft.is_symlink() {
            Some(Blocker::new(
                BlockerKind::NotAVolume,
                "it is a symbolic link",
            ))
        } else if ft.is_dir() {
            Some(Blocker::new(BlockerKind::NotAVolume, "it is a directory"))
        } else if ft.is_block_device() || !ft.is_file() {
            Some(Blocker::new(
                BlockerKind::NotAVolume,
                "it is not a regular file",
            ))
        } else {
            let p = path.clone();
            tokio::task::spawn_blocking(move || open_blocker(&p))
                .await
                .unwrap_or_else(|e| Some(Blocker::new(BlockerKind::Unknown, e.to_string())))
        };
        Ok(Some(VolumeInfo {
            name: name.to_string(),
            path,
            size_bytes: meta.len(),
            reuse_blocker,
            reads_zeros: false,
            kind: VolumeKind::File,
        }))
    }

    async fn create(&self, new: &NewVolume<'_>) -> Result<VolumeInfo, VolumeError> {
        let (name, size_bytes) = (new.name, new.size_bytes);
        let path = self.volume_path(name);
        let p = path.clone();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> Result<(), VolumeError> {
            require_free(&dir, size_bytes)?;
            let file = create_new_file(&p).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    VolumeError::Conflict(format!("volume file {} already exists", p.display()))
                } else {
                    VolumeError::io(&p, e)
                }
            })?;
            file.set_len(size_bytes)
                .map_err(|e| VolumeError::io(&p, e))?;
            file.sync_all().map_err(|e| VolumeError::io(&p, e))?;
            Ok(())
        })
        .await
        .map_err(|e| VolumeError::io(&path, std::io::Error::other(e)))??;
        Ok(VolumeInfo {
            name: name.to_string(),
            path,
            size_bytes,
            reuse_blocker: None,
            reads_zeros: false,
            kind: VolumeKind::File,
        })
    }

    async fn prepare(&self, overwrite: &Overwrite<'_>) -> Result<(), VolumeError> {
        let volume = overwrite.volume;
        // Dropping every block and restoring the size leaves a file that reads as zeros:
        // nothing of the old content survives, whatever the image covers (every mode of
        // `volumes.wipe_on_reuse` is met: the blocks go back to the file system).
        let path = volume.path.clone();
        let size = volume.size_bytes;
        tokio::task::spawn_blocking(move || -> Result<(), VolumeError> {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| VolumeError::io(&path, e))?;
            f.set_len(0).map_err(|e| VolumeError::io(&path, e))?;
            f.set_len(size).map_err(|e| VolumeError::io(&path, e))?;
            Ok(())
        })
        .await
        .map_err(|e| VolumeError::io(&volume.path, std::io::Error::other(e)))?
    }

    async fn flush(&self, volume: &VolumeInfo) -> Result<(), VolumeError> {
        sync_path(&volume.path).await
    }

    async fn remove(&self, name: &str) -> Result<(), VolumeError> {
        let path = self.volume_path(name);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VolumeError::io(&path, e)),
        }
    }

    /// Moves the file into the wiping folder first (the durable intent: `unfinished_wipes`
    /// finds it there after a crash), wipes it there, then unlinks it.
    async fn remove_wiped(&self, name: &str, wipe: &Wipe<'_>) -> Result<(), VolumeError> {
        if wipe.mode == WipeMode::None {
            return self.remove(name).await;
        }
        let wiping = self.dir.join(WIPING_DIR);
        let (from, to) = (self.volume_path(name), wiping.join(name));
        let regular = match tokio::fs::symlink_metadata(&from).await {
            Ok(meta) => meta.file_type().is_file(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(VolumeError::io(&from, e)),
        };
        if !regular {
            // Not a plain file: a plain removal decides.
            return self.remove(name).await;
        }
        // An earlier wipe of this name cut short: finished before its place is taken.
        self.finish_wipe(name, wipe).await?;
        tokio::fs::create_dir_all(&wiping)
            .await
            .map_err(|e| VolumeError::io(&wiping, e))?;
        tokio::fs::rename(&from, &to)
            .await
            .map_err(|e| VolumeError::io(&from, e))?;
        sync_path_dir(&self.dir).await?;
        self.finish_wipe(name, wipe).await
    }

    /// Wipes and unlinks the file of that name in the wiping folder, if there is one.
    async fn finish_wipe(&self, name: &str, wipe: &Wipe<'_>) -> Result<(), VolumeError> {
        let to = self.dir.join(WIPING_DIR).join(name);
        match tokio::fs::symlink_metadata(&to).await {
            Ok(meta) if meta.file_type().is_file() => {}
            Ok(_) => {
                return Err(VolumeError::Conflict(format!(
                    "{} is not a file",
                    to.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(VolumeError::io(&to, e)),
        }
        let (p, mode) = (to.clone(), wipe.mode);
        let (cancel, progress) = (wipe.cancel.clone(), wipe.progress.clone());
        tokio::task::spawn_blocking(move || wipe_file(&p, mode, &cancel, &progress))
            .await
            .map_err(|e| VolumeError::io(&to, std::io::Error::other(e)))??;
        tokio::fs::remove_file(&to)
            .await
            .map_err(|e| VolumeError::io(&to, e))
    }

    async fn unfinished_wipes(&self) -> Result<Vec<(String, WipeMode)>, VolumeError> {
        let Ok(dir) = std::fs::read_dir(self.dir.join(WIPING_DIR)) else {
            return Ok(Vec::new());
        };
        // The mode is not recorded for files: finishing with `zero` covers every mode.
        Ok(dir
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .map(|name| (name, WipeMode::Zero))
            .collect())
    }

    async fn check_room(&self, size_bytes: u64) -> Result<(), VolumeError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || require_free(&dir, size_bytes))
            .await
            .map_err(|e| VolumeError::io(&self.dir, std::io::Error::other(e)))?
    }

    /// `set_len` on the file, once the file system has the added bytes free.
    async fn grow(
        &self,
        volume: &VolumeInfo,
        size_bytes: u64,
        _header_bytes: u64,
    ) -> Result<Grown, VolumeError> {
        let (path, dir) = (volume.path.clone(), self.dir.clone());
        let added = size_bytes.saturating_sub(volume.size_bytes);
        tokio::task::spawn_blocking(move || -> Result<(), VolumeError> {
            require_free(&dir, added)?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| VolumeError::io(&path, e))?;
            f.set_len(size_bytes)
                .map_err(|e| VolumeError::io(&path, e))?;
            f.sync_all().map_err(|e| VolumeError::io(&path, e))
        })
        .await
        .map_err(|e| VolumeError::io(&volume.path, std::io::Error::other(e)))??;
        Ok(Grown {
            size_bytes,
            live_domain: None,
        })
    }

    /// Files carry no owner record: `create` refuses an existing file (`create_new`) and the
    /// engine's per-volume lock keeps other jobs away, so the job's own file is removed.
    async fn remove_created(&self, name: &str, _owner: &str) -> Result<(), VolumeError> {
        self.remove(name).await
    }

    async fn probe(&self) -> Result<(), VolumeError> {
        let meta = tokio::fs::metadata(&self.dir)
            .await
            .map_err(|e| VolumeError::io(&self.dir, e))?;
        if meta.is_dir() {
            Ok(())
        } else {
            Err(VolumeError::io(
                &self.dir,
                std::io::Error::other("not a directory"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn create_inspect_overwrite_remove() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirectoryBackend::new(dir.path()).unwrap();
        assert!(b.inspect("v1").await.unwrap().is_none());
        let v = b
            .create(&NewVolume {
                name: "v1",
                size_bytes: 1 << 20,
                owner: "job",
            })
            .await
            .unwrap();
        assert_eq!(v.size_bytes, 1 << 20);
        assert!(matches!(
            b.create(&NewVolume {
                name: "v1",
                size_bytes: 1 << 20,
                owner: "job"
            })
            .await,
            Err(VolumeError::Conflict(_))
        ));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&v.path)
            .unwrap()
            .write_all(b"old data")
            .unwrap();
        let info = b.inspect("v1").await.unwrap().unwrap();
        assert_eq!(info.reuse_blocker, None);
        b.prepare_overwrite(&info, 0, WipeMode::Zero, &CancellationToken::new())
            .await
            .unwrap();
        let bytes = std::fs::read(&v.path).unwrap();
        assert_eq!(bytes.len(), 1 << 20);
        assert!(bytes.iter().all(|b| *b == 0), "old content is gone");
        b.remove("v1").await.unwrap();
        b.remove("v1").await.unwrap();
        assert!(b.inspect("v1").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn symlinks_and_open_files_are_not_reusable() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirectoryBackend::new(dir.path()).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("evil")).unwrap();
        let info = b.inspect("evil").await.unwrap().unwrap();
        assert!(info.reuse_blocker.unwrap().reason.contains("symbolic link"));

        b.create(&NewVolume {
            name: "busy",
            size_bytes: 4096,
            owner: "job",
        })
        .await
        .unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::fs::File::open(dir.path().join("busy")).unwrap())
            .spawn()
            .unwrap();
        let info = b.inspect("busy").await.unwrap().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let blocker = info.reuse_blocker.unwrap();
        assert_eq!(blocker.kind, BlockerKind::Open);
        assert!(blocker.reason.contains("open by process"));
    }
}
