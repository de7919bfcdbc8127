//! Every metric family of the monitoring spec moves when its event happens, checked on the real
//! daemon's /metrics: requests and latency (by route template), active jobs and health status
//! while a conversion runs, jobs and job durations by terminal status, cache hits/misses/ratio,
//! downloads and their sizes, image errors, storage operations, stage durations and
//! throughput, dependencies_up (S3 stopped and started again; a full disk under the job store),
//! storage errors, process metrics and build_info.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);
const M: &str = "libvirt_volume_provisioner";

fn m(name: &str) -> String {
    format!("{M}_{name}")
}

/// Polls /metrics until `name{labels}` satisfies `pred`; returns the value.
async fn wait_metric(
    c: &reqwest::Client,
    d: &Daemon,
    name: &str,
    labels: &str,
    timeout: Duration,
    pred: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = metric(c, d, name, labels).await;
        if pred(v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{{{labels}}} stayed at {v}\n{}",
            scrape(c, d).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn cancel(c: &reqwest::Client, d: &Daemon, id: &str) {
    let (status, v) = post(c, &d.url(&format!("/api/v1/jobs/{id}/cancel")), &json!({})).await;
    assert_eq!(status, 200, "cancel {id}: {v}");
}

fn file_size(p: &Path) -> f64 {
    std::fs::metadata(p).unwrap().len() as f64
}

/// One daemon with one job slot and conversions slowed by 3 s, taken through jobs that
/// complete, fail and get cancelled (queued and running), cache misses and a hit, a
/// cache-only fetch of a raw image, and rejected images.
#[tokio::test]
async fn job_request_cache_image_and_stage_metrics_move_with_their_events() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let images = dir.join("images");
    let config = TestConfig::new(dir).set("jobs.max_concurrent", 1);
    std::fs::create_dir_all(&images).unwrap();
    let qcow2 = images.join("a.qcow2");
    make_qcow2(&qcow2, "64M");
    let raw = images.join("r.raw");
    make_raw(&raw, 8 << 20);
    hostile_qcow2(&images, Hostile::BackingFile);
    hostile_qcow2(&images, Hostile::Huge);
    let path = slow_qemu_img_path(dir, 3);
    let d = Daemon::start_with_env(dir, &config, &[("PATH", &path)]);
    let c = client();

    // At start: slots known, healthy, nothing counted yet (terminal statuses exported at 0).
    let before = scrape(&c, &d).await;
    assert_eq!(metric_in(&before, &m("job_slots"), ""), 1.0);
    assert_eq!(metric_in(&before, &m("health_status"), ""), 1.0);
    assert_eq!(metric_in(&before, &m("active_jobs"), ""), 0.0);
    for status in ["completed", "failed", "cancelled"] {
        assert!(
            before.contains(&format!("{M}_jobs_total{{status=\"{status}\"}} 0")),
            "{status} exported at 0:\n{before}"
        );
    }
    for method in ["thin-snapshot", "copy"] {
        assert!(
            before.contains(&format!(
                "{M}_volumes_created_total{{method=\"{method}\"}} 0"
            )),
            "volumes_created_total{{method={method}}} exported at 0:\n{before}"
        );
    }
    assert_eq!(metric_in(&before, &m("cache_misses_total"), ""), 0.0);
    let put_ok_before = metric_in(
        &before,
        &m("storage_operations_total"),
        r#"operation="put_job",result="success""#,
    );

    // J1: cache miss, download, slow conversion. While it converts the only slot is busy.
    let j1 = submit(
        &c,
        &d,
        json!({"image_url": file_url(&qcow2), "volume_name": "m1", "volume_size_gb": 1}),
    )
    .await;
    wait_until(&c, &d, &j1, MINUTE, |v| {
        v["progress"]["stage"] == "converting"
    })
    .await;
    let busy = scrape(&c, &d).await;
    assert_eq!(metric_in(&busy, &m("active_jobs"), ""), 1.0, "{busy}");
    assert_eq!(metric_in(&busy, &m("health_status"), ""), 0.0, "degraded");
    let (_, health) = get(&c, &d.url("/health")).await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        metric_in(
            &busy,
            &m("storage_operations_total"),
            r#"operation="put_job",result="success""#
        ) > put_ok_before,
        "job records written to the store are counted"
    );
    // The download stage is over: its duration is observed and its throughput back at 0.
    assert_eq!(
        metric_in(
            &busy,
            &m("stage_duration_seconds_count"),
            r#"stage="download""#
        ),
        1.0
    );
    assert_eq!(
        metric_in(
            &busy,
            &m("stage_throughput_bytes_per_second"),
            r#"stage="download""#
        ),
        0.0
    );

    // J2 waits in the queue, then is cancelled there (it never ran: no duration observed).
    let j2 = submit(
        &c,
        &d,
        json!({"image_url": file_url(&qcow2), "volume_name": "m2", "volume_size_gb": 1}),
    )
    .await;
    assert_eq!(metric(&c, &d, &m("queued_jobs"), "").await, 1.0);
    cancel(&c, &d, &j2).await;
    assert_eq!(metric(&c, &d, &m("queued_jobs"), "").await, 0.0);
    assert_eq!(
        metric(&c, &d, &m("jobs_total"), r#"status="cancelled""#).await,
        1.0
    );

    let job = wait_job(&c, &d, &j1, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    let after = scrape(&c, &d).await;
    let q = |name: &str, labels: &str| metric_in(&after, &m(name), labels);
    assert_eq!(q("jobs_total", r#"status="completed""#), 1.0);
    // The directory backend copies: the job says so, and so does the counter by method.
    assert_eq!(job["method"], "copy", "{job}");
    assert_eq!(q("volumes_created_total", r#"method="copy""#), 1.0);
    assert_eq!(q("volumes_created_total", r#"method="thin-snapshot""#), 0.0);
    assert_eq!(q("active_jobs", ""), 0.0);
    assert_eq!(q("health_status", ""), 1.0);
    assert_eq!(
        q("job_duration_seconds_count", r#"status="completed""#),
        1.0
    );
    assert!(
        q("job_duration_seconds_sum", r#"status="completed""#) >= 3.0,
        "the job ran through a 3 s conversion:\n{after}"
    );
    assert_eq!(
        q(
            "job_duration_seconds_bucket",
            r#"status="completed",le="1""#
        ),
        0.0,
        "a job of more than 3 s is not in the 1 s bucket"
    );
    assert_eq!(q("stage_duration_seconds_count", r#"stage="convert""#), 1.0);
    assert!(q("stage_duration_seconds_sum", r#"stage="convert""#) >= 3.0);
    assert_eq!(
        q("stage_throughput_bytes_per_second", r#"stage="convert""#),
        0.0
    );
    assert_eq!(q("cache_misses_total", ""), 1.0);
    assert_eq!(q("cache_hits_total", ""), 0.0);
    assert_eq!(q("cache_hit_ratio", ""), 0.0);
    assert_eq!(q("images_downloaded_total", ""), 1.0);
    assert_eq!(
        q("image_download_size_bytes_count", r#"image_type="qcow2""#),
        1.0
    );
    assert_eq!(
        q("image_download_size_bytes_sum", r#"image_type="qcow2""#),
        file_size(&qcow2)
    );
    assert_eq!(q("download_bytes_total", ""), file_size(&qcow2));

    // J3: same image, a cache hit (no download stage), cancelled while it converts.
    let j3 = submit(
        &c,
        &d,
        json!({"image_url": file_url(&qcow2), "volume_name": "m3", "volume_size_gb": 1}),
    )
    .await;
    wait_until(&c, &d, &j3, MINUTE, |v| {
        v["progress"]["stage"] == "converting"
    })
    .await;
    assert_eq!(metric(&c, &d, &m("active_jobs"), "").await, 1.0);
    cancel(&c, &d, &j3).await;
    let job = wait_job(&c, &d, &j3, MINUTE).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    let after = scrape(&c, &d).await;
    let q = |name: &str, labels: &str| metric_in(&after, &m(name), labels);
    assert_eq!(q("jobs_total", r#"status="cancelled""#), 2.0);
    assert_eq!(
        q("job_duration_seconds_count", r#"status="cancelled""#),
        1.0
    );
    assert_eq!(q("cache_hits_total", ""), 1.0);
    assert_eq!(q("cache_misses_total", ""), 1.0);
    assert_eq!(q("cache_hit_ratio", ""), 0.5);
    assert_eq!(
        q("images_downloaded_total", ""),
        1.0,
        "a hit downloads nothing"
    );
    assert_eq!(
        q("stage_duration_seconds_count", r#"stage="download""#),
        1.0
    );
    assert_eq!(
        q("stage_duration_seconds_count", r#"stage="convert""#),
        1.0,
        "a cancelled conversion is not a stage measurement"
    );
    assert_eq!(
        q("stage_throughput_bytes_per_second", r#"stage="convert""#),
        0.0
    );
    assert_eq!(q("active_jobs", ""), 0.0);

    // J4: a cache-only fetch of a raw image: the size histogram is labelled by image type.
    let id = fetch_to_cache(&c, &d, &file_url(&raw), None).await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    let after = scrape(&c, &d).await;
    let q = |name: &str, labels: &str| metric_in(&after, &m(name), labels);
    assert_eq!(q("jobs_total", r#"status="completed""#), 2.0);
    assert_eq!(q("images_downloaded_total", ""), 2.0);
    assert_eq!(
        q("image_download_size_bytes_count", r#"image_type="raw""#),
        1.0
    );
    assert_eq!(
        q("image_download_size_bytes_sum", r#"image_type="raw""#),
        (8 << 20) as f64
    );
    assert_eq!(
        q(
            "image_download_size_bytes_bucket",
            r#"image_type="raw",le="8388608""#
        ),
        1.0,
        "8 MiB falls in the 8 MiB bucket"
    );
    assert_eq!(
        q("stage_duration_seconds_count", r#"stage="download""#),
        2.0
    );

    // J5-J7 fail: an image with a backing file (rejected while downloading), a qcow2 that
    // claims to be raw (rejected by the request check), and an image whose 2 GiB disk does not
    // fit the 1 GiB volume.
    for (i, (file, image_type, operation, error_type)) in [
        ("backing.qcow2", "qcow2", "download", "backing_file"),
        ("a.qcow2", "raw", "inspect", "format_mismatch"),
        ("huge.qcow2", "qcow2", "inspect", "too_large"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = submit(
            &c,
            &d,
            json!({"image_url": file_url(&images.join(file)), "volume_name": format!("f{i}"),
                   "volume_size_gb": 1, "image_type": image_type}),
        )
        .await;
        let job = wait_job(&c, &d, &id, MINUTE).await;
        assert_eq!(job["status"], "failed", "{file}: {job}");
        assert_eq!(
            metric(
                &c,
                &d,
                &m("image_errors_total"),
                &format!(r#"operation="{operation}",error_type="{error_type}""#)
            )
            .await,
            1.0,
            "{file}: {}",
            scrape(&c, &d).await
        );
    }
    let after = scrape(&c, &d).await;
    let q = |name: &str, labels: &str| metric_in(&after, &m(name), labels);
    assert_eq!(q("jobs_total", r#"status="failed""#), 3.0);
    assert_eq!(q("job_duration_seconds_count", r#"status="failed""#), 3.0);
    assert_eq!(
        q("image_errors_total", ""),
        3.0,
        "a cancelled conversion is not an image error:\n{after}"
    );

    // Requests: counted by method, route template and status; ids never become labels.
    let (status, _) = post(&c, &d.url("/api/v1/jobs"), &json!({"volume_name": "x"})).await;
    assert_eq!(status, 400);
    let (status, _) = get(&c, &d.url("/no/such/route")).await;
    assert_eq!(status, 404);
    let text = scrape(&c, &d).await;
    let q = |name: &str, labels: &str| metric_in(&text, &m(name), labels);
    // Accepted: J1, J2, J3, and J5-J7.
    assert_eq!(
        q(
            "requests_total",
            r#"method="POST",endpoint="/api/v1/jobs",status="202""#
        ),
        6.0,
        "{text}"
    );
    assert_eq!(
        q(
            "requests_total",
            r#"method="POST",endpoint="/api/v1/jobs",status="400""#
        ),
        1.0
    );
    assert_eq!(
        q(
            "request_duration_seconds_count",
            r#"method="POST",endpoint="/api/v1/jobs""#
        ),
        7.0
    );
    assert_eq!(
        q(
            "requests_total",
            r#"method="POST",endpoint="/api/v1/jobs/{id}/cancel",status="200""#
        ),
        2.0
    );
    assert!(
        q(
            "requests_total",
            r#"method="GET",endpoint="/api/v1/jobs/{id}",status="200""#
        ) > 0.0
    );
    assert_eq!(
        q(
            "requests_total",
            r#"method="GET",endpoint="unmatched",status="404""#
        ),
        1.0
    );
    assert!(
        q("request_duration_seconds_sum", r#"endpoint="/api/v1/jobs""#) > 0.0,
        "latency is observed"
    );
    for id in [&j1, &j2, &j3] {
        assert!(!text.contains(id.as_str()), "job id {id} in a label");
    }
    assert!(!text.contains("/no/such/route"));
}

/// Downloads from a real S3 server through a slow link: throughput while the download runs
/// and 0 once it is stopped, bytes counted as they arrive, a checksum mismatch counted as an
/// image error, and dependencies_up{dependency="minio"} following the server down and up
/// (probed every second here).
#[tokio::test]
async fn download_throughput_checksum_errors_and_minio_probe() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s3_root = dir.join("s3");
    let mut s3 = S3Server::start(&s3_root);
    let img = dir.join("big.qcow2");
    make_dense_qcow2(&img, 16 << 20, 64 << 20, 11);
    s3.put_file("vm-images", "big.qcow2", &img);
    let small = dir.join("small.qcow2");
    make_qcow2(&small, "16M");
    s3.put_file("vm-images", "small.qcow2", &small);
    s3.put(
        "vm-images",
        "small.qcow2.sha256",
        format!("{}  small.qcow2\n", "0".repeat(64)).as_bytes(),
    );
    // 2 MB/s: the 16 MiB download takes about 8 s.
    let proxy = throttled_proxy(s3.port, 2_000_000);
    let config = s3
        .configure(TestConfig::new(dir))
        .set("s3.endpoint", format!("http://127.0.0.1:{proxy}"))
        .set("telemetry.probe_interval", "1s");
    let d = Daemon::start(dir, &config);
    let c = client();
    let minio = r#"dependency="minio""#;
    assert_eq!(metric(&c, &d, &m("dependencies_up"), minio).await, 1.0);

    let url = |key: &str| format!("http://127.0.0.1:{proxy}/vm-images/{key}");
    let id = submit(
        &c,
        &d,
        json!({"image_url": url("big.qcow2"), "volume_name": "s1", "volume_size_gb": 1}),
    )
    .await;
    let rate = wait_metric(
        &c,
        &d,
        &m("stage_throughput_bytes_per_second"),
        r#"stage="download""#,
        MINUTE,
        |v| v > 0.0,
    )
    .await;
    assert!(
        rate < 10_000_000.0,
        "throughput {rate} B/s through a 2 MB/s link"
    );
    let first = metric(&c, &d, &m("download_bytes_total"), "").await;
    let later = wait_metric(&c, &d, &m("download_bytes_total"), "", MINUTE, |v| {
        v > first
    })
    .await;
    assert!(later < file_size(&img), "still downloading");
    cancel(&c, &d, &id).await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    let text = scrape(&c, &d).await;
    assert_eq!(
        metric_in(
            &text,
            &m("stage_throughput_bytes_per_second"),
            r#"stage="download""#
        ),
        0.0,
        "no throughput after the download stopped:\n{text}"
    );
    assert_eq!(metric_in(&text, &m("images_downloaded_total"), ""), 0.0);
    assert_eq!(
        metric_in(&text, &m("stage_duration_seconds_count"), ""),
        0.0,
        "an interrupted download is not a stage measurement"
    );

    // A published checksum that does not match.
    let id = submit(
        &c,
        &d,
        json!({"image_url": url("small.qcow2"), "volume_name": "s2", "volume_size_gb": 1}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(
        metric(
            &c,
            &d,
            &m("image_errors_total"),
            r#"operation="download",error_type="checksum_mismatch""#
        )
        .await,
        1.0
    );

    // The S3 server goes away: the periodic probe sees it, /readyz follows; and back.
    s3.stop();
    wait_metric(&c, &d, &m("dependencies_up"), minio, MINUTE, |v| v == 0.0).await;
    let (status, v) = get(&c, &d.url("/readyz")).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["dependencies"]["minio"], false, "{v}");
    let s3 = S3Server::start_on(&s3_root, s3.port);
    wait_metric(&c, &d, &m("dependencies_up"), minio, MINUTE, |v| v == 1.0).await;
    let (status, v) = get(&c, &d.url("/readyz")).await;
    assert_eq!(status, 200, "{v}");
    drop(s3);
}

/// The job store's file system fills up (a 16 MiB tmpfs in a private mount namespace, filled
/// from outside through /proc/<pid>/root): once sled needs new space its writes fail, storage
/// errors and failed operations are counted, and the periodic probe reports storage down.
#[tokio::test]
async fn storage_errors_and_storage_probe_when_the_store_disk_is_full() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start_with_small_store(dir, &[]);
    let image = dir.join("images/a.qcow2");
    make_qcow2(&image, "16M");
    let state = dir.join("state");
    let c = client();
    let id = submit(
        &c,
        &d,
        json!({"image_url": file_url(&image), "volume_name": "v1", "volume_size_gb": 1}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    let storage = r#"dependency="storage""#;
    let text = scrape(&c, &d).await;
    assert_eq!(metric_in(&text, &m("storage_errors_total"), ""), 0.0);
    assert_eq!(metric_in(&text, &m("dependencies_up"), storage), 1.0);
    assert!(
        metric_in(
            &text,
            &m("storage_operations_total"),
            r#"operation="probe",result="success""#
        ) >= 1.0
    );

    // Fill the tmpfs the daemon sees.
    d.fill_tmpfs(&state);
    // sled keeps writing into log space it already has; jobs (cache-only fetches of the
    // cached image) write job records until it needs new space and fails.
    let deadline = Instant::now() + 2 * MINUTE;
    let mut refused = 0;
    while metric(&c, &d, &m("dependencies_up"), storage).await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "storage still up:\n{}\n{}",
            scrape(&c, &d).await,
            d.log()
        );
        let (status, _) = post(
            &c,
            &d.url("/api/v1/cache/fetch"),
            &json!({"image_url": file_url(&image)}),
        )
        .await;
        if status >= 500 {
            refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("storage down; {refused} job submissions answered 5xx on the way");
    let (status, v) = get(&c, &d.url("/readyz")).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["dependencies"]["storage"], false, "{v}");
    let text = scrape(&c, &d).await;
    assert!(
        metric_in(&text, &m("storage_errors_total"), r#"error_type="io""#) >= 1.0,
        "{text}"
    );
    assert!(
        metric_in(&text, &m("storage_operations_total"), r#"result="error""#) >= 1.0,
        "{text}"
    );
    eprintln!(
        "storage metrics with a full disk:\n{}",
        text.lines()
            .filter(|l| l.contains("storage_") && !l.starts_with('#') && !l.contains("success"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Process metrics describe the daemon's own process; build_info carries the version.
#[tokio::test]
async fn process_metrics_and_build_info_describe_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &TestConfig::new(tmp.path()));
    let c = client();
    let text = scrape(&c, &d).await;
    let q = |name: &str| metric_in(&text, name, "");
    assert_eq!(
        metric_in(
            &text,
            &m("build_info"),
            &format!(r#"version="v{}""#, env!("CARGO_PKG_VERSION"))
        ),
        1.0,
        "{text}"
    );

    let pid = d.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |key: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let rss = field("VmRSS:") * 1024.0;
    let reported = q("process_resident_memory_bytes");
    assert!(
        reported > rss * 0.5 && reported < rss * 2.0,
        "RSS {reported} vs /proc {rss}"
    );
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as f64;
    let open = q("process_open_fds");
    assert!((open - fds).abs() <= 8.0, "open fds {open} vs /proc {fds}");
    assert!(q("process_max_fds") >= open);
    assert!(q("process_threads") >= 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = q("process_start_time_seconds");
    assert!(
        start <= now + 1.0 && start > now - 120.0,
        "started at {start}, now {now}"
    );
    // CPU: user + system time at microsecond resolution (getrusage), matching /proc's ticks.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    let clk: f64 = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    let cpu = q("process_cpu_seconds_total");
    assert!(
        text.contains("# TYPE process_cpu_seconds_total counter"),
        "{text}"
    );
    assert!(
        cpu > 0.0,
        "a daemon that started and answered has used some CPU, below one second: {cpu}"
    );
    assert!(
        (cpu - ticks / clk).abs() <= 0.1,
        "cpu {cpu} s vs /proc {} s",
        ticks / clk
    );
}
