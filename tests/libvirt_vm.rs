//! libvirt end to end, inside the test VM (run by `scripts/vm-test.sh`): a real libvirtd (the
//! host's Debian packages, started by hand with writable state mounted over the read-only host
//! root), a `logical` pool over a volume group on the VM's disk and a `dir` pool over the
//! directory backend's volumes, tiny domains started paused (QEMU holds the disk open, no guest
//! CPU runs under emulation), and the real daemon binary driven through its HTTP API. Prints
//! `VM-CASES <n>`, then one `VM-CASE PASS|FAIL` line per case; fails if any case fails.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::libvirt::*;
use common::*;
use serde_json::{Value, json};

const VG: &str = "vmlv";
const DIR_POOL: &str = "dirpool";
const JOB_TIMEOUT: Duration = Duration::from_secs(240);
/// The small image most jobs write (raw, made by the test).
const SMALL: &str = "small.raw";
/// A qcow2 holding `MARKER` in plaintext (made by the test), for the encryption cases.
const MARKED: &str = "marked.qcow2";

/// Cases in the order they run (later ones use volumes and domains earlier ones made).
const CASES: [Case<Ctx>; 7] = [
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
    ("encrypted_lv_opens_in_a_domain_with_its_secret", |c| {
        Box::pin(encrypted_lv_opens_in_a_domain_with_its_secret(c))
    }),
    ("caller_secret_and_an_erase_cut_short", |c| {
        Box::pin(caller_secret_and_an_erase_cut_short(c))
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
    /// The encryption cases' daemon (see `enc_url`).
    enc: std::sync::Mutex<Option<Daemon>>,
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
    marked_qcow2(&dir, 16 << 20);
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
        enc: std::sync::Mutex::new(None),
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

/// The encrypted volumes' daemon (lvm backend, logical pool: keys in private libvirt secrets),
/// started by the first encryption case; the second kills and restarts it.
impl Ctx {
    fn enc_dir(&self) -> PathBuf {
        self.work.join("enc")
    }

    fn enc_url(&self, path: &str) -> String {
        let daemon = self.enc.lock().unwrap();
        daemon
            .as_ref()
            .expect("the encryption daemon runs")
            .url(path)
    }

    fn enc_log(&self) -> String {
        let daemon = self.enc.lock().unwrap();
        daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// Submits an encrypted provision of `image` into `volume` (1 GiB) and waits for its end,
    /// sampling every process's command line and environment meanwhile.
    async fn provision_encrypted(
        &self,
        image: &Path,
        volume: &str,
        encryption: Value,
    ) -> Result<(Value, HashSet<Vec<u8>>), String> {
        let body = json!({"image_url": file_url(image), "volume_name": volume,
                          "volume_size_gb": 1, "encryption": encryption});
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = sample_processes(stop.clone());
        let (status, v) = post(&self.c, &self.enc_url("/api/v1/jobs"), &body).await;
        let id = v["job_id"].as_str().unwrap_or_default().to_string();
        let job = async {
            ensure!(status == 202, "submit {volume}: {status} {v}");
            let deadline = Instant::now() + JOB_TIMEOUT;
            loop {
                let (_, job) = get(&self.c, &self.enc_url(&format!("/api/v1/jobs/{id}"))).await;
                if ["completed", "failed", "cancelled"]
                    .contains(&job["status"].as_str().unwrap_or(""))
                {
                    return Ok(job);
                }
                ensure!(Instant::now() < deadline, "{volume}: job timed out: {job}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        .await;
        stop.store(true, Ordering::Relaxed);
        let seen = sampler.join().map_err(|_| "the /proc sampler panicked")?;
        let job = job?;
        ensure!(
            job["status"] == "completed",
            "{volume}: {job}\n{}",
            self.enc_log()
        );
        Ok((job, seen))
    }

    /// The passphrase must be in no sampled command line or environment, no file of the
    /// daemon (state, cache) and not in its log.
    fn passphrase_nowhere(&self, passphrase: &[u8], seen: &HashSet<Vec<u8>>) -> CaseResult {
        ensure!(seen.len() > 10, "sampled only {} entries", seen.len());
        ensure!(
            seen.iter().all(|s| !contains(s, passphrase)),
            "the passphrase was in a process's command line or environment"
        );
        let holding = files_holding(&self.enc_dir(), Path::new("/nonexistent"), passphrase);
        ensure!(holding.is_empty(), "the passphrase is in {holding:?}");
        ensure!(
            !contains(self.enc_log().as_bytes(), passphrase),
            "the passphrase is in the daemon's log"
        );
        Ok(())
    }
}

/// The value of a secret libvirt keeps on disk (`/etc/libvirt/secrets/<uuid>.base64`): how the
/// test learns the passphrase of a private secret.
fn stored_secret(uuid: &str) -> Result<Vec<u8>, String> {
    Ok(run(
        "base64",
        &["-d", &format!("/etc/libvirt/secrets/{uuid}.base64")],
    )?
    .into_bytes())
}

/// Whether the first `len` bytes of `path` contain `MARKER`.
fn marker_in(path: &Path, len: usize) -> Result<bool, String> {
    use std::io::Read;
    let mut head = vec![0u8; len];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(contains(&head, MARKER))
}

/// An encrypted LV whose key the daemon makes: a private libvirt secret (usage `volume`, the
/// LV's path) named in the job status; the image's plaintext marker is not in the LV's bytes;
/// the passphrase is in no command line, environment, file of the daemon or log line; a paused
/// domain with `<encryption>` and that secret starts (QEMU opened the LUKS header with it), and
/// grows live; with another secret the domain does not start.
async fn encrypted_lv_opens_in_a_domain_with_its_secret(ctx: &Ctx) -> CaseResult {
    let mut t = Instant::now();
    std::fs::create_dir_all(ctx.enc_dir()).map_err(|e| e.to_string())?;
    let config = ctx.lvm_config(&ctx.enc_dir());
    *ctx.enc.lock().unwrap() = Some(Daemon::start(&ctx.enc_dir(), &config));
    let (job, seen) = ctx
        .provision_encrypted(&ctx.image(MARKED), "enc-lv", json!({"format": "luks"}))
        .await?;
    step(&mut t, "encrypted provision");
    ensure!(job["method"] == "copy", "{job}");
    let uuid = job["encryption"]["secret_uuid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(job["encryption"]["secret_owned"] == true, "{job}");
    let xml = virsh(&["secret-dumpxml", "--secret", &uuid])?;
    ensure!(
        xml.contains("private='yes'") && xml.contains("<volume>/dev/vmlv/enc-lv</volume>"),
        "{xml}"
    );
    ctx.passphrase_nowhere(&stored_secret(&uuid)?, &seen)?;
    ensure!(
        !marker_in(&lv_path("enc-lv"), 24 << 20)?,
        "plaintext in the LV"
    );
    step(&mut t, "checked");

    let node = kernel_node(&lv_path("enc-lv"))?;
    start_paused_encrypted(&ctx.work, "dom-enc", &node, &uuid)?;
    step(&mut t, "domain with the secret started");
    let grown = async {
        let url = ctx.enc_url("/api/v1/volumes/enc-lv/resize");
        let (status, v) = post(&ctx.c, &url, &json!({"size_gb": 2})).await;
        ensure!(
            status == 200 && v["live"] == true && v["domain"] == "dom-enc",
            "{status} {v}"
        );
        let info = virsh(&["domblkinfo", "dom-enc", "vda"])?;
        let capacity: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("Capacity:"))
            .and_then(|c| c.trim().parse().ok())
            .ok_or(format!("no capacity in {info:?}"))?;
        ensure!(
            capacity >= 2 * GIB,
            "the domain sees {capacity} bytes: {info}"
        );
        Ok(())
    }
    .await;
    let stopped = stop_domain("dom-enc");
    grown?;
    stopped?;
    step(&mut t, "grown live, domain destroyed");

    let wrong = ctx.work.join("wrong.pass");
    std::fs::write(&wrong, "not-the-passphrase").map_err(|e| e.to_string())?;
    let other = define_volume_secret(&ctx.work, "/var/lib/wrong", false, &wrong)?;
    let refused = start_paused_encrypted(&ctx.work, "dom-wrong", &node, &other);
    virsh(&["secret-undefine", "--secret", &other])?;
    ensure!(refused.is_err(), "a domain with another secret started");
    step(&mut t, "domain with another secret refused");
    Ok(())
}

/// A caller's secret (`private='no'`, usage `volume`): the volume reads back through the LUKS
/// driver with it as the image; deleting it leaves the caller's secret. A crypto-erase cut short
/// by kill -9 right after its first step is finished at the next start: the LV and the daemon's
/// secret are gone. Refusals: an unknown secret, a private one, one of another usage, libvirt
/// down.
async fn caller_secret_and_an_erase_cut_short(ctx: &Ctx) -> CaseResult {
    let mut t = Instant::now();
    let pass = ctx.work.join("caller.pass");
    std::fs::write(&pass, "caller-chosen-passphrase-0123456789").map_err(|e| e.to_string())?;
    let own = define_volume_secret(&ctx.work, "/dev/vmlv/enc-own", false, &pass)?;
    let (job, seen) = ctx
        .provision_encrypted(
            &ctx.image(MARKED),
            "enc-own",
            json!({"format": "luks", "secret_uuid": own}),
        )
        .await?;
    step(&mut t, "provision with the caller's secret");
    ensure!(job["encryption"]["secret_uuid"] == own.as_str(), "{job}");
    ctx.passphrase_nowhere(b"caller-chosen-passphrase-0123456789", &seen)?;
    let (same, out) =
        compare_through_luks(&ctx.image(MARKED), &lv_path("enc-own"), &pass, 16 * MIB);
    ensure!(same, "compare through LUKS: {out}");
    ensure!(
        !marker_in(&lv_path("enc-own"), 24 << 20)?,
        "plaintext in the LV"
    );
    step(&mut t, "compared");

    let jobs = ctx.enc_url("/api/v1/jobs");
    let private = define_volume_secret(&ctx.work, "/dev/vmlv/x", true, &pass)?;
    let ceph = "<usage type='ceph'><name>client.lvp-test secret</name></usage>";
    let ceph = define_secret(&ctx.work, ceph, false, &pass)?;
    for (uuid, why) in [
        ("0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f", "no secret"),
        (private.as_str(), "private"),
        (ceph.as_str(), "usage ceph"),
    ] {
        let body = json!({"image_url": file_url(&ctx.image(MARKED)), "volume_name": "enc-x",
                          "volume_size_gb": 1, "encryption": {"format": "luks", "secret_uuid": uuid}});
        let (status, v) = post(&ctx.c, &jobs, &body).await;
        ensure!(
            status == 409
                && v["reason"] == "encryption_refused"
                && v["message"].as_str().unwrap_or("").contains(why),
            "{uuid}: {status} {v}"
        );
    }
    virsh(&["secret-undefine", "--secret", &private])?;
    virsh(&["secret-undefine", "--secret", &ceph])?;
    ensure!(!lv_exists("enc-x")?, "a refused request made a volume");

    let (status, v) = delete(&ctx.c, &ctx.enc_url("/api/v1/volumes/enc-own")).await;
    ensure!(status == 200, "DELETE enc-own: {status} {v}");
    ensure!(!lv_exists("enc-own")?, "enc-own is left");
    ensure!(
        secret_uuids()?.contains(&own),
        "the caller's secret was undefined"
    );
    ensure!(
        luks_virtual_size(&lv_path("enc-own"), &pass).is_err(),
        "enc-own opens"
    );
    step(&mut t, "deleted, the caller's secret stays");

    let uuid = secret_of("enc-lv", &ctx.enc_dir())?;
    stop_libvirtd()?;
    let body = json!({"image_url": file_url(&ctx.image(MARKED)), "volume_name": "enc-y",
                      "volume_size_gb": 1, "encryption": {"format": "luks"}});
    let refused = post(&ctx.c, &jobs, &body).await;
    start_libvirtd()?;
    let (status, v) = refused;
    ensure!(
        status == 409 && v["reason"] == "encryption_refused",
        "encrypted provision with libvirt down: {status} {v}"
    );
    step(&mut t, "refused with libvirt down");

    // kill -9 as soon as the erase's intent is recorded (its first step): the rest is left to
    // the next start.
    let erasing = ctx.enc_dir().join("state/keys/.erasing/enc-lv.json");
    let url = ctx.enc_url("/api/v1/volumes/enc-lv");
    let c = ctx.c.clone();
    // The daemon dies under this request: its error is expected, not a failure.
    let deleting = tokio::spawn(async move { c.delete(&url).send().await.map(|_| ()) });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !erasing.exists() {
        ensure!(
            Instant::now() < deadline,
            "no erase record: {}",
            ctx.enc_log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ctx.enc.lock().unwrap().take().ok_or("no daemon")?.kill9();
    let _ = deleting.await;
    println!(
        "  killed mid-erase: LV left {}, secret left {}, erase record left {}",
        lv_exists("enc-lv")?,
        secret_uuids()?.contains(&uuid),
        erasing.exists()
    );
    step(&mut t, "killed mid-erase");
    let config = ctx.lvm_config(&ctx.enc_dir());
    *ctx.enc.lock().unwrap() = Some(Daemon::start(&ctx.enc_dir(), &config));
    let deadline = Instant::now() + Duration::from_secs(120);
    while erasing.exists() {
        ensure!(
            Instant::now() < deadline,
            "the erase was not finished: {}",
            ctx.enc_log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ensure!(!lv_exists("enc-lv")?, "enc-lv is left");
    ensure!(
        !secret_uuids()?.contains(&uuid),
        "the daemon's secret is left"
    );
    virsh(&["secret-undefine", "--secret", &own])?;
    step(&mut t, "restart finished the erase");
    Ok(())
}

/// The libvirt secret named in the key record of `volume`.
fn secret_of(volume: &str, dir: &Path) -> Result<String, String> {
    let path = dir.join(format!("state/keys/{volume}.json"));
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let record: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    record["secret_uuid"]
        .as_str()
        .map(str::to_string)
        .ok_or(text)
}
