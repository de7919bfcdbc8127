//! One resolution per request: an image URL with its `checksum` or `checksum_url` becomes a
//! [`Source`], everything the cache needs to fetch and verify it (the object, where its
//! checksum comes from, the keyring that vouches for its host), made once per job. The cache
//! revalidates and downloads `source.object` and asks [`Source::expected`] for the digest the
//! bytes must match: the one place where manifests and their signatures are fetched and
//! checked. Signatures of a manifest are looked for beside it under the conventional names
//! (`.gpg`, `.asc`, `.sig`, `.sign`; the first that exists counts), or inside it (clearsigned).

use std::sync::Arc;
use std::time::SystemTime;

use super::remote::{RemoteObject, SourceError};
use super::settings::SourcePolicy;
use super::source::{self, InvalidSource, Location, SourceClients};
use super::verify::Verified;
use super::verify::digest::Digest;
use super::verify::manifest::{self, MAX_MANIFEST_BYTES, ManifestError};
use super::verify::signature::{self, SignatureError};
use super::verify::trust::TrustRule;

/// Names a detached signature of a manifest may have beside it, in the order tried.
pub(crate) const SIGNATURE_SUFFIXES: [&str; 4] = [".gpg", ".asc", ".sig", ".sign"];
/// Largest signature file read.
const MAX_SIGNATURE_BYTES: usize = 64 << 10;
/// Largest `.sha256` sidecar read.
const MAX_SIDECAR_BYTES: usize = 64 << 10;

/// What a request names: the image and, optionally, how to check it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SourceRequest<'a> {
    pub(crate) image_url: &'a str,
    /// `sha256:<hex>` or `sha512:<hex>`.
    pub(crate) checksum: Option<&'a str>,
    /// A checksum manifest listing the image by its file name.
    pub(crate) checksum_url: Option<&'a str>,
}

/// A published file that names the image's digest (a manifest or the `.sha256` sidecar).
#[derive(Clone)]
pub(crate) struct Published {
    /// The file as it is shown (its URL, or its identity for S3 and files).
    pub(crate) shown: String,
    pub(crate) object: RemoteObject,
    /// Detached signatures it may have beside it, in the order tried.
    signatures: Vec<(String, RemoteObject)>,
}

/// Where the digest an image must match comes from.
#[derive(Clone)]
pub(crate) enum ChecksumOrigin {
    /// The request's `checksum`.
    Given(Digest),
    /// The request's `checksum_url`: the entry for the image's file name.
    Manifest(Published),
    /// `<image>.sha256`, when it exists (no checksum without it).
    Sidecar(Published),
}

/// An image request, resolved: what the cache fetches and how it checks it.
#[derive(Clone)]
pub(crate) struct Source {
    /// The URL as the caller gave it.
    pub(crate) image_url: String,
    pub(crate) location: Location,
    pub(crate) object: RemoteObject,
    pub(crate) checksum: ChecksumOrigin,
    /// The keyring rule of the image's host, if any.
    pub(crate) trust: Option<Arc<TrustRule>>,
}

/// The digest the downloaded bytes must match, and what vouched for it.
#[derive(Debug, Clone)]
pub(crate) struct Expected {
    pub(crate) digest: Digest,
    pub(crate) verified: Verified,
}

/// Why no usable checksum was found.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum VerifyError {
    /// Fetching the manifest or a signature failed.
    #[error("fetching {what}: {error}")]
    Source { what: String, error: SourceError },
    #[error("checksum manifest {0} not found")]
    ManifestMissing(String),
    #[error("checksum manifest {manifest}: {error}")]
    Manifest {
        manifest: String,
        error: ManifestError,
    },
    /// A `[[sources.trust]]` rule with `require_signature` and no signature to check.
    #[error("{0}")]
    SignatureRequired(String),
    /// A signature was found and did not verify.
    #[error("signature {file}: {error}")]
    Signature { file: String, error: SignatureError },
}

