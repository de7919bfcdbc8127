//! The harness of the VM suites (tests/lvm_vm.rs, tests/thin_vm.rs, tests/libvirt_vm.rs), which
//! run inside the QEMU VM that scripts/vm-test.sh boots with tests/vm/vm-run.sh: the case runner
//! and the lines vm-test.sh counts (`VM-CASES <n>` first, then one `VM-CASE PASS <name> (<s> s)`
//! or `VM-CASE FAIL <name> (<s> s): <why>` per case), the test data scripts/vm-test.sh made on the
//! host (`VMTEST_DATA`, with the reference conversions in `refs.txt`), the VM's disk made a
//! volume group, commands and LVM queries, O_DIRECT block I/O, and slow polling of the daemon's
//! jobs (every request costs the emulated CPU the daemon needs).

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::{Value, json};

use super::daemon::{Daemon, delete, get, post};
use super::images::file_url;

/// The VM's blank disk, which the suites make a physical volume.
pub const DISK: &str = "/dev/vda";
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;

/// What a case returns: `Err` with what went wrong (a panic counts as a failure too).
pub type CaseResult = Result<(), String>;

/// A running case.
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = CaseResult> + Send + 'a>>;

/// One case of a suite: its name (in the `VM-CASE` lines) and what it runs on the suite's
/// context, e.g. `("qcow2_into_new_lv", |ctx| Box::pin(qcow2_into_new_lv(ctx)))`.
pub type Case<C> = (&'static str, for<'a> fn(&'a C) -> CaseFuture<'a>);

/// Returns `Err(format!(...))` from the enclosing function when the condition does not hold.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}
#[allow(unused_imports)]
pub(crate) use ensure;

/// A VM suite under way: started by `Suite::start`, ended by `Suite::run`.
pub struct Suite {
    /// The test data scripts/vm-test.sh made on the host (`VMTEST_DATA`).
    pub data: PathBuf,
    started: Instant,
}

impl Suite {
    /// Refuses to run outside the test VM (the suite `does` things to the machine: "formats
    /// /dev/vda"), prints `VM-CASES <cases>` and finds the test data.
    pub fn start(cases: usize, does: &str) -> Suite {
        assert_eq!(
            std::env::var("IN_TEST_VM").as_deref(),
            Ok("1"),
            "this test {does}: it runs only inside the test VM (scripts/vm-test.sh)"
        );
        println!("\nVM-CASES {cases}");
        let started = Instant::now();
        let data = PathBuf::from(
            std::env::var("VMTEST_DATA")
                .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/vm-test").into()),
        );
        Suite { data, started }
    }

    /// Prints `<what>: <seconds since the start> s`.
    pub fn lap(&self, what: &str) {
        println!("{what}: {:.1} s", self.started.elapsed().as_secs_f64());
    }

    /// The host's reference conversions of the test images.
    pub fn references(&self) -> References {
        References::load(&self.data)
    }

    /// Runs `cases` in order on `ctx`, printing a `VM-CASE` line for each; when one failed,
    /// prints the last lines of `daemon`'s log (if given) and panics naming the failed cases.
    pub async fn run<C: Sync>(self, ctx: &C, cases: &[Case<C>], daemon: Option<&Daemon>) {
        let mut failed = Vec::new();
        for (name, case) in cases {
            let started = Instant::now();
            let outcome = std::panic::AssertUnwindSafe(case(ctx)).catch_unwind().await;
            let secs = started.elapsed().as_secs_f64();
            match outcome {
                Ok(Ok(())) => println!("VM-CASE PASS {name} ({secs:.1} s)"),
                Ok(Err(e)) => {
                    println!("VM-CASE FAIL {name} ({secs:.1} s): {e}");
                    failed.push(*name);
                }
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    println!("VM-CASE FAIL {name} ({secs:.1} s): panicked: {msg}");
                    failed.push(*name);
                }
            }
        }
        if let Some(d) = daemon.filter(|_| !failed.is_empty()) {
            println!("daemon log (last lines):");
            println!("  {}", log_tail(d, 60).join("\n  "));
        }
        assert!(failed.is_empty(), "failed cases: {failed:?}");
    }
}

/// The last `n` lines of the daemon's log.
fn log_tail(d: &Daemon, n: usize) -> Vec<String> {
    let log = d.log();
    let mut tail: Vec<String> = log.lines().rev().take(n).map(str::to_string).collect();
    tail.reverse();
    tail
}

/// `r`, its error followed by the last lines of the daemon's log.
pub fn with_log<T>(d: &Daemon, r: Result<T, String>) -> Result<T, String> {
    r.map_err(|e| {
        format!(
            "{e}\n  daemon log (last lines):\n  {}",
            log_tail(d, 40).join("\n  ")
        )
    })
}

/// Runs a command (in the C locale, LVM's warnings about inherited descriptors off); stdout on
/// success, else an error with its output.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
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

