//! What a `clone` job does (`POST /api/v1/volumes/{name}/clone`): makes the job's volume a copy
//! of an existing one. A source nothing has open on a backend that can snapshot it (a thin LV)
//! becomes a thin snapshot (metadata only); otherwise a new volume is made like any new volume
//! and the source is copied into it with `qemu-img convert -f raw -O raw`. A source in use by a
//! running domain is refused unless the request allows it (then copied as it is, with shared
//! locks: crash-consistent at best). The engine holds both names for the whole job; what the
//! job made is rolled back like a provision job's volume. With `encryption` the target is a
//! new encrypted volume (`encrypted::new_target`) the source is copied into through the LUKS
//! driver; an encrypted source is never cloned (its key is private to libvirt).

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::encrypted::{self, NewTarget};
use super::error::JobError;
use super::handle::JobHandle;
use super::model::{JobSpec, VolumeMethod};
use super::runner::{self, RunContext};
use crate::command::SecretFd;
use crate::convert::{self, ConvertSpec};
use crate::image::ImageType;
use crate::telemetry::metrics::metrics;
use crate::volume::encrypt::luks;
use crate::volume::{self, Blocker, BlockerKind, NewVolume, VolumeError, VolumeInfo, WipeMode};

/// Why a clone is refused (at submission, and again when the job starts).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CloneRefused {
    #[error("source volume {0} does not exist")]
    SourceNotFound(String),
    #[error("volume {0} already exists; a clone makes a new volume (choose another target)")]
    TargetExists(String),
    /// A running domain (or another process) has the source open.
    #[error(
        "source volume {volume} is in use: {blocker}; send \"allow_in_use\": true to copy it \
         as it is (crash-consistent at best)"
    )]
    InUse { volume: String, blocker: Blocker },
    #[error("source volume {volume} cannot be cloned: {blocker}")]
    Blocked { volume: String, blocker: Blocker },
    /// A clone is at least as large as its source.
    #[error(
        "size_gb asks for {asked} bytes, less than the {have} bytes of source volume {volume}; \
         a clone is at least as large as its source"
    )]
    Shrink {
        volume: String,
        have: u64,
        asked: u64,
    },
    #[error("invalid clone job: {0}")]
    Spec(&'static str),
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

/// A clone that may go ahead.
#[derive(Debug)]
struct Plan {
    source: VolumeInfo,
    target: String,
    /// The target's size: `size_gb` when given, else the source's.
    size_bytes: u64,
    /// The source is in use and `allow_in_use` was sent: copied, with shared locks.
    in_use: bool,
}

/// Checks a clone against the volumes as they are now: the source exists and may be read, the
/// target does not exist, the size is not smaller, and the new volume fits.
pub(crate) async fn check(ctx: &RunContext, spec: &JobSpec) -> Result<(), CloneRefused> {
    plan(ctx, spec).await.map(|_| ())
}

async fn plan(ctx: &RunContext, spec: &JobSpec) -> Result<Plan, CloneRefused> {
    let (Some(target), Some(clone)) = (&spec.volume_name, &spec.clone) else {
        return Err(CloneRefused::Spec("no source or target"));
    };
    let volumes = &ctx.volumes;
    let source = volumes
        .inspect(&clone.source)
        .await?
        .ok_or_else(|| CloneRefused::SourceNotFound(clone.source.clone()))?;
    if volumes.inspect(target).await?.is_some() {
        return Err(CloneRefused::TargetExists(target.clone()));
    }
    if ctx.encryption.record(&clone.source)?.is_some() {
        return Err(CloneRefused::Volume(VolumeError::EncryptionRefused(
            format!(
                "source volume {} is encrypted and cannot be cloned (its key is not readable: a \
             private libvirt secret); provision a new encrypted volume from the image instead",
                clone.source
            ),
        )));
    }
    if let Some(encryption) = &spec.encryption {
        ctx.encryption.check(target, encryption).await?;
    }
    let mut in_use = false;
    if let Some(blocker) = source.reuse_blocker.clone() {
        let volume = clone.source.clone();
        match blocker.kind {
            BlockerKind::Open | BlockerKind::Unknown if clone.allow_in_use => in_use = true,
            BlockerKind::Open | BlockerKind::Unknown => {
                return Err(CloneRefused::InUse { volume, blocker });
            }
            _ => return Err(CloneRefused::Blocked { volume, blocker }),
        }
    }
    let size_bytes = match spec.volume_size_gb {
        None => source.size_bytes,
        Some(gb) => {
            let asked = volume::gib_to_bytes(gb).ok_or(CloneRefused::Spec("size_gb"))?;
            if asked < source.size_bytes {
                return Err(CloneRefused::Shrink {
                    volume: clone.source.clone(),
                    have: source.size_bytes,
                    asked,
                });
            }
            asked
        }
    };
    // A thin snapshot takes no room up front (the pool's threshold is checked as it is made).
    let encrypted = spec.encryption.is_some();
    if encrypted {
        volumes
            .check_room(size_bytes + luks::HEADER_ALLOWANCE)
            .await?;
    } else if in_use || !volumes.can_snapshot(&source) {
        volumes.check_room(size_bytes).await?;
    }
    Ok(Plan {
        source,
        target: target.clone(),
        size_bytes,
        in_use,
    })
}

/// Runs a clone job to its end (its last progress published).
pub(super) async fn execute(
    ctx: &RunContext,
    h: &mut JobHandle,
    cancel: &CancellationToken,
) -> Result<(), JobError> {
    let result = run(ctx, h, cancel).await;
    h.publish(true);
    result
}

/// A clone job's steps: a thin snapshot when the backend can make one of a source nothing
/// uses, else a new volume and a copy; then the flush of the new volume.
async fn run(
    ctx: &RunContext,
    h: &mut JobHandle,
    cancel: &CancellationToken,
) -> Result<(), JobError> {
    let plan = plan(ctx, &h.job.spec).await.map_err(refused)?;
    let owner = h.job.id.to_string();
    let new = NewVolume {
        name: &plan.target,
        size_bytes: plan.size_bytes,
        owner: &owner,
    };
    let volumes = &ctx.volumes;
    h.tracker
        .start_convert(plan.source.size_bytes, Instant::now());
    h.publish(true);
    let span = tracing::info_span!(
        "create_volume",
        otel.name = "CreateVolume",
        volume_name = %plan.target,
        volume_size_bytes = plan.size_bytes,
        origin = %plan.source.name,
    );
    let target = if let Some(encryption) = h.job.spec.encryption.clone() {
        h.job.method = Some(VolumeMethod::Copy);
        let new = NewTarget {
            name: &plan.target,
            size_bytes: plan.size_bytes,
            data_bytes: plan.source.size_bytes,
            encryption: &encryption,
        };
        let (target, secret) = encrypted::new_target(ctx, h, &new, cancel)
            .instrument(span)
            .await?;
        runner::check_stop(cancel)?;
        copy(ctx, h, &plan, &target, Some(secret), cancel).await?;
        target
    } else if !plan.in_use && volumes.can_snapshot(&plan.source) {
        h.job.method = Some(VolumeMethod::ThinSnapshot);
        let snap = volumes.snapshot(&plan.source, &new).instrument(span);
        let target = runner::create_owned(h, snap).await?;
        h.tracker.update_fraction(1.0, Instant::now());
        target
    } else {
        h.job.method = Some(VolumeMethod::Copy);
        let target = runner::create_owned(h, volumes.create(&new).instrument(span)).await?;
        runner::check_stop(cancel)?;
        volumes
            .prepare_overwrite(&target, plan.source.size_bytes, WipeMode::Zero, cancel)
            .await?;
        runner::check_stop(cancel)?;
        copy(ctx, h, &plan, &target, None, cancel).await?;
        target
    };
    tracing::info!(
        source = %plan.source.name,
        volume = %target.name,
        method = h.job.method.map(VolumeMethod::as_str).unwrap_or(""),
        in_use = plan.in_use,
        "volume cloned"
    );
    runner::finalize(ctx, h, &target).await
}

/// A refusal found when the job starts (the volumes changed since submission).
fn refused(e: CloneRefused) -> JobError {
    match e {
        CloneRefused::Volume(v) => JobError::Volume(v),
        other => JobError::Volume(VolumeError::Conflict(other.to_string())),
    }
}

/// Copies the source into the new target with qemu-img (raw to raw, or raw into the LUKS
/// driver with `luks`), counting the bytes in `bulk_io_bytes_total{op="clone"}`.
async fn copy(
    ctx: &RunContext,
    h: &mut JobHandle,
    plan: &Plan,
    target: &VolumeInfo,
    luks: Option<Arc<SecretFd>>,
    cancel: &CancellationToken,
) -> Result<(), JobError> {
    let target_path = target.path.clone();
    let direct_io = tokio::task::spawn_blocking(move || convert::supports_direct_io(&target_path))
        .await
        .unwrap_or(false);
    let io = ctx.settings.current().volumes.io.clone();
    let spec = ConvertSpec {
        source: plan.source.path.clone(),
        format: ImageType::Raw,
        member: None,
        target: target.path.clone(),
        direct_io,
        coroutines: 8,
        target_is_zero: target.reads_zeros,
        cpu_limit: ctx.settings.current().jobs.timeout,
        force_share: plan.in_use,
        rate_limit: io.copy_rate(),
        io_priority: io.priority.ioprio(),
        luks,
    };
    let total = plan.source.size_bytes;
    let counter = metrics().bulk_io_bytes_total.with_label_values(&["clone"]);
    let mut counted = 0u64;
    let span = tracing::info_span!("copy_volume", otel.name = "CopyVolume", source = %plan.source.name, volume = %target.name, bytes = total);
    let copied = convert::convert(&spec, cancel, |fraction| {
        let now = Instant::now();
        let done = (fraction.clamp(0.0, 1.0) * total as f64) as u64;
        counter.inc_by(done.saturating_sub(counted));
        counted = counted.max(done);
        h.tracker.update_fraction(fraction, now);
        h.publish(false);
    })
    .instrument(span)
    .await;
    if let Err(e) = copied {
        if cancel.is_cancelled() {
            return Err(JobError::Stopped);
        }
        return Err(e.into());
    }
    Ok(())
}
