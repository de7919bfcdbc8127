//! libvirt-volume-provisioner: wires configuration, the job store, the image cache, volume
//! backends, the job engine, telemetry and the HTTP API into the daemon.

mod api;
pub mod client;
mod command;
pub mod config;
mod convert;
pub mod image;
mod jobs;
mod store;
mod telemetry;
mod text;
mod volume;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::api::auth::Authenticator;
use crate::api::server::{self, Plain, ServerLimits, Transport};
use crate::api::tls::TlsTransport;
use crate::config::{ConfigSource, LiveSettings, LogFormat, Settings};
use crate::image::cache::ImageCache;
use crate::image::source::SourceClients;
use crate::jobs::declared::DeclaredImages;
use crate::jobs::engine::Engine;
use crate::jobs::runner::RunContext;
use crate::jobs::store::Store;
use crate::telemetry::health::{Health, Probe};
use crate::volume::Volumes;

/// How often finished jobs past retention are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);
/// How often the cache's age and size bounds are applied (besides after every download).
const CACHE_EVICT_INTERVAL: Duration = Duration::from_secs(600);

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn serve(source: ConfigSource) -> anyhow::Result<()> {
    let settings = config::load(&source)?;
    preset_metric_labels();
    // object_store brings rustls' aws-lc-rs provider; make it the process default once.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (traces, trace_layer) = telemetry::traces::Tracing::init(&trace_export(&settings))
        .map_err(|e| anyhow::anyhow!("tracing: {e:#}"))?;
    let log_control = telemetry::logs::init(
        &settings.log.level,
        settings.log.format == LogFormat::Json,
        Some(trace_layer),
    )
    .map_err(|e| anyhow::anyhow!("logging: {e}"))?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %source.path.display(),
        backend = ?settings.volumes.backend,
        otlp_endpoint = %config::redact_url(&settings.telemetry.otlp_endpoint),
        s3_endpoint = %config::redact_url(&settings.s3.endpoint),
        "starting libvirt-volume-provisioner"
    );
    let live = LiveControls {
        log: log_control,
        sampling: traces.sampling(),
    };
    let result = run(settings, source, live).await;
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "daemon stopped with an error");
    }
    // Spans still buffered are exported before the runtime ends.
    traces.shutdown();
    result
}

/// Trace export as `telemetry.*` asks for it.
fn trace_export(settings: &Settings) -> telemetry::traces::TraceExport {
    let t = &settings.telemetry;
    telemetry::traces::TraceExport {
        endpoint: t.otlp_endpoint.clone(),
        service_name: t.service_name.clone(),
        sampling_ratio: t.sampling_ratio,
        ca_file: (!t.otlp_ca_file.is_empty()).then(|| config::resolve_credential(&t.otlp_ca_file)),
    }
}

/// Checks what `serve` would build from the security settings (certificate, key, client CA and
/// token files), for `check-config`.
pub fn check_security(settings: &Settings) -> anyhow::Result<()> {
    security_from_settings(settings).map(|_| ())
}

/// The listener's TLS transport (when `tls.cert_file` is set) and the access control, built
/// from the settings.
fn security_from_settings(
    settings: &Settings,
) -> anyhow::Result<(Option<Arc<TlsTransport>>, Authenticator)> {
    let tls = if settings.tls.cert_file.is_empty() {
        None
    } else {
        Some(Arc::new(TlsTransport::new(&settings.tls)?))
    };
    let auth = Authenticator::new(settings).map_err(anyhow::Error::msg)?;
    Ok((tls, auth))
}

/// Creates the series of labelled counters whose label values are known, so that `rate()`
/// and alerts work from the first scrape (they would otherwise appear only at the first event).
fn preset_metric_labels() {
    let m = telemetry::metrics::metrics();
    for reason in api::auth::FAILURE_REASONS {
        m.auth_failures_total.with_label_values(&[reason]);
    }
    for reason in image::cache::EvictReason::ALL {
        m.cache_evictions_total
            .with_label_values(&[reason.as_str()]);
    }
    let download_kinds = image::cache::FetchError::KINDS
        .into_iter()
        .chain(image::inspect::InspectError::KINDS);
    for kind in download_kinds {
        m.image_errors_total.with_label_values(&["download", kind]);
    }
    for kind in ["format_mismatch", "too_large"] {
        m.image_errors_total.with_label_values(&["inspect", kind]);
    }
    m.image_errors_total
        .with_label_values(&["convert", "qemu_img"]);
    m.qemu_img_invocations_total.with_label_values(&["convert"]);
    for method in jobs::model::VolumeMethod::ALL {
        m.volumes_created_total
            .with_label_values(&[method.as_str()]);
    }
}

