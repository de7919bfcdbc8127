//! Who may call the API: the caller's identity from the verified client certificate or an API
//! token, checked against the configured policy (`auth.allowed_clients`, `auth.tokens_file`,
//! `auth.protect_metrics`), the warp filters protected routes use, and the counting and
//! logging of refused calls. Only SHA-256 digests of tokens are kept; the policy is replaced
//! as a whole by `Authenticator::reload`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use warp::http::StatusCode;

use super::conn::{ClientCert, ConnInfo};
use super::error::ApiError;
use crate::config::{Settings, resolve_credential};
use crate::jobs::engine::Origin;

/// Shortest accepted API token, in characters.
pub(crate) const MIN_TOKEN_LEN: usize = 32;
/// Longest name of a `name:token` line.
const MAX_TOKEN_NAME_LEN: usize = 64;
const BEARER_PREFIX: &[u8] = b"Bearer ";
const TOKEN_HEADER: &str = "x-api-token";

/// An authorised caller.
#[derive(Debug, Clone, Default)]
pub(crate) struct Caller {
    identity: Option<String>,
}

impl Caller {
    pub(crate) fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    /// Where a job comes from: the caller and the current trace.
    pub(crate) fn origin(&self) -> Origin {
        Origin {
            requested_by: self.identity.clone(),
            trace_context: crate::telemetry::current_trace_context(),
        }
    }
}

/// One API token: the identity it stands for and the SHA-256 of the token.
#[derive(Clone)]
struct TokenEntry {
    identity: String,
    digest: [u8; 32],
}

impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEntry")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// The access policy, replaced as a whole on reload.
struct Policy {
    protect_metrics: bool,
    /// Client certificates are verified (a client CA is configured).
    client_certs: bool,
    /// Certificate names allowed to call; empty = any certificate the CA signed.
    allowed_clients: Vec<String>,
    tokens: Vec<TokenEntry>,
}

impl Policy {
    fn from_settings(settings: &Settings) -> Result<Policy, String> {
        let tokens = if settings.auth.tokens_file.is_empty() {
            Vec::new()
        } else {
            let path = resolve_credential(&settings.auth.tokens_file);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("auth.tokens_file: cannot read {}: {e}", path.display()))?;
            parse_tokens(&path, &text).map_err(|e| format!("auth.tokens_file: {e}"))?
        };
        Ok(Policy {
            protect_metrics: settings.auth.protect_metrics,
            client_certs: !settings.tls.client_ca_file.is_empty(),
            allowed_clients: settings.auth.allowed_clients.clone(),
            tokens,
        })
    }

    /// Neither client certificates nor tokens are configured: every caller is let in.
    /// `Settings::validate` allows this on loopback listeners only.
    fn is_open(&self) -> bool {
        !self.client_certs && self.tokens.is_empty()
    }

    /// The token whose digest matches, compared in constant time against every entry.
    fn find_token(&self, presented: &[u8]) -> Option<&TokenEntry> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, entry) in self.tokens.iter().enumerate() {
            let hit = entry.digest.ct_eq(&digest);
            index.conditional_assign(&(i as u32), hit);
            found |= hit;
        }
        bool::from(found).then(|| &self.tokens[index as usize])
    }

    /// The name under which a verified certificate is allowed, if it is.
    fn allowed_cert_name(&self, cert: &ClientCert) -> Option<String> {
        if self.allowed_clients.is_empty() {
            return Some(cert.identity());
        }
        cert.common_name
            .iter()
            .chain(cert.sans.iter())
            .find(|name| self.allowed_clients.iter().any(|a| a == *name))
            .cloned()
    }
}

