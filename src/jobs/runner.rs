//! What a job does, step by step: fetch the image into the cache, check it against the request
//! and the volume, then either make the volume a clone of the image's golden copy (a thin
//! snapshot, a reflink; building that first if needed) or create or reuse the volume and write
//! the image into it; flush; plus rollback of what a failed job created. Progress is recorded
//! through the job's handle as it goes.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::error::JobError;
use super::handle::JobHandle;
use super::model::{Job, JobKind, JobSpec, Stage, VolumeMethod, VolumeOwnership};
use crate::command::SecretFd;
use crate::config::LiveSettings;
use crate::convert::{self, ConvertSpec};
use crate::image::ImageType;
use crate::image::cache::{CachedImage, ImageCache, Transfer};
use crate::image::inspect::{self, Inspection};
use crate::image::resolved::SourceRequest;
use crate::telemetry::metrics::metrics;
use crate::volume::clones::{CloneStore, Golden, GoldenSource};
use crate::volume::encrypt::Encryption;
use crate::volume::{self, NewVolume, VolumeBackend, VolumeError, VolumeInfo, WipeMode};

/// Everything jobs use.
pub(crate) struct RunContext {
    /// The current settings (hot reload replaces them; a running job keeps what it read).
    pub(crate) settings: LiveSettings,
    pub(crate) cache: Arc<ImageCache>,
    /// The volume backend (with libvirt integration: wrapped, see `volume::libvirt`).
    pub(crate) volumes: Arc<dyn VolumeBackend>,
    /// Golden copies new volumes are cloned from (golden LVs on a thin pool, golden files
    /// with reflinks); `None`: every volume is a copy.
    pub(crate) clones: Option<Arc<dyn CloneStore>>,
    /// Declared images (`[[images]]`): a job naming one uses its current version.
    pub(crate) declared: Arc<super::declared::DeclaredImages>,
    /// Keys of encrypted volumes.
    pub(crate) encryption: Arc<Encryption>,
}

/// A step's outcome.
type StepResult<T> = Result<T, JobError>;

/// `Stopped` once cancel, timeout or shutdown fired.
pub(super) fn check_stop(cancel: &CancellationToken) -> StepResult<()> {
    if cancel.is_cancelled() {
        Err(JobError::Stopped)
    } else {
        Ok(())
    }
}

/// Runs the job's steps. Returns when done, failed, or stopped through `cancel` (child
/// processes are gone by then).
pub(crate) async fn execute(
    ctx: &RunContext,
    h: &mut JobHandle,
    cancel: &CancellationToken,
) -> StepResult<()> {
    let result = match h.job.kind {
        JobKind::Provision => provision(ctx, h, cancel).await,
        JobKind::CacheFetch => fetch_only(ctx, h, cancel).await.map(|_| ()),
        JobKind::Wipe => {
            let settings = ctx.settings.current();
            let (setting, limit) = (
                settings.volumes.wipe_on_delete,
                settings.volumes.io.write_bytes_per_second,
            );
            super::wipe::run(ctx.volumes.as_ref(), setting, limit, h, cancel).await
        }
        // Run by the engine through `clone::execute` (which uses the steps here).
        JobKind::Clone => Err(JobError::InvalidSpec("clone jobs run through jobs::clone")),
    };
    h.publish(true);
    result
}

/// A cache fetch: the image into the cache, checked against a declared `image_type` exactly as
/// a provision job checks it (a mismatch fails the job with the same error; the entry stays
/// cached, as after a provision job's mismatch).
async fn fetch_only(
    ctx: &RunContext,
    h: &mut JobHandle,
    cancel: &CancellationToken,
) -> StepResult<CachedImage> {
    let image = fetch(ctx, h, cancel).await?;
    check_declared_type(&image.entry.inspection, h.job.spec.image_type)?;
    h.job.image_path = Some(image.path.display().to_string());
    Ok(image)
}

/// Fetches the job's image through the cache, reporting download progress; a declared image's
/// current version when the job names one (held for the whole job, whatever a refresh
/// switches the name to meanwhile).
pub(super) async fn fetch(
    ctx: &RunContext,
    h: &mut JobHandle,
    cancel: &CancellationToken,
) -> StepResult<CachedImage> {
    let image = match ctx.declared.hold(&h.job.spec) {
        Some(image) => image,
        None => fetch_by_url(ctx, h, cancel).await?,
    };
    h.job.cache_hit = image.hit;
    h.job.image_format = Some(image.entry.inspection.format);
    h.job.verified = image.verified.clone();
    h.job.cache_revalidation = image.hit.then(|| image.revalidation.as_str().to_string());
    h.job.image_digest = Some(format!("sha256:{}", image.entry.sha256));
    Ok(image)
}

