//! Why a job did not complete: one type for every step's failure and for the ways a job is
//! stopped. Its `Display` is the `error` the API shows; the engine decides a job's final status
//! from the variant, never from the text.

use std::time::Duration;

use crate::convert::ConvertError;
use crate::image::cache::FetchError;
use crate::image::inspect::InspectError;
use crate::image::resolved::RequestError;
use crate::image::source::InvalidSource;
use crate::jobs::store::StoreError;
use crate::volume::VolumeError;

/// A job's failure, as stored with the job and shown by the API.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    /// The job record lacks what its kind needs (a record written by a broken client or an
    /// older version).
    #[error("invalid job: {0}")]
    InvalidSpec(&'static str),
    /// The image URL is no longer accepted (settings changed since submission).
    #[error("{0}")]
    Source(#[from] InvalidSource),
    /// The request and its checksum are no longer accepted (settings changed since submission).
    #[error("{0}")]
    Request(#[from] RequestError),
    #[error("{0}")]
    Fetch(#[from] FetchError),
    #[error("image rejected: {0}")]
    Rejected(#[from] InspectError),
    /// The image's disk is larger than the volume asked for.
    #[error(
        "image virtual size {virtual_size} bytes does not fit the volume of {volume_bytes} bytes \
         ({volume_gb} GiB); ask for a larger volume_size_gb"
    )]
    TooLarge {
        virtual_size: u64,
        volume_bytes: u64,
        volume_gb: u64,
    },
    /// The volume that exists (or was just created, rounded to extents) is smaller than the
    /// image; nothing was written to it.
    #[error(
        "image virtual size {virtual_size} bytes does not fit volume {volume} of {volume_bytes} \
         bytes; the volume is left untouched"
    )]
    VolumeTooSmall {
        virtual_size: u64,
        volume: String,
        volume_bytes: u64,
    },
    #[error("{0}")]
    Volume(#[from] VolumeError),
    #[error("{0}")]
    Convert(#[from] ConvertError),
    #[error("flushing volume {volume}: {source}")]
    Flush { volume: String, source: VolumeError },
    /// The job's state could not be written to the store: it is stopped rather than left
    /// running unrecorded.
    #[error("the job's state cannot be recorded ({0}); the job was stopped")]
    Store(#[from] StoreError),
    /// A step noticed the stop request (cancel, timeout, shutdown); the engine replaces this
    /// with the reason.
    #[error("stopped")]
    Stopped,
    #[error("cancelled by request")]
    Cancelled,
    #[error("timed out after {} (jobs.timeout)", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error("interrupted by daemon shutdown")]
    Shutdown,
    #[error("interrupted by daemon restart")]
    Restarted,
    /// The job failed and removing the volume it created failed as well.
    #[error("{error}; rollback failed: {rollback}")]
    RollbackFailed {
        error: Box<JobError>,
        rollback: VolumeError,
    },
}

impl JobError {
    /// Every code `reason` returns (each one an API `Reason`, checked there).
    #[cfg(test)]
    pub(crate) const REASONS: [&'static str; 6] = [
        "encryption_refused",
        "image_rejected",
        "checksum_mismatch",
        "checksum_unavailable",
        "signature_required",
        "signature_invalid",
    ];

    /// The API's `reason` code of this failure, when clients decide on its cause: the image
    /// was refused (inspector, corrupt or truncated compressed stream, decompression bomb,
    /// too large), its checksum did not match or could not be found, or its signature is
    /// missing or invalid.
    pub(crate) fn reason(&self) -> Option<&'static str> {
        match self {
            JobError::Rejected(_)
            | JobError::Fetch(
                FetchError::Rejected(_) | FetchError::Unwrap(_) | FetchError::TooLarge { .. },
            ) => Some("image_rejected"),
            JobError::Fetch(e) => match e.kind() {
                k @ ("checksum_mismatch"
                | "checksum_unavailable"
                | "signature_required"
                | "signature_invalid") => Some(k),
                _ => None,
            },
            JobError::Request(RequestError::SignatureRequired(_)) => Some("signature_required"),
            JobError::Volume(VolumeError::EncryptionRefused(_)) => Some("encryption_refused"),
            JobError::RollbackFailed { error, .. } => error.reason(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_what_the_api_shows() {
        assert_eq!(
            JobError::TimedOut(Duration::from_secs(90)).to_string(),
            "timed out after 1m 30s (jobs.timeout)"
        );
        let e = JobError::RollbackFailed {
            error: Box::new(JobError::Restarted),
            rollback: VolumeError::Conflict("volume v is open".into()),
        };
        assert_eq!(
            e.to_string(),
            "interrupted by daemon restart; rollback failed: volume v is open"
        );
    }
}
