//! The API's response bodies: `StatusResponse` (and its progress part) built from a stored
//! job, with the Go service's field names kept beside ours, and the typed body of every other
//! route. The OpenAPI document (`openapi.rs`) is generated from these types.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::image::ImageType;
use crate::jobs::model::{Job, JobKind, JobStatus, Stage, VolumeMethod};

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// A timestamp as the API writes it (RFC 3339, milliseconds, `Z`).
pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Which names of the job states a route shows. The Go service's paths (`GET
/// /api/v1/status/{id}`, `POST /api/v1/provision`, `POST /provision`, `DELETE
/// /api/v1/cancel/{id}`) show the states its clients know: it had no `cancelled` and reported a
/// cancelled job as `failed`. Every other route shows `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateNames {
    Ours,
    GoService,
}

impl StateNames {
    /// `status` as this route shows it.
    pub(crate) fn show(self, status: JobStatus) -> JobStatus {
        match (self, status) {
            (StateNames::GoService, JobStatus::Cancelled) => JobStatus::Failed,
            _ => status,
        }
    }
}

/// A job's progress as the API shows it (rounded; `overall_percent` for old clients).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct ProgressView {
    pub(crate) stage: Stage,
    /// Overall percent (0..=100); never decreases.
    #[schema(minimum = 0, maximum = 100)]
    pub(crate) percent: f64,
    /// The Go service's name of `percent`, kept for old clients.
    #[schema(minimum = 0, maximum = 100)]
    pub(crate) overall_percent: f64,
    #[schema(minimum = 0, maximum = 100)]
    pub(crate) stage_percent: f64,
    pub(crate) bytes_processed: u64,
    pub(crate) bytes_total: u64,
    /// Estimated seconds to completion; `null` while unknown.
    pub(crate) eta_seconds: Option<f64>,
}

/// The job as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct StatusResponse {
    pub(crate) job_id: Uuid,
    pub(crate) kind: JobKind,
    pub(crate) status: JobStatus,
    pub(crate) progress: ProgressView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) queue_position: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// For a failed job whose cause clients decide on: a `Reason` code (`image_rejected`,
    /// `checksum_mismatch`, `checksum_unavailable`, `signature_required`, `signature_invalid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<super::reason::Reason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) correlation_id: Option<String>,
    pub(crate) cache_hit: bool,
    /// How a cache hit was confirmed (see the job model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cache_revalidation: Option<String>,
    pub(crate) image_url: String,
    /// The declared image (`[[images]]`) the request named, when it named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) image: Option<String>,
    /// `sha256:<hex>` of the image the job used (the version a declared name pointed at when
    /// the job fetched it), once it is in the cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) image_digest: Option<String>,
    /// The declared format; for a cache fetch that declared none, the format found once the
    /// image is in the cache (absent before).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) image_type: Option<ImageType>,
    /// The format the inspector found, once the image is in the cache. A job whose declared
    /// `image_type` differs fails (`image_type is qcow2 but the image is raw`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) image_format: Option<ImageType>,
    /// What the image was checked against (`digest`, `signed_by` when a signed manifest
    /// named it, `manifest`), once it is in the cache; absent when nothing named a checksum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) verified: Option<crate::image::verify::Verified>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) volume_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) volume_size_gb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) image_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) volume_path: Option<String>,
    /// How the volume got its content (`thin-snapshot` or `copy`), once the job chose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) method: Option<VolumeMethod>,
    /// Where the encrypted volume's key is (`format`, and `secret_uuid` for the domain's
    /// `<encryption>` element, or `key_file`), once the job made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) encryption: Option<crate::volume::encrypt::KeyRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) requested_by: Option<String>,
    pub(crate) created_at: String,
    pub(crate) updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) finished_at: Option<String>,
}

/// `GET /health`: liveness and load.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct HealthResponse {
    /// `degraded` when every job slot is busy.
    pub(crate) status: HealthStatus,
    pub(crate) timestamp: String,
    /// `v` and the version.
    pub(crate) version: &'static str,
    /// Time since start, as Go prints durations (`3h14m52s`).
    pub(crate) uptime: String,
    pub(crate) jobs: JobLoad,
}

