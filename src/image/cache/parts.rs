//! One part of a download: a GET of its byte range (guarded by `If-Match`, the answer's ETag
//! and range compared with what the download started with), its bytes written with positioned
//! writes into the preallocated partial file, each write reported to the in-order reader
//! (`hasher.rs`), which reads them back from there: a part holds at most one write block. Transient failures
//! (network, 5xx, a stall of `sources.stall_timeout`) are retried here, per part, with backoff
//! and full jitter, asking only for the bytes the part still lacks.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use super::hasher::Feed;
use super::{FetchError, RetryPolicy, Transfer};
use crate::image::bandwidth::Bandwidth;
use crate::image::remote::{RemoteObject, SourceError};
use crate::telemetry::metrics::metrics;

/// Received bytes are written in blocks of this size (one positioned write each).
const WRITE_BLOCK: usize = 1 << 20;

/// What every part of one download shares.
pub(super) struct Shared {
    pub(super) key: String,
    pub(super) object: RemoteObject,
    /// The ETag every answer must carry (and `If-Match` asks for).
    pub(super) etag: Option<String>,
    pub(super) size: u64,
    /// Send `Range` headers (false: the server has no range support; one part, one stream).
    pub(super) ranged: bool,
    pub(super) file: Arc<File>,
    pub(super) feed: mpsc::UnboundedSender<Feed>,
    pub(super) bandwidth: Arc<Bandwidth>,
    pub(super) stall_timeout: Duration,
    pub(super) retry: RetryPolicy,
    /// Bytes in the partial file (progress: bytes on disk).
    pub(super) on_disk: AtomicU64,
    pub(super) progress: watch::Sender<Transfer>,
    /// Ranged GETs sent, and part retries, by this download.
    pub(super) requests: AtomicU64,
    pub(super) retries: AtomicU64,
}

/// How a part ended without its bytes.
#[derive(Debug)]
pub(super) enum PartError {
    /// Permanent, or transient with the retries spent.
    Failed(FetchError),
    /// The object is not the one the download started with: start over.
    Changed(String),
    /// The server answered a range with the whole object: use one stream.
    NoRanges,
}

/// Fetches part `index` (`range` of the object) into the partial file.
pub(super) async fn fetch(
    shared: Arc<Shared>,
    index: usize,
    range: Range<u64>,
) -> Result<(), PartError> {
    let mut part = Part {
        shared: &shared,
        index,
        end: range.end,
        received: range.start,
        written: range.start,
        pending: Vec::new(),
        pending_len: 0,
    };
    let mut attempt = 0;
    loop {
        match part.receive().await {
            Ok(()) => break,
            Err(Receive::Source(e))
                if e.is_transient()
                    && attempt < shared.retry.retries
                    && (shared.ranged || part.received == range.start) =>
            {
                attempt += 1;
                let delay = shared.retry.delay(attempt);
                shared.retries.fetch_add(1, Ordering::Relaxed);
                metrics().download_part_retries_total.inc();
                tracing::warn!(
                    key = %shared.key,
                    part = index,
                    attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    received = part.received - range.start,
                    error = %e,
                    "part failed; retrying"
                );
                tokio::time::sleep(delay).await;
            }
            Err(Receive::Source(SourceError::Changed(why))) => return Err(PartError::Changed(why)),
            Err(Receive::Source(e)) => return Err(PartError::Failed(FetchError::from_source(e))),
            Err(Receive::NoRanges) => return Err(PartError::NoRanges),
        }
    }
    part.flush().await.map_err(PartError::Failed)?;
    // The pass may be gone already: it read the part's last bytes from a `Written` report and
    // finished (the normal end), or it refused the bytes, which the round learns from the pass
    // itself (its frontier stops short). Neither is this part's failure.
    let _ = shared.feed.send(Feed::End(index));
    Ok(())
}

/// Why receiving a part stopped.
enum Receive {
    /// The source failed (retried by the caller when the error is transient).
    Source(SourceError),
    /// The server ignored the range (a 200 with the whole object): the download restarts as one
    /// stream.
    NoRanges,
}

