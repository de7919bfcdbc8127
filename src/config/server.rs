//! `[server]` (the API listener and its request limits) and `[reload]`: defaults and rules.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{SettingError, check};

/// `[server]`: the API listener and its request limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerSettings {
    /// Address and port of the API listener, `host:port`.
    pub(crate) listen: String,
    /// Largest accepted request body in bytes (JSON requests are small).
    pub(crate) max_body_bytes: u64,
    /// Time a client has to send the request headers (slowloris guard).
    #[serde(with = "humantime_serde")]
    pub(crate) header_timeout: Duration,
    /// Time a client has to send a request body (JSON bodies; 408 beyond).
    #[serde(with = "humantime_serde")]
    pub(crate) body_timeout: Duration,
    /// Time a client has to complete the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub(crate) handshake_timeout: Duration,
    /// Open connections beyond this number wait in the kernel backlog.
    pub(crate) max_connections: usize,
    /// Connections one client address (IPv6: one /64) may hold open at once; further ones
    /// from it are closed at once, so one host cannot take every slot before authentication.
    pub(crate) max_connections_per_peer: usize,
    /// An HTTP/2 connection with no request in progress for this long is closed (GOAWAY),
    /// even while it answers pings.
    #[serde(with = "humantime_serde")]
    pub(crate) h2_idle_timeout: Duration,
    /// Time from accepting a connection until its first request's headers have arrived
    /// (TLS handshake included); a connection that sends none is closed.
    #[serde(with = "humantime_serde")]
    pub(crate) first_request_timeout: Duration,
    /// Progress streams (`GET /api/v1/jobs/{id}/events`) open at once; 429 beyond.
    pub(crate) max_event_streams: usize,
    /// Progress streams one client address (IPv6: one /64) may hold open at once; 429 beyond.
    pub(crate) max_event_streams_per_peer: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1 << 20,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 512,
            max_connections_per_peer: 64,
            h2_idle_timeout: Duration::from_secs(30),
            first_request_timeout: Duration::from_secs(15),
            max_event_streams: 64,
            max_event_streams_per_peer: 16,
        }
    }
}

impl ServerSettings {
    pub(crate) fn validate(&self) -> Result<(), SettingError> {
        check(
            self.listen.parse::<SocketAddr>().is_ok(),
            "server.listen",
            || {
                format!(
                    "`{}` is not an address:port (e.g. 127.0.0.1:8080)",
                    self.listen
                )
            },
        )?;
        check(self.max_body_bytes >= 1024, "server.max_body_bytes", || {
            "must be at least 1024".into()
        })?;
        for (key, value) in [
            ("server.header_timeout", self.header_timeout),
            ("server.body_timeout", self.body_timeout),
            ("server.handshake_timeout", self.handshake_timeout),
            ("server.h2_idle_timeout", self.h2_idle_timeout),
            ("server.first_request_timeout", self.first_request_timeout),
        ] {
            check(!value.is_zero(), key, || "must be greater than 0".into())?;
        }
        check(self.max_connections >= 1, "server.max_connections", || {
            "must be at least 1".into()
        })?;
        check(
            self.max_connections_per_peer >= 1,
            "server.max_connections_per_peer",
            || "must be at least 1".into(),
        )?;
        check(
            (1..=10_000).contains(&self.max_event_streams),
            "server.max_event_streams",
            || "must be between 1 and 10000".into(),
        )?;
        check(
            (1..=10_000).contains(&self.max_event_streams_per_peer),
            "server.max_event_streams_per_peer",
            || "must be between 1 and 10000".into(),
        )
    }
}

/// `[reload]`: when the configuration is re-read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReloadSettings {
    /// Reload when the config, tokens or TLS files change (SIGHUP always reloads).
    pub(crate) watch_files: bool,
    /// File events closer together than this count as one change.
    #[serde(with = "humantime_serde")]
    pub(crate) debounce: Duration,
}

impl Default for ReloadSettings {
    fn default() -> Self {
        ReloadSettings {
            watch_files: true,
            debounce: Duration::from_millis(500),
        }
    }
}

impl ReloadSettings {
    pub(crate) fn validate(&self) -> Result<(), SettingError> {
        check(
            (Duration::from_millis(50)..=Duration::from_secs(30)).contains(&self.debounce),
            "reload.debounce",
            || "must be between 50ms and 30s".into(),
        )
    }
}
