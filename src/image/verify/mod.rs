//! Verification of images against what their publishers say: digests (`digest.rs`), checksum
//! manifests and sidecars (`manifest.rs`), OpenPGP signatures of manifests (`signature.rs`),
//! and which keyrings apply to which source hosts (`trust.rs`). Parsing and cryptography only:
//! fetching the files is `image/resolved.rs`'s, comparing digests the download's.

pub(crate) mod digest;
pub(crate) mod manifest;
pub(crate) mod signature;
