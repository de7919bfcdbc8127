//! One download into the cache. The object is split into parts (`sources.part_size`), up to
//! `sources.parallel_parts` of them fetched at once by ranged GETs into a preallocated
//! `<key>.partial` (`parts.rs`); objects smaller than two parts and servers without ranges
//! take one stream. The SHA-256 is computed once, in order, on its own thread (`hasher.rs`),
//! which reads the parts back from the file and feeds a compressed object to its decoder
//! (`decompress.rs`): the cache keeps the decompressed image.
//! Every second the partial file is synced and the part map with the hash state saved beside
//! it (`checkpoint.rs`), off the receiving tasks, so a retry or a restart fetches only the
//! missing parts. At the end: one fsync, the checksum (of the object as downloaded) compared
//! with the published one, the header of the image inspected, the image renamed into place and
//! recorded in the index.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::checkpoint::{Checkpoint, checkpoint_path, partial_path};
use super::decompress::{Compression, Content};
use super::hasher::{self, Digests, Hasher, PassError};
use super::parts::{self, PartError};
use super::{CacheEntry, FetchError, Transfer, mtime_ns, put_entry};
use crate::image::bandwidth::Bandwidth;
use crate::image::inspect;
use crate::image::remote::{Meta, RemoteObject};
use crate::image::settings::Tuning;
use crate::telemetry::metrics::metrics;

/// How often the partial file is synced and the checkpoint saved while parts arrive.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// What the source says about the object.
#[derive(Clone)]
pub(crate) struct Remote {
    pub(crate) object: RemoteObject,
    pub(crate) meta: Meta,
    /// The digest the bytes must match, and what vouched for it.
    pub(crate) expected: Option<crate::image::resolved::Expected>,
}

/// One download of an object into the cache directory: where it goes, what it is, and how.
pub(crate) struct Download {
    /// The cache directory (`<key>.partial` and the checkpoint are written there).
    pub(crate) dir: PathBuf,
    /// The cache index (the part map and hash state are checkpointed in it).
    pub(crate) index: crate::store::Tree,
    /// The cache key of the entry being fetched.
    pub(crate) key: String,
    /// The URL as the caller gave it (credentials removed), for logs and errors.
    pub(crate) image_url: String,
    /// What identifies the object's version at the source (a checkpoint of another version is
    /// discarded, never resumed).
    pub(crate) identity: String,
    pub(crate) remote: Remote,
    pub(crate) tuning: Tuning,
    pub(crate) bandwidth: Arc<Bandwidth>,
    /// The largest image accepted, as downloaded and as decompressed.
    pub(crate) max_image_bytes: u64,
}

/// How the object is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    part_size: u64,
    /// Send ranges (false: one plain GET of the whole object).
    ranged: bool,
}

impl Plan {
    fn parts(&self, size: u64) -> usize {
        size.div_ceil(self.part_size).max(1) as usize
    }

    fn range(&self, index: usize, size: u64) -> std::ops::Range<u64> {
        let start = index as u64 * self.part_size;
        start..(start + self.part_size).min(size)
    }
}

/// How a round (one pass over the parts) ended without the digest.
enum RoundError {
    Failed(FetchError),
    Changed(String),
    NoRanges,
}

impl Download {
    /// Runs the download; the entry is recorded in the index before this returns. Then
    /// gives the memory it used back to the system.
    pub(crate) async fn run(
        self,
        progress: watch::Sender<Transfer>,
    ) -> Result<CacheEntry, FetchError> {
        let result = self.download(progress).await;
        give_back_memory().await;
        result
    }

