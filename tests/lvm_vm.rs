//! LVM end to end, inside the test VM (device-mapper needed; run by `scripts/vm-test.sh`): a
//! sparse virtual disk becomes a PV and a VG, the real daemon binary runs with the lvm backend,
//! and every case goes through the HTTP API. LV contents are compared with hashes of qemu-img
//! conversions made on the host. Prints `VM-CASES <n>`, then one `VM-CASE PASS|FAIL` line per
//! case; fails if any case fails.

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

const VG: &str = "vmtest";
const DISK: &str = "/dev/vda";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const JOB_TIMEOUT: Duration = Duration::from_secs(240);

/// Cases in the order they run (later ones use volumes earlier ones made).
const CASES: [&str; 9] = [
    "health_lvm_dependency_is_probed",
    "qcow2_into_new_lv",
    "raw_into_new_lv",
    "reuse_compatible_lv",
    "reject_incompatible_lv",
    "failing_job_keeps_existing_lv",
    "failing_job_removes_created_lv",
    "cancel_mid_write_removes_new_lv",
    "delete_is_idempotent",
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
            "{program} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn lv_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/dev/{VG}/{name}"))
}

/// `lvs` fields of an LV, `None` when it does not exist.
fn lv_field(name: &str, field: &str) -> Result<Option<String>, String> {
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
            VG,
        ],
    )?;
    Ok(out.lines().find_map(|l| {
        let (n, v) = l.trim().split_once('|')?;
        (n == name).then(|| v.trim().to_string())
    }))
}

fn lv_exists(name: &str) -> Result<bool, String> {
    Ok(lv_field(name, "lv_uuid")?.is_some())
}

fn lv_size(name: &str) -> Result<u64, String> {
    lv_field(name, "lv_size")?
        .ok_or(format!("LV {name} does not exist"))?
        .parse()
        .map_err(|e| format!("lv_size: {e}"))
}

fn lvcreate(name: &str, size: &str) -> CaseResult {
    run("lvcreate", &["--yes", "-q", "-L", size, "-n", name, VG]).map(|_| ())
}

/// sha256 (hex) of the first `len` bytes of `path`, by coreutils (fast enough under emulation).
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

