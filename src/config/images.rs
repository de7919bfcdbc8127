//! `[cache]` (the local image cache and its bounds), `[sources]` (which image URLs are
//! accepted, how downloads run) and `[s3]` (the S3/MinIO source): defaults and rules.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{SettingError, check};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// `[cache]`: the local image cache and its bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CacheSettings {
    /// Directory holding downloaded images exactly as downloaded.
    pub(crate) dir: PathBuf,
    /// Upper bound of the cache size; least recently used entries are evicted beyond it.
    pub(crate) max_size_bytes: u64,
    /// Largest image the cache takes: a source larger than this is refused before the
    /// download, a compressed source whose content grows past it (a decompression bomb) fails
    /// and leaves nothing. Never more than `max_size_bytes` in effect.
    pub(crate) max_image_bytes: u64,
    /// Entries unused for longer than this are evicted.
    #[serde(with = "humantime_serde")]
    pub(crate) max_age: Duration,
    /// Free space that must remain on the cache file system after a download.
    pub(crate) min_free_bytes: u64,
    /// A cache hit asks the source whether the object changed at most this often (`0`: every
    /// time); within it, a hit makes no request at all.
    #[serde(with = "humantime_serde")]
    pub(crate) revalidate_interval: Duration,
    /// Declared images (`[[images]]`) missing from the cache are fetched at start and after a
    /// reload at a random moment within this window, so a fleet does not ask its object
    /// store all at once (`0s`: at once).
    #[serde(with = "humantime_serde")]
    pub(crate) declared_fetch_window: Duration,
    /// Declared images fetched or refreshed at once.
    pub(crate) declared_fetch_concurrency: usize,
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
    /// `[[sources.trust]]`: keyrings that sign the checksum manifests of hosts.
    #[serde(default)]
    pub(crate) trust: Vec<TrustSettings>,
}

/// One `[[sources.trust]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrustSettings {
    /// Image hosts this keyring vouches for (`host` or `host:port`, as `allowed_hosts`).
    pub(crate) hosts: Vec<String>,
    /// OpenPGP public keys (`gpg --export`, armored or binary) whose signatures count.
    pub(crate) keyring: PathBuf,
    /// Refuse images from these hosts without a valid signature (`signature_required`).
    #[serde(default)]
    pub(crate) require_signature: bool,
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

impl CacheSettings {
    /// The defaults with the cache in `dir`.
    pub(crate) fn defaults(dir: PathBuf) -> CacheSettings {
        CacheSettings {
            dir,
            max_size_bytes: 20 * GIB,
            max_image_bytes: 64 * GIB,
            max_age: Duration::from_secs(7 * 86400),
            min_free_bytes: GIB,
            revalidate_interval: Duration::from_secs(300),
            declared_fetch_window: Duration::from_secs(30),
            declared_fetch_concurrency: 2,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), SettingError> {
        check(!self.dir.as_os_str().is_empty(), "cache.dir", || {
            "must not be empty".into()
        })?;
        check(self.max_size_bytes > 0, "cache.max_size_bytes", || {
            "must be greater than 0".into()
        })?;
        check(self.max_image_bytes > 0, "cache.max_image_bytes", || {
            "must be greater than 0".into()
        })?;
        check(!self.max_age.is_zero(), "cache.max_age", || {
            "must be greater than 0".into()
        })?;
        check(
            (1..=64).contains(&self.declared_fetch_concurrency),
            "cache.declared_fetch_concurrency",
            || "must be 1..=64".into(),
        )?;
        check(
            self.declared_fetch_window <= Duration::from_secs(86400),
            "cache.declared_fetch_window",
            || "must be at most 24h".into(),
        )
    }
}

impl SourcesSettings {
    /// The defaults with `file://` images below `file_roots`.
    pub(crate) fn defaults(file_roots: Vec<PathBuf>) -> SourcesSettings {
        SourcesSettings {
            allowed_hosts: vec![],
            file_roots,
            part_size: 16 << 20,
            parallel_parts: 8,
            stall_timeout: Duration::from_secs(30),
            max_bytes_per_second: 0,
            trust: vec![],
        }
    }

