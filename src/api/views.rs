//! The API's response bodies for jobs: `StatusResponse` (and its progress part) built from a
//! stored job, with the Go service's field names kept beside ours.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::image::ImageType;
use crate::jobs::model::{Job, JobKind, JobStatus, Stage};

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// A timestamp as the API writes it (RFC 3339, milliseconds, `Z`).
pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A job's progress as the API shows it (rounded; `overall_percent` for old clients).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProgressView {
    pub(crate) stage: Stage,
    pub(crate) percent: f64,
    /// The Go service's name of `percent`, kept for old clients.
    pub(crate) overall_percent: f64,
    pub(crate) stage_percent: f64,
    pub(crate) bytes_processed: u64,
    pub(crate) bytes_total: u64,
    pub(crate) eta_seconds: Option<f64>,
}

/// The job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StatusResponse {
    pub(crate) job_id: Uuid,
    pub(crate) kind: JobKind,
    pub(crate) status: JobStatus,
    pub(crate) progress: ProgressView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) queue_position: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) correlation_id: Option<String>,
    pub(crate) cache_hit: bool,
    /// How a cache hit was confirmed (see the job model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cache_revalidation: Option<String>,
    pub(crate) image_url: String,
    pub(crate) image_type: ImageType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) volume_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) volume_size_gb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) image_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) volume_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) requested_by: Option<String>,
    pub(crate) created_at: String,
    pub(crate) updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) finished_at: Option<String>,
}

impl StatusResponse {
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
            correlation_id: job.spec.correlation_id.clone(),
            cache_hit: job.cache_hit,
            cache_revalidation: job.cache_revalidation.clone(),
            image_url: job.spec.image_url.clone(),
            image_type: job.spec.image_type,
            volume_name: job.spec.volume_name.clone(),
            volume_size_gb: job.spec.volume_size_gb,
            image_path: (job.status == JobStatus::Completed)
                .then(|| job.image_path.clone())
                .flatten(),
            volume_path: (job.status == JobStatus::Completed && job.kind == JobKind::Provision)
                .then(|| job.volume_path.clone())
                .flatten(),
            requested_by: job.requested_by.clone(),
            created_at: rfc3339(job.created_at),
            updated_at: rfc3339(job.updated_at),
            started_at: job.started_at.map(rfc3339),
            finished_at: job.finished_at.map(rfc3339),
        }
    }
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
        assert_eq!(s["progress"]["percent"], 100.0);
        assert_eq!(s["progress"]["overall_percent"], 100.0);
    }
}
