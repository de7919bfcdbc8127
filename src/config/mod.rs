//! Settings: the one typed configuration struct, its built-in defaults and its validation.
//!
//! Section and key names are a contract shared with the NixOS module, the docs and the tests
//! (`shared/reference/api-contract.md`, "Settings names"): never rename them.

mod load;
pub mod reload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use load::{ConfigError, ConfigSource, Profile, load, redacted_toml};
pub(crate) use load::{redact_url, resolve_credential, without_userinfo};

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
}

/// `[reload]`: when the configuration is re-read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReloadSettings {
    /// Reload when the config, tokens or TLS files change (SIGHUP always reloads).
    pub(crate) watch_files: bool,
    /// File events closer together than this count as one change.
    #[serde(with = "humantime_serde")]
    pub(crate) debounce: Duration,
}

/// `[server]`: the API listener and its request limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerSettings {
    /// Address and port of the API listener, `host:port`.
    pub(crate) listen: String,
    /// Largest accepted request body in bytes (JSON requests are small).
    pub(crate) max_body_bytes: u64,
    /// Time a client has to send the request headers (slowloris guard).
    #[serde(with = "humantime_serde")]
    pub(crate) header_timeout: Duration,
    /// Time a client has to send a request body (JSON bodies; 408 beyond).
    #[serde(with = "humantime_serde")]
    pub(crate) body_timeout: Duration,
    /// Time a client has to complete the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub(crate) handshake_timeout: Duration,
    /// Open connections beyond this number wait in the kernel backlog.
    pub(crate) max_connections: usize,
    /// Connections one client address (IPv6: one /64) may hold open at once; further ones
    /// from it are closed at once, so one host cannot take every slot before authentication.
    pub(crate) max_connections_per_peer: usize,
    /// An HTTP/2 connection with no request in progress for this long is closed (GOAWAY),
    /// even while it answers pings.
    #[serde(with = "humantime_serde")]
    pub(crate) h2_idle_timeout: Duration,
    /// Time from accepting a connection until its first request's headers have arrived
    /// (TLS handshake included); a connection that sends none is closed.
    #[serde(with = "humantime_serde")]
    pub(crate) first_request_timeout: Duration,
    /// Progress streams (`GET /api/v1/jobs/{id}/events`) open at once; 429 beyond.
    pub(crate) max_event_streams: usize,
    /// Progress streams one client address (IPv6: one /64) may hold open at once; 429 beyond.
    pub(crate) max_event_streams_per_peer: usize,
}

/// `[storage]`: where durable state lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StorageSettings {
    /// Directory of the sled database (jobs, cache index, stage history).
    pub(crate) data_dir: PathBuf,
}

/// `[jobs]`: how many jobs run, wait, and for how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobsSettings {
    /// Jobs running at once (1..=64).
    pub(crate) max_concurrent: usize,
    /// Pending jobs waiting for a slot; beyond this a request gets 429.
    pub(crate) queue_capacity: usize,
    /// Per-job time limit, counted from the moment the job starts running.
    #[serde(with = "humantime_serde")]
    pub(crate) timeout: Duration,
    /// Finished jobs older than this are pruned from the store.
    #[serde(with = "humantime_serde")]
    pub(crate) retention: Duration,
    /// On shutdown, running jobs get this long to finish before they are stopped and rolled back.
    #[serde(with = "humantime_serde")]
    pub(crate) shutdown_grace: Duration,
}

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

/// `[cache]`: the local image cache and its bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CacheSettings {
    /// Directory holding downloaded images exactly as downloaded.
    pub(crate) dir: PathBuf,
    /// Upper bound of the cache size; least recently used entries are evicted beyond it.
    pub(crate) max_size_bytes: u64,
    /// Entries unused for longer than this are evicted.
    #[serde(with = "humantime_serde")]
    pub(crate) max_age: Duration,
    /// Free space that must remain on the cache file system after a download.
    pub(crate) min_free_bytes: u64,
    /// A cache hit asks the source whether the object changed at most this often (`0`: every
    /// time); within it, a hit makes no request at all.
    #[serde(with = "humantime_serde")]
    pub(crate) revalidate_interval: Duration,
}

