//! `[storage]` (the job store's directory) and `[jobs]` (how many jobs run, wait, and for how
//! long): defaults and rules.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{SettingError, check};

/// `[storage]`: where durable state lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StorageSettings {
    /// Directory of the sled database (jobs, cache index, stage history).
    pub(crate) data_dir: PathBuf,
}

/// `[jobs]`: how many jobs run, wait, and for how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobsSettings {
    /// Jobs running at once (1..=64).
    pub(crate) max_concurrent: usize,
    /// Pending jobs waiting for a slot; beyond this a request gets 429.
    pub(crate) queue_capacity: usize,
    /// Per-job time limit, counted from the moment the job starts running.
    #[serde(with = "humantime_serde")]
    pub(crate) timeout: Duration,
    /// Finished jobs older than this are pruned from the store.
    #[serde(with = "humantime_serde")]
    pub(crate) retention: Duration,
    /// On shutdown, running jobs get this long to finish before they are stopped and rolled back.
    #[serde(with = "humantime_serde")]
    pub(crate) shutdown_grace: Duration,
}

impl Default for JobsSettings {
    fn default() -> Self {
        JobsSettings {
            max_concurrent: 2,
            queue_capacity: 64,
            timeout: Duration::from_secs(180 * 60),
            retention: Duration::from_secs(7 * 86400),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl StorageSettings {
    pub(crate) fn validate(&self) -> Result<(), SettingError> {
        check(
            !self.data_dir.as_os_str().is_empty(),
            "storage.data_dir",
            || "must not be empty".into(),
        )
    }
}

impl JobsSettings {
    pub(crate) fn validate(&self) -> Result<(), SettingError> {
        check(
            (1..=64).contains(&self.max_concurrent),
            "jobs.max_concurrent",
            || format!("must be between 1 and 64, got {}", self.max_concurrent),
        )?;
        check(
            self.queue_capacity <= 100_000,
            "jobs.queue_capacity",
            || "must be at most 100000".into(),
        )?;
        check(
            self.timeout >= Duration::from_secs(1),
            "jobs.timeout",
            || "must be at least 1s".into(),
        )?;
        check(
            self.retention >= Duration::from_secs(60),
            "jobs.retention",
            || "must be at least 1m".into(),
        )
    }
}
