//! A disk's life on real LVM and libvirt, inside the test VM (run by `scripts/vm-test.sh`):
//! growing thick and thin LVs (and one a paused domain has as its disk, read back through
//! `virsh domblkinfo`), never shrinking; the deleted data of a thick LV not reaching the next
//! LV made on the same extents with `lvcreate -Zn`; a wipe cut by `kill -9` finished after the
//! restart; and the wipe's throughput beside `blkdiscard -z` on the same device. Prints
//! `VM-CASES <n>`, then one `VM-CASE PASS|FAIL` line per case; fails if any case fails.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::libvirt::*;
use common::*;
use serde_json::{Value, json};

const VG: &str = "vmlife";
const POOL: &str = "pool";
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// Cases in the order they run.
const CASES: [Case<Ctx>; 5] = [
    ("grow_thick_and_thin_never_shrink", |c| {
        Box::pin(grow_thick_and_thin(c))
    }),
    ("grow_under_a_paused_domain", |c| {
        Box::pin(grow_under_a_paused_domain(c))
    }),
    ("deleted_markers_do_not_reach_the_next_lv", |c| {
        Box::pin(deleted_markers_do_not_reach_the_next_lv(c))
    }),
    ("kill9_mid_wipe_is_finished_after_restart", |c| {
        Box::pin(kill9_mid_wipe(c))
    }),
    ("wipe_throughput_beside_blkdiscard", |c| {
        Box::pin(wipe_throughput(c))
    }),
];

struct Ctx {
    c: reqwest::Client,
    /// The daemon's directory (state, config); a case may restart it there.
    dir: PathBuf,
    config: TestConfig,
    daemon: std::sync::Mutex<Option<Daemon>>,
}

impl Ctx {
    /// The daemon's URL for `path`.
    fn url(&self, path: &str) -> String {
        self.daemon.lock().unwrap().as_ref().unwrap().url(path)
    }

    async fn resize(&self, name: &str, gb: u64) -> (u16, Value) {
        let url = self.url(&format!("/api/v1/volumes/{name}/resize"));
        post(&self.c, &url, &json!({ "size_gb": gb })).await
    }

    async fn delete(&self, name: &str) -> (u16, Value) {
        delete(&self.c, &self.url(&format!("/api/v1/volumes/{name}"))).await
    }

    async fn job(&self, id: &str) -> Value {
        get(&self.c, &self.url(&format!("/api/v1/jobs/{id}")))
            .await
            .1
    }

