//! `[log]` and `[telemetry]`: logging, trace export and dependency probes; defaults and rules.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{SettingError, check};

/// Log line format (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    Json,
    Text,
}

/// `[log]`: level and format of the log (stderr, which journald collects).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogSettings {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a full `RUST_LOG` filter.
    pub(crate) level: String,
    pub(crate) format: LogFormat,
}

/// `[telemetry]`: trace export and dependency probes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TelemetrySettings {
    /// OTLP/gRPC collector, e.g. `https://otel-collector:4317`. Empty: no trace export.
    pub(crate) otlp_endpoint: String,
    pub(crate) service_name: String,
    /// Fraction of new traces sampled (0.0..=1.0).
    pub(crate) sampling_ratio: f64,
    /// CA certificates (PEM) trusted for the collector.
    pub(crate) otlp_ca_file: String,
    /// How often dependencies (S3, LVM, libvirt, storage) are probed.
    #[serde(with = "humantime_serde")]
    pub(crate) probe_interval: Duration,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: LogFormat::Json,
        }
    }
}

impl LogSettings {
    pub(crate) fn validate(&self) -> Result<(), SettingError> {
        check(
            !self.level.trim().is_empty()
                && tracing_subscriber::EnvFilter::builder()
                    .parse(&self.level)
                    .is_ok(),
            "log.level",
            || {
                format!(
                    "`{}` is not a level (error, warn, info, debug, trace) or filter",
                    self.level
                )
            },
        )
    }
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: String::new(),
            service_name: "libvirt-volume-provisioner".into(),
            sampling_ratio: 1.0,
            otlp_ca_file: String::new(),
            probe_interval: Duration::from_secs(30),
        }
    }
}

impl TelemetrySettings {
    pub(crate) fn validate(&self) -> Result<(), SettingError> {
        check(
            (0.0..=1.0).contains(&self.sampling_ratio),
            "telemetry.sampling_ratio",
            || "must be between 0.0 and 1.0".into(),
        )?;
        check(
            self.otlp_endpoint.is_empty() || url::Url::parse(&self.otlp_endpoint).is_ok(),
            "telemetry.otlp_endpoint",
            || format!("`{}` is not a URL", self.otlp_endpoint),
        )?;
        check(
            !self.service_name.is_empty(),
            "telemetry.service_name",
            || "must not be empty".into(),
        )?;
        check(
            self.probe_interval >= Duration::from_secs(1),
            "telemetry.probe_interval",
            || "must be at least 1s".into(),
        )
    }
}
