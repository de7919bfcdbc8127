//! Selecting what the spec asks for: the backend (with the libvirt wrapper when libvirt is
//! on), its clone store (golden LVs on an LVM thin pool, golden files with reflinks on a
//! directory whose file system shares extents), the readiness probes of what they depend on,
//! and their start-up before any job runs. The one place that names concrete backends.

use std::collections::HashSet;
use std::sync::Arc;

use super::backend::VolumeBackend;
use super::clones::CloneStore;
use super::directory::DirectoryBackend;
use super::encrypt::Encryption;
use super::error::VolumeError;
use super::libvirt::{Libvirt, LibvirtVolumes};
use super::lvm::{GoldenImages, LvmBackend, ThinPool};
use super::reflink::ReflinkStore;
use super::spec::{BackendSpec, DirectorySpec, LvmSpec, VolumeSpec};
use crate::telemetry::health::Probe;

/// The volumes the daemon works with.
pub(crate) struct Volumes {
    /// The backend (wrapped for libvirt when it is on).
    pub(crate) backend: Arc<dyn VolumeBackend>,
    /// Golden copies new volumes are cloned from; `None`: every volume is a copy.
    pub(crate) clones: Option<Arc<dyn CloneStore>>,
    /// Readiness probes of the backend's dependencies (`lvm`, `thin_pool`, `libvirt`).
    pub(crate) probes: Vec<Probe>,
    /// Keys of encrypted volumes (in libvirt when it is on, else in the key directory).
    pub(crate) encryption: Arc<Encryption>,
    /// The LVM backend, for its thin pool's start-up report.
    lvm: Option<Arc<LvmBackend>>,
}

/// Builds what `spec` asks for. Runs no command (a reflink check writes two small files).
pub(crate) fn select(spec: &VolumeSpec) -> Result<Volumes, VolumeError> {
    let libvirt = spec
        .libvirt
        .as_ref()
        .map(|l| Arc::new(Libvirt::new(&l.uri, &l.pool)));
    let encryption = Arc::new(Encryption::new(&spec.key_dir, libvirt.clone())?);
    let mut volumes = match &spec.backend {
        BackendSpec::Directory(dir) => directory(dir, encryption)?,
        BackendSpec::Lvm(lvm) => lvm_volumes(lvm, encryption)?,
    };
    if let Some(libvirt) = libvirt {
        volumes.backend = Arc::new(LibvirtVolumes::new(volumes.backend, libvirt.clone()));
        volumes.probes.push(Probe::new("libvirt", move || {
            let libvirt = libvirt.clone();
            async move { libvirt.probe().await }
        }));
    }
    Ok(volumes)
}

fn directory(spec: &DirectorySpec, encryption: Arc<Encryption>) -> Result<Volumes, VolumeError> {
    let backend = Arc::new(DirectoryBackend::new(&spec.path)?);
    let clones: Option<Arc<dyn CloneStore>> = if spec.golden_images {
        ReflinkStore::open(&spec.path, spec.golden_max_bytes)?
            .map(|store| Arc::new(store) as Arc<dyn CloneStore>)
    } else {
        None
    };
    Ok(Volumes {
        backend,
        clones,
        probes: Vec::new(),
        encryption,
        lvm: None,
    })
}

fn lvm_volumes(spec: &LvmSpec, encryption: Arc<Encryption>) -> Result<Volumes, VolumeError> {
    let mut lvm =
        LvmBackend::new(&spec.volume_group, spec.command_timeout)?.with_devices(&spec.devices);
    if let Some(pool) = &spec.thin_pool {
        lvm = lvm.with_thin_pool(ThinPool {
            name: pool.name.clone(),
            max_percent: pool.max_percent,
        })?;
    }
    let lvm = Arc::new(lvm);
    let golden = (spec.thin_pool.is_some() && spec.golden_images)
        .then(|| Arc::new(GoldenImages::new(lvm.clone(), spec.golden_max_bytes)));
    let mut probes = Vec::new();
    let backend = lvm.clone();
    probes.push(Probe::new("lvm", move || {
        let backend = backend.clone();
        async move { backend.probe().await.map_err(|e| e.to_string()) }
    }));
    if spec.thin_pool.is_some() {
        let (pool, golden) = (lvm.clone(), golden.clone());
        probes.push(Probe::new("thin_pool", move || {
            let (pool, golden) = (pool.clone(), golden.clone());
            async move {
                if let Some(golden) = golden {
                    golden.refresh_metrics().await;
                }
                pool.check_pool()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }));
    }
    Ok(Volumes {
        backend: lvm.clone(),
        clones: golden.map(|g| g as Arc<dyn CloneStore>),
        probes,
        encryption,
        lvm: Some(lvm),
    })
}

impl Volumes {
    /// Start-up, before any job: the thin pool's use (and a warning when it does not zero new
    /// chunks), and the clone store's recovery against the cache keys still present.
    pub(crate) async fn start(&self, cached_keys: &HashSet<String>) {
        if let Some(lvm) = &self.lvm {
            lvm.report_pool().await;
        }
        if let Some(clones) = &self.clones {
            clones.recover(cached_keys).await;
        }
    }
}
