//! Compressed sources against real servers: every wrapper (gzip, xz, bzip2, zstd, made by the
//! real tools) around every accepted format (qcow2, raw, VMDK, VHDX, VHD, VDI) provisions the bytes `qemu-img convert` makes of the
//! decompressed original, from nginx in ranged parts and from s3s-fs; a checksum names the
//! file as downloaded; a decompression bomb, a truncated xz and a corrupt gzip trailer fail
//! with a reason and leave nothing in the cache.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// File suffix, tool and arguments of each wrapper (xz in blocks, as `xz -T` makes them).
const WRAPPERS: [(&str, &str, &[&str]); 4] = [
    ("gz", "gzip", &["-c", "-1"]),
    ("xz", "xz", &["-c", "-1", "-T2", "--block-size=2MiB"]),
    ("bz2", "bzip2", &["-c", "-1"]),
    ("zst", "zstd", &["-c", "-q"]),
];

/// `tool args < src > dst`.
fn compress(tool: &str, args: &[&str], src: &Path, dst: &Path) {
    let status = Command::new(tool)
        .args(args)
        .stdin(std::fs::File::open(src).unwrap())
        .stdout(std::fs::File::create(dst).unwrap())
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(status.success(), "{tool} {args:?}");
}

/// The originals, one per accepted format (a qcow2 and a raw image, both mostly
/// incompressible so that their wrapped files span several 1 MiB parts, and the raw one
/// converted by qemu-img into a streamOptimized VMDK, a VHDX, a VHD and a VDI), and the raw
/// bytes qemu-img makes of each.
fn originals(dir: &Path) -> Vec<(&'static str, PathBuf, PathBuf)> {
    let qcow2 = dir.join("orig.qcow2");
    make_dense_qcow2(&qcow2, (5 * MIB) as usize, 64 * MIB, 41);
    let raw = dir.join("orig.raw");
    let mut bytes = random_bytes((5 * MIB) as usize, 42);
    bytes.resize((7 * MIB) as usize, 0);
    std::fs::write(&raw, bytes).unwrap();
    let mut images = vec![("qcow2", qcow2), ("raw", raw.clone())];
    for (format, options) in [
        ("vmdk", "subformat=streamOptimized"),
        ("vhdx", "subformat=dynamic"),
        ("vpc", "subformat=dynamic"),
        ("vdi", "static=off"),
    ] {
        let image = dir.join(format!("orig.{format}"));
        let (from, to) = (raw.to_str().unwrap(), image.to_str().unwrap());
        qemu_img(&[
            "convert", "-q", "-f", "raw", "-O", format, "-o", options, from, to,
        ]);
        images.push((format, image));
    }
    images
        .into_iter()
        .map(|(format, image)| {
            let reference = dir.join(format!("orig.{format}.ref"));
            reference_raw(&image, format, &reference);
            (format, image, reference)
        })
        .collect()
}

/// A daemon whose downloads go in parts of 1 MiB, 4 at once, from `s3` and nginx on `port`.
fn daemon(dir: &Path, s3: &S3Server, port: u16, extra: &[(&str, i64)]) -> Daemon {
    let mut config = s3
        .configure(TestConfig::new(dir))
        .set(
            "sources.allowed_hosts",
            toml::Value::Array(vec![format!("127.0.0.1:{port}").into()]),
        )
        .set("sources.part_size", MIB as i64)
        .set("sources.parallel_parts", 4)
        .set("jobs.queue_capacity", 64);
    for (key, value) in extra {
        config = config.set(key, *value);
    }
    Daemon::start(dir, &config)
}

fn nginx(dir: &Path) -> Nginx {
    std::fs::create_dir_all(dir.join("www")).unwrap();
    Nginx::start(
        &dir.join("nginx"),
        &format!(
            "server {{ listen 127.0.0.1:{{port}}; root {}; }}",
            dir.join("www").display()
        ),
    )
}

