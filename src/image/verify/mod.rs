//! Verification of images against what their publishers say: digests (`digest.rs`), checksum
//! manifests and sidecars (`manifest.rs`), OpenPGP signatures of manifests (`signature.rs`),
//! and which keyrings apply to which source hosts (`trust.rs`). Parsing and cryptography only:
//! fetching the files is `image/resolved.rs`'s, comparing digests the download's.

pub(crate) mod digest;
pub(crate) mod manifest;
pub(crate) mod signature;
pub(crate) mod trust;

use serde::{Deserialize, Serialize};

/// What an image was checked against (job status, cache entries, `image inspect`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub(crate) struct Verified {
    /// The digest the bytes as downloaded matched: `sha256:<hex>` or `sha512:<hex>`.
    pub(crate) digest: String,
    /// Fingerprint (upper-case hex) of the certificate whose key signed the manifest that
    /// named the digest; absent when it was not signed (or no keyring applies to the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) signed_by: Option<String>,
    /// The manifest (or `.sha256` sidecar) the digest came from; absent when the request
    /// gave the digest itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) manifest: Option<String>,
}
