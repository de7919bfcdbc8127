//! `[tls]` and `[auth]`: who may call the API and over what; their defaults and rules, and the
//! security posture of the listener (which spans `server`, `tls` and `auth`).

use serde::{Deserialize, Serialize};

use super::Settings;
use super::error::{SettingError, check};

/// Whether a client certificate is required (`tls.client_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ClientAuthMode {
    /// The handshake fails without a client certificate signed by `client_ca_file`.
    Required,
    /// A client certificate is verified when presented; otherwise an API token is needed.
    Optional,
}

/// `[tls]`: TLS on the API listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSettings {
    /// Server certificate chain (PEM). With `key_file`, the API is served over TLS.
    pub(crate) cert_file: String,
    /// Server private key (PEM).
    pub(crate) key_file: String,
    /// CA certificates (PEM) that client certificates are verified against.
    pub(crate) client_ca_file: String,
    pub(crate) client_auth: ClientAuthMode,
    /// Permit plain HTTP on a non-loopback address.
    pub(crate) allow_insecure_http: bool,
}

/// `[auth]`: who may call the API.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthSettings {
    /// File of API tokens, one per line (`token` or `name:token`).
    pub(crate) tokens_file: String,
    /// Certificate subject CNs or DNS/URI SANs allowed to call the API; empty = any cert the CA signed.
    pub(crate) allowed_clients: Vec<String>,
    /// Require a client certificate or token for `/metrics`.
    pub(crate) protect_metrics: bool,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            cert_file: String::new(),
            key_file: String::new(),
            client_ca_file: String::new(),
            client_auth: ClientAuthMode::Required,
            allow_insecure_http: false,
        }
    }
}

impl TlsSettings {
    pub(crate) fn validate(&self) -> Result<(), SettingError> {
        check(
            self.cert_file.is_empty() == self.key_file.is_empty(),
            "tls.cert_file/tls.key_file",
            || "set both or neither".into(),
        )?;
        check(
            self.client_ca_file.is_empty() || !self.cert_file.is_empty(),
            "tls.client_ca_file",
            || "needs tls.cert_file and tls.key_file (client certificates need TLS)".into(),
        )
    }
}

impl Settings {
    /// The security posture of the listener: plain HTTP and unauthenticated access are only
    /// accepted on loopback addresses (see docs/security.md).
    pub(crate) fn validate_access(&self) -> Result<(), SettingError> {
        let listen = self.listen_addr();
        let loopback = listen.ip().is_loopback();
        let tls = !self.tls.cert_file.is_empty();
        check(
            tls || loopback || self.tls.allow_insecure_http,
            "tls.cert_file",
            || {
                format!(
                    "the API would be plain HTTP on {listen}, which is not a loopback address; set \
                 tls.cert_file and tls.key_file, or tls.allow_insecure_http = true to accept \
                 that (API tokens then cross the network in clear text)"
                )
            },
        )?;
        check(
            loopback || !self.tls.client_ca_file.is_empty() || !self.auth.tokens_file.is_empty(),
            "auth",
            || {
                format!(
                    "no client authentication is configured for {listen}, which is not a \
                     loopback address; set tls.client_ca_file (client certificates) and/or \
                     auth.tokens_file (API tokens)"
                )
            },
        )?;
        check(
            self.auth.allowed_clients.is_empty() || !self.tls.client_ca_file.is_empty(),
            "auth.allowed_clients",
            || {
                "lists certificate names, but tls.client_ca_file is not set, so no client \
                 certificate is ever verified"
                    .into()
            },
        )?;
        if let Some(bad) = self
            .auth
            .allowed_clients
            .iter()
            .find(|c| c.is_empty() || c.contains(char::is_whitespace))
        {
            return Err(SettingError::new(
                "auth.allowed_clients",
                format!("`{bad}` is not a certificate name (CN, DNS or URI SAN)"),
            ));
        }
        Ok(())
    }
}
