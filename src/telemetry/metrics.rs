//! Prometheus metrics: the one registry, every metric of the monitoring spec (plus process,
//! build and security metrics), and small helpers the modules call where each event happens.

use std::collections::VecDeque;
use std::sync::{LazyLock, Mutex};

use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

const NS: &str = "libvirt_volume_provisioner";
/// Lookups the rolling cache hit ratio covers.
const HIT_RATIO_WINDOW: usize = 100;

/// Declares `Metrics` from one table: each row is a field, its type, and how it is made (its
/// name is the field's, prefixed with the namespace). A new metric is one row here.
macro_rules! metrics {
    ($( $(#[doc = $doc:literal])* $field:ident : $ty:ty = $make:ident($($arg:expr),* $(,)?); )*) => {
        /// Every metric the daemon exports.
        pub(crate) struct Metrics {
            pub(crate) registry: Registry,
            $( $(#[doc = $doc])* pub(crate) $field: $ty, )*
            /// The last lookups, for the rolling hit ratio.
            hit_window: Mutex<VecDeque<bool>>,
        }

        impl Metrics {
            /// Every metric of the table, registered in `r`.
            fn registered(r: Registry) -> Metrics {
                Metrics {
                    $( $field: $make(&r, stringify!($field), $($arg),*), )*
                    hit_window: Mutex::new(VecDeque::with_capacity(HIT_RATIO_WINDOW)),
                    registry: r,
                }
            }
        }
    };
}

metrics! {
    requests_total: IntCounterVec = counter_vec("Total HTTP requests", &["method", "endpoint", "status"]);
    request_duration_seconds: HistogramVec = histogram_vec("HTTP request latency", &["method", "endpoint"], request_buckets());
    active_jobs: IntGauge = int_gauge("Currently running jobs");
    jobs_total: IntCounterVec = counter_vec("Jobs by terminal status: completed, failed, cancelled", &["status"]);
    job_duration_seconds: HistogramVec = histogram_vec("Job execution duration (from start of running)", &["status"], duration_buckets());
    cache_hits_total: IntCounter = int_counter("Cache hits (image already local and valid)");
    cache_misses_total: IntCounter = int_counter("Cache misses (download required)");
    cache_hit_ratio: Gauge = gauge("Rolling cache hit ratio over the last 100 lookups (0.0-1.0)");
    images_downloaded_total: IntCounter = int_counter("Successful image downloads");
    image_download_size_bytes: HistogramVec = histogram_vec("Downloaded image sizes", &["image_type"], size_buckets());
    image_errors_total: IntCounterVec = counter_vec("Image operation errors", &["operation", "error_type"]);
    storage_operations_total: IntCounterVec = counter_vec("Storage DB operations", &["operation", "result"]);
    storage_errors_total: IntCounterVec = counter_vec("Storage DB errors", &["operation", "error_type"]);
    stage_duration_seconds: HistogramVec = histogram_vec("Download/convert stage durations", &["stage"], duration_buckets());
    stage_throughput_bytes_per_second: GaugeVec = gauge_vec("Current throughput per stage (0 when no stage of that kind runs)", &["stage"]);
    health_status: IntGauge = int_gauge("1=healthy, 0=degraded (all job slots busy)");
    dependencies_up: IntGaugeVec = int_gauge_vec("1=up, 0=down per dependency: minio, lvm, libvirt, storage", &["dependency"]);
    build_info: IntGaugeVec = int_gauge_vec("Build information", &["version"]);
    job_slots: IntGauge = int_gauge("Configured job slots (jobs.max_concurrent)");
    queued_jobs: IntGauge = int_gauge("Pending jobs waiting for a slot");
    auth_failures_total: IntCounterVec = counter_vec("Refused API calls by reason", &["reason"]);
    config_reload_total: IntCounterVec = counter_vec("Configuration reloads by result", &["result"]);
    config_last_reload_success_timestamp_seconds: Gauge = gauge("Unix time of the last successful configuration load");
    qemu_img_invocations_total: IntCounterVec = counter_vec("qemu-img processes started, by subcommand", &["subcommand"]);
    libvirt_pool_refresh_errors_total: IntCounter = int_counter("Failed libvirt storage pool refreshes");
    cache_evictions_total: CounterVec = float_counter_vec("Cache entries evicted by reason", &["reason"]);
    download_bytes_total: IntCounter = int_counter("Image bytes received from sources (a resumed download counts only what it fetched)");
    /// Thin pool data use, 0.0-1.0 (`volumes.lvm.thin_pool`).
    thin_pool_data_ratio: Gauge = gauge("Data use of the thin pool (volumes.lvm.thin_pool), 0.0-1.0");
    /// Thin pool metadata use, 0.0-1.0.
    thin_pool_metadata_ratio: Gauge = gauge("Metadata use of the thin pool, 0.0-1.0");
    /// Complete golden copies (golden LVs on the thin pool, or golden files).
    golden_images: IntGauge = int_gauge("Complete golden images (golden LVs on the thin pool, or golden files with reflinks)");
    /// Data the golden copies hold.
    golden_image_bytes: IntGauge = int_gauge("Data held by golden images (bounded by volumes.lvm.golden_max_bytes or volumes.directory.golden_max_bytes)");
    /// Provision jobs completed, by how the volume got its content (`thin-snapshot`,
    /// `reflink`, `copy`).
    volumes_created_total: IntCounterVec = counter_vec("Provisioned volumes by method: thin-snapshot (of a golden LV), reflink (of a golden file) or copy (qemu-img)", &["method"]);
    /// Ranged GETs sent by downloads (one per part, plus one per part retry).
    download_ranged_requests_total: IntCounter = int_counter("Ranged GETs sent by image downloads (parts and part retries)");
    /// Parts asked for again after a transient failure or a stall.
    download_part_retries_total: IntCounter = int_counter("Download parts requested again after a transient failure or a stall");
    /// Cache hits by how the entry was confirmed: `skipped` (within
    /// `cache.revalidate_interval`), `unchanged`, `changed`, `source_unavailable`.
    cache_revalidations_total: IntCounterVec = counter_vec("Cache entries confirmed against their source, by result", &["result"]);
    /// Bytes written by bulk writers, by operation: `wipe` (zeroed or discarded before a
    /// deletion or a reuse), `clone` (copied by a clone job), `convert` (written by qemu-img).
    bulk_io_bytes_total: IntCounterVec = counter_vec("Bytes handled by bulk writers (wipes, clone copies, image writes), by operation", &["op"]);
    /// Declared images (`[[images]]`) by state: `cached`, `fetching`, `pending`, `failed`.
    declared_images: IntGaugeVec = int_gauge_vec("Declared images ([[images]]) by state: cached, fetching, pending (not cached yet), failed (not cached, last attempt failed)", &["state"]);
    /// Refreshes of declared images by result: `unchanged`, `changed`, `error`.
    declared_image_refreshes_total: IntCounterVec = counter_vec("Declared image refreshes (is there a new version?) by result: unchanged, changed, error", &["result"]);
    /// Age of each declared image's current version; `image` is a name from the configuration.
    declared_image_age_seconds: GaugeVec = gauge_vec("Seconds since each declared image's current version was fetched (image: the declared name, from the configuration only)", &["image"]);
}

fn name(n: &str) -> String {
    format!("{NS}_{n}")
}

fn counter_vec(r: &Registry, n: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name(n), help), labels).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn histogram_vec(r: &Registry, n: &str, help: &str, labels: &[&str], b: Vec<f64>) -> HistogramVec {
    let m = HistogramVec::new(HistogramOpts::new(name(n), help).buckets(b), labels)
        .expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn gauge_vec(r: &Registry, n: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let m = GaugeVec::new(Opts::new(name(n), help), labels).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn int_gauge_vec(r: &Registry, n: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name(n), help), labels).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn int_gauge(r: &Registry, n: &str, help: &str) -> IntGauge {
    let m = IntGauge::with_opts(Opts::new(name(n), help)).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn gauge(r: &Registry, n: &str, help: &str) -> Gauge {
    let m = Gauge::with_opts(Opts::new(name(n), help)).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn float_counter_vec(r: &Registry, n: &str, help: &str, labels: &[&str]) -> CounterVec {
    let m = CounterVec::new(Opts::new(name(n), help), labels).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn int_counter(r: &Registry, n: &str, help: &str) -> IntCounter {
    let m = IntCounter::with_opts(Opts::new(name(n), help)).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

/// The `method` label of the request metrics: the methods the API serves, `other` for any
/// other (a client-chosen method never becomes a label value: one per request would grow the
/// registry without bound).
pub(crate) fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "DELETE" => "DELETE",
        "PUT" => "PUT",
        _ => "other",
    }
}

/// HTTP latencies: 1 ms .. ~65 s.
fn request_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 17).expect("valid buckets")
}

/// Job and stage durations: 1 s .. ~9 h (jobs run up to hours).
fn duration_buckets() -> Vec<f64> {
    vec![
        1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
        10800.0, 21600.0, 32400.0,
    ]
}

/// Image sizes: 1 MiB .. 64 GiB.
fn size_buckets() -> Vec<f64> {
    prometheus::exponential_buckets((1u64 << 20) as f64, 2.0, 17).expect("valid buckets")
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(ProcessMetrics::new()))
            .expect("process collector");
        let m = Metrics::registered(r);
        m.build_info
            .with_label_values(&[concat!("v", env!("CARGO_PKG_VERSION"))])
            .set(1);
        m.health_status.set(1);
        for stage in ["download", "convert"] {
            m.stage_throughput_bytes_per_second
                .with_label_values(&[stage])
                .set(0.0);
        }
        for status in ["completed", "failed", "cancelled"] {
            m.jobs_total.with_label_values(&[status]);
        }
        for result in ["skipped", "unchanged", "changed", "source_unavailable"] {
            m.cache_revalidations_total.with_label_values(&[result]);
        }
        for op in ["wipe", "clone", "convert"] {
            m.bulk_io_bytes_total.with_label_values(&[op]);
        }
        for state in ["cached", "fetching", "pending", "failed"] {
            m.declared_images.with_label_values(&[state]);
        }
        for result in ["unchanged", "changed", "error"] {
            m.declared_image_refreshes_total
                .with_label_values(&[result]);
        }
        m
    }

    /// A cache lookup: counts it and updates the rolling hit ratio.
    pub(crate) fn cache_lookup(&self, hit: bool) {
        if hit {
            self.cache_hits_total.inc();
        } else {
            self.cache_misses_total.inc();
        }
        let mut window = self.hit_window.lock().unwrap_or_else(|e| e.into_inner());
        if window.len() == HIT_RATIO_WINDOW {
            window.pop_front();
        }
        window.push_back(hit);
        let hits = window.iter().filter(|h| **h).count();
        self.cache_hit_ratio.set(hits as f64 / window.len() as f64);
    }

    /// A storage (sled) operation and its result.
    pub(crate) fn storage_op<T, E: StorageErrorKind>(
        &self,
        operation: &str,
        result: &Result<T, E>,
    ) {
        match result {
            Ok(_) => self
                .storage_operations_total
                .with_label_values(&[operation, "success"])
                .inc(),
            Err(e) => {
                self.storage_operations_total
                    .with_label_values(&[operation, "error"])
                    .inc();
                self.storage_errors_total
                    .with_label_values(&[operation, e.error_type()])
                    .inc();
            }
        }
    }

    /// The thin pool's use (percent) as last read.
    pub(crate) fn thin_pool_use(&self, data_percent: f64, metadata_percent: f64) {
        self.thin_pool_data_ratio.set(data_percent / 100.0);
        self.thin_pool_metadata_ratio.set(metadata_percent / 100.0);
    }

    pub(crate) fn image_error(&self, operation: &str, error_type: &str) {
        self.image_errors_total
            .with_label_values(&[operation, error_type])
            .inc();
    }

    /// Prometheus text exposition of everything.
    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

const PROCESS_CPU: &str = "process_cpu_seconds_total";

/// The standard process metrics. The prometheus crate's collector reports CPU time in whole
/// seconds (a mostly idle daemon would show rate() 0 with jumps of 1); here CPU comes from
/// getrusage(RUSAGE_SELF) to the microsecond and the other process metrics pass through.
#[cfg(target_os = "linux")]
struct ProcessMetrics {
    inner: prometheus::process_collector::ProcessCollector,
    cpu: prometheus::Counter,
}

#[cfg(target_os = "linux")]
impl ProcessMetrics {
    fn new() -> ProcessMetrics {
        ProcessMetrics {
            inner: prometheus::process_collector::ProcessCollector::for_self(),
            cpu: prometheus::Counter::with_opts(Opts::new(
                PROCESS_CPU,
                "Total user and system CPU time spent in seconds.",
            ))
            .expect("valid metric"),
        }
    }
}

#[cfg(target_os = "linux")]
impl prometheus::core::Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d: Vec<_> = self
            .inner
            .desc()
            .into_iter()
            .filter(|d| d.fq_name != PROCESS_CPU)
            .collect();
        d.extend(self.cpu.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use nix::sys::resource::{UsageWho, getrusage};
        let mut families: Vec<_> = self
            .inner
            .collect()
            .into_iter()
            .filter(|f| f.name() != PROCESS_CPU)
            .collect();
        if let Ok(u) = getrusage(UsageWho::RUSAGE_SELF) {
            let secs =
                |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1_000_000.0;
            let total = secs(u.user_time()) + secs(u.system_time());
            let past = self.cpu.get();
            if total > past {
                self.cpu.inc_by(total - past);
            }
        }
        families.extend(self.cpu.collect());
        families
    }
}

/// The `error_type` label of a failed storage operation, from the error's variant.
pub(crate) trait StorageErrorKind {
    fn error_type(&self) -> &'static str;
}

impl StorageErrorKind for sled::Error {
    fn error_type(&self) -> &'static str {
        match self {
            sled::Error::Io(_) => "io",
            sled::Error::Corruption { .. } => "corruption",
            sled::Error::CollectionNotFound(_) => "not_found",
            sled::Error::Unsupported(_) => "unsupported",
            sled::Error::ReportableBug(_) => "bug",
        }
    }
}

impl StorageErrorKind for serde_json::Error {
    fn error_type(&self) -> &'static str {
        "serialization"
    }
}