    /// Polls job `id` (every second: requests cost the emulated CPU) until `done` holds.
    async fn wait(&self, id: &str, done: impl Fn(&Value) -> bool) -> Result<Value, String> {
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            let v = self.job(id).await;
            if done(&v) {
                return Ok(v);
            }
            ensure!(Instant::now() < deadline, "job {id} timed out: {v}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn lv(name: &str) -> PathBuf {
    lv_path(VG, name)
}

/// The first physical extent and the extent count of LV `name` (one segment).
fn extents_of(name: &str) -> Result<(u64, u64), String> {
    let ranges = lv_field(VG, name, "seg_pe_ranges")?.ok_or(format!("no LV {name}"))?;
    // `/dev/vda:START-END`
    let (start, end) = ranges
        .rsplit_once(':')
        .and_then(|(_, r)| r.split_once('-'))
        .ok_or(format!("seg_pe_ranges {ranges:?}"))?;
    let start: u64 = start.trim().parse().map_err(|e| format!("{ranges}: {e}"))?;
    let end: u64 = end.trim().parse().map_err(|e| format!("{ranges}: {e}"))?;
    Ok((start, end - start + 1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs device-mapper, libvirtd and a disk to format: run scripts/vm-test.sh (boots a VM)"]
async fn lifecycle_end_to_end() {
    let suite = Suite::start(CASES.len(), &format!("formats {DISK} and starts libvirtd"));
    setup_libvirt(&suite.data).unwrap();
    suite.lap("libvirtd up");
    create_vg(VG, &["-s", "4m"]).unwrap();
    run(
        "lvcreate",
        &[
            "--yes",
            "-q",
            "--type",
            "thin-pool",
            "-L",
            "256M",
            "-n",
            POOL,
            VG,
        ],
    )
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("daemon");
    std::fs::create_dir_all(&dir).unwrap();
    let config = TestConfig::new(&dir)
        .set("volumes.backend", "lvm")
        .set("volumes.lvm.volume_group", VG)
        .set("volumes.lvm.thin_pool", POOL)
        .set("volumes.lvm.golden_images", false)
        .set("libvirt.uri", URI)
        .set("libvirt.pool", VG)
        .set("volumes.wipe_job_min_bytes", 256 << 20);
    virsh(&[
        "pool-define-as",
        VG,
        "logical",
        "--source-name",
        VG,
        "--target",
        &format!("/dev/{VG}"),
    ])
    .unwrap();
    virsh(&["pool-start", VG]).unwrap();
    let ctx = Ctx {
        c: client(),
        daemon: std::sync::Mutex::new(Some(Daemon::start(&dir, &config))),
        dir,
        config,
    };
    suite.lap("setup");
    suite.run(&ctx, &CASES, None).await;
}

/// A thick LV and a thin LV (made outside the daemon) grow to 1 GiB; the same size again
/// changes nothing; a smaller size is refused and changes nothing.
async fn grow_thick_and_thin(ctx: &Ctx) -> CaseResult {
    lvcreate(VG, "g-thick", "64M")?;
    run(
        "lvcreate",
        &[
            "--yes",
            "-q",
            "-V",
            "64M",
            "-T",
            &format!("{VG}/{POOL}"),
            "-n",
            "g-thin",
        ],
    )?;
    for name in ["g-thick", "g-thin"] {
        let (s, v) = ctx.resize(name, 1).await;
        ensure!(
            s == 200 && v["size_bytes"] == json!(GIB) && v["live"] == json!(false),
            "{name}: {s} {v}"
        );
        ensure!(
            lv_size(VG, name)? == GIB,
            "{name}: lvs says {}",
            lv_size(VG, name)?
        );
        let (s, v) = ctx.resize(name, 1).await;
        ensure!(
            s == 200 && v["size_bytes"] == json!(GIB),
            "{name} same size: {s} {v}"
        );
    }
    ensure!(
        lv_field(VG, "g-thin", "segtype")?.as_deref() == Some("thin"),
        "g-thin is thin"
    );
    lvcreate(VG, "g-big", "1028M")?;
    let (s, v) = ctx.resize("g-big", 1).await;
    ensure!(
        s == 409 && v["reason"] == "shrink_refused",
        "shrink: {s} {v}"
    );
    ensure!(
        lv_size(VG, "g-big")? == GIB + 4 * MIB,
        "shrink changed the LV"
    );
    for name in ["g-thick", "g-thin", "g-big"] {
        run("lvremove", &["--yes", "-q", &format!("{VG}/{name}")])?;
    }
    Ok(())
}

/// A paused domain has the LV as its disk: the resize answers `live` with the domain, and
/// libvirt (QEMU) reports the new capacity.
async fn grow_under_a_paused_domain(ctx: &Ctx) -> CaseResult {
    lvcreate(VG, "g-live", "64M")?;
    start_paused_domain(&ctx.dir, "lifedom", &lv("g-live"), true)?;
    let (s, v) = ctx.resize("g-live", 1).await;
    let info = virsh(&["domblkinfo", "lifedom", "vda", "--human"]).unwrap_or_default();
    let bytes = virsh(&["domblkinfo", "lifedom", "vda"])?;
    stop_domain("lifedom")?;
    ensure!(
        s == 200 && v["live"] == json!(true) && v["domain"] == "lifedom",
        "resize under the domain: {s} {v}"
    );
    let capacity: u64 = bytes
        .lines()
        .find_map(|l| l.strip_prefix("Capacity:"))
        .and_then(|c| c.trim().parse().ok())
        .ok_or(format!("domblkinfo: {bytes}"))?;
    ensure!(capacity == GIB, "the domain sees {capacity} bytes: {info}");
    println!(
        "  domblkinfo after the resize: {}",
        info.replace('\n', "; ")
    );
    run("lvremove", &["--yes", "-q", &format!("{VG}/g-live")]).map(|_| ())
}

/// The measured defect of the issue: a tenant's marker every 8 MiB of a thick LV, DELETE, a
/// new LV on the same extents made with `lvcreate -Zn` (as other tools on the host do): it
/// must read zeros everywhere.
async fn deleted_markers_do_not_reach_the_next_lv(ctx: &Ctx) -> CaseResult {
    lvcreate(VG, "w-tenant", "128M")?;
    let (start, count) = extents_of("w-tenant")?;
    for i in 0..16 {
        fill_at(&lv("w-tenant"), 0x5a, i * 8 * MIB, MIB)?;
    }
    let (s, v) = ctx.delete("w-tenant").await;
    ensure!(s == 200 && v["status"] == "deleted", "DELETE: {s} {v}");
    ensure!(!lv_exists(VG, "w-tenant")?, "the LV is gone");
    let range = format!("{DISK}:{start}-{}", start + count - 1);
    run(
        "lvcreate",
        &[
            "--yes",
            "-q",
            "-Zn",
            "-Wn",
            "-l",
            &count.to_string(),
            "-n",
            "w-next",
            VG,
            &range,
        ],
    )?;
    ensure!(
        extents_of("w-next")? == (start, count),
        "not the same extents"
    );
    let read = zeros_from(&lv("w-next"), 0);
    run("lvremove", &["--yes", "-q", &format!("{VG}/w-next")])?;
    read.map_err(|e| format!("a marker reached the next LV: {e}"))
}

/// `kill -9` while a `wipe` job zeroes a 2 GiB LV: the LV keeps its tag, and the restarted
/// daemon runs the job again to the end (the LV gone, the job completed).
async fn kill9_mid_wipe(ctx: &Ctx) -> CaseResult {
    lvcreate(VG, "w-kill", "2G")?;
    let (s, v) = ctx.delete("w-kill").await;
    ensure!(s == 202, "a 2 GiB zero wipe is a job: {s} {v}");
    let id = v["job_id"].as_str().unwrap_or_default().to_string();
    let seen = ctx
        .wait(&id, |j| {
            j["status"] != "pending" && j["progress"]["bytes_processed"].as_u64() > Some(0)
                || j["status"] == "completed"
        })
        .await?;
    ensure!(
        seen["status"] == "running",
        "the wipe ended before the kill: {seen}"
    );
    ctx.daemon.lock().unwrap().take().unwrap().kill9();
    let tags = lv_field(VG, "w-kill", "lv_tags")?.unwrap_or_default();
    println!(
        "  killed at {} of {} bytes; tags {tags}",
        seen["progress"]["bytes_processed"], seen["progress"]["bytes_total"]
    );
    ensure!(
        tags.contains("lvp_wipe_zero"),
        "the intent is on the LV: {tags:?}"
    );
    *ctx.daemon.lock().unwrap() = Some(Daemon::start(&ctx.dir, &ctx.config));
    let done = ctx
        .wait(&id, |j| {
            j["status"] != "running" && j["status"] != "pending"
        })
        .await?;
    ensure!(done["status"] == "completed", "after the restart: {done}");
    ensure!(!lv_exists(VG, "w-kill")?, "the LV is removed");
    Ok(())
}

/// Figures for the lead: a `wipe` job's zeroing of a 4 GiB thick LV beside `blkdiscard -z` of
/// the same size on the same device, in the same run.
async fn wipe_throughput(ctx: &Ctx) -> CaseResult {
    lvcreate(VG, "t-base", "4G")?;
    let started = Instant::now();
    run("blkdiscard", &["-z", &lv("t-base").display().to_string()])?;
    let baseline = started.elapsed().as_secs_f64();
    run("lvremove", &["--yes", "-q", &format!("{VG}/t-base")])?;
    lvcreate(VG, "t-wipe", "4G")?;
    let (s, v) = ctx.delete("t-wipe").await;
    ensure!(s == 202, "{s} {v}");
    let id = v["job_id"].as_str().unwrap_or_default().to_string();
    let done = ctx
        .wait(&id, |j| {
            j["status"] == "completed" || j["status"] == "failed"
        })
        .await?;
    ensure!(done["status"] == "completed", "{done}");
    let secs = |k: &str| {
        chrono::DateTime::parse_from_rfc3339(done[k].as_str().unwrap_or_default())
            .map(|t| t.timestamp_micros() as f64 / 1e6)
            .unwrap_or(0.0)
    };
    let job = secs("finished_at") - secs("started_at");
    // The zeroing alone, as the daemon logged it (the job also tags, activates and removes the
    // LV: LVM commands that take about a second each under emulation).
    let log = ctx.daemon.lock().unwrap().as_ref().unwrap().log();
    let zeroing = log
        .lines()
        .filter(|l| l.contains("wiped logical volume before removal") && l.contains("t-wipe"))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["seconds"].as_f64().or(v["fields"]["seconds"].as_f64()))
        .unwrap_or(f64::NAN);
    let mib = 4096.0;
    println!(
        "  FIGURE wipe of a 4 GiB thick LV: BLKZEROOUT {zeroing:.2} s ({:.0} MiB/s); whole wipe \
         job {job:.1} s (tag, zero, lvremove, pool refresh); blkdiscard -z baseline {baseline:.2} \
         s ({:.0} MiB/s)",
        mib / zeroing,
        mib / baseline
    );
    Ok(())
}
