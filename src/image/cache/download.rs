//! One download into the cache: bytes are hashed as they are written (one pass, never a
//! second read), checkpointed (partial file synced plus the SHA-256 state) so a retry or a
//! restart resumes with a ranged GET guarded by the ETag, verified against the published
//! checksum, inspected, synced and renamed into place.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStore};
use serde::{Deserialize, Serialize};
use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

use super::{CacheEntry, FetchError, RetryPolicy, Transfer, mtime_ns, put_entry};
use crate::image::inspect;
use crate::telemetry::metrics::metrics;

/// A download that delivers nothing for this long is treated as failed (and retried).
const STALL_TIMEOUT: Duration = Duration::from_secs(120);
const WRITE_BUFFER: usize = 4 << 20;
/// Bytes between checkpoints (fsync of the partial file + saved hash state).
const CHECKPOINT_BYTES: u64 = 32 << 20;

/// What the source says about the object.
#[derive(Clone)]
pub(crate) struct Remote {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) path: object_store::path::Path,
    pub(crate) size: u64,
    pub(crate) etag: Option<String>,
    pub(crate) expected_sha256: Option<String>,
}

/// Saved next to `<key>.partial`: how far the synced prefix goes and the hash state there.
#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    etag: Option<String>,
    size: u64,
    offset: u64,
    sha256_state: String,
}

pub(crate) struct Download {
    pub(crate) dir: PathBuf,
    pub(crate) index: crate::store::Tree,
    pub(crate) key: String,
    pub(crate) image_url: String,
    pub(crate) identity: String,
    pub(crate) remote: Remote,
    pub(crate) retry: RetryPolicy,
}

/// Paths of a download's files.
pub(crate) fn partial_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.partial"))
}

pub(crate) fn checkpoint_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.partial.json"))
}

impl Download {
    /// Runs the download with retries; the entry is recorded in the index before this returns.
    pub(crate) async fn run(
        self,
        progress: watch::Sender<Transfer>,
    ) -> Result<CacheEntry, FetchError> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            match self.attempt(&progress).await {
                Ok(entry) => {
                    tracing::info!(
                        key = %self.key,
                        bytes = entry.size,
                        seconds = started.elapsed().as_secs_f64(),
                        "image downloaded into the cache"
                    );
                    return Ok(entry);
                }
                Err(Attempt::Changed(why)) if attempt < self.retry.retries => {
                    tracing::warn!(key = %self.key, reason = %why, "partial download is stale; starting over");
                    self.discard().await;
                    attempt += 1;
                }
                Err(Attempt::Failed(e)) if e.is_transient() && attempt < self.retry.retries => {
                    attempt += 1;
                    let delay = self.retry.delay(attempt);
                    tracing::warn!(
                        key = %self.key,
                        error = %e,
                        attempt,
                        retry_in = ?delay,
                        "download failed; resuming from the last checkpoint after a pause"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(Attempt::Failed(e)) => {
                    // A transient failure keeps its partial file for a later resume; anything
                    // else leaves nothing behind.
                    if !e.is_transient() {
                        self.discard().await;
                    }
                    return Err(e);
                }
                Err(Attempt::Changed(why)) => {
                    self.discard().await;
                    return Err(FetchError::Transfer(why));
                }
            }
        }
    }

    async fn discard(&self) {
        let _ = tokio::fs::remove_file(partial_path(&self.dir, &self.key)).await;
        let _ = tokio::fs::remove_file(checkpoint_path(&self.dir, &self.key)).await;
    }

    /// A usable checkpoint for this object: same ETag and size, partial file long enough.
    async fn resume_point(&self) -> Option<(u64, Sha256)> {
        let text = tokio::fs::read(checkpoint_path(&self.dir, &self.key))
            .await
            .ok()?;
        let cp: Checkpoint = serde_json::from_slice(&text).ok()?;
        if cp.etag != self.remote.etag || cp.size != self.remote.size || cp.offset == 0 {
            return None;
        }
        let len = tokio::fs::metadata(partial_path(&self.dir, &self.key))
            .await
            .ok()?
            .len();
        if len < cp.offset {
            return None;
        }
        let state = hex::decode(&cp.sha256_state).ok()?;
        let hasher = Sha256::deserialize(state.as_slice().try_into().ok()?).ok()?;
        Some((cp.offset, hasher))
    }

    async fn save_checkpoint(&self, offset: u64, hasher: &Sha256) -> Result<(), FetchError> {
        let cp = Checkpoint {
            etag: self.remote.etag.clone(),
            size: self.remote.size,
            offset,
            sha256_state: hex::encode(hasher.serialize()),
        };
        let path = checkpoint_path(&self.dir, &self.key);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(&cp).map_err(|e| FetchError::Io(e.to_string()))?;
        let io = |e: std::io::Error| FetchError::Io(format!("{}: {e}", path.display()));
        let mut f = tokio::fs::File::create(&tmp).await.map_err(io)?;
        f.write_all(&bytes).await.map_err(io)?;
        f.sync_all().await.map_err(io)?;
        tokio::fs::rename(&tmp, &path).await.map_err(io)?;
        Ok(())
    }

