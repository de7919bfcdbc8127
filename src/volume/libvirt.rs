//! libvirt integration: refreshing the configured storage pool after a volume is written, so
//! libvirt sees it at once (failures are logged and counted, never fatal), and probing it.

use std::time::Duration;

use tokio::process::Command;

use crate::telemetry::metrics::metrics;

const VIRSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `virsh pool-refresh` for `libvirt.pool` (nothing when no pool is configured).
#[derive(Debug, Clone)]
pub struct PoolRefresher {
    uri: String,
    pool: String,
}

impl PoolRefresher {
    pub fn new(uri: &str, pool: &str) -> PoolRefresher {
        PoolRefresher {
            uri: uri.to_string(),
            pool: pool.to_string(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.pool.is_empty()
    }

    async fn virsh(&self, subcommand: &str) -> Result<(), String> {
        let run = Command::new("virsh")
            .args(["-c", &self.uri, subcommand, &self.pool])
            .env("LC_ALL", "C")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(VIRSH_TIMEOUT, run)
            .await
            .map_err(|_| format!("virsh {subcommand} timed out after {VIRSH_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot run virsh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "virsh {subcommand} {} failed ({}): {}",
                self.pool,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Refreshes the pool; errors are logged and counted.
    pub async fn refresh(&self) {
        if !self.enabled() {
            return;
        }
        if let Err(e) = self.virsh("pool-refresh").await {
            metrics().libvirt_pool_refresh_errors_total.inc();
            tracing::warn!(error = %e, pool = %self.pool, "libvirt pool refresh failed");
        }
    }

    /// Whether libvirt answers for the pool.
    pub async fn probe(&self) -> Result<(), String> {
        self.virsh("pool-info").await
    }
}
