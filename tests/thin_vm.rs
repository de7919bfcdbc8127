//! Golden images on a real dm-thin pool, inside the test VM (run by `scripts/vm-test.sh`): a VG
//! with a thin pool on the VM's disk, the real daemon binary with `volumes.lvm.thin_pool` set,
//! every case through the HTTP API. LV contents are compared with hashes of qemu-img
//! conversions made on the host. Also the NixOS module's volume-group script creating thin
//! pools (rendered on the host by scripts/vm-test.sh) on a loop device. Prints `VM-CASES <n>`,
//! then one `VM-CASE PASS|FAIL` line per case; fails if any case fails.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures::FutureExt;
use serde_json::{Value, json};

const VG: &str = "vmthin";
const POOL: &str = "pool";
const DISK: &str = "/dev/vda";
const MIB: u64 = 1 << 20;
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// Cases in the order they run.
const CASES: [&str; 7] = [
    "three_volumes_from_one_golden_image",
    "golden_bound_removes_the_least_recently_used",
    "reused_thick_and_thin_lvs_are_fully_overwritten",
    "kill_during_golden_build_then_restart",
    "fresh_thin_lvs_follow_the_pools_zeroing",
    "pool_over_threshold_fails_before_writing",
    "nixos_volume_group_script_creates_thin_pools",
];

type CaseResult = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Runs a command; stdout on success, else an error with its stderr.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {args:?}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn lv_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/dev/{VG}/{name}"))
}

/// `field` of LV `name` in `vg`, `None` when it does not exist.
fn lv_field_in(vg: &str, name: &str, field: &str) -> Result<Option<String>, String> {
    let out = run(
        "lvs",
        &[
            "--noheadings",
            "--separator",
            "|",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            &format!("lv_name,{field}"),
            vg,
        ],
    )?;
    Ok(out.lines().find_map(|l| {
        let (n, v) = l.trim().split_once('|')?;
        (n == name).then(|| v.trim().to_string())
    }))
}

fn lv_field(name: &str, field: &str) -> Result<Option<String>, String> {
    lv_field_in(VG, name, field)
}

fn lv_exists(name: &str) -> Result<bool, String> {
    Ok(lv_field(name, "lv_uuid")?.is_some())
}

/// Names of the LVs of the VG.
fn lv_names() -> Result<Vec<String>, String> {
    let out = run("lvs", &["--noheadings", "-o", "lv_name", VG])?;
    Ok(out.split_whitespace().map(str::to_string).collect())
}

/// The golden LVs (by name prefix).
fn golden_lvs() -> Result<Vec<String>, String> {
    Ok(lv_names()?
        .into_iter()
        .filter(|n| n.starts_with("lvp-golden-"))
        .collect())
}

/// Bytes of pool data an LV (or the pool) holds: data_percent of its size.
fn data_bytes(name: &str) -> Result<u64, String> {
    let pct: f64 = lv_field(name, "data_percent")?
        .ok_or(format!("no LV {name}"))?
        .parse()
        .map_err(|e| format!("data_percent of {name}: {e}"))?;
    let size: f64 = lv_field(name, "lv_size")?
        .unwrap_or_default()
        .parse()
        .map_err(|e| format!("lv_size of {name}: {e}"))?;
    Ok((pct / 100.0 * size) as u64)
}

fn sha256_prefix(path: &Path, len: u64) -> Result<String, String> {
    let out = run(
        "sh",
        &[
            "-c",
            &format!("head -c {len} '{}' | sha256sum", path.display()),
        ],
    )?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// A 4 KiB-aligned buffer of `len` bytes for O_DIRECT I/O.
struct Aligned {
    raw: Vec<u8>,
    pad: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, byte: u8) -> Aligned {
        let raw = vec![byte; len + 4096];
        let pad = raw.as_ptr().align_offset(4096);
        Aligned { raw, pad, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.pad..self.pad + self.len]
    }
}

/// Writes `byte` over `len` bytes (a multiple of 1 MiB) at `offset` of a block device,
/// bypassing the page cache.
fn fill_at(path: &Path, byte: u8, offset: u64, len: u64) -> CaseResult {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut buf = Aligned::new(4 * MIB as usize, byte);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(4 * MIB) as usize;
        f.write_all(&buf.buf()[..n])
            .map_err(|e| format!("{}: {e}", path.display()))?;
        done += n as u64;
    }
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}

