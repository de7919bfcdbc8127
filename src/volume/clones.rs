//! Clone stores: one golden copy per cached image, written once, from which new volumes are
//! cloned cheaply (a thin snapshot on an LVM thin pool, a reflink copy on a file system that
//! shares extents). A job asks for the golden copy of its image (`CloneStore::golden`): it is
//! ready, or the job writes it (`Golden::Build`, then `seal` or `abandon`), or this image gets
//! none and the job copies. The per-key lock a build holds lives in its `GoldenBuild`, so a
//! build, a use and a removal of the same key never overlap.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use super::backend::{NewVolume, VolumeInfo};
use super::error::VolumeError;

/// How a store's clones are made (the job reports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloneMethod {
    /// A thin snapshot of a golden LV: metadata only, blocks shared until written.
    ThinSnapshot,
    /// A reflink (`FICLONE`) copy of a golden file: extents shared until written.
    Reflink,
}

impl CloneMethod {
    /// As the job's `method` names it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CloneMethod::ThinSnapshot => "thin-snapshot",
            CloneMethod::Reflink => "reflink",
        }
    }
}

/// The image a golden copy is made from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GoldenSource<'a> {
    /// The cache key (64 lowercase hex).
    pub(crate) key: &'a str,
    /// The image's virtual size: the golden copy's size (rounded up to the store's unit).
    pub(crate) virtual_size: u64,
    /// Bytes of data the image holds (what the golden copy will take from the store).
    pub(crate) data_bytes: u64,
}

/// The answer to "the golden copy of this image".
pub(crate) enum Golden {
    /// Complete and sealed: clone from it.
    Ready(VolumeInfo),
    /// None yet: the caller writes `0..virtual_size` of `GoldenBuild::target`, then hands the
    /// build back to `seal` (or to `abandon` when writing failed).
    Build(GoldenBuild),
    /// This image gets no golden copy (it does not fit the store's bound, its name is taken,
    /// or the wait was cancelled): the caller copies.
    Skip,
}

/// A golden copy being written. Holds its key's lock until sealed or abandoned.
pub(crate) struct GoldenBuild {
    /// The new, empty golden copy to write (its `reads_zeros` says whether zeros may be
    /// skipped).
    pub(crate) target: VolumeInfo,
    /// The cache key.
    pub(crate) key: String,
    /// Bytes the image covers (what is past it must read zeros once sealed).
    pub(crate) virtual_size: u64,
    /// The key's lock, held for the whole build.
    pub(crate) _held: OwnedMutexGuard<()>,
}

/// Golden copies of cached images and the volumes cloned from them.
#[async_trait]
pub(crate) trait CloneStore: Send + Sync {
    /// How volumes made by `clone_to` are made.
    fn method(&self) -> CloneMethod;

    /// Allocation granule, to estimate from an image's data how much a golden copy holds.
    fn granule(&self) -> u64;

    /// The store's per-key locks.
    fn keys(&self) -> &KeyLocks;

    /// The golden copy of `source` (see `Golden`). Waits for another build of the same key.
    async fn golden(
        &self,
        source: &GoldenSource<'_>,
        cancel: &CancellationToken,
    ) -> Result<Golden, VolumeError> {
        check_key(source.key)?;
        let Some(held) = self.keys().lock(source.key, cancel).await else {
            return Ok(Golden::Skip);
        };
        self.golden_held(source, held).await
    }

    /// `golden` once the key is checked and its lock `held` (kept by a `Golden::Build`).
    async fn golden_held(
        &self,
        source: &GoldenSource<'_>,
        held: OwnedMutexGuard<()>,
    ) -> Result<Golden, VolumeError>;

    /// Makes a written build permanent (zeros past the image, flush, read-only, marked
    /// complete) and returns the golden copy. A build that cannot be sealed is removed.
    async fn seal(&self, build: GoldenBuild) -> Result<VolumeInfo, VolumeError>;

    /// Removes the unfinished golden copy `target` of a build (absent is success).
    async fn discard(&self, target: &VolumeInfo) -> Result<(), VolumeError>;