/// Why a request cannot become a [`Source`] (API: 400).
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("{0}")]
    Invalid(#[from] InvalidSource),
    /// The host requires signatures and the request gave its own checksum.
    #[error("{0}")]
    SignatureRequired(String),
}

/// The request's own rules, before any setting: at most one of `checksum` and `checksum_url`,
/// and a `checksum` that parses. A request breaking them is malformed (400 even for preflight,
/// whose other refusals are verdicts).
pub(crate) fn check_syntax(request: &SourceRequest<'_>) -> Result<(), InvalidSource> {
    match (request.checksum, request.checksum_url) {
        (Some(_), Some(_)) => Err(InvalidSource(
            "give checksum or checksum_url, not both".into(),
        )),
        (Some(text), None) => Digest::parse(text).map(drop).map_err(InvalidSource),
        _ => Ok(()),
    }
}

/// Resolves a request against the settings (no network): the image and the manifest are
/// checked against the same allow-lists; a given checksum must parse; a host that requires
/// signatures refuses a checksum the request gives itself (it is nobody's signature).
pub(crate) fn resolve(
    clients: &SourceClients,
    request: &SourceRequest<'_>,
    policy: &SourcePolicy,
) -> Result<Source, RequestError> {
    let location = source::resolve(request.image_url, policy)?;
    let trust = location
        .host(policy)
        .and_then(|(host, port)| clients.trust_for(&host, port));
    let object = |l: &Location| {
        clients
            .object(l)
            .map_err(|e| InvalidSource(format!("{}: {e}", l.identity())))
    };
    let published = |l: Location| -> Result<Published, InvalidSource> {
        let signatures = SIGNATURE_SUFFIXES
            .iter()
            .map(|s| {
                let beside = l.beside(s);
                Ok((beside.identity(), object(&beside)?))
            })
            .collect::<Result<Vec<_>, InvalidSource>>()?;
        Ok(Published {
            shown: l.identity(),
            object: object(&l)?,
            signatures,
        })
    };
    check_syntax(request)?;
    let checksum = match (request.checksum, request.checksum_url) {
        // check_syntax refused both.
        (Some(text), _) => {
            if trust.as_ref().is_some_and(|t| t.require_signature) {
                return Err(RequestError::SignatureRequired(format!(
                    "{}: images from this host need a signed checksum manifest \
                     (sources.trust require_signature); give checksum_url instead of checksum",
                    request.image_url
                )));
            }
            ChecksumOrigin::Given(Digest::parse(text).map_err(InvalidSource)?)
        }
        (None, Some(url)) => {
            let manifest = source::resolve(url, policy)
                .map_err(|e| InvalidSource(format!("checksum_url: {}", e.0)))?;
            ChecksumOrigin::Manifest(published(manifest)?)
        }
        (None, None) => ChecksumOrigin::Sidecar(published(location.beside(".sha256"))?),
    };
    Ok(Source {
        image_url: request.image_url.to_string(),
        object: object(&location)?,
        location,
        checksum,
        trust,
    })
}

impl Source {
    /// Whether signatures are required for this image.
    fn requires_signature(&self) -> bool {
        self.trust.as_ref().is_some_and(|t| t.require_signature)
    }

