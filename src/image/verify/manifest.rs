//! Checksum manifests: the `.sha256` sidecar beside an image (one digest), and the manifests
//! vendors publish per directory, in GNU format (`<hex>  name`, `<hex> *name` for binary mode,
//! `\`-escaped names) or BSD format (`SHA256 (name) = <hex>`, Fedora's `CHECKSUM`). The entry
//! of an image is found by its file name, exactly (a leading `./` aside). A leaf of `verify/`.

use super::digest::{Algorithm, Digest};

/// Largest manifest (or sidecar) read: far above any vendor's (Ubuntu's has ~30 lines).
pub(crate) const MAX_MANIFEST_BYTES: usize = 1 << 20;

/// Why a manifest names no digest for the image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ManifestError {
    #[error("the checksum manifest is not UTF-8 text")]
    NotText,
    #[error("the checksum manifest has no entry for `{0}`")]
    NoEntry(String),
    #[error("the checksum manifest lists `{0}` twice with different digests")]
    Conflicting(String),
    #[error("`.sha256` file: expected 64 hex digits")]
    BadSidecar,
}

/// The digest of a `.sha256` sidecar: raw hex or `sha256sum` output, any case.
pub(crate) fn sidecar(bytes: &[u8]) -> Result<Digest, ManifestError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ManifestError::BadSidecar)?;
    let token = text.split_whitespace().next().unwrap_or("");
    Digest::from_hex(Algorithm::Sha256, token).ok_or(ManifestError::BadSidecar)
}

/// The digest `text` lists for `file_name`. With both a SHA-256 and a SHA-512 entry, the
/// SHA-512; two different digests of one algorithm for the name are refused.
pub(crate) fn find(text: &str, file_name: &str) -> Result<Digest, ManifestError> {
    let mut found: Option<Digest> = None;
    for line in text.lines() {
        let Some((name, digest)) = parse_line(line) else {
            continue;
        };
        if name.strip_prefix("./").unwrap_or(&name) != file_name {
            continue;
        }
        found = match found {
            None => Some(digest),
            Some(had) if had.algorithm == digest.algorithm && had != digest => {
                return Err(ManifestError::Conflicting(file_name.to_string()));
            }
            Some(had) if had.algorithm == Algorithm::Sha512 => Some(had),
            Some(_) => Some(digest),
        };
    }
    found.ok_or_else(|| ManifestError::NoEntry(file_name.to_string()))
}

/// The manifest as bytes: UTF-8 text.
pub(crate) fn text(bytes: &[u8]) -> Result<&str, ManifestError> {
    std::str::from_utf8(bytes).map_err(|_| ManifestError::NotText)
}

/// One line's name and digest, in either format; `None` for comments, blank lines and
/// anything else (vendors add size lines and comments).
fn parse_line(line: &str) -> Option<(String, Digest)> {
    let line = line.trim_end_matches('\r');
    if line.trim().is_empty() || line.starts_with('#') {
        return None;
    }
    bsd_line(line).or_else(|| gnu_line(line))
}

/// `SHA256 (name) = hex` (also `SHA512`; other algorithms are not ours).
fn bsd_line(line: &str) -> Option<(String, Digest)> {
    let (tag, rest) = line.split_once(" (")?;
    let algorithm = match tag {
        "SHA256" => Algorithm::Sha256,
        "SHA512" => Algorithm::Sha512,
        _ => return None,
    };
    let (name, hex) = rest.rsplit_once(") = ")?;
    Some((name.to_string(), Digest::from_hex(algorithm, hex.trim())?))
}

/// `hex  name` (text mode) or `hex *name` (binary mode); a line starting with `\` has its
/// name escaped (`\\`, `\n`), as GNU coreutils writes names holding those.
fn gnu_line(line: &str) -> Option<(String, Digest)> {
    let (escaped, line) = match line.strip_prefix('\\') {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let (hex, rest) = line.split_once(' ')?;
    let algorithm = Algorithm::of_hex_len(hex.len())?;
    let digest = Digest::from_hex(algorithm, hex)?;
    let name = rest.strip_prefix(' ').or_else(|| rest.strip_prefix('*'))?;
    if name.is_empty() {
        return None;
    }
    let name = if escaped {
        unescape(name)?
    } else {
        name.to_string()
    };
    Some((name, digest))
}

fn unescape(name: &str) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            '\\' => out.push('\\'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn sha256(hex: &str) -> Digest {
        Digest::from_hex(Algorithm::Sha256, hex).unwrap()
    }

    #[test]
    fn gnu_text_and_binary_entries() {
        let m =
            format!("{A} *noble-server-cloudimg-amd64.img\n{B}  noble-server-cloudimg-arm64.img\n");
        assert_eq!(
            find(&m, "noble-server-cloudimg-amd64.img").unwrap(),
            sha256(A)
        );
        assert_eq!(
            find(&m, "noble-server-cloudimg-arm64.img").unwrap(),
            sha256(B)
        );
        assert_eq!(
            find(&m, "noble-server-cloudimg-amd64"),
            Err(ManifestError::NoEntry("noble-server-cloudimg-amd64".into()))
        );
        // Names with spaces, `./` prefixes, CRLF lines and escaped names.
        let m = format!("{A}  ./my disk.img\r\n\\{B}  back\\\\slash.img\n");
        assert_eq!(find(&m, "my disk.img").unwrap(), sha256(A));
        assert_eq!(find(&m, "back\\slash.img").unwrap(), sha256(B));
    }

    #[test]
    fn bsd_entries_as_fedora_writes_them() {
        let m = format!(
            "# Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2: 123 bytes\n\
             SHA256 (Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2) = {}\n\
             MD5 (x.qcow2) = 00000000000000000000000000000000\n",
            A.to_ascii_uppercase()
        );
        assert_eq!(
            find(&m, "Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2").unwrap(),
            sha256(A)
        );
        assert!(find(&m, "x.qcow2").is_err());
    }

    #[test]
    fn sha512_wins_and_conflicts_are_refused() {
        let long = "c".repeat(128);
        let m = format!("{A}  d.img\nSHA512 (d.img) = {long}\n");
        assert_eq!(find(&m, "d.img").unwrap().algorithm, Algorithm::Sha512);
        let m = format!("{A}  d.img\n{B}  d.img\n");
        assert_eq!(
            find(&m, "d.img"),
            Err(ManifestError::Conflicting("d.img".into()))
        );
        // The same digest twice is no conflict.
        assert!(find(&format!("{A}  d.img\n{A} *d.img\n"), "d.img").is_ok());
    }

    #[test]
    fn sidecars() {
        assert_eq!(sidecar(A.as_bytes()).unwrap(), sha256(A));
        assert_eq!(
            sidecar(format!("{A}  x.img\n").as_bytes()).unwrap(),
            sha256(A)
        );
        assert_eq!(sidecar(b"xyz"), Err(ManifestError::BadSidecar));
        assert_eq!(sidecar(b""), Err(ManifestError::BadSidecar));
    }
}
