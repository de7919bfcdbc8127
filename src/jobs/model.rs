//! Job model: what a job asks for, its status state machine, its progress, and the record
//! stored in sled and served as the API's StatusResponse.

use std::collections::BTreeMap;
use std::fmt;

use crate::volume::encrypt::{EncryptionSpec, KeyRecord};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub(crate) use crate::image::ImageType;

/// Status of a job. `completed`, `failed` and `cancelled` are terminal and never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum JobStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub(crate) const ALL: [JobStatus; 5] = [
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub(crate) fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The transitions of the state machine.
    pub(crate) fn can_become(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Pending, Running)
                | (Pending, Cancelled)
                | (Running, Completed)
                | (Running, Failed)
                | (Running, Cancelled)
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum JobKind {
    /// Fetch an image and write it into a volume.
    Provision,
    /// Fetch an image into the cache only (prefetch).
    CacheFetch,
    /// Wipe a volume, then remove it (a `DELETE` whose wipe runs long).
    Wipe,
    /// Make a new volume as a copy of an existing one (`POST /api/v1/volumes/{name}/clone`).
    Clone,
}

impl JobKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            JobKind::Provision => "provision",
            JobKind::CacheFetch => "cache_fetch",
            JobKind::Wipe => "wipe",
            JobKind::Clone => "clone",
        }
    }
}

/// The stages a job reports, in order.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Stage {
    Initializing,
    Downloading,
    Converting,
    Finalizing,
}

/// Progress as reported to clients (see the monitoring spec, "Progress Reporting").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Progress {
    pub(crate) stage: Stage,
    /// Overall percent (0..=100); never decreases.
    pub(crate) percent: f64,
    /// Percent of the current stage.
    pub(crate) stage_percent: f64,
    pub(crate) bytes_processed: u64,
    pub(crate) bytes_total: u64,
    /// Estimated seconds to completion; `None` while unknown.
    pub(crate) eta_seconds: Option<f64>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            stage: Stage::Initializing,
            percent: 0.0,
            stage_percent: 0.0,
            bytes_processed: 0,
            bytes_total: 0,
            eta_seconds: None,
        }
    }
}

/// What a job asks for (validated before the job exists). `Default`: nothing asked (each
/// kind of job sets what it needs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct JobSpec {
    /// The image fetched: the request's `image_url`, or the URL of the declared image named.
    pub(crate) image_url: String,
    /// The declared image (`[[images]]`) the request named instead of an `image_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) image: Option<String>,
    /// The declared format, checked against the inspected image (a mismatch fails the job).
    /// Provision jobs always declare one (`qcow2` when the request names none); a cache fetch
    /// without `image_type` declares none and takes the image as it is found.
    pub(crate) image_type: Option<ImageType>,
    /// Volume to write (provision jobs only).
    pub(crate) volume_name: Option<String>,
    pub(crate) volume_size_gb: Option<u64>,
    pub(crate) correlation_id: Option<String>,
    /// The digest the image must match (`sha256:<hex>`, `sha512:<hex>`); absent from records
    /// (and idempotency hashes) of requests without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) checksum: Option<String>,
    /// A checksum manifest listing the image by its file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) checksum_url: Option<String>,
    /// Clone jobs only: the volume copied into `volume_name` (absent from other jobs' records,
    /// so their idempotency hashes stay as they were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) clone: Option<CloneSpec>,
    /// Provision and clone jobs: make the volume encrypted (absent from other records, as
    /// `clone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) encryption: Option<EncryptionSpec>,
}

impl JobSpec {
    /// Every volume name the job holds while pending or running: its volume and, for a clone,
    /// the source.
    pub(crate) fn held_volumes(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.volume_name.iter().map(String::as_str).collect();
        if let Some(c) = &self.clone {
            names.push(&c.source);
        }
        names
    }
}

/// What a clone job copies (`volume_name` is the target, `volume_size_gb` its size when given).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CloneSpec {
    /// The existing volume to copy.
    pub(crate) source: String,
    /// Copy the source even while a running domain uses it (crash-consistent at best).
    #[serde(default)]
    pub(crate) allow_in_use: bool,
}

/// Whether the job's volume existed before the job, so rollback never deletes what it did not make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum VolumeOwnership {
    /// No volume touched yet.
    #[default]
    None,
    /// The job is about to create the volume (recorded before the create command runs, so a
    /// crash in between still lets restart recovery remove it).
    Creating,
    /// The job created the volume.
    Created,
    /// The volume existed and is being overwritten; it is never removed by rollback.
    Reused,
}

