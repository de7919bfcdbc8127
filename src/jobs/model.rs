//! Job model: what a job asks for, its status state machine, its progress, and the record
//! stored in sled and served as the API's StatusResponse.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Status of a job. `completed`, `failed` and `cancelled` are terminal and never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The transitions of the state machine.
    pub fn can_become(self, to: JobStatus) -> bool {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Fetch an image and write it into a volume.
    Provision,
    /// Fetch an image into the cache only (prefetch).
    CacheFetch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageType {
    Qcow2,
    Raw,
}

impl ImageType {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageType::Qcow2 => "qcow2",
            ImageType::Raw => "raw",
        }
    }
}

impl fmt::Display for ImageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stages a job reports, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Initializing,
    Downloading,
    Converting,
    Finalizing,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Initializing => "initializing",
            Stage::Downloading => "downloading",
            Stage::Converting => "converting",
            Stage::Finalizing => "finalizing",
        }
    }
}

/// Progress as reported to clients (see the monitoring spec, "Progress Reporting").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub stage: Stage,
    /// Overall percent (0..=100); never decreases.
    pub percent: f64,
    /// Percent of the current stage.
    pub stage_percent: f64,
    pub bytes_processed: u64,
    pub bytes_total: u64,
    /// Estimated seconds to completion; `None` while unknown.
    pub eta_seconds: Option<f64>,
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

/// What a job asks for (validated before the job exists).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub image_url: String,
    pub image_type: ImageType,
    /// Volume to write (provision jobs only).
    pub volume_name: Option<String>,
    pub volume_size_gb: Option<u64>,
    pub correlation_id: Option<String>,
}

/// Whether the job's volume existed before the job, so rollback never deletes what it did not make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VolumeOwnership {
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

/// The stored job record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: Uuid,
    /// Submission order (FIFO across restarts).
    pub seq: u64,
    pub kind: JobKind,
    pub status: JobStatus,
    pub spec: JobSpec,
    pub progress: Progress,
    pub error: Option<String>,
    pub cache_hit: bool,
    pub image_path: Option<String>,
    pub volume_path: Option<String>,
    pub volume_ownership: VolumeOwnership,
    /// Identity of the authenticated caller.
    pub requested_by: Option<String>,
    /// W3C trace context of the request that created the job.
    #[serde(default)]
    pub trace_context: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A refused state change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job cannot go from {from} to {to}")]
pub struct InvalidTransition {
    pub from: JobStatus,
    pub to: JobStatus,
}

impl Job {
    pub fn new(id: Uuid, seq: u64, kind: JobKind, spec: JobSpec, now: DateTime<Utc>) -> Job {
        Job {
            id,
            seq,
            kind,
            status: JobStatus::Pending,
            spec,
            progress: Progress::default(),
            error: None,
            cache_hit: false,
            image_path: None,
            volume_path: None,
            volume_ownership: VolumeOwnership::None,
            requested_by: None,
            trace_context: BTreeMap::new(),
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
        }
    }

    /// Moves the job along the state machine; terminal states are immutable.
    pub fn transition(
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
                self.error = error;
            }
            JobStatus::Pending => {}
        }
        Ok(())
    }

    /// The API's StatusResponse for this job.
    pub fn to_status(&self, queue_position: Option<usize>) -> StatusResponse {
        let p = &self.progress;
        StatusResponse {
            job_id: self.id,
            kind: self.kind,
            status: self.status,
            progress: ProgressView {
                stage: p.stage,
                percent: round1(p.percent),
                overall_percent: round1(p.percent),
                stage_percent: round1(p.stage_percent),
                bytes_processed: p.bytes_processed,
                bytes_total: p.bytes_total,
                eta_seconds: p.eta_seconds.map(|s| s.round()),
            },
            queue_position: if self.status == JobStatus::Pending {
                queue_position
            } else {
                None
            },
            error: self.error.clone(),
            correlation_id: self.spec.correlation_id.clone(),
            cache_hit: self.cache_hit,
            image_url: self.spec.image_url.clone(),
            image_type: self.spec.image_type,
            volume_name: self.spec.volume_name.clone(),
            volume_size_gb: self.spec.volume_size_gb,
            image_path: (self.status == JobStatus::Completed)
                .then(|| self.image_path.clone())
                .flatten(),
            volume_path: (self.status == JobStatus::Completed && self.kind == JobKind::Provision)
                .then(|| self.volume_path.clone())
                .flatten(),
            requested_by: self.requested_by.clone(),
            created_at: rfc3339(self.created_at),
            updated_at: rfc3339(self.updated_at),
            started_at: self.started_at.map(rfc3339),
            finished_at: self.finished_at.map(rfc3339),
        }
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[derive(Debug, Clone, Serialize)]
pub struct ProgressView {
    pub stage: Stage,
    pub percent: f64,
    /// The Go service's name of `percent`, kept for old clients.
    pub overall_percent: f64,
    pub stage_percent: f64,
    pub bytes_processed: u64,
    pub bytes_total: u64,
    pub eta_seconds: Option<f64>,
}

/// The job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StatusResponse {
    pub job_id: Uuid,
    pub kind: JobKind,
    pub status: JobStatus,
    pub progress: ProgressView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub cache_hit: bool,
    pub image_url: String,
    pub image_type: ImageType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_size_gb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job::new(
            Uuid::new_v4(),
            1,
            JobKind::Provision,
            JobSpec {
                image_url: "file:///x.qcow2".into(),
                image_type: ImageType::Qcow2,
                volume_name: Some("v".into()),
                volume_size_gb: Some(1),
                correlation_id: None,
            },
            Utc::now(),
        )
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

    #[test]
    fn status_response_fields() {
        let mut j = job();
        let s = serde_json::to_value(j.to_status(Some(3))).unwrap();
        assert_eq!(s["status"], "pending");
        assert_eq!(s["queue_position"], 3);
        assert_eq!(s["progress"]["stage"], "initializing");
        assert_eq!(s["kind"], "provision");
        j.volume_path = Some("/dev/vg0/v".into());
        j.transition(JobStatus::Running, None, Utc::now()).unwrap();
        let s = serde_json::to_value(j.to_status(Some(3))).unwrap();
        assert!(s.get("queue_position").is_none());
        assert!(
            s.get("volume_path").is_none(),
            "only completed jobs show it"
        );
        j.transition(JobStatus::Completed, None, Utc::now())
            .unwrap();
        let s = serde_json::to_value(j.to_status(None)).unwrap();
        assert_eq!(s["volume_path"], "/dev/vg0/v");
        assert_eq!(s["progress"]["percent"], 100.0);
        assert_eq!(s["progress"]["overall_percent"], 100.0);
    }
}
