//! The local image cache: images as downloaded (qcow2 stays compressed; a gzip, xz, bzip2 or
//! zstd wrapper is unwrapped on the way, `decompress.rs`), verified
//! against the `.sha256` object beside them, inspected once, and indexed in sled (key, url,
//! ETag, size, sha256, inspection verdict, created, last use). Downloads are single-flight,
//! resumable, and land in `<key>.partial` until complete, verified and synced; entries in use
//! are never evicted. A hit asks the source at most once per `cache.revalidate_interval`
//! whether the object changed, and a checksum-verified entry serves while the source is down.
//! `download.rs` holds one download (`parts.rs`, `hasher.rs`, `decompress.rs`,
//! `checkpoint.rs` its pieces),
//! `flight.rs` the single-flight table, `evict.rs` the eviction rules.

mod checkpoint;
mod decompress;
mod download;
mod evict;
mod flight;
mod hasher;
mod parts;

pub(crate) use decompress::{Compression, DecompressError, content_prefix};
pub(crate) use evict::EvictReason;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use futures::future::{BoxFuture, FutureExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::Instrument;

use super::bandwidth::Bandwidth;
use super::client::RedirectRefused;
use super::inspect::{InspectError, Inspection};
use super::remote::{Meta, SourceError};
use super::resolved::{Source, VerifyError};
pub(crate) use super::settings::{CacheConfig, CacheLimits, RetryPolicy, Tuning};
use super::source::{Location, SourceClients};
use super::verify::Verified;
use super::verify::digest::Algorithm;
use crate::telemetry::metrics::metrics;
use download::{Download, Remote};
use flight::FlightResult;

/// One cached image (stored in sled, served by the cache API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CacheEntry {
    /// 64 lowercase hex: the content SHA-256 when the source publishes one, else
    /// SHA-256 of the source identity and the version's validators (`version_key`).
    pub(crate) key: String,
    pub(crate) image_url: String,
    pub(crate) identity: String,
    pub(crate) etag: Option<String>,
    /// `Last-Modified` of the version held (what tells versions apart without an ETag).
    #[serde(default)]
    pub(crate) last_modified: Option<String>,
    /// Size of the cached file (the decompressed image for a compressed source).
    pub(crate) size: u64,
    /// SHA-256 of the object as downloaded (what a `.sha256` names; for a compressed source
    /// the compressed file), computed while downloading.
    pub(crate) sha256: String,
    /// Whether the download was checked against a digest (given, or published).
    pub(crate) verified: bool,
    /// What it was checked against (records of older versions: none).
    #[serde(default)]
    pub(crate) verification: Option<Verified>,
    /// The unwrapped compression of a compressed source (`None`: stored as downloaded).
    #[serde(default)]
    pub(crate) compression: Option<Compression>,
    /// For a compressed source: the size of the object as downloaded (`size` is the
    /// content's), which revalidation compares with the source's.
    #[serde(default)]
    pub(crate) source_size: Option<u64>,
    /// For a compressed source: the SHA-256 of the decompressed image held.
    #[serde(default)]
    pub(crate) content_sha256: Option<String>,
    pub(crate) inspection: Inspection,
    pub(crate) created: DateTime<Utc>,
    pub(crate) last_used: DateTime<Utc>,
    /// When the source last confirmed the object is still this one (download or
    /// revalidation); records from before this field read as never.
    #[serde(default)]
    pub(crate) validated: DateTime<Utc>,
    /// Modification time of the file when it entered the cache (detects tampering).
    pub(crate) mtime_ns: i128,
}

/// Why an image could not be made available.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("image not found: {0}")]
    NotFound(String),
    #[error("access to the image was refused: {0}")]
    Auth(String),
    #[error("checksum mismatch: expected {expected} ({from}), downloaded {actual}")]
    ChecksumMismatch {
        expected: String,
        actual: String,
        /// Where the expected digest came from (the manifest, or `the request`).
        from: String,
    },
    /// No usable checksum: the manifest or its entry is missing, or a signature is missing
    /// or invalid.
    #[error("{0}")]
    Unverified(VerifyError),
    #[error("malformed checksum file {0}")]
    BadChecksumFile(String),
    #[error("image rejected: {0}")]
    Rejected(InspectError),
    #[error("download failed: {0}")]
    Transfer(String),
    #[error("download refused: {0}; list the host in sources.allowed_hosts if it is trusted")]
    Redirect(RedirectRefused),
    #[error("cache I/O: {0}")]
    Io(String),
    #[error("not enough space in the cache: {0}")]
    NoSpace(String),
    #[error("download stopped: no job waits for it any more")]
    Stopped,
    /// The object changed at the source during the download (412, another ETag or size).
    #[error("the image changed at the source during the download: {0}")]
    Changed(String),
    /// A 4xx answer other than 401/403/404/412.
    #[error("the source refused the download: {0}")]
    Refused(String),
    /// The object is larger than `cache.max_image_bytes` (refused before downloading).
    #[error("the image is {size} bytes, more than cache.max_image_bytes ({limit} bytes)")]
    TooLarge { size: u64, limit: u64 },
    /// A compressed source could not be unwrapped (corrupt, truncated, a bomb).
    #[error("image rejected: {0}")]
    Unwrap(DecompressError),
}

