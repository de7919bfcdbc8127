//! Volume name rules: the API contract's, LVM's reserved names on top, and sizes in GiB. A
//! leaf of `volume/`.

/// Bytes in a GiB (request sizes are GiB, 2^30 bytes).
pub(crate) const GIB: u64 = 1 << 30;

/// Volume name rules of the API contract: `[A-Za-z0-9+_.-]`, 1..=127 characters, not `.` or
/// `..`, no leading `-`.
pub(crate) fn validate_volume_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 127 {
        return Err(format!(
            "volume_name must be 1 to 127 characters, got {}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err("volume_name must not be \".\" or \"..\"".into());
    }
    if name.starts_with('-') {
        return Err("volume_name must not start with \"-\"".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "+_.-".contains(*c)))
    {
        return Err(format!(
            "volume_name contains {c:?}; allowed are letters, digits and + _ . -"
        ));
    }
    Ok(())
}

/// LVM names (volume groups and logical volumes): the contract's rules plus LVM's reserved
/// prefixes and suffixes.
pub(crate) fn validate_lvm_name(name: &str) -> Result<(), String> {
    validate_volume_name(name)?;
    if name.starts_with("snapshot") || name.starts_with("pvmove") {
        return Err(format!(
            "`{name}`: LVM reserves names starting with snapshot or pvmove"
        ));
    }
    for reserved in [
        "_cdata", "_cmeta", "_corig", "_iorig", "_mimage", "_mlog", "_pmspare", "_rimage",
        "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
    ] {
        if name.contains(reserved) {
            return Err(format!(
                "`{name}`: LVM reserves names containing {reserved}"
            ));
        }
    }
    Ok(())
}

/// Bytes of a request in GiB.
pub(crate) fn gib_to_bytes(gib: u64) -> Option<u64> {
    gib.checked_mul(GIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        for ok in ["vm-disk-001", "a", "A.b+c_d-e", &"x".repeat(127)] {
            assert!(validate_volume_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-x",
            "a/b",
            "a b",
            "ä",
            &"x".repeat(128),
            "a\0",
        ] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_lvm_name("snapshot1").is_err());
        assert!(validate_lvm_name("x_tmeta").is_err());
        assert!(validate_lvm_name("vg0").is_ok());
    }
}
