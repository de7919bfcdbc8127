//! Which running domains use a volume: the disks `virsh domstats --block --backing` reports,
//! matched against the volume by what the path resolves to (a block device's number, a file's
//! device and inode), so `/dev/vg/lv`, `/dev/mapper/vg-lv` and `/dev/dm-3` are one volume, and
//! a file reached through another mount or a hard link is still the same file.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// One disk, or one file of a disk's backing chain, of a running domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DomainDisk {
    pub(crate) domain: String,
    /// The host path as libvirt has it (`block.<n>.path`).
    pub(crate) path: String,
    /// The disk itself, not a file of its backing chain (the first entry of its target name).
    pub(crate) top: bool,
}

/// The disks of a `virsh domstats --block --backing` report: a `Domain: '<name>'` line per
/// domain, then `  block.<n>.path=<path>` per disk and backing file (disks without a path, such
/// as an empty CD-ROM drive, have none).
pub(crate) fn parse_domstats(text: &str) -> Vec<DomainDisk> {
    let mut disks = Vec::new();
    let mut domain = None;
    // Per domain: the index of the first entry of each target name (`block.<n>.name`, which
    // comes before `.path`), and the name of each index.
    let mut first_of_name = std::collections::HashMap::<String, String>::new();
    let mut name_of = std::collections::HashMap::<String, String>::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Domain: ") {
            domain = Some(unquote(rest).to_string());
            first_of_name.clear();
            name_of.clear();
            continue;
        }
        let Some((key, value)) = line.trim_start().split_once('=') else {
            continue;
        };
        let Some((n, field)) = key.strip_prefix("block.").and_then(|k| k.split_once('.')) else {
            continue;
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        match (field, &domain) {
            ("name", _) => {
                first_of_name
                    .entry(value.to_string())
                    .or_insert_with(|| n.to_string());
                name_of.insert(n.to_string(), value.to_string());
            }
            ("path", Some(domain)) => disks.push(DomainDisk {
                domain: domain.clone(),
                path: value.to_string(),
                top: name_of
                    .get(n)
                    .is_none_or(|name| first_of_name.get(name).map(String::as_str) == Some(n)),
            }),
            _ => {}
        }
    }
    disks
}

/// `'name'` without its quotes (virsh quotes the name as it is, quotes inside included).
fn unquote(s: &str) -> &str {
    s.strip_prefix('\'')
        .and_then(|s| s.strip_suffix('\''))
        .unwrap_or(s)
}

/// What a path resolves to, for comparing two paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageId {
    /// A block device: its device number.
    Block(u64),
    /// Anything else: the file system's device and the inode.
    File { dev: u64, ino: u64 },
}

/// The storage behind `path` (symbolic links followed); `None` when it cannot be read.
fn storage_id(path: &Path) -> Option<StorageId> {
    let meta = std::fs::metadata(path).ok()?;
    Some(if meta.file_type().is_block_device() {
        StorageId::Block(meta.rdev())
    } else {
        StorageId::File {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    })
}

/// The domains (sorted, each once) with a disk or backing file on `volume`. A path that cannot
/// be resolved (gone, or on the other side of a permission) is compared as text.
pub(crate) fn domains_using(volume: &Path, disks: &[DomainDisk]) -> Vec<String> {
    let want = storage_id(volume);
    let mut domains: Vec<String> = disks
        .iter()
        .filter(|disk| {
            let path = Path::new(&disk.path);
            match (want, storage_id(path)) {
                (Some(a), Some(b)) => a == b,
                _ => path == volume,
            }
        })
        .map(|disk| disk.domain.clone())
        .collect();
    domains.sort();
    domains.dedup();
    domains
}

/// The disks (not backing files) of running domains that are `volume`.
pub(crate) fn top_disks_on(volume: &Path, disks: &[DomainDisk]) -> Vec<DomainDisk> {
    let want = storage_id(volume);
    disks
        .iter()
        .filter(|disk| disk.top)
        .filter(|disk| {
            let path = Path::new(&disk.path);
            match (want, storage_id(path)) {
                (Some(a), Some(b)) => a == b,
                _ => path == volume,
            }
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/libvirt")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn disk(domain: &str, path: &str) -> DomainDisk {
        DomainDisk {
            domain: domain.into(),
            path: path.into(),
            top: true,
        }
    }

    #[test]
    fn parses_recorded_domstats() {
        // Recorded by tests/vm/capture-libvirt-fixtures.sh: a qcow2 overlay and its backing
        // file, a file with an empty CD-ROM drive (in a domain whose name has a space), an LV.
        let disks = parse_domstats(&fixture("domstats.txt"));
        assert_eq!(
            disks,
            vec![
                disk("overlaydom", "/tmp/fix/overlay.qcow2"),
                DomainDisk {
                    top: false,
                    ..disk("overlaydom", "/tmp/fix/base.raw")
                },
                disk("file dom", "/tmp/fix/file1"),
                disk("lvdom", "/dev/vgfix/disk1"),
            ]
        );
        assert!(parse_domstats("").is_empty(), "no running domain");
    }

    #[test]
    fn only_numbered_path_keys_count() {
        let text = "Domain: 'a'\n  block.count=2\n  block.0.path=/x\n  block.name.path=/y\n  \
                    block.1.pathx=/z\n  net.0.path=/w\nDomain: 'it''s'\n  block.0.path=/v w\n";
        assert_eq!(
            parse_domstats(text),
            vec![disk("a", "/x"), disk("it''s", "/v w")]
        );
        assert!(
            parse_domstats("  block.0.path=/x\n").is_empty(),
            "no domain line"
        );
    }

    #[test]
    fn matches_the_same_file_by_identity() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("vol");
        std::fs::write(&volume, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&volume, &link).unwrap();
        let hard = dir.path().join("hard");
        std::fs::hard_link(&volume, &hard).unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, b"y").unwrap();
        let path = |p: &Path| p.display().to_string();
        let disks = [
            disk("b-symlink", &path(&link)),
            disk("a-hardlink", &path(&hard)),
            disk("a-hardlink", &path(&volume)),
            disk("other", &path(&other)),
            disk("gone", "/nonexistent/vol"),
        ];
        assert_eq!(domains_using(&volume, &disks), ["a-hardlink", "b-symlink"]);
        // A volume that cannot be resolved (an inactive LV has no node) is compared as text.
        let missing = dir.path().join("missing");
        let disks = [disk("m", &path(&missing)), disk("other", &path(&other))];
        assert_eq!(domains_using(&missing, &disks), ["m"]);
    }
}
