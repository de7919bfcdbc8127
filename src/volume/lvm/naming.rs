//! Names and tags the daemon gives LVs: the tag naming the job that created an LV (rollback
//! removes only LVs with its own tag), and the golden images' reserved name prefix and tags. A
//! leaf of `lvm/`.

use crate::volume::error::VolumeError;
use crate::volume::wipe::WipeMode;

/// Prefix of the tag `lvcreate` puts on an LV a job creates (`lvp_job_<job id>`).
pub(crate) const OWNER_TAG_PREFIX: &str = "lvp_job_";
/// Tag of every golden image LV (`golden.rs`).
pub(crate) const GOLDEN_TAG: &str = "lvp_golden";
/// Prefix of golden image LV names (`lvp-golden-<16 hex of the cache key>`); reserved.
pub(crate) const GOLDEN_PREFIX: &str = "lvp-golden-";
/// Prefix of the tag naming a golden LV's cache key (`lvp_image_<64 hex>`).
pub(crate) const KEY_TAG_PREFIX: &str = "lvp_image_";
/// Tag a golden LV gets once it is written, flushed and read-only; without it, it is never used.
pub(crate) const COMPLETE_TAG: &str = "lvp_golden_complete";
/// Prefix of the tag an LV gets before it is wiped for deletion, followed by the wipe mode
/// (`lvp_wipe_zero`): the durable intent that start-up finishes after a crash.
pub(crate) const WIPE_TAG_PREFIX: &str = "lvp_wipe_";
/// Hex digits of the cache key in a golden LV's name.
const NAME_KEY_DIGITS: usize = 16;

/// The golden LV name of cache key `key`.
pub(crate) fn golden_name(key: &str) -> String {
    format!("{GOLDEN_PREFIX}{}", &key[..key.len().min(NAME_KEY_DIGITS)])
}

/// The tag naming cache key `key` on its golden LV.
pub(crate) fn key_tag(key: &str) -> String {
    format!("{KEY_TAG_PREFIX}{key}")
}

/// The tag marking an LV as created by job `owner`.
pub(crate) fn owner_tag(owner: &str) -> Result<String, VolumeError> {
    // LVM tags allow [A-Za-z0-9_+.-/=!:#&]; job ids are UUIDs.
    if owner.is_empty()
        || owner.len() > 200
        || !owner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+.-".contains(c))
    {
        return Err(VolumeError::InvalidName(format!(
            "volume owner {owner:?} cannot be an LVM tag"
        )));
    }
    Ok(format!("{OWNER_TAG_PREFIX}{owner}"))
}

/// The tag recording a wipe in `mode`.
pub(crate) fn wipe_tag(mode: WipeMode) -> String {
    format!("{WIPE_TAG_PREFIX}{}", mode.as_str())
}

/// The wipe mode an LV's tags record, if a wipe was started on it.
pub(crate) fn wipe_in_tags(tags: &[String]) -> Option<WipeMode> {
    tags.iter()
        .find_map(|t| t.strip_prefix(WIPE_TAG_PREFIX).and_then(WipeMode::parse))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_tags() {
        assert_eq!(
            owner_tag("6f1c7a3e-0000-4000-8000-000000000000").unwrap(),
            "lvp_job_6f1c7a3e-0000-4000-8000-000000000000"
        );
        assert!(owner_tag("").is_err());
        assert!(owner_tag("a b").is_err());
        assert!(owner_tag("a,b").is_err());
    }

    #[test]
    fn wipe_tags_round_trip() {
        assert_eq!(wipe_tag(WipeMode::Zero), "lvp_wipe_zero");
        let tags = vec!["lvp_job_x".to_string(), wipe_tag(WipeMode::Discard)];
        assert_eq!(wipe_in_tags(&tags), Some(WipeMode::Discard));
        assert_eq!(wipe_in_tags(&["lvp_wipe_shred".to_string()]), None);
    }
}
