//! The job engine: accepts jobs (durably, before acknowledging them), keeps the bounded FIFO
//! queue and the per-volume locks, runs at most `jobs.max_concurrent` jobs, enforces the
//! per-job timeout, cancels (killing child processes and rolling back), recovers after a
//! restart and prunes old jobs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::error::JobError;
use super::handle::JobHandle;
use super::idempotency::IdempotencyKey;
use super::model::{Job, JobKind, JobSpec, JobStatus};
use super::runner::{self, RunContext};
use super::state::{Admission, Running, Shared, State};
pub(crate) use super::state::{Holder, StopReason};
use super::store::{Store, StoreError};
use crate::telemetry::metrics::metrics;
use crate::volume::VolumeError;

/// A refused submission.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SubmitError {
    #[error("volume {volume} is busy with {holder}")]
    VolumeBusy { volume: String, holder: Holder },
    /// The volume exists and cannot be reused for this request.
    #[error(transparent)]
    VolumeUnusable(VolumeError),
    /// A clone whose source or target does not allow it (checked again when it runs).
    #[error(transparent)]
    Clone(super::clone::CloneRefused),
    #[error("job queue is full ({0} jobs waiting)")]
    QueueFull(usize),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The `Idempotency-Key` was used for another request (API: 422).
    #[error(
        "Idempotency-Key was already used for job {0} with a different request; send a new key \
         for a new request"
    )]
    KeyReused(Uuid),
    /// A request with the same `Idempotency-Key` is being stored right now (API: 409).
    #[error("a request with this Idempotency-Key is being processed; retry in a moment")]
    KeyInFlight,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The submission's task ended without an answer (a panic; its claims were given back).
    #[error("the submission failed: {0}")]
    Task(String),
}

/// A job to submit.
#[derive(Debug)]
pub(crate) struct Submission {
    pub(crate) kind: JobKind,
    pub(crate) spec: JobSpec,
    /// Who asks, and in which trace.
    pub(crate) origin: Origin,
    /// The request's `Idempotency-Key`, scoped.
    pub(crate) key: Option<IdempotencyKey>,
}

/// An accepted submission.
#[derive(Debug)]
pub(crate) enum Submitted {
    /// A new job was stored and queued.
    New(Job),
    /// The `Idempotency-Key` names a job made by the same request earlier (nothing new).
    Existing(Job),
}

/// A refused cancellation.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CancelError {
    #[error("job {0} not found")]
    NotFound(Uuid),
    #[error("cannot cancel job in '{0}' status")]
    Terminal(JobStatus),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The cancellation's task ended without an answer (a panic).
    #[error("the cancellation failed: {0}")]
    Task(String),
}

/// Who submitted a job and in which trace.
#[derive(Debug, Clone, Default)]
pub(crate) struct Origin {
    pub(crate) requested_by: Option<String>,
    pub(crate) trace_context: BTreeMap<String, String>,
}

/// Handle to the engine (cheap to clone).
#[derive(Clone)]
pub(crate) struct Engine {
    inner: Arc<Inner>,
}

/// What every clone of the engine shares.
struct Inner {
    store: Store,
    ctx: Arc<RunContext>,
    state: Shared,
    job_timeout: Mutex<Duration>,
}

