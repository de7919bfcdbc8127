//! LVM end to end, inside the test VM (device-mapper needed; run by `scripts/vm-test.sh`): a
//! sparse virtual disk becomes a PV and a VG, the real daemon binary runs with the lvm backend,
//! and every case goes through the HTTP API. LV contents are compared with hashes of qemu-img
//! conversions made on the host. Prints `VM-CASES <n>`, then one `VM-CASE PASS|FAIL` line per
//! case; fails if any case fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const VG: &str = "vmtest";
const JOB_TIMEOUT: Duration = Duration::from_secs(240);

/// Cases in the order they run (later ones use volumes earlier ones made).
const CASES: [Case<Ctx>; 9] = [
    ("health_lvm_dependency_is_probed", |c| Box::pin(health(c))),
    ("qcow2_into_new_lv", |c| Box::pin(qcow2_into_new_lv(c))),
    ("raw_into_new_lv", |c| Box::pin(raw_into_new_lv(c))),
    ("reuse_compatible_lv", |c| Box::pin(reuse_compatible_lv(c))),
    ("reject_incompatible_lv", |c| {
        Box::pin(reject_incompatible_lv(c))
    }),
    ("failing_job_keeps_existing_lv", |c| {
        Box::pin(failing_job_keeps_existing_lv(c))
    }),
    ("failing_job_removes_created_lv", |c| {
        Box::pin(failing_job_removes_created_lv(c))
    }),
    ("cancel_mid_write_removes_new_lv", |c| {
        Box::pin(cancel_mid_write(c))
    }),
    ("delete_is_idempotent", |c| {
        Box::pin(delete_is_idempotent(c))
    }),
];

fn lv_path(name: &str) -> PathBuf {
    common::lv_path(VG, name)
}

struct Ctx {
    c: reqwest::Client,
    d: Daemon,
    data: PathBuf,
    work: PathBuf,
    refs: References,
}

