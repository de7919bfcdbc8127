//! Logs: the subscriber stack (level filter, trace layer, log formatter), the spec's JSON and
//! text line formats with `job_id`, `correlation_id`, `trace_id` and `span_id` on every line
//! written inside a job, and live control of level and format (hot reload).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::TraceContextExt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layered, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// Span fields copied onto every log line written inside the span.
const CARRIED_FIELDS: &[&str] = &["job_id", "correlation_id", "volume_name"];

/// The trace layer (OpenTelemetry), first on the registry.
pub(crate) type TraceLayer =
    tracing_opentelemetry::OpenTelemetryLayer<Registry, opentelemetry_sdk::trace::Tracer>;
/// The subscriber below the reloadable filter (the trace layer on the registry).
type WithTrace = Layered<Option<TraceLayer>, Registry>;

/// Live control of logging (hot reload).
#[derive(Clone)]
pub(crate) struct LogControl {
    filter: reload::Handle<EnvFilter, WithTrace>,
    json: Arc<AtomicBool>,
}

impl LogControl {
    /// The filter `level` asks for (or `RUST_LOG`), not yet in force.
    pub(crate) fn prepare(level: &str) -> Result<EnvFilter, String> {
        build_filter(level)
    }

    /// Puts a prepared filter and the format in force; cannot fail (the reload handle only
    /// refuses once the subscriber is gone, at exit).
    pub(crate) fn install(&self, filter: EnvFilter, json: bool) {
        if let Err(e) = self.filter.reload(filter) {
            eprintln!("cannot change the log filter: {e}");
        }
        self.json.store(json, Ordering::Relaxed);
    }
}

/// `RUST_LOG` wins over `log.level` when set (operators debugging a host).
fn build_filter(level: &str) -> Result<EnvFilter, String> {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| level.to_string());
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|e| format!("log level `{directives}`: {e}"))
}

/// Installs the global subscriber: trace layer, level filter, field capture, formatter
/// (to stderr, which journald collects).
pub(crate) fn init(
    level: &str,
    json: bool,
    trace_layer: Option<TraceLayer>,
) -> Result<LogControl, String> {
    let (filter, handle) = reload::Layer::new(build_filter(level)?);
    let json = Arc::new(AtomicBool::new(json));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .event_format(SpecFormat { json: json.clone() });
    tracing_subscriber::registry()
        .with(trace_layer)
        .with(filter)
        .with(FieldCapture)
        .with(fmt)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(LogControl {
        filter: handle,
        json,
    })
}

/// Values of `CARRIED_FIELDS` recorded on a span.
#[derive(Default, Clone)]
struct Carried(BTreeMap<&'static str, String>);

impl Visit for Carried {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if let Some(name) = CARRIED_FIELDS.iter().find(|n| **n == field.name()) {
            let v = format!("{value:?}");
            if !v.is_empty() && v != "\"\"" {
                self.0.insert(name, v.trim_matches('"').to_string());
            }
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if let Some(name) = CARRIED_FIELDS.iter().find(|n| **n == field.name())
            && !value.is_empty()
        {
            self.0.insert(name, value.to_string());
        }
    }
}

/// Layer that keeps the carried fields of each span in its extensions.
pub(crate) struct FieldCapture;

impl<S> Layer<S> for FieldCapture
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut carried = Carried::default();
        attrs.record(&mut carried);
        if let Some(span) = ctx.span(id)
            && !carried.0.is_empty()
        {
            span.extensions_mut().insert(carried);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        let mut carried = ext.get_mut::<Carried>().cloned().unwrap_or_default();
        values.record(&mut carried);
        if !carried.0.is_empty() {
            ext.replace(carried);
        }
    }
}

/// Event fields as JSON values (message separately).
#[derive(Default)]
struct EventFields {
    message: String,
    fields: serde_json::Map<String, serde_json::Value>,
}

impl Visit for EventFields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let v = format!("{value:?}");
        if field.name() == "message" {
            self.message = v;
        } else {
            self.fields
                .insert(field.name().to_string(), serde_json::Value::String(v));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else if !value.is_empty() {
            self.fields.insert(
                field.name().to_string(),
                serde_json::Value::String(value.into()),
            );
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.fields.insert(field.name().to_string(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.fields.insert(field.name().to_string(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.fields.insert(field.name().to_string(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.fields.insert(field.name().to_string(), value.into());
    }
}

/// The component a log line comes from: the module of this crate (`jobs`, `api`, ...) or the
/// foreign crate's name.
fn component(target: &str) -> &str {
    let mut parts = target.split("::");
    match (parts.next(), parts.next()) {
        (Some("libvirt_volume_provisioner"), Some(module)) => module,
        (Some("libvirt_volume_provisioner"), None) => "provisioner",
        (Some(krate), _) => krate,
        _ => "provisioner",
    }
}

/// The monitoring spec's line formats.
pub(crate) struct SpecFormat {
    json: Arc<AtomicBool>,
}

impl<S, N> FormatEvent<S, N> for SpecFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut fields = EventFields::default();
        event.record(&mut fields);

        // Carried span fields, nearest span first.
        let mut carried: BTreeMap<&'static str, String> = BTreeMap::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope {
                if let Some(c) = span.extensions().get::<Carried>() {
                    for (k, v) in &c.0 {
                        carried.entry(k).or_insert_with(|| v.clone());
                    }
                }
            }
        }
        let mut ids = Vec::new();
        if ctx.event_scope().is_some() {
            let cx = tracing::Span::current().context();
            let span = cx.span();
            let sc = span.span_context();
            if sc.is_valid() {
                ids.push(("trace_id", sc.trace_id().to_string()));
                ids.push(("span_id", sc.span_id().to_string()));
            }
        }
        let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let component = component(meta.target());

        if self.json.load(Ordering::Relaxed) {
            let mut obj = serde_json::Map::new();
            obj.insert("timestamp".into(), timestamp.into());
            obj.insert(
                "level".into(),
                meta.level().as_str().to_ascii_lowercase().into(),
            );
            obj.insert("component".into(), component.into());
            obj.insert("message".into(), fields.message.into());
            for (k, v) in ids {
                obj.insert(k.into(), v.into());
            }
            for (k, v) in carried {
                obj.insert(k.into(), v.into());
            }
            for (k, v) in fields.fields {
                obj.entry(k).or_insert(v);
            }
            let line = serde_json::Value::Object(obj).to_string();
            writeln!(writer, "{line}")
        } else {
            write!(
                writer,
                "{timestamp} [{}] {component}: {}",
                meta.level(),
                fields.message
            )?;
            let mut extra: Vec<String> = Vec::new();
            for (k, v) in carried {
                extra.push(format!("{k}={v}"));
            }
            for (k, v) in fields.fields {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                extra.push(format!("{k}={v}"));
            }
            for (k, v) in ids {
                extra.push(format!("{k}={v}"));
            }
            if !extra.is_empty() {
                write!(writer, " ({})", extra.join(", "))?;
            }
            writeln!(writer)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components() {
        assert_eq!(
            component("libvirt_volume_provisioner::jobs::engine"),
            "jobs"
        );
        assert_eq!(component("libvirt_volume_provisioner"), "provisioner");
        assert_eq!(component("hyper::proto"), "hyper");
    }
}
