//! Health: the dependency states behind `/readyz` and `dependencies_up`, refreshed by a
//! periodic prober (never only once at start-up).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::jobs::runner::RunContext;
use crate::jobs::store::Store;
use crate::telemetry::metrics::metrics;

/// Dependency name -> up.
#[derive(Default)]
pub struct Health {
    deps: RwLock<BTreeMap<&'static str, bool>>,
}

impl Health {
    pub fn snapshot(&self) -> BTreeMap<&'static str, bool> {
        self.deps.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, dependency: &'static str, up: bool) {
        self.deps
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dependency, up);
        metrics()
            .dependencies_up
            .with_label_values(&[dependency])
            .set(i64::from(up));
    }

    /// Probes every dependency in use once: `storage` always, `lvm` with the LVM backend,
    /// `minio` with an S3 endpoint, `libvirt` with a storage pool to refresh.
    pub async fn probe_all(&self, ctx: &RunContext, store: &Store) {
        self.set("storage", store.probe().await);
        if ctx.volumes.kind() == "lvm" {
            let up = ctx.volumes.probe().await;
            if let Err(e) = &up {
                tracing::warn!(error = %e, "lvm dependency is down");
            }
            self.set("lvm", up.is_ok());
        }
        if !ctx.settings.current().s3.endpoint.is_empty() {
            let up = ctx.cache.probe_s3().await;
            if let Err(e) = &up {
                tracing::warn!(error = %e, "minio dependency is down");
            }
            self.set("minio", up.is_ok());
        }
        if ctx.libvirt.enabled() {
            let up = ctx.libvirt.probe().await;
            if let Err(e) = &up {
                tracing::warn!(error = %e, "libvirt dependency is down");
            }
            self.set("libvirt", up.is_ok());
        }
    }

    /// Probes now and then every `interval`.
    pub fn spawn_prober(
        self: &Arc<Self>,
        ctx: Arc<RunContext>,
        store: Store,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let health = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                health.probe_all(&ctx, &store).await;
            }
        })
    }
}
