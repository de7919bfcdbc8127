//! What the LVM tools report, parsed: `vgs` and `lvs` JSON reports in bytes, `lv_attr`
//! decoded, and the rules read from them (which LV may be reused or removed, which is a golden
//! image). Pure: no command runs here.

use serde::Deserialize;

use super::naming::{GOLDEN_PREFIX, GOLDEN_TAG, KEY_TAG_PREFIX, wipe_in_tags};
use crate::volume::backend::{Blocker, BlockerKind};

/// Options every report command gets: machine-readable JSON, sizes as plain byte counts.
pub(crate) const REPORT_ARGS: [&str; 5] = ["--reportformat", "json", "--units", "b", "--nosuffix"];
pub(crate) const VG_FIELDS: &str =
    "vg_name,vg_extent_size,vg_extent_count,vg_free_count,vg_free,vg_size";
pub(crate) const LV_FIELDS: &str = "lv_name,vg_name,lv_size,lv_attr,lv_tags,origin,pool_lv,segtype,\
                         data_percent,metadata_percent,zero";
/// A volume group as `vgs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VgInfo {
    pub(crate) name: String,
    pub(crate) extent_size: u64,
    pub(crate) free_bytes: u64,
    pub(crate) size_bytes: u64,
}

/// A logical volume as `lvs` reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LvInfo {
    pub(crate) name: String,
    pub(crate) vg: String,
    pub(crate) size_bytes: u64,
    pub(crate) attr: LvAttr,
    pub(crate) tags: Vec<String>,
    /// Origin of a snapshot (old-style or thin); empty otherwise.
    pub(crate) origin: String,
    pub(crate) pool_lv: String,
    pub(crate) segtype: String,
    /// Thin pools and thin LVs: percent of the data (pool) or of the virtual size (thin LV)
    /// that is provisioned; `None` for other LVs.
    pub(crate) data_percent: Option<f64>,
    /// Thin pools: percent of the metadata that is used.
    pub(crate) metadata_percent: Option<f64>,
    /// Thin pools (and their thin LVs): newly provisioned chunks are zeroed (`lvs -o zero`).
    pub(crate) zero: bool,
}

/// The ten `lv_attr` characters (lvs(8), "lv_attr bits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LvAttr {
    pub(crate) volume_type: char,
    pub(crate) permissions: char,
    pub(crate) allocation: char,
    pub(crate) fixed_minor: char,
    pub(crate) state: char,
    pub(crate) open: char,
    pub(crate) target_type: char,
    pub(crate) zero: char,
    pub(crate) health: char,
    pub(crate) skip_activation: char,
}

impl LvAttr {
    /// Parses `lv_attr`; older LVM versions print fewer than ten characters (missing ones
    /// read as `-`).
    pub(crate) fn parse(s: &str) -> Result<LvAttr, String> {
        let c: Vec<char> = s.chars().collect();
        if c.len() < 6 || c.len() > 10 {
            return Err(format!("unexpected lv_attr {s:?}"));
        }
        let at = |i: usize| c.get(i).copied().unwrap_or('-');
        Ok(LvAttr {
            volume_type: at(0),
            permissions: at(1),
            allocation: at(2),
            fixed_minor: at(3),
            state: at(4),
            open: at(5),
            target_type: at(6),
            zero: at(7),
            health: at(8),
            skip_activation: at(9),
        })
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open == 'o'
    }

    pub(crate) fn is_active(&self) -> bool {
        self.state == 'a'
    }

    /// Why an LV of this volume type is not a plain data volume this service may overwrite or
    /// remove; `None` for linear/striped, thin, cached, mirrored and RAID volumes.
    pub(crate) fn special_type(&self) -> Option<&'static str> {
        match self.volume_type {
            '-' | 'V' | 'C' | 'm' | 'M' | 'r' | 'R' => None,
            'o' | 'O' => Some("it is the origin of snapshots"),
            's' | 'S' => Some("it is a snapshot"),
            't' => Some("it is a thin pool"),
            'T' => Some("it is thin pool data"),
            'e' => Some("it is RAID or pool metadata"),
            'd' => Some("it is a VDO pool"),
            'D' => Some("it is VDO pool data"),
            'p' => Some("it is a pvmove volume"),
            'v' => Some("it is a virtual volume"),
            'i' | 'I' => Some("it is a mirror or RAID image"),
            'l' => Some("it is a mirror log"),
            'c' => Some("it is under conversion"),
            _ => Some("it has an unknown volume type"),
        }
    }

    fn state_description(&self) -> Option<&'static str> {
        match self.state {
            'a' | '-' => None,
            's' => Some("suspended"),
            'I' => Some("an invalid snapshot"),
            'S' => Some("an invalid suspended snapshot"),
            'm' | 'M' => Some("a snapshot whose merge failed"),
            'd' => Some("mapped without tables"),
            'i' => Some("mapped with an inactive table"),
            'h' => Some("historical"),
            'c' | 'C' => Some("a thin pool that needs a check"),
            'X' => Some("in an unknown state"),
            _ => Some("in an unexpected state"),
        }
    }
}

