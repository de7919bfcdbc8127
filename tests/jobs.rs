//! Job semantics against the real binary: legacy routes, request validation (a bad request
//! never becomes a job), cancel, queue limits, per-volume locks, and durability across
//! SIGKILL and restart.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

async fn job_count(c: &reqwest::Client, d: &Daemon) -> u64 {
    let (status, v) = get(c, &d.url("/api/v1/jobs?limit=1000")).await;
    assert_eq!(status, 200);
    v["count"].as_u64().unwrap()
}

fn image(dir: &std::path::Path) -> String {
    let p = dir.join("images/small.qcow2");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    if !p.exists() {
        make_qcow2(&p, "8M");
    }
    file_url(&p)
}

#[tokio::test]
async fn legacy_routes_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    let url = image(dir);
    for (i, route) in ["/api/v1/jobs", "/api/v1/provision", "/provision"]
        .iter()
        .enumerate()
    {
        let body =
            json!({"image_url": url, "volume_name": format!("legacy-{i}"), "volume_size_gb": 1});
        let r = c.post(d.url(route)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 202, "{route}");
        let location = r.headers()["location"].to_str().unwrap().to_string();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], "pending");
        let id = v["job_id"].as_str().unwrap().to_string();
        assert_eq!(location, format!("/api/v1/jobs/{id}"));
        let done = wait_job(&c, &d, &id, MINUTE).await;
        assert_eq!(done["status"], "completed", "{done}");
        let (status, legacy) = get(&c, &d.url(&format!("/api/v1/status/{id}"))).await;
        assert_eq!(status, 200);
        assert_eq!(legacy["job_id"], id);
        assert_eq!(legacy["progress"]["overall_percent"], 100.0);
        // Cancelling a finished job is refused with the contract's message, on both routes.
        let (status, e) = post(&c, &d.url(&format!("/api/v1/jobs/{id}/cancel")), &json!({})).await;
        assert_eq!(status, 400);
        assert_eq!(e["message"], "cannot cancel job in 'completed' status");
        let (status, e) = delete(&c, &d.url(&format!("/api/v1/cancel/{id}"))).await;
        assert_eq!(status, 400, "{e}");
        assert_eq!(e["code"], 400);
    }
    let (status, list) = get(&c, &d.url("/api/v1/jobs?status=completed&limit=2")).await;
    assert_eq!(status, 200);
    assert_eq!(list["count"], 2);
    assert_eq!(list["jobs"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn invalid_requests_get_400_and_create_no_job() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    let url = image(dir);
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("x.raw"), b"x").unwrap();
    let good = json!({"image_url": url, "volume_name": "v", "volume_size_gb": 1});
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    let without = |k: &str| {
        let mut b = good.clone();
        b.as_object_mut().unwrap().remove(k);
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (without("image_url"), "image_url is required"),
        (with("image_url", json!("")), "image_url is required"),
        (with("image_url", json!("ftp://x/y")), "scheme"),
        (
            with("image_url", json!("https://evil.example.com/x.qcow2")),
            "allowed_hosts",
        ),
        (
            with("image_url", json!(file_url(&outside.path().join("x.raw")))),
            "file_roots",
        ),
        (
            with("image_url", json!(format!("{url}/../../etc/passwd"))),
            "image",
        ),
        (with("image_url", json!(42)), "invalid type"),
        (without("volume_name"), "volume_name is required"),
        (with("volume_name", json!("..")), "volume_name"),
        (with("volume_name", json!("-rf")), "volume_name"),
        (with("volume_name", json!("a/b")), "volume_name"),
        (with("volume_name", json!("x".repeat(128))), "volume_name"),
        (without("volume_size_gb"), "volume_size_gb is required"),
        (with("volume_size_gb", json!(0)), "volume_size_gb"),
        (with("volume_size_gb", json!(-5)), "volume_size_gb"),
        (with("volume_size_gb", json!(1.5)), "volume_size_gb"),
        (with("volume_size_gb", json!("50")), "volume_size_gb"),
        (with("image_type", json!("iso")), "image_type"),
        (with("correlation_id", json!("a\nb")), "correlation_id"),
        (with("extra_field", json!(1)), "unknown field"),
        (json!([1, 2]), "JSON object"),
    ];
    for (body, needle) in cases {
        let (status, v) = post(&c, &d.url("/api/v1/jobs"), &body).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"], "invalid request");
        assert_eq!(v["code"], 400);
        assert!(
            v["message"].as_str().unwrap().contains(needle),
            "{body}: message {v} lacks {needle:?}"
        );
    }
    let r = c
        .post(d.url("/api/v1/jobs"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(job_count(&c, &d).await, 0, "no bad request became a job");

    // Ids, routes.
    let (status, v) = get(&c, &d.url("/api/v1/jobs/not-a-uuid")).await;
    assert_eq!((status, v["code"].as_u64()), (400, Some(400)), "{v}");
    let (status, v) = get(
        &c,
        &d.url(&format!("/api/v1/jobs/{}", uuid::Uuid::new_v4())),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"], "not found");
    let (status, v) = get(&c, &d.url("/no/such/route")).await;
    assert_eq!(status, 404);
    assert_eq!(v["code"], 404);
    let (status, _) = get(&c, &d.url("/api/v1/jobs?limit=5000")).await;
    assert_eq!(status, 400);
    let (status, _) = get(&c, &d.url("/api/v1/jobs?status=weird")).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn cancel_running_job_removes_its_volume_and_kills_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = slow_qemu_img_path(dir, 30);
    let d = Daemon::start_with_env(dir, &TestConfig::new(dir), &[("PATH", &path)]);
    let c = client();
    let url = image(dir);
    let id = submit(
        &c,
        &d,
        json!({"image_url": url, "volume_name": "to-cancel", "volume_size_gb": 1}),
    )
    .await;
    wait_until(&c, &d, &id, MINUTE, |v| {
        v["progress"]["stage"] == "converting"
    })
    .await;
    let volume = dir.join("volumes/to-cancel");
    assert!(volume.exists(), "the job created its volume");
    let marker = dir.join("slowbin").display().to_string();
    // The stage is reported just before qemu-img is spawned: give the spawn a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while processes_matching(&marker).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-img wrapper runs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (status, v) = post(&c, &d.url(&format!("/api/v1/jobs/{id}/cancel")), &json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "cancelled");
    assert_eq!(v["job_id"], id);
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["error"], "cancelled by request");
    assert!(
        !volume.exists(),
        "volume created by the cancelled job is gone"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        processes_matching(&marker).is_empty(),
        "child processes were killed"
    );
    // Terminal stays terminal.
    let (status, _) = delete(&c, &d.url(&format!("/api/v1/cancel/{id}"))).await;
    assert_eq!(status, 400);
    let (_, after) = get(&c, &d.url(&format!("/api/v1/jobs/{id}"))).await;
    assert_eq!(after["status"], "cancelled");
}

#[tokio::test]
async fn queue_limits_and_volume_locks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = slow_qemu_img_path(dir, 30);
    let config = TestConfig::new(dir)
        .set("jobs.max_concurrent", 1)
        .set("jobs.queue_capacity", 1);
    let d = Daemon::start_with_env(dir, &config, &[("PATH", &path)]);
    let c = client();
    let url = image(dir);
    let body = |name: &str| json!({"image_url": url, "volume_name": name, "volume_size_gb": 1});

    let first = submit(&c, &d, body("q1")).await;
    wait_until(&c, &d, &first, MINUTE, |v| v["status"] == "running").await;
    // Same volume while the first is not terminal: 409.
    let (status, v) = post(&c, &d.url("/api/v1/jobs"), &body("q1")).await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"], "conflict");
    let second = submit(&c, &d, body("q2")).await;
    let (_, s) = get(&c, &d.url(&format!("/api/v1/jobs/{second}"))).await;
    assert_eq!(s["status"], "pending");
    assert_eq!(s["queue_position"], 1);
    // Slots and queue full: 429 with Retry-After, and no job made.
    let r = c
        .post(d.url("/api/v1/jobs"))
        .json(&body("q3"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], 429);
    assert_eq!(job_count(&c, &d).await, 2);
    let (_, h) = get(&c, &d.url("/health")).await;
    assert_eq!(h["status"], "degraded", "all slots busy");

    // Cancelling the queued job frees its place and its volume name.
    let (status, v) = delete(&c, &d.url(&format!("/api/v1/cancel/{second}"))).await;
    assert_eq!(status, 200, "{v}");
    let (_, s) = get(&c, &d.url(&format!("/api/v1/jobs/{second}"))).await;
    assert_eq!(s["status"], "cancelled");
    assert!(s.get("queue_position").is_none());
    let third = submit(&c, &d, body("q2")).await;
    let (_, s) = get(&c, &d.url(&format!("/api/v1/jobs/{third}"))).await;
    assert_eq!(s["queue_position"], 1);
}

#[tokio::test]
async fn sigkill_mid_job_then_restart_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = image(dir);
    let config = TestConfig::new(dir).set("jobs.max_concurrent", 1);
    let c = client();

    // A job that completes before the crash.
    let d = Daemon::start(dir, &config);
    let done = submit(
        &c,
        &d,
        json!({"image_url": url, "volume_name": "kept", "volume_size_gb": 1}),
    )
    .await;
    assert_eq!(wait_job(&c, &d, &done, MINUTE).await["status"], "completed");
    d.stop();

    // One job mid-conversion and one queued behind it, then SIGKILL.
    let path = slow_qemu_img_path(dir, 30);
    let d = Daemon::start_with_env(dir, &config, &[("PATH", &path)]);
    let running = submit(
        &c,
        &d,
        json!({"image_url": url, "volume_name": "half", "volume_size_gb": 1}),
    )
    .await;
    wait_until(&c, &d, &running, MINUTE, |v| {
        v["progress"]["stage"] == "converting"
    })
    .await;
    let queued = submit(
        &c,
        &d,
        json!({"image_url": url, "volume_name": "later", "volume_size_gb": 1}),
    )
    .await;
    assert!(dir.join("volumes/half").exists());
    d.kill9();
    // The conversion died with the daemon (no orphan writes into the volume).
    std::thread::sleep(Duration::from_millis(300));
    let marker = format!("{}/slowbin", dir.display());
    assert!(processes_matching(&format!("{marker}/qemu-img")).is_empty());

    let d = Daemon::start(dir, &config);
    let (status, j) = get(&c, &d.url(&format!("/api/v1/jobs/{running}"))).await;
    assert_eq!(status, 200);
    assert_eq!(j["status"], "failed");
    assert_eq!(j["error"], "interrupted by daemon restart");
    assert!(!dir.join("volumes/half").exists(), "partial volume removed");
    let (_, k) = get(&c, &d.url(&format!("/api/v1/jobs/{done}"))).await;
    assert_eq!(k["status"], "completed", "finished jobs survive restarts");
    assert!(
        dir.join("volumes/kept").exists(),
        "a completed job's volume is untouched"
    );
    let q = wait_job(&c, &d, &queued, MINUTE).await;
    assert_eq!(
        q["status"], "completed",
        "queued job ran after restart: {q}"
    );
    assert_volume_matches(&dir.join("volumes/later"), &{
        let r = dir.join("ref.raw");
        reference_raw(&dir.join("images/small.qcow2"), "qcow2", &r);
        r
    });
}

