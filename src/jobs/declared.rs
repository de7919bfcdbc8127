//! Declared images (`[[images]]`): the images a host keeps cached and fresh by name. At start
//! and after every reload, each declared image missing from the cache is fetched at a random
//! moment of `cache.declared_fetch_window`, at most `cache.declared_fetch_concurrency` at once;
//! each image's current version is pinned in the cache (never evicted while declared); every
//! `refresh` the source is asked whether the image changed (one conditional HEAD) and a new
//! version is fetched, verified, its golden copy built when asked, and only then does the name
//! point at it. Jobs that name an image hold the version current when they fetched it; a
//! version left behind is an ordinary cache entry. A dropped declaration is unpinned, never
//! deleted.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::model::JobSpec;
use crate::config::{DeclaredImageSettings, LiveSettings, Settings};
use crate::image::cache::{CacheEntry, CachedImage, FetchError, ImageCache, Revalidation};
use crate::image::resolved::SourceRequest;
use crate::telemetry::metrics::metrics;
use crate::volume::clones::CloneStore;

/// Longest wait between two looks at the declarations (a deleted entry is noticed this fast).
const MAX_IDLE: Duration = Duration::from_secs(30);
/// First retry delay after a failed fetch or refresh (doubles up to `MAX_RETRY`).
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(600);

/// The version a name points at.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Version {
    /// The cache key (pinned while the name points here).
    pub(crate) key: String,
    /// `sha256:<hex>` of the content.
    pub(crate) digest: String,
    /// When this version entered the cache.
    pub(crate) fetched: DateTime<Utc>,
    /// Its size (counts against the cache bound).
    size: u64,
}

impl Version {
    fn of(entry: &CacheEntry) -> Version {
        Version {
            key: entry.key.clone(),
            digest: format!("sha256:{}", entry.sha256),
            fetched: entry.created,
            size: entry.size,
        }
    }
}

/// What is known about one declared image.
#[derive(Debug, Clone)]
struct Tracked {
    decl: DeclaredImageSettings,
    current: Option<Version>,
    last_checked: Option<DateTime<Utc>>,
    last_changed: Option<DateTime<Utc>>,
    last_error: Option<String>,
    /// When the next fetch or refresh starts (`None`: never, `refresh = "0s"` once cached).
    due: Option<DateTime<Utc>>,
    /// A fetch or refresh is running.
    running: bool,
    /// Failures in a row (the retry delay doubles with each).
    failures: u32,
    /// Changes when the declaration does: a task of an older declaration records nothing.
    generation: u64,
}

/// One declared image as `GET /api/v1/images` shows it.
#[derive(Debug, Clone)]
pub(crate) struct DeclaredStatus {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) digest: Option<String>,
    pub(crate) cached: bool,
    pub(crate) golden: bool,
    pub(crate) last_checked: Option<DateTime<Utc>>,
    pub(crate) last_changed: Option<DateTime<Utc>>,
    pub(crate) next_check: Option<DateTime<Utc>>,
    pub(crate) last_error: Option<String>,
}

/// The declared images and the task that keeps them.
pub(crate) struct DeclaredImages {
    cache: Arc<ImageCache>,
    clones: Option<Arc<dyn CloneStore>>,
    settings: LiveSettings,
    images: Mutex<BTreeMap<String, Tracked>>,
    /// Fetches and refreshes running at once (replaced when the setting changes).
    permits: Mutex<(usize, Arc<Semaphore>)>,
    /// Wakes the task (a reload, a finished fetch).
    wake: Notify,
    /// Generations handed out.
    generations: std::sync::atomic::AtomicU64,
    /// Stops running fetches at shutdown.
    stop: CancellationToken,
}

