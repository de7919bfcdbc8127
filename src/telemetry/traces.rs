//! Traces: the OpenTelemetry tracer provider behind the `tracing` spans. It is always installed
//! (so log lines carry trace and span ids, and jobs link to the request that made them);
//! spans are exported over OTLP/gRPC only when `telemetry.otlp_endpoint` is set. Also owns the
//! live sampling ratio and the flush on shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::trace::{Link, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    Sampler, SamplingResult, SdkTracerProvider, ShouldSample, SpanData, SpanExporter,
};

use crate::telemetry::logs::TraceLayer;

/// A ratio sampler whose ratio can change at runtime; children follow their parent's decision
/// (so a job's spans are sampled exactly when the request that made it was).
#[derive(Debug, Clone)]
struct LiveRatioSampler {
    ratio: Arc<AtomicU64>,
}

impl ShouldSample for LiveRatioSampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let ratio = f64::from_bits(self.ratio.load(Ordering::Relaxed));
        Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))).should_sample(
            parent_context,
            trace_id,
            name,
            span_kind,
            attributes,
            links,
        )
    }
}

/// Runs the OTLP exporter's calls on a runtime of its own: the SDK's batch processor exports
/// from a plain thread, and tonic needs a Tokio reactor there.
#[derive(Debug)]
struct RuntimeExporter<E> {
    inner: Arc<E>,
    handle: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for RuntimeExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        match self
            .handle
            .spawn(async move { inner.export(batch).await })
            .await
        {
            Ok(r) => r,
            Err(e) => Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                e.to_string(),
            )),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// The live sampling ratio of new traces.
#[derive(Debug, Clone)]
pub(crate) struct SamplingRatio(Arc<AtomicU64>);

impl SamplingRatio {
    pub(crate) fn set(&self, ratio: f64) {
        self.0.store(ratio.to_bits(), Ordering::Relaxed);
    }
}

/// Where and how traces are exported (from `telemetry.*`).
pub(crate) struct TraceExport {
    /// OTLP/gRPC collector URL; empty: traces are not exported.
    pub(crate) endpoint: String,
    pub(crate) service_name: String,
    pub(crate) sampling_ratio: f64,
    /// PEM file of CA certificates trusted for an `https://` collector.
    pub(crate) ca_file: Option<std::path::PathBuf>,
}

/// The tracer provider and what it needs to live.
pub(crate) struct Tracing {
    provider: SdkTracerProvider,
    ratio: Arc<AtomicU64>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Tracing {
    /// Builds the provider (with the OTLP exporter when configured) and the tracing layer.
    pub(crate) fn init(settings: &TraceExport) -> anyhow::Result<(Tracing, TraceLayer)> {
        let ratio = Arc::new(AtomicU64::new(settings.sampling_ratio.to_bits()));
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let mut builder = SdkTracerProvider::builder()
            .with_sampler(LiveRatioSampler {
                ratio: ratio.clone(),
            })
            .with_resource(resource);
        let mut runtime = None;
        if !settings.endpoint.is_empty() {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-export")
                .enable_all()
                .build()?;
            let exporter = {
                let _enter = rt.enter();
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(settings.endpoint.clone())
                    .with_timeout(Duration::from_secs(10));
                if settings.endpoint.starts_with("https://") {
                    use opentelemetry_otlp::tonic_types::transport::{
                        Certificate, ClientTlsConfig,
                    };
                    let mut tls = ClientTlsConfig::new().with_native_roots();
                    if let Some(path) = &settings.ca_file {
                        let pem = std::fs::read(path).map_err(|e| {
                            anyhow::anyhow!("telemetry.otlp_ca_file {}: {e}", path.display())
                        })?;
                        tls = tls.ca_certificate(Certificate::from_pem(pem));
                    }
                    b = b.with_tls_config(tls);
                }
                b.build()?
            };
            builder = builder.with_batch_exporter(RuntimeExporter {
                inner: Arc::new(exporter),
                handle: rt.handle().clone(),
            });
            runtime = Some(rt);
        }
        let provider = builder.build();
        let tracer = provider.tracer("libvirt-volume-provisioner");
        let layer = tracing_opentelemetry::layer().with_tracer(tracer);
        Ok((
            Tracing {
                provider,
                ratio,
                runtime,
            },
            layer,
        ))
    }

    /// A handle that changes the share of new traces sampled (hot reload).
    pub(crate) fn sampling(&self) -> SamplingRatio {
        SamplingRatio(self.ratio.clone())
    }

    /// Exports what is buffered and stops. Runs on a plain thread: the provider blocks while
    /// the export runtime finishes, and a runtime must not be dropped inside async code.
    pub(crate) fn shutdown(self) {
        let Tracing {
            provider, runtime, ..
        } = self;
        let _ = std::thread::spawn(move || {
            if let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(10)) {
                eprintln!("trace export shutdown: {e}");
            }
            drop(runtime);
        })
        .join();
    }
}
