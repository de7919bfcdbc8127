//! libvirt-volume-provisioner: wires configuration, the job store, the image cache, volume
//! backends, the job engine, telemetry and the HTTP API into the daemon.

pub mod api;
pub mod config;
pub mod convert;
pub mod image;
pub mod jobs;
pub mod telemetry;
pub mod volume;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::api::server::{self, Plain, ServerLimits};
use crate::config::{ConfigSource, LiveSettings, Settings};
use crate::image::cache::ImageCache;
use crate::image::source::SourceClients;
use crate::jobs::engine::Engine;
use crate::jobs::runner::RunContext;
use crate::jobs::store::Store;
use crate::telemetry::health::Health;
use crate::volume::libvirt::PoolRefresher;

/// How often finished jobs past retention are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);
/// How often the cache's age and size bounds are applied (besides after every download).
const CACHE_EVICT_INTERVAL: Duration = Duration::from_secs(600);

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn serve(source: ConfigSource) -> anyhow::Result<()> {
    let settings = config::load(&source)?;
    // object_store brings rustls' aws-lc-rs provider; make it the process default once.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (traces, trace_layer) = telemetry::traces::Tracing::init(&settings.telemetry)
        .map_err(|e| anyhow::anyhow!("tracing: {e:#}"))?;
    let _log = telemetry::logs::init(&settings.log, Some(trace_layer))
        .map_err(|e| anyhow::anyhow!("logging: {e}"))?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %source.path.display(),
        backend = ?settings.volumes.backend,
        otlp_endpoint = %settings.telemetry.otlp_endpoint,
        "starting libvirt-volume-provisioner"
    );
    let result = run(settings).await;
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "daemon stopped with an error");
    }
    // Spans still buffered are exported before the runtime ends.
    traces.shutdown();
    result
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let started = Instant::now();
    let listen = settings.listen_addr();
    let store = Store::open(&settings.storage.data_dir).with_context(|| {
        format!(
            "opening job store in {}",
            settings.storage.data_dir.display()
        )
    })?;
    let sources = Arc::new(SourceClients::new(&settings)?);
    let cache = Arc::new(
        ImageCache::open(&settings.cache.dir, &store, sources, &settings)
            .context("opening the image cache")?,
    );
    cache.evict(None);
    cache.spawn_evictor(CACHE_EVICT_INTERVAL);
    let volumes = volume::backend_from_settings(&settings).context("volume backend")?;
    let settings = Arc::new(settings);
    let ctx = Arc::new(RunContext {
        settings: settings.clone(),
        cache,
        volumes,
        libvirt: PoolRefresher::new(&settings.libvirt.uri, &settings.libvirt.pool),
    });
    let engine = Engine::start(store.clone(), ctx.clone())
        .await
        .context("starting the job engine")?;
    let health = Arc::new(Health::default());
    health.probe_all(&ctx, &store).await;
    health.spawn_prober(
        ctx.clone(),
        store.clone(),
        settings.telemetry.probe_interval,
    );
    let retention = settings.jobs.retention;
    engine.spawn_pruner(PRUNE_INTERVAL, move || retention);

    let (_settings_tx, live) = LiveSettings::new((*settings).clone());
    let state = Arc::new(api::ApiState {
        engine: engine.clone(),
        settings: live,
        health,
        started,
        auth: Arc::new(api::auth::Authenticator::new(&settings).map_err(anyhow::Error::msg)?),
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(address = %listener.local_addr()?, "listening (plain HTTP)");

    let shutdown = CancellationToken::new();
    let server = tokio::spawn(server::serve(
        listener,
        api::routes(state),
        Arc::new(Plain),
        ServerLimits {
            max_connections: settings.server.max_connections,
            header_timeout: settings.server.header_timeout,
            handshake_timeout: settings.server.handshake_timeout,
        },
        shutdown.clone(),
    ));

    wait_for_stop_signal().await?;
    tracing::info!("shutting down");
    shutdown.cancel();
    engine.shutdown(settings.jobs.shutdown_grace).await;
    let _ = server.await;
    store.flush().await.context("flushing the job store")?;
    tracing::info!("stopped");
    Ok(())
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
