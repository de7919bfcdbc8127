//! Idempotent submission (`Idempotency-Key` on `POST /api/v1/jobs` and `/cache/fetch`): a key
//! names one job per caller and job kind. The job record carries the key and a hash of what was
//! asked; an index tree maps the key to the job, so a retried request finds the job it already
//! made (across restarts) and a reused key with another request is refused. Keys leave with
//! their job when retention prunes it.

use uuid::Uuid;

pub(crate) use super::model::IdempotencyKey;
use super::model::Job;
use super::store::{Store, StoreError};
use crate::telemetry::metrics::metrics;

/// Longest accepted key (Stripe and the IETF draft use up to 255 characters).
pub(crate) const MAX_KEY_LEN: usize = 255;

/// Checks a key as sent: 1 to `MAX_KEY_LEN` visible ASCII characters.
pub(crate) fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_LEN} characters, got {}",
            key.len()
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("Idempotency-Key must be visible ASCII characters without spaces".into());
    }
    Ok(())
}

impl Store {
    /// The job a key was used for, if it still exists.
    pub(crate) fn idempotent_job(&self, key: &IdempotencyKey) -> Result<Option<Job>, StoreError> {
        let r = self.idempotency.get(key.scoped.as_bytes());
        metrics().storage_op("get_idempotency_key", &r);
        let Some(bytes) = r? else {
            return Ok(None);
        };
        let Ok(id) = Uuid::from_slice(&bytes) else {
            return Ok(None);
        };
        // A job pruned by retention takes its key with it; an index entry left by a crash
        // between the two writes points at nothing and counts as absent.
        Ok(self.get_job(id)?.filter(|job| {
            job.idempotency
                .as_ref()
                .is_some_and(|k| k.scoped == key.scoped)
        }))
    }

    /// Records that `key` made job `id` (written before the job, flushed with it).
    pub(crate) fn put_idempotency_key(
        &self,
        key: &IdempotencyKey,
        id: Uuid,
    ) -> Result<(), StoreError> {
        let r = self
            .idempotency
            .insert(key.scoped.as_bytes(), id.as_bytes().to_vec());
        metrics().storage_op("put_idempotency_key", &r);
        r?;
        Ok(())
    }

    /// Removes index entries naming no job that carries them (a crash between writing the key
    /// and its job), so they do not pile up across crashes. Called by retention pruning.
    pub(crate) fn prune_orphan_keys(&self) -> Result<usize, StoreError> {
        let mut removed = 0;
        for entry in self.idempotency.iter() {
            let (scoped, id) = entry?;
            let names_its_job = match Uuid::from_slice(&id) {
                Ok(id) => self.get_job(id)?.is_some_and(|job| {
                    job.idempotency
                        .is_some_and(|k| k.scoped.as_bytes() == scoped.as_ref())
                }),
                Err(_) => false,
            };
            if !names_its_job {
                let r = self.idempotency.remove(&scoped);
                metrics().storage_op("delete_idempotency_key", &r);
                r?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes the key of a job that is being deleted (only if it still names that job).
    pub(crate) fn remove_idempotency_key(&self, job: &Job) -> Result<(), StoreError> {
        let Some(key) = &job.idempotency else {
            return Ok(());
        };
        let r = self.idempotency.get(key.scoped.as_bytes());
        metrics().storage_op("get_idempotency_key", &r);
        if r?.is_some_and(|v| v.as_ref() == job.id.as_bytes()) {
            let r = self.idempotency.remove(key.scoped.as_bytes());
            metrics().storage_op("delete_idempotency_key", &r);
            r?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageType;
    use crate::jobs::model::{JobKind, JobSpec};

    fn spec(volume: &str) -> JobSpec {
        JobSpec {
            image_url: "file:///i.qcow2".into(),
            image_type: Some(ImageType::Qcow2),
            volume_name: Some(volume.into()),
            volume_size_gb: Some(1),
            ..JobSpec::default()
        }
    }

    #[test]
    fn keys_are_scoped_and_hash_the_request() {
        let a = IdempotencyKey::new("k", Some("ci"), JobKind::Provision, &spec("v"));
        assert_eq!(
            a,
            IdempotencyKey::new("k", Some("ci"), JobKind::Provision, &spec("v"))
        );
        let other_body = IdempotencyKey::new("k", Some("ci"), JobKind::Provision, &spec("w"));
        assert_eq!(a.scoped, other_body.scoped);
        assert_ne!(a.request_hash, other_body.request_hash);
        let other_caller = IdempotencyKey::new("k", Some("ops"), JobKind::Provision, &spec("v"));
        assert_ne!(a.scoped, other_caller.scoped);
        let other_kind = IdempotencyKey::new("k", Some("ci"), JobKind::CacheFetch, &spec("v"));
        assert_ne!(a.scoped, other_kind.scoped);
    }

    /// Retention takes a job's key with it, and a key a crash left without its job goes too;
    /// keys of jobs still kept stay.
    #[tokio::test]
    async fn keys_expire_with_their_jobs_and_orphans_are_swept() {
        use crate::jobs::model::{JobStatus, tests::job};
        use chrono::Utc;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let long_ago = Utc::now() - chrono::Duration::days(30);
        let mut old = job();
        let old_key = IdempotencyKey::new("old", None, JobKind::Provision, &old.spec);
        old.idempotency = Some(old_key.clone());
        old.transition(JobStatus::Running, None, long_ago).unwrap();
        old.transition(JobStatus::Completed, None, long_ago)
            .unwrap();
        let mut kept = job();
        let kept_key = IdempotencyKey::new("kept", None, JobKind::Provision, &kept.spec);
        kept.idempotency = Some(kept_key.clone());
        for (k, j) in [(&old_key, &old), (&kept_key, &kept)] {
            store.put_idempotency_key(k, j.id).unwrap();
            store.put_job(j, true).await.unwrap();
        }
        // A crash after the key was written, before its job.
        let orphan = IdempotencyKey::new("orphan", None, JobKind::Provision, &spec("o"));
        store.put_idempotency_key(&orphan, Uuid::new_v4()).unwrap();
        assert_eq!(store.idempotency.iter().count(), 3);
        assert_eq!(store.idempotent_job(&old_key).unwrap().unwrap().id, old.id);

        let removed = store
            .prune_finished(Utc::now() - chrono::Duration::days(7))
            .unwrap();
        assert_eq!(removed, 1);
        assert!(store.idempotent_job(&old_key).unwrap().is_none(), "expired");
        assert!(store.idempotent_job(&orphan).unwrap().is_none());
        assert_eq!(
            store.idempotent_job(&kept_key).unwrap().unwrap().id,
            kept.id
        );
        assert_eq!(
            store.idempotency.iter().count(),
            1,
            "only the kept job's key is left"
        );
    }

    #[test]
    fn key_syntax() {
        assert!(validate_key("4f0c9a4e-retry-1").is_ok());
        for bad in ["", "a b", "é", &"x".repeat(MAX_KEY_LEN + 1)] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
    }
}
