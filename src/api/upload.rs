//! `PUT /api/v1/volumes/{name}/content`: small uploads (cloud-init seed images) into a new
//! volume. The request is checked before anything is created: the name against
//! `volumes.upload_name_pattern` (403; empty = uploads off), `Content-Length` present (411)
//! and within `volumes.upload_max_bytes` (413), `Content-Type: application/octet-stream`
//! (415), an optional `X-Content-SHA256`; at most `volumes.upload_max_concurrent` run at
//! once (429). A refused body is read and dropped (up to the
//! limit) so the client reads the refusal. The write runs on its own task, so a client that
//! goes away mid-body still gets its half-made volume removed (`jobs/upload.rs`).

use std::sync::Arc;

use warp::http::StatusCode;
use warp::reply::Response;

use super::auth::Caller;
use super::error::{ApiError, Reason};
use super::handlers::{json_reply, volume_name_in_path};
use super::state::ApiState;
use super::views::Uploaded;
use crate::jobs::upload::{UploadError, UploadRequest};

/// The header carrying the body's SHA-256 (64 hex digits).
pub(crate) const SHA256_HEADER: &str = "x-content-sha256";

/// Whether uploads into `name` are allowed by `pattern` (`volumes.upload_name_pattern`).
fn check_name_allowed(name: &str, pattern: &str) -> Result<(), ApiError> {
    if pattern.is_empty() {
        return Err(ApiError::forbidden(
            Reason::UploadNotAllowed,
            "volume uploads are turned off (volumes.upload_name_pattern is empty)",
        ));
    }
    let allowed = glob::Pattern::new(pattern).is_ok_and(|p| p.matches(name));
    if !allowed {
        return Err(ApiError::forbidden(
            Reason::UploadNotAllowed,
            format!(
                "volume `{name}` does not match volumes.upload_name_pattern `{pattern}`; uploads \
                 only go into volumes named like that"
            ),
        ));
    }
    Ok(())
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"))
}

/// The declared length, checked against the limit.
fn check_length(headers: &http::HeaderMap, max: u64) -> Result<u64, ApiError> {
    let raw = header(headers, "content-length").ok_or_else(|| {
        ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            Reason::LengthRequired,
            "uploads need a Content-Length header",
        )
    })?;
    let length: u64 = raw
        .parse()
        .map_err(|_| ApiError::bad_request("Content-Length is not a number"))?;
    if length == 0 {
        return Err(ApiError::bad_request(
            "the upload is empty (Content-Length: 0)",
        ));
    }
    if length > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Reason::BodyTooLarge,
            format!("the upload has {length} bytes; volumes.upload_max_bytes allows {max}"),
        ));
    }
    Ok(length)
}

pub(super) fn check_headers(headers: &http::HeaderMap) -> Result<Option<String>, ApiError> {
    let content_type = header(headers, "content-type").unwrap_or("none");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/octet-stream") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Reason::UnsupportedMediaType,
            format!(
                "uploads must be sent with `Content-Type: application/octet-stream` (got `{}`)",
                content_type.chars().take(100).collect::<String>()
            ),
        ));
    }
    match header(headers, SHA256_HEADER) {
        None => Ok(None),
        Some(v) if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(Some(v.to_ascii_lowercase()))
        }
        Some(_) => Err(ApiError::bad_request(format!(
            "{SHA256_HEADER} must be 64 hex digits (the SHA-256 of the body)"
        ))),
    }
}

/// The checked request, or why it is refused.
fn check_request(
    raw_name: &str,
    headers: &http::HeaderMap,
    state: &ApiState,
    settings: &crate::config::Settings,
) -> Result<UploadRequest, ApiError> {
    let name = volume_name_in_path(raw_name, state)?;
    check_name_allowed(&name, &settings.volumes.upload_name_pattern)?;
    let length = check_length(headers, settings.volumes.upload_max_bytes)?;
    let sha256 = check_headers(headers)?;
    Ok(UploadRequest {
        volume: name,
        length,
        sha256,
        idle_timeout: settings.server.body_timeout,
        max_concurrent: settings.volumes.upload_max_concurrent,
    })
}

