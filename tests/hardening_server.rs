//! The server-side defects of the hardening issue, reproduced from the outside against the real
//! binary: caller-chosen methods in metrics and logs, connection floods before authentication
//! (idle HTTP/2 connections, pinging ones, slow first requests, HTTP/1 reconnect floods; over
//! real TLS with `client_auth = optional`, from 127.0.0.2 while a normal client probes from
//! 127.0.0.3: Linux routes all of 127.0.0.0/8 to lo), cross-site requests with auth off, empty
//! hyper error bodies, duplicate JSON keys and the log level of reads.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The flood tests load both cores; they run one at a time so their timing holds.
static FLOOD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn addr_of(d: &Daemon) -> SocketAddr {
    d.base
        .split("://")
        .nth(1)
        .unwrap()
        .parse()
        .expect("daemon address")
}

/// A TCP connection to `to` from the loopback address `from`.
async fn tcp_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.parse().unwrap(), 0))?;
    socket.connect(to).await
}

/// Sends a raw HTTP/1.1 request (it should carry `Connection: close`) and returns the status
/// and the body (parsed as JSON when it is JSON).
async fn raw_http(to: SocketAddr, request: &[u8]) -> (u16, Value) {
    let mut tcp = TcpStream::connect(to).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.into())),
    )
}

fn assert_error_body(v: &Value, code: u16) {
    assert_eq!(v["code"], code, "{v}");
    assert!(v["error"].is_string() && v["message"].is_string(), "{v}");
}

/// Deterministic pseudo-random numbers (xorshift), so the test input is the same every run.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---- Item 2: caller-chosen methods ------------------------------------------------------

#[tokio::test]
async fn random_long_methods_do_not_grow_metrics_or_log_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &TestConfig::new(tmp.path()));
    let c = client();
    let to = addr_of(&d);
    // Prime every series a normal scrape shows, then measure.
    let _ = get(&c, &d.url("/health")).await;
    let _ = scrape(&c, &d).await;
    let before = scrape(&c, &d).await.len();
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..50 {
        let len = 60_000 + rng.below(330_000) as usize;
        let method: String = (0..len)
            .map(|_| (b'A' + rng.below(26) as u8) as char)
            .collect();
        let (status, _) = raw_http(
            to,
            format!(
                "{method} /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert!((400..500).contains(&status), "{status}");
    }
    let after = scrape(&c, &d).await;
    assert!(
        after.len() < before + 8 * 1024,
        "/metrics grew from {before} to {} bytes",
        after.len()
    );
    assert!(after.contains("method=\"other\""), "method label `other`");
    let log = d.log();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
    let logged: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "request" && v["route"] == "unmatched")
        .collect();
    assert!(logged.len() >= 50, "every request is logged");
    assert!(
        logged
            .iter()
            .all(|v| v["method"].as_str().unwrap().len() <= 35)
    );
}

// ---- Item 3: connection slots before authentication -------------------------------------

/// TLS with optional client certificates from a test CA; the client here presents none.
fn optional_tls_config(dir: &Path) -> (TestConfig, Pki) {
    let pki = Pki::create(&dir.join("pki"), &[]);
    (pki.server_tls(TestConfig::new(dir), Some("optional")), pki)
}

/// An open HTTP/2 connection: the request handle and the task driving the connection, which
/// ends (with the instant) when the server closes it.
struct H2Conn {
    send: h2::client::SendRequest<Bytes>,
    ended: tokio::task::JoinHandle<Instant>,
    ping: Option<h2::PingPong>,
}

async fn h2_connect(
    connector: &tokio_rustls::TlsConnector,
    from: &str,
    to: SocketAddr,
) -> std::io::Result<H2Conn> {
    let tcp = tcp_from(from, to).await?;
    let tls = connector.connect(localhost(), tcp).await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, mut conn) = h2::client::handshake(tls)
        .await
        .map_err(std::io::Error::other)?;
    let ping = conn.ping_pong();
    let ended = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    Ok(H2Conn { send, ended, ping })
}

/// GET `path` on an HTTP/2 connection with `extra` headers; status and body.
async fn h2_get(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    extra: &[(&str, String)],
) -> Result<(u16, Value), h2::Error> {
    let mut req = http::Request::get(format!("https://localhost{path}"));
    for (k, v) in extra {
        req = req.header(*k, v);
    }
    let mut ready = send.clone().ready().await?;
    let (resp, _) = ready.send_request(req.body(()).unwrap(), true)?;
    *send = ready;
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    Ok((
        status,
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned())),
    ))
}

