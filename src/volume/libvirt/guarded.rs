//! The volume backend as libvirt sees it: wraps the LVM or directory backend when
//! `libvirt.pool` is set. libvirt is asked which running domains use a volume before it may be
//! reused or deleted (besides the backend's own open check: whichever says "in use" wins, and
//! libvirt not answering counts as "cannot tell"), and the pool is refreshed after a volume is
//! written or removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use super::Libvirt;
use super::domains::{domains_using, top_disks_on};
use crate::volume::backend::{
    Blocker, BlockerKind, Grown, NewVolume, Overwrite, VolumeBackend, VolumeInfo,
};
use crate::volume::error::VolumeError;
use crate::volume::wipe::{Wipe, WipeMode};

/// What libvirt says about a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Usage {
    /// No running domain has it as a disk or backing file.
    Free,
    /// These running (or paused) domains use it.
    UsedBy(Vec<String>),
    /// libvirt did not answer (libvirtd down, timed out...): the error.
    Unknown(String),
}

impl Usage {
    /// The blocker this answer puts on a volume; `uri` is named so the reader knows which
    /// libvirt was asked.
    fn blocker(&self, uri: &str) -> Option<Blocker> {
        match self {
            Usage::Free => None,
            Usage::UsedBy(domains) => Some(Blocker::new(
                BlockerKind::Open,
                format!(
                    "it is a disk of the running libvirt {} {} ({uri}; stop {} first)",
                    if domains.len() == 1 {
                        "domain"
                    } else {
                        "domains"
                    },
                    quoted(domains),
                    if domains.len() == 1 { "it" } else { "them" }
                ),
            )),
            Usage::Unknown(error) => Some(Blocker::new(
                BlockerKind::Unknown,
                format!(
                    "cannot ask libvirt ({uri}) whether a running domain uses it, so it is \
                     neither reused nor deleted until libvirtd answers: {error}"
                ),
            )),
        }
    }
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How strongly a blocker holds a volume: a kind that forbids more ranks higher.
fn rank(blocker: &Option<Blocker>) -> u8 {
    match blocker.as_ref().map(|b| b.kind) {
        None => 0,
        Some(BlockerKind::Unwritable) => 1,
        Some(BlockerKind::Unknown) => 2,
        Some(BlockerKind::Open) => 3,
        Some(BlockerKind::NotAVolume) => 4,
        // Never a volume of the API (its reason names the cache entry to delete instead).
        Some(BlockerKind::Golden) => 5,
    }
}

/// The blocker that forbids more of the backend's and libvirt's; on a tie libvirt's, which
/// names the domain.
fn stricter(backend: Option<Blocker>, libvirt: Option<Blocker>) -> Option<Blocker> {
    if libvirt.is_some() && rank(&libvirt) >= rank(&backend) {
        libvirt
    } else {
        backend
    }
}

/// A volume backend whose volumes are also libvirt's: see the file comment.
pub(crate) struct LibvirtVolumes {
    inner: Arc<dyn VolumeBackend>,
    libvirt: Arc<Libvirt>,
}

impl LibvirtVolumes {
    pub(crate) fn new(inner: Arc<dyn VolumeBackend>, libvirt: Arc<Libvirt>) -> LibvirtVolumes {
        LibvirtVolumes { inner, libvirt }
    }

    /// Which running domains use the volume at `path`.
    async fn usage(&self, path: &Path) -> Usage {
        let disks = match self.libvirt.active_domain_disks().await {
            Ok(disks) => disks,
            Err(e) => return Usage::Unknown(e.to_string()),
        };
        let path = path.to_path_buf();
        // Resolving the paths is a stat each: off the async threads.
        match tokio::task::spawn_blocking(move || domains_using(&path, &disks)).await {
            Ok(domains) if domains.is_empty() => Usage::Free,
            Ok(domains) => Usage::UsedBy(domains),
            Err(e) => Usage::Unknown(e.to_string()),
        }
    }
}

#[async_trait]
impl VolumeBackend for LibvirtVolumes {
    fn validate_name(&self, name: &str) -> Result<(), String> {
        self.inner.validate_name(name)
    }

    fn volume_path(&self, name: &str) -> PathBuf {
        self.inner.volume_path(name)
    }

    /// The backend's view, with libvirt's answer as a blocker when it is stricter. Not asked
    /// for what is not a volume at all (never touched anyway).
    async fn inspect(&self, name: &str) -> Result<Option<VolumeInfo>, VolumeError> {
        let Some(mut info) = self.inner.inspect(name).await? else {
            return Ok(None);
        };
        if info
            .reuse_blocker
            .as_ref()
            .is_some_and(|b| b.kind == BlockerKind::NotAVolume)
        {
            return Ok(Some(info));
        }
        let libvirt = self.usage(&info.path).await.blocker(self.libvirt.uri());
        info.reuse_blocker = stricter(info.reuse_blocker.take(), libvirt);
        Ok(Some(info))
    }

