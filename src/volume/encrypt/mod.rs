//! Encrypted volumes (LUKS through QEMU's own `luks` driver): what a request asks for
//! (`EncryptionSpec`), where a volume's key is (`KeyRecord`, in the key directory), making a
//! key for a new volume (a random passphrase in a private libvirt secret, or in a key file when
//! libvirt is off; or the caller's libvirt secret), the refusals before anything is made, and
//! delete as crypto-erase (header and key slots destroyed, then the volume, then the key; a
//! crash at any point is finished at start-up). The on-disk header is `luks.rs`, the key
//! directory `keys.rs`. Passphrases live in memory only as `Zeroizing` bytes and reach child
//! processes only through `SecretFd`.

mod keys;
pub(crate) mod luks;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::backend::VolumeBackend;
use super::error::VolumeError;
use super::libvirt::{Libvirt, SecretError};
use crate::command::SecretFd;
use keys::{Erasing, KeyDir};

/// Random bytes in a new passphrase (written as 64 hex digits).
const PASSPHRASE_BYTES: usize = 32;
/// The longest caller's secret value taken as a passphrase (cryptsetup's own limit is 512
/// bytes; a larger value is not a passphrase and is not held in memory or handed on).
const MAX_PASSPHRASE_BYTES: usize = 4096;

/// The encryption formats a request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum EncryptionFormat {
    /// LUKS1 as QEMU's `luks` driver writes and opens it (libvirt's `<encryption format='luks'>`).
    Luks,
}

/// What a request asks for (`"encryption"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EncryptionSpec {
    pub(crate) format: EncryptionFormat,
    /// An existing libvirt secret (usage `volume`, not private) whose value is the passphrase;
    /// `None`: the daemon makes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) secret_uuid: Option<String>,
}

/// Where an encrypted volume's key is: the job status's `"encryption"`, and the volume's record
/// in the key directory. Never the passphrase itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub(crate) struct KeyRecord {
    pub(crate) format: EncryptionFormat,
    /// The libvirt secret holding the passphrase (libvirt on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) secret_uuid: Option<String>,
    /// The file holding the passphrase (libvirt off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub(crate) key_file: Option<PathBuf>,
    /// The daemon defined the secret (it is undefined with the volume); false for a caller's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) secret_owned: bool,
}

/// A new volume's key: where it is recorded, and the passphrase (only in memory, wiped on drop,
/// never printed).
pub(crate) struct Key {
    pub(crate) record: KeyRecord,
    /// The passphrase's bytes, zeroed when dropped; reaches children only through `secret_fd`.
    passphrase: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// The passphrase as a child process reads it (`SecretFd::PATH`).
    pub(crate) fn secret_fd(&self) -> Result<SecretFd, VolumeError> {
        SecretFd::new(&self.passphrase).map_err(|e| VolumeError::io("memfd", e))
    }
}

/// The encrypted volumes of this daemon: their key directory, and libvirt when it holds keys.
#[derive(Debug)]
pub(crate) struct Encryption {
    /// The records (and, libvirt off, the passphrases) of encrypted volumes.
    keys: KeyDir,
    /// libvirt when it is on (`libvirt.pool` set): it holds the daemon's keys as secrets.
    libvirt: Option<Arc<Libvirt>>,
}

fn refused(message: impl Into<String>) -> VolumeError {
    VolumeError::EncryptionRefused(message.into())
}

fn secret_error(uuid: &str, e: SecretError) -> VolumeError {
    refused(format!("cannot use libvirt secret {uuid}: {e}"))
}

impl Encryption {
    pub(crate) fn new(
        key_dir: &Path,
        libvirt: Option<Arc<Libvirt>>,
    ) -> Result<Encryption, VolumeError> {
        Ok(Encryption {
            keys: KeyDir::open(key_dir)?,
            libvirt,
        })
    }

    /// The volume's key record, if it is encrypted.
    pub(crate) fn record(&self, volume: &str) -> Result<Option<KeyRecord>, VolumeError> {
        self.keys.record(volume)
    }