#[tokio::test]
async fn timeout_counts_from_running_and_rolls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = image(dir);
    let path = slow_qemu_img_path(dir, 30);
    let config = TestConfig::new(dir)
        .set("jobs.max_concurrent", 1)
        .set("jobs.timeout", "3s");
    let d = Daemon::start_with_env(dir, &config, &[("PATH", &path)]);
    let c = client();
    let first = submit(
        &c,
        &d,
        json!({"image_url": url, "volume_name": "slow-1", "volume_size_gb": 1}),
    )
    .await;
    let second = submit(
        &c,
        &d,
        json!({"image_url": url, "volume_name": "slow-2", "volume_size_gb": 1}),
    )
    .await;
    let a = wait_job(&c, &d, &first, MINUTE).await;
    assert_eq!(a["status"], "failed");
    assert_eq!(a["error"], "timed out after 3s (jobs.timeout)");
    assert!(
        !dir.join("volumes/slow-1").exists(),
        "the timed-out job's volume is removed"
    );
    // The second job waited about 3 s in the queue; its own 3 s start when it runs.
    let b = wait_job(&c, &d, &second, MINUTE).await;
    assert_eq!(b["error"], "timed out after 3s (jobs.timeout)");
    let started = chrono::DateTime::parse_from_rfc3339(b["started_at"].as_str().unwrap()).unwrap();
    let finished =
        chrono::DateTime::parse_from_rfc3339(b["finished_at"].as_str().unwrap()).unwrap();
    let created = chrono::DateTime::parse_from_rfc3339(b["created_at"].as_str().unwrap()).unwrap();
    assert!(
        (started - created).num_milliseconds() >= 2500,
        "it was queued first: {b}"
    );
    assert!(
        (finished - started).num_milliseconds() >= 2900,
        "the full timeout after start: {b}"
    );
}

