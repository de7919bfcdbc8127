//! End-to-end provisioning against the real binary: qcow2 and raw images into directory
//! volumes, byte-compared with qemu-img's own conversion; the legacy route sets.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn provisions_qcow2_and_raw_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();

    let qcow2 = dir.join("images/disk.qcow2");
    make_qcow2(&qcow2, "96M");
    let id = submit(
        &c,
        &d,
        json!({"image_url": file_url(&qcow2), "volume_name": "vm-q", "volume_size_gb": 1,
               "correlation_id": "corr-1"}),
    )
    .await;
    let job = wait_job(&c, &d, &id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["correlation_id"], "corr-1");
    assert_eq!(job["progress"]["percent"], 100.0);
    let volume = dir.join("volumes/vm-q");
    assert_eq!(job["volume_path"], volume.display().to_string());
    let reference = dir.join("ref-q.raw");
    reference_raw(&qcow2, "qcow2", &reference);
    assert_volume_matches(&volume, &reference);
    assert_eq!(std::fs::metadata(&volume).unwrap().len(), 1 << 30);

    let raw = dir.join("images/disk.raw");
    make_raw(&raw, 40 << 20);
    let id = submit(
        &c,
        &d,
        json!({"image_url": file_url(&raw), "volume_name": "vm-r", "volume_size_gb": 1,
               "image_type": "raw"}),
    )
    .await;
    let job = wait_job(&c, &d, &id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_volume_matches(&dir.join("volumes/vm-r"), &raw);
}
