//! The inspector on images made by the real qemu-img (and tar), and on those images made
//! hostile byte by byte.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw file of 8 MiB with 3 MiB of data, converted to `fmt` with `opts`.
fn made(dir: &Path, fmt: &str, opts: &[&str], name: &str) -> PathBuf {
    let raw = dir.join("src.raw");
    if !raw.exists() {
        let mut data: Vec<u8> = (0..3u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        data.resize(8 << 20, 0);
        std::fs::write(&raw, data).unwrap();
    }
    let out = dir.join(name);
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", fmt])
        .args(opts)
        .arg(&raw)
        .arg(&out));
    out
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn check(b: &[u8]) -> Result<Inspection, InspectError> {
    inspect_bytes(b, b.len() as u64)
}

/// A qemu-img format with its options, and what the inspector must find.
type Case = (
    &'static str,
    &'static [&'static str],
    ImageType,
    Option<Subformat>,
    u64,
);

#[test]
fn qemu_img_output_of_every_format_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cases: [Case; 8] = [
        ("qcow2", &[], ImageType::Qcow2, None, 8 << 20),
        (
            "vmdk",
            &["-o", "subformat=monolithicSparse"],
            ImageType::Vmdk,
            Some(Subformat::MonolithicSparse),
            8 << 20,
        ),
        (
            "vmdk",
            &["-o", "subformat=streamOptimized"],
            ImageType::Vmdk,
            Some(Subformat::StreamOptimized),
            8 << 20,
        ),
        (
            "vhdx",
            &[],
            ImageType::Vhdx,
            Some(Subformat::Dynamic),
            8 << 20,
        ),
        (
            "vpc",
            &[],
            ImageType::Vpc,
            Some(Subformat::Dynamic),
            8390656,
        ),
        (
            "vpc",
            &["-o", "subformat=fixed"],
            ImageType::Vpc,
            Some(Subformat::Fixed),
            8390656,
        ),
        (
            "vdi",
            &[],
            ImageType::Vdi,
            Some(Subformat::Dynamic),
            8 << 20,
        ),
        (
            "vdi",
            &["-o", "static=on"],
            ImageType::Vdi,
            Some(Subformat::Fixed),
            8 << 20,
        ),
    ];
    for (i, (fmt, opts, format, subformat, size)) in cases.into_iter().enumerate() {
        let p = made(d, fmt, opts, &format!("{i}.{fmt}"));
        let v = inspect_file(&p).unwrap_or_else(|e| panic!("{fmt} {opts:?}: {e}"));
        assert_eq!(
            (v.format, v.subformat, v.virtual_size),
            (format, subformat, size),
            "{fmt} {opts:?}"
        );
        // The whole file in memory agrees with the ranged file reads.
        assert_eq!(check(&bytes(&p)).unwrap(), v);
    }
    let raw = inspect_file(&d.join("src.raw")).unwrap();
    assert_eq!((raw.format, raw.virtual_size), (ImageType::Raw, 8 << 20));
}

#[test]
fn raw_is_anything_without_magic() {
    let i = inspect_bytes(b"COWD....", 4096).unwrap();
    assert_eq!(i.format, ImageType::Raw);
    assert_eq!(i.virtual_size, 4096);
    assert_eq!(inspect_bytes(b"x", 1).unwrap().format, ImageType::Raw);
    assert_eq!(inspect_bytes(b"", 0), Err(InspectError::Empty));
    assert_eq!(InspectError::Empty.to_string(), "image is empty (0 bytes)");
}

#[test]
fn mismatch_with_request() {
    let i = Inspection::bare(ImageType::Qcow2, 1 << 20, None);
    assert!(check_requested(&i, ImageType::Qcow2).is_ok());
    let e = check_requested(&i, ImageType::Raw).unwrap_err();
    assert_eq!(e.to_string(), "image_type is raw but the image is qcow2");
}

#[test]
fn vmdk_descriptor_files_are_refused() {
    let desc = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                createType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/shadow\" 0\n";
    assert_eq!(check(desc.as_bytes()), Err(InspectError::DescriptorFile));
}

/// Sets a GUID's 16 bytes to another GUID wherever the first occurs in `b`.
fn replace_all(b: &mut [u8], from: &[u8], to: &[u8]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i + from.len() <= b.len() {
        if &b[i..i + from.len()] == from {
            b[i..i + to.len()].copy_from_slice(to);
            n += 1;
        }
        i += 1;
    }
    n
}

