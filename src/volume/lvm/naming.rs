//! Names and tags the daemon gives LVs: the tag naming the job that created an LV (rollback
//! removes only LVs with its own tag), and the golden images' reserved name prefix and tags. A
//! leaf of `lvm/`.

use crate::volume::error::VolumeError;

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
}