/// How a provision job gave its volume the image's content (`method` in the job status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum VolumeMethod {
    /// A thin snapshot of the image's golden LV (`volumes.lvm.golden_images`).
    ThinSnapshot,
    /// A reflink copy of the image's golden file (`volumes.directory.golden_images`, on a file
    /// system that shares extents).
    Reflink,
    /// `qemu-img convert` into the volume (new or reused).
    Copy,
}

impl VolumeMethod {
    pub(crate) const ALL: [VolumeMethod; 3] = [
        VolumeMethod::ThinSnapshot,
        VolumeMethod::Reflink,
        VolumeMethod::Copy,
    ];

    /// The `method` label of `volumes_created_total`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            VolumeMethod::ThinSnapshot => "thin-snapshot",
            VolumeMethod::Reflink => "reflink",
            VolumeMethod::Copy => "copy",
        }
    }

    /// How a clone store's clones are made.
    pub(crate) fn of_clones(method: crate::volume::clones::CloneMethod) -> VolumeMethod {
        match method {
            crate::volume::clones::CloneMethod::ThinSnapshot => VolumeMethod::ThinSnapshot,
            crate::volume::clones::CloneMethod::Reflink => VolumeMethod::Reflink,
        }
    }
}

/// The stored job record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Job {
    pub(crate) id: Uuid,
    /// Submission order (FIFO across restarts).
    pub(crate) seq: u64,
    pub(crate) kind: JobKind,
    pub(crate) status: JobStatus,
    pub(crate) spec: JobSpec,
    pub(crate) progress: Progress,
    pub(crate) error: Option<String>,
    /// The `reason` code of a failure whose cause clients decide on (`JobError::reason`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    pub(crate) cache_hit: bool,
    /// How a cache hit was confirmed: `not_needed` (within `cache.revalidate_interval`),
    /// `revalidated` (one request to the source), `source_unavailable` (served without it).
    #[serde(default)]
    pub(crate) cache_revalidation: Option<String>,
    /// `sha256:<hex>` of the image the job used, once it is in the cache.
    #[serde(default)]
    pub(crate) image_digest: Option<String>,
    pub(crate) image_path: Option<String>,
    /// The image's format as the inspector found it, once the image is in the cache (records
    /// of older versions: none).
    #[serde(default)]
    pub(crate) image_format: Option<ImageType>,
    /// What the image was checked against, once it is in the cache (none: no checksum).
    #[serde(default)]
    pub(crate) verified: Option<crate::image::verify::Verified>,
    pub(crate) volume_path: Option<String>,
    pub(crate) volume_ownership: VolumeOwnership,
    /// How the volume got its content, once the job chose (records of older versions: none).
    #[serde(default)]
    pub(crate) method: Option<VolumeMethod>,
    /// Where the key of the encrypted volume the job made is (never the passphrase), once the
    /// job made it: rollback forgets it with the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) encryption: Option<KeyRecord>,
    /// Identity of the authenticated caller.
    pub(crate) requested_by: Option<String>,
    /// W3C trace context of the request that created the job.
    #[serde(default)]
    pub(crate) trace_context: BTreeMap<String, String>,
    /// The `Idempotency-Key` the job was submitted with (removed with the job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) idempotency: Option<IdempotencyKey>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) started_at: Option<DateTime<Utc>>,
    pub(crate) finished_at: Option<DateTime<Utc>>,
}

/// A refused state change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job cannot go from {from} to {to}")]
pub(crate) struct InvalidTransition {
    pub(crate) from: JobStatus,
    pub(crate) to: JobStatus,
}

impl Job {
    pub(crate) fn new(id: Uuid, seq: u64, kind: JobKind, spec: JobSpec, now: DateTime<Utc>) -> Job {
        Job {
            id,
            seq,
            kind,
            status: JobStatus::Pending,
            spec,
            progress: Progress::default(),
            error: None,
            reason: None,
            cache_hit: false,
            cache_revalidation: None,
            image_digest: None,
            image_path: None,
            image_format: None,
            verified: None,
            volume_path: None,
            volume_ownership: VolumeOwnership::None,
            method: None,
            encryption: None,
            requested_by: None,
            trace_context: BTreeMap::new(),
            idempotency: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
        }
    }

    /// Whether the job made its volume (rollback may remove it; never a reused one).
    pub(crate) fn owns_volume(&self) -> bool {
        matches!(
            self.volume_ownership,
            VolumeOwnership::Creating | VolumeOwnership::Created
        )
    }

