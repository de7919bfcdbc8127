//! Building a cached image's golden copy ahead of any volume (a declared image with
//! `golden = true`): the same steps a provision job takes on the clone path, without a job
//! (no progress, no volume of its own).

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::convert::{self, ConvertSpec};
use crate::image::cache::CachedImage;
use crate::volume::clones::{CloneStore, Golden, GoldenSource};

/// Makes sure `image` has its golden copy in `clones` (building it now when there is none;
/// a store that gives this image none, `Golden::Skip`, is not an error: jobs copy).
pub(crate) async fn prebuild(
    clones: &dyn CloneStore,
    image: &CachedImage,
    settings: &Settings,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let verdict = &image.entry.inspection;
    let data_bytes = convert::data_bytes(
        &image.path,
        verdict.format,
        verdict.ova_disk,
        clones.granule(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let source = GoldenSource {
        key: &image.entry.key,
        virtual_size: verdict.virtual_size,
        data_bytes,
    };
    let build = match clones
        .golden(&source, cancel)
        .await
        .map_err(|e| e.to_string())?
    {
        Golden::Ready(_) | Golden::Skip => return Ok(()),
        Golden::Build(build) => build,
    };
    let target = build.target.path.clone();
    let direct_io = tokio::task::spawn_blocking(move || convert::supports_direct_io(&target))
        .await
        .unwrap_or(false);
    let io = &settings.volumes.io;
    let spec = ConvertSpec {
        source: image.path.clone(),
        format: verdict.format,
        member: verdict.ova_disk,
        target: build.target.path.clone(),
        direct_io,
        coroutines: 8,
        cpu_limit: settings.jobs.timeout,
        target_is_zero: build.target.reads_zeros,
        force_share: false,
        rate_limit: io.copy_rate(),
        io_priority: io.priority.ioprio(),
        luks: None,
    };
    if let Err(e) = convert::convert(&spec, cancel, |_| {}).await {
        clones.abandon(build).await;
        return Err(e.to_string());
    }
    clones
        .seal(build)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}