/// Makes `DISK` a physical volume and the volume group `vg` over it, `vgcreate_args` (e.g.
/// `["-s", "8m"]`) given to vgcreate.
pub fn create_vg(vg: &str, vgcreate_args: &[&str]) -> CaseResult {
    run("pvcreate", &["-q", "-y", "-ff", DISK])?;
    run("vgcreate", &[&["-q"], vgcreate_args, &[vg, DISK]].concat()).map(|_| ())
}

/// `/dev/<vg>/<name>`.
pub fn lv_path(vg: &str, name: &str) -> PathBuf {
    PathBuf::from(format!("/dev/{vg}/{name}"))
}

/// `field` of LV `name` in `vg` as `lvs` reports it (sizes in bytes), `None` when it does not
/// exist.
pub fn lv_field(vg: &str, name: &str, field: &str) -> Result<Option<String>, String> {
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

/// Whether LV `name` exists in `vg`.
pub fn lv_exists(vg: &str, name: &str) -> Result<bool, String> {
    Ok(lv_field(vg, name, "lv_uuid")?.is_some())
}

/// The size in bytes of LV `name` of `vg`.
pub fn lv_size(vg: &str, name: &str) -> Result<u64, String> {
    lv_field(vg, name, "lv_size")?
        .ok_or(format!("LV {name} does not exist"))?
        .parse()
        .map_err(|e| format!("lv_size: {e}"))
}

/// Names of the LVs of `vg`.
pub fn lv_names(vg: &str) -> Result<Vec<String>, String> {
    let out = run("lvs", &["--noheadings", "-o", "lv_name", vg])?;
    Ok(out.split_whitespace().map(str::to_string).collect())
}

/// Creates a linear LV `name` of `size` (lvcreate's `-L`) in `vg`.
pub fn lvcreate(vg: &str, name: &str, size: &str) -> CaseResult {
    run("lvcreate", &["--yes", "-q", "-L", size, "-n", name, vg]).map(|_| ())
}

/// Creates a snapshot LV `name` of `size` of the LV `origin` of `vg`.
pub fn lv_snapshot(vg: &str, origin: &str, name: &str, size: &str) -> CaseResult {
    let origin = format!("{vg}/{origin}");
    run(
        "lvcreate",
        &["--yes", "-q", "-s", "-L", size, "-n", name, &origin],
    )
    .map(|_| ())
}

/// sha256 (hex) of the first `len` bytes of `path`, by coreutils (fast enough under emulation).
pub fn sha256_prefix(path: &Path, len: u64) -> Result<String, String> {
    sha256_of(&format!("head -c {len} '{}'", path.display()))
}

/// sha256 of `len` bytes at `offset` of `path` (both multiples of 1 MiB).
pub fn sha256_range(path: &Path, offset: u64, len: u64) -> Result<String, String> {
    sha256_of(&format!(
        "dd if='{}' bs=1M skip={} count={} status=none",
        path.display(),
        offset / MIB,
        len / MIB
    ))
}

/// sha256 of what the shell command `source` writes.
fn sha256_of(source: &str) -> Result<String, String> {
    let out = run("sh", &["-c", &format!("{source} | sha256sum")])?;
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

/// Opens a block device (or file) with O_DIRECT: no page cache, so no stale data either.
fn open_direct(path: &Path, write: bool) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes `byte` over `len` bytes (a multiple of 1 MiB) at `offset` of a block device,
/// bypassing the page cache.
pub fn fill_at(path: &Path, byte: u8, offset: u64, len: u64) -> CaseResult {
    let mut f = open_direct(path, true)?;
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
pub fn zeros_from(path: &Path, start: u64) -> CaseResult {
    let mut f = open_direct(path, false)?;
    let end = f.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    // O_DIRECT needs aligned offsets and buffers: start at the 1 MiB boundary below `start`
    // and skip the bytes before `start`.
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

/// The host's reference conversions of the test images (`refs.txt` of scripts/vm-test.sh):
/// image name -> (raw size, sha256).
pub struct References(HashMap<String, (u64, String)>);

impl References {
    /// Reads `data/refs.txt`.
    pub fn load(data: &Path) -> References {
        let text = std::fs::read_to_string(data.join("refs.txt"))
            .expect("refs.txt from scripts/vm-test.sh");
        References(
            text.lines()
                .filter_map(|l| {
                    let mut w = l.split_whitespace();
                    Some((
                        w.next()?.to_string(),
                        (w.next()?.parse().ok()?, w.next()?.to_string()),
                    ))
                })
                .collect(),
        )
    }

    /// The raw size and sha256 of `image`'s conversion.
    pub fn get(&self, image: &str) -> Result<(u64, String), String> {
        self.0
            .get(image)
            .cloned()
            .ok_or(format!("no reference for {image}"))
    }

    /// The device's first bytes are `image`'s (the host's conversion).
    pub fn check_image_bytes(&self, device: &Path, image: &str) -> CaseResult {
        let (len, want) = self.get(image)?;
        let got = sha256_prefix(device, len)?;
        ensure!(
            got == want,
            "{}: sha256 of the first {len} bytes is {got}, the host's qemu-img conversion of {image} is {want}",
            device.display()
        );
        Ok(())
    }

    /// `image`'s bytes, then zeros to the end of the device.
    pub fn check_contents(&self, device: &Path, image: &str) -> CaseResult {
        self.check_image_bytes(device, image)?;
        zeros_from(device, self.get(image)?.0)
    }
}

/// A copy of the qcow2 `src` at `dst` whose first data cluster points at an unaligned offset:
/// it passes the header inspector, and qemu-img fails reading it mid-conversion (after the
/// volume was created).
pub fn corrupt_qcow2(src: &Path, dst: &Path) -> CaseResult {
    let mut bytes = std::fs::read(src).map_err(|e| format!("{}: {e}", src.display()))?;
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

/// Whether one line of the daemon's log contains all `needles`.
pub fn log_line_has(d: &Daemon, needles: &[&str]) -> bool {
    d.log()
        .lines()
        .any(|l| needles.iter().all(|n| l.contains(n)))
}

/// One daemon under test and how the VM suites reach it: slowly, on purpose.
pub struct Api<'a> {
    /// The HTTP client.
    pub c: &'a reqwest::Client,
    /// The daemon.
    pub d: &'a Daemon,
    /// How long a job may take before `poll` gives up.
    pub job_timeout: Duration,
}

impl<'a> Api<'a> {
    /// The daemon `d` through `c`; jobs may take `job_timeout`.
    pub fn new(c: &'a reqwest::Client, d: &'a Daemon, job_timeout: Duration) -> Api<'a> {
        Api { c, d, job_timeout }
    }
}

impl Api<'_> {
    /// `POST /api/v1/jobs` for `image` (a file) into `volume` of `gb` GB.
    pub async fn provision(
        &self,
        image: &Path,
        volume: &str,
        gb: u64,
        image_type: &str,
    ) -> (u16, Value) {
        post(
            self.c,
            &self.d.url("/api/v1/jobs"),
            &json!({"image_url": file_url(image), "volume_name": volume,
                    "volume_size_gb": gb, "image_type": image_type}),
        )
        .await
    }

    /// As `provision`, requiring 202; the job's id.
    pub async fn submit(
        &self,
        image: &Path,
        volume: &str,
        gb: u64,
        image_type: &str,
    ) -> Result<String, String> {
        let (status, v) = self.provision(image, volume, gb, image_type).await;
        ensure!(
            status == 202,
            "submit {} -> {volume}: {status} {v}",
            image.display()
        );
        Ok(v["job_id"].as_str().unwrap_or_default().to_string())
    }

    /// Submits and waits for the job to end; its final status record.
    pub async fn provision_and_wait(
        &self,
        image: &Path,
        volume: &str,
        gb: u64,
        image_type: &str,
    ) -> Result<Value, String> {
        let id = self.submit(image, volume, gb, image_type).await?;
        self.wait_done(&id).await
    }

    /// Polls job `id` every `every` until `done` holds for its status record.
    pub async fn poll(
        &self,
        id: &str,
        every: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + self.job_timeout;
        loop {
            let (status, v) = get(self.c, &self.d.url(&format!("/api/v1/jobs/{id}"))).await;
            ensure!(status == 200, "GET job {id}: {status} {v}");
            if done(&v) {
                return Ok(v);
            }
            ensure!(
                Instant::now() < deadline,
                "job {id} timed out ({:?}): {v}",
                self.job_timeout
            );
            tokio::time::sleep(every).await;
        }
    }

    /// Waits for job `id` to end; its final status record.
    pub async fn wait_done(&self, id: &str) -> Result<Value, String> {
        self.poll(id, Duration::from_millis(500), |v| {
            ["completed", "failed", "cancelled"].contains(&v["status"].as_str().unwrap_or(""))
        })
        .await
    }

    /// Waits until job `id` converts (the stage has made progress), or has ended: its status
    /// record then.
    pub async fn wait_converting(&self, id: &str) -> Result<Value, String> {
        self.poll(id, Duration::from_millis(200), |j| {
            j["status"] != "running"
                || (j["progress"]["stage"] == "converting"
                    && j["progress"]["stage_percent"].as_f64().unwrap_or(0.0) > 0.0)
        })
        .await
    }

    /// `POST /api/v1/jobs/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> (u16, Value) {
        let url = self.d.url(&format!("/api/v1/jobs/{id}/cancel"));
        post(self.c, &url, &json!({})).await
    }

    /// `DELETE /api/v1/volumes/{volume}`.
    pub async fn delete(&self, volume: &str) -> (u16, Value) {
        delete(self.c, &self.d.url(&format!("/api/v1/volumes/{volume}"))).await
    }

    /// Waits (up to `within`) until `/readyz` shows `dependency` up (and answers 200) or down
    /// (and answers 503).
    pub async fn wait_ready(&self, dependency: &str, up: bool, within: Duration) -> CaseResult {
        let deadline = Instant::now() + within;
        loop {
            let (status, v) = get(self.c, &self.d.url("/readyz")).await;
            if v["dependencies"][dependency] == json!(up) && (status == 200) == up {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "readyz never showed {dependency}={up}: {status} {v}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
