//! Hot reload against the real binary: tokens, certificates, invalid configurations, job limits,
//! SIGHUP without file watching, and restart-only keys, all without a restart or a lost job.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const OLD_TOKEN: &str = "old-0123456789abcdef0123456789abcdef";
const NEW_TOKEN: &str = "new-0123456789abcdef0123456789abcdef";
const MINUTE: Duration = Duration::from_secs(60);
const M: &str = "libvirt_volume_provisioner";

/// Replaces a file the way deploy tools do: write a temporary file, rename it over.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn image(dir: &Path) -> String {
    let p = dir.join("images/r.qcow2");
    if !p.exists() {
        make_qcow2(&p, "8M");
    }
    file_url(&p)
}

async fn status_with(c: &reqwest::Client, url: &str, token: &str) -> u16 {
    c.get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Polls until `check` holds; returns how long it took.
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what} not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sighup(d: &Daemon) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

async fn config_view(c: &reqwest::Client, d: &Daemon, token: Option<&str>) -> Value {
    let mut r = c.get(d.url("/api/v1/config"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// `config_reload_total` of reloads that ended with `result` (`success` or `error`).
async fn reloads(c: &reqwest::Client, d: &Daemon, result: &str) -> f64 {
    let labels = format!("result=\"{result}\"");
    metric(c, d, &format!("{M}_config_reload_total"), &labels).await
}

#[tokio::test]
async fn rotated_tokens_apply_while_a_job_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("ci:{OLD_TOKEN}\n")).unwrap();
    let config = TestConfig::new(dir).set("auth.tokens_file", tokens.display().to_string());
    let path = slow_qemu_img_path(dir, 4);
    let d = Daemon::start_with_env(dir, &config, &[("PATH", &path)]);
    let c = client();
    let r = c
        .post(d.url("/api/v1/jobs"))
        .bearer_auth(OLD_TOKEN)
        .json(&json!({"image_url": image(dir), "volume_name": "through-rotation", "volume_size_gb": 1}))
        .send()
        .await
        .unwrap();
    let id = accepted_job(r).await;
    let job_url = d.url(&format!("/api/v1/jobs/{id}"));
    assert_eq!(status_with(&c, &job_url, OLD_TOKEN).await, 200);
    assert_eq!(status_with(&c, &job_url, NEW_TOKEN).await, 401);

    replace(&tokens, &format!("# rotated\nci:{NEW_TOKEN}\n"));
    let took = within(Duration::from_secs(2), "token rotation", || async {
        status_with(&c, &job_url, NEW_TOKEN).await == 200
            && status_with(&c, &job_url, OLD_TOKEN).await == 401
    })
    .await;
    eprintln!("token rotation applied after {took:?}");
    // The job ran through the reload and completes.
    let done = loop {
        let r = c.get(&job_url).bearer_auth(NEW_TOKEN).send().await.unwrap();
        let v: Value = r.json().await.unwrap();
        if v["status"] != "running" && v["status"] != "pending" {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(reloads(&c, &d, "success").await, 1.0);
    assert!(!d.log().contains(NEW_TOKEN) && !d.log().contains(OLD_TOKEN));
}

/// The serial of the certificate the server presents to a new connection (openssl).
fn presented_serial(port: u16, ca_file: &Path) -> String {
    let s_client = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .arg("-CAfile")
        .arg(ca_file)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let mut x509 = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    x509.stdin
        .take()
        .unwrap()
        .write_all(&s_client.stdout)
        .unwrap();
    let out = x509.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A TLS daemon (certificate serial 1001 from a test CA, the old token) in a fresh directory.
struct TlsSetup {
    tmp: tempfile::TempDir,
    pki: Pki,
    tokens: std::path::PathBuf,
}

impl TlsSetup {
    fn new() -> TlsSetup {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::create(tmp.path(), &[]);
        let (cert, key) = pki.server_pem(Some(1001));
        std::fs::write(pki.path("server.crt"), cert).unwrap();
        std::fs::write(pki.path("server.key"), key).unwrap();
        let tokens = tmp.path().join("tokens");
        std::fs::write(&tokens, format!("ci:{OLD_TOKEN}\n")).unwrap();
        TlsSetup { tmp, pki, tokens }
    }

    fn config(&self) -> TestConfig {
        self.pki
            .server_tls(TestConfig::new(self.tmp.path()), None)
            .set("auth.tokens_file", self.tokens.display().to_string())
    }

    /// A client that trusts the test CA.
    fn client(&self) -> reqwest::Client {
        self.pki.anonymous_client()
    }

    /// The serial of the certificate the daemon presents to a new connection.
    fn serial(&self, d: &Daemon) -> String {
        let port: u16 = d.base.rsplit(':').next().unwrap().parse().unwrap();
        presented_serial(port, &self.pki.path("ca.crt"))
    }

    /// Replaces the server's key, then its certificate, with a new pair of serial 2002.
    fn replace_server_certificate(&self) {
        let (cert, key) = self.pki.server_pem(Some(2002));
        replace(&self.pki.path("server.key"), &key);
        replace(&self.pki.path("server.crt"), &cert);
    }
}

#[tokio::test]
async fn replaced_server_certificate_is_used_by_new_connections() {
    let setup = TlsSetup::new();
    let d = Daemon::start_https(setup.tmp.path(), &setup.config(), &[]);
    assert_eq!(setup.serial(&d), "serial=03E9");
    // A connection opened before the change keeps working on the old certificate.
    let c = setup.client();
    assert_eq!(c.get(d.url("/health")).send().await.unwrap().status(), 200);

    // Key first, then certificate: the reload that sees a mismatched pair fails and keeps
    // the old pair, the next one (after the certificate) succeeds.
    setup.replace_server_certificate();
    let took = within(Duration::from_secs(3), "new certificate", || async {
        setup.serial(&d) == "serial=07D2"
    })
    .await;
    eprintln!("new certificate presented after {took:?}");
    assert_eq!(c.get(d.url("/health")).send().await.unwrap().status(), 200);
    let view = config_view(&c, &d, Some(OLD_TOKEN)).await;
    assert_eq!(view["last_reload_result"], "success", "{view}");
}

#[tokio::test]
async fn an_invalid_configuration_keeps_the_running_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = TestConfig::new(dir).set("jobs.max_concurrent", 3);
    let d = Daemon::start(dir, &config);
    let c = client();
    let path = d.config_path.clone();
    replace(
        &path,
        &config.clone().set("jobs.max_concurrent", 0).render(),
    );
    within(Duration::from_secs(3), "error counted", || async {
        reloads(&c, &d, "error").await >= 1.0
    })
    .await;
    let view = config_view(&c, &d, None).await;
    assert_eq!(
        view["config"]["jobs"]["max_concurrent"], 3,
        "old value kept"
    );
    assert_eq!(view["last_reload_result"], "error");
    assert!(
        view["last_reload_error"]
            .as_str()
            .unwrap()
            .contains("jobs.max_concurrent"),
        "{view}"
    );
    assert!(d.log().contains("configuration reload failed"));
    let (status, h) = get(&c, &d.url("/health")).await;
    assert_eq!(status, 200);
    assert_eq!(h["jobs"]["slots"], 3);
    // Unknown keys are refused the same way.
    replace(
        &path,
        &format!(
            "{}\n[jobs]\nmax_concurent = 4\n",
            config.render().replace("[jobs]\n", "[jobz]\n")
        ),
    );
    within(Duration::from_secs(3), "second error", || async {
        reloads(&c, &d, "error").await >= 2.0
    })
    .await;
    assert_eq!(reloads(&c, &d, "success").await, 0.0);
    // A valid file afterwards applies.
    replace(
        &path,
        &config.clone().set("jobs.max_concurrent", 4).render(),
    );
    within(Duration::from_secs(3), "valid reload", || async {
        get(&c, &d.url("/health")).await.1["jobs"]["slots"] == 4
    })
    .await;
}

#[tokio::test]
async fn raising_max_concurrent_starts_a_queued_job_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = TestConfig::new(dir).set("jobs.max_concurrent", 1);
    let path = slow_qemu_img_path(dir, 20);
    let d = Daemon::start_with_env(dir, &config, &[("PATH", &path)]);
    let c = client();
    let url = image(dir);
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        ids.push(
            submit(
                &c,
                &d,
                json!({"image_url": url, "volume_name": name, "volume_size_gb": 1}),
            )
            .await,
        );
    }
    wait_until(&c, &d, &ids[0], MINUTE, |v| v["status"] == "running").await;
    let (_, b) = get(&c, &d.url(&format!("/api/v1/jobs/{}", ids[1]))).await;
    assert_eq!(
        (b["status"].as_str(), b["queue_position"].as_u64()),
        (Some("pending"), Some(1))
    );

    replace(
        &d.config_path,
        &config.clone().set("jobs.max_concurrent", 2).render(),
    );
    let took = within(Duration::from_secs(3), "second job started", || async {
        get(&c, &d.url(&format!("/api/v1/jobs/{}", ids[1]))).await.1["status"] == "running"
    })
    .await;
    eprintln!("queued job started {took:?} after the change");
    let (_, a) = get(&c, &d.url(&format!("/api/v1/jobs/{}", ids[0]))).await;
    assert_eq!(
        a["status"], "running",
        "the first job is still running: no restart"
    );
    let (_, third) = get(&c, &d.url(&format!("/api/v1/jobs/{}", ids[2]))).await;
    assert_eq!(
        (third["status"].as_str(), third["queue_position"].as_u64()),
        (Some("pending"), Some(1))
    );
}

#[tokio::test]
async fn sighup_reloads_with_file_events_disabled() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = TestConfig::new(dir)
        .set("reload.watch_files", false)
        .set("jobs.queue_capacity", 10);
    let d = Daemon::start(dir, &config);
    let c = client();
    replace(
        &d.config_path,
        &config.clone().set("jobs.queue_capacity", 20).render(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let view = config_view(&c, &d, None).await;
    assert_eq!(
        view["config"]["jobs"]["queue_capacity"], 10,
        "no file watching"
    );
    assert!(view["last_reload"].is_null());
    sighup(&d);
    let took = within(Duration::from_secs(2), "SIGHUP reload", || async {
        config_view(&c, &d, None).await["config"]["jobs"]["queue_capacity"] == 20
    })
    .await;
    eprintln!("SIGHUP reload after {took:?}");
    let view = config_view(&c, &d, None).await;
    assert_eq!(view["last_reload_result"], "success");
    assert!(
        d.log().contains("\"trigger\":\"Signal\""),
        "reload was triggered by the signal"
    );
    let (status, _) = get(&c, &d.url("/health")).await;
    assert_eq!(status, 200, "the daemon survived SIGHUP");
}

#[tokio::test]
async fn restart_only_changes_are_reported_not_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = TestConfig::new(dir);
    let d = Daemon::start(dir, &config);
    let c = client();
    let other = free_port();
    let changed = config
        .clone()
        .set("server.listen", format!("127.0.0.1:{other}"))
        .set(
            "volumes.directory.path",
            dir.join("elsewhere").display().to_string(),
        )
        .set("log.level", "warn");
    replace(&d.config_path, &changed.render());
    let deadline = Instant::now() + Duration::from_secs(3);
    let view = loop {
        let v = config_view(&c, &d, None).await;
        if v["last_reload_result"] == "success" {
            break v;
        }
        assert!(Instant::now() < deadline, "no reload: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pending: Vec<&str> = view["pending_restart"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(pending, vec!["server.listen", "volumes.directory.path"]);
    assert_eq!(
        view["config"]["server"]["listen"], "127.0.0.1:0",
        "running value kept"
    );
    assert_eq!(
        view["config"]["log"]["level"], "warn",
        "the live key applied"
    );
    assert!(d.log().contains("configuration changed but needs restart"));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", other)).is_err(),
        "not listening on the new port"
    );
    let (status, _) = get(&c, &d.url("/health")).await;
    assert_eq!(status, 200, "still serving on the old address");
}

/// A reload whose new certificate is fine but whose tokens file is refused changes nothing:
/// before, the certificate was swapped in first and "undone" by re-reading the very files that
/// had just changed, so the daemon kept serving the new certificate after a failed reload.
#[tokio::test]
async fn a_reload_refused_by_the_tokens_file_keeps_the_old_certificate() {
    let setup = TlsSetup::new();
    let config = setup.config().set("reload.watch_files", false);
    let d = Daemon::start_https(setup.tmp.path(), &config, &[]);
    assert_eq!(setup.serial(&d), "serial=03E9");
    let c = setup.client();

    setup.replace_server_certificate();
    replace(&setup.tokens, "ci:too-short\n");
    sighup(&d);
    within(Duration::from_secs(5), "refused reload", || async {
        reloads(&c, &d, "error").await >= 1.0
    })
    .await;
    assert_eq!(
        setup.serial(&d),
        "serial=03E9",
        "the old certificate is still served"
    );
    assert_eq!(
        status_with(&c, &d.url("/api/v1/jobs"), OLD_TOKEN).await,
        200
    );
    let view = config_view(&c, &d, Some(OLD_TOKEN)).await;
    assert_eq!(view["last_reload_result"], "error", "{view}");
    assert!(
        view["last_reload_error"]
            .as_str()
            .unwrap()
            .contains("auth.tokens_file"),
        "{view}"
    );
}
