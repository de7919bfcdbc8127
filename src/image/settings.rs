//! What the image side takes from the settings, as its own small types: which URLs are
//! accepted (`SourcePolicy`), which keyrings vouch for which hosts
//! (`TrustPolicy`), how to reach S3 (`S3Access`), and the cache's bounds and download
//! tuning (`CacheConfig`). The wiring builds them from the settings (`config/images.rs`); `image/`
//! reads no settings type. A leaf of `image/`.

use std::path::PathBuf;
use std::time::Duration;

/// Which image URLs are accepted (`sources.*`, and `s3.endpoint` for S3 URLs).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct SourcePolicy {
    /// `s3.endpoint`; empty: no S3 source.
    pub(crate) s3_endpoint: String,
    /// `sources.allowed_hosts` (`host` or `host:port`).
    pub(crate) allowed_hosts: Vec<String>,
    /// `sources.file_roots`; empty: no `file://` URL.
    pub(crate) file_roots: Vec<PathBuf>,
}

/// One `[[sources.trust]]` entry: the keyring that vouches for images from `hosts`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TrustPolicy {
    /// `host` or `host:port`, as in `sources.allowed_hosts`.
    pub(crate) hosts: Vec<String>,
    /// OpenPGP public keys (`gpg --export`, armored or binary).
    pub(crate) keyring: PathBuf,
    /// Refuse images from these hosts that come without a valid signature.
    pub(crate) require_signature: bool,
}

/// How the S3 client reaches the endpoint (`s3.*`).
#[derive(Debug, Clone, Default)]
pub(crate) struct S3Access {
    pub(crate) endpoint: String,
    pub(crate) region: String,
    pub(crate) access_key: String,
    /// The secret key given inline (`s3.secret_key`).
    pub(crate) secret_key: String,
    /// A file holding the secret key, resolved (`s3.secret_key_file`).
    pub(crate) secret_key_file: Option<PathBuf>,
    /// The bucket image URLs without one use (`s3.bucket`).
    pub(crate) bucket: String,
    /// CA certificates (PEM file, resolved) trusted for the endpoint besides the system's.
    pub(crate) ca_file: Option<PathBuf>,
    /// `s3.allow_http`.
    pub(crate) allow_http: bool,
    /// Time to connect.
    pub(crate) connect_timeout: Duration,
}

/// The cache's bounds and how downloads run (`cache.*`, `sources.*`, `s3.retr*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct CacheConfig {
    pub(crate) limits: CacheLimits,
    pub(crate) tuning: Tuning,
    /// `sources.max_bytes_per_second` (0: unlimited).
    pub(crate) max_bytes_per_second: u64,
}

/// Size and age bounds of the cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct CacheLimits {
    pub(crate) max_size_bytes: u64,
    /// `cache.max_image_bytes`: the largest image the cache takes, as downloaded and as
    /// decompressed.
    pub(crate) max_image_bytes: u64,
    pub(crate) max_age: Duration,
    pub(crate) min_free_bytes: u64,
    pub(crate) revalidate_interval: Duration,
}

/// The download settings in force when a download starts (`[sources]`, `s3.retries`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Tuning {
    pub(crate) part_size: u64,
    pub(crate) parallel_parts: usize,
    pub(crate) stall_timeout: Duration,
    pub(crate) retry: RetryPolicy,
}

/// Retries of a failed request (`s3.retries`, `s3.retry_backoff`, `s3.retry_max_backoff`);
/// the backoff itself is in `cache/mod.rs`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RetryPolicy {
    pub(crate) retries: usize,
    pub(crate) backoff: Duration,
    pub(crate) max_backoff: Duration,
}

impl CacheLimits {
    /// The largest image a download may produce: `cache.max_image_bytes`, and never more than
    /// the whole cache may hold.
    pub(crate) fn max_image_bytes(&self) -> u64 {
        self.max_image_bytes.min(self.max_size_bytes)
    }
}
