//! The thin pool new LVs are created in (`volumes.lvm.thin_pool`): its use read from an `lvs`
//! listing, and the safety rule (nothing is created while data or metadata use is above
//! `volumes.lvm.thin_pool_max_percent`). Pure: the caller lists the LVs.

use super::report::LvInfo;
use crate::volume::error::VolumeError;

/// The thin pool new LVs are created in (`volumes.lvm.thin_pool`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ThinPool {
    /// The pool's LV name in the backend's VG.
    pub(crate) name: String,
    /// `volumes.lvm.thin_pool_max_percent`.
    pub(crate) max_percent: u8,
}

/// A thin pool's use, from `lvs`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PoolUse {
    pub(crate) data_percent: f64,
    pub(crate) metadata_percent: f64,
    /// The pool zeroes newly provisioned chunks (`lvs -o zero`).
    pub(crate) zeroes: bool,
    pub(crate) size_bytes: u64,
}

impl ThinPool {
    /// `vg/name`, for messages and commands.
    pub(crate) fn arg(&self, vg: &str) -> String {
        format!("{vg}/{}", self.name)
    }

    /// The pool's use in the listing `all` (the LVs of `vg`). Fails when the pool is missing
    /// or not a thin pool.
    pub(crate) fn use_in(&self, vg: &str, all: &[LvInfo]) -> Result<PoolUse, VolumeError> {
        let report = |detail: String| VolumeError::Report {
            command: "lvs".into(),
            detail,
        };
        let lv = all.iter().find(|l| l.name == self.name).ok_or_else(|| {
            report(format!(
                "thin pool {} does not exist (volumes.lvm.thin_pool)",
                self.arg(vg)
            ))
        })?;
        if lv.segtype != "thin-pool" {
            return Err(report(format!(
                "{} is a {} LV, not a thin pool (volumes.lvm.thin_pool)",
                self.arg(vg),
                lv.segtype
            )));
        }
        Ok(PoolUse {
            data_percent: lv.data_percent.unwrap_or(0.0),
            metadata_percent: lv.metadata_percent.unwrap_or(0.0),
            zeroes: lv.zero,
            size_bytes: lv.size_bytes,
        })
    }

    /// As `use_in`, and `PoolOverThreshold` when data or metadata use is above the bound.
    /// Sets the pool use metrics.
    pub(crate) fn check_in(&self, vg: &str, all: &[LvInfo]) -> Result<PoolUse, VolumeError> {
        let usage = self.use_in(vg, all)?;
        crate::telemetry::metrics::metrics()
            .thin_pool_use(usage.data_percent, usage.metadata_percent);
        let max = f64::from(self.max_percent);
        if usage.data_percent > max || usage.metadata_percent > max {
            return Err(VolumeError::PoolOverThreshold {
                pool: self.arg(vg),
                data_percent: usage.data_percent,
                metadata_percent: usage.metadata_percent,
                max_percent: self.max_percent,
            });
        }
        Ok(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::lvm::report::parse_lvs;

    #[test]
    fn pool_safety_reads_the_pools_use() {
        let json = |data: &str, meta: &str, zero: &str| {
            format!(
                r#"{{"report":[{{"lv":[{{"lv_name":"pool","vg_name":"vg0","lv_size":"4294967296",
                "lv_attr":"twi-aotz--","segtype":"thin-pool","data_percent":"{data}",
                "metadata_percent":"{meta}","zero":"{zero}"}},{{"lv_name":"lin","vg_name":"vg0",
                "lv_size":"8388608","lv_attr":"-wi-a-----","segtype":"linear"}}]}}]}}"#
            )
        };
        let b = ThinPool {
            name: "pool".into(),
            max_percent: 90,
        };
        let all = parse_lvs(&json("12.50", "3.00", "zero")).unwrap();
        let usage = b.check_in("vg0", &all).unwrap();
        assert_eq!(usage.data_percent, 12.5);
        assert!(usage.zeroes);
        assert!(
            !b.use_in("vg0", &parse_lvs(&json("1", "1", "")).unwrap())
                .unwrap()
                .zeroes
        );
        for (data, meta) in [("90.01", "1.00"), ("10.00", "95.00")] {
            let err = b
                .check_in("vg0", &parse_lvs(&json(data, meta, "zero")).unwrap())
                .unwrap_err();
            assert!(
                matches!(err, VolumeError::PoolOverThreshold { .. }),
                "{err}"
            );
            let text = err.to_string();
            assert!(
                text.contains("thin pool vg0/pool")
                    && text.contains(&format!("data {data}% and metadata {meta}% used"))
                    && text.contains("volumes.lvm.thin_pool_max_percent = 90%"),
                "{text}"
            );
        }
        assert!(
            b.check_in("vg0", &parse_lvs(&json("90.00", "90.00", "zero")).unwrap())
                .is_ok()
        );
        // Missing, or not a thin pool.
        let lin = ThinPool {
            name: "lin".into(),
            max_percent: 90,
        };
        let err = lin.check_in("vg0", &all).unwrap_err().to_string();
        assert!(err.contains("not a thin pool"), "{err}");
        assert!(
            lin.check_in("vg0", &[])
                .unwrap_err()
                .to_string()
                .contains("does not exist")
        );
    }
}