    /// The digest the image must match, fetched and checked now (manifest, sidecar and
    /// signatures are small: at most 1 MiB and 64 KiB). `None`: nothing names one (no
    /// sidecar, and the host does not require a signature).
    pub(crate) async fn expected(&self) -> Result<Option<Expected>, VerifyError> {
        match &self.checksum {
            ChecksumOrigin::Given(digest) => Ok(Some(Expected {
                digest: digest.clone(),
                verified: Verified {
                    digest: digest.to_string(),
                    signed_by: None,
                    manifest: None,
                },
            })),
            ChecksumOrigin::Sidecar(p) => {
                let Some(bytes) = fetch(&p.object, &p.shown, MAX_SIDECAR_BYTES).await? else {
                    if self.requires_signature() {
                        return Err(self.unsigned("no checksum manifest was given (checksum_url) and none is beside the image"));
                    }
                    return Ok(None);
                };
                let digest = manifest::sidecar(&bytes).map_err(|error| VerifyError::Manifest {
                    manifest: p.shown.clone(),
                    error,
                })?;
                let signed_by = self.detached(p, &bytes).await?;
                Ok(Some(self.expect(digest, signed_by, p)))
            }
            ChecksumOrigin::Manifest(p) => {
                let bytes = fetch(&p.object, &p.shown, MAX_MANIFEST_BYTES)
                    .await?
                    .ok_or_else(|| VerifyError::ManifestMissing(p.shown.clone()))?;
                let bad = |error| VerifyError::Manifest {
                    manifest: p.shown.clone(),
                    error,
                };
                let text = manifest::text(&bytes).map_err(bad)?;
                let (signed_by, text) = if signature::is_clearsigned(text) {
                    self.clearsigned(p, text)?
                } else {
                    (self.detached(p, &bytes).await?, text.to_string())
                };
                let digest = manifest::find(&text, &self.location.file_name()).map_err(bad)?;
                Ok(Some(self.expect(digest, signed_by, p)))
            }
        }
    }

    fn expect(&self, digest: Digest, signed_by: Option<String>, p: &Published) -> Expected {
        Expected {
            verified: Verified {
                digest: digest.to_string(),
                signed_by,
                manifest: Some(p.shown.clone()),
            },
            digest,
        }
    }

    fn unsigned(&self, why: &str) -> VerifyError {
        VerifyError::SignatureRequired(format!(
            "{}: images from this host need a valid signature (sources.trust \
             require_signature): {why}",
            self.image_url
        ))
    }

    /// A clearsigned manifest: its signer (when a keyring applies) and its signed text.
    fn clearsigned(
        &self,
        p: &Published,
        text: &str,
    ) -> Result<(Option<String>, String), VerifyError> {
        let invalid = |error| VerifyError::Signature {
            file: p.shown.clone(),
            error,
        };
        match &self.trust {
            None => Ok((None, signature::clearsigned_text(text).map_err(invalid)?)),
            Some(rule) => {
                let (by, signed) = rule
                    .keyring
                    .verify_clearsigned(text, SystemTime::now())
                    .map_err(invalid)?;
                Ok((Some(by), signed))
            }
        }
    }

    /// The signer of a detached signature beside `p`, when a keyring applies to the host
    /// (no keyring: not looked for).
    async fn detached(&self, p: &Published, data: &[u8]) -> Result<Option<String>, VerifyError> {
        let Some(rule) = &self.trust else {
            return Ok(None);
        };
        for (shown, object) in &p.signatures {
            let Some(sig) = fetch(object, shown, MAX_SIGNATURE_BYTES).await? else {
                continue;
            };
            let by = rule
                .keyring
                .verify_detached(data, &sig, SystemTime::now())
                .map_err(|error| VerifyError::Signature {
                    file: shown.clone(),
                    error,
                })?;
            return Ok(Some(by));
        }
        if rule.require_signature {
            return Err(self.unsigned(&format!(
                "{} has no signature beside it ({})",
                p.shown,
                SIGNATURE_SUFFIXES.join(", ")
            )));
        }
        Ok(None)
    }

    /// Whether a cache entry checked as `verified` (digest `sha256` as downloaded) satisfies
    /// this request without asking the source for a checksum again: the request's digest, the
    /// same manifest, and a signer still in the keyring when signatures are required.
    pub(crate) fn accepts(&self, sha256: &str, verified: Option<&Verified>) -> bool {
        let signed_ok = || {
            !self.requires_signature()
                || verified
                    .and_then(|v| v.signed_by.as_ref())
                    .zip(self.trust.as_ref())
                    .is_some_and(|(by, rule)| rule.keyring.fingerprints().contains(by))
        };
        match &self.checksum {
            ChecksumOrigin::Given(d) => {
                verified.is_some_and(|v| v.digest == d.to_string())
                    || (d.algorithm == super::verify::digest::Algorithm::Sha256 && d.hex == sha256)
            }
            ChecksumOrigin::Manifest(p) => {
                verified.is_some_and(|v| v.manifest.as_deref() == Some(&p.shown)) && signed_ok()
            }
            ChecksumOrigin::Sidecar(_) => signed_ok(),
        }
    }
}

