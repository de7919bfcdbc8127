//! A running job's record plus its progress tracker. Progress is written to the store at most
//! every 250 ms without waiting for disk; state that matters for recovery (volume ownership) is
//! written durably. When the store refuses a write, the job is stopped (its cancellation token
//! fires) and the store's error is kept, so the job fails instead of running on unrecorded.

use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::model::{Job, JobKind};
use super::progress::{ProgressTracker, StageRates, StageSample};
use super::store::{Store, StoreError};
use crate::telemetry::metrics::metrics;

/// How often a running job's progress is written to the store.
const PROGRESS_PERSIST_INTERVAL: Duration = Duration::from_millis(250);

/// A running job: its record, its progress, and where both are written.
pub(crate) struct JobHandle {
    store: Store,
    pub(super) job: Job,
    pub(super) tracker: ProgressTracker,
    last_persist: Instant,
    /// Fired when a write fails, to stop the job's steps.
    cancel: CancellationToken,
    /// The first write the store refused.
    store_error: Option<StoreError>,
}

impl JobHandle {
    /// A handle for `job`; progress rates come from the stored stage history.
    pub(crate) fn new(store: Store, job: Job, cancel: CancellationToken) -> JobHandle {
        let download = store.stage_samples("download").unwrap_or_default();
        let convert = store.stage_samples("convert").unwrap_or_default();
        let with_convert = job.kind == JobKind::Provision;
        JobHandle {
            tracker: ProgressTracker::new(
                StageRates::from_history(&download, &convert),
                with_convert,
                Instant::now(),
            ),
            store,
            job,
            last_persist: Instant::now(),
            cancel,
            store_error: None,
        }
    }

    /// The record with its latest progress, and the store's error if a write failed.
    pub(crate) fn finish(mut self) -> (Job, Option<StoreError>) {
        self.job.progress = self.tracker.progress().clone();
        (self.job, self.store_error)
    }

    /// Copies the tracker into the job and writes it if enough time passed (or `force`).
    pub(super) fn publish(&mut self, force: bool) {
        let now = Instant::now();
        if !force && now.duration_since(self.last_persist) < PROGRESS_PERSIST_INTERVAL {
            return;
        }
        self.last_persist = now;
        self.sync_record();
        if let Err(e) = self.store.put_job_nowait(&self.job) {
            self.stop_on(e);
        }
    }

    /// Writes the record and waits until it is on disk.
    pub(super) async fn save_durably(&mut self) -> Result<(), StoreError> {
        self.sync_record();
        self.store.put_job(&self.job, true).await
    }

    fn sync_record(&mut self) {
        self.job.progress = self.tracker.progress().clone();
        self.job.updated_at = Utc::now();
    }

    fn stop_on(&mut self, e: StoreError) {
        if self.store_error.is_none() {
            tracing::error!(error = %e, "cannot record the job's progress; stopping the job");
            self.store_error = Some(e);
            self.cancel.cancel();
        }
    }

    /// Records a finished stage's throughput (metrics and the history progress estimates use).
    pub(super) fn record_stage(&self, stage: &str, bytes: u64, seconds: f64) {
        if bytes == 0 || seconds <= 0.0 {
            return;
        }
        metrics()
            .stage_duration_seconds
            .with_label_values(&[stage])
            .observe(seconds);
        if let Err(e) = self
            .store
            .record_stage(stage, StageSample { bytes, seconds })
        {
            tracing::warn!(error = %e, stage, "cannot record stage measurement");
        }
    }
}
