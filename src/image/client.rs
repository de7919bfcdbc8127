//! The HTTP client of every image request (S3 and plain HTTP(S) alike): TLS roots (system
//! plus `s3.ca_file`), the connect timeout, and the redirect policy. A redirect is followed
//! only to a host the image URL itself could have named (the S3 endpoint or
//! `sources.allowed_hosts`, read live), never from https to http, and at most
//! `MAX_REDIRECTS` times; anything else fails the request with [`RedirectRefused`].

use std::sync::{Arc, RwLock};
use std::time::Duration;

use url::Url;

use super::settings::SourcePolicy;

/// Hops a request may take before it fails (a chain longer than this is a loop or a trap).
pub(crate) const MAX_REDIRECTS: usize = 5;

/// Hosts image requests may reach: the S3 endpoint and `sources.allowed_hosts`.
#[derive(Debug, Clone, Default)]
pub(crate) struct AllowList {
    /// `(host, port)` of `s3.endpoint`, lowercase; `None` without S3.
    s3_endpoint: Option<(String, u16)>,
    /// `sources.allowed_hosts` entries, lowercase (`host` or `host:port`).
    hosts: Vec<String>,
}

impl AllowList {
    pub(crate) fn from_policy(policy: &SourcePolicy) -> AllowList {
        AllowList {
            s3_endpoint: Url::parse(&policy.s3_endpoint)
                .ok()
                .as_ref()
                .and_then(host_port),
            hosts: policy
                .allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        }
    }

    /// A list of hosts alone (no S3 endpoint), matched as `sources.allowed_hosts` entries are
    /// (`sources.trust[].hosts`).
    pub(crate) fn of_hosts(hosts: &[String]) -> AllowList {
        AllowList {
            s3_endpoint: None,
            hosts: hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }

    /// Whether `host:port` is listed in `sources.allowed_hosts`.
    pub(crate) fn lists(&self, host: &str, port: u16) -> bool {
        self.hosts.iter().any(|entry| match entry.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h == host && p == port.to_string(),
            _ => entry == host,
        })
    }

    /// Whether `host:port` is the S3 endpoint or a virtual-host-style bucket of it.
    fn is_s3_endpoint(&self, host: &str, port: u16) -> bool {
        self.s3_endpoint
            .as_ref()
            .is_some_and(|(h, p)| *p == port && (host == h || host.ends_with(&format!(".{h}"))))
    }

    /// Why a redirect from `previous` to `next` may not be followed, if it may not.
    fn refuse(&self, previous: &Url, next: &Url, hops: usize) -> Option<RedirectRefused> {
        let refused = |reason: String| {
            Some(RedirectRefused {
                location: redacted(next),
                reason,
            })
        };
        if hops > MAX_REDIRECTS {
            return refused(format!("more than {MAX_REDIRECTS} redirects"));
        }
        if !matches!(next.scheme(), "http" | "https") {
            return refused(format!("scheme `{}` is not http(s)", next.scheme()));
        }
        if previous.scheme() == "https" && next.scheme() == "http" {
            return refused("it downgrades https to http".into());
        }
        if !next.username().is_empty() || next.password().is_some() {
            return refused("it carries credentials".into());
        }
        let Some((host, port)) = host_port(next) else {
            return refused("it names no host".into());
        };
        if !self.lists(&host, port) && !self.is_s3_endpoint(&host, port) {
            return refused(format!(
                "host `{host}:{port}` is neither the S3 endpoint nor listed in sources.allowed_hosts"
            ));
        }
        None
    }
}

/// A redirect the client refused to follow (a permanent error: the job fails at once).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("redirect to {location} refused: {reason}")]
pub(crate) struct RedirectRefused {
    /// The target, without query or credentials.
    pub(crate) location: String,
    pub(crate) reason: String,
}

