//! Requests to an image's source, answered in types: the object's size, ETag and range
//! support (HEAD), a whole or ranged GET guarded by `If-Match`, and small reads (checksum
//! manifests and signatures). S3 requests are presigned with SigV4 by object_store and sent, like plain
//! HTTP(S), through the one client of `client.rs`; `file://` objects are read from disk. Every
//! failure becomes a [`SourceError`] decided from the HTTP status or the transport error.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use reqwest::{Method, StatusCode, header};
use url::Url;

use super::client::{RedirectRefused, redirect_refused};

/// How long a presigned S3 request stays valid (one request, sent right away).
const PRESIGN_EXPIRY: Duration = Duration::from_secs(15 * 60);

/// Why a request to the source failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SourceError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("access refused ({status}): {message}")]
    Auth { status: u16, message: String },
    /// 412, or an answer whose ETag is not the one the download started with.
    #[error("the object changed: {0}")]
    Changed(String),
    /// A 4xx answer not covered above: retrying will not help.
    #[error("the server refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    /// 5xx, 429 (S3 SlowDown is a 503), 408, or a network failure: worth another try.
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Redirect(RedirectRefused),
    #[error("{0}")]
    Io(String),
}

impl SourceError {
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, SourceError::Transient(_))
    }

    fn from_reqwest(e: reqwest::Error) -> SourceError {
        if let Some(refused) = redirect_refused(&e) {
            return SourceError::Redirect(refused);
        }
        // Presigned URLs carry a signature: never show the URL.
        SourceError::Transient(e.without_url().to_string())
    }

    /// The error an unwanted status stands for, with the server's own message.
    fn from_status(status: StatusCode, body: &str) -> SourceError {
        let message = server_message(status, body);
        match status.as_u16() {
            404 | 410 => SourceError::NotFound(message),
            401 | 403 => SourceError::Auth {
                status: status.as_u16(),
                message,
            },
            412 | 416 => SourceError::Changed(message),
            408 | 429 => SourceError::Transient(message),
            s if s >= 500 => SourceError::Transient(message),
            s => SourceError::Refused { status: s, message },
        }
    }
}

/// `<status>: <message>`: the S3 `<Code>`/`<Message>` of an XML error body, or the start of a
/// plain body.
fn server_message(status: StatusCode, body: &str) -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{name}>"))? + start;
        Some(body[start..end].trim().to_string())
    };
    let text = match (tag("Code"), tag("Message")) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        (Some(code), None) => code,
        _ => {
            let plain: String = body.chars().take(200).collect();
            plain.split_whitespace().collect::<Vec<_>>().join(" ")
        }
    };
    // The server's text is quoted in job errors and logs: never with its control characters.
    let text = crate::text::escape(&text);
    if text.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {text}")
    }
}

/// What the source says about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) size: u64,
    pub(crate) etag: Option<String>,
    /// `Last-Modified` as the source wrote it: with the size, what tells versions apart at a
    /// source that sends no ETag.
    pub(crate) last_modified: Option<String>,
    /// The source answers ranged GETs (`Accept-Ranges: bytes`; always for S3 and files).
    pub(crate) ranges: bool,
}

/// The answer to a GET: the range it holds and the body.
pub(crate) struct Reply {
    /// Byte range of the object in the body.
    pub(crate) range: Range<u64>,
    /// Whether the server answered the range asked for (206), rather than the whole object.
    pub(crate) partial: bool,
    pub(crate) etag: Option<String>,
    /// Size of the whole object.
    pub(crate) total: u64,
    pub(crate) body: BoxStream<'static, Result<Bytes, SourceError>>,
}

/// Where requests go.
#[derive(Clone)]
enum Target {
    Http(Url),
    S3 {
        store: Arc<AmazonS3>,
        path: ObjectPath,
    },
    File(PathBuf),
}

/// One object at a source, ready for requests.
#[derive(Clone)]
pub(crate) struct RemoteObject {
    client: reqwest::Client,
    target: Target,
}

impl RemoteObject {
    pub(crate) fn http(client: reqwest::Client, url: Url) -> RemoteObject {
        RemoteObject {
            client,
            target: Target::Http(url),
        }
    }

    pub(crate) fn s3(client: reqwest::Client, store: Arc<AmazonS3>, path: ObjectPath) -> Self {
        RemoteObject {
            client,
            target: Target::S3 { store, path },
        }
    }

