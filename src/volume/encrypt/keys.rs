//! The key directory (`volumes.encryption.key_dir`, 0700, files 0600): one record per encrypted
//! volume (`<volume>.json`: where its key is), the passphrase itself (`<volume>.key`) when no
//! libvirt holds it, and the crypto-erases under way (`.erasing/<volume>.json`). Every write is
//! a new file renamed into place and flushed with its directory: a crash leaves the old record
//! or the new one, never half of one.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
#[cfg(test)]
use zeroize::Zeroizing;

use super::KeyRecord;
use crate::volume::error::VolumeError;

/// Where crypto-erases under way are recorded, inside the key directory.
const ERASING: &str = ".erasing";

/// A crypto-erase under way: the volume's record, and whether the volume is gone already (then
/// a restart must not touch a volume made under the name since).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Erasing {
    pub(crate) record: KeyRecord,
    /// The header was destroyed and the volume removed; only the key is left to forget.
    #[serde(default)]
    pub(crate) volume_removed: bool,
}

/// The key directory.
#[derive(Debug)]
pub(crate) struct KeyDir {
    /// `volumes.encryption.key_dir` (resolved).
    dir: PathBuf,
}

impl KeyDir {
    /// Opens (and makes, 0700) the directory and its `.erasing` folder; a directory others may
    /// read is tightened to 0700.
    pub(crate) fn open(dir: &Path) -> Result<KeyDir, VolumeError> {
        for d in [dir.to_path_buf(), dir.join(ERASING)] {
            std::fs::create_dir_all(&d).map_err(|e| VolumeError::io(&d, e))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| VolumeError::io(&d, e))?;
        }
        Ok(KeyDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The file holding a volume's passphrase (when the key directory holds it).
    pub(crate) fn key_path(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("{volume}.key"))
    }

    fn record_path(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("{volume}.json"))
    }

    fn erasing_path(&self, volume: &str) -> PathBuf {
        self.dir.join(ERASING).join(format!("{volume}.json"))
    }

    /// The volume's record, if it is encrypted.
    pub(crate) fn record(&self, volume: &str) -> Result<Option<KeyRecord>, VolumeError> {
        read_json(&self.record_path(volume))
    }

    pub(crate) fn write_record(&self, volume: &str, record: &KeyRecord) -> Result<(), VolumeError> {
        let json = serde_json::to_vec(record).expect("a record serializes");
        self.write_atomically(&self.record_path(volume), &json)
    }

    /// Writes the passphrase file (0600) and returns its path.
    pub(crate) fn write_key(
        &self,
        volume: &str,
        passphrase: &[u8],
    ) -> Result<PathBuf, VolumeError> {
        let path = self.key_path(volume);
        self.write_atomically(&path, passphrase)?;
        Ok(path)
    }

    #[cfg(test)]
    pub(crate) fn read_key(&self, volume: &str) -> Result<Zeroizing<Vec<u8>>, VolumeError> {
        let path = self.key_path(volume);
        std::fs::read(&path)
            .map(Zeroizing::new)
            .map_err(|e| VolumeError::io(&path, e))
    }

    /// Removes the volume's passphrase file and record (absent is success).
    pub(crate) fn remove(&self, volume: &str) -> Result<(), VolumeError> {
        remove_file(&self.key_path(volume))?;
        remove_file(&self.record_path(volume))?;
        self.sync_dir(&self.dir)
    }

    /// Records that the volume's crypto-erase has begun: its record moves into `.erasing`
    /// (one rename: from now on the volume is never taken as encrypted and usable again).
    pub(crate) fn begin_erase(&self, volume: &str, record: &KeyRecord) -> Result<(), VolumeError> {
        let erasing = Erasing {
            record: record.clone(),
            volume_removed: false,
        };
        self.set_erasing(volume, &erasing)?;
        remove_file(&self.record_path(volume))?;
        self.sync_dir(&self.dir)
    }

    pub(crate) fn set_erasing(&self, volume: &str, erasing: &Erasing) -> Result<(), VolumeError> {
        let json = serde_json::to_vec(erasing).expect("a record serializes");
        self.write_atomically(&self.erasing_path(volume), &json)
    }

    /// The end of a crypto-erase: the passphrase file and the erase record go.
    pub(crate) fn end_erase(&self, volume: &str) -> Result<(), VolumeError> {
        remove_file(&self.key_path(volume))?;
        self.sync_dir(&self.dir)?;
        remove_file(&self.erasing_path(volume))?;
        self.sync_dir(&self.dir.join(ERASING))
    }

    pub(crate) fn erasing(&self, volume: &str) -> Result<Option<Erasing>, VolumeError> {
        read_json(&self.erasing_path(volume))
    }

    /// The volumes whose crypto-erase a crash (or a failure) cut short.
    pub(crate) fn unfinished_erases(&self) -> Result<Vec<(String, Erasing)>, VolumeError> {
        let dir = self.dir.join(ERASING);
        let entries = std::fs::read_dir(&dir).map_err(|e| VolumeError::io(&dir, e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(volume) = name.strip_suffix(".json") else {
                continue;
            };
            if let Some(erasing) = read_json(&entry.path())? {
                out.push((volume.to_string(), erasing));
            }
        }
        Ok(out)
    }

    /// Writes `bytes` to a new 0600 file beside `path`, flushes it, renames it over `path`
    /// and flushes the directory.
    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> Result<(), VolumeError> {
        let parent = path.parent().unwrap_or(&self.dir);
        let tmp = parent.join(format!(".tmp-{:016x}", rand::random::<u64>()));
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
                .open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(VolumeError::io(path, e));
        }
        self.sync_dir(parent)
    }

    fn sync_dir(&self, dir: &Path) -> Result<(), VolumeError> {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| VolumeError::io(dir, e))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, VolumeError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            VolumeError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VolumeError::io(path, e)),
    }
}

fn remove_file(path: &Path) -> Result<(), VolumeError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(VolumeError::io(path, e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::volume::encrypt::EncryptionFormat;

    #[test]
    fn records_keys_and_erases_live_in_private_files() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = KeyDir::open(&tmp.path().join("keys")).unwrap();
        let meta = std::fs::metadata(tmp.path().join("keys")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        assert_eq!(keys.record("v").unwrap(), None);
        let path = keys.write_key("v", b"pass").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let record = KeyRecord {
            format: EncryptionFormat::Luks,
            secret_uuid: None,
            key_file: Some(path.clone()),
            secret_owned: false,
        };
        keys.write_record("v", &record).unwrap();
        assert_eq!(keys.record("v").unwrap(), Some(record.clone()));
        assert_eq!(&*keys.read_key("v").unwrap(), b"pass");
        keys.begin_erase("v", &record).unwrap();
        assert_eq!(keys.record("v").unwrap(), None);
        let unfinished = keys.unfinished_erases().unwrap();
        assert_eq!(unfinished.len(), 1);
        assert_eq!(unfinished[0].0, "v");
        keys.end_erase("v").unwrap();
        assert!(!path.exists());
        assert!(keys.unfinished_erases().unwrap().is_empty());
        // Nothing is left behind: no temporary files.
        let left: Vec<_> = std::fs::read_dir(tmp.path().join("keys"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(".erasing")]);
    }
}
