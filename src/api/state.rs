//! The values every handler shares (`ApiState`): the engine, the cache, the sources, the volume
//! backend, the settings, health, authentication, the progress stream count.

use std::sync::Arc;
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
    /// Declared images (`GET /api/v1/images`, requests naming an `image`).
    pub(crate) declared: Arc<crate::jobs::declared::DeclaredImages>,
    pub(crate) health: Arc<Health>,
    pub(crate) started: Instant,
    pub(crate) auth: Arc<super::auth::Authenticator>,
    pub(crate) reloader: Arc<crate::config::reload::Reloader>,
    /// Progress streams open now (bounded by `server.max_event_streams` and
    /// `server.max_event_streams_per_peer`).
    pub(crate) event_streams: super::streams::StreamCount,
    /// Fires when the daemon shuts down (ends progress streams).
    pub(crate) stopping: tokio_util::sync::CancellationToken,
}
