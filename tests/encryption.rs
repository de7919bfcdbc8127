//! Encrypted volumes on the host (directory backend, libvirt off: keys in
//! `volumes.encryption.key_dir`), with the real binary and the real qemu-img: the image reads
//! back through QEMU's LUKS driver and its plaintext is nowhere in the volume's bytes; the
//! passphrase is in no argument list or environment sampled while the job runs, and in no file
//! outside the key directory; delete is a crypto-erase, finished at start-up when a crash cut
//! it short at any step; grow; an encrypted clone of a plain volume; and the refusals.
//! The libvirt side (private secrets, a domain that opens the volume) is tests/libvirt_vm.rs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

/// A 64 MiB qcow2 holding `MARKER` (and random data) at a few offsets; returns its path.
fn marked_image(dir: &Path) -> PathBuf {
    marked_qcow2(dir, 64 * MIB)
}

fn config(dir: &Path) -> TestConfig {
    TestConfig::new(dir).set(
        "volumes.encryption.key_dir",
        dir.join("keys").display().to_string(),
    )
}

#[tokio::test]
async fn an_encrypted_volume_holds_the_image_its_key_stays_private_and_delete_erases_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = marked_image(dir);
    let d = Daemon::start(dir, &config(dir));
    let c = client();

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_processes(stop.clone());
    let id = submit(
        &c,
        &d,
        json!({"image_url": file_url(&image), "volume_name": "enc-1", "volume_size_gb": 1,
               "encryption": {"format": "luks"}}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    stop.store(true, Ordering::Relaxed);
    let seen = sampler.join().unwrap();
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["method"], "copy", "{job}");
    assert_eq!(job["encryption"]["format"], "luks", "{job}");
    assert!(job["encryption"].get("secret_uuid").is_none(), "{job}");
    let key_file = PathBuf::from(job["encryption"]["key_file"].as_str().unwrap());
    assert_eq!(key_file, dir.join("keys/enc-1.key"));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_file), 0o600);
    assert_eq!(mode(&dir.join("keys")), 0o700);
    let passphrase = std::fs::read(&key_file).unwrap();
    assert!(passphrase.len() >= 64, "{} bytes", passphrase.len());

    // The image reads back through the LUKS driver; the volume's bytes hold no plaintext.
    let volume = dir.join("volumes/enc-1");
    let (same, out) = compare_through_luks(&image, &volume, &key_file, 64 << 20);
    assert!(same, "{out}");
    assert!(luks_virtual_size(&volume, &key_file).unwrap() >= 1 << 30);
    let raw = std::fs::read(&volume).unwrap();
    assert!(!contains(&raw, MARKER), "plaintext in the volume's bytes");
    assert!(contains(&std::fs::read(&image).unwrap(), MARKER));
    drop(raw);

    // The passphrase was in no command line or environment, and is in no file outside the
    // key directory (state, cache, volumes, the log).
    assert!(seen.len() > 10, "sampled {} distinct entries", seen.len());
    assert!(
        seen.iter().all(|s| !contains(s, &passphrase)),
        "passphrase in /proc"
    );
    for file in files_below(dir, &dir.join("keys")) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !contains(&bytes, &passphrase),
            "passphrase in {}",
            file.display()
        );
    }
    assert!(
        !contains(d.log().as_bytes(), &passphrase),
        "passphrase in the log"
    );

    // Delete is a crypto-erase: the volume and its key are gone at once.
    let (status, body) = delete(&c, &d.url("/api/v1/volumes/enc-1")).await;
    assert_eq!(
        (status, &body["status"]),
        (200, &"deleted".into()),
        "{body}"
    );
    assert!(!volume.exists());
    assert!(!key_file.exists());
    assert!(!dir.join("keys/enc-1.json").exists());
    let left: Vec<_> = std::fs::read_dir(dir.join("keys/.erasing"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The erase record of `name` as a crash after its first step leaves it.
fn erasing_record(dir: &Path, name: &str, volume_removed: bool) {
    let record = json!({
        "record": {"format": "luks", "key_file": dir.join(format!("keys/{name}.key"))},
        "volume_removed": volume_removed,
    });
    std::fs::write(
        dir.join(format!("keys/.erasing/{name}.json")),
        record.to_string(),
    )
    .unwrap();
}

#[tokio::test]
async fn a_crypto_erase_cut_short_at_any_step_is_finished_at_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = marked_image(dir);
    let config = config(dir);
    let d = Daemon::start(dir, &config);
    let c = client();
    for name in ["e-1", "e-2", "e-3"] {
        let id = submit(
            &c,
            &d,
            json!({"image_url": file_url(&image), "volume_name": name, "volume_size_gb": 1,
                   "encryption": {"format": "luks"}}),
        )
        .await;
        let job = wait_job(&c, &d, &id, MINUTE).await;
        assert_eq!(job["status"], "completed", "{job}");
    }
    d.kill9();
    // e-1: killed right after the intent was recorded (the record moved, nothing else done);
    // e-2: after its header was zeroed (the volume still there); e-3: after the volume was
    // removed (only the key left to forget); and a new plain volume made under e-3's name since,
    // which must stay as it is.
    for name in ["e-1", "e-2", "e-3"] {
        std::fs::remove_file(dir.join(format!("keys/{name}.json"))).unwrap();
        erasing_record(dir, name, name == "e-3");
    }
    let e2 = dir.join("volumes/e-2");
    let f = std::fs::OpenOptions::new().write(true).open(&e2).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; 16 * MIB], 0).unwrap();
    drop(f);
    std::fs::remove_file(dir.join("volumes/e-3")).unwrap();
    std::fs::write(dir.join("volumes/e-3"), vec![0x5au8; MIB]).unwrap();

    let d = Daemon::start(dir, &config);
    let erasing = || {
        std::fs::read_dir(dir.join("keys/.erasing"))
            .unwrap()
            .count()
    };
    let deadline = std::time::Instant::now() + MINUTE;
    while erasing() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(erasing(), 0, "{}", d.log());
    for name in ["e-1", "e-2"] {
        assert!(!dir.join(format!("volumes/{name}")).exists(), "{name}");
    }
    for name in ["e-1", "e-2", "e-3"] {
        assert!(!dir.join(format!("keys/{name}.key")).exists(), "{name}");
    }
    assert_eq!(
        std::fs::read(dir.join("volumes/e-3")).unwrap(),
        vec![0x5au8; MIB],
        "the new volume under the name is untouched"
    );
    assert!(d.log().contains("interrupted crypto-erase finished"));
}

