//! Handlers of a volume's life after it was made: growing it (`POST
//! /api/v1/volumes/{name}/resize`). Deleting is in `handlers.rs`, uploading in `upload.rs`.

use std::sync::Arc;

use http::StatusCode;
use tracing::Instrument;
use warp::reply::Response;

use super::auth::Caller;
use super::bodies::ResizeBody;
use super::error::ApiError;
use super::handlers::{check_size_field, json_reply, parse_body, volume_name_in_path};
use super::reason::Reason;
use super::state::ApiState;
use super::views::VolumeResized;
use crate::jobs::resize::ResizeError;

/// `POST /api/v1/volumes/{name}/resize`: grows the volume (under its lock); a running domain
/// that uses it is told the new size.
pub(crate) async fn resize(
    name: String,
    caller: Result<Caller, ApiError>,
    body: Result<serde_json::Value, ApiError>,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    let caller = caller?;
    let body: ResizeBody = parse_body(body?)?;
    let name = volume_name_in_path(&name, &state)?;
    let size_gb = check_size_field("size_gb", body.size_gb)?;
    let span = tracing::info_span!("resize_volume", otel.name = "ResizeVolume", volume_name = %name, size_gb);
    let resized = state
        .engine
        .resize_volume(&name, size_gb)
        .instrument(span)
        .await
        .map_err(resize_error)?;
    if resized.changed {
        tracing::info!(
            volume = %name,
            size_bytes = resized.size_bytes,
            domain = resized.domain.as_deref().unwrap_or(""),
            requested_by = caller.identity().unwrap_or(""),
            "volume grown"
        );
    }
    Ok(json_reply(
        &VolumeResized {
            volume: name,
            size_bytes: resized.size_bytes,
            live: resized.domain.is_some(),
            domain: resized.domain,
        },
        StatusCode::OK,
    ))
}

fn resize_error(e: ResizeError) -> ApiError {
    match e {
        ResizeError::Busy { .. } => ApiError::conflict(Reason::VolumeInUse, e.to_string()),
        ResizeError::NotFound(_) => ApiError::not_found(Reason::VolumeNotFound, e.to_string()),
        ResizeError::Blocked { .. } => ApiError::conflict(Reason::VolumeBlocked, e.to_string()),
        ResizeError::Shrink { .. } => ApiError::conflict(Reason::ShrinkRefused, e.to_string()),
        ResizeError::Size(_) => ApiError::bad_request(e.to_string()),
        ResizeError::Volume(ref v) if v.is_out_of_space() => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            Reason::InsufficientStorage,
            e.to_string(),
        ),
        ResizeError::Volume(crate::volume::VolumeError::Conflict(_)) => {
            ApiError::conflict(Reason::VolumeBlocked, e.to_string())
        }
        ResizeError::Volume(_) | ResizeError::Task(_) => ApiError::internal(e.to_string()),
    }
}
