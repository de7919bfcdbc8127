//! Checksum manifests and OpenPGP signatures against real servers (nginx, s3s-fs) and real
//! gpg: the entry for the image's file name in GNU, BSD and SHA-512 manifests, a missing entry,
//! a wrong digest (nothing cached); detached and clearsigned manifests checked against the
//! keyring of `[[sources.trust]]`, a bad signature, an unknown key, an expired key, and
//! `require_signature` with an unsigned source.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().to_path_buf();
    (t, p)
}

/// nginx serving `dir/www` on both its ports.
fn nginx(dir: &Path) -> Nginx {
    std::fs::create_dir_all(dir.join("www")).unwrap();
    let root = dir.join("www");
    Nginx::start(
        &dir.join("nginx"),
        &format!(
            "server {{ listen 127.0.0.1:{{port}}; root {r}; }}\n\
             server {{ listen 127.0.0.1:{{port2}}; root {r}; }}",
            r = root.display()
        ),
    )
}

/// Writes `www/<path>`.
fn put(dir: &Path, path: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let file = dir.join("www").join(path);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, bytes).unwrap();
    file
}

fn sha512_hex(bytes: &[u8]) -> String {
    let out = std::process::Command::new("sha512sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(bytes)?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()[..128].to_string()
}

/// A cache-fetch job with `extra` fields, run to its end.
async fn fetch(c: &reqwest::Client, d: &Daemon, url: &str, extra: Value) -> Value {
    let mut body = json!({"image_url": url, "image_type": "raw"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v) = post(c, &d.url("/api/v1/cache/fetch"), &body).await;
    assert_eq!(status, 202, "{url}: {v}");
    wait_job(c, d, v["job_id"].as_str().unwrap(), MINUTE).await
}

/// The job failed with `reason`, nothing of `url` is cached and no partial file is left.
async fn assert_refused(c: &reqwest::Client, d: &Daemon, job: &Value, url: &str, reason: &str) {
    assert_eq!(job["status"], "failed", "{url}: {job}\n{}", d.log());
    assert_eq!(job["reason"], reason, "{url}: {job}");
    let (_, list) = get(c, &d.url("/api/v1/cache/images?limit=1000")).await;
    assert!(
        !list["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["image_url"] == url),
        "{url} was cached: {list}"
    );
    assert!(
        partial_files(&d.dir).is_empty(),
        "{:?}",
        partial_files(&d.dir)
    );
}

#[tokio::test]
async fn manifests_name_the_digest_the_image_must_match() {
    let (_t, dir) = tmp();
    let web = nginx(&dir);
    let s3 = S3Server::start(&dir.join("s3"));
    let image = random_bytes(3 * MIB + 17, 41);
    let (sum, sum512) = (sha256_hex(&image), sha512_hex(&image));
    put(&dir, "rel/disk.raw", &image);
    // GNU format with the binary marker and neighbours, as Ubuntu publishes it.
    let other = "0".repeat(64);
    put(
        &dir,
        "rel/SHA256SUMS",
        format!("{other} *disk.raw.xz\n{sum} *disk.raw\n{other}  disk.qcow2\n"),
    );
    put(
        &dir,
        "rel/CHECKSUM",
        format!("# disk.raw: 3 MiB\nSHA256 (disk.raw) = {sum}\n"),
    );
    put(&dir, "rel/SHA512SUMS", format!("{sum512}  disk.raw\n"));
    put(&dir, "rel/OTHER", format!("{sum}  another.raw\n"));
    let wrong = random_bytes(MIB, 42);
    put(&dir, "rel/wrong.raw", &wrong);
    put(&dir, "rel/WRONG", format!("{sum}  wrong.raw\n"));
    s3.put("vm-images", "rel/disk.raw", &image);
    s3.put(
        "vm-images",
        "rel/SHA512SUMS",
        format!("{sum512} *disk.raw\n").as_bytes(),
    );
    let config = s3.configure(TestConfig::new(&dir)).set(
        "sources.allowed_hosts",
        toml::Value::Array(vec![format!("127.0.0.1:{}", web.port).into()]),
    );
    let d = Daemon::start(&dir, &config);
    let c = client();
    let url = web.url("/rel/disk.raw");

    // The right entry of a GNU manifest.
    let job = fetch(
        &c,
        &d,
        &url,
        json!({"checksum_url": web.url("/rel/SHA256SUMS")}),
    )
    .await;
    assert_eq!(job["status"], "completed", "{job}\n{}", d.log());
    assert_eq!(job["verified"]["digest"], format!("sha256:{sum}"), "{job}");
    assert_eq!(job["verified"]["manifest"], web.url("/rel/SHA256SUMS"));
    assert!(job["verified"].get("signed_by").is_none(), "{job}");
    // The BSD format names the same digest: the cached bytes serve, checked anew.
    let job = fetch(
        &c,
        &d,
        &url,
        json!({"checksum_url": web.url("/rel/CHECKSUM")}),
    )
    .await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["cache_hit"], true, "{job}");
    assert_eq!(
        job["verified"]["manifest"],
        web.url("/rel/CHECKSUM"),
        "{job}"
    );
    // SHA-512, from nginx and from s3s-fs.
    let job = fetch(
        &c,
        &d,
        &url,
        json!({"checksum_url": web.url("/rel/SHA512SUMS")}),
    )
    .await;
    assert_eq!(job["status"], "completed", "{job}\n{}", d.log());
    assert_eq!(
        job["verified"]["digest"],
        format!("sha512:{sum512}"),
        "{job}"
    );
    let s3_url = format!("{}/vm-images/rel/disk.raw", s3.endpoint());
    let job = fetch(
        &c,
        &d,
        &s3_url,
        json!({"checksum_url": "s3://vm-images/rel/SHA512SUMS"}),
    )
    .await;
    assert_eq!(job["status"], "completed", "{job}\n{}", d.log());
    assert_eq!(
        job["verified"]["digest"],
        format!("sha512:{sum512}"),
        "{job}"
    );
    // A digest given in the request.
    let job = fetch(
        &c,
        &d,
        &url,
        json!({"checksum": format!("SHA256:{}", sum.to_uppercase())}),
    )
    .await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["verified"]["digest"], format!("sha256:{sum}"), "{job}");

    // No entry for the file name: a clear reason, nothing downloaded.
    let job = fetch(&c, &d, &url, json!({"checksum_url": web.url("/rel/OTHER")})).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["reason"], "checksum_unavailable", "{job}");
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("no entry for `disk.raw`"),
        "{job}"
    );
    // A wrong digest (manifest or request): failed, nothing cached.
    let wrong_url = web.url("/rel/wrong.raw");
    let job = fetch(
        &c,
        &d,
        &wrong_url,
        json!({"checksum_url": web.url("/rel/WRONG")}),
    )
    .await;
    assert_refused(&c, &d, &job, &wrong_url, "checksum_mismatch").await;
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains(&format!("sha256:{}", sha256_hex(&wrong))),
        "{job}"
    );
    let job = fetch(
        &c,
        &d,
        &wrong_url,
        json!({"checksum": format!("sha512:{sum512}")}),
    )
    .await;
    assert_refused(&c, &d, &job, &wrong_url, "checksum_mismatch").await;
    // A manifest that is not there.
    let job = fetch(
        &c,
        &d,
        &wrong_url,
        json!({"checksum_url": web.url("/rel/NONE")}),
    )
    .await;
    assert_refused(&c, &d, &job, &wrong_url, "checksum_unavailable").await;

    // Refused before a job: both fields, a malformed digest, a manifest outside the allow-list.
    for (extra, needle) in [
        (
            json!({"checksum": format!("sha256:{sum}"), "checksum_url": web.url("/rel/SHA256SUMS")}),
            "not both",
        ),
        (json!({"checksum": "md5:00"}), "sha256 or sha512"),
        (
            json!({"checksum_url": "https://example.invalid/SHA256SUMS"}),
            "checksum_url",
        ),
    ] {
        let mut body = json!({"image_url": url});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = post(&c, &d.url("/api/v1/cache/fetch"), &body).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v["message"].as_str().unwrap().contains(needle), "{v}");
    }
}

