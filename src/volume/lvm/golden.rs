//! Golden images on the thin pool: one read-only thin LV per cache entry, written once, from
//! which every new volume of that image is a thin snapshot (metadata only: no data is written,
//! blocks are shared until the VM writes them). The LVM clone store (`CloneStore`): it owns the
//! golden LVs' states (a build is tagged complete only once written, flushed and read-only),
//! the snapshot that becomes a job's volume, the bound on the pool data golden LVs hold
//! (`volumes.lvm.golden_max_bytes`), removal with the cache entry, and restart recovery
//! (incomplete or orphaned golden LVs are removed). Names and tags: `naming.rs`.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use super::backend::LvmBackend;
use super::naming::{COMPLETE_TAG, GOLDEN_TAG, golden_name, key_tag};
use super::report::LvInfo;
use crate::telemetry::metrics::metrics;
use crate::volume::backend::{NewVolume, VolumeBackend, VolumeInfo};
use crate::volume::blockdev;
use crate::volume::clones::{
    CloneMethod, CloneStore, Golden, GoldenBuild, GoldenSource, KeyLocks, check_key, settle,
    within_bound,
};
use crate::volume::error::VolumeError;

/// Granule in which the thin pool provisions data (LVM's smallest and usual chunk size), for
/// estimating a golden image's pool use.
const POOL_CHUNK: u64 = 64 << 10;

/// What an LV of a golden image's name is.
#[derive(Debug, PartialEq, Eq)]
enum GoldenState {
    /// Written, flushed and sealed: usable.
    Complete,
    /// A build that did not finish (failure, cancel, crash): never used, removed.
    Incomplete,
    /// Not a golden LV of this key (someone else's LV, or another key with the same prefix).
    Foreign,
}

/// The golden images of one thin pool.
pub(crate) struct GoldenImages {
    lvm: Arc<LvmBackend>,
    /// `volumes.lvm.golden_max_bytes`.
    max_bytes: u64,
    /// Per-key locks and last uses.
    keys: KeyLocks,
}

fn state_of(lv: &LvInfo, key: &str) -> GoldenState {
    if lv.golden_key().as_deref() != Some(key) {
        GoldenState::Foreign
    } else if lv.tags.iter().any(|t| t == COMPLETE_TAG) && lv.attr.permissions == 'r' {
        GoldenState::Complete
    } else {
        GoldenState::Incomplete
    }
}

/// Pool data a thin LV holds (its provisioned share of its virtual size).
fn data_bytes_of(lv: &LvInfo) -> u64 {
    (lv.data_percent.unwrap_or(0.0) / 100.0 * lv.size_bytes as f64) as u64
}

impl GoldenImages {
    /// Golden images in `lvm`'s thin pool, holding at most `max_bytes` of pool data.
    pub(crate) fn new(lvm: Arc<LvmBackend>, max_bytes: u64) -> GoldenImages {
        GoldenImages {
            lvm,
            max_bytes,
            keys: KeyLocks::default(),
        }
    }

    /// Makes the written golden LV permanent: zeros past the image (unless the LV reads zeros
    /// there already), flush, read-only with activation skip, and only then the `complete` tag.
    async fn seal_lv(&self, golden: &VolumeInfo, virtual_size: u64) -> Result<(), VolumeError> {
        if !golden.reads_zeros {
            let path = golden.path.clone();
            tokio::task::spawn_blocking(move || {
                blockdev::zero_from(&path, virtual_size, &CancellationToken::new())
            })
            .await
            .map_err(|e| VolumeError::io(&golden.path, std::io::Error::other(e)))??;
        }
        self.lvm.flush(golden).await?;
        let lv = self.lvm.lv_arg(&golden.name);
        self.lvm
            .run(
                "lvchange",
                &[
                    "--yes",
                    "--permission",
                    "r",
                    "--setactivationskip",
                    "y",
                    &lv,
                ],
            )
            .await?;
        self.lvm
            .run("lvchange", &["--addtag", COMPLETE_TAG, &lv])
            .await?;
        Ok(())
    }