impl Engine {
    /// Starts the engine: recovers jobs left by a previous run, then starts queued ones.
    pub(crate) async fn start(store: Store, ctx: Arc<RunContext>) -> Result<Engine, StoreError> {
        let settings = ctx.settings.current();
        let engine = Engine {
            inner: Arc::new(Inner {
                store,
                state: Shared::new(State::new(
                    settings.jobs.max_concurrent,
                    settings.jobs.queue_capacity,
                )),
                job_timeout: Mutex::new(settings.jobs.timeout),
                ctx,
            }),
        };
        engine.recover_uploads().await;
        engine.recover().await?;
        Ok(engine)
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(super) fn context(&self) -> &RunContext {
        &self.inner.ctx
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock()
    }

    /// The state as the claim guards share it.
    pub(super) fn shared(&self) -> &Shared {
        &self.inner.state
    }

    /// Jobs that were running when the daemon died are failed and rolled back; pending ones
    /// queue again in their original order.
    async fn recover(&self) -> Result<(), StoreError> {
        for mut job in self.inner.store.all_jobs()? {
            match job.status {
                // A wipe cut short is finished, not rolled back: it runs again first.
                JobStatus::Running if job.kind == JobKind::Wipe => {
                    tracing::warn!(job_id = %job.id, "resuming interrupted wipe job");
                    let mut st = self.state();
                    for v in job.spec.held_volumes() {
                        st.volumes.insert(v.to_string(), Holder::Job(job.id));
                    }
                    st.queue.push_front(job.id);
                }
                JobStatus::Running => {
                    let reason = match runner::rollback(&self.inner.ctx, &job).await {
                        Ok(()) => JobError::Restarted,
                        Err(rollback) => JobError::RollbackFailed {
                            error: Box::new(JobError::Restarted),
                            rollback,
                        },
                    }
                    .to_string();
                    tracing::warn!(job_id = %job.id, %reason, "recovering interrupted job");
                    job.transition(JobStatus::Failed, Some(reason), Utc::now())
                        .expect("running -> failed is allowed");
                    self.inner.store.put_job(&job, true).await?;
                    metrics().jobs_total.with_label_values(&["failed"]).inc();
                }
                JobStatus::Pending => {
                    let mut st = self.state();
                    for v in job.spec.held_volumes() {
                        st.volumes.insert(v.to_string(), Holder::Job(job.id));
                    }
                    st.queue.push_back(job.id);
                }
                _ => {}
            }
        }
        let mut st = self.state();
        if !st.queue.is_empty() {
            tracing::info!(queued = st.queue.len(), "resuming queued jobs");
        }
        self.pump(&mut st);
        Ok(())
    }

    /// Accepts a job: answers a repeated `Idempotency-Key` with its job, checks the volume
    /// lock and queue capacity, stores the job durably and queues it. Runs on its own task, so
    /// a caller that goes away (the client hung up) does not stop it halfway: the job is
    /// either stored and queued (a retry with the same key finds it) or not stored at all, and
    /// every claim is given back either way.
    pub(crate) async fn submit(&self, s: Submission) -> Result<Submitted, SubmitError> {
        let engine = self.clone();
        tokio::spawn(async move { engine.submit_here(s).await })
            .await
            .map_err(|e| SubmitError::Task(e.to_string()))?
    }

    async fn submit_here(&self, s: Submission) -> Result<Submitted, SubmitError> {
        let admission = match self.admit(&s.spec, s.key.as_ref())? {
            Ok(admission) => admission,
            Err(existing) => return Ok(Submitted::Existing(existing)),
        };
        let job = self.store_new(s).await?;
        let mut st = self.state();
        admission.admit(&mut st, job.id);
        metrics().queued_jobs.set(st.queue.len() as i64);
        self.pump(&mut st);
        Ok(Submitted::New(job))
    }

    /// The claims of a submission, or the job a repeated `Idempotency-Key` made, or why not.
    fn admit(
        &self,
        spec: &JobSpec,
        key: Option<&IdempotencyKey>,
    ) -> Result<Result<Admission, Job>, SubmitError> {
        let mut st = self.state();
        if let Some(key) = key {
            // Under the lock, so a key is either stored (found here) or in flight.
            if let Some(job) = self.inner.store.idempotent_job(key)? {
                return match job.idempotency.as_ref() {
                    Some(k) if k.request_hash == key.request_hash => Ok(Err(job)),
                    _ => Err(SubmitError::KeyReused(job.id)),
                };
            }
            if st.keys_in_flight.contains(&key.scoped) {
                return Err(SubmitError::KeyInFlight);
            }
        }
        if !st.accepting {
            return Err(SubmitError::ShuttingDown);
        }
        let volumes = spec.held_volumes();
        for v in &volumes {
            if let Some(holder) = st.volumes.get(*v) {
                return Err(SubmitError::VolumeBusy {
                    volume: v.to_string(),
                    holder: *holder,
                });
            }
        }
        let in_system = st.running.len() + st.queue.len() + st.reserved;
        if in_system >= st.max_concurrent + st.queue_capacity {
            return Err(SubmitError::QueueFull(st.queue.len() + st.reserved));
        }
        let scoped = key.map(|k| k.scoped.as_str());
        Ok(Ok(Admission::take(
            self.shared(),
            &mut st,
            &volumes,
            scoped,
        )))
    }

    async fn store_new(&self, s: Submission) -> Result<Job, SubmitError> {
        let Submission {
            kind,
            spec,
            origin,
            key,
        } = s;
        if kind == JobKind::Provision {
            runner::check_volume_usable(&self.inner.ctx, &spec)
                .await
                .map_err(SubmitError::VolumeUnusable)?;
        }
        if kind == JobKind::Clone {
            super::clone::check(&self.inner.ctx, &spec)
                .await
                .map_err(SubmitError::Clone)?;
        }
        let seq = self.inner.store.next_seq()?;
        let mut job = Job::new(Uuid::new_v4(), seq, kind, spec, Utc::now());
        job.requested_by = origin.requested_by;
        job.trace_context = origin.trace_context;
        if let Some(key) = key {
            // The key first: flushed together with the job below; a crash in between leaves
            // a key naming no job, which counts as unused.
            self.inner.store.put_idempotency_key(&key, job.id)?;
            job.idempotency = Some(key);
        }
        self.inner.store.put_job_confirmed(&job).await?;
        Ok(job)
    }

    /// Starts queued jobs while slots are free (called with the state locked).
    fn pump(&self, st: &mut State) {
        while st.accepting && st.running.len() < st.max_concurrent {
            let Some(id) = st.queue.pop_front() else {
                break;
            };
            let cancel = CancellationToken::new();
            let reason = Arc::new(Mutex::new(None));
            let (done_tx, done_rx) = watch::channel(false);
            st.running.insert(
                id,
                Running {
                    cancel: cancel.clone(),
                    reason: reason.clone(),
                    done: done_rx,
                },
            );
            let engine = self.clone();
            tokio::spawn(async move {
                engine.run(id, cancel, reason).await;
                let _ = done_tx.send(true);
            });
        }
        let m = metrics();
        m.active_jobs.set(st.running.len() as i64);
        m.queued_jobs.set(st.queue.len() as i64);
        m.job_slots.set(st.max_concurrent as i64);
        m.health_status
            .set(i64::from(st.running.len() < st.max_concurrent));
    }

    /// Runs one job to a terminal state, whatever happens inside.
    async fn run(
        &self,
        id: Uuid,
        cancel: CancellationToken,
        reason: Arc<Mutex<Option<StopReason>>>,
    ) {
        let job = match self.inner.store.get_job(id) {
            Ok(Some(job)) if job.status == JobStatus::Pending => Some(job),
            // Resumed after a restart (`recover`).
            Ok(Some(job)) if job.status == JobStatus::Running && job.kind == JobKind::Wipe => {
                Some(job)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::error!(job_id = %id, error = %e, "cannot load queued job");
                None
            }
        };
        if let Some(job) = job {
            let timeout = *self
                .inner
                .job_timeout
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let span_name = match job.kind {
                JobKind::Provision => "runJob",
                JobKind::CacheFetch => "runCacheJob",
                JobKind::Wipe => "runWipeJob",
                JobKind::Clone => "runCloneJob",
            };
            let span = tracing::info_span!(
                "job",
                otel.name = span_name,
                otel.status_code = tracing::field::Empty,
                otel.status_message = tracing::field::Empty,
                job_id = %job.id,
                correlation_id = job.spec.correlation_id.as_deref().unwrap_or(""),
                image_url = %job.spec.image_url,
                volume_name = job.spec.volume_name.as_deref().unwrap_or(""),
                volume_size_gb = job.spec.volume_size_gb.unwrap_or(0),
                job_kind = ?job.kind,
            );
            crate::telemetry::link_to_stored_context(&span, &job.trace_context);
            self.run_job(job, timeout, cancel, reason)
                .instrument(span)
                .await;
        }
        let mut st = self.state();
        st.running.remove(&id);
        st.volumes.retain(|_, h| *h != Holder::Job(id));
        self.pump(&mut st);
    }

    async fn run_job(
        &self,
        mut job: Job,
        timeout: Duration,
        cancel: CancellationToken,
        reason: Arc<Mutex<Option<StopReason>>>,
    ) {
        let store = &self.inner.store;
        let resumed = job.status == JobStatus::Running;
        if !resumed && let Err(e) = job.transition(JobStatus::Running, None, Utc::now()) {
            tracing::error!(error = %e, "job cannot start");
            return;
        }
        if let Err(e) = store.put_job(&job, true).await {
            tracing::error!(error = %e, "cannot record the job's start; failing it");
            metrics().jobs_total.with_label_values(&["failed"]).inc();
            self.settle(job, JobStatus::Failed, Some(JobError::Store(e)))
                .await;
            return;
        }
        tracing::info!("job started");
        let started = Instant::now();

        // The timeout counts from here (running), not from submission.
        let timer = {
            let cancel = cancel.clone();
            let reason = reason.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                reason
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(StopReason::TimedOut);
                cancel.cancel();
            })
        };
        let mut handle = JobHandle::new(store.clone(), job, cancel.clone());
        let encrypted = handle.job.spec.encryption.is_some();
        let outcome = if handle.job.kind == JobKind::Clone {
            super::clone::execute(&self.inner.ctx, &mut handle, &cancel).await
        } else if handle.job.kind == JobKind::Provision && encrypted {
            super::encrypted::execute(&self.inner.ctx, &mut handle, &cancel).await
        } else {
            runner::execute(&self.inner.ctx, &mut handle, &cancel).await
        };
        timer.abort();
        let (job, store_error) = handle.finish();

