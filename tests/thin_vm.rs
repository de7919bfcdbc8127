//! Golden images on a real dm-thin pool, inside the test VM (run by `scripts/vm-test.sh`): a VG
//! with a thin pool on the VM's disk, the real daemon binary with `volumes.lvm.thin_pool` set,
//! every case through the HTTP API. LV contents are compared with hashes of qemu-img
//! conversions made on the host. Also the NixOS module's volume-group script creating thin
//! pools (rendered on the host by scripts/vm-test.sh) on a loop device. Prints `VM-CASES <n>`,
//! then one `VM-CASE PASS|FAIL` line per case; fails if any case fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const VG: &str = "vmthin";
const POOL: &str = "pool";
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// Cases in the order they run.
const CASES: [Case<Ctx>; 8] = [
    ("three_volumes_from_one_golden_image", |c| {
        Box::pin(three_volumes(c))
    }),
    ("golden_bound_removes_the_least_recently_used", |c| {
        Box::pin(golden_bound(c))
    }),
    ("reused_thick_and_thin_lvs_are_fully_overwritten", |c| {
        Box::pin(reused_lvs(c))
    }),
    ("kill_during_golden_build_then_restart", |c| {
        Box::pin(kill_during_build(c))
    }),
    ("fresh_thin_lvs_follow_the_pools_zeroing", |c| {
        Box::pin(fresh_thin_lvs(c))
    }),
    ("pool_over_threshold_fails_before_writing", |c| {
        Box::pin(pool_over_threshold(c))
    }),
    ("declared_golden_is_rebuilt_before_the_name_moves", |c| {
        Box::pin(declared_golden(c))
    }),
    ("nixos_volume_group_script_creates_thin_pools", |c| {
        Box::pin(nixos_thin_pools(c))
    }),
];

fn lv_path(name: &str) -> PathBuf {
    common::lv_path(VG, name)
}

fn lv_field(name: &str, field: &str) -> Result<Option<String>, String> {
    common::lv_field(VG, name, field)
}

fn lv_exists(name: &str) -> Result<bool, String> {
    common::lv_exists(VG, name)
}

/// The golden LVs (by name prefix).
fn golden_lvs() -> Result<Vec<String>, String> {
    Ok(lv_names(VG)?
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

/// What every case shares: the test images, a work directory, an HTTP client.
struct Ctx {
    c: reqwest::Client,
    data: PathBuf,
    work: PathBuf,
    refs: References,
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

    /// The VM suites' way to reach daemon `d`.
    fn api<'a>(&'a self, d: &'a Daemon) -> Api<'a> {
        Api {
            c: &self.c,
            d,
            job_timeout: JOB_TIMEOUT,
        }
    }

    /// Submits `image` of the test data (raw or qcow2 by its name) into `volume` of 1 GB.
    async fn submit(&self, d: &Daemon, image: &str, volume: &str) -> Result<String, String> {
        let image_type = if image.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        };
        self.api(d)
            .submit(&self.data.join(image), volume, 1, image_type)
            .await
    }

    async fn wait_done(&self, d: &Daemon, id: &str) -> Result<Value, String> {
        self.api(d).wait_done(id).await
    }

    async fn provision(&self, d: &Daemon, image: &str, volume: &str) -> Result<Value, String> {
        let id = self.submit(d, image, volume).await?;
        self.wait_done(d, &id).await
    }

    /// The LV's first bytes are the image's (the host's conversion).
    fn check_image_bytes(&self, volume: &str, image: &str) -> CaseResult {
        self.refs.check_image_bytes(&lv_path(volume), image)
    }

    /// The image's bytes, then zeros to the end.
    fn check_contents(&self, volume: &str, image: &str) -> CaseResult {
        self.refs.check_contents(&lv_path(volume), image)
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
    let suite = Suite::start(CASES.len(), &format!("formats {DISK}"));
    // Stale data where the pool's data will be: thin LVs must never show it.
    fill_at(Path::new(DISK), 0xab, 0, 1024 * MIB).unwrap();
    create_vg(VG, &[]).unwrap();
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
        refs: suite.references(),
        data: suite.data.clone(),
        work: work.path().to_path_buf(),
    };
    suite.lap("setup");
    suite.run(&ctx, &CASES, None).await;
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
    let (len, image_sha) = ctx.refs.get("disk.qcow2")?;
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
    let (status, v) = ctx.api(d).delete(golden).await;
    ensure!(
        status == 409 && v["message"].as_str().unwrap_or("").contains("golden image"),
        "DELETE of the golden LV: {status} {v}"
    );
    ensure!(lv_exists(golden)?, "golden LV removed by DELETE");
    // A job asking for it by name is refused too.
    let (status, v) = ctx
        .api(d)
        .provision(&ctx.data.join("disk.qcow2"), golden, 1, "qcow2")
        .await;
    ensure!(status == 409, "a job onto the golden LV: {status} {v}");

    step("DELETE of a clone");
    // Deleting a clone leaves the others.
    let (status, v) = ctx.api(d).delete("thin-c").await;
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
        let (status, body) = ctx.api(d).delete(v).await;
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
    let second = ctx.api(d).submit(other, "bound-b", 1, "qcow2").await?;
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
        let (status, body) = ctx.api(d).delete(v).await;
        ensure!(status == 200, "DELETE {v}: {status} {body}");
    }
    Ok(())
}

