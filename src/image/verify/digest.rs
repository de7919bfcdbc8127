//! Digests a checksum names: `sha256:<hex>` or `sha512:<hex>`, as a request gives them or a
//! manifest lists them, and the SHA-512 of a downloaded file (the in-order hasher computes
//! SHA-256 only; a SHA-512 is checked by one read of the finished file). A leaf of `verify/`.

use std::io::Read;
use std::path::Path;

use sha2::{Digest as _, Sha512};

/// A hash algorithm a checksum may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    /// The name before the `:` of a checksum (`sha256`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Hex digits of a digest.
    pub(crate) fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    /// The algorithm whose digests have `len` hex digits (GNU manifests name none).
    pub(crate) fn of_hex_len(len: usize) -> Option<Algorithm> {
        match len {
            64 => Some(Algorithm::Sha256),
            128 => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

/// A digest: the algorithm and its value in lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Digest {
    pub(crate) algorithm: Algorithm,
    /// Lowercase hex, `algorithm.hex_len()` digits.
    pub(crate) hex: String,
}

impl Digest {
    /// A digest from hex digits of the algorithm's length (any case).
    pub(crate) fn from_hex(algorithm: Algorithm, hex: &str) -> Option<Digest> {
        (hex.len() == algorithm.hex_len() && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(
            || Digest {
                algorithm,
                hex: hex.to_ascii_lowercase(),
            },
        )
    }

    /// A request's `checksum`: `sha256:<64 hex>` or `sha512:<128 hex>`.
    pub(crate) fn parse(text: &str) -> Result<Digest, String> {
        let (name, hex) = text
            .split_once(':')
            .ok_or_else(|| "checksum must be `sha256:<hex>` or `sha512:<hex>`".to_string())?;
        let algorithm = match name.to_ascii_lowercase().as_str() {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err("checksum must name sha256 or sha512".into()),
        };
        Digest::from_hex(algorithm, hex).ok_or_else(|| {
            format!(
                "a {} checksum has {} hex digits",
                algorithm.as_str(),
                algorithm.hex_len()
            )
        })
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

/// The SHA-512 (hex) of a file, read once from the start.
pub(crate) fn sha512_of_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha512::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_checksums() {
        let h = "AB".repeat(32);
        let d = Digest::parse(&format!("sha256:{h}")).unwrap();
        assert_eq!(d.to_string(), format!("sha256:{}", h.to_ascii_lowercase()));
        assert!(Digest::parse(&format!("SHA512:{}", "0".repeat(128))).is_ok());
        for bad in [
            h.clone(),
            format!("md5:{h}"),
            format!("sha256:{}", &h[1..]),
            format!("sha512:{h}"),
            format!("sha256:{}g", &h[1..]),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sha512_of_a_file() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), b"abc").unwrap();
        assert_eq!(
            sha512_of_file(tmp.path()).unwrap(),
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        );
    }
}
