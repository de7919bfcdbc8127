//! A fleet of 20 real daemons (own ports and directories) declaring the same image against one
//! s3s-fs, through a proxy counting the requests in flight at the server: a fleet-wide switch
//! (every daemon reloaded at the same instant, as `nixos-rebuild switch` on every host does)
//! with `cache.declared_fetch_window = "0s"` and then with a window of a few seconds. Every
//! daemon ends up with the image cached both times; the figures (time to all cached, peak
//! requests at the server) are printed (run with `--nocapture`); only generous bounds are
//! asserted.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Daemons in the fleet.
const HOSTS: usize = 20;
/// The size of each image's data (one download part: one GET per host).
const IMAGE_BYTES: usize = 2 << 20;
/// Each daemon's `sources.max_bytes_per_second`: a download takes about 2 s, so downloads
/// overlap unless something spreads them.
const RATE: u64 = 1 << 20;
/// The jittered window of the second switch.
const WINDOW_SECS: u64 = 6;
/// Each daemon's `cache.declared_fetch_concurrency`.
const CONCURRENCY: i64 = 1;

/// One `[[images]]` entry for `name`.
fn decl(name: &str) -> toml::Value {
    let mut t = toml::Table::new();
    t.insert("name".into(), name.into());
    t.insert("url".into(), format!("s3://vm-images/{name}.qcow2").into());
    t.insert("refresh".into(), "1h".into());
    toml::Value::Table(t)
}

/// A daemon's configuration declaring `images` with the fetch window `window`.
fn config(base: &TestConfig, images: &[&str], window: &str) -> TestConfig {
    base.clone()
        .set("cache.declared_fetch_window", window)
        .set("cache.declared_fetch_concurrency", CONCURRENCY)
        .set(
            "images",
            toml::Value::Array(images.iter().map(|n| decl(n)).collect()),
        )
}

/// Rewrites every daemon's configuration, then signals them all at once; returns the instant.
fn switch(daemons: &[(Daemon, TestConfig)], images: &[&str], window: &str) -> Instant {
    for (d, base) in daemons {
        std::fs::write(&d.config_path, config(base, images, window).render()).unwrap();
    }
    let at = Instant::now();
    for (d, _) in daemons {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }
    at
}

/// Waits until every daemon lists `name` as cached; the time since `since`.
async fn all_cached(daemons: &[(Daemon, TestConfig)], name: &str, since: Instant) -> Duration {
    let c = client();
    let deadline = since + Duration::from_secs(180);
    loop {
        let mut cached = 0;
        for (d, _) in daemons {
            let (_, v) = get(&c, &d.url("/api/v1/images")).await;
            let hit = v["images"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i["name"] == name && i["cached"] == true);
            cached += usize::from(hit);
        }
        if cached == daemons.len() {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{cached}/{} cached {name} in time; a log:\n{}",
            daemons.len(),
            daemons[0].0.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn start_daemons(root: &Path, s3: &S3Server, proxy: &CountingProxy) -> Vec<(Daemon, TestConfig)> {
    (0..HOSTS)
        .map(|i| {
            let dir = root.join(format!("hv{i:02}"));
            std::fs::create_dir_all(&dir).unwrap();
            let base = s3
                .configure(TestConfig::new(&dir))
                .set("s3.endpoint", format!("http://127.0.0.1:{}", proxy.port))
                .set("sources.max_bytes_per_second", RATE as i64)
                .set("reload.watch_files", false)
                .set("telemetry.probe_interval", "1h")
                .set("log.level", "warn,libvirt_volume_provisioner=info");
            let d = Daemon::start(&dir, &config(&base, &[], "0s"));
            (d, base)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_20_declaring_one_image_spreads_its_fetches() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let s3 = S3Server::start(&root.join("s3"));
    for (i, name) in ["fleet-a", "fleet-b"].iter().enumerate() {
        let image = root.join(format!("{name}.qcow2"));
        make_dense_qcow2(&image, IMAGE_BYTES, 64 << 20, 40 + i as u64);
        s3.put_object("vm-images", &format!("{name}.qcow2"), &image);
    }
    let proxy = CountingProxy::start(s3.port, "/vm-images/fleet-");
    let daemons = start_daemons(root, &s3, &proxy);

    // Every host switched at once, no window: the object store sees the whole fleet at once.
    proxy.reset_peak();
    let at = switch(&daemons, &["fleet-a"], "0s");
    let unspread = all_cached(&daemons, "fleet-a", at).await;
    let unspread_peak = proxy.peak();

    // Again with a window of a few seconds, for another image.
    proxy.reset_peak();
    let window = format!("{WINDOW_SECS}s");
    let at = switch(&daemons, &["fleet-a", "fleet-b"], &window);
    let spread = all_cached(&daemons, "fleet-b", at).await;
    let spread_peak = proxy.peak();

    println!(
        "declared image on {HOSTS} daemons, {} MiB each at {} MiB/s per daemon, \
         declared_fetch_concurrency = {CONCURRENCY}:",
        IMAGE_BYTES >> 20,
        RATE >> 20
    );
    println!(
        "  window 0s:  all cached after {:.1} s, peak {unspread_peak} requests at once at the server",
        unspread.as_secs_f64()
    );
    println!(
        "  window {WINDOW_SECS}s:  all cached after {:.1} s, peak {spread_peak} requests at once at the server",
        spread.as_secs_f64()
    );
    println!("  requests at the server in all: {}", proxy.total());
    // Generous bounds: a host never has more than its concurrency in flight per image part,
    // and a window of seconds keeps the whole fleet from arriving at once.
    assert!(unspread_peak <= HOSTS * 2, "{unspread_peak}");
    assert!(spread_peak < HOSTS, "{spread_peak}");
    assert!(
        spread >= Duration::from_secs(1),
        "the window spreads the fetches: {spread:?}"
    );
    // The first image stayed cached (pinned) everywhere.
    all_cached(&daemons, "fleet-a", Instant::now()).await;
}