/// Parses a tokens file: one token per line, `#` comments, blank lines, `name:token` lines.
fn parse_tokens(path: &Path, text: &str) -> Result<Vec<TokenEntry>, String> {
    let mut entries: Vec<TokenEntry> = Vec::new();
    let mut line_of_name: HashMap<String, usize> = HashMap::new();
    let mut line_of_digest: HashMap<[u8; 32], usize> = HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let at = || format!("{} line {line_no}", path.display());
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, token) = match line.split_once(':') {
            Some((name, token)) => (Some(name), token),
            None => (None, line),
        };
        if let Some(name) = name
            && (name.is_empty()
                || name.len() > MAX_TOKEN_NAME_LEN
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._@/-".contains(&b)))
        {
            return Err(format!(
                "{}: the name before `:` must be 1 to {MAX_TOKEN_NAME_LEN} characters of \
                 A-Z a-z 0-9 . _ @ / - (tokens themselves cannot contain `:`)",
                at()
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{}: the token contains spaces or characters other than printable ASCII",
                at()
            ));
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "{}: the token is {} characters long; at least {MIN_TOKEN_LEN} are required \
                 (e.g. `openssl rand -hex 32`)",
                at(),
                token.len()
            ));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(first) = line_of_digest.insert(digest, line_no) {
            return Err(format!(
                "{}: the same token is already on line {first}",
                at()
            ));
        }
        let identity = match name {
            Some(name) => {
                if let Some(first) = line_of_name.insert(name.to_string(), line_no) {
                    return Err(format!(
                        "{}: the name `{name}` is already used on line {first}",
                        at()
                    ));
                }
                name.to_string()
            }
            None => format!("token-{}", hex::encode(&digest[..4])),
        };
        entries.push(TokenEntry { identity, digest });
    }
    if entries.is_empty() {
        return Err(format!("{} contains no tokens", path.display()));
    }
    Ok(entries)
}

/// Every `auth_failures_total{reason}` label, here and in the TLS transport (so the series
/// exist from the start).
pub(crate) const FAILURE_REASONS: [&str; 6] = [
    "malformed_credentials",
    "invalid_token",
    "client_not_allowed",
    "missing_credentials",
    "no_client_certificate",
    "invalid_client_certificate",
];

/// A refused call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuthFailure {
    /// 401 (no valid credential) or 403 (valid certificate, not allowed).
    pub(crate) status: StatusCode,
    /// Label of `auth_failures_total`: a fixed, short word.
    pub(crate) reason: &'static str,
    /// Identity of the verified client certificate, if one was presented.
    pub(crate) certificate: Option<String>,
}

impl AuthFailure {
    fn unauthorized(reason: &'static str, cert: Option<&ClientCert>) -> AuthFailure {
        AuthFailure {
            status: StatusCode::UNAUTHORIZED,
            reason,
            certificate: cert.map(ClientCert::identity),
        }
    }

    /// The error answered to the client; it never contains the presented credential.
    pub(crate) fn to_api_error(&self) -> ApiError {
        if self.status == StatusCode::FORBIDDEN {
            ApiError::new(
                StatusCode::FORBIDDEN,
                super::error::Reason::ClientCertificateNotAllowed,
                format!(
                    "the client certificate `{}` is not allowed to call this API",
                    self.certificate.as_deref().unwrap_or("")
                ),
            )
        } else {
            ApiError::unauthorized()
        }
    }
}

/// What the request carries as token.
enum PresentedToken<'a> {
    None,
    Token(&'a [u8]),
    Malformed,
}

/// `Authorization: Bearer <t>` (scheme exactly `Bearer `) or `X-API-Token: <t>`; the value is
/// taken byte for byte (no trimming). Both headers, repeated headers or another scheme are
/// malformed.
fn presented_token(headers: &http::HeaderMap) -> PresentedToken<'_> {
    let mut authorization = headers.get_all(http::header::AUTHORIZATION).iter();
    let mut api_token = headers.get_all(TOKEN_HEADER).iter();
    let (a, a2) = (authorization.next(), authorization.next());
    let (t, t2) = (api_token.next(), api_token.next());
    if a2.is_some() || t2.is_some() {
        return PresentedToken::Malformed;
    }
    match (a, t) {
        (None, None) => PresentedToken::None,
        (Some(_), Some(_)) => PresentedToken::Malformed,
        (Some(a), None) => match a.as_bytes().strip_prefix(BEARER_PREFIX) {
            Some(token) => PresentedToken::Token(token),
            None => PresentedToken::Malformed,
        },
        (None, Some(t)) => PresentedToken::Token(t.as_bytes()),
    }
}

