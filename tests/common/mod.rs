//! Test harness shared by the integration tests: a temporary directory with a config file,
//! the real daemon binary started on a loopback port it picks itself, HTTP helpers, and
//! image helpers built on the real qemu-img.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

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

    pub fn render(&self) -> String {
        toml::to_string(&self.table).unwrap()
    }
}

/// A running daemon.
pub struct Daemon {
    pub child: Child,
    pub base: String,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Writes the config into `dir/config.toml` and starts the daemon with it.
    pub fn start(dir: &Path, config: &TestConfig) -> Daemon {
        Self::start_with_env(dir, config, &[])
    }

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

/// A plain HTTP client.
/// How long test clients keep an idle connection: below the daemon's `server.header_timeout`
/// (10 s), which also closes idle HTTP/1 keep-alive connections; a request sent on a pooled
/// connection at the instant the daemon closes it fails with "connection closed before
/// message completed" (seen once in CI).
pub const POOL_IDLE: Duration = Duration::from_secs(5);

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

/// Runs qemu-img, asserting success.
pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 of `size` (e.g. "64M") with recognisable data written at a few offsets.
pub fn make_qcow2(path: &Path, size: &str) {
    let raw = path.with_extension("src.raw");
    make_raw(&raw, parse_size(size));
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    std::fs::remove_file(raw).unwrap();
}

/// A raw image of `size` bytes with recognisable, partly sparse data.
pub fn make_raw(path: &Path, size: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in 0..8u64 {
        let off = i * size / 8;
        f.seek(SeekFrom::Start(off)).unwrap();
        let block: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        f.write_all(&block[..block.len().min((size - off) as usize)])
            .unwrap();
    }
}

pub fn parse_size(s: &str) -> u64 {
    let (num, unit) = s.split_at(s.len() - 1);
    let n: u64 = num.parse().unwrap();
    match unit {
        "K" => n << 10,
        "M" => n << 20,
        "G" => n << 30,
        _ => s.parse().unwrap(),
    }
}

/// The raw bytes an image converts to (reference made by qemu-img).
pub fn reference_raw(image: &Path, format: &str, out: &Path) {
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        format,
        "-O",
        "raw",
        image.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
}

/// Asserts that `volume` starts with the bytes of `reference` and reads as zeros after them.
pub fn assert_volume_matches(volume: &Path, reference: &Path) {
    use std::io::Read;
    let want = std::fs::read(reference).unwrap();
    let mut f = std::fs::File::open(volume).unwrap();
    let mut got = vec![0u8; want.len()];
    f.read_exact(&mut got).unwrap();
    // Slice equality is a memcmp, fast even in debug builds.
    assert!(
        got == want,
        "volume {} differs from {}",
        volume.display(),
        reference.display()
    );
    // Only the data extents of a sparse file need reading (SEEK_DATA/SEEK_HOLE); block
    // devices do not support that and are read whole.
    use std::os::unix::fs::FileExt;
    let len = f.metadata().unwrap().len().max(seek_end(&f));
    let fd = &f;
    let mut extents = Vec::new();
    let mut pos = want.len() as i64;
    loop {
        match nix::unistd::lseek(fd, pos, nix::unistd::Whence::SeekData) {
            Ok(data) => {
                let hole = nix::unistd::lseek(fd, data, nix::unistd::Whence::SeekHole).unwrap();
                extents.push((data as u64, hole as u64));
                pos = hole;
            }
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => {
                extents = vec![(want.len() as u64, len)];
                break;
            }
        }
    }
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in extents {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..n], off).unwrap();
            // Slice equality is a memcmp, fast even in debug builds.
            assert!(
                buf[..n] == zeros[..n],
                "volume has non-zero data after the image near offset {off}"
            );
            off += n as u64;
        }
    }
}

fn seek_end(f: &std::fs::File) -> u64 {
    use std::io::Seek;
    let mut f = f;
    f.seek(std::io::SeekFrom::End(0)).unwrap_or(0)
}