impl FetchError {
    /// Every `kind` label of the error's own variants (a rejection carries the inspector's
    /// kinds, `InspectError::KINDS`), so the metric's series exist from the start.
    pub(crate) const KINDS: [&'static str; 16] = [
        "not_found",
        "auth",
        "checksum_mismatch",
        "bad_checksum_file",
        "transfer",
        "redirect_refused",
        "io",
        "no_space",
        "stopped",
        "changed",
        "refused",
        "checksum_unavailable",
        "signature_required",
        "signature_invalid",
        "too_large",
        "corrupt_compressed",
    ];

    /// Label for `image_errors_total{error_type}`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            FetchError::NotFound(_) => "not_found",
            FetchError::Auth(_) => "auth",
            FetchError::ChecksumMismatch { .. } => "checksum_mismatch",
            FetchError::BadChecksumFile(_) => "bad_checksum_file",
            FetchError::Rejected(e) => e.kind(),
            FetchError::Transfer(_) => "transfer",
            FetchError::Redirect(_) => "redirect_refused",
            FetchError::Io(_) => "io",
            FetchError::NoSpace(_) => "no_space",
            FetchError::Stopped => "stopped",
            FetchError::Changed(_) => "changed",
            FetchError::Refused(_) => "refused",
            FetchError::Unverified(VerifyError::SignatureRequired(_)) => "signature_required",
            FetchError::Unverified(VerifyError::Signature { .. }) => "signature_invalid",
            FetchError::Unverified(_) => "checksum_unavailable",
            FetchError::TooLarge { .. } => "too_large",
            FetchError::Unwrap(e) => e.kind(),
        }
    }

    /// The failure a checksum lookup stands for: network trouble stays retryable.
    pub(crate) fn from_verify(e: VerifyError) -> FetchError {
        if let VerifyError::Source { error, .. } = &e
            && error.is_transient()
        {
            return FetchError::Transfer(e.to_string());
        }
        match e {
            VerifyError::Manifest {
                error: crate::image::verify::manifest::ManifestError::BadSidecar,
                manifest,
            } => FetchError::BadChecksumFile(format!("{manifest}: expected 64 hex digits")),
            other => FetchError::Unverified(other),
        }
    }

    /// Network trouble worth retrying (404, refused credentials, bad content and local disk
    /// errors are not).
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, FetchError::Transfer(_))
    }

    /// The failure a source request's error stands for.
    pub(crate) fn from_source(e: SourceError) -> FetchError {
        match e {
            SourceError::NotFound(m) => FetchError::NotFound(m),
            SourceError::Auth { message, .. } => FetchError::Auth(message),
            SourceError::Changed(m) => FetchError::Changed(m),
            e @ SourceError::Refused { .. } => FetchError::Refused(e.to_string()),
            SourceError::Transient(m) => FetchError::Transfer(m),
            SourceError::Redirect(r) => FetchError::Redirect(r),
            SourceError::Io(m) => FetchError::Io(m),
        }
    }
}

/// How a cache hit was confirmed (reported in the job).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Revalidation {
    /// Downloaded by this fetch, or confirmed within `cache.revalidate_interval`: no request.
    NotNeeded,
    /// One request confirmed the entry is still the object at the source.
    Revalidated,
    /// The source could not be asked; the checksum-verified entry served anyway.
    SourceUnavailable,
}

impl Revalidation {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Revalidation::NotNeeded => "not_needed",
            Revalidation::Revalidated => "revalidated",
            Revalidation::SourceUnavailable => "source_unavailable",
        }
    }
}

/// Download progress: bytes so far (including a resumed prefix) and the total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Transfer {
    pub(crate) done: u64,
    pub(crate) total: u64,
}

impl RetryPolicy {
    /// Exponential backoff with full jitter: a delay drawn uniformly from zero up to
    /// `min(backoff * 2^(attempt-1), max_backoff)`, so that many clients retrying the same
    /// server spread out instead of coming back in waves.
    pub(crate) fn delay(&self, attempt: usize) -> Duration {
        let cap = self
            .backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max_backoff);
        cap.mul_f64(rand::random_range(0.0..=1.0))
    }

    /// Runs `op` until it succeeds, fails with a permanent error, or the retries are spent.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, FetchError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, FetchError>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if e.is_transient() && attempt < self.retries => {
                    attempt += 1;
                    let delay = self.delay(attempt);
                    tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "{what} failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }
}

/// How often a fetch starts over when the object changes under its download.
const CHANGED_RESTARTS: usize = 3;

/// A cached image handed to a job; the entry cannot be evicted while this lives.
pub(crate) struct CachedImage {
    pub(crate) entry: CacheEntry,
    pub(crate) path: PathBuf,
    pub(crate) hit: bool,
    /// How a hit was confirmed (`NotNeeded` for a download).
    pub(crate) revalidation: Revalidation,
    /// What this fetch checked the image against (none: nothing named a checksum).
    pub(crate) verified: Option<Verified>,
    _use: InUse,
}

