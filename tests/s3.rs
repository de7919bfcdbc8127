//! The image path against a real S3 server (s3s-fs, SigV4 enforced): provisioning with and
//! without a published checksum, refused credentials, checksum mismatch, cache hits,
//! single-flight downloads, replaced objects, resume after a daemon kill, eviction and the
//! cache API.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);
const M: &str = "libvirt_volume_provisioner";

struct Setup {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    s3: S3Server,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let s3 = S3Server::start(&dir.join("s3"));
    Setup { _tmp: tmp, dir, s3 }
}

/// A qcow2 with data, its bytes, and the raw reference qemu-img makes of it.
fn qcow2_image(dir: &Path, name: &str, size: &str) -> (Vec<u8>, std::path::PathBuf) {
    let img = dir.join(format!("{name}.qcow2"));
    make_qcow2(&img, size);
    let reference = dir.join(format!("{name}.ref.raw"));
    reference_raw(&img, "qcow2", &reference);
    (std::fs::read(&img).unwrap(), reference)
}

async fn cache_images(c: &reqwest::Client, d: &Daemon) -> Vec<Value> {
    let (status, v) = get(c, &d.url("/api/v1/cache/images?limit=1000")).await;
    assert_eq!(status, 200, "{v}");
    v["images"].as_array().unwrap().clone()
}