/// A URL without userinfo, query and fragment (fit for messages and logs).
fn redacted(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// Host (lowercase) and port (defaulted by scheme) of a URL.
pub(crate) fn host_port(url: &Url) -> Option<(String, u16)> {
    Some((
        url.host_str()?.to_ascii_lowercase(),
        url.port_or_known_default()?,
    ))
}

/// The allow-list as the settings have it now (replaced on reload; requests read it per hop).
#[derive(Debug, Clone, Default)]
pub(crate) struct LiveAllowList(Arc<RwLock<Arc<AllowList>>>);

impl LiveAllowList {
    pub(crate) fn set(&self, list: AllowList) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(list);
    }

    pub(crate) fn current(&self) -> Arc<AllowList> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the client needs besides the allow-list.
pub(crate) struct ClientSettings {
    pub(crate) connect_timeout: Duration,
    /// Extra trusted CA certificates (PEM bundle).
    pub(crate) ca_pem: Option<Vec<u8>>,
}

/// Builds the reqwest client of image requests.
pub(crate) fn build(
    settings: &ClientSettings,
    allow: LiveAllowList,
) -> anyhow::Result<reqwest::Client> {
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        let previous = attempt.previous().last().cloned();
        let hops = attempt.previous().len();
        match previous.and_then(|p| allow.current().refuse(&p, attempt.url(), hops)) {
            Some(refused) => {
                tracing::warn!(error = %refused, "redirect not followed");
                attempt.error(refused)
            }
            None => attempt.follow(),
        }
    });
    let mut builder = reqwest::Client::builder()
        .redirect(policy)
        .connect_timeout(settings.connect_timeout)
        .user_agent(concat!(
            "libvirt-volume-provisioner/",
            env!("CARGO_PKG_VERSION")
        ))
        // Sizes come from Content-Length: no transparent decompression.
        .no_gzip()
        .no_brotli()
        .no_zstd()
        .no_deflate();
    if let Some(pem) = &settings.ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)?;
        builder = builder.tls_certs_merge(certs);
    }
    Ok(builder.build()?)
}

/// The refused redirect somewhere in an error's source chain, if that is what failed.
pub(crate) fn redirect_refused(e: &(dyn std::error::Error + 'static)) -> Option<RedirectRefused> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(r) = err.downcast_ref::<RedirectRefused>() {
            return Some(r.clone());
        }
        current = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn list() -> AllowList {
        let mut s = Settings::default();
        s.s3.endpoint = "https://minio.example.com".into();
        s.sources.allowed_hosts = vec!["images.example.com".into(), "cdn.example.com:8443".into()];
        AllowList::from_policy(&s.source_policy())
    }

    #[test]
    fn redirect_hops_are_checked_against_the_allow_list() {
        let l = list();
        let u = |s: &str| Url::parse(s).unwrap();
        let from = u("https://images.example.com/a.qcow2");
        for ok in [
            "https://images.example.com/b.qcow2",
            "https://cdn.example.com:8443/b.qcow2",
            "https://minio.example.com/bucket/b.qcow2",
            "https://bucket.minio.example.com/b.qcow2",
        ] {
            assert_eq!(l.refuse(&from, &u(ok), 1), None, "{ok}");
        }
        for bad in [
            "https://evil.example.net/x",
            "https://169.254.169.254/latest/meta-data",
            "https://cdn.example.com/x",
            "http://images.example.com/a.qcow2",
            "https://user:pw@images.example.com/a.qcow2",
            "ftp://images.example.com/a.qcow2",
        ] {
            assert!(l.refuse(&from, &u(bad), 1).is_some(), "{bad}");
        }
        assert!(
            l.refuse(&from, &u("https://images.example.com/b"), MAX_REDIRECTS + 1)
                .is_some()
        );
        let r = l
            .refuse(&from, &u("https://evil.example.net/x?X-Amz-Signature=s"), 1)
            .unwrap();
        assert!(!r.to_string().contains("Signature"), "{r}");
    }
}
