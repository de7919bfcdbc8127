//! Defects found by attacking the daemon from outside (hardening issue), job and volume side,
//! against the real binary: each test failed before its fix.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// DELETE of a name whose path is a directory was a 500 (remove_file on a directory).
#[tokio::test]
async fn deleting_a_directory_named_like_a_volume_is_a_conflict() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    std::fs::create_dir_all(dir.join("volumes/not-a-volume/inner")).unwrap();
    let (status, body) = delete(&c, &d.url("/api/v1/volumes/not-a-volume")).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], 409);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("cannot be deleted: it is a directory"),
        "{body}"
    );
    assert!(dir.join("volumes/not-a-volume/inner").is_dir(), "untouched");
    // An absent volume is still a success.
    let (status, body) = delete(&c, &d.url("/api/v1/volumes/never-made")).await;
    assert_eq!(status, 200, "{body}");
}

/// A 0-byte image completed with an all-zero volume.
#[tokio::test]
async fn an_empty_image_is_refused_and_leaves_no_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    let image = dir.join("images/empty.raw");
    std::fs::write(&image, b"").unwrap();
    let id = submit(
        &c,
        &d,
        json!({"image_url": file_url(&image), "volume_name": "from-empty",
               "volume_size_gb": 1, "image_type": "raw"}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"], "image rejected: image is empty (0 bytes)");
    assert!(!dir.join("volumes/from-empty").exists());
}

/// The directory backend's "is it open?" check failed open: when /proc did not show another
/// user's open files, the volume counted as unused and was overwritten. Run unprivileged (as
/// `nobody`, like a unit with an empty capability set), the daemon cannot see a root process
/// holding the volume: it must refuse the reuse and say why, not overwrite.
#[tokio::test]
async fn reuse_is_refused_when_open_files_cannot_be_seen() {
    use std::os::unix::fs::PermissionsExt;
    if unsafe { nix::libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root to start the daemon as another user");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for sub in ["", "images", "volumes", "state", "cache"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        std::fs::set_permissions(dir.join(sub), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let volume = dir.join("volumes/held");
    std::fs::write(&volume, vec![7u8; 1 << 20]).unwrap();
    std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o666)).unwrap();
    let image = dir.join("images/i.raw");
    std::fs::write(&image, vec![1u8; 4096]).unwrap();
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Root holds the volume open, as a VM would.
    let mut holder = std::process::Command::new("sleep")
        .arg("60")
        .stdin(std::fs::File::open(&volume).unwrap())
        .spawn()
        .unwrap();
    let config = TestConfig::new(dir).set(
        "volumes.directory.path",
        volume.parent().unwrap().display().to_string(),
    );
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, config.render()).unwrap();
    std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let d = Daemon::spawn_wrapped(
        dir,
        &config_path,
        &[],
        "http",
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
    );
    let c = client();
    let (status, body) = post(
        &c,
        &d.url("/api/v1/jobs"),
        &json!({"image_url": file_url(&image), "volume_name": "held",
                "volume_size_gb": 1, "image_type": "raw"}),
    )
    .await;
    let _ = holder.kill();
    let _ = holder.wait();
    // 1 MiB is not within 5% of 1 GiB either: that must not be the reason given.
    assert_eq!(status, 409, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("cannot tell whether another process has it open"),
        "{message}"
    );
    assert_eq!(
        std::fs::read(&volume).unwrap(),
        vec![7u8; 1 << 20],
        "untouched"
    );
}

/// Userinfo in `s3.endpoint` / `telemetry.otlp_endpoint` showed in check-config, in
/// `GET /api/v1/config` and in the start-up log line.
#[tokio::test]
async fn credentials_in_endpoint_urls_are_redacted_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = TestConfig::new(dir)
        .set("s3.endpoint", "http://s3user:s3-pass-SECRET@127.0.0.1:9")
        .set("s3.allow_http", true)
        .set(
            "telemetry.otlp_endpoint",
            "http://otel:otel-pass-SECRET@127.0.0.1:9",
        );
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, config.render()).unwrap();
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&config_path)
        .arg("check-config")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    assert!(!printed.contains("SECRET"), "{printed}");
    assert!(
        printed.contains("http://<redacted>@127.0.0.1:9"),
        "{printed}"
    );

    let d = Daemon::start(dir, &config);
    let c = client();
    let (status, body) = get(&c, &d.url("/api/v1/config")).await;
    assert_eq!(status, 200);
    assert!(!body.to_string().contains("SECRET"), "{body}");
    assert_eq!(
        body["config"]["s3"]["endpoint"],
        "http://<redacted>@127.0.0.1:9"
    );
    // The first probe of the (unreachable) endpoint has run and logged its error by now.
    let deadline = std::time::Instant::now() + MINUTE;
    while !d.log().contains("dependency is down") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!d.log().contains("SECRET"), "{}", d.log());
}

