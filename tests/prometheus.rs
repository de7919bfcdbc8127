//! The shipped Prometheus and Grafana files against the real tools: `promtool check rules` and
//! `promtool test rules` (every alert has a firing and a not-firing case), `promtool check
//! config` on the shipped scrape config, `promtool check metrics` on a scrape taken after a
//! job, and a real Prometheus server scraping the daemon that evaluates every PromQL
//! expression of the dashboard, the rule files and the example queries of docs/monitoring.md
//! (read from the files, so they cannot drift).
//! promtool and prometheus come from Debian's `prometheus` package (.ci/run installs it).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);
const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn repo(p: &str) -> PathBuf {
    Path::new(REPO).join(p)
}

/// The tool's path, or a loud message and `None` when Debian's `prometheus` package is absent
/// (on CI, where .ci/run installs it, its absence is a failure).
fn tool(name: &str) -> Option<PathBuf> {
    let found = prometheus_tool(name);
    if found.is_none() && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("`{name}` is not installed on CI (Debian package `prometheus`, see .ci/run)");
    }
    if found.is_none() {
        eprintln!(
            "\n!!!!!!!! SKIPPED: `{name}` is not installed (Debian package `prometheus`; .ci/run \
             installs it). The Prometheus checks of this test did NOT run. !!!!!!!!\n"
        );
    }
    found
}

/// `name: value` items of a YAML list written one per line as `- name: value`.
fn yaml_items(text: &str, key: &str) -> Vec<String> {
    let prefix = format!("- {key}:");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .map(|v| v.trim().to_string())
        .collect()
}

fn rule_test_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo("deploy/prometheus/tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    v.sort();
    v
}

#[test]
fn promtool_checks_the_rules_runs_their_unit_tests_and_checks_the_scrape_config() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let alerts = repo("deploy/prometheus/alerts.yml");
    let recording = repo("deploy/prometheus/recording-rules.yml");
    let (ok, out) = output_of(
        Command::new(&promtool)
            .arg("check")
            .arg("rules")
            .arg(&alerts)
            .arg(&recording),
    );
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");
    assert!(out.contains("SUCCESS: 1 rules found"), "{out}");

    let tests = rule_test_files();
    let (ok, out) = output_of(Command::new(&promtool).args(["test", "rules"]).args(&tests));
    assert!(ok, "promtool test rules:\n{out}");
    eprintln!("{out}");

    // Every alert has at least one case where it fires and one where it does not.
    let alert_names = yaml_items(&std::fs::read_to_string(&alerts).unwrap(), "alert");
    assert_eq!(alert_names.len(), 7, "{alert_names:?}");
    let (mut firing, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    let mut all_tests = String::new();
    for t in &tests {
        let text = std::fs::read_to_string(t).unwrap();
        let mut current: Option<String> = None;
        for line in text.lines() {
            let line = line.trim().trim_start_matches("- ");
            if let Some(name) = line.strip_prefix("alertname:") {
                current = Some(name.trim().to_string());
            } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
                let name = current.take().expect("exp_alerts after alertname");
                if rest.trim() == "[]" {
                    quiet.insert(name);
                } else {
                    firing.insert(name);
                }
            }
        }
        all_tests.push_str(&text);
    }
    for name in &alert_names {
        assert!(firing.contains(name), "no firing test for {name}");
        assert!(quiet.contains(name), "no not-firing test for {name}");
    }
    for record in yaml_items(&std::fs::read_to_string(&recording).unwrap(), "record") {
        assert!(
            all_tests.contains(&format!("expr: {record}"))
                || all_tests.contains(&format!("({record},")),
            "no test reads recording rule {record}"
        );
    }

    // The shipped scrape config, with its /etc/prometheus paths moved into a temp dir where
    // the rule files and (placeholder) certificate files exist.
    let tmp = tempfile::tempdir().unwrap();
    let etc = tmp.path();
    std::fs::create_dir_all(etc.join("rules")).unwrap();
    std::fs::copy(
        &alerts,
        etc.join("rules/libvirt-volume-provisioner-alerts.yml"),
    )
    .unwrap();
    std::fs::copy(
        &recording,
        etc.join("rules/libvirt-volume-provisioner-recording.yml"),
    )
    .unwrap();
    for f in ["ca.crt", "client.crt", "client.key"] {
        std::fs::write(etc.join(f), "").unwrap();
    }
    let shipped = std::fs::read_to_string(repo("deploy/prometheus/scrape-config.yml")).unwrap();
    assert!(shipped.contains("/etc/prometheus/rules/libvirt-volume-provisioner-alerts.yml"));
    assert!(shipped.contains("job_name: libvirt-volume-provisioner"));
    let config = etc.join("prometheus.yml");
    std::fs::write(
        &config,
        shipped.replace("/etc/prometheus/", &format!("{}/", etc.display())),
    )
    .unwrap();
    let (ok, out) = output_of(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(&config),
    );
    assert!(ok, "promtool check config:\n{out}");
    assert!(out.contains("SUCCESS: 2 rule files found"), "{out}");

    // The ServiceMonitor uses the same job name (jobLabel app) and the spec's mTLS files.
    let sm = std::fs::read_to_string(repo("deploy/prometheus/servicemonitor.yaml")).unwrap();
    for needle in [
        "kind: ServiceMonitor",
        "app: libvirt-volume-provisioner",
        "jobLabel: app",
        "scheme: https",
        "caFile: /etc/prometheus/ca.crt",
        "certFile: /etc/prometheus/client.crt",
        "keyFile: /etc/prometheus/client.key",
        "bearerTokenSecret:",
    ] {
        assert!(sm.contains(needle), "servicemonitor.yaml lacks {needle:?}");
    }
}