/// Checks that `path` reads as zeros from `start` to its end (O_DIRECT: no stale page cache).
fn zeros_from(path: &Path, start: u64) -> CaseResult {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let end = f.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    let aligned = start / MIB * MIB;
    f.seek(SeekFrom::Start(aligned))
        .map_err(|e| e.to_string())?;
    let mut io_buf = Aligned::new(8 * MIB as usize, 0);
    let buf = io_buf.buf();
    let mut off = aligned;
    while off < end {
        let n = ((end - off) as usize).min(buf.len());
        f.read_exact(&mut buf[..n])
            .map_err(|e| format!("reading {} at {off}: {e}", path.display()))?;
        let skip = start.saturating_sub(off).min(n as u64) as usize;
        if let Some(at) = buf[skip..n].iter().position(|b| *b != 0) {
            return Err(format!(
                "{} has non-zero data at byte {} (after the image, which ends at {start})",
                path.display(),
                off + (skip + at) as u64
            ));
        }
        off += n as u64;
    }
    Ok(())
}

/// Host-made reference conversions: image name -> (raw size, sha256).
fn references(data: &Path) -> HashMap<String, (u64, String)> {
    let text =
        std::fs::read_to_string(data.join("refs.txt")).expect("refs.txt from scripts/vm-test.sh");
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((
                w.next()?.to_string(),
                (w.next()?.parse().ok()?, w.next()?.to_string()),
            ))
        })
        .collect()
}

/// What every case shares: the test images, a work directory, an HTTP client.
struct Ctx {
    c: reqwest::Client,
    data: PathBuf,
    work: PathBuf,
    refs: HashMap<String, (u64, String)>,
}

impl Ctx {
    /// The daemon's configuration for case directory `name`: the lvm backend on the thin pool,
    /// golden images on.
    fn config(&self, name: &str) -> (PathBuf, TestConfig) {
        let dir = self.work.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = TestConfig::new(&dir)
            .set("volumes.backend", "lvm")
            .set("volumes.lvm.volume_group", VG)
            .set("volumes.lvm.devices", vec![DISK.to_string()])
            .set("volumes.lvm.thin_pool", POOL)
            .set("sources.file_roots", vec![self.data.display().to_string()])
            .set("jobs.max_concurrent", 2);
        (dir, config)
    }

    async fn submit(&self, d: &Daemon, image: &str, volume: &str) -> Result<String, String> {
        let image_type = if image.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        };
        let (status, v) = post(
            &self.c,
            &d.url("/api/v1/jobs"),
            &json!({"image_url": file_url(&self.data.join(image)), "volume_name": volume,
                    "volume_size_gb": 1, "image_type": image_type}),
        )
        .await;
        ensure!(status == 202, "submit {image} -> {volume}: {status} {v}");
        Ok(v["job_id"].as_str().unwrap_or_default().to_string())
    }

    /// Polls job `id` every `every` until `done` holds (slowly: every request costs the
    /// emulated CPU the daemon needs).
    async fn poll(
        &self,
        d: &Daemon,
        id: &str,
        every: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            let (status, v) = get(&self.c, &d.url(&format!("/api/v1/jobs/{id}"))).await;
            ensure!(status == 200, "GET job {id}: {status} {v}");
            if done(&v) {
                return Ok(v);
            }
            ensure!(Instant::now() < deadline, "job {id} timed out: {v}");
            tokio::time::sleep(every).await;
        }
    }

    async fn wait_done(&self, d: &Daemon, id: &str) -> Result<Value, String> {
        self.poll(d, id, Duration::from_millis(500), |v| {
            ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap_or(""))
        })
        .await
    }

    async fn provision(&self, d: &Daemon, image: &str, volume: &str) -> Result<Value, String> {
        let id = self.submit(d, image, volume).await?;
        self.wait_done(d, &id).await
    }

    fn reference(&self, image: &str) -> Result<(u64, String), String> {
        self.refs
            .get(image)
            .cloned()
            .ok_or(format!("no reference for {image}"))
    }

    /// The LV's first bytes are the image's (the host's conversion).
    fn check_image_bytes(&self, volume: &str, image: &str) -> CaseResult {
        let (len, want) = self.reference(image)?;
        let got = sha256_prefix(&lv_path(volume), len)?;
        ensure!(
            got == want,
            "{volume}: sha256 of the first {len} bytes is {got}, the host's conversion of {image} is {want}"
        );
        Ok(())
    }

    /// The image's bytes, then zeros to the end.
    fn check_contents(&self, volume: &str, image: &str) -> CaseResult {
        self.check_image_bytes(volume, image)?;
        zeros_from(&lv_path(volume), self.reference(image)?.0)
    }
}

