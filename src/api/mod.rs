//! The HTTP API: the route table (every route of the API contract, including the Go service's
//! legacy paths), the shared state handlers use, and request-scoped values (route template,
//! connection identity) the server puts into each request.

mod activity;
pub(crate) mod auth;
pub(crate) mod error;
mod events;
mod handlers;
mod openapi;
mod origin;
mod peers;
mod preflight;
mod request;
pub(crate) mod server;
mod strict_json;
pub(crate) mod tls;
mod upload;
mod views;

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use warp::Filter;
use warp::reply::Response;

use crate::config::LiveSettings;
use crate::image::cache::ImageCache;
use crate::jobs::engine::Engine;
use crate::telemetry::health::Health;
use crate::volume::VolumeBackend;

/// What handlers share.
pub(crate) struct ApiState {
    pub(crate) engine: Engine,
    /// The image cache (listing and deleting entries).
    pub(crate) cache: Arc<ImageCache>,
    /// The image sources (preflight inspection).
    pub(crate) sources: Arc<crate::image::source::SourceClients>,
    /// The volume backend (name rules).
    pub(crate) volumes: Arc<dyn VolumeBackend>,
    pub(crate) settings: LiveSettings,
    pub(crate) health: Arc<Health>,
    pub(crate) started: Instant,
    pub(crate) auth: Arc<auth::Authenticator>,
    pub(crate) reloader: Arc<crate::config::reload::Reloader>,
    /// Progress streams open now (bounded by `server.max_event_streams` and
    /// `server.max_event_streams_per_peer`).
    pub(crate) event_streams: events::StreamCount,
    /// Fires when the daemon shuts down (ends progress streams).
    pub(crate) stopping: tokio_util::sync::CancellationToken,
}

/// Values a request collects on its way through the filters, read by the server afterwards
/// for metrics, the request span and the request log line.
#[derive(Clone, Default)]
pub(crate) struct RequestScope(Arc<ScopeInner>);

/// What a `RequestScope` holds (set once each).
#[derive(Default)]
struct ScopeInner {
    /// Template of the first route whose path and method matched (never the raw path).
    route: OnceLock<&'static str>,
    /// Identity of the authenticated caller.
    caller: OnceLock<String>,
}

impl RequestScope {
    pub(crate) fn route(&self) -> &'static str {
        self.0.route.get().copied().unwrap_or("unmatched")
    }

    pub(crate) fn caller(&self) -> Option<&str> {
        self.0.caller.get().map(String::as_str)
    }

    pub(crate) fn set_caller(&self, identity: &str) {
        let _ = self.0.caller.set(identity.to_string());
    }
}

/// Marks the request as handled by `template`.
fn route(template: &'static str) -> impl Filter<Extract = (), Error = Infallible> + Clone {
    warp::ext::optional::<RequestScope>()
        .map(move |scope: Option<RequestScope>| {
            if let Some(scope) = scope {
                let _ = scope.0.route.set(template);
            }
        })
        .untuple_one()
}