/// Fetches the job's image by its URL through the cache, reporting download progress.
async fn fetch_by_url(
    ctx: &RunContext,
    h: &mut JobHandle,
    cancel: &CancellationToken,
) -> StepResult<CachedImage> {
    let spec = h.job.spec.clone();
    let source = ctx.cache.source(
        &SourceRequest {
            image_url: &spec.image_url,
            checksum: spec.checksum.as_deref(),
            checksum_url: spec.checksum_url.as_deref(),
        },
        &ctx.settings.current().source_policy(),
    )?;
    let span = tracing::info_span!(
        "download",
        otel.name = "DownloadImageToPath",
        image_url = %spec.image_url,
        destination_path = %ctx.cache.dir().display(),
        cache_hit = tracing::field::Empty,
        bytes = tracing::field::Empty,
        parts = tracing::field::Empty,
        retries = tracing::field::Empty,
        ranged_requests = tracing::field::Empty,
    );
    let started = Instant::now();
    let mut downloading = false;
    let fetch = ctx.cache.fetch(&source, |t: Transfer| {
        let now = Instant::now();
        if !downloading {
            downloading = true;
            h.tracker.start_download(t.total, t.total, now);
        }
        h.tracker.update_bytes(t.done, now);
        if let Some(rate) = h.tracker.current_rate(now) {
            metrics()
                .stage_throughput_bytes_per_second
                .with_label_values(&["download"])
                .set(rate);
        }
        h.publish(false);
    });
    tracing::info!(parent: &span, "fetching image");
    let outcome = tokio::select! {
        r = fetch.instrument(span.clone()) => Some(r),
        _ = cancel.cancelled() => None,
    };
    // The stage is over however it ended: no throughput is left standing after a failed or
    // stopped download.
    metrics()
        .stage_throughput_bytes_per_second
        .with_label_values(&["download"])
        .set(0.0);
    let image = match outcome {
        Some(r) => r.inspect_err(|e| metrics().image_error("download", e.kind()))?,
        None => return Err(JobError::Stopped),
    };
    span.record("cache_hit", image.hit);
    span.record("bytes", image.entry.size);
    if !image.hit {
        h.record_stage(
            "download",
            image.entry.size,
            started.elapsed().as_secs_f64(),
        );
    }
    Ok(image)
}

async fn provision(
    ctx: &RunContext,
    h: &mut JobHandle,
    cancel: &CancellationToken,
) -> StepResult<()> {
    let spec = h.job.spec.clone();
    let (name, size_bytes) = target_of(&spec)?;
    // A new volume that cannot fit fails the job before a byte is downloaded.
    if ctx.volumes.inspect(&name).await?.is_none() {
        ctx.volumes.check_room(size_bytes).await?;
    }
    let image = fetch(ctx, h, cancel).await?;
    let verdict = check_image(&image.entry.inspection, &spec, size_bytes)?;
    h.job.image_path = Some(image.path.display().to_string());
    if let Some(clones) = &ctx.clones
        && let Some(target) = from_golden(
            ctx,
            h,
            clones.as_ref(),
            &image,
            &verdict,
            &name,
            size_bytes,
            cancel,
        )
        .await?
    {
        return finalize(ctx, h, &target).await;
    }
    check_stop(cancel)?;
    h.job.method = Some(VolumeMethod::Copy);
    let target = prepare_volume(ctx, h, &name, size_bytes, verdict.virtual_size, cancel).await?;
    check_stop(cancel)?;
    populate(ctx, h, &image, &verdict, &target, None, cancel).await?;
    finalize(ctx, h, &target).await
}

