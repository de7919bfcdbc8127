//! Job routes: submit (and the Go service's two legacy paths), list, status (and its legacy
//! path), the progress stream, cancel (and its legacy path). The legacy paths name the job
//! states as the Go service did (`StateNames::GoService`: `cancelled` shows as `failed`).

use std::sync::Arc;

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::Method;
use warp::reply::Response;

use super::route::{RouteDef, listing, with_state};
use crate::api::auth::Caller;
use crate::api::error::ApiError;
use crate::api::state::ApiState;
use crate::api::views::StateNames;
use crate::api::{caller, conn, events, handlers};

/// The rows of this group.
pub(crate) const ROUTES: &[RouteDef] = &[
    RouteDef {
        method: Method::POST,
        template: "/api/v1/jobs",
        build: |at, s| {
            submit(
                warp::path!("api" / "v1" / "jobs").and(at).boxed(),
                s,
                StateNames::Ours,
            )
        },
    },
    RouteDef {
        method: Method::POST,
        template: "/api/v1/provision",
        build: |at, s| {
            submit(
                warp::path!("api" / "v1" / "provision").and(at).boxed(),
                s,
                StateNames::GoService,
            )
        },
    },
    RouteDef {
        method: Method::POST,
        template: "/provision",
        build: |at, s| {
            submit(
                warp::path!("provision").and(at).boxed(),
                s,
                StateNames::GoService,
            )
        },
    },
    RouteDef {
        method: Method::GET,
        template: "/api/v1/jobs",
        build: |at, s| {
            warp::path!("api" / "v1" / "jobs")
                .and(at)
                .and(listing(s.clone()))
                .and(with_state(s))
                .then(handlers::list)
                .map(handlers::respond)
                .boxed()
        },
    },
    RouteDef {
        method: Method::GET,
        template: "/api/v1/jobs/{id}",
        build: |at, s| {
            by_id(
                warp::path!("api" / "v1" / "jobs" / String).and(at).boxed(),
                s,
                StateNames::Ours,
                handlers::status,
            )
        },
    },
    RouteDef {
        method: Method::GET,
        template: "/api/v1/status/{id}",
        build: |at, s| {
            by_id(
                warp::path!("api" / "v1" / "status" / String)
                    .and(at)
                    .boxed(),
                s,
                StateNames::GoService,
                handlers::status,
            )
        },
    },
    RouteDef {
        method: Method::GET,
        template: "/api/v1/jobs/{id}/events",
        build: |at, s| {
            warp::path!("api" / "v1" / "jobs" / String / "events")
                .and(at)
                .and(caller::caller(s.clone()))
                .and(warp::ext::optional::<conn::ConnInfo>())
                .and(warp::header::headers_cloned())
                .and(with_state(s))
                .then(events::events)
                .map(handlers::respond)
                .boxed()
        },
    },
    RouteDef {
        method: Method::POST,
        template: "/api/v1/jobs/{id}/cancel",
        build: |at, s| {
            by_id(
                warp::path!("api" / "v1" / "jobs" / String / "cancel")
                    .and(at)
                    .boxed(),
                s,
                StateNames::Ours,
                handlers::cancel,
            )
        },
    },
    RouteDef {
        method: Method::DELETE,
        template: "/api/v1/cancel/{id}",
        build: |at, s| {
            by_id(
                warp::path!("api" / "v1" / "cancel" / String)
                    .and(at)
                    .boxed(),
                s,
                StateNames::GoService,
                handlers::cancel,
            )
        },
    },
];

/// The route's names of the job states, for handlers.
fn with_names(
    names: StateNames,
) -> impl Filter<Extract = (StateNames,), Error = std::convert::Infallible> + Clone {
    warp::any().map(move || names)
}

/// `POST` of a provision request, on any of its three paths.
fn submit(path: BoxedFilter<()>, s: Arc<ApiState>, names: StateNames) -> BoxedFilter<(Response,)> {
    path.and(handlers::caller_and_json_body(s.clone()))
        .and(warp::header::headers_cloned())
        .and(with_state(s))
        .and(with_names(names))
        .then(handlers::submit)
        .map(handlers::respond)
        .boxed()
}

/// A route about one job (`{id}`): its status or its cancellation, on either path.
fn by_id<H, Fut>(
    path: BoxedFilter<(String,)>,
    s: Arc<ApiState>,
    names: StateNames,
    handler: H,
) -> BoxedFilter<(Response,)>
where
    H: Fn(String, Result<Caller, ApiError>, Arc<ApiState>, StateNames) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = Result<Response, ApiError>> + Send + 'static,
{
    path.and(caller::caller(s.clone()))
        .and(with_state(s))
        .and(with_names(names))
        .then(handler)
        .map(handlers::respond)
        .boxed()
}
