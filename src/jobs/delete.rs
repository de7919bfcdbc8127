//! Deleting a volume on request (`DELETE /api/v1/volumes/{name}`): under the engine's
//! per-volume lock, so no job can start on the name while it is removed, and only when nothing
//! has the volume open and it is a plain data volume; wiped first (`volumes.wipe_on_delete`),
//! by a `wipe` job when that runs long; an encrypted volume is crypto-erased instead (its LUKS
//! header and key slots destroyed: no payload needs zeroing). Also finishing at start-up the
//! wipes and crypto-erases a crash cut short.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::engine::{Engine, Origin, Submission, SubmitError, Submitted};
use super::model::{Job, JobKind, JobSpec};
use super::state::{Holder, VolumeClaim};
use crate::volume::{self, Blocker, VolumeError, Wipe, WipeMode, WipeProgress};

/// A wipe outside a job: its own rate-limited progress, and nothing that cancels it.
struct Unattended {
    mode: WipeMode,
    progress: Arc<WipeProgress>,
    cancel: CancellationToken,
}

impl Unattended {
    fn new(mode: WipeMode, limit: u64) -> Unattended {
        Unattended {
            mode,
            progress: Arc::new(WipeProgress::limited(limit)),
            cancel: CancellationToken::new(),
        }
    }

    fn wipe(&self) -> Wipe<'_> {
        Wipe {
            mode: self.mode,
            progress: &self.progress,
            cancel: &self.cancel,
        }
    }
}

/// Why a volume was not deleted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeleteError {
    #[error("volume {volume} is in use by {holder}")]
    Busy { volume: String, holder: Holder },
    #[error("volume {volume} cannot be deleted: {blocker}")]
    Blocked { volume: String, blocker: Blocker },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The wipe job could not be submitted (the queue is full, the name was taken meanwhile).
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// The deletion's task ended without an answer (a panic; the name was given back).
    #[error("the deletion failed: {0}")]
    Task(String),
}

/// What a deletion did.
#[derive(Debug)]
pub(crate) enum Deletion {
    /// Wiped and removed (`true`), or there was nothing (`false`).
    Done(bool),
    /// The wipe runs long: this `wipe` job wipes and removes the volume.
    Queued(Box<Job>),
}

impl Engine {
    /// Removes the volume `name` (absent is success), wiped first as `volumes.wipe_on_delete`
    /// says; a `zero` wipe of more than `volumes.wipe_job_min_bytes` becomes a `wipe` job. Runs
    /// on its own task: a caller that goes away does not cut a removal short, and the name is
    /// given back when it ends (`VolumeClaim`).
    pub(crate) async fn delete_volume(
        &self,
        name: &str,
        origin: Origin,
    ) -> Result<Deletion, DeleteError> {
        let engine = self.clone();
        let name = name.to_string();
        tokio::spawn(async move { engine.delete_here(&name, origin).await })
            .await
            .map_err(|e| DeleteError::Task(e.to_string()))?
    }

    async fn delete_here(&self, name: &str, origin: Origin) -> Result<Deletion, DeleteError> {
        let claim = {
            let mut st = self.state();
            VolumeClaim::take(self.shared(), &mut st, name, Holder::Deleting).map_err(|holder| {
                DeleteError::Busy {
                    volume: name.to_string(),
                    holder,
                }
            })?
        };
        let volumes = &self.context().volumes;
        let Some(volume) = volumes.inspect(name).await? else {
            return Ok(Deletion::Done(false));
        };
        if let Some(blocker) = volume.reuse_blocker.filter(Blocker::forbids_removal) {
            return Err(DeleteError::Blocked {
                volume: name.to_string(),
                blocker,
            });
        }
        let encryption = &self.context().encryption;
        if let Some(record) = encryption.record(name)? {
            encryption.erase(volumes.as_ref(), name, &record).await?;
            tracing::info!(volume = %name, "encrypted volume crypto-erased and removed");
            return Ok(Deletion::Done(true));
        }
        let settings = self.context().settings.current();
        let mode = volume::effective_wipe(settings.volumes.wipe_on_delete, volume.kind);
        let limit = settings.volumes.io.write_bytes_per_second;
        // Under a rate limit, a zero wipe that takes more than about 10 s is a job too.
        let long = volume.size_bytes > settings.volumes.wipe_job_min_bytes
            || (limit > 0 && volume.size_bytes / limit >= 10);
        if mode == WipeMode::Zero && long {
            // The job takes the name; a submission between the two gets it first (409).
            drop(claim);
            return self.submit_wipe(name, origin).await;
        }
        let unattended = Unattended::new(mode, limit);
        volumes.remove_wiped(name, &unattended.wipe()).await?;
        Ok(Deletion::Done(true))
    }

