//! Preflight inspection (`POST /api/v1/images/inspect`): what a job would find in an image,
//! without a job, a volume or a download. The source is asked for the object's size and ETag;
//! a cache entry of the same object answers from its stored verdict, anything else is judged
//! by the same inspector the cache runs on every download, fed by ranged GETs: first the head
//! (at most `inspect::MAX_HEADER_READ` bytes), then whatever range the inspector reports
//! missing (a VHD footer, a VHDX metadata table, an OVA's next tar header), at most
//! `MAX_ROUNDS` more requests and `MAX_PREFLIGHT_BYTES` in all, never the whole object.

use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;

use super::ImageType;
use super::cache::{Compression, ImageCache, content_prefix};
use super::inspect::{self, InspectError, Inspection, MAX_HEADER_READ, Ranges, Subformat};
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

/// Ranged requests after the head, at most.
const MAX_ROUNDS: usize = 32;
/// Bytes read from the source for one preflight, at most.
const MAX_PREFLIGHT_BYTES: u64 = 8 << 20;
/// The least a follow-up request asks for (fewer round trips for neighbouring reads).
const MIN_RANGE: u64 = 64 << 10;

/// The verdict on an image.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Preflight {
    /// The wrapper around the image (`gzip`, `xz`, `bzip2`, `zstd`), found from its first
    /// bytes; `null` for a bare image. The other fields are then of the image inside.
    pub(crate) compression: Option<Compression>,
    /// The format found (`qcow2`, `raw`, `vmdk`, `vhdx`, `vpc`, `vdi`; for an OVA, its disk's);
    /// `null` when the image could not be read or was refused before its format was known.
    pub(crate) format: Option<ImageType>,
    /// The format's variant (`monolithicSparse`, `streamOptimized`, `fixed`, `dynamic`).
    pub(crate) subformat: Option<Subformat>,
    /// `ova` when the image is the disk inside an OVA.
    pub(crate) container: Option<String>,
    /// Size of the disk the image describes.
    pub(crate) virtual_size: Option<u64>,
    /// The checks the inspector applies to this kind of image (a job passes `-f` with the
    /// format found to every qemu-img call).
    pub(crate) checks: Vec<String>,
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
    /// The digest a job would check the image against, and who signed the manifest naming
    /// it (the manifest and its signatures are fetched and checked; the image is not hashed).
    /// Absent when nothing names a checksum, or the image was refused before.
    pub(crate) verified: Option<super::verify::Verified>,
}

impl Preflight {
    /// A refusal before anything of the image was judged.
    pub(crate) fn refused(
        reason: String,
        cache: CacheState,
        cache_key: Option<String>,
    ) -> Preflight {
        Preflight {
            compression: None,
            format: None,
            subformat: None,
            container: None,
            checks: Vec::new(),
            virtual_size: None,
            size: None,
            cache,
            cache_key,
            accepted: false,
            reason: Some(reason),
            bytes_read: 0,
            verified: None,
        }
    }
}

/// What a preflight looks at, and where.
#[derive(Clone, Copy)]
pub(crate) struct Query<'a> {
    pub(crate) sources: &'a SourceClients,
    pub(crate) cache: &'a ImageCache,
    pub(crate) location: &'a Location,
    /// What a job would declare (`image_type`; `None`: `auto`).
    pub(crate) requested: Option<ImageType>,
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
    match judge(&object, meta.size, stall).await {
        Ok((ranges, verdict, bytes_read, compression)) => {
            let p = from_verdict(&ranges, verdict, meta.size, requested);
            Preflight {
                compression,
                // A compressed image's own size is not known before its download.
                virtual_size: p.virtual_size.filter(|&v| v != u64::MAX),
                cache: cache_state,
                cache_key,
                bytes_read,
                ..p
            }
        }
        Err(e) => Preflight::refused(source_error(&e), cache_state, cache_key),
    }
}

/// The checks a job would make: the digest of its checksum origin, the manifest's signature;
/// a verdict that was accepted is refused when they fail (within `stall` twice).
pub(crate) async fn verify(
    source: &super::resolved::Source,
    stall: Duration,
    verdict: &mut Preflight,
) {
    if !verdict.accepted {
        return;
    }
    let overall = stall.saturating_mul(2);
    match tokio::time::timeout(overall, source.expected()).await {
        Ok(Ok(expected)) => verdict.verified = expected.map(|e| e.verified),
        Ok(Err(e)) => {
            verdict.accepted = false;
            verdict.reason = Some(e.to_string());
        }
        Err(_) => {
            verdict.accepted = false;
            verdict.reason = Some(format!(
                "cannot read the checksum manifest within {}s (twice sources.stall_timeout)",
                overall.as_secs()
            ));
        }
    }
}

/// The verdict a cache entry of this very version gives (nothing is read from the source).
fn from_entry(entry: &super::cache::CacheEntry, requested: Option<ImageType>) -> Preflight {
    let found = entry.inspection;
    let verdict = match requested {
        Some(r) => inspect::check_requested(&found, r),
        None => Ok(()),
    };
    Preflight {
        compression: entry.compression,
        cache: CacheState::Cached,
        cache_key: Some(entry.key.clone()),
        accepted: verdict.is_ok(),
        reason: verdict.err().map(|e| format!("image rejected: {e}")),
        ..described(&found, entry.size)
    }
}