/// `[sources]`: which image URLs are accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SourcesSettings {
    /// Hosts (besides the S3 endpoint's) that image URLs may name.
    pub(crate) allowed_hosts: Vec<String>,
    /// `file://` URLs are accepted only below these directories; empty disables `file://`.
    pub(crate) file_roots: Vec<PathBuf>,
    /// Size of one ranged GET of a parallel download (bytes).
    pub(crate) part_size: u64,
    /// Ranged GETs of one download in flight at once; objects smaller than two parts, and
    /// servers without range support, use one stream.
    pub(crate) parallel_parts: usize,
    /// A part that delivers no byte for this long is cut and asked for again.
    #[serde(with = "humantime_serde")]
    pub(crate) stall_timeout: Duration,
    /// Bandwidth of all downloads together, bytes per second (`0`: unlimited).
    pub(crate) max_bytes_per_second: u64,
}

/// `[s3]`: the S3/MinIO source and its client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct S3Settings {
    /// S3 / MinIO endpoint URL, e.g. `https://minio.example.com:9000`. Empty: no S3 source.
    pub(crate) endpoint: String,
    pub(crate) region: String,
    pub(crate) access_key: String,
    pub(crate) secret_key: String,
    /// File holding the secret key (relative names are looked up in `$CREDENTIALS_DIRECTORY`).
    pub(crate) secret_key_file: String,
    /// Bucket used when an image URL names only a key.
    pub(crate) bucket: String,
    /// PEM file with CA certificates trusted for the endpoint, besides the system roots.
    pub(crate) ca_file: String,
    /// Allow an `http://` endpoint.
    pub(crate) allow_http: bool,
    /// Retries of a request that failed transiently (network, 5xx); the only retry layer.
    pub(crate) retries: usize,
    /// Bound of the first retry delay; doubled per retry; the delay is drawn below it.
    #[serde(with = "humantime_serde")]
    pub(crate) retry_backoff: Duration,
    /// Upper bound of one retry delay.
    #[serde(with = "humantime_serde")]
    pub(crate) retry_max_backoff: Duration,
    /// Connect timeout of one request.
    #[serde(with = "humantime_serde")]
    pub(crate) connect_timeout: Duration,
}

/// Whether a client certificate is required (`tls.client_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ClientAuthMode {
    /// The handshake fails without a client certificate signed by `client_ca_file`.
    Required,
    /// A client certificate is verified when presented; otherwise an API token is needed.
    Optional,
}

/// `[tls]`: TLS on the API listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSettings {
    /// Server certificate chain (PEM). With `key_file`, the API is served over TLS.
    pub(crate) cert_file: String,
    /// Server private key (PEM).
    pub(crate) key_file: String,
    /// CA certificates (PEM) that client certificates are verified against.
    pub(crate) client_ca_file: String,
    pub(crate) client_auth: ClientAuthMode,
    /// Permit plain HTTP on a non-loopback address.
    pub(crate) allow_insecure_http: bool,
}

/// `[auth]`: who may call the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthSettings {
    /// File of API tokens, one per line (`token` or `name:token`).
    pub(crate) tokens_file: String,
    /// Certificate subject CNs or DNS/URI SANs allowed to call the API; empty = any cert the CA signed.
    pub(crate) allowed_clients: Vec<String>,
    /// Require a client certificate or token for `/metrics`.
    pub(crate) protect_metrics: bool,
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

/// Log line format (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    Json,
    Text,
}

/// `[log]`: level and format of the log (stderr, which journald collects).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogSettings {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a full `RUST_LOG` filter.
    pub(crate) level: String,
    pub(crate) format: LogFormat,
}

/// `[telemetry]`: trace export and dependency probes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TelemetrySettings {
    /// OTLP/gRPC collector, e.g. `https://otel-collector:4317`. Empty: no trace export.
    pub(crate) otlp_endpoint: String,
    pub(crate) service_name: String,
    /// Fraction of new traces sampled (0.0..=1.0).
    pub(crate) sampling_ratio: f64,
    /// CA certificates (PEM) trusted for the collector.
    pub(crate) otlp_ca_file: String,
    /// How often dependencies (S3, LVM, libvirt, storage) are probed.
    #[serde(with = "humantime_serde")]
    pub(crate) probe_interval: Duration,
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

