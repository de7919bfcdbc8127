//! The directory backend's reflink clone store, inside the test VM (run by
//! `scripts/vm-test.sh`): the VM's disk becomes an XFS file system with `reflink=1`, the real
//! daemon keeps its volumes there, and volumes of one image are reflink clones of its golden
//! file: the job says `method: reflink`, the bytes are the image's, the data is shared (free
//! space and `filefrag` say so), clones are independent of each other and of the golden file,
//! and a clone's time does not grow with the image. Prints `VM-CASES <n>`, then one
//! `VM-CASE PASS|FAIL` line per case.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Where the XFS file system is mounted (the VM sees the host root read-only; /tmp is its own).
const MOUNT: &str = "/tmp/reflink";
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

const CASES: [Case<Ctx>; 3] = [
    ("clones_share_the_golden_files_data", |c| {
        Box::pin(clones_share_data(c))
    }),
    ("clones_are_independent", |c| {
        Box::pin(clones_are_independent(c))
    }),
    ("clone_time_is_flat_in_image_size", |c| {
        Box::pin(clone_time_is_flat(c))
    }),
];

struct Ctx {
    c: reqwest::Client,
    d: Daemon,
    data: PathBuf,
    refs: References,
}

impl Ctx {
    fn api(&self) -> Api<'_> {
        Api::new(&self.c, &self.d, JOB_TIMEOUT)
    }

    async fn provision(&self, image: &Path, volume: &str) -> Result<Value, String> {
        let job = self
            .api()
            .provision_and_wait(image, volume, 1, "qcow2")
            .await?;
        ensure!(job["status"] == "completed", "{volume}: {job}");
        Ok(job)
    }
}

fn volume(name: &str) -> PathBuf {
    Path::new(MOUNT).join("volumes").join(name)
}

/// Free bytes of the XFS file system.
fn free_bytes() -> Result<u64, String> {
    let s = nix::sys::statvfs::statvfs(MOUNT).map_err(|e| e.to_string())?;
    Ok(s.blocks_available() * s.fragment_size())
}

/// Whether `filefrag -v` marks extents of `path` as shared.
fn has_shared_extents(path: &Path) -> Result<bool, String> {
    let out = run("filefrag", &["-v", &path.display().to_string()])?;
    Ok(out.lines().any(|l| l.contains("shared")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a disk to format with XFS: run scripts/vm-test.sh (boots a VM)"]
async fn reflink_clone_store_end_to_end() {
    let suite = Suite::start(CASES.len(), &format!("formats {DISK} with XFS"));
    run("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", DISK]).unwrap();
    std::fs::create_dir_all(MOUNT).unwrap();
    run("mount", &["-t", "xfs", DISK, MOUNT]).unwrap();
    let dir = PathBuf::from(MOUNT).join("daemon");
    std::fs::create_dir_all(&dir).unwrap();
    let config = TestConfig::new(&dir)
        .set("volumes.directory.path", volume("").display().to_string())
        .set("sources.file_roots", vec![suite.data.display().to_string()])
        .set("jobs.max_concurrent", 1);
    let ctx = Ctx {
        c: client(),
        d: Daemon::start(&dir, &config),
        data: suite.data.clone(),
        refs: suite.references(),
    };
    suite.lap("setup");
    suite.run(&ctx, &CASES, Some(&ctx.d)).await;
}

/// The first volume builds the golden file, the next two are clones: each says `reflink`,
/// each holds the image's bytes, and the two clones took almost no space.
async fn clones_share_data(ctx: &Ctx) -> CaseResult {
    let image = ctx.data.join("disk.qcow2");
    let first = ctx.provision(&image, "rl-1").await?;
    ensure!(first["method"] == "reflink", "first: {first}");
    let golden_dir = Path::new(MOUNT).join("volumes/.lvp-golden");
    let golden: Vec<_> = std::fs::read_dir(&golden_dir)
        .map_err(|e| format!("{}: {e}", golden_dir.display()))?
        .flatten()
        .collect();
    ensure!(golden.len() == 1, "golden files: {golden:?}");
    let before = free_bytes()?;
    for name in ["rl-2", "rl-3"] {
        let job = ctx.provision(&image, name).await?;
        ensure!(job["method"] == "reflink", "{name}: {job}");
        ctx.refs.check_image_bytes(&volume(name), "disk.qcow2")?;
    }
    ctx.refs.check_image_bytes(&volume("rl-1"), "disk.qcow2")?;
    let (size, _) = ctx.refs.get("disk.qcow2")?;
    let used = before.saturating_sub(free_bytes()?);
    ensure!(
        used < size / 4,
        "two clones of an image of {size} bytes took {used} bytes"
    );
    ensure!(
        has_shared_extents(&volume("rl-2"))?,
        "filefrag shows no shared extent in rl-2"
    );
    Ok(())
}

/// Writing into one clone changes neither the other clones nor the golden file.
async fn clones_are_independent(ctx: &Ctx) -> CaseResult {
    fill_at(&volume("rl-2"), 0x5a, 0, 4 * MIB)?;
    ctx.refs.check_image_bytes(&volume("rl-3"), "disk.qcow2")?;
    ctx.refs.check_image_bytes(&volume("rl-1"), "disk.qcow2")?;
    let golden_dir = Path::new(MOUNT).join("volumes/.lvp-golden");
    for entry in std::fs::read_dir(&golden_dir)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        ctx.refs.check_image_bytes(&entry.path(), "disk.qcow2")?;
    }
    Ok(())
}

/// Once an image has its golden file, a clone of a 4x larger image takes about as long as a
/// clone of the small one (generous bound: under emulation every step is slow, and the job
/// around the clone has fixed costs).
async fn clone_time_is_flat(ctx: &Ctx) -> CaseResult {
    let small = ctx.data.join("disk.qcow2");
    let large = ctx.data.join("slow.qcow2");
    ctx.provision(&large, "big-golden").await?;
    let mut took = Vec::new();
    for (image, name) in [(&small, "t-small"), (&large, "t-large")] {
        let started = Instant::now();
        let job = ctx.provision(image, name).await?;
        ensure!(job["method"] == "reflink", "{name}: {job}");
        took.push(started.elapsed().as_secs_f64());
    }
    println!(
        "clone jobs: 64 MiB image {:.1} s, 256 MiB image {:.1} s",
        took[0], took[1]
    );
    let bound = 3.0 * took[0] + 10.0;
    ensure!(
        took[1].total_cmp(&bound).is_lt(),
        "a clone of the larger image took {:.1} s, of the smaller {:.1} s",
        took[1],
        took[0]
    );
    ctx.refs.check_image_bytes(&volume("t-large"), "slow.qcow2")
}