#[tokio::test]
async fn provisions_from_s3_with_and_without_checksum_and_hits_the_cache() {
    let s = setup();
    let (bytes, reference) = qcow2_image(&s.dir, "ubuntu", "64M");
    s.s3.put("vm-images", "ubuntu.qcow2", &bytes);
    s.s3.put(
        "vm-images",
        "ubuntu.qcow2.sha256",
        format!("{}  ubuntu.qcow2\n", sha256_hex(&bytes).to_uppercase()).as_bytes(),
    );
    s.s3.put("vm-images", "nosum/ubuntu.qcow2", &bytes);
    // The endpoint by name, so that virtual-host URLs (bucket.localhost) parse.
    let config =
        s.s3.configure(TestConfig::new(&s.dir))
            .set("s3.endpoint", format!("http://localhost:{}", s.s3.port));
    let d = Daemon::start(&s.dir, &config);
    let c = client();
    let url = format!("http://localhost:{}/vm-images/ubuntu.qcow2", s.s3.port);

    let started = Instant::now();
    let id = submit(
        &c,
        &d,
        json!({"image_url": url, "volume_name": "s3-a", "volume_size_gb": 1}),
    )
    .await;
    let miss = wait_job(&c, &d, &id, MINUTE).await;
    let miss_time = started.elapsed();
    assert_eq!(miss["status"], "completed", "{miss}");
    assert_eq!(miss["cache_hit"], false);
    assert_volume_matches(&s.dir.join("volumes/s3-a"), &reference);

    let started = Instant::now();
    let id = submit(
        &c,
        &d,
        json!({"image_url": url, "volume_name": "s3-b", "volume_size_gb": 1}),
    )
    .await;
    let hit = wait_job(&c, &d, &id, MINUTE).await;
    let hit_time = started.elapsed();
    assert_eq!(hit["status"], "completed", "{hit}");
    assert_eq!(
        hit["cache_hit"], true,
        "second job on the same image is a cache hit"
    );
    assert_volume_matches(&s.dir.join("volumes/s3-b"), &reference);
    eprintln!("cache miss {miss_time:?}, cache hit {hit_time:?}");
    assert_eq!(
        metric(&c, &d, &format!("{M}_images_downloaded_total"), "").await,
        1.0
    );
    assert_eq!(
        metric(&c, &d, &format!("{M}_cache_hits_total"), "").await,
        1.0
    );

    let images = cache_images(&c, &d).await;
    assert_eq!(images.len(), 1);
    assert_eq!(
        images[0]["key"],
        sha256_hex(&bytes),
        "keyed by the published checksum"
    );
    assert_eq!(images[0]["checksum"], sha256_hex(&bytes));
    assert_eq!(images[0]["checksum_verified"], true);
    assert_eq!(images[0]["size"], bytes.len());

    // Without a .sha256, through the virtual-host style URL form.
    let vhost = format!(
        "http://vm-images.localhost:{}/nosum/ubuntu.qcow2",
        s.s3.port
    );
    let id = submit(
        &c,
        &d,
        json!({"image_url": vhost, "volume_name": "s3-c", "volume_size_gb": 1}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_volume_matches(&s.dir.join("volumes/s3-c"), &reference);
    let images = cache_images(&c, &d).await;
    let nosum = images
        .iter()
        .find(|i| i["image_url"] == vhost)
        .expect("entry for the unsummed object");
    assert_eq!(nosum["checksum_verified"], false);
    assert_eq!(
        nosum["checksum"],
        sha256_hex(&bytes),
        "hash computed while downloading"
    );
    assert_ne!(nosum["key"], sha256_hex(&bytes), "keyed by URL and ETag");
}

#[tokio::test]
async fn wrong_credentials_fail_the_job_with_the_auth_error() {
    let s = setup();
    let (bytes, _) = qcow2_image(&s.dir, "img", "8M");
    s.s3.put("vm-images", "img.qcow2", &bytes);
    let config =
        s.s3.configure(TestConfig::new(&s.dir))
            .set("s3.secret_key", "wrong-secret-key-000000000");
    let d = Daemon::start(&s.dir, &config);
    let c = client();
    let url = format!("{}/vm-images/img.qcow2", s.s3.endpoint());
    let started = Instant::now();
    let id = submit(
        &c,
        &d,
        json!({"image_url": url, "volume_name": "auth", "volume_size_gb": 1}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "failed");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("refused"), "{error}");
    assert!(
        error.contains("SignatureDoesNotMatch") || error.contains("403"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "not retried for long"
    );
    assert!(!s.dir.join("volumes/auth").exists());
    assert!(!d.log().contains("wrong-secret-key"), "secret never logged");
    let (_, ready) = get(&c, &d.url("/readyz")).await;
    assert_eq!(ready["dependencies"]["minio"], false, "{ready}");
}

#[tokio::test]
async fn checksum_mismatch_fails_and_leaves_the_cache_unchanged() {
    let s = setup();
    let (bytes, _) = qcow2_image(&s.dir, "img", "8M");
    s.s3.put("vm-images", "img.qcow2", &bytes);
    s.s3.put(
        "vm-images",
        "img.qcow2.sha256",
        sha256_hex(b"something else").as_bytes(),
    );
    let d = Daemon::start(&s.dir, &s.s3.configure(TestConfig::new(&s.dir)));
    let c = client();
    let url = format!("{}/vm-images/img.qcow2", s.s3.endpoint());
    let id = submit(
        &c,
        &d,
        json!({"image_url": url, "volume_name": "bad", "volume_size_gb": 1}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "failed");
    assert!(
        job["error"].as_str().unwrap().contains("checksum mismatch"),
        "{job}"
    );
    assert!(cache_images(&c, &d).await.is_empty());
    assert!(
        cache_files(&s.dir).is_empty(),
        "no partial file: {:?}",
        cache_files(&s.dir)
    );
    assert!(!s.dir.join("volumes/bad").exists(), "no volume made");
    assert_eq!(
        metric(
            &c,
            &d,
            &format!("{M}_image_errors_total"),
            "error_type=\"checksum_mismatch\""
        )
        .await,
        1.0
    );

    // A missing object is a 404 failure, not retried.
    let id = submit(
        &c,
        &d,
        json!({"image_url": format!("{}/vm-images/none.qcow2", s.s3.endpoint()),
               "volume_name": "none", "volume_size_gb": 1}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert!(
        job["error"].as_str().unwrap().contains("not found"),
        "{job}"
    );
}

#[tokio::test]
async fn concurrent_jobs_share_one_download() {
    let s = setup();
    let img = s.dir.join("shared.qcow2");
    make_dense_qcow2(&img, 24 << 20, 64 << 20, 7);
    let bytes = std::fs::read(&img).unwrap();
    let reference = s.dir.join("shared.ref.raw");
    reference_raw(&img, "qcow2", &reference);
    s.s3.put("vm-images", "shared.qcow2", &bytes);
    // 8 MB/s: the download takes long enough for both jobs to want it at once.
    let proxy = throttled_proxy(s.s3.port, 8_000_000);
    let config =
        s.s3.configure(TestConfig::new(&s.dir))
            .set("s3.endpoint", format!("http://127.0.0.1:{proxy}"));
    let d = Daemon::start(&s.dir, &config);
    let c = client();
    let url = format!("http://127.0.0.1:{proxy}/vm-images/shared.qcow2");
    let a = submit(
        &c,
        &d,
        json!({"image_url": url, "volume_name": "sf-a", "volume_size_gb": 1}),
    )
    .await;
    let b = submit(
        &c,
        &d,
        json!({"image_url": url, "volume_name": "sf-b", "volume_size_gb": 1}),
    )
    .await;
    let running = wait_until(&c, &d, &b, MINUTE, |v| {
        v["progress"]["stage"] == "downloading"
    })
    .await;
    assert!(running["progress"]["bytes_total"].as_u64().unwrap() > 0);
    for id in [&a, &b] {
        let job = wait_job(&c, &d, id, MINUTE).await;
        assert_eq!(job["status"], "completed", "{job}");
    }
    assert_volume_matches(&s.dir.join("volumes/sf-a"), &reference);
    assert_volume_matches(&s.dir.join("volumes/sf-b"), &reference);
    assert_eq!(
        metric(&c, &d, &format!("{M}_images_downloaded_total"), "").await,
        1.0
    );
    assert_eq!(
        metric(&c, &d, &format!("{M}_download_bytes_total"), "").await,
        bytes.len() as f64,
        "the object was fetched once"
    );
}

#[tokio::test]
async fn replaced_object_is_downloaded_again() {
    let s = setup();
    let (v1, ref1) = qcow2_image(&s.dir, "v1", "8M");
    let (v2, ref2) = qcow2_image(&s.dir, "v2", "12M");
    assert_ne!(v1, v2);
    // Every hit asks the source whether the object changed.
    let config =
        s.s3.configure(TestConfig::new(&s.dir))
            .set("cache.revalidate_interval", "0s");
    let d = Daemon::start(&s.dir, &config);
    let c = client();
    let url = format!("{}/vm-images/rolling.qcow2", s.s3.endpoint());
    for (i, (bytes, reference, with_sum)) in [
        (&v1, &ref1, false),
        (&v2, &ref2, false),
        (&v1, &ref1, true),
        (&v2, &ref2, true),
    ]
    .into_iter()
    .enumerate()
    {
        s.s3.put("vm-images", "rolling.qcow2", bytes);
        if with_sum {
            s.s3.put(
                "vm-images",
                "rolling.qcow2.sha256",
                sha256_hex(bytes).as_bytes(),
            );
        }
        let name = format!("roll-{i}");
        let id = submit(
            &c,
            &d,
            json!({"image_url": url, "volume_name": name, "volume_size_gb": 1}),
        )
        .await;
        let job = wait_job(&c, &d, &id, MINUTE).await;
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["cache_hit"], false, "round {i}: the object changed");
        assert_volume_matches(&s.dir.join("volumes").join(&name), reference);
        let images = cache_images(&c, &d).await;
        assert_eq!(
            images.len(),
            1,
            "round {i}: the superseded entry is gone: {images:?}"
        );
    }
}

#[tokio::test]
async fn interrupted_download_resumes_after_restart_fetching_only_missing_parts() {
    let s = setup();
    // 48 MiB in 12 parts of 4 MiB, 4 at a time, each at 2 MB/s: about 6 s in all.
    let size = 48u64 << 20;
    let bytes = random_bytes(size as usize, 0x1234_5678_9abc_def1);
    s.s3.put("vm-images", "big.raw", &bytes);
    s.s3.put("vm-images", "big.raw.sha256", sha256_hex(&bytes).as_bytes());
    let proxy = FaultProxy::start(s.s3.port, vec![], Some(2_000_000));
    let config =
        s.s3.configure(TestConfig::new(&s.dir))
            .set("s3.endpoint", format!("http://127.0.0.1:{}", proxy.port))
            .set("sources.part_size", 4 << 20)
            .set("sources.parallel_parts", 4);
    let c = client();
    let url = format!("http://127.0.0.1:{}/vm-images/big.raw", proxy.port);

    let d = Daemon::start(&s.dir, &config);
    let id = fetch_to_cache(&c, &d, &url, Some("raw")).await;
    // Until the checkpoint records 7 of the 12 parts as synced.
    let synced_parts = |dir: &Path| -> usize {
        cache_files(dir)
            .iter()
            .filter(|f| f.ends_with(".partial.json"))
            .filter_map(|f| std::fs::read(dir.join("cache").join(f)).ok())
            .filter_map(|b| serde_json::from_slice::<Value>(&b).ok())
            .map(|v| v["done"].as_array().map_or(0, |a| a.len()))
            .max()
            .unwrap_or(0)
    };
    wait_until(&c, &d, &id, MINUTE, |_| synced_parts(&s.dir) >= 7).await;
    d.kill9();
    let before = proxy.server_bytes();
    let partials = partial_files(&s.dir);
    assert_eq!(
        partials.len(),
        2,
        "partial file and its checkpoint: {partials:?}"
    );

    let d = Daemon::start(&s.dir, &config);
    let (_, old) = get(&c, &d.url(&format!("/api/v1/jobs/{id}"))).await;
    assert_eq!(old["error"], "interrupted by daemon restart");
    let id = fetch_to_cache(&c, &d, &url, Some("raw")).await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["kind"], "cache_fetch");
    let after_restart = proxy.server_bytes() - before;
    assert!(
        after_restart > 0 && after_restart < size * 6 / 10,
        "resumed: the server sent {after_restart} of {size} bytes after the restart"
    );
    let fetched = metric(&c, &d, &format!("{M}_download_bytes_total"), "").await;
    assert!(fetched < (size * 6 / 10) as f64, "fetched {fetched}");
    assert!(d.log().contains("resuming download from the partial file"));
    let images = cache_images(&c, &d).await;
    assert_eq!(
        images[0]["checksum"],
        sha256_hex(&bytes),
        "resumed file verifies"
    );
    let path = images[0]["path"].as_str().unwrap();
    assert!(std::fs::read(path).unwrap() == bytes, "the right bytes");
}

#[tokio::test]
async fn eviction_keeps_the_bound_and_spares_entries_in_use() {
    let s = setup();
    let mut names = Vec::new();
    for i in 0..4 {
        let img = s.dir.join(format!("e{i}.qcow2"));
        make_dense_qcow2(&img, 6 << 20, 64 << 20, i + 1);
        let bytes = std::fs::read(&img).unwrap();
        s.s3.put("vm-images", &format!("e{i}.qcow2"), &bytes);
        names.push((format!("e{i}"), bytes.len() as u64));
    }
    let entry = names[0].1;
    // Room for two entries, not three.
    let bound = entry * 2 + entry / 2;
    let path = slow_qemu_img_path(&s.dir, 8);
    let config =
        s.s3.configure(TestConfig::new(&s.dir))
            .set("cache.max_size_bytes", bound as i64);
    let d = Daemon::start_with_env(&s.dir, &config, &[("PATH", &path)]);
    let c = client();
    let url = |n: &str| format!("{}/vm-images/{n}.qcow2", s.s3.endpoint());

    // e0 is provisioned (in use while its slow conversion runs); e1..e3 are prefetched.
    let busy = submit(
        &c,
        &d,
        json!({"image_url": url("e0"), "volume_name": "busy", "volume_size_gb": 1}),
    )
    .await;
    wait_until(&c, &d, &busy, MINUTE, |v| {
        v["progress"]["stage"] == "converting"
    })
    .await;
    for n in ["e1", "e2", "e3"] {
        let id = fetch_to_cache(&c, &d, &url(n), None).await;
        let job = wait_job(&c, &d, &id, MINUTE).await;
        assert_eq!(job["status"], "completed", "{job}");
    }
    let images = cache_images(&c, &d).await;
    let urls: Vec<&str> = images
        .iter()
        .map(|i| i["image_url"].as_str().unwrap())
        .collect();
    assert!(
        urls.contains(&url("e0").as_str()),
        "the entry in use survives: {urls:?}"
    );
    assert!(
        urls.contains(&url("e3").as_str()),
        "the newest stays: {urls:?}"
    );
    assert!(
        !urls.contains(&url("e1").as_str()),
        "least recently used evicted first: {urls:?}"
    );
    // While e0 is in use the bound may be exceeded by it alone; once free, it holds.
    let key0 = images.iter().find(|i| i["image_url"] == url("e0")).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, v) = delete(&c, &d.url(&format!("/api/v1/cache/images/{key0}"))).await;
    assert_eq!(status, 409, "deleting an entry in use is refused: {v}");
    let job = wait_job(&c, &d, &busy, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    let id = fetch_to_cache(&c, &d, &url("e1"), None).await;
    wait_job(&c, &d, &id, MINUTE).await;
    let total: u64 = cache_images(&c, &d)
        .await
        .iter()
        .map(|i| i["size"].as_u64().unwrap())
        .sum();
    assert!(total <= bound, "cache holds {total} bytes, bound {bound}");
    assert!(
        metric(
            &c,
            &d,
            &format!("{M}_cache_evictions_total"),
            "reason=\"size\""
        )
        .await
            >= 2.0
    );
}

#[tokio::test]
async fn cache_api_routes() {
    let s = setup();
    let (bytes, _) = qcow2_image(&s.dir, "img", "8M");
    s.s3.put("vm-images", "api.qcow2", &bytes);
    let d = Daemon::start(&s.dir, &s.s3.configure(TestConfig::new(&s.dir)));
    let c = client();
    let url = format!("{}/vm-images/api.qcow2", s.s3.endpoint());
    let id = fetch_to_cache(&c, &d, &url, None).await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["kind"], "cache_fetch");
    assert_eq!(job["progress"]["bytes_total"], bytes.len());
    assert!(job.get("volume_path").is_none());

    let (status, v) = get(&c, &d.url("/api/v1/cache/images?offset=0&limit=10")).await;
    assert_eq!(status, 200);
    assert_eq!(v["count"], 1);
    assert_eq!(
        (v["offset"].as_u64(), v["limit"].as_u64()),
        (Some(0), Some(10))
    );
    let img = &v["images"][0];
    for field in [
        "key",
        "path",
        "size",
        "checksum",
        "image_url",
        "last_used",
        "mod_time",
    ] {
        assert!(!img[field].is_null(), "{field} missing in {img}");
    }
    let key = img["key"].as_str().unwrap().to_string();
    assert!(Path::new(img["path"].as_str().unwrap()).exists());
    let (status, v) = get(&c, &d.url("/api/v1/cache/images?offset=1")).await;
    assert_eq!((status, v["images"].as_array().unwrap().len()), (200, 0));
    let (status, _) = get(&c, &d.url("/api/v1/cache/images?limit=1001")).await;
    assert_eq!(status, 400);

    let (status, v) = delete(&c, &d.url("/api/v1/cache/images/NOT-HEX")).await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = delete(
        &c,
        &d.url(&format!("/api/v1/cache/images/{}", key.to_uppercase())),
    )
    .await;
    assert_eq!(status, 400, "uppercase keys are not keys: {v}");
    let (status, v) = delete(&c, &d.url(&format!("/api/v1/cache/images/{key}"))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "deleted");
    assert_eq!(v["key"], key);
    assert!(cache_files(&s.dir).is_empty());
    let (status, _) = delete(&c, &d.url(&format!("/api/v1/cache/images/{key}"))).await;
    assert_eq!(status, 404);

    // Hosts other than the endpoint are refused at request time.
    let (status, v) = post(
        &c,
        &d.url("/api/v1/cache/fetch"),
        &json!({"image_url": "http://169.254.169.254/latest/meta-data"}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
}

#[tokio::test]
async fn a_dropped_connection_is_retried_and_the_download_completes() {
    let s = setup();
    let img = s.dir.join("flaky.qcow2");
    make_dense_qcow2(&img, 12 << 20, 32 << 20, 99);
    let bytes = std::fs::read(&img).unwrap();
    let reference = s.dir.join("flaky.ref.raw");
    reference_raw(&img, "qcow2", &reference);
    s.s3.put("vm-images", "flaky.qcow2", &bytes);
    s.s3.put(
        "vm-images",
        "flaky.qcow2.sha256",
        sha256_hex(&bytes).as_bytes(),
    );
    // The first two connections break after 3 MB of response.
    let proxy = flaky_proxy(s.s3.port, 3_000_000, 2);
    let config =
        s.s3.configure(TestConfig::new(&s.dir))
            .set("s3.endpoint", format!("http://127.0.0.1:{proxy}"))
            .set("s3.retries", 4);
    let d = Daemon::start(&s.dir, &config);
    let c = client();
    let url = format!("http://127.0.0.1:{proxy}/vm-images/flaky.qcow2");
    let id = submit(
        &c,
        &d,
        json!({"image_url": url, "volume_name": "flaky", "volume_size_gb": 1}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}\n{}", d.log());
    assert_volume_matches(&s.dir.join("volumes/flaky"), &reference);
    let images = cache_images(&c, &d).await;
    assert_eq!(
        images[0]["checksum"],
        sha256_hex(&bytes),
        "the retried download verifies"
    );
    assert_eq!(images[0]["checksum_verified"], true);
}
