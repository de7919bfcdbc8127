//! The image path against a real HTTP server (nginx started by the test with its own
//! configuration): redirects are followed only to allowed hosts.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

struct Site {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    nginx: Nginx,
    /// The image the allowed server publishes.
    image: Vec<u8>,
}

/// nginx serving `www/` on `port` (the allowed host) and `foreign/` on `port2` (a host the
/// daemon must not reach), plus `extra` inside the first server block.
fn site(extra: &str) -> Site {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let image = random_bytes(4 << 20, 7);
    for (sub, bytes) in [("www", &image), ("foreign", &random_bytes(4 << 20, 8))] {
        for path in ["img.raw", "getonly/img.raw"] {
            let p = dir.join(sub).join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
    }
    let servers = format!(
        "server {{ listen 127.0.0.1:{{port}}; root {www}; {extra} }}\n\
         server {{ listen 127.0.0.1:{{port2}}; root {foreign}; }}",
        www = dir.join("www").display(),
        foreign = dir.join("foreign").display(),
    );
    let nginx = Nginx::start(&dir.join("nginx"), &servers);
    Site {
        _tmp: tmp,
        dir,
        nginx,
        image,
    }
}

fn daemon(s: &Site) -> Daemon {
    let config = TestConfig::new(&s.dir).set(
        "sources.allowed_hosts",
        toml::Value::Array(vec![format!("127.0.0.1:{}", s.nginx.port).into()]),
    );
    Daemon::start(&s.dir, &config)
}

async fn cache_images(c: &reqwest::Client, d: &Daemon) -> Vec<Value> {
    let (status, v) = get(c, &d.url("/api/v1/cache/images?limit=1000")).await;
    assert_eq!(status, 200, "{v}");
    v["images"].as_array().unwrap().clone()
}

#[tokio::test]
async fn redirects_to_hosts_outside_the_allow_list_are_not_followed() {
    let s = site(
        "location /r301/ { return 301 http://127.0.0.1:{port2}/img.raw; }
         location /r302/ { return 302 http://127.0.0.1:{port2}/img.raw; }
         location /r307/ { return 307 http://127.0.0.1:{port2}/img.raw; }
         location /r308/ { return 308 http://127.0.0.1:{port2}/img.raw; }
         location /getonly/ { if ($request_method = GET) { return 302 http://127.0.0.1:{port2}/img.raw; } }
         location /hop/ { rewrite ^/hop/(.*)$ http://127.0.0.1:{port}/$1 redirect; }
         location /loop/ { return 302 http://127.0.0.1:{port}/loop/img.raw; }",
    );
    let d = daemon(&s);
    let c = client();
    let refused = ["r301", "r302", "r307", "r308", "getonly", "loop"];
    for (i, prefix) in refused.iter().enumerate() {
        let url = s.nginx.url(&format!("/{prefix}/img.raw"));
        let volume = format!("redirected-{i}");
        let id = submit(
            &c,
            &d,
            json!({"image_url": url, "volume_name": volume, "volume_size_gb": 1, "image_type": "raw"}),
        )
        .await;
        let job = wait_job(&c, &d, &id, MINUTE).await;
        assert_eq!(job["status"], "failed", "{prefix}: {job}");
        let error = job["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("redirect") && error.contains("refused"),
            "{prefix}: a clear error: {error}"
        );
        if *prefix != "loop" {
            assert!(error.contains("sources.allowed_hosts"), "{prefix}: {error}");
        }
        assert!(
            !s.dir.join("volumes").join(&volume).exists(),
            "{prefix}: no volume"
        );
    }
    assert_eq!(
        s.nginx.requests(s.nginx.port2, "/"),
        Vec::<String>::new(),
        "the foreign host was never asked"
    );
    assert!(cache_images(&c, &d).await.is_empty(), "nothing was cached");
    let leftovers = cache_files(&s.dir);
    assert!(leftovers.is_empty(), "cache files: {leftovers:?}");

    // A redirect to an allowed host is followed.
    let id = submit(
        &c,
        &d,
        json!({"image_url": s.nginx.url("/hop/img.raw"), "volume_name": "hop", "volume_size_gb": 1, "image_type": "raw"}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}\n{}", d.log());
    let volume = std::fs::read(s.dir.join("volumes/hop")).unwrap();
    assert!(volume[..s.image.len()] == s.image[..], "the allowed bytes");
}

#[tokio::test]
async fn one_retry_layer_each_attempt_is_one_request() {
    // HEAD answers; every GET of the image gets 503 (its .sha256 is a plain 404).
    let s = site(
        "location = /down/img.raw { if ($request_method = GET) { return 503; } }
         location = /sum503/img.raw.sha256 { return 503; }",
    );
    for p in ["down/img.raw", "sum503/img.raw"] {
        std::fs::create_dir_all(s.dir.join("www").join(p).parent().unwrap()).unwrap();
        std::fs::write(s.dir.join("www").join(p), &s.image).unwrap();
    }
    let config = TestConfig::new(&s.dir)
        .set(
            "sources.allowed_hosts",
            toml::Value::Array(vec![format!("127.0.0.1:{}", s.nginx.port).into()]),
        )
        .set("s3.retries", 2)
        .set("s3.retry_backoff", "20ms")
        .set("s3.retry_max_backoff", "50ms");
    let d = Daemon::start(&s.dir, &config);
    let c = client();
    for (path, uri) in [
        ("/down/img.raw", "/down/img.raw"),
        ("/sum503/img.raw", "/sum503/img.raw.sha256"),
    ] {
        let id = fetch_to_cache(&c, &d, &s.nginx.url(path), None).await;
        let job = wait_job(&c, &d, &id, MINUTE).await;
        assert_eq!(job["status"], "failed", "{job}");
        let gets = s.nginx.gets(s.nginx.port, uri);
        assert_eq!(
            gets.len(),
            3,
            "s3.retries = 2: three requests in all: {gets:?}"
        );
    }
}

/// Starts the daemon with its cache directory on a `size_mib` tmpfs of its own (a private
/// mount namespace), so that free space is small and exact.
fn daemon_with_small_cache(s: &Site, config: TestConfig, size_mib: u32) -> Daemon {
    Daemon::start_on_small_tmpfs(&s.dir, &config, &[], &s.dir.join("cache"), size_mib)
}

#[tokio::test]
async fn cancelling_the_only_job_stops_its_download_and_frees_its_space() {
    // slow.raw comes at 4 MB/s (6 s in all); big.raw at full speed.
    let s = site("location = /slow.raw { limit_rate 4m; }");
    let slow = random_bytes(24 << 20, 11);
    let big = random_bytes(44 << 20, 12);
    std::fs::write(s.dir.join("www/slow.raw"), &slow).unwrap();
    std::fs::write(s.dir.join("www/big.raw"), &big).unwrap();
    let config = TestConfig::new(&s.dir)
        .set(
            "sources.allowed_hosts",
            toml::Value::Array(vec![format!("127.0.0.1:{}", s.nginx.port).into()]),
        )
        .set("cache.min_free_bytes", 0);
    // 64 MiB: the 24 MiB download's reservation and the 44 MiB one do not fit together.
    let d = daemon_with_small_cache(&s, config, 64);
    let c = client();

    let id = fetch_to_cache(&c, &d, &s.nginx.url("/slow.raw"), Some("raw")).await;
    wait_until(&c, &d, &id, MINUTE, |v| {
        v["progress"]["bytes_processed"].as_u64().unwrap_or(0) > (2 << 20)
    })
    .await;
    let (status, v) = post(&c, &d.url(&format!("/api/v1/jobs/{id}/cancel")), &json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(wait_job(&c, &d, &id, MINUTE).await["status"], "cancelled");

    // The server sees the connection go within a moment, long before the 6 s it would take.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let sent = loop {
        if let Some(line) = s.nginx.gets(s.nginx.port, "/slow.raw").first() {
            break line.rsplit(' ').next().unwrap().parse::<u64>().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the download still runs: nginx has not finished the request\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        sent < slow.len() as u64 / 2,
        "nginx sent {sent} of {} bytes",
        slow.len()
    );

    // Its reservation is gone: the 44 MiB prefetch fits.
    let id = fetch_to_cache(&c, &d, &s.nginx.url("/big.raw"), Some("raw")).await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}\n{}", d.log());

    // The next job for the stopped key downloads afresh and succeeds.
    let id = fetch_to_cache(&c, &d, &s.nginx.url("/slow.raw"), Some("raw")).await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}\n{}", d.log());
    let images = cache_images(&c, &d).await;
    let entry = images
        .iter()
        .find(|i| i["image_url"] == s.nginx.url("/slow.raw"))
        .expect("slow.raw cached");
    assert_eq!(entry["checksum"], sha256_hex(&slow));
    assert_eq!(s.nginx.gets(s.nginx.port, "/slow.raw").len(), 2);
}
