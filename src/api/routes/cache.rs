//! Image cache routes: list, prefetch (a cache-only job), delete an entry.

use warp::Filter;
use warp::http::Method;

use super::route::{RouteDef, listing, with_state};
use crate::api::{caller, handlers};

/// The rows of this group.
pub(crate) const ROUTES: &[RouteDef] = &[
    RouteDef {
        method: Method::GET,
        template: "/api/v1/cache/images",
        build: |at, s| {
            warp::path!("api" / "v1" / "cache" / "images")
                .and(at)
                .and(listing(s.clone()))
                .and(with_state(s))
                .then(handlers::cache_list)
                .map(handlers::respond)
                .boxed()
        },
    },
    RouteDef {
        method: Method::POST,
        template: "/api/v1/cache/fetch",
        build: |at, s| {
            warp::path!("api" / "v1" / "cache" / "fetch")
                .and(at)
                .and(handlers::caller_and_json_body(s.clone()))
                .and(warp::header::headers_cloned())
                .and(with_state(s))
                .then(handlers::cache_fetch)
                .map(handlers::respond)
                .boxed()
        },
    },
    RouteDef {
        method: Method::DELETE,
        template: "/api/v1/cache/images/{key}",
        build: |at, s| {
            warp::path!("api" / "v1" / "cache" / "images" / String)
                .and(at)
                .and(caller::caller(s.clone()))
                .and(with_state(s))
                .then(handlers::cache_delete)
                .map(handlers::respond)
                .boxed()
        },
    },
];
