//! `POST /api/v1/images/inspect {image_url, image_type?}`: would a job accept this image?
//! Format, sizes, cache state and the verdict of the same allow-lists and inspector a job
//! meets, without a job or a volume (`image/preflight.rs`). A request that is malformed gets
//! 400; an image a job would refuse (outside the allow-lists, missing, hostile) gets 200 with
//! `accepted: false` and the reason.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use warp::http::StatusCode;
use warp::reply::Response;

use super::auth::Caller;
use super::error::ApiError;
use super::handlers::{check_image_type, check_image_url_text, json_reply, parse_body};
use super::state::ApiState;
use crate::image::preflight::{self, CacheState, Preflight};
use crate::image::source;

/// The request body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"image_url": "s3://vm-images/ubuntu-24.04.qcow2"})))]
pub(crate) struct InspectBody {
    /// The image, as a job would name it: not blank, at most 4096 characters (a source the
    /// configuration refuses is a verdict, not a 400).
    #[schema(required = true, value_type = String, min_length = 1, max_length = 4096,
        pattern = r"^[^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]*[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028-\u202f\u205f\u2066-\u2069\u3000][^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]*$")]
    image_url: Option<String>,
    /// `qcow2` (default) or `raw`: what a job would declare.
    #[schema(value_type = Option<crate::image::ImageType>)]
    image_type: Option<String>,
}

/// The answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct InspectResponse {
    pub(crate) image_url: String,
    #[serde(flatten)]
    pub(crate) verdict: Preflight,
}

pub(crate) async fn inspect(
    caller: Result<Caller, ApiError>,
    body: Result<serde_json::Value, ApiError>,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    caller?;
    let body: InspectBody = parse_body(body?)?;
    let image_url = check_image_url_text(body.image_url)?;
    let requested = check_image_type(body.image_type)?;
    let settings = state.settings.current();
    let verdict = match source::resolve(&image_url, &settings) {
        Ok(location) => {
            let stall = settings.sources.stall_timeout;
            preflight::inspect(&preflight::Query {
                sources: &state.sources,
                cache: &state.cache,
                location: &location,
                requested,
                stall,
            })
            .await
        }
        Err(refused) => Preflight {
            format: None,
            virtual_size: None,
            size: None,
            cache: CacheState::Absent,
            cache_key: None,
            accepted: false,
            reason: Some(refused.to_string()),
            bytes_read: 0,
        },
    };
    Ok(json_reply(
        &InspectResponse { image_url, verdict },
        StatusCode::OK,
    ))
}
