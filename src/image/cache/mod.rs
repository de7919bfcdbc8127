//! The local image cache: images exactly as downloaded (qcow2 stays compressed), verified
//! against the `.sha256` object beside them, inspected once, and indexed in sled (key, url,
//! ETag, size, sha256, inspection verdict, created, last use). Downloads are single-flight,
//! resumable, and land in `<key>.partial` until complete, verified and synced; entries in use
//! are never evicted. `download.rs` holds one download, `evict.rs` the eviction rules.

mod download;
mod evict;
mod flight;

pub(crate) use evict::EvictReason;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use futures::future::{BoxFuture, FutureExt};
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::Instrument;

use super::client::{RedirectRefused, redirect_refused};
use super::inspect::{InspectError, Inspection};
use super::source::{Location, SourceClients};
use crate::config::Settings;
use crate::telemetry::metrics::metrics;
use download::{Download, Remote};
use flight::FlightResult;

/// One cached image (stored in sled, served by the cache API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CacheEntry {
    /// 64 lowercase hex: the content SHA-256 when the source publishes one, else
    /// SHA-256 of the source identity and ETag.
    pub(crate) key: String,
    pub(crate) image_url: String,
    pub(crate) identity: String,
    pub(crate) etag: Option<String>,
    pub(crate) size: u64,
    /// SHA-256 of the content, computed while downloading.
    pub(crate) sha256: String,
    /// Whether `sha256` was checked against a published `.sha256`.
    pub(crate) verified: bool,
    pub(crate) inspection: Inspection,
    pub(crate) created: DateTime<Utc>,
    pub(crate) last_used: DateTime<Utc>,
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
    #[error("checksum mismatch: expected {expected} (from .sha256), downloaded {actual}")]
    ChecksumMismatch { expected: String, actual: String },
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
}

impl FetchError {
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
        }
    }

    /// Network trouble worth retrying (404, refused credentials, bad content and local disk
    /// errors are not).
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, FetchError::Transfer(_))
    }

    /// The failure an object_store error stands for, decided by its variant (and, for generic
    /// errors, by whether a transport error or our refused redirect is in its source chain).
    fn from_store(e: object_store::Error) -> FetchError {
        if let Some(refused) = redirect_refused(&e) {
            return FetchError::Redirect(refused);
        }
        match e {
            object_store::Error::NotFound { path, .. } => FetchError::NotFound(path),
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => {
                FetchError::Auth(source.to_string())
            }
            // Everything else (network errors, 5xx, malformed answers) is worth another try.
            other => FetchError::Transfer(other.to_string()),
        }
    }
}

/// Whether a store error is a network failure (the request did not complete), as opposed to
/// an answer from the server.
pub(crate) fn is_transport_error(e: &object_store::Error) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if err.is::<object_store::client::HttpError>() {
            return true;
        }
        current = err.source();
    }
    false
}

/// Download progress: bytes so far (including a resumed prefix) and the total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Transfer {
    pub(crate) done: u64,
    pub(crate) total: u64,
}

/// Retries of a failed download (resuming from the last checkpoint each time).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RetryPolicy {
    pub(crate) retries: usize,
    pub(crate) backoff: Duration,
    pub(crate) max_backoff: Duration,
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
                    tracing::warn!(error = %e, attempt, retry_in = ?delay, "{what} failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }
}

/// Size and age bounds of the cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct CacheLimits {
    pub(crate) max_size_bytes: u64,
    pub(crate) max_age: Duration,
    pub(crate) min_free_bytes: u64,
}

/// The limits and retry policy a settings value gives the cache.
pub(crate) fn cache_settings(settings: &Settings) -> (CacheLimits, RetryPolicy) {
    (
        CacheLimits {
            max_size_bytes: settings.cache.max_size_bytes,
            max_age: settings.cache.max_age,
            min_free_bytes: settings.cache.min_free_bytes,
        },
        RetryPolicy {
            retries: settings.s3.retries,
            backoff: settings.s3.retry_backoff,
            max_backoff: settings.s3.retry_max_backoff,
        },
    )
}

