//! Defects found by the second outside attack (dropped connections, cache decisions, hostile
//! text, silent sources, debris, resume, the CLI's reading), against the real binary: each
//! test failed before its fix.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MINUTE: Duration = Duration::from_secs(60);
const TOKEN: &str = "attack2-0123456789abcdef0123456789abcdef";

/// Where a client gives up on a request.
#[derive(Debug, Clone, Copy)]
enum HangUp {
    /// Half of the request sent, then the connection closed.
    MidRequest,
    /// The whole request sent, then the write side shut (HTTP/1.1 EOF), then closed.
    HalfClose,
    /// The whole request sent, then closed after a short wait (a client time-out).
    After(Duration),
}

impl HangUp {
    fn nth(i: usize) -> HangUp {
        match i % 4 {
            0 => HangUp::MidRequest,
            1 | 2 => HangUp::HalfClose,
            _ => HangUp::After(Duration::from_millis((i % 7) as u64 * 3)),
        }
    }
}

/// An HTTP/1.1 request with a JSON body (and the token, when given).
fn request(method: &str, path: &str, body: Option<&Value>, key: Option<&str>) -> Vec<u8> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {TOKEN}\r\n\
         content-length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head += "content-type: application/json\r\n";
    }
    if let Some(key) = key {
        head += &format!("idempotency-key: {key}\r\n");
    }
    head += "\r\n";
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

/// Sends `bytes` on `stream` and hangs up as `how` says.
async fn send_and_hang_up<S: tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    bytes: &[u8],
    how: HangUp,
) {
    match how {
        HangUp::MidRequest => {
            let _ = stream.write_all(&bytes[..bytes.len() / 2]).await;
        }
        HangUp::HalfClose => {
            let _ = stream.write_all(bytes).await;
            let _ = stream.shutdown().await;
        }
        HangUp::After(wait) => {
            let _ = stream.write_all(bytes).await;
            tokio::time::sleep(wait).await;
        }
    }
}

/// A daemon with a token, small queue limits and a small raw image under `images/`.
fn daemon(dir: &std::path::Path, tls: Option<&Pki>) -> Daemon {
    std::fs::write(dir.join("tokens"), format!("{TOKEN}\n")).unwrap();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::write(dir.join("images/small.raw"), random_bytes(256 << 10, 3)).unwrap();
    let config = TestConfig::new(dir)
        .set("auth.tokens_file", dir.join("tokens").display().to_string())
        .set("jobs.max_concurrent", 4)
        .set("jobs.queue_capacity", 4096);
    match tls {
        None => Daemon::start(dir, &config),
        Some(pki) => Daemon::start_https(dir, &pki.server_tls(config, None), &[]),
    }
}

/// A client that sends the token with every request, over TLS trusting `tls`'s CA when given.
fn authed(tls: Option<&Pki>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let builder = match tls {
        None => reqwest::Client::builder().pool_idle_timeout(POOL_IDLE),
        Some(pki) => pki.client_builder(None),
    };
    builder
        .default_headers(headers)
        .timeout(MINUTE)
        .build()
        .unwrap()
}

