//! What the server knows about a connection and puts into each of its requests: the peer and
//! its verified client certificate (`ConnInfo`), and where the connection was accepted
//! (`Endpoint`). Value types: a leaf of `api/`.

use std::net::SocketAddr;
use std::sync::Arc;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub(crate) remote: SocketAddr,
    /// Identities from a verified client certificate (subject CN, DNS and URI SANs).
    pub(crate) client_cert: Option<Arc<ClientCert>>,
}

/// A verified client certificate's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientCert {
    pub(crate) common_name: Option<String>,
    pub(crate) sans: Vec<String>,
}

impl ClientCert {
    /// The name used as identity in logs and `requested_by`.
    pub(crate) fn identity(&self) -> String {
        self.common_name
            .clone()
            .or_else(|| self.sans.first().cloned())
            .unwrap_or_else(|| "<certificate without names>".into())
    }
}

/// Where a connection was accepted, put into each request by the server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Endpoint {
    /// `http` or `https`.
    pub(crate) scheme: &'static str,
    /// The listener's address as the connection reached it (the socket's local address).
    pub(crate) local: SocketAddr,
}
