//! The TLS transport of the API listener: builds the rustls `ServerConfig` from `tls.*`
//! (server certificate, client CA, `required`/`optional` client certificates, TLS 1.2+, ALPN h2
//! and http/1.1), performs the handshake per connection, reads the verified client
//! certificate's names (subject CN, DNS and URI SANs), answers plain HTTP sent to the TLS port
//! with a clear 400, and counts refused client certificates. The configuration is swappable
//! (`reload`): new handshakes use the new certificates, open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use x509_parser::extensions::GeneralName;

use super::conn::ClientCert;
use super::server::{Accepted, Conn, Established, HttpProtocol, Transport};
use crate::config::{ClientAuthMode, TlsSettings, resolve_credential};
use crate::telemetry::metrics::metrics;

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Why the TLS configuration could not be built. Messages name the setting and the file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("{key}: cannot read {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key}: {}: {problem}", path.display())]
    Invalid {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("tls: {0}")]
    Rustls(String),
}

/// What `tls.*` asks for, in words for the start-up log line.
pub(crate) fn client_auth_label(tls: &TlsSettings) -> &'static str {
    if tls.client_ca_file.is_empty() {
        "none"
    } else {
        match tls.client_auth {
            ClientAuthMode::Required => "required",
            ClientAuthMode::Optional => "optional",
        }
    }
}

/// TLS on the API listener. Holds the current `ServerConfig`; `reload` swaps it.
pub(crate) struct TlsTransport {
    config: RwLock<Arc<ServerConfig>>,
}

impl TlsTransport {
    pub(crate) fn new(tls: &TlsSettings) -> Result<TlsTransport, TlsError> {
        Ok(TlsTransport {
            config: RwLock::new(server_config(tls)?),
        })
    }

    /// Makes `config` (from `server_config`) the one new handshakes use; cannot fail, so a
    /// reload can build everything first and then swap it all in.
    pub(crate) fn install(&self, config: Arc<ServerConfig>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Transport for TlsTransport {
    fn scheme(&self) -> &'static str {
        "https"
    }

    fn accept(&self, tcp: TcpStream) -> Accepted {
        let acceptor = TlsAcceptor::from(self.current());
        Box::pin(async move {
            let remote = tcp.peer_addr().ok();
            if speaks_plain_http(&tcp).await? {
                return Err(answer_plain_http(tcp).await);
            }
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    record_handshake_failure(remote, &e);
                    return Err(e);
                }
            };
            let (_, session) = stream.get_ref();
            let protocol = match session.alpn_protocol() {
                Some(b"h2") => HttpProtocol::Http2,
                _ => HttpProtocol::Http1,
            };
            let client_cert = match session.peer_certificates().and_then(|c| c.first()) {
                Some(der) => Some(
                    client_cert_names(der)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
                ),
                None => None,
            };
            Ok(Established {
                io: Box::new(stream) as Box<dyn Conn>,
                client_cert,
                protocol,
            })
        })
    }
}

/// Whether the client starts with plain HTTP (`GET /...`) instead of a TLS handshake.
/// EOF and other non-TLS bytes are left to rustls, which refuses them.
async fn speaks_plain_http(tcp: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await?;
    Ok(n == 1 && first[0] != TLS_HANDSHAKE_RECORD && first[0].is_ascii_uppercase())
}

/// Answers plain HTTP sent to the TLS port with a short JSON 400 and closes the connection.
async fn answer_plain_http(mut tcp: TcpStream) -> std::io::Error {
    let body = r#"{"error":"invalid request","message":"this port serves HTTPS; use https://","code":400}"#;
    let reply = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    if tcp.write_all(reply.as_bytes()).await.is_ok() && tcp.shutdown().await.is_ok() {
        // Read what the client still sends (briefly, bounded) so that closing does not reset
        // the connection before the client has read the answer.
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        let drain = async {
            while left > 0 {
                match tcp.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
    }
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "plain HTTP request on the TLS port",
    )
}

/// Refused client certificates are authentication failures: counted and logged. Other
/// handshake errors (scanners, clients that reject our certificate) are logged at debug level.
fn record_handshake_failure(remote: Option<std::net::SocketAddr>, err: &std::io::Error) {
    let remote = remote.map(|r| r.to_string()).unwrap_or_default();
    let tls_err = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls_err {
        Some(rustls::Error::NoCertificatesPresented) => {
            metrics()
                .auth_failures_total
                .with_label_values(&["no_client_certificate"])
                .inc();
            tracing::info!(
                remote,
                reason = "no_client_certificate",
                "TLS handshake refused: the client sent no certificate"
            );
        }
        Some(rustls::Error::InvalidCertificate(why)) => {
            metrics()
                .auth_failures_total
                .with_label_values(&["invalid_client_certificate"])
                .inc();
            tracing::warn!(
                remote,
                reason = "invalid_client_certificate",
                error = %why,
                "TLS handshake refused: invalid client certificate"
            );
        }
        _ => tracing::debug!(remote, error = %err, "TLS handshake failed"),
    }
}

/// The names of a (verified) client certificate: first subject CN, DNS and URI SANs.
pub(crate) fn client_cert_names(der: &CertificateDer<'_>) -> Result<ClientCert, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("cannot parse the client certificate: {e}"))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let mut sans = Vec::new();
    let ext = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName in the client certificate: {e}"))?;
    if let Some(ext) = ext {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(s) | GeneralName::URI(s) => sans.push(s.to_string()),
                _ => {}
            }
        }
    }
    Ok(ClientCert { common_name, sans })
}