    /// Whether `source` fits the bound: removes the least recently used golden LVs of other
    /// keys (none that is being built or used) until it does; `false` when it cannot fit.
    async fn make_room(
        &self,
        all: &[LvInfo],
        source: &GoldenSource<'_>,
    ) -> Result<bool, VolumeError> {
        if !within_bound(source, self.max_bytes, "volumes.lvm.golden_max_bytes") {
            return Ok(false);
        }
        let mut others: Vec<(String, (String, u64))> = all
            .iter()
            .filter_map(|lv| {
                let key = lv.golden_key()?;
                (key != source.key).then(|| (key, (lv.name.clone(), data_bytes_of(lv))))
            })
            .collect();
        let mut used: u64 = others.iter().map(|(_, (_, b))| b).sum();
        self.keys.by_last_use(&mut others);
        for (key, (name, bytes)) in others {
            if used + source.data_bytes <= self.max_bytes {
                break;
            }
            let Some(_held) = self.keys.try_lock(&key) else {
                continue;
            };
            tracing::info!(volume = %self.lvm.lv_arg(&name), bytes, "removing the least recently used golden image (volumes.lvm.golden_max_bytes)");
            self.remove_lv(&name).await?;
            used = used.saturating_sub(bytes);
        }
        let fits = used + source.data_bytes <= self.max_bytes;
        if !fits {
            tracing::warn!(
                key = source.key,
                used,
                golden_max_bytes = self.max_bytes,
                "no room for another golden image (the others are in use); copying instead"
            );
        }
        Ok(fits)
    }

    async fn remove_lv(&self, name: &str) -> Result<(), VolumeError> {
        self.lvm
            .run("lvremove", &["--yes", &self.lvm.lv_arg(name)])
            .await?;
        tracing::info!(volume = %self.lvm.lv_arg(name), "golden image removed");
        Ok(())
    }

    /// Start-up (no build runs yet), on the listing `all` (the VG's LVs): removes golden LVs
    /// whose build did not finish and those whose cache entry (`cached_keys`) is gone, and sets
    /// the golden metrics.
    async fn recover_in(
        &self,
        all: &[LvInfo],
        cached_keys: &HashSet<String>,
    ) -> Result<(), VolumeError> {
        let mut kept = Vec::new();
        for lv in all {
            let Some(key) = lv.golden_key() else {
                continue;
            };
            let reason = if state_of(lv, &key) != GoldenState::Complete {
                "its build did not finish"
            } else if !cached_keys.contains(&key) {
                "its cache entry is gone"
            } else {
                kept.push(lv.clone());
                continue;
            };
            tracing::warn!(volume = %self.lvm.lv_arg(&lv.name), key, reason, "removing golden image");
            self.remove_lv(&lv.name).await?;
        }
        set_metrics(&kept);
        Ok(())
    }

    /// Updates the golden image count and bytes metrics from `lvs`.
    pub(crate) async fn refresh_metrics(&self) {
        if let Ok(all) = self.lvm.lvs().await {
            set_metrics(&all);
        }
    }
}

#[async_trait]
impl CloneStore for GoldenImages {
    fn keys(&self) -> &KeyLocks {
        &self.keys
    }

    fn method(&self) -> CloneMethod {
        CloneMethod::ThinSnapshot
    }

    fn granule(&self) -> u64 {
        POOL_CHUNK
    }

    async fn golden_held(
        &self,
        source: &GoldenSource<'_>,
        held: OwnedMutexGuard<()>,
    ) -> Result<Golden, VolumeError> {
        let name = golden_name(source.key);
        let all = self.lvm.lvs().await?;
        if let Some(lv) = all.iter().find(|l| l.name == name) {
            match state_of(lv, source.key) {
                GoldenState::Complete => {
                    self.keys.touch(source.key);
                    return Ok(Golden::Ready(self.lvm.info(lv)));
                }
                GoldenState::Incomplete => {
                    tracing::warn!(volume = %self.lvm.lv_arg(&name), "removing a golden image whose build did not finish");
                    self.remove_lv(&name).await?;
                }
                GoldenState::Foreign => {
                    tracing::warn!(
                        volume = %self.lvm.lv_arg(&name),
                        key = source.key,
                        "an LV that is not this image's golden image has its name; copying instead"
                    );
                    return Ok(Golden::Skip);
                }
            }
        }
        if !self.make_room(&all, source).await? {
            return Ok(Golden::Skip);
        }
        let tags = [GOLDEN_TAG.to_string(), key_tag(source.key)];
        let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
        let target = self
            .lvm
            .create_lv(&name, source.virtual_size, &tags)
            .await?;
        tracing::info!(volume = %target.path.display(), key = source.key, "building golden image");
        Ok(Golden::Build(GoldenBuild {
            target,
            key: source.key.to_string(),
            virtual_size: source.virtual_size,
            _held: held,
        }))
    }