fn with_state(
    state: Arc<ApiState>,
) -> impl Filter<Extract = (Arc<ApiState>,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// The raw query string (empty when there is none).
fn raw_query() -> impl Filter<Extract = (String,), Error = Infallible> + Clone {
    warp::query::raw().or(warp::any().map(String::new)).unify()
}

/// Every route, behind the cross-site refusal (`origin.rs`). Once a route's method and path
/// match, nothing after rejects (handlers answer errors themselves), so no request falls
/// through to another route; the final `recover` turns unmatched requests into JSON 404/405
/// and refused ones into their 403.
pub(crate) fn routes(
    state: Arc<ApiState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    use handlers::respond;
    use warp::{delete, get, path, path::end, post};
    let s = || with_state(state.clone());
    let caller = || auth::caller(state.clone());
    let body = || handlers::json_body(state.clone());

    // Open routes.
    let health = path("health")
        .or(path("healthz"))
        .unify()
        .or(path("livez"))
        .unify()
        .and(end())
        .and(get())
        .and(route("/health"))
        .and(s())
        .map(handlers::health);
    let ready = path!("readyz")
        .and(get())
        .and(route("/readyz"))
        .and(s())
        .map(handlers::ready);
    let metrics = path!("metrics")
        .and(get())
        .and(route("/metrics"))
        .and(auth::metrics_caller(state.clone()))
        .map(handlers::metrics_text);

    // Jobs.
    let submit = path!("api" / "v1" / "jobs")
        .and(post())
        .and(route("/api/v1/jobs"))
        .or(path!("api" / "v1" / "provision")
            .and(post())
            .and(route("/api/v1/provision")))
        .unify()
        .or(path!("provision").and(post()).and(route("/provision")))
        .unify()
        .and(caller())
        .and(warp::header::headers_cloned())
        .and(body())
        .and(s())
        .then(handlers::submit)
        .map(respond);
    let list = path!("api" / "v1" / "jobs")
        .and(get())
        .and(route("/api/v1/jobs"))
        .and(caller())
        .and(raw_query())
        .and(s())
        .then(handlers::list)
        .map(respond);
    let status = path!("api" / "v1" / "jobs" / String)
        .and(get())
        .and(route("/api/v1/jobs/{id}"))
        .or(path!("api" / "v1" / "status" / String)
            .and(get())
            .and(route("/api/v1/status/{id}")))
        .unify()
        .and(caller())
        .and(s())
        .then(handlers::status)
        .map(respond);
    let events = path!("api" / "v1" / "jobs" / String / "events")
        .and(get())
        .and(route("/api/v1/jobs/{id}/events"))
        .and(caller())
        .and(warp::ext::optional::<server::ConnInfo>())
        .and(warp::header::headers_cloned())
        .and(s())
        .then(events::events)
        .map(respond);
    let cancel = path!("api" / "v1" / "jobs" / String / "cancel")
        .and(post())
        .and(route("/api/v1/jobs/{id}/cancel"))
        .or(path!("api" / "v1" / "cancel" / String)
            .and(delete())
            .and(route("/api/v1/cancel/{id}")))
        .unify()
        .and(caller())
        .and(s())
        .then(handlers::cancel)
        .map(respond);

    // Cache.
    let cache_list = path!("api" / "v1" / "cache" / "images")
        .and(get())
        .and(route("/api/v1/cache/images"))
        .and(caller())
        .and(raw_query())
        .and(s())
        .then(handlers::cache_list)
        .map(respond);
    let cache_fetch = path!("api" / "v1" / "cache" / "fetch")
        .and(post())
        .and(route("/api/v1/cache/fetch"))
        .and(caller())
        .and(warp::header::headers_cloned())
        .and(body())
        .and(s())
        .then(handlers::cache_fetch)
        .map(respond);
    let cache_delete = path!("api" / "v1" / "cache" / "images" / String)
        .and(delete())
        .and(route("/api/v1/cache/images/{key}"))
        .and(caller())
        .and(s())
        .then(handlers::cache_delete)
        .map(respond);

    // Images (new).
    let image_inspect = path!("api" / "v1" / "images" / "inspect")
        .and(post())
        .and(route("/api/v1/images/inspect"))
        .and(caller())
        .and(body())
        .and(s())
        .then(preflight::inspect)
        .map(respond);

    // The OpenAPI document (new).
    let openapi = path!("api" / "v1" / "openapi.json")
        .and(get())
        .and(route("/api/v1/openapi.json"))
        .and(caller())
        .map(handlers::openapi);

    // Effective configuration (new).
    let config = path!("api" / "v1" / "config")
        .and(get())
        .and(route("/api/v1/config"))
        .and(caller())
        .and(s())
        .then(handlers::config)
        .map(respond);

    // Volumes.
    let volume_delete = path!("api" / "v1" / "volumes" / String)
        .and(delete())
        .and(route("/api/v1/volumes/{name}"))
        .and(caller())
        .and(s())
        .then(handlers::volume_delete)
        .map(respond);

    let volume_upload = path!("api" / "v1" / "volumes" / String / "content")
        .and(warp::put())
        .and(route("/api/v1/volumes/{name}/content"))
        .and(caller())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(s())
        .then(upload::upload)
        .map(respond);

    let any_route = health
        .or(ready)
        .unify()
        .or(metrics)
        .unify()
        .or(submit)
        .unify()
        .or(list)
        .unify()
        .or(status)
        .unify()
        .or(events)
        .unify()
        .or(cancel)
        .unify()
        .or(cache_list)
        .unify()
        .or(cache_fetch)
        .unify()
        .or(cache_delete)
        .unify()
        .or(image_inspect)
        .unify()
        .or(volume_delete)
        .unify()
        .or(volume_upload)
        .unify()
        .or(config)
        .unify()
        .or(openapi)
        .unify();
    origin::same_site_only(state.clone())
        .and(any_route)
        .recover(error::recover)
        .unify()
}
