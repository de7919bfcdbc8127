//! A disk's life on the host (directory backend, the real binary): wiping on delete (a small
//! wipe answers 200, a long one is a `wipe` job; a wipe cut short is finished at start-up).
//! The LVM and libvirt side is tests/lifecycle_vm.rs.

mod common;

use std::time::Duration;

use common::*;

const MINUTE: Duration = Duration::from_secs(60);

/// A file volume of `bytes` with non-zero content, made outside the daemon.
fn volume_file(dir: &std::path::Path, name: &str, bytes: usize) -> std::path::PathBuf {
    let path = dir.join("volumes").join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vec![0xa5u8; bytes]).unwrap();
    path
}

#[tokio::test]
async fn a_long_zero_wipe_is_a_job_and_a_short_one_answers_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = TestConfig::new(dir)
        .set("volumes.wipe_on_delete", "zero")
        .set("volumes.wipe_job_min_bytes", 1 << 20);
    let d = Daemon::start(dir, &config);
    let c = client();

    let small = volume_file(dir, "small", 512 << 10);
    let (status, body) = delete(&c, &d.url("/api/v1/volumes/small")).await;
    assert_eq!(
        (status, &body["status"]),
        (200, &"deleted".into()),
        "{body}"
    );
    assert!(!small.exists());

    let big = volume_file(dir, "big", 4 << 20);
    let (status, body) = delete(&c, &d.url("/api/v1/volumes/big")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["job_id"].as_str().unwrap().to_string();
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["kind"], "wipe", "{job}");
    assert_eq!(job["progress"]["bytes_total"], 4 << 20, "{job}");
    assert!(!big.exists(), "removed by the job");
    let wiping = dir.join("volumes/.lvp-wiping");
    assert_eq!(
        std::fs::read_dir(&wiping).unwrap().count(),
        0,
        "nothing left"
    );
    let wiped = metric(
        &c,
        &d,
        "libvirt_volume_provisioner_bulk_io_bytes_total",
        r#"op="wipe""#,
    )
    .await;
    assert_eq!(wiped, f64::from((4 << 20) + (512 << 10)));

    // The reserved folder is not a volume name.
    let (status, body) = delete(&c, &d.url("/api/v1/volumes/.lvp-wiping")).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn a_wipe_cut_short_is_finished_at_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // As a crash mid-wipe leaves it: the file moved into the wiping folder, not yet unlinked;
    // and a new volume made under the same name since, which must stay.
    let wiping = dir.join("volumes/.lvp-wiping");
    std::fs::create_dir_all(&wiping).unwrap();
    std::fs::write(wiping.join("vm-1"), vec![0xa5u8; 1 << 20]).unwrap();
    let live = volume_file(dir, "vm-1", 4096);
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let deadline = std::time::Instant::now() + MINUTE;
    while !d.log().contains("interrupted wipe finished") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!wiping.join("vm-1").exists(), "wiped and removed");
    assert!(live.exists(), "the new volume of that name is untouched");
}
