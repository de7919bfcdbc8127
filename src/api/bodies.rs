//! The JSON request bodies of the API, with the rules their fields follow written into their
//! schema once, on `ProvisionBody` (`openapi.rs` copies them to the fields of the other bodies
//! that say "as for `POST /api/v1/jobs`", and tests that the handlers check the same rules). Value types:
//! a leaf of `api/`.

use serde::Deserialize;

use super::error::ApiError;
use crate::image::DeclaredImageType;
use crate::volume::encrypt::{EncryptionFormat, EncryptionSpec};

/// `POST /api/v1/jobs`: what to provision. Fields are checked one by one (each with its own
/// message) rather than by serde, so they are optional here and required in the schema
/// (`image_url` or `image`: `openapi.rs` states "exactly one"). The
/// schema states each check (lengths count characters, as JSON Schema does); the patterns are
/// tested against the checks in `openapi.rs`. No string of a body may hold a control character.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({
    "image_url": "s3://vm-images/ubuntu-24.04.qcow2",
    "volume_name": "vm-disk-001",
    "volume_size_gb": 50,
    "image_type": "qcow2",
    "correlation_id": "provision-vm-001"
})))]
pub(crate) struct ProvisionBody {
    /// `s3://bucket/key`, an `http(s)://` URL on the S3 endpoint or `sources.allowed_hosts`,
    /// or `file://` below `sources.file_roots` (400 for any other source); not blank; at most
    /// 4096 characters. Exactly one of `image_url` and `image`.
    #[schema(value_type = Option<String>, min_length = 1, max_length = 4096,
        pattern = r"^[^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]*[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028-\u202f\u205f\u2066-\u2069\u3000][^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]*$")]
    pub(crate) image_url: Option<String>,
    /// A declared image (`[[images]]`, `GET /api/v1/images`) by name, instead of
    /// `image_url`: its current version is used, checked as the declaration says (400
    /// `unknown_image` when no image of that name is declared).
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
    )]
    pub(crate) image: Option<String>,
    /// `[A-Za-z0-9+_.-]`, 1..=127 characters, not `.` or `..`, no leading `-` (the LVM backend
    /// also refuses LVM's reserved names).
    #[schema(required = true, value_type = String, min_length = 1, max_length = 127,
        pattern = r"^(?:[A-Za-z0-9+_][A-Za-z0-9+_.-]{0,126}|\.[A-Za-z0-9+_-][A-Za-z0-9+_.-]{0,125}|\.\.[A-Za-z0-9+_.-]{1,125})$")]
    pub(crate) volume_name: Option<String>,
    /// GiB (2^30 bytes), an integer 1..=1048576.
    #[schema(required = true, value_type = u64, minimum = 1, maximum = 1048576)]
    pub(crate) volume_size_gb: Option<serde_json::Value>,
    /// `qcow2` (default) or `raw`; checked against the image (a mismatch fails the job).
    #[schema(value_type = Option<DeclaredImageType>)]
    pub(crate) image_type: Option<String>,
    /// Echoed in the job, its logs and traces; at most 256 characters (empty: none).
    #[schema(
        max_length = 256,
        pattern = r"^[^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]*$"
    )]
    pub(crate) correlation_id: Option<String>,
    /// The digest the image as downloaded must match: `sha256:<64 hex>` or `sha512:<128 hex>`
    /// (a mismatch fails the job; nothing is cached). Not with `checksum_url`.
    #[schema(pattern = r"^(?:[sS][hH][aA]256:[0-9a-fA-F]{64}|[sS][hH][aA]512:[0-9a-fA-F]{128})$")]
    pub(crate) checksum: Option<String>,
    /// A checksum manifest (GNU `sha256sum`/`sha512sum` or BSD format, optionally OpenPGP
    /// signed) on an allowed source, listing the image by its file name; at most 4096
    /// characters. Not with `checksum`.
    #[schema(min_length = 1, max_length = 4096)]
    pub(crate) checksum_url: Option<String>,
    /// Make the volume LUKS-encrypted (always a full copy, never a thin snapshot or reflink);
    /// the job status's `encryption` then says where its key is.
    pub(crate) encryption: Option<EncryptionBody>,
}

/// `"encryption"` of a provision or clone request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"format": "luks"})))]
pub(crate) struct EncryptionBody {
    /// `luks`: LUKS1 as QEMU's `luks` driver writes it, which libvirt opens for a disk with
    /// `<encryption format='luks'><secret type='passphrase' uuid='...'/></encryption>`.
    #[schema(required = true, value_type = String, pattern = "^luks$")]
    pub(crate) format: Option<String>,
    /// An existing libvirt secret with usage `volume` and `private='no'` whose value is the
    /// passphrase (needs libvirt integration); omitted: the daemon makes a random passphrase
    /// in a new private libvirt secret (libvirt on) or a key file (libvirt off). 409
    /// `encryption_refused` when libvirt has no such secret, it has another usage or is
    /// private, or libvirt does not answer.
    #[schema(
        pattern = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )]
    pub(crate) secret_uuid: Option<String>,
}