/// The signing side of the test: a vendor key, a stranger's, one that expired in 2020.
struct Signers {
    gpg: Gpg,
    vendor: String,
}

const VENDOR: &str = "images@vendor.example";
const STRANGER: &str = "mallory@elsewhere.example";
const OLD: &str = "old@vendor.example";

impl Signers {
    fn new() -> Signers {
        let gpg = Gpg::new();
        let vendor = gpg.key(VENDOR, "1y", None);
        gpg.key(STRANGER, "1y", None);
        gpg.key(OLD, "1d", Some("20200101T000000"));
        Signers { gpg, vendor }
    }

    /// `www/<dir>/disk.raw` and a `SHA256SUMS` naming it, signed by `uid` as `how` (none:
    /// unsigned); the image URL's path.
    fn release(&self, www: &Path, dir: &str, uid: Option<&str>, how: &str, seed: u64) -> String {
        let image = random_bytes(MIB + seed as usize, seed);
        let sums = put(
            www,
            &format!("{dir}/SHA256SUMS"),
            format!("{}  disk.raw\n", sha256_hex(&image)),
        );
        put(www, &format!("{dir}/disk.raw"), &image);
        if let Some(uid) = uid {
            let faked = (uid == OLD).then_some("20200101T120000");
            self.gpg.sign(
                uid,
                how,
                &sums,
                &sums.with_file_name(format!("SHA256SUMS{}", suffix(how))),
                faked,
            );
        }
        format!("/{dir}/disk.raw")
    }
}