    async fn seal(&self, build: GoldenBuild) -> Result<VolumeInfo, VolumeError> {
        let sealed = self.seal_lv(&build.target, build.virtual_size).await;
        let build = settle(self, &self.keys, build, sealed).await?;
        tracing::info!(volume = %build.target.path.display(), key = build.key, "golden image complete");
        self.refresh_metrics().await;
        Ok(build.target)
    }

    async fn discard(&self, target: &VolumeInfo) -> Result<(), VolumeError> {
        self.remove_lv(&target.name).await
    }

    /// A new volume `name` of at least `size_bytes`: a thin snapshot of `golden`, activated
    /// (no activation skip), writable, extended to the size, tagged as created by `owner`.
    /// Checks the pool first. `Conflict` when an LV of that name exists.
    async fn clone_to(
        &self,
        golden: &VolumeInfo,
        new: &NewVolume<'_>,
    ) -> Result<VolumeInfo, VolumeError> {
        self.lvm.thin_snapshot(golden, new, &[]).await
    }

    async fn forget(&self, key: &str) -> Result<bool, VolumeError> {
        check_key(key)?;
        let _held = self.keys.lock(key, &CancellationToken::new()).await;
        let name = golden_name(key);
        let removed = match self.lvm.lv(&name).await? {
            Some(lv) if lv.golden_key().as_deref() == Some(key) => {
                self.remove_lv(&name).await?;
                true
            }
            _ => false,
        };
        self.keys.forget(key);
        if removed {
            self.refresh_metrics().await;
        }
        Ok(removed)
    }

    async fn recover(&self, cached_keys: &HashSet<String>) {
        let all = match self.lvm.lvs().await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the volume group to recover golden images");
                return;
            }
        };
        if let Err(e) = self.recover_in(&all, cached_keys).await {
            tracing::warn!(error = %e, "cannot recover golden images");
        }
    }
}

