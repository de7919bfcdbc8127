//! The local image cache: images exactly as downloaded (qcow2 stays compressed), verified
//! against the `.sha256` object beside them while they are written, inspected once, and indexed
//! in sled. Downloads are single-flight (jobs wanting the same image share one), land in
//! `<key>.partial` and are renamed only when complete, verified and synced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt, Shared};
use object_store::{GetOptions, ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::inspect::{InspectError, Inspection};
use super::source::{Location, SourceClients};
use crate::jobs::store::Store;
use crate::telemetry::metrics::metrics;

/// A download that delivers nothing for this long is treated as failed.
const STALL_TIMEOUT: Duration = Duration::from_secs(120);
const WRITE_BUFFER: usize = 4 << 20;

/// One cached image (stored in sled, served by the cache API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// 64 lowercase hex: the content SHA-256 when the source publishes one, else
    /// SHA-256 of the source identity and ETag.
    pub key: String,
    pub image_url: String,
    pub identity: String,
    pub etag: Option<String>,
    pub size: u64,
    /// SHA-256 of the content, computed while downloading.
    pub sha256: String,
    /// Whether `sha256` was checked against a published `.sha256`.
    pub verified: bool,
    pub inspection: Inspection,
    pub created: DateTime<Utc>,
    pub last_used: DateTime<Utc>,
    /// Modification time of the file when it entered the cache (detects tampering).
    pub mtime_ns: i128,
}

/// Why an image could not be made available.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
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
    #[error("cache I/O: {0}")]
    Io(String),
    #[error("{0}")]
    NoSpace(String),
}

impl FetchError {
    /// Label for `image_errors_total{error_type}`.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::NotFound(_) => "not_found",
            FetchError::Auth(_) => "auth",
            FetchError::ChecksumMismatch { .. } => "checksum_mismatch",
            FetchError::BadChecksumFile(_) => "bad_checksum_file",
            FetchError::Rejected(e) => e.kind(),
            FetchError::Transfer(_) => "transfer",
            FetchError::Io(_) => "io",
            FetchError::NoSpace(_) => "no_space",
        }
    }

    fn from_store(e: object_store::Error) -> FetchError {
        match e {
            object_store::Error::NotFound { path, .. } => FetchError::NotFound(path),
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => {
                FetchError::Auth(source.to_string())
            }
            other => FetchError::Transfer(other.to_string()),
        }
    }
}

/// Why a cache entry was not removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("cache entry is in use by {0} job(s)")]
    InUse(usize),
    #[error("cache entry not found")]
    NotFound,
    #[error("cache I/O: {0}")]
    Io(String),
}

/// Download progress: bytes so far and the total (0 while unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfer {
    pub done: u64,
    pub total: u64,
}

type FlightResult = Result<CacheEntry, FetchError>;

struct Flight {
    progress: watch::Receiver<Transfer>,
    result: Shared<BoxFuture<'static, FlightResult>>,
}