impl Source {
    /// What a cache hit `accepts` let through was checked against, as this request asked:
    /// the request's own digest, else what the entry records.
    pub(crate) fn reported(&self, recorded: Option<&Verified>) -> Option<Verified> {
        match &self.checksum {
            ChecksumOrigin::Given(d) => Some(Verified {
                digest: d.to_string(),
                signed_by: None,
                manifest: None,
            }),
            _ => recorded.cloned(),
        }
    }
}

/// A small file, `None` when it does not exist.
async fn fetch(
    object: &RemoteObject,
    shown: &str,
    limit: usize,
) -> Result<Option<bytes::Bytes>, VerifyError> {
    object
        .get_small(limit)
        .await
        .map_err(|error| VerifyError::Source {
            what: shown.to_string(),
            error,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn clients_and_policy() -> (SourceClients, SourcePolicy) {
        let mut s = Settings::default();
        s.sources.allowed_hosts = vec!["images.example.com".into()];
        let policy = s.source_policy();
        let clients = SourceClients::new(&s.s3_access(), &policy, Default::default()).unwrap();
        (clients, policy)
    }

    fn request<'a>(checksum: Option<&'a str>, checksum_url: Option<&'a str>) -> SourceRequest<'a> {
        SourceRequest {
            image_url: "https://images.example.com/rel/disk%20one.qcow2",
            checksum,
            checksum_url,
        }
    }

    #[test]
    fn a_request_resolves_once_into_its_checksum_origin() {
        let (clients, policy) = clients_and_policy();
        let source = resolve(&clients, &request(None, None), &policy).unwrap();
        assert_eq!(source.location.file_name(), "disk one.qcow2");
        assert!(matches!(&source.checksum, ChecksumOrigin::Sidecar(p)
            if p.shown == "https://images.example.com/rel/disk%20one.qcow2.sha256"));
        let url = "https://images.example.com/rel/SHA256SUMS";
        let source = resolve(&clients, &request(None, Some(url)), &policy).unwrap();
        let ChecksumOrigin::Manifest(p) = &source.checksum else {
            panic!("a manifest");
        };
        let names: Vec<&str> = p.signatures.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], "https://images.example.com/rel/SHA256SUMS.gpg");
        assert_eq!(names.len(), SIGNATURE_SUFFIXES.len());
        for (checksum, checksum_url) in [
            (Some("sha256:00"), None),
            (Some(&*format!("sha256:{}", "a".repeat(64))), Some(url)),
            (None, Some("https://elsewhere.example.com/SHA256SUMS")),
        ] {
            assert!(matches!(
                resolve(&clients, &request(checksum, checksum_url), &policy),
                Err(RequestError::Invalid(_))
            ));
        }
    }

    #[test]
    fn a_hit_must_have_been_checked_as_the_request_asks() {
        let (clients, policy) = clients_and_policy();
        let sum = "b".repeat(64);
        let given = format!("sha256:{sum}");
        let source = resolve(&clients, &request(Some(&given), None), &policy).unwrap();
        assert!(source.accepts(&sum, None), "the digest of the bytes held");
        assert!(!source.accepts(&"c".repeat(64), None));
        let url = "https://images.example.com/rel/SHA256SUMS";
        let source = resolve(&clients, &request(None, Some(url)), &policy).unwrap();
        let from = |manifest: &str| Verified {
            digest: given.clone(),
            signed_by: None,
            manifest: Some(manifest.into()),
        };
        assert!(source.accepts(&sum, Some(&from(url))));
        assert!(!source.accepts(&sum, Some(&from("https://images.example.com/CHECKSUM"))));
        assert!(
            !source.accepts(&sum, None),
            "never checked against the manifest"
        );
    }
}
