//! Image sources: turns a request's `image_url` into a resolved, allowed location (rejecting
//! anything outside the S3 endpoint, `sources.allowed_hosts` and `sources.file_roots`), and
//! makes the [`RemoteObject`] requests go to (S3 presigned with SigV4 by object_store, plain
//! HTTP(S), or a local file).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpClient, HttpConnector};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, RetryConfig};
use url::Url;

use super::client::{self, AllowList, LiveAllowList, host_port};
use super::remote::RemoteObject;
use super::settings::{S3Access, SourcePolicy};
use super::verify::trust::{Trust, TrustRule};

/// Where an image comes from, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    /// A local file below one of `sources.file_roots` (canonical path).
    File(PathBuf),
    /// A plain HTTP(S) URL on an allowed host.
    Http(Url),
    /// An object in the configured S3 endpoint.
    S3 { bucket: String, key: String },
}

impl Location {
    /// A stable identity of the object (independent of URL spelling), used for cache keys.
    pub(crate) fn identity(&self) -> String {
        match self {
            Location::File(p) => format!("file://{}", p.display()),
            Location::Http(u) => u.to_string(),
            Location::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
        }
    }

    /// The object beside this one whose name adds `suffix` (`.sha256`, `.gpg`).
    pub(crate) fn beside(&self, suffix: &str) -> Location {
        match self {
            Location::File(p) => {
                let mut s = p.clone().into_os_string();
                s.push(suffix);
                Location::File(PathBuf::from(s))
            }
            Location::Http(u) => {
                let mut u = u.clone();
                u.set_path(&format!("{}{suffix}", u.path()));
                Location::Http(u)
            }
            Location::S3 { bucket, key } => Location::S3 {
                bucket: bucket.clone(),
                key: format!("{key}{suffix}"),
            },
        }
    }

    /// The object's file name (the last segment of its path or key, decoded), by which a
    /// manifest lists it.
    pub(crate) fn file_name(&self) -> String {
        match self {
            Location::File(p) => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            Location::Http(u) => {
                let last = u.path().rsplit('/').next().unwrap_or("");
                percent_encoding::percent_decode_str(last)
                    .decode_utf8_lossy()
                    .into_owned()
            }
            Location::S3 { key, .. } => key.rsplit('/').next().unwrap_or("").to_string(),
        }
    }

    /// Host and port the object is fetched from (`None` for local files).
    pub(crate) fn host(&self, policy: &SourcePolicy) -> Option<(String, u16)> {
        match self {
            Location::File(_) => None,
            Location::Http(u) => host_port(u),
            Location::S3 { .. } => Url::parse(&policy.s3_endpoint)
                .ok()
                .as_ref()
                .and_then(host_port),
        }
    }
}

/// A request's image URL was refused (API: 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct InvalidSource(pub(crate) String);

fn invalid(msg: impl Into<String>) -> InvalidSource {
    InvalidSource(msg.into())
}

/// Validates and resolves an image URL against the settings. Does not touch the network; file
/// URLs are canonicalised (so `..` and symlinks cannot escape the roots).
pub(crate) fn resolve(image_url: &str, policy: &SourcePolicy) -> Result<Location, InvalidSource> {
    let url =
        Url::parse(image_url).map_err(|e| invalid(format!("image_url is not a valid URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "image_url must not carry credentials; configure them in [s3]",
        ));
    }
    match url.scheme() {
        "file" => resolve_file(&url, policy),
        "s3" => {
            if policy.s3_endpoint.is_empty() {
                return Err(invalid("s3:// URLs need s3.endpoint to be configured"));
            }
            let bucket = url
                .host_str()
                .ok_or_else(|| invalid("s3:// URL has no bucket"))?;
            let key = decoded_key(url.path().trim_start_matches('/'))?;
            s3_location(bucket, &key)
        }
        "http" | "https" => resolve_http(url, policy),
        other => Err(invalid(format!(
            "image_url scheme `{other}` is not supported (use https, http, s3 or file)"
        ))),
    }
}