/// The Go service's paths show a cancelled job as `failed` (its clients never saw `cancelled`);
/// every other route shows `cancelled`.
#[tokio::test]
async fn legacy_paths_show_a_cancelled_job_as_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = slow_qemu_img_path(dir, 30);
    let config = TestConfig::new(dir).set("jobs.max_concurrent", 1);
    let d = Daemon::start_with_env(dir, &config, &[("PATH", &path)]);
    let c = client();
    let url = image(dir);
    let body = |name: &str| json!({"image_url": url, "volume_name": name, "volume_size_gb": 1});
    let first = submit(&c, &d, body("busy")).await;
    wait_until(&c, &d, &first, MINUTE, |v| v["status"] == "running").await;
    // Queued behind the first, with a key, on the Go service's path; cancelled while pending.
    let r = c
        .post(d.url("/api/v1/provision"))
        .header("idempotency-key", "legacy-1")
        .json(&body("queued"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, v) = post(&c, &d.url(&format!("/api/v1/jobs/{id}/cancel")), &json!({})).await;
    assert_eq!(
        (status, v["status"].clone()),
        (200, json!("cancelled")),
        "{v}"
    );

    let (_, ours) = get(&c, &d.url(&format!("/api/v1/jobs/{id}"))).await;
    assert_eq!(ours["status"], "cancelled");
    let (status, legacy) = get(&c, &d.url(&format!("/api/v1/status/{id}"))).await;
    assert_eq!(status, 200);
    assert_eq!(legacy["status"], "failed", "{legacy}");
    assert_eq!(legacy["error"], "cancelled by request");
    assert_eq!(legacy["job_id"], ours["job_id"]);
    let (_, list) = get(&c, &d.url("/api/v1/jobs?status=cancelled")).await;
    assert_eq!(list["jobs"][0]["status"], "cancelled");
    // The refusal to cancel it again names the state each path shows.
    let (status, v) = delete(&c, &d.url(&format!("/api/v1/cancel/{id}"))).await;
    assert_eq!(status, 400);
    assert_eq!(v["message"], "cannot cancel job in 'failed' status");
    assert_eq!(v["reason"], "job_terminal");
    let (status, v) = post(&c, &d.url(&format!("/api/v1/jobs/{id}/cancel")), &json!({})).await;
    assert_eq!(status, 400);
    assert_eq!(v["message"], "cannot cancel job in 'cancelled' status");
    // A replay of the key answers the job as the path names it.
    for (route, expected) in [
        ("/api/v1/provision", "failed"),
        ("/provision", "failed"),
        ("/api/v1/jobs", "cancelled"),
    ] {
        let r = c
            .post(d.url(route))
            .header("idempotency-key", "legacy-1")
            .json(&body("queued"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{route}");
        assert_eq!(r.headers()["idempotent-replayed"], "true");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["job_id"], json!(id), "{route}");
        assert_eq!(v["status"], expected, "{route}");
    }
    let (status, _) = post(
        &c,
        &d.url(&format!("/api/v1/jobs/{first}/cancel")),
        &json!({}),
    )
    .await;
    assert_eq!(status, 200);
}

/// `POST /api/v1/cache/fetch` checks a declared `image_type` against the image exactly as a
/// provision job does (the same error), and the job shows what was found.
#[tokio::test]
async fn cache_fetch_checks_the_declared_image_type() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    let raw = dir.join("images/disk.raw");
    make_raw(&raw, 4 << 20);
    let raw = file_url(&raw);
    let qcow2 = image(dir);
    let fetch = |url: &str, image_type: Option<&str>| {
        let mut body = json!({"image_url": url});
        if let Some(t) = image_type {
            body["image_type"] = json!(t);
        }
        let (c, d) = (&c, &d);
        async move {
            let (status, v) = post(c, &d.url("/api/v1/cache/fetch"), &body).await;
            assert_eq!(status, 202, "{body}: {v}");
            wait_job(c, d, v["job_id"].as_str().unwrap(), MINUTE).await
        }
    };

    let job = fetch(&raw, Some("qcow2")).await;
    assert_eq!(job["status"], "failed", "{job}");
    let mismatch = "image rejected: image_type is qcow2 but the image is raw";
    assert_eq!(job["error"], mismatch);
    assert_eq!(
        (job["image_type"].clone(), job["image_format"].clone()),
        (json!("qcow2"), json!("raw"))
    );
    assert!(job.get("image_path").is_none(), "{job}");
    // A provision job declaring the same fails with the same error.
    let id = submit(
        &c,
        &d,
        json!({"image_url": raw, "volume_name": "v-raw", "volume_size_gb": 1}),
    )
    .await;
    let provision = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(provision["error"], mismatch, "{provision}");

    let job = fetch(&raw, Some("raw")).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(
        (job["image_type"].clone(), job["image_format"].clone()),
        (json!("raw"), json!("raw"))
    );
    // Without a declared type the image is taken as found, and the job says what it found.
    let job = fetch(&raw, None).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(
        (job["image_type"].clone(), job["image_format"].clone()),
        (json!("raw"), json!("raw"))
    );
    let job = fetch(&qcow2, None).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["image_type"], "qcow2");
    let job = fetch(&qcow2, Some("raw")).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(
        job["error"],
        "image rejected: image_type is raw but the image is qcow2"
    );
    assert_eq!(job["image_format"], "qcow2");
}

