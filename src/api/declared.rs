//! `GET /api/v1/images`: the declared images (`[[images]]`) and what the daemon knows of
//! each (version, cached, last and next check, last error).

use std::sync::Arc;

use warp::http::StatusCode;
use warp::reply::Response;

use super::auth::Caller;
use super::error::ApiError;
use super::handlers::json_reply;
use super::state::ApiState;
use super::views::{DeclaredImageList, DeclaredImageView, rfc3339};

/// Lists the declared images, by name.
pub(crate) async fn list(
    caller: Result<Caller, ApiError>,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    caller?;
    let images = state
        .declared
        .list()
        .into_iter()
        .map(|d| DeclaredImageView {
            name: d.name,
            url: crate::config::without_userinfo(&d.url),
            digest: d.digest,
            cached: d.cached,
            golden: d.golden,
            last_checked: d.last_checked.map(rfc3339),
            last_changed: d.last_changed.map(rfc3339),
            next_check: d.next_check.map(rfc3339),
            last_error: d.last_error,
        })
        .collect();
    Ok(json_reply(&DeclaredImageList { images }, StatusCode::OK))
}
