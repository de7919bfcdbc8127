//! The values every handler shares (`ApiState`) and the values one request collects on its way
//! through the filters (`RequestScope`). A leaf of `api/`: it imports nothing from its siblings.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

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
    pub(crate) auth: Arc<crate::api::auth::Authenticator>,
    pub(crate) reloader: Arc<crate::config::reload::Reloader>,
    /// Progress streams open now (bounded by `server.max_event_streams` and
    /// `server.max_event_streams_per_peer`).
    pub(crate) event_streams: crate::api::events::StreamCount,
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

impl RequestScope {
    /// Records the template of the route that matched (first one wins).
    pub(crate) fn set_route(&self, template: &'static str) {
        let _ = self.0.route.set(template);
    }
}
