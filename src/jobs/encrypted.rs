//! Encrypted volumes in jobs. A provision job with `encryption` is always a full copy (never a
//! thin snapshot or reflink of a shared plaintext golden image): the image is fetched and must
//! be qcow2 or raw after inspection, then `new_target` makes the key (recorded in the job
//! before anything else), a new volume with room for the LUKS header, formats it through
//! qemu-img and zeroes the raw bytes past where the image lands; the image is then written
//! through QEMU's `luks` driver. A clone job with `encryption` uses `new_target` too. Run by the
//! engine; rollback (`runner::rollback`) removes the volume, then forgets the key.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::error::JobError;
use super::handle::JobHandle;
use super::model::VolumeMethod;
use super::runner::{self, RunContext};
use crate::command::SecretFd;
use crate::convert;
use crate::image::ImageType;
use crate::volume::encrypt::{EncryptionSpec, luks};
use crate::volume::{NewVolume, VolumeError, VolumeInfo, WipeMode};

type StepResult<T> = Result<T, JobError>;

fn refused(message: String) -> JobError {
    JobError::Volume(VolumeError::EncryptionRefused(message))
}

/// Runs a provision job that asks for an encrypted volume (its last progress published).
pub(super) async fn execute(
    ctx: &RunContext,
    h: &mut JobHandle,
    cancel: &CancellationToken,
) -> StepResult<()> {
    let result = provision(ctx, h, cancel).await;
    h.publish(true);
    result
}

async fn provision(
    ctx: &RunContext,
    h: &mut JobHandle,
    cancel: &CancellationToken,
) -> StepResult<()> {
    let spec = h.job.spec.clone();
    let encryption = spec.encryption.clone().ok_or(JobError::InvalidSpec(
        "encrypted provision without encryption",
    ))?;
    let (name, size_bytes) = runner::target_of(&spec)?;
    // Everything that can refuse the job does so before a byte is downloaded.
    if ctx.volumes.inspect(&name).await?.is_some() {
        return Err(refused(format!(
            "volume {name} exists; an encrypted volume is always made new (delete it first or \
             choose another name)"
        )));
    }
    ctx.volumes
        .check_room(size_bytes + luks::HEADER_ALLOWANCE)
        .await?;
    ctx.encryption.check(&name, &encryption).await?;
    let image = runner::fetch(ctx, h, cancel).await?;
    let verdict = runner::check_image(&image.entry.inspection, &spec, size_bytes)?;
    if !matches!(verdict.format, ImageType::Qcow2 | ImageType::Raw) {
        return Err(refused(format!(
            "an encrypted volume is written from a qcow2 or raw image; this image is {} (convert \
             it to qcow2 first)",
            verdict.format.as_str()
        )));
    }
    h.job.image_path = Some(image.path.display().to_string());
    h.job.method = Some(VolumeMethod::Copy);
    let new = NewTarget {
        name: &name,
        size_bytes,
        data_bytes: verdict.virtual_size,
        encryption: &encryption,
    };
    let (target, secret) = new_target(ctx, h, &new, cancel).await?;
    runner::check_stop(cancel)?;
    runner::populate(ctx, h, &image, &verdict, &target, Some(secret), cancel).await?;
    runner::finalize(ctx, h, &target).await
}

/// An encrypted volume to make.
pub(super) struct NewTarget<'a> {
    pub(super) name: &'a str,
    /// The size asked for: the payload the guest sees is at least this.
    pub(super) size_bytes: u64,
    /// Bytes the writer will cover from the payload's start (the image's virtual size).
    pub(super) data_bytes: u64,
    pub(super) encryption: &'a EncryptionSpec,
}

/// Makes the encrypted volume `new` ready to be written through the LUKS driver: its key
/// (recorded durably in the job at once, so rollback and restart recovery forget it), the
/// volume (`size_bytes` plus the header's room, owned by the job), zeros on its raw bytes past
/// `data_bytes` (no earlier data survives under the new volume), and the LUKS format. Returns
/// the volume and its passphrase for the writer.
pub(super) async fn new_target(
    ctx: &RunContext,
    h: &mut JobHandle,
    new: &NewTarget<'_>,
    cancel: &CancellationToken,
) -> StepResult<(VolumeInfo, Arc<SecretFd>)> {
    let path = ctx.volumes.volume_path(new.name);
    let key = ctx
        .encryption
        .new_key(new.name, &path, new.encryption)
        .await?;
    h.job.encryption = Some(key.record.clone());
    h.save_durably().await?;
    let secret = Arc::new(key.secret_fd()?);
    drop(key);
    let owner = h.job.id.to_string();
    let volume = NewVolume {
        name: new.name,
        size_bytes: new.size_bytes + luks::HEADER_ALLOWANCE,
        owner: &owner,
    };
    let target = runner::create_owned(h, ctx.volumes.create(&volume)).await?;
    runner::check_stop(cancel)?;
    // Zeros from `data_bytes` on: past the header and the data (which start at the payload
    // offset), and the rest is overwritten by the format and the writer.
    ctx.volumes
        .prepare_overwrite(&target, new.data_bytes, WipeMode::Zero, cancel)
        .await?;
    convert::format_luks(&target.path, &secret, new.size_bytes).await?;
    restore_size(&target)?;
    Ok((target, secret))
}

/// A file, which qemu-img cut to header + payload, gets its full size back (the payload
/// follows it), so that every encrypted volume is its size plus `HEADER_ALLOWANCE`, as resizes
/// expect. Block devices keep their size.
fn restore_size(target: &VolumeInfo) -> StepResult<()> {
    let io = |e| VolumeError::io(&target.path, e);
    let meta = std::fs::metadata(&target.path).map_err(io)?;
    if meta.is_file() && meta.len() < target.size_bytes {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&target.path)
            .and_then(|f| f.set_len(target.size_bytes))
            .map_err(io)?;
    }
    Ok(())
}
