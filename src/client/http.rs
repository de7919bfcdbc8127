//! The client's HTTP side: a reqwest client built from the options (CA, client certificate,
//! token), requests that satisfy the API's rules (JSON content type, no `Origin`), and errors
//! that say what to do: nothing listening, a TLS handshake refused (and why), 401, 403.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::args::ClientOptions;

/// Time to set up a connection (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle connection is kept for reuse: below the daemon's default
/// `server.header_timeout` (10 s), which also closes idle HTTP/1 keep-alive connections, so a
/// polling request is never sent on a connection the daemon is closing at that instant.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a request (not a progress stream) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest answer read (the largest real one, a list of 1,000 jobs, is a few MiB).
const MAX_BODY_BYTES: usize = 32 << 20;
/// Longest line of a progress stream (an event is one JSON status of a few hundred bytes).
const MAX_EVENT_LINE: usize = 1 << 20;

/// Why a command could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// Bad options or files (certificates, token, upload file).
    #[error("{0}")]
    Setup(String),
    /// The server could not be reached or the connection failed.
    #[error("{message}")]
    Connect {
        /// What kind of failure, from the error types (never from their text).
        kind: ConnectKind,
        message: String,
    },
    /// The server answered with an error status.
    #[error("{message}")]
    Refused {
        status: u16,
        /// The error body's `reason` (what to decide on), when it has one.
        reason: Option<String>,
        message: String,
        /// The API's error body, for `--output json`.
        body: Value,
    },
    /// The server's answer is not what the API promises.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

/// How a connection failed, as the error types say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectKind {
    /// Nothing listens there (ECONNREFUSED): retrying at once will not help.
    Refused,
    /// The TLS handshake failed.
    Tls,
    /// The connection ended early (reset, EOF, closed mid-answer).
    Closed,
    /// No answer in time.
    Timeout,
    /// Anything else (name resolution, routing...).
    Other,
}

impl ClientError {
    /// Whether the daemon could not be reached at all, or a proxy in front of it said so
    /// (502-504): worth trying again while it restarts.
    pub(crate) fn is_unreachable(&self) -> bool {
        match self {
            ClientError::Connect { .. } => true,
            ClientError::Refused { status, .. } => (502..=504).contains(status),
            _ => false,
        }
    }

    /// A connection failure of `kind`.
    pub(crate) fn connect(kind: ConnectKind, message: impl Into<String>) -> ClientError {
        ClientError::Connect {
            kind,
            message: message.into(),
        }
    }
}

/// A progress stream's bytes, cut off with an error once a line grows beyond
/// `MAX_EVENT_LINE` (a server that never ends a line would otherwise grow the parser's buffer,
/// and its rescans, without end).
pub(crate) fn bounded_lines<S>(
    stream: S,
) -> impl futures::Stream<Item = Result<bytes::Bytes, String>>
where
    S: futures::Stream<Item = reqwest::Result<bytes::Bytes>>,
{
    use futures::StreamExt;
    stream.scan(0usize, |line, item| {
        let out = match item {
            Err(e) => Err(e.without_url().to_string()),
            Ok(chunk) => {
                match chunk.iter().rposition(|&b| b == b'\n' || b == b'\r') {
                    Some(end) => *line = chunk.len() - end - 1,
                    None => *line += chunk.len(),
                }
                if *line > MAX_EVENT_LINE {
                    Err(format!(
                        "a progress stream line is longer than {MAX_EVENT_LINE} bytes"
                    ))
                } else {
                    Ok(chunk)
                }
            }
        };
        futures::future::ready(Some(out))
    })
}

/// The API, as this command line reaches it.
pub(crate) struct Api {
    client: reqwest::Client,
    /// For progress streams: no overall time limit.
    streaming: reqwest::Client,
    base: String,
    token: Option<String>,
    /// Whether a client certificate is presented (for the hint when TLS fails).
    has_cert: bool,
    /// Whether the server URL is `https://`.
    https: bool,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path)
        .map_err(|e| ClientError::Setup(format!("cannot read {what} {}: {e}", path.display())))
}