fn decoded_key(raw: &str) -> Result<String, InvalidSource> {
    let key = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| invalid("image_url key is not UTF-8 once decoded"))?;
    if key.is_empty() || key.ends_with('/') {
        return Err(invalid("image_url names no object key"));
    }
    if key
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(invalid("image_url key has empty, `.` or `..` segments"));
    }
    Ok(key.into_owned())
}

fn s3_location(bucket: &str, key: &str) -> Result<Location, InvalidSource> {
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    if !valid_bucket {
        return Err(invalid(format!("`{bucket}` is not a valid S3 bucket name")));
    }
    Ok(Location::S3 {
        bucket: bucket.to_string(),
        key: key.to_string(),
    })
}

fn resolve_http(url: Url, policy: &SourcePolicy) -> Result<Location, InvalidSource> {
    let (host, port) = host_port(&url).ok_or_else(|| invalid("image_url has no host"))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("image_url must not have a query or fragment"));
    }
    if !policy.s3_endpoint.is_empty() {
        let endpoint = Url::parse(&policy.s3_endpoint).map_err(|e| invalid(e.to_string()))?;
        if let Some((ep_host, ep_port)) = host_port(&endpoint) {
            let base = endpoint.path().trim_end_matches('/');
            if host == ep_host && port == ep_port {
                // Path style: https://endpoint/bucket/key
                let path = url.path().strip_prefix(base).unwrap_or(url.path());
                let path = path.trim_start_matches('/');
                let (bucket, key) = path.split_once('/').ok_or_else(|| {
                    invalid("image_url must be https://<endpoint>/<bucket>/<key>")
                })?;
                return s3_location(bucket, &decoded_key(key)?);
            }
            // Virtual-host style: https://bucket.endpoint/key
            if port == ep_port
                && let Some(bucket) = host.strip_suffix(&format!(".{ep_host}"))
            {
                let key = decoded_key(url.path().trim_start_matches('/'))?;
                return s3_location(bucket, &key);
            }
        }
    }
    let allowed = AllowList::from_policy(policy).lists(&host, port);
    if !allowed {
        return Err(invalid(format!(
            "host `{host}` is neither the S3 endpoint nor listed in sources.allowed_hosts"
        )));
    }
    decoded_key(url.path().trim_start_matches('/'))?;
    Ok(Location::Http(url))
}

fn resolve_file(url: &Url, policy: &SourcePolicy) -> Result<Location, InvalidSource> {
    if policy.file_roots.is_empty() {
        return Err(invalid(
            "file:// URLs are disabled (sources.file_roots is empty)",
        ));
    }
    if url
        .host_str()
        .is_some_and(|h| !h.is_empty() && h != "localhost")
    {
        return Err(invalid("file:// URLs must not name a host"));
    }
    let path = url
        .to_file_path()
        .map_err(|_| invalid("file:// URL is not an absolute path"))?;
    if path
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(invalid("file:// path must not contain `..`"));
    }
    // The roots are checked on the path as written before the file system is asked anything,
    // and every refusal reads the same, so a caller learns nothing about paths outside the
    // roots (whether they exist, are files, or are symlinks).
    let not_found = || {
        invalid(format!(
            "image {} is not a regular file below sources.file_roots",
            path.display()
        ))
    };
    let roots: Vec<PathBuf> = policy
        .file_roots
        .iter()
        .filter_map(|root| root.canonicalize().ok())
        .collect();
    let lexically_inside = roots.iter().any(|root| path.starts_with(root))
        || policy
            .file_roots
            .iter()
            .any(|root| root.is_absolute() && path.starts_with(root));
    if !lexically_inside {
        return Err(not_found());
    }
    // Below a root: symlinks are resolved, and the target must still be below a root.
    let canonical = path.canonicalize().map_err(|_| not_found())?;
    if !roots.iter().any(|root| canonical.starts_with(root)) || !canonical.is_file() {
        return Err(not_found());
    }
    Ok(Location::File(canonical))
}