    async fn download(self, progress: watch::Sender<Transfer>) -> Result<CacheEntry, FetchError> {
        let started = Instant::now();
        let meta = &self.remote.meta;
        if meta.size > self.max_image_bytes {
            return Err(FetchError::TooLarge {
                size: meta.size,
                limit: self.max_image_bytes,
            });
        }
        let parallel = meta.ranges
            && meta.etag.is_some()
            && !self.remote.object.is_local()
            && meta.size >= 2 * self.tuning.part_size;
        let mut plan = Plan {
            part_size: if parallel {
                self.tuning.part_size
            } else {
                meta.size.max(1)
            },
            // An empty object has no byte range to ask for.
            ranged: meta.ranges && meta.size > 0,
        };
        let progress = Arc::new(progress);
        let mut restarts = 0;
        loop {
            match self.round(plan, &progress).await {
                Ok(digests) => {
                    let entry = self.finish(digests).await?;
                    tracing::info!(
                        key = %self.key,
                        bytes = entry.size,
                        seconds = started.elapsed().as_secs_f64(),
                        parts = plan.parts(meta.size),
                        "image downloaded into the cache"
                    );
                    return Ok(entry);
                }
                Err(RoundError::NoRanges) if plan.ranged => {
                    tracing::info!(key = %self.key, "the server ignores ranges; downloading in one stream");
                    plan = Plan {
                        part_size: meta.size.max(1),
                        ranged: false,
                    };
                }
                Err(RoundError::NoRanges) => {
                    return Err(FetchError::Transfer(
                        "the server sent a partial answer to a plain GET".into(),
                    ));
                }
                Err(RoundError::Changed(why)) => {
                    self.discard();
                    return Err(FetchError::Changed(why));
                }
                // Without ranges a broken stream starts over (part retries cannot resume it).
                Err(RoundError::Failed(e))
                    if e.is_transient() && !plan.ranged && restarts < self.tuning.retry.retries =>
                {
                    restarts += 1;
                    let delay = self.tuning.retry.delay(restarts);
                    tracing::warn!(key = %self.key, error = %e, attempt = restarts, retry_in_ms = delay.as_millis() as u64, "download failed; starting over");
                    tokio::time::sleep(delay).await;
                }
                Err(RoundError::Failed(e)) => {
                    // A transient failure keeps its partial file when a checkpoint lets a
                    // later download resume it; anything else leaves nothing behind (a
                    // preallocated file nothing can resume is debris).
                    if !(e.is_transient() && self.resumable()) {
                        self.discard();
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Whether a checkpoint of this download is on disk (a later one can resume it).
    fn resumable(&self) -> bool {
        checkpoint_path(&self.dir, &self.key).exists()
    }

    fn discard(&self) {
        let _ = std::fs::remove_file(partial_path(&self.dir, &self.key));
        let _ = std::fs::remove_file(checkpoint_path(&self.dir, &self.key));
    }

    /// Opens the partial file: resumed from a checkpoint of the same object and plan, or new
    /// and preallocated. Returns the file, the parts already there and the hash state.
    fn open_partial(
        &self,
        plan: Plan,
    ) -> Result<(File, BTreeSet<usize>, usize, Sha256), FetchError> {
        let meta = &self.remote.meta;
        let path = partial_path(&self.dir, &self.key);
        let io = |e: std::io::Error| FetchError::Io(format!("{}: {e}", path.display()));
        let resumed = match (&meta.etag, plan.ranged) {
            (Some(etag), true) => {
                Checkpoint::load(&self.dir, &self.key, etag, meta.size, plan.part_size)
            }
            _ => None,
        };
        if let Some((cp, state)) = resumed {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io)?;
            tracing::info!(key = %self.key, parts_on_disk = cp.done.len(), parts = plan.parts(meta.size), "resuming download from the partial file");
            return Ok((file, cp.done.into_iter().collect(), cp.hashed_parts, state));
        }
        let _ = std::fs::remove_file(checkpoint_path(&self.dir, &self.key));
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        if meta.size > 0 && nix::fcntl::posix_fallocate(&file, 0, meta.size as i64).is_err() {
            // File systems without fallocate: a sparse file of the right length.
            file.set_len(meta.size).map_err(io)?;
        }
        Ok((file, BTreeSet::new(), 0, Sha256::new()))
    }

    /// One pass over the missing parts; the digest of the whole object when all are in.
    async fn round(
        &self,
        plan: Plan,
        progress: &Arc<watch::Sender<Transfer>>,
    ) -> Result<Digests, RoundError> {
        let meta = &self.remote.meta;
        let size = meta.size;
        let parts = plan.parts(size);
        let (file, mut done, hashed, state) =
            self.open_partial(plan).map_err(RoundError::Failed)?;
        let file = Arc::new(file);
        let hasher = Hasher::spawn(hasher::Start {
            state,
            hashed,
            on_disk: (0..parts).map(|i| done.contains(&i)).collect(),
            part_size: plan.part_size,
            size,
            file: file.clone(),
            unwrap: hasher::Unwrap {
                dir: self.dir.clone(),
                key: self.key.clone(),
                limit: self.max_image_bytes,
            },
        });
        let on_disk: u64 = done
            .iter()
            .map(|&i| plan.range(i, size).end - plan.range(i, size).start)
            .sum();
        progress.send_replace(Transfer {
            done: on_disk,
            total: size,
        });
        let shared = Arc::new(parts::Shared {
            key: self.key.clone(),
            object: self.remote.object.clone(),
            etag: meta.etag.clone(),
            size,
            ranged: plan.ranged,
            file: file.clone(),
            feed: hasher.feed.clone(),
            bandwidth: self.bandwidth.clone(),
            stall_timeout: self.tuning.stall_timeout,
            retry: self.tuning.retry,
            on_disk: AtomicU64::new(on_disk),
            progress: watch::Sender::new(Transfer::default()),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        });
        // Progress goes through the round's own sender into the flight's.
        let forward = {
            let mut rx = shared.progress.subscribe();
            let out = progress.clone();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let t = *rx.borrow_and_update();
                    out.send_replace(t);
                }
            })
        };
        let result = self.fetch_parts(plan, &shared, &hasher, &mut done).await;
        forward.abort();
        let span = tracing::Span::current();
        span.record("parts", parts);
        span.record("retries", shared.retries.load(Ordering::Relaxed));
        span.record("ranged_requests", shared.requests.load(Ordering::Relaxed));
        match result {
            Ok(()) => {
                drop(shared);
                hasher
                    .finish()
                    .await
                    .map_err(|e| RoundError::Failed(pass_error(e)))
            }
            // The pass ended early: its own error says why (a refused compressed stream).
            Err(PartError::Failed(_))
                if hasher.frontier.has_changed().is_err() && *hasher.frontier.borrow() < parts =>
            {
                drop(shared);
                Err(RoundError::Failed(match hasher.finish().await {
                    Err(e) => pass_error(e),
                    Ok(_) => FetchError::Io("the hasher ended before the download".into()),
                }))
            }
            Err(PartError::Failed(e)) => {
                if e.is_transient() && plan.ranged {
                    // Keep what arrived for the next attempt.
                    if let Some(task) = self.checkpoint(&file, &done, &hasher, plan)
                        && let Ok(Err(io)) = task.await
                    {
                        tracing::warn!(key = %self.key, error = %io, "cannot save the download checkpoint");
                    }
                }
                Err(RoundError::Failed(e))
            }
            Err(PartError::Changed(why)) => Err(RoundError::Changed(why)),
            Err(PartError::NoRanges) => Err(RoundError::NoRanges),
        }
    }

    /// Runs the part tasks within the reorder window, checkpointing as they complete.
    async fn fetch_parts(
        &self,
        plan: Plan,
        shared: &Arc<parts::Shared>,
        hasher: &Hasher,
        done: &mut BTreeSet<usize>,
    ) -> Result<(), PartError> {
        let size = self.remote.meta.size;
        let parts = plan.parts(size);
        let window = self.tuning.parallel_parts.max(1);
        let mut frontier = hasher.frontier.clone();
        let mut todo = (0..parts)
            .filter(|i| !done.contains(i))
            .collect::<Vec<_>>()
            .into_iter()
            .peekable();
        let mut running = JoinSet::new();
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dirty = false;
        // Set when the hasher thread ended (its frontier channel closed).
        let mut hasher_gone = false;
        // At most one checkpoint is being written; parts go on arriving meanwhile.
        let mut saving: Option<tokio::task::JoinHandle<std::io::Result<()>>> = None;
        loop {
            let hashed = *frontier.borrow_and_update();
            while running.len() < window {
                match todo.peek() {
                    // The reorder window: no part more than `window` parts past the frontier.
                    Some(&i) if i < hashed + window => {
                        todo.next();
                        let s = shared.clone();
                        let range = plan.range(i, size);
                        running.spawn(async move { parts::fetch(s, i, range).await.map(|()| i) });
                    }
                    _ => break,
                }
            }
            if running.is_empty() && todo.peek().is_none() {
                if let Some(task) = saving.take() {
                    let _ = task.await;
                }
                return Ok(());
            }
            tokio::select! {
                joined = running.join_next(), if !running.is_empty() => {
                    let index = joined
                        .expect("not empty")
                        .map_err(|e| PartError::Failed(FetchError::Io(format!("part task: {e}"))))??;
                    done.insert(index);
                    dirty = true;
                }
                changed = frontier.changed(), if !hasher_gone => {
                    hasher_gone = changed.is_err();
                    // Gone with every part hashed is the normal end (the last part task may
                    // not be joined yet); gone before is a failure.
                    if hasher_gone && *frontier.borrow() < parts {
                        // The pass refused the bytes (a corrupt or too large compressed
                        // stream): no use fetching the rest.
                        return Err(PartError::Failed(FetchError::Io("the hasher stopped".into())));
                    }
                }
                _ = tick.tick(), if dirty && plan.ranged && saving.is_none() => {
                    dirty = false;
                    saving = self.checkpoint(&shared.file, done, hasher, plan);
                }
                saved = async { saving.as_mut().expect("guarded").await }, if saving.is_some() => {
                    saving = None;
                    if let Ok(Err(e)) = saved {
                        tracing::warn!(key = %self.key, error = %e, "cannot save the download checkpoint");
                    }
                }
            }
        }
    }

    /// Starts syncing the partial file, then recording the parts that were in it before the
    /// sync and the hash state over the longest prefix of them.
    fn checkpoint(
        &self,
        file: &Arc<File>,
        done: &BTreeSet<usize>,
        hasher: &Hasher,
        plan: Plan,
    ) -> Option<tokio::task::JoinHandle<std::io::Result<()>>> {
        let etag = self.remote.meta.etag.clone()?;
        let contiguous = (0..).take_while(|i| done.contains(i)).count();
        let prefix = hasher.prefix_at_most(contiguous)?;
        let cp = Checkpoint {
            etag,
            size: self.remote.meta.size,
            part_size: plan.part_size,
            done: done.iter().copied().collect(),
            hashed_parts: prefix.parts,
            sha256_state: hex::encode(&prefix.state),
        };
        let (file, dir, key) = (file.clone(), self.dir.clone(), self.key.clone());
        Some(tokio::task::spawn_blocking(move || {
            file.sync_data()?;
            cp.save(&dir, &key)
        }))
    }

    /// Verifies, inspects, renames into place and records the entry.
    async fn finish(&self, digests: Digests) -> Result<CacheEntry, FetchError> {
        let partial = partial_path(&self.dir, &self.key);
        let io = |e: std::io::Error| FetchError::Io(format!("{}: {e}", partial.display()));
        let total = self.remote.meta.size;
        let actual = digests.sha256;
        if let Some(expected) = &self.remote.expected
            && let Err(e) = self.check_digest(expected, &actual).await
        {
            self.discard();
            return Err(e);
        }
        let final_path = super::image_path(&self.dir, &self.key);
        let content = digests.content;
        let image = self.image_to_keep(content.as_ref().map(|c| &c.1)).await?;
        let p = image.clone();
        let inspection = match tokio::task::spawn_blocking(move || inspect::inspect_file(&p))
            .await
            .map_err(|e| FetchError::Io(e.to_string()))?
        {
            Ok(i) => i,
            Err(e) => {
                self.discard();
                return Err(FetchError::Rejected(e));
            }
        };
        let (compression, content_sha256, size) = match content {
            Some((compression, content)) => {
                let (sha, size) = (content.sha256.clone(), content.size);
                let to = final_path.clone();
                tokio::task::spawn_blocking(move || content.persist(&to))
                    .await
                    .map_err(|e| FetchError::Io(e.to_string()))?
                    .map_err(io)?;
                (Some(compression), Some(sha), size)
            }
            None => {
                tokio::fs::rename(&partial, &final_path).await.map_err(io)?;
                (None, None, total)
            }
        };
        self.record(
            &final_path,
            inspection,
            actual,
            (compression, content_sha256, size),
        )
        .await
    }

    /// The image the cache keeps: the decompressed content (synced by its decoder; the
    /// compressed partial has served its purpose and goes), or the partial file, synced.
    async fn image_to_keep(&self, content: Option<&Content>) -> Result<PathBuf, FetchError> {
        let partial = partial_path(&self.dir, &self.key);
        if let Some(content) = content {
            self.discard();
            return Ok(content.path().to_path_buf());
        }
        let p = partial.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&p).and_then(|f| f.sync_all()))
            .await
            .map_err(|e| FetchError::Io(e.to_string()))?
            .map_err(|e| FetchError::Io(format!("{}: {e}", partial.display())))?;
        Ok(partial)
    }

    /// Records the entry of the image now at `final_path`.
    async fn record(
        &self,
        final_path: &std::path::Path,
        inspection: inspect::Inspection,
        sha256: String,
        (compression, content_sha256, size): (Option<Compression>, Option<String>, u64),
    ) -> Result<CacheEntry, FetchError> {
        let total = self.remote.meta.size;
        let io = |e: std::io::Error| FetchError::Io(format!("{}: {e}", final_path.display()));
        let _ = tokio::fs::remove_file(checkpoint_path(&self.dir, &self.key)).await;
        super::sync_dir(&self.dir).await?;
        let meta = tokio::fs::metadata(final_path).await.map_err(io)?;
        let now = Utc::now();
        let m = metrics();
        m.images_downloaded_total.inc();
        m.image_download_size_bytes
            .with_label_values(&[inspection.format.as_str()])
            .observe(total as f64);
        let entry = CacheEntry {
            key: self.key.clone(),
            image_url: self.image_url.clone(),
            identity: self.identity.clone(),
            etag: self.remote.meta.etag.clone(),
            last_modified: self.remote.meta.last_modified.clone(),
            size,
            sha256,
            verified: self.remote.expected.is_some(),
            verification: self.remote.expected.as_ref().map(|e| e.verified.clone()),
            compression,
            source_size: compression.map(|_| total),
            content_sha256,
            inspection,
            created: now,
            last_used: now,
            validated: now,
            mtime_ns: mtime_ns(&meta),
        };
        put_entry(&self.index, &entry)?;
        Ok(entry)
    }
}

