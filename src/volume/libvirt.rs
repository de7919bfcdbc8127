//! libvirt integration: refreshing the configured storage pool after a volume is written, so
//! libvirt sees it at once (failures are logged and counted, never fatal), and probing it.

use std::time::Duration;

use crate::command::{self, CommandError};

use crate::telemetry::metrics::metrics;

const VIRSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `virsh pool-refresh` for `libvirt.pool` (nothing when no pool is configured).
#[derive(Debug, Clone)]
pub(crate) struct PoolRefresher {
    uri: String,
    pool: String,
}

impl PoolRefresher {
    pub(crate) fn new(uri: &str, pool: &str) -> PoolRefresher {
        PoolRefresher {
            uri: uri.to_string(),
            pool: pool.to_string(),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.pool.is_empty()
    }

    async fn virsh(&self, subcommand: &str) -> Result<(), CommandError> {
        let limit = command::Limit {
            timeout: VIRSH_TIMEOUT,
            setting: None,
        };
        command::run("virsh", &["-c", &self.uri, subcommand, &self.pool], limit).await?;
        Ok(())
    }

    /// Refreshes the pool; errors are logged and counted.
    pub(crate) async fn refresh(&self) {
        if !self.enabled() {
            return;
        }
        if let Err(e) = self.virsh("pool-refresh").await {
            metrics().libvirt_pool_refresh_errors_total.inc();
            tracing::warn!(error = %e, pool = %self.pool, "libvirt pool refresh failed");
        }
    }

    /// Whether libvirt answers for the pool.
    pub(crate) async fn probe(&self) -> Result<(), String> {
        self.virsh("pool-info").await.map_err(|e| e.to_string())
    }
}
