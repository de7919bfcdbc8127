//! `[[images]]`: the images a host keeps cached and fresh by name (declared images). An array
//! of tables, so reload pairs entries by `name`; each entry's rules (name, URL against the
//! source allow-lists, checksum syntax, image type, refresh interval) live here.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{SettingError, check};

/// Longest declared image name.
const MAX_NAME_LEN: usize = 64;
/// Most declared images (each one is pinned in the cache and has a refresh timer).
const MAX_IMAGES: usize = 256;
/// Shortest refresh interval (besides `0s`, never).
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// One `[[images]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeclaredImageSettings {
    /// What requests call it (`"image": "<name>"`): `[A-Za-z0-9._-]`, 1..=64 characters,
    /// starting with a letter or digit, unique.
    pub(crate) name: String,
    /// Where it comes from, as a request's `image_url` (same allow-lists).
    pub(crate) url: String,
    /// `sha256:<hex>` or `sha512:<hex>` the image must match (empty: none).
    #[serde(default)]
    pub(crate) checksum: String,
    /// A checksum manifest listing the image (empty: none; not with `checksum`).
    #[serde(default)]
    pub(crate) checksum_url: String,
    /// The format the image must have (as a request's `image_type`; `auto`: as found).
    #[serde(default = "default_image_type")]
    pub(crate) image_type: String,
    /// Build the golden copy (thin LV, reflink file) ahead of the first volume.
    #[serde(default)]
    pub(crate) golden: bool,
    /// How often the source is asked whether the image changed (`0s`: never).
    #[serde(default = "default_refresh", with = "humantime_serde")]
    pub(crate) refresh: Duration,
}

fn default_image_type() -> String {
    "qcow2".into()
}

fn default_refresh() -> Duration {
    Duration::from_secs(6 * 3600)
}

impl DeclaredImageSettings {
    /// The optional `checksum`, `None` when empty.
    pub(crate) fn checksum(&self) -> Option<&str> {
        (!self.checksum.is_empty()).then_some(self.checksum.as_str())
    }

    /// The optional `checksum_url`, `None` when empty.
    pub(crate) fn checksum_url(&self) -> Option<&str> {
        (!self.checksum_url.is_empty()).then_some(self.checksum_url.as_str())
    }

    /// The declared format (`None`: `auto`); validated at load.
    pub(crate) fn image_type(&self) -> Option<crate::image::ImageType> {
        crate::image::ImageType::parse_declared(&self.image_type)
            .ok()
            .flatten()
    }

    /// The entry's own rules and its URLs against the source allow-lists; the error names
    /// the image.
    fn validate(&self, policy: &crate::image::settings::SourcePolicy) -> Result<(), SettingError> {
        let key = format!("images.{}", self.name);
        let problem = |what: String| SettingError::new(key.clone(), what);
        let request = crate::image::resolved::SourceRequest {
            image_url: &self.url,
            checksum: self.checksum(),
            checksum_url: self.checksum_url(),
        };
        crate::image::resolved::check_syntax(&request).map_err(|e| problem(e.0))?;
        crate::image::source::resolve(&self.url, policy)
            .map_err(|e| problem(format!("url: {}", e.0)))?;
        if let Some(manifest) = self.checksum_url() {
            crate::image::source::resolve(manifest, policy)
                .map_err(|e| problem(format!("checksum_url: {}", e.0)))?;
        }
        crate::image::ImageType::parse_declared(&self.image_type).map_err(problem)?;
        check(
            self.refresh.is_zero() || self.refresh >= MIN_REFRESH,
            &key,
            || "refresh must be 0s (never) or at least 1s".into(),
        )
    }
}

/// Whether `name` may name a declared image.
pub(crate) fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Checks every entry: names valid and unique, each entry's own rules.
pub(crate) fn validate(
    images: &[DeclaredImageSettings],
    policy: &crate::image::settings::SourcePolicy,
) -> Result<(), SettingError> {
    check(images.len() <= MAX_IMAGES, "images", || {
        format!("at most {MAX_IMAGES} images may be declared")
    })?;
    let mut names = BTreeSet::new();
    for image in images {
        check(valid_name(&image.name), "images.name", || {
            format!(
                "`{}` is not an image name ([A-Za-z0-9._-], 1..={MAX_NAME_LEN} characters, \
                 starting with a letter or digit)",
                image.name
            )
        })?;
        check(names.insert(image.name.as_str()), "images.name", || {
            format!("`{}` is declared twice", image.name)
        })?;
        image.validate(policy)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, url: &str) -> DeclaredImageSettings {
        DeclaredImageSettings {
            name: name.into(),
            url: url.into(),
            checksum: String::new(),
            checksum_url: String::new(),
            image_type: "qcow2".into(),
            golden: false,
            refresh: default_refresh(),
        }
    }

    #[test]
    fn names_are_checked_and_unique() {
        let policy = crate::config::Settings::default().source_policy();
        let mut policy = policy;
        policy.allowed_hosts = vec!["images.example".into()];
        let ok = image("ubuntu-24.04", "https://images.example/u.qcow2");
        assert!(validate(std::slice::from_ref(&ok), &policy).is_ok());
        let e = validate(&[ok.clone(), ok.clone()], &policy).unwrap_err();
        assert!(e.problem.contains("declared twice"), "{e}");
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(65)] {
            assert!(validate(&[image(bad, &ok.url)], &policy).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_declaration_names_the_image() {
        let policy = crate::config::Settings::default().source_policy();
        let e = validate(
            &[image("web", "https://elsewhere.example/x.qcow2")],
            &policy,
        )
        .unwrap_err();
        assert_eq!(e.key, "images.web");
        let mut bad_type = image("web", "https://elsewhere.example/x.qcow2");
        bad_type.image_type = "ova2".into();
        assert_eq!(
            validate(&[bad_type], &policy).unwrap_err().key,
            "images.web"
        );
    }
}