impl LvInfo {
    fn attr_note(&self) -> String {
        let a = self.attr;
        format!(
            "lv_attr {}{}{}{}{}{}{}{}{}{}",
            a.volume_type,
            a.permissions,
            a.allocation,
            a.fixed_minor,
            a.state,
            a.open,
            a.target_type,
            a.zero,
            a.health,
            a.skip_activation
        )
    }

    /// Whether this is a golden image LV (`golden.rs`), and its cache key (the `lvp_image_`
    /// tag; the name when the tag is missing).
    pub(crate) fn golden_key(&self) -> Option<String> {
        if !self.tags.iter().any(|t| t == GOLDEN_TAG) {
            return None;
        }
        let key = self
            .tags
            .iter()
            .find_map(|t| t.strip_prefix(KEY_TAG_PREFIX))
            .unwrap_or(&self.name);
        Some(key.to_string())
    }

    /// A thin snapshot of a golden image: it shares the golden LV's blocks but does not depend
    /// on it (dm-thin keeps shared blocks until the last user is gone), so it is a plain thin
    /// volume that may be overwritten or removed.
    fn is_golden_clone(&self) -> bool {
        self.segtype == "thin" && self.origin.starts_with(GOLDEN_PREFIX)
    }

    /// Why this LV must not be overwritten by a job (the API answers 409 with it); `None` when
    /// it may be reused.
    pub(crate) fn reuse_blocker(&self) -> Option<Blocker> {
        // Whatever forbids removal also forbids overwriting.
        if let Some(blocker) = self.removal_blocker() {
            return Some(blocker);
        }
        let note = self.attr_note();
        let unwritable = |reason: String| Some(Blocker::new(BlockerKind::Unwritable, reason));
        if let Some(mode) = wipe_in_tags(&self.tags) {
            return unwritable(format!(
                "a {} wipe for its deletion was started and not finished (DELETE it again, or \
                 restart the daemon, to finish it)",
                mode.as_str()
            ));
        }
        if self.attr.permissions != 'w' {
            return unwritable(format!("it is read-only ({note})"));
        }
        if let Some(state) = self.attr.state_description() {
            return unwritable(format!("it is {state} ({note})"));
        }
        if !matches!(self.attr.health, '-' | 'w' | 'm') {
            return unwritable(format!(
                "its health flag is {:?} (partial, failed or out of space; {note})",
                self.attr.health
            ));
        }
        if !self.attr.is_active() && self.attr.skip_activation == 'k' {
            return unwritable(format!("it has the activation skip flag set ({note})"));
        }
        None
    }

    /// Why `DELETE` must not remove this LV: open, or not a plain data volume (removing a
    /// thin pool or a snapshot origin would take other volumes with it).
    pub(crate) fn removal_blocker(&self) -> Option<Blocker> {
        let note = self.attr_note();
        if let Some(key) = self.golden_key() {
            return Some(Blocker::new(
                BlockerKind::Golden,
                format!(
                    "it is the golden image of cache entry {key}; it is removed with that entry \
                     (DELETE /api/v1/cache/images/{key}), never as a volume"
                ),
            ));
        }
        if let Some(kind) = self.attr.special_type() {
            return Some(Blocker::new(
                BlockerKind::NotAVolume,
                format!("{kind} ({note})"),
            ));
        }
        if !self.origin.is_empty() && !self.is_golden_clone() {
            return Some(Blocker::new(
                BlockerKind::NotAVolume,
                format!("it is a snapshot of {} ({note})", self.origin),
            ));
        }
        if self.attr.is_open() {
            return Some(Blocker::new(
                BlockerKind::Open,
                format!("it is open (in use by a VM or another process; {note})"),
            ));
        }
        None
    }
}

/// An LVM JSON report (`--reportformat json`).
#[derive(Deserialize)]
struct Report {
    report: Vec<ReportSection>,
}

/// One section of a report: the rows of `vgs` or `lvs`.
#[derive(Deserialize)]
struct ReportSection {
    #[serde(default)]
    vg: Vec<VgRow>,
    #[serde(default)]
    lv: Vec<LvRow>,
}

/// A `vgs` row (sizes as byte strings).
#[derive(Deserialize)]
struct VgRow {
    vg_name: String,
    vg_extent_size: String,
    vg_free: String,
    vg_size: String,
}