/// A policy built from settings, not yet in force (see `Authenticator::prepare`).
pub(crate) struct PreparedPolicy(Arc<Policy>);

/// The API's access control.
pub(crate) struct Authenticator {
    policy: RwLock<Arc<Policy>>,
}

impl Authenticator {
    /// Reads the tokens file; errors name the file and line, never a token.
    pub(crate) fn new(settings: &Settings) -> Result<Authenticator, String> {
        Ok(Authenticator {
            policy: RwLock::new(Arc::new(Policy::from_settings(settings)?)),
        })
    }

    /// Builds the policy `settings` ask for (reads the tokens file) without applying it.
    pub(crate) fn prepare(settings: &Settings) -> Result<PreparedPolicy, String> {
        Ok(PreparedPolicy(Arc::new(Policy::from_settings(settings)?)))
    }

    /// Puts a prepared policy in force; cannot fail.
    pub(crate) fn install(&self, prepared: PreparedPolicy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = prepared.0;
    }

    /// Whether `/metrics` needs credentials (`auth.protect_metrics`, as last installed).
    pub(crate) fn protects_metrics(&self) -> bool {
        self.policy().protect_metrics
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every caller gets in (no client CA, no tokens; loopback listeners only).
    pub(crate) fn is_open(&self) -> bool {
        self.policy().is_open()
    }

    /// How many API tokens are loaded.
    pub(crate) fn token_count(&self) -> usize {
        self.policy().tokens.len()
    }

    /// Decides on a request from its connection (client certificate) and headers (token).
    ///
    /// A presented token must be valid (else 401, even with a good certificate). An allowed
    /// certificate, or else a valid token, authorises the call; a verified certificate that is
    /// not in `auth.allowed_clients` and no token is 403; nothing at all is 401.
    pub(crate) fn authorize(
        &self,
        conn: Option<&ConnInfo>,
        headers: &http::HeaderMap,
    ) -> Result<Caller, AuthFailure> {
        let policy = self.policy();
        if policy.is_open() {
            return Ok(Caller::default());
        }
        let cert = conn.and_then(|c| c.client_cert.as_deref());
        let token_identity = match presented_token(headers) {
            PresentedToken::None => None,
            PresentedToken::Malformed => {
                return Err(AuthFailure::unauthorized("malformed_credentials", cert));
            }
            PresentedToken::Token(token) => match policy.find_token(token) {
                Some(entry) => Some(entry.identity.clone()),
                None => return Err(AuthFailure::unauthorized("invalid_token", cert)),
            },
        };
        if let Some(name) = cert.and_then(|c| policy.allowed_cert_name(c)) {
            return Ok(Caller {
                identity: Some(name),
            });
        }
        if let Some(identity) = token_identity {
            return Ok(Caller {
                identity: Some(identity),
            });
        }
        match cert {
            Some(cert) => Err(AuthFailure {
                status: StatusCode::FORBIDDEN,
                reason: "client_not_allowed",
                certificate: Some(cert.identity()),
            }),
            None => Err(AuthFailure::unauthorized("missing_credentials", None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload as the daemon does it: prepare, then install.
    fn reload(auth: &Authenticator, settings: &Settings) -> Result<(), String> {
        auth.install(Authenticator::prepare(settings)?);
        Ok(())
    }

    const T1: &str = "0123456789abcdef0123456789abcdef";
    const T2: &str = "ffffffffffffffffffffffffffffffff-2";

    fn settings_with(dir: &Path, tokens: Option<&str>, ca: bool, allowed: &[&str]) -> Settings {
        let mut s = Settings::default();
        if let Some(text) = tokens {
            let p = dir.join("tokens");
            std::fs::write(&p, text).unwrap();
            s.auth.tokens_file = p.display().to_string();
        }
        if ca {
            // The policy only needs to know that certificates are verified.
            s.tls.client_ca_file = "ca.pem".into();
        }
        s.auth.allowed_clients = allowed.iter().map(|a| a.to_string()).collect();
        s
    }

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn conn(cn: Option<&str>, sans: &[&str]) -> ConnInfo {
        ConnInfo {
            remote: "127.0.0.1:1".parse().unwrap(),
            client_cert: Some(Arc::new(ClientCert {
                common_name: cn.map(str::to_string),
                sans: sans.iter().map(|s| s.to_string()).collect(),
            })),
        }
    }

    fn reason(r: Result<Caller, AuthFailure>) -> (u16, &'static str) {
        let f = r.unwrap_err();
        (f.status.as_u16(), f.reason)
    }

    #[test]
    fn tokens_file_syntax() {
        let p = Path::new("/etc/tokens");
        let entries =
            parse_tokens(p, &format!("# ops tokens\n\n  {T1}  \r\nci-runner:{T2}\n")).unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries[0].identity.starts_with("token-") && entries[0].identity.len() == 14);
        assert_eq!(entries[1].identity, "ci-runner");

        let short = "s3cr3t-but-short";
        let err = parse_tokens(p, &format!("# c\n{T1}\nname:{short}\n")).unwrap_err();
        assert_eq!(
            err,
            "/etc/tokens line 3: the token is 16 characters long; at least 32 are required \
             (e.g. `openssl rand -hex 32`)"
        );
        assert!(!err.contains(short));
        let err = parse_tokens(p, &format!("{T1} {T2}\n")).unwrap_err();
        assert!(
            err.starts_with("/etc/tokens line 1: the token contains spaces"),
            "{err}"
        );
        assert!(!err.contains(T1));
        let err = parse_tokens(p, &format!("bad name:{T1}\n")).unwrap_err();
        assert!(
            err.starts_with("/etc/tokens line 1: the name before"),
            "{err}"
        );
        let err = parse_tokens(p, &format!("a:{T1}\nb:{T1}\n")).unwrap_err();
        assert_eq!(
            err,
            "/etc/tokens line 2: the same token is already on line 1"
        );
        let err = parse_tokens(p, &format!("a:{T1}\na:{T2}\n")).unwrap_err();
        assert_eq!(
            err,
            "/etc/tokens line 2: the name `a` is already used on line 1"
        );
        let err = parse_tokens(p, "# nothing\n\n").unwrap_err();
        assert_eq!(err, "/etc/tokens contains no tokens");
    }

    #[test]
    fn token_headers() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Authenticator::new(&settings_with(
            dir.path(),
            Some(&format!("ci:{T1}\n{T2}\n")),
            false,
            &[],
        ))
        .unwrap();
        assert!(!auth.is_open());
        assert_eq!(auth.token_count(), 2);
        let ok = |h: &[(&str, &str)]| auth.authorize(None, &headers(h)).unwrap();
        assert_eq!(
            ok(&[("authorization", &format!("Bearer {T1}"))]).identity(),
            Some("ci")
        );
        assert_eq!(ok(&[("x-api-token", T1)]).identity(), Some("ci"));
        assert!(
            ok(&[("x-api-token", T2)])
                .identity()
                .unwrap()
                .starts_with("token-")
        );

        let fail = |h: &[(&str, &str)]| reason(auth.authorize(None, &headers(h)));
        assert_eq!(fail(&[]), (401, "missing_credentials"));
        assert_eq!(
            fail(&[("x-api-token", &format!("{T1}x"))]),
            (401, "invalid_token")
        );
        assert_eq!(
            fail(&[("authorization", &format!("bearer {T1}"))]),
            (401, "malformed_credentials")
        );
        assert_eq!(
            fail(&[("authorization", &format!("Bearer  {T1}"))]),
            (401, "invalid_token")
        );
        assert_eq!(
            fail(&[("authorization", &format!("Bearer {T1} "))]),
            (401, "invalid_token")
        );
        assert_eq!(
            fail(&[("authorization", "Bearer ")]),
            (401, "invalid_token")
        );
        assert_eq!(fail(&[("x-api-token", "")]), (401, "invalid_token"));
        assert_eq!(
            fail(&[("authorization", &format!("Basic {T1}"))]),
            (401, "malformed_credentials")
        );
        assert_eq!(
            fail(&[
                ("authorization", &format!("Bearer {T1}")),
                ("x-api-token", T1)
            ]),
            (401, "malformed_credentials")
        );
        assert_eq!(
            fail(&[("x-api-token", T1), ("x-api-token", T1)]),
            (401, "malformed_credentials")
        );
    }

    #[test]
    fn certificates_and_allowed_clients() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Authenticator::new(&settings_with(
            dir.path(),
            Some(&format!("ci:{T1}\n")),
            true,
            &["orchestrator", "spiffe://example.com/worker"],
        ))
        .unwrap();
        let none = http::HeaderMap::new();
        let by_cn = conn(Some("orchestrator"), &["host.example.com"]);
        assert_eq!(
            auth.authorize(Some(&by_cn), &none).unwrap().identity(),
            Some("orchestrator")
        );
        let by_san = conn(Some("w1"), &["spiffe://example.com/worker"]);
        assert_eq!(
            auth.authorize(Some(&by_san), &none).unwrap().identity(),
            Some("spiffe://example.com/worker")
        );
        let stranger = conn(Some("intruder"), &["intruder.example.com"]);
        assert_eq!(
            reason(auth.authorize(Some(&stranger), &none)),
            (403, "client_not_allowed")
        );
        let failure = auth.authorize(Some(&stranger), &none).unwrap_err();
        assert_eq!(failure.to_api_error().status, StatusCode::FORBIDDEN);
        // A valid token authorises even with a certificate that is not allowed.
        let with_token = headers(&[("x-api-token", T1)]);
        assert_eq!(
            auth.authorize(Some(&stranger), &with_token)
                .unwrap()
                .identity(),
            Some("ci")
        );
        // An invalid token is refused even with an allowed certificate.
        let bad = headers(&[("x-api-token", T2)]);
        assert_eq!(
            reason(auth.authorize(Some(&by_cn), &bad)),
            (401, "invalid_token")
        );
        // The certificate identity wins over the token's.
        assert_eq!(
            auth.authorize(Some(&by_cn), &with_token)
                .unwrap()
                .identity(),
            Some("orchestrator")
        );

        // Empty allowed_clients: any verified certificate, named by CN or first SAN.
        reload(&auth, &settings_with(dir.path(), None, true, &[])).unwrap();
        assert_eq!(
            auth.authorize(Some(&stranger), &none).unwrap().identity(),
            Some("intruder")
        );
        let san_only = conn(None, &["api.example.com"]);
        assert_eq!(
            auth.authorize(Some(&san_only), &none).unwrap().identity(),
            Some("api.example.com")
        );
        assert_eq!(
            reason(auth.authorize(None, &none)),
            (401, "missing_credentials")
        );
    }

    #[test]
    fn open_without_any_mechanism_and_failed_reload_keeps_policy() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Authenticator::new(&settings_with(dir.path(), None, false, &[])).unwrap();
        assert!(auth.is_open());
        assert!(
            auth.authorize(None, &http::HeaderMap::new())
                .unwrap()
                .identity()
                .is_none()
        );

        reload(
            &auth,
            &settings_with(dir.path(), Some(&format!("{T1}\n")), false, &[]),
        )
        .unwrap();
        assert!(!auth.is_open());
        let err = reload(
            &auth,
            &settings_with(dir.path(), Some("short\n"), false, &[]),
        )
        .unwrap_err();
        assert!(
            err.starts_with("auth.tokens_file: ") && err.contains("line 1"),
            "{err}"
        );
        assert!(!auth.is_open(), "the previous policy stays");
        assert!(
            auth.authorize(None, &headers(&[("x-api-token", T1)]))
                .is_ok()
        );
    }
}
