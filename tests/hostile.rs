//! Hostile images made with `qemu-img create` are rejected by the header inspector before any
//! qemu-img call touches them (the daemon's qemu-img counter stays at zero), with a reason
//! that names the problem, and leave no volume behind.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Submits `image` (daemon directory `dir`) declared as `image_type` for `volume`; the job fails with an error that
/// names `reason`, and no volume is left behind.
async fn fails_naming(
    c: &reqwest::Client,
    d: &Daemon,
    dir: &Path,
    image: &Path,
    image_type: &str,
    volume: &str,
    reason: &str,
) {
    let id = submit(
        c,
        d,
        json!({"image_url": file_url(image), "volume_name": volume,
               "volume_size_gb": 1, "image_type": image_type}),
    )
    .await;
    let job = wait_job(c, d, &id, Duration::from_secs(60)).await;
    let file = image.display();
    assert_eq!(job["status"], "failed", "{file}: {job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains(reason),
        "{file}: error {error:?} does not name {reason:?}"
    );
    assert!(
        !dir.join("volumes").join(volume).exists(),
        "{file}: no volume"
    );
}

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
        let image = images.join(file);
        fails_naming(&c, &d, dir, &image, image_type, &volume, reason).await;
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

/// Rewrites the embedded descriptor of a single-file VMDK (at sector 1, NUL-padded) with
/// `edit` applied to its text.
fn edit_vmdk_descriptor(path: &Path, edit: impl Fn(&str) -> String) {
    let mut b = std::fs::read(path).unwrap();
    let size = u64::from_le_bytes(b[36..44].try_into().unwrap()) as usize * 512;
    let area = &mut b[512..512 + size];
    let end = area.iter().position(|&x| x == 0).unwrap_or(size);
    let text = edit(std::str::from_utf8(&area[..end]).unwrap());
    assert!(text.len() < size, "the new descriptor fits");
    area.fill(0);
    area[..text.len()].copy_from_slice(text.as_bytes());
    std::fs::write(path, b).unwrap();
}

/// Replaces each occurrence of `from` in the file with `to` (same length); returns how many.
fn patch_bytes(path: &Path, from: &[u8], to: &[u8]) -> usize {
    let mut b = std::fs::read(path).unwrap();
    let mut n = 0;
    for i in 0..b.len().saturating_sub(from.len()) {
        if &b[i..i + from.len()] == from {
            b[i..i + to.len()].copy_from_slice(to);
            n += 1;
        }
    }
    std::fs::write(path, b).unwrap();
    n
}

