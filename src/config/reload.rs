//! Hot reload: re-runs the whole layering and validation on SIGHUP or when a watched file
//! (the config file, tokens file, TLS files) changes, splits the result into what applies live
//! and what needs a restart (kept at the running value, never half-applied), hands the live
//! part to the daemon's components, and records the outcome (metrics, status for the API).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use notify::EventKind;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use tokio::sync::{mpsc, watch};

use super::{ConfigSource, Settings, load, resolve_credential};
use crate::telemetry::metrics::metrics;

/// Keys whose change needs a restart (dotted; a trailing `.` covers a whole section).
pub(crate) const RESTART_KEYS: &[&str] = &[
    "server.listen",
    "server.header_timeout",
    "server.handshake_timeout",
    "server.body_timeout",
    "server.max_connections",
    "server.max_connections_per_peer",
    "server.h2_idle_timeout",
    "server.first_request_timeout",
    "storage.",
    "volumes.backend",
    "volumes.lvm.",
    "volumes.directory.",
    "volumes.encryption.",
    "cache.dir",
    "s3.endpoint",
    "s3.region",
    "s3.access_key",
    "s3.secret_key",
    "s3.secret_key_file",
    "s3.bucket",
    "s3.ca_file",
    "s3.allow_http",
    "s3.connect_timeout",
    "tls.allow_insecure_http",
    "libvirt.",
    "telemetry.otlp_endpoint",
    "telemetry.service_name",
    "telemetry.otlp_ca_file",
    "telemetry.probe_interval",
    "reload.",
];

/// Whether a key needs a restart.
pub fn needs_restart(key: &str) -> bool {
    RESTART_KEYS.iter().any(|r| {
        if r.ends_with('.') {
            key.starts_with(r)
        } else {
            key == *r
        }
    })
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

/// The keys both sides have, with their old and new values, paired by name, never by position:
/// a key present on one side only (a new optional setting, an entry of an array of tables)
/// cannot shift the others.
fn paired<'a>(
    old: &'a [(String, toml::Value)],
    new: &'a [(String, toml::Value)],
) -> Vec<(&'a str, &'a toml::Value, &'a toml::Value)> {
    let new_by_key: std::collections::HashMap<&str, &toml::Value> =
        new.iter().map(|(k, v)| (k.as_str(), v)).collect();
    old.iter()
        .filter_map(|(k, v)| Some((k.as_str(), v, *new_by_key.get(k.as_str())?)))
        .collect()
}

/// Every settings key, dotted (`jobs.max_concurrent`), in section order.
pub fn setting_keys(settings: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(v) = toml::Value::try_from(settings) {
        flatten("", &v, &mut out);
    }
    out.into_iter().map(|(k, _)| k).collect()
}

fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().expect("non-empty key");
    let mut t = table;
    for p in parts {
        t = t
            .get_mut(p)
            .and_then(|v| v.as_table_mut())
            .expect("both settings have the same shape");
    }
    t.insert(last.to_string(), value);
}

/// The settings to run with after a reload: `new` for live keys, `old` for keys that need a
/// restart; plus the restart keys that changed. Turning TLS on or off also needs a restart.
pub(crate) fn split_changes(
    old: &Settings,
    new: &Settings,
) -> Result<(Settings, Vec<String>), String> {
    let old_v = toml::Value::try_from(old).map_err(|e| e.to_string())?;
    let new_v = toml::Value::try_from(new).map_err(|e| e.to_string())?;
    let (mut old_keys, mut new_keys) = (Vec::new(), Vec::new());
    flatten("", &old_v, &mut old_keys);
    flatten("", &new_v, &mut new_keys);
    let tls_toggled = old.tls.cert_file.is_empty() != new.tls.cert_file.is_empty();
    let mut effective = new_v.as_table().cloned().unwrap_or_default();
    let mut pending = Vec::new();
    for (key, old_value, new_value) in paired(&old_keys, &new_keys) {
        let key = key.to_string();
        let restart = needs_restart(&key)
            || (tls_toggled
                && [
                    "tls.cert_file",
                    "tls.key_file",
                    "tls.client_ca_file",
                    "tls.client_auth",
                ]
                .contains(&key.as_str()));
        if restart && old_value != new_value {
            pending.push(key.clone());
            set_dotted(&mut effective, &key, old_value.clone());
        }
    }
    let effective: Settings = toml::Value::Table(effective)
        .try_into()
        .map_err(|e: toml::de::Error| e.to_string())?;
    effective.validate().map_err(|e| e.to_string())?;
    Ok((effective, pending))
}

/// What the API shows about reloads.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct ReloadStatus {
    pub(crate) last_reload: Option<DateTime<Utc>>,
    pub(crate) last_result: Option<&'static str>,
    pub(crate) last_error: Option<String>,
    /// Keys changed in the file but still running with their old value until a restart.
    pub(crate) pending_restart: Vec<String>,
}

/// The daemon's components that take live settings.
pub(crate) trait LiveTarget: Send + Sync {
    /// Applies `new` (already split; restart-only keys hold the running values). An error
    /// leaves every component as it was.
    fn apply(&self, new: &Settings) -> Result<(), String>;
}

