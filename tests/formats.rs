//! Every accepted image format end to end through the real daemon: VMDK (monolithicSparse and
//! streamOptimized), VHDX, VHD (dynamic and fixed), VDI (dynamic and static) and an OVA made
//! with tar, each made by the real qemu-img from one raw disk, provisioned into a directory
//! volume and byte-compared with qemu-img's own conversion of that image to raw; `auto` takes
//! the format the inspector found and the status reports it; preflight says what it found
//! from a few ranges of the file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

/// A raw disk of 24 MiB with 6 MiB of incompressible data in three places.
fn base_disk(dir: &Path) -> PathBuf {
    let raw = dir.join("base.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(24 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    for (i, off) in [0u64, 9 << 20, 20 << 20].into_iter().enumerate() {
        f.write_all_at(&random_bytes(2 << 20, 11 + i as u64), off)
            .unwrap();
    }
    raw
}

/// `base` converted by qemu-img to `fmt` with `opts`.
fn convert_to(base: &Path, fmt: &str, opts: &[&str], out: &Path) {
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
    args.extend(opts);
    args.extend([base.to_str().unwrap(), out.to_str().unwrap()]);
    qemu_img(&args);
}

/// An OVA as appliances ship it: the OVF first, then a streamOptimized disk (tar, ustar).
fn make_ova(base: &Path, dir: &Path) -> PathBuf {
    let work = dir.join("ova");
    std::fs::create_dir_all(&work).unwrap();
    convert_to(
        base,
        "vmdk",
        &["-o", "subformat=streamOptimized"],
        &work.join("appliance-disk1.vmdk"),
    );
    let ovf = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:href="appliance-disk1.vmdk" ovf:id="file1"/></References>
  <DiskSection><Info>Virtual disk information</Info>
    <Disk ovf:capacity="24" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="appliance"><Info>A virtual machine</Info></VirtualSystem>
</Envelope>"#;
    std::fs::write(work.join("appliance.ovf"), ovf).unwrap();
    std::fs::write(work.join("appliance.mf"), "SHA256(appliance.ovf)= 00\n").unwrap();
    let out = dir.join("images/appliance.ova");
    let ok = Command::new("tar")
        .current_dir(&work)
        .args(["--format=ustar", "-cf"])
        .arg(&out)
        .args(["appliance.ovf", "appliance.mf", "appliance-disk1.vmdk"])
        .status()
        .unwrap();
    assert!(ok.success());
    out
}

#[tokio::test]
async fn every_format_provisions_the_bytes_qemu_img_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let base = base_disk(dir);
    // (file, qemu-img format, options, declared image_type, expected subformat)
    let cases: [(&str, &str, &[&str], &str, &str); 8] = [
        (
            "m.vmdk",
            "vmdk",
            &["-o", "subformat=monolithicSparse"],
            "vmdk",
            "monolithicSparse",
        ),
        (
            "s.vmdk",
            "vmdk",
            &["-o", "subformat=streamOptimized"],
            "vmdk",
            "streamOptimized",
        ),
        ("d.vhdx", "vhdx", &[], "vhdx", "dynamic"),
        ("d.vhd", "vpc", &[], "vpc", "dynamic"),
        ("f.vhd", "vpc", &["-o", "subformat=fixed"], "auto", "fixed"),
        ("d.vdi", "vdi", &[], "vdi", "dynamic"),
        ("s.vdi", "vdi", &["-o", "static=on"], "auto", "fixed"),
        ("a.vmdk", "vmdk", &[], "auto", "monolithicSparse"),
    ];
    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    for (i, (file, fmt, opts, declared, subformat)) in cases.iter().enumerate() {
        let image = images.join(file);
        convert_to(&base, fmt, opts, &image);
        let (s, pre) = post(
            &c,
            &d.url("/api/v1/images/inspect"),
            &json!({"image_url": file_url(&image), "image_type": declared}),
        )
        .await;
        assert_eq!(s, 200, "{pre}");
        assert_eq!(
            (
                pre["accepted"].clone(),
                pre["format"].clone(),
                pre["subformat"].clone()
            ),
            (json!(true), json!(fmt), json!(subformat)),
            "{file}: {pre}"
        );
        assert!(pre["checks"].as_array().unwrap().len() >= 3, "{pre}");
        let volume = format!("vm-{i}");
        let id = submit(
            &c,
            &d,
            json!({"image_url": file_url(&image), "volume_name": volume, "volume_size_gb": 1,
                   "image_type": declared}),
        )
        .await;
        let job = wait_job(&c, &d, &id, Duration::from_secs(120)).await;
        assert_eq!(job["status"], "completed", "{file}: {job}");
        assert_eq!(job["image_format"], *fmt, "{file}: {job}");
        let reference = dir.join(format!("ref-{i}.raw"));
        reference_raw(&image, fmt, &reference);
        assert_volume_matches(&dir.join("volumes").join(&volume), &reference);
    }

    // The OVA: its disk, found through the OVF, read in place.
    let ova = make_ova(&base, dir);
    let (_, pre) = post(
        &c,
        &d.url("/api/v1/images/inspect"),
        &json!({"image_url": file_url(&ova), "image_type": "auto"}),
    )
    .await;
    assert_eq!(
        (
            pre["accepted"].clone(),
            pre["format"].clone(),
            pre["container"].clone()
        ),
        (json!(true), json!("vmdk"), json!("ova")),
        "{pre}"
    );
    assert_eq!(pre["subformat"], "streamOptimized");
    let size = std::fs::metadata(&ova).unwrap().len();
    assert!(pre["bytes_read"].as_u64().unwrap() < size, "{pre}");
    for (volume, declared) in [("vm-ova", "auto"), ("vm-ova-2", "vmdk")] {
        let id = submit(
            &c,
            &d,
            json!({"image_url": file_url(&ova), "volume_name": volume, "volume_size_gb": 1,
                   "image_type": declared}),
        )
        .await;
        let job = wait_job(&c, &d, &id, Duration::from_secs(120)).await;
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["image_format"], "vmdk");
        let reference = dir.join(format!("ref-{volume}.raw"));
        reference_raw(&dir.join("ova/appliance-disk1.vmdk"), "vmdk", &reference);
        assert_volume_matches(&dir.join("volumes").join(volume), &reference);
    }
    // Declared as something else, the OVA's disk is refused like any mismatch.
    let id = submit(
        &c,
        &d,
        json!({"image_url": file_url(&ova), "volume_name": "vm-ova-3", "volume_size_gb": 1,
               "image_type": "qcow2"}),
    )
    .await;
    let job = wait_job(&c, &d, &id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "failed");
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("image_type is qcow2 but the image is vmdk"),
        "{job}"
    );
}