/// An `lvs` row (sizes as byte strings).
#[derive(Deserialize)]
struct LvRow {
    lv_name: String,
    vg_name: String,
    lv_size: String,
    lv_attr: String,
    #[serde(default)]
    lv_tags: String,
    #[serde(default)]
    origin: String,
    #[serde(default)]
    pool_lv: String,
    #[serde(default)]
    segtype: String,
    #[serde(default)]
    data_percent: String,
    #[serde(default)]
    metadata_percent: String,
    #[serde(default)]
    zero: String,
}

fn bytes_field(field: &str, value: &str) -> Result<u64, String> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("{field} is {value:?}, not a byte count"))
}

/// A percent column: empty for LVs it does not apply to.
fn percent_field(field: &str, value: &str) -> Result<Option<f64>, String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse::<f64>()
        .map(Some)
        .map_err(|_| format!("{field} is {value:?}, not a percent"))
}

fn parse_report(json: &str) -> Result<Vec<ReportSection>, String> {
    serde_json::from_str::<Report>(json)
        .map(|r| r.report)
        .map_err(|e| format!("unexpected LVM JSON report: {e}"))
}

/// Volume groups of a `vgs --reportformat json --units b --nosuffix` report.
pub(crate) fn parse_vgs(json: &str) -> Result<Vec<VgInfo>, String> {
    let mut out = Vec::new();
    for row in parse_report(json)?.into_iter().flat_map(|s| s.vg) {
        out.push(VgInfo {
            extent_size: bytes_field("vg_extent_size", &row.vg_extent_size)?,
            free_bytes: bytes_field("vg_free", &row.vg_free)?,
            size_bytes: bytes_field("vg_size", &row.vg_size)?,
            name: row.vg_name,
        });
    }
    Ok(out)
}

/// Logical volumes of an `lvs --reportformat json --units b --nosuffix` report.
pub(crate) fn parse_lvs(json: &str) -> Result<Vec<LvInfo>, String> {
    let mut out = Vec::new();
    for row in parse_report(json)?.into_iter().flat_map(|s| s.lv) {
        out.push(LvInfo {
            size_bytes: bytes_field("lv_size", &row.lv_size)?,
            attr: LvAttr::parse(&row.lv_attr)?,
            tags: row
                .lv_tags
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect(),
            name: row.lv_name,
            vg: row.vg_name,
            origin: row.origin,
            pool_lv: row.pool_lv,
            segtype: row.segtype,
            data_percent: percent_field("data_percent", &row.data_percent)?,
            metadata_percent: percent_field("metadata_percent", &row.metadata_percent)?,
            zero: row.zero == "zero",
        });
    }
    Ok(out)
}