/// Why a reload ran.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Trigger {
    Signal,
    FileChange,
}

/// Re-runs the configuration on demand and hands the result to the live components.
pub(crate) struct Reloader {
    source: ConfigSource,
    current: watch::Sender<Arc<Settings>>,
    status: Mutex<ReloadStatus>,
    target: Box<dyn LiveTarget>,
    /// Serialises reloads (a signal and a file event at once).
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub(crate) fn new(
        source: ConfigSource,
        current: watch::Sender<Arc<Settings>>,
        target: Box<dyn LiveTarget>,
    ) -> Arc<Reloader> {
        metrics()
            .config_last_reload_success_timestamp_seconds
            .set(Utc::now().timestamp() as f64);
        for result in ["success", "error"] {
            metrics().config_reload_total.with_label_values(&[result]);
        }
        Arc::new(Reloader {
            source,
            current,
            status: Mutex::new(ReloadStatus::default()),
            target,
            running: tokio::sync::Mutex::new(()),
        })
    }

    pub(crate) fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn settings(&self) -> Arc<Settings> {
        self.current.borrow().clone()
    }

    /// Loads, validates and applies; on any error the running configuration stays.
    pub(crate) async fn reload(&self, trigger: Trigger) -> Result<(), String> {
        let _one_at_a_time = self.running.lock().await;
        let old = self.settings();
        let source = self.source.clone();
        let loaded = tokio::task::spawn_blocking(move || load(&source))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let outcome = loaded.and_then(|new| {
            let (effective, pending) = split_changes(&old, &new)?;
            self.target.apply(&effective)?;
            Ok((effective, pending))
        });
        let now = Utc::now();
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.last_reload = Some(now);
        match outcome {
            Ok((effective, pending)) => {
                metrics()
                    .config_reload_total
                    .with_label_values(&["success"])
                    .inc();
                metrics()
                    .config_last_reload_success_timestamp_seconds
                    .set(now.timestamp() as f64);
                if !pending.is_empty() {
                    tracing::warn!(
                        keys = pending.join(", "),
                        "configuration changed but needs restart; running with the old values"
                    );
                }
                tracing::info!(?trigger, "configuration reloaded");
                status.last_result = Some("success");
                status.last_error = None;
                status.pending_restart = pending;
                self.current.send_replace(Arc::new(effective));
                Ok(())
            }
            Err(e) => {
                metrics()
                    .config_reload_total
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(?trigger, error = %e, "configuration reload failed; keeping the running configuration");
                status.last_result = Some("error");
                status.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Reloads on SIGHUP, and on changes of the watched files unless `reload.watch_files` is
    /// false. Runs until the process ends.
    pub(crate) fn spawn(self: &Arc<Self>) -> anyhow::Result<()> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Trigger>();
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let sig_tx = tx.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let _ = sig_tx.send(Trigger::Signal);
            }
        });
        let reloader = self.clone();
        tokio::spawn(async move {
            let mut watcher = None;
            let mut watched = BTreeSet::new();
            loop {
                let settings = reloader.settings();
                let wanted = if settings.reload.watch_files {
                    watched_files(&reloader.source.path, &settings)
                } else {
                    BTreeSet::new()
                };
                if wanted != watched {
                    watcher = None; // stop the old watcher first
                    if !wanted.is_empty() {
                        match FileWatcher::start(&wanted, settings.reload.debounce, tx.clone()) {
                            Ok(w) => watcher = Some(w),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot watch configuration files; reload with SIGHUP")
                            }
                        }
                    }
                    watched = wanted;
                }
                let Some(trigger) = rx.recv().await else {
                    break;
                };
                // Coalesce a burst (the debouncer already merges file events).
                while rx.try_recv().is_ok() {}
                let _ = reloader.reload(trigger).await;
            }
            drop(watcher);
        });
        Ok(())
    }
}

/// The files whose change triggers a reload.
fn watched_files(config: &Path, s: &Settings) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::new();
    files.insert(absolute(config));
    for f in [
        &s.auth.tokens_file,
        &s.tls.cert_file,
        &s.tls.key_file,
        &s.tls.client_ca_file,
    ] {
        if !f.is_empty() {
            files.insert(absolute(&resolve_credential(f)));
        }
    }
    // A replaced keyring takes effect like a changed config file.
    for rule in &s.sources.trust {
        files.insert(absolute(&rule.keyring));
    }
    files
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Watches the directories of the files (deploy tools replace files by rename) and reports
/// debounced create/modify/remove events that concern one of them.
struct FileWatcher {
    _debouncer: notify_debouncer_full::Debouncer<
        notify::RecommendedWatcher,
        notify_debouncer_full::RecommendedCache,
    >,
}

