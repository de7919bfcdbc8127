//! Declared images (`[[images]]`) against the real binary and real sources (s3s-fs, nginx,
//! file://): cached at start, listed by `GET /api/v1/images`, pinned under eviction pressure,
//! refreshed when the object changes, kept by a running job while the name moves on, unpinned
//! (not deleted) when dropped, a bad declaration refused at reload with the old one kept, and
//! provision and prefetch by name recording the name and the digest used.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const M: &str = "libvirt_volume_provisioner";
const MINUTE: Duration = Duration::from_secs(60);

/// One `[[images]]` entry.
fn decl(name: &str, url: &str, refresh: &str, extra: &[(&str, toml::Value)]) -> toml::Value {
    let mut t = toml::Table::new();
    t.insert("name".into(), name.into());
    t.insert("url".into(), url.into());
    t.insert("refresh".into(), refresh.into());
    for (k, v) in extra {
        t.insert(k.to_string(), v.clone());
    }
    toml::Value::Table(t)
}

/// `config` with `images` declared, fetched at once (no window).
fn declaring(config: TestConfig, images: Vec<toml::Value>) -> TestConfig {
    config
        .set("cache.declared_fetch_window", "0s")
        .set("images", toml::Value::Array(images))
}

/// Replaces a file the way deploy tools do: a temporary file renamed over it.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn sighup(d: &Daemon) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

/// `GET /api/v1/images`.
async fn images(c: &reqwest::Client, d: &Daemon) -> Vec<Value> {
    let (status, v) = get(c, &d.url("/api/v1/images")).await;
    assert_eq!(status, 200, "{v}");
    v["images"].as_array().cloned().unwrap_or_default()
}

/// The declared image `name` once `pred` holds for it.
async fn image_when(
    c: &reqwest::Client,
    d: &Daemon,
    name: &str,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let list = images(c, d).await;
        if let Some(i) = list.iter().find(|i| i["name"] == name)
            && pred(i)
        {
            return i.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{name}: condition not reached: {list:?}\nlog:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Cache keys the daemon lists.
async fn cache_keys(c: &reqwest::Client, d: &Daemon) -> Vec<String> {
    let (_, v) = get(c, &d.url("/api/v1/cache/images?limit=1000")).await;
    v["images"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["key"].as_str().unwrap().to_string())
        .collect()
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok())
}

#[tokio::test]
async fn declared_image_is_cached_at_start_and_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let s3 = S3Server::start(&dir.join("s3"));
    let image = dir.join("u.qcow2");
    make_dense_qcow2(&image, 1 << 20, 16 << 20, 3);
    s3.put_object("vm-images", "u.qcow2", &image);
    let config = declaring(
        s3.configure(TestConfig::new(dir)),
        vec![decl("ubuntu-24.04", "s3://vm-images/u.qcow2", "1h", &[])],
    );
    let d = Daemon::start(dir, &config);
    let c = client();
    let i = image_when(&c, &d, "ubuntu-24.04", MINUTE, |i| i["cached"] == true).await;
    let digest = format!("sha256:{}", sha256_hex(&std::fs::read(&image).unwrap()));
    assert_eq!(i["digest"], digest.as_str(), "{i}");
    assert_eq!(i["url"], "s3://vm-images/u.qcow2");
    assert_eq!(i["golden"], false);
    assert!(is_rfc3339(&i["last_checked"]), "{i}");
    assert!(is_rfc3339(&i["last_changed"]), "{i}");
    assert!(is_rfc3339(&i["next_check"]), "{i}");
    assert!(i["last_error"].is_null(), "{i}");
    let fields: Vec<&str> = i.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        fields.len(),
        9,
        "name, url, digest, cached, golden, last_checked, last_changed, next_check, last_error: {fields:?}"
    );
    // The entry is in the cache, and the metrics say so.
    assert!(
        cache_keys(&c, &d)
            .await
            .contains(&key_of(&c, &d, &digest).await)
    );
    let text = scrape(&c, &d).await;
    assert_eq!(
        metric_in(&text, &format!("{M}_declared_images"), "state=\"cached\""),
        1.0
    );
    assert!(
        metric_in(
            &text,
            &format!("{M}_declared_image_age_seconds"),
            "image=\"ubuntu-24.04\""
        ) >= 0.0
    );
    // A restart finds it cached: not fetched nor asked for again before its refresh is due.
    drop(d);
    let d = Daemon::start(dir, &config);
    let i = image_when(&c, &d, "ubuntu-24.04", MINUTE, |i| i["cached"] == true).await;
    assert_eq!(i["digest"], digest.as_str());
    assert!(
        i["last_checked"].is_null() && i["last_changed"].is_null(),
        "{i}"
    );
}