    /// Whether a volume of this name may be made encrypted now: a caller's secret exists, is
    /// of usage `volume` and readable (needs libvirt), libvirt answers when it is to hold the
    /// key, and no crypto-erase of the name is unfinished. Refusals are `EncryptionRefused`.
    pub(crate) async fn check(
        &self,
        volume: &str,
        spec: &EncryptionSpec,
    ) -> Result<(), VolumeError> {
        if let Some(erasing) = self.keys.erasing(volume)? {
            // Only the key left to forget (libvirt was down at the delete): done now if it can be.
            if !erasing.volume_removed || self.undefine(&erasing.record).await.is_err() {
                return Err(refused(format!(
                    "the crypto-erase of an earlier volume {volume} is unfinished (it is finished \
                     at the next start); choose another name or restart the daemon"
                )));
            }
            self.keys.end_erase(volume)?;
        }
        match (&spec.secret_uuid, &self.libvirt) {
            (Some(_), None) => Err(refused(
                "secret_uuid names a libvirt secret, but libvirt integration is off (libvirt.pool \
                 is empty); omit it and the daemon makes a key file",
            )),
            (Some(uuid), Some(libvirt)) => {
                let info = libvirt
                    .secret(uuid)
                    .await
                    .map_err(|e| secret_error(uuid, e))?
                    .ok_or_else(|| refused(format!("libvirt has no secret {uuid}")))?;
                if info.usage != "volume" {
                    return Err(refused(format!(
                        "libvirt secret {uuid} has usage {}, not volume",
                        info.usage
                    )));
                }
                if info.private {
                    return Err(refused(format!(
                        "libvirt secret {uuid} is private: its value cannot be read to format the \
                         volume; define it with private='no', or omit secret_uuid"
                    )));
                }
                Ok(())
            }
            (None, Some(libvirt)) => libvirt
                .secret("00000000-0000-0000-0000-000000000000")
                .await
                .map(|_| ())
                .map_err(|e| refused(format!("cannot define a libvirt secret: {e}"))),
            (None, None) => Ok(()),
        }
    }

    /// The key of a new encrypted volume `volume` at `path`, recorded durably before it is
    /// returned: the caller's secret read from libvirt, or a new random passphrase in a new
    /// private libvirt secret (usage id `path`) or in `key_dir/<volume>.key`. A record left by
    /// a job that died before making its volume is forgotten first.
    pub(crate) async fn new_key(
        &self,
        volume: &str,
        path: &Path,
        spec: &EncryptionSpec,
    ) -> Result<Key, VolumeError> {
        self.check(volume, spec).await?;
        if self.keys.record(volume)?.is_some() {
            self.forget(volume).await?;
        }
        let (record, passphrase) = match (&spec.secret_uuid, &self.libvirt) {
            (Some(uuid), Some(libvirt)) => {
                let value = libvirt
                    .secret_value(uuid)
                    .await
                    .map_err(|e| secret_error(uuid, e))?;
                check_passphrase(uuid, &value)?;
                let record = record(Some(uuid.clone()), None, false);
                self.keys.write_record(volume, &record)?;
                (record, value)
            }
            (None, Some(libvirt)) => {
                let passphrase = new_passphrase()?;
                let uuid = uuid::Uuid::new_v4().to_string();
                let record = record(Some(uuid.clone()), None, true);
                // Recorded first: a crash after the define still leads to the secret.
                self.keys.write_record(volume, &record)?;
                if let Err(e) = libvirt.define_volume_secret(&uuid, path, &passphrase).await {
                    let _ = self.forget(volume).await;
                    return Err(secret_error(&uuid, e));
                }
                (record, passphrase)
            }
            (None, None) => {
                let passphrase = new_passphrase()?;
                let file = self.keys.write_key(volume, &passphrase)?;
                let record = record(None, Some(file), false);
                self.keys.write_record(volume, &record)?;
                (record, passphrase)
            }
            (Some(_), None) => unreachable!("refused by check"),
        };
        Ok(Key { record, passphrase })
    }

    /// Rollback of `new_key`: the daemon's secret undefined, the key file and record removed.
    pub(crate) async fn forget(&self, volume: &str) -> Result<(), VolumeError> {
        if let Some(record) = self.keys.record(volume)? {
            self.undefine(&record).await?;
        }
        self.keys.remove(volume)
    }

    async fn undefine(&self, record: &KeyRecord) -> Result<(), VolumeError> {
        if let (true, Some(uuid), Some(libvirt)) =
            (record.secret_owned, &record.secret_uuid, &self.libvirt)
        {
            libvirt
                .undefine_secret(uuid)
                .await
                .map_err(|e| secret_error(uuid, e))?;
        }
        Ok(())
    }

