//! The daemon under test: its configuration (`TestConfig`), the real binary started on a loopback
//! port it picks itself (`Daemon`, optionally with a small tmpfs of its own), the HTTP helpers
//! the tests talk to it with, job submission and polling, the files of its cache, and the
//! processes around it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The daemon binary of this test build.
pub const BIN: &str = env!("CARGO_BIN_EXE_libvirt-volume-provisioner");

/// The daemon binary `Daemon::spawn` starts: `TEST_DAEMON_BIN` when set (the VM suites run the
/// release build, the one that ships: scripts/vm-test.sh), else this test build's binary.
pub fn daemon_bin() -> String {
    std::env::var("TEST_DAEMON_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// A TOML configuration built from dotted keys.
#[derive(Clone)]
pub struct TestConfig {
    table: toml::Table,
}

impl TestConfig {
    /// Directory volumes, state, cache and file:// root inside `dir`; listens on a free port.
    pub fn new(dir: &Path) -> TestConfig {
        let d = dir.display();
        let text = format!(
            r#"
            [server]
            listen = "127.0.0.1:0"
            [storage]
            data_dir = "{d}/state"
            [volumes]
            backend = "directory"
            [volumes.directory]
            path = "{d}/volumes"
            [cache]
            dir = "{d}/cache"
            [sources]
            file_roots = ["{d}/images"]
            [log]
            format = "json"
            level = "info,libvirt_volume_provisioner=debug"
            "#
        );
        std::fs::create_dir_all(dir.join("images")).unwrap();
        TestConfig {
            table: toml::from_str(&text).unwrap(),
        }
    }

    /// Sets `section.key` (dotted) to a TOML value.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> TestConfig {
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap();
        let mut t = &mut self.table;
        for p in parts {
            t = t
                .entry(p)
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .unwrap();
        }
        t.insert(last.to_string(), value.into());
        self
    }

    /// The configuration file's text.
    pub fn render(&self) -> String {
        toml::to_string(&self.table).unwrap()
    }
}

/// A running daemon.
pub struct Daemon {
    /// The daemon's process.
    pub child: Child,
    /// Its base URL (`http://` or `https://`, the address it listens on).
    pub base: String,
    /// The directory it was started in.
    pub dir: PathBuf,
    /// Its configuration file.
    pub config_path: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Writes the config into `dir/config.toml` and starts the daemon with it.
    pub fn start(dir: &Path, config: &TestConfig) -> Daemon {
        Self::start_with_env(dir, config, &[])
    }

    /// As `start`, with `env` added to its environment.
    pub fn start_with_env(dir: &Path, config: &TestConfig, env: &[(&str, &str)]) -> Daemon {
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config.render()).unwrap();
        Self::spawn(dir, &config_path, env, "http")
    }

    /// Writes the config into `dir/config.toml` and starts the daemon with it, over TLS.
    pub fn start_https(dir: &Path, config: &TestConfig, env: &[(&str, &str)]) -> Daemon {
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config.render()).unwrap();
        Self::spawn(dir, &config_path, env, "https")
    }

    /// Starts the binary on an existing config file; `scheme` is http or https.
    pub fn spawn(dir: &Path, config_path: &Path, env: &[(&str, &str)], scheme: &str) -> Daemon {
        Self::spawn_wrapped(dir, config_path, env, scheme, &[])
    }

    /// As `spawn`, with the daemon started through `wrapper` (a program and its arguments that
    /// end by exec-ing the daemon's command line, appended after them), e.g. `unshare`. The
    /// wrapper must exec, so that `pid()` is the daemon's.
    pub fn spawn_wrapped(
        dir: &Path,
        config_path: &Path,
        env: &[(&str, &str)],
        scheme: &str,
        wrapper: &[&str],
    ) -> Daemon {
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(daemon_bin());
                c
            }
            None => Command::new(daemon_bin()),
        };
        cmd.arg("--config")
            .arg(config_path)
            .arg("serve")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for var in [
            "HOST",
            "PORT",
            "DB_PATH",
            "LOG_LEVEL",
            "LOG_FORMAT",
            "MINIO_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start daemon");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut sent = false;
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if !sent
                        && let Ok(v) = serde_json::from_str::<Value>(&line)
                        && v["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("listening"))
                    {
                        let _ = tx.send(v["address"].as_str().unwrap_or_default().to_string());
                        sent = true;
                    }
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        // Inside the test VM (emulated CPU) every LVM command at start-up costs seconds.
        let start_timeout = if std::env::var("IN_TEST_VM").is_ok_and(|v| v == "1") {
            Duration::from_secs(120)
        } else {
            Duration::from_secs(30)
        };
        let addr = match rx.recv_timeout(start_timeout) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(200));
                panic!("daemon did not start; log:\n{}", log.lock().unwrap());
            }
        };
        Daemon {
            child,
            base: format!("{scheme}://{addr}"),
            dir: dir.to_path_buf(),
            config_path: config_path.to_path_buf(),
            log,
        }
    }

    /// Writes the config into `dir/config.toml` and starts the daemon (over HTTP) with a tmpfs
    /// of its own of `size_mib` MiB over `mount_point` (created), in private user and mount
    /// namespaces (`unshare -rm`, which the test needs): a file system whose free space is small
    /// and exact. The daemon's view of it is `/proc/<pid>/root<mount_point>`.
    pub fn start_on_small_tmpfs(
        dir: &Path,
        config: &TestConfig,
        env: &[(&str, &str)],
        mount_point: &Path,
        size_mib: u32,
    ) -> Daemon {
        let unshare = Command::new("unshare")
            .args(["-rm", "true"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            unshare,
            "this test needs `unshare -rm` (util-linux, user and mount namespaces) to put {} on \
             a small tmpfs",
            mount_point.display()
        );
        std::fs::create_dir_all(mount_point).unwrap();
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config.render()).unwrap();
        let mount = format!(r#"mount -t tmpfs -o size={size_mib}m tmpfs "$0" && exec "$@""#);
        let wrapper = [
            "unshare",
            "-rm",
            "sh",
            "-c",
            &mount,
            mount_point.to_str().unwrap(),
        ];
        Self::spawn_wrapped(dir, &config_path, env, "http", &wrapper)
    }

    /// A daemon (default settings, `telemetry.probe_interval` 1 s) in `dir` whose job store
    /// (`dir/state`) is on a 16 MiB tmpfs of its own (`start_on_small_tmpfs`): a store disk
    /// that fills up, and a probe that notices at once.
    pub fn start_with_small_store(dir: &Path, env: &[(&str, &str)]) -> Daemon {
        let config = TestConfig::new(dir).set("telemetry.probe_interval", "1s");
        Self::start_on_small_tmpfs(dir, &config, env, &dir.join("state"), 16)
    }

    /// Fills the tmpfs the daemon has over `mount_point` (`start_on_small_tmpfs`), from outside
    /// through `/proc/<pid>/root`, with a file of 1 MiB blocks until a write fails; that file.
    pub fn fill_tmpfs(&self, mount_point: &Path) -> PathBuf {
        use std::io::Write;
        let inside = format!("/proc/{}/root{}", self.pid(), mount_point.display());
        let filler = Path::new(&inside).join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0xa5u8; 1 << 20];
        let mut written = 0;
        while f.write_all(&block).is_ok() {
            written += 1;
            assert!(written < 64, "the tmpfs did not fill up");
        }
        filler
    }

    /// The URL of `path` (which starts with `/`) on the daemon.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        Self::term(&mut self.child)
    }

    fn term(child: &mut Child) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How long test clients keep an idle connection: below the daemon's `server.header_timeout`
