//! The operator's side against the real daemon binary: the CLI (provision --wait, rejected
//! images, --output json, mTLS and token flags, nothing listening, the progress bar in a real
//! terminal under tmux), the progress stream (SSE), the OpenAPI document validated against real
//! responses, idempotent submission across a restart, preflight inspection and volume uploads.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use serde_json::{Value, json};

/// Runs the CLI against `server` with `args`; stdin is not a terminal.
fn cli(server: &str, args: &[&str]) -> Output {
    cli_env(server, args, &[])
}

fn cli_env(server: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("LVP_SERVER_URL", server)
        .env_remove("LVP_TOKEN")
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn explain(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", explain(out)))
}

/// A raw image of `mib` MiB of random bytes.
fn raw_image(dir: &Path, name: &str, mib: usize) -> std::path::PathBuf {
    let p = dir.join("images").join(name);
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::write(&p, random_bytes(mib << 20, mib as u64)).unwrap();
    p
}

fn volumes_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("volumes"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_provision_wait_completes_and_a_rejected_image_fails_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &TestConfig::new(dir.path()));
    let image = dir.path().join("images/a.qcow2");
    make_qcow2(&image, "64M");
    let out = cli(
        &d.base,
        &[
            "provision",
            "--image-url",
            &file_url(&image),
            "--volume",
            "vm-1",
            "--size-gb",
            "1",
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    assert!(
        last.contains("completed"),
        "final line: {last}\n{}",
        explain(&out)
    );
    println!("provision --wait (not a terminal):\n{stdout}");

    let bad = hostile_qcow2(&dir.path().join("images"), Hostile::BackingFile);
    let out = cli(
        &d.base,
        &[
            "provision",
            "--image-url",
            &file_url(&bad),
            "--volume",
            "vm-2",
            "--size-gb",
            "1",
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("failed") && stderr.contains("backing file"),
        "{}",
        explain(&out)
    );
    assert!(!volumes_in(dir.path()).contains(&"vm-2".to_string()));
}

/// The CLI's arguments that provision the raw image at `url` into `volume` of 1 GB, then
/// `extra`.
fn provision_args<'a>(url: &'a str, volume: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "provision",
        "--image-url",
        url,
        "--image-type",
        "raw",
        "--volume",
        volume,
        "--size-gb",
        "1",
    ];
    args.extend_from_slice(extra);
    args
}

/// Starts `provision --wait` (stdin not a terminal) with `extra` arguments and returns the child
/// once its job runs (the caller waits for it; a failed request to the daemon panics the test,
/// which ends the CLI with the daemon).
#[allow(clippy::zombie_processes)]
async fn provision_waiting(
    d: &Daemon,
    c: &reqwest::Client,
    image: &Path,
    volume: &str,
    extra: &[&str],
) -> (std::process::Child, String) {
    let url = file_url(image);
    let args = provision_args(&url, volume, &[&["--wait"], extra].concat());
    let mut child = Command::new(BIN)
        .args(&args)
        .env("LVP_SERVER_URL", &d.base)
        .env_remove("LVP_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, list) = get(c, &d.url("/api/v1/jobs?status=running")).await;
        let job = list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["volume_name"] == volume)
            .map(|j| j["job_id"].as_str().unwrap().to_string());
        if let Some(id) = job {
            return (child, id);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the job never ran: {}\n{}", explain(&out), d.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn interrupt(child: &std::process::Child) {
    // The shell's builtin kill: no procps needed.
    let status = Command::new("sh")
        .args(["-c", &format!("kill -INT {}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_while_waiting_cancels_only_when_asked_to() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path(), "r.raw", 1);
    let path = slow_qemu_img_path(dir.path(), 30);
    let d = Daemon::start_with_env(dir.path(), &TestConfig::new(dir.path()), &[("PATH", &path)]);
    let c = client();
    // --cancel-on-interrupt: Ctrl-C cancels the job and waits for its end.
    let (child, id) = provision_waiting(&d, &c, &image, "vm-int", &["--cancel-on-interrupt"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", explain(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cancel requested") && stderr.contains("cancelled"),
        "{stderr}"
    );
    let (_, job) = get(&c, &d.url(&format!("/api/v1/jobs/{id}"))).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(
        !volumes_in(dir.path()).contains(&"vm-int".to_string()),
        "its volume went too"
    );
    // Without the flag and without a terminal to ask on, the job goes on.
    let (child, id) = provision_waiting(&d, &c, &image, "vm-keep", &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", explain(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("not cancelled") && stderr.contains("job watch"),
        "{stderr}"
    );
    let (_, job) = get(&c, &d.url(&format!("/api/v1/jobs/{id}"))).await;
    assert_eq!(job["status"], "running", "{job}");
    let (s, _) = post(&c, &d.url(&format!("/api/v1/jobs/{id}/cancel")), &json!({})).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_output_json_is_valid_json_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &TestConfig::new(dir.path()));
    let image = raw_image(dir.path(), "r.raw", 2);
    let url = file_url(&image);
    let j = |args: &[&str]| {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = cli(&d.base, &all);
        (out.status.code(), json_of(&out))
    };
    let (code, done) = j(&provision_args(&url, "vm-j", &["--wait"]));
    assert_eq!(code, Some(0), "{done}");
    assert_eq!(
        done["status"], "completed",
        "--wait prints the final StatusResponse"
    );
    let id = done["job_id"].as_str().unwrap().to_string();
    let (code, job) = j(&["job", "get", &id]);
    assert_eq!((code, job["job_id"].as_str()), (Some(0), Some(id.as_str())));
    let (code, list) = j(&["job", "list", "--status", "completed"]);
    assert_eq!(code, Some(0));
    assert!(
        list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["job_id"] == id.as_str())
    );
    let (code, accepted) = j(&["cache", "fetch", &url, "--image-type", "raw"]);
    assert_eq!(code, Some(0), "{accepted}");
    assert!(accepted["job_id"].is_string());
    let (code, fetched) = j(&["cache", "fetch", &url, "--image-type", "raw", "--wait"]);
    assert_eq!(
        (code, fetched["status"].as_str()),
        (Some(0), Some("completed")),
        "{fetched}"
    );
    let (code, list) = j(&["job", "list", "--limit", "1"]);
    assert_eq!(code, Some(0));
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "{list}");
    let (_, cached) = j(&["cache", "list"]);
    let key = cached["images"][0]["key"].as_str().unwrap().to_string();
    for args in [
        vec!["health"],
        vec!["cache", "list"],
        vec!["image", "inspect", &url, "--image-type", "raw"],
        vec!["job", "watch", &id],
        vec!["volume", "delete", "vm-j"],
        vec!["cache", "delete", &key],
    ] {
        let (code, v) = j(&args);
        assert_eq!(code, Some(0), "{args:?}: {v}");
        assert!(v.is_object(), "{args:?}: {v}");
    }
    // Errors are JSON too (the API's error body), with a non-zero status.
    let (code, err) = j(&["job", "get", "00000000-0000-0000-0000-000000000000"]);
    assert_eq!(code, Some(1));
    assert_eq!(err["code"], 404, "{err}");
    let (code, err) = j(&["job", "cancel", &id]);
    assert_eq!((code, err["code"].as_u64()), (Some(1), Some(400)), "{err}");
}

/// Every subcommand in text mode: exit 0, something on stdout, no panic.
#[tokio::test(flavor = "multi_thread")]
async fn cli_text_output_of_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &TestConfig::new(dir.path()));
    let image = raw_image(dir.path(), "t.raw", 1);
    let url = file_url(&image);
    let run = |args: &[&str]| {
        let out = cli(&d.base, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", explain(&out));
        assert!(
            !text(&out.stdout).trim().is_empty(),
            "{args:?}: {}",
            explain(&out)
        );
        assert!(
            !text(&out.stderr).contains("panicked"),
            "{args:?}: {}",
            explain(&out)
        );
        text(&out.stdout)
    };
    let provisioned = run(&provision_args(&url, "vm-t", &[]));
    let id = provisioned
        .split_whitespace()
        .find(|w| uuid::Uuid::parse_str(w).is_ok())
        .unwrap_or_else(|| panic!("no job id in {provisioned}"))
        .to_string();
    run(&["job", "watch", &id]);
    run(&["job", "get", &id]);
    run(&["job", "list", "--status", "completed", "--limit", "5"]);
    run(&["cache", "fetch", &url, "--image-type", "raw", "--wait"]);
    let listed = run(&["cache", "list"]);
    let key = listed
        .split_whitespace()
        .find(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no cache key in {listed}"))
        .to_string();
    run(&["cache", "delete", &key]);
    run(&["image", "inspect", &url, "--image-type", "raw"]);
    run(&["volume", "delete", "vm-t"]);
    run(&["health"]);
    let seed = dir.path().join("seed.iso");
    std::fs::write(&seed, b"seed").unwrap();
    run(&["volume", "upload", "t-cidata", seed.to_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_says_what_to_do_when_nothing_listens() {
    let port = free_port();
    let out = cli(&format!("http://127.0.0.1:{port}"), &["job", "list"]);
    assert_eq!(out.status.code(), Some(4), "{}", explain(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("nothing is listening") && stderr.contains("LVP_SERVER_URL"),
        "{stderr}"
    );
    let out = cli("ftp://x", &["health"]);
    assert_eq!(out.status.code(), Some(4), "{}", explain(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_mtls_flags_work_and_refusals_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki"), &["operator", "stranger"]);
    let config = pki.configure(TestConfig::new(dir.path()), &["operator"]);
    let d = Daemon::start_https(dir.path(), &config, &[]);
    let (ca, cert, key) = (
        pki.file("ca.crt"),
        pki.file("operator.crt"),
        pki.file("operator.key"),
    );
    let out = cli(
        &d.base,
        &[
            "--cacert", &ca, "--cert", &cert, "--key", &key, "job", "list",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));

    let out = cli(&d.base, &["--cacert", &ca, "job", "list"]);
    assert_eq!(out.status.code(), Some(4), "{}", explain(&out));
    assert!(
        text(&out.stderr).contains("--cert and --key"),
        "{}",
        explain(&out)
    );

    let out = cli(&d.base, &["--cert", &cert, "--key", &key, "job", "list"]);
    assert_eq!(out.status.code(), Some(4), "{}", explain(&out));
    assert!(text(&out.stderr).contains("--cacert"), "{}", explain(&out));

    let (scert, skey) = (pki.file("stranger.crt"), pki.file("stranger.key"));
    let out = cli(
        &d.base,
        &[
            "--cacert", &ca, "--cert", &scert, "--key", &skey, "job", "list",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    assert!(
        text(&out.stderr).contains("auth.allowed_clients"),
        "{}",
        explain(&out)
    );

    let plain = d.base.replace("https://", "http://");
    let out = cli(&plain, &["job", "list"]);
    assert_ne!(out.status.code(), Some(0), "{}", explain(&out));
    assert!(text(&out.stderr).contains("https://"), "{}", explain(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_token_file_and_env_work_and_401_says_what_to_send() {
    let dir = tempfile::tempdir().unwrap();
    let token = "cli-test-token-0123456789abcdef0123456789";
    std::fs::write(dir.path().join("tokens"), format!("ops:{token}\n")).unwrap();
    std::fs::write(dir.path().join("my-token"), format!("# mine\n{token}\n")).unwrap();
    let config = TestConfig::new(dir.path()).set(
        "auth.tokens_file",
        dir.path().join("tokens").display().to_string(),
    );
    let d = Daemon::start(dir.path(), &config);
    let file = dir.path().join("my-token").display().to_string();
    let out = cli(&d.base, &["--token-file", &file, "job", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let out = cli_env(&d.base, &["job", "list"], &[("LVP_TOKEN", token)]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let out = cli(&d.base, &["job", "list"]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("--token-file"),
        "{stderr}"
    );
    // Open routes stay open.
    let out = cli(&d.base, &["health"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
}

/// An HTTP source that sends `bytes_per_sec`: nginx behind a throttling proxy.
fn slow_source(dir: &Path, bytes_per_sec: u64) -> (Nginx, u16) {
    let root = dir.join("images").display().to_string();
    let nginx = Nginx::start(
        &dir.join("nginx"),
        &format!("server {{ listen 127.0.0.1:{{port}}; root {root}; }}"),
    );
    let proxy = throttled_proxy(nginx.port, bytes_per_sec);
    (nginx, proxy)
}

/// Reads a progress stream to its end: `(id, StatusResponse)` of every event.
async fn read_events(resp: reqwest::Response) -> Vec<(String, Value, Instant)> {
    use eventsource_stream::Eventsource;
    let mut events = Vec::new();
    let mut stream = resp.bytes_stream().eventsource();
    while let Some(e) = stream.next().await {
        let e = e.unwrap();
        events.push((
            e.id.clone(),
            serde_json::from_str(&e.data).unwrap(),
            Instant::now(),
        ));
    }
    events
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_stream_follows_a_job_to_its_end_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    raw_image(dir.path(), "slow.raw", 8);
    let (_nginx, proxy) = slow_source(dir.path(), 4 << 20);
    let config = TestConfig::new(dir.path()).set(
        "sources.allowed_hosts",
        toml::Value::Array(vec![format!("127.0.0.1:{proxy}").into()]),
    );
    let d = Daemon::start(dir.path(), &config);
    let c = client();
    let id = submit(
        &c,
        &d,
        json!({"image_url": format!("http://127.0.0.1:{proxy}/slow.raw"), "image_type": "raw",
               "volume_name": "vm-sse", "volume_size_gb": 1}),
    )
    .await;
    let resp = c
        .get(d.url(&format!("/api/v1/jobs/{id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = tokio::time::timeout(Duration::from_secs(120), read_events(resp))
        .await
        .expect("the stream ends after the terminal event");
    let statuses: Vec<&str> = events
        .iter()
        .map(|(_, v, _)| v["status"].as_str().unwrap())
        .collect();
    println!("{} events: {statuses:?}", events.len());
    assert!(
        events.len() >= 5,
        "events arrive while the job runs: {statuses:?}"
    );
    assert_eq!(*statuses.last().unwrap(), "completed");
    assert_eq!(statuses.iter().filter(|s| **s == "completed").count(), 1);
    let mut percent = -1.0;
    let mut previous_id = 0i64;
    for (i, (eid, v, at)) in events.iter().enumerate() {
        let p = v["progress"]["percent"].as_f64().unwrap();
        assert!(p >= percent, "percent went from {percent} to {p}");
        percent = p;
        let eid: i64 = eid.parse().unwrap();
        assert!(eid > previous_id, "ids increase");
        previous_id = eid;
        // Throttled: progress events of one state at most ~4/s.
        if i > 0 && events[i - 1].1["status"] == v["status"] {
            let gap = at.duration_since(events[i - 1].2);
            assert!(gap >= Duration::from_millis(150), "events {gap:?} apart");
        }
    }
    // Resume: with the last id, a finished job has nothing new; with an older id it sends
    // its final state at once.
    let (last_id, ..) = events.last().unwrap();
    let resp = c
        .get(d.url(&format!("/api/v1/jobs/{id}/events")))
        .header("last-event-id", last_id)
        .send()
        .await
        .unwrap();
    assert!(read_events(resp).await.is_empty());
    let resp = c
        .get(d.url(&format!("/api/v1/jobs/{id}/events")))
        .header("last-event-id", &events[0].0)
        .send()
        .await
        .unwrap();
    let again = read_events(resp).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1["status"], "completed");
    // Unknown and malformed ids.
    let (s, _) = get(
        &c,
        &d.url("/api/v1/jobs/00000000-0000-0000-0000-000000000000/events"),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = get(&c, &d.url("/api/v1/jobs/nope/events")).await;
    assert_eq!(s, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_streams_need_credentials_and_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let token = "sse-test-token-0123456789abcdef0123456789";
    std::fs::write(dir.path().join("tokens"), format!("ops:{token}\n")).unwrap();
    let image = raw_image(dir.path(), "r.raw", 1);
    let config = TestConfig::new(dir.path())
        .set(
            "auth.tokens_file",
            dir.path().join("tokens").display().to_string(),
        )
        .set("server.max_event_streams", 3)
        .set("server.max_event_streams_per_peer", 2);
    let path = slow_qemu_img_path(dir.path(), 30);
    let d = Daemon::start_with_env(dir.path(), &config, &[("PATH", &path)]);
    let c = client();
    let authed = |r: reqwest::RequestBuilder| r.bearer_auth(token);
    let r = authed(c.post(d.url("/api/v1/jobs")))
        .json(&json!({"image_url": file_url(&image), "image_type": "raw",
                      "volume_name": "vm-b", "volume_size_gb": 1}))
        .send()
        .await
        .unwrap();
    let id = accepted_job(r).await;
    let events = d.url(&format!("/api/v1/jobs/{id}/events"));
    let r = c.get(&events).send().await.unwrap();
    assert_eq!(r.status(), 401, "unauthenticated streams are refused");
    let first = authed(c.get(&events)).send().await.unwrap();
    let second = authed(c.get(&events)).send().await.unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    // A third from the same address: the per-peer bound.
    let refused = |r: reqwest::Response, setting: &'static str| async move {
        assert_eq!(r.status(), 429);
        assert!(r.headers().contains_key("retry-after"));
        let body: Value = r.json().await.unwrap();
        let message = body["message"].as_str().unwrap().to_string();
        assert!(message.contains(setting), "{message}");
    };
    let third = authed(c.get(&events)).send().await.unwrap();
    refused(third, "server.max_event_streams_per_peer").await;
    // Another client address (the loopback /8) still gets one, up to the overall bound.
    let from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let other = authed(from("127.0.0.2").get(&events)).send().await.unwrap();
    assert_eq!(other.status(), 200, "another peer is not held back");
    let fourth = authed(from("127.0.0.3").get(&events)).send().await.unwrap();
    refused(fourth, "server.max_event_streams)").await;
    drop(first);
    // The closed stream's place comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = authed(c.get(&events)).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a closed stream's slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An idle stream gets heartbeat comments (every 15 s) between events.
    let mut body = second.bytes_stream();
    let started = Instant::now();
    let mut seen = String::new();
    let heartbeat = tokio::time::timeout(Duration::from_secs(25), async {
        while let Some(chunk) = body.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if seen.starts_with(':') || seen.contains("\n:") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(heartbeat, Ok(true), "no heartbeat in 25 s: {seen}");
    println!("heartbeat after {:?}", started.elapsed());
    drop(other);
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_key_returns_the_same_job_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path(), "r.raw", 1);
    let config = TestConfig::new(dir.path());
    let body = json!({"image_url": file_url(&image), "image_type": "raw",
                      "volume_name": "vm-i", "volume_size_gb": 1});
    let c = client();
    let post_with_key = |d: &Daemon, key: &str, body: &Value| {
        c.post(d.url("/api/v1/jobs"))
            .header("idempotency-key", key)
            .json(body)
            .send()
    };
    let d = Daemon::start(dir.path(), &config);
    let r = post_with_key(&d, "order-42", &body).await.unwrap();
    let id = accepted_job(r).await;
    let r = post_with_key(&d, "order-42", &body).await.unwrap();
    assert_eq!(r.status(), 200, "a retry gets the existing job");
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.json::<Value>().await.unwrap()["job_id"], id.as_str());
    wait_job(&c, &d, &id, Duration::from_secs(60)).await;
    d.stop();

    let d = Daemon::start(dir.path(), &config);
    let r = post_with_key(&d, "order-42", &body).await.unwrap();
    assert_eq!(r.status(), 200, "the key survived the restart");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["job_id"], id.as_str());
    assert_eq!(v["status"], "completed");
    let mut other = body.clone();
    other["volume_name"] = json!("vm-other");
    let r = post_with_key(&d, "order-42", &other).await.unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains(&id), "{v}");
    let (_, list) = get(&c, &d.url("/api/v1/jobs")).await;
    assert_eq!(list["count"], 1, "no second job: {list}");
    // Keys are bounded and plain: too long, not visible ASCII, or sent twice is a 400.
    let long = "k".repeat(256);
    for bad in [long.as_str(), "has space", "caf\u{e9}"] {
        let r = c
            .post(d.url("/api/v1/jobs"))
            .header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            )
            .json(&other)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "key {bad:?}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["message"].as_str().unwrap().contains("Idempotency-Key"),
            "{v}"
        );
    }
    let r = c
        .post(d.url("/api/v1/jobs"))
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .json(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a repeated header is refused");
    let ok = "k".repeat(255);
    let r = post_with_key(
        &d,
        &ok,
        &json!({"image_url": file_url(&image), "image_type": "raw",
                                            "volume_name": "vm-long", "volume_size_gb": 1}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 202, "255 characters are fine");
    let long_job = accepted_job(r).await;
    wait_job(&c, &d, &long_job, Duration::from_secs(60)).await;
    // Racing retries with one key make one job: the others get it (200) or are told to retry (409).
    let race = json!({"image_url": file_url(&image), "image_type": "raw",
                      "volume_name": "vm-race", "volume_size_gb": 1});
    let answers =
        futures::future::join_all((0..8).map(|_| post_with_key(&d, "race-1", &race))).await;
    let mut ids = std::collections::HashSet::new();
    let mut statuses = Vec::new();
    for r in answers {
        let r = r.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        statuses.push(status);
        match status {
            202 | 200 => {
                ids.insert(v["job_id"].as_str().unwrap().to_string());
            }
            409 => assert!(
                v["message"].as_str().unwrap().contains("Idempotency-Key"),
                "{v}"
            ),
            other => panic!("unexpected {other}: {v}"),
        }
    }
    statuses.sort();
    println!("8 racing requests with one key: {statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(ids.len(), 1, "one job: {ids:?}");
    let (_, list) = get(&c, &d.url("/api/v1/jobs")).await;
    assert_eq!(
        list["count"], 3,
        "order-42, the long key and the race: {list}"
    );
    // The CLI sends a key of its own; the same explicit key gets the same job.
    let url = file_url(&image);
    let args = [
        "--output",
        "json",
        "cache",
        "fetch",
        url.as_str(),
        "--image-type",
        "raw",
        "--idempotency-key",
        "prefetch-1",
    ];
    let a = json_of(&cli(&d.base, &args));
    let b = json_of(&cli(&d.base, &args));
    assert_eq!(a["job_id"], b["job_id"]);
    let (s, _) = post(
        &c,
        &d.url("/api/v1/cache/fetch"),
        &json!({"image_url": url}),
    )
    .await;
    assert!(s == 202 || s == 409, "without a key, a new job: {s}");
}

/// The schema of `path`/`method`/`status` in the document, ready to validate.
fn response_schema(doc: &Value, path: &str, method: &str, status: u16) -> jsonschema::Validator {
    let reference = &doc["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]
        ["schema"];
    assert!(
        reference.is_object(),
        "{method} {path} {status} is not documented"
    );
    let mut schema = reference.clone();
    schema["components"] = doc["components"].clone();
    jsonschema::validator_for(&schema).unwrap()
}

fn assert_valid(doc: &Value, path: &str, method: &str, status: u16, body: &Value) {
    let validator = response_schema(doc, path, method, status);
    let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status}: {errors:?}\n{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_document_covers_real_responses() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &TestConfig::new(dir.path()));
    let c = client();
    let (s, doc) = get(&c, &d.url("/api/v1/openapi.json")).await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let image = dir.path().join("images/a.qcow2");
    make_qcow2(&image, "64M");
    let url = file_url(&image);
    let check = |path: &str, method: &str, status: u16, body: &Value| {
        assert_valid(&doc, path, method, status, body)
    };

    let (s, v) = get(&c, &d.url("/health")).await;
    check("/health", "get", s, &v);
    let (s, v) = get(&c, &d.url("/readyz")).await;
    check("/readyz", "get", s, &v);
    let body = json!({"image_url": url, "volume_name": "vm-o", "volume_size_gb": 1,
                      "correlation_id": "openapi"});
    let (s, v) = post(&c, &d.url("/api/v1/jobs"), &body).await;
    check("/api/v1/jobs", "post", s, &v);
    let id = v["job_id"].as_str().unwrap().to_string();
    let (s, v) = get(&c, &d.url(&format!("/api/v1/jobs/{id}"))).await;
    check("/api/v1/jobs/{id}", "get", s, &v);
    let done = wait_job(&c, &d, &id, Duration::from_secs(60)).await;
    check("/api/v1/jobs/{id}", "get", 200, &done);
    let (s, v) = get(&c, &d.url(&format!("/api/v1/status/{id}"))).await;
    check("/api/v1/status/{id}", "get", s, &v);
    let (s, v) = get(&c, &d.url("/api/v1/jobs?limit=10")).await;
    check("/api/v1/jobs", "get", s, &v);
    let (s, v) = post(&c, &d.url(&format!("/api/v1/jobs/{id}/cancel")), &json!({})).await;
    check("/api/v1/jobs/{id}/cancel", "post", s, &v);
    let (s, v) = post(&c, &d.url("/api/v1/jobs"), &json!({"volume_name": "x"})).await;
    check("/api/v1/jobs", "post", s, &v);
    let (s, v) = post(&c, &d.url("/api/v1/jobs"), &body).await;
    check("/api/v1/jobs", "post", s, &v);
    let again = v["job_id"].as_str().unwrap().to_string();
    let (s, v) = post(&c, &d.url("/api/v1/jobs"), &body).await;
    assert_eq!(s, 409, "the volume is busy with the job just queued: {v}");
    check("/api/v1/jobs", "post", s, &v);
    wait_job(&c, &d, &again, Duration::from_secs(60)).await;
    // A cancel of a pending job: a second job queued behind one that waits.
    let (s, v) = post(
        &c,
        &d.url("/api/v1/cache/fetch"),
        &json!({"image_url": url}),
    )
    .await;
    check("/api/v1/cache/fetch", "post", s, &v);
    let (s, v) = get(&c, &d.url("/api/v1/cache/images")).await;
    check("/api/v1/cache/images", "get", s, &v);
    let key = v["images"][0]["key"].as_str().unwrap().to_string();
    let (s, v) = post(
        &c,
        &d.url("/api/v1/images/inspect"),
        &json!({"image_url": url}),
    )
    .await;
    check("/api/v1/images/inspect", "post", s, &v);
    let (s, v) = post(
        &c,
        &d.url("/api/v1/images/inspect"),
        &json!({"image_url": "https://x.example/y"}),
    )
    .await;
    check("/api/v1/images/inspect", "post", s, &v);
    let (s, v) = get(&c, &d.url("/api/v1/config")).await;
    check("/api/v1/config", "get", s, &v);
    let r = c
        .put(d.url("/api/v1/volumes/vm-o-cidata/content"))
        .header("content-type", "application/octet-stream")
        .body(vec![7u8; 4096])
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    check(
        "/api/v1/volumes/{name}/content",
        "put",
        s,
        &r.json().await.unwrap(),
    );
    let (s, v) = delete(&c, &d.url("/api/v1/volumes/vm-o-cidata")).await;
    check("/api/v1/volumes/{name}", "delete", s, &v);
    let (s, v) = delete(&c, &d.url("/api/v1/volumes/vm-o")).await;
    check("/api/v1/volumes/{name}", "delete", s, &v);
    // The fetch job may still hold the entry: 200 or 409, both documented.
    wait_until(&c, &d, &id, Duration::from_secs(5), |_| true).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (s, v) = delete(&c, &d.url(&format!("/api/v1/cache/images/{key}"))).await;
    check("/api/v1/cache/images/{key}", "delete", s, &v);
    let (s, v) = delete(&c, &d.url("/api/v1/cache/images/nothex")).await;
    check("/api/v1/cache/images/{key}", "delete", s, &v);
    let (s, v) = get(&c, &d.url("/api/v1/jobs/not-a-uuid")).await;
    check("/api/v1/jobs/{id}", "get", s, &v);
    let (s, v) = delete(&c, &d.url(&format!("/api/v1/cancel/{id}"))).await;
    check("/api/v1/cancel/{id}", "delete", s, &v);
    println!(
        "the document has {} paths; every checked response validated",
        doc["paths"].as_object().unwrap().len()
    );
}

/// The document against the router itself: every documented operation, sent to the daemon,
/// is handled by the route of that template (the `endpoint` label of `requests_total` names
/// the route that answered), and every other method on a documented path is 405.
#[tokio::test(flavor = "multi_thread")]
async fn openapi_operations_are_the_routes_the_daemon_serves() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &TestConfig::new(dir.path()));
    let c = client();
    let (_, doc) = get(&c, &d.url("/api/v1/openapi.json")).await;
    let concrete = |template: &str| {
        template
            .replace("{id}", "00000000-0000-0000-0000-000000000000")
            .replace("{key}", &"0".repeat(64))
            .replace("{name}", "route-check")
    };
    let mut operations = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "delete", "patch"] {
            let url = d.url(&concrete(path));
            let verb = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let mut r = c.request(verb, &url);
            if method != "get" && method != "delete" {
                r = r.header("content-type", "application/json").body("{}");
            }
            let resp = r.send().await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            if ops.get(method).is_some() {
                assert!(
                    status != 405 && !body.contains("no such route"),
                    "{method} {path} is documented but the daemon has no such route: {status} {body}"
                );
                operations.push((method.to_uppercase(), path.clone()));
            } else {
                assert_eq!(
                    status, 405,
                    "{method} {path} is routed but not documented: {body}"
                );
            }
        }
    }
    let metrics = reqwest::get(d.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (method, path) in &operations {
        // The Go service's aliases of /health are one route.
        let template = if ["/healthz", "/livez"].contains(&path.as_str()) {
            "/health"
        } else {
            path
        };
        let label = format!("method=\"{method}\"");
        let endpoint = format!("endpoint=\"{template}\"");
        assert!(
            metrics.lines().any(|l| l.contains("requests_total{")
                && l.contains(&label)
                && l.contains(&endpoint)),
            "{method} {path} was not answered by the route {template}"
        );
    }
    assert!(operations.len() >= 22, "{operations:?}");
    println!(
        "{} documented operations, each answered by its own route",
        operations.len()
    );
    assert!(volumes_in(dir.path()).is_empty(), "the probes made nothing");
}

/// `HEAD` on every documented GET path answers as the GET does, without a body; a method a
/// documented path does not take is 405 with `Allow` naming exactly the documented methods
/// (and HEAD beside GET). Both come from the route table (`api/routes`).
#[tokio::test(flavor = "multi_thread")]
async fn head_and_allow_follow_the_route_table() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &TestConfig::new(dir.path()));
    let c = client();
    let (_, doc) = get(&c, &d.url("/api/v1/openapi.json")).await;
    let concrete = |template: &str| {
        template
            .replace("{id}", "00000000-0000-0000-0000-000000000000")
            .replace("{key}", &"0".repeat(64))
            .replace("{name}", "allow-check")
    };
    let mut heads = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let url = d.url(&concrete(path));
        let mut documented: Vec<String> = ops
            .as_object()
            .unwrap()
            .keys()
            .map(|m| m.to_uppercase())
            .collect();
        if ops.get("get").is_some() {
            // (The progress stream's GET answers 404 at once here: there is no such job.)
            let got = c.get(&url).send().await.unwrap();
            let (get_status, get_type) = (got.status(), got.headers().get("content-type").cloned());
            let head = c.head(&url).send().await.unwrap();
            assert_eq!(head.status(), get_status, "HEAD {path}");
            assert_eq!(
                head.headers().get("content-type"),
                get_type.as_ref(),
                "HEAD {path}"
            );
            assert!(
                head.bytes().await.unwrap().is_empty(),
                "HEAD {path} has a body"
            );
            documented.push("HEAD".into());
            heads += 1;
        }
        documented.sort();
        let r = c
            .request(reqwest::Method::OPTIONS, &url)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "OPTIONS {path}");
        let allow = r.headers()["allow"].to_str().unwrap().to_string();
        let mut allowed: Vec<String> = allow.split(", ").map(String::from).collect();
        allowed.sort();
        assert_eq!(allowed, documented, "Allow of {path}: {allow}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["reason"], "method_not_allowed", "{path}");
    }
    assert!(heads >= 12, "{heads} GET paths");
    // HEAD on a path with no GET is 405 too, and names the methods it has.
    let r = c.head(d.url("/api/v1/cache/fetch")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_reads_only_the_header_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    // A 48 MiB dense qcow2 and a 48 MiB raw image, served by nginx.
    make_dense_qcow2(&images.join("big.qcow2"), 48 << 20, 1 << 30, 3);
    raw_image(dir.path(), "big.raw", 48);
    let backing = hostile_qcow2(&dir.path().join("images"), Hostile::BackingFile);
    let nginx = Nginx::start(
        &dir.path().join("nginx"),
        &format!(
            "server {{ listen 127.0.0.1:{{port}}; root {}; }}",
            images.display()
        ),
    );
    let config = TestConfig::new(dir.path()).set(
        "sources.allowed_hosts",
        toml::Value::Array(vec![format!("127.0.0.1:{}", nginx.port).into()]),
    );
    let d = Daemon::start(dir.path(), &config);
    let c = client();
    let inspect = |body: Value| {
        let c = c.clone();
        let url = d.url("/api/v1/images/inspect");
        async move {
            let (s, v) = post(&c, &url, &body).await;
            assert_eq!(s, 200, "{v}");
            v
        }
    };
    let v = inspect(json!({"image_url": nginx.url("/big.qcow2")})).await;
    assert_eq!(
        (v["accepted"].as_bool(), v["format"].as_str()),
        (Some(true), Some("qcow2")),
        "{v}"
    );
    assert_eq!(v["virtual_size"], 1u64 << 30);
    assert_eq!(v["cache"], "absent");
    let size = std::fs::metadata(images.join("big.qcow2")).unwrap().len();
    assert_eq!(v["size"], size);
    let v = inspect(json!({"image_url": nginx.url("/big.raw"), "image_type": "raw"})).await;
    assert_eq!(
        (v["accepted"].as_bool(), v["format"].as_str()),
        (Some(true), Some("raw")),
        "{v}"
    );
    assert_eq!(v["virtual_size"], 48u64 << 20);
    let v = inspect(json!({"image_url": nginx.url("/big.raw")})).await;
    assert_eq!(v["accepted"], false, "raw declared as qcow2: {v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("image_type is qcow2 but the image is raw")
    );
    // Bytes at the server: headers plus at most the inspector's 2 MiB per image (and, for
    // the raw image, its last 512 bytes: a fixed VHD has its footer only there).
    for name in ["/big.qcow2", "/big.raw"] {
        let sent = nginx.bytes_sent(nginx.port, name);
        println!("{name}: nginx sent {sent} bytes for the preflights");
        assert!(sent <= 2 * ((2 << 20) + 4096), "{name}: {sent} bytes sent");
        for line in nginx.gets(nginx.port, name) {
            assert!(line.contains("bytes="), "every GET is ranged: {line}");
        }
    }
    // Hostile cases, each with its reason.
    let v = inspect(json!({"image_url": file_url(&backing)})).await;
    assert_eq!(v["accepted"], false);
    assert!(
        v["reason"].as_str().unwrap().contains("backing file"),
        "{v}"
    );
    std::fs::write(images.join("empty.raw"), b"").unwrap();
    let v = inspect(json!({"image_url": file_url(&images.join("empty.raw")), "image_type": "raw"}))
        .await;
    assert!(v["reason"].as_str().unwrap().contains("empty"), "{v}");
    let truncated = hostile_qcow2(&images, Hostile::Truncated);
    let v = inspect(json!({"image_url": file_url(&truncated)})).await;
    assert!(v["reason"].as_str().unwrap().contains("truncated"), "{v}");
    let v = inspect(json!({"image_url": "https://169.254.169.254/latest/meta-data"})).await;
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("sources.allowed_hosts"),
        "{v}"
    );
    let v = inspect(json!({"image_url": nginx.url("/missing.qcow2")})).await;
    assert!(v["reason"].as_str().unwrap().contains("not found"), "{v}");
    let v = inspect(json!({"image_url": "file:///etc/passwd"})).await;
    assert!(
        v["reason"].as_str().unwrap().contains("sources.file_roots"),
        "{v}"
    );
    let (s, _) = post(
        &c,
        &d.url("/api/v1/images/inspect"),
        &json!({"image_type": "raw"}),
    )
    .await;
    assert_eq!(s, 400, "a malformed request is 400");
    // Nothing was made: no volume, no cache entry, no job.
    assert!(volumes_in(dir.path()).is_empty());
    let (_, cache) = get(&c, &d.url("/api/v1/cache/images")).await;
    assert_eq!(cache["count"], 0);
    let (_, jobs) = get(&c, &d.url("/api/v1/jobs")).await;
    assert_eq!(jobs["count"], 0);
    // Once cached, the answer comes from the cache entry without reading the source.
    let id = submit(
        &c,
        &d,
        json!({"image_url": nginx.url("/big.raw"), "image_type": "raw",
                                   "volume_name": "vm-p", "volume_size_gb": 1}),
    )
    .await;
    wait_job(&c, &d, &id, Duration::from_secs(120)).await;
    let before = nginx.gets(nginx.port, "/big.raw").len();
    let v = inspect(json!({"image_url": nginx.url("/big.raw"), "image_type": "raw"})).await;
    assert_eq!(
        (v["cache"].as_str(), v["bytes_read"].as_u64()),
        (Some("cached"), Some(0)),
        "{v}"
    );
    assert_eq!(nginx.gets(nginx.port, "/big.raw").len(), before);
    // The CLI's inspect exits non-zero for a refused image, with the reason on stderr.
    let out = cli(&d.base, &["image", "inspect", &file_url(&backing)]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    assert!(text(&out.stderr).contains("backing file"));
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_round_trip_into_new_volumes_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig::new(dir.path())
        .set("volumes.upload_max_bytes", 1 << 20)
        .set("volumes.upload_max_concurrent", 1);
    let d = Daemon::start(dir.path(), &config);
    let c = client();
    let seed = random_bytes(300_000, 9);
    let file = dir.path().join("seed.iso");
    std::fs::write(&file, &seed).unwrap();
    let out = cli(
        &d.base,
        &["volume", "upload", "vm1-cidata", file.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let written = std::fs::read(dir.path().join("volumes/vm1-cidata")).unwrap();
    assert_eq!(written.len(), seed.len());
    assert!(written == seed, "bytes round-trip");
    let put = |name: &str, body: Vec<u8>| {
        c.put(d.url(&format!("/api/v1/volumes/{name}/content")))
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
    };
    let r = put("vm1-cidata", seed.clone()).await.unwrap();
    assert_eq!(r.status(), 409, "an existing volume is not overwritten");
    assert!(std::fs::read(dir.path().join("volumes/vm1-cidata")).unwrap() == seed);
    let r = put("vm1-root", seed.clone()).await.unwrap();
    assert_eq!(r.status(), 403);
    let r = put("bad%20name-cidata", seed.clone()).await.unwrap();
    assert_eq!(r.status(), 400, "the volume name rules apply");
    // Too large: refused from the declared length, before any byte of the body is read.
    assert_eq!(raw_put_status(&d, "big-cidata", (1 << 20) + 1), 413);
    let r = c
        .put(d.url("/api/v1/volumes/sum-cidata/content"))
        .header("content-type", "application/octet-stream")
        .header("x-content-sha256", sha256_hex(b"something else"))
        .body(seed.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let r = c
        .put(d.url("/api/v1/volumes/sum-cidata/content"))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(vec![
            Ok::<_, std::io::Error>(bytes::Bytes::from(seed.clone())),
        ])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 411, "chunked, no Content-Length");
    let r = put("json-cidata", seed.clone()).await.unwrap();
    assert_eq!(r.status(), 201);
    let r = c
        .put(d.url("/api/v1/volumes/type-cidata/content"))
        .header("content-type", "text/plain")
        .body(seed.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let mut left = volumes_in(dir.path());
    left.sort();
    assert_eq!(
        left,
        ["json-cidata", "vm1-cidata"],
        "refused uploads left nothing"
    );

    // A client that goes away mid-body leaves no volume.
    let addr = d.base.trim_start_matches("http://").to_string();
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        sock,
        "PUT /api/v1/volumes/cut-cidata/content HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 500000\r\n\r\n"
    )
    .unwrap();
    sock.write_all(&seed[..100_000]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !volumes_in(dir.path()).contains(&"cut-cidata".to_string()) {
        assert!(
            Instant::now() < deadline,
            "the upload never started: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // While it runs, a second upload is refused (volumes.upload_max_concurrent = 1).
    let r = put("second-cidata", seed.clone()).await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("volumes.upload_max_concurrent"),
        "{v}"
    );
    assert!(!volumes_in(dir.path()).contains(&"second-cidata".to_string()));
    drop(sock);
    let deadline = Instant::now() + Duration::from_secs(20);
    while volumes_in(dir.path()).contains(&"cut-cidata".to_string()) {
        assert!(
            Instant::now() < deadline,
            "a dropped upload left its volume: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its place came back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = put("second-cidata", seed.clone()).await.unwrap();
        if r.status() == 201 {
            break;
        }
        assert_eq!(r.status(), 429);
        assert!(Instant::now() < deadline, "the upload slot never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client trickling its body just inside the idle timeout is cut off once the whole body is
/// overdue (server.body_timeout plus 64 KiB/s), and its volume goes.
#[tokio::test(flavor = "multi_thread")]
async fn uploads_that_trickle_are_abandoned() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let config = TestConfig::new(dir.path()).set("server.body_timeout", "2s");
    let d = Daemon::start(dir.path(), &config);
    // 200 000 bytes may take 2 s + 4 s; at 2 KB/s they would take 100 s.
    let sock = put_head(&d, "slow-cidata", 200_000);
    let started = Instant::now();
    let mut writer = sock.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        while started.elapsed() < Duration::from_secs(40) {
            if writer.write_all(&[7u8; 1000]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let mut line = String::new();
    std::io::BufReader::new(sock).read_line(&mut line).unwrap();
    let took = started.elapsed();
    println!("trickled upload answered after {took:?}: {}", line.trim());
    assert!(line.contains(" 408 "), "{line}");
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(20),
        "{took:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while volumes_in(dir.path()).contains(&"slow-cidata".to_string()) {
        assert!(
            Instant::now() < deadline,
            "the abandoned upload left its volume"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = trickle.join();
}

/// A connection that has sent the head of an upload of `length` bytes into volume `name`, and
/// no body yet (answers are awaited for 30 s at most).
fn put_head(d: &Daemon, name: &str, length: u64) -> std::net::TcpStream {
    let addr = d.base.trim_start_matches("http://").to_string();
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        sock,
        "PUT /api/v1/volumes/{name}/content HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
    )
    .unwrap();
    sock
}

/// The status line's code of a PUT that declares `length` bytes and sends none of them.
fn raw_put_status(d: &Daemon, name: &str, length: u64) -> u16 {
    use std::io::BufRead;
    let sock = put_head(d, name, length);
    let mut line = String::new();
    std::io::BufReader::new(sock).read_line(&mut line).unwrap();
    line.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0)
}

/// A daemon allowed to download from a slow source (`slow_source` at `bytes_per_sec`) serving
/// `name`, a raw image of `mib` MiB of random bytes; the source's URL of it.
fn daemon_with_slow_image(
    dir: &Path,
    name: &str,
    mib: usize,
    bytes_per_sec: u64,
) -> (Daemon, Nginx, String) {
    raw_image(dir, name, mib);
    let (nginx, proxy) = slow_source(dir, bytes_per_sec);
    let config = TestConfig::new(dir).set(
        "sources.allowed_hosts",
        toml::Value::Array(vec![format!("127.0.0.1:{proxy}").into()]),
    );
    let d = Daemon::start(dir, &config);
    (d, nginx, format!("http://127.0.0.1:{proxy}/{name}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_bar_in_a_real_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _nginx, url) = daemon_with_slow_image(dir.path(), "tty.raw", 16, 3 << 20);
    let terminal = Terminal::start(
        dir.path(),
        "tty",
        (120, 30),
        &format!(
            "unset NO_COLOR\nexport LVP_SERVER_URL={}\n{BIN} provision --image-url {url} \
             --image-type raw --volume vm-tty --size-gb 1 --wait",
            d.base
        ),
    );
    let mut bar_frame = None;
    let exit = terminal.wait_done(Instant::now() + Duration::from_secs(120), |frame| {
        // A frame well into the download, when the bar also shows a rate.
        let percent_now = frame
            .lines()
            .find(|l| l.contains("downloading ["))
            .and_then(|l| l.split(']').nth(1))
            .and_then(|rest| rest.trim().split('%').next())
            .and_then(|p| p.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if bar_frame.is_none()
            && percent_now >= 20.0
            && frame.contains("/s")
            && frame.contains("downloading")
            && frame.contains("[=")
            && frame.contains('%')
            && frame.contains("MiB")
        {
            bar_frame = Some(frame);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let last = terminal.capture();
    drop(terminal);
    let bar = bar_frame.expect("a frame showed the bar with stage and percent");
    println!("--- a frame while downloading ---\n{}", bar.trim_end());
    println!("--- the last frame ---\n{}", last.trim_end());
    assert!(exit.contains("exit=0"));
    let final_line = last
        .lines()
        .filter(|l| !l.trim().is_empty())
        .rfind(|l| !l.contains("exit="))
        .unwrap_or("");
    assert!(
        final_line.contains("completed"),
        "last line: {final_line}\n{last}"
    );
}

/// With `NO_COLOR` set, a terminal gets plain progress lines, not the bar.
#[tokio::test(flavor = "multi_thread")]
async fn no_color_on_a_terminal_prints_plain_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _nginx, url) = daemon_with_slow_image(dir.path(), "nc.raw", 4, 2 << 20);
    let terminal = Terminal::start(
        dir.path(),
        "nc",
        (160, 40),
        &format!(
            "export NO_COLOR=1 LVP_SERVER_URL={}\n{BIN} provision --image-url {url} \
             --image-type raw --volume vm-nc --size-gb 1 --wait",
            d.base
        ),
    );
    let mut frames = Vec::new();
    let exit = terminal.wait_done(Instant::now() + Duration::from_secs(60), |frame| {
        frames.push(frame)
    });
    let last = terminal.capture();
    println!("--- NO_COLOR on a terminal ---\n{}", last.trim_end());
    assert!(exit.contains("exit=0"));
    assert!(
        frames.iter().all(|f| !f.contains("[=")),
        "no bar with NO_COLOR:\n{last}"
    );
    assert!(last.contains(": running downloading"), "{last}");
    assert!(last.contains("completed: volume"), "{last}");
}

/// Ctrl-C on a terminal asks before cancelling; `n` keeps following, `y` cancels.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_in_a_terminal_asks_before_cancelling() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path(), "r.raw", 1);
    let path = slow_qemu_img_path(dir.path(), 60);
    let d = Daemon::start_with_env(dir.path(), &TestConfig::new(dir.path()), &[("PATH", &path)]);
    // The shell survives the terminal's SIGINT (a handler, which the CLI does not inherit).
    let terminal = Terminal::start(
        dir.path(),
        "int",
        (120, 30),
        &format!(
            "trap 'true' INT\nunset NO_COLOR\nexport LVP_SERVER_URL={}\n{BIN} provision --image-url \
             {} --image-type raw --volume vm-ask --size-gb 1 --wait",
            d.base,
            file_url(&image),
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    terminal.wait_for("converting", deadline);
    terminal.keys(&["C-c"]);
    terminal.wait_for("[y/N]", deadline);
    terminal.keys(&["n", "Enter"]);
    terminal.wait_for("still following", deadline);
    let c = client();
    let (_, list) = get(&c, &d.url("/api/v1/jobs?status=running")).await;
    assert_eq!(list["count"], 1, "answered no: the job runs on: {list}");
    terminal.keys(&["C-c"]);
    std::thread::sleep(Duration::from_millis(500));
    terminal.keys(&["y", "Enter"]);
    let exit = terminal.wait_done(deadline, |_| {});
    let last = terminal.capture();
    println!("--- after answering y ---\n{}", last.trim_end());
    assert!(exit.contains("exit=3"), "{last}");
    assert!(last.contains("cancel requested"), "{last}");
    let (_, list) = get(&c, &d.url("/api/v1/jobs?status=cancelled")).await;
    assert_eq!(list["count"], 1, "{list}");
    assert!(!volumes_in(dir.path()).contains(&"vm-ask".to_string()));
}
