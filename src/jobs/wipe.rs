//! What a `wipe` job does: wipes a volume as `volumes.wipe_on_delete` says, then removes it,
//! reporting the bytes wiped as progress. A `DELETE` whose wipe runs long becomes such a job;
//! one cut short by a crash runs again at the next start (the engine's recovery), and the
//! volume carries the intent durably meanwhile (see `VolumeBackend::remove_wiped`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::error::JobError;
use super::handle::JobHandle;
use crate::volume::{self, Blocker, VolumeBackend, VolumeError, Wipe, WipeMode, WipeProgress};

/// How often the bytes wiped are copied into the job's progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Wipes and removes the job's volume; an absent volume is done (a resumed job whose removal
/// had finished).
pub(super) async fn run(
    volumes: &dyn VolumeBackend,
    setting: Option<WipeMode>,
    limit: u64,
    h: &mut JobHandle,
    cancel: &CancellationToken,
) -> Result<(), JobError> {
    let name = h
        .job
        .spec
        .volume_name
        .clone()
        .ok_or(JobError::InvalidSpec("wipe job without volume_name"))?;
    let Some(target) = volumes.inspect(&name).await? else {
        return Ok(());
    };
    if let Some(blocker) = target.reuse_blocker.filter(Blocker::forbids_removal) {
        return Err(
            VolumeError::Conflict(format!("volume {name} cannot be deleted: {blocker}")).into(),
        );
    }
    let mode = volume::effective_wipe(setting, target.kind);
    h.tracker.start_convert(target.size_bytes, Instant::now());
    h.publish(true);
    let progress = Arc::new(WipeProgress::limited(limit));
    let wipe = Wipe {
        mode,
        progress: &progress,
        cancel,
    };
    let work = volumes.remove_wiped(&name, &wipe);
    tokio::pin!(work);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let outcome = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tick.tick() => {
                h.tracker.update_bytes(progress.get().0, Instant::now());
                h.publish(false);
            }
        }
    };
    if outcome.is_err() && cancel.is_cancelled() {
        return Err(JobError::Stopped);
    }
    outcome?;
    h.tracker.update_bytes(progress.get().0, Instant::now());
    h.tracker.start_finalize(Instant::now());
    tracing::info!(volume = %name, mode = mode.as_str(), "volume wiped and removed");
    Ok(())
}