/// Sends `requests` on new connections (TLS when `tls` is given), each hung up as `HangUp::nth`
/// says, `parallel` at a time.
async fn hang_up_on_all(d: &Daemon, tls: Option<&Pki>, requests: Vec<Vec<u8>>) {
    let addr = d.base.split("://").nth(1).unwrap().to_string();
    let connector = tls.map(|pki| pki.rustls_connector(b"http/1.1"));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, bytes) in requests.into_iter().enumerate() {
        let (addr, connector) = (addr.clone(), connector.clone());
        tasks.spawn(async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let how = HangUp::nth(i);
            match connector {
                None => send_and_hang_up(tcp, &bytes, how).await,
                Some(c) => {
                    if let Ok(tls) = c.connect(localhost(), tcp).await {
                        send_and_hang_up(tls, &bytes, how).await;
                    }
                }
            }
        });
        if tasks.len() >= 16 {
            tasks.join_next().await;
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// How many jobs have `status`.
async fn jobs_in(c: &reqwest::Client, d: &Daemon, status: &str) -> u64 {
    let url = d.url(&format!("/api/v1/jobs?status={status}&limit=1000"));
    let (code, v) = get(c, &url).await;
    assert_eq!(code, 200, "{v}");
    v["count"].as_u64().unwrap()
}

/// Waits until no job is pending or running.
async fn wait_idle(c: &reqwest::Client, d: &Daemon) {
    let deadline = Instant::now() + 2 * MINUTE;
    loop {
        let mut busy = 0;
        for status in ["pending", "running"] {
            busy += jobs_in(c, d, status).await;
        }
        if busy == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{busy} jobs still busy\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The barrage and the checks of `clients_that_hang_up_leave_no_engine_state`: `n` submissions
/// and `n` deletions whose clients hang up, then every name and key must be usable and the
/// queue empty.
async fn hang_ups_leave_a_clean_state(
    d: &Daemon,
    c: &reqwest::Client,
    tls: Option<&Pki>,
    n: usize,
) {
    let image = format!("file://{}", d.dir.join("images/small.raw").display());
    let body = |i: usize| {
        json!({"image_url": image, "volume_name": format!("hangup-{i}"), "volume_size_gb": 1,
               "image_type": "raw"})
    };
    let submissions = (0..n)
        .map(|i| {
            request(
                "POST",
                "/api/v1/jobs",
                Some(&body(i)),
                Some(&format!("key-{i}")),
            )
        })
        .collect();
    hang_up_on_all(d, tls, submissions).await;
    wait_idle(c, d).await;
    // Every key: the job it made (200, replayed) or a new one (202); never "being processed".
    let mut answers = std::collections::BTreeMap::new();
    for i in 0..n {
        let r = c
            .post(d.url("/api/v1/jobs"))
            .header("idempotency-key", format!("key-{i}"))
            .json(&body(i))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert!(status == 200 || status == 202, "key-{i}: {status} {v}");
        *answers.entry(status).or_insert(0) += 1;
    }
    eprintln!(
        "{n} submissions hung up ({}): the same key again answered {answers:?} (200: the job \
         the hung-up request had stored; 202: it had stored none)",
        if tls.is_some() { "TLS" } else { "plain" }
    );
    wait_idle(c, d).await;
    let deletions = (0..n)
        .map(|i| request("DELETE", &format!("/api/v1/volumes/hangup-{i}"), None, None))
        .collect();
    hang_up_on_all(d, tls, deletions).await;
    // Every name: deletable now (not "in use by its deletion" or "being submitted").
    for i in 0..n {
        let r = c
            .delete(d.url(&format!("/api/v1/volumes/hangup-{i}")))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "hangup-{i}: {v}");
    }
    // The queue has every place back: a full queue's worth of submissions is accepted.
    assert_eq!(jobs_in(c, d, "pending").await, 0);
    let r = c
        .post(d.url("/api/v1/jobs"))
        .json(&body(n + 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_idle(c, d).await;
}

/// Item 1: a client that goes away mid-submission (or mid-deletion) left the volume lock, the
/// Idempotency-Key and a queue place taken until restart. `HANGUP_ROUNDS` sets the number
/// of submissions (and deletions) per transport (default 32; the closing note's run used 1000).
#[tokio::test]
async fn clients_that_hang_up_leave_no_engine_state() {
    let n: usize = std::env::var("HANGUP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(tmp.path(), None);
    hang_ups_leave_a_clean_state(&d, &authed(None), None, n).await;

    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::create(&tmp.path().join("pki"), &[]);
    let d = daemon(tmp.path(), Some(&pki));
    hang_ups_leave_a_clean_state(&d, &authed(Some(&pki)), Some(&pki), n).await;
}

/// Item 3: without an ETag (nginx `etag off`), a replaced image kept its cache key; after the
/// revalidation interval the old entry was served as `revalidated`.
#[tokio::test]
async fn a_replaced_image_without_etag_is_fetched_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let v1 = random_bytes(1 << 20, 11);
    std::fs::write(www.join("img.raw"), &v1).unwrap();
    let nginx = Nginx::start(
        &dir.join("nginx"),
        &format!(
            "server {{ listen 127.0.0.1:{{port}}; root {}; etag off; }}",
            www.display()
        ),
    );
    let config = TestConfig::new(dir)
        .set(
            "sources.allowed_hosts",
            toml::Value::Array(vec![format!("127.0.0.1:{}", nginx.port).into()]),
        )
        .set("cache.revalidate_interval", "0s");
    let d = Daemon::start(dir, &config);
    let c = client();
    let url = nginx.url("/img.raw");
    let fetch = |_: ()| {
        let (c, d, url) = (&c, &d, url.clone());
        async move {
            let id = fetch_to_cache(c, d, &url, Some("raw")).await;
            let job = wait_job(c, d, &id, MINUTE).await;
            assert_eq!(job["status"], "completed", "{job}");
            job
        }
    };
    let first = fetch(()).await;
    // Same size, new bytes, a later Last-Modified (one second resolution).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let v2 = random_bytes(1 << 20, 12);
    std::fs::write(www.join("img.raw"), &v2).unwrap();
    let second = fetch(()).await;
    assert_ne!(second["cache_revalidation"], "revalidated", "{second}");
    assert_eq!(second["cache_hit"], false, "{second}");
    let path = second["image_path"].as_str().unwrap();
    assert_ne!(first["image_path"], second["image_path"]);
    assert_eq!(
        std::fs::read(path).unwrap(),
        v2,
        "the new version is cached"
    );
    // And unchanged, it is a hit again.
    let third = fetch(()).await;
    assert_eq!(third["cache_hit"], true, "{third}");
    assert_eq!(third["image_path"], second["image_path"]);
}

/// An HTTP server on loopback that answers every request with `answer` (raw bytes), or with
/// nothing at all when `answer` is empty; returns its port.
fn raw_server(answer: Vec<u8>) -> u16 {
    raw_server_with(move |_| answer.clone())
}

/// As `raw_server`, with the answer chosen from the request's first bytes.
fn raw_server_with(answer_for: impl Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static) -> u16 {
    let answer_for = Arc::new(answer_for);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let answer_for = answer_for.clone();
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).unwrap_or(0);
                let answer = answer_for(&buf[..n]);
                if answer.is_empty() {
                    // Silent: hold the connection open.
                    std::thread::sleep(Duration::from_secs(300));
                } else {
                    let _ = stream.write_all(&answer);
                }
            });
        }
    });
    port
}