/// What an accepted inspection says about the image (verdict and cache fields left open).
fn described(found: &Inspection, size: u64) -> Preflight {
    Preflight {
        compression: None,
        format: Some(found.format),
        subformat: found.subformat,
        container: found.ova_disk.map(|_| "ova".to_string()),
        virtual_size: Some(found.virtual_size),
        checks: inspect::checks_of(found)
            .iter()
            .map(|c| c.to_string())
            .collect(),
        size: Some(size),
        cache: CacheState::Absent,
        cache_key: None,
        accepted: true,
        reason: None,
        bytes_read: 0,
        verified: None,
    }
}

/// The verdict on an image of `size` bytes from the ranges read (cache fields left absent).
fn from_verdict(
    ranges: &Ranges,
    verdict: Result<Inspection, InspectError>,
    size: u64,
    requested: Option<ImageType>,
) -> Preflight {
    match verdict {
        Ok(found) => {
            let checked = match requested {
                Some(r) => inspect::check_requested(&found, r),
                None => Ok(()),
            };
            Preflight {
                accepted: checked.is_ok(),
                // A mismatch still says what the image is.
                reason: checked.err().map(|e| format!("image rejected: {e}")),
                ..described(&found, size)
            }
        }
        Err(e) => Preflight {
            checks: inspect::detect(ranges)
                .map(|d| inspect::checks(d).iter().map(|c| c.to_string()).collect())
                .unwrap_or_default(),
            size: Some(size),
            ..Preflight::refused(format!("image rejected: {e}"), CacheState::Absent, None)
        },
    }
}

/// The start of a compressed object's content as the inspector's ranges. Content shorter than
/// what a head may hold is all there is (the stream ended in the head): its length is the
/// content's size; otherwise the size is unknown.
fn content_ranges(c: Compression, head: &[u8]) -> Ranges {
    let prefix = content_prefix(c, head, MAX_HEADER_READ);
    let size = if prefix.len() < MAX_HEADER_READ {
        prefix.len() as u64
    } else {
        u64::MAX
    };
    let mut ranges = Ranges::new(size);
    ranges.add(0, prefix);
    ranges
}

/// Runs the inspector on ranges of the object: the head first, then each range it reports
/// missing, until it decides (or the rounds or bytes allowed are spent). Returns the ranges
/// read, the verdict, the bytes read and the compression found. A compressed image is judged
/// by the start of its content, decoded from the head (no other range of it can be read).
async fn judge(object: &RemoteObject, size: u64, stall: Duration) -> Result<Judged, SourceError> {
    let want = size.min(MAX_HEADER_READ as u64);
    let head = read_range(object, 0..want, stall).await?;
    let mut read = head.len() as u64;
    if let Some(c) = Compression::detect(&head) {
        let ranges = content_ranges(c, &head);
        let verdict = inspect::inspect(&ranges);
        return Ok((ranges, verdict, read, Some(c)));
    }
    let mut ranges = Ranges::new(size);
    ranges.add(0, head);
    for _ in 0..MAX_ROUNDS {
        let verdict = inspect::inspect(&ranges);
        let Some((offset, len)) = ranges.take_missing().filter(|_| verdict.is_err()) else {
            return Ok((ranges, verdict, read, None));
        };
        let end = offset.saturating_add(len.max(MIN_RANGE)).min(size);
        if read + (end - offset) > MAX_PREFLIGHT_BYTES {
            break;
        }
        let data = read_range(object, offset..end, stall).await?;
        read += data.len() as u64;
        ranges.add(offset, data);
    }
    let verdict = Err(InspectError::Io(format!(
        "preflight would read more than {MAX_ROUNDS} ranges or {MAX_PREFLIGHT_BYTES} bytes; \
         a job inspects the downloaded file"
    )));
    Ok((ranges, verdict, read, None))
}

/// What `judge` found: the ranges read, the verdict, the bytes read, the compression.
type Judged = (
    Ranges,
    Result<Inspection, InspectError>,
    u64,
    Option<Compression>,
);

/// The bytes `range` of the object, by one ranged GET; reading stops at the range's end even
/// if the source ignores the range and sends the whole object (such a source gives the
/// object's start, which is wrong for any other range: refused).
async fn read_range(
    object: &RemoteObject,
    range: std::ops::Range<u64>,
    stall: Duration,
) -> Result<Vec<u8>, SourceError> {
    let want = range.end.saturating_sub(range.start);
    if want == 0 {
        return Ok(Vec::new());
    }
    let mut reply = within(stall, object.get(Some(range.clone()), None)).await?;
    if reply.range.start != range.start {
        return Err(SourceError::Refused {
            status: 200,
            message: format!("the source ignored a request for bytes {range:?}"),
        });
    }
    let mut data = Vec::with_capacity(want as usize);
    while let Some(chunk) = within(stall, async { Ok(reply.body.next().await) }).await? {
        let chunk = chunk?;
        let room = want as usize - data.len();
        data.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if data.len() as u64 >= want {
            break;
        }
    }
    Ok(data)
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
        let head = &out.stdout;
        let c = Compression::detect(head).unwrap();
        assert_eq!(c, Compression::Xz);
        let ranges = content_ranges(c, head);
        let p = from_verdict(
            &ranges,
            inspect::inspect(&ranges),
            1,
            Some(ImageType::Qcow2),
        );
        assert_eq!(p.format, Some(ImageType::Qcow2), "{:?}", p.reason);
        assert_eq!(p.virtual_size, Some(3 << 30));
        assert!(p.accepted, "{:?}", p.reason);
    }
}