/// The token from `--token-file`, else `LVP_TOKEN`.
fn token(opts: &ClientOptions) -> Result<Option<String>, ClientError> {
    if let Some(path) = &opts.token_file {
        let text = String::from_utf8(read(path, "--token-file")?)
            .map_err(|_| ClientError::Setup(format!("{} is not text", path.display())))?;
        let token = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| {
                ClientError::Setup(format!("--token-file {} holds no token", path.display()))
            })?;
        return Ok(Some(token.to_string()));
    }
    Ok(std::env::var("LVP_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

fn builder(opts: &ClientOptions) -> Result<reqwest::ClientBuilder, ClientError> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .user_agent(concat!(
            "libvirt-volume-provisioner-cli/",
            env!("CARGO_PKG_VERSION")
        ))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = &opts.cacert {
        let pem = read(path, "--cacert")?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            ClientError::Setup(format!(
                "--cacert {}: not PEM certificates: {e}",
                path.display()
            ))
        })?;
        if certs.is_empty() {
            return Err(ClientError::Setup(format!(
                "--cacert {} holds no certificate",
                path.display()
            )));
        }
        b = b.tls_certs_only(certs);
    }
    if let (Some(cert), Some(key)) = (&opts.cert, &opts.key) {
        let mut pem = read(cert, "--cert")?;
        pem.push(b'\n');
        pem.extend(read(key, "--key")?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            ClientError::Setup(format!(
                "--cert {} / --key {}: not a PEM certificate and its key: {e}",
                cert.display(),
                key.display()
            ))
        })?;
        b = b.identity(identity);
    }
    Ok(b)
}