/// Makes [`RemoteObject`]s for locations: one HTTP client (connection pools survive between
/// jobs) and one S3 signer per bucket.
pub(crate) struct SourceClients {
    s3: S3Access,
    /// The secret key (inline or read from its file).
    secret_key: String,
    /// The one HTTP client every request goes through (its redirect policy guards the hosts).
    http: reqwest::Client,
    /// Hosts redirects may lead to (replaced on reload).
    allow: LiveAllowList,
    /// SigV4 signers by bucket.
    signers: Mutex<HashMap<String, Arc<AmazonS3>>>,
    /// Keyrings by source host (`[[sources.trust]]`; replaced on reload).
    trust: std::sync::RwLock<Arc<Trust>>,
}

/// Hands object_store our reqwest client, should it send anything itself (it only signs).
#[derive(Debug, Clone)]
struct Connector(reqwest::Client);

impl HttpConnector for Connector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.0.clone()))
    }
}

impl SourceClients {
    pub(crate) fn new(
        s: &S3Access,
        policy: &SourcePolicy,
        trust: Trust,
    ) -> anyhow::Result<SourceClients> {
        let ca_pem = match &s.ca_file {
            None => None,
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("s3.ca_file {}: {e}", path.display()))?,
            ),
        };
        let allow = LiveAllowList::default();
        allow.set(AllowList::from_policy(policy));
        let http = client::build(
            &client::ClientSettings {
                connect_timeout: s.connect_timeout,
                ca_pem,
            },
            allow.clone(),
        )
        .map_err(|e| anyhow::anyhow!("s3.ca_file: {e}"))?;
        let secret_key = match &s.secret_key_file {
            None => s.secret_key.clone(),
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("s3.secret_key_file {}: {e}", path.display()))?
                .trim()
                .to_string(),
        };
        Ok(SourceClients {
            s3: s.clone(),
            secret_key,
            http,
            allow,
            signers: Mutex::new(HashMap::new()),
            trust: std::sync::RwLock::new(Arc::new(trust)),
        })
    }

    /// Applies a reloaded policy: the hosts redirects may lead to, the keyrings (read by the
    /// caller before anything is applied).
    pub(crate) fn apply(&self, policy: &SourcePolicy, trust: Trust) {
        self.allow.set(AllowList::from_policy(policy));
        *self.trust.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(trust);
    }

    /// The `[[sources.trust]]` rule for images from `host:port`, if any.
    pub(crate) fn trust_for(&self, host: &str, port: u16) -> Option<Arc<TrustRule>> {
        self.trust
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .for_host(host, port)
    }

    /// The bucket image URLs without one use (`s3.bucket`).
    pub(crate) fn default_bucket(&self) -> &str {
        &self.s3.bucket
    }

    /// Whether the S3 endpoint accepts TCP connections (used when no bucket is configured).
    pub(crate) async fn probe_endpoint(&self) -> Result<(), String> {
        let url = Url::parse(&self.s3.endpoint).map_err(|e| e.to_string())?;
        let (host, port) = host_port(&url).ok_or("s3.endpoint has no host")?;
        tokio::time::timeout(
            self.s3.connect_timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| format!("connecting to {host}:{port} timed out"))?
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        Ok(())
    }

    /// The object at a location, ready for requests.
    pub(crate) fn object(&self, location: &Location) -> anyhow::Result<RemoteObject> {
        Ok(match location {
            Location::File(p) => RemoteObject::file(self.http.clone(), p.clone()),
            Location::Http(url) => RemoteObject::http(self.http.clone(), url.clone()),
            Location::S3 { bucket, key } => RemoteObject::s3(
                self.http.clone(),
                self.signer(bucket)?,
                ObjectPath::parse(key)?,
            ),
        })
    }

    fn signer(&self, bucket: &str) -> anyhow::Result<Arc<AmazonS3>> {
        let mut signers = self.signers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = signers.get(bucket) {
            return Ok(s.clone());
        }
        let store = Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(self.s3.endpoint.trim_end_matches('/'))
                .with_region(&self.s3.region)
                .with_bucket_name(bucket)
                .with_access_key_id(&self.s3.access_key)
                .with_secret_access_key(&self.secret_key)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(self.s3.allow_http)
                .with_http_connector(Connector(self.http.clone()))
                .with_retry(RetryConfig {
                    max_retries: 0,
                    ..RetryConfig::default()
                })
                .build()?,
        );
        signers.insert(bucket.to_string(), store.clone());
        Ok(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn settings() -> Settings {
        let mut s = Settings::default();
        s.s3.endpoint = "https://minio.example.com".into();
        s.sources.allowed_hosts = vec!["images.example.com".into(), "cdn.example.com:8443".into()];
        s
    }

    #[test]
    fn s3_path_and_virtual_host_styles() {
        let s = settings();
        let want = Location::S3 {
            bucket: "vm-images".into(),
            key: "ubuntu/24.04.qcow2".into(),
        };
        assert_eq!(
            resolve(
                "https://minio.example.com/vm-images/ubuntu/24.04.qcow2",
                &s.source_policy()
            )
            .unwrap(),
            want
        );
        assert_eq!(
            resolve(
                "https://vm-images.minio.example.com/ubuntu/24.04.qcow2",
                &s.source_policy()
            )
            .unwrap(),
            want
        );
        assert_eq!(
            resolve("s3://vm-images/ubuntu/24.04.qcow2", &s.source_policy()).unwrap(),
            want
        );
        assert_eq!(
            resolve(
                "https://minio.example.com:443/vm-images/a%20b.raw",
                &s.source_policy()
            )
            .unwrap(),
            Location::S3 {
                bucket: "vm-images".into(),
                key: "a b.raw".into()
            }
        );
    }

    #[test]
    fn hosts_outside_the_allow_list_are_refused() {
        let s = settings();
        for bad in [
            "https://169.254.169.254/latest/meta-data",
            "https://minio.example.com.evil.net/b/k",
            "https://minio.example.com:9000/b/k",
            "http://localhost:22/x",
            "https://cdn.example.com/x.qcow2",
            "https://user:pw@images.example.com/x.qcow2",
            "gopher://images.example.com/x",
            "https://minio.example.com/onlybucket",
            "https://minio.example.com/b/../k",
        ] {
            assert!(resolve(bad, &s.source_policy()).is_err(), "{bad}");
        }
        assert!(matches!(
            resolve("https://images.example.com/x.qcow2", &s.source_policy()).unwrap(),
            Location::Http(_)
        ));
        assert!(matches!(
            resolve("https://cdn.example.com:8443/x.qcow2", &s.source_policy()).unwrap(),
            Location::Http(_)
        ));
    }

    #[test]
    fn file_urls_stay_below_roots() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("ok.raw"), b"x").unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("link"))
            .unwrap();
        let mut s = Settings::default();
        s.sources.file_roots = vec![root.path().to_path_buf()];
        let url = |p: &std::path::Path| format!("file://{}", p.display());
        assert!(resolve(&url(&root.path().join("ok.raw")), &s.source_policy()).is_ok());
        assert!(
            resolve(&url(&root.path().join("link")), &s.source_policy()).is_err(),
            "symlink escape"
        );
        assert!(resolve(&url(&outside.path().join("secret")), &s.source_policy()).is_err());
        let dotdot = format!("file://{}/../x", root.path().display());
        assert!(resolve(&dotdot, &s.source_policy()).is_err());
        assert!(resolve(&url(&root.path().join("missing")), &s.source_policy()).is_err());
        // Outside the roots, an existing and a missing file get the same answer.
        let message = |p: &std::path::Path| {
            resolve(&url(p), &s.source_policy())
                .unwrap_err()
                .0
                .replace(&p.display().to_string(), "PATH")
        };
        assert_eq!(
            message(&outside.path().join("secret")),
            message(&outside.path().join("no-such-file"))
        );
        assert_eq!(
            message(&root.path().join("link")),
            message(&outside.path().join("no-such-file"))
        );
        s.sources.file_roots.clear();
        assert!(
            resolve(&url(&root.path().join("ok.raw")), &s.source_policy()).is_err(),
            "disabled"
        );
    }
}