/// One use of a cache entry: counted in `counts` while it lives (eviction skips entries in use).
struct InUse {
    key: String,
    /// Uses per cache key, shared by the cache and every `InUse`.
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Space a running download will still take, counted against the free space until the
/// download task ends (however it ends).
struct Reservation {
    reserved: Arc<AtomicU64>,
    bytes: u64,
}

impl Reservation {
    fn take(reserved: &Arc<AtomicU64>, bytes: u64) -> Reservation {
        reserved.fetch_add(bytes, Ordering::SeqCst);
        Reservation {
            reserved: reserved.clone(),
            bytes,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserved.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// The image cache.
pub(crate) struct ImageCache {
    dir: PathBuf,
    index: crate::store::Tree,
    sources: Arc<SourceClients>,
    flights: flight::Flights,
    in_use: Arc<Mutex<HashMap<String, usize>>>,
    limits: RwLock<CacheLimits>,
    /// Download settings, read when a download starts.
    tuning: RwLock<Tuning>,
    /// The bandwidth cap of all downloads together.
    bandwidth: Arc<Bandwidth>,
    /// Bytes that running downloads still have to write (space they will take).
    reserved: Arc<AtomicU64>,
    /// Called after an entry left the cache (see `on_remove`).
    removal_hooks: RwLock<Vec<RemovalHook>>,
    /// Keys of declared images' current versions: never evicted by age, size, space or
    /// supersession while listed (they still count against `cache.max_size_bytes`).
    pinned: RwLock<std::collections::HashSet<String>>,
}

/// Why an entry left the cache (given to removal hooks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    Evicted(EvictReason),
    /// `DELETE /api/v1/cache/images/{key}`.
    Deleted,
}

/// A callback run with the key of every entry that left the cache.
pub(crate) type RemovalHook = Arc<dyn Fn(&str, Removal) + Send + Sync>;

pub(crate) fn image_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.img"))
}

impl ImageCache {
    /// Opens the cache in `dir`, indexed in `index` (a tree of the daemon's sled database).
    pub(crate) fn open(
        dir: &Path,
        index: crate::store::Tree,
        sources: Arc<SourceClients>,
        config: &CacheConfig,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cache.dir {}: {e}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let bandwidth = Arc::new(Bandwidth::default());
        bandwidth.set(config.max_bytes_per_second);
        let cache = ImageCache {
            index,
            dir,
            sources,
            flights: flight::Flights::default(),
            in_use: Arc::new(Mutex::new(HashMap::new())),
            limits: RwLock::new(config.limits),
            tuning: RwLock::new(config.tuning),
            bandwidth,
            reserved: Arc::new(AtomicU64::new(0)),
            removal_hooks: RwLock::new(Vec::new()),
            pinned: RwLock::new(Default::default()),
        };
        cache.clean_dir();
        Ok(cache)
    }

    /// Applies new limits and download settings (hot reload): the bandwidth cap at once, the
    /// rest from the next download; evicts at once if the bound shrank.
    pub(crate) fn set_limits(&self, config: &CacheConfig) {
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = config.limits;
        *self.tuning.write().unwrap_or_else(|e| e.into_inner()) = config.tuning;
        self.bandwidth.set(config.max_bytes_per_second);
        self.evict(None);
    }

    pub(crate) fn limits(&self) -> CacheLimits {
        *self.limits.read().unwrap_or_else(|e| e.into_inner())
    }

