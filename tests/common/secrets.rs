//! Looking for a secret where it must not be: in the command lines and environments of every
//! process (sampled while a job runs), and in files below a directory; and images holding a
//! plaintext marker, read back through QEMU's LUKS driver.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Plaintext the marked images hold at several offsets.
pub const MARKER: &[u8] = b"LVP-PLAINTEXT-MARKER-7f3a9c";

/// Whether `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads every process's command line and environment every 10 ms until the flag is set;
/// returns what it saw (each distinct content once).
pub fn sample_processes(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<HashSet<Vec<u8>>> {
    std::thread::spawn(move || {
        let mut seen = HashSet::new();
        while !stop.load(Ordering::Relaxed) {
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                for what in ["cmdline", "environ"] {
                    if let Ok(bytes) = std::fs::read(entry.path().join(what)) {
                        seen.insert(bytes);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        seen
    })
}

/// Every regular file below `dir` (recursively), except those below `except`.
pub fn files_below(dir: &Path, except: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if path.starts_with(except) {
            continue;
        } else if meta.is_dir() {
            out.extend(files_below(&path, except));
        } else if meta.is_file() {
            out.push(path);
        }
    }
    out
}

/// The files below `dir` (except below `except`) that contain `secret`.
pub fn files_holding(dir: &Path, except: &Path, secret: &[u8]) -> Vec<PathBuf> {
    files_below(dir, except)
        .into_iter()
        .filter(|f| std::fs::read(f).is_ok_and(|bytes| contains(&bytes, secret)))
        .collect()
}

/// `images/marked.qcow2` below `dir`: a qcow2 of `size` bytes made from `marked_raw`.
pub fn marked_qcow2(dir: &Path, size: usize) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let (raw, qcow2) = (images.join("marked.raw"), images.join("marked.qcow2"));
    marked_raw(&raw, size);
    crate::common::qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        qcow2.to_str().unwrap(),
    ]);
    std::fs::remove_file(&raw).unwrap();
    qcow2
}

/// Writes `size` bytes of raw image to `raw` with `MARKER` (and random data) at a few offsets.
pub fn marked_raw(raw: &Path, size: usize) {
    const MIB: usize = 1 << 20;
    let mut bytes = vec![0u8; size];
    let offsets = [0, 3 * MIB, size / 4, size / 2 + MIB];
    for (i, off) in offsets.into_iter().enumerate() {
        bytes[off..off + MIB].copy_from_slice(&crate::common::random_bytes(MIB, i as u64));
        for k in 0..64 {
            let at = off + k * 4096;
            bytes[at..at + MARKER.len()].copy_from_slice(MARKER);
        }
    }
    std::fs::write(raw, &bytes).unwrap();
}

/// `qemu-img compare` of the qcow2 `image` with the first `bytes` of the LUKS payload of
/// `volume` opened with the passphrase in `key_file`: `(identical, output)`.
pub fn compare_through_luks(
    image: &Path,
    volume: &Path,
    key_file: &Path,
    bytes: u64,
) -> (bool, String) {
    let window = format!(
        "driver=raw,size={bytes},file.driver=luks,file.key-secret=k,file.file.filename={}",
        volume.display()
    );
    crate::common::output_of(
        Command::new("qemu-img")
            .arg("compare")
            .arg("--object")
            .arg(format!("secret,id=k,file={}", key_file.display()))
            .arg("--image-opts")
            .arg(format!("driver=qcow2,file.filename={}", image.display()))
            .arg(window),
    )
}

/// `qemu-img info` of `volume` through the LUKS driver with the passphrase in `key_file`
/// (which reads the header): the payload's size, or qemu-img's error.
pub fn luks_virtual_size(volume: &Path, key_file: &Path) -> Result<u64, String> {
    let (ok, out) = crate::common::output_of(
        Command::new("qemu-img")
            .args(["info", "--output=json", "--object"])
            .arg(format!("secret,id=k,file={}", key_file.display()))
            .arg("--image-opts")
            .arg(format!(
                "driver=luks,key-secret=k,file.filename={}",
                volume.display()
            )),
    );
    if !ok {
        return Err(out);
    }
    let info: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    info["virtual-size"].as_u64().ok_or(out)
}
