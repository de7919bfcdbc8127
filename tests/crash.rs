//! Crash safety against the real binary: rounds of (submit 3 jobs, wait a random 0-2 s,
//! SIGKILL, restart) with a fixed seed, then the invariants: every job readable and terminal,
//! every failed job has a reason, every completed volume holds its image's bytes, no volume of
//! a failed job is left behind, and no complete-looking cache file has wrong content.
//!
//! `CRASH_ROUNDS` (default 12) and `CRASH_SEED` choose the run; `scripts/crash-soak.sh` runs
//! 100 rounds. The last line printed is a summary.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// xorshift64*: a fixed seed gives the same kill points on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An image the jobs may ask for, with the raw bytes it must convert to.
struct Image {
    path: PathBuf,
    format: &'static str,
    reference: PathBuf,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn add_image(dir: &Path, images: &mut Vec<Image>, name: &str, format: &'static str, seed: u64) {
    let path = dir.join("images").join(name);
    match format {
        "qcow2" => make_dense_qcow2(&path, 64 << 20, 96 << 20, seed),
        _ => std::fs::write(&path, random_bytes(48 << 20, seed)).unwrap(),
    }
    let reference = dir.join("refs").join(format!("{name}.raw"));
    reference_raw(&path, format, &reference);
    images.push(Image {
        path,
        format,
        reference,
    });
}

#[tokio::test]
async fn sigkill_at_random_points_never_breaks_the_invariants() {
    let rounds = env_u64("CRASH_ROUNDS", 12);
    let seed = env_u64("CRASH_SEED", 20_261_201);
    let mut rng = Rng(seed | 1);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    // One slot: the three jobs of a round run one after another, so a kill at 0-2 s lands in
    // one of them (downloading, converting or finalizing) or between them.
    let config = TestConfig::new(dir).set("jobs.max_concurrent", 1);
    let mut images = Vec::new();
    add_image(dir, &mut images, "base.qcow2", "qcow2", 1);
    add_image(dir, &mut images, "base.raw", "raw", 2);
    let c = client();
    // Unchecked jobs: id -> (volume name, image index).
    let mut jobs: BTreeMap<String, (String, usize)> = BTreeMap::new();
    let mut tally = Tally::default();
    for round in 0..rounds {
        // Every other round brings a new image (up to a few, to bound disk use), so kills
        // also land in downloads.
        if rng.below(2) == 0 && images.len() < MAX_IMAGES {
            let format = if rng.below(2) == 0 { "qcow2" } else { "raw" };
            add_image(
                dir,
                &mut images,
                &format!("r{round}.{format}"),
                format,
                100 + round,
            );
        }
        let d = Daemon::start(dir, &config);
        verify_finished(&c, &d, dir, &images, &mut jobs, &mut tally, false).await;
        for n in 0..3 {
            let index = rng.below(images.len() as u64) as usize;
            let image = &images[index];
            let volume = format!("crash-{round}-{n}");
            let (status, body) = post(
                &c,
                &d.url("/api/v1/jobs"),
                &json!({"image_url": file_url(&image.path), "volume_name": volume,
                        "volume_size_gb": 1, "image_type": image.format}),
            )
            .await;
            assert_eq!(status, 202, "round {round}: {body}");
            jobs.insert(
                body["job_id"].as_str().unwrap().to_string(),
                (volume, index),
            );
        }
        tokio::time::sleep(Duration::from_millis(rng.below(2000))).await;
        d.kill9();
    }

    let d = Daemon::start(dir, &config);
    verify_finished(&c, &d, dir, &images, &mut jobs, &mut tally, true).await;
    check_cache(&c, &d, dir).await;
    println!(
        "crash summary: seed {seed}, {rounds} rounds, {} jobs: {:?}, {} interrupted by a kill \
         and recovered, {} images; all invariants held",
        tally.jobs,
        tally.statuses,
        tally.interrupted,
        images.len()
    );
}

/// At most this many distinct images (each is a download, a cache entry and a reference).
const MAX_IMAGES: usize = 6;

/// What the checked jobs ended as.
#[derive(Default)]
struct Tally {
    jobs: usize,
    statuses: BTreeMap<String, usize>,
    /// Failed with "interrupted by daemon restart": killed mid-job and recovered.
    interrupted: usize,
}

/// Checks the jobs that have finished (with `wait`, waits for all of them): the invariants
/// of the module comment. Checked volumes are deleted through the API, which bounds the disk
/// a long soak uses.
async fn verify_finished(
    c: &reqwest::Client,
    d: &Daemon,
    dir: &Path,
    images: &[Image],
    jobs: &mut BTreeMap<String, (String, usize)>,
    tally: &mut Tally,
    wait: bool,
) {
    let ids: Vec<String> = jobs.keys().cloned().collect();
    for id in ids {
        let job = if wait {
            wait_job(c, d, &id, Duration::from_secs(300)).await
        } else {
            let (_, job) = get(c, &d.url(&format!("/api/v1/jobs/{id}"))).await;
            if !matches!(
                job["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            ) {
                continue;
            }
            job
        };
        let (volume, index) = jobs.remove(&id).unwrap();
        let status = job["status"].as_str().unwrap().to_string();
        let volume_path = dir.join("volumes").join(&volume);
        match status.as_str() {
            "completed" => {
                assert_volume_matches(&volume_path, &images[index].reference);
                let (code, body) = delete(c, &d.url(&format!("/api/v1/volumes/{volume}"))).await;
                assert_eq!(code, 200, "{body}");
            }
            "failed" => {
                let reason = job["error"].as_str().unwrap_or("");
                assert!(!reason.is_empty(), "failed without a reason: {job}");
                tally.interrupted += usize::from(reason.contains("interrupted by daemon restart"));
                assert!(
                    !volume_path.exists(),
                    "a failed job left its volume behind: {job}"
                );
            }
            other => panic!("job {id} ended {other}: {job}"),
        }
        tally.jobs += 1;
        *tally.statuses.entry(status).or_default() += 1;
    }
}

/// Every cache entry's file has the recorded SHA-256, and no `.img` file lacks an entry.
async fn check_cache(c: &reqwest::Client, d: &Daemon, dir: &Path) {
    let (status, list) = get(c, &d.url("/api/v1/cache/images?limit=1000")).await;
    assert_eq!(status, 200);
    let entries: &Vec<Value> = list["images"].as_array().unwrap();
    let mut keys = Vec::new();
    for e in entries {
        let path = Path::new(e["path"].as_str().unwrap());
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            sha256_hex(&bytes),
            e["checksum"].as_str().unwrap(),
            "cache file {} does not match its entry",
            path.display()
        );
        keys.push(e["key"].as_str().unwrap().to_string());
    }
    for file in std::fs::read_dir(dir.join("cache")).unwrap().flatten() {
        let name = file.file_name().to_string_lossy().to_string();
        if let Some(key) = name.strip_suffix(".img") {
            assert!(
                keys.iter().any(|k| k == key),
                "{name} looks complete but has no cache entry"
            );
        }
    }
}