#[test]
fn hostile_variants_of_real_images_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // VHDX: the page-83 item becomes a parent locator; the has_parent flag.
    let vhdx = bytes(&made(d, "vhdx", &[], "x.vhdx"));
    let mut b = vhdx.clone();
    let page83 = [
        0xab, 0x12, 0xca, 0xbe, 0xe6, 0xb2, 0x23, 0x45, 0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7,
        0x46,
    ];
    let locator = [
        0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab,
        0x0c,
    ];
    assert_eq!(replace_all(&mut b, &page83, &locator), 1);
    assert_eq!(check(&b).unwrap_err().kind(), "parent_image");
    // The second region table differs from the first.
    let mut b = vhdx.clone();
    b[(256 << 10) + 40] ^= 1;
    assert_eq!(check(&b).unwrap_err().kind(), "impossible_header");

    // VHD: a differencing disk type; a parent name in the dynamic header.
    let vhd = bytes(&made(d, "vpc", &[], "d.vhd"));
    let mut b = vhd.clone();
    b[60..64].copy_from_slice(&4u32.to_be_bytes());
    assert_eq!(check(&b).unwrap_err().kind(), "parent_image");
    let mut b = vhd.clone();
    b[512 + 64] = b'x';
    assert_eq!(check(&b).unwrap_err().kind(), "parent_image");

    // VDI: absurd sizes; a parent UUID; a differencing type.
    let vdi = bytes(&made(d, "vdi", &[], "i.vdi"));
    let mut b = vdi.clone();
    b[0x170..0x178].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert_eq!(check(&b).unwrap_err().kind(), "virtual_size_limit");
    let mut b = vdi.clone();
    b[0x180..0x184].copy_from_slice(&0x3fff_0000u32.to_le_bytes());
    b[0x170..0x178].copy_from_slice(&(1u64 << 45).to_le_bytes());
    assert_eq!(check(&b).unwrap_err().kind(), "impossible_header");
    let mut b = vdi.clone();
    b[0x1b8] = 1;
    assert_eq!(check(&b).unwrap_err().kind(), "parent_image");
    let mut b = vdi.clone();
    b[0x4c..0x50].copy_from_slice(&4u32.to_le_bytes());
    assert_eq!(check(&b).unwrap_err().kind(), "parent_image");
}

/// An OVA made with tar from an OVF and a streamOptimized VMDK.
fn ova(d: &Path, members: &[&str]) -> PathBuf {
    let disk = made(
        d,
        "vmdk",
        &["-o", "subformat=streamOptimized"],
        "disk1.vmdk",
    );
    let ovf = "<?xml version=\"1.0\"?><Envelope xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1\">\
        <References><File ovf:id=\"file1\" ovf:href=\"disk1.vmdk\"/></References>\
        <DiskSection><Disk ovf:diskId=\"vmdisk1\" ovf:fileRef=\"file1\"/></DiskSection></Envelope>";
    std::fs::write(d.join("vm.ovf"), ovf).unwrap();
    assert!(disk.exists());
    let out = d.join("vm.ova");
    run(Command::new("tar")
        .current_dir(d)
        .args(["--format=ustar", "-cf"])
        .arg(&out)
        .args(members));
    out
}

#[test]
fn ova_disk_is_found_and_inspected() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = ova(d, &["vm.ovf", "disk1.vmdk"]);
    let v = inspect_file(&p).unwrap();
    assert_eq!(
        (v.format, v.subformat),
        (ImageType::Vmdk, Some(Subformat::StreamOptimized))
    );
    let m = v.ova_disk.unwrap();
    assert_eq!(
        m.offset, 1536,
        "OVF header + one block of OVF + disk header"
    );
    assert_eq!(
        m.size,
        std::fs::metadata(d.join("disk1.vmdk")).unwrap().len()
    );
    // The OVF must come first; the disk must be there.
    let p = ova(d, &["disk1.vmdk", "vm.ovf"]);
    assert_eq!(inspect_file(&p).unwrap_err().kind(), "ova_descriptor");
    let p = ova(d, &["vm.ovf"]);
    assert_eq!(inspect_file(&p).unwrap_err().kind(), "ova_disk");
}