        let stop = *reason.lock().unwrap_or_else(|e| e.into_inner());
        let (status, error) = match outcome {
            Ok(()) => (JobStatus::Completed, None),
            Err(e) => final_error(e, stop, store_error, timeout),
        };
        let (job, status, error) = self.settle(job, status, error).await;
        if status != JobStatus::Completed {
            let span = tracing::Span::current();
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_message", error.as_deref().unwrap_or(""));
        }
        let m = metrics();
        m.jobs_total.with_label_values(&[status.as_str()]).inc();
        m.job_duration_seconds
            .with_label_values(&[status.as_str()])
            .observe(started.elapsed().as_secs_f64());
        match status {
            JobStatus::Completed => tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                cache_hit = job.cache_hit,
                "job completed"
            ),
            _ => tracing::warn!(
                status = status.as_str(),
                error = error.as_deref().unwrap_or(""),
                "job did not complete"
            ),
        }
    }

    /// Rolls a failed job back and records its terminal state. A job is only ever shown as
    /// completed once that is on disk: when the store refuses it, the work is rolled back (as
    /// restart recovery would do after a crash) and the job fails with the store's error. A
    /// refused write of a failed state is kept in memory by the store and written later.
    async fn settle(
        &self,
        running: Job,
        status: JobStatus,
        error: Option<JobError>,
    ) -> (Job, JobStatus, Option<String>) {
        let store = &self.inner.store;
        let error = match error {
            Some(e) => Some(self.rolled_back(&running, e).await),
            None => None,
        };
        let mut job = running.clone();
        job.reason = error
            .as_ref()
            .and_then(JobError::reason)
            .map(str::to_string);
        let message = error.map(|e| e.to_string());
        if let Err(e) = job.transition(status, message.clone(), Utc::now()) {
            tracing::error!(error = %e, "invalid final transition");
            return (running, JobStatus::Running, None);
        }
        let refused = if status == JobStatus::Completed {
            store.put_job_confirmed(&job).await.err()
        } else {
            store.put_job(&job, true).await.err()
        };
        match refused {
            None => (job, status, message),
            Some(e) if status == JobStatus::Completed => {
                tracing::error!(error = %e, "cannot record the completed job; rolling it back");
                // Readers see it running (not completed) while it is rolled back.
                let _ = store.put_job_nowait(&running);
                let error = self
                    .rolled_back(&running, JobError::Store(e))
                    .await
                    .to_string();
                let mut job = running;
                job.transition(JobStatus::Failed, Some(error.clone()), Utc::now())
                    .expect("running -> failed is allowed");
                if let Err(e) = store.put_job(&job, true).await {
                    tracing::error!(error = %e, "cannot record the job's failure; kept in memory");
                }
                (job, JobStatus::Failed, Some(error))
            }
            Some(e) => {
                tracing::error!(error = %e, "cannot record the job's result; kept in memory");
                (job, status, message)
            }
        }
    }

    /// `error`, after removing what the job created (and saying so if that failed too).
    async fn rolled_back(&self, job: &Job, error: JobError) -> JobError {
        match runner::rollback(&self.inner.ctx, job).await {
            Ok(()) => error,
            Err(rollback) => JobError::RollbackFailed {
                error: Box::new(error),
                rollback,
            },
        }
    }

    /// Cancels a job: a pending one at once; a running one is stopped, rolled back, and this
    /// returns once it is terminal (or after `wait`).
    /// Runs on its own task: a caller that goes away does not leave a pending job taken out
    /// of the queue but still stored as pending.
    pub(crate) async fn cancel(&self, id: Uuid, wait: Duration) -> Result<Job, CancelError> {
        let engine = self.clone();
        tokio::spawn(async move { engine.cancel_here(id, wait).await })
            .await
            .map_err(|e| CancelError::Task(e.to_string()))?
    }

    async fn cancel_here(&self, id: Uuid, wait: Duration) -> Result<Job, CancelError> {
        let running_done = {
            let mut st = self.state();
            if let Some(pos) = st.queue.iter().position(|j| *j == id) {
                st.queue.remove(pos);
                st.volumes.retain(|_, h| *h != Holder::Job(id));
                metrics().queued_jobs.set(st.queue.len() as i64);
                None
            } else if let Some(r) = st.running.get(&id) {
                r.reason
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(StopReason::Cancelled);
                r.cancel.cancel();
                Some(r.done.clone())
            } else {
                let job = self
                    .inner
                    .store
                    .get_job(id)?
                    .ok_or(CancelError::NotFound(id))?;
                return Err(CancelError::Terminal(job.status));
            }
        };
        match running_done {
            None => {
                let mut job = self
                    .inner
                    .store
                    .get_job(id)?
                    .ok_or(CancelError::NotFound(id))?;
                job.transition(
                    JobStatus::Cancelled,
                    Some("cancelled by request".into()),
                    Utc::now(),
                )
                .map_err(|e| CancelError::Terminal(e.from))?;
                self.inner.store.put_job(&job, true).await?;
                metrics().jobs_total.with_label_values(&["cancelled"]).inc();
                tracing::info!(job_id = %id, "pending job cancelled");
                Ok(job)
            }
            Some(mut done) => {
                let _ = tokio::time::timeout(wait, done.wait_for(|d| *d)).await;
                let job = self
                    .inner
                    .store
                    .get_job(id)?
                    .ok_or(CancelError::NotFound(id))?;
                match job.status {
                    JobStatus::Cancelled | JobStatus::Running => Ok(job),
                    other => Err(CancelError::Terminal(other)),
                }
            }
        }
    }

    /// 1-based position of a pending job in the queue.
    pub(crate) fn queue_position(&self, id: Uuid) -> Option<usize> {
        let st = self.state();
        st.queue
            .iter()
            .position(|j| *j == id)
            .map(|p| p + 1)
            .or(Some(st.queue.len() + st.reserved))
    }

    /// Running jobs and slots.
    pub(crate) fn load(&self) -> (usize, usize) {
        let st = self.state();
        (st.running.len(), st.max_concurrent)
    }

    /// Applies new limits (hot reload): more slots start queued jobs at once; fewer let
    /// running jobs finish.
    pub(crate) fn set_limits(
        &self,
        max_concurrent: usize,
        queue_capacity: usize,
        timeout: Duration,
    ) {
        *self
            .inner
            .job_timeout
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = timeout;
        let mut st = self.state();
        st.max_concurrent = max_concurrent;
        st.queue_capacity = queue_capacity;
        self.pump(&mut st);
    }

    /// Removes finished jobs older than `retention`; never pending or running ones.
    pub(crate) fn prune(&self, retention: Duration) -> Result<usize, StoreError> {
        let cutoff =
            Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        self.inner.store.prune_finished(cutoff)
    }

    /// Stops accepting work; gives running jobs `grace` to finish, then stops and rolls them
    /// back. Pending jobs stay stored and run at the next start.
    pub(crate) async fn shutdown(&self, grace: Duration) {
        let waits: Vec<watch::Receiver<bool>> = {
            let mut st = self.state();
            st.accepting = false;
            st.running.values().map(|r| r.done.clone()).collect()
        };
        if waits.is_empty() {
            return;
        }
        tracing::info!(running = waits.len(), grace = ?grace, "waiting for running jobs");
        let all_done = async {
            for mut w in waits.clone() {
                let _ = w.wait_for(|d| *d).await;
            }
        };
        if tokio::time::timeout(grace, all_done).await.is_err() {
            {
                let st = self.state();
                for r in st.running.values() {
                    r.reason
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(StopReason::Shutdown);
                    r.cancel.cancel();
                }
            }
            for mut w in waits {
                let _ = tokio::time::timeout(Duration::from_secs(60), w.wait_for(|d| *d)).await;
            }
        }
    }

    /// Periodic retention pruning.
    pub(crate) fn spawn_pruner(
        &self,
        every: Duration,
        retention: impl Fn() -> Duration + Send + 'static,
    ) {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match engine.prune(retention()) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "pruned finished jobs"),
                    Err(e) => tracing::error!(error = %e, "job pruning failed"),
                }
            }
        });
    }
}

/// A failed job's status and error: the stop reason wins over what the step reported (a
/// stopped step only says "stopped"), then a refused store write.
fn final_error(
    step: JobError,
    stop: Option<StopReason>,
    store_error: Option<StoreError>,
    timeout: Duration,
) -> (JobStatus, Option<JobError>) {
    let error = match (stop, store_error) {
        (Some(StopReason::Cancelled), _) => {
            return (JobStatus::Cancelled, Some(JobError::Cancelled));
        }
        (Some(StopReason::TimedOut), _) => JobError::TimedOut(timeout),
        (Some(StopReason::Shutdown), _) => JobError::Shutdown,
        (None, Some(e)) => JobError::Store(e),
        (None, None) => step,
    };
    (JobStatus::Failed, Some(error))
}