    async fn submit_wipe(&self, name: &str, origin: Origin) -> Result<Deletion, DeleteError> {
        let spec = JobSpec {
            volume_name: Some(name.to_string()),
            ..JobSpec::default()
        };
        let submission = Submission {
            kind: JobKind::Wipe,
            spec,
            origin,
            key: None,
        };
        match self.submit(submission).await? {
            Submitted::New(job) | Submitted::Existing(job) => Ok(Deletion::Queued(Box::new(job))),
        }
    }

    /// Start-up: finishes, one after the other on a task of their own, the wipes a crash cut
    /// short outside a job (a synchronous `DELETE`), each under the volume's lock; names a job
    /// holds are left to that job.
    pub(crate) fn finish_wipes(&self) {
        let engine = self.clone();
        tokio::spawn(async move {
            let volumes = engine.context().volumes.clone();
            engine.finish_erases().await;
            let unfinished = match volumes.unfinished_wipes().await {
                Ok(unfinished) => unfinished,
                Err(e) => {
                    tracing::error!(error = %e, "cannot list the wipes a crash cut short");
                    return;
                }
            };
            for (name, mode) in unfinished {
                let Ok(_claim) = VolumeClaim::take(
                    engine.shared(),
                    &mut engine.state(),
                    &name,
                    Holder::Deleting,
                ) else {
                    continue;
                };
                tracing::warn!(volume = %name, mode = mode.as_str(), "finishing an interrupted wipe");
                let limit = engine
                    .context()
                    .settings
                    .current()
                    .volumes
                    .io
                    .write_bytes_per_second;
                let unattended = Unattended::new(mode, limit);
                match volumes.finish_wipe(&name, &unattended.wipe()).await {
                    Ok(()) => tracing::info!(volume = %name, "interrupted wipe finished"),
                    Err(e) => {
                        tracing::error!(volume = %name, error = %e, "cannot finish an interrupted wipe")
                    }
                }
            }
        });
    }

