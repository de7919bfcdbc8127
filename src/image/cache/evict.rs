//! Keeping the cache within bounds: least-recently-used eviction by total size, eviction by
//! age, making room before a download (free-space check), superseded entries, and cleaning
//! leftovers at start-up. Entries in use by a job, and pinned entries (declared images'
//! current versions), are never evicted.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;

use super::checkpoint::{checkpoint_path, partial_path};
use super::{FetchError, ImageCache, Removal};
use crate::telemetry::metrics::metrics;

/// Why an entry was evicted (`cache_evictions_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EvictReason {
    Age,
    Size,
    Space,
    Superseded,
}

impl EvictReason {
    /// Every reason (so the metric's series exist from the start).
    pub(crate) const ALL: [EvictReason; 4] = [
        EvictReason::Age,
        EvictReason::Size,
        EvictReason::Space,
        EvictReason::Superseded,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EvictReason::Age => "age",
            EvictReason::Size => "size",
            EvictReason::Space => "space",
            EvictReason::Superseded => "superseded",
        }
    }
}

/// A partial download no running download owns.
pub(super) struct StoppedPartial {
    pub(super) key: String,
    /// A checkpoint beside it lets a later download resume it.
    pub(super) resumable: bool,
    modified: std::time::SystemTime,
    /// Space it holds on disk.
    bytes: u64,
}

