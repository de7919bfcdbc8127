//! Preflight inspection (`POST /api/v1/images/inspect`): what a job would find in an image,
//! without a job, a volume or a download. The source is asked for the object's size and ETag;
//! a cache entry of the same object answers from its stored verdict, anything else is judged
//! from a ranged GET of at most `inspect::MAX_HEADER_READ` bytes (never the whole object) by
//! the same inspector the cache runs on every download.

use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;

use super::ImageType;
use super::cache::{Compression, ImageCache, content_prefix};
use super::inspect::{self, InspectError, MAX_HEADER_READ};
use super::remote::{RemoteObject, SourceError};
use super::source::{Location, SourceClients};

/// Whether the cache holds the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CacheState {
    /// An entry of this object (same source and ETag): a job would not download it.
    Cached,
    /// An entry of an earlier version of this source (another ETag): a job downloads anew.
    Stale,
    /// Nothing of this source is cached.
    Absent,
}

/// The verdict on an image.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Preflight {
    /// The wrapper around the image (`gzip`, `xz`, `bzip2`, `zstd`), found from its first
    /// bytes; `null` for a bare image. `format` and `virtual_size` are then of the image
    /// inside (the virtual size of a compressed raw image is not known before its download).
    pub(crate) compression: Option<Compression>,
    /// `qcow2` or `raw`; `null` when the image could not be read.
    pub(crate) format: Option<ImageType>,
    /// Size of the disk the image describes.
    pub(crate) virtual_size: Option<u64>,
    /// Size of the image file (as stored at the source, or in the cache).
    pub(crate) size: Option<u64>,
    pub(crate) cache: CacheState,
    /// Key of the cache entry, when one exists (`cached` or `stale`).
    pub(crate) cache_key: Option<String>,
    /// Whether a job with this image (and `image_type`) would get past inspection.
    pub(crate) accepted: bool,
    /// Why not, when not.
    pub(crate) reason: Option<String>,
    /// Bytes of the image read from the source for this answer.
    pub(crate) bytes_read: u64,
}

impl Preflight {
    fn refused(reason: String, cache: CacheState, cache_key: Option<String>) -> Preflight {
        Preflight {
            compression: None,
            format: None,
            virtual_size: None,
            size: None,
            cache,
            cache_key,
            accepted: false,
            reason: Some(reason),
            bytes_read: 0,
        }
    }
}

/// What a preflight looks at, and where.
#[derive(Clone, Copy)]
pub(crate) struct Query<'a> {
    pub(crate) sources: &'a SourceClients,
    pub(crate) cache: &'a ImageCache,
    pub(crate) location: &'a Location,
    /// What a job would declare (`image_type`).
    pub(crate) requested: ImageType,
    /// `sources.stall_timeout`.
    pub(crate) stall: Duration,
}

/// Why the source could not be read, as a job would report it.
fn source_error(e: &SourceError) -> String {
    match e {
        SourceError::NotFound(_) => format!("image not found: {e}"),
        SourceError::Auth { .. } => format!("access to the image was refused: {e}"),
        SourceError::Redirect(r) => format!(
            "download refused: {r}; list the host in sources.allowed_hosts if it is trusted"
        ),
        _ => format!("cannot read the image: {e}"),
    }
}

/// Inspects the image at `location` as a job asking for `requested` would. A source that
/// stops answering cannot hold the request: each request and each read of the body must
/// make progress within `stall` (`sources.stall_timeout`), and the whole inspection ends
/// after twice that.
pub(crate) async fn inspect(q: &Query<'_>) -> Preflight {
    let overall = q.stall.saturating_mul(2);
    match tokio::time::timeout(overall, inspect_within(q)).await {
        Ok(verdict) => verdict,
        Err(_) => Preflight::refused(
            format!(
                "cannot read the image: the source did not finish answering within {}s \
                 (twice sources.stall_timeout)",
                overall.as_secs()
            ),
            CacheState::Absent,
            None,
        ),
    }
}

/// `request`, failed when the source takes longer than `stall` to answer it.
async fn within<T>(
    stall: Duration,
    request: impl std::future::Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    tokio::time::timeout(stall, request)
        .await
        .unwrap_or_else(|_| {
            Err(SourceError::Transient(format!(
                "the source did not answer within {}s (sources.stall_timeout)",
                stall.as_secs()
            )))
        })
}