impl Api {
    pub(crate) fn new(opts: &ClientOptions) -> Result<Api, ClientError> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let base = opts.server.trim_end_matches('/').to_string();
        let https = match url::Url::parse(&base) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                u.scheme() == "https"
            }
            _ => {
                return Err(ClientError::Setup(format!(
                    "--server `{base}` is not an http:// or https:// URL (LVP_SERVER_URL sets it too)"
                )));
            }
        };
        let build = |b: reqwest::ClientBuilder| {
            b.build()
                .map_err(|e| ClientError::Setup(format!("cannot set up the HTTP client: {e}")))
        };
        Ok(Api {
            client: build(builder(opts)?.timeout(REQUEST_TIMEOUT))?,
            streaming: build(builder(opts)?.read_timeout(Duration::from_secs(60)))?,
            base,
            token: token(opts)?,
            has_cert: opts.cert.is_some(),
            https,
        })
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// A request to `path` on the normal client.
    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.client.request(method, self.url(path)))
    }

    /// A GET on the streaming client (no overall time limit).
    pub(crate) fn stream_request(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.streaming.get(self.url(path)))
    }

    /// Sends `req` and returns the JSON body of a success (status and body).
    pub(crate) async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(u16, Value), ClientError> {
        let resp = req.send().await.map_err(|e| self.explain(&e))?;
        self.json_of(resp).await
    }

    /// GET `path`.
    pub(crate) async fn get(&self, path: &str) -> Result<Value, ClientError> {
        Ok(self.send(self.request(reqwest::Method::GET, path)).await?.1)
    }

    /// POST a JSON body (with the JSON content type the API requires).
    pub(crate) async fn post(
        &self,
        path: &str,
        body: &Value,
        idempotency_key: Option<&str>,
    ) -> Result<(u16, Value), ClientError> {
        let mut req = self
            .request(reqwest::Method::POST, path)
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(key) = idempotency_key {
            req = req.header("idempotency-key", key);
        }
        self.send(req).await
    }

    /// DELETE `path`.
    pub(crate) async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        Ok(self
            .send(self.request(reqwest::Method::DELETE, path))
            .await?
            .1)
    }

    /// The body of a success, or the error the API answered.
    pub(crate) async fn json_of(
        &self,
        resp: reqwest::Response,
    ) -> Result<(u16, Value), ClientError> {
        let status = resp.status().as_u16();
        let bytes = self.bounded_body(resp).await?;
        let body: Value = serde_json::from_slice(&bytes).map_err(|_| {
            ClientError::Protocol(format!(
                "HTTP {status} with a body that is not JSON: {}",
                crate::text::escape(&String::from_utf8_lossy(&bytes[..bytes.len().min(200)]))
            ))
        })?;
        if status >= 400 {
            return Err(refused(status, body));
        }
        Ok((status, body))
    }

    /// The whole body, at most `MAX_BODY_BYTES` of it.
    async fn bounded_body(&self, mut resp: reqwest::Response) -> Result<Vec<u8>, ClientError> {
        let too_large =
            || ClientError::Protocol(format!("the answer is larger than {MAX_BODY_BYTES} bytes"));
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_BODY_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.explain(&e))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// What a failed request means for the person running the command, decided from the
    /// error's types: a rustls error anywhere in it, an I/O error kind, hyper's own kinds.
    pub(crate) fn explain(&self, e: &reqwest::Error) -> ClientError {
        let chain = error_chain(e);
        let https = self.https;
        let cause = Cause::of(e);
        if let Some(tls) = cause.tls {
            return ClientError::connect(
                ConnectKind::Tls,
                format!(
                    "TLS handshake with {} failed: {tls}. {}",
                    self.base,
                    tls_hint(tls, &self.base)
                ),
            );
        }
        if cause.invalid_data && https {
            let hint = if self.has_cert {
                "The server refused the client certificate (--cert): it must be signed by the \
                 server's tls.client_ca_file, be valid now, and allow client authentication."
            } else {
                "The server requires a client certificate: pass --cert and --key."
            };
            return ClientError::connect(
                ConnectKind::Tls,
                format!("TLS session with {} refused: {chain}. {hint}", self.base),
            );
        }
        if cause.refused {
            return ClientError::connect(
                ConnectKind::Refused,
                format!(
                    "cannot connect to {}: nothing is listening there (connection refused). Is \
                     the daemon running (`libvirt-volume-provisioner serve`)? Point --server or \
                     LVP_SERVER_URL at its server.listen address.",
                    self.base
                ),
            );
        }
        if e.is_timeout() {
            return ClientError::connect(
                ConnectKind::Timeout,
                format!("{} did not answer in time ({chain})", self.base),
            );
        }
        if cause.closed && https {
            // TLS 1.3 refuses a client certificate after the client's side of the handshake,
            // so the client often sees the connection end rather than the alert.
            let hint = if self.has_cert {
                "the server may have refused the client certificate (--cert): it must be \
                 signed by the daemon's tls.client_ca_file, be valid now and allow client \
                 authentication"
            } else {
                "the server requires a client certificate: pass --cert and --key"
            };
            return ClientError::connect(
                ConnectKind::Closed,
                format!(
                    "{} closed the connection during the TLS handshake ({chain}); {hint}.",
                    self.base
                ),
            );
        }
        if cause.closed {
            return ClientError::connect(
                ConnectKind::Closed,
                format!("{} closed the connection ({chain})", self.base),
            );
        }
        if e.is_connect() {
            return ClientError::connect(
                ConnectKind::Other,
                format!(
                    "cannot connect to {}: {chain}. Check --server / LVP_SERVER_URL and the network.",
                    self.base
                ),
            );
        }
        ClientError::connect(
            ConnectKind::Other,
            format!("request to {} failed: {chain}", self.base),
        )
    }
}

/// What the error types inside a failed request say.
#[derive(Default)]
struct Cause<'a> {
    /// The TLS error, when the handshake failed.
    tls: Option<&'a rustls::Error>,
    /// ECONNREFUSED.
    refused: bool,
    /// The connection ended early (reset, EOF, closed before the answer was complete).
    closed: bool,
    /// The transport refused the bytes (on TLS: the server refused the session by an alert).
    invalid_data: bool,
}