/// Item 4 (daemon side): control characters in request strings were accepted, and an image
/// server's error body (ESC, BEL, OSC 52) was kept raw in the job error.
#[tokio::test]
async fn control_characters_are_refused_in_requests_and_escaped_from_remote_text() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let body = "\u{1b}]52;c;ZXZpbA==\u{7}\u{1b}[2J gone";
    // The HEAD finds the image; the GET gets the hostile error body.
    let answer = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let port = raw_server_with(move |request| {
        if request.starts_with(b"HEAD") {
            b"HTTP/1.1 200 OK\r\ncontent-length: 4096\r\nconnection: close\r\n\r\n".to_vec()
        } else {
            answer.clone().into_bytes()
        }
    });
    let config = TestConfig::new(dir).set(
        "sources.allowed_hosts",
        toml::Value::Array(vec![format!("127.0.0.1:{port}").into()]),
    );
    let d = Daemon::start(dir, &config);
    let c = client();
    for (field, value) in [
        ("image_url", "http://127.0.0.1/\u{1b}[31mred.raw"),
        ("correlation_id", "id\u{7}"),
        ("image_url", "http://127.0.0.1/a\nb.raw"),
    ] {
        let mut req = json!({"image_url": format!("http://127.0.0.1:{port}/x.raw"),
                             "volume_name": "ctl", "volume_size_gb": 1});
        req[field] = json!(value);
        let (status, v) = post(&c, &d.url("/api/v1/jobs"), &req).await;
        assert_eq!(status, 400, "{field}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains("control character"),
            "{v}"
        );
    }
    let id = submit(
        &c,
        &d,
        json!({"image_url": format!("http://127.0.0.1:{port}/x.raw"), "volume_name": "ctl",
               "volume_size_gb": 1, "image_type": "raw"}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    let error = job["error"].as_str().unwrap();
    assert!(!error.chars().any(|ch| ch.is_control()), "{error:?}");
    assert!(error.contains("\\u{1b}]52;c;ZXZpbA=="), "{error}");
    // The CLI shows it without the raw bytes.
    let out = std::process::Command::new(daemon_bin())
        .args(["--server", &d.base, "job", "get", &id])
        .output()
        .unwrap();
    assert!(
        !out.stdout.contains(&0x1b),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Item 4 (CLI side): server strings were printed raw. The server here is a stand-in that
/// answers what a hostile or compromised daemon could (the real one escapes its own text).
#[tokio::test]
async fn the_cli_escapes_every_server_string_and_json_stays_exact() {
    let job = json!({
        "job_id": "00000000-0000-4000-8000-000000000001", "kind": "provision",
        "status": "failed\u{1b}[2J", "error": "boom\u{1b}]52;c;ZXZpbA==\u{7}",
        "image_url": "http://x/\u{1b}[31mred", "volume_name": "v\u{9b}1",
        "progress": {"stage": "downloading\u{1b}[1A", "percent": 5.0, "stage_percent": 5.0,
                     "bytes_processed": 1, "bytes_total": 2, "eta_seconds": null},
        "cache_hit": false, "created_at": "2026-12-06T00:00:00Z", "updated_at": "2026-12-06T00:00:00Z"
    });
    let list = json!({"jobs": [job.clone()], "count": 1});
    let cache = json!({"images": [{"key": "k\u{1b}", "size": 1, "format": "raw", "virtual_size": 1,
        "last_used": "t\u{7}", "image_url": "u\u{1b}]52;c;x\u{7}", "checksum": "", "path": "p",
        "mod_time": "m"}], "count": 1, "offset": 0, "limit": 100});
    let health = json!({"status": "healthy\u{1b}[2J", "version": "v\u{7}", "uptime": "1s",
        "jobs": {"running": 0, "slots": 2}});
    let refused = json!({"error": "conflict", "message": "busy\u{1b}]52;c;x\u{7}", "code": 409});
    let http = |status: &str, body: &Value| {
        let body = body.to_string();
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    for (args, answer) in [
        (
            vec!["job", "get", "00000000-0000-4000-8000-000000000001"],
            http("200 OK", &job),
        ),
        (vec!["job", "list"], http("200 OK", &list)),
        (vec!["cache", "list"], http("200 OK", &cache)),
        (vec!["health"], http("200 OK", &health)),
        (
            vec!["volume", "delete", "v1"],
            http("409 Conflict", &refused),
        ),
    ] {
        let port = raw_server(answer);
        let server = format!("http://127.0.0.1:{port}");
        let text = std::process::Command::new(daemon_bin())
            .args(["--server", &server])
            .args(&args)
            .output()
            .unwrap();
        for stream in [&text.stdout, &text.stderr] {
            assert!(
                !stream.iter().any(|b| *b == 0x1b || *b == 0x07),
                "{args:?}: {}",
                String::from_utf8_lossy(stream)
            );
        }
        let json_out = std::process::Command::new(daemon_bin())
            .args(["--server", &server, "--output", "json"])
            .args(&args)
            .output()
            .unwrap();
        let printed: Value = serde_json::from_slice(&json_out.stdout).unwrap();
        assert!(
            printed.to_string().contains("\\u001b"),
            "{args:?}: exact JSON {printed}"
        );
    }
}

/// Item 5: preflight had no time bound; a silent source held the request for over 100 s.
#[tokio::test]
async fn preflight_of_a_silent_source_ends_within_its_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let port = raw_server(Vec::new());
    let config = TestConfig::new(dir)
        .set(
            "sources.allowed_hosts",
            toml::Value::Array(vec![format!("127.0.0.1:{port}").into()]),
        )
        .set("sources.stall_timeout", "2s");
    let d = Daemon::start(dir, &config);
    let c = client();
    let started = Instant::now();
    let (status, v) = post(
        &c,
        &d.url("/api/v1/images/inspect"),
        &json!({"image_url": format!("http://127.0.0.1:{port}/x.qcow2")}),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["accepted"], false, "{v}");
    assert!(
        v["reason"].as_str().unwrap().contains("stall_timeout"),
        "{v}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

/// Item 6: a failed single-stream download left a preallocated `.partial` at the full size
/// that nothing could resume.
#[tokio::test]
async fn a_failed_single_stream_download_leaves_no_partial_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Declares 64 MiB (no ETag, no ranges: one stream), sends 1 MiB, closes: every attempt
    // fails the same way.
    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 67108864\r\nconnection: close\r\n\r\n";
    let port = raw_server_with(move |request| {
        if String::from_utf8_lossy(request).contains(".sha256") {
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec()
        } else if request.starts_with(b"HEAD") {
            head.to_vec()
        } else {
            let mut answer = head.to_vec();
            answer.extend(vec![0u8; 1 << 20]);
            answer
        }
    });
    let config = TestConfig::new(dir)
        .set(
            "sources.allowed_hosts",
            toml::Value::Array(vec![format!("127.0.0.1:{port}").into()]),
        )
        .set("s3.retries", 1)
        .set("s3.retry_backoff", "100ms");
    let d = Daemon::start(dir, &config);
    let c = client();
    let (status, v) = post(
        &c,
        &d.url("/api/v1/cache/fetch"),
        &json!({"image_url": format!("http://127.0.0.1:{port}/big.raw"), "image_type": "raw"}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let job = wait_job(&c, &d, v["job_id"].as_str().unwrap(), MINUTE).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("download failed"),
        "{job}"
    );
    let leftovers = partial_files(dir);
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Item 7: resume data was lost until part 0 was complete: a download cancelled while part 0
/// was still arriving asked for every part again.
#[tokio::test]
async fn resume_keeps_finished_parts_before_the_first_part_is_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    // Parts of 16 MiB: 16 + 16 + 8. At 2 MiB/s per connection the last (short) part is in
    // after about 4 s, the first two after 8 s.
    std::fs::write(www.join("img.raw"), random_bytes(40 << 20, 5)).unwrap();
    let nginx = Nginx::start(
        &dir.join("nginx"),
        &format!(
            "server {{ listen 127.0.0.1:{{port}}; root {}; limit_rate 2m; }}",
            www.display()
        ),
    );
    let config = TestConfig::new(dir).set(
        "sources.allowed_hosts",
        toml::Value::Array(vec![format!("127.0.0.1:{}", nginx.port).into()]),
    );
    let d = Daemon::start(dir, &config);
    let c = client();
    let body = json!({"image_url": nginx.url("/img.raw"), "image_type": "raw"});
    let (_, v) = post(&c, &d.url("/api/v1/cache/fetch"), &body).await;
    let id = v["job_id"].as_str().unwrap().to_string();
    // The short part is in (and checkpointed within a second), parts 0 and 1 are not.
    wait_until(&c, &d, &id, MINUTE, |j| {
        j["progress"]["bytes_processed"].as_u64().unwrap_or(0) >= 27 << 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, v) = post(&c, &d.url(&format!("/api/v1/jobs/{id}/cancel")), &json!({})).await;
    assert_eq!(status, 200, "{v}");
    wait_job(&c, &d, &id, MINUTE).await;
    let before = nginx.gets(nginx.port, "/img.raw").len();
    let (_, v) = post(&c, &d.url("/api/v1/cache/fetch"), &body).await;
    let job = wait_job(&c, &d, v["job_id"].as_str().unwrap(), 2 * MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    let again: Vec<String> = nginx.gets(nginx.port, "/img.raw")[before..].to_vec();
    assert!(
        !again.iter().any(|l| l.contains("bytes=33554432-")),
        "the finished last part was asked for again: {again:?}"
    );
}

/// Item 8: the CLI read answers without bounds (1 GiB of JSON: 2.1 GB RSS) and followed an
/// event line with no newline forever.
#[tokio::test]
async fn the_cli_bounds_what_it_reads() {
    // An answer that declares 1 GiB (and sends a lot of it).
    let mut huge =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1073741824\r\n\r\n["
            .to_vec();
    huge.extend(vec![b' '; 8 << 20]);
    let port = raw_server(huge);
    let started = Instant::now();
    let out = std::process::Command::new(daemon_bin())
        .args(["--server", &format!("http://127.0.0.1:{port}"), "health"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("larger than"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // A progress stream whose one line never ends: the CLI gives up on it (it reconnects a
    // bounded number of times, then fails) instead of reading forever.
    let mut endless = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: ".to_vec();
    endless.extend(vec![b'x'; 3 << 20]);
    let port = raw_server(endless);
    let started = Instant::now();
    let out = tokio::process::Command::new(daemon_bin())
        .args([
            "--server",
            &format!("http://127.0.0.1:{port}"),
            "job",
            "watch",
            "00000000-0000-4000-8000-000000000001",
        ])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), out)
        .await
        .expect("the CLI must give up on an endless line")
        .unwrap();
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(90));
}

/// Item 9: `--wait` gave up (exit 4) when the daemon restarted, although the job survives.
#[tokio::test]
async fn waiting_survives_a_daemon_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let image = dir.join("images/i.raw");
    std::fs::write(&image, random_bytes(1 << 20, 9)).unwrap();
    let port = free_port();
    let config = TestConfig::new(dir)
        .set("server.listen", format!("127.0.0.1:{port}"))
        .set("jobs.max_concurrent", 1)
        .set("jobs.shutdown_grace", "1s");
    let slow = slow_qemu_img_path(dir, 4);
    let env = [("PATH", slow.as_str())];
    let d = Daemon::start_with_env(dir, &config, &env);
    let c = client();
    // The first job holds the only slot; the watched one waits in the queue.
    submit(
        &c,
        &d,
        json!({"image_url": file_url(&image), "volume_name": "first",
                          "volume_size_gb": 1, "image_type": "raw"}),
    )
    .await;
    let mut cli = tokio::process::Command::new(daemon_bin())
        .args([
            "--server",
            &d.base,
            "provision",
            "--image-url",
            &file_url(&image),
            "--volume",
            "watched",
            "--size-gb",
            "1",
            "--image-type",
            "raw",
            "--wait",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = Daemon::start_with_env(dir, &config, &env);
    let out = tokio::time::timeout(3 * MINUTE, async {
        let mut stdout = String::new();
        cli.stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .await
            .unwrap();
        let status = cli.wait().await.unwrap();
        (status, stdout)
    })
    .await
    .expect("the CLI follows the job after the restart");
    assert!(out.0.success(), "{}\n{}", out.1, d.log());
    assert!(out.1.contains("completed"), "{}", out.1);
}

/// Item 10: a POST without credentials had its body read first: one whose body never came was
/// held `server.body_timeout` before its 401.
#[tokio::test]
async fn requests_without_credentials_are_refused_before_their_body() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("tokens"), format!("{TOKEN}\n")).unwrap();
    let config = TestConfig::new(dir)
        .set("auth.tokens_file", dir.join("tokens").display().to_string())
        .set("server.body_timeout", "30s");
    let d = Daemon::start(dir, &config);
    let addr = d.base.trim_start_matches("http://").to_string();
    for path in [
        "/api/v1/jobs",
        "/api/v1/cache/fetch",
        "/api/v1/images/inspect",
    ] {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
             content-length: 100\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("an answer before the body")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 401"), "{path}: {text}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