async fn inspect_within(q: &Query<'_>) -> Preflight {
    let Query {
        sources,
        cache,
        location,
        requested,
        stall,
    } = *q;
    let identity = location.identity();
    let entries: Vec<_> = cache
        .entries()
        .into_iter()
        .filter(|e| e.identity == identity)
        .collect();
    let object = match sources.object(location) {
        Ok(o) => o,
        Err(e) => {
            return Preflight::refused(
                format!("cannot read the image: {e}"),
                CacheState::Absent,
                None,
            );
        }
    };
    let meta = match within(stall, object.head(None)).await {
        Ok(Some(m)) => m,
        Ok(None) => {
            return Preflight::refused(
                "cannot read the image: the source answered 304 to a plain HEAD".into(),
                CacheState::Absent,
                None,
            );
        }
        Err(e) => {
            let newest = entries.last().map(|e| e.key.clone());
            let state = if newest.is_some() {
                CacheState::Stale
            } else {
                CacheState::Absent
            };
            return Preflight::refused(source_error(&e), state, newest);
        }
    };
    if let Some(entry) = entries
        .iter()
        .rev()
        .find(|e| super::cache::same_version(&meta, e))
    {
        return from_entry(entry, requested);
    }
    let (cache_state, cache_key) = match entries.last() {
        Some(e) => (CacheState::Stale, Some(e.key.clone())),
        None => (CacheState::Absent, None),
    };
    match read_head(&object, meta.size, stall).await {
        Ok(head) => Preflight {
            cache: cache_state,
            cache_key,
            ..from_head(&head, meta.size, requested)
        },
        Err(e) => Preflight::refused(source_error(&e), cache_state, cache_key),
    }
}

/// The verdict a cache entry of this very version gives (nothing is read from the source).
fn from_entry(entry: &super::cache::CacheEntry, requested: ImageType) -> Preflight {
    let verdict = inspect::check_requested(&entry.inspection, requested);
    Preflight {
        compression: entry.compression,
        format: Some(entry.inspection.format),
        virtual_size: Some(entry.inspection.virtual_size),
        size: Some(entry.size),
        cache: CacheState::Cached,
        cache_key: Some(entry.key.clone()),
        accepted: verdict.is_ok(),
        reason: verdict.err().map(|e| format!("image rejected: {e}")),
        bytes_read: 0,
    }
}

/// The verdict on the first bytes of an image of `size` bytes (cache fields left absent). A
/// compressed image is judged by the start of its content (whose size is not known yet).
fn from_head(raw_head: &[u8], size: u64, requested: ImageType) -> Preflight {
    let compression = Compression::detect(raw_head);
    let content;
    let (head, content_size) = match compression {
        Some(c) => {
            content = content_prefix(c, raw_head, MAX_HEADER_READ);
            (&content[..], u64::MAX)
        }
        None => (raw_head, size),
    };
    let verdict = inspect::inspect_bytes(head, content_size)
        .and_then(|found| inspect::check_requested(&found, requested).map(|_| found));
    let found = match &verdict {
        Ok(found) => Some(*found),
        // A mismatch still says what the image is.
        Err(InspectError::FormatMismatch { detected, .. }) => {
            inspect::inspect_bytes(head, content_size)
                .ok()
                .filter(|f| f.format == *detected)
        }
        Err(_) => None,
    };
    Preflight {
        compression,
        format: found.map(|f| f.format),
        // A compressed raw image's size is the content's, unknown before the download.
        virtual_size: found.map(|f| f.virtual_size).filter(|&v| v != u64::MAX),
        size: Some(size),
        cache: CacheState::Absent,
        cache_key: None,
        accepted: verdict.is_ok(),
        reason: verdict.err().map(|e| format!("image rejected: {e}")),
        bytes_read: raw_head.len() as u64,
    }
}

/// The first `min(size, MAX_HEADER_READ)` bytes, by one ranged GET; reading stops there
/// even if the source ignores the range and sends the whole object.
async fn read_head(
    object: &RemoteObject,
    size: u64,
    stall: Duration,
) -> Result<Vec<u8>, SourceError> {
    let want = size.min(MAX_HEADER_READ as u64);
    if want == 0 {
        return Ok(Vec::new());
    }
    let mut reply = within(stall, object.get(Some(0..want), None)).await?;
    let mut head = Vec::with_capacity(want as usize);
    while let Some(chunk) = within(stall, async { Ok(reply.body.next().await) }).await? {
        let chunk = chunk?;
        let room = want as usize - head.len();
        head.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if head.len() as u64 >= want {
            break;
        }
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compressed_qcow2_is_judged_by_the_header_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("d.qcow2");
        let ok = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("3G")
            .status()
            .unwrap();
        assert!(ok.success());
        let out = std::process::Command::new("xz")
            .args(["-c", "-T2"])
            .arg(&img)
            .output()
            .unwrap();
        let p = from_head(&out.stdout, out.stdout.len() as u64, ImageType::Qcow2);
        assert_eq!(p.compression, Some(Compression::Xz));
        assert_eq!(p.format, Some(ImageType::Qcow2));
        assert_eq!(p.virtual_size, Some(3 << 30));
        assert!(p.accepted, "{:?}", p.reason);
        let p = from_head(&out.stdout, out.stdout.len() as u64, ImageType::Raw);
        assert!(!p.accepted, "a declared raw is refused for a qcow2 inside");
        // A wrapped raw image: its size is unknown before the download.
        let p = from_head(&[0x1f, 0x8b, 0x08, 0, 0, 0], 6, ImageType::Raw);
        assert_eq!(p.compression, Some(Compression::Gzip));
        assert_eq!(p.virtual_size, None);
    }
}