/// `GET /health` from the loopback address `from` on a new connection; the status, or an
/// error (including no answer within 5 s).
async fn probe_health(pki: &Pki, d: &Daemon, from: &str) -> Result<u16, String> {
    let client = pki
        .client_builder(None)
        .local_address(from.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let resp = client
        .get(d.url("/health"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2_flood_without_credentials_leaves_health_answering() {
    let _one_at_a_time = FLOOD.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let (config, pki) = optional_tls_config(tmp.path());
    let config = config.set("server.h2_idle_timeout", "6s");
    let d = Daemon::start_https(tmp.path(), &config, &[]);
    let to = addr_of(&d);
    let connector = pki.rustls_connector(b"h2");

    // 512 h2 connections without credentials from one address, idle after the handshake.
    let opening = Instant::now();
    let mut held = Vec::new();
    for _ in 0..16 {
        let batch = (0..32).map(|_| h2_connect(&connector, "127.0.0.2", to));
        for conn in futures::future::join_all(batch).await.into_iter().flatten() {
            held.push(conn);
        }
    }
    let opened_in = opening.elapsed();

    // A normal client from another address is served, over and over.
    for i in 0..8 {
        let status = probe_health(&pki, &d, "127.0.0.3").await;
        assert_eq!(status, Ok(200), "health probe {i} during the flood");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if opened_in < Duration::from_secs(5) {
        assert!(
            held.len() <= 64,
            "{} connections held by one peer (server.max_connections_per_peer = 64)",
            held.len()
        );
    }

    // The idle connections are closed by the server (GOAWAY), not held forever.
    for conn in held {
        let ended = tokio::time::timeout(Duration::from_secs(20), conn.ended)
            .await
            .expect("an idle h2 connection stays open")
            .unwrap();
        assert!(ended.duration_since(opening) < Duration::from_secs(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2_connection_answering_pings_is_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, pki) = optional_tls_config(tmp.path());
    let config = config.set("server.h2_idle_timeout", "2s");
    let d = Daemon::start_https(tmp.path(), &config, &[]);
    let to = addr_of(&d);
    let connector = pki.rustls_connector(b"h2");

    // Pings every 300 ms, answered by the server, no request: closed after the idle timeout.
    let conn = h2_connect(&connector, "127.0.0.4", to).await.unwrap();
    let opened = Instant::now();
    let mut ping = conn.ping.unwrap();
    let pongs = tokio::spawn(async move {
        let mut pongs = 0;
        while ping.ping(h2::Ping::opaque()).await.is_ok() {
            pongs += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        pongs
    });
    let ended = tokio::time::timeout(Duration::from_secs(15), conn.ended)
        .await
        .expect("a pinging idle h2 connection stays open")
        .unwrap();
    let open_for = ended - opened;
    assert!(
        open_for >= Duration::from_millis(1500) && open_for < Duration::from_secs(6),
        "closed after {open_for:?}"
    );
    assert!(
        pongs.await.unwrap() >= 3,
        "the server answered pings meanwhile"
    );

    // A connection with a request every 700 ms stays open; idle time counts from the last.
    let mut conn = h2_connect(&connector, "127.0.0.4", to).await.unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let (status, _) = h2_get(&mut conn.send, "/health", &[]).await.unwrap();
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let last_request = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(15), conn.ended)
        .await
        .expect("closed when idle")
        .unwrap();
    assert!(ended - last_request < Duration::from_secs(6));

    // Request heads beyond our limits get the JSON error body over HTTP/2 too.
    let mut conn = h2_connect(&connector, "127.0.0.4", to).await.unwrap();
    let big = [("x-big", "a".repeat(40 * 1024))];
    let (status, v) = h2_get(&mut conn.send, "/health", &big).await.unwrap();
    assert_eq!(status, 431, "{v}");
    assert_error_body(&v, 431);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_request_must_arrive_within_first_request_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, pki) = optional_tls_config(tmp.path());
    let config = config
        .set("server.handshake_timeout", "5s")
        .set("server.header_timeout", "5s")
        .set("server.first_request_timeout", "4s");
    let d = Daemon::start_https(tmp.path(), &config, &[]);
    let to = addr_of(&d);

    // HTTP/1.1: a slow handshake (3 s), then headers trickling in. Each step is within its own
    // timeout; together they pass the first-request bound.
    let tcp = tcp_from("127.0.0.5", to).await.unwrap();
    let accepted = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut tls = pki
        .rustls_connector(b"http/1.1")
        .connect(localhost(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let closed = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut probe = [0u8; 256];
        let wrote = tls.write_all(b"X").await.is_ok() && tls.flush().await.is_ok();
        let read = tokio::time::timeout(Duration::from_millis(1), tls.read(&mut probe)).await;
        if !wrote || read.is_ok() {
            break accepted.elapsed();
        }
        assert!(accepted.elapsed() < Duration::from_secs(15), "never closed");
    };
    assert!(
        closed >= Duration::from_millis(3500) && closed < Duration::from_millis(6500),
        "closed after {closed:?}"
    );

    // HTTP/2: no request at all (only pings) is closed by the same bound, long before the
    // default idle timeout (30 s).
    let conn = h2_connect(&pki.rustls_connector(b"h2"), "127.0.0.5", to)
        .await
        .unwrap();
    let opened = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(15), conn.ended)
        .await
        .expect("an h2 connection without requests stays open")
        .unwrap();
    assert!(
        ended - opened < Duration::from_secs(6),
        "{:?}",
        ended - opened
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_reconnect_flood_leaves_health_answering() {
    let _one_at_a_time = FLOOD.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let (config, pki) = optional_tls_config(tmp.path());
    let d = Daemon::start_https(tmp.path(), &config, &[]);
    let to = addr_of(&d);
    let connector = pki.rustls_connector(b"http/1.1");

    // 530 clients from one address: handshake, send nothing, reconnect as soon as closed.
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = Vec::new();
    for _ in 0..530 {
        let (stop, connector) = (stop.clone(), connector.clone());
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let tls = match tcp_from("127.0.0.2", to).await {
                    Ok(tcp) => connector.connect(localhost(), tcp).await,
                    Err(e) => Err(e),
                };
                let Ok(mut tls) = tls else {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                };
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(500), tls.read(&mut buf)).await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        _ => {}
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut answered = 0;
    let mut failures = Vec::new();
    for _ in 0..12 {
        match probe_health(&pki, &d, "127.0.0.3").await {
            Ok(200) => answered += 1,
            other => failures.push(other),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in flood {
        let _ = task.await;
    }
    assert_eq!(
        answered, 12,
        "health failures during the flood: {failures:?}"
    );
}

/// A daemon with default settings and a 16 MiB qcow2 in its file root (`images/small.qcow2`),
/// in a new temporary directory.
fn daemon_with_small_image() -> (tempfile::TempDir, Daemon, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let config = TestConfig::new(tmp.path());
    let image = tmp.path().join("images/small.qcow2");
    make_qcow2(&image, "16M");
    let d = Daemon::start(tmp.path(), &config);
    (tmp, d, image)
}

// ---- Item 5: cross-site requests with auth off ------------------------------------------

#[tokio::test]
async fn cross_site_requests_are_refused_and_touch_nothing() {
    let (tmp, d, image) = daemon_with_small_image();
    let dir = tmp.path();
    let c = client();
    let to = addr_of(&d);
    let port = to.port();
    let body = json!({"image_url": file_url(&image), "volume_name": "victim", "volume_size_gb": 1});
    let id = submit(&c, &d, body.clone()).await;
    assert_eq!(
        wait_job(&c, &d, &id, Duration::from_secs(60)).await["status"],
        "completed"
    );
    let volume = dir.join("volumes/victim");
    let content = std::fs::read(&volume).unwrap();
    let modified = std::fs::metadata(&volume).unwrap().modified().unwrap();
    let post = |content_type: &str, origin: Option<&str>, host: &str| {
        let body = body.to_string();
        let origin = origin
            .map(|o| format!("Origin: {o}\r\n"))
            .unwrap_or_default();
        format!(
            "POST /api/v1/jobs HTTP/1.1\r\nHost: {host}\r\n{origin}Content-Type: {content_type}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };

    // The page of another site posting `text/plain` (a "simple" request: no CORS preflight).
    let evil_host = format!("evil.example:{port}");
    let attack = post("text/plain", Some("http://evil.example"), &evil_host);
    let (status, v) = raw_http(to, attack.as_bytes()).await;
    assert_eq!(status, 403, "{v}");
    assert_error_body(&v, 403);
    // Each check on its own: a foreign Origin with JSON, text/plain without Origin, a
    // DNS-rebound Host without Origin, and a cancel (no body) from another site.
    let local_host = format!("127.0.0.1:{port}");
    let foreign_origin = post("application/json", Some("http://evil.example"), &local_host);
    assert_eq!(raw_http(to, foreign_origin.as_bytes()).await.0, 403);
    let (status, v) = raw_http(to, post("text/plain", None, &local_host).as_bytes()).await;
    assert_eq!(status, 415, "{v}");
    assert_error_body(&v, 415);
    let rebound = post("application/json", None, &evil_host);
    assert_eq!(raw_http(to, rebound.as_bytes()).await.0, 403);
    let read_rebound =
        format!("GET /api/v1/jobs HTTP/1.1\r\nHost: {evil_host}\r\nConnection: close\r\n\r\n");
    assert_eq!(raw_http(to, read_rebound.as_bytes()).await.0, 403);
    let cancel = format!(
        "POST /api/v1/jobs/{id}/cancel HTTP/1.1\r\nHost: {local_host}\r\nOrigin: http://evil.example\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_http(to, cancel.as_bytes()).await.0, 403);

    // Nothing was touched: still the one job, the volume as it was.
    let (_, jobs) = get(&c, &d.url("/api/v1/jobs")).await;
    assert_eq!(jobs["count"], 1, "{jobs}");
    assert_eq!(std::fs::read(&volume).unwrap(), content);
    assert_eq!(
        std::fs::metadata(&volume).unwrap().modified().unwrap(),
        modified
    );
    // The daemon's own origin is fine.
    let own = format!(
        "GET /health HTTP/1.1\r\nHost: {local_host}\r\nOrigin: http://{local_host}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_http(to, own.as_bytes()).await.0, 200);
}

// ---- Item 9: JSON error bodies, duplicate keys, log levels -------------------------------

#[tokio::test]
async fn request_heads_beyond_limits_get_json_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &TestConfig::new(tmp.path()));
    let to = addr_of(&d);
    let head = |target: &str, headers: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n")
    };
    let long_target = format!("/api/v1/jobs/{}", "a".repeat(9000));
    let (status, v) = raw_http(to, head(&long_target, "").as_bytes()).await;
    assert_eq!(status, 414, "{v}");
    assert_error_body(&v, 414);
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (status, v) = raw_http(to, head("/health", &many).as_bytes()).await;
    assert_eq!(status, 431, "{v}");
    assert_error_body(&v, 431);
    let big = format!("X-Big: {}\r\n", "b".repeat(40 * 1024));
    let (status, v) = raw_http(to, head("/health", &big).as_bytes()).await;
    assert_eq!(status, 431, "{v}");
    assert_error_body(&v, 431);
    assert_eq!(raw_http(to, head("/health", "").as_bytes()).await.0, 200);
}

#[tokio::test]
async fn json_bodies_need_the_json_content_type_and_unique_keys() {
    let (_tmp, d, image) = daemon_with_small_image();
    let c = client();
    let url = file_url(&image);
    let send = |content_type: Option<&'static str>, body: String| {
        let mut req = c.post(d.url("/api/v1/jobs")).body(body);
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let duplicate = format!(
        r#"{{"image_url":"{url}","volume_name":"a","volume_size_gb":1,"volume_name":"b"}}"#
    );
    let (status, v) = send(Some("application/json"), duplicate).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("duplicate key"),
        "{v}"
    );
    let good = json!({"image_url": url, "volume_name": "a", "volume_size_gb": 1}).to_string();
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let (status, v) = send(content_type, good.clone()).await;
        assert_eq!(status, 415, "{content_type:?}: {v}");
        assert_error_body(&v, 415);
    }
    let (status, v) = send(Some("Application/JSON; charset=utf-8"), good).await;
    assert_eq!(status, 202, "{v}");
    let (_, jobs) = get(&c, &d.url("/api/v1/jobs")).await;
    assert_eq!(
        jobs["count"], 1,
        "only the well-formed request became a job"
    );
}

#[tokio::test]
async fn reads_log_at_debug_and_state_changes_at_info() {
    let (_tmp, d, image) = daemon_with_small_image();
    let c = client();
    let id = submit(
        &c,
        &d,
        json!({"image_url": file_url(&image), "volume_name": "v", "volume_size_gb": 1}),
    )
    .await;
    wait_job(&c, &d, &id, Duration::from_secs(60)).await;
    let (status, _) = post(&c, &d.url("/api/v1/jobs"), &json!({"volume_name": "x"})).await;
    assert_eq!(status, 400);
    let _ = get(&c, &d.url("/health")).await;
    let (status, _) = delete(&c, &d.url("/api/v1/volumes/v")).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines: Vec<Value> = d
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "request")
        .collect();
    let levels = |method: &str, route: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|v| v["method"] == method && v["route"] == route)
            .map(|v| v["level"].as_str().unwrap().to_string())
            .collect()
    };
    let polls = levels("GET", "/api/v1/jobs/{id}");
    assert!(!polls.is_empty());
    assert!(polls.iter().all(|l| l == "debug"), "job reads: {polls:?}");
    assert_eq!(levels("GET", "/health"), ["debug"]);
    assert_eq!(levels("POST", "/api/v1/jobs"), ["info", "info"]);
    assert_eq!(levels("DELETE", "/api/v1/volumes/{name}"), ["info"]);
}
