//! Traces and logs: a real OTLP/gRPC receiver (tonic, opentelemetry-proto's service) receives
//! the spans of a provisioning job, children of the HTTP request that created it (also for a
//! queued job run after a restart); every log line written inside a job carries its job id and
//! trace ids; the text format matches the monitoring spec.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::{Value, json};

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
    service: String,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[async_trait::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .map(|kv| value_string(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Received {
                        name: s.name,
                        trace_id: hex::encode(&s.trace_id),
                        span_id: hex::encode(&s.span_id),
                        parent: hex::encode(&s.parent_span_id),
                        attributes: s
                            .attributes
                            .iter()
                            .map(|kv| {
                                (
                                    kv.key.clone(),
                                    value_string(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                                )
                            })
                            .collect(),
                        service: service.clone(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn value_string(v: Option<&AnyValue>) -> String {
    match v {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// Starts the receiver on a free port; returns its endpoint and the collected spans.
async fn start_collector() -> (String, Arc<Mutex<Vec<Received>>>) {
    let collector = Collector::default();
    let spans = collector.spans.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve(addr)
            .await
            .unwrap();
    });
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (format!("http://{addr}"), spans)
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn print_tree(spans: &[Received], parent: &str, depth: usize) {
    for s in spans.iter().filter(|s| s.parent == parent) {
        let mut keys: Vec<_> = s
            .attributes
            .iter()
            .filter(|(k, _)| {
                [
                    "job_id",
                    "image_url",
                    "destination_path",
                    "volume_name",
                    "volume_size_bytes",
                    "http.route",
                    "http.response.status_code",
                ]
                .contains(&k.as_str())
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        keys.sort();
        eprintln!(
            "{}{} [{}] {}",
            "  ".repeat(depth),
            s.name,
            s.span_id,
            keys.join(" ")
        );
        print_tree(spans, &s.span_id, depth + 1);
    }
}

// The receiver runs on the test's runtime while the test blocks in `Daemon::stop`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_spans_reach_the_otlp_receiver_as_children_of_the_request() {
    let (endpoint, spans) = start_collector().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = TestConfig::new(dir)
        .set("telemetry.otlp_endpoint", endpoint)
        .set("telemetry.service_name", "lvp-test");
    let d = Daemon::start(dir, &config);
    let c = client();
    let image = dir.join("images/traced.qcow2");
    make_qcow2(&image, "16M");
    let r = c
        .post(d.url("/api/v1/jobs"))
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .json(
            &json!({"image_url": file_url(&image), "volume_name": "traced",
                      "volume_size_gb": 1, "correlation_id": "corr-trace"}),
        )
        .send()
        .await
        .unwrap();
    let id = accepted_job(r).await;
    let job = wait_job(&c, &d, &id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "completed");
    // Spans still buffered are exported on shutdown.
    assert!(d.stop().success());

    let spans = spans.lock().unwrap().clone();
    eprintln!("received trace:");
    print_tree(&spans, CLIENT_SPAN, 0);
    let by_name = |n: &str| -> Received {
        spans
            .iter()
            .find(|s| s.name == n)
            .unwrap_or_else(|| {
                panic!(
                    "no span {n} in {:?}",
                    spans.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            })
            .clone()
    };
    let http = by_name("POST /api/v1/jobs");
    let job_span = by_name("runJob");
    let download = by_name("DownloadImageToPath");
    let create = by_name("CreateVolume");
    let populate = by_name("PopulateVolume");
    for s in [&http, &job_span, &download, &create, &populate] {
        assert_eq!(s.trace_id, TRACE_ID, "{} is in the caller's trace", s.name);
        assert_eq!(s.service, "lvp-test");
    }
    assert_eq!(
        http.parent, CLIENT_SPAN,
        "the request span continues the caller's trace"
    );
    assert_eq!(http.attributes["http.route"], "/api/v1/jobs");
    assert_eq!(http.attributes["http.response.status_code"], "202");
    assert_eq!(
        job_span.parent, http.span_id,
        "runJob is a child of the request"
    );
    assert_eq!(job_span.attributes["job_id"], id);
    assert_eq!(job_span.attributes["correlation_id"], "corr-trace");
    assert_eq!(job_span.attributes["image_url"], file_url(&image));
    assert_eq!(job_span.attributes["volume_name"], "traced");
    for child in [&download, &create, &populate] {
        assert_eq!(
            child.parent, job_span.span_id,
            "{} under runJob",
            child.name
        );
    }
    assert_eq!(download.attributes["image_url"], file_url(&image));
    assert!(download.attributes.contains_key("destination_path"));
    assert_eq!(create.attributes["volume_name"], "traced");
    assert_eq!(
        create.attributes["volume_size_bytes"],
        (1u64 << 30).to_string()
    );
    assert_eq!(populate.attributes["volume_name"], "traced");
    assert!(populate.attributes["volume_path"].ends_with("/volumes/traced"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_run_after_restart_links_back_to_its_request() {
    let (endpoint, spans) = start_collector().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = TestConfig::new(dir)
        .set("jobs.max_concurrent", 1)
        .set("telemetry.otlp_endpoint", endpoint);
    let path = slow_qemu_img_path(dir, 30);
    let d = Daemon::start_with_env(dir, &config, &[("PATH", &path)]);
    let c = client();
    let image = dir.join("images/q.qcow2");
    make_qcow2(&image, "8M");
    let first = submit(
        &c,
        &d,
        json!({"image_url": file_url(&image), "volume_name": "first", "volume_size_gb": 1}),
    )
    .await;
    wait_until(&c, &d, &first, Duration::from_secs(60), |v| {
        v["status"] == "running"
    })
    .await;
    let queued_trace = "0af7651916cd43dd8448eb211c80319c";
    let r = c
        .post(d.url("/api/v1/jobs"))
        .header(
            "traceparent",
            format!("00-{queued_trace}-b7ad6b7169203331-01"),
        )
        .json(&json!({"image_url": file_url(&image), "volume_name": "queued", "volume_size_gb": 1}))
        .send()
        .await
        .unwrap();
    let queued = accepted_job(r).await;
    d.kill9();

    let d = Daemon::start(dir, &config);
    let job = wait_job(&c, &d, &queued, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert!(d.stop().success());
    let spans = spans.lock().unwrap().clone();
    let run = spans
        .iter()
        .find(|s| s.name == "runJob" && s.attributes.get("job_id") == Some(&queued))
        .expect("runJob span of the resumed job");
    assert_eq!(
        run.trace_id, queued_trace,
        "stored trace context survives the restart"
    );
    let request = spans
        .iter()
        .find(|s| s.trace_id == queued_trace && s.name == "POST /api/v1/jobs");
    // The request span was exported before the kill only if its batch was flushed; the link
    // itself is the parent id stored with the job.
    if let Some(request) = request {
        assert_eq!(run.parent, request.span_id);
    } else {
        assert_ne!(run.parent, "", "runJob has the stored parent");
    }
}

fn job_lines<'a>(log: &'a str, id: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(id)).collect()
}

#[tokio::test]
async fn every_log_line_inside_a_job_carries_its_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    let image = dir.join("images/logged.qcow2");
    make_qcow2(&image, "8M");
    let id = submit(
        &c,
        &d,
        json!({"image_url": file_url(&image), "volume_name": "logged",
                                   "volume_size_gb": 1, "correlation_id": "corr-log"}),
    )
    .await;
    assert_eq!(
        wait_job(&c, &d, &id, Duration::from_secs(60)).await["status"],
        "completed"
    );
    std::thread::sleep(Duration::from_millis(200));
    let log = d.log();
    // Lines from inside the job: everything between its start and its end on components that
    // do job work.
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            ["jobs", "image", "convert", "volume"].contains(&v["component"].as_str().unwrap_or(""))
        })
        .collect();
    let messages: Vec<&str> = lines
        .iter()
        .map(|v| v["message"].as_str().unwrap())
        .collect();
    for expected in [
        "job started",
        "fetching image",
        "image downloaded into the cache",
        "volume created",
        "starting qemu-img",
        "job completed",
    ] {
        assert!(
            messages.contains(&expected),
            "{expected:?} missing from {messages:?}"
        );
    }
    let mut trace = None;
    for v in &lines {
        assert_eq!(v["job_id"], id, "line without job_id: {v}");
        assert_eq!(v["correlation_id"], "corr-log", "{v}");
        assert_eq!(v["trace_id"].as_str().map(str::len), Some(32), "{v}");
        assert_eq!(v["span_id"].as_str().map(str::len), Some(16), "{v}");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(["info", "debug", "warn"].contains(&v["level"].as_str().unwrap()));
        let t = v["trace_id"].as_str().unwrap().to_string();
        assert_eq!(
            trace.get_or_insert(t.clone()),
            &t,
            "one trace for the whole job"
        );
    }
    assert!(job_lines(&log, &id).len() >= lines.len());
}

#[tokio::test]
async fn text_log_format_matches_the_spec() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The harness finds the port in the JSON line, so switch with the Go service's variable
    // after start-up is impossible; instead run check the text output of a short daemon run.
    let config = TestConfig::new(dir).set("log.format", "text");
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, config.render()).unwrap();
    let port = free_port();
    let child = std::process::Command::new(BIN)
        .args(["--config", config_path.to_str().unwrap(), "serve"])
        .env("LVP_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("LOG_FORMAT", "text")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if c.get(format!("{base}/health")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let image = dir.join("images/t.qcow2");
    make_qcow2(&image, "8M");
    let (status, v) = post(
        &c,
        &format!("{base}/api/v1/jobs"),
        &json!({"image_url": file_url(&image), "volume_name": "t", "volume_size_gb": 1}),
    )
    .await;
    assert_eq!(status, 202);
    let id = v["job_id"].as_str().unwrap().to_string();
    for _ in 0..200 {
        let (_, j) = get(&c, &format!("{base}/api/v1/jobs/{id}")).await;
        if j["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    let line = regex::Regex::new(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[(TRACE|DEBUG|INFO|WARN|ERROR)\] [a-z_0-9]+: [^(]+( \(.+\))?$",
    )
    .unwrap();
    let mut job_lines = 0;
    for l in text.lines() {
        assert!(line.is_match(l), "not the spec's text format: {l}");
        if l.contains(&format!("job_id={id}")) {
            job_lines += 1;
            assert!(l.contains("trace_id="), "{l}");
        }
    }
    assert!(job_lines >= 3, "{text}");
    assert!(text.contains("[INFO] jobs: job started (job_id="), "{text}");
}