impl Default for Settings {
    fn default() -> Self {
        Settings::for_profile(Profile::Host)
    }
}

impl Settings {
    /// Built-in defaults of a profile: `Host` is a production hypervisor, `Embedded` runs
    /// from the current directory without root (directory volumes, state under `./var`).
    pub(crate) fn for_profile(profile: Profile) -> Self {
        let (data_dir, volumes_dir, cache_dir, backend, file_roots) = match profile {
            Profile::Host => (
                PathBuf::from("/var/lib/libvirt-volume-provisioner"),
                PathBuf::from("/var/lib/libvirt-volume-provisioner/volumes"),
                PathBuf::from("/var/cache/libvirt-volume-provisioner"),
                VolumeBackendKind::Lvm,
                vec![],
            ),
            Profile::Embedded => (
                PathBuf::from("./var/state"),
                PathBuf::from("./var/volumes"),
                PathBuf::from("./var/cache"),
                VolumeBackendKind::Directory,
                vec![PathBuf::from("./var/images")],
            ),
        };
        Settings {
            server: ServerSettings {
                listen: "127.0.0.1:8080".into(),
                max_body_bytes: 1 << 20,
                header_timeout: Duration::from_secs(10),
                body_timeout: Duration::from_secs(30),
                handshake_timeout: Duration::from_secs(10),
                max_connections: 512,
                max_connections_per_peer: 64,
                h2_idle_timeout: Duration::from_secs(30),
                first_request_timeout: Duration::from_secs(15),
                max_event_streams: 64,
                max_event_streams_per_peer: 16,
            },
            storage: StorageSettings { data_dir },
            jobs: JobsSettings {
                max_concurrent: 2,
                queue_capacity: 64,
                timeout: Duration::from_secs(180 * 60),
                retention: Duration::from_secs(7 * 86400),
                shutdown_grace: Duration::from_secs(30),
            },
            volumes: VolumesSettings {
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
                    path: volumes_dir,
                    golden_images: true,
                    golden_max_bytes: 100 * GIB,
                },
                upload_max_bytes: 64 << 20,
                upload_name_pattern: "*-cidata".into(),
                upload_max_concurrent: 4,
            },
            cache: CacheSettings {
                dir: cache_dir,
                max_size_bytes: 20 * GIB,
                max_age: Duration::from_secs(7 * 86400),
                min_free_bytes: GIB,
                revalidate_interval: Duration::from_secs(300),
            },
            sources: SourcesSettings {
                allowed_hosts: vec![],
                file_roots,
                part_size: 16 << 20,
                parallel_parts: 8,
                stall_timeout: Duration::from_secs(30),
                max_bytes_per_second: 0,
            },
            s3: S3Settings {
                endpoint: String::new(),
                region: "us-east-1".into(),
                access_key: String::new(),
                secret_key: String::new(),
                secret_key_file: String::new(),
                bucket: String::new(),
                ca_file: String::new(),
                allow_http: false,
                retries: 5,
                retry_backoff: Duration::from_millis(500),
                retry_max_backoff: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(10),
            },
            tls: TlsSettings {
                cert_file: String::new(),
                key_file: String::new(),
                client_ca_file: String::new(),
                client_auth: ClientAuthMode::Required,
                allow_insecure_http: false,
            },
            auth: AuthSettings {
                tokens_file: String::new(),
                allowed_clients: vec![],
                protect_metrics: false,
            },
            libvirt: LibvirtSettings {
                uri: "qemu:///system".into(),
                pool: String::new(),
            },
            log: LogSettings {
                level: "info".into(),
                format: LogFormat::Json,
            },
            telemetry: TelemetrySettings {
                otlp_endpoint: String::new(),
                service_name: "libvirt-volume-provisioner".into(),
                sampling_ratio: 1.0,
                otlp_ca_file: String::new(),
                probe_interval: Duration::from_secs(30),
            },
            reload: ReloadSettings {
                watch_files: true,
                debounce: Duration::from_millis(500),
            },
        }
    }

    /// The security posture of the listener: plain HTTP and unauthenticated access are only
    /// accepted on loopback addresses (see docs/security.md).
    fn validate_access(&self) -> Result<(), String> {
        let listen = self.listen_addr();
        let loopback = listen.ip().is_loopback();
        let tls = !self.tls.cert_file.is_empty();
        if !tls && !loopback && !self.tls.allow_insecure_http {
            return Err(format!(
                "tls.cert_file: the API would be plain HTTP on {listen}, which is not a loopback \
                 address; set tls.cert_file and tls.key_file, or tls.allow_insecure_http = true \
                 to accept that (API tokens then cross the network in clear text)"
            ));
        }
        if self.tls.client_ca_file.is_empty() && self.auth.tokens_file.is_empty() && !loopback {
            return Err(format!(
                "auth: no client authentication is configured for {listen}, which is not a \
                 loopback address; set tls.client_ca_file (client certificates) and/or \
                 auth.tokens_file (API tokens)"
            ));
        }
        if !self.auth.allowed_clients.is_empty() && self.tls.client_ca_file.is_empty() {
            return Err(
                "auth.allowed_clients: lists certificate names, but tls.client_ca_file is not \
                 set, so no client certificate is ever verified"
                    .into(),
            );
        }
        if let Some(bad) = self
            .auth
            .allowed_clients
            .iter()
            .find(|c| c.is_empty() || c.contains(char::is_whitespace))
        {
            return Err(format!(
                "auth.allowed_clients: `{bad}` is not a certificate name (CN, DNS or URI SAN)"
            ));
        }
        Ok(())
    }

    /// `volumes.lvm.thin_pool` and the settings that go with it.
    fn validate_thin_pool(&self) -> Result<(), String> {
        let lvm = &self.volumes.lvm;
        if !lvm.thin_pool.is_empty()
            && let Err(e) = crate::volume::validate_lvm_name(&lvm.thin_pool)
        {
            return Err(format!("volumes.lvm.thin_pool: {e}"));
        }
        if lvm.golden_max_bytes == 0 {
            return Err(
                "volumes.lvm.golden_max_bytes: must be greater than 0 (turn golden \
                 images off with volumes.lvm.golden_images = false)"
                    .into(),
            );
        }
        if !(1..=100).contains(&lvm.thin_pool_max_percent) {
            return Err(format!(
                "volumes.lvm.thin_pool_max_percent: must be between 1 and 100, got {}",
                lvm.thin_pool_max_percent
            ));
        }
        Ok(())
    }

    /// `libvirt.*`: both go to `virsh` as arguments, so neither may look like an option.
    fn validate_libvirt(&self) -> Result<(), String> {
        let libvirt = &self.libvirt;
        if libvirt.pool.is_empty() {
            return Ok(());
        }
        if libvirt.pool.starts_with('-')
            || libvirt.pool.contains('/')
            || libvirt.pool.contains(char::is_control)
        {
            return Err(format!(
                "libvirt.pool: `{}` is not a libvirt pool name (no leading `-`, no `/`, no \
                 control characters)",
                libvirt.pool.escape_debug()
            ));
        }
        if libvirt.uri.is_empty() || libvirt.uri.starts_with('-') {
            return Err(format!(
                "libvirt.uri: `{}` is not a libvirt connection URI (e.g. qemu:///system)",
                libvirt.uri
            ));
        }
        Ok(())
    }

    /// What `volume::select` builds from `[volumes]` and `[libvirt]`.
    pub(crate) fn volume_spec(&self) -> crate::volume::spec::VolumeSpec {
        use crate::volume::spec::{
            BackendSpec, DirectorySpec, LibvirtSpec, LvmSpec, ThinPoolSpec, VolumeSpec,
        };
        let v = &self.volumes;
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
            libvirt: (!self.libvirt.pool.is_empty()).then(|| LibvirtSpec {
                uri: self.libvirt.uri.clone(),
                pool: self.libvirt.pool.clone(),
            }),
        }
    }

    /// The listener address (validated at load, so this cannot fail afterwards).
    pub(crate) fn listen_addr(&self) -> SocketAddr {
        self.server
            .listen
            .parse()
            .expect("server.listen is validated at load")
    }

    /// Checks every setting; the first problem is returned with the key it concerns.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let err = |key: &str, msg: String| Err(format!("{key}: {msg}"));
        if self.server.listen.parse::<SocketAddr>().is_err() {
            return err(
                "server.listen",
                format!(
                    "`{}` is not an address:port (e.g. 127.0.0.1:8080)",
                    self.server.listen
                ),
            );
        }
        if self.server.max_body_bytes < 1024 {
            return err("server.max_body_bytes", "must be at least 1024".into());
        }
        for (key, value) in [
            ("server.header_timeout", self.server.header_timeout),
            ("server.body_timeout", self.server.body_timeout),
            ("server.handshake_timeout", self.server.handshake_timeout),
            ("server.h2_idle_timeout", self.server.h2_idle_timeout),
            (
                "server.first_request_timeout",
                self.server.first_request_timeout,
            ),
        ] {
            if value.is_zero() {
                return err(key, "must be greater than 0".into());
            }
        }
        if self.server.max_connections == 0 {
            return err("server.max_connections", "must be at least 1".into());
        }
        if self.server.max_connections_per_peer == 0 {
            return err(
                "server.max_connections_per_peer",
                "must be at least 1".into(),
            );
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            return err("storage.data_dir", "must not be empty".into());
        }
        if !(1..=64).contains(&self.jobs.max_concurrent) {
            return err(
                "jobs.max_concurrent",
                format!("must be between 1 and 64, got {}", self.jobs.max_concurrent),
            );
        }
        if self.jobs.queue_capacity > 100_000 {
            return err("jobs.queue_capacity", "must be at most 100000".into());
        }
        if self.jobs.timeout < Duration::from_secs(1) {
            return err("jobs.timeout", "must be at least 1s".into());
        }
        if self.jobs.retention < Duration::from_secs(60) {
            return err("jobs.retention", "must be at least 1m".into());
        }
        match self.volumes.backend {
            VolumeBackendKind::Lvm => {
                if let Err(e) = crate::volume::validate_lvm_name(&self.volumes.lvm.volume_group) {
                    return err("volumes.lvm.volume_group", e);
                }
            }
            VolumeBackendKind::Directory => {
                if self.volumes.directory.path.as_os_str().is_empty() {
                    return err("volumes.directory.path", "must not be empty".into());
                }
                if self.volumes.directory.golden_max_bytes == 0 {
                    return err(
                        "volumes.directory.golden_max_bytes",
                        "must be greater than 0 (turn golden files off with \
                         volumes.directory.golden_images = false)"
                            .into(),
                    );
                }
            }
        }
        if !(1..=10_000).contains(&self.server.max_event_streams) {
            return err(
                "server.max_event_streams",
                "must be between 1 and 10000".into(),
            );
        }
        if !(1..=10_000).contains(&self.server.max_event_streams_per_peer) {
            return err(
                "server.max_event_streams_per_peer",
                "must be between 1 and 10000".into(),
            );
        }
        if !(1..=1 << 40).contains(&self.volumes.upload_max_bytes) {
            return err(
                "volumes.upload_max_bytes",
                "must be between 1 and 1 TiB".into(),
            );
        }
        if !(1..=1024).contains(&self.volumes.upload_max_concurrent) {
            return err(
                "volumes.upload_max_concurrent",
                "must be between 1 and 1024".into(),
            );
        }
        if let Err(e) = glob::Pattern::new(&self.volumes.upload_name_pattern) {
            return err(
                "volumes.upload_name_pattern",
                format!(
                    "`{}` is not a glob pattern: {e}",
                    self.volumes.upload_name_pattern
                ),
            );
        }
        if self.volumes.lvm.command_timeout.is_zero() {
            return err(
                "volumes.lvm.command_timeout",
                "must be greater than 0".into(),
            );
        }
        if let Some(bad) =
            self.volumes.lvm.devices.iter().find(|d| {
                !d.starts_with("/dev/") || d.contains(',') || d.contains(char::is_whitespace)
            })
        {
            return err(
                "volumes.lvm.devices",
                format!("`{bad}` is not a device path (/dev/..., without commas or spaces)"),
            );
        }
        self.validate_thin_pool()?;
        if self.cache.dir.as_os_str().is_empty() {
            return err("cache.dir", "must not be empty".into());
        }
        if self.cache.max_size_bytes == 0 {
            return err("cache.max_size_bytes", "must be greater than 0".into());
        }
        if self.cache.max_age.is_zero() {
            return err("cache.max_age", "must be greater than 0".into());
        }
        if !(MIB..=GIB).contains(&self.sources.part_size) {
            return err(
                "sources.part_size",
                format!(
                    "must be between 1 MiB and 1 GiB, got {}",
                    self.sources.part_size
                ),
            );
        }
        if !(1..=64).contains(&self.sources.parallel_parts) {
            return err(
                "sources.parallel_parts",
                format!(
                    "must be between 1 and 64, got {}",
                    self.sources.parallel_parts
                ),
            );
        }
        if self.sources.stall_timeout < Duration::from_secs(1) {
            return err("sources.stall_timeout", "must be at least 1s".into());
        }
        if self.sources.max_bytes_per_second != 0 && self.sources.max_bytes_per_second < 64 * 1024 {
            return err(
                "sources.max_bytes_per_second",
                "must be 0 (unlimited) or at least 65536".into(),
            );
        }
        for host in &self.sources.allowed_hosts {
            if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
                return err(
                    "sources.allowed_hosts",
                    format!("`{host}` is not a host name (write `host` or `host:port`)"),
                );
            }
        }
        if !self.s3.endpoint.is_empty() {
            match url::Url::parse(&self.s3.endpoint) {
                Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {
                    if u.scheme() == "http" && !self.s3.allow_http {
                        return err(
                            "s3.endpoint",
                            "is http:// but s3.allow_http is false".into(),
                        );
                    }
                }
                _ => {
                    return err(
                        "s3.endpoint",
                        format!("`{}` is not an http(s) URL", self.s3.endpoint),
                    );
                }
            }
        }
        if self.s3.region.is_empty() {
            return err("s3.region", "must not be empty".into());
        }
        if !self.s3.secret_key.is_empty() && !self.s3.secret_key_file.is_empty() {
            return err(
                "s3.secret_key_file",
                "set either s3.secret_key or s3.secret_key_file, not both".into(),
            );
        }
        if self.s3.retry_backoff.is_zero() || self.s3.retry_max_backoff < self.s3.retry_backoff {
            return err(
                "s3.retry_backoff",
                "must be > 0 and not above s3.retry_max_backoff".into(),
            );
        }
        if self.s3.retries > 20 {
            return err("s3.retries", "must be at most 20".into());
        }
        if self.tls.cert_file.is_empty() != self.tls.key_file.is_empty() {
            return err("tls.cert_file/tls.key_file", "set both or neither".into());
        }
        if !self.tls.client_ca_file.is_empty() && self.tls.cert_file.is_empty() {
            return err(
                "tls.client_ca_file",
                "needs tls.cert_file and tls.key_file (client certificates need TLS)".into(),
            );
        }
        self.validate_access()?;
        self.validate_libvirt()?;
        if self.log.level.trim().is_empty()
            || tracing_subscriber::EnvFilter::builder()
                .parse(&self.log.level)
                .is_err()
        {
            return err(
                "log.level",
                format!(
                    "`{}` is not a level (error, warn, info, debug, trace) or filter",
                    self.log.level
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.telemetry.sampling_ratio) {
            return err(
                "telemetry.sampling_ratio",
                "must be between 0.0 and 1.0".into(),
            );
        }
        if !self.telemetry.otlp_endpoint.is_empty()
            && url::Url::parse(&self.telemetry.otlp_endpoint).is_err()
        {
            return err(
                "telemetry.otlp_endpoint",
                format!("`{}` is not a URL", self.telemetry.otlp_endpoint),
            );
        }
        if self.telemetry.service_name.is_empty() {
            return err("telemetry.service_name", "must not be empty".into());
        }
        if self.reload.debounce < Duration::from_millis(50)
            || self.reload.debounce > Duration::from_secs(30)
        {
            return err("reload.debounce", "must be between 50ms and 30s".into());
        }
        if self.telemetry.probe_interval < Duration::from_secs(1) {
            return err("telemetry.probe_interval", "must be at least 1s".into());
        }
        Ok(())
    }
}