/// A good image and one with a backing file (rejected) in the daemon's file root.
fn make_images(dir: &Path) {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    make_qcow2(&images.join("ok.qcow2"), "32M");
    hostile_qcow2(&images, Hostile::BackingFile);
}

/// A daemon (plain HTTP) with the images of `make_images`.
async fn daemon_with_images(dir: &Path, config: TestConfig) -> (Daemon, reqwest::Client) {
    make_images(dir);
    (Daemon::start(dir, &config), client())
}

/// As `daemon_with_images`, served over TLS with required client certificates.
async fn mtls_daemon_with_images(
    dir: &Path,
    config: TestConfig,
    pki: &Pki,
) -> (Daemon, reqwest::Client) {
    make_images(dir);
    let config = pki.configure(config, &["orchestrator", "prometheus"]);
    let d = Daemon::start_https(dir, &config, &[]);
    (d, pki.client("orchestrator"))
}

async fn run_jobs(c: &reqwest::Client, d: &Daemon, dir: &Path) {
    let images = dir.join("images");
    for (file, volume, want) in [
        ("ok.qcow2", "p-ok", "completed"),
        ("backing.qcow2", "p-bad", "failed"),
    ] {
        let id = submit(
            c,
            d,
            json!({"image_url": file_url(&images.join(file)), "volume_name": volume,
                   "volume_size_gb": 1}),
        )
        .await;
        let job = wait_job(c, d, &id, MINUTE).await;
        assert_eq!(job["status"], want, "{job}");
    }
}