/// sha256 of `len` bytes at `offset` (both multiples of 1 MiB).
fn sha256_range(path: &Path, offset: u64, len: u64) -> Result<String, String> {
    let out = run(
        "sh",
        &[
            "-c",
            &format!(
                "dd if='{}' bs=1M skip={} count={} status=none | sha256sum",
                path.display(),
                offset / MIB,
                len / MIB
            ),
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

/// Writes `byte` over `len` bytes (a multiple of 1 MiB) of a block device from offset 0,
/// bypassing the page cache.
fn fill(path: &Path, byte: u8, len: u64) -> CaseResult {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
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
    // O_DIRECT needs aligned offsets and buffers: start at the 1 MiB boundary below `start`
    // and check the bytes before `start` are skipped.
    let aligned = start / MIB * MIB;
    f.seek(SeekFrom::Start(aligned))
        .map_err(|e| e.to_string())?;
    let mut io_buf = Aligned::new(8 * MIB as usize, 0);
    let buf = io_buf.buf();
    let zeros = vec![0u8; buf.len()];
    let mut off = aligned;
    while off < end {
        let n = ((end - off) as usize).min(buf.len());
        f.read_exact(&mut buf[..n])
            .map_err(|e| format!("reading {} at {off}: {e}", path.display()))?;
        let skip = start.saturating_sub(off).min(n as u64) as usize;
        if buf[skip..n] != zeros[skip..n] {
            let at = buf[skip..n].iter().position(|b| *b != 0).unwrap_or(0);
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

struct Ctx {
    c: reqwest::Client,
    d: Daemon,
    data: PathBuf,
    work: PathBuf,
    refs: HashMap<String, (u64, String)>,
}

impl Ctx {
    fn image_url(&self, name: &str) -> String {
        file_url(&self.data.join(name))
    }

    async fn provision(
        &self,
        image: &str,
        volume: &str,
        gb: u64,
        image_type: &str,
    ) -> (u16, Value) {
        post(
            &self.c,
            &self.d.url("/api/v1/jobs"),
            &json!({"image_url": self.image_url(image), "volume_name": volume,
                    "volume_size_gb": gb, "image_type": image_type}),
        )
        .await
    }

    /// Polls job `id` every `every` until `done` holds for its status record. Polling is slow
    /// on purpose: every request costs the emulated CPU the daemon needs.
    async fn poll(
        &self,
        id: &str,
        every: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            let (status, v) = get(&self.c, &self.d.url(&format!("/api/v1/jobs/{id}"))).await;
            ensure!(status == 200, "GET job {id}: {status} {v}");
            if done(&v) {
                return Ok(v);
            }
            ensure!(
                Instant::now() < deadline,
                "job {id} timed out ({JOB_TIMEOUT:?}): {v}"
            );
            tokio::time::sleep(every).await;
        }
    }

    /// Waits for job `id` to end; its final status record.
    async fn wait_done(&self, id: &str) -> Result<Value, String> {
        self.poll(id, Duration::from_millis(500), |v| {
            ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap_or(""))
        })
        .await
    }

    /// Submits and waits for the job to end; its final status record.
    async fn provision_and_wait(
        &self,
        image: &str,
        volume: &str,
        gb: u64,
        image_type: &str,
    ) -> Result<Value, String> {
        let (status, v) = self.provision(image, volume, gb, image_type).await;
        ensure!(status == 202, "submit {image} -> {volume}: {status} {v}");
        let id = v["job_id"].as_str().ok_or("no job_id")?.to_string();
        self.wait_done(&id).await
    }

    /// The LV holds the reference bytes of `image` and zeros after them.
    fn check_contents(&self, volume: &str, image: &str) -> CaseResult {
        let (len, want) = self
            .refs
            .get(image)
            .ok_or(format!("no reference for {image}"))?;
        let path = lv_path(volume);
        let got = sha256_prefix(&path, *len)?;
        ensure!(
            &got == want,
            "{volume}: sha256 of the first {len} bytes is {got}, the host's qemu-img conversion of {image} is {want}"
        );
        zeros_from(&path, *len)
    }

    fn log_has(&self, needle: &str) -> bool {
        self.log_line_has(&[needle])
    }

    /// Whether one line of the daemon's log contains all `needles`.
    fn log_line_has(&self, needles: &[&str]) -> bool {
        self.d
            .log()
            .lines()
            .any(|l| needles.iter().all(|n| l.contains(n)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs device-mapper and a disk to format: run scripts/vm-test.sh (boots a VM)"]
async fn lvm_backend_end_to_end() {
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
    let refs = references(&data);

    // Stale data where the first LVs will be: new LVs must not show it after the image.
    fill(Path::new(DISK), 0xab, 1100 * MIB).unwrap();
    run("pvcreate", &["-q", "-y", "-ff", DISK]).unwrap();
    // 8 MiB extents: the backend must read the real extent size, not assume 4 MiB.
    run("vgcreate", &["-q", "-s", "8m", VG, DISK]).unwrap();

    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_path_buf();
    // Every LVM command of the daemon narrowed to the VG's disk (`--devices /dev/vda`), as the
    // NixOS module configures it.
    let config = TestConfig::new(&dir)
        .set("volumes.backend", "lvm")
        .set("volumes.lvm.volume_group", VG)
        .set("volumes.lvm.devices", vec![DISK.to_string()])
        .set(
            "sources.file_roots",
            vec![
                data.display().to_string(),
                dir.join("images").display().to_string(),
            ],
        )
        .set("jobs.max_concurrent", 1);
    let d = Daemon::start(&dir, &config);
    let ctx = Ctx {
        c: client(),
        d,
        data,
        work: dir,
        refs,
    };
    println!("setup: {:.1} s", setup.elapsed().as_secs_f64());

    let mut failed = Vec::new();
    for name in CASES {
        let started = Instant::now();
        let fut = run_case(&ctx, name);
        let outcome = std::panic::AssertUnwindSafe(fut).catch_unwind().await;
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
    if !failed.is_empty() {
        let log = ctx.d.log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        println!("daemon log (last lines):");
        for l in tail.into_iter().rev() {
            println!("  {l}");
        }
    }
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

fn run_case<'a>(
    ctx: &'a Ctx,
    name: &'a str,
) -> std::pin::Pin<Box<dyn Future<Output = CaseResult> + Send + 'a>> {
    match name {
        "health_lvm_dependency_is_probed" => Box::pin(health(ctx)),
        "qcow2_into_new_lv" => Box::pin(qcow2_into_new_lv(ctx)),
        "raw_into_new_lv" => Box::pin(raw_into_new_lv(ctx)),
        "reuse_compatible_lv" => Box::pin(reuse_compatible_lv(ctx)),
        "reject_incompatible_lv" => Box::pin(reject_incompatible_lv(ctx)),
        "failing_job_keeps_existing_lv" => Box::pin(failing_job_keeps_existing_lv(ctx)),
        "failing_job_removes_created_lv" => Box::pin(failing_job_removes_created_lv(ctx)),
        "cancel_mid_write_removes_new_lv" => Box::pin(cancel_mid_write(ctx)),
        "delete_is_idempotent" => Box::pin(delete_is_idempotent(ctx)),
        other => Box::pin(async move { Err(format!("unknown case {other}")) }),
    }
}

async fn wait_ready(c: &reqwest::Client, d: &Daemon, want_up: bool) -> CaseResult {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, v) = get(c, &d.url("/readyz")).await;
        if v["dependencies"]["lvm"] == json!(want_up) && (status == 200) == want_up {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "readyz never showed lvm={want_up}: {status} {v}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `lvm` is up while the VG can be listed, down when it cannot, and checked periodically. A
/// second daemon with a 1 s probe interval (each probe is an LVM command, which costs the
/// emulated CPU most of a second) runs only for this case.
async fn health(ctx: &Ctx) -> CaseResult {
    let dir = ctx.work.join("health");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = TestConfig::new(&dir)
        .set("volumes.backend", "lvm")
        .set("volumes.lvm.volume_group", VG)
        .set("volumes.lvm.devices", vec![DISK.to_string()])
        .set("telemetry.probe_interval", "1s");
    let d = Daemon::start(&dir, &config);
    let c = &ctx.c;
    wait_ready(c, &d, true).await?;
    let metrics = c
        .get(d.url("/metrics"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let text = metrics.text().await.map_err(|e| e.to_string())?;
    let line = text
        .lines()
        .find(|l| l.contains("dependencies_up{") && l.contains("dependency=\"lvm\""))
        .unwrap_or("(none)")
        .to_string();
    ensure!(line.ends_with(" 1"), "metrics: {line}");
    // The probe's vgs ran narrowed to the configured device (the daemon's debug log shows the
    // command line it ran).
    ensure!(
        d.log().contains("vgs --devices /dev/vda "),
        "no narrowed vgs in the log:\n{}",
        d.log()
    );
    run("vgrename", &["-q", VG, "vmtest-away"])?;
    let down = wait_ready(c, &d, false).await;
    run("vgrename", &["-q", "vmtest-away", VG])?;
    down?;
    wait_ready(c, &d, true).await?;
    d.stop();
    Ok(())
}

async fn qcow2_into_new_lv(ctx: &Ctx) -> CaseResult {
    let job = ctx
        .provision_and_wait("disk.qcow2", "vm-qcow2", 1, "qcow2")
        .await?;
    ensure!(job["status"] == "completed", "job: {job}");
    ensure!(
        job["volume_path"] == "/dev/vmtest/vm-qcow2",
        "volume_path: {}",
        job["volume_path"]
    );
    ensure!(
        lv_size("vm-qcow2")? == GIB,
        "LV size {}",
        lv_size("vm-qcow2")?
    );
    let tags = lv_field("vm-qcow2", "lv_tags")?.unwrap_or_default();
    let id = job["job_id"].as_str().unwrap_or_default();
    ensure!(
        tags == format!("lvp_job_{id}"),
        "LV tags {tags:?}, want the job's tag"
    );
    ensure!(
        !ctx.log_has("does not support O_DIRECT"),
        "conversion fell back to the page cache on an LV"
    );
    ctx.check_contents("vm-qcow2", "disk.qcow2")
}

async fn raw_into_new_lv(ctx: &Ctx) -> CaseResult {
    let job = ctx
        .provision_and_wait("disk.raw", "vm-raw", 1, "raw")
        .await?;
    ensure!(job["status"] == "completed", "job: {job}");
    ensure!(
        job["volume_path"] == "/dev/vmtest/vm-raw",
        "volume_path: {}",
        job["volume_path"]
    );
    ctx.check_contents("vm-raw", "disk.raw")
}

/// An LV within 5% of the request is overwritten completely: image bytes, then zeros where it
/// held data before; it stays the same LV and gets no job tag.
async fn reuse_compatible_lv(ctx: &Ctx) -> CaseResult {
    lvcreate("reuse-me", "1000m")?;
    fill(&lv_path("reuse-me"), 0x5a, 1000 * MIB)?;
    let uuid = lv_field("reuse-me", "lv_uuid")?;
    let job = ctx
        .provision_and_wait("disk.qcow2", "reuse-me", 1, "qcow2")
        .await?;
    ensure!(job["status"] == "completed", "job: {job}");
    ensure!(
        lv_field("reuse-me", "lv_uuid")? == uuid,
        "the LV was replaced, not reused"
    );
    ensure!(lv_size("reuse-me")? == 1000 * MIB, "LV size changed");
    ensure!(
        lv_field("reuse-me", "lv_tags")?
            .unwrap_or_default()
            .is_empty(),
        "a reused LV got a job tag"
    );
    ensure!(
        ctx.log_has("reusing existing volume"),
        "no reuse in the log"
    );
    ctx.check_contents("reuse-me", "disk.qcow2")
}

/// Incompatible LVs are refused with 409 and stay as they were: too small, a snapshot, a
/// snapshot origin, an open LV.
async fn reject_incompatible_lv(ctx: &Ctx) -> CaseResult {
    lvcreate("small", "512m")?;
    fill(&lv_path("small"), 0x33, 16 * MIB)?;
    let before = sha256_prefix(&lv_path("small"), 16 * MIB)?;
    let uuid = lv_field("small", "lv_uuid")?;
    let (status, v) = ctx.provision("disk.qcow2", "small", 1, "qcow2").await;
    ensure!(status == 409, "small LV: {status} {v}");
    ensure!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("not within 5%"),
        "message: {v}"
    );

    run(
        "lvcreate",
        &[
            "--yes",
            "-q",
            "-s",
            "-L",
            "64m",
            "-n",
            "small-snap",
            &format!("{VG}/small"),
        ],
    )?;
    let (status, v) = ctx.provision("disk.qcow2", "small-snap", 1, "qcow2").await;
    ensure!(
        status == 409 && v["message"].as_str().unwrap_or("").contains("snapshot"),
        "snapshot: {status} {v}"
    );
    lvcreate("big-origin", "1g")?;
    run(
        "lvcreate",
        &[
            "--yes",
            "-q",
            "-s",
            "-L",
            "64m",
            "-n",
            "big-origin-snap",
            &format!("{VG}/big-origin"),
        ],
    )?;
    let (status, v) = ctx.provision("disk.qcow2", "big-origin", 1, "qcow2").await;
    ensure!(
        status == 409 && v["message"].as_str().unwrap_or("").contains("origin"),
        "origin: {status} {v}"
    );

    // vm-raw (1 GiB, compatible) held open by another process.
    let raw_before = sha256_prefix(&lv_path("vm-raw"), 16 * MIB)?;
    let mut holder = Command::new("sleep")
        .arg("120")
        .stdin(std::fs::File::open(lv_path("vm-raw")).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| e.to_string())?;
    let (status, v) = ctx.provision("disk.qcow2", "vm-raw", 1, "qcow2").await;
    let (del_status, del) = delete(&ctx.c, &ctx.d.url("/api/v1/volumes/vm-raw")).await;
    let _ = holder.kill();
    let _ = holder.wait();
    ensure!(
        status == 409 && v["message"].as_str().unwrap_or("").contains("open"),
        "open LV: {status} {v}"
    );
    ensure!(
        del_status == 409 && del["message"].as_str().unwrap_or("").contains("open"),
        "DELETE of an open LV: {del_status} {del}"
    );
    ensure!(lv_exists("vm-raw")?, "open LV was deleted");
    ensure!(
        sha256_prefix(&lv_path("vm-raw"), 16 * MIB)? == raw_before,
        "open LV changed"
    );

    ensure!(lv_field("small", "lv_uuid")? == uuid, "small LV replaced");
    ensure!(lv_size("small")? == 512 * MIB, "small LV resized");
    ensure!(
        sha256_prefix(&lv_path("small"), 16 * MIB)? == before,
        "small LV content changed"
    );
    Ok(())
}

/// An image that fits the request but not the existing LV fails before anything is written;
/// the LV stays. An image larger than the request fails and creates nothing.
async fn failing_job_keeps_existing_lv(ctx: &Ctx) -> CaseResult {
    lvcreate("tight", "1008m")?;
    let path = lv_path("tight");
    fill(&path, 0x77, 1008 * MIB)?;
    let head = sha256_range(&path, 0, 16 * MIB)?;
    let tail = sha256_range(&path, 992 * MIB, 16 * MIB)?;
    let uuid = lv_field("tight", "lv_uuid")?;
    let job = ctx
        .provision_and_wait("tight.qcow2", "tight", 1, "qcow2")
        .await?;
    ensure!(job["status"] == "failed", "job: {job}");
    let err = job["error"].as_str().unwrap_or("");
    ensure!(err.contains("does not fit volume tight"), "error: {err}");
    ensure!(
        lv_field("tight", "lv_uuid")? == uuid,
        "tight LV removed or replaced"
    );
    ensure!(
        sha256_range(&path, 0, 16 * MIB)? == head,
        "tight LV head changed"
    );
    ensure!(
        sha256_range(&path, 992 * MIB, 16 * MIB)? == tail,
        "tight LV tail changed"
    );

    let job = ctx
        .provision_and_wait("toolarge.qcow2", "never-made", 1, "qcow2")
        .await?;
    ensure!(job["status"] == "failed", "job: {job}");
    ensure!(
        job["error"].as_str().unwrap_or("").contains("does not fit"),
        "error: {}",
        job["error"]
    );
    ensure!(!lv_exists("never-made")?, "LV never-made exists");
    Ok(())
}

/// A qcow2 image whose first data cluster points at an unaligned offset: it passes the header
/// inspector, and qemu-img fails reading it mid-conversion.
fn corrupt_qcow2(src: &Path, dst: &Path) -> CaseResult {
    let mut bytes = std::fs::read(src).map_err(|e| e.to_string())?;
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be(&bytes, 40) as usize;
    let l2 = (be(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    ensure!(l2 != 0, "the first L1 entry of {} is empty", src.display());
    let entry = be(&bytes, l2);
    let host = entry & 0x00ff_ffff_ffff_fe00;
    ensure!(
        host != 0,
        "the first cluster of {} is not allocated",
        src.display()
    );
    let bad = (entry & 0xff00_0000_0000_0000) | (host + 512);
    bytes[l2..l2 + 8].copy_from_slice(&bad.to_be_bytes());
    std::fs::write(dst, bytes).map_err(|e| e.to_string())
}

/// A job that created its LV and then failed removes that LV; a request larger than the VG
/// fails with the space it needs and creates nothing.
async fn failing_job_removes_created_lv(ctx: &Ctx) -> CaseResult {
    let bad = ctx.work.join("images/corrupt.qcow2");
    corrupt_qcow2(&ctx.data.join("disk.qcow2"), &bad)?;
    let (status, v) = post(
        &ctx.c,
        &ctx.d.url("/api/v1/jobs"),
        &json!({"image_url": file_url(&bad), "volume_name": "vm-corrupt", "volume_size_gb": 1}),
    )
    .await;
    ensure!(status == 202, "submit: {status} {v}");
    let job = ctx
        .wait_done(v["job_id"].as_str().unwrap_or_default())
        .await?;
    ensure!(job["status"] == "failed", "job: {job}");
    ensure!(
        job["error"].as_str().unwrap_or("").contains("qemu-img"),
        "error: {}",
        job["error"]
    );
    ensure!(
        ctx.log_line_has(&["logical volume created", "\"volume\":\"vmtest/vm-corrupt\""]),
        "the job did not create its LV"
    );
    ensure!(
        ctx.log_has("removing volume created by the failed job"),
        "no rollback in the log"
    );
    ensure!(
        !lv_exists("vm-corrupt")?,
        "the failed job's LV is still there"
    );

    let job = ctx
        .provision_and_wait("disk.qcow2", "vm-huge", 100, "qcow2")
        .await?;
    ensure!(job["status"] == "failed", "job: {job}");
    let err = job["error"].as_str().unwrap_or("");
    ensure!(
        err.contains("need 107374182400 bytes, have") && err.contains("in VG vmtest"),
        "error: {err}"
    );
    ensure!(!lv_exists("vm-huge")?, "LV vm-huge exists");
    Ok(())
}

/// Cancelling while qemu-img writes: the job ends cancelled, qemu-img is gone, the new LV is
/// removed; while it ran, DELETE of its volume was refused.
async fn cancel_mid_write(ctx: &Ctx) -> CaseResult {
    let (status, v) = ctx.provision("cancel.qcow2", "vm-cancel", 1, "qcow2").await;
    ensure!(status == 202, "submit: {status} {v}");
    let id = v["job_id"].as_str().unwrap_or_default().to_string();
    let seen = ctx
        .poll(&id, Duration::from_millis(200), |j| {
            j["status"] != "running"
                || (j["progress"]["stage"] == "converting"
                    && j["progress"]["stage_percent"].as_f64().unwrap_or(0.0) > 0.0)
        })
        .await?;
    ensure!(
        seen["status"] == "running",
        "the job ended before it could be cancelled mid-write: {seen}"
    );
    let (del_status, del) = delete(&ctx.c, &ctx.d.url("/api/v1/volumes/vm-cancel")).await;
    ensure!(
        del_status == 409,
        "DELETE during the job: {del_status} {del}"
    );
    ensure!(lv_exists("vm-cancel")?, "no LV while converting");
    let (status, v) = post(
        &ctx.c,
        &ctx.d.url(&format!("/api/v1/jobs/{id}/cancel")),
        &json!({}),
    )
    .await;
    ensure!(status == 200, "cancel: {status} {v}");
    let job = ctx.wait_done(&id).await?;
    ensure!(job["status"] == "cancelled", "job: {job}");
    let pct = seen["progress"]["stage_percent"].as_f64().unwrap_or(0.0);
    let mid_write = pct < 100.0;
    ensure!(mid_write, "cancelled at {pct}%: not mid-write");
    ensure!(
        !lv_exists("vm-cancel")?,
        "the cancelled job's LV is still there"
    );
    let qemu_img_left = std::fs::read_dir("/proc")
        .map_err(|e| e.to_string())?
        .flatten()
        .any(|p| {
            std::fs::read_to_string(p.path().join("cmdline"))
                .is_ok_and(|c| c.starts_with("qemu-img") && c.contains("vm-cancel"))
        });
    ensure!(!qemu_img_left, "qemu-img still runs after cancel");
    println!("  cancelled at {pct:.1}% of the conversion");
    Ok(())
}

async fn delete_is_idempotent(ctx: &Ctx) -> CaseResult {
    let url = ctx.d.url("/api/v1/volumes/vm-qcow2");
    let (status, v) = delete(&ctx.c, &url).await;
    ensure!(
        status == 200 && v["status"] == "deleted" && v["volume"] == "vm-qcow2",
        "first DELETE: {status} {v}"
    );
    ensure!(!lv_exists("vm-qcow2")?, "LV still there after DELETE");
    let (status, v) = delete(&ctx.c, &url).await;
    ensure!(
        status == 200 && v["status"] == "deleted",
        "second DELETE: {status} {v}"
    );
    // A snapshot origin is not removed through the API (its snapshots would go with it).
    let (status, v) = delete(&ctx.c, &ctx.d.url("/api/v1/volumes/big-origin")).await;
    ensure!(status == 409, "DELETE of a snapshot origin: {status} {v}");
    ensure!(
        lv_exists("big-origin")? && lv_exists("big-origin-snap")?,
        "origin or snapshot removed"
    );
    Ok(())
}
