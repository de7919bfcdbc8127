//! Health: the dependency states behind `/readyz` and `dependencies_up`, refreshed by a
//! periodic prober (never only once at start-up). The probes themselves are built where the
//! components are wired (`lib.rs`); this module only runs them and keeps their answers.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;

use crate::telemetry::metrics::metrics;

/// A check of one dependency: `Ok` when it is usable, else why not.
pub(crate) type ProbeFn = Box<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// One dependency the daemon uses and how to check it.
pub(crate) struct Probe {
    /// The `dependency` label and the key in `/readyz` (`storage`, `lvm`, `minio`, `libvirt`).
    pub(crate) name: &'static str,
    pub(crate) check: ProbeFn,
}

impl Probe {
    pub(crate) fn new<F, Fut>(name: &'static str, check: F) -> Probe
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        Probe {
            name,
            check: Box::new(move || Box::pin(check())),
        }
    }
}

/// The dependencies in use and their last probed state.
pub(crate) struct Health {
    probes: Vec<Probe>,
    /// Dependency name -> up, as of the last probe.
    deps: RwLock<BTreeMap<&'static str, bool>>,
}

impl Health {
    /// Health over `probes`; each dependency counts as down until its first probe.
    pub(crate) fn new(probes: Vec<Probe>) -> Health {
        let health = Health {
            deps: RwLock::new(BTreeMap::new()),
            probes,
        };
        for probe in &health.probes {
            health.set(probe.name, false);
        }
        health
    }

    /// Dependency name -> up.
    pub(crate) fn snapshot(&self) -> BTreeMap<&'static str, bool> {
        self.deps.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, dependency: &'static str, up: bool) {
        self.deps
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dependency, up);
        metrics()
            .dependencies_up
            .with_label_values(&[dependency])
            .set(i64::from(up));
    }

    /// Runs every probe once; a dependency going down is logged.
    pub(crate) async fn probe_all(&self) {
        for probe in &self.probes {
            let result = (probe.check)().await;
            if let Err(e) = &result {
                tracing::warn!(dependency = probe.name, error = %e, "dependency is down");
            }
            self.set(probe.name, result.is_ok());
        }
    }

    /// Probes every `interval`, starting one interval from now (the caller probes once
    /// before serving).
    pub(crate) fn spawn_prober(self: &Arc<Self>, interval: Duration) {
        let health = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                health.probe_all().await;
            }
        });
    }
}
