//! A disk's life on the host (directory backend, the real binary): wiping on delete (a small
//! wipe answers 200, a long one is a `wipe` job; a wipe cut short is finished at start-up),
//! growing (never shrinking), cloning (a `clone` job copying a file volume), each through the
//! API (checked against the OpenAPI document) and the CLI.
//! The LVM and libvirt side is tests/lifecycle_vm.rs.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// A file volume of `bytes` with non-zero content, made outside the daemon.
fn volume_file(dir: &std::path::Path, name: &str, bytes: usize) -> std::path::PathBuf {
    let path = dir.join("volumes").join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vec![0xa5u8; bytes]).unwrap();
    path
}

#[tokio::test]
async fn a_long_zero_wipe_is_a_job_and_a_short_one_answers_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = TestConfig::new(dir)
        .set("volumes.wipe_on_delete", "zero")
        .set("volumes.wipe_job_min_bytes", 1 << 20);
    let d = Daemon::start(dir, &config);
    let c = client();

    let small = volume_file(dir, "small", 512 << 10);
    let (status, body) = delete(&c, &d.url("/api/v1/volumes/small")).await;
    assert_eq!(
        (status, &body["status"]),
        (200, &"deleted".into()),
        "{body}"
    );
    assert!(!small.exists());

    let big = volume_file(dir, "big", 4 << 20);
    let (status, body) = delete(&c, &d.url("/api/v1/volumes/big")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["job_id"].as_str().unwrap().to_string();
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["kind"], "wipe", "{job}");
    assert_eq!(job["progress"]["bytes_total"], 4 << 20, "{job}");
    assert!(!big.exists(), "removed by the job");
    let wiping = dir.join("volumes/.lvp-wiping");
    assert_eq!(
        std::fs::read_dir(&wiping).unwrap().count(),
        0,
        "nothing left"
    );
    let wiped = metric(
        &c,
        &d,
        "libvirt_volume_provisioner_bulk_io_bytes_total",
        r#"op="wipe""#,
    )
    .await;
    assert_eq!(wiped, f64::from((4 << 20) + (512 << 10)));

    // The reserved folder is not a volume name.
    let (status, body) = delete(&c, &d.url("/api/v1/volumes/.lvp-wiping")).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn a_wipe_cut_short_is_finished_at_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // As a crash mid-wipe leaves it: the file moved into the wiping folder, not yet unlinked;
    // and a new volume made under the same name since, which must stay.
    let wiping = dir.join("volumes/.lvp-wiping");
    std::fs::create_dir_all(&wiping).unwrap();
    std::fs::write(wiping.join("vm-1"), vec![0xa5u8; 1 << 20]).unwrap();
    let live = volume_file(dir, "vm-1", 4096);
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let deadline = std::time::Instant::now() + MINUTE;
    while !d.log().contains("interrupted wipe finished") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!wiping.join("vm-1").exists(), "wiped and removed");
    assert!(live.exists(), "the new volume of that name is untouched");
}

/// Validates `body` against the document's schema of `path`/`method`/`status`.
fn assert_documented(doc: &Value, path: &str, method: &str, status: u16, body: &Value) {
    let reference = &doc["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]
        ["schema"];
    assert!(
        reference.is_object(),
        "{method} {path} {status} is not documented"
    );
    let mut schema = reference.clone();
    schema["components"] = doc["components"].clone();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status}: {errors:?}\n{body}"
    );
}

/// The CLI against the daemon at `server`: (exit code, stdout).
fn cli(server: &str, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env("LVP_SERVER_URL", server)
        .env_remove("LVP_TOKEN")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn a_file_volume_grows_and_never_shrinks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    let (_, doc) = get(&c, &d.url("/api/v1/openapi.json")).await;
    let path = "/api/v1/volumes/{name}/resize";
    let file = volume_file(dir, "vm-g", 4096);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let url = d.url("/api/v1/volumes/vm-g/resize");

    let (s, v) = post(&c, &url, &json!({"size_gb": 2})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v,
        json!({"volume": "vm-g", "size_bytes": 2u64 << 30, "live": false})
    );
    assert_documented(&doc, path, "post", s, &v);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 << 30);
    assert_eq!(
        &std::fs::read(&file).unwrap()[..4096],
        &[0xa5u8; 4096][..],
        "data kept"
    );

    let (s, v) = post(&c, &url, &json!({"size_gb": 2})).await;
    assert_eq!(
        (s, &v["size_bytes"]),
        (200, &json!(2u64 << 30)),
        "same size: {v}"
    );
    let (s, v) = post(&c, &url, &json!({"size_gb": 1})).await;
    assert_eq!(
        (s, v["reason"].as_str()),
        (409, Some("shrink_refused")),
        "{v}"
    );
    assert_documented(&doc, path, "post", s, &v);
    let (s, v) = post(
        &c,
        &d.url("/api/v1/volumes/nope/resize"),
        &json!({"size_gb": 1}),
    )
    .await;
    assert_eq!(
        (s, v["reason"].as_str()),
        (404, Some("volume_not_found")),
        "{v}"
    );
    assert_documented(&doc, path, "post", s, &v);
    for bad in [
        json!({"size_gb": 0}),
        json!({"size_gb": "3"}),
        json!({}),
        json!({"size_gb": 3, "x": 1}),
    ] {
        let (s, v) = post(&c, &url, &bad).await;
        assert_eq!(s, 400, "{bad}: {v}");
        assert_documented(&doc, path, "post", s, &v);
    }
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        2 << 30,
        "unchanged by refusals"
    );

    // The CLI, as text and as the API's own body.
    let base = d.url("");
    let base = base.trim_end_matches('/');
    let (code, out) = cli(base, &["volume", "resize", "vm-g", "--size-gb", "3"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), format!("volume vm-g: {} bytes", 3u64 << 30));
    let (code, out) = cli(
        base,
        &[
            "--output",
            "json",
            "volume",
            "resize",
            "vm-g",
            "--size-gb",
            "3",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["size_bytes"], 3u64 << 30);
    let (code, out) = cli(
        base,
        &[
            "--output",
            "json",
            "volume",
            "resize",
            "vm-g",
            "--size-gb",
            "1",
        ],
    );
    assert_ne!(code, 0, "a refused shrink fails the command: {out}");
}

