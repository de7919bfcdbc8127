//! libvirt end to end, inside the test VM (run by `scripts/vm-test.sh`): a real libvirtd (the
//! host's Debian packages, started by hand with writable state mounted over the read-only host
//! root), a `logical` pool over a volume group on the VM's disk and a `dir` pool over the
//! directory backend's volumes, tiny domains started paused (QEMU holds the disk open, no guest
//! CPU runs under emulation), and the real daemon binary driven through its HTTP API. Prints
//! `VM-CASES <n>`, then one `VM-CASE PASS|FAIL` line per case; fails if any case fails.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::libvirt::*;
use common::*;
use serde_json::Value;

const VG: &str = "vmlv";
const DIR_POOL: &str = "dirpool";
const JOB_TIMEOUT: Duration = Duration::from_secs(240);
/// The small image most jobs write (raw, made by the test).
const SMALL: &str = "small.raw";

/// Cases in the order they run (later ones use volumes and domains earlier ones made).
const CASES: [Case<Ctx>; 5] = [
    ("module_pool_unit_defines_the_pool", |c| {
        Box::pin(module_pool_unit(c))
    }),
    ("pool_lists_provisioned_lv", |c| {
        Box::pin(pool_lists_provisioned_lv(c))
    }),
    ("running_domain_protects_its_lv", |c| {
        Box::pin(running_domain_protects_its_lv(c))
    }),
    ("running_domain_protects_its_file", |c| {
        Box::pin(running_domain_protects_its_file(c))
    }),
    ("libvirtd_down_and_up", |c| {
        Box::pin(libvirtd_down_and_up(c))
    }),
];

/// Prints how long a step of a case took (the VM test's time budget is tight).
fn step(started: &mut Instant, what: &str) {
    println!("  {what}: {:.1} s", started.elapsed().as_secs_f64());
    *started = Instant::now();
}