/// A declared image with `golden = true` (`[[images]]`, refreshed every 2 s): its golden LV is
/// built before the name points at the version, a volume by name is a thin snapshot with the
/// image's bytes; the file replaced by another image, the new version's golden LV exists when
/// the name moves, and the next volume by name has the new bytes.
async fn declared_golden(ctx: &Ctx) -> CaseResult {
    let (dir, config) = ctx.config("declared");
    let served = dir.join("base.qcow2");
    std::fs::copy(ctx.data.join("disk.qcow2"), &served).map_err(|e| e.to_string())?;
    let mut decl = toml::Table::new();
    decl.insert("name".into(), "base".into());
    decl.insert("url".into(), file_url(&served).into());
    decl.insert("refresh".into(), "2s".into());
    decl.insert("golden".into(), true.into());
    let roots = vec![ctx.data.display().to_string(), dir.display().to_string()];
    let config = config
        .set("sources.file_roots", roots)
        .set("cache.declared_fetch_window", "0s")
        .set("images", toml::Value::Array(vec![toml::Value::Table(decl)]));
    let d = Daemon::start(&dir, &config);
    let r = declared_golden_on(ctx, &d, &dir, &served).await;
    with_log(&d, r)
}

async fn declared_golden_on(ctx: &Ctx, d: &Daemon, dir: &Path, served: &Path) -> CaseResult {
    let first = declared_switched(ctx, d, &Value::Null).await?;
    let before = golden_lvs()?;
    ensure!(before.len() == 1, "golden LVs once declared: {before:?}");
    by_name(ctx, d, "decl-a", &first).await?;
    ctx.check_image_bytes("decl-a", "disk.qcow2")?;

    step("a new version of the declared image");
    let next = dir.join("next.qcow2");
    let raw = ctx.data.join("disk.raw");
    let (from, to) = (raw.to_str().unwrap_or(""), next.to_str().unwrap_or(""));
    run(
        "qemu-img",
        &["convert", "-q", "-f", "raw", "-O", "qcow2", from, to],
    )?;
    std::fs::rename(&next, served).map_err(|e| e.to_string())?;
    let second = declared_switched(ctx, d, &Value::String(first.clone())).await?;
    let after = golden_lvs()?;
    let new: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
    ensure!(
        new.len() == 1,
        "a golden LV for the new version: {before:?} -> {after:?}"
    );
    by_name(ctx, d, "decl-b", &second).await?;
    ctx.check_image_bytes("decl-b", "disk.raw")?;
    ctx.check_image_bytes("decl-a", "disk.qcow2")?;
    for v in ["decl-a", "decl-b"] {
        let (status, body) = ctx.api(d).delete(v).await;
        ensure!(status == 200, "DELETE {v}: {status} {body}");
    }
    Ok(())
}

/// Waits until the declared image `base` is cached with a digest other than `old`, and its
/// golden LV built (the name moves only then); returns the digest.
async fn declared_switched(ctx: &Ctx, d: &Daemon, old: &Value) -> Result<String, String> {
    let deadline = Instant::now() + JOB_TIMEOUT;
    loop {
        let (_, v) = get(&ctx.c, &d.url("/api/v1/images")).await;
        let i = &v["images"][0];
        if i["cached"] == true && i["digest"] != *old && i["digest"].is_string() {
            return Ok(i["digest"].as_str().unwrap_or_default().to_string());
        }
        ensure!(Instant::now() < deadline, "the name did not move: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Provisions `volume` from the declared image `base`: a thin snapshot of digest `digest`.
async fn by_name(ctx: &Ctx, d: &Daemon, volume: &str, digest: &str) -> CaseResult {
    let body = serde_json::json!({"image": "base", "volume_name": volume, "volume_size_gb": 1});
    let (status, v) = post(&ctx.c, &d.url("/api/v1/jobs"), &body).await;
    ensure!(status == 202, "by name: {status} {v}");
    let job = ctx
        .wait_done(d, v["job_id"].as_str().unwrap_or_default())
        .await?;
    ensure!(
        job["status"] == "completed"
            && job["method"] == "thin-snapshot"
            && job["image"] == "base"
            && job["image_digest"] == digest,
        "{volume}: {job}"
    );
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
    let seen = ctx.api(&d).wait_converting(&id).await;
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
        let (status, v) = ctx.api(&d).delete("vm-kill2").await;
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
        let (status, body) = ctx.api(&d).delete(v).await;
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
        let before = lv_names(VG)?;
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
            lv_names(VG)? == before,
            "LVs changed: {before:?} -> {:?}",
            lv_names(VG)?
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
        Ok::<_, String>(output_of(
            Command::new("bash")
                .arg(scripts.join(name))
                .env("LVM_SUPPRESS_FD_WARNINGS", "1")
                .stdin(Stdio::null()),
        ))
    };
    let r = async {
        let (ok, out) = script("create.sh")?;
        ensure!(ok, "first run failed:\n{out}");
        ensure!(out.contains("created thin pool nixthin/pool"), "{out}");
        ensure!(
            common::lv_field("nixthin", "pool", "segtype")?.as_deref() == Some("thin-pool"),
            "no thin pool"
        );
        ensure!(
            common::lv_field("nixthin", "pool", "chunk_size")?.as_deref() == Some("131072"),
            "chunk size {:?}",
            common::lv_field("nixthin", "pool", "chunk_size")?
        );
        ensure!(
            common::lv_field("nixthin", "pool", "lv_size")?.as_deref() == Some("268435456"),
            "size {:?}",
            common::lv_field("nixthin", "pool", "lv_size")?
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
            common::lv_field("nixthin", "big", "lv_uuid")?.is_none(),
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
            common::lv_field("nixthin", "plain", "segtype")?.as_deref() == Some("linear"),
            "the plain LV changed"
        );
        Ok(())
    }
    .await;
    let _ = run("vgremove", &["-q", "-y", "-ff", "nixthin"]);
    let _ = run("losetup", &["-d", &loopdev]);
    r
}