impl FileWatcher {
    fn start(
        files: &BTreeSet<PathBuf>,
        debounce: Duration,
        tx: mpsc::UnboundedSender<Trigger>,
    ) -> notify::Result<FileWatcher> {
        let names = files.clone();
        let mut debouncer = new_debouncer(debounce, None, move |result: DebounceEventResult| {
            let Ok(events) = result else { return };
            let relevant = events.iter().any(|e| {
                matches!(
                    e.kind,
                    EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
                ) && e.paths.iter().any(|p| names.contains(p))
            });
            if relevant {
                let _ = tx.send(Trigger::FileChange);
            }
        })?;
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        for dir in dirs {
            debouncer.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        }
        Ok(FileWatcher {
            _debouncer: debouncer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_keys_keep_their_running_value() {
        let old = Settings::default();
        let mut new = old.clone();
        new.server.listen = "127.0.0.1:9999".into();
        new.volumes.lvm.volume_group = "vg9".into();
        new.jobs.max_concurrent = 5;
        new.log.level = "debug".into();
        let (eff, pending) = split_changes(&old, &new).unwrap();
        assert_eq!(pending, vec!["server.listen", "volumes.lvm.volume_group"]);
        assert_eq!(eff.server.listen, old.server.listen);
        assert_eq!(eff.volumes.lvm.volume_group, "vg0");
        assert_eq!(eff.jobs.max_concurrent, 5, "live keys apply");
        assert_eq!(eff.log.level, "debug");
    }

    #[test]
    fn declared_images_apply_live_whatever_their_order() {
        let image = |name: &str, refresh: u64| crate::config::DeclaredImageSettings {
            name: name.into(),
            url: format!("https://images.example/{name}.qcow2"),
            checksum: String::new(),
            checksum_url: String::new(),
            image_type: "qcow2".into(),
            golden: false,
            refresh: Duration::from_secs(refresh),
        };
        let mut old = Settings::default();
        old.sources.allowed_hosts = vec!["images.example".into()];
        old.images = vec![image("a", 60), image("b", 60)];
        let mut new = old.clone();
        new.images = vec![image("b", 60), image("c", 60), image("a", 120)];
        let (eff, pending) = split_changes(&old, &new).unwrap();
        assert!(pending.is_empty(), "{pending:?}");
        assert_eq!(eff.images, new.images);
        assert_eq!(
            eff.declared_image("a").unwrap().refresh,
            Duration::from_secs(120)
        );
    }

    #[test]
    fn turning_tls_on_needs_a_restart_but_new_certificates_do_not() {
        let old = Settings::default();
        let mut new = old.clone();
        new.tls.cert_file = "/c.pem".into();
        new.tls.key_file = "/k.pem".into();
        let (_, pending) = split_changes(&old, &new).unwrap();
        assert!(pending.contains(&"tls.cert_file".to_string()));
        let mut a = old.clone();
        a.tls.cert_file = "/c.pem".into();
        a.tls.key_file = "/k.pem".into();
        let mut b = a.clone();
        b.tls.cert_file = "/c2.pem".into();
        let (eff, pending) = split_changes(&a, &b).unwrap();
        assert!(pending.is_empty());
        assert_eq!(eff.tls.cert_file, "/c2.pem");
    }

    #[test]
    fn trust_rules_apply_live_as_one_array() {
        use crate::config::images::TrustSettings;
        let rule = |host: &str, required| TrustSettings {
            hosts: vec![host.into()],
            keyring: format!("/etc/{host}.gpg").into(),
            require_signature: required,
        };
        let mut old = Settings::default();
        old.sources.trust = vec![rule("a.example", true), rule("b.example", false)];
        // One rule removed from the front, another changed, one added; and a restart key.
        let mut new = old.clone();
        new.sources.trust = vec![rule("b.example", true), rule("c.example", false)];
        new.cache.dir = "/elsewhere".into();
        let (eff, pending) = split_changes(&old, &new).unwrap();
        assert_eq!(pending, vec!["cache.dir"]);
        assert_eq!(
            eff.sources.trust, new.sources.trust,
            "the whole array applies"
        );
        assert!(setting_keys(&new).contains(&"sources.trust".to_string()));
        let files = watched_files(Path::new("/etc/lvp/config.toml"), &new);
        assert!(files.contains(Path::new("/etc/c.example.gpg")), "{files:?}");
    }

    #[test]
    fn classification() {
        assert!(needs_restart("volumes.backend"));
        assert!(needs_restart("storage.data_dir"));
        assert!(!needs_restart("jobs.max_concurrent"));
        assert!(!needs_restart("auth.tokens_file"));
        assert!(!needs_restart("telemetry.sampling_ratio"));
        assert!(!needs_restart("cache.max_size_bytes"));
    }

    #[test]
    fn keys_are_paired_by_name_not_position() {
        let v = |n: i64| toml::Value::Integer(n);
        let old = vec![("a.x".to_string(), v(1)), ("b.y".to_string(), v(2))];
        // A key only the new side has comes first: positions shift, names do not.
        let new = vec![
            ("a.new".to_string(), v(9)),
            ("a.x".to_string(), v(1)),
            ("b.y".to_string(), v(3)),
        ];
        let pairs = paired(&old, &new);
        assert_eq!(pairs, vec![("a.x", &v(1), &v(1)), ("b.y", &v(2), &v(3))]);
    }
}
