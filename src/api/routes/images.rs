//! Image routes: the declared images, preflight inspection of a source.

use warp::Filter;
use warp::http::Method;

use super::route::{RouteDef, with_state};
use crate::api::{caller, declared, handlers, preflight};

/// The rows of this group.
pub(crate) const ROUTES: &[RouteDef] = &[
    RouteDef {
        method: Method::GET,
        template: "/api/v1/images",
        build: |at, s| {
            warp::path!("api" / "v1" / "images")
                .and(at)
                .and(caller::caller(s.clone()))
                .and(with_state(s))
                .then(declared::list)
                .map(handlers::respond)
                .boxed()
        },
    },
    RouteDef {
        method: Method::POST,
        template: "/api/v1/images/inspect",
        build: |at, s| {
            warp::path!("api" / "v1" / "images" / "inspect")
                .and(at)
                .and(handlers::caller_and_json_body(s.clone()))
                .and(with_state(s))
                .then(preflight::inspect)
                .map(handlers::respond)
                .boxed()
        },
    },
];