/// The clone path: the image's golden copy (built now, by this job, if there is none), then
/// the volume as a clone of it (a thin snapshot, a reflink). `None` when the path does not
/// apply and the job copies instead: the volume exists (reuse stays a full overwrite), or the
/// image gets no golden copy (`Golden::Skip`).
#[allow(clippy::too_many_arguments)]
async fn from_golden(
    ctx: &RunContext,
    h: &mut JobHandle,
    clones: &dyn CloneStore,
    image: &CachedImage,
    verdict: &Inspection,
    name: &str,
    size_bytes: u64,
    cancel: &CancellationToken,
) -> StepResult<Option<VolumeInfo>> {
    if ctx.volumes.inspect(name).await?.is_some() {
        return Ok(None);
    }
    let data_bytes = convert::data_bytes(
        &image.path,
        verdict.format,
        verdict.ova_disk,
        clones.granule(),
    )
    .await?;
    let source = GoldenSource {
        key: &image.entry.key,
        virtual_size: verdict.virtual_size,
        data_bytes,
    };
    let golden = match clones.golden(&source, cancel).await? {
        Golden::Ready(golden) => golden,
        Golden::Skip => return Ok(None),
        Golden::Build(build) => {
            if let Err(e) = populate(ctx, h, image, verdict, &build.target, None, cancel).await {
                clones.abandon(build).await;
                return Err(e);
            }
            clones.seal(build).await?
        }
    };
    check_stop(cancel)?;
    h.job.method = Some(VolumeMethod::of_clones(clones.method()));
    let span = tracing::info_span!(
        "create_volume",
        otel.name = "CreateVolume",
        volume_name = %name,
        volume_size_bytes = size_bytes,
        origin = %golden.name,
    );
    let owner = h.job.id.to_string();
    let new = NewVolume {
        name,
        size_bytes,
        owner: &owner,
    };
    let clone = create_owned(h, clones.clone_to(&golden, &new).instrument(span)).await?;
    // The volume holds the image now: the convert stage is complete (when this job built the
    // golden copy, it already is).
    let now = Instant::now();
    if h.tracker.progress().stage != Stage::Converting {
        h.tracker.start_convert(verdict.virtual_size, now);
    }
    h.tracker.update_fraction(1.0, now);
    h.publish(true);
    Ok(Some(clone))
}

/// Makes a volume with `create`, ownership recorded durably around it: `creating` before
/// anything is made (so rollback and restart recovery know), `created` after; a `Conflict`
/// (someone else's volume appeared under the name) records `none`, so rollback never removes a
/// volume the job did not make.
pub(super) async fn create_owned(
    h: &mut JobHandle,
    create: impl std::future::Future<Output = Result<VolumeInfo, VolumeError>>,
) -> StepResult<VolumeInfo> {
    h.job.volume_ownership = VolumeOwnership::Creating;
    h.save_durably().await?;
    match create.await {
        Ok(volume) => {
            h.job.volume_ownership = VolumeOwnership::Created;
            h.save_durably().await?;
            Ok(volume)
        }
        Err(e) => {
            if matches!(e, VolumeError::Conflict(_)) {
                h.job.volume_ownership = VolumeOwnership::None;
                h.save_durably().await?;
            }
            Err(e.into())
        }
    }
}

/// The volume a provision job writes: its name and size in bytes.
pub(super) fn target_of(spec: &JobSpec) -> StepResult<(String, u64)> {
    let name = spec
        .volume_name
        .clone()
        .ok_or(JobError::InvalidSpec("provision job without volume_name"))?;
    let size_bytes =
        spec.volume_size_gb
            .and_then(volume::gib_to_bytes)
            .ok_or(JobError::InvalidSpec(
                "provision job without a valid volume_size_gb",
            ))?;
    Ok((name, size_bytes))
}

/// The image must be of the declared format (when one is declared), for provision jobs and
/// cache fetches alike.
fn check_declared_type(verdict: &Inspection, declared: Option<ImageType>) -> StepResult<()> {
    let Some(declared) = declared else {
        return Ok(());
    };
    if let Err(e) = inspect::check_requested(verdict, declared) {
        metrics().image_error("inspect", e.kind());
        return Err(e.into());
    }
    Ok(())
}

/// The image must be of the requested format and fit the requested size.
pub(super) fn check_image(
    verdict: &Inspection,
    spec: &JobSpec,
    size_bytes: u64,
) -> StepResult<Inspection> {
    check_declared_type(verdict, spec.image_type)?;
    if verdict.virtual_size > size_bytes {
        metrics().image_error("inspect", "too_large");
        return Err(JobError::TooLarge {
            virtual_size: verdict.virtual_size,
            volume_bytes: size_bytes,
            volume_gb: spec.volume_size_gb.unwrap_or(0),
        });
    }
    Ok(*verdict)
}

