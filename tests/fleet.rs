//! The fleet CLI (`fleet --hosts FILE status | prefetch | images`) against a fleet of 20 real
//! daemons (each with its own port and directories, on the directory backend) that fetch from
//! one s3s-fs through a proxy counting the requests in flight at the server: everything ends
//! up cached, `--concurrency` bounds the downloads the object store sees at once, and the live
//! lines, the `status` table and the `prefetch` summary are read from a real terminal (tmux).
//! Run with `--nocapture` to see the frames and the figures.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Daemons in the fleet.
const HOSTS: usize = 20;
/// `--concurrency` of the bounded prefetch.
const BOUND: usize = 4;
/// The size of each test image's data (one download part: one GET per host).
const IMAGE_BYTES: usize = 2 << 20;
/// Each daemon's `sources.max_bytes_per_second`: a download takes about 2 s, so downloads
/// overlap unless something bounds them.
const RATE: u64 = 1 << 20;

/// The fleet: its daemons, the S3 server, the counting proxy and the hosts files.
struct Fleet {
    daemons: Vec<Daemon>,
    proxy: CountingProxy,
    _s3: S3Server,
    /// The 20 daemons.
    hosts: PathBuf,
    /// The 20 daemons and an address where nothing listens.
    hosts_with_dead: PathBuf,
}

fn start_fleet(root: &Path) -> Fleet {
    let s3 = S3Server::start(&root.join("s3"));
    for (i, name) in ["fleet-a.qcow2", "fleet-b.qcow2"].iter().enumerate() {
        let image = root.join(name);
        make_dense_qcow2(&image, IMAGE_BYTES, 64 << 20, 7 + i as u64);
        s3.put_object("vm-images", name, &image);
    }
    let proxy = CountingProxy::start(s3.port, "/vm-images/fleet-");
    let daemons: Vec<Daemon> = (0..HOSTS)
        .map(|i| {
            let dir = root.join(format!("hv{i:02}"));
            std::fs::create_dir_all(&dir).unwrap();
            let config = s3
                .configure(TestConfig::new(&dir))
                .set("s3.endpoint", format!("http://127.0.0.1:{}", proxy.port))
                .set("sources.max_bytes_per_second", RATE as i64)
                .set("telemetry.probe_interval", "1h")
                .set("log.level", "warn,libvirt_volume_provisioner=info");
            Daemon::start(&dir, &config)
        })
        .collect();
    let listing: String = daemons.iter().map(|d| format!("{}\n", d.base)).collect();
    let hosts = root.join("hosts");
    std::fs::write(&hosts, format!("# the test fleet\n{listing}")).unwrap();
    let hosts_with_dead = root.join("hosts-with-dead");
    let dead = format!("http://127.0.0.1:{}  # nothing listens here\n", free_port());
    std::fs::write(&hosts_with_dead, format!("{listing}{dead}")).unwrap();
    Fleet {
        daemons,
        proxy,
        _s3: s3,
        hosts,
        hosts_with_dead,
    }
}