/// (10 s), which also closes idle HTTP/1 keep-alive connections; a request sent on a pooled
/// connection at the instant the daemon closes it fails with "connection closed before
/// message completed" (seen once in CI).
pub const POOL_IDLE: Duration = Duration::from_secs(5);

/// A plain HTTP client (2 min time-out, idle connections kept `POOL_IDLE`).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_idle_timeout(POOL_IDLE)
        .build()
        .unwrap()
}

/// GET returning status and JSON.
pub async fn get(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// POST JSON returning status and JSON.
pub async fn post(c: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = c.post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// DELETE returning status and JSON.
pub async fn delete(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.delete(url).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Submits a provision job and returns its id (asserting 202).
pub async fn submit(c: &reqwest::Client, d: &Daemon, body: Value) -> String {
    let (status, v) = post(c, &d.url("/api/v1/jobs"), &body).await;
    assert_eq!(status, 202, "submit {body}: {v}\nlog:\n{}", d.log());
    v["job_id"].as_str().unwrap().to_string()
}

/// The id of the job an answer to a submission names, asserting the answer is 202 Accepted.
pub async fn accepted_job(r: reqwest::Response) -> String {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(status, 202, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["job_id"].as_str().unwrap().to_string()
}

/// Asks the daemon to fetch `url` into its cache only (`POST /api/v1/cache/fetch`), declared
/// as `image_type` when given; the job's id (asserting 202).
pub async fn fetch_to_cache(
    c: &reqwest::Client,
    d: &Daemon,
    url: &str,
    image_type: Option<&str>,
) -> String {
    let mut body = serde_json::json!({"image_url": url});
    if let Some(t) = image_type {
        body["image_type"] = t.into();
    }
    let (status, v) = post(c, &d.url("/api/v1/cache/fetch"), &body).await;
    assert_eq!(status, 202, "fetch {url}: {v}");
    v["job_id"].as_str().unwrap().to_string()
}

/// The cache list's entry for `url` (the first 1,000 entries are searched).
pub async fn cache_entry(c: &reqwest::Client, d: &Daemon, url: &str) -> Value {
    let (status, v) = get(c, &d.url("/api/v1/cache/images?limit=1000")).await;
    assert_eq!(status, 200, "{v}");
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image_url"] == url)
        .cloned()
        .unwrap_or_else(|| panic!("no cache entry for {url}: {v}"))
}

/// The cache key of the entry whose content has `digest` (`sha256:<hex>`; the first 1,000
/// entries are searched).
pub async fn key_of(c: &reqwest::Client, d: &Daemon, digest: &str) -> String {
    let (_, v) = get(c, &d.url("/api/v1/cache/images?limit=1000")).await;
    let hex = digest.strip_prefix("sha256:").unwrap();
    v["images"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["checksum"] == hex)
        .and_then(|e| e["key"].as_str())
        .unwrap_or_else(|| panic!("no entry of {digest}: {v}"))
        .to_string()
}

/// Polls a job until it is terminal.
pub async fn wait_job(c: &reqwest::Client, d: &Daemon, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, v) = get(c, &d.url(&format!("/api/v1/jobs/{id}"))).await;
        assert_eq!(status, 200, "{v}");
        if ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} not finished in time: {v}\nlog:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls a job until `pred` holds.
pub async fn wait_until(
    c: &reqwest::Client,
    d: &Daemon,
    id: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, v) = get(c, &d.url(&format!("/api/v1/jobs/{id}"))).await;
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "condition not reached: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The names of the files in the cache directory of a daemon in `dir` (`dir/cache`), sorted;
/// none when it does not exist.
pub fn cache_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("cache"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The unfinished downloads (`.partial` files and their checkpoints) in the cache of a daemon
/// in `dir`.
pub fn partial_files(dir: &Path) -> Vec<String> {
    cache_files(dir)
        .into_iter()
        .filter(|n| n.contains(".partial"))
        .collect()
}

/// Runs a command to its end: whether it succeeded, and its stdout followed by its stderr.
pub fn output_of(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Processes whose command line contains `needle`.
pub fn processes_matching(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd)
                .replace('\0', " ")
                .contains(needle)
        {
            pids.push(pid);
        }
    }
    pids
}
