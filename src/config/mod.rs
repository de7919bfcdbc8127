//! Settings: the one typed configuration struct, made of one type per section. Each section
//! file owns its keys' types, defaults and rules (`SettingError` names the key); this file
//! composes them, with the rules that span sections, and converts them into the small types
//! lower layers take (`volume::spec`).
//!
//! Section and key names are a contract shared with the NixOS module, the docs and the tests
//! (`shared/reference/api-contract.md`, "Settings names"): never rename them.

mod access;
mod declared;
mod error;
mod images;
mod jobs;
mod load;
mod observe;
pub mod reload;
mod server;
mod volumes;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub(crate) use access::{AuthSettings, ClientAuthMode, TlsSettings};
pub(crate) use declared::{DeclaredImageSettings, valid_name as valid_declared_name};
pub use error::SettingError;
pub(crate) use images::{CacheSettings, S3Settings, SourcesSettings};
pub(crate) use jobs::{JobsSettings, StorageSettings};
pub use load::{ConfigError, ConfigSource, Profile, load, redacted_toml};
pub(crate) use load::{redact_url, resolve_credential, without_userinfo};
pub(crate) use observe::{LogFormat, LogSettings, TelemetrySettings};
pub(crate) use server::{ReloadSettings, ServerSettings};
pub(crate) use volumes::{LibvirtSettings, VolumeBackendKind, VolumesSettings};

/// The current settings, replaced as a whole when the configuration is reloaded.
#[derive(Clone)]
pub(crate) struct LiveSettings(tokio::sync::watch::Receiver<std::sync::Arc<Settings>>);

impl LiveSettings {
    pub(crate) fn new(
        settings: Settings,
    ) -> (
        tokio::sync::watch::Sender<std::sync::Arc<Settings>>,
        LiveSettings,
    ) {
        let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(settings));
        (tx, LiveSettings(rx))
    }

    pub(crate) fn current(&self) -> std::sync::Arc<Settings> {
        self.0.borrow().clone()
    }
}

/// Effective daemon configuration (defaults < TOML file < environment).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// HTTP(S) listener.
    pub(crate) server: ServerSettings,
    /// Durable state (the sled job store).
    pub(crate) storage: StorageSettings,
    /// Job engine limits.
    pub(crate) jobs: JobsSettings,
    /// Where volumes are created.
    pub(crate) volumes: VolumesSettings,
    /// Local image cache.
    pub(crate) cache: CacheSettings,
    /// Which image URLs are accepted.
    pub(crate) sources: SourcesSettings,
    /// S3 / MinIO image source.
    pub(crate) s3: S3Settings,
    /// TLS on the API listener.
    pub(crate) tls: TlsSettings,
    /// Client authorisation (certificate identities, API tokens).
    pub(crate) auth: AuthSettings,
    /// libvirt integration (pool refresh, running domains' disks), on when a pool is named.
    pub(crate) libvirt: LibvirtSettings,
    /// Logging.
    pub(crate) log: LogSettings,
    /// OpenTelemetry and dependency probes.
    pub(crate) telemetry: TelemetrySettings,
    /// Hot reload of this configuration.
    pub(crate) reload: ReloadSettings,
    /// `[[images]]`: images kept cached and fresh by name (last: an array of tables).
    #[serde(default)]
    pub(crate) images: Vec<DeclaredImageSettings>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings::for_profile(Profile::Host)
    }
}

impl Settings {
    /// Built-in defaults of a profile: `Host` is a production hypervisor, `Embedded` runs
    /// from the current directory without root (directory volumes, state under `./var`).
    pub(crate) fn for_profile(profile: Profile) -> Self {
        let (root, cache_dir, backend, file_roots) = match profile {
            Profile::Host => (
                PathBuf::from("/var/lib/libvirt-volume-provisioner"),
                PathBuf::from("/var/cache/libvirt-volume-provisioner"),
                VolumeBackendKind::Lvm,
                vec![],
            ),
            Profile::Embedded => (
                PathBuf::from("./var"),
                PathBuf::from("./var/cache"),
                VolumeBackendKind::Directory,
                vec![PathBuf::from("./var/images")],
            ),
        };
        let data_dir = match profile {
            Profile::Host => root.clone(),
            Profile::Embedded => root.join("state"),
        };
        Settings {
            server: ServerSettings::default(),
            storage: StorageSettings { data_dir },
            jobs: JobsSettings::default(),
            volumes: VolumesSettings::defaults(backend, root.join("volumes")),
            cache: CacheSettings::defaults(cache_dir),
            sources: SourcesSettings::defaults(file_roots),
            s3: S3Settings::default(),
            tls: TlsSettings::default(),
            auth: AuthSettings::default(),
            libvirt: LibvirtSettings::default(),
            log: LogSettings::default(),
            telemetry: TelemetrySettings::default(),
            reload: ReloadSettings::default(),
            images: Vec::new(),
        }
    }

    /// Checks every setting, section by section, then the rules that span sections; the
    /// first problem is returned with the key it concerns.
    pub(crate) fn validate(&self) -> Result<(), SettingError> {
        self.server.validate()?;
        self.storage.validate()?;
        self.jobs.validate()?;
        self.volumes.validate()?;
        self.cache.validate()?;
        self.sources.validate()?;
        self.s3.validate()?;
        self.tls.validate()?;
        self.validate_access()?;
        self.libvirt.validate()?;
        self.log.validate()?;
        self.telemetry.validate()?;
        self.reload.validate()?;
        declared::validate(&self.images, &self.source_policy())
    }

    /// The declared image called `name`.
    pub(crate) fn declared_image(&self, name: &str) -> Option<&DeclaredImageSettings> {
        self.images.iter().find(|i| i.name == name)
    }

    /// What `volume::select` builds from `[volumes]` and `[libvirt]`.
    pub(crate) fn volume_spec(&self) -> crate::volume::spec::VolumeSpec {
        self.volumes
            .volume_spec(&self.libvirt, &self.storage.data_dir)
    }

    /// The listener address (validated at load, so this cannot fail afterwards).
    pub(crate) fn listen_addr(&self) -> SocketAddr {
        self.server
            .listen
            .parse()
            .expect("server.listen is validated at load")
    }
}