/// Golden copies follow the cache: a removed entry takes its golden copy with it.
fn clones_follow_the_cache(volumes: &Volumes, cache: &ImageCache) {
    let Some(clones) = volumes.clones.clone() else {
        return;
    };
    let runtime = tokio::runtime::Handle::current();
    cache.on_remove(move |key, why| {
        let clones = clones.clone();
        let key = key.to_string();
        runtime.spawn(async move {
            match clones.forget(&key).await {
                Ok(true) => tracing::info!(key, reason = ?why, "golden copy removed with its cache entry"),
                Ok(false) => {}
                Err(e) => tracing::warn!(key, error = %e, "cannot remove the golden copy of a removed cache entry (removed at the next start)"),
            }
        });
    });
}

/// The dependencies in use, as probes: `storage` always, `minio` with an S3 endpoint, and
/// the volume backend's own (`lvm`, `thin_pool`, `libvirt`).
fn probes(
    settings: &Settings,
    cache: &Arc<ImageCache>,
    store: &Store,
    volumes: Vec<Probe>,
) -> Vec<Probe> {
    let mut probes = Vec::new();
    let store = store.clone();
    probes.push(Probe::new("storage", move || {
        let store = store.clone();
        async move { store.probe().await }
    }));
    if !settings.s3.endpoint.is_empty() {
        let cache = cache.clone();
        probes.push(Probe::new("minio", move || {
            let cache = cache.clone();
            async move { cache.probe_s3().await }
        }));
    }
    probes.extend(volumes);
    probes
}

/// Live controls created before the daemon runs (logging and tracing are set up first).
struct LiveControls {
    log: telemetry::logs::LogControl,
    sampling: telemetry::traces::SamplingRatio,
}

/// Everything that takes settings live on reload.
struct LiveComponents {
    engine: Engine,
    cache: Arc<ImageCache>,
    /// The image sources (the hosts redirects may lead to follow `sources.allowed_hosts`).
    sources: Arc<SourceClients>,
    /// Declared images (`[[images]]`), paired by name on reload.
    declared: Arc<DeclaredImages>,
    auth: Arc<Authenticator>,
    tls: Option<Arc<TlsTransport>>,
    controls: LiveControls,
}

impl config::reload::LiveTarget for LiveComponents {
    /// Prepare, then commit: everything that can fail (certificates, the tokens file, the log
    /// filter) is built first; only when all of it succeeded is it swapped in, by steps that
    /// cannot fail. A refused reload therefore changes nothing.
    fn apply(&self, new: &Settings) -> Result<(), String> {
        let tls = match &self.tls {
            Some(_) => Some(api::tls::server_config(&new.tls).map_err(|e| e.to_string())?),
            None => None,
        };
        let policy = Authenticator::prepare(new)?;
        let filter = telemetry::logs::LogControl::prepare(&new.log.level)?;
        let trust = image::verify::trust::Trust::load(&new.trust_policies())?;
        self.declared.check(new)?;

        if let (Some(transport), Some(config)) = (&self.tls, tls) {
            transport.install(config);
        }
        self.auth.install(policy);
        self.controls
            .log
            .install(filter, new.log.format == LogFormat::Json);
        self.controls.sampling.set(new.telemetry.sampling_ratio);
        self.engine.set_limits(
            new.jobs.max_concurrent,
            new.jobs.queue_capacity,
            new.jobs.timeout,
        );
        self.cache.set_limits(&new.cache_config());
        self.sources.apply(&new.source_policy(), trust);
        self.declared.apply(new);
        Ok(())
    }
}

async fn run(
    settings: Settings,
    source: ConfigSource,
    controls: LiveControls,
) -> anyhow::Result<()> {
    let started = Instant::now();
    // Certificates and tokens first: a misconfigured listener fails before anything starts.
    let (tls, auth) = security_from_settings(&settings)?;
    let auth = Arc::new(auth);
    let store = Store::open(&settings.storage.data_dir).with_context(|| {
        format!(
            "opening job store in {}",
            settings.storage.data_dir.display()
        )
    })?;
    let (sources, cache) = open_images(&settings, &store)?;
    let mut volumes = start_volumes(&settings, &cache).await?;
    let (settings_tx, live) = LiveSettings::new(settings.clone());
    let volume_probes = std::mem::take(&mut volumes.probes);
    let ctx = run_context(&live, cache, volumes);
    let declared = ctx.declared.clone();
    let engine = Engine::start(store.clone(), ctx.clone())
        .await
        .context("starting the job engine")?;
    engine.finish_wipes();
    declared.spawn();
    let health = start_health(&settings, &ctx.cache, &store, volume_probes).await;
    let pruner_settings = live.clone();
    engine.spawn_pruner(PRUNE_INTERVAL, move || {
        pruner_settings.current().jobs.retention
    });
    let reloader = config::reload::Reloader::new(
        source,
        settings_tx,
        Box::new(LiveComponents {
            engine: engine.clone(),
            cache: ctx.cache.clone(),
            sources: sources.clone(),
            declared: declared.clone(),
            auth: auth.clone(),
            tls: tls.clone(),
            controls,
        }),
    );
    reloader.spawn().context("starting configuration reload")?;
    let shutdown = CancellationToken::new();
    let state = Arc::new(api::state::ApiState {
        engine: engine.clone(),
        cache: ctx.cache.clone(),
        sources,
        volumes: ctx.volumes.clone(),
        settings: live.clone(),
        declared: declared.clone(),
        health,
        started,
        auth: auth.clone(),
        reloader,
        event_streams: Default::default(),
        stopping: shutdown.clone(),
    });
    let (listener, transport) = listen(&settings, tls.as_ref(), &auth).await?;
    let server = tokio::spawn(server::serve(
        listener,
        api::routes(state),
        transport,
        ServerLimits::from_settings(&settings.server),
        shutdown.clone(),
    ));

    wait_for_stop_signal().await?;
    tracing::info!("shutting down");
    shutdown.cancel();
    declared.shutdown();
    engine.shutdown(live.current().jobs.shutdown_grace).await;
    let _ = server.await;
    store.flush().await.context("flushing the job store")?;
    tracing::info!("stopped");
    Ok(())
}