#[tokio::test]
async fn every_wrapper_around_every_format_provisions_the_right_bytes_from_nginx_and_s3() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s3 = S3Server::start(&dir.join("s3"));
    let web = nginx(dir);
    let mut cases = Vec::new();
    for (format, image, reference) in originals(dir) {
        for (suffix, tool, args) in WRAPPERS {
            let name = format!("disk.{format}.{suffix}");
            let packed = dir.join("www").join(&name);
            compress(tool, args, &image, &packed);
            // Several parts each, so that parts arrive out of order.
            assert!(
                std::fs::metadata(&packed).unwrap().len() > 4 * MIB,
                "{name}"
            );
            s3.put_file("vm-images", &name, &packed);
            cases.push((format, name, packed, reference.clone()));
        }
    }
    // The published checksum of a compressed file names the file as downloaded.
    let (_, sum_name, sum_file, _) = &cases[1];
    let compressed_sum = sha256_hex(&std::fs::read(sum_file).unwrap());
    std::fs::write(
        dir.join("www").join(format!("{sum_name}.sha256")),
        format!("{compressed_sum}  {sum_name}\n"),
    )
    .unwrap();
    let d = daemon(dir, &s3, web.port, &[]);
    let c = client();
    let mut jobs = Vec::new();
    for (i, (format, name, _, reference)) in cases.iter().enumerate() {
        for (source, url) in [
            ("web", web.url(&format!("/{name}"))),
            ("s3", format!("{}/vm-images/{name}", s3.endpoint())),
        ] {
            let volume = format!("v{i}-{source}");
            let body = json!({"image_url": url, "volume_name": volume, "volume_size_gb": 1,
                              "image_type": format});
            jobs.push((submit(&c, &d, body).await, volume, url, reference));
        }
    }
    for (id, volume, url, reference) in &jobs {
        let job = wait_job(&c, &d, id, 5 * MINUTE).await;
        assert_eq!(job["status"], "completed", "{url}: {job}\n{}", d.log());
        assert_volume_matches(&dir.join("volumes").join(volume), reference);
    }
    // Ranged parts from nginx: 206 answers, more than one per object.
    let gets = web.gets(web.port, &format!("/{}", cases[0].1));
    assert!(
        gets.len() > 4 && gets.iter().all(|l| l.contains(" 206 ")),
        "{gets:?}"
    );
    let entry = cache_entry(&c, &d, &web.url(&format!("/{sum_name}"))).await;
    assert_eq!(entry["checksum"], compressed_sum, "{entry}");
    assert_eq!(entry["checksum_verified"], true, "{entry}");
    assert_eq!(entry["compression"], "xz", "{entry}");
    // The cache holds the decompressed image, nothing of the downloads besides.
    let original = std::fs::read(dir.join(format!("orig.{}", cases[1].0))).unwrap();
    assert_eq!(entry["content_sha256"], sha256_hex(&original), "{entry}");
    assert!(std::fs::read(entry["path"].as_str().unwrap()).unwrap() == original);
    let debris: Vec<String> = cache_files(dir)
        .into_iter()
        .filter(|n| !n.ends_with(".img"))
        .collect();
    assert!(debris.is_empty(), "{debris:?}");
}

/// Fails a prefetch of `name` (served by nginx), checks its error, and that nothing of it
/// stayed in the cache.
async fn refused(c: &reqwest::Client, d: &Daemon, web: &Nginx, dir: &Path, name: &str, says: &str) {
    let url = web.url(&format!("/{name}"));
    let id = fetch_to_cache(c, d, &url, Some("raw")).await;
    let job = wait_job(c, d, &id, MINUTE).await;
    assert_eq!(job["status"], "failed", "{name}: {job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains(says), "{name}: {error}");
    assert_eq!(job["reason"], "image_rejected", "{name}: {job}");
    let left = cache_files(dir);
    assert!(left.is_empty(), "{name} left {left:?}");
}

#[tokio::test]
async fn a_bomb_a_truncated_xz_and_a_corrupt_gzip_trailer_fail_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s3 = S3Server::start(&dir.join("s3"));
    let web = nginx(dir);
    let www = dir.join("www");
    // 512 MiB of zeros in about 80 KiB of xz; the cache takes images of 64 MiB at most.
    let zeros = dir.join("zeros.raw");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(512 * MIB)
        .unwrap();
    compress("xz", &["-c", "-T2"], &zeros, &www.join("bomb.raw.xz"));
    compress(
        "zstd",
        &["-c", "-q", "-19"],
        &zeros,
        &www.join("bomb.raw.zst"),
    );
    let image = dir.join("image.raw");
    std::fs::write(&image, random_bytes((6 * MIB) as usize, 43)).unwrap();
    let xz = dir.join("image.raw.xz");
    compress("xz", &["-c", "-1", "-T2", "--block-size=1MiB"], &image, &xz);
    let bytes = std::fs::read(&xz).unwrap();
    std::fs::write(www.join("cut.raw.xz"), &bytes[..bytes.len() * 7 / 10]).unwrap();
    let gz = dir.join("image.raw.gz");
    compress("gzip", &["-c", "-1"], &image, &gz);
    let mut bytes = std::fs::read(&gz).unwrap();
    let crc = bytes.len() - 8;
    bytes[crc] ^= 0x55;
    std::fs::write(www.join("trailer.raw.gz"), &bytes).unwrap();
    let d = daemon(
        dir,
        &s3,
        web.port,
        &[("cache.max_image_bytes", (64 * MIB) as i64)],
    );
    let c = client();
    let bound = "decompresses to more than 67108864 bytes";
    refused(&c, &d, &web, dir, "bomb.raw.xz", bound).await;
    refused(&c, &d, &web, dir, "bomb.raw.zst", bound).await;
    refused(
        &c,
        &d,
        &web,
        dir,
        "cut.raw.xz",
        "xz stream is corrupt or truncated",
    )
    .await;
    refused(
        &c,
        &d,
        &web,
        dir,
        "trailer.raw.gz",
        "gzip stream is corrupt",
    )
    .await;
    // The same bytes uncompressed are fine: the refusals were the wrappers'.
    std::fs::copy(&image, www.join("image.raw")).unwrap();
    let id = fetch_to_cache(&c, &d, &web.url("/image.raw"), Some("raw")).await;
    assert_eq!(wait_job(&c, &d, &id, MINUTE).await["status"], "completed");
}
