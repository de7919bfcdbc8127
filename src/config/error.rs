//! `SettingError`: a setting that cannot be used, with its key (`volumes.lvm.thin_pool`) and
//! what is wrong with it. Every section's validation returns one; `Display` is `key: problem`,
//! the form `check-config`, start-up and reload refusals print. A leaf of `config/`.

/// A setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct SettingError {
    /// The dotted key (or keys, `tls.cert_file/tls.key_file`) the problem concerns.
    pub key: String,
    /// What is wrong and, where it helps, what to do.
    pub problem: String,
}

impl SettingError {
    pub(crate) fn new(key: impl Into<String>, problem: impl Into<String>) -> SettingError {
        SettingError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// `Err(SettingError)` for `key` unless `ok`.
pub(crate) fn check(
    ok: bool,
    key: &str,
    problem: impl FnOnce() -> String,
) -> Result<(), SettingError> {
    if ok {
        Ok(())
    } else {
        Err(SettingError::new(key, problem()))
    }
}