/// Prints where a case is (the VM's console is the only view into a case that hangs).
fn step(what: &str) {
    println!("  .. {what}");
}

/// Lines of a daemon log that contain all `needles`.
fn log_lines<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

/// The qemu-img convert command lines the daemon ran for `volume` (its debug log).
fn convert_args_for(log: &str, volume: &str) -> Vec<String> {
    // The JSON log line holds the argument list's Debug form: `..., \"/dev/vg/name\"]`.
    let target = format!("/dev/{VG}/{volume}\\\"");
    log_lines(log, &["starting qemu-img", &target])
        .into_iter()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs device-mapper and a disk to format: run scripts/vm-test.sh (boots a VM)"]
async fn thin_pool_golden_images_end_to_end() {
    assert_eq!(
        std::env::var("IN_TEST_VM").as_deref(),
        Ok("1"),
        "this test formats {DISK}: it runs only inside the test VM (scripts/vm-test.sh)"
    );
    println!("\nVM-CASES {}", CASES.len());
    let setup = Instant::now();
    let data = PathBuf::from(
        std::env::var("VMTEST_DATA")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/vm-test").into()),
    );
    // Stale data where the pool's data will be: thin LVs must never show it.
    fill_at(Path::new(DISK), 0xab, 0, 1024 * MIB).unwrap();
    run("pvcreate", &["-q", "-y", "-ff", DISK]).unwrap();
    run("vgcreate", &["-q", VG, DISK]).unwrap();
    run(
        "lvcreate",
        &[
            "-q",
            "-y",
            "--type",
            "thin-pool",
            "-L",
            "4g",
            "-n",
            POOL,
            VG,
        ],
    )
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let ctx = Ctx {
        c: client(),
        refs: references(&data),
        data,
        work: work.path().to_path_buf(),
    };
    println!("setup: {:.1} s", setup.elapsed().as_secs_f64());

    let mut failed = Vec::new();
    for name in CASES {
        let started = Instant::now();
        let outcome = std::panic::AssertUnwindSafe(run_case(&ctx, name))
            .catch_unwind()
            .await;
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(Ok(())) => println!("VM-CASE PASS {name} ({secs:.1} s)"),
            Ok(Err(e)) => {
                println!("VM-CASE FAIL {name} ({secs:.1} s): {e}");
                failed.push(name);
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!("VM-CASE FAIL {name} ({secs:.1} s): panicked: {msg}");
                failed.push(name);
            }
        }
    }
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

fn run_case<'a>(
    ctx: &'a Ctx,
    name: &'a str,
) -> std::pin::Pin<Box<dyn Future<Output = CaseResult> + Send + 'a>> {
    match name {
        "three_volumes_from_one_golden_image" => Box::pin(three_volumes(ctx)),
        "golden_bound_removes_the_least_recently_used" => Box::pin(golden_bound(ctx)),
        "reused_thick_and_thin_lvs_are_fully_overwritten" => Box::pin(reused_lvs(ctx)),
        "kill_during_golden_build_then_restart" => Box::pin(kill_during_build(ctx)),
        "fresh_thin_lvs_follow_the_pools_zeroing" => Box::pin(fresh_thin_lvs(ctx)),
        "pool_over_threshold_fails_before_writing" => Box::pin(pool_over_threshold(ctx)),
        "nixos_volume_group_script_creates_thin_pools" => Box::pin(nixos_thin_pools(ctx)),
        other => Box::pin(async move { Err(format!("unknown case {other}")) }),
    }
}

/// Prints the daemon's last log lines when a case fails (the error is returned as it was).
fn with_log<T>(d: &Daemon, r: Result<T, String>) -> Result<T, String> {
    r.map_err(|e| {
        let log = d.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("{e}\n  daemon log (last lines):\n  {}", tail.join("\n  "))
    })
}

/// Three volumes from one image, two of them submitted while the first builds the golden LV:
/// one build, three thin snapshots with the image's bytes, pool data of about one image,
/// clones independent of each other and of the golden LV, zeros past the image; the golden LV
/// refused by DELETE; a clone deleted leaves the others; evicting the cache entry removes the
/// golden LV and the clones stay readable.
async fn three_volumes(ctx: &Ctx) -> CaseResult {
    let (dir, config) = ctx.config("three");
    let d = Daemon::start(&dir, &config);
    let r = three_volumes_on(ctx, &d).await;
    with_log(&d, r)
}