fn suffix(how: &str) -> &'static str {
    if how.contains("--armor") {
        ".asc"
    } else {
        ".gpg"
    }
}

#[tokio::test]
async fn signed_manifests_are_checked_against_the_keyring_of_the_host() {
    let (_t, dir) = tmp();
    let web = nginx(&dir);
    let s = Signers::new();
    let keyring = s.gpg.export(&[VENDOR, OLD], &dir.join("vendor.gpg"));
    let www = dir.clone();
    let good = s.release(&www, "good", Some(VENDOR), "--detach-sign", 1);
    let armored = s.release(&www, "armored", Some(VENDOR), "--armor --detach-sign", 2);
    let unknown = s.release(&www, "unknown", Some(STRANGER), "--detach-sign", 3);
    let expired = s.release(&www, "expired", Some(OLD), "--detach-sign", 4);
    let unsigned = s.release(&www, "unsigned", None, "", 5);
    let bad = s.release(&www, "bad", Some(VENDOR), "--detach-sign", 6);
    // Changed after signing: another digest for another image.
    let evil = random_bytes(MIB, 66);
    put(&www, "bad/evil.raw", &evil);
    std::fs::write(
        dir.join("www/bad/SHA256SUMS"),
        format!("{}  disk.raw\n", sha256_hex(&evil)),
    )
    .unwrap();
    // Fedora style: a clearsigned BSD manifest.
    let fedora = random_bytes(MIB + 7, 7);
    let checksum = put(
        &www,
        "fedora/CHECKSUM",
        format!("SHA256 (disk.raw) = {}\n", sha256_hex(&fedora)),
    );
    put(&www, "fedora/disk.raw", &fedora);
    s.gpg.sign(
        VENDOR,
        "--clearsign",
        &checksum,
        &dir.join("www/fedora/CHECKSUM.signed"),
        None,
    );
    std::fs::rename(dir.join("www/fedora/CHECKSUM.signed"), &checksum).unwrap();
    // An image with only an unsigned `.sha256` beside it.
    let side = random_bytes(MIB, 8);
    put(&www, "side/disk.raw", &side);
    put(&www, "side/disk.raw.sha256", sha256_hex(&side));

    let hosts = |p: u16| toml::Value::Array(vec![format!("127.0.0.1:{p}").into()]);
    let rule = |p: u16, required: bool| {
        let mut t = toml::Table::new();
        t.insert("hosts".into(), hosts(p));
        t.insert("keyring".into(), keyring.display().to_string().into());
        t.insert("require_signature".into(), required.into());
        toml::Value::Table(t)
    };
    let config = TestConfig::new(&dir)
        .set(
            "sources.allowed_hosts",
            toml::Value::Array(vec![
                format!("127.0.0.1:{}", web.port).into(),
                format!("127.0.0.1:{}", web.port2).into(),
            ]),
        )
        .set(
            "sources.trust",
            toml::Value::Array(vec![rule(web.port, true), rule(web.port2, false)]),
        );
    let d = Daemon::start(&dir, &config);
    let c = client();
    let sums =
        |path: &str, ext: &str| web.url(&path.replace("disk.raw", &format!("SHA256SUMS{ext}")));

    // Good signatures, binary and armored detached, and clearsigned.
    for path in [&good, &armored] {
        let job = fetch(
            &c,
            &d,
            &web.url(path),
            json!({"checksum_url": sums(path, "")}),
        )
        .await;
        assert_eq!(job["status"], "completed", "{path}: {job}\n{}", d.log());
        assert_eq!(job["verified"]["signed_by"], s.vendor, "{job}");
    }
    let job = fetch(
        &c,
        &d,
        &web.url("/fedora/disk.raw"),
        json!({"checksum_url": web.url("/fedora/CHECKSUM")}),
    )
    .await;
    assert_eq!(job["status"], "completed", "{job}\n{}", d.log());
    assert_eq!(job["verified"]["signed_by"], s.vendor, "{job}");
    assert_eq!(
        job["verified"]["digest"],
        format!("sha256:{}", sha256_hex(&fedora))
    );

    // A manifest changed after signing, a stranger's key, a key expired since 2020.
    for (path, needle) in [
        (&bad, "does not match"),
        (&unknown, "no key of keyring"),
        (&expired, "has expired"),
    ] {
        let url = web.url(path);
        let job = fetch(&c, &d, &url, json!({"checksum_url": sums(path, "")})).await;
        assert_refused(&c, &d, &job, &url, "signature_invalid").await;
        assert!(
            job["error"].as_str().unwrap().contains(needle),
            "{path}: {job}"
        );
        assert!(
            web.gets(web.port, path).is_empty(),
            "{path}: the image was downloaded"
        );
    }
    // require_signature: an unsigned manifest, an unsigned `.sha256`, a request's own checksum.
    for (path, extra) in [
        (&unsigned, json!({"checksum_url": sums(&unsigned, "")})),
        (&"/side/disk.raw".to_string(), json!({})),
    ] {
        let url = web.url(path);
        let job = fetch(&c, &d, &url, extra).await;
        assert_refused(&c, &d, &job, &url, "signature_required").await;
    }
    let body =
        json!({"image_url": web.url(&good), "checksum": format!("sha256:{}", "a".repeat(64))});
    let (status, v) = post(&c, &d.url("/api/v1/cache/fetch"), &body).await;
    assert_eq!(
        (status, v["reason"].as_str()),
        (400, Some("signature_required")),
        "{v}"
    );

    // The same files on the host whose rule does not require a signature: unsigned passes,
    // a signature that is there must still be valid.
    let other = |p: &str| format!("http://127.0.0.1:{}{p}", web.port2);
    let job = fetch(
        &c,
        &d,
        &other(&unsigned),
        json!({"checksum_url": other("/unsigned/SHA256SUMS")}),
    )
    .await;
    assert_eq!(job["status"], "completed", "{job}\n{}", d.log());
    assert!(job["verified"].get("signed_by").is_none(), "{job}");
    let job = fetch(
        &c,
        &d,
        &other(&unknown),
        json!({"checksum_url": other("/unknown/SHA256SUMS")}),
    )
    .await;
    assert_eq!(job["reason"], "signature_invalid", "{job}");
}
