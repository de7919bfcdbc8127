//! Durable job store on sled: job records, the per-stage throughput history, and the handle
//! other modules (the image cache index) open their own trees from. Every sled call goes
//! through here or `Store::tree`, so storage metrics see all of them.

use std::path::Path;

use uuid::Uuid;

use super::model::{Job, JobStatus};
use super::progress::{HISTORY_LEN, StageSample};
use crate::telemetry::metrics::metrics;

#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("job store: {0}")]
    Sled(#[from] sled::Error),
    #[error("job store: cannot (de)serialize record: {0}")]
    Serde(#[from] serde_json::Error),
}

/// The sled database and its trees.
#[derive(Clone)]
pub(crate) struct Store {
    db: sled::Db,
    jobs: sled::Tree,
    history: sled::Tree,
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    pub(crate) fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(sled::Error::Io)?;
        let result = sled::Config::new()
            .path(dir.join("db"))
            .flush_every_ms(Some(200))
            .open();
        metrics().storage_op("open", &result);
        let db = result?;
        Ok(Store {
            jobs: db.open_tree("jobs")?,
            history: db.open_tree("stage_history")?,
            db,
        })
    }

    /// Another tree of the same database (e.g. the cache index).
    pub(crate) fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// A number that grows with every call, across restarts (submission order).
    pub(crate) fn next_seq(&self) -> Result<u64, StoreError> {
        let r = self.db.generate_id();
        metrics().storage_op("generate_id", &r);
        Ok(r?)
    }

    /// Writes a job record. `durable`: wait until it is on disk (state changes); progress
    /// updates pass `false` and reach disk with sled's periodic flush.
    pub(crate) async fn put_job(&self, job: &Job, durable: bool) -> Result<(), StoreError> {
        self.put_job_nowait(job)?;
        if durable {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes a job record without waiting for disk (progress; sled flushes every 200 ms).
    pub(crate) fn put_job_nowait(&self, job: &Job) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(job)?;
        let r = self.jobs.insert(job.id.as_bytes(), bytes);
        metrics().storage_op("put_job", &r);
        r?;
        Ok(())
    }

    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        let r = self.db.flush_async().await;
        metrics().storage_op("flush", &r);
        r?;
        Ok(())
    }

    pub(crate) fn get_job(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
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
        let mut jobs = Vec::new();
        for item in self.jobs.iter() {
            metrics().storage_op("scan_jobs", &item);
            let (_, v) = item?;
            jobs.push(self.decode(&v)?);
        }
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

    /// Deletes terminal jobs that finished before `cutoff`; pending and running jobs stay.
    pub(crate) fn prune_finished(
        &self,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize, StoreError> {
        let mut removed = 0;
        for job in self.all_jobs()? {
            if job.status.is_terminal() && job.finished_at.is_some_and(|f| f < cutoff) {
                self.delete_job(job.id)?;
                removed += 1;
            }
        }
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

    /// Readiness probe: a small write that must reach disk. A read alone kept answering from
    /// memory while every write failed (full disk, failed log); this shows such a store as down.
    pub(crate) async fn probe(&self) -> Result<(), String> {
        let stamp = chrono::Utc::now().timestamp_millis().to_be_bytes();
        let r = self.db.insert(b"__probe__", &stamp[..]);
        metrics().storage_op("probe", &r);
        r.map_err(|e| format!("job store: {e}"))?;
        self.flush().await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::model::{ImageType, JobKind, JobSpec};
    use chrono::Utc;

    fn job(seq: u64) -> Job {
        Job::new(
            Uuid::new_v4(),
            seq,
            JobKind::Provision,
            JobSpec {
                image_url: "file:///i.qcow2".into(),
                image_type: ImageType::Qcow2,
                volume_name: Some(format!("v{seq}")),
                volume_size_gb: Some(1),
                correlation_id: None,
            },
            Utc::now(),
        )
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