    pub(crate) fn validate(&self) -> Result<(), SettingError> {
        check(
            (MIB..=GIB).contains(&self.part_size),
            "sources.part_size",
            || format!("must be between 1 MiB and 1 GiB, got {}", self.part_size),
        )?;
        check(
            (1..=64).contains(&self.parallel_parts),
            "sources.parallel_parts",
            || format!("must be between 1 and 64, got {}", self.parallel_parts),
        )?;
        check(
            self.stall_timeout >= Duration::from_secs(1),
            "sources.stall_timeout",
            || "must be at least 1s".into(),
        )?;
        check(
            self.max_bytes_per_second == 0 || self.max_bytes_per_second >= 64 * 1024,
            "sources.max_bytes_per_second",
            || "must be 0 (unlimited) or at least 65536".into(),
        )?;
        for host in &self.allowed_hosts {
            check_host(host, "sources.allowed_hosts")?;
        }
        for rule in &self.trust {
            check(!rule.hosts.is_empty(), "sources.trust.hosts", || {
                "must name at least one host".into()
            })?;
            for host in &rule.hosts {
                check_host(host, "sources.trust.hosts")?;
            }
            check(
                !rule.keyring.as_os_str().is_empty(),
                "sources.trust.keyring",
                || "must name a keyring file".into(),
            )?;
        }
        Ok(())
    }
}

/// A host as `sources.allowed_hosts` and `sources.trust.hosts` take it.
fn check_host(host: &str, key: &'static str) -> Result<(), SettingError> {
    check(
        !(host.is_empty() || host.contains('/') || host.contains(char::is_whitespace)),
        key,
        || format!("`{host}` is not a host name (write `host` or `host:port`)"),
    )
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
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
        }
    }
}

impl S3Settings {
    pub(crate) fn validate(&self) -> Result<(), SettingError> {
        if !self.endpoint.is_empty() {
            match url::Url::parse(&self.endpoint) {
                Ok(u) if u.scheme() == "https" => {}
                Ok(u) if u.scheme() == "http" => check(self.allow_http, "s3.endpoint", || {
                    "is http:// but s3.allow_http is false".into()
                })?,
                _ => {
                    return Err(SettingError::new(
                        "s3.endpoint",
                        format!("`{}` is not an http(s) URL", self.endpoint),
                    ));
                }
            }
        }
        check(!self.region.is_empty(), "s3.region", || {
            "must not be empty".into()
        })?;
        check(
            self.secret_key.is_empty() || self.secret_key_file.is_empty(),
            "s3.secret_key_file",
            || "set either s3.secret_key or s3.secret_key_file, not both".into(),
        )?;
        check(
            !self.retry_backoff.is_zero() && self.retry_max_backoff >= self.retry_backoff,
            "s3.retry_backoff",
            || "must be > 0 and not above s3.retry_max_backoff".into(),
        )?;
        check(self.retries <= 20, "s3.retries", || {
            "must be at most 20".into()
        })
    }
}

impl super::Settings {
    /// Which image URLs are accepted, for `image::source`.
    pub(crate) fn source_policy(&self) -> crate::image::settings::SourcePolicy {
        crate::image::settings::SourcePolicy {
            s3_endpoint: self.s3.endpoint.clone(),
            allowed_hosts: self.sources.allowed_hosts.clone(),
            file_roots: self.sources.file_roots.clone(),
        }
    }

    /// Which keyrings vouch for which hosts (`[[sources.trust]]`), for `image::verify`.
    pub(crate) fn trust_policies(&self) -> Vec<crate::image::settings::TrustPolicy> {
        self.sources
            .trust
            .iter()
            .map(|t| crate::image::settings::TrustPolicy {
                hosts: t.hosts.clone(),
                keyring: t.keyring.clone(),
                require_signature: t.require_signature,
            })
            .collect()
    }

    /// How the S3 client reaches the endpoint (credential files resolved, the endpoint without
    /// credentials written into it).
    pub(crate) fn s3_access(&self) -> crate::image::settings::S3Access {
        let s = &self.s3;
        let file = |f: &str| (!f.is_empty()).then(|| super::resolve_credential(f));
        crate::image::settings::S3Access {
            endpoint: super::without_userinfo(&s.endpoint),
            region: s.region.clone(),
            access_key: s.access_key.clone(),
            secret_key: s.secret_key.clone(),
            secret_key_file: file(&s.secret_key_file),
            bucket: s.bucket.clone(),
            ca_file: file(&s.ca_file),
            allow_http: s.allow_http,
            connect_timeout: s.connect_timeout,
        }
    }

    /// The cache's bounds and download tuning.
    pub(crate) fn cache_config(&self) -> crate::image::settings::CacheConfig {
        use crate::image::settings::{CacheConfig, CacheLimits, RetryPolicy, Tuning};
        CacheConfig {
            limits: CacheLimits {
                max_size_bytes: self.cache.max_size_bytes,
                max_image_bytes: self.cache.max_image_bytes,
                max_age: self.cache.max_age,
                min_free_bytes: self.cache.min_free_bytes,
                revalidate_interval: self.cache.revalidate_interval,
            },
            tuning: Tuning {
                part_size: self.sources.part_size,
                parallel_parts: self.sources.parallel_parts,
                stall_timeout: self.sources.stall_timeout,
                retry: RetryPolicy {
                    retries: self.s3.retries,
                    backoff: self.s3.retry_backoff,
                    max_backoff: self.s3.retry_max_backoff,
                },
            },
            max_bytes_per_second: self.sources.max_bytes_per_second,
        }
    }
}