impl<'a> Cause<'a> {
    fn of(e: &'a (dyn std::error::Error + 'static)) -> Cause<'a> {
        let mut cause = Cause::default();
        cause.visit(e);
        cause
    }

    /// Looks at `e` and everything below it. An `io::Error`'s `source()` skips the error it
    /// wraps, so that one is visited through `get_ref()`.
    fn visit(&mut self, e: &'a (dyn std::error::Error + 'static)) {
        use std::io::ErrorKind;
        let mut current = Some(e);
        while let Some(err) = current {
            if let Some(tls) = err.downcast_ref::<rustls::Error>() {
                self.tls.get_or_insert(tls);
            }
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    ErrorKind::ConnectionRefused => self.refused = true,
                    ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::BrokenPipe => self.closed = true,
                    // What the TLS layer answers for a session the peer refused by an alert
                    // after the handshake (rustls' error reaches us only as text there).
                    ErrorKind::InvalidData => self.invalid_data = true,
                    _ => {}
                }
                if let Some(inner) = io.get_ref() {
                    self.visit(inner);
                }
            }
            if let Some(h) = err.downcast_ref::<hyper::Error>()
                && (h.is_incomplete_message() || h.is_closed() || h.is_canceled())
            {
                self.closed = true;
            }
            current = err.source();
        }
    }
}

/// An error status as the user should read it: the API's message, and what to do for 401/403.
fn refused(status: u16, body: Value) -> ClientError {
    let said = crate::text::escape(body["message"].as_str().unwrap_or("")).into_owned();
    let reason = body["reason"].as_str().map(str::to_string);
    let message = match status {
        401 => format!(
            "authentication required (HTTP 401): {said}. Pass a client certificate with \
             --cert/--key (and --cacert), or an API token with --token-file or LVP_TOKEN."
        ),
        403 if reason.as_deref() == Some(REASON_CLIENT_NOT_ALLOWED) => format!(
            "forbidden (HTTP 403): {said}. The certificate is valid but not allowed here: ask \
             for its name to be listed in the daemon's auth.allowed_clients."
        ),
        403 => format!("forbidden (HTTP 403): {said}"),
        _ => format!("{said} (HTTP {status})"),
    };
    ClientError::Refused {
        status,
        reason,
        message,
        body,
    }
}

/// The `reason` of the daemon's 403 for a valid certificate `auth.allowed_clients` lacks.
const REASON_CLIENT_NOT_ALLOWED: &str = "client_certificate_not_allowed";

/// Every message of an error's source chain, joined.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut current = e.source();
    while let Some(err) = current {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = err.source();
    }
    parts.join(": ")
}

/// What to do about a refused handshake.
fn tls_hint(e: &rustls::Error, base: &str) -> String {
    use rustls::{AlertDescription, CertificateError, Error};
    match e {
        Error::InvalidCertificate(CertificateError::UnknownIssuer)
        | Error::InvalidCertificate(CertificateError::BadSignature) => {
            "The server's certificate is not signed by a CA this command trusts: pass the CA \
             certificate with --cacert."
                .into()
        }
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "The server's certificate does not name the host of {base}: use a name or address \
             from its subjectAltName in --server."
        ),
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "The server's certificate has expired (or this machine's clock is wrong).".into(),
        Error::AlertReceived(AlertDescription::CertificateRequired)
        | Error::AlertReceived(AlertDescription::HandshakeFailure) => {
            "The server requires a client certificate: pass --cert and --key.".into()
        }
        Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateExpired
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::DecryptError,
        ) => "The server refused the client certificate (--cert): it must be signed by the \
              server's tls.client_ca_file, be valid now, and allow client authentication."
            .into(),
        Error::InvalidMessage(_) => {
            "The server may not speak TLS on this port; if it serves plain HTTP, use http://."
                .into()
        }
        _ => "Check --cacert, --cert and --key.".into(),
    }
}
