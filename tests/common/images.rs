//! Images and their bytes: qemu-img helpers, recognisable and random data, reference
//! conversions, volume comparisons, the hostile fixtures, and a qemu-img wrapper that slows
//! conversions down.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs qemu-img, asserting success.
pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 of `size` (e.g. "64M") with recognisable data written at a few offsets.
pub fn make_qcow2(path: &Path, size: &str) {
    let raw = path.with_extension("src.raw");
    make_raw(&raw, parse_size(size));
    raw_into_qcow2(&raw, path);
}

/// Converts the raw image `raw` into the qcow2 `path`, and removes `raw`.
fn raw_into_qcow2(raw: &Path, path: &Path) {
    convert(raw, "raw", "qcow2", path);
    std::fs::remove_file(raw).unwrap();
}

/// A raw image of `size` bytes with recognisable, partly sparse data.
pub fn make_raw(path: &Path, size: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in 0..8u64 {
        let off = i * size / 8;
        f.seek(SeekFrom::Start(off)).unwrap();
        let block: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        f.write_all(&block[..block.len().min((size - off) as usize)])
            .unwrap();
    }
}

/// Bytes of a size written as qemu-img takes it: a number with `K`, `M` or `G`, or plain.
pub fn parse_size(s: &str) -> u64 {
    let (num, unit) = s.split_at(s.len() - 1);
    let n: u64 = num.parse().unwrap();
    match unit {
        "K" => n << 10,
        "M" => n << 20,
        "G" => n << 30,
        _ => s.parse().unwrap(),
    }
}

/// The raw bytes an image converts to (reference made by qemu-img).
pub fn reference_raw(image: &Path, format: &str, out: &Path) {
    convert(image, format, "raw", out);
}

/// `qemu-img convert` of `image` (in `from` format) into `out` (in `to` format).
fn convert(image: &Path, from: &str, to: &str, out: &Path) {
    let (image, out) = (image.to_str().unwrap(), out.to_str().unwrap());
    qemu_img(&["convert", "-q", "-f", from, "-O", to, image, out]);
}

/// Asserts that `volume` starts with the bytes of `reference` and reads as zeros after them.
pub fn assert_volume_matches(volume: &Path, reference: &Path) {
    use std::io::Read;
    let want = std::fs::read(reference).unwrap();
    let mut f = std::fs::File::open(volume).unwrap();
    let mut got = vec![0u8; want.len()];
    f.read_exact(&mut got).unwrap();
    // Slice equality is a memcmp, fast even in debug builds.
    assert!(
        got == want,
        "volume {} differs from {}",
        volume.display(),
        reference.display()
    );
    // Only the data extents of a sparse file need reading (SEEK_DATA/SEEK_HOLE); block
    // devices do not support that and are read whole.
    use std::os::unix::fs::FileExt;
    let len = f.metadata().unwrap().len().max(seek_end(&f));
    let fd = &f;
    let mut extents = Vec::new();
    let mut pos = want.len() as i64;
    loop {
        match nix::unistd::lseek(fd, pos, nix::unistd::Whence::SeekData) {
            Ok(data) => {
                let hole = nix::unistd::lseek(fd, data, nix::unistd::Whence::SeekHole).unwrap();
                extents.push((data as u64, hole as u64));
                pos = hole;
            }
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => {
                extents = vec![(want.len() as u64, len)];
                break;
            }
        }
    }
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in extents {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..n], off).unwrap();
            // Slice equality is a memcmp, fast even in debug builds.
            assert!(
                buf[..n] == zeros[..n],
                "volume has non-zero data after the image near offset {off}"
            );
            off += n as u64;
        }
    }
}

fn seek_end(f: &std::fs::File) -> u64 {
    use std::io::Seek;
    let mut f = f;
    f.seek(std::io::SeekFrom::End(0)).unwrap_or(0)
}

/// The `file://` URL of a path.
pub fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}

/// A directory with a `qemu-img` wrapper first in PATH: `convert` waits `delay_secs` before
/// running the real qemu-img (so a test can act while a job is converting), everything else
/// passes straight through. Returns the PATH value to give the daemon.
pub fn slow_qemu_img_path(dir: &Path, delay_secs: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("slowbin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v qemu-img"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let script = format!(
        "#!/bin/sh\n# test wrapper: delays conversions\nif [ \"$1\" = convert ]; then sleep {delay_secs}; fi\nexec {} \"$@\"\n",
        real.trim()
    );
    let path = bin.join("qemu-img");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// SHA-256 of `bytes`, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// `size` bytes of incompressible data from `seed` (xorshift, 8 bytes per step).
pub fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

/// A qcow2 whose first `data` bytes are incompressible (so its file is about that large),
/// in a disk of `virtual_size` bytes.
pub fn make_dense_qcow2(path: &Path, data: usize, virtual_size: u64, seed: u64) {
    let raw = path.with_extension("dense.raw");
    std::fs::write(&raw, random_bytes(data, seed)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(virtual_size)
        .unwrap();
    raw_into_qcow2(&raw, path);
}

/// A hostile image the header inspector refuses, and the reason it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hostile {
    /// A qcow2 naming the host's `/etc/passwd` as its raw backing file (`backing.qcow2`).
    BackingFile,
    /// A qcow2 whose data lives in an external file (`datafile.qcow2`, data in `datafile.raw`).
    DataFile,
    /// A LUKS-encrypted qcow2 (`luks.qcow2`).
    Encrypted,
    /// The first 50 bytes of a valid qcow2 (`truncated.qcow2`).
    Truncated,
    /// A valid qcow2 of 2 GiB, larger than a 1 GB volume (`huge.qcow2`).
    Huge,
}

impl Hostile {
    /// The file name `hostile_qcow2` gives it.
    pub fn file_name(self) -> &'static str {
        match self {
            Hostile::BackingFile => "backing.qcow2",
            Hostile::DataFile => "datafile.qcow2",
            Hostile::Encrypted => "luks.qcow2",
            Hostile::Truncated => "truncated.qcow2",
            Hostile::Huge => "huge.qcow2",
        }
    }
}

/// Makes the hostile image `kind` in the directory `images` (created if missing), with
/// `qemu-img create` (64 MiB of virtual size unless said otherwise); returns its path.
pub fn hostile_qcow2(images: &Path, kind: Hostile) -> PathBuf {
    std::fs::create_dir_all(images).unwrap();
    let path = images.join(kind.file_name());
    let p = path.to_str().unwrap();
    let create = |args: &[&str], size: &str| {
        qemu_img(&[&["create", "-q", "-f", "qcow2"], args, &[p, size]].concat());
    };
    match kind {
        Hostile::BackingFile => create(&["-b", "/etc/passwd", "-F", "raw"], "64M"),
        Hostile::DataFile => {
            let data = format!("data_file={}", images.join("datafile.raw").display());
            create(&["-o", &data], "64M");
        }
        Hostile::Encrypted => create(
            &[
                "--object",
                "secret,id=sec0,data=password123",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0",
            ],
            "64M",
        ),
        Hostile::Truncated => {
            create(&[], "64M");
            let valid = std::fs::read(&path).unwrap();
            std::fs::write(&path, &valid[..50]).unwrap();
        }
        Hostile::Huge => create(&[], "2G"),
    }
    path
}