#[tokio::test]
async fn provision_and_prefetch_by_name_record_name_and_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let image = dir.join("images/base.qcow2");
    make_qcow2(&image, "8M");
    let config = declaring(
        TestConfig::new(dir),
        vec![decl("base", &file_url(&image), "1h", &[])],
    );
    let d = Daemon::start(dir, &config);
    let c = client();
    let i = image_when(&c, &d, "base", MINUTE, |i| i["cached"] == true).await;
    let id = submit(
        &c,
        &d,
        json!({"image": "base", "volume_name": "vm-by-name", "volume_size_gb": 1}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["image"], "base");
    assert_eq!(job["image_digest"], i["digest"]);
    assert_eq!(job["image_url"], file_url(&image).as_str());
    assert_eq!(job["cache_hit"], true);
    // Prefetch by name.
    let (status, v) = post(&c, &d.url("/api/v1/cache/fetch"), &json!({"image": "base"})).await;
    assert_eq!(status, 202, "{v}");
    let job = wait_job(&c, &d, v["job_id"].as_str().unwrap(), MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["image"], "base");
    assert_eq!(job["image_digest"], i["digest"]);
    // Both, neither, an unknown name.
    let url = file_url(&image);
    for (body, reason) in [
        (
            json!({"image": "base", "image_url": url, "volume_name": "x", "volume_size_gb": 1}),
            "invalid_request",
        ),
        (
            json!({"volume_name": "x", "volume_size_gb": 1}),
            "invalid_request",
        ),
        (
            json!({"image": "nope", "volume_name": "x", "volume_size_gb": 1}),
            "unknown_image",
        ),
    ] {
        let (status, v) = post(&c, &d.url("/api/v1/jobs"), &body).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["reason"], reason, "{body}: {v}");
    }
    let (status, v) = post(&c, &d.url("/api/v1/cache/fetch"), &json!({"image": "nope"})).await;
    assert_eq!((status, v["reason"].as_str()), (400, Some("unknown_image")));
    // The CLI lists them.
    let out = std::process::Command::new(BIN)
        .args(["--server", &d.base, "image", "list"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("base"), "{text}");
}

#[tokio::test]
async fn pinned_under_eviction_pressure_and_unpinned_when_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let images_dir = dir.join("images");
    let pinned = images_dir.join("pinned.qcow2");
    make_dense_qcow2(&pinned, 1 << 20, 8 << 20, 11);
    let others: Vec<_> = (0..3)
        .map(|i| {
            let p = images_dir.join(format!("other-{i}.qcow2"));
            make_dense_qcow2(&p, 1 << 20, 8 << 20, 20 + i);
            p
        })
        .collect();
    // Room for about two images: the declared one plus one other.
    let config = declaring(
        TestConfig::new(dir)
            .set("cache.max_size_bytes", (2 << 20) + (600 << 10))
            .set("cache.max_age", "3s")
            .set("reload.watch_files", false),
        vec![decl("pinned", &file_url(&pinned), "1h", &[])],
    );
    let d = Daemon::start(dir, &config);
    let c = client();
    let i = image_when(&c, &d, "pinned", MINUTE, |i| i["cached"] == true).await;
    let key = key_of(&c, &d, i["digest"].as_str().unwrap()).await;
    // Past max_age, and least recently used: without the pin it would go first.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for other in &others {
        let id = fetch_to_cache(&c, &d, &file_url(other), None).await;
        let job = wait_job(&c, &d, &id, MINUTE).await;
        assert_eq!(job["status"], "completed", "{job}");
    }
    let keys = cache_keys(&c, &d).await;
    assert!(keys.contains(&key), "the declared image stays: {keys:?}");
    assert!(keys.len() <= 2, "the others were evicted: {keys:?}");
    assert!(metric(&c, &d, &format!("{M}_cache_evictions_total"), "").await >= 2.0);

    // Dropped from the declaration: unpinned, not deleted.
    let dropped = declaring(
        TestConfig::new(dir)
            .set("cache.max_size_bytes", (2 << 20) + (600 << 10))
            .set("cache.max_age", "3s")
            .set("reload.watch_files", false),
        vec![],
    );
    replace(&d.config_path, &dropped.render());
    sighup(&d);
    let deadline = Instant::now() + MINUTE;
    while !images(&c, &d).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "reload not applied:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cache_keys(&c, &d).await.contains(&key), "not deleted");
    // Now an ordinary entry: the next download evicts it (past max_age).
    let id = fetch_to_cache(&c, &d, &file_url(&others[0]), None).await;
    wait_job(&c, &d, &id, MINUTE).await;
    assert!(!cache_keys(&c, &d).await.contains(&key), "evictable again");
}