#[tokio::test]
async fn promtool_check_metrics_accepts_a_scrape_after_a_job() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (d, c) = daemon_with_images(dir, TestConfig::new(dir)).await;
    run_jobs(&c, &d, dir).await;
    let text = scrape(&c, &d).await;
    assert_eq!(
        metric_in(
            &text,
            "libvirt_volume_provisioner_jobs_total",
            r#"status="completed""#
        ),
        1.0
    );
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics ({}):\n{report}",
        out.status
    );
    eprintln!(
        "scrape after one completed and one failed job (excerpt):\n{}",
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.contains("_bucket"))
            .filter(|l| l.contains("jobs_total")
                || l.contains("job_duration_seconds_count")
                || l.contains("stage_duration_seconds_count")
                || l.contains("cache_")
                || l.contains("images_downloaded")
                || l.contains("image_errors")
                || l.contains("dependencies_up")
                || l.contains("build_info")
                || l.contains("health_status"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// PromQL expressions of every Prometheus target in the dashboard (rows included).
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((p["title"].as_str().unwrap_or("").to_string(), expr.into()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The queries in the "Example queries" block of docs/monitoring.md (comment lines dropped,
/// indented lines continue the previous query).
fn doc_example_queries() -> Vec<String> {
    let doc = std::fs::read_to_string(repo("docs/monitoring.md")).unwrap();
    let section = doc
        .split_once("### Example queries")
        .expect("docs/monitoring.md has Example queries")
        .1;
    let block = section.split("```").nth(1).expect("a code block");
    let mut out: Vec<String> = Vec::new();
    for line in block.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if line.starts_with(' ') {
            let last = out.last_mut().expect("continuation after a query");
            last.push(' ');
            last.push_str(line.trim());
        } else {
            out.push(line.trim().to_string());
        }
    }
    out
}

/// Vector selectors naming the daemon's metrics or `up`, with their label matchers.
fn selectors(expr: &str) -> Vec<String> {
    let re = regex::Regex::new(r"\b(up|libvirt_volume_provisioner_[a-z_]+)(\{[^}]*\})?").unwrap();
    re.find_iter(expr).map(|m| m.as_str().to_string()).collect()
}

#[tokio::test]
async fn prometheus_scrapes_the_daemon_and_evaluates_every_dashboard_and_rule_expression() {
    if tool("prometheus").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // An S3 endpoint where nothing listens: minio is down, /readyz answers 503, so the error
    // panels and the DependencyDown alert have real series to read.
    let nothing = free_port();
    let config = TestConfig::new(dir)
        .set("s3.endpoint", format!("http://127.0.0.1:{nothing}"))
        .set("s3.allow_http", true)
        .set("s3.access_key", S3_ACCESS_KEY)
        .set("s3.secret_key", S3_SECRET_KEY)
        .set("s3.bucket", "vm-images")
        .set("s3.retries", 1)
        .set("s3.retry_backoff", "100ms")
        .set("telemetry.probe_interval", "1s")
        .set("auth.protect_metrics", true);
    // Prometheus scrapes over mutual TLS with its own client certificate, as in production.
    let pki = Pki::create(&dir.join("pki"), &["orchestrator", "prometheus"]);
    let (d, c) = mtls_daemon_with_images(dir, config, &pki).await;
    let unauthenticated = pki.anonymous_client();
    assert!(
        unauthenticated.get(d.url("/metrics")).send().await.is_err(),
        "no client certificate, no TLS session"
    );
    let mut target = ScrapeTarget::daemon(&d);
    target.tls = Some(ScrapeTls {
        ca_file: pki.path("ca.crt"),
        cert_file: Some(pki.path("prometheus.crt")),
        key_file: Some(pki.path("prometheus.key")),
        server_name: Some("localhost".into()),
    });
    let rule_files = vec![
        repo("deploy/prometheus/alerts.yml"),
        repo("deploy/prometheus/recording-rules.yml"),
    ];
    let prom = PrometheusServer::start(&dir.join("prometheus"), &[target], &rule_files);
    let up = prom
        .wait_value(&c, r#"up{job="libvirt-volume-provisioner"}"#, MINUTE, |v| {
            v == 1.0
        })
        .await;
    assert_eq!(up, 1.0);

    // Work while Prometheus watches: one completed and one failed job, a 503 from /readyz.
    run_jobs(&c, &d, dir).await;
    let (status, v) = get(&c, &d.url("/readyz")).await;
    assert_eq!(status, 503, "{v}");
    for status in ["completed", "failed"] {
        prom.wait_value(
            &c,
            &format!(r#"libvirt_volume_provisioner_jobs_total{{status="{status}"}}"#),
            MINUTE,
            |v| v == 1.0,
        )
        .await;
    }
    prom.wait_value(
        &c,
        r#"libvirt_volume_provisioner_requests_total{endpoint="/readyz",status="503"}"#,
        MINUTE,
        |v| v >= 1.0,
    )
    .await;
    // Two more scrapes, so every rate() window holds samples from after the jobs.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Expressions come from the shipped files: the dashboard JSON and the rules Prometheus
    // itself loaded from alerts.yml and recording-rules.yml.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/libvirt-volume-provisioner.json")).unwrap(),
    )
    .unwrap();
    let panel_exprs = dashboard_exprs(&dashboard);
    let titles: BTreeSet<&str> = panel_exprs.iter().map(|(t, _)| t.as_str()).collect();
    for spec_panel in [
        "Service Status",
        "Request Rate",
        "Error Rate",
        "Active Jobs",
        "Job Success Rate",
        "Response Latency (95th percentile)",
        "Cache Hit Ratio",
        "Dependency Health",
        "Download Throughput",
    ] {
        assert!(titles.contains(spec_panel), "dashboard lacks {spec_panel}");
    }
    let rules = prom.rules(&c).await;
    let loaded: BTreeSet<String> = rules
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    let mut shipped: BTreeSet<String> = BTreeSet::new();
    for f in &rule_files {
        let text = std::fs::read_to_string(f).unwrap();
        shipped.extend(yaml_items(&text, "alert"));
        shipped.extend(yaml_items(&text, "record"));
    }
    assert_eq!(loaded, shipped, "Prometheus loaded every shipped rule");
    for r in &rules {
        assert_ne!(
            r["health"], "err",
            "rule {} failed: {}",
            r["name"], r["lastError"]
        );
    }

    let mut checked = 0;
    let mut failures = Vec::new();
    let rule_exprs = rules.iter().map(|r| {
        (
            format!("rule {}", r["name"].as_str().unwrap()),
            r["query"].as_str().unwrap().to_string(),
        )
    });
    let examples = doc_example_queries();
    assert!(examples.len() >= 6, "{examples:?}");
    let example_count = examples.len();
    for (origin, expr) in panel_exprs
        .iter()
        .map(|(t, e)| (format!("panel {t}"), e.clone()))
        .chain(rule_exprs)
        .chain(
            examples
                .into_iter()
                .map(|e| ("docs example".to_string(), e)),
        )
    {
        match prom.query(&c, &expr).await {
            Err(e) => failures.push(format!("{origin}: {expr}: {e}")),
            // A dashboard panel or documented query shows data for this daemon.
            Ok(r) if !origin.starts_with("rule") && r.is_empty() => {
                failures.push(format!("{origin}: {expr}: empty result"))
            }
            Ok(_) => {}
        }
        // Every metric the expression names, with its label matchers, exists.
        for sel in selectors(&expr) {
            match prom.query(&c, &sel).await {
                Ok(r) if !r.is_empty() => {}
                other => failures.push(format!("{origin}: selector {sel}: {other:?}")),
            }
        }
        checked += 1;
    }
    assert!(
        failures.is_empty(),
        "expressions that fail on a real Prometheus:\n{}",
        failures.join("\n")
    );
    assert_eq!(checked, panel_exprs.len() + rules.len() + example_count);
    assert!(checked >= 24, "{checked} expressions");

    // Values that mean something after these jobs.
    let success = panel_exprs
        .iter()
        .find(|(t, _)| t == "Job Success Rate")
        .unwrap()
        .1
        .clone();
    let rate = prom.value(&c, &success).await.unwrap();
    assert!(
        (rate - 0.5).abs() < 0.01,
        "one of two jobs completed: success rate {rate}"
    );
    assert_eq!(
        prom.value(
            &c,
            r#"libvirt_volume_provisioner_dependencies_up{dependency="minio"}"#
        )
        .await,
        Some(0.0)
    );
    assert_eq!(
        prom.value(
            &c,
            r#"libvirt_volume_provisioner_dependencies_up{dependency="storage"}"#
        )
        .await,
        Some(1.0)
    );
    eprintln!("{checked} PromQL expressions evaluated on Prometheus without error");
}