/// Whether a job slot is free.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum HealthStatus {
    Healthy,
    Degraded,
}

/// Running jobs and job slots.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobLoad {
    pub(crate) running: usize,
    pub(crate) slots: usize,
}

/// `GET /readyz`: each dependency in use and whether it is up.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReadyResponse {
    /// `ready` (200) or `unready` (503).
    pub(crate) status: &'static str,
    /// `storage`, and `lvm`, `minio`, `libvirt` when in use.
    pub(crate) dependencies: BTreeMap<&'static str, bool>,
}

/// A submission's answer: the job and its status (`pending` for a new job).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Accepted {
    pub(crate) job_id: Uuid,
    pub(crate) status: JobStatus,
}

/// `GET /api/v1/jobs`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobList {
    /// Jobs in this answer (newest first).
    pub(crate) count: usize,
    pub(crate) jobs: Vec<StatusResponse>,
}

/// A cancellation's answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CancelResponse {
    /// `cancelled`, or `cancelling` while a running job still winds down.
    pub(crate) status: &'static str,
    pub(crate) job_id: Uuid,
}

/// One cache entry.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CacheImage {
    /// 64 lowercase hex digits.
    pub(crate) key: String,
    #[schema(value_type = String)]
    pub(crate) path: std::path::PathBuf,
    /// Bytes of the cached file (for a compressed source, the decompressed image).
    pub(crate) size: u64,
    /// SHA-256 of the object as downloaded: what a given `checksum`, a manifest or a `.sha256`
    /// names (for a compressed source, the compressed file).
    pub(crate) checksum: String,
    /// The wrapper unwrapped on the way in (`gzip`, `xz`, `bzip2`, `zstd`); absent: the image
    /// is stored as downloaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) compression: Option<crate::image::cache::Compression>,
    /// SHA-256 of the image stored (the decompressed content), when it differs from `checksum`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) content_sha256: Option<String>,
    /// Whether the download was checked against a digest (given, a manifest, a `.sha256`).
    pub(crate) checksum_verified: bool,
    /// What it was checked against, and who signed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) verified: Option<crate::image::verify::Verified>,
    pub(crate) image_url: String,
    pub(crate) format: ImageType,
    pub(crate) virtual_size: u64,
    pub(crate) last_used: String,
    pub(crate) mod_time: String,
    /// Jobs using the entry now (it is not evicted meanwhile).
    pub(crate) in_use: usize,
}

/// `GET /api/v1/cache/images`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CacheList {
    pub(crate) images: Vec<CacheImage>,
    /// Entries in the cache (not only in this page).
    pub(crate) count: usize,
    pub(crate) offset: usize,
    pub(crate) limit: usize,
}

/// `DELETE /api/v1/cache/images/{key}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CacheDeleted {
    /// Always `deleted`.
    pub(crate) status: &'static str,
    pub(crate) key: String,
}

/// `DELETE /api/v1/volumes/{name}` (also when the volume did not exist).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VolumeDeleted {
    /// Always `deleted`.
    pub(crate) status: &'static str,
    pub(crate) volume: String,
}

/// `POST /api/v1/volumes/{name}/resize`: the volume's size now.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VolumeResized {
    pub(crate) volume: String,
    /// The size now, in bytes (rounded up to the backend's unit).
    pub(crate) size_bytes: u64,
    /// Whether a running (or paused) libvirt domain uses the volume and was told the new size
    /// (`blockresize`), so its guest sees it without a reboot.
    pub(crate) live: bool,
    /// That domain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) domain: Option<String>,
}

/// `GET /api/v1/config`: the effective configuration and the last reload.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ConfigResponse {
    /// Every setting, as `check-config` prints it (secrets redacted).
    #[schema(value_type = Object)]
    pub(crate) config: serde_json::Value,
    pub(crate) last_reload: Option<String>,
    /// `success` or `error`; `null` before the first reload.
    pub(crate) last_reload_result: Option<&'static str>,
    pub(crate) last_reload_error: Option<String>,
    /// Changed keys still running with their old value until a restart.
    pub(crate) pending_restart: Vec<String>,
}