impl Ctx {
    fn api(&self) -> Api<'_> {
        Api::new(&self.c, &self.d, JOB_TIMEOUT)
    }

    async fn provision(
        &self,
        image: &str,
        volume: &str,
        gb: u64,
        image_type: &str,
    ) -> (u16, Value) {
        self.api()
            .provision(&self.data.join(image), volume, gb, image_type)
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
        self.api()
            .provision_and_wait(&self.data.join(image), volume, gb, image_type)
            .await
    }

    /// The LV holds the reference bytes of `image` and zeros after them.
    fn check_contents(&self, volume: &str, image: &str) -> CaseResult {
        self.refs.check_contents(&lv_path(volume), image)
    }

    fn log_has(&self, needle: &str) -> bool {
        log_line_has(&self.d, &[needle])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs device-mapper and a disk to format: run scripts/vm-test.sh (boots a VM)"]
async fn lvm_backend_end_to_end() {
    let suite = Suite::start(CASES.len(), &format!("formats {DISK}"));
    // Stale data where the first LVs will be: new LVs must not show it after the image.
    fill_at(Path::new(DISK), 0xab, 0, 1100 * MIB).unwrap();
    // 8 MiB extents: the backend must read the real extent size, not assume 4 MiB.
    create_vg(VG, &["-s", "8m"]).unwrap();

    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_path_buf();
    // Every LVM command of the daemon narrowed to the VG's disk (`--devices /dev/vda`), as the
    // NixOS module configures it.
    let config = lvm_config(&dir).set(
        "sources.file_roots",
        vec![
            suite.data.display().to_string(),
            dir.join("images").display().to_string(),
        ],
    );
    let ctx = Ctx {
        c: client(),
        d: Daemon::start(&dir, &config.set("jobs.max_concurrent", 1)),
        data: suite.data.clone(),
        work: dir,
        refs: suite.references(),
    };
    suite.lap("setup");
    suite.run(&ctx, &CASES, Some(&ctx.d)).await;
}

/// The lvm backend on the VG, narrowed to its disk.
fn lvm_config(dir: &Path) -> TestConfig {
    TestConfig::new(dir)
        .set("volumes.backend", "lvm")
        .set("volumes.lvm.volume_group", VG)
        .set("volumes.lvm.devices", vec![DISK.to_string()])
}

/// `lvm` is up while the VG can be listed, down when it cannot, and checked periodically. A
/// second daemon with a 1 s probe interval (each probe is an LVM command, which costs the
/// emulated CPU most of a second) runs only for this case.
async fn health(ctx: &Ctx) -> CaseResult {
    let dir = ctx.work.join("health");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = lvm_config(&dir).set("telemetry.probe_interval", "1s");
    let d = Daemon::start(&dir, &config);
    let api = Api::new(&ctx.c, &d, JOB_TIMEOUT);
    let wait_ready = |up| api.wait_ready("lvm", up, Duration::from_secs(30));
    wait_ready(true).await?;
    let up = metric(
        &ctx.c,
        &d,
        "libvirt_volume_provisioner_dependencies_up",
        "dependency=\"lvm\"",
    )
    .await;
    ensure!(up == 1.0, "dependencies_up{{lvm}} = {up}");
    // The probe's vgs ran narrowed to the configured device (the daemon's debug log shows the
    // command line it ran).
    ensure!(
        d.log().contains("vgs --devices /dev/vda "),
        "no narrowed vgs in the log:\n{}",
        d.log()
    );
    run("vgrename", &["-q", VG, "vmtest-away"])?;
    let down = wait_ready(false).await;
    run("vgrename", &["-q", "vmtest-away", VG])?;
    down?;
    wait_ready(true).await?;
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
        lv_size(VG, "vm-qcow2")? == GIB,
        "LV size {}",
        lv_size(VG, "vm-qcow2")?
    );
    let tags = lv_field(VG, "vm-qcow2", "lv_tags")?.unwrap_or_default();
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
    lvcreate(VG, "reuse-me", "1000m")?;
    fill_at(&lv_path("reuse-me"), 0x5a, 0, 1000 * MIB)?;
    let uuid = lv_field(VG, "reuse-me", "lv_uuid")?;
    let job = ctx
        .provision_and_wait("disk.qcow2", "reuse-me", 1, "qcow2")
        .await?;
    ensure!(job["status"] == "completed", "job: {job}");
    ensure!(
        lv_field(VG, "reuse-me", "lv_uuid")? == uuid,
        "the LV was replaced, not reused"
    );
    ensure!(lv_size(VG, "reuse-me")? == 1000 * MIB, "LV size changed");
    ensure!(
        lv_field(VG, "reuse-me", "lv_tags")?
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
    lvcreate(VG, "small", "512m")?;
    fill_at(&lv_path("small"), 0x33, 0, 16 * MIB)?;
    let before = sha256_prefix(&lv_path("small"), 16 * MIB)?;
    let uuid = lv_field(VG, "small", "lv_uuid")?;
    let (status, v) = ctx.provision("disk.qcow2", "small", 1, "qcow2").await;
    ensure!(status == 409, "small LV: {status} {v}");
    ensure!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("not within 5%"),
        "message: {v}"
    );

    lv_snapshot(VG, "small", "small-snap", "64m")?;
    let (status, v) = ctx.provision("disk.qcow2", "small-snap", 1, "qcow2").await;
    ensure!(
        status == 409 && v["message"].as_str().unwrap_or("").contains("snapshot"),
        "snapshot: {status} {v}"
    );
    lvcreate(VG, "big-origin", "1g")?;
    lv_snapshot(VG, "big-origin", "big-origin-snap", "64m")?;
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
    let (del_status, del) = ctx.api().delete("vm-raw").await;
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
    ensure!(lv_exists(VG, "vm-raw")?, "open LV was deleted");
    ensure!(
        sha256_prefix(&lv_path("vm-raw"), 16 * MIB)? == raw_before,
        "open LV changed"
    );

    ensure!(
        lv_field(VG, "small", "lv_uuid")? == uuid,
        "small LV replaced"
    );
    ensure!(lv_size(VG, "small")? == 512 * MIB, "small LV resized");
    ensure!(
        sha256_prefix(&lv_path("small"), 16 * MIB)? == before,
        "small LV content changed"
    );
    Ok(())
}

