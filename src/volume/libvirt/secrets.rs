//! libvirt secrets of encrypted volumes through virsh: defining a private secret with usage
//! `volume`, setting its value, reading the value of a caller's (non-private) secret, and
//! undefining. Values and the XML pass through `SecretFd` (`/proc/self/fd/3`), never argv.

use std::path::Path;

use base64::Engine;
use zeroize::Zeroizing;

use super::Libvirt;
use crate::command::{self, CommandError, SecretFd};

/// What libvirt says of a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SecretInfo {
    /// `<usage type=...>`: `volume`, `ceph`, `iscsi`, `tls`, `vtpm`.
    pub(crate) usage: String,
    /// `private='yes'`: its value cannot be read back through the API.
    pub(crate) private: bool,
}

/// Why a secret could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SecretError {
    /// libvirt did not answer or refused (down, no permission).
    #[error("libvirt: {0}")]
    Libvirt(#[from] CommandError),
    #[error("cannot pass the secret to virsh: {0}")]
    Pass(std::io::Error),
    #[error("libvirt's answer for secret {uuid} is not what was expected: {detail}")]
    Unexpected { uuid: String, detail: String },
}

impl Libvirt {
    /// The secret `uuid`, or `None` when libvirt has no such secret (asked through
    /// `secret-list`, so that "not there" never depends on an error's text).
    pub(crate) async fn secret(&self, uuid: &str) -> Result<Option<SecretInfo>, SecretError> {
        let listed = self.virsh(&["secret-list"]).await?;
        if !listed_uuids(&listed).any(|u| u.eq_ignore_ascii_case(uuid)) {
            return Ok(None);
        }
        let xml = self.virsh(&["secret-dumpxml", "--secret", uuid]).await?;
        parse_secret(&xml)
            .map(Some)
            .ok_or_else(|| SecretError::Unexpected {
                uuid: uuid.to_string(),
                detail: "no <secret> with a <usage> in secret-dumpxml".into(),
            })
    }

    /// Defines a private, persistent secret `uuid` for the volume at `path` (usage `volume`,
    /// usage id the path) and sets its value.
    pub(crate) async fn define_volume_secret(
        &self,
        uuid: &str,
        path: &Path,
        value: &[u8],
    ) -> Result<(), SecretError> {
        let xml = secret_xml(uuid, path);
        let file = SecretFd::new(xml.as_bytes()).map_err(SecretError::Pass)?;
        self.virsh_secret(&["secret-define", "--file", SecretFd::PATH], &file)
            .await?;
        let value = SecretFd::new(value).map_err(SecretError::Pass)?;
        let args = [
            "secret-set-value",
            "--secret",
            uuid,
            "--file",
            SecretFd::PATH,
            "--plain",
        ];
        self.virsh_secret(&args, &value).await?;
        Ok(())
    }

    /// The value of a secret libvirt lets the daemon read (not private).
    pub(crate) async fn secret_value(&self, uuid: &str) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        let out = Zeroizing::new(self.virsh(&["secret-get-value", "--secret", uuid]).await?);
        base64::engine::general_purpose::STANDARD
            .decode(out.trim())
            .map(Zeroizing::new)
            .map_err(|_| SecretError::Unexpected {
                uuid: uuid.to_string(),
                detail: "secret-get-value did not print base64".into(),
            })
    }

    /// Undefines the secret; one that is not there is success.
    pub(crate) async fn undefine_secret(&self, uuid: &str) -> Result<(), SecretError> {
        if self.secret(uuid).await?.is_none() {
            return Ok(());
        }
        self.virsh(&["secret-undefine", "--secret", uuid]).await?;
        Ok(())
    }

    async fn virsh_secret(&self, args: &[&str], secret: &SecretFd) -> Result<String, CommandError> {
        let mut all = vec!["-c", &self.uri];
        all.extend_from_slice(args);
        command::run_with_secret(&self.program, &all, super::virsh_limit(), Some(secret)).await
    }
}

/// The UUIDs in `secret-list` output (a table: ` UUID   Usage` lines under a header).
fn listed_uuids(table: &str) -> impl Iterator<Item = &str> {
    table
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|t| uuid::Uuid::try_parse(t).is_ok())
}

/// The XML of a daemon-made secret.
fn secret_xml(uuid: &str, path: &Path) -> String {
    let path = quick_xml::escape::escape(path.to_string_lossy().into_owned()).into_owned();
    format!(
        "<secret ephemeral='no' private='yes'>\n  <uuid>{uuid}</uuid>\n  \
         <description>libvirt-volume-provisioner: LUKS passphrase of {path}</description>\n  \
         <usage type='volume'>\n    <volume>{path}</volume>\n  </usage>\n</secret>\n"
    )
}

/// The usage type and privacy of `secret-dumpxml` output.
fn parse_secret(xml: &str) -> Option<SecretInfo> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut private = None;
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) | Event::Empty(e) => {
                let attr = |name: &[u8]| {
                    e.attributes()
                        .flatten()
                        .find(|a| a.key.as_ref() == name)
                        .map(|a| String::from_utf8_lossy(&a.value).into_owned())
                };
                match e.name().as_ref() {
                    b"secret" => private = Some(attr(b"private").as_deref() == Some("yes")),
                    b"usage" => {
                        return Some(SecretInfo {
                            usage: attr(b"type")?,
                            private: private?,
                        });
                    }
                    _ => {}
                }
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_uuids_from_the_table() {
        let table = " UUID                                   Usage\n\
            ----------------------------------------------------------------\n \
            0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f   volume /dev/vg0/a\n \
            1b81f5b2-8403-7b23-c8d6-21ccc2f80d6f   ceph client.libvirt\n\n";
        let uuids: Vec<&str> = listed_uuids(table).collect();
        assert_eq!(
            uuids,
            [
                "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f",
                "1b81f5b2-8403-7b23-c8d6-21ccc2f80d6f"
            ]
        );
    }

    #[test]
    fn reads_usage_and_privacy() {
        let xml = secret_xml(
            "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f",
            Path::new("/dev/vg0/a&b"),
        );
        assert!(xml.contains("<volume>/dev/vg0/a&amp;b</volume>"), "{xml}");
        assert_eq!(
            parse_secret(&xml),
            Some(SecretInfo {
                usage: "volume".into(),
                private: true
            })
        );
        let ceph = "<secret ephemeral='no' private='no'>\n<uuid>x</uuid>\n<usage type='ceph'>\n<name>c</name>\n</usage>\n</secret>";
        assert_eq!(
            parse_secret(ceph),
            Some(SecretInfo {
                usage: "ceph".into(),
                private: false
            })
        );
        assert_eq!(parse_secret("<secret/>"), None);
    }
}