/// `PUT /api/v1/volumes/{name}/content` (201).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Uploaded {
    /// Always `created`.
    pub(crate) status: &'static str,
    pub(crate) volume: String,
    pub(crate) volume_path: String,
    /// Bytes written.
    pub(crate) size: u64,
    /// SHA-256 of what was written (lowercase hex).
    pub(crate) sha256: String,
}

/// The body of an upload as the OpenAPI document describes it: the volume's bytes, at least one
/// (`Content-Length: 0` is 400). Written by hand: the derive takes no `min_length` for it.
pub(crate) struct UploadContent;

impl utoipa::PartialSchema for UploadContent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .content_media_type("application/octet-stream")
            .min_length(Some(1))
            .description(Some("the volume's content, at least one byte"))
            .into()
    }
}

impl utoipa::ToSchema for UploadContent {}

impl StatusResponse {
    /// The view of `job` with its state named as `names` name it (`GET /api/v1/status/{id}`).
    pub(crate) fn named(mut self, names: StateNames) -> StatusResponse {
        self.status = names.show(self.status);
        self
    }

    /// The API's view of `job`; `queue_position` is shown for pending jobs only.
    pub(crate) fn from_job(job: &Job, queue_position: Option<usize>) -> StatusResponse {
        let p = &job.progress;
        StatusResponse {
            job_id: job.id,
            kind: job.kind,
            status: job.status,
            progress: ProgressView {
                stage: p.stage,
                percent: round1(p.percent),
                overall_percent: round1(p.percent),
                stage_percent: round1(p.stage_percent),
                bytes_processed: p.bytes_processed,
                bytes_total: p.bytes_total,
                eta_seconds: p.eta_seconds.map(|s| s.round()),
            },
            queue_position: if job.status == JobStatus::Pending {
                queue_position
            } else {
                None
            },
            error: job.error.clone(),
            reason: job
                .reason
                .as_deref()
                .and_then(super::reason::Reason::from_code),
            correlation_id: job.spec.correlation_id.clone(),
            cache_hit: job.cache_hit,
            cache_revalidation: job.cache_revalidation.clone(),
            image_url: job.spec.image_url.clone(),
            image: job.spec.image.clone(),
            image_digest: job.image_digest.clone(),
            image_type: job.spec.image_type.or(job.image_format),
            image_format: job.image_format,
            verified: job.verified.clone(),
            volume_name: job.spec.volume_name.clone(),
            volume_size_gb: job.spec.volume_size_gb,
            image_path: (job.status == JobStatus::Completed)
                .then(|| job.image_path.clone())
                .flatten(),
            volume_path: (job.status == JobStatus::Completed
                && matches!(job.kind, JobKind::Provision | JobKind::Clone))
            .then(|| job.volume_path.clone())
            .flatten(),
            method: job.method,
            encryption: job.encryption.clone(),
            requested_by: job.requested_by.clone(),
            created_at: rfc3339(job.created_at),
            updated_at: rfc3339(job.updated_at),
            started_at: job.started_at.map(rfc3339),
            finished_at: job.finished_at.map(rfc3339),
        }
    }
}

/// One declared image (`[[images]]`) as `GET /api/v1/images` shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeclaredImageView {
    /// The declared name (what requests give as `image`).
    pub(crate) name: String,
    /// Where it comes from (credentials are never part of it).
    pub(crate) url: String,
    /// `sha256:<hex>` of the version the name points at; `null` before the first fetch.
    pub(crate) digest: Option<String>,
    /// Whether a version is in the cache (pinned there while declared).
    pub(crate) cached: bool,
    /// Whether its golden copy is built ahead of the first volume.
    pub(crate) golden: bool,
    /// When the source was last asked (RFC 3339); `null`: not yet.
    pub(crate) last_checked: Option<String>,
    /// When the name last moved to a new version; `null`: not since the daemon started.
    pub(crate) last_changed: Option<String>,
    /// When the source is asked next (a fetch, a refresh or a retry); `null`: never
    /// (`refresh = "0s"`) or running now.
    pub(crate) next_check: Option<String>,
    /// Why the last fetch or refresh failed; `null` after a success.
    pub(crate) last_error: Option<String>,
}

