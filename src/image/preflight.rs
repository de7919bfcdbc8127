//! Preflight inspection (`POST /api/v1/images/inspect`): what a job would find in an image,
//! without a job, a volume or a download. The source is asked for the object's size and ETag;
//! a cache entry of the same object answers from its stored verdict, anything else is judged
//! from a ranged GET of at most `inspect::MAX_HEADER_READ` bytes (never the whole object) by
//! the same inspector the cache runs on every download.

use futures::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use serde::Serialize;

use super::ImageType;
use super::cache::ImageCache;
use super::client::redirect_refused;
use super::inspect::{self, InspectError, MAX_HEADER_READ};
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

/// Why the source could not be read, as the job would report it.
fn source_error(e: &object_store::Error) -> String {
    if let Some(r) = redirect_refused(e) {
        return format!(
            "download refused: {r}; list the host in sources.allowed_hosts if it is trusted"
        );
    }
    match e {
        object_store::Error::NotFound { .. } => format!("image not found: {e}"),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            format!("access to the image was refused: {e}")
        }
        _ => format!("cannot read the image: {e}"),
    }
}

/// Inspects the image at `location` as a job asking for `requested` would.
pub(crate) async fn inspect(
    sources: &SourceClients,
    cache: &ImageCache,
    location: &Location,
    requested: ImageType,
) -> Preflight {
    let identity = location.identity();
    let entries: Vec<_> = cache
        .entries()
        .into_iter()
        .filter(|e| e.identity == identity)
        .collect();
    let (store, path) = match sources.store_for(location) {
        Ok(s) => s,
        Err(e) => {
            return Preflight::refused(
                format!("cannot read the image: {e}"),
                CacheState::Absent,
                None,
            );
        }
    };
    let meta = match store.head(&path).await {
        Ok(m) => m,
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
        .find(|e| e.etag == meta.e_tag && e.size == meta.size)
    {
        let verdict = inspect::check_requested(&entry.inspection, requested);
        return Preflight {
            format: Some(entry.inspection.format),
            virtual_size: Some(entry.inspection.virtual_size),
            size: Some(entry.size),
            cache: CacheState::Cached,
            cache_key: Some(entry.key.clone()),
            accepted: verdict.is_ok(),
            reason: verdict.err().map(|e| format!("image rejected: {e}")),
            bytes_read: 0,
        };
    }
    let (cache_state, cache_key) = match entries.last() {
        Some(e) => (CacheState::Stale, Some(e.key.clone())),
        None => (CacheState::Absent, None),
    };
    let (head, bytes_read) = match read_head(store.as_ref(), &path, meta.size).await {
        Ok(head) => {
            let n = head.len() as u64;
            (head, n)
        }
        Err(e) => return Preflight::refused(source_error(&e), cache_state, cache_key),
    };
    let verdict = inspect::inspect_bytes(&head, meta.size)
        .and_then(|found| inspect::check_requested(&found, requested).map(|_| found));
    let found = match &verdict {
        Ok(found) => Some(*found),
        // A mismatch still says what the image is.
        Err(InspectError::FormatMismatch { detected, .. }) => {
            inspect::inspect_bytes(&head, meta.size)
                .ok()
                .filter(|f| f.format == *detected)
        }
        Err(_) => None,
    };
    Preflight {
        format: found.map(|f| f.format),
        virtual_size: found.map(|f| f.virtual_size),
        size: Some(meta.size),
        cache: cache_state,
        cache_key,
        accepted: verdict.is_ok(),
        reason: verdict.err().map(|e| format!("image rejected: {e}")),
        bytes_read,
    }
}

/// The first `min(size, MAX_HEADER_READ)` bytes, by one ranged GET (read no further).
async fn read_head(
    store: &dyn ObjectStore,
    path: &object_store::path::Path,
    size: u64,
) -> Result<Vec<u8>, object_store::Error> {
    let want = size.min(MAX_HEADER_READ as u64);
    if want == 0 {
        return Ok(Vec::new());
    }
    let options = GetOptions {
        range: Some(GetRange::Bounded(0..want)),
        ..GetOptions::default()
    };
    let mut stream = store.get_opts(path, options).await?.into_stream();
    let mut head = Vec::with_capacity(want as usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let room = want as usize - head.len();
        head.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if head.len() as u64 >= want {
            break;
        }
    }
    Ok(head)
}
