//! `POST /api/v1/images/inspect {image_url, image_type?, checksum?, checksum_url?}`: would a
//! job accept this image, and what would it check it against?
//! Format, sizes, cache state and the verdict of the same allow-lists and inspector a job
//! meets, without a job or a volume (`image/preflight.rs`). A request that is malformed gets
//! 400; an image a job would refuse (outside the allow-lists, missing, hostile) gets 200 with
//! `accepted: false` and the reason.

use std::sync::Arc;

use warp::http::StatusCode;
use warp::reply::Response;

use super::auth::Caller;
use super::bodies::InspectBody;
use super::error::ApiError;
use super::handlers::{
    check_checksum_fields, check_image_type, check_image_url_text, json_reply, parse_body,
};
use super::state::ApiState;
use super::views::InspectResponse;
use crate::image::preflight::{self, CacheState, Preflight};
use crate::image::resolved::{self, SourceRequest};

pub(crate) async fn inspect(
    caller: Result<Caller, ApiError>,
    body: Result<serde_json::Value, ApiError>,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    caller?;
    let body: InspectBody = parse_body(body?)?;
    let image_url = check_image_url_text(body.image_url)?;
    let requested = check_image_type(body.image_type)?;
    let checksum_url =
        check_checksum_fields(&image_url, body.checksum.as_deref(), body.checksum_url)?;
    let settings = state.settings.current();
    let request = SourceRequest {
        image_url: &image_url,
        checksum: body.checksum.as_deref(),
        checksum_url: checksum_url.as_deref(),
    };
    let verdict = match resolved::resolve(&state.sources, &request, &settings.source_policy()) {
        Ok(source) => {
            let stall = settings.sources.stall_timeout;
            let mut verdict = preflight::inspect(&preflight::Query {
                sources: &state.sources,
                cache: &state.cache,
                location: &source.location,
                requested,
                stall,
            })
            .await;
            preflight::verify(&source, stall, &mut verdict).await;
            verdict
        }
        Err(refused) => Preflight::refused(refused.to_string(), CacheState::Absent, None),
    };
    Ok(json_reply(
        &InspectResponse { image_url, verdict },
        StatusCode::OK,
    ))
}