/// `POST /api/v1/cache/fetch`: an image to download into the cache only.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"image_url": "s3://vm-images/ubuntu-24.04.qcow2", "image_type": "qcow2"})))]
pub(crate) struct CacheFetchBody {
    /// As for `POST /api/v1/jobs`; exactly one of `image_url` and `image`.
    #[schema(value_type = Option<String>)]
    pub(crate) image_url: Option<String>,
    /// A declared image (`[[images]]`, `GET /api/v1/images`) by name, instead of
    /// `image_url`: its current version is fetched, checked as the declaration says (400
    /// `unknown_image` when no image of that name is declared).
    pub(crate) image: Option<String>,
    /// `qcow2` or `raw`: checked against the image as for provision jobs (a mismatch fails the
    /// job); none: the image is taken as found.
    #[schema(value_type = Option<DeclaredImageType>)]
    pub(crate) image_type: Option<String>,
    /// As for `POST /api/v1/jobs`.
    pub(crate) correlation_id: Option<String>,
    /// As for `POST /api/v1/jobs`: the digest the image as downloaded must match.
    pub(crate) checksum: Option<String>,
    /// As for `POST /api/v1/jobs`: a checksum manifest listing the image.
    pub(crate) checksum_url: Option<String>,
}

/// `POST /api/v1/images/inspect`: the image a job would fetch.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"image_url": "s3://vm-images/ubuntu-24.04.qcow2"})))]
pub(crate) struct InspectBody {
    /// The image, as a job would name it: not blank, at most 4096 characters (a source the
    /// configuration refuses is a verdict, not a 400).
    #[schema(required = true, value_type = String)]
    pub(crate) image_url: Option<String>,
    /// `qcow2` (default) or `raw`: what a job would declare.
    #[schema(value_type = Option<crate::image::DeclaredImageType>)]
    pub(crate) image_type: Option<String>,
    /// As for `POST /api/v1/jobs`: the answer's `verified` names the digest a job would check.
    pub(crate) checksum: Option<String>,
    /// As for `POST /api/v1/jobs`: the manifest (and its signature) is fetched and checked.
    pub(crate) checksum_url: Option<String>,
}

/// `POST /api/v1/volumes/{name}/resize`: the new size; volumes only grow.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"size_gb": 80})))]
pub(crate) struct ResizeBody {
    /// GiB (2^30 bytes), an integer 1..=1048576; smaller than the volume is 409
    /// (`shrink_refused`), its size is 200 with nothing done.
    #[schema(required = true, value_type = u64, minimum = 1, maximum = 1048576)]
    pub(crate) size_gb: Option<serde_json::Value>,
}

/// `POST /api/v1/volumes/{name}/clone`: the new volume the source is copied into.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(examples(json!({"target": "vm-2-disk", "size_gb": 40})))]
pub(crate) struct CloneBody {
    /// The new volume's name (the rules of `volume_name`, whose schema `openapi.rs` copies
    /// here); it must not exist (409 `volume_exists`).
    #[schema(required = true, value_type = String, min_length = 1, max_length = 127)]
    pub(crate) target: Option<String>,
    /// GiB (2^30 bytes), an integer 1..=1048576, at least the source's size (else 409
    /// `shrink_refused`); default: the source's size.
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1048576)]
    pub(crate) size_gb: Option<serde_json::Value>,
    /// Copy a source that a running domain uses, as it is (crash-consistent at best); without
    /// it such a source is 409 `volume_in_use`.
    #[serde(default)]
    pub(crate) allow_in_use: bool,
    /// As for `POST /api/v1/jobs`: the new volume is an encrypted copy of a plain source (an
    /// encrypted source cannot be cloned: 409 `encryption_refused`).
    pub(crate) encryption: Option<EncryptionBody>,
}

impl EncryptionBody {
    /// The request's encryption, checked: `format` is `luks`, `secret_uuid` (when given) a
    /// hyphenated UUID (stored in lower case, as libvirt prints it).
    pub(crate) fn check(self) -> Result<EncryptionSpec, ApiError> {
        match self.format.as_deref() {
            Some("luks") => {}
            None => {
                return Err(ApiError::bad_request(
                    "encryption.format is required (\"luks\")",
                ));
            }
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "encryption.format must be \"luks\", got {other:?}"
                )));
            }
        }
        let secret_uuid = match self.secret_uuid {
            None => None,
            Some(u) => {
                let parsed = (u.len() == 36)
                    .then(|| uuid::Uuid::try_parse(&u).ok())
                    .flatten()
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "encryption.secret_uuid must be a UUID (8-4-4-4-12 hex digits)",
                        )
                    })?;
                Some(parsed.hyphenated().to_string())
            }
        };
        Ok(EncryptionSpec {
            format: EncryptionFormat::Luks,
            secret_uuid,
        })
    }
}