/// `fleet ARGS --output json`: the exit status and the document.
fn fleet_json(args: &[&str]) -> (i32, Value) {
    let out = Command::new(BIN)
        .arg("fleet")
        .args(args)
        .args(["--output", "json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let doc = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), doc)
}

/// Runs `fleet ARGS` in a real terminal; the exit line, the last frame, and a frame that
/// showed `live` while it ran (if one did).
fn fleet_in_terminal(dir: &Path, name: &str, args: &str, live: &str) -> (String, String, String) {
    let script = format!("{BIN} fleet {args}");
    let terminal = Terminal::start(dir, name, (130, 40), &script);
    let mut seen = String::new();
    let exit = terminal.wait_done(Instant::now() + Duration::from_secs(180), |frame| {
        if seen.is_empty() && frame.contains(live) {
            seen = frame;
        }
    });
    (exit, terminal.capture(), seen)
}

/// Entries in each daemon's cache (its API's count).
async fn cached_counts(fleet: &Fleet) -> Vec<u64> {
    let c = client();
    let mut counts = Vec::new();
    for d in &fleet.daemons {
        let (_, list) = get(&c, &d.url("/api/v1/cache/images")).await;
        counts.push(list["count"].as_u64().unwrap_or(0));
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_20_prefetches_within_the_bound_and_shows_it_in_a_terminal() {
    let root = tempfile::tempdir().unwrap();
    let fleet = start_fleet(root.path());
    let hosts = fleet.hosts.display().to_string();

    // Bounded: at most BOUND hosts download at once; the frames come from a real terminal.
    let term_dir = root.path().join("term-prefetch");
    std::fs::create_dir_all(&term_dir).unwrap();
    let started = Instant::now();
    let (exit, last, live) = fleet_in_terminal(
        &term_dir,
        "fleet-prefetch",
        &format!("--hosts {hosts} --concurrency {BOUND} prefetch s3://vm-images/fleet-a.qcow2"),
        "downloading",
    );
    let bounded_time = started.elapsed();
    let bounded_peak = fleet.proxy.peak();
    println!("--- a live frame of `fleet prefetch` ---\n{live}\n--- its last frame ---\n{last}");
    assert_eq!(exit.trim(), "exit=0", "{last}");
    assert!(
        last.contains(&format!(
            "fleet prefetch: {HOSTS} hosts, {HOSTS} ok, 0 failed"
        )),
        "{last}"
    );
    assert!(
        live.contains("downloading") && live.contains("waiting for a slot"),
        "{live}"
    );
    assert_eq!(cached_counts(&fleet).await, vec![1; HOSTS]);
    assert!(
        bounded_peak <= BOUND,
        "{bounded_peak} requests at once at the server, more than --concurrency {BOUND}"
    );
    assert!(fleet.proxy.total() >= HOSTS);

    // Unbounded (every host at once), for comparison; and a JSON document for scripts.
    fleet.proxy.reset_peak();
    let started = Instant::now();
    let all = HOSTS.to_string();
    let (code, doc) = fleet_json(&[
        "--hosts",
        &hosts,
        "--concurrency",
        &all,
        "prefetch",
        "s3://vm-images/fleet-b.qcow2",
    ]);
    let unbounded_time = started.elapsed();
    let unbounded_peak = fleet.proxy.peak();
    assert_eq!(
        (code, &doc["ok"], &doc["failed"]),
        (0, &HOSTS.into(), &0.into()),
        "{doc}"
    );
    assert_eq!(cached_counts(&fleet).await, vec![2; HOSTS]);
    println!(
        "FIGURES: {HOSTS} daemons, a qcow2 of {} MiB of data at {} MiB/s each: --concurrency \
         {BOUND}: all cached in {:.1} s, peak {bounded_peak} concurrent requests at the server; \
         --concurrency {HOSTS}: {:.1} s, peak {unbounded_peak}",
        IMAGE_BYTES >> 20,
        RATE >> 20,
        bounded_time.as_secs_f64(),
        unbounded_time.as_secs_f64()
    );
    assert!(
        unbounded_peak > BOUND,
        "without the bound the downloads should overlap more than {BOUND}: {unbounded_peak}"
    );

    // Again: every host answers from its cache, nothing is downloaded.
    let before = fleet.proxy.total();
    let (code, doc) = fleet_json(&[
        "--hosts",
        &hosts,
        "prefetch",
        "s3://vm-images/fleet-a.qcow2",
    ]);
    assert_eq!(code, 0, "{doc}");
    for h in doc["hosts"].as_array().unwrap() {
        assert_eq!(h["result"]["cache_hit"], true, "{h}");
    }
    println!(
        "re-run: {} requests at the server",
        fleet.proxy.total() - before
    );

    status_and_failures(&fleet, root.path()).await;
    images_and_bad_input(&fleet, root.path()).await;
}

/// `fleet status` in a terminal with a dead host among the fleet: the table, the failure's
/// reason, exit status 1.
async fn status_and_failures(fleet: &Fleet, root: &Path) {
    let term_dir = root.join("term-status");
    std::fs::create_dir_all(&term_dir).unwrap();
    let (exit, last, _) = fleet_in_terminal(
        &term_dir,
        "fleet-status",
        &format!("--hosts {} status", fleet.hosts_with_dead.display()),
        "HOST",
    );
    println!("--- `fleet status` with a dead host ---\n{last}");
    assert_eq!(exit.trim(), "exit=1", "{last}");
    assert!(last.contains("HOST") && last.contains("CACHED"), "{last}");
    let healthy_rows = last.lines().filter(|l| l.contains(" healthy ")).count();
    assert_eq!(healthy_rows, HOSTS, "{last}");
    assert!(last.contains("[connection_refused]"), "{last}");
    assert!(
        last.contains(&format!(
            "fleet status: {} hosts, {HOSTS} ok, 1 failed",
            HOSTS + 1
        )),
        "{last}"
    );
}

/// `fleet images` says per host whether the daemon has declared images (without making any
/// up); an unusable hosts file is exit status 4.
async fn images_and_bad_input(fleet: &Fleet, root: &Path) {
    let (_, doc) = get(&client(), &fleet.daemons[0].url("/api/v1/openapi.json")).await;
    let declared = doc["paths"].get("/api/v1/images").is_some();
    let (code, doc) = fleet_json(&["--hosts", &fleet.hosts.display().to_string(), "images"]);
    if declared {
        assert_eq!(code, 0, "{doc}");
    } else {
        assert_eq!(code, 1, "{doc}");
        for h in doc["hosts"].as_array().unwrap() {
            assert_eq!(h["reason"], "no_declared_images_support", "{h}");
            assert!(h.get("result").is_none(), "{h}");
        }
    }
    // A name is sent as `image`; no daemon here declares it, so every host refuses it.
    let (code, doc) = fleet_json(&[
        "--hosts",
        &fleet.hosts.display().to_string(),
        "prefetch",
        "no-such-declared-image",
    ]);
    assert_eq!((code, &doc["failed"]), (1, &HOSTS.into()), "{doc}");
    for h in doc["hosts"].as_array().unwrap() {
        assert!(h["reason"].as_str().is_some_and(|r| !r.is_empty()), "{h}");
    }
    let bad = root.join("bad-hosts");
    std::fs::write(&bad, "hv1.example.com:8080\n").unwrap();
    let (code, doc) = fleet_json(&["--hosts", &bad.display().to_string(), "status"]);
    assert_eq!(code, 4, "{doc}");
    assert!(doc["message"].as_str().unwrap().contains("line 1"), "{doc}");
}

/// `fleet status --output json` with extra client options; the exit status and each host's
/// reason (`ok` for a host that succeeded).
fn fleet_reasons(hosts: &Path, options: &[&str]) -> (i32, Vec<String>) {
    let mut args = options.to_vec();
    let hosts = hosts.display().to_string();
    args.extend(["--hosts", &hosts, "status"]);
    let (code, doc) = fleet_json(&args);
    let reasons = doc["hosts"]
        .as_array()
        .unwrap_or_else(|| panic!("{doc}"))
        .iter()
        .map(|h| h["reason"].as_str().unwrap_or("ok").to_string())
        .collect();
    (code, reasons)
}

#[tokio::test]
async fn fleet_presents_the_client_certificate_or_token_to_every_host() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::create(&root.path().join("pki"), &["orchestrator", "intruder"]);
    let token = "fleet-test-token-0123456789abcdef0123456789";
    let daemons: Vec<Daemon> = (0..2)
        .map(|i| {
            let dir = root.path().join(format!("hv{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("tokens"), format!("fleet:{token}\n")).unwrap();
            let config = pki
                .server_tls(TestConfig::new(&dir), Some("optional"))
                .set("auth.allowed_clients", vec!["orchestrator"])
                .set("auth.tokens_file", dir.join("tokens").display().to_string())
                .set("telemetry.probe_interval", "1h");
            Daemon::start_https(&dir, &config, &[])
        })
        .collect();
    let hosts = root.path().join("hosts");
    let listing: String = daemons.iter().map(|d| format!("{}\n", d.base)).collect();
    std::fs::write(&hosts, listing).unwrap();
    let token_file = root.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let (ca, cert, key) = (
        pki.file("ca.crt"),
        pki.file("orchestrator.crt"),
        pki.file("orchestrator.key"),
    );
    let (intruder_cert, intruder_key) = (pki.file("intruder.crt"), pki.file("intruder.key"));

    let with_cert = ["--cacert", &ca, "--cert", &cert, "--key", &key];
    assert_eq!(fleet_reasons(&hosts, &with_cert), (0, vec!["ok".into(); 2]));
    let token_path = token_file.display().to_string();
    let with_token = ["--cacert", &ca, "--token-file", &token_path];
    assert_eq!(
        fleet_reasons(&hosts, &with_token),
        (0, vec!["ok".into(); 2])
    );
    let neither = ["--cacert", ca.as_str()];
    assert_eq!(
        fleet_reasons(&hosts, &neither),
        (1, vec!["authentication_required".into(); 2])
    );
    let intruder = [
        "--cacert",
        &ca,
        "--cert",
        &intruder_cert,
        "--key",
        &intruder_key,
    ];
    assert_eq!(
        fleet_reasons(&hosts, &intruder),
        (1, vec!["client_certificate_not_allowed".into(); 2])
    );
    // Without the CA the daemons' certificates are not trusted.
    let (code, reasons) = fleet_reasons(&hosts, &["--token-file", &token_path]);
    assert_eq!((code, reasons), (1, vec!["tls_handshake".into(); 2]));
}
