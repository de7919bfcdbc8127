//! libvirt integration, on when `libvirt.pool` is set: the `virsh` calls the daemon makes
//! (refreshing the pool, probing it, listing the disks of running domains), and the backend
//! wrapper that puts them around every volume operation (`guarded`), and the secrets of
//! encrypted volumes (`secrets`).

mod domains;
mod guarded;
mod secrets;

use std::time::Duration;

pub(crate) use guarded::LibvirtVolumes;
pub(crate) use secrets::SecretError;

use crate::command::{self, CommandError};
use crate::telemetry::metrics::metrics;
use domains::DomainDisk;

/// Time limit of every virsh call. Listing the running domains' disks runs inside API requests
/// (submission, DELETE): a hanging libvirtd delays those by this much, then they get 409
/// ("cannot ask libvirt"). A libvirtd that just started can take seconds for its first answer
/// (measured in the test VM: over 10 s under emulation).
const VIRSH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one virsh call may take.
fn virsh_limit() -> command::Limit {
    command::Limit {
        timeout: VIRSH_TIMEOUT,
        setting: None,
    }
}

/// libvirt as the daemon talks to it: `virsh -c <libvirt.uri>`, about storage pool
/// `libvirt.pool`.
#[derive(Debug)]
pub(crate) struct Libvirt {
    uri: String,
    pool: String,
    /// The virsh program (a stand-in in unit tests).
    program: String,
}

impl Libvirt {
    pub(crate) fn new(uri: &str, pool: &str) -> Libvirt {
        Libvirt {
            uri: uri.to_string(),
            pool: pool.to_string(),
            program: "virsh".into(),
        }
    }

    pub(crate) fn uri(&self) -> &str {
        &self.uri
    }

    async fn virsh(&self, args: &[&str]) -> Result<String, CommandError> {
        let mut all = vec!["-c", &self.uri];
        all.extend_from_slice(args);
        command::run(&self.program, &all, virsh_limit()).await
    }

    /// Refreshes the pool so that libvirt lists what the daemon created or removed; errors are
    /// logged and counted (`libvirt_pool_refresh_errors_total`), never returned.
    pub(crate) async fn refresh(&self) {
        if let Err(e) = self.virsh(&["pool-refresh", &self.pool]).await {
            metrics().libvirt_pool_refresh_errors_total.inc();
            tracing::warn!(error = %e, pool = %self.pool, "libvirt pool refresh failed");
        }
    }

    /// Whether libvirt answers for the pool (the `libvirt` dependency of `/readyz`).
    pub(crate) async fn probe(&self) -> Result<(), String> {
        self.virsh(&["pool-info", &self.pool])
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Tells the running `domain` that its disk at `path` (as libvirt has it) is now `bytes`
    /// long: `virsh blockresize`, which QEMU passes on to the guest.
    async fn block_resize(&self, domain: &str, path: &str, bytes: u64) -> Result<(), CommandError> {
        let size = format!("{bytes}B");
        self.virsh(&[
            "blockresize",
            "--domain",
            domain,
            "--path",
            path,
            "--size",
            &size,
        ])
        .await
        .map(|_| ())
    }

    /// The disks, with their backing files, of every active (running or paused) domain: one
    /// `virsh domstats --block --backing --list-active`.
    async fn active_domain_disks(&self) -> Result<Vec<DomainDisk>, CommandError> {
        let out = self
            .virsh(&["domstats", "--block", "--backing", "--list-active"])
            .await?;
        Ok(domains::parse_domstats(&out))
    }
}

#[cfg(test)]
impl Libvirt {
    /// A client that runs `program` instead of virsh.
    fn with_program(uri: &str, pool: &str, program: &std::path::Path) -> Libvirt {
        Libvirt {
            program: program.display().to_string(),
            ..Libvirt::new(uri, pool)
        }
    }
}