impl From<SourceError> for Receive {
    fn from(e: SourceError) -> Self {
        Receive::Source(e)
    }
}

/// A part in progress.
struct Part<'a> {
    shared: &'a Shared,
    index: usize,
    end: u64,
    /// Object offset up to which bytes were received (and fed to the hasher).
    received: u64,
    /// Object offset up to which bytes are in the file.
    written: u64,
    /// Received, not yet written (at most one write block).
    pending: Vec<Bytes>,
    pending_len: usize,
}

impl Part<'_> {
    /// One request for the bytes the part still lacks.
    async fn receive(&mut self) -> Result<(), Receive> {
        let s = self.shared;
        let want = self.received..self.end;
        let reply = tokio::time::timeout(
            s.stall_timeout,
            s.object
                .get(s.ranged.then(|| want.clone()), s.etag.as_deref()),
        )
        .await
        .map_err(|_| {
            SourceError::Transient(format!(
                "no answer to the request for part {} within {}s (sources.stall_timeout)",
                self.index,
                s.stall_timeout.as_secs()
            ))
        })??;
        if s.ranged {
            s.requests.fetch_add(1, Ordering::Relaxed);
            metrics().download_ranged_requests_total.inc();
        }
        if s.ranged && !reply.partial && want != (0..s.size) {
            return Err(Receive::NoRanges);
        }
        // Servers may ignore If-Match: compare the ETag of every answer.
        if s.etag.is_some() && reply.etag != s.etag {
            return Err(SourceError::Changed(format!(
                "ETag {:?} instead of {:?}",
                reply.etag, s.etag
            ))
            .into());
        }
        if reply.range != want || reply.total != s.size {
            return Err(SourceError::Changed(format!(
                "the server answered bytes {:?} of {}, asked for {want:?} of {}",
                reply.range, reply.total, s.size
            ))
            .into());
        }
        let mut body = reply.body;
        loop {
            let next = tokio::time::timeout(s.stall_timeout, body.next())
                .await
                .map_err(|_| {
                    SourceError::Transient(format!(
                        "part {} delivered nothing for {}s (sources.stall_timeout)",
                        self.index,
                        s.stall_timeout.as_secs()
                    ))
                })?;
            let Some(chunk) = next else { break };
            let chunk = chunk?;
            if self.received + chunk.len() as u64 > self.end {
                return Err(
                    SourceError::Changed("the server sent more than asked for".into()).into(),
                );
            }
            if !s.object.is_local() {
                s.bandwidth.take(chunk.len()).await;
            }
            self.received += chunk.len() as u64;
            metrics().download_bytes_total.inc_by(chunk.len() as u64);
            self.pending_len += chunk.len();
            self.pending.push(chunk);
            if self.pending_len >= WRITE_BLOCK {
                self.flush()
                    .await
                    .map_err(|e| SourceError::Io(e.to_string()))?;
            }
        }
        if self.received != self.end {
            return Err(SourceError::Transient(format!(
                "the connection closed {} bytes short of the end of part {}",
                self.end - self.received,
                self.index
            ))
            .into());
        }
        Ok(())
    }

    /// Writes the pending bytes at their offset.
    async fn flush(&mut self) -> Result<(), FetchError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let blocks = std::mem::take(&mut self.pending);
        let len = std::mem::take(&mut self.pending_len) as u64;
        let file = self.shared.file.clone();
        let at = self.written;
        tokio::task::spawn_blocking(move || {
            let mut off = at;
            for b in blocks {
                file.write_all_at(&b, off)?;
                off += b.len() as u64;
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .map_err(|e| FetchError::Io(format!("writing the partial file: {e}")))?
        .map_err(|e| FetchError::Io(format!("writing the partial file: {e}")))?;
        self.written += len;
        let s = self.shared;
        s.feed
            .send(Feed::Written(self.index, self.written))
            .map_err(|_| FetchError::Io("the hasher stopped".into()))?;
        let done = s.on_disk.fetch_add(len, Ordering::Relaxed) + len;
        s.progress.send_replace(Transfer {
            done,
            total: s.size,
        });
        Ok(())
    }
}
