//! Volume routes: delete, upload content, resize.

use warp::Filter;
use warp::http::Method;

use super::route::{RouteDef, with_state};
use crate::api::{caller, handlers, lifecycle, upload};

/// The rows of this group.
pub(crate) const ROUTES: &[RouteDef] = &[
    RouteDef {
        method: Method::DELETE,
        template: "/api/v1/volumes/{name}",
        build: |at, s| {
            warp::path!("api" / "v1" / "volumes" / String)
                .and(at)
                .and(caller::caller(s.clone()))
                .and(with_state(s))
                .then(handlers::volume_delete)
                .map(handlers::respond)
                .boxed()
        },
    },
    RouteDef {
        method: Method::PUT,
        template: "/api/v1/volumes/{name}/content",
        build: |at, s| {
            warp::path!("api" / "v1" / "volumes" / String / "content")
                .and(at)
                .and(caller::caller(s.clone()))
                .and(warp::header::headers_cloned())
                .and(warp::body::stream())
                .and(with_state(s))
                .then(upload::upload)
                .map(handlers::respond)
                .boxed()
        },
    },
    RouteDef {
        method: Method::POST,
        template: "/api/v1/volumes/{name}/resize",
        build: |at, s| {
            warp::path!("api" / "v1" / "volumes" / String / "resize")
                .and(at)
                .and(handlers::caller_and_json_body(s.clone()))
                .and(with_state(s))
                .then(lifecycle::resize)
                .map(handlers::respond)
                .boxed()
        },
    },
];