/// A cached image handed to a job; the entry cannot be evicted while this lives.
pub(crate) struct CachedImage {
    pub(crate) entry: CacheEntry,
    pub(crate) path: PathBuf,
    pub(crate) hit: bool,
    _use: InUse,
}

struct InUse {
    key: String,
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
    retry: RwLock<RetryPolicy>,
    /// Bytes that running downloads still have to write (space they will take).
    reserved: Arc<AtomicU64>,
    /// Called after an entry left the cache (see `on_remove`).
    removal_hooks: RwLock<Vec<RemovalHook>>,
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
        settings: &Settings,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cache.dir {}: {e}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let (limits, retry) = cache_settings(settings);
        let cache = ImageCache {
            index,
            dir,
            sources,
            flights: flight::Flights::default(),
            in_use: Arc::new(Mutex::new(HashMap::new())),
            limits: RwLock::new(limits),
            retry: RwLock::new(retry),
            reserved: Arc::new(AtomicU64::new(0)),
            removal_hooks: RwLock::new(Vec::new()),
        };
        cache.clean_dir();
        Ok(cache)
    }

    /// Applies new limits and retry settings (hot reload); evicts at once if the bound shrank.
    pub(crate) fn set_limits(&self, settings: &Settings) {
        let (limits, retry) = cache_settings(settings);
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = limits;
        *self.retry.write().unwrap_or_else(|e| e.into_inner()) = retry;
        self.sources.apply(settings);
        self.evict(None);
    }

    pub(crate) fn limits(&self) -> CacheLimits {
        *self.limits.read().unwrap_or_else(|e| e.into_inner())
    }

    fn retry_policy(&self) -> RetryPolicy {
        *self.retry.read().unwrap_or_else(|e| e.into_inner())
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

    fn get_entry(&self, key: &str) -> Option<CacheEntry> {
        let r = self.index.get(key.as_bytes());
        metrics().storage_op("cache_get", &r);
        r.ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Asks the source for the object's size, ETag and published checksum.
    async fn remote(&self, location: &Location) -> Result<Remote, FetchError> {
        let (store, path) = self
            .sources
            .store_for(location)
            .map_err(|e| FetchError::Transfer(e.to_string()))?;
        let meta = store.head(&path).await.map_err(FetchError::from_store)?;
        let expected_sha256 = match location.checksum_location() {
            // A local sidecar must be a regular file beside the image, not a symlink elsewhere.
            Location::File(sidecar) => match std::fs::symlink_metadata(&sidecar) {
                Ok(m) if m.is_file() => {
                    let bytes = tokio::fs::read(&sidecar)
                        .await
                        .map_err(|e| FetchError::Io(format!("{}: {e}", sidecar.display())))?;
                    Some(checksum_or_error(&bytes, &sidecar.display().to_string())?)
                }
                _ => None,
            },
            remote_sidecar => {
                let (sum_store, sum_path) = self
                    .sources
                    .store_for(&remote_sidecar)
                    .map_err(|e| FetchError::Transfer(e.to_string()))?;
                match sum_store.get(&sum_path).await {
                    Ok(r) => {
                        let bytes = r.bytes().await.map_err(FetchError::from_store)?;
                        Some(checksum_or_error(&bytes, &remote_sidecar.identity())?)
                    }
                    Err(object_store::Error::NotFound { .. }) => None,
                    Err(e) => return Err(FetchError::from_store(e)),
                }
            }
        };
        Ok(Remote {
            store,
            path,
            size: meta.size,
            etag: meta.e_tag,
            expected_sha256,
        })
    }

    /// Makes the image of `location` available locally, downloading it unless a valid entry
    /// exists. `on_progress` sees download progress (also when another job leads the download).
    pub(crate) async fn fetch(
        &self,
        location: &Location,
        image_url: &str,
        mut on_progress: impl FnMut(Transfer),
    ) -> Result<CachedImage, FetchError> {
        let remote = self
            .retry_policy()
            .run("asking the source for the image", || self.remote(location))
            .await?;
        let identity = location.identity();
        let key = match &remote.expected_sha256 {
            Some(sum) => sum.clone(),
            None => hex::encode(Sha256::digest(
                format!("{identity}\n{}", remote.etag.as_deref().unwrap_or("")).as_bytes(),
            )),
        };
        // Hold the entry before looking, so eviction cannot take it between check and use.
        let guard = self.mark_in_use(&key);
        if let Some(mut entry) = self.valid_entry(&key) {
            metrics().cache_lookup(true);
            entry.last_used = Utc::now();
            put_entry(&self.index, &entry)?;
            return Ok(CachedImage {
                path: self.path_of(&key),
                entry,
                hit: true,
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
            entry,
            hit: false,
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
        let partial_len = std::fs::metadata(download::partial_path(&self.dir, key))
            .map(|m| m.len())
            .unwrap_or(0);
        let need = remote.size.saturating_sub(partial_len);
        self.ensure_space(need)?;
        let reservation = Reservation::take(&self.reserved, need);
        let (tx, rx) = watch::channel(Transfer {
            done: 0,
            total: remote.size,
        });
        let download = Download {
            dir: self.dir.clone(),
            index: self.index.clone(),
            key: key.to_string(),
            image_url: image_url.to_string(),
            identity: identity.to_string(),
            remote,
            retry: self.retry_policy(),
        };
        // The download runs on its own task: a job cancelled while others wait does not break
        // it. Its log lines and spans belong to the job that started it.
        let task = tokio::spawn(
            async move {
                let _reservation = reservation;
                if let Some(previous) = start.previous {
                    let _ = previous.await;
                }
                tokio::select! {
                    r = download.run(tx) => r,
                    _ = start.stop.cancelled() => Err(FetchError::Stopped),
                }
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
    // Registered by the wiring in lib.rs once golden volumes exist (issue 13).
    #[cfg_attr(not(test), allow(dead_code))]
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
        let (store, path) = self
            .sources
            .store_for(&location)
            .map_err(|e| e.to_string())?;
        match store.head(&path).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
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

fn checksum_or_error(bytes: &[u8], name: &str) -> Result<String, FetchError> {
    parse_checksum_file(bytes)
        .ok_or_else(|| FetchError::BadChecksumFile(format!("{name}: expected 64 hex digits")))
}

/// The hex digest of a `.sha256` file: raw hex or `sha256sum` output, any case.
pub(crate) fn parse_checksum_file(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let token = text.split_whitespace().next()?;
    (token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| token.to_ascii_lowercase())
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A cache in `dir` with its own temporary sled database and default settings.
    pub(crate) fn test_cache(dir: &Path) -> ImageCache {
        let db = crate::store::Db::open(&dir.join("index.db")).unwrap();
        let settings = Settings::default();
        let sources = Arc::new(SourceClients::new(&settings).unwrap());
        ImageCache::open(dir, db.tree("cache"), sources, &settings).unwrap()
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
            size: size as u64,
            sha256: String::new(),
            verified: false,
            inspection: Inspection {
                format: crate::image::ImageType::Raw,
                virtual_size: size as u64,
            },
            created: now,
            last_used: now,
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
        let e = cache.ensure_space(1).unwrap_err();
        assert!(
            matches!(&e, FetchError::Io(m) if m.contains("free space")),
            "{e}"
        );
        assert!(cache.get_entry("a").is_some(), "nothing evicted");
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
        cache.set_limits(&settings);
        cache.remove("new").unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                ("old".to_string(), Removal::Evicted(EvictReason::Size)),
                ("new".to_string(), Removal::Deleted)
            ]
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
    fn checksum_files() {
        let h = "ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789";
        assert_eq!(
            parse_checksum_file(h.as_bytes()),
            Some(h.to_ascii_lowercase())
        );
        let sum = format!("{h}  ubuntu.qcow2\n");
        assert_eq!(
            parse_checksum_file(sum.as_bytes()),
            Some(h.to_ascii_lowercase())
        );
        assert_eq!(parse_checksum_file(b"xyz"), None);
        assert_eq!(parse_checksum_file(b""), None);
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