/// The issue's measured defect: a prefetch of a 64 MiB image with `cache.max_size_bytes` at
/// 48 MiB completed. It must fail before the download, naming the numbers.
#[tokio::test]
async fn an_image_larger_than_the_cache_fails_before_downloading() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(
        dir,
        &TestConfig::new(dir).set("cache.max_size_bytes", 48 << 20),
    );
    let c = client();
    let image = dir.join("images/big.raw");
    make_raw(&image, 64 << 20);
    let (s, v) = post(
        &c,
        &d.url("/api/v1/cache/fetch"),
        &json!({"image_url": file_url(&image)}),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let job = wait_job(&c, &d, v["job_id"].as_str().unwrap(), MINUTE).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&(64u64 << 20).to_string()) && error.contains("cache.max_size_bytes"),
        "{error}"
    );
    assert_eq!(
        job["progress"]["bytes_processed"], 0,
        "nothing downloaded: {job}"
    );
}

/// A volume the backend has not the room for fails the job before a byte is downloaded.
#[tokio::test]
async fn a_volume_that_cannot_fit_fails_before_downloading() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    let image = dir.join("images/small.raw");
    make_raw(&image, 1 << 20);
    let body = json!({"image_url": file_url(&image), "volume_name": "huge",
                      "volume_size_gb": 1 << 20, "image_type": "raw"});
    let id = submit(&c, &d, body).await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not enough space") && error.contains(&(1u64 << 50).to_string()),
        "{error}"
    );
    assert_eq!(job["cache_hit"], false);
    assert!(
        cache_files(dir).is_empty(),
        "nothing downloaded: {:?}",
        cache_files(dir)
    );
}

/// A file volume of `bytes` whose every 4 KiB block differs (a copy that shifts or drops a
/// block does not compare equal).
fn patterned_volume(dir: &std::path::Path, name: &str, bytes: usize) -> std::path::PathBuf {
    let path = dir.join("volumes").join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let data: Vec<u8> = (0..bytes)
        .map(|i| ((i / 4096) as u8) ^ (i as u8).wrapping_mul(31) | 1)
        .collect();
    std::fs::write(&path, data).unwrap();
    path
}