/// `correlation_id` and `image_url` limits count characters, as the document and the messages
/// say: 256 two-byte characters are accepted, 257 are not.
#[tokio::test]
async fn length_limits_count_characters() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    let url = image(dir);
    let body = |name: &str, correlation: String| json!({"image_url": url, "volume_name": name, "volume_size_gb": 1, "correlation_id": correlation});
    let id = submit(&c, &d, body("wide-256", "é".repeat(256))).await;
    let (_, job) = get(&c, &d.url(&format!("/api/v1/jobs/{id}"))).await;
    assert_eq!(job["correlation_id"], "é".repeat(256));
    let (status, v) = post(
        &c,
        &d.url("/api/v1/jobs"),
        &body("wide-257", "é".repeat(257)),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("longer than 256 characters"),
        "{v}"
    );
    // 4096 characters (8 KiB and more of UTF-8) pass the length check and meet the source
    // check; 4097 do not pass the length check.
    let long = |n: usize| format!("https://x.example/{}", "é".repeat(n - 18));
    let probe = |u: String| json!({"image_url": u, "volume_name": "long", "volume_size_gb": 1});
    let (status, v) = post(&c, &d.url("/api/v1/jobs"), &probe(long(4096))).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        !v["message"].as_str().unwrap().contains("longer than"),
        "{v}"
    );
    let (status, v) = post(&c, &d.url("/api/v1/jobs"), &probe(long(4097))).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("longer than 4096 characters"),
        "{v}"
    );
    wait_job(&c, &d, &id, MINUTE).await;
}