/// What jobs use; the declared images are kept over the cache and the clone store.
fn run_context(live: &LiveSettings, cache: Arc<ImageCache>, volumes: Volumes) -> Arc<RunContext> {
    let declared = DeclaredImages::new(cache.clone(), volumes.clones.clone(), live.clone());
    Arc::new(RunContext {
        settings: live.clone(),
        cache,
        volumes: volumes.backend,
        clones: volumes.clones,
        encryption: volumes.encryption,
        declared,
    })
}

/// Health over every probe, probed once before the API answers, then periodically.
async fn start_health(
    settings: &Settings,
    cache: &Arc<ImageCache>,
    store: &Store,
    volume_probes: Vec<Probe>,
) -> Arc<Health> {
    let health = Arc::new(Health::new(probes(settings, cache, store, volume_probes)));
    health.probe_all().await;
    health.spawn_prober(settings.telemetry.probe_interval);
    health
}

/// The image sources and the cache (bounds applied once at start).
fn open_images(
    settings: &Settings,
    store: &Store,
) -> anyhow::Result<(Arc<SourceClients>, Arc<ImageCache>)> {
    let sources = Arc::new(SourceClients::new(
        &settings.s3_access(),
        &settings.source_policy(),
        image::verify::trust::Trust::load(&settings.trust_policies())
            .map_err(anyhow::Error::msg)?,
    )?);
    let cache = Arc::new(
        ImageCache::open(
            &settings.cache.dir,
            store.tree("cache"),
            sources.clone(),
            &settings.cache_config(),
        )
        .context("opening the image cache")?,
    );
    cache.evict(None);
    Ok((sources, cache))
}

/// The volume backend and its clone store, started against the cache (before any job).
async fn start_volumes(settings: &Settings, cache: &Arc<ImageCache>) -> anyhow::Result<Volumes> {
    let volumes = volume::select(&settings.volume_spec()).context("volume backend")?;
    tracing::info!(
        backend = ?settings.volumes.backend,
        clones = volumes.clones.as_ref().map_or("none (volumes are full copies)", |c| c.method().as_str()),
        "volume backend ready"
    );
    volumes
        .start(&cache.entries().into_iter().map(|e| e.key).collect())
        .await;
    clones_follow_the_cache(&volumes, cache);
    // Only now: an eviction removes the golden copy of its entry from here on.
    cache.spawn_evictor(CACHE_EVICT_INTERVAL);
    Ok(volumes)
}

/// The listener and its transport (TLS or plain), with the start-up lines that say which.
async fn listen(
    settings: &Settings,
    tls: Option<&Arc<TlsTransport>>,
    auth: &Authenticator,
) -> anyhow::Result<(tokio::net::TcpListener, Arc<dyn Transport>)> {
    let listen = settings.listen_addr();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let address = listener.local_addr()?;
    if auth.is_open() {
        tracing::warn!(
            %address,
            "no client CA and no API tokens are configured: every local process can call the \
             API (accepted on loopback addresses only)"
        );
    }
    let transport: Arc<dyn Transport> = match tls {
        Some(tls) => {
            tracing::info!(
                %address,
                client_auth = api::tls::client_auth_label(&settings.tls),
                api_tokens = auth.token_count(),
                "listening (TLS)"
            );
            tls.clone()
        }
        None => {
            tracing::info!(%address, api_tokens = auth.token_count(), "listening (plain HTTP)");
            Arc::new(Plain)
        }
    };
    Ok((listener, transport))
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
