//! Which keyrings vouch for which source hosts (`[[sources.trust]]`): each rule names hosts
//! (written and matched as `sources.allowed_hosts` entries: `host` or `host:port`), a keyring
//! read once (again on reload), and whether images from those hosts must come with a valid
//! signature. The first rule naming a host applies.

use std::sync::Arc;

use super::signature::Keyring;
use crate::image::client::AllowList;
use crate::image::settings::TrustPolicy;

/// One `[[sources.trust]]` entry, its keyring parsed.
#[derive(Debug)]
pub(crate) struct TrustRule {
    /// The hosts, matched like `sources.allowed_hosts`.
    hosts: AllowList,
    pub(crate) keyring: Keyring,
    /// Images from these hosts without a valid signature are refused.
    pub(crate) require_signature: bool,
}

/// Every rule, in the order of the settings.
#[derive(Debug, Default)]
pub(crate) struct Trust {
    rules: Vec<Arc<TrustRule>>,
}

impl Trust {
    /// Reads every rule's keyring; any unreadable keyring refuses the whole set (a reload
    /// then changes nothing).
    pub(crate) fn load(policies: &[TrustPolicy]) -> Result<Trust, String> {
        let rules = policies
            .iter()
            .map(|p| {
                Ok(Arc::new(TrustRule {
                    hosts: AllowList::of_hosts(&p.hosts),
                    keyring: Keyring::load(&p.keyring)
                        .map_err(|e| format!("sources.trust keyring {e}"))?,
                    require_signature: p.require_signature,
                }))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Trust { rules })
    }

    /// The rule for images from `host:port`, if any.
    pub(crate) fn for_host(&self, host: &str, port: u16) -> Option<Arc<TrustRule>> {
        self.rules
            .iter()
            .find(|r| r.hosts.lists(host, port))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_hosts_like_the_allow_list() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = TrustPolicy {
            hosts: vec!["cloud-images.ubuntu.com".into()],
            keyring: tmp.path().join("none.gpg"),
            require_signature: true,
        };
        let e = Trust::load(std::slice::from_ref(&missing)).unwrap_err();
        assert!(e.contains("none.gpg"), "{e}");
        let trust = Trust::default();
        assert!(trust.for_host("cloud-images.ubuntu.com", 443).is_none());
        let list = AllowList::of_hosts(&["Images.example.com:8443".into(), "a.example".into()]);
        assert!(list.lists("images.example.com", 8443));
        assert!(!list.lists("images.example.com", 443));
        assert!(list.lists("a.example", 80));
    }
}