async fn three_volumes_on(ctx: &Ctx, d: &Daemon) -> CaseResult {
    let pool_before = data_bytes(POOL)?;
    let mut ids = Vec::new();
    for v in ["thin-a", "thin-b", "thin-c"] {
        ids.push(ctx.submit(d, "disk.qcow2", v).await?);
    }
    for id in &ids {
        let job = ctx.wait_done(d, id).await?;
        ensure!(job["status"] == "completed", "job: {job}");
        ensure!(job["method"] == "thin-snapshot", "method: {job}");
        ensure!(job["progress"]["percent"] == 100.0, "progress: {job}");
    }
    let log = d.log();
    let builds = log_lines(&log, &["building golden image"]).len();
    ensure!(
        builds == 1,
        "{builds} golden builds for one image (single flight)"
    );
    let goldens = golden_lvs()?;
    ensure!(goldens.len() == 1, "golden LVs: {goldens:?}");
    let golden = &goldens[0];
    let attr = lv_field(golden, "lv_attr")?.unwrap_or_default();
    ensure!(
        attr.starts_with("Vr") && attr.ends_with('k'),
        "golden LV {golden} is not read-only with activation skip: {attr}"
    );
    let tags = lv_field(golden, "lv_tags")?.unwrap_or_default();
    ensure!(tags.contains("lvp_golden_complete"), "golden tags: {tags}");
    for v in ["thin-a", "thin-b", "thin-c"] {
        let origin = lv_field(v, "origin")?.unwrap_or_default();
        ensure!(&origin == golden, "{v}: origin {origin:?}, want {golden}");
        let attr = lv_field(v, "lv_attr")?.unwrap_or_default();
        ensure!(
            attr.starts_with("Vwi-a") && !attr.ends_with('k'),
            "{v}: lv_attr {attr} (want an active, writable thin LV without activation skip)"
        );
        ensure!(
            lv_field(v, "lv_size")?.as_deref() == Some("1073741824"),
            "{v} is not extended to 1 GiB"
        );
        ctx.check_image_bytes(v, "disk.qcow2")?;
    }
    let (len, image_sha) = ctx.reference("disk.qcow2")?;
    zeros_from(&lv_path("thin-a"), len)?;
    let golden_data = data_bytes(golden)?;
    let pool_used = data_bytes(POOL)?.saturating_sub(pool_before);
    println!(
        "  pool data used by the golden LV and three clones: {pool_used} bytes (golden LV: {golden_data})"
    );
    ensure!(golden_data > 0, "golden LV holds no data");
    ensure!(
        pool_used * 10 < golden_data * 12 + 10 * MIB,
        "pool data after three volumes {pool_used} is not about one image's ({golden_data})"
    );
    let created = metric(
        &ctx.c,
        d,
        "libvirt_volume_provisioner_volumes_created_total",
        "method=\"thin-snapshot\"",
    )
    .await;
    ensure!(
        created == 3.0,
        "volumes_created_total{{thin-snapshot}} = {created}"
    );

    step("writing into one clone");
    // Writing into one clone changes neither the others nor the golden LV.
    let golden_path = lv_path(golden);
    fill_at(&lv_path("thin-b"), 0x5a, 0, 4 * MIB)?;
    let written_b = sha256_prefix(&lv_path("thin-b"), len)?;
    ensure!(written_b != image_sha, "thin-b did not change");
    for v in ["thin-a", "thin-c"] {
        ctx.check_image_bytes(v, "disk.qcow2")?;
    }
    ensure!(
        sha256_prefix(&golden_path, len)? == image_sha,
        "the golden LV changed"
    );

    step("DELETE of the golden LV");
    // The golden LV is not a volume: DELETE refuses it with the reason.
    let (status, v) = delete(&ctx.c, &d.url(&format!("/api/v1/volumes/{golden}"))).await;
    ensure!(
        status == 409 && v["message"].as_str().unwrap_or("").contains("golden image"),
        "DELETE of the golden LV: {status} {v}"
    );
    ensure!(lv_exists(golden)?, "golden LV removed by DELETE");
    // A job asking for it by name is refused too.
    let (status, v) = post(
        &ctx.c,
        &d.url("/api/v1/jobs"),
        &json!({"image_url": file_url(&ctx.data.join("disk.qcow2")), "volume_name": golden,
                "volume_size_gb": 1}),
    )
    .await;
    ensure!(status == 409, "a job onto the golden LV: {status} {v}");

    step("DELETE of a clone");
    // Deleting a clone leaves the others.
    let (status, v) = delete(&ctx.c, &d.url("/api/v1/volumes/thin-c")).await;
    ensure!(status == 200, "DELETE thin-c: {status} {v}");
    ensure!(!lv_exists("thin-c")?, "thin-c still there");
    ctx.check_image_bytes("thin-a", "disk.qcow2")?;

    step("evicting the cache entry");
    // Evicting the cache entry removes the golden LV; the clones stay readable.
    let (_, list) = get(&ctx.c, &d.url("/api/v1/cache/images")).await;
    let key = list["images"][0]["key"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (status, v) = delete(&ctx.c, &d.url(&format!("/api/v1/cache/images/{key}"))).await;
    ensure!(status == 200, "DELETE cache entry: {status} {v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while lv_exists(golden)? {
        ensure!(
            Instant::now() < deadline,
            "golden LV still there after the cache entry went"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ctx.check_contents("thin-a", "disk.qcow2")?;
    ensure!(
        sha256_prefix(&lv_path("thin-b"), len)? == written_b,
        "thin-b changed when the golden LV was removed"
    );
    ensure!(
        lv_field("thin-a", "origin")?.unwrap_or_default().is_empty(),
        "thin-a still names an origin"
    );
    for v in ["thin-a", "thin-b"] {
        let (status, body) = delete(&ctx.c, &d.url(&format!("/api/v1/volumes/{v}"))).await;
        ensure!(status == 200, "DELETE {v}: {status} {body}");
    }
    Ok(())
}

/// `volumes.lvm.golden_max_bytes` bounds the pool data of golden LVs: with room for one image
/// (about 5 MiB of data in an 8 MiB bound), a second image's golden build first removes the
/// least recently used golden LV, and the volume cloned from it keeps its bytes.
async fn golden_bound(ctx: &Ctx) -> CaseResult {
    let (dir, config) = ctx.config("bound");
    // The same bytes under another URL: another cache entry, so another golden image.
    let other = dir.join("other.qcow2");
    std::fs::copy(ctx.data.join("disk.qcow2"), &other).map_err(|e| e.to_string())?;
    let roots = vec![ctx.data.display().to_string(), dir.display().to_string()];
    let config = config
        .set("volumes.lvm.golden_max_bytes", (8 * MIB) as i64)
        .set("sources.file_roots", roots);
    let d = Daemon::start(&dir, &config);
    let r = golden_bound_on(ctx, &d, &other).await;
    with_log(&d, r)
}

async fn golden_bound_on(ctx: &Ctx, d: &Daemon, other: &Path) -> CaseResult {
    let first = ctx.submit(d, "disk.qcow2", "bound-a").await?;
    let job = ctx.wait_done(d, &first).await?;
    ensure!(
        job["status"] == "completed" && job["method"] == "thin-snapshot",
        "first job: {job}"
    );
    let before = golden_lvs()?;
    ensure!(before.len() == 1, "golden LVs after one image: {before:?}");

    step("a second image, no room for two golden LVs");
    let (status, v) = post(
        &ctx.c,
        &d.url("/api/v1/jobs"),
        &json!({"image_url": file_url(other), "volume_name": "bound-b", "volume_size_gb": 1}),
    )
    .await;
    ensure!(status == 202, "submit other.qcow2: {status} {v}");
    let second = v["job_id"].as_str().unwrap_or_default().to_string();
    let job = ctx.wait_done(d, &second).await?;
    ensure!(
        job["status"] == "completed" && job["method"] == "thin-snapshot",
        "second job: {job}"
    );
    let after = golden_lvs()?;
    ensure!(
        after.len() == 1 && after != before,
        "golden LVs: {before:?} before, {after:?} after (want the first replaced)"
    );
    let log = d.log();
    ensure!(
        !log_lines(&log, &["removing the least recently used golden image"]).is_empty(),
        "no removal logged"
    );
    for v in ["bound-a", "bound-b"] {
        ctx.check_image_bytes(v, "disk.qcow2")?;
        let (status, body) = delete(&ctx.c, &d.url(&format!("/api/v1/volumes/{v}"))).await;
        ensure!(status == 200, "DELETE {v}: {status} {body}");
    }
    Ok(())
}

/// A reused LV (linear outside the pool, and thin in it) holding a pattern is overwritten
/// completely: image bytes, then zeros; qemu-img ran without --target-is-zero.
async fn reused_lvs(ctx: &Ctx) -> CaseResult {
    let (dir, config) = ctx.config("reuse");
    let d = Daemon::start(&dir, &config);
    let r = reused_lvs_on(ctx, &d).await;
    with_log(&d, r)
}

async fn reused_lvs_on(ctx: &Ctx, d: &Daemon) -> CaseResult {
    run(
        "lvcreate",
        &["--yes", "-q", "-L", "1000m", "-n", "reuse-thick", VG],
    )?;
    run(
        "lvcreate",
        &[
            "--yes",
            "-q",
            "-V",
            "1000m",
            "-T",
            &format!("{VG}/{POOL}"),
            "-n",
            "reuse-thin",
        ],
    )?;
    for v in ["reuse-thick", "reuse-thin"] {
        fill_at(&lv_path(v), 0x5a, 0, 64 * MIB)?;
        fill_at(&lv_path(v), 0x5a, 936 * MIB, 64 * MIB)?;
        let uuid = lv_field(v, "lv_uuid")?;
        let job = ctx.provision(d, "disk.qcow2", v).await?;
        ensure!(job["status"] == "completed", "{v}: {job}");
        ensure!(job["method"] == "copy", "{v}: method {}", job["method"]);
        ensure!(
            lv_field(v, "lv_uuid")? == uuid,
            "{v} was replaced, not reused"
        );
        ctx.check_contents(v, "disk.qcow2")?;
        let args = convert_args_for(&d.log(), v);
        ensure!(
            !args.is_empty(),
            "no qemu-img command line for {v} in the log"
        );
        ensure!(
            args.iter().all(|a| !a.contains("target-is-zero")),
            "{v} was written with --target-is-zero: {args:?}"
        );
        run("lvremove", &["-q", "-y", &format!("{VG}/{v}")])?;
    }
    Ok(())
}

/// SIGKILL while the golden LV is being written, then a restart: the half-made golden LV is
/// gone, the job failed with the restart reason, the next job builds a new golden LV and
/// succeeds.
async fn kill_during_build(ctx: &Ctx) -> CaseResult {
    let (dir, config) = ctx.config("kill");
    let d = Daemon::start(&dir, &config);
    let id = ctx.submit(&d, "slow.qcow2", "vm-kill").await?;
    let seen = ctx
        .poll(&d, &id, Duration::from_millis(200), |j| {
            j["status"] != "running"
                || (j["progress"]["stage"] == "converting"
                    && j["progress"]["stage_percent"].as_f64().unwrap_or(0.0) > 0.0)
        })
        .await;
    let seen = with_log(&d, seen)?;
    ensure!(
        seen["status"] == "running",
        "the job ended before the golden build could be interrupted: {seen}"
    );
    let goldens = golden_lvs()?;
    ensure!(goldens.len() == 1, "golden LVs while building: {goldens:?}");
    let golden = goldens[0].clone();
    let tags = lv_field(&golden, "lv_tags")?.unwrap_or_default();
    ensure!(
        !tags.contains("complete"),
        "complete while building: {tags}"
    );
    d.kill9();
    let d = Daemon::start(&dir, &config);
    let r = async {
        ensure!(
            !lv_exists(&golden)?,
            "the half-made golden LV survived the restart"
        );
        ensure!(!lv_exists("vm-kill")?, "vm-kill exists");
        let (_, job) = get(&ctx.c, &d.url(&format!("/api/v1/jobs/{id}"))).await;
        ensure!(
            job["status"] == "failed"
                && job["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("interrupted by daemon restart"),
            "interrupted job: {job}"
        );
        let job = ctx.provision(&d, "slow.qcow2", "vm-kill2").await?;
        ensure!(
            job["status"] == "completed" && job["method"] == "thin-snapshot",
            "next job: {job}"
        );
        let goldens = golden_lvs()?;
        ensure!(
            goldens.len() == 1,
            "golden LVs after the rebuild: {goldens:?}"
        );
        ensure!(
            lv_field(&goldens[0], "lv_tags")?
                .unwrap_or_default()
                .contains("lvp_golden_complete"),
            "rebuilt golden LV not complete"
        );
        ctx.check_contents("vm-kill2", "slow.qcow2")?;
        let (status, v) = delete(&ctx.c, &d.url("/api/v1/volumes/vm-kill2")).await;
        ensure!(status == 200, "DELETE: {status} {v}");
        Ok(())
    }
    .await;
    with_log(&d, r)
}

/// Golden images off: a fresh thin LV is written with --target-is-zero while the pool zeroes
/// new chunks (and only the image's data lands in the pool); with zeroing off the daemon warns
/// at start-up and writes in full, without --target-is-zero.
async fn fresh_thin_lvs(ctx: &Ctx) -> CaseResult {
    let (dir, config) = ctx.config("fresh");
    let config = config.set("volumes.lvm.golden_images", false);
    // Golden LVs of earlier cases stay (their daemons' caches still hold their images).
    let goldens_before = golden_lvs()?;
    let d = Daemon::start(&dir, &config);
    let r = async {
        let job = ctx.provision(&d, "disk.raw", "fresh-zeroing").await?;
        ensure!(
            job["status"] == "completed" && job["method"] == "copy",
            "job: {job}"
        );
        let args = convert_args_for(&d.log(), "fresh-zeroing");
        ensure!(
            args.len() == 1 && args[0].contains("--target-is-zero"),
            "fresh thin LV in a zeroing pool: {args:?}"
        );
        ctx.check_contents("fresh-zeroing", "disk.raw")?;
        let used = data_bytes("fresh-zeroing")?;
        ensure!(
            used < 64 * MIB,
            "the fresh thin LV holds {used} bytes of pool data: more than the image"
        );
        ensure!(
            golden_lvs()? == goldens_before,
            "golden LV made with golden_images = false: {goldens_before:?} -> {:?}",
            golden_lvs()?
        );
        Ok(())
    }
    .await;
    with_log(&d, r)?;
    d.stop();

    run("lvchange", &["-q", "--zero", "n", &format!("{VG}/{POOL}")])?;
    let d = Daemon::start(&dir, &config);
    let r = async {
        ensure!(
            !log_lines(&d.log(), &["does not zero newly provisioned chunks"]).is_empty(),
            "no start-up warning about the pool's zeroing"
        );
        let job = ctx.provision(&d, "disk.raw", "fresh-nonzeroing").await?;
        ensure!(job["status"] == "completed", "job: {job}");
        let args = convert_args_for(&d.log(), "fresh-nonzeroing");
        ensure!(
            args.len() == 1 && !args[0].contains("target-is-zero"),
            "pool without zeroing: {args:?}"
        );
        ctx.check_contents("fresh-nonzeroing", "disk.raw")?;
        Ok(())
    }
    .await;
    run("lvchange", &["-q", "--zero", "y", &format!("{VG}/{POOL}")])?;
    with_log(&d, r)?;
    for v in ["fresh-zeroing", "fresh-nonzeroing"] {
        let (status, body) = delete(&ctx.c, &d.url(&format!("/api/v1/volumes/{v}"))).await;
        ensure!(status == 200, "DELETE {v}: {status} {body}");
    }
    d.stop();
    Ok(())
}

/// A pool above `volumes.lvm.thin_pool_max_percent`: the job fails before anything is created,
/// naming the pool and its use; `/readyz` shows the pool down. Also restart recovery of a golden
/// LV whose cache entry is gone (the kill case's, unknown to this daemon's cache).
async fn pool_over_threshold(ctx: &Ctx) -> CaseResult {
    // 512 MiB of data in the pool (1/8 of it): above 10%.
    run(
        "lvcreate",
        &[
            "--yes",
            "-q",
            "-V",
            "512m",
            "-T",
            &format!("{VG}/{POOL}"),
            "-n",
            "ballast",
        ],
    )?;
    fill_at(&lv_path("ballast"), 0x11, 0, 512 * MIB)?;
    let (dir, config) = ctx.config("threshold");
    let config = config.set("volumes.lvm.thin_pool_max_percent", 10);
    // The kill case's daemon left its complete golden LV; this daemon's cache does not hold that
    // image, so its start-up recovery removes it (an orphan).
    let orphans = golden_lvs()?;
    let d = Daemon::start(&dir, &config);
    let r = async {
        ensure!(
            !orphans.is_empty(),
            "no golden LV left by the earlier cases"
        );
        ensure!(
            golden_lvs()?.is_empty(),
            "orphaned golden LVs survived start-up: {:?}",
            golden_lvs()?
        );
        ensure!(
            !log_lines(
                &d.log(),
                &["removing golden image", "its cache entry is gone"]
            )
            .is_empty(),
            "no recovery log line for the orphaned golden LVs {orphans:?}"
        );
        let before = lv_names()?;
        let job = ctx.provision(&d, "disk.qcow2", "over-threshold").await?;
        ensure!(job["status"] == "failed", "job: {job}");
        let err = job["error"].as_str().unwrap_or("");
        ensure!(
            err.contains(&format!("thin pool {VG}/{POOL}"))
                && err.contains("% used")
                && err.contains("volumes.lvm.thin_pool_max_percent = 10%"),
            "error: {err}"
        );
        ensure!(
            lv_names()? == before,
            "LVs changed: {before:?} -> {:?}",
            lv_names()?
        );
        let (status, ready) = get(&ctx.c, &d.url("/readyz")).await;
        ensure!(
            status == 503 && ready["dependencies"]["thin_pool"] == false,
            "readyz: {status} {ready}"
        );
        let ratio = metric(
            &ctx.c,
            &d,
            "libvirt_volume_provisioner_thin_pool_data_ratio",
            "",
        )
        .await;
        let above = ratio > 0.1;
        ensure!(above, "thin_pool_data_ratio {ratio}");
        Ok(())
    }
    .await;
    run("lvremove", &["-q", "-y", &format!("{VG}/ballast")])?;
    with_log(&d, r)
}

/// The NixOS module's volume-group script (rendered on the host by scripts/vm-test.sh) on a
/// loop device: it creates the group and its thin pool with the declared size and chunk size,
/// does nothing the second time, and refuses (creating nothing) a pool that does not fit and a
/// pool name that is an LV of another kind.
async fn nixos_thin_pools(ctx: &Ctx) -> CaseResult {
    let scripts = ctx.data.join("vg-scripts");
    ensure!(
        scripts.join("create.sh").exists(),
        "{} missing: scripts/vm-test.sh renders it with nix-instantiate",
        scripts.display()
    );
    let file = ctx.work.join("nix-disk.img");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(512 * MIB))
        .map_err(|e| e.to_string())?;
    let loopdev = run(
        "losetup",
        &["--find", "--show", &file.display().to_string()],
    )?
    .trim()
    .to_string();
    std::fs::create_dir_all("/dev/lvp-nixthin").map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file("/dev/lvp-nixthin/disk");
    std::os::unix::fs::symlink(&loopdev, "/dev/lvp-nixthin/disk").map_err(|e| e.to_string())?;
    let script = |name: &str| {
        let out = Command::new("bash")
            .arg(scripts.join(name))
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    };
    let r = async {
        let (ok, out) = script("create.sh")?;
        ensure!(ok, "first run failed:\n{out}");
        ensure!(out.contains("created thin pool nixthin/pool"), "{out}");
        ensure!(
            lv_field_in("nixthin", "pool", "segtype")?.as_deref() == Some("thin-pool"),
            "no thin pool"
        );
        ensure!(
            lv_field_in("nixthin", "pool", "chunk_size")?.as_deref() == Some("131072"),
            "chunk size {:?}",
            lv_field_in("nixthin", "pool", "chunk_size")?
        );
        ensure!(
            lv_field_in("nixthin", "pool", "lv_size")?.as_deref() == Some("268435456"),
            "size {:?}",
            lv_field_in("nixthin", "pool", "lv_size")?
        );
        let (ok, out) = script("create.sh")?;
        ensure!(
            ok && out.contains("thin pool nixthin/pool exists"),
            "second run:\n{out}"
        );
        ensure!(
            !out.contains("created thin pool"),
            "second run created again:\n{out}"
        );
        let (ok, out) = script("too-big.sh")?;
        ensure!(
            !ok && out.contains("refusing to create thin pool nixthin/big"),
            "too big:\n{out}"
        );
        ensure!(
            lv_field_in("nixthin", "big", "lv_uuid")?.is_none(),
            "pool big was created"
        );
        run(
            "lvcreate",
            &["--yes", "-q", "-L", "16m", "-n", "plain", "nixthin"],
        )?;
        let (ok, out) = script("not-a-pool.sh")?;
        ensure!(
            !ok && out.contains("nixthin/plain exists but is not a thin pool"),
            "plain LV:\n{out}"
        );
        ensure!(
            lv_field_in("nixthin", "plain", "segtype")?.as_deref() == Some("linear"),
            "the plain LV changed"
        );
        Ok(())
    }
    .await;
    let _ = run("vgremove", &["-q", "-y", "-ff", "nixthin"]);
    let _ = run("losetup", &["-d", &loopdev]);
    r
}