/// An image that fits the request but not the existing LV fails before anything is written;
/// the LV stays. An image larger than the request fails and creates nothing.
async fn failing_job_keeps_existing_lv(ctx: &Ctx) -> CaseResult {
    lvcreate(VG, "tight", "1008m")?;
    let path = lv_path("tight");
    fill_at(&path, 0x77, 0, 1008 * MIB)?;
    let head = sha256_range(&path, 0, 16 * MIB)?;
    let tail = sha256_range(&path, 992 * MIB, 16 * MIB)?;
    let uuid = lv_field(VG, "tight", "lv_uuid")?;
    let job = ctx
        .provision_and_wait("tight.qcow2", "tight", 1, "qcow2")
        .await?;
    ensure!(job["status"] == "failed", "job: {job}");
    let err = job["error"].as_str().unwrap_or("");
    ensure!(err.contains("does not fit volume tight"), "error: {err}");
    ensure!(
        lv_field(VG, "tight", "lv_uuid")? == uuid,
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
    ensure!(!lv_exists(VG, "never-made")?, "LV never-made exists");
    Ok(())
}

/// A job that created its LV and then failed removes that LV; a request larger than the VG
/// fails with the space it needs and creates nothing.
async fn failing_job_removes_created_lv(ctx: &Ctx) -> CaseResult {
    let bad = ctx.work.join("images/corrupt.qcow2");
    corrupt_qcow2(&ctx.data.join("disk.qcow2"), &bad)?;
    let job = ctx
        .api()
        .provision_and_wait(&bad, "vm-corrupt", 1, "qcow2")
        .await?;
    ensure!(job["status"] == "failed", "job: {job}");
    ensure!(
        job["error"].as_str().unwrap_or("").contains("qemu-img"),
        "error: {}",
        job["error"]
    );
    ensure!(
        log_line_has(
            &ctx.d,
            &["logical volume created", "\"volume\":\"vmtest/vm-corrupt\""]
        ),
        "the job did not create its LV"
    );
    ensure!(
        ctx.log_has("removing volume created by the failed job"),
        "no rollback in the log"
    );
    ensure!(
        !lv_exists(VG, "vm-corrupt")?,
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
    ensure!(!lv_exists(VG, "vm-huge")?, "LV vm-huge exists");
    Ok(())
}

/// Cancelling while qemu-img writes: the job ends cancelled, qemu-img is gone, the new LV is
/// removed; while it ran, DELETE of its volume was refused.
async fn cancel_mid_write(ctx: &Ctx) -> CaseResult {
    let api = ctx.api();
    let cancel = ctx.data.join("cancel.qcow2");
    let id = api.submit(&cancel, "vm-cancel", 1, "qcow2").await?;
    let seen = api.wait_converting(&id).await?;
    ensure!(
        seen["status"] == "running",
        "the job ended before it could be cancelled mid-write: {seen}"
    );
    let (del_status, del) = api.delete("vm-cancel").await;
    ensure!(
        del_status == 409,
        "DELETE during the job: {del_status} {del}"
    );
    ensure!(lv_exists(VG, "vm-cancel")?, "no LV while converting");
    let (status, v) = api.cancel(&id).await;
    ensure!(status == 200, "cancel: {status} {v}");
    let job = api.wait_done(&id).await?;
    ensure!(job["status"] == "cancelled", "job: {job}");
    let pct = seen["progress"]["stage_percent"].as_f64().unwrap_or(0.0);
    let mid_write = pct < 100.0;
    ensure!(mid_write, "cancelled at {pct}%: not mid-write");
    ensure!(
        !lv_exists(VG, "vm-cancel")?,
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
    let api = ctx.api();
    let (status, v) = api.delete("vm-qcow2").await;
    ensure!(
        status == 200 && v["status"] == "deleted" && v["volume"] == "vm-qcow2",
        "first DELETE: {status} {v}"
    );
    ensure!(!lv_exists(VG, "vm-qcow2")?, "LV still there after DELETE");
    let (status, v) = api.delete("vm-qcow2").await;
    ensure!(
        status == 200 && v["status"] == "deleted",
        "second DELETE: {status} {v}"
    );
    // A snapshot origin is not removed through the API (its snapshots would go with it).
    let (status, v) = api.delete("big-origin").await;
    ensure!(status == 409, "DELETE of a snapshot origin: {status} {v}");
    ensure!(
        lv_exists(VG, "big-origin")? && lv_exists(VG, "big-origin-snap")?,
        "origin or snapshot removed"
    );
    Ok(())
}