    pub(crate) fn file(client: reqwest::Client, path: PathBuf) -> RemoteObject {
        RemoteObject {
            client,
            target: Target::File(path),
        }
    }

    /// Whether requests leave the machine (files are read locally: no retries, no ranges
    /// needed, no bandwidth cap).
    pub(crate) fn is_local(&self) -> bool {
        matches!(self.target, Target::File(_))
    }

    async fn url(&self, method: Method) -> Result<Url, SourceError> {
        match &self.target {
            Target::Http(url) => Ok(url.clone()),
            Target::S3 { store, path } => store
                .signed_url(method, path, PRESIGN_EXPIRY)
                .await
                .map_err(|e| SourceError::Io(format!("signing the S3 request: {e}"))),
            Target::File(_) => unreachable!("files are read locally"),
        }
    }

    /// Size, ETag and range support. With `if_none_match`, a 304 answer is `Ok(None)`
    /// (the object is still the one with that ETag).
    pub(crate) async fn head(
        &self,
        if_none_match: Option<&str>,
    ) -> Result<Option<Meta>, SourceError> {
        if let Target::File(path) = &self.target {
            return file_meta(path).await.map(Some);
        }
        let mut req = self.client.head(self.url(Method::HEAD).await?);
        if let Some(etag) = if_none_match {
            req = req.header(header::IF_NONE_MATCH, etag);
        }
        let resp = req.send().await.map_err(SourceError::from_reqwest)?;
        let status = resp.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(SourceError::from_status(status, ""));
        }
        let headers = resp.headers();
        let size = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .ok_or_else(|| SourceError::Refused {
                status: status.as_u16(),
                message: "the answer has no Content-Length: the image size is unknown".into(),
            })?;
        let ranges = match self.target {
            Target::S3 { .. } => true,
            _ => headers
                .get(header::ACCEPT_RANGES)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("bytes")),
        };
        Ok(Some(Meta {
            size,
            etag: etag_of(headers),
            last_modified: headers
                .get(header::LAST_MODIFIED)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            ranges,
        }))
    }

    /// A GET of `range` (the whole object when `None`), refused by the server with 412 if the
    /// object's ETag is no longer `if_match`.
    pub(crate) async fn get(
        &self,
        range: Option<Range<u64>>,
        if_match: Option<&str>,
    ) -> Result<Reply, SourceError> {
        if let Target::File(path) = &self.target {
            return file_get(path, range).await;
        }
        let mut req = self.client.get(self.url(Method::GET).await?);
        if let Some(r) = &range {
            req = req.header(header::RANGE, format!("bytes={}-{}", r.start, r.end - 1));
        }
        if let Some(etag) = if_match {
            req = req.header(header::IF_MATCH, etag);
        }
        let resp = req.send().await.map_err(SourceError::from_reqwest)?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(SourceError::from_status(status, &body));
        }
        let headers = resp.headers();
        let etag = etag_of(headers);
        let length = resp.content_length();
        let (range, partial, total) = if status == StatusCode::PARTIAL_CONTENT {
            let (r, total) = headers
                .get(header::CONTENT_RANGE)
                .and_then(|v| parse_content_range(v.to_str().ok()?))
                .ok_or_else(|| SourceError::Refused {
                    status: 206,
                    message: "a partial answer without a valid Content-Range".into(),
                })?;
            (r, true, total)
        } else {
            let total = length.ok_or_else(|| SourceError::Refused {
                status: status.as_u16(),
                message: "the answer has no Content-Length: the image size is unknown".into(),
            })?;
            (0..total, false, total)
        };
        let body = resp
            .bytes_stream()
            .map_err(SourceError::from_reqwest)
            .boxed();
        Ok(Reply {
            range,
            partial,
            etag,
            total,
            body,
        })
    }

    /// A small object in full (at most `limit` bytes: a checksum manifest or a signature), or
    /// `None` when it does not exist.
    pub(crate) async fn get_small(&self, limit: usize) -> Result<Option<Bytes>, SourceError> {
        if let Target::File(path) = &self.target {
            // A local sidecar must be a regular file beside the image, not a symlink elsewhere.
            return match std::fs::symlink_metadata(path) {
                Ok(m) if m.is_file() && m.len() as usize <= limit => {
                    let bytes = tokio::fs::read(path)
                        .await
                        .map_err(|e| SourceError::Io(format!("{}: {e}", path.display())))?;
                    Ok(Some(Bytes::from(bytes)))
                }
                _ => Ok(None),
            };
        }
        let reply = match self.get(None, None).await {
            Ok(r) => r,
            Err(SourceError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        if reply.total as usize > limit {
            return Err(SourceError::Refused {
                status: 200,
                message: format!(
                    "{} bytes, more than a checksum manifest or signature may have ({limit})",
                    reply.total
                ),
            });
        }
        let mut body = reply.body;
        let mut out = Vec::new();
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk?);
            if out.len() > limit {
                return Err(SourceError::Refused {
                    status: 200,
                    message: format!("longer than a checksum manifest may be ({limit} bytes)"),
                });
            }
        }
        Ok(Some(Bytes::from(out)))
    }
}

