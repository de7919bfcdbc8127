//! The machine-readable `reason` of every error body: a stable snake_case code that clients
//! decide on (the CLI among them), listed in the OpenAPI document. `error` (a short code of the
//! status, for old clients) and `message` (for people) stay beside it; neither is for programs.
//! A leaf of `api/`.

use serde::Serialize;

/// Declares `Reason` with each variant's code in one place, so `Reason::ALL` and
/// `Reason::as_str` cannot drift from the enum (serialized in snake_case, which the OpenAPI
/// generator understands; a test checks that each code is its variant's snake_case).
macro_rules! reasons {
    ($( $(#[doc = $doc:literal])* $variant:ident = $code:literal, )*) => {
        /// Why a request was refused or failed. Codes are never renamed; new ones may be added.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub(crate) enum Reason {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl Reason {
            /// Every code, in declaration order.
            #[cfg(test)]
            pub(crate) const ALL: &[Reason] = &[$(Reason::$variant),*];

            /// The code as it appears in bodies.
            pub(crate) fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $code,)*
                }
            }

            /// The reason a code names (a failed job's stored code).
            pub(crate) fn from_code(code: &str) -> Option<Reason> {
                match code {
                    $($code => Some(Reason::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

reasons! {
    /// A field or parameter is missing, malformed or out of range (400).
    InvalidRequest = "invalid_request",
    /// The body is not JSON, repeats a key, or is not an object (400).
    InvalidJson = "invalid_json",
    /// A body without `Content-Type: application/json` (415).
    UnsupportedMediaType = "unsupported_media_type",
    /// The body is larger than the route takes (413).
    BodyTooLarge = "body_too_large",
    /// The body did not arrive within its time (408).
    BodyTimeout = "body_timeout",
    /// An upload without `Content-Length` (411).
    LengthRequired = "length_required",
    /// The request target is too long (414).
    UriTooLong = "uri_too_long",
    /// Too many or too large header fields (431).
    HeadersTooLarge = "headers_too_large",
    /// No valid client certificate or API token (401).
    AuthenticationRequired = "authentication_required",
    /// A valid client certificate that `auth.allowed_clients` does not list (403).
    ClientCertificateNotAllowed = "client_certificate_not_allowed",
    /// A foreign `Origin`, or a non-loopback `Host` with authentication off (403).
    CrossSiteRefused = "cross_site_refused",
    /// Uploads are off, or the volume name does not match `volumes.upload_name_pattern` (403).
    UploadNotAllowed = "upload_not_allowed",
    /// No such route (404).
    RouteNotFound = "route_not_found",
    /// The route exists under other methods (405, with `Allow`).
    MethodNotAllowed = "method_not_allowed",
    /// No job with this id (404).
    JobNotFound = "job_not_found",
    /// No cache entry with this key (404).
    CacheEntryNotFound = "cache_entry_not_found",
    /// No volume of this name (404).
    VolumeNotFound = "volume_not_found",
    /// A request's `image` names no declared image (`[[images]]`) (400).
    UnknownImage = "unknown_image",
    /// The job is completed, failed or cancelled already (400 on cancel, as the Go service).
    JobTerminal = "job_terminal",
    /// A job, a deletion or an upload holds the volume name, or a running domain uses a clone's source (409).
    VolumeInUse = "volume_in_use",
    /// The volume exists and cannot be reused for this request (409).
    VolumeUnusable = "volume_unusable",
    /// The volume cannot be deleted or cloned: open, a golden image, another owner's (409).
    VolumeBlocked = "volume_blocked",
    /// An upload's or a clone's target volume exists already (409).
    VolumeExists = "volume_exists",
    /// A resize, or a clone's `size_gb`, smaller than the volume: volumes only grow (409).
    ShrinkRefused = "shrink_refused",
    /// An encrypted volume cannot be made as asked: the caller's libvirt secret is unknown, of
    /// another usage or private; libvirt does not answer; the image is not qcow2 or raw; the
    /// volume exists or is encrypted; an encrypted source cannot be cloned.
    EncryptionRefused = "encryption_refused",
    /// A job uses the cache entry (409).
    CacheEntryInUse = "cache_entry_in_use",
    /// A request with this `Idempotency-Key` is being stored right now; retry (409).
    IdempotencyKeyInFlight = "idempotency_key_in_flight",
    /// The `Idempotency-Key` was used for a different request (422).
    IdempotencyKeyReused = "idempotency_key_reused",
    /// An upload's content does not match `X-Content-SHA256` (422); a job's image does not
    /// match its checksum.
    ChecksumMismatch = "checksum_mismatch",
    /// The image's host requires a signed checksum manifest (`sources.trust`
    /// `require_signature`) and the request gave its own `checksum` (400); a job's image
    /// without a valid signature fails with this reason.
    SignatureRequired = "signature_required",
    /// A failed job's checksum could not be found: the manifest is missing or unreadable, or
    /// has no entry for the image's file name.
    ChecksumUnavailable = "checksum_unavailable",
    /// A failed job's checksum manifest has a signature that does not verify (bad, unknown
    /// key, expired or revoked key, SHA-1).
    SignatureInvalid = "signature_invalid",
    /// A failed job's image was refused: the header inspector, a corrupt or truncated
    /// compressed stream, a decompression bomb or an image over `cache.max_image_bytes`.
    ImageRejected = "image_rejected",
    /// The job queue is full (429, with `Retry-After`).
    QueueFull = "queue_full",
    /// Too many progress streams are open (429, with `Retry-After`).
    TooManyStreams = "too_many_streams",
    /// `volumes.upload_max_concurrent` uploads are in progress (429, with `Retry-After`).
    TooManyUploads = "too_many_uploads",
    /// The daemon is shutting down (503).
    ShuttingDown = "shutting_down",
    /// Not enough space for the volume (507).
    InsufficientStorage = "insufficient_storage",
    /// Anything else (500): the message says what.
    InternalError = "internal_error",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_and_serialize_as_themselves() {
        let mut seen = std::collections::HashSet::new();
        for reason in Reason::ALL {
            let code = reason.as_str();
            assert!(
                code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code}"
            );
            assert!(seen.insert(code), "{code} twice");
            assert_eq!(serde_json::to_value(reason).unwrap(), code);
        }
    }

    #[test]
    fn every_job_failure_reason_is_a_reason() {
        for code in crate::jobs::FAILURE_REASONS {
            assert!(Reason::from_code(code).is_some(), "{code}");
        }
    }
}