impl ImageCache {
    fn evict_one(&self, key: &str, reason: EvictReason) -> bool {
        if self.in_use_count(key) > 0 || self.is_pinned(key) {
            return false;
        }
        match self.drop_entry(key) {
            Ok(()) => {
                metrics()
                    .cache_evictions_total
                    .with_label_values(&[reason.as_str()])
                    .inc();
                tracing::info!(key, reason = reason.as_str(), "cache entry evicted");
                self.removed(key, Removal::Evicted(reason));
                true
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "cannot evict cache entry");
                false
            }
        }
    }

    /// Applies the age and size bounds; with `want_free`, also evicts (least recently used
    /// first) until that many bytes are free on the cache file system.
    pub(crate) fn evict(&self, want_free: Option<u64>) {
        let limits = self.limits();
        let now = Utc::now();
        let max_age = chrono::Duration::from_std(limits.max_age).unwrap_or(chrono::Duration::MAX);
        let mut entries = self.entries(); // oldest use first
        entries
            .retain(|e| !(now - e.last_used > max_age && self.evict_one(&e.key, EvictReason::Age)));
        let mut total: u64 = entries.iter().map(|e| e.size).sum();
        for e in &entries {
            if total <= limits.max_size_bytes {
                break;
            }
            if self.evict_one(&e.key, EvictReason::Size) {
                total -= e.size;
            }
        }
        if let Some(want) = want_free {
            for e in &entries {
                // Without a reading of the free space nothing is evicted for space.
                if self.free_bytes().is_none_or(|free| free >= want) {
                    break;
                }
                if self.get_entry(&e.key).is_some() {
                    self.evict_one(&e.key, EvictReason::Space);
                }
            }
        }
    }

    /// Free bytes on the cache file system, minus what running downloads will still write;
    /// `None` when the file system cannot be asked.
    fn free_bytes(&self) -> Option<u64> {
        self.free_space().ok()
    }

    fn free_space(&self) -> Result<u64, FetchError> {
        let s = nix::sys::statvfs::statvfs(&self.dir).map_err(|e| {
            FetchError::Io(format!(
                "cannot read the free space of cache.dir {}: {e}",
                self.dir.display()
            ))
        })?;
        let avail = s.blocks_available() * s.fragment_size();
        Ok(avail.saturating_sub(self.reserved.load(Ordering::SeqCst)))
    }

    /// Makes sure an image of `size` bytes, `need` of them still to be written, fits while `cache.min_free_bytes` stay free. Decides first,
    /// evicts second: when even removing every stopped download's partial file and every
    /// unused entry could not make room (a source declaring a huge size, an image larger than
    /// the disk or than `cache.max_size_bytes`), nothing is removed and the error gives the
    /// numbers. Otherwise partial files of stopped downloads go first (`busy` lists the keys
    /// being downloaded; debris without a checkpoint before resumable ones), then unused
    /// entries, least recently used first. Fails, evicting nothing, when the free space
    /// cannot be read.
    pub(super) fn ensure_space(
        &self,
        size: u64,
        need: u64,
        busy: &[String],
    ) -> Result<(), FetchError> {
        let limits = self.limits();
        if size > limits.max_size_bytes {
            return Err(FetchError::NoSpace(format!(
                "the image has {size} bytes, more than the whole cache may hold \
                 (cache.max_size_bytes = {}); nothing was evicted",
                limits.max_size_bytes
            )));
        }
        let min_free = limits.min_free_bytes;
        let want = need.saturating_add(min_free);
        let free = self.free_space()?;
        if free >= want {
            return Ok(());
        }
        let partials = self.stopped_partials(busy);
        let reclaimable = partials.iter().map(|p| p.bytes).sum::<u64>()
            + self
                .entries()
                .iter()
                .filter(|e| self.in_use_count(&e.key) == 0 && !self.is_pinned(&e.key))
                .map(|e| e.size)
                .sum::<u64>();
        if free.saturating_add(reclaimable) < want {
            return Err(FetchError::NoSpace(format!(
                "need {need} bytes plus {min_free} kept free (cache.min_free_bytes), have {free} \
                 free in {}, and removing every unused entry and stopped download would free at \
                 most {reclaimable} more; nothing was evicted",
                self.dir.display()
            )));
        }
        self.drop_partials(want, partials);
        if self.free_space()? < want {
            self.evict(Some(want));
        }
        let free = self.free_space()?;
        if free < want {
            return Err(FetchError::NoSpace(format!(
                "need {need} bytes plus {min_free} kept free (cache.min_free_bytes), have {free} free in {}",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Partial files no running download owns, in the order they are given up: debris first
    /// (no checkpoint: nothing can resume them), then resumable ones, oldest first.
    pub(super) fn stopped_partials(&self, busy: &[String]) -> Vec<StoppedPartial> {
        use std::os::unix::fs::MetadataExt;
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut stopped: Vec<StoppedPartial> = dir
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let key = name.strip_suffix(".partial")?.to_string();
                if busy.contains(&key) {
                    return None;
                }
                let meta = e.metadata().ok()?;
                Some(StoppedPartial {
                    resumable: checkpoint_path(&self.dir, &key).exists(),
                    modified: meta.modified().ok()?,
                    // Allocated bytes: a preallocated file holds its whole size.
                    bytes: meta.blocks() * 512,
                    key,
                })
            })
            .collect();
        stopped.sort_by_key(|p| (p.resumable, p.modified));
        stopped
    }

    /// Removes `partials` in their order until `want` bytes are free.
    fn drop_partials(&self, want: u64, partials: Vec<StoppedPartial>) {
        for p in partials {
            if self.free_bytes().is_none_or(|free| free >= want) {
                break;
            }
            tracing::info!(
                key = %p.key,
                resumable = p.resumable,
                "removing a stopped download's partial file to make room"
            );
            let _ = std::fs::remove_file(partial_path(&self.dir, &p.key));
            let _ = std::fs::remove_file(checkpoint_path(&self.dir, &p.key));
        }
    }

    /// Removes other entries of the same source (an older ETag or checksum).
    pub(super) fn remove_superseded(&self, identity: &str, current_key: &str) {
        for e in self.entries() {
            if e.identity == identity && e.key != current_key {
                self.evict_one(&e.key, EvictReason::Superseded);
            }
        }
    }

    /// Start-up: removes what no index record or checkpoint explains (files of downloads that
    /// never reached a checkpoint, orphaned images), index records whose file is gone, and
    /// partial downloads older than `cache.max_age`.
    pub(super) fn clean_dir(&self) {
        let max_age = self.limits().max_age;
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let path = entry.path();
            let remove = if let Some(key) = name.strip_suffix(".partial") {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > max_age);
                old || !checkpoint_path(&self.dir, key).exists()
            } else if let Some(key) = name.strip_suffix(".partial.json") {
                !partial_path(&self.dir, key).exists()
            } else if let Some(key) = name.strip_suffix(".img") {
                self.get_entry(key).is_none()
            } else {
                name.ends_with(".tmp")
            };
            if remove {
                tracing::info!(file = %path.display(), "removing cache leftover");
                let _ = std::fs::remove_file(&path);
            }
        }
        for e in self.entries() {
            if !self.path_of(&e.key).exists() {
                let _ = self.drop_entry(&e.key);
            }
        }
    }

    /// Applies the bounds every `interval` (age-based eviction needs no event).
    pub(crate) fn spawn_evictor(self: &Arc<Self>, interval: Duration) {
        let cache = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let c = cache.clone();
                let _ = tokio::task::spawn_blocking(move || c.evict(None)).await;
            }
        });
    }
}