impl DeclaredImages {
    /// The declarations of `settings`, with what the cache already holds of them.
    pub(crate) fn new(
        cache: Arc<ImageCache>,
        clones: Option<Arc<dyn CloneStore>>,
        settings: LiveSettings,
    ) -> Arc<DeclaredImages> {
        let current = settings.current();
        let concurrency = current.cache.declared_fetch_concurrency;
        let declared = Arc::new(DeclaredImages {
            cache,
            clones,
            settings,
            images: Mutex::new(BTreeMap::new()),
            permits: Mutex::new((concurrency, Arc::new(Semaphore::new(concurrency)))),
            wake: Notify::new(),
            generations: Default::default(),
            stop: CancellationToken::new(),
        });
        declared.apply(&current);
        declared
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Tracked>> {
        self.images.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses declarations whose cached versions alone exceed `cache.max_size_bytes` (named
    /// in the message); nothing changes.
    pub(crate) fn check(&self, new: &Settings) -> Result<(), String> {
        let images = self.lock();
        let mut total = 0u64;
        for decl in &new.images {
            let size = match images.get(&decl.name) {
                Some(t) if t.decl == *decl => t.current.as_ref().map_or(0, |v| v.size),
                _ => self.cached_version(decl, new).map_or(0, |(v, _)| v.size),
            };
            total = total.saturating_add(size);
            if total > new.cache.max_size_bytes {
                return Err(format!(
                    "images.{}: the declared images need {total} bytes of cache, more than \
                     cache.max_size_bytes = {}",
                    decl.name, new.cache.max_size_bytes
                ));
            }
        }
        Ok(())
    }

    /// Takes the declarations of `new`: new names are looked up in the cache (and fetched
    /// within the window when missing), changed ones start over, dropped ones are unpinned.
    pub(crate) fn apply(&self, new: &Settings) {
        let now = Utc::now();
        let window = new.cache.declared_fetch_window;
        {
            let mut images = self.lock();
            images.retain(|name, _| new.declared_image(name).is_some());
            for decl in &new.images {
                if images.get(&decl.name).is_some_and(|t| t.decl == *decl) {
                    continue;
                }
                let cached = self.cached_version(decl, new);
                // Missing: fetched within the window. Cached: refreshed when its last
                // confirmation is `refresh` old, not before a moment of the window either
                // (a fleet restarted at once does not ask the source at once).
                let spread = now + jitter(window);
                let due = match &cached {
                    None => Some(spread),
                    Some((_, validated)) => next_refresh(decl, *validated).map(|d| d.max(spread)),
                };
                let current = cached.map(|(v, _)| v);
                let generation = self
                    .generations
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                images.insert(
                    decl.name.clone(),
                    Tracked {
                        decl: decl.clone(),
                        current,
                        last_checked: None,
                        last_changed: None,
                        last_error: None,
                        due,
                        running: false,
                        failures: 0,
                        generation,
                    },
                );
            }
        }
        self.set_concurrency(new.cache.declared_fetch_concurrency);
        self.repin();
        self.wake.notify_one();
    }

    fn set_concurrency(&self, n: usize) {
        let mut permits = self.permits.lock().unwrap_or_else(|e| e.into_inner());
        if permits.0 != n {
            // Fetches already running keep their permits of the old bound.
            *permits = (n, Arc::new(Semaphore::new(n)));
        }
    }

    /// The cached version of `decl`'s source, if the cache holds one checked as it asks, and
    /// when the source last confirmed it.
    fn cached_version(
        &self,
        decl: &DeclaredImageSettings,
        settings: &Settings,
    ) -> Option<(Version, DateTime<Utc>)> {
        let source = self
            .cache
            .source(&request_of(decl), &settings.source_policy())
            .ok()?;
        self.cache
            .latest_of(&source)
            .map(|e| (Version::of(&e), e.validated))
    }

    /// Pins exactly the current versions of the declared images.
    fn repin(&self) {
        let keys: HashSet<String> = self
            .lock()
            .values()
            .filter_map(|t| t.current.as_ref().map(|v| v.key.clone()))
            .collect();
        self.cache.set_pinned(keys);
    }

    /// The declaration called `name` and the version it points at (none before the first
    /// fetch).
    pub(crate) fn resolve(&self, name: &str) -> Option<(DeclaredImageSettings, Option<Version>)> {
        self.lock()
            .get(name)
            .map(|t| (t.decl.clone(), t.current.clone()))
    }

    /// The current version of the image `spec` names, held for its job (`None`: no name,
    /// not declared with the job's URL and checksum any more, or not cached yet: the job
    /// fetches by URL).
    pub(crate) fn hold(&self, spec: &JobSpec) -> Option<CachedImage> {
        let (decl, version) = self.resolve(spec.image.as_deref()?)?;
        let same = decl.url == spec.image_url
            && decl.checksum() == spec.checksum.as_deref()
            && decl.checksum_url() == spec.checksum_url.as_deref();
        if !same {
            return None;
        }
        self.cache.hold(&version?.key)
    }

    /// Every declared image, by name.
    pub(crate) fn list(&self) -> Vec<DeclaredStatus> {
        self.lock()
            .values()
            .map(|t| DeclaredStatus {
                name: t.decl.name.clone(),
                url: t.decl.url.clone(),
                digest: t.current.as_ref().map(|v| v.digest.clone()),
                cached: t.current.is_some(),
                golden: t.decl.golden,
                last_checked: t.last_checked,
                last_changed: t.last_changed,
                next_check: t.due.filter(|_| !t.running),
                last_error: t.last_error.clone(),
            })
            .collect()
    }

    /// Runs the keeper until shutdown.
    pub(crate) fn spawn(self: &Arc<Self>) {
        let declared = self.clone();
        tokio::spawn(async move {
            loop {
                let next = declared.start_due();
                declared.update_metrics();
                let idle = next
                    .and_then(|t| (t - Utc::now()).to_std().ok())
                    .unwrap_or(MAX_IDLE)
                    .min(MAX_IDLE);
                tokio::select! {
                    _ = declared.stop.cancelled() => return,
                    _ = declared.wake.notified() => {}
                    _ = tokio::time::sleep(idle) => {}
                }
            }
        });
    }

    /// Stops the keeper and its running fetches.
    pub(crate) fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Starts the fetches and refreshes that are due; returns when the next one is.
    fn start_due(self: &Arc<Self>) -> Option<DateTime<Utc>> {
        let now = Utc::now();
        let mut next: Option<DateTime<Utc>> = None;
        let mut starts = Vec::new();
        {
            let mut images = self.lock();
            for (name, t) in images.iter_mut() {
                if t.running {
                    continue;
                }
                // A current version removed behind our back (DELETE of the entry) is fetched again.
                if t.current
                    .as_ref()
                    .is_some_and(|v| !self.cache.contains(&v.key))
                {
                    t.current = None;
                    t.due = Some(now);
                }
                match t.due {
                    Some(due) if due <= now => {
                        t.running = true;
                        starts.push((name.clone(), t.generation));
                    }
                    Some(due) => next = Some(next.map_or(due, |n| n.min(due))),
                    None => {}
                }
            }
        }
        for (name, generation) in starts {
            let declared = self.clone();
            tokio::spawn(async move { declared.keep(name, generation).await });
        }
        next
    }

    /// One fetch or refresh of `name`, within the concurrency bound.
    async fn keep(self: Arc<Self>, name: String, generation: u64) {
        let permits = self
            .permits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone();
        let Ok(_permit) = permits.acquire_owned().await else {
            return;
        };
        let Some((decl, before)) = self.resolve(&name) else {
            return;
        };
        let outcome = tokio::select! {
            r = self.fetch(&decl, before.is_some()) => r,
            _ = self.stop.cancelled() => return,
        };
        self.record(&name, generation, before, outcome);
        self.repin();
        self.wake.notify_one();
    }

    /// Fetches `decl` (`refresh`: the source is asked whatever the revalidation interval
    /// says), checks its format and builds its golden copy when asked.
    async fn fetch(
        &self,
        decl: &DeclaredImageSettings,
        refresh: bool,
    ) -> Result<CachedImage, String> {
        let settings = self.settings.current();
        let source = self
            .cache
            .source(&request_of(decl), &settings.source_policy())
            .map_err(|e| e.to_string())?;
        let fetched = if refresh {
            self.cache.fetch_fresh(&source, |_| {}).await
        } else {
            self.cache.fetch(&source, |_| {}).await
        };
        let image = fetched.map_err(|e: FetchError| {
            metrics().image_error("download", e.kind());
            e.to_string()
        })?;
        // A verified entry serves jobs while its source is down; a refresh that could not ask
        // is a failed refresh (retried), and the name stays where it is.
        if refresh && image.revalidation == Revalidation::SourceUnavailable {
            return Err("the source cannot be reached; the name stays on its version".into());
        }
        if let Some(want) = decl.image_type()
            && image.entry.inspection.format != want
        {
            return Err(format!(
                "image_type is {want} but the image is {}",
                image.entry.inspection.format
            ));
        }
        if decl.golden
            && let Some(clones) = &self.clones
        {
            super::golden::prebuild(clones.as_ref(), &image, &settings, &self.stop)
                .await
                .map_err(|e| format!("building the golden image: {e}"))?;
        }
        Ok(image)
    }

    /// Records a fetch's outcome: on success the name points at the fetched version (the
    /// switch), the next refresh is scheduled; on failure the error, and a retry.
    fn record(
        &self,
        name: &str,
        generation: u64,
        before: Option<Version>,
        outcome: Result<CachedImage, String>,
    ) {
        let now = Utc::now();
        let mut images = self.lock();
        let Some(t) = images.get_mut(name).filter(|t| t.generation == generation) else {
            return;
        };
        t.running = false;
        t.last_checked = Some(now);
        let refresh = before.is_some();
        match outcome {
            Ok(image) => {
                let version = Version::of(&image.entry);
                let changed = before.as_ref().is_none_or(|b| b.key != version.key);
                if changed {
                    t.last_changed = Some(now);
                    tracing::info!(image = name, digest = %version.digest, key = %version.key, "declared image now points at a new version");
                }
                if refresh {
                    let result = if changed { "changed" } else { "unchanged" };
                    metrics()
                        .declared_image_refreshes_total
                        .with_label_values(&[result])
                        .inc();
                }
                t.current = Some(version);
                t.last_error = None;
                t.failures = 0;
                t.due = next_refresh(&t.decl, now);
            }
            Err(e) => {
                if refresh {
                    metrics()
                        .declared_image_refreshes_total
                        .with_label_values(&["error"])
                        .inc();
                }
                tracing::warn!(image = name, error = %e, "declared image could not be fetched or refreshed");
                t.last_error = Some(e);
                t.failures = t.failures.saturating_add(1);
                let delay = FIRST_RETRY
                    .saturating_mul(1 << t.failures.min(10).saturating_sub(1))
                    .min(MAX_RETRY);
                t.due = Some(now + chrono::Duration::from_std(delay).unwrap_or_default());
            }
        }
    }

    /// Declared images by state, and each one's current version's age.
    fn update_metrics(&self) {
        let m = metrics();
        let now = Utc::now();
        let mut counts: BTreeMap<&str, i64> = [
            ("cached", 0),
            ("fetching", 0),
            ("pending", 0),
            ("failed", 0),
        ]
        .into();
        let images = self.lock();
        m.declared_image_age_seconds.reset();
        for (name, t) in images.iter() {
            let state = match (&t.current, t.running, &t.last_error) {
                (Some(_), _, _) => "cached",
                (None, true, _) => "fetching",
                (None, false, Some(_)) => "failed",
                (None, false, None) => "pending",
            };
            *counts.entry(state).or_default() += 1;
            if let Some(v) = &t.current {
                m.declared_image_age_seconds
                    .with_label_values(&[name])
                    .set((now - v.fetched).num_milliseconds() as f64 / 1000.0);
            }
        }
        for (state, n) in counts {
            m.declared_images.with_label_values(&[state]).set(n);
        }
    }
}

/// What the cache resolves for `decl`.
fn request_of(decl: &DeclaredImageSettings) -> SourceRequest<'_> {
    SourceRequest {
        image_url: &decl.url,
        checksum: decl.checksum(),
        checksum_url: decl.checksum_url(),
    }
}

/// When `decl` is refreshed after a check at `at` (`None`: `refresh = "0s"`, never).
fn next_refresh(decl: &DeclaredImageSettings, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    (!decl.refresh.is_zero())
        .then(|| at + chrono::Duration::from_std(decl.refresh).unwrap_or(chrono::Duration::MAX))
}

/// A random moment within `window`.
fn jitter(window: Duration) -> chrono::Duration {
    let d = window.mul_f64(rand::random_range(0.0..=1.0));
    chrono::Duration::from_std(d).unwrap_or_default()
}