#[tokio::test]
async fn encrypted_volumes_grow_clone_from_plain_and_refuse_what_they_cannot_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = marked_image(dir);
    let d = Daemon::start(dir, &config(dir));
    let c = client();
    let luks = json!({"format": "luks"});
    let provision = |name: &str, extra: Value| {
        let mut body = json!({"image_url": file_url(&image), "volume_name": name,
                              "volume_size_gb": 1});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let id = submit(&c, &d, provision("enc", json!({"encryption": luks}))).await;
    assert_eq!(wait_job(&c, &d, &id, MINUTE).await["status"], "completed");
    let key_file = dir.join("keys/enc.key");
    let volume = dir.join("volumes/enc");

    // Grow: the payload follows; the same size changes nothing; smaller is refused.
    let resize = |gb: u64| {
        let (c, url) = (c.clone(), d.url("/api/v1/volumes/enc/resize"));
        async move { post(&c, &url, &json!({"size_gb": gb})).await }
    };
    let (status, body) = resize(1).await;
    assert_eq!(
        (status, &body["size_bytes"]),
        (200, &json!(1u64 << 30)),
        "{body}"
    );
    let (status, body) = resize(2).await;
    assert_eq!(
        (status, &body["size_bytes"]),
        (200, &json!(2u64 << 30)),
        "{body}"
    );
    assert!(luks_virtual_size(&volume, &key_file).unwrap() >= 2 << 30);
    let (same, out) = compare_through_luks(&image, &volume, &key_file, 64 << 20);
    assert!(same, "{out}");
    let (status, body) = resize(1).await;
    assert_eq!(
        (status, &body["reason"]),
        (409, &"shrink_refused".into()),
        "{body}"
    );

    // An encrypted clone of a plain volume.
    let id = submit(&c, &d, provision("plain", json!({}))).await;
    assert_eq!(wait_job(&c, &d, &id, MINUTE).await["status"], "completed");
    let url = d.url("/api/v1/volumes/plain/clone");
    let (status, body) = post(
        &c,
        &url,
        &json!({"target": "plain-enc", "encryption": luks}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let job = wait_job(&c, &d, body["job_id"].as_str().unwrap(), MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["method"], "copy", "{job}");
    let clone_key = PathBuf::from(job["encryption"]["key_file"].as_str().unwrap());
    let cloned = dir.join("volumes/plain-enc");
    let (same, out) = compare_through_luks(&image, &cloned, &clone_key, 64 << 20);
    assert!(same, "{out}");
    assert!(!contains(&std::fs::read(&cloned).unwrap(), MARKER));

    // The CLI: --encrypt, and where the key is in its text and JSON output.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(args)
            .env("LVP_SERVER_URL", &d.base)
            .env_remove("LVP_TOKEN")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let url = file_url(&image);
    let out = cli(&[
        "provision",
        "--image-url",
        &url,
        "--volume",
        "cli-enc",
        "--size-gb",
        "1",
        "--encrypt",
        "--wait",
    ]);
    let want = format!(
        "encrypted (LUKS), key in {}",
        dir.join("keys/cli-enc.key").display()
    );
    assert!(out.lines().last().unwrap_or("").contains(&want), "{out}");
    let out = cli(&[
        "--output",
        "json",
        "volume",
        "clone",
        "plain",
        "--target",
        "cli-enc2",
        "--encrypt",
        "--wait",
    ]);
    let last: Value = serde_json::from_str(out.lines().last().unwrap_or("")).unwrap();
    assert_eq!(last["encryption"]["format"], "luks", "{out}");

    // Refusals, each with its reason and nothing made.
    let refused = |(status, body): (u16, Value)| {
        assert_eq!(
            (status, &body["reason"]),
            (409, &"encryption_refused".into()),
            "{body}"
        );
    };
    let jobs = d.url("/api/v1/jobs");
    let secret = json!({"encryption": {"format": "luks",
                                        "secret_uuid": "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f"}});
    refused(post(&c, &jobs, &provision("s", secret)).await);
    refused(post(&c, &jobs, &provision("enc", json!({"encryption": luks}))).await);
    refused(post(&c, &jobs, &provision("plain", json!({"encryption": luks}))).await);
    refused(post(&c, &jobs, &provision("enc", json!({}))).await);
    let url = d.url("/api/v1/volumes/enc/clone");
    refused(post(&c, &url, &json!({"target": "enc-copy"})).await);
    for bad in [
        json!({"format": "aes"}),
        json!({}),
        json!({"format": "luks", "secret_uuid": "x"}),
    ] {
        let (status, body) = post(&c, &jobs, &provision("b", json!({"encryption": bad}))).await;
        assert_eq!(status, 400, "{body}");
    }
    // An image that is not qcow2 or raw: the job fails before anything is made.
    let vmdk = dir.join("images/disk.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "16M"]);
    let body = json!({"image_url": file_url(&vmdk), "image_type": "vmdk", "volume_name": "v",
                      "volume_size_gb": 1, "encryption": luks});
    let id = submit(&c, &d, body).await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(
        (&job["status"], &job["reason"]),
        (&json!("failed"), &json!("encryption_refused")),
        "{job}"
    );
    assert!(!dir.join("volumes/v").exists());
    assert!(!dir.join("keys/v.key").exists() && !dir.join("keys/v.json").exists());
}