    async fn create(&self, new: &NewVolume<'_>) -> Result<VolumeInfo, VolumeError> {
        self.inner.create(new).await
    }

    async fn prepare(&self, overwrite: &Overwrite<'_>) -> Result<(), VolumeError> {
        self.inner.prepare(overwrite).await
    }

    /// Flushes, then refreshes the pool so libvirt lists the finished volume with its size.
    async fn flush(&self, volume: &VolumeInfo) -> Result<(), VolumeError> {
        self.inner.flush(volume).await?;
        self.libvirt.refresh().await;
        Ok(())
    }

    /// Removes (callers have inspected the volume, libvirt's answer included), then refreshes
    /// the pool so libvirt no longer lists it.
    async fn remove(&self, name: &str) -> Result<(), VolumeError> {
        self.inner.remove(name).await?;
        self.libvirt.refresh().await;
        Ok(())
    }

    /// As `remove`, wiped first.
    async fn remove_wiped(&self, name: &str, wipe: &Wipe<'_>) -> Result<(), VolumeError> {
        self.inner.remove_wiped(name, wipe).await?;
        self.libvirt.refresh().await;
        Ok(())
    }

    async fn check_room(&self, size_bytes: u64) -> Result<(), VolumeError> {
        self.inner.check_room(size_bytes).await
    }

    /// Grows the volume, then tells the running domain that has it as a disk (not as a
    /// backing file: a qcow2 overlay above it keeps its own size) through `blockresize`.
    async fn grow(
        &self,
        volume: &VolumeInfo,
        size_bytes: u64,
        header_bytes: u64,
    ) -> Result<Grown, VolumeError> {
        let mut grown = self.inner.grow(volume, size_bytes, header_bytes).await?;
        let disks = match self.libvirt.active_domain_disks().await {
            Ok(disks) => disks,
            Err(e) => {
                tracing::warn!(volume = %volume.name, error = %e, "grown, but cannot ask libvirt which domain uses it");
                return Ok(grown);
            }
        };
        let path = volume.path.clone();
        let using = tokio::task::spawn_blocking(move || top_disks_on(&path, &disks))
            .await
            .unwrap_or_default();
        if let Some(disk) = using.into_iter().next() {
            self.libvirt
                .block_resize(&disk.domain, &disk.path, grown.size_bytes - header_bytes)
                .await?;
            tracing::info!(volume = %volume.name, domain = %disk.domain, bytes = grown.size_bytes - header_bytes, "running domain told the new size");
            grown.live_domain = Some(disk.domain);
        }
        self.libvirt.refresh().await;
        Ok(grown)
    }

    async fn unfinished_wipes(&self) -> Result<Vec<(String, WipeMode)>, VolumeError> {
        self.inner.unfinished_wipes().await
    }

    fn can_snapshot(&self, source: &VolumeInfo) -> bool {
        self.inner.can_snapshot(source)
    }

    async fn snapshot(
        &self,
        source: &VolumeInfo,
        new: &NewVolume<'_>,
    ) -> Result<VolumeInfo, VolumeError> {
        self.inner.snapshot(source, new).await
    }

    async fn finish_wipe(&self, name: &str, wipe: &Wipe<'_>) -> Result<(), VolumeError> {
        self.inner.finish_wipe(name, wipe).await?;
        self.libvirt.refresh().await;
        Ok(())
    }

    /// Rollback of a job's own volume: refused while libvirt names a running domain on it.
    /// When libvirt cannot be asked, the backend's open check alone decides: the volume was
    /// made by this job (the backend verifies its record), and leaving a half-written volume
    /// behind because libvirtd is down is the worse outcome.
    async fn remove_created(&self, name: &str, owner: &str) -> Result<(), VolumeError> {
        match self.usage(&self.inner.volume_path(name)).await {
            Usage::UsedBy(domains) => {
                return Err(VolumeError::Conflict(format!(
                    "volume {name} is not removed: it is a disk of the running libvirt domain \
                     {} ({})",
                    quoted(&domains),
                    self.libvirt.uri()
                )));
            }
            Usage::Unknown(error) => tracing::warn!(
                volume = %name,
                %error,
                "cannot ask libvirt whether a running domain uses the job's volume; removing \
                 it on the backend's open check alone"
            ),
            Usage::Free => {}
        }
        self.inner.remove_created(name, owner).await?;
        self.libvirt.refresh().await;
        Ok(())
    }

    async fn probe(&self) -> Result<(), VolumeError> {
        self.inner.probe().await
    }
}

#[cfg(test)]
mod tests {
    //! libvirtd cannot run on the build host (it is a system service), so these tests give the
    //! wrapper a stand-in `virsh` script that prints a recorded report or fails the way virsh
    //! does; the real libvirtd is exercised in the VM test (tests/libvirt_vm.rs).
    use super::*;
    use crate::volume::directory::DirectoryBackend;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in virsh in `dir` that appends its arguments to `dir/calls` and then runs
    /// `body` (a shell snippet).
    fn fake_virsh(dir: &Path, body: &str) -> PathBuf {
        let program = dir.join("virsh");
        let calls = dir.join("calls");
        std::fs::write(
            &program,
            format!("#!/bin/sh\necho \"$*\" >> '{}'\n{body}\n", calls.display()),
        )
        .unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        program
    }