    async fn attempt(&self, progress: &watch::Sender<Transfer>) -> Result<CacheEntry, Attempt> {
        let partial = partial_path(&self.dir, &self.key);
        let io = |e: std::io::Error| {
            Attempt::Failed(FetchError::Io(format!("{}: {e}", partial.display())))
        };
        let total = self.remote.size;
        let (offset, mut hasher) = match self.resume_point().await {
            Some(p) => p,
            None => (0, Sha256::new()),
        };
        let opts = GetOptions {
            if_match: self.remote.etag.clone(),
            range: (offset > 0).then_some(GetRange::Offset(offset)),
            ..Default::default()
        };
        let got = match self.remote.store.get_opts(&self.remote.path, opts).await {
            Ok(g) => g,
            Err(object_store::Error::Precondition { .. }) => {
                return Err(Attempt::Changed(
                    "the object changed (If-Match failed)".into(),
                ));
            }
            // Resuming: an answer other than the range (416, a 200 with the whole object, a
            // malformed Content-Range) means the partial file cannot be continued.
            Err(e) if offset > 0 && is_refused_range(&e) => {
                return Err(Attempt::Changed(format!("cannot resume: {e}")));
            }
            Err(e) => return Err(Attempt::Failed(FetchError::from_store(e))),
        };
        // Some servers ignore If-Match: compare the ETag of what actually came back.
        if self.remote.etag.is_some() && got.meta.e_tag != self.remote.etag {
            return Err(Attempt::Changed(format!(
                "the object changed (ETag {:?}, expected {:?})",
                got.meta.e_tag, self.remote.etag
            )));
        }
        if got.meta.size != total || got.range.start != offset {
            return Err(Attempt::Changed(format!(
                "the server answered bytes {:?} of {}, expected {offset}.. of {total}",
                got.range, got.meta.size
            )));
        }
        if offset > 0 {
            tracing::info!(key = %self.key, offset, total, "resuming download from the partial file");
        }

        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&partial)
            .await
            .map_err(io)?;
        // Bytes beyond the checkpoint were never hashed: drop them.
        file.set_len(offset).await.map_err(io)?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io)?;
        let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut stream = got.into_stream();
        let mut done = offset;
        let mut next_checkpoint = offset + CHECKPOINT_BYTES;
        let fetched = &metrics().download_bytes_total;
        progress.send_replace(Transfer { done, total });
        loop {
            let next = tokio::time::timeout(STALL_TIMEOUT, stream.next())
                .await
                .map_err(|_| {
                    Attempt::Failed(FetchError::Transfer(format!(
                        "no data for {}s after {done} bytes",
                        STALL_TIMEOUT.as_secs()
                    )))
                })?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| Attempt::Failed(FetchError::from_store(e)))?;
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io)?;
            done += chunk.len() as u64;
            fetched.inc_by(chunk.len() as u64);
            progress.send_replace(Transfer { done, total });
            if done >= next_checkpoint && done < total {
                out.flush().await.map_err(io)?;
                out.get_ref().sync_data().await.map_err(io)?;
                self.save_checkpoint(done, &hasher)
                    .await
                    .map_err(Attempt::Failed)?;
                next_checkpoint = done + CHECKPOINT_BYTES;
            }
        }
        if done != total {
            return Err(Attempt::Failed(FetchError::Transfer(format!(
                "received {done} of {total} bytes"
            ))));
        }
        out.flush().await.map_err(io)?;
        let file = out.into_inner();
        file.sync_all().await.map_err(io)?;
        drop(file);

        let actual = hex::encode(hasher.finalize());
        if let Some(expected) = &self.remote.expected_sha256
            && *expected != actual
        {
            return Err(Attempt::Failed(FetchError::ChecksumMismatch {
                expected: expected.clone(),
                actual,
            }));
        }
        let p = partial.clone();
        let inspection = tokio::task::spawn_blocking(move || inspect::inspect_file(&p))
            .await
            .map_err(|e| Attempt::Failed(FetchError::Io(e.to_string())))?
            .map_err(|e| Attempt::Failed(FetchError::Rejected(e)))?;

        let final_path = super::image_path(&self.dir, &self.key);
        tokio::fs::rename(&partial, &final_path).await.map_err(io)?;
        let _ = tokio::fs::remove_file(checkpoint_path(&self.dir, &self.key)).await;
        super::sync_dir(&self.dir).await.map_err(Attempt::Failed)?;
        let meta = tokio::fs::metadata(&final_path).await.map_err(io)?;
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
            etag: self.remote.etag.clone(),
            size: total,
            sha256: actual,
            verified: self.remote.expected_sha256.is_some(),
            inspection,
            created: now,
            last_used: now,
            mtime_ns: mtime_ns(&meta),
        };
        put_entry(&self.index, &entry).map_err(Attempt::Failed)?;
        Ok(entry)
    }
}

/// How an attempt ended without an entry.
enum Attempt {
    /// The object is not what the partial file was a prefix of: start over.
    Changed(String),
    Failed(FetchError),
}

/// A server's answer to a ranged GET that is not the range: anything but a network failure
/// and the variants that have their own meaning.
fn is_refused_range(e: &object_store::Error) -> bool {
    !super::is_transport_error(e)
        && !matches!(
            e,
            object_store::Error::NotFound { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
                | object_store::Error::Precondition { .. }
        )
}
