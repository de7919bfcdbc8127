//! Hostile images made with `qemu-img create` are rejected by the header inspector before any
//! qemu-img call touches them (the daemon's qemu-img counter stays at zero), with a reason
//! that names the problem, and leave no volume behind.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn hostile_images_are_rejected_without_running_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = TestConfig::new(dir);
    let images = dir.join("images");
    let secret = dir.join("host-secret.txt");
    std::fs::write(&secret, "host secret\n").unwrap();
    for kind in [
        Hostile::BackingFile,
        Hostile::DataFile,
        Hostile::Encrypted,
        Hostile::Truncated,
        Hostile::Huge,
    ] {
        hostile_qcow2(&images, kind);
    }
    let valid = images.join("valid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        valid.to_str().unwrap(),
        "64M",
    ]);

    let d = Daemon::start(dir, &config);
    let c = client();
    let cases = [
        ("backing.qcow2", "qcow2", "backing file"),
        ("datafile.qcow2", "qcow2", "external data file"),
        ("luks.qcow2", "qcow2", "encrypted"),
        ("truncated.qcow2", "qcow2", "truncated"),
        ("huge.qcow2", "qcow2", "does not fit the volume"),
        (
            "valid.qcow2",
            "raw",
            "image_type is raw but the image is qcow2",
        ),
    ];
    for (i, (file, image_type, reason)) in cases.iter().enumerate() {
        let volume = format!("hostile-{i}");
        let id = submit(
            &c,
            &d,
            json!({"image_url": file_url(&images.join(file)), "volume_name": volume,
                   "volume_size_gb": 1, "image_type": image_type}),
        )
        .await;
        let job = wait_job(&c, &d, &id, Duration::from_secs(60)).await;
        assert_eq!(job["status"], "failed", "{file}: {job}");
        let error = job["error"].as_str().unwrap();
        assert!(
            error.contains(reason),
            "{file}: error {error:?} does not name {reason:?}"
        );
        assert!(
            !Path::new(&dir.join("volumes").join(&volume)).exists(),
            "{file}: no volume"
        );
    }
    let convert_runs = metric(
        &c,
        &d,
        "libvirt_volume_provisioner_qemu_img_invocations_total",
        "",
    )
    .await;
    assert_eq!(convert_runs, 0.0, "qemu-img never ran on a hostile image");
    assert!(!d.log().contains("host secret"));
    // Rejected images do not enter the cache.
    let (_, v) = get(&c, &d.url("/api/v1/cache/images")).await;
    let urls: Vec<&str> = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["image_url"].as_str().unwrap())
        .collect();
    for hostile in ["backing", "datafile", "luks", "truncated"] {
        assert!(
            !urls.iter().any(|u| u.contains(hostile)),
            "{hostile} cached: {urls:?}"
        );
    }

    // The same valid image, declared right, converts: the counter moves.
    let id = submit(
        &c,
        &d,
        json!({"image_url": file_url(&valid), "volume_name": "fine",
               "volume_size_gb": 1}),
    )
    .await;
    assert_eq!(
        wait_job(&c, &d, &id, Duration::from_secs(60)).await["status"],
        "completed"
    );
    let convert_runs = metric(
        &c,
        &d,
        "libvirt_volume_provisioner_qemu_img_invocations_total",
        "subcommand=\"convert\"",
    )
    .await;
    assert_eq!(convert_runs, 1.0);
}
