//! Job routes: submit (and the Go service's two legacy paths), list, status (and its legacy
//! path), the progress stream, cancel (and its legacy path). The legacy paths name the job
//! states as the Go service did (`StateNames::GoService`: `cancelled` shows as `failed`).

use std::sync::Arc;

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::Method;
use warp::reply::Response;

use super::route::{RouteDef, raw_query, with_state};
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
                .and(caller::caller(s.clone()))
                .and(raw_query())
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
            status(
                warp::path!("api" / "v1" / "jobs" / String).and(at).boxed(),
                s,
                StateNames::Ours,
            )
        },
    },
    RouteDef {
        method: Method::GET,
        template: "/api/v1/status/{id}",
        build: |at, s| {
            status(
                warp::path!("api" / "v1" / "status" / String)
                    .and(at)
                    .boxed(),
                s,
                StateNames::GoService,
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
            cancel(
                warp::path!("api" / "v1" / "jobs" / String / "cancel")
                    .and(at)
                    .boxed(),
                s,
                StateNames::Ours,
            )
        },
    },
    RouteDef {
        method: Method::DELETE,
        template: "/api/v1/cancel/{id}",
        build: |at, s| {
            cancel(
                warp::path!("api" / "v1" / "cancel" / String)
                    .and(at)
                    .boxed(),
                s,
                StateNames::GoService,
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

/// A job's status, on either path.
fn status(
    path: BoxedFilter<(String,)>,
    s: Arc<ApiState>,
    names: StateNames,
) -> BoxedFilter<(Response,)> {
    path.and(caller::caller(s.clone()))
        .and(with_state(s))
        .and(with_names(names))
        .then(handlers::status)
        .map(handlers::respond)
        .boxed()
}

/// Cancelling a job, on either path.
fn cancel(
    path: BoxedFilter<(String,)>,
    s: Arc<ApiState>,
    names: StateNames,
) -> BoxedFilter<(Response,)> {
    path.and(caller::caller(s.clone()))
        .and(with_state(s))
        .and(with_names(names))
        .then(handlers::cancel)
        .map(handlers::respond)
        .boxed()
}
