//! Open routes (health, readiness, metrics) and the self-description routes (OpenAPI
//! document, effective configuration).

use std::sync::Arc;

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::Method;
use warp::reply::Response;

use super::route::{At, RouteDef, with_state};
use crate::api::state::ApiState;
use crate::api::{caller, handlers};

/// A row of an open GET route at `/<segment>` answered by `handler` from the shared state.
macro_rules! open_get {
    ($template:literal, $segment:literal, $handler:path) => {
        RouteDef {
            method: Method::GET,
            template: $template,
            build: |at, s| {
                warp::path($segment)
                    .and(warp::path::end())
                    .and(at)
                    .and(with_state(s))
                    .map($handler)
                    .boxed()
            },
        }
    };
}

/// The rows of this group.
pub(crate) const ROUTES: &[RouteDef] = &[
    open_get!("/health", "health", handlers::health),
    open_get!("/healthz", "healthz", handlers::health),
    open_get!("/livez", "livez", handlers::health),
    open_get!("/readyz", "readyz", handlers::ready),
    RouteDef {
        method: Method::GET,
        template: "/metrics",
        build: metrics,
    },
    RouteDef {
        method: Method::GET,
        template: "/api/v1/openapi.json",
        build: |at, s| {
            warp::path!("api" / "v1" / "openapi.json")
                .and(at)
                .and(caller::caller(s.clone()))
                .and(with_state(s))
                .map(handlers::openapi)
                .boxed()
        },
    },
    RouteDef {
        method: Method::GET,
        template: "/api/v1/config",
        build: |at, s| {
            warp::path!("api" / "v1" / "config")
                .and(at)
                .and(caller::caller(s.clone()))
                .and(with_state(s))
                .then(handlers::config)
                .map(handlers::respond)
                .boxed()
        },
    },
];

/// `/metrics`: open unless `auth.protect_metrics`.
fn metrics(at: At, s: Arc<ApiState>) -> BoxedFilter<(Response,)> {
    warp::path!("metrics")
        .and(at)
        .and(caller::metrics_caller(s))
        .map(handlers::metrics_text)
        .boxed()
}