    /// Moves the job along the state machine; terminal states are immutable.
    pub(crate) fn transition(
        &mut self,
        to: JobStatus,
        error: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<(), InvalidTransition> {
        if !self.status.can_become(to) {
            return Err(InvalidTransition {
                from: self.status,
                to,
            });
        }
        self.status = to;
        self.updated_at = now;
        match to {
            JobStatus::Running => self.started_at = Some(now),
            JobStatus::Completed => {
                self.finished_at = Some(now);
                self.progress.stage = Stage::Finalizing;
                self.progress.percent = 100.0;
                self.progress.stage_percent = 100.0;
                self.progress.eta_seconds = Some(0.0);
            }
            JobStatus::Failed | JobStatus::Cancelled => {
                self.finished_at = Some(now);
                self.progress.eta_seconds = None;
                // Errors quote remote text (an image server's error body): stored escaped.
                self.error = error.map(|e| crate::text::escape(&e).into_owned());
            }
            JobStatus::Pending => {}
        }
        Ok(())
    }
}

/// A submission's key, scoped to the caller and the job kind, with the hash of its request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IdempotencyKey {
    /// `kind`, caller identity and key, one per line: the index key.
    pub(crate) scoped: String,
    /// SHA-256 (hex) of the validated request (kind and spec).
    pub(crate) request_hash: String,
}

impl IdempotencyKey {
    /// The key `key` sent by `caller` for a `kind` job asking for `spec`.
    pub(crate) fn new(key: &str, caller: Option<&str>, kind: JobKind, spec: &JobSpec) -> Self {
        let kind = kind.as_str();
        let request = serde_json::to_vec(&(kind, spec)).unwrap_or_default();
        IdempotencyKey {
            scoped: format!("{kind}\n{}\n{key}", caller.unwrap_or("")),
            request_hash: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&request)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A pending provision job of 1 GiB from a file URL.
    pub(crate) fn job() -> Job {
        Job::new(
            Uuid::new_v4(),
            1,
            JobKind::Provision,
            JobSpec {
                image_url: "file:///x.qcow2".into(),
                image_type: Some(ImageType::Qcow2),
                volume_name: Some("v".into()),
                volume_size_gb: Some(1),
                ..JobSpec::default()
            },
            Utc::now(),
        )
    }

    #[test]
    fn records_without_a_method_load() {
        let mut j = job();
        let mut v = serde_json::to_value(&j).unwrap();
        v.as_object_mut().unwrap().remove("method");
        let old: Job = serde_json::from_value(v).unwrap();
        assert_eq!(old.method, None);
        j.method = Some(VolumeMethod::ThinSnapshot);
        let v = serde_json::to_value(&j).unwrap();
        assert_eq!(v["method"], "thin-snapshot");
        assert_eq!(
            serde_json::to_value(VolumeMethod::Copy).unwrap(),
            VolumeMethod::Copy.as_str()
        );
    }

    #[test]
    fn allowed_transitions() {
        use JobStatus::*;
        for (from, to, ok) in [
            (Pending, Running, true),
            (Pending, Cancelled, true),
            (Pending, Completed, false),
            (Pending, Failed, false),
            (Running, Completed, true),
            (Running, Failed, true),
            (Running, Cancelled, true),
            (Running, Pending, false),
        ] {
            assert_eq!(from.can_become(to), ok, "{from} -> {to}");
        }
    }

    #[test]
    fn terminal_states_are_immutable() {
        for terminal in [
            JobStatus::Completed,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ] {
            for to in JobStatus::ALL {
                assert!(!terminal.can_become(to), "{terminal} -> {to}");
            }
        }
        let mut j = job();
        j.transition(JobStatus::Running, None, Utc::now()).unwrap();
        j.transition(
            JobStatus::Cancelled,
            Some("cancelled by request".into()),
            Utc::now(),
        )
        .unwrap();
        // The worker finishing afterwards must not overwrite the cancellation.
        let err = j
            .transition(JobStatus::Failed, Some("boom".into()), Utc::now())
            .unwrap_err();
        assert_eq!(err.from, JobStatus::Cancelled);
        assert_eq!(j.status, JobStatus::Cancelled);
        assert_eq!(j.error.as_deref(), Some("cancelled by request"));
        assert!(
            j.transition(JobStatus::Completed, None, Utc::now())
                .is_err()
        );
    }
}