/// Volume names of a pool as libvirt lists them (no refresh: what libvirt knows now).
fn pool_volumes(pool: &str) -> Result<Vec<String>, String> {
    let out = virsh(&["vol-list", pool])?;
    Ok(out
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Capacity in bytes of a pool's volume (`vol-info --bytes`).
fn volume_capacity(pool: &str, volume: &str) -> Result<u64, String> {
    let out = virsh(&["vol-info", "--pool", pool, volume, "--bytes"])?;
    out.lines()
        .find_map(|l| l.strip_prefix("Capacity:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or(format!("no capacity in vol-info: {out}"))
}

fn lv_path(name: &str) -> PathBuf {
    common::lv_path(VG, name)
}

fn lv_exists(name: &str) -> Result<bool, String> {
    common::lv_exists(VG, name)
}

/// `/dev/dm-<minor>` of a device-mapper device (another node of the same device than
/// `/dev/<vg>/<lv>`, which leads to the node in /dev/mapper).
fn kernel_node(lv: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(lv)
        .map_err(|e| format!("{}: {e}", lv.display()))?
        .rdev();
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    let node = PathBuf::from(format!("/dev/dm-{minor}"));
    ensure!(node.exists(), "{} does not exist", node.display());
    Ok(node)
}

/// The daemon `d` through `c`, as the VM suites reach it.
fn api_of<'a>(c: &'a reqwest::Client, d: &'a Daemon) -> Api<'a> {
    Api {
        c,
        d,
        job_timeout: JOB_TIMEOUT,
    }
}

/// What the cases here ask of a daemon beyond the VM suites' `Api`.
trait LibvirtApi {
    /// Submits `image` (a file) into `volume` of 1 GB, waits, and requires the job to complete.
    async fn provision_completed(
        &self,
        image: &Path,
        volume: &str,
        image_type: &str,
    ) -> Result<Value, String>;

    /// A reuse request and a DELETE of `volume` both get 409 with a message containing `why`.
    async fn refused(&self, image: &Path, volume: &str, why: &str) -> CaseResult;

    /// `libvirt_volume_provisioner_<name>` (summed over the label sets with `labels`).
    async fn metric(&self, name: &str, labels: &str) -> f64;

    /// Waits until `/readyz` shows libvirt up (200) or down (503).
    async fn wait_libvirt(&self, up: bool) -> CaseResult;
}

impl LibvirtApi for Api<'_> {
    async fn provision_completed(
        &self,
        image: &Path,
        volume: &str,
        image_type: &str,
    ) -> Result<Value, String> {
        let job = self
            .provision_and_wait(image, volume, 1, image_type)
            .await?;
        ensure!(job["status"] == "completed", "job on {volume}: {job}");
        Ok(job)
    }

    async fn refused(&self, image: &Path, volume: &str, why: &str) -> CaseResult {
        let (status, v) = self.provision(image, volume, 1, "raw").await;
        let message = v["message"].as_str().unwrap_or("");
        ensure!(
            status == 409 && message.contains(why),
            "reuse of {volume}: want 409 naming {why:?}, got {status} {v}"
        );
        let (status, v) = self.delete(volume).await;
        let message = v["message"].as_str().unwrap_or("");
        ensure!(
            status == 409 && message.contains(why),
            "DELETE of {volume}: want 409 naming {why:?}, got {status} {v}"
        );
        Ok(())
    }

    async fn metric(&self, name: &str, labels: &str) -> f64 {
        let full = format!("libvirt_volume_provisioner_{name}");
        common::metric(self.c, self.d, &full, labels).await
    }

    async fn wait_libvirt(&self, up: bool) -> CaseResult {
        self.wait_ready("libvirt", up, Duration::from_secs(60))
            .await
    }
}

/// Where the test's files are.
struct Paths {
    /// Images made by scripts/vm-test.sh (`cancel.qcow2`, `disk.qcow2`).
    data: PathBuf,
    /// The test's own directory (images it makes, daemons' state, directory volumes).
    work: PathBuf,
}

impl Paths {
    fn image(&self, name: &str) -> PathBuf {
        self.work.join("images").join(name)
    }

    /// Settings of a daemon in `dir` with libvirt integration on `pool`.
    fn config(&self, dir: &Path, pool: &str) -> TestConfig {
        TestConfig::new(dir)
            .set("libvirt.uri", URI)
            .set("libvirt.pool", pool)
            .set(
                "sources.file_roots",
                vec![
                    self.data.display().to_string(),
                    self.work.join("images").display().to_string(),
                ],
            )
            .set("jobs.max_concurrent", 1)
    }

    fn lvm_config(&self, dir: &Path) -> TestConfig {
        self.config(dir, VG)
            .set("volumes.backend", "lvm")
            .set("volumes.lvm.volume_group", VG)
    }
}

struct Ctx {
    c: reqwest::Client,
    /// The daemon with the lvm backend and the logical pool.
    lvm: Daemon,
    paths: Paths,
}

impl std::ops::Deref for Ctx {
    type Target = Paths;
    fn deref(&self) -> &Paths {
        &self.paths
    }
}

impl Ctx {
    fn lvm(&self) -> Api<'_> {
        api_of(&self.c, &self.lvm)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs device-mapper, libvirtd and a disk to format: run scripts/vm-test.sh (boots a VM)"]
async fn libvirt_end_to_end() {
    let suite = Suite::start(CASES.len(), &format!("formats {DISK} and starts libvirtd"));
    setup_libvirt(&suite.data).unwrap();
    suite.lap("libvirtd up");
    create_vg(VG, &["-s", "8m"]).unwrap();

    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_path_buf();
    // QEMU runs as libvirt-qemu and must reach the directory volumes below this directory.
    run("chmod", &["755", &dir.display().to_string()]).unwrap();
    std::fs::create_dir_all(dir.join("images")).unwrap();
    make_raw(&dir.join("images").join(SMALL), MIB);
    corrupt_qcow2(
        &suite.data.join("disk.qcow2"),
        &dir.join("images").join("corrupt.qcow2"),
    )
    .unwrap();
    let paths = Paths {
        data: suite.data.clone(),
        work: dir,
    };
    let lvm_dir = paths.work.join("lvm");
    std::fs::create_dir_all(&lvm_dir).unwrap();
    let ctx = Ctx {
        c: client(),
        lvm: Daemon::start(&lvm_dir, &paths.lvm_config(&lvm_dir)),
        paths,
    };
    suite.lap("setup");
    suite.run(&ctx, &CASES, Some(&ctx.lvm)).await;
}

/// The NixOS module's pool unit (`libvirt.definePool`), its script as the module renders it
/// (scripts/vm-test.sh extracts it with nix-instantiate through nix/pool-script.nix): a missing
/// pool is defined over the volume group, autostarted and started; run again, it changes
/// nothing. The pool it defines is the one the later cases use.
async fn module_pool_unit(ctx: &Ctx) -> CaseResult {
    let rendered = ctx.data.join("define-pool.json");
    let json = std::fs::read_to_string(&rendered)
        .map_err(|e| format!("{} (made by scripts/vm-test.sh): {e}", rendered.display()))?;
    let script: String = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    ensure!(
        virsh(&["pool-info", VG]).is_err(),
        "pool {VG} exists before the unit ran"
    );
    let first = run("bash", &["-c", &script])?;
    ensure!(
        first.contains(&format!(
            "defined, autostarted and started libvirt pool {VG}"
        )),
        "first run: {first}"
    );
    let info = virsh(&["pool-info", VG])?;
    let field = |info: &str, name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    ensure!(
        field(&info, "State:") == "running" && field(&info, "Autostart:") == "yes",
        "pool-info after the unit: {info}"
    );
    // A second run leaves the pool alone: no warning (it is a running logical pool), nothing
    // defined, the same pool.
    let second = run("bash", &["-c", &format!("(\n{script}\n) 2>&1")])?;
    ensure!(
        second.contains("exists; it is not redefined")
            && !second.contains("defined,")
            && !second.contains("warning"),
        "second run: {second}"
    );
    let again = virsh(&["pool-info", VG])?;
    ensure!(
        field(&again, "UUID:") == field(&info, "UUID:") && !field(&info, "UUID:").is_empty(),
        "the pool was redefined: {info} / {again}"
    );
    Ok(())
}

/// A completed job's LV is in the logical pool with its size, without anyone but the daemon
/// refreshing the pool.
async fn pool_lists_provisioned_lv(ctx: &Ctx) -> CaseResult {
    ensure!(
        !pool_volumes(VG)?.contains(&"lv-vm".to_string()),
        "lv-vm is listed before it exists"
    );
    ctx.lvm()
        .provision_completed(&ctx.image(SMALL), "lv-vm", "raw")
        .await?;
    let listed = pool_volumes(VG)?;
    ensure!(
        listed.contains(&"lv-vm".to_string()),
        "virsh vol-list {VG} after the job: {listed:?}"
    );
    let capacity = volume_capacity(VG, "lv-vm")?;
    ensure!(capacity == GIB, "vol-info capacity {capacity}, want {GIB}");
    Ok(())
}

/// A paused domain on an LV: reuse and DELETE get 409 naming the domain; another job's failure
/// (and rollback of its new LV) leaves it alone; after `virsh destroy` reuse and DELETE work,
/// and the deleted LV is gone from the pool.
async fn running_domain_protects_its_lv(ctx: &Ctx) -> CaseResult {
    let api = ctx.lvm();
    let small = ctx.image(SMALL);
    let mut t = Instant::now();
    let before = sha256_prefix(&lv_path("lv-vm"), MIB)?;
    // The domain names the LV by its kernel node, not by the path the daemon uses: the match
    // is by device number.
    start_paused_domain(&ctx.work, "dom-lv", &kernel_node(&lv_path("lv-vm"))?, true)?;
    step(&mut t, "domain started");
    let checks = async {
        api.refused(&small, "lv-vm", "dom-lv").await?;
        step(&mut t, "reuse and DELETE refused");

        // An unrelated job fails after creating its LV: only that LV is rolled back.
        let (status, v) = api
            .provision(&ctx.image("corrupt.qcow2"), "lv-other", 1, "qcow2")
            .await;
        ensure!(status == 202, "submit lv-other: {status} {v}");
        let job = api
            .wait_done(v["job_id"].as_str().unwrap_or_default())
            .await?;
        ensure!(job["status"] == "failed", "lv-other: {job}");
        ensure!(
            api.d
                .log()
                .contains("removing volume created by the failed job"),
            "lv-other was not rolled back"
        );
        ensure!(!lv_exists("lv-other")?, "the failed job's LV is left");
        ensure!(lv_exists("lv-vm")?, "the domain's LV is gone");
        ensure!(
            sha256_prefix(&lv_path("lv-vm"), MIB)? == before,
            "the domain's LV changed"
        );
        let state = domain_state("dom-lv")?;
        ensure!(state == "paused", "dom-lv is {state:?} after the rollback");
        step(&mut t, "other job failed and rolled back");
        Ok(())
    }
    .await;
    let stopped = stop_domain("dom-lv");
    checks?;
    stopped?;
    step(&mut t, "domain destroyed");

    api.provision_completed(&small, "lv-vm", "raw").await?;
    step(&mut t, "reused");
    let (status, v) = api.delete("lv-vm").await;
    ensure!(status == 200, "DELETE after destroy: {status} {v}");
    ensure!(!lv_exists("lv-vm")?, "lv-vm still exists");
    let listed = pool_volumes(VG)?;
    ensure!(
        !listed.contains(&"lv-vm".to_string()),
        "virsh vol-list {VG} after DELETE still lists lv-vm: {listed:?}"
    );
    Ok(())
}

/// The directory backend with a `dir` pool: a paused domain on a volume file blocks reuse and
/// DELETE, also through a daemon in its own PID namespace (as in a container), whose /proc
/// shows no QEMU; another job's cancel (and rollback of its new file) leaves the file alone;
/// after `virsh destroy` it is reused and deleted, and gone from the pool.
async fn running_domain_protects_its_file(ctx: &Ctx) -> CaseResult {
    let dir = ctx.work.join("dir");
    let volumes = dir.join("volumes");
    std::fs::create_dir_all(&volumes).map_err(|e| e.to_string())?;
    let vols = volumes.display().to_string();
    virsh(&["pool-define-as", DIR_POOL, "dir", "--target", &vols])?;
    virsh(&["pool-autostart", DIR_POOL])?;
    virsh(&["pool-start", DIR_POOL])?;
    let config = ctx
        .config(&dir, DIR_POOL)
        .set("volumes.directory.path", vols.clone());
    let mut t = Instant::now();
    let d = Daemon::start(&dir, &config);
    let api = api_of(&ctx.c, &d);
    let small = ctx.image(SMALL);
    api.provision_completed(&small, "file-vm", "raw").await?;
    step(&mut t, "daemon up, file-vm provisioned");
    ensure!(
        pool_volumes(DIR_POOL)?.contains(&"file-vm".to_string()),
        "virsh vol-list {DIR_POOL} lacks file-vm after the job"
    );
    let capacity = volume_capacity(DIR_POOL, "file-vm")?;
    ensure!(capacity == GIB, "vol-info capacity {capacity}, want {GIB}");
    let file = volumes.join("file-vm");
    let before = sha256_prefix(&file, MIB)?;

    start_paused_domain(&ctx.work, "dom-file", &file, false)?;
    step(&mut t, "domain started");
    let checks = async {
        api.refused(&small, "file-vm", "dom-file").await?;
        step(&mut t, "reuse and DELETE refused");

        // The same daemon in its own PID namespace (with its own /proc) sees no QEMU process.
        let ns_dir = dir.join("pidns");
        std::fs::create_dir_all(&ns_dir).map_err(|e| e.to_string())?;
        let ns_config = ns_dir.join("config.toml");
        std::fs::write(
            &ns_config,
            config
                .clone()
                .set(
                    "storage.data_dir",
                    ns_dir.join("state").display().to_string(),
                )
                .set("cache.dir", ns_dir.join("cache").display().to_string())
                .render(),
        )
        .map_err(|e| e.to_string())?;
        let contained = Daemon::spawn_wrapped(
            &ns_dir,
            &ns_config,
            &[],
            "http",
            &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
        );
        let in_ns = api_of(&ctx.c, &contained);
        let refused = in_ns.refused(&small, "file-vm", "dom-file").await;
        contained.kill9();
        refused?;
        step(&mut t, "refused by the daemon in a PID namespace");

        // An unrelated job cancelled mid-write: its own new file is rolled back, nothing else.
        let (status, v) = api
            .provision(&ctx.data.join("cancel.qcow2"), "file-other", 1, "qcow2")
            .await;
        ensure!(status == 202, "submit file-other: {status} {v}");
        let id = v["job_id"].as_str().unwrap_or_default().to_string();
        let seen = api
            .poll(&id, Duration::from_millis(300), |j| {
                j["status"] != "running" || j["progress"]["stage"] == "converting"
            })
            .await?;
        ensure!(
            seen["status"] == "running",
            "file-other ended early: {seen}"
        );
        let (status, v) = api.cancel(&id).await;
        ensure!(status == 200, "cancel: {status} {v}");
        let job = api.wait_done(&id).await?;
        ensure!(job["status"] == "cancelled", "file-other: {job}");
        ensure!(
            !volumes.join("file-other").exists(),
            "the cancelled job's file is left"
        );
        ensure!(
            sha256_prefix(&file, MIB)? == before,
            "the domain's file changed"
        );
        let state = domain_state("dom-file")?;
        ensure!(
            state == "paused",
            "dom-file is {state:?} after the rollback"
        );
        step(&mut t, "other job cancelled and rolled back");
        Ok(())
    }
    .await;
    let stopped = stop_domain("dom-file");
    checks?;
    stopped?;
    step(&mut t, "domain destroyed");

    api.provision_completed(&small, "file-vm", "raw").await?;
    step(&mut t, "reused");
    let (status, v) = api.delete("file-vm").await;
    ensure!(status == 200, "DELETE after destroy: {status} {v}");
    ensure!(!file.exists(), "file-vm still exists");
    let listed = pool_volumes(DIR_POOL)?;
    ensure!(
        !listed.contains(&"file-vm".to_string()),
        "virsh vol-list {DIR_POOL} after DELETE still lists file-vm: {listed:?}"
    );
    d.stop();
    Ok(())
}

/// With libvirtd stopped: `/readyz` and `dependencies_up` say libvirt is down, a job on a new
/// volume still completes and its failed pool refresh is counted, and an existing volume is
/// neither reused nor deleted (nobody can tell whether a domain uses it). libvirtd started
/// again: up, and the volume can be deleted. A daemon of its own with a 1 s probe interval, on
/// the directory volumes and `dir` pool of the case before (a probe is a `virsh` call, which
/// costs the emulated CPU most of a second; an LVM probe would add an LVM command).
async fn libvirtd_down_and_up(ctx: &Ctx) -> CaseResult {
    let dir = ctx.work.join("probe");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let volumes = ctx.work.join("dir/volumes");
    let config = ctx
        .config(&dir, DIR_POOL)
        .set("volumes.directory.path", volumes.display().to_string())
        .set("telemetry.probe_interval", "1s");
    let mut t = Instant::now();
    let d = Daemon::start(&dir, &config);
    let api = api_of(&ctx.c, &d);
    api.wait_libvirt(true).await?;
    step(&mut t, "daemon up");
    let up = api
        .metric("dependencies_up", "dependency=\"libvirt\"")
        .await;
    ensure!(
        up == 1.0,
        "dependencies_up{{libvirt}} = {up} while libvirtd runs"
    );
    let errors_before = api.metric("libvirt_pool_refresh_errors_total", "").await;

    stop_libvirtd()?;
    step(&mut t, "libvirtd stopped");
    let down = async {
        api.wait_libvirt(false).await?;
        step(&mut t, "readyz down");
        let up = api
            .metric("dependencies_up", "dependency=\"libvirt\"")
            .await;
        ensure!(
            up == 0.0,
            "dependencies_up{{libvirt}} = {up} while libvirtd is stopped"
        );
        api.provision_completed(&ctx.image(SMALL), "file-down", "raw")
            .await?;
        step(&mut t, "job completed");
        let errors = api.metric("libvirt_pool_refresh_errors_total", "").await;
        ensure!(
            errors == errors_before + 1.0,
            "libvirt_pool_refresh_errors_total went from {errors_before} to {errors}"
        );
        ensure!(
            d.log().contains("libvirt pool refresh failed"),
            "the refresh failure is not logged"
        );
        api.refused(&ctx.image(SMALL), "file-down", "cannot ask libvirt")
            .await
    }
    .await;
    let started = start_libvirtd();
    down?;
    started?;
    step(&mut t, "libvirtd started");

    api.wait_libvirt(true).await?;
    step(&mut t, "readyz up");
    let (status, v) = api.delete("file-down").await;
    ensure!(status == 200, "DELETE with libvirtd back: {status} {v}");
    ensure!(
        !volumes.join("file-down").exists(),
        "file-down still exists"
    );
    let listed = pool_volumes(DIR_POOL)?;
    ensure!(
        !listed.contains(&"file-down".to_string()),
        "virsh vol-list {DIR_POOL} after DELETE still lists file-down: {listed:?}"
    );
    d.stop();
    Ok(())
}