/// A cached image handed to a job; the entry cannot be evicted while this lives.
pub struct CachedImage {
    pub entry: CacheEntry,
    pub path: PathBuf,
    pub hit: bool,
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

/// The image cache.
pub struct ImageCache {
    dir: PathBuf,
    index: sled::Tree,
    sources: Arc<SourceClients>,
    flights: Mutex<HashMap<String, Flight>>,
    in_use: Arc<Mutex<HashMap<String, usize>>>,
}

/// What the source says about the object right now.
struct Remote {
    store: Arc<dyn ObjectStore>,
    path: object_store::path::Path,
    size: u64,
    etag: Option<String>,
    expected_sha256: Option<String>,
}

impl ImageCache {
    pub fn open(dir: &Path, store: &Store, sources: Arc<SourceClients>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cache.dir {}: {e}", dir.display()))?;
        let dir = dir.canonicalize()?;
        // Leftovers of an interrupted download are never mistaken for images.
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(".partial") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(ImageCache {
            dir,
            index: store.tree("cache")?,
            sources,
            flights: Mutex::new(HashMap::new()),
            in_use: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.img"))
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

    pub fn in_use_count(&self, key: &str) -> usize {
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

    fn put_entry(&self, entry: &CacheEntry) -> Result<(), FetchError> {
        put_entry(&self.index, entry)
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
    pub async fn fetch(
        &self,
        location: &Location,
        image_url: &str,
        mut on_progress: impl FnMut(Transfer),
    ) -> Result<CachedImage, FetchError> {
        let remote = self.remote(location).await?;
        let key = match &remote.expected_sha256 {
            Some(sum) => sum.clone(),
            None => hex::encode(Sha256::digest(
                format!(
                    "{}\n{}",
                    location.identity(),
                    remote.etag.as_deref().unwrap_or("")
                )
                .as_bytes(),
            )),
        };
        // Hold the entry before looking, so eviction cannot take it between check and use.
        let guard = self.mark_in_use(&key);
        if let Some(entry) = self.valid_entry(&key) {
            metrics().cache_lookup(true);
            let mut entry = entry;
            entry.last_used = Utc::now();
            self.put_entry(&entry)?;
            return Ok(CachedImage {
                path: self.path_of(&key),
                entry,
                hit: true,
                _use: guard,
            });
        }
        metrics().cache_lookup(false);

        let (mut progress, result) = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            let flight = flights.entry(key.clone()).or_insert_with(|| {
                let (tx, rx) = watch::channel(Transfer {
                    done: 0,
                    total: remote.size,
                });
                let download = Download {
                    dir: self.dir.clone(),
                    index: self.index.clone(),
                    key: key.clone(),
                    image_url: image_url.to_string(),
                    identity: location.identity(),
                    remote: Remote {
                        store: remote.store.clone(),
                        path: remote.path.clone(),
                        size: remote.size,
                        etag: remote.etag.clone(),
                        expected_sha256: remote.expected_sha256.clone(),
                    },
                };
                // The download runs on its own task: one job's cancellation does not break
                // the download another job waits for.
                let task = tokio::spawn(download.run(tx));
                let result: BoxFuture<'static, FlightResult> = async move {
                    match task.await {
                        Ok(r) => r,
                        Err(e) => Err(FetchError::Io(format!("download task failed: {e}"))),
                    }
                }
                .boxed();
                Flight {
                    progress: rx,
                    result: result.shared(),
                }
            });
            (flight.progress.clone(), flight.result.clone())
        };

        let mut result = std::pin::pin!(result);
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
        {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            flights.remove(&key);
        }
        let entry = outcome?;
        Ok(CachedImage {
            path: self.path_of(&key),
            entry,
            hit: false,
            _use: guard,
        })
    }

    /// The entry of `key` if its file is still what was recorded (size and mtime; no re-hash).
    fn valid_entry(&self, key: &str) -> Option<CacheEntry> {
        let entry = self.get_entry(key)?;
        let meta = std::fs::metadata(self.path_of(key)).ok()?;
        (meta.len() == entry.size && mtime_ns(&meta) == entry.mtime_ns).then_some(entry)
    }

    /// Removes an entry and its file; refused while a job uses it.
    pub fn remove(&self, key: &str) -> Result<CacheEntry, RemoveError> {
        let in_use = self.in_use_count(key);
        if in_use > 0 {
            return Err(RemoveError::InUse(in_use));
        }
        let entry = self.get_entry(key).ok_or(RemoveError::NotFound)?;
        let r = self.index.remove(key.as_bytes());
        metrics().storage_op("cache_remove", &r);
        r.map_err(|e| RemoveError::Io(e.to_string()))?;
        match std::fs::remove_file(self.path_of(key)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RemoveError::Io(e.to_string())),
        }
        Ok(entry)
    }

    /// Whether the S3 endpoint answers with our credentials (the `minio` dependency): a HEAD
    /// of an object that need not exist; 404 counts as up, refused credentials as down.
    pub async fn probe_s3(&self) -> Result<(), String> {
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
    pub fn entries(&self) -> Vec<CacheEntry> {
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

/// Records an entry durably (the download records it before any waiter sees the result, so a
/// job arriving after the flight ended finds the entry instead of starting another download).
fn put_entry(index: &sled::Tree, entry: &CacheEntry) -> Result<(), FetchError> {
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
pub fn parse_checksum_file(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let token = text.split_whitespace().next()?;
    (token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| token.to_ascii_lowercase())
}

struct Download {
    dir: PathBuf,
    index: sled::Tree,
    key: String,
    image_url: String,
    identity: String,
    remote: Remote,
}

impl Download {
    async fn run(self, progress: watch::Sender<Transfer>) -> FlightResult {
        let partial = self.dir.join(format!("{}.partial", self.key));
        let result = self.download(&partial, &progress).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        result
    }

    async fn download(&self, partial: &Path, progress: &watch::Sender<Transfer>) -> FlightResult {
        let started = Instant::now();
        let io = |e: std::io::Error| FetchError::Io(format!("{}: {e}", partial.display()));
        let opts = GetOptions {
            if_match: self.remote.etag.clone(),
            ..Default::default()
        };
        let got = self
            .remote
            .store
            .get_opts(&self.remote.path, opts)
            .await
            .map_err(FetchError::from_store)?;
        if self.remote.etag.is_some() && got.meta.e_tag != self.remote.etag {
            return Err(FetchError::Transfer(
                "the object changed while it was being fetched".into(),
            ));
        }
        let total = got.meta.size;
        let mut stream = got.into_stream();
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(partial)
            .await
            .map_err(io)?;
        let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut hasher = Sha256::new();
        let mut done = 0u64;
        loop {
            let next = tokio::time::timeout(STALL_TIMEOUT, stream.next())
                .await
                .map_err(|_| {
                    FetchError::Transfer(format!(
                        "no data for {}s after {done} bytes",
                        STALL_TIMEOUT.as_secs()
                    ))
                })?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(FetchError::from_store)?;
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io)?;
            done += chunk.len() as u64;
            progress.send_replace(Transfer { done, total });
        }
        if done != total {
            return Err(FetchError::Transfer(format!(
                "received {done} of {total} bytes"
            )));
        }
        out.flush().await.map_err(io)?;
        let file = out.into_inner();
        file.sync_all().await.map_err(io)?;
        drop(file);

        let actual = hex::encode(hasher.finalize());
        if let Some(expected) = &self.remote.expected_sha256
            && *expected != actual
        {
            return Err(FetchError::ChecksumMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let p = partial.to_path_buf();
        let inspection = tokio::task::spawn_blocking(move || super::inspect::inspect_file(&p))
            .await
            .map_err(|e| FetchError::Io(e.to_string()))?
            .map_err(FetchError::Rejected)?;

        let final_path = self.dir.join(format!("{}.img", self.key));
        tokio::fs::rename(partial, &final_path).await.map_err(io)?;
        sync_dir(&self.dir).await;
        let meta = tokio::fs::metadata(&final_path).await.map_err(io)?;
        let now = Utc::now();
        let m = metrics();
        m.images_downloaded_total.inc();
        m.image_download_size_bytes
            .with_label_values(&[inspection.format.as_str()])
            .observe(total as f64);
        tracing::info!(
            key = %self.key,
            bytes = total,
            seconds = started.elapsed().as_secs_f64(),
            "image downloaded into the cache"
        );
        let entry = CacheEntry {
            key: self.key.clone(),
            image_url: self.image_url.clone(),
            identity: self.identity.clone(),
            etag: self.remote.etag.clone(),
            size: total,
            sha256: actual,
            verified: self.remote.expected_sha256.is_some(),
            inspection,
            created: now,
            last_used: now,
            mtime_ns: mtime_ns(&meta),
        };
        put_entry(&self.index, &entry)?;
        Ok(entry)
    }
}

/// Makes a rename durable.
async fn sync_dir(dir: &Path) {
    let dir = dir.to_path_buf();
    let _ =
        tokio::task::spawn_blocking(move || std::fs::File::open(&dir).and_then(|d| d.sync_all()))
            .await;
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
