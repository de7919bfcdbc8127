//! Work every backend does on the bytes of a volume, whatever holds them: wiping a block
//! device from an offset to its end (`BLKZEROOUT`, `BLKDISCARD` in large ranges) or a file in
//! place, flushing a volume to stable
//! storage, and finding the processes that hold a path open (`/proc`, failing closed when some
//! processes cannot be seen). A leaf of `volume/`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use super::backend::{Blocker, BlockerKind};
use super::error::VolumeError;
use super::wipe::{Pacer, WipeMode, WipeProgress};

/// Bytes zeroed or discarded per ioctl; cancellation is checked and progress counted between
/// calls.
const ZERO_CHUNK: u64 = 256 << 20;

// Block-device ioctls (linux/fs.h); BLKGETSIZE64 is declared with size_t, 8 bytes on the 64-bit
// targets this daemon runs on.
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(
    blksszget,
    nix::request_code_none!(0x12, 104),
    nix::libc::c_int
);

/// A block device opened for writing, with its size and logical block size.
struct Device {
    file: std::fs::File,
    path: PathBuf,
    size: u64,
    sector: u64,
}

impl Device {
    fn open(path: &Path) -> Result<Device, VolumeError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| VolumeError::io(path, e))?;
        let fd = file.as_raw_fd();
        let mut size = 0u64;
        // SAFETY: fd is open for the duration of the call; the kernel writes one u64.
        unsafe { blkgetsize64(fd, &mut size) }.map_err(|e| errno(path, "BLKGETSIZE64", e))?;
        let mut sector: nix::libc::c_int = 0;
        // SAFETY: as above; the kernel writes one int.
        unsafe { blksszget(fd, &mut sector) }.map_err(|e| errno(path, "BLKSSZGET", e))?;
        let sector = u64::try_from(sector).unwrap_or(512).max(512);
        Ok(Device {
            file,
            path: path.to_path_buf(),
            size,
            sector,
        })
    }

    /// The device's discard granularity from sysfs (0: it does not discard).
    fn discard_granularity(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = self.file.metadata() else {
            return 0;
        };
        let rdev = meta.rdev();
        let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        std::fs::read_to_string(format!(
            "/sys/dev/block/{major}:{minor}/queue/discard_granularity"
        ))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
    }

    /// Runs `op` (BLKZEROOUT or BLKDISCARD) over `[start, end)` in `ZERO_CHUNK` pieces.
    fn each_chunk(
        &self,
        (start, end): (u64, u64),
        cancel: &CancellationToken,
        progress: &WipeProgress,
        discard: bool,
    ) -> Result<(), VolumeError> {
        let fd = self.file.as_raw_fd();
        let mut pacer = Pacer::new(progress);
        let mut off = start;
        while off < end {
            if cancel.is_cancelled() {
                return Err(VolumeError::io(
                    &self.path,
                    std::io::Error::new(std::io::ErrorKind::Interrupted, "wiping stopped"),
                ));
            }
            // Paced ranges stay whole sectors (the chunk is whole MiB).
            let len = pacer.chunk(ZERO_CHUNK).min(end - off);
            let range = [off, len];
            // SAFETY: range is a valid [start, length] pair for the duration of the call.
            let done = if discard {
                unsafe { blkdiscard(fd, &range) }.map_err(|e| errno(&self.path, "BLKDISCARD", e))
            } else {
                unsafe { blkzeroout(fd, &range) }.map_err(|e| errno(&self.path, "BLKZEROOUT", e))
            };
            done?;
            progress.add(len);
            pacer.wait(len, cancel);
            off += len;
        }
        Ok(())
    }
}

fn errno(path: &Path, what: &str, e: nix::errno::Errno) -> VolumeError {
    VolumeError::io(
        path,
        std::io::Error::other(format!("{what}: {}", std::io::Error::from(e))),
    )
}

/// Zeroes `path` (a block device) from `start` (rounded down to its logical block size) to its
/// end, checking `cancel` between chunks.
pub(crate) fn zero_from(
    path: &Path,
    start: u64,
    cancel: &CancellationToken,
) -> Result<(), VolumeError> {
    wipe_device(
        path,
        start,
        WipeMode::Zero,
        cancel,
        &WipeProgress::default(),
    )
}