    /// Crypto-erase of `volume` (the caller holds its name and found nothing using it): the
    /// intent recorded (the record moves into `.erasing`), the LUKS header and key slots
    /// zeroed, the volume removed, then the daemon's secret undefined and the key file removed.
    /// A crash or failure at any step leaves the erase record, and `finish_erase` completes it
    /// at the next start; once the header is gone nothing can decrypt the volume. When only the
    /// secret could not be undefined (libvirt down), the volume is gone: that is logged and
    /// left to the next start (or to the next encrypted volume of the name).
    pub(crate) async fn erase(
        &self,
        backend: &dyn VolumeBackend,
        volume: &str,
        record: &KeyRecord,
    ) -> Result<(), VolumeError> {
        self.keys.begin_erase(volume, record)?;
        let erasing = Erasing {
            record: record.clone(),
            volume_removed: false,
        };
        let erased = self.continue_erase(backend, volume, erasing).await;
        match erased {
            Err(e)
                if self
                    .keys
                    .erasing(volume)?
                    .is_some_and(|left| left.volume_removed) =>
            {
                tracing::warn!(volume = %volume, error = %e, "volume crypto-erased and removed; its key is forgotten at the next start");
                Ok(())
            }
            other => other,
        }
    }

    async fn continue_erase(
        &self,
        backend: &dyn VolumeBackend,
        volume: &str,
        mut erasing: Erasing,
    ) -> Result<(), VolumeError> {
        if !erasing.volume_removed {
            if let Some(info) = backend.inspect(volume).await? {
                let path = info.path.clone();
                tokio::task::spawn_blocking(move || luks::erase_header(&path))
                    .await
                    .map_err(|e| VolumeError::io(&info.path, std::io::Error::other(e)))??;
                backend.remove(volume).await?;
            }
            erasing.volume_removed = true;
            self.keys.set_erasing(volume, &erasing)?;
        }
        self.undefine(&erasing.record).await?;
        self.keys.end_erase(volume)
    }

    /// The names with an unfinished crypto-erase (start-up takes their locks first).
    pub(crate) fn unfinished_erases(&self) -> Vec<String> {
        self.keys
            .unfinished_erases()
            .map(|u| u.into_iter().map(|(name, _)| name).collect())
            .unwrap_or_default()
    }

    /// Finishes one unfinished crypto-erase (see `finish_erases`).
    pub(crate) async fn finish_erase(
        &self,
        backend: &dyn VolumeBackend,
        volume: &str,
    ) -> Result<(), VolumeError> {
        match self.keys.erasing(volume)? {
            Some(erasing) => self.continue_erase(backend, volume, erasing).await,
            None => Ok(()),
        }
    }
}

/// A caller's secret value must be a usable passphrase: not empty, at most
/// `MAX_PASSPHRASE_BYTES`.
fn check_passphrase(uuid: &str, value: &[u8]) -> Result<(), VolumeError> {
    match value.len() {
        0 => Err(refused(format!("libvirt secret {uuid} has an empty value"))),
        n if n > MAX_PASSPHRASE_BYTES => Err(refused(format!(
            "libvirt secret {uuid} holds {n} bytes; a passphrase is at most \
             {MAX_PASSPHRASE_BYTES}"
        ))),
        _ => Ok(()),
    }
}

fn record(secret_uuid: Option<String>, key_file: Option<PathBuf>, secret_owned: bool) -> KeyRecord {
    KeyRecord {
        format: EncryptionFormat::Luks,
        secret_uuid,
        key_file,
        secret_owned,
    }
}

/// `PASSPHRASE_BYTES` from the OS RNG, as hex digits (text every tool takes as a passphrase).
fn new_passphrase() -> Result<Zeroizing<Vec<u8>>, VolumeError> {
    let mut raw = Zeroizing::new([0u8; PASSPHRASE_BYTES]);
    getrandom::fill(raw.as_mut())
        .map_err(|e| VolumeError::io("getrandom", std::io::Error::other(e.to_string())))?;
    Ok(Zeroizing::new(hex::encode(raw.as_ref()).into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_secret_is_a_passphrase_of_bounded_size() {
        assert!(check_passphrase("u", b"").is_err());
        assert!(check_passphrase("u", &[b'x'; MAX_PASSPHRASE_BYTES]).is_ok());
        let big = check_passphrase("u", &vec![b'x'; MAX_PASSPHRASE_BYTES + 1]).unwrap_err();
        assert!(matches!(big, VolumeError::EncryptionRefused(_)), "{big}");
    }

    #[test]
    fn passphrases_are_new_each_time_and_never_printed() {
        let a = new_passphrase().unwrap();
        let b = new_passphrase().unwrap();
        assert_eq!(a.len(), 2 * PASSPHRASE_BYTES);
        assert_ne!(*a, *b);
        let key = Key {
            record: record(None, None, false),
            passphrase: a.clone(),
        };
        let shown = format!("{key:?}");
        assert!(!shown.contains(std::str::from_utf8(&a).unwrap()), "{shown}");
    }
}