/// The state directory fills up while a job runs: before, every later job got 500 even after
/// space was freed (sled keeps refusing after its first write error), the running job stayed
/// `running` forever, and health said all was well. Now the running job is stopped and shown
/// failed, readiness reports storage down, and once space is back the store recovers: the
/// probe reopens it, storage is up again and new jobs are accepted and complete.
#[tokio::test]
async fn a_full_state_store_recovers_when_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = slow_qemu_img_path(dir, 8);
    let d = Daemon::start_with_small_store(dir, &[("PATH", path.as_str())]);
    let image = dir.join("images/a.qcow2");
    make_qcow2(&image, "16M");
    let state = dir.join("state");
    let c = client();
    let body = |name: &str| json!({"image_url": file_url(&image), "volume_name": name, "volume_size_gb": 1});
    let first = submit(&c, &d, body("during")).await;
    wait_until(&c, &d, &first, MINUTE, |j| j["status"] == "running").await;

    // Fill the tmpfs the daemon sees, then make sled need new space.
    let filler = d.fill_tmpfs(&state);
    let storage = r#"dependency="storage""#;
    let m = |n: &str| format!("libvirt_volume_provisioner_{n}");
    let deadline = std::time::Instant::now() + 2 * MINUTE;
    while metric(&c, &d, &m("dependencies_up"), storage).await != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "storage still up:\n{}",
            d.log()
        );
        let _ = post(
            &c,
            &d.url("/api/v1/cache/fetch"),
            &json!({"image_url": file_url(&image)}),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, ready) = get(&c, &d.url("/readyz")).await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["dependencies"]["storage"], false);

    // The running job ends (failed: its state could not be recorded), it is not left running.
    let job = wait_until(&c, &d, &first, 2 * MINUTE, |j| {
        j["status"] != "running" && j["status"] != "pending"
    })
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("cannot be recorded"),
        "{job}"
    );
    assert!(!dir.join("volumes/during").exists(), "rolled back");

    // Space comes back: the store recovers without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + MINUTE;
    while metric(&c, &d, &m("dependencies_up"), storage).await != 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "storage still down:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(d.log().contains("job store reopened after a write failure"));
    let (status, ready) = get(&c, &d.url("/readyz")).await;
    assert_eq!(status, 200, "{ready}");
    let after = submit(&c, &d, body("after")).await;
    let job = wait_job(&c, &d, &after, 2 * MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    let (_, old) = get(&c, &d.url(&format!("/api/v1/jobs/{first}"))).await;
    assert_eq!(
        old["status"], "failed",
        "the failure was written once space came back"
    );
}

/// Labelled counters with known label values start at 0 on a fresh daemon, so `rate()` and
/// alerts work from the first scrape (before, a series appeared only at its first event).
#[tokio::test]
async fn known_counter_series_exist_from_the_first_scrape() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    let text = scrape(&c, &d).await;
    let m = |n: &str| format!("libvirt_volume_provisioner_{n}");
    for (name, labels) in [
        ("jobs_total", r#"status="failed""#),
        (
            "image_errors_total",
            r#"error_type="not_found",operation="download""#,
        ),
        (
            "image_errors_total",
            r#"error_type="backing_file",operation="download""#,
        ),
        (
            "image_errors_total",
            r#"error_type="too_large",operation="inspect""#,
        ),
        (
            "image_errors_total",
            r#"error_type="qemu_img",operation="convert""#,
        ),
        ("auth_failures_total", r#"reason="invalid_token""#),
        ("cache_evictions_total", r#"reason="age""#),
        ("qemu_img_invocations_total", r#"subcommand="convert""#),
        ("config_reload_total", r#"result="error""#),
    ] {
        let line = format!("{}{{{labels}}} 0", m(name));
        assert!(text.contains(&line), "missing `{line}` in:\n{text}");
    }
}
