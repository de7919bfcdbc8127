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

/// The rows of this group.
pub(crate) const ROUTES: &[RouteDef] = &[
    RouteDef {
        method: Method::GET,
        template: "/health",
        build: |at, s| {
            warp::path!("health")
                .and(at)
                .and(with_state(s))
                .map(handlers::health)
                .boxed()
        },
    },
    RouteDef {
        method: Method::GET,
        template: "/healthz",
        build: |at, s| {
            warp::path!("healthz")
                .and(at)
                .and(with_state(s))
                .map(handlers::health)
                .boxed()
        },
    },
    RouteDef {
        method: Method::GET,
        template: "/livez",
        build: |at, s| {
            warp::path!("livez")
                .and(at)
                .and(with_state(s))
                .map(handlers::health)
                .boxed()
        },
    },
    RouteDef {
        method: Method::GET,
        template: "/readyz",
        build: |at, s| {
            warp::path!("readyz")
                .and(at)
                .and(with_state(s))
                .map(handlers::ready)
                .boxed()
        },
    },
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