/// Builds the rustls server configuration from `tls.*` (files resolved through systemd
/// credentials). TLS 1.2 and 1.3 only, ALPN h2 then http/1.1.
pub(crate) fn server_config(tls: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = read_certs("tls.cert_file", &tls.cert_file)?;
    warn_if_expired(&tls.cert_file, &chain[0]);
    let key_path = resolve_credential(&tls.key_file);
    let key_pem = read_file("tls.key_file", &key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Invalid {
        key: "tls.key_file",
        path: key_path.clone(),
        problem: format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = if tls.client_ca_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        builder.with_client_cert_verifier(client_verifier(tls, &provider)?)
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Invalid {
            key: "tls.key_file",
            path: key_path,
            problem: format!("does not fit tls.cert_file: {e}"),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn client_verifier(
    tls: &TlsSettings,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let path = resolve_credential(&tls.client_ca_file);
    let mut roots = RootCertStore::empty();
    for cert in read_certs("tls.client_ca_file", &tls.client_ca_file)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            key: "tls.client_ca_file",
            path: path.clone(),
            problem: format!("not a usable CA certificate: {e}"),
        })?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = match tls.client_auth {
        ClientAuthMode::Required => builder,
        ClientAuthMode::Optional => builder.allow_unauthenticated(),
    };
    builder.build().map_err(|e| TlsError::Invalid {
        key: "tls.client_ca_file",
        path,
        problem: e.to_string(),
    })
}

fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

/// All certificates of a PEM file; at least one.
fn read_certs(key: &'static str, value: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = resolve_credential(value);
    let pem = read_file(key, &path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            key,
            path: path.clone(),
            problem: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            key,
            path,
            problem: "contains no PEM CERTIFICATE".into(),
        });
    }
    Ok(certs)
}

/// rustls does not check our own certificate's dates; say so early when it has expired.
fn warn_if_expired(file: &str, leaf: &CertificateDer<'_>) {
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref())
        && !cert.validity().is_valid()
    {
        tracing::warn!(
            file,
            not_before = %cert.validity().not_before,
            not_after = %cert.validity().not_after,
            "the server certificate is not valid now; clients will refuse it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

    fn write(dir: &Path, name: &str, text: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    fn settings(cert: &str, key: &str, ca: &str) -> TlsSettings {
        TlsSettings {
            cert_file: cert.into(),
            key_file: key.into(),
            client_ca_file: ca.into(),
            client_auth: ClientAuthMode::Required,
            allow_insecure_http: false,
        }
    }

    #[test]
    fn builds_config_and_reports_bad_files_precisely() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_file = write(dir.path(), "server.crt", &cert.pem());
        let key_file = write(dir.path(), "server.key", &key.serialize_pem());

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca_file = write(dir.path(), "ca.crt", &ca_cert.pem());

        let config = server_config(&settings(&cert_file, &key_file, &ca_file)).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let transport = TlsTransport::new(&settings(&cert_file, &key_file, "")).unwrap();
        transport.install(server_config(&settings(&cert_file, &key_file, &ca_file)).unwrap());

        // A key that belongs to another certificate.
        let other_key = write(
            dir.path(),
            "other.key",
            &KeyPair::generate().unwrap().serialize_pem(),
        );
        let err = server_config(&settings(&cert_file, &other_key, ""))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("tls.key_file: ") && err.contains("other.key"),
            "{err}"
        );

        let empty = write(dir.path(), "empty.pem", "");
        let err = server_config(&settings(&cert_file, &key_file, &empty))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tls.client_ca_file") && err.contains("no PEM CERTIFICATE"),
            "{err}"
        );
        let err = server_config(&settings(&empty, &key_file, ""))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("tls.cert_file: "), "{err}");
        let err = server_config(&settings(&cert_file, &empty, ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no usable private key"), "{err}");
        let missing = dir.path().join("missing.crt").display().to_string();
        let err = server_config(&settings(&missing, &key_file, ""))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("tls.cert_file: cannot read "), "{err}");
    }

    #[test]
    fn reads_common_name_and_dns_uri_sans() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = Issuer::new(ca_params, ca_key);

        let mut params = CertificateParams::new(vec!["worker-1.example.com".into()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "orchestrator");
        params.subject_alt_names.push(SanType::URI(
            "spiffe://example.com/orchestrator".try_into().unwrap(),
        ));
        params
            .subject_alt_names
            .push(SanType::IpAddress("10.0.0.1".parse().unwrap()));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let names = client_cert_names(cert.der()).unwrap();
        assert_eq!(names.common_name.as_deref(), Some("orchestrator"));
        assert_eq!(
            names.sans,
            vec![
                "worker-1.example.com".to_string(),
                "spiffe://example.com/orchestrator".to_string()
            ]
        );

        let mut bare = CertificateParams::new(Vec::<String>::new()).unwrap();
        bare.distinguished_name = rcgen::DistinguishedName::new();
        let cert = bare.signed_by(&key, &issuer).unwrap();
        let names = client_cert_names(cert.der()).unwrap();
        assert_eq!(names.common_name, None);
        assert!(names.sans.is_empty());
    }
}
