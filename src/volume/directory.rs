//! The `directory` volume backend: volumes are sparse raw files in one directory
//! (development, tests, and hosts without LVM).

use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{Blocker, BlockerKind, VolumeBackend, VolumeError, VolumeInfo};

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
        }))
    }

    async fn create(
        &self,
        name: &str,
        size_bytes: u64,
        _owner: &str,
    ) -> Result<VolumeInfo, VolumeError> {
        let path = self.volume_path(name);
        let p = path.clone();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> Result<(), VolumeError> {
            let avail = nix::sys::statvfs::statvfs(&dir)
                .map(|s| s.blocks_available() * s.fragment_size())
                .map_err(|e| VolumeError::io(&dir, e.into()))?;
            // Sparse files take space only as they are written, but a volume the file system
            // cannot fill is a trap for the VM later: require the full size to be free.
            if size_bytes > avail {
                return Err(VolumeError::InsufficientSpace {
                    need: size_bytes,
                    have: avail,
                    place: dir.display().to_string(),
                });
            }
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&p)
                .map_err(|e| {
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
        })
    }

    async fn prepare_overwrite(
        &self,
        volume: &VolumeInfo,
        _image_size: u64,
        _cancel: &CancellationToken,
    ) -> Result<(), VolumeError> {
        // Dropping every block and restoring the size leaves a file that reads as zeros:
        // nothing of the old content survives, whatever the image covers.
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
        let path = volume.path.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| VolumeError::io(&path, e))
        })
        .await
        .map_err(|e| VolumeError::io(&volume.path, std::io::Error::other(e)))?
    }

    async fn remove(&self, name: &str) -> Result<(), VolumeError> {
        let path = self.volume_path(name);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VolumeError::io(&path, e)),
        }
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

/// Why `path` must not be reused because of other processes: open by one, or no way to know.
fn open_blocker(path: &Path) -> Option<Blocker> {
    match processes_holding(path) {
        Ok(pids) if pids.is_empty() => None,
        Ok(pids) => Some(Blocker::new(
            BlockerKind::Open,
            format!("it is open by process {pids:?}"),
        )),
        Err(why) => Some(Blocker::new(
            BlockerKind::Unknown,
            format!("cannot tell whether another process has it open: {why}"),
        )),
    }
}

/// Processes other than this one that have `path` open (from /proc/*/fd). An error when some
/// process's open files cannot be seen: /proc unreadable, mounted with `hidepid` (systemd's
/// `ProtectProc=invisible`) without CAP_SYS_PTRACE, or another user's process.
fn processes_holding(path: &Path) -> Result<Vec<u32>, String> {
    if let Some(option) = proc_hides_processes() {
        return Err(format!(
            "/proc is mounted with {option} and this process lacks CAP_SYS_PTRACE, so other \
             users' processes are invisible (reading their open files needs CAP_SYS_PTRACE and \
             CAP_DAC_READ_SEARCH)"
        ));
    }
    let me = std::process::id();
    let procs = std::fs::read_dir("/proc").map_err(|e| format!("cannot list /proc: {e}"))?;
    let mut pids = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let fds = match std::fs::read_dir(entry.path().join("fd")) {
            Ok(fds) => fds,
            // The process ended meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(format!(
                    "cannot read the open files of process {pid}: {e} (seeing other users' \
                     processes needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH)"
                ));
            }
            Err(e) => return Err(format!("cannot read the open files of process {pid}: {e}")),
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == path))
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// The `hidepid=` option of the /proc mount when it hides other users' processes from this
/// one (no CAP_SYS_PTRACE); `None` when every process is visible.
fn proc_hides_processes() -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let option = hidepid_option(&mountinfo)?;
    (!has_cap_sys_ptrace()).then_some(option)
}

/// The `hidepid=` option of the mount at /proc in a mountinfo text, unless it hides nothing.
fn hidepid_option(mountinfo: &str) -> Option<String> {
    mountinfo
        .lines()
        .filter(|line| line.split(' ').nth(4) == Some("/proc"))
        .flat_map(|line| line.split([' ', ',']))
        .find(|opt| opt.starts_with("hidepid=") && !matches!(*opt, "hidepid=0" | "hidepid=off"))
        .map(str::to_string)
}

/// Whether the effective capabilities include CAP_SYS_PTRACE (bit 19).
fn has_cap_sys_ptrace() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 19) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn create_inspect_overwrite_remove() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirectoryBackend::new(dir.path()).unwrap();
        assert!(b.inspect("v1").await.unwrap().is_none());
        let v = b.create("v1", 1 << 20, "job").await.unwrap();
        assert_eq!(v.size_bytes, 1 << 20);
        assert!(matches!(
            b.create("v1", 1 << 20, "job").await,
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
        b.prepare_overwrite(&info, 0, &CancellationToken::new())
            .await
            .unwrap();
        let bytes = std::fs::read(&v.path).unwrap();
        assert_eq!(bytes.len(), 1 << 20);
        assert!(bytes.iter().all(|b| *b == 0), "old content is gone");
        b.remove("v1").await.unwrap();
        b.remove("v1").await.unwrap();
        assert!(b.inspect("v1").await.unwrap().is_none());
    }

    #[test]
    fn hidden_processes_are_detected_from_the_proc_mount() {
        // As systemd's ProtectProc=invisible mounts it, and as a plain host has it.
        let hidden = "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw,hidepid=invisible\n";
        let plain = "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n";
        let old = "22 1 0:21 / /proc rw,relatime - proc proc rw,hidepid=2\n";
        let off = "22 1 0:21 / /proc rw,relatime - proc proc rw,hidepid=0\n";
        assert_eq!(hidepid_option(hidden).as_deref(), Some("hidepid=invisible"));
        assert_eq!(hidepid_option(old).as_deref(), Some("hidepid=2"));
        assert_eq!(hidepid_option(plain), None);
        assert_eq!(hidepid_option(off), None);
        let elsewhere = "30 22 0:40 / /run/x rw - proc proc rw,hidepid=invisible\n";
        assert_eq!(
            hidepid_option(elsewhere),
            None,
            "only the mount at /proc counts"
        );
    }

    #[tokio::test]
    async fn symlinks_and_open_files_are_not_reusable() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirectoryBackend::new(dir.path()).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("evil")).unwrap();
        let info = b.inspect("evil").await.unwrap().unwrap();
        assert!(info.reuse_blocker.unwrap().reason.contains("symbolic link"));

        b.create("busy", 4096, "job").await.unwrap();
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
