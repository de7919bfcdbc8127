//! A declared image with `golden = true` on the directory backend's reflink clone store (an
//! XFS file system with `reflink=1` on a loop device, mounted by the test: root only, skipped
//! loudly otherwise): the golden file of each version exists by the time the name points at
//! it, and a volume by name is a reflink clone at once.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// An XFS file system with reflinks, on a loop device, mounted at `mount`; unmounted on drop.
struct Xfs {
    mount: PathBuf,
}

impl Xfs {
    /// `None` (with a loud message) when it cannot be made here (not root, no mkfs.xfs, no
    /// loop mounts).
    fn make(dir: &Path) -> Option<Xfs> {
        let image = dir.join("xfs.img");
        let mount = dir.join("xfs");
        std::fs::create_dir_all(&mount).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1536 << 20)
            .unwrap();
        let steps: [(&str, Vec<String>); 2] = [
            (
                "mkfs.xfs",
                vec![
                    "-q".into(),
                    "-m".into(),
                    "reflink=1".into(),
                    image.display().to_string(),
                ],
            ),
            (
                "mount",
                vec![
                    "-o".into(),
                    "loop".into(),
                    image.display().to_string(),
                    mount.display().to_string(),
                ],
            ),
        ];
        for (tool, args) in steps {
            let ok = Command::new(tool)
                .args(&args)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                eprintln!(
                    "\n!!!!!!!! SKIPPED: `{tool}` failed or is missing (root and loop mounts are \
                     needed); the golden prebuild check did NOT run. !!!!!!!!\n"
                );
                return None;
            }
        }
        Some(Xfs { mount })
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

async fn image(c: &reqwest::Client, d: &Daemon, name: &str) -> Value {
    let (_, v) = get(c, &d.url("/api/v1/images")).await;
    v["images"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until the declared image's digest is not `old` (and it is cached); its new digest.
async fn switched(c: &reqwest::Client, d: &Daemon, name: &str, old: &Value) -> String {
    let deadline = Instant::now() + MINUTE;
    loop {
        let i = image(c, d, name).await;
        if i["cached"] == true && i["digest"] != *old {
            return i["digest"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "{i}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn golden_copy_is_built_before_the_name_points_at_a_version() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Some(xfs) = Xfs::make(dir) else {
        return;
    };
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let served = images.join("g.qcow2");
    make_qcow2(&served, "16M");
    let mut decl = toml::Table::new();
    decl.insert("name".into(), "g".into());
    decl.insert("url".into(), file_url(&served).into());
    decl.insert("refresh".into(), "1s".into());
    decl.insert("golden".into(), true.into());
    let config = TestConfig::new(dir)
        .set(
            "volumes.directory.path",
            xfs.mount.join("volumes").display().to_string(),
        )
        .set("cache.declared_fetch_window", "0s")
        .set("images", toml::Value::Array(vec![toml::Value::Table(decl)]));
    let d = Daemon::start(dir, &config);
    let c = client();
    let golden = |key: &str| xfs.mount.join(format!("volumes/.lvp-golden/{key}.img"));

    let first = switched(&c, &d, "g", &Value::Null).await;
    let key = key_of(&c, &d, &first).await;
    assert!(
        golden(&key).exists(),
        "golden file of the first version\n{}",
        d.log()
    );
    let id = submit(
        &c,
        &d,
        json!({"image": "g", "volume_name": "from-golden", "volume_size_gb": 1}),
    )
    .await;
    let job = wait_job(&c, &d, &id, MINUTE).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["method"], "reflink", "{job}");
    assert_eq!(job["image_digest"], first.as_str());

    // A new version: its golden file is there when the name moves.
    let next = images.join("g.next.qcow2");
    make_dense_qcow2(&next, 1 << 20, 16 << 20, 9);
    std::fs::rename(&next, &served).unwrap();
    let second = switched(&c, &d, "g", &json!(first)).await;
    let key2 = key_of(&c, &d, &second).await;
    assert!(
        golden(&key2).exists(),
        "golden file of the new version\n{}",
        d.log()
    );
    drop(d);
}