/// The process-wide metrics.
pub(crate) static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub(crate) fn metrics() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_metric_is_registered() {
        let m = Metrics::new();
        // Vectors appear once they have a label set.
        m.requests_total
            .with_label_values(&["GET", "/health", "200"]);
        m.request_duration_seconds
            .with_label_values(&["GET", "/health"]);
        m.job_duration_seconds.with_label_values(&["completed"]);
        m.image_download_size_bytes.with_label_values(&["qcow2"]);
        m.image_errors_total
            .with_label_values(&["download", "auth"]);
        m.storage_operations_total
            .with_label_values(&["put_job", "success"]);
        m.storage_errors_total.with_label_values(&["put_job", "io"]);
        m.stage_duration_seconds.with_label_values(&["download"]);
        m.dependencies_up.with_label_values(&["storage"]);
        let text = m.render();
        for m in [
            "requests_total",
            "request_duration_seconds",
            "active_jobs",
            "jobs_total",
            "job_duration_seconds",
            "cache_hits_total",
            "cache_misses_total",
            "cache_hit_ratio",
            "images_downloaded_total",
            "image_download_size_bytes",
            "image_errors_total",
            "storage_operations_total",
            "storage_errors_total",
            "stage_duration_seconds",
            "stage_throughput_bytes_per_second",
            "health_status",
            "dependencies_up",
            "build_info",
        ] {
            assert!(
                text.contains(&format!("# TYPE {NS}_{m} ")),
                "{m} missing from:\n{text}"
            );
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_cpu_is_reported_below_whole_seconds() {
        let m = Metrics::new();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let text = m.render();
        let cpu: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
            .expect("process_cpu_seconds_total exported")
            .parse()
            .unwrap();
        assert!(cpu > 0.0, "{text}");
        assert_eq!(
            text.matches("# TYPE process_cpu_seconds_total counter")
                .count(),
            1
        );
        assert!(text.contains("process_resident_memory_bytes "));
        assert!(text.contains("process_open_fds "));
    }

    #[test]
    fn hit_ratio_is_rolling() {
        let m = Metrics::new();
        for _ in 0..HIT_RATIO_WINDOW {
            m.cache_lookup(false);
        }
        assert_eq!(m.cache_hit_ratio.get(), 0.0);
        for _ in 0..HIT_RATIO_WINDOW / 2 {
            m.cache_lookup(true);
        }
        assert_eq!(m.cache_hit_ratio.get(), 0.5);
    }

    #[test]
    fn method_label_is_a_fixed_set() {
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("DELETE"), "DELETE");
        assert_eq!(method_label("PUT"), "PUT");
        assert_eq!(method_label("get"), "other");
        assert_eq!(method_label(&"X".repeat(100_000)), "other");
    }
}
