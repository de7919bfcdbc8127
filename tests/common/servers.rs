//! Real servers the daemon talks to or is watched by, each on a loopback port with its files in
//! the test's directory: the S3 server s3s-fs, nginx, and Prometheus (with its scrape targets).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::daemon::{Daemon, TestConfig, get};

/// A free loopback port (bound and released; the caller binds it right away).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The real S3 server `s3s-fs` (SigV4 enforced) serving `root`; buckets are directories.
pub struct S3Server {
    child: Child,
    /// Its loopback port.
    pub port: u16,
    /// The directory it serves (one subdirectory per bucket).
    pub root: PathBuf,
}

/// The access key s3s-fs accepts.
pub const S3_ACCESS_KEY: &str = "test-access-key";
/// The secret key s3s-fs accepts.
pub const S3_SECRET_KEY: &str = "test-secret-key-0123456789";

impl S3Server {
    /// Starts s3s-fs serving `root` on a free port.
    pub fn start(root: &Path) -> S3Server {
        Self::start_on(root, free_port())
    }

    /// Starts s3s-fs serving `root` on a given port (e.g. again after `stop`).
    pub fn start_on(root: &Path, port: u16) -> S3Server {
        std::fs::create_dir_all(root).unwrap();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "s3s-fs must be installed (cargo install --locked s3s-fs@0.14.1 --features binary)",
            );
        wait_for_port(port);
        S3Server {
            child,
            port,
            root: root.to_path_buf(),
        }
    }

    /// The S3 endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the server and waits until its port refuses connections.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs still answers on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stores an object by writing the file s3s-fs serves.
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let path = self.root.join(bucket).join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// Stores an object by copying the file `src` where s3s-fs serves it.
    pub fn put_file(&self, bucket: &str, key: &str, src: &Path) {
        let path = self.root.join(bucket).join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::copy(src, path).unwrap();
    }

    /// Stores an object with a real SigV4 PUT (curl), so that s3s-fs records its ETag instead
    /// of computing an MD5 of the whole file on every request.
    pub fn put_object(&self, bucket: &str, key: &str, src: &Path) {
        std::fs::create_dir_all(self.root.join(bucket)).unwrap();
        let out = Command::new("curl")
            .args(["-fsS", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!("{S3_ACCESS_KEY}:{S3_SECRET_KEY}"))
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-T"])
            .arg(src)
            .arg(format!("{}/{bucket}/{key}", self.endpoint()))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "PUT {bucket}/{key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Removes an object (its file).
    pub fn remove(&self, bucket: &str, key: &str) {
        let _ = std::fs::remove_file(self.root.join(bucket).join(key));
    }

    /// Daemon settings for this server.
    pub fn configure(&self, config: TestConfig) -> TestConfig {
        config
            .set("s3.endpoint", self.endpoint())
            .set("s3.allow_http", true)
            .set("s3.access_key", S3_ACCESS_KEY)
            .set("s3.secret_key", S3_SECRET_KEY)
            .set("s3.bucket", "vm-images")
            .set("s3.retries", 2)
            .set("s3.retry_backoff", "100ms")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the tests find promtool and prometheus (Debian package `prometheus`); `None` when not
/// installed.
pub fn prometheus_tool(name: &str) -> Option<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// Client-certificate settings of a scrape (Prometheus `tls_config`).
#[derive(Clone, Debug)]
pub struct ScrapeTls {
    /// The CA that signed the daemon's certificate.
    pub ca_file: PathBuf,
    /// Prometheus' client certificate, if it presents one.
    pub cert_file: Option<PathBuf>,
    /// Its key.
    pub key_file: Option<PathBuf>,
    /// The name to check the daemon's certificate against, if not the address.
    pub server_name: Option<String>,
}

/// One daemon as a Prometheus scrape target. Extend `tls` / `bearer_token_file` for mTLS and
/// protected metrics; `scrape_config` renders them.
#[derive(Clone, Debug)]
pub struct ScrapeTarget {
    /// host:port
    pub address: String,
    /// `http` or `https`.
    pub scheme: String,
    /// TLS settings of the scrape, for https.
    pub tls: Option<ScrapeTls>,
    /// A file with the token sent as `Authorization: Bearer`, for protected metrics.
    pub bearer_token_file: Option<PathBuf>,
}

/// A YAML scalar (a JSON string is a valid YAML double-quoted scalar).
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn yaml_path(p: &Path) -> String {
    yaml_str(p.to_str().unwrap())
}

impl ScrapeTarget {
    /// The daemon's own address and scheme (from `Daemon::base`), no TLS settings.
    pub fn daemon(d: &Daemon) -> ScrapeTarget {
        let (scheme, address) = d.base.split_once("://").unwrap();
        ScrapeTarget {
            address: address.to_string(),
            scheme: scheme.to_string(),
            tls: None,
            bearer_token_file: None,
        }
    }

    /// A `scrape_configs` entry (YAML, indented for the list) for job `job`.
    pub fn scrape_config(&self, job: &str, interval: &str) -> String {
        let mut y = format!(
            "  - job_name: {}\n    scrape_interval: {}\n    scrape_timeout: {}\n    scheme: {}\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{}]\n",
            yaml_str(job),
            yaml_str(interval),
            yaml_str(interval),
            yaml_str(&self.scheme),
            yaml_str(&self.address),
        );
        if let Some(tls) = &self.tls {
            y.push_str("    tls_config:\n");
            y.push_str(&format!("      ca_file: {}\n", yaml_path(&tls.ca_file)));
            if let Some(c) = &tls.cert_file {
                y.push_str(&format!("      cert_file: {}\n", yaml_path(c)));
            }
            if let Some(k) = &tls.key_file {
                y.push_str(&format!("      key_file: {}\n", yaml_path(k)));
            }
            if let Some(n) = &tls.server_name {
                y.push_str(&format!("      server_name: {}\n", yaml_str(n)));
            }
        }
        if let Some(t) = &self.bearer_token_file {
            y.push_str(&format!(
                "    authorization:\n      type: Bearer\n      credentials_file: {}\n",
                yaml_path(t)
            ));
        }
        y
    }
}

/// A real Prometheus server (the `prometheus` binary) on a loopback port, with its own TSDB
/// directory, scraping the given targets every second and loading the given rule files.
pub struct PrometheusServer {
    child: Child,
    /// Its loopback port.
    pub port: u16,
    /// Its directory: configuration, TSDB and log.
    pub dir: PathBuf,
}

impl PrometheusServer {
    /// Job name every target gets: the one the shipped alert rules and dashboard select.
    pub const JOB: &'static str = "libvirt-volume-provisioner";

    /// Starts Prometheus in `dir` and waits until it is ready.
    pub fn start(dir: &Path, targets: &[ScrapeTarget], rule_files: &[PathBuf]) -> PrometheusServer {
        let bin = prometheus_tool("prometheus").expect("prometheus must be installed");
        std::fs::create_dir_all(dir.join("tsdb")).unwrap();
        let mut config = String::from(
            "# generated by tests/common/servers.rs\nglobal:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n",
        );
        if !rule_files.is_empty() {
            config.push_str("rule_files:\n");
            for f in rule_files {
                config.push_str(&format!("  - {}\n", yaml_path(f)));
            }
        }
        config.push_str("scrape_configs:\n");
        for t in targets {
            config.push_str(&t.scrape_config(Self::JOB, "1s"));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, &config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let mut server = PrometheusServer {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .and_then(|mut s| {
                    use std::io::{Read, Write};
                    s.write_all(b"GET /-/ready HTTP/1.0\r\n\r\n").ok()?;
                    let mut r = String::new();
                    s.read_to_string(&mut r).ok()?;
                    Some(r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
                })
                .unwrap_or(false);
            if ready {
                break;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "prometheus exited ({status}):\n{}\nconfig:\n{config}",
                    server.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// The URL of `path` on Prometheus.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// What Prometheus logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query through the HTTP API: the result vector, or Prometheus' error.
    pub async fn query(&self, c: &reqwest::Client, expr: &str) -> Result<Vec<Value>, String> {
        let url = url::Url::parse_with_params(&self.url("/api/v1/query"), &[("query", expr)])
            .map_err(|e| e.to_string())?;
        let r = c
            .get(url.as_str())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        match &v["data"]["result"] {
            Value::Array(a) => Ok(a.clone()),
            // scalar or string results
            other => Ok(vec![other.clone()]),
        }
    }

    /// The first sample value of a query (None when the result is empty).
    pub async fn value(&self, c: &reqwest::Client, expr: &str) -> Option<f64> {
        let r = self.query(c, expr).await.ok()?;
        r.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `expr`'s first value satisfies `pred`.
    pub async fn wait_value(
        &self,
        c: &reqwest::Client,
        expr: &str,
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.value(c, expr).await
                && pred(v)
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{expr} = {:?} in time; prometheus log:\n{}",
                self.value(c, expr).await,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every rule Prometheus loaded (`/api/v1/rules`): name, query, type, health, lastError.
    pub async fn rules(&self, c: &reqwest::Client) -> Vec<Value> {
        let (_, v) = get(c, &self.url("/api/v1/rules")).await;
        assert_eq!(v["status"], "success", "{v}");
        v["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real nginx (Debian `nginx-light`) on loopback with its own configuration, logs and pid
/// file in `dir` (not the system service). `servers` is the inside of the `http {}` block:
/// one or more `server {}` blocks; `{port}` in them is replaced by the first free port,
/// `{port2}` by a second one. The access log (`access.log`) has one line per request:
/// `server_port status method uri "range" bytes_sent`.
pub struct Nginx {
    child: Child,
    /// The port that replaced `{port}`.
    pub port: u16,
    /// The port that replaced `{port2}`.
    pub port2: u16,
    /// Its directory: configuration, logs, pid file and temporary files.
    pub dir: PathBuf,
}

impl Nginx {
    /// Starts nginx in `dir` and waits until it listens on `port`.
    pub fn start(dir: &Path, servers: &str) -> Nginx {
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let (port, port2) = (free_port(), free_port());
        let d = dir.display();
        let servers = servers
            .replace("{port}", &port.to_string())
            .replace("{port2}", &port2.to_string());
        // Workers run as root so they can read the test's 0700 temporary directories.
        let conf = format!(
            "# generated by tests/common/servers.rs\n\
             daemon off;\nmaster_process on;\nworker_processes 1;\nuser root;\n\
             pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
               log_format t '$server_port $status $request_method $uri \"$http_range\" $bytes_sent';\n\
               access_log {d}/access.log t;\n\
               client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;\n\
               fastcgi_temp_path {d}/tmp/fastcgi; uwsgi_temp_path {d}/tmp/uwsgi;\n\
               scgi_temp_path {d}/tmp/scgi;\n\
               default_type application/octet-stream;\n\
               sendfile on;\n\
               {servers}\n\
             }}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(nginx_binary())
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx must be installed (apt-get install nginx-light)");
        let mut n = Nginx {
            child,
            port,
            port2,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = n.child.try_wait() {
                panic!("nginx exited ({status}): {}", n.error_log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx not listening: {}",
                n.error_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        n
    }

    /// The URL of `path` on `port`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// The access log lines so far (nginx writes each line when the request ends).
    pub fn access_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Bytes nginx sent (headers and bodies) from `port` for requests whose URI starts with
    /// `uri`.
    pub fn bytes_sent(&self, port: u16, uri: &str) -> u64 {
        self.requests(port, uri)
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Access log lines of requests to `port` whose URI starts with `uri`.
    pub fn requests(&self, port: u16, uri: &str) -> Vec<String> {
        let port = port.to_string();
        self.access_log()
            .into_iter()
            .filter(|l| {
                let mut f = l.split(' ');
                f.next() == Some(port.as_str()) && f.nth(2).is_some_and(|u| u.starts_with(uri))
            })
            .collect()
    }

    /// Access log lines of GETs to `port` of exactly `uri`.
    pub fn gets(&self, port: u16, uri: &str) -> Vec<String> {
        self.requests(port, uri)
            .into_iter()
            .filter(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.get(2) == Some(&"GET") && f.get(3) == Some(&uri)
            })
            .collect()
    }

    /// Stops nginx (SIGTERM to the master, then waits).
    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

fn nginx_binary() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nginx"))
}