/// Writes bytes at an offset of a file.
fn patch_at(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// An OVA made by Python's tarfile (GNU tar will not write `../` names): the OVF first, then
/// the given members (name, bytes).
fn python_ova(out: &Path, members: &str) {
    let script = format!(
        "import io, tarfile\n\
         ovf = b'<Envelope xmlns:ovf=\"x\"><References><File ovf:id=\"f1\" ovf:href=\"disk.vmdk\"/></References>\
         <DiskSection><Disk ovf:diskId=\"d1\" ovf:fileRef=\"f1\"/></DiskSection></Envelope>'\n\
         t = tarfile.open('{}', 'w', format=tarfile.USTAR_FORMAT)\n\
         def add(name, data):\n    i = tarfile.TarInfo(name); i.size = len(data); t.addfile(i, io.BytesIO(data))\n\
         add('vm.ovf', ovf)\n{members}\nt.close()\n",
        out.display()
    );
    let ok = std::process::Command::new("python3")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn hostile_vmdk_vhdx_vhd_vdi_and_ova_are_refused_before_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let base = images.join("base.raw");
    std::fs::write(&base, random_bytes(1 << 20, 5)).unwrap();
    let make = |fmt: &str, opts: &[&str], name: &str| {
        let out = images.join(name);
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
        args.extend(opts);
        args.extend([base.to_str().unwrap(), out.to_str().unwrap()]);
        qemu_img(&args);
        out
    };
    // A VMDK descriptor file whose extent is the host's /etc/shadow (CVE-2022-47951).
    std::fs::write(
        images.join("shadow-descriptor.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/shadow\" 0\n",
    )
    .unwrap();
    // A single-file VMDK whose embedded descriptor names /etc/shadow as its extent.
    let p = make("vmdk", &[], "shadow-extent.vmdk");
    edit_vmdk_descriptor(&p, |d| {
        d.replace("\"shadow-extent.vmdk\"", "\"/etc/shadow\"")
    });
    // Two extents in the embedded descriptor.
    let p = make("vmdk", &[], "multi-extent.vmdk");
    edit_vmdk_descriptor(&p, |d| {
        d.replace(
            "RW 2048 SPARSE \"multi-extent.vmdk\"",
            "RW 1024 SPARSE \"multi-extent.vmdk\"\nRW 1024 FLAT \"other.img\" 0",
        )
    });
    // qemu-img's own multi-file VMDK: a descriptor plus extent files.
    make(
        "vmdk",
        &["-o", "subformat=twoGbMaxExtentFlat"],
        "split.vmdk",
    );
    // A VHDX whose page-83 metadata item is turned into a parent locator.
    let p = make("vhdx", &[], "parent.vhdx");
    let page83 = [
        0xab, 0x12, 0xca, 0xbe, 0xe6, 0xb2, 0x23, 0x45, 0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7,
        0x46,
    ];
    let locator = [
        0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab,
        0x0c,
    ];
    assert_eq!(patch_bytes(&p, &page83, &locator), 1);
    // A VHD that says it is a differencing disk.
    let p = make("vpc", &[], "differencing.vhd");
    patch_at(&p, 60, &4u32.to_be_bytes());
    // A VDI with an absurd disk size.
    let p = make("vdi", &[], "absurd.vdi");
    patch_at(&p, 0x170, &(1u64 << 62).to_le_bytes());
    // OVAs: 10,000 members; a member named ../disk.vmdk.
    python_ova(
        &images.join("many.ova"),
        "for i in range(10000):\n    add('m%05d.txt' % i, b'')",
    );
    python_ova(&images.join("climb.ova"), "add('../disk.vmdk', b'KDMV')");
    // A VHDX declared as a VMDK.
    make("vhdx", &[], "declared-wrong.vhdx");

    let d = Daemon::start(dir, &TestConfig::new(dir));
    let c = client();
    let cases = [
        (
            "shadow-descriptor.vmdk",
            "vmdk",
            "vmdk_descriptor_file",
            "VMDK descriptor file",
        ),
        (
            "shadow-extent.vmdk",
            "vmdk",
            "vmdk_extent",
            "extent names a path",
        ),
        ("multi-extent.vmdk", "vmdk", "vmdk_extent", "2 extents"),
        (
            "split.vmdk",
            "auto",
            "vmdk_descriptor_file",
            "VMDK descriptor file",
        ),
        ("parent.vhdx", "vhdx", "parent_image", "parent locator"),
        (
            "differencing.vhd",
            "vpc",
            "parent_image",
            "differencing disk",
        ),
        ("absurd.vdi", "vdi", "virtual_size_limit", "above the limit"),
        (
            "many.ova",
            "auto",
            "ova_member_count",
            "more than 64 members",
        ),
        ("climb.ova", "auto", "ova_member_name", "climbs out"),
        (
            "declared-wrong.vhdx",
            "vmdk",
            "format_mismatch",
            "image_type is vmdk but the image is vhdx",
        ),
    ];
    for (i, (file, image_type, code, text)) in cases.iter().enumerate() {
        let volume = format!("hostile-{i}");
        let image = images.join(file);
        fails_naming(&c, &d, dir, &image, image_type, &volume, text).await;
        let refusals = metric(
            &c,
            &d,
            "libvirt_volume_provisioner_image_errors_total",
            &format!("error_type=\"{code}\""),
        )
        .await;
        assert!(refusals >= 1.0, "{file}: no refusal counted as {code}");
        // Preflight says the same, from ranges of the file.
        let (_, pre) = post(
            &c,
            &d.url("/api/v1/images/inspect"),
            &json!({"image_url": file_url(&images.join(file)), "image_type": image_type}),
        )
        .await;
        assert_eq!(pre["accepted"], false, "{file}: {pre}");
        assert!(
            pre["reason"].as_str().unwrap().contains(text),
            "{file}: {pre}"
        );
    }
    let runs = metric(
        &c,
        &d,
        "libvirt_volume_provisioner_qemu_img_invocations_total",
        "",
    )
    .await;
    assert_eq!(runs, 0.0, "qemu-img never ran on a hostile image");
}