/// The conversion of `image` into `target` (through the LUKS driver with `luks`): O_DIRECT
/// when the target takes it, the IO limits of the settings now.
async fn spec_for(
    ctx: &RunContext,
    image: &CachedImage,
    verdict: &Inspection,
    target: &VolumeInfo,
    luks: Option<Arc<SecretFd>>,
) -> ConvertSpec {
    let target_path = target.path.clone();
    let direct_io = tokio::task::spawn_blocking(move || convert::supports_direct_io(&target_path))
        .await
        .unwrap_or(false);
    if !direct_io {
        tracing::info!(
            volume = %target.path.display(),
            "target does not support O_DIRECT; writing through the page cache (-t writeback)"
        );
    }
    let io = ctx.settings.current().volumes.io.clone();
    ConvertSpec {
        source: image.path.clone(),
        format: verdict.format,
        member: verdict.ova_disk,
        target: target.path.clone(),
        direct_io,
        coroutines: 8,
        cpu_limit: ctx.settings.current().jobs.timeout,
        target_is_zero: target.reads_zeros,
        force_share: false,
        rate_limit: io.copy_rate(),
        io_priority: io.priority.ioprio(),
        luks,
    }
}

/// Writes the image into the volume with qemu-img (through the LUKS driver with `luks`),
/// reporting its progress.
pub(super) async fn populate(
    ctx: &RunContext,
    h: &mut JobHandle,
    image: &CachedImage,
    verdict: &Inspection,
    target: &VolumeInfo,
    luks: Option<Arc<SecretFd>>,
    cancel: &CancellationToken,
) -> StepResult<()> {
    let started = Instant::now();
    h.tracker.start_convert(verdict.virtual_size, started);
    h.publish(true);
    let convert_spec = spec_for(ctx, image, verdict, target, luks).await;
    let span = tracing::info_span!(
        "populate",
        otel.name = "PopulateVolume",
        volume_name = %target.name,
        volume_path = %target.path.display(),
        volume_size_bytes = target.size_bytes,
        image_format = verdict.format.as_str(),
        virtual_size = verdict.virtual_size,
        target_is_zero = target.reads_zeros,
    );
    let written = metrics()
        .bulk_io_bytes_total
        .with_label_values(&["convert"]);
    let mut counted = 0u64;
    let converted = convert::convert(&convert_spec, cancel, |fraction| {
        let now = Instant::now();
        // The image's virtual bytes processed (zeros included): what the limit paces.
        let done = (fraction.clamp(0.0, 1.0) * verdict.virtual_size as f64) as u64;
        written.inc_by(done.saturating_sub(counted));
        counted = counted.max(done);
        h.tracker.update_fraction(fraction, now);
        if let Some(rate) = h.tracker.current_rate(now) {
            metrics()
                .stage_throughput_bytes_per_second
                .with_label_values(&["convert"])
                .set(rate);
        }
        h.publish(false);
    })
    .instrument(span)
    .await;
    // As for downloads: the gauge reads 0 once the conversion ended, whatever the outcome.
    metrics()
        .stage_throughput_bytes_per_second
        .with_label_values(&["convert"])
        .set(0.0);
    if let Err(e) = converted {
        // A conversion stopped by cancel, timeout or shutdown is not an image error.
        if cancel.is_cancelled() {
            return Err(JobError::Stopped);
        }
        metrics().image_error("convert", "qemu_img");
        return Err(e.into());
    }
    h.record_stage(
        "convert",
        verdict.virtual_size,
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// Flushes the volume to stable storage (with libvirt integration, the backend then refreshes
/// the pool).
pub(super) async fn finalize(
    ctx: &RunContext,
    h: &mut JobHandle,
    target: &VolumeInfo,
) -> StepResult<()> {
    h.tracker.start_finalize(Instant::now());
    h.publish(true);
    ctx.volumes
        .flush(target)
        .await
        .map_err(|source| JobError::Flush {
            volume: target.name.clone(),
            source,
        })?;
    h.job.volume_path = Some(target.path.display().to_string());
    if let Some(method) = h.job.method {
        metrics()
            .volumes_created_total
            .with_label_values(&[method.as_str()])
            .inc();
    }
    Ok(())
}

/// Creates the volume, or checks an existing one, and prepares it for a complete overwrite
/// (everything past the image zeroed). Ownership is recorded durably before anything is
/// created, so rollback and restart recovery know what the job made. An existing volume the
/// image does not fit is refused before anything is written to it.
async fn prepare_volume(
    ctx: &RunContext,
    h: &mut JobHandle,
    name: &str,
    size_bytes: u64,
    image_size: u64,
    cancel: &CancellationToken,
) -> StepResult<VolumeInfo> {
    let span = tracing::info_span!(
        "create_volume",
        otel.name = "CreateVolume",
        volume_name = %name,
        volume_size_bytes = size_bytes,
        reused = tracing::field::Empty,
    );
    async {
        let mut tail = WipeMode::Zero;
        let target = match ctx.volumes.inspect(name).await? {
            Some(existing) => {
                refuse_encrypted(ctx, name)?;
                let setting = ctx.settings.current().volumes.wipe_on_reuse;
                tail = volume::effective_wipe(setting, existing.kind);
                volume::check_reusable(&existing, size_bytes)?;
                if existing.size_bytes < image_size {
                    return Err(JobError::VolumeTooSmall {
                        virtual_size: image_size,
                        volume: name.to_string(),
                        volume_bytes: existing.size_bytes,
                    });
                }
                h.job.volume_ownership = VolumeOwnership::Reused;
                h.save_durably().await?;
                tracing::Span::current().record("reused", true);
                tracing::info!(volume = %existing.path.display(), "reusing existing volume");
                existing
            }
            None => {
                tracing::Span::current().record("reused", false);
                let owner = h.job.id.to_string();
                let new = NewVolume {
                    name,
                    size_bytes,
                    owner: &owner,
                };
                let created = create_owned(h, ctx.volumes.create(&new)).await?;
                tracing::info!(volume = %created.path.display(), bytes = created.size_bytes, "volume created");
                if created.size_bytes < image_size {
                    return Err(JobError::VolumeTooSmall {
                        virtual_size: image_size,
                        volume: name.to_string(),
                        volume_bytes: created.size_bytes,
                    });
                }
                created
            }
        };
        ctx.volumes
            .prepare_overwrite(&target, image_size, tail, cancel)
            .await?;
        Ok(target)
    }
    .instrument(span)
    .await
}

/// Removes the job's volume if (and only if) the job created it, then the key it made for it
/// (an encrypted volume's).
pub(crate) async fn rollback(ctx: &RunContext, job: &Job) -> Result<(), VolumeError> {
    let Some(name) = &job.spec.volume_name else {
        return Ok(());
    };
    if job.owns_volume() {
        let span = tracing::info_span!("delete_volume", otel.name = "DeleteVolume", volume_name = %name, reason = "rollback");
        async {
            tracing::info!("removing volume created by the failed job");
            ctx.volumes.remove_created(name, &job.id.to_string()).await
        }
        .instrument(span)
        .await?;
    }
    // The job's key goes once its volume is gone (or was never the job's to remove).
    if job.encryption.is_some() {
        tracing::info!(volume = %name, "forgetting the key made by the failed job");
        ctx.encryption.forget(name).await?;
    }
    Ok(())
}

/// An encrypted volume is never reused (its key would no longer match what is written).
fn refuse_encrypted(ctx: &RunContext, name: &str) -> Result<(), VolumeError> {
    match ctx.encryption.record(name)? {
        Some(_) => Err(VolumeError::EncryptionRefused(format!(
            "volume {name} is encrypted and is never reused; delete it first (a crypto-erase) \
             or choose another name"
        ))),
        None => Ok(()),
    }
}

/// Submission-time check: an existing volume of this name must be reusable (else 409).
pub(crate) async fn check_volume_usable(
    ctx: &RunContext,
    spec: &JobSpec,
) -> Result<(), VolumeError> {
    let (Some(name), Some(gb)) = (&spec.volume_name, spec.volume_size_gb) else {
        return Ok(());
    };
    // The API bounds volume_size_gb far below an overflow.
    let size = volume::gib_to_bytes(gb).unwrap_or(u64::MAX);
    let existing = ctx.volumes.inspect(name).await?;
    if let Some(encryption) = &spec.encryption {
        if existing.is_some() {
            return Err(VolumeError::EncryptionRefused(format!(
                "volume {name} exists; an encrypted volume is always made new (delete it first or \
                 choose another name)"
            )));
        }
        return ctx.encryption.check(name, encryption).await;
    }
    match existing {
        Some(existing) => {
            refuse_encrypted(ctx, name)?;
            volume::check_reusable(&existing, size)
        }
        None => Ok(()),
    }
}