/// Zeroes the first `len` bytes of `path` (all of it when smaller), then flushes it: a block
/// device with `BLKZEROOUT` (rounded up to its logical block size), a regular file with
/// written zeros (its size stays).
pub(crate) fn zero_head(path: &Path, len: u64) -> Result<(), VolumeError> {
    let io = |e: std::io::Error| VolumeError::io(path, e);
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if meta.file_type().is_file() {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(io)?;
        let len = len.min(meta.len());
        file.write_all_at(&vec![0u8; len as usize], 0).map_err(io)?;
        return file.sync_all().map_err(io);
    }
    let dev = Device::open(path)?;
    let end = (len.div_ceil(dev.sector) * dev.sector).min(dev.size);
    let progress = WipeProgress::default();
    dev.each_chunk((0, end), &CancellationToken::new(), &progress, false)?;
    dev.file.sync_all().map_err(|e| VolumeError::io(path, e))
}

/// Wipes `path` (a block device) from `start` (rounded down to its logical block size) to its
/// end as `mode` says, in large ranges, counting into `progress`. A discard covers the whole
/// granules inside the range and zeroes the pieces at its edges (a partial granule is not
/// discarded by the device); a device that cannot discard is zeroed instead.
pub(crate) fn wipe_device(
    path: &Path,
    start: u64,
    mode: WipeMode,
    cancel: &CancellationToken,
    progress: &WipeProgress,
) -> Result<(), VolumeError> {
    let dev = Device::open(path)?;
    let start = (start / dev.sector * dev.sector).min(dev.size);
    progress.set_total(dev.size - start);
    let granule = dev.discard_granularity();
    match mode {
        WipeMode::None => Ok(()),
        WipeMode::Discard if granule > 0 => {
            let first = start.div_ceil(granule) * granule;
            let last = dev.size / granule * granule;
            if first >= last {
                return dev.each_chunk((start, dev.size), cancel, progress, false);
            }
            dev.each_chunk((start, first), cancel, progress, false)?;
            dev.each_chunk((first, last), cancel, progress, true)?;
            dev.each_chunk((last, dev.size), cancel, progress, false)
        }
        WipeMode::Discard | WipeMode::Zero => {
            dev.each_chunk((start, dev.size), cancel, progress, false)
        }
    }
}

/// Wipes a regular file in place as `mode` says: `discard` punches a hole over all of it (the
/// file system hands freed blocks to no other file before they are rewritten), `zero` writes
/// zeros over it in large writes. The size stays.
pub(crate) fn wipe_file(
    path: &Path,
    mode: WipeMode,
    cancel: &CancellationToken,
    progress: &WipeProgress,
) -> Result<(), VolumeError> {
    use std::os::unix::fs::FileExt;
    let io = |e: std::io::Error| VolumeError::io(path, e);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    progress.set_total(size);
    match mode {
        WipeMode::None => return Ok(()),
        WipeMode::Discard => {
            let flags = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
            let len = i64::try_from(size).unwrap_or(i64::MAX);
            nix::fcntl::fallocate(&file, flags, 0, len).map_err(|e| io(e.into()))?;
            progress.add(size);
        }
        WipeMode::Zero => {
            let zeros = vec![0u8; 8 << 20];
            let mut pacer = Pacer::new(progress);
            let mut off = 0u64;
            while off < size {
                if cancel.is_cancelled() {
                    return Err(io(std::io::Error::new(
                        std::io::ErrorKind::Interrupted,
                        "wiping stopped",
                    )));
                }
                let len = pacer.chunk(zeros.len() as u64).min(size - off);
                file.write_all_at(&zeros[..len as usize], off).map_err(io)?;
                progress.add(len);
                pacer.wait(len, cancel);
                off += len;
            }
        }
    }
    file.sync_all().map_err(io)
}

/// Fails with `InsufficientSpace` unless `need` bytes are free on `dir`'s file system. Sparse
/// files take space only as they are written, but a volume the file system cannot fill is a
/// trap for the VM later: file volumes require their full size to be free.
pub(crate) fn require_free(dir: &Path, need: u64) -> Result<(), VolumeError> {
    let avail = nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available() * s.fragment_size())
        .map_err(|e| VolumeError::io(dir, e.into()))?;
    if need > avail {
        return Err(VolumeError::InsufficientSpace {
            need,
            have: avail,
            place: dir.display().to_string(),
        });
    }
    Ok(())
}

/// Creates `path` as a new file (never an existing one, never through a symbolic link), 0600.
pub(crate) fn create_new_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Flushes what was written to `path` (a device or a file) to stable storage, off the async
/// threads.
pub(crate) async fn sync_path(path: &Path) -> Result<(), VolumeError> {
    let owned: PathBuf = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&owned)
            .and_then(|f| f.sync_all())
            .map_err(|e| VolumeError::io(&owned, e))
    })
    .await
    .map_err(|e| VolumeError::io(path, std::io::Error::other(e)))?
}

/// Why `path` must not be reused because of other processes: open by one, or no way to know.
pub(crate) fn open_blocker(path: &Path) -> Option<Blocker> {
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
}