    fn tuning(&self) -> Tuning {
        *self.tuning.read().unwrap_or_else(|e| e.into_inner())
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.tuning().retry
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn path_of(&self, key: &str) -> PathBuf {
        image_path(&self.dir, key)
    }

    fn mark_in_use(&self, key: &str) -> InUse {
        *self
            .in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_default() += 1;
        InUse {
            key: key.to_string(),
            counts: self.in_use.clone(),
        }
    }

    pub(crate) fn in_use_count(&self, key: &str) -> usize {
        self.in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Replaces the pinned keys (declared images' current versions); a key left out becomes
    /// an ordinary entry again, evictable by the usual rules.
    pub(crate) fn set_pinned(&self, keys: std::collections::HashSet<String>) {
        *self.pinned.write().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    pub(crate) fn is_pinned(&self, key: &str) -> bool {
        self.pinned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }

    /// The entry of `key`, held for use, when its file is still what was recorded; no request
    /// to the source (a declared image's current version: its refresh asks the source).
    pub(crate) fn hold(&self, key: &str) -> Option<CachedImage> {
        let guard = self.mark_in_use(key);
        let mut entry = self.valid_entry(key)?;
        metrics().cache_lookup(true);
        entry.last_used = Utc::now();
        // The use is recorded best effort: the entry serves either way.
        let _ = put_entry(&self.index, &entry);
        Some(CachedImage {
            path: self.path_of(key),
            verified: entry.verification.clone(),
            entry,
            hit: true,
            revalidation: Revalidation::NotNeeded,
            _use: guard,
        })
    }

    /// Whether `key` is cached and its file is still what was recorded.
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.valid_entry(key).is_some()
    }

    /// The newest valid entry downloaded from `source`'s object that was checked the way
    /// `source` asks (what `fetch` would serve without asking within the interval).
    pub(crate) fn latest_of(&self, source: &Source) -> Option<CacheEntry> {
        let identity = source.location.identity();
        let entry = self
            .entries()
            .into_iter()
            .filter(|e| e.identity == identity)
            .max_by_key(|e| e.validated)?;
        let entry = self.valid_entry(&entry.key)?;
        source
            .accepts(&entry.sha256, entry.verification.as_ref())
            .then_some(entry)
    }

    fn get_entry(&self, key: &str) -> Option<CacheEntry> {
        let r = self.index.get(key.as_bytes());
        metrics().storage_op("cache_get", &r);
        r.ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// `request`, failed as transient when it takes longer than `sources.stall_timeout`.
    async fn within_stall_timeout<T>(
        &self,
        request: impl std::future::Future<Output = Result<T, FetchError>>,
    ) -> Result<T, FetchError> {
        let limit = self.tuning().stall_timeout;
        tokio::time::timeout(limit, request)
            .await
            .unwrap_or_else(|_| {
                Err(FetchError::Transfer(format!(
                    "the source did not answer within {}s (sources.stall_timeout)",
                    limit.as_secs()
                )))
            })
    }

    /// Asks the source for the object's size and ETag, and for the digest it must match.
    async fn remote(&self, source: &Source) -> Result<Remote, FetchError> {
        let meta = source
            .object
            .head(None)
            .await
            .map_err(FetchError::from_source)?
            .ok_or_else(|| FetchError::Transfer("304 to a HEAD without a condition".into()))?;
        let expected = source.expected().await.map_err(FetchError::from_verify)?;
        Ok(Remote {
            object: source.object.clone(),
            meta,
            expected,
        })
    }

    /// Makes the image of `source` available locally: a recent enough entry without asking
    /// the source, a confirmed entry, or a download. `on_progress` sees download progress
    /// (also when another job leads the download).
    pub(crate) async fn fetch(
        &self,
        source: &Source,
        on_progress: impl FnMut(Transfer),
    ) -> Result<CachedImage, FetchError> {
        let interval = self.limits().revalidate_interval;
        self.fetch_within(source, interval, on_progress).await
    }

    /// As `fetch`, but an entry held is confirmed by the source whatever
    /// `cache.revalidate_interval` says (a declared image's refresh: one conditional HEAD
    /// when unchanged; the new version downloaded when changed).
    pub(crate) async fn fetch_fresh(
        &self,
        source: &Source,
        on_progress: impl FnMut(Transfer),
    ) -> Result<CachedImage, FetchError> {
        self.fetch_within(source, Duration::ZERO, on_progress).await
    }

    async fn fetch_within(
        &self,
        source: &Source,
        interval: Duration,
        mut on_progress: impl FnMut(Transfer),
    ) -> Result<CachedImage, FetchError> {
        if let Some(hit) = self.known_hit(source, interval).await? {
            return Ok(hit);
        }
        let image_url = source.image_url.as_str();
        let mut restarts = 0;
        loop {
            match self.fetch_remote(source, &mut on_progress).await {
                Err(FetchError::Changed(why)) if restarts < CHANGED_RESTARTS => {
                    restarts += 1;
                    tracing::warn!(image_url, reason = %why, restarts, "the image changed at the source during the download; starting over");
                }
                other => return other,
            }
        }
    }

    /// A hit on the entry last downloaded from this source, confirmed without a request
    /// within `cache.revalidate_interval`, else with one conditional HEAD; when the source
    /// cannot be reached, a checksum-verified entry serves anyway. `None`: no such entry, the
    /// entry was not checked the way this request asks (its digest, manifest or signer), or
    /// the object changed (the caller asks the source and downloads).
    async fn known_hit(
        &self,
        source: &Source,
        interval: Duration,
    ) -> Result<Option<CachedImage>, FetchError> {
        let location = &source.location;
        let identity = location.identity();
        let Some(entry) = self
            .entries()
            .into_iter()
            .filter(|e| e.identity == identity)
            .max_by_key(|e| e.validated)
        else {
            return Ok(None);
        };
        let guard = self.mark_in_use(&entry.key);
        let Some(mut entry) = self.valid_entry(&entry.key) else {
            return Ok(None);
        };
        if !source.accepts(&entry.sha256, entry.verification.as_ref()) {
            return Ok(None);
        }
        let m = metrics();
        let interval = chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::MAX);
        let local = matches!(location, Location::File(_));
        let now = Utc::now();
        let revalidation = if !local && now - entry.validated < interval {
            m.cache_revalidations_total
                .with_label_values(&["skipped"])
                .inc();
            Revalidation::NotNeeded
        } else {
            match self.still_current(source, &entry).await {
                Ok(true) => {
                    m.cache_revalidations_total
                        .with_label_values(&["unchanged"])
                        .inc();
                    entry.validated = now;
                    Revalidation::Revalidated
                }
                Ok(false) => {
                    m.cache_revalidations_total
                        .with_label_values(&["changed"])
                        .inc();
                    return Ok(None);
                }
                Err(e) if entry.verified && !local && e.is_transient() => {
                    m.cache_revalidations_total
                        .with_label_values(&["source_unavailable"])
                        .inc();
                    tracing::warn!(
                        key = %entry.key,
                        error = %e,
                        "the source cannot be asked whether the image changed; serving the checksum-verified cache entry"
                    );
                    Revalidation::SourceUnavailable
                }
                Err(e) => return Err(e),
            }
        };
        m.cache_lookup(true);
        entry.last_used = now;
        put_entry(&self.index, &entry)?;
        Ok(Some(CachedImage {
            path: self.path_of(&entry.key),
            verified: source.reported(entry.verification.as_ref()),
            entry,
            hit: true,
            revalidation,
            _use: guard,
        }))
    }

    /// Whether the object at the source is still the one `entry` holds (one HEAD with
    /// `If-None-Match`, retried like any request).
    async fn still_current(&self, source: &Source, entry: &CacheEntry) -> Result<bool, FetchError> {
        let object = source.object.clone();
        let etag = entry.etag.clone();
        let answer = self
            .retry_policy()
            .run("revalidating the cache entry", || {
                let (object, etag) = (object.clone(), etag.clone());
                self.within_stall_timeout(async move {
                    object
                        .head(etag.as_deref())
                        .await
                        .map_err(FetchError::from_source)
                })
            })
            .await?;
        Ok(match answer {
            None => true,
            Some(meta) => same_version(&meta, entry),
        })
    }

    /// Asks the source, then serves the entry its answer names or downloads it.
    async fn fetch_remote(
        &self,
        source: &Source,
        on_progress: &mut impl FnMut(Transfer),
    ) -> Result<CachedImage, FetchError> {
        let remote = self
            .retry_policy()
            .run("asking the source for the image", || {
                self.within_stall_timeout(self.remote(source))
            })
            .await?;
        let image_url = source.image_url.as_str();
        let identity = source.location.identity();
        let key = match remote.expected.as_ref().map(|e| &e.digest) {
            Some(d) if d.algorithm == Algorithm::Sha256 => d.hex.clone(),
            // A SHA-512 is part of the key: an entry under it was checked against it.
            Some(d) => version_key(&format!("{identity}\n{d}"), &remote.meta),
            None => version_key(&identity, &remote.meta),
        };
        // Hold the entry before looking, so eviction cannot take it between check and use.
        let guard = self.mark_in_use(&key);
        if let Some(mut entry) = self.valid_entry(&key) {
            metrics().cache_lookup(true);
            entry.last_used = Utc::now();
            entry.validated = entry.last_used;
            // The key is the digest checked now: record what vouched for it this time.
            if let Some(expected) = &remote.expected {
                entry.verified = true;
                entry.verification = Some(expected.verified.clone());
            }
            put_entry(&self.index, &entry)?;
            return Ok(CachedImage {
                path: self.path_of(&key),
                verified: remote.expected.map(|e| e.verified),
                entry,
                hit: true,
                revalidation: Revalidation::Revalidated,
                _use: guard,
            });
        }
        metrics().cache_lookup(false);

        let waiter = self.flights.join(&key, |start| {
            self.start_download(&key, image_url, &identity, remote, start)
        })?;
        let mut progress = waiter.progress.clone();
        let mut result = std::pin::pin!(waiter.result.clone());
        let outcome = loop {
            tokio::select! {
                r = &mut result => break r,
                changed = progress.changed() => {
                    if changed.is_ok() {
                        on_progress(*progress.borrow_and_update());
                    }
                }
            }
        };
        waiter.finished();
        drop(waiter);
        let entry = outcome?;
        // Earlier entries of the same source (older ETag or checksum) are superseded.
        self.remove_superseded(&identity, &key);
        self.evict(None);
        Ok(CachedImage {
            path: self.path_of(&key),
            verified: entry.verification.clone(),
            entry,
            hit: false,
            revalidation: Revalidation::NotNeeded,
            _use: guard,
        })
    }

    /// Checks space and starts the download task. The task ends when the download does or
    /// when `start.stop` is cancelled; either way its space reservation is released.
    fn start_download(
        &self,
        key: &str,
        image_url: &str,
        identity: &str,
        remote: Remote,
        start: flight::Start,
    ) -> Result<(watch::Receiver<Transfer>, BoxFuture<'static, FlightResult>), FetchError> {
        // A partial file is preallocated to the whole size: it already holds its space.
        let partial_len = std::fs::metadata(checkpoint::partial_path(&self.dir, key))
            .map(|m| m.len())
            .unwrap_or(0);
        let need = remote.meta.size.saturating_sub(partial_len);
        self.ensure_space(remote.meta.size, need, &start.busy)?;
        let reservation = Reservation::take(&self.reserved, need);
        let (tx, rx) = watch::channel(Transfer {
            done: 0,
            total: remote.meta.size,
        });
        let download = Download {
            dir: self.dir.clone(),
            index: self.index.clone(),
            key: key.to_string(),
            image_url: image_url.to_string(),
            identity: identity.to_string(),
            remote,
            tuning: self.tuning(),
            bandwidth: self.bandwidth.clone(),
            max_image_bytes: self.limits().max_image_bytes(),
        };
        // The download runs on its own task: a job cancelled while others wait does not break
        // it. Its log lines and spans belong to the job that started it.
        let task = tokio::spawn(
            async move {
                let _reservation = reservation;
                if let Some(previous) = start.previous {
                    let _ = previous.await;
                }
                let (dir, key) = (download.dir.clone(), download.key.clone());
                let result = tokio::select! {
                    r = download.run(tx) => r,
                    _ = start.stop.cancelled() => Err(FetchError::Stopped),
                };
                if matches!(result, Err(FetchError::Stopped)) {
                    checkpoint::discard_unresumable(&dir, &key);
                }
                result
            }
            .instrument(tracing::Span::current()),
        );
        let result: BoxFuture<'static, FlightResult> = async move {
            match task.await {
                Ok(r) => r,
                Err(e) => Err(FetchError::Io(format!("download task failed: {e}"))),
            }
        }
        .boxed();
        Ok((rx, result))
    }

    /// The entry of `key` if its file is still what was recorded (size and mtime; no re-hash).
    fn valid_entry(&self, key: &str) -> Option<CacheEntry> {
        let entry = self.get_entry(key)?;
        let meta = std::fs::metadata(self.path_of(key)).ok()?;
        (meta.len() == entry.size && mtime_ns(&meta) == entry.mtime_ns).then_some(entry)
    }

    /// Removes an entry and its file; refused while a job uses it.
    pub(crate) fn remove(&self, key: &str) -> Result<CacheEntry, RemoveError> {
        let in_use = self.in_use_count(key);
        if in_use > 0 {
            return Err(RemoveError::InUse(in_use));
        }
        let entry = self.get_entry(key).ok_or(RemoveError::NotFound)?;
        self.drop_entry(&entry.key)
            .map_err(|e| RemoveError::Io(e.to_string()))?;
        self.removed(&entry.key, Removal::Deleted);
        Ok(entry)
    }

    /// Registers `hook` to run after an entry is evicted or deleted, with its key (so what was
    /// made from the image elsewhere, e.g. a golden volume, can go too). Hooks run on the
    /// thread that removed the entry and must not block: spawn the work.
    // Registered by the wiring in lib.rs: golden images go with their entry.
    pub(crate) fn on_remove(&self, hook: impl Fn(&str, Removal) + Send + Sync + 'static) {
        self.removal_hooks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(hook));
    }

    fn removed(&self, key: &str, why: Removal) {
        let hooks = self
            .removal_hooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for hook in hooks {
            hook(key, why);
        }
    }

    /// Deletes the index record, then the file (a crash in between leaves an orphan file,
    /// which `clean_dir` removes; never an index record without its file being checked).
    fn drop_entry(&self, key: &str) -> std::io::Result<()> {
        let r = self.index.remove(key.as_bytes());
        metrics().storage_op("cache_remove", &r);
        r.map_err(std::io::Error::other)?;
        match std::fs::remove_file(self.path_of(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether the S3 endpoint answers with our credentials (the `minio` dependency): a HEAD
    /// of an object that need not exist; 404 counts as up, refused credentials as down.
    pub(crate) async fn probe_s3(&self) -> Result<(), String> {
        let bucket = self.sources.default_bucket();
        if bucket.is_empty() {
            return self.sources.probe_endpoint().await;
        }
        let location = Location::S3 {
            bucket: bucket.to_string(),
            key: ".libvirt-volume-provisioner-probe".into(),
        };
        let object = self.sources.object(&location).map_err(|e| e.to_string())?;
        match object.head(None).await {
            Ok(_) | Err(SourceError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Resolves a request into the source the cache fetches (`image/resolved.rs`).
    pub(crate) fn source(
        &self,
        request: &crate::image::resolved::SourceRequest<'_>,
        policy: &crate::image::settings::SourcePolicy,
    ) -> Result<Source, crate::image::resolved::RequestError> {
        crate::image::resolved::resolve(&self.sources, request, policy)
    }

    /// All entries (for the cache API), oldest use first.
    pub(crate) fn entries(&self) -> Vec<CacheEntry> {
        let mut v: Vec<CacheEntry> = self
            .index
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(_, b)| serde_json::from_slice(&b).ok())
            .collect();
        v.sort_by_key(|e: &CacheEntry| e.last_used);
        v
    }
}

/// Why a cache entry was not removed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RemoveError {
    #[error("cache entry is in use by {0} job(s)")]
    InUse(usize),
    #[error("cache entry not found")]
    NotFound,
    #[error("cache I/O: {0}")]
    Io(String),
}

/// Records an entry durably (the download records it before any waiter sees the result, so a
/// job arriving after the flight ended finds the entry instead of starting another download).
fn put_entry(index: &crate::store::Tree, entry: &CacheEntry) -> Result<(), FetchError> {
    let bytes = serde_json::to_vec(entry).map_err(|e| FetchError::Io(e.to_string()))?;
    let r = index.insert(entry.key.as_bytes(), bytes);
    metrics().storage_op("cache_put", &r);
    r.map_err(|e| FetchError::Io(e.to_string()))?;
    let r = index.flush();
    metrics().storage_op("flush", &r);
    r.map_err(|e| FetchError::Io(e.to_string()))?;
    Ok(())
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Makes a rename durable (an error is the download's error: the entry might not survive a
/// crash).
async fn sync_dir(dir: &Path) -> Result<(), FetchError> {
    let dir = dir.to_path_buf();
    let shown = dir.display().to_string();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir).and_then(|d| d.sync_all()))
        .await
        .map_err(|e| FetchError::Io(format!("syncing {shown}: {e}")))?
        .map_err(|e| FetchError::Io(format!("syncing {shown}: {e}")))
}

/// The cache key of a version of an object that publishes no checksum: its identity and its
/// validators. With an ETag, the ETag (the key of entries made before `Last-Modified` was
/// recorded); without one, `Last-Modified` and the size, so that a replaced object gets a new
/// key instead of the entry of the version before it.
fn version_key(identity: &str, meta: &Meta) -> String {
    let seed = match &meta.etag {
        Some(etag) => format!("{identity}\n{etag}"),
        None => format!(
            "{identity}\n\nlast-modified={}\nsize={}",
            meta.last_modified.as_deref().unwrap_or(""),
            meta.size
        ),
    };
    download::digest_hex(seed.as_bytes())
}

/// Whether the source's answer names the version `entry` holds: same ETag and size when the
/// source sends ETags, else same `Last-Modified` and size. A validator that differs (or is
/// there on one side only) means another version.
pub(crate) fn same_version(meta: &Meta, entry: &CacheEntry) -> bool {
    let validators = match (&meta.etag, &entry.etag) {
        (Some(now), Some(then)) => now == then,
        (None, None) => meta.last_modified == entry.last_modified,
        _ => false,
    };
    validators && meta.size == entry.source_size.unwrap_or(entry.size)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Settings;

    /// A cache in `dir` with its own temporary sled database and default settings.
    pub(crate) fn test_cache(dir: &Path) -> ImageCache {
        let db = crate::store::Db::open(&dir.join("index.db")).unwrap();
        let settings = Settings::default();
        let sources = Arc::new(
            SourceClients::new(
                &settings.s3_access(),
                &settings.source_policy(),
                Default::default(),
            )
            .unwrap(),
        );
        ImageCache::open(dir, db.tree("cache"), sources, &settings.cache_config()).unwrap()
    }

    /// Records an entry with a file of `size` bytes.
    pub(crate) fn add_entry(cache: &ImageCache, key: &str, size: usize) -> CacheEntry {
        let path = cache.path_of(key);
        std::fs::write(&path, vec![0u8; size]).unwrap();
        let now = Utc::now();
        let entry = CacheEntry {
            key: key.to_string(),
            image_url: format!("file:///images/{key}"),
            identity: format!("file:///images/{key}"),
            etag: None,
            last_modified: None,
            size: size as u64,
            sha256: String::new(),
            verified: false,
            verification: None,
            compression: None,
            source_size: None,
            content_sha256: None,
            inspection: Inspection::bare(crate::image::ImageType::Raw, size as u64, None),
            created: now,
            last_used: now,
            validated: now,
            mtime_ns: mtime_ns(&std::fs::metadata(&path).unwrap()),
        };
        put_entry(&cache.index, &entry).unwrap();
        entry
    }

    #[test]
    fn unreadable_free_space_is_an_error_and_evicts_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = test_cache(&tmp.path().join("cache"));
        add_entry(&cache, "a", 10);
        // statvfs on a directory that is gone fails (ENOENT).
        std::fs::rename(tmp.path().join("cache"), tmp.path().join("moved")).unwrap();
        let e = cache.ensure_space(1, 1, &[]).unwrap_err();
        assert!(
            matches!(&e, FetchError::Io(m) if m.contains("free space")),
            "{e}"
        );
        assert!(cache.get_entry("a").is_some(), "nothing evicted");
    }

    #[test]
    fn a_size_that_eviction_cannot_reach_evicts_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = test_cache(&tmp.path().join("cache"));
        add_entry(&cache, "a", 10);
        add_entry(&cache, "b", 10);
        // A source declaring 1 PiB, with the cache bound out of the way.
        let mut settings = Settings::default();
        settings.cache.max_size_bytes = u64::MAX;
        cache.set_limits(&settings.cache_config());
        let e = cache.ensure_space(1 << 50, 1 << 50, &[]).unwrap_err();
        assert!(
            matches!(&e, FetchError::NoSpace(m) if m.contains("nothing was evicted")),
            "{e}"
        );
        assert!(cache.get_entry("a").is_some() && cache.get_entry("b").is_some());
        // An image larger than the whole cache may hold is refused the same way.
        settings.cache.max_size_bytes = 15;
        cache.set_limits(&settings.cache_config());
        add_entry(&cache, "a", 5);
        let e = cache.ensure_space(16, 16, &[]).unwrap_err();
        assert!(
            matches!(&e, FetchError::NoSpace(m) if m.contains("cache.max_size_bytes")),
            "{e}"
        );
        assert!(cache.get_entry("a").is_some());
    }

    #[test]
    fn stopped_partials_go_debris_first_and_busy_ones_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let cache = test_cache(&dir);
        for key in ["resumable", "debris", "busy"] {
            std::fs::write(checkpoint::partial_path(&dir, key), vec![1u8; 8192]).unwrap();
        }
        std::fs::write(checkpoint::checkpoint_path(&dir, "resumable"), b"{}").unwrap();
        let order: Vec<(String, bool)> = cache
            .stopped_partials(&["busy".to_string()])
            .into_iter()
            .map(|p| (p.key, p.resumable))
            .collect();
        assert_eq!(
            order,
            vec![
                ("debris".to_string(), false),
                ("resumable".to_string(), true)
            ]
        );
    }

    #[test]
    fn versions_without_etag_differ_by_last_modified_and_size() {
        let meta = |etag: Option<&str>, lm: Option<&str>, size| Meta {
            size,
            etag: etag.map(str::to_string),
            last_modified: lm.map(str::to_string),
            ranges: true,
        };
        let id = "http://h/img";
        let v1 = meta(None, Some("Sun, 06 Dec 2026 10:00:00 GMT"), 10);
        let v2 = meta(None, Some("Sun, 06 Dec 2026 10:00:01 GMT"), 10);
        let v3 = meta(None, Some("Sun, 06 Dec 2026 10:00:00 GMT"), 11);
        assert_ne!(version_key(id, &v1), version_key(id, &v2));
        assert_ne!(version_key(id, &v1), version_key(id, &v3));
        // With an ETag, the key is the one entries have had before.
        let tagged = meta(Some("\"e1\""), None, 10);
        assert_eq!(
            version_key(id, &tagged),
            download::digest_hex(format!("{id}\n\"e1\"").as_bytes())
        );
        let mut entry = add_entry(&test_cache(tempfile::tempdir().unwrap().path()), "k", 10);
        entry.last_modified = v1.last_modified.clone();
        assert!(same_version(&v1, &entry));
        assert!(!same_version(&v2, &entry), "another Last-Modified");
        assert!(!same_version(&v3, &entry), "another size");
        assert!(
            !same_version(&tagged, &entry),
            "an ETag where there was none"
        );
    }

    #[test]
    fn removal_hooks_see_evicted_and_deleted_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = test_cache(&tmp.path().join("cache"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        cache.on_remove(move |key, why| s.lock().unwrap().push((key.to_string(), why)));
        add_entry(&cache, "old", 10);
        add_entry(&cache, "new", 10);
        let mut settings = Settings::default();
        settings.cache.max_size_bytes = 15;
        cache.set_limits(&settings.cache_config());
        cache.remove("new").unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                ("old".to_string(), Removal::Evicted(EvictReason::Size)),
                ("new".to_string(), Removal::Deleted)
            ]
        );
    }

    #[test]
    fn pinned_entries_survive_age_size_and_supersession_until_unpinned() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = test_cache(&tmp.path().join("cache"));
        let mut old = add_entry(&cache, "pinned", 10);
        old.last_used = Utc::now() - chrono::Duration::days(30);
        put_entry(&cache.index, &old).unwrap();
        add_entry(&cache, "other", 10);
        cache.set_pinned(["pinned".to_string()].into());
        let mut settings = Settings::default();
        settings.cache.max_size_bytes = 15;
        cache.set_limits(&settings.cache_config());
        assert!(
            cache.get_entry("pinned").is_some(),
            "older than max_age, least used"
        );
        assert!(
            cache.get_entry("other").is_none(),
            "evicted by size instead"
        );
        // Superseded by a newer version of its source: still kept while pinned.
        cache.remove_superseded(&old.identity, "newer");
        assert!(cache.get_entry("pinned").is_some());
        // Unpinned: an ordinary entry again.
        cache.set_pinned(Default::default());
        cache.evict(None);
        assert!(
            cache.get_entry("pinned").is_none(),
            "evicted by age once unpinned"
        );
    }

    #[tokio::test]
    async fn directory_sync_errors_are_returned() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(sync_dir(tmp.path()).await.is_ok());
        let e = sync_dir(&tmp.path().join("gone")).await.unwrap_err();
        assert!(matches!(e, FetchError::Io(_)), "{e}");
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let p = RetryPolicy {
            retries: 5,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        for attempt in 1..10 {
            let cap = Duration::from_millis(100 * (1 << (attempt - 1))).min(Duration::from_secs(1));
            let delays: Vec<Duration> = (0..200).map(|_| p.delay(attempt)).collect();
            assert!(
                delays.iter().all(|d| *d <= cap),
                "{attempt}: {delays:?} vs {cap:?}"
            );
            // Full jitter: delays spread over the whole range, down to near zero.
            assert!(
                delays.iter().any(|d| *d < cap / 4),
                "{attempt}: {delays:?} vs {cap:?}"
            );
        }
    }
}