/// The golden image count and bytes metrics, from a listing of the VG's LVs.
pub(crate) fn set_metrics(all: &[LvInfo]) {
    let complete: Vec<&LvInfo> = all
        .iter()
        .filter(|lv| {
            lv.golden_key()
                .is_some_and(|k| state_of(lv, &k) == GoldenState::Complete)
        })
        .collect();
    let m = metrics();
    m.golden_images.set(complete.len() as i64);
    m.golden_image_bytes
        .set(complete.iter().map(|lv| data_bytes_of(lv)).sum::<u64>() as i64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::lvm::report::parse_lvs;

    const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn golden_lv(tags: &str, attr: &str) -> LvInfo {
        let json = format!(
            r#"{{"report":[{{"lv":[{{"lv_name":"lvp-golden-0123456789abcdef","vg_name":"v",
            "lv_size":"1073741824","lv_attr":"{attr}","lv_tags":"{tags}","origin":"",
            "pool_lv":"pool","segtype":"thin","data_percent":"25.00","metadata_percent":"",
            "zero":"zero"}}]}}]}}"#
        );
        parse_lvs(&json).unwrap().remove(0)
    }

    #[test]
    fn names_and_states() {
        assert_eq!(golden_name(KEY), "lvp-golden-0123456789abcdef");
        assert!(check_key(KEY).is_ok());
        assert!(check_key("ABC").is_err());
        assert!(check_key(&KEY.to_uppercase()).is_err());
        let complete = golden_lv(
            &format!("lvp_golden,lvp_image_{KEY},lvp_golden_complete"),
            "Vri-a-tz-k",
        );
        assert_eq!(state_of(&complete, KEY), GoldenState::Complete);
        assert_eq!(data_bytes_of(&complete), 1 << 28);
        // Without the complete tag, or still writable (sealing stopped halfway): not usable.
        let half = golden_lv(&format!("lvp_golden,lvp_image_{KEY}"), "Vwi-a-tz--");
        assert_eq!(state_of(&half, KEY), GoldenState::Incomplete);
        let unsealed = golden_lv(
            &format!("lvp_golden,lvp_image_{KEY},lvp_golden_complete"),
            "Vwi-a-tz--",
        );
        assert_eq!(state_of(&unsealed, KEY), GoldenState::Incomplete);
        let other_key = KEY.replace("ef01", "ff01");
        assert_eq!(state_of(&complete, &other_key), GoldenState::Foreign);
        let plain = golden_lv("", "Vwi-a-tz--");
        assert_eq!(state_of(&plain, KEY), GoldenState::Foreign);
    }

    /// Only complete golden LVs count in `golden_images` and `golden_image_bytes`.
    #[test]
    fn metrics_count_complete_golden_images_only() {
        let complete = golden_lv(
            &format!("lvp_golden,lvp_image_{KEY},lvp_golden_complete"),
            "Vri-a-tz-k",
        );
        let half = golden_lv(&format!("lvp_golden,lvp_image_{KEY}"), "Vwi-a-tz--");
        let plain = golden_lv("", "Vwi-a-tz--");
        set_metrics(&[complete, half, plain]);
        assert_eq!(metrics().golden_images.get(), 1);
        assert_eq!(metrics().golden_image_bytes.get(), 1 << 28);
    }

    /// A thin snapshot of a golden LV is a plain thin volume (reusable, removable); other
    /// snapshots stay protected.
    #[test]
    fn clones_of_golden_images_are_plain_volumes() {
        let lvs_tagged = |origin: &str, tags: &str| {
            let json = format!(
                r#"{{"report":[{{"lv":[{{"lv_name":"vm-1","vg_name":"v","lv_size":"1073741824",
                "lv_attr":"Vwi-a-tz--","lv_tags":"{tags}","origin":"{origin}",
                "pool_lv":"pool","segtype":"thin","data_percent":"0.50","metadata_percent":"",
                "zero":"zero"}}]}}]}}"#
            );
            parse_lvs(&json).unwrap().remove(0)
        };
        let lvs = |origin: &str| lvs_tagged(origin, "lvp_job_x");
        let clone = lvs("lvp-golden-0123456789abcdef");
        assert_eq!(clone.removal_blocker(), None);
        assert_eq!(clone.reuse_blocker(), None);
        assert_eq!(clone.data_percent, Some(0.5));
        assert_eq!(clone.metadata_percent, None);
        assert!(clone.zero);
        let snapshot = lvs("vm-0");
        let blocker = snapshot.removal_blocker().unwrap();
        assert!(blocker.reason.contains("snapshot of vm-0"), "{blocker}");
        // A clone job's thin snapshot of a volume carries the clone tag: a plain volume too.
        let cloned = lvs_tagged("vm-0", "lvp_job_x,lvp_clone");
        assert_eq!(cloned.removal_blocker(), None);
        assert_eq!(cloned.reuse_blocker(), None);
    }

    #[test]
    fn golden_lvs_are_never_removed_or_reused_as_volumes() {
        let lv = golden_lv(
            &format!("lvp_golden,lvp_image_{KEY},lvp_golden_complete"),
            "Vri-a-tz-k",
        );
        let blocker = lv.removal_blocker().expect("golden LVs are blocked");
        assert_eq!(blocker.kind, crate::volume::backend::BlockerKind::Golden);
        assert!(blocker.forbids_removal());
        assert!(
            blocker
                .reason
                .contains(&format!("DELETE /api/v1/cache/images/{KEY}")),
            "{blocker}"
        );
        assert_eq!(
            lv.reuse_blocker().unwrap().kind,
            crate::volume::backend::BlockerKind::Golden
        );
    }
}