#[tokio::test]
async fn a_file_volume_is_cloned_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    let (_, doc) = get(&c, &d.url("/api/v1/openapi.json")).await;
    let path = "/api/v1/volumes/{name}/clone";
    assert!(doc["paths"][path]["post"].is_object(), "route documented");
    let src = patterned_volume(dir, "vm-src", 4 << 20);
    let url = d.url("/api/v1/volumes/vm-src/clone");

    let (s, v) = post(&c, &url, &json!({"target": "vm-copy"})).await;
    assert_eq!(s, 202, "{v}");
    assert_documented(&doc, path, "post", s, &v);
    let job = wait_job(&c, &d, v["job_id"].as_str().unwrap(), MINUTE).await;
    assert_eq!(
        (&job["status"], &job["kind"], &job["method"]),
        (&json!("completed"), &json!("clone"), &json!("copy")),
        "{job}"
    );
    let copy = dir.join("volumes/vm-copy");
    assert_eq!(job["volume_path"], copy.display().to_string(), "{job}");
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&src).unwrap());

    // Larger than the source: the source, then zeros.
    let (s, v) = post(&c, &url, &json!({"target": "vm-big", "size_gb": 1})).await;
    assert_eq!(s, 202, "{v}");
    let job = wait_job(&c, &d, v["job_id"].as_str().unwrap(), MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    let big = std::fs::read(dir.join("volumes/vm-big")).unwrap();
    assert_eq!(big.len(), 1 << 30);
    assert!(big[..4 << 20] == std::fs::read(&src).unwrap()[..]);
    assert!(
        big[4 << 20..].iter().all(|b| *b == 0),
        "zeros past the source"
    );
    drop(big);
    let copied = metric(
        &c,
        &d,
        "libvirt_volume_provisioner_bulk_io_bytes_total",
        r#"op="clone""#,
    )
    .await;
    assert_eq!(copied, f64::from(8 << 20), "both copies counted");

    // Refusals, each documented.
    for (target_url, body, status, reason) in [
        (&url, json!({"target": "vm-copy"}), 409, "volume_exists"),
        (
            &d.url("/api/v1/volumes/nope/clone"),
            json!({"target": "vm-x"}),
            404,
            "volume_not_found",
        ),
    ] {
        let (s, v) = post(&c, target_url, &body).await;
        assert_eq!((s, v["reason"].as_str()), (status, Some(reason)), "{v}");
        assert_documented(&doc, path, "post", s, &v);
    }
    let sparse = volume_file(dir, "vm-2g", 4096);
    std::fs::File::options()
        .write(true)
        .open(&sparse)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let (s, v) = post(
        &c,
        &d.url("/api/v1/volumes/vm-2g/clone"),
        &json!({"target": "vm-x", "size_gb": 1}),
    )
    .await;
    assert_eq!(
        (s, v["reason"].as_str()),
        (409, Some("shrink_refused")),
        "{v}"
    );
    // The source itself is a target that exists.
    let (s, v) = post(&c, &url, &json!({"target": "vm-src"})).await;
    assert_eq!(
        (s, v["reason"].as_str()),
        (409, Some("volume_exists")),
        "{v}"
    );
    for bad in [
        json!({}),
        json!({"target": "a/b"}),
        json!({"target": "vm-y", "size_gb": 0}),
        json!({"target": "vm-y", "x": 1}),
    ] {
        let (s, v) = post(&c, &url, &bad).await;
        assert_eq!(s, 400, "{bad}: {v}");
        assert_documented(&doc, path, "post", s, &v);
    }
    assert!(!dir.join("volumes/vm-x").exists() && !dir.join("volumes/vm-y").exists());

    // The CLI: text with --wait, the API's body with --output json, a refusal fails.
    let base = d.url("");
    let base = base.trim_end_matches('/');
    let (code, out) = cli(
        base,
        &["volume", "clone", "vm-src", "--target", "vm-cli", "--wait"],
    );
    assert_eq!(code, 0, "{out}");
    let cli_copy = dir.join("volumes/vm-cli");
    assert!(
        out.contains(&format!("completed: volume {}", cli_copy.display())),
        "{out}"
    );
    assert!(std::fs::read(&cli_copy).unwrap() == std::fs::read(&src).unwrap());
    let (code, out) = cli(
        base,
        &[
            "--output", "json", "volume", "clone", "vm-src", "--target", "vm-cli2",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let job = wait_job(&c, &d, v["job_id"].as_str().unwrap(), MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    let (code, out) = cli(base, &["volume", "clone", "vm-src", "--target", "vm-cli"]);
    assert_ne!(code, 0, "a clone onto an existing volume fails: {out}");
}

#[tokio::test]
async fn a_cancelled_clone_leaves_no_target() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    patterned_volume(dir, "vm-src", 128 << 20);
    let (s, v) = post(
        &c,
        &d.url("/api/v1/volumes/vm-src/clone"),
        &json!({"target": "vm-copy"}),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let id = v["job_id"].as_str().unwrap().to_string();
    let (s, v) = post(&c, &d.url(&format!("/api/v1/jobs/{id}/cancel")), &json!({})).await;
    assert_eq!(s, 200, "cancelled while pending or copying: {v}");
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(!dir.join("volumes/vm-copy").exists(), "no target left");
    assert!(dir.join("volumes/vm-src").exists(), "the source stays");
}

/// `volumes.io.write_bytes_per_second` paces a `zero` wipe; one that would take 10 s or more
/// under the limit runs as a job.
#[tokio::test]
async fn a_zero_wipe_keeps_to_the_write_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = TestConfig::new(dir)
        .set("volumes.wipe_on_delete", "zero")
        .set("volumes.io.write_bytes_per_second", 2 << 20);
    let d = Daemon::start(dir, &config);
    let c = client();
    volume_file(dir, "small", 1 << 20);
    let started = std::time::Instant::now();
    let (status, body) = delete(&c, &d.url("/api/v1/volumes/small")).await;
    let took = started.elapsed().as_secs_f64();
    assert_eq!(status, 200, "{body}");
    assert!(
        (0.45..3.0).contains(&took),
        "1 MiB at 2 MiB/s took {took} s"
    );
    volume_file(dir, "big", 24 << 20);
    let (status, body) = delete(&c, &d.url("/api/v1/volumes/big")).await;
    assert_eq!(status, 202, "12 s under the limit: a job: {body}");
    let id = body["job_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, job) = get(&c, &d.url(&format!("/api/v1/jobs/{id}"))).await;
    let done = job["progress"]["bytes_processed"].as_u64().unwrap_or(0);
    assert!(
        done <= 8 << 20,
        "about 2 MiB/s after 2 s, not {done} bytes: {job}"
    );
    let (status, v) = post(&c, &d.url(&format!("/api/v1/jobs/{id}/cancel")), &json!({})).await;
    assert_eq!(status, 200, "{v}");
}