    /// Start-up: finishes the crypto-erases a crash (or a failure: libvirt down) cut short,
    /// each under the volume's lock.
    async fn finish_erases(&self) {
        let ctx = self.context();
        for name in ctx.encryption.unfinished_erases() {
            let Ok(_claim) =
                VolumeClaim::take(self.shared(), &mut self.state(), &name, Holder::Deleting)
            else {
                continue;
            };
            tracing::warn!(volume = %name, "finishing an interrupted crypto-erase");
            match ctx
                .encryption
                .finish_erase(ctx.volumes.as_ref(), &name)
                .await
            {
                Ok(()) => tracing::info!(volume = %name, "interrupted crypto-erase finished"),
                Err(e) => {
                    tracing::error!(volume = %name, error = %e, "cannot finish an interrupted crypto-erase")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use async_trait::async_trait;
    use tokio::sync::Notify;

    use super::*;
    use crate::config::{LiveSettings, Settings};
    use crate::image::ImageType;
    use crate::image::cache::tests::test_cache;
    use crate::jobs::engine::{Submission, SubmitError};
    use crate::jobs::runner::RunContext;
    use crate::jobs::store::Store;
    use crate::volume::directory::DirectoryBackend;
    use crate::volume::{Grown, NewVolume, Overwrite, VolumeBackend, VolumeInfo};

    /// A directory backend whose `remove` waits until the test lets it go: the only way to
    /// hold a real removal open long enough to race a submission against it.
    struct GatedRemoval {
        inner: DirectoryBackend,
        started: Notify,
        release: Notify,
    }

    #[async_trait]
    impl VolumeBackend for GatedRemoval {
        fn volume_path(&self, name: &str) -> PathBuf {
            self.inner.volume_path(name)
        }
        async fn inspect(&self, name: &str) -> Result<Option<VolumeInfo>, VolumeError> {
            self.inner.inspect(name).await
        }
        async fn create(&self, new: &NewVolume<'_>) -> Result<VolumeInfo, VolumeError> {
            self.inner.create(new).await
        }
        async fn prepare(&self, overwrite: &Overwrite<'_>) -> Result<(), VolumeError> {
            self.inner.prepare(overwrite).await
        }
        async fn flush(&self, v: &VolumeInfo) -> Result<(), VolumeError> {
            self.inner.flush(v).await
        }
        async fn remove(&self, name: &str) -> Result<(), VolumeError> {
            self.started.notify_one();
            self.release.notified().await;
            self.inner.remove(name).await
        }
        async fn remove_wiped(&self, name: &str, wipe: &Wipe<'_>) -> Result<(), VolumeError> {
            self.started.notify_one();
            self.release.notified().await;
            self.inner.remove_wiped(name, wipe).await
        }
        async fn check_room(&self, size: u64) -> Result<(), VolumeError> {
            self.inner.check_room(size).await
        }
        async fn grow(&self, v: &VolumeInfo, size: u64, header: u64) -> Result<Grown, VolumeError> {
            self.inner.grow(v, size, header).await
        }
        async fn remove_created(&self, name: &str, owner: &str) -> Result<(), VolumeError> {
            self.inner.remove_created(name, owner).await
        }
        async fn probe(&self) -> Result<(), VolumeError> {
            self.inner.probe().await
        }
    }

    #[tokio::test]
    async fn a_submission_during_a_deletion_gets_the_lock_holder() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.cache.dir = dir.path().join("cache");
        settings.volumes.directory.path = dir.path().join("volumes");
        settings.sources.file_roots = vec![dir.path().to_path_buf()];
        let store = Store::open(&dir.path().join("state")).unwrap();
        let cache = test_cache(&settings.cache.dir);
        let backend = Arc::new(GatedRemoval {
            inner: DirectoryBackend::new(&settings.volumes.directory.path).unwrap(),
            started: Notify::new(),
            release: Notify::new(),
        });
        backend
            .inner
            .create(&NewVolume {
                name: "vm-1",
                size_bytes: 1 << 20,
                owner: "someone",
            })
            .await
            .unwrap();
        let image = dir.path().join("i.raw");
        std::fs::write(&image, vec![1u8; 4096]).unwrap();
        let (_tx, live) = LiveSettings::new(settings);
        let cache = Arc::new(cache);
        let ctx = Arc::new(RunContext {
            declared: crate::jobs::declared::DeclaredImages::new(cache.clone(), None, live.clone()),
            settings: live,
            cache,
            volumes: backend.clone(),
            clones: None,
            encryption: Arc::new(
                crate::volume::encrypt::Encryption::new(&dir.path().join("keys"), None).unwrap(),
            ),
        });
        let engine = Engine::start(store, ctx).await.unwrap();

        let deleting = tokio::spawn({
            let engine = engine.clone();
            async move { engine.delete_volume("vm-1", Origin::default()).await }
        });
        backend.started.notified().await;
        let spec = JobSpec {
            image_url: format!("file://{}", image.display()),
            image_type: Some(ImageType::Raw),
            volume_name: Some("vm-1".into()),
            volume_size_gb: Some(1),
            ..JobSpec::default()
        };
        let refused = engine
            .submit(Submission {
                kind: JobKind::Provision,
                spec: spec.clone(),
                origin: Origin::default(),
                key: None,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                refused,
                SubmitError::VolumeBusy {
                    holder: Holder::Deleting,
                    ..
                }
            ),
            "{refused}"
        );
        assert_eq!(refused.to_string(), "volume vm-1 is busy with its deletion");
        backend.release.notify_one();
        assert!(
            matches!(deleting.await.unwrap().unwrap(), Deletion::Done(true)),
            "the volume existed"
        );
        // The lock is released with the deletion.
        engine
            .submit(Submission {
                kind: JobKind::Provision,
                spec,
                origin: Origin::default(),
                key: None,
            })
            .await
            .unwrap();
    }
}