/// Reads and drops the body of a refused upload (at most `max` bytes, within `timeout`), so
/// a client still sending it reads the refusal instead of a broken connection. A body
/// declared larger than `max` is not read at all.
async fn drain<S, B>(body: S, headers: &http::HeaderMap, max: u64, timeout: std::time::Duration)
where
    S: futures::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    use futures::StreamExt;
    let declared = header(headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|l| l > max) {
        return;
    }
    let reading = async {
        let mut body = std::pin::pin!(body);
        let mut seen = 0u64;
        while let Some(Ok(chunk)) = body.next().await {
            seen += chunk.remaining() as u64;
            if seen > max {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(timeout, reading).await;
}

pub(crate) async fn upload<S, B>(
    raw_name: String,
    caller: Result<Caller, ApiError>,
    headers: http::HeaderMap,
    body: S,
    state: Arc<ApiState>,
) -> Result<Response, ApiError>
where
    S: futures::Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: bytes::Buf + Send + 'static,
{
    let caller = caller?;
    let settings = state.settings.current();
    let request = match check_request(&raw_name, &headers, &state, &settings) {
        Ok(r) => r,
        Err(e) => {
            let max = settings.volumes.upload_max_bytes;
            drain(body, &headers, max, settings.server.body_timeout).await;
            return Err(e);
        }
    };
    let (name, length) = (request.volume.clone(), request.length);
    let engine = state.engine.clone();
    // Its own task: dropping this request (client gone) must not skip the cleanup.
    let task = tokio::spawn(async move { engine.upload_volume(request, Box::pin(body)).await });
    let uploaded = task
        .await
        .map_err(|e| ApiError::internal(format!("upload task failed: {e}")))?
        .map_err(upload_error)?;
    tracing::info!(
        volume = %name,
        bytes = length,
        sha256 = %uploaded.sha256,
        requested_by = caller.identity().unwrap_or(""),
        "volume content uploaded"
    );
    Ok(json_reply(
        &Uploaded {
            status: "created",
            volume: name,
            volume_path: uploaded.volume.path.display().to_string(),
            size: length,
            sha256: uploaded.sha256,
        },
        StatusCode::CREATED,
    ))
}

fn upload_error(e: UploadError) -> ApiError {
    match e {
        UploadError::Busy { .. } => ApiError::conflict(Reason::VolumeInUse, e.to_string()),
        UploadError::Exists(_) => ApiError::conflict(Reason::VolumeExists, e.to_string()),
        UploadError::Short { .. } | UploadError::Long(_) | UploadError::Body(_) => {
            ApiError::bad_request(e.to_string())
        }
        UploadError::TooMany(_) => ApiError::too_many(Reason::TooManyUploads, e.to_string(), 5),
        UploadError::Stalled(_) | UploadError::TooSlow(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            Reason::BodyTimeout,
            e.to_string(),
        ),
        UploadError::Checksum { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            Reason::ChecksumMismatch,
            e.to_string(),
        ),
        UploadError::Volume(ref v) if v.is_out_of_space() => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            Reason::InsufficientStorage,
            e.to_string(),
        ),
        UploadError::Volume(_) | UploadError::Store(_) => ApiError::internal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_match_the_pattern() {
        assert!(check_name_allowed("vm1-cidata", "*-cidata").is_ok());
        assert!(check_name_allowed("vm1-root", "*-cidata").is_err());
        assert!(check_name_allowed("vm1-cidata", "").is_err(), "empty = off");
        assert!(check_name_allowed("seed-7", "seed-[0-9]").is_ok());
    }

    #[test]
    fn length_is_required_and_bounded() {
        let mut h = http::HeaderMap::new();
        assert_eq!(check_length(&h, 10).unwrap_err().status, 411);
        h.insert("content-length", "11".parse().unwrap());
        assert_eq!(check_length(&h, 10).unwrap_err().status, 413);
        h.insert("content-length", "10".parse().unwrap());
        assert_eq!(check_length(&h, 10).unwrap(), 10);
        h.insert("content-length", "0".parse().unwrap());
        assert_eq!(check_length(&h, 10).unwrap_err().status, 400);
    }
}