    fn calls(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("calls")).unwrap_or_default()
    }

    async fn setup(body: impl Fn(&Path) -> String) -> (tempfile::TempDir, LibvirtVolumes) {
        let dir = tempfile::tempdir().unwrap();
        let volumes = dir.path().join("volumes");
        let inner = Arc::new(DirectoryBackend::new(&volumes).unwrap());
        inner
            .create(&NewVolume {
                name: "vm-1",
                size_bytes: 4096,
                owner: "job",
            })
            .await
            .unwrap();
        let program = fake_virsh(dir.path(), &body(&volumes));
        let libvirt = Arc::new(Libvirt::with_program("qemu:///system", "pool", &program));
        (dir, LibvirtVolumes::new(inner, libvirt))
    }

    #[tokio::test]
    async fn a_running_domain_blocks_reuse_and_deletion() {
        let (dir, volumes) = setup(|v| {
            format!(
                "printf \"Domain: 'web 1'\\n  block.count=1\\n  block.0.path={}/vm-1\\n\"",
                v.display()
            )
        })
        .await;
        let info = volumes.inspect("vm-1").await.unwrap().unwrap();
        let blocker = info.reuse_blocker.unwrap();
        assert_eq!(blocker.kind, BlockerKind::Open);
        assert!(blocker.forbids_removal());
        assert_eq!(
            blocker.reason,
            "it is a disk of the running libvirt domain 'web 1' (qemu:///system; stop it first)"
        );
        assert!(
            calls(dir.path())
                .contains("-c qemu:///system domstats --block --backing --list-active"),
            "{}",
            calls(dir.path())
        );
        let err = volumes.remove_created("vm-1", "job").await.unwrap_err();
        assert!(matches!(err, VolumeError::Conflict(_)), "{err}");
        assert!(volumes.inner.inspect("vm-1").await.unwrap().is_some());
        assert!(volumes.inspect("absent").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn libvirt_not_answering_is_not_free() {
        // What virsh printed in the test VM with libvirtd stopped.
        let recorded = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/libvirt/domstats-down.stderr"
        );
        let (dir, volumes) = setup(|_| format!("cat '{recorded}' >&2; exit 1")).await;
        let blocker = volumes
            .inspect("vm-1")
            .await
            .unwrap()
            .unwrap()
            .reuse_blocker
            .unwrap();
        assert_eq!(blocker.kind, BlockerKind::Unknown);
        assert!(
            blocker
                .reason
                .starts_with("cannot ask libvirt (qemu:///system)")
        );
        assert!(
            blocker
                .reason
                .contains("Failed to connect socket to '/var/run/libvirt/libvirt-sock'"),
            "{}",
            blocker.reason
        );
        // Rollback of the job's own volume still happens; the pool refresh is attempted.
        volumes.remove_created("vm-1", "job").await.unwrap();
        assert!(volumes.inspect("vm-1").await.unwrap().is_none());
        assert!(calls(dir.path()).contains("pool-refresh pool"));
    }

    #[tokio::test]
    async fn free_volumes_are_reusable_and_removal_refreshes_the_pool() {
        let (dir, volumes) = setup(|_| {
            "case \"$*\" in *domstats*) printf \"Domain: 'other'\\n  block.0.path=/elsewhere\\n\";; esac"
                .to_string()
        })
        .await;
        let info = volumes.inspect("vm-1").await.unwrap().unwrap();
        assert_eq!(info.reuse_blocker, None);
        volumes.flush(&info).await.unwrap();
        assert!(calls(dir.path()).ends_with("-c qemu:///system pool-refresh pool\n"));
        volumes.remove("vm-1").await.unwrap();
        let refreshes = calls(dir.path()).matches("pool-refresh pool").count();
        assert_eq!(refreshes, 2, "{}", calls(dir.path()));
    }

    #[test]
    fn the_stricter_blocker_wins() {
        let b = |kind| Some(Blocker::new(kind, format!("{kind:?}")));
        use BlockerKind::*;
        assert_eq!(stricter(None, None), None);
        assert_eq!(stricter(b(Unwritable), None), b(Unwritable));
        assert_eq!(stricter(b(Unwritable), b(Unknown)), b(Unknown));
        assert_eq!(stricter(b(Open), b(Unknown)), b(Open), "the device knows");
        assert_eq!(stricter(b(Unknown), b(Open)), b(Open));
        assert_eq!(stricter(b(NotAVolume), b(Open)), b(NotAVolume));
        let device = Some(Blocker::new(Open, "open by process [7]"));
        let libvirt = Some(Blocker::new(Open, "a disk of domain 'x'"));
        assert_eq!(
            stricter(device, libvirt.clone()),
            libvirt,
            "names the domain"
        );
    }
}
