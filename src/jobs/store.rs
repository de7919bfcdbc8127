//! Durable job store: job records and the per-stage throughput history, in the daemon's sled
//! database (`crate::store`), which also hands out the trees of other modules (the image cache
//! index). Every call records storage metrics.
//!
//! A record that cannot be written (full disk) is kept in memory as the job's latest state and
//! shown by reads, so a job never appears stuck in a state it has left; the storage probe
//! reopens the database once writes work again and writes those records then.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::model::{Job, JobStatus};
use super::progress::{HISTORY_LEN, StageSample};
use crate::store::{Db, Tree};
use crate::telemetry::metrics::metrics;

/// Why the store refused an operation.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("job store: {0}")]
    Sled(#[from] sled::Error),
    #[error("job store: cannot (de)serialize record: {0}")]
    Serde(#[from] serde_json::Error),
}

/// How many written records a slow subscriber may fall behind before it must re-read.
const UPDATES_CAPACITY: usize = 256;

/// The job records and stage history (cheap to clone; clones share everything).
#[derive(Clone)]
pub(crate) struct Store {
    db: Db,
    jobs: Tree,
    history: Tree,
    /// Idempotency keys of submissions: scoped key -> job id (`jobs/idempotency.rs`).
    pub(super) idempotency: Tree,
    /// Latest records of existing jobs that could not be written, by job id.
    unsaved: Arc<Mutex<HashMap<Uuid, Job>>>,
    /// Every record written (or kept in memory), for progress streams.
    updates: tokio::sync::broadcast::Sender<Arc<Job>>,
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    pub(crate) fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(sled::Error::Io)?;
        let result = Db::open(&dir.join("db"));
        metrics().storage_op("open", &result);
        let db = result?;
        Ok(Store {
            jobs: db.tree("jobs"),
            history: db.tree("stage_history"),
            idempotency: db.tree("idempotency"),
            unsaved: Arc::new(Mutex::new(HashMap::new())),
            updates: tokio::sync::broadcast::channel(UPDATES_CAPACITY).0,
            db,
        })
    }

    /// Another tree of the same database (e.g. the cache index).
    pub(crate) fn tree(&self, name: &'static str) -> Tree {
        self.db.tree(name)
    }

    /// A number that grows with every call, across restarts (submission order).
    pub(crate) fn next_seq(&self) -> Result<u64, StoreError> {
        let r = self.db.current().and_then(|db| db.generate_id());
        metrics().storage_op("generate_id", &r);
        Ok(r?)
    }

    /// Records written from now on, every job's (a receiver that lags must re-read the job).
    pub(crate) fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<Job>> {
        self.updates.subscribe()
    }

    /// Tells subscribers about a record reads now show (no subscriber is fine).
    fn announce(&self, job: &Job) {
        if self.updates.receiver_count() > 0 {
            let _ = self.updates.send(Arc::new(job.clone()));
        }
    }

    fn unsaved(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Job>> {
        self.unsaved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a record and waits until it is on disk; when that fails, nothing is kept in
    /// memory (a refused submission, or a completion that must not be shown unless durable).
    pub(crate) async fn put_job_confirmed(&self, job: &Job) -> Result<(), StoreError> {
        self.write(job)?;
        self.flush().await?;
        self.announce(job);
        Ok(())
    }

    /// Writes a job record. `durable`: wait until it is on disk (state changes); progress
    /// updates pass `false` and reach disk with sled's periodic flush. On failure the record
    /// is still what reads show (see the module comment).
    pub(crate) async fn put_job(&self, job: &Job, durable: bool) -> Result<(), StoreError> {
        self.put_job_nowait(job)?;
        if durable && let Err(e) = self.flush().await {
            self.unsaved().insert(job.id, job.clone());
            return Err(e);
        }
        Ok(())
    }

    /// Writes a job record without waiting for disk (progress; sled flushes every 200 ms).
    pub(crate) fn put_job_nowait(&self, job: &Job) -> Result<(), StoreError> {
        let result = match self.write(job) {
            Ok(()) => {
                self.unsaved().remove(&job.id);
                Ok(())
            }
            Err(e) => {
                self.unsaved().insert(job.id, job.clone());
                Err(e)
            }
        };
        self.announce(job);
        result
    }

    fn write(&self, job: &Job) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(job)?;
        let r = self.jobs.insert(job.id.as_bytes(), bytes);
        metrics().storage_op("put_job", &r);
        r?;
        Ok(())
    }

    /// Waits until everything written is on disk. A blocking `flush` on the blocking pool,
    /// not sled's `flush_async`: concurrent `flush_async` calls deadlock in sled 0.34
    /// (spacejam/sled#1308, fixed only on its unreleased main branch); seen here as jobs that
    /// never left `pending` after many simultaneous submissions.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        let r = match self.db.current() {
            Ok(db) => tokio::task::spawn_blocking(move || db.flush().map(|_| ()))
                .await
                .unwrap_or_else(|e| {
                    Err(sled::Error::Io(std::io::Error::other(format!(
                        "flush task failed: {e}"
                    ))))
                }),
            Err(e) => Err(e),
        };
        metrics().storage_op("flush", &r);
        r?;
        Ok(())
    }

    pub(crate) fn get_job(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        if let Some(job) = self.unsaved().get(&id) {
            return Ok(Some(job.clone()));
        }
        let r = self.jobs.get(id.as_bytes());
        metrics().storage_op("get_job", &r);
        match r? {
            Some(bytes) => Ok(Some(self.decode(&bytes)?)),
            None => Ok(None),
        }
    }

    fn decode(&self, bytes: &[u8]) -> Result<Job, StoreError> {
        let r = serde_json::from_slice(bytes);
        metrics().storage_op("decode_job", &r);
        Ok(r?)
    }

    /// All jobs, oldest submission first.
    pub(crate) fn all_jobs(&self) -> Result<Vec<Job>, StoreError> {
        let r = self.jobs.entries();
        metrics().storage_op("scan_jobs", &r);
        let mut jobs = HashMap::new();
        for (_, v) in r? {
            let job = self.decode(&v)?;
            jobs.insert(job.id, job);
        }
        for (id, job) in self.unsaved().iter() {
            jobs.insert(*id, job.clone());
        }
        let mut jobs: Vec<Job> = jobs.into_values().collect();
        jobs.sort_by_key(|j| j.seq);
        Ok(jobs)
    }

    /// Jobs newest first, optionally of one status, at most `limit`.
    pub(crate) fn list_jobs(
        &self,
        status: Option<JobStatus>,
        limit: usize,
    ) -> Result<(Vec<Job>, usize), StoreError> {
        let mut jobs: Vec<Job> = self
            .all_jobs()?
            .into_iter()
            .filter(|j| status.is_none_or(|s| j.status == s))
            .collect();
        let total = jobs.len();
        jobs.reverse();
        jobs.truncate(limit);
        Ok((jobs, total))
    }

    pub(crate) fn delete_job(&self, id: Uuid) -> Result<(), StoreError> {
        let r = self.jobs.remove(id.as_bytes());
        metrics().storage_op("delete_job", &r);
        r?;
        Ok(())
    }

    /// Deletes terminal jobs that finished before `cutoff` (and their idempotency keys);
    /// pending and running jobs stay.
    pub(crate) fn prune_finished(
        &self,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize, StoreError> {
        let mut removed = 0;
        for job in self.all_jobs()? {
            if job.status.is_terminal() && job.finished_at.is_some_and(|f| f < cutoff) {
                self.remove_idempotency_key(&job)?;
                self.delete_job(job.id)?;
                removed += 1;
            }
        }
        self.prune_orphan_keys()?;
        Ok(removed)
    }

    /// Appends a stage measurement, keeping the last `HISTORY_LEN`.
    pub(crate) fn record_stage(&self, stage: &str, sample: StageSample) -> Result<(), StoreError> {
        let mut samples = self.stage_samples(stage)?;
        samples.push(sample);
        let start = samples.len().saturating_sub(HISTORY_LEN);
        let bytes = serde_json::to_vec(&samples[start..])?;
        let r = self.history.insert(stage.as_bytes(), bytes);
        metrics().storage_op("record_stage", &r);
        r?;
        Ok(())
    }

    pub(crate) fn stage_samples(&self, stage: &str) -> Result<Vec<StageSample>, StoreError> {
        let r = self.history.get(stage.as_bytes());
        metrics().storage_op("get_stage_history", &r);
        match r? {
            Some(b) => Ok(serde_json::from_slice(&b)?),
            None => Ok(Vec::new()),
        }
    }

    /// Readiness probe: a small write that must reach disk (a read alone kept answering from
    /// memory while every write failed). When it fails, the database is reopened (sled keeps
    /// refusing after a write error, see `crate::store`) and probed again; once it works, the
    /// records kept in memory are written.
    pub(crate) async fn probe(&self) -> Result<(), String> {
        if self.probe_write().await.is_err() {
            let r = self.db.reopen().await;
            metrics().storage_op("reopen", &r);
            r.map_err(|e| format!("job store: reopening after a write failure: {e}"))?;
            tracing::warn!("job store reopened after a write failure");
        }
        self.probe_write().await.map_err(|e| e.to_string())?;
        self.write_unsaved().await.map_err(|e| e.to_string())
    }

    async fn probe_write(&self) -> Result<(), StoreError> {
        let stamp = chrono::Utc::now().timestamp_millis().to_be_bytes();
        let r = self
            .db
            .current()
            .and_then(|db| db.insert(b"__probe__", &stamp[..]));
        metrics().storage_op("probe", &r);
        r?;
        self.flush().await
    }

    /// Writes the records that could not be written before.
    async fn write_unsaved(&self) -> Result<(), StoreError> {
        let pending: Vec<Job> = self.unsaved().values().cloned().collect();
        if pending.is_empty() {
            return Ok(());
        }
        for job in &pending {
            self.write(job)?;
        }
        self.flush().await?;
        let mut unsaved = self.unsaved();
        for job in pending {
            // Only if no newer version was kept meanwhile.
            if unsaved
                .get(&job.id)
                .is_some_and(|j| j.updated_at == job.updated_at)
            {
                unsaved.remove(&job.id);
            }
        }
        tracing::info!("job records kept in memory were written to the store");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    /// The model's test job, numbered `seq` and writing volume `v<seq>`.
    fn job(seq: u64) -> Job {
        let mut job = crate::jobs::model::tests::job();
        job.seq = seq;
        job.spec.volume_name = Some(format!("v{seq}"));
        job
    }

    /// sled's `flush_async` deadlocks when many are polled at once (sled#1308): 40 submissions
    /// on their own tasks once left jobs `pending` for good. Every confirmed write returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_concurrent_confirmed_writes_all_return() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut writes = tokio::task::JoinSet::new();
        for _ in 0..400 {
            let store = store.clone();
            writes.spawn(async move {
                let j = job(store.next_seq().unwrap());
                store.put_job_confirmed(&j).await.unwrap();
            });
        }
        let all = async { while writes.join_next().await.is_some() {} };
        tokio::time::timeout(std::time::Duration::from_secs(60), all)
            .await
            .expect("every confirmed write returns");
    }

    #[tokio::test]
    async fn jobs_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<Uuid>;
        {
            let store = Store::open(dir.path()).unwrap();
            let a = job(store.next_seq().unwrap());
            let b = job(store.next_seq().unwrap());
            assert!(b.seq > a.seq);
            store.put_job(&a, true).await.unwrap();
            store.put_job(&b, true).await.unwrap();
            ids = vec![a.id, b.id];
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.all_jobs().unwrap();
        assert_eq!(all.iter().map(|j| j.id).collect::<Vec<_>>(), ids);
        let (newest, total) = store.list_jobs(None, 1).unwrap();
        assert_eq!(total, 2);
        assert_eq!(newest[0].id, ids[1]);
        assert!(store.get_job(ids[0]).unwrap().is_some());
        assert!(store.next_seq().unwrap() > all[1].seq);
    }

    #[tokio::test]
    async fn pruning_removes_only_old_finished_jobs() {
        use crate::jobs::model::JobStatus;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let long_ago = Utc::now() - chrono::Duration::days(30);
        let mut old_done = job(1);
        old_done
            .transition(JobStatus::Running, None, long_ago)
            .unwrap();
        old_done
            .transition(JobStatus::Completed, None, long_ago)
            .unwrap();
        let mut old_running = job(2);
        old_running.created_at = long_ago;
        old_running
            .transition(JobStatus::Running, None, long_ago)
            .unwrap();
        let mut old_pending = job(3);
        old_pending.created_at = long_ago;
        let mut recent_failed = job(4);
        recent_failed
            .transition(JobStatus::Running, None, Utc::now())
            .unwrap();
        recent_failed
            .transition(JobStatus::Failed, Some("x".into()), Utc::now())
            .unwrap();
        for j in [&old_done, &old_running, &old_pending, &recent_failed] {
            store.put_job(j, false).await.unwrap();
        }
        let removed = store
            .prune_finished(Utc::now() - chrono::Duration::days(7))
            .unwrap();
        assert_eq!(removed, 1);
        assert!(store.get_job(old_done.id).unwrap().is_none());
        for kept in [&old_running, &old_pending, &recent_failed] {
            assert!(store.get_job(kept.id).unwrap().is_some());
        }
    }

    #[test]
    fn stage_history_keeps_last_twenty() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..25u64 {
            store
                .record_stage(
                    "download",
                    StageSample {
                        bytes: i,
                        seconds: 1.0,
                    },
                )
                .unwrap();
        }
        let s = store.stage_samples("download").unwrap();
        assert_eq!(s.len(), 20);
        assert_eq!(s[0].bytes, 5);
    }
}