impl Download {
    /// The downloaded bytes against the expected digest: the SHA-256 computed in order, or a
    /// SHA-512 from one read of the partial file (still the object as downloaded).
    async fn check_digest(
        &self,
        expected: &crate::image::resolved::Expected,
        sha256: &str,
    ) -> Result<(), FetchError> {
        use crate::image::verify::digest::{Algorithm, sha512_of_file};
        let actual = match expected.digest.algorithm {
            Algorithm::Sha256 => sha256.to_string(),
            Algorithm::Sha512 => {
                let partial = partial_path(&self.dir, &self.key);
                tokio::task::spawn_blocking(move || sha512_of_file(&partial))
                    .await
                    .map_err(|e| FetchError::Io(e.to_string()))?
                    .map_err(|e| FetchError::Io(format!("hashing the partial file: {e}")))?
            }
        };
        if actual == expected.digest.hex {
            return Ok(());
        }
        Err(FetchError::ChecksumMismatch {
            expected: expected.digest.to_string(),
            actual: format!("{}:{actual}", expected.digest.algorithm.as_str()),
            from: expected
                .verified
                .manifest
                .clone()
                .unwrap_or_else(|| "the request".into()),
        })
    }
}

/// The download's failure for a pass that did not complete.
fn pass_error(e: PassError) -> FetchError {
    match e {
        PassError::Io(m) => FetchError::Io(format!("hashing the partial file: {m}")),
        PassError::Decompress(super::DecompressError::Io(m)) => FetchError::Io(m),
        PassError::Decompress(super::DecompressError::Aborted) => FetchError::Stopped,
        PassError::Decompress(e) => FetchError::Unwrap(e),
    }
}

/// Returns the free pages of every malloc arena to the system. glibc keeps what the threads
/// of a download (receiving, writing, hashing, decoding) freed in their arenas; measured here,
/// the daemon held 25 MiB more than before two 256 MiB downloads, for good, without this.
async fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let _ = tokio::task::spawn_blocking(|| {
        // SAFETY: malloc_trim only takes the allocator's own locks; no pointer is passed.
        unsafe { libc::malloc_trim(0) }
    })
    .await;
}

/// SHA-256 of a cache key seed (kept here so the digest type stays in one place).
pub(super) fn digest_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