/// Extents needed for `size_bytes` (rounded up); `None` for a zero extent size, a zero size,
/// or overflow.
pub(crate) fn extents_for(size_bytes: u64, extent_size: u64) -> Option<u64> {
    if extent_size == 0 || size_bytes == 0 {
        return None;
    }
    let extents = size_bytes.div_ceil(extent_size);
    extents.checked_mul(extent_size).map(|_| extents)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    pub(crate) fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/lvm")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn lvs() -> Vec<LvInfo> {
        parse_lvs(&fixture("lvs.json")).unwrap()
    }

    fn lv(name: &str) -> LvInfo {
        lvs().into_iter().find(|l| l.name == name).unwrap()
    }

    #[test]
    fn parses_recorded_vgs_report() {
        let vgs = parse_vgs(&fixture("vgs.json")).unwrap();
        assert_eq!(
            vgs,
            vec![VgInfo {
                name: "vgfix".into(),
                extent_size: 8 << 20,
                free_bytes: 1_644_167_168,
                size_bytes: 2_139_095_040,
            }]
        );
        // 196 free extents of 8 MiB.
        assert_eq!(vgs[0].free_bytes, 196 * (8 << 20));
        assert!(parse_vgs(&fixture("vgs-missing.json")).unwrap().is_empty());
    }

    #[test]
    fn parses_recorded_lvs_report() {
        let all = lvs();
        assert_eq!(all.len(), 11);
        let plain = lv("plain");
        assert_eq!(plain.vg, "vgfix");
        // Created with 13 extents of 8 MiB.
        assert_eq!(plain.size_bytes, 13 * (8 << 20));
        assert_eq!(
            plain.tags,
            vec!["lvp_job_00000000-0000-0000-0000-000000000001".to_string()]
        );
        assert_eq!(plain.segtype, "linear");
        assert!(lv("busy").tags.is_empty());
        assert_eq!(lv("snap1").origin, "origin");
        assert_eq!(lv("thinvol").pool_lv, "pool");
        let one = parse_lvs(&fixture("lvs-one.json")).unwrap();
        assert_eq!(one, vec![plain]);
        assert!(parse_lvs(&fixture("lvs-missing.json")).unwrap().is_empty());
    }

    #[test]
    fn rejects_reports_without_byte_units() {
        let human = r#"{"report":[{"vg":[{"vg_name":"v","vg_extent_size":"4.00m",
            "vg_free":"1.00g","vg_size":"2.00g"}]}]}"#;
        assert!(parse_vgs(human).unwrap_err().contains("not a byte count"));
        assert!(parse_lvs("not json").is_err());
        let bad_attr = r#"{"report":[{"lv":[{"lv_name":"a","vg_name":"v","lv_size":"1",
            "lv_attr":"-w"}]}]}"#;
        assert!(parse_lvs(bad_attr).unwrap_err().contains("lv_attr"));
    }

    #[test]
    fn decodes_recorded_attrs() {
        let plain = lv("plain").attr;
        assert_eq!(plain.volume_type, '-');
        assert_eq!(plain.permissions, 'w');
        assert!(plain.is_active());
        assert!(!plain.is_open());
        assert!(lv("busy").attr.is_open());
        assert!(!lv("inactive").attr.is_active());
        assert_eq!(lv("pool").attr.volume_type, 't');
        assert_eq!(lv("pool").attr.zero, 'z');
        assert_eq!(lv("thinsnap").attr.skip_activation, 'k');
        assert_eq!(lv("thinvol").attr.target_type, 't');
        let short = LvAttr::parse("-wi-ao").unwrap();
        assert!(short.is_open());
        assert_eq!(short.skip_activation, '-');
    }

    #[test]
    fn reuse_rules_on_recorded_volumes() {
        assert_eq!(lv("plain").reuse_blocker(), None);
        assert_eq!(lv("inactive").reuse_blocker(), None, "activated before use");
        assert_eq!(lv("thinvol").reuse_blocker(), None);
        let blocked = |name: &str, want: &str| {
            let reason = lv(name)
                .reuse_blocker()
                .map(|b| b.to_string())
                .unwrap_or_default();
            assert!(reason.contains(want), "{name}: {reason:?} lacks {want:?}");
        };
        blocked("busy", "open");
        assert_eq!(lv("busy").reuse_blocker().unwrap().kind, BlockerKind::Open);
        assert_eq!(
            lv("pool").reuse_blocker().unwrap().kind,
            BlockerKind::NotAVolume
        );
        blocked("origin", "origin of snapshots");
        blocked("snap1", "snapshot");
        blocked("pool", "thin pool");
        blocked("thinsnap", "snapshot of thinvol");
        blocked("[pool_tmeta]", "metadata");
        blocked("busy", "lv_attr -wi-ao----");
    }

    #[test]
    fn removal_rules_on_recorded_volumes() {
        assert_eq!(lv("plain").removal_blocker(), None);
        assert_eq!(lv("inactive").removal_blocker(), None);
        assert_eq!(lv("thinvol").removal_blocker(), None);
        for name in ["busy", "origin", "snap1", "pool", "thinsnap"] {
            assert!(lv(name).removal_blocker().is_some(), "{name}");
        }
    }

    #[test]
    fn other_attr_states_block_reuse() {
        let mut v = lv("plain");
        v.attr.permissions = 'r';
        assert!(v.reuse_blocker().unwrap().to_string().contains("read-only"));
        let mut v = lv("plain");
        v.attr.state = 's';
        assert!(v.reuse_blocker().unwrap().to_string().contains("suspended"));
        let mut v = lv("plain");
        v.attr.health = 'p';
        assert!(v.reuse_blocker().unwrap().to_string().contains("health"));
        let mut v = lv("inactive");
        v.attr.skip_activation = 'k';
        assert!(
            v.reuse_blocker()
                .unwrap()
                .to_string()
                .contains("activation skip")
        );
    }

    #[test]
    fn extent_rounding_uses_the_real_extent_size() {
        const MIB: u64 = 1 << 20;
        assert_eq!(extents_for(1 << 30, 4 * MIB), Some(256));
        assert_eq!(extents_for(1 << 30, 8 * MIB), Some(128));
        // 100 MiB in the recorded VG's 8 MiB extents: 13 extents (the `plain` LV above).
        assert_eq!(extents_for(100 * MIB, 8 * MIB), Some(13));
        assert_eq!(extents_for(1, 8 * MIB), Some(1));
        assert_eq!(extents_for((1 << 30) + 1, 4 * MIB), Some(257));
        // An extent larger than the request rounds up to one whole extent.
        assert_eq!(extents_for(1 << 30, 2 << 30), Some(1));
        assert_eq!(extents_for(0, 4 * MIB), None);
        assert_eq!(extents_for(1 << 30, 0), None);
        assert_eq!(extents_for(u64::MAX, 2), None, "rounded size overflows");
    }
}