/// The object behind a declared image changes: the next refresh fetches the new version and
/// the name moves to it; unchanged refreshes cost one request and change nothing.
async fn refreshes_when_the_object_changes(
    d: &Daemon,
    name: &str,
    change: impl FnOnce(),
    new_digest: &str,
) {
    let c = client();
    let first = image_when(&c, d, name, MINUTE, |i| i["cached"] == true).await;
    // A few unchanged refreshes.
    let deadline = Instant::now() + MINUTE;
    while metric(
        &c,
        d,
        &format!("{M}_declared_image_refreshes_total"),
        "result=\"unchanged\"",
    )
    .await
        < 2.0
    {
        assert!(Instant::now() < deadline, "no refresh:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(images(&c, d).await[0]["digest"], first["digest"]);
    change();
    let i = image_when(&c, d, name, MINUTE, |i| i["digest"] == new_digest).await;
    assert_ne!(i["last_changed"], first["last_changed"], "{i}");
    assert!(i["last_error"].is_null(), "{i}");
    assert!(
        metric(
            &c,
            d,
            &format!("{M}_declared_image_refreshes_total"),
            "result=\"changed\""
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn refreshed_when_the_s3_object_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let s3 = S3Server::start(&dir.join("s3"));
    let (v1, v2) = (dir.join("v1.qcow2"), dir.join("v2.qcow2"));
    make_dense_qcow2(&v1, 1 << 20, 16 << 20, 1);
    make_dense_qcow2(&v2, 1 << 20, 16 << 20, 2);
    s3.put_object("vm-images", "r.qcow2", &v1);
    let config = declaring(
        s3.configure(TestConfig::new(dir)),
        vec![decl("r", "s3://vm-images/r.qcow2", "1s", &[])],
    );
    let d = Daemon::start(dir, &config);
    let new_digest = format!("sha256:{}", sha256_hex(&std::fs::read(&v2).unwrap()));
    refreshes_when_the_object_changes(
        &d,
        "r",
        || s3.put_object("vm-images", "r.qcow2", &v2),
        &new_digest,
    )
    .await;
}

#[tokio::test]
async fn refreshed_when_the_http_object_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let (v1, v2) = (dir.join("v1.qcow2"), dir.join("v2.qcow2"));
    make_dense_qcow2(&v1, 1 << 20, 16 << 20, 1);
    // Another size too: nginx's ETag is mtime and size, and the mtime has 1 s resolution.
    make_dense_qcow2(&v2, 3 << 19, 16 << 20, 2);
    std::fs::copy(&v1, www.join("r.qcow2")).unwrap();
    let nginx = Nginx::start(
        &dir.join("nginx"),
        &format!(
            "server {{ listen 127.0.0.1:{{port}}; root {}; }}",
            www.display()
        ),
    );
    let config = declaring(
        TestConfig::new(dir).set(
            "sources.allowed_hosts",
            vec![format!("127.0.0.1:{}", nginx.port)],
        ),
        vec![decl("r", &nginx.url("/r.qcow2"), "1s", &[])],
    );
    let d = Daemon::start(dir, &config);
    let new_digest = format!("sha256:{}", sha256_hex(&std::fs::read(&v2).unwrap()));
    let www2 = www.clone();
    refreshes_when_the_object_changes(
        &d,
        "r",
        move || {
            let tmp = www2.join("r.qcow2.new");
            std::fs::copy(&v2, &tmp).unwrap();
            std::fs::rename(&tmp, www2.join("r.qcow2")).unwrap();
        },
        &new_digest,
    )
    .await;
    // One conditional request per unchanged refresh: HEADs only, and GETs only for the two
    // versions' downloads.
    let gets = nginx.gets(nginx.port, "/r.qcow2").len();
    assert!(gets <= 4, "{gets} GETs: {:?}", nginx.access_log());
}

#[tokio::test]
async fn a_running_job_keeps_its_version() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let www = dir.join("images");
    let v1 = dir.join("v1.raw");
    let v2 = dir.join("v2.raw");
    std::fs::write(&v1, vec![0x11u8; 4 << 20]).unwrap();
    std::fs::write(&v2, vec![0x22u8; 5 << 20]).unwrap();
    let served = www.join("moving.raw");
    std::fs::copy(&v1, &served).unwrap();
    let config = declaring(
        TestConfig::new(dir),
        vec![decl(
            "moving",
            &file_url(&served),
            "1s",
            &[("image_type", "raw".into())],
        )],
    );
    // Conversions wait 6 s: the job holds its version while the name moves on.
    let path = slow_qemu_img_path(dir, 6);
    let d = Daemon::start_with_env(dir, &config, &[("PATH", &path)]);
    let c = client();
    let first = image_when(&c, &d, "moving", MINUTE, |i| i["cached"] == true).await;
    let id = submit(
        &c,
        &d,
        json!({"image": "moving", "volume_name": "keeps", "volume_size_gb": 1}),
    )
    .await;
    wait_until(&c, &d, &id, MINUTE, |j| {
        j["progress"]["stage"] == "converting"
    })
    .await;
    let tmp_file = www.join("moving.raw.new");
    std::fs::copy(&v2, &tmp_file).unwrap();
    std::fs::rename(&tmp_file, &served).unwrap();
    let second = image_when(&c, &d, "moving", MINUTE, |i| i["digest"] != first["digest"]).await;
    let job = get(&c, &d.url(&format!("/api/v1/jobs/{id}"))).await.1;
    assert_eq!(
        job["status"], "running",
        "the name moved while the job runs: {job}"
    );
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["image_digest"], first["digest"], "{job}");
    let volume = std::fs::read(dir.join("volumes/keeps")).unwrap();
    assert!(
        volume[..4 << 20].iter().all(|b| *b == 0x11),
        "the old version was written"
    );
    // The old version is an ordinary entry now; the new one is what the name gives.
    let id = submit(
        &c,
        &d,
        json!({"image": "moving", "volume_name": "next", "volume_size_gb": 1}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["image_digest"], second["digest"], "{job}");
}

#[tokio::test]
async fn a_bad_declaration_at_reload_keeps_the_old_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let image = dir.join("images/good.qcow2");
    make_dense_qcow2(&image, 1 << 20, 8 << 20, 5);
    // Reloads by SIGHUP only: one signal, one reload (a file event racing the watcher's start
    // under load cannot be lost or doubled).
    let base = TestConfig::new(dir)
        .set("cache.max_size_bytes", 4 << 20)
        .set("reload.watch_files", false);
    let config = declaring(
        base.clone(),
        vec![decl("good", &file_url(&image), "1h", &[])],
    );
    let d = Daemon::start(dir, &config);
    let c = client();
    image_when(&c, &d, "good", MINUTE, |i| i["cached"] == true).await;
    let bad = [
        (
            decl(
                "good",
                &file_url(&image),
                "1h",
                &[("colour", "blue".into())],
            ),
            "colour",
        ),
        (
            decl(
                "elsewhere",
                "https://not-allowed.example/x.qcow2",
                "1h",
                &[],
            ),
            "images.elsewhere",
        ),
    ];
    let mut errors = 0.0;
    for (entry, named) in bad {
        let text = declaring(
            base.clone(),
            vec![decl("good", &file_url(&image), "1h", &[]), entry],
        )
        .render();
        errors += 1.0;
        let view = refused_reload(&c, &d, &text, errors).await;
        let error = view["last_reload_error"].as_str().unwrap_or("");
        assert!(error.contains(named), "{named}: {view}");
        let names: Vec<Value> = images(&c, &d)
            .await
            .iter()
            .map(|i| i["name"].clone())
            .collect();
        assert_eq!(names, vec![json!("good")]);
    }
    // A declaration that cannot fit the cache bound, named in the error.
    let text = declaring(
        base.clone().set("cache.max_size_bytes", 512 << 10),
        vec![decl("good", &file_url(&image), "1h", &[])],
    )
    .render();
    errors += 1.0;
    let view = refused_reload(&c, &d, &text, errors).await;
    let error = view["last_reload_error"].as_str().unwrap_or("");
    assert!(
        error.contains("images.good") && error.contains("cache.max_size_bytes"),
        "{view}"
    );
    assert_eq!(view["config"]["cache"]["max_size_bytes"], 4 << 20, "{view}");
}

/// Writes `text` as the daemon's config, sends SIGHUP, waits until the refused reloads count
/// `errors`, and returns `GET /api/v1/config` then.
async fn refused_reload(c: &reqwest::Client, d: &Daemon, text: &str, errors: f64) -> Value {
    replace(&d.config_path, text);
    sighup(d);
    let deadline = Instant::now() + MINUTE;
    let reloads = format!("{M}_config_reload_total");
    while metric(c, d, &reloads, "result=\"error\"").await < errors {
        assert!(Instant::now() < deadline, "no refused reload:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    get(c, &d.url("/api/v1/config")).await.1
}