    /// Removes a build that could not be written (errors are logged: restart recovery
    /// removes what is left).
    async fn abandon(&self, build: GoldenBuild) {
        if let Err(e) = self.discard(&build.target).await {
            tracing::error!(error = %e, volume = %build.target.path.display(), "cannot remove the unfinished golden copy (restart recovery removes it)");
        }
    }

    /// `new`, cloned from `golden`. `Conflict` when a volume of that name exists.
    async fn clone_to(
        &self,
        golden: &VolumeInfo,
        new: &NewVolume<'_>,
    ) -> Result<VolumeInfo, VolumeError>;

    /// Removes the golden copy of `key` (its cache entry is gone); `true` when there was one.
    /// Clones made from it stay intact.
    async fn forget(&self, key: &str) -> Result<bool, VolumeError>;

    /// Start-up, before any job: removes golden copies whose build did not finish and those
    /// whose cache entry (`cached_keys`) is gone.
    async fn recover(&self, cached_keys: &HashSet<String>);
}

/// One lock per cache key, and when each key's golden copy was last used.
#[derive(Default)]
pub(crate) struct KeyLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// When this process last used each key's golden copy (eviction order for a store's bound;
    /// keys not used since start-up come first).
    last_use: Mutex<HashMap<String, std::time::Instant>>,
}

impl KeyLocks {
    fn lock_of(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    /// Waits for `key`'s lock; `None` when `cancel` fired first.
    pub(crate) async fn lock(
        &self,
        key: &str,
        cancel: &CancellationToken,
    ) -> Option<OwnedMutexGuard<()>> {
        let lock = self.lock_of(key);
        tokio::select! {
            held = lock.lock_owned() => Some(held),
            _ = cancel.cancelled() => None,
        }
    }

    /// `key`'s lock if nobody holds it.
    pub(crate) fn try_lock(&self, key: &str) -> Option<OwnedMutexGuard<()>> {
        self.lock_of(key).try_lock_owned().ok()
    }

    /// Records a use of `key`'s golden copy now.
    pub(crate) fn touch(&self, key: &str) {
        self.last_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), std::time::Instant::now());
    }

    /// Forgets `key`'s last use.
    pub(crate) fn forget(&self, key: &str) {
        self.last_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// `items` (key first) ordered least recently used first.
    pub(crate) fn by_last_use<T>(&self, items: &mut [(String, T)]) {
        let last = self.last_use.lock().unwrap_or_else(|e| e.into_inner());
        items.sort_by_key(|(key, _)| last.get(key).copied());
    }
}

/// The end every store's `seal` shares: a build that could not be sealed (`sealed` holds the
/// error) is abandoned and the error returned; a sealed one's key counts as used now.
pub(crate) async fn settle<S: CloneStore + ?Sized>(
    store: &S,
    keys: &KeyLocks,
    build: GoldenBuild,
    sealed: Result<(), VolumeError>,
) -> Result<GoldenBuild, VolumeError> {
    if let Err(e) = sealed {
        store.abandon(build).await;
        return Err(e);
    }
    keys.touch(&build.key);
    Ok(build)
}

/// Whether an image with `source.data_bytes` of data can have a golden copy in a store bound to
/// `max_bytes` (`setting` names the bound); when not, says so and the job copies.
pub(crate) fn within_bound(source: &GoldenSource<'_>, max_bytes: u64, setting: &str) -> bool {
    if source.data_bytes <= max_bytes {
        return true;
    }
    tracing::warn!(
        key = source.key,
        data_bytes = source.data_bytes,
        golden_max_bytes = max_bytes,
        "the image holds more data than {setting}; copying it instead of making a golden copy"
    );
    false
}

/// Checks a cache key: 64 lowercase hex digits.
pub(crate) fn check_key(key: &str) -> Result<(), VolumeError> {
    if key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(VolumeError::InvalidName(format!(
            "cache key {key:?} is not 64 lowercase hex digits"
        )))
    }
}
