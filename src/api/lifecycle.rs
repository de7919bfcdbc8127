//! Handlers of a volume's life after it was made: growing it (`POST
//! /api/v1/volumes/{name}/resize`) and cloning it (`POST /api/v1/volumes/{name}/clone`, a job).
//! Deleting is in `handlers.rs`, uploading in `upload.rs`.

use std::sync::Arc;

use http::StatusCode;
use tracing::Instrument;
use warp::reply::Response;

use super::auth::Caller;
use super::bodies::{CloneBody, ResizeBody};
use super::error::ApiError;
use super::handlers::{
    accepted, caller_and_body, check_size_field, json_reply, submit_error, submit_spec,
    volume_name_in_path,
};
use super::reason::Reason;
use super::state::ApiState;
use super::views::{StateNames, VolumeResized};
use crate::jobs::clone::CloneRefused;
use crate::jobs::engine::{SubmitError, Submitted};
use crate::jobs::model::{CloneSpec, JobKind, JobSpec};
use crate::jobs::resize::ResizeError;

/// `POST /api/v1/volumes/{name}/resize`: grows the volume (under its lock); a running domain
/// that uses it is told the new size.
pub(crate) async fn resize(
    name: String,
    caller: Result<Caller, ApiError>,
    body: Result<serde_json::Value, ApiError>,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    let (caller, body): (Caller, ResizeBody) = caller_and_body(caller, body)?;
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

/// `POST /api/v1/volumes/{name}/clone`: a `clone` job that makes `target` a copy of the volume
/// (a thin snapshot, or a copy); the source and the target are checked before the job exists.
pub(crate) async fn clone(
    name: String,
    caller: Result<Caller, ApiError>,
    body: Result<serde_json::Value, ApiError>,
    headers: http::HeaderMap,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    let (caller, body): (Caller, CloneBody) = caller_and_body(caller, body)?;
    let source = volume_name_in_path(&name, &state)?;
    let target = body
        .target
        .ok_or_else(|| ApiError::bad_request("target is required"))?;
    crate::volume::validate_volume_name(&target)
        .and_then(|_| state.volumes.validate_name(&target))
        .map_err(|e| ApiError::bad_request(format!("target: {e}")))?;
    if target == source {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            Reason::VolumeExists,
            "target is the source volume itself: name a new volume",
        ));
    }
    let size_gb = match body.size_gb {
        Some(v) => Some(check_size_field("size_gb", Some(v))?),
        None => None,
    };
    let spec = JobSpec {
        volume_name: Some(target),
        volume_size_gb: size_gb,
        clone: Some(CloneSpec {
            source,
            allow_in_use: body.allow_in_use,
        }),
        encryption: body.encryption.map(|e| e.check()).transpose()?,
        ..JobSpec::default()
    };
    let refused = |e| match e {
        SubmitError::Clone(refused) => clone_refused(refused),
        other => submit_error(other),
    };
    let job = (JobKind::Clone, spec);
    let submitted = submit_spec(&state, &caller, &headers, job, refused).await?;
    if let Submitted::New(job) = &submitted {
        tracing::info!(
            job_id = %job.id,
            source = %name,
            volume_name = job.spec.volume_name.as_deref().unwrap_or(""),
            requested_by = caller.identity().unwrap_or(""),
            "clone job accepted"
        );
    }
    Ok(accepted(&submitted, StateNames::Ours))
}

fn clone_refused(e: CloneRefused) -> ApiError {
    match e {
        CloneRefused::SourceNotFound(_) => {
            ApiError::not_found(Reason::VolumeNotFound, e.to_string())
        }
        CloneRefused::TargetExists(_) => ApiError::conflict(Reason::VolumeExists, e.to_string()),
        CloneRefused::InUse { .. } => ApiError::conflict(Reason::VolumeInUse, e.to_string()),
        CloneRefused::Blocked { .. } => ApiError::conflict(Reason::VolumeBlocked, e.to_string()),
        CloneRefused::Shrink { .. } => ApiError::conflict(Reason::ShrinkRefused, e.to_string()),
        CloneRefused::Volume(ref v) if v.is_out_of_space() => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            Reason::InsufficientStorage,
            e.to_string(),
        ),
        CloneRefused::Volume(crate::volume::VolumeError::Conflict(_)) => {
            ApiError::conflict(Reason::VolumeBlocked, e.to_string())
        }
        CloneRefused::Volume(crate::volume::VolumeError::EncryptionRefused(_)) => {
            ApiError::conflict(Reason::EncryptionRefused, e.to_string())
        }
        CloneRefused::Spec(_) | CloneRefused::Volume(_) => ApiError::internal(e.to_string()),
    }
}