fn etag_of(headers: &header::HeaderMap) -> Option<String> {
    headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `bytes <start>-<end>/<total>` as a half-open range and the total.
fn parse_content_range(v: &str) -> Option<(Range<u64>, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (start, end) = span.split_once('-')?;
    let (start, end, total) = (
        start.trim().parse::<u64>().ok()?,
        end.trim().parse::<u64>().ok()?,
        total.trim().parse::<u64>().ok()?,
    );
    (start <= end && end < total).then_some((start..end + 1, total))
}

/// Size and a validator of a local file (modification time and size, as object_store's
/// local store spells its ETag).
async fn file_meta(path: &std::path::Path) -> Result<Meta, SourceError> {
    let m = tokio::fs::metadata(path)
        .await
        .map_err(|e| SourceError::NotFound(format!("{}: {e}", path.display())))?;
    use std::os::unix::fs::MetadataExt;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_micros())
        .unwrap_or(0);
    Ok(Meta {
        size: m.len(),
        etag: Some(format!("{:x}-{:x}-{:x}", m.ino(), mtime, m.len())),
        last_modified: None,
        ranges: true,
    })
}

async fn file_get(path: &std::path::Path, range: Option<Range<u64>>) -> Result<Reply, SourceError> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let meta = file_meta(path).await?;
    let range = range.unwrap_or(0..meta.size);
    if range.end > meta.size || range.start > range.end {
        return Err(SourceError::Changed(format!(
            "{} has {} bytes, not {}",
            path.display(),
            meta.size,
            range.end
        )));
    }
    let io = |e: std::io::Error| SourceError::Io(format!("{}: {e}", path.display()));
    let mut file = tokio::fs::File::open(path).await.map_err(io)?;
    file.seek(std::io::SeekFrom::Start(range.start))
        .await
        .map_err(io)?;
    let shown = path.display().to_string();
    let reader = file.take(range.end - range.start);
    let body = tokio_util::io::ReaderStream::with_capacity(reader, 1 << 20)
        .map_err(move |e| SourceError::Io(format!("{shown}: {e}")))
        .boxed();
    Ok(Reply {
        partial: range != (0..meta.size),
        range,
        etag: meta.etag,
        total: meta.size,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_become_typed_errors_with_the_servers_message() {
        let s3 = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let e = SourceError::from_status(StatusCode::SERVICE_UNAVAILABLE, s3);
        assert!(e.is_transient());
        assert_eq!(
            e.to_string(),
            "503 Service Unavailable: SlowDown: Please reduce your request rate."
        );
        let denied = "<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>";
        assert!(matches!(
            SourceError::from_status(StatusCode::FORBIDDEN, denied),
            SourceError::Auth { status: 403, .. }
        ));
        assert!(matches!(
            SourceError::from_status(StatusCode::NOT_FOUND, ""),
            SourceError::NotFound(_)
        ));
        assert!(matches!(
            SourceError::from_status(StatusCode::PRECONDITION_FAILED, ""),
            SourceError::Changed(_)
        ));
        assert!(SourceError::from_status(StatusCode::TOO_MANY_REQUESTS, "").is_transient());
        assert!(matches!(
            SourceError::from_status(StatusCode::BAD_REQUEST, "bad"),
            SourceError::Refused { status: 400, .. }
        ));
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0..100, 1000)));
        assert_eq!(parse_content_range("bytes 99-0/1000"), None);
        assert_eq!(parse_content_range("bytes 0-1000/1000"), None);
        assert_eq!(parse_content_range("bytes */1000"), None);
    }
}