/// `GET /api/v1/images`: every declared image, by name.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DeclaredImageList {
    pub(crate) images: Vec<DeclaredImageView>,
}

/// The answer of `POST /api/v1/images/inspect`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct InspectResponse {
    pub(crate) image_url: String,
    #[serde(flatten)]
    pub(crate) verdict: crate::image::preflight::Preflight,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::model::tests::job;

    #[test]
    fn status_response_fields() {
        let mut j = job();
        let s = serde_json::to_value(StatusResponse::from_job(&j, Some(3))).unwrap();
        assert_eq!(s["status"], "pending");
        assert_eq!(s["queue_position"], 3);
        assert_eq!(s["progress"]["stage"], "initializing");
        assert_eq!(s["kind"], "provision");
        j.volume_path = Some("/dev/vg0/v".into());
        j.transition(JobStatus::Running, None, Utc::now()).unwrap();
        let s = serde_json::to_value(StatusResponse::from_job(&j, Some(3))).unwrap();
        assert!(s.get("queue_position").is_none());
        assert!(
            s.get("volume_path").is_none(),
            "only completed jobs show it"
        );
        j.transition(JobStatus::Completed, None, Utc::now())
            .unwrap();
        let s = serde_json::to_value(StatusResponse::from_job(&j, None)).unwrap();
        assert_eq!(s["volume_path"], "/dev/vg0/v");
        assert!(s.get("method").is_none());
        j.method = Some(VolumeMethod::Copy);
        let s = serde_json::to_value(StatusResponse::from_job(&j, None)).unwrap();
        assert_eq!(s["method"], "copy");
        assert_eq!(s["progress"]["percent"], 100.0);
        assert_eq!(s["progress"]["overall_percent"], 100.0);
    }

    #[test]
    fn the_go_services_paths_show_cancelled_as_failed() {
        for status in JobStatus::ALL {
            assert_eq!(StateNames::Ours.show(status), status);
            let go = StateNames::GoService.show(status);
            let expected = if status == JobStatus::Cancelled {
                JobStatus::Failed
            } else {
                status
            };
            assert_eq!(go, expected, "{status}");
        }
        let mut j = job();
        j.transition(
            JobStatus::Cancelled,
            Some("cancelled by request".into()),
            Utc::now(),
        )
        .unwrap();
        let view = StatusResponse::from_job(&j, None);
        let legacy = serde_json::to_value(view.clone().named(StateNames::GoService)).unwrap();
        assert_eq!(legacy["status"], "failed");
        assert_eq!(legacy["error"], "cancelled by request");
        let ours = serde_json::to_value(view.named(StateNames::Ours)).unwrap();
        assert_eq!(ours["status"], "cancelled");
    }

    #[test]
    fn image_type_is_declared_or_found() {
        let mut j = job();
        j.spec.image_type = None;
        let s = serde_json::to_value(StatusResponse::from_job(&j, None)).unwrap();
        assert!(s.get("image_type").is_none() && s.get("image_format").is_none());
        j.image_format = Some(ImageType::Raw);
        let s = serde_json::to_value(StatusResponse::from_job(&j, None)).unwrap();
        assert_eq!(
            (s["image_type"].clone(), s["image_format"].clone()),
            ("raw".into(), "raw".into())
        );
        j.spec.image_type = Some(ImageType::Qcow2);
        let s = serde_json::to_value(StatusResponse::from_job(&j, None)).unwrap();
        assert_eq!(
            (s["image_type"].clone(), s["image_format"].clone()),
            ("qcow2".into(), "raw".into())
        );
    }
}