pub fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}

/// A directory with a `qemu-img` wrapper first in PATH: `convert` waits `delay_secs` before
/// running the real qemu-img (so a test can act while a job is converting), everything else
/// passes straight through. Returns the PATH value to give the daemon.
pub fn slow_qemu_img_path(dir: &Path, delay_secs: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("slowbin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v qemu-img"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let script = format!(
        "#!/bin/sh\n# test wrapper: delays conversions\nif [ \"$1\" = convert ]; then sleep {delay_secs}; fi\nexec {} \"$@\"\n",
        real.trim()
    );
    let path = bin.join("qemu-img");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
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
    pub port: u16,
    pub root: PathBuf,
}

pub const S3_ACCESS_KEY: &str = "test-access-key";
pub const S3_SECRET_KEY: &str = "test-secret-key-0123456789";

impl S3Server {
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

/// A TCP proxy on loopback that forwards to `target` at most `bytes_per_sec` in each
/// direction (a slow network in front of a real server). Runs until the test ends.
pub fn throttled_proxy(target: u16, bytes_per_sec: u64) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let chunk = (bytes_per_sec / 20).max(1024) as usize;
                    let mut buf = vec![0u8; chunk];
                    loop {
                        let started = Instant::now();
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let budget = Duration::from_secs_f64(n as f64 / bytes_per_sec as f64);
                        if let Some(rest) = budget.checked_sub(started.elapsed()) {
                            std::thread::sleep(rest);
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    port
}

/// The daemon's whole /metrics text.
pub async fn scrape(c: &reqwest::Client, d: &Daemon) -> String {
    let r = c.get(d.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "GET /metrics");
    r.text().await.unwrap()
}

/// A metric's value in a /metrics text: the sum over the label sets that contain every
/// `name="value"` pair of `labels` (comma-separated, any order; "" matches all).
pub fn metric_in(text: &str, name: &str, labels: &str) -> f64 {
    let pairs: Vec<String> = labels
        .split("\",")
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.ends_with('"') {
                p.to_string()
            } else {
                format!("{p}\"")
            }
        })
        .collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let metric_name = series.split('{').next().unwrap_or("");
            metric_name == name && pairs.iter().all(|p| series.contains(p.as_str()))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A metric's value from the daemon's /metrics (sum over label sets matching `labels`).
pub async fn metric(c: &reqwest::Client, d: &Daemon, name: &str, labels: &str) -> f64 {
    let text = c
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric_in(&text, name, labels)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// `size` bytes of incompressible data from `seed` (xorshift, 8 bytes per step).
pub fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

/// A qcow2 whose first `data` bytes are incompressible (so its file is about that large),
/// in a disk of `virtual_size` bytes.
pub fn make_dense_qcow2(path: &Path, data: usize, virtual_size: u64, seed: u64) {
    let raw = path.with_extension("dense.raw");
    std::fs::write(&raw, random_bytes(data, seed)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(virtual_size)
        .unwrap();
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    std::fs::remove_file(raw).unwrap();
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
    pub ca_file: PathBuf,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub server_name: Option<String>,
}

/// One daemon as a Prometheus scrape target. Extend `tls` / `bearer_token_file` for mTLS and
/// protected metrics; `scrape_config` renders them.
#[derive(Clone, Debug)]
pub struct ScrapeTarget {
    /// host:port
    pub address: String,
    pub scheme: String,
    pub tls: Option<ScrapeTls>,
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
    pub port: u16,
    pub dir: PathBuf,
}

impl PrometheusServer {
    /// Job name every target gets: the one the shipped alert rules and dashboard select.
    pub const JOB: &'static str = "libvirt-volume-provisioner";

    pub fn start(dir: &Path, targets: &[ScrapeTarget], rule_files: &[PathBuf]) -> PrometheusServer {
        let bin = prometheus_tool("prometheus").expect("prometheus must be installed");
        std::fs::create_dir_all(dir.join("tsdb")).unwrap();
        let mut config = String::from(
            "# generated by tests/common/mod.rs\nglobal:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n",
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

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

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
        let v: Value = c
            .get(self.url("/api/v1/rules"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
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

/// A test PKI written as PEM files into `dir`: `ca.crt`, a server certificate for localhost
/// and 127.0.0.1 (`server.crt`/`server.key`), and one client certificate per name
/// (`<name>.crt`/`<name>.key`, the name as CN).
pub struct TestPki {
    pub dir: PathBuf,
    pub ca_pem: String,
}

impl TestPki {
    pub fn create(dir: &Path, clients: &[&str]) -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        std::fs::write(dir.join("ca.crt"), &ca_pem).unwrap();
        let issue = |file: &str, cn: &str, sans: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        };
        issue(
            "server",
            "provisioner.test",
            vec!["localhost".into(), "127.0.0.1".into()],
        );
        for name in clients {
            issue(name, name, vec![]);
        }
        TestPki {
            dir: dir.to_path_buf(),
            ca_pem,
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Daemon settings: TLS with required client certificates from this CA.
    pub fn configure(&self, config: TestConfig, allowed: &[&str]) -> TestConfig {
        let p = |f: &str| self.path(f).display().to_string();
        config
            .set("tls.cert_file", p("server.crt"))
            .set("tls.key_file", p("server.key"))
            .set("tls.client_ca_file", p("ca.crt"))
            .set("tls.client_auth", "required")
            .set(
                "auth.allowed_clients",
                toml::Value::Array(allowed.iter().map(|a| toml::Value::from(*a)).collect()),
            )
    }

    /// An HTTP client trusting this CA and presenting `name`'s certificate.
    pub fn client(&self, name: &str) -> reqwest::Client {
        let mut pem = std::fs::read(self.path(&format!("{name}.crt"))).unwrap();
        pem.extend(std::fs::read(self.path(&format!("{name}.key"))).unwrap());
        reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_idle_timeout(POOL_IDLE)
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap()])
            .identity(reqwest::Identity::from_pem(&pem).unwrap())
            .build()
            .unwrap()
    }
}

/// A TCP proxy on loopback in front of `target` whose first `failures` connections are cut
/// after `cut_after` bytes from the server (a network that drops mid-download); later
/// connections pass through. Returns the proxy's port.
pub fn flaky_proxy(target: u16, cut_after: usize, failures: usize) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut cut_left = failures;
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let limit = if cut_left > 0 {
                cut_left -= 1;
                Some(cut_after)
            } else {
                None
            };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let (mut from, mut to) = (c2, s2);
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let (mut from, mut to) = (server, client);
                let mut sent = 0usize;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let n = match limit {
                        Some(l) if sent + n >= l => {
                            let _ = to.write_all(&buf[..l - sent]);
                            // Drop the connection in the middle of the body.
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        _ => n,
                    };
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

/// A real nginx (Debian `nginx-light`) on loopback with its own configuration, logs and pid
/// file in `dir` (not the system service). `servers` is the inside of the `http {}` block:
/// one or more `server {}` blocks; `{port}` in them is replaced by the first free port,
/// `{port2}` by a second one. The access log (`access.log`) has one line per request:
/// `server_port status method uri "range" bytes_sent`.
pub struct Nginx {
    child: Child,
    pub port: u16,
    pub port2: u16,
    pub dir: PathBuf,
}

impl Nginx {
    pub fn start(dir: &Path, servers: &str) -> Nginx {
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let (port, port2) = (free_port(), free_port());
        let d = dir.display();
        let servers = servers
            .replace("{port}", &port.to_string())
            .replace("{port2}", &port2.to_string());
        // Workers run as root so they can read the test's 0700 temporary directories.
        let conf = format!(
            "# generated by tests/common/mod.rs\n\
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

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

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

/// What the fault proxy does to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways.
    Pass,
    /// Forward, then cut the connection after this many bytes from the server.
    CutAfter(usize),
    /// Read the request and answer `503 Slow Down` (S3's XML body) without asking the server.
    SlowDown,
    /// Read the request and reset the connection (RST).
    Reset,
    /// Forward 64 KiB of the answer, then send nothing for this long, then close.
    Stall(Duration),
}

/// A TCP proxy on loopback in front of `target` that applies `plan[i]` to its i-th connection
/// (later connections pass), optionally throttles each connection's answers to `rate` bytes
/// per second, counts the bytes the server sent through it, and logs when each connection
/// came (for retry timing).
pub struct FaultProxy {
    pub port: u16,
    server_bytes: Arc<std::sync::atomic::AtomicU64>,
    arrivals: Arc<Mutex<Vec<(Instant, Fault)>>>,
}

impl FaultProxy {
    pub fn start(target: u16, plan: Vec<Fault>, rate: Option<u64>) -> FaultProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let (counted, log) = (server_bytes.clone(), arrivals.clone());
        std::thread::spawn(move || {
            for (i, client) in listener.incoming().flatten().enumerate() {
                let fault = plan.get(i).copied().unwrap_or(Fault::Pass);
                log.lock().unwrap().push((Instant::now(), fault));
                let counted = counted.clone();
                std::thread::spawn(move || {
                    let _ = proxy_connection(client, target, fault, rate, &counted);
                });
            }
        });
        FaultProxy {
            port,
            server_bytes,
            arrivals,
        }
    }

    /// Bytes the server sent through the proxy so far.
    pub fn server_bytes(&self) -> u64 {
        self.server_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// When each connection arrived and what was done to it.
    pub fn arrivals(&self) -> Vec<(Instant, Fault)> {
        self.arrivals.lock().unwrap().clone()
    }
}

/// Reads one request's headers (up to the blank line).
fn read_request_head(s: &mut std::net::TcpStream) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    Ok(head)
}

fn proxy_connection(
    mut client: std::net::TcpStream,
    target: u16,
    fault: Fault,
    rate: Option<u64>,
    counted: &std::sync::atomic::AtomicU64,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    match fault {
        Fault::SlowDown => {
            read_request_head(&mut client)?;
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
            write!(
                client,
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            return Ok(());
        }
        Fault::Reset => {
            read_request_head(&mut client)?;
            let fd = std::os::fd::AsFd::as_fd(&client);
            nix::sys::socket::setsockopt(
                &fd,
                nix::sys::socket::sockopt::Linger,
                &nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            )?;
            return Ok(());
        }
        _ => {}
    }
    let server = std::net::TcpStream::connect(("127.0.0.1", target))?;
    let (mut c2, mut s2) = (client.try_clone()?, server.try_clone()?);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut s2);
        let _ = s2.shutdown(std::net::Shutdown::Write);
    });
    let (mut from, mut to) = (server, client);
    let mut sent = 0usize;
    let chunk = rate.map_or(64 << 10, |r| (r / 20).clamp(1024, 64 << 10) as usize);
    let mut buf = vec![0u8; chunk];
    loop {
        let started = Instant::now();
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        counted.fetch_add(n as u64, Ordering::Relaxed);
        match fault {
            Fault::CutAfter(limit) if sent + n >= limit => {
                let _ = to.write_all(&buf[..limit - sent]);
                let _ = to.shutdown(std::net::Shutdown::Both);
                let _ = from.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            Fault::Stall(d) if sent + n >= 64 << 10 => {
                let _ = to.write_all(&buf[..(64 << 10) - sent]);
                std::thread::sleep(d);
                let _ = to.shutdown(std::net::Shutdown::Both);
                let _ = from.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            _ => {}
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n;
        if let Some(r) = rate {
            let budget = Duration::from_secs_f64(n as f64 / r as f64);
            if let Some(rest) = budget.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
    Ok(())
}
