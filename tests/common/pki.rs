//! Test certificates made with rcgen, the daemon's TLS settings for them, and the clients that
//! trust them: reqwest clients with or without a client certificate, and a raw rustls connector
//! for tests that write bytes on the TLS stream themselves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};

use super::daemon::{POOL_IDLE, TestConfig};

/// A test PKI written as PEM files into `dir`: the CA (`ca.crt`), a server certificate for
/// localhost and 127.0.0.1 (`server.crt`/`server.key`), and client certificates
/// (`<file>.crt`/`<file>.key`).
pub struct Pki {
    /// Where the PEM files are.
    pub dir: PathBuf,
    /// The CA certificate (PEM), the only root the clients of this PKI trust.
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// How `Pki::issue_client` makes a client certificate: its common name, DNS names, and whether
/// it is expired or signed by another CA than the PKI's.
#[derive(Clone, Debug, Default)]
pub struct ClientCert {
    cn: String,
    sans: Vec<String>,
    expired: bool,
    other_ca: bool,
}

impl ClientCert {
    /// A valid certificate of this PKI's CA with common name `cn`.
    pub fn cn(cn: &str) -> ClientCert {
        ClientCert {
            cn: cn.to_string(),
            ..ClientCert::default()
        }
    }

    /// Adds a DNS subject alternative name.
    pub fn san(mut self, name: &str) -> ClientCert {
        self.sans.push(name.to_string());
        self
    }

    /// Valid from 2019-01-01 to 2020-01-01 only.
    pub fn expired(mut self) -> ClientCert {
        self.expired = true;
        self
    }

    /// Signed by a CA the daemon does not know.
    pub fn other_ca(mut self) -> ClientCert {
        self.other_ca = true;
        self
    }
}

/// A self-signed CA named `name`: its issuer and its certificate (PEM).
fn new_ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key).unwrap().pem();
    (Issuer::new(params, key), pem)
}

impl Pki {
    /// Creates `dir` with the CA, the server certificate and a client certificate for each name
    /// of `clients` (the name as file name and common name).
    pub fn create(dir: &Path, clients: &[&str]) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let (issuer, ca_pem) = new_ca("Test CA");
        std::fs::write(dir.join("ca.crt"), &ca_pem).unwrap();
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca_pem,
            issuer,
        };
        let (cert, key) = pki.server_pem(None);
        std::fs::write(dir.join("server.crt"), cert).unwrap();
        std::fs::write(dir.join("server.key"), key).unwrap();
        for name in clients {
            pki.issue_client(name, ClientCert::cn(name));
        }
        pki
    }

    /// A new server certificate for localhost and 127.0.0.1 (common name `provisioner.test`),
    /// with `serial` when given: (certificate PEM, key PEM), written nowhere.
    pub fn server_pem(&self, serial: Option<u64>) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "provisioner.test");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = serial.map(SerialNumber::from);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a client certificate made as `how` says to `<file>.crt` and `<file>.key`.
    pub fn issue_client(&self, file: &str, how: ClientCert) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(how.sans).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, how.cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if how.expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let cert = if how.other_ca {
            params.signed_by(&key, &new_ca("Some Other CA").0)
        } else {
            params.signed_by(&key, &self.issuer)
        }
        .unwrap();
        std::fs::write(self.path(&format!("{file}.crt")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{file}.key")), key.serialize_pem()).unwrap();
    }

    /// The path of one of the PKI's files.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The path of one of the PKI's files as a string (for settings and command lines).
    pub fn file(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }

    /// Daemon settings: TLS with the server certificate and, with `client_auth` (`required` or
    /// `optional`), client certificates from this CA.
    pub fn server_tls(&self, config: TestConfig, client_auth: Option<&str>) -> TestConfig {
        let config = config
            .set("tls.cert_file", self.file("server.crt"))
            .set("tls.key_file", self.file("server.key"));
        match client_auth {
            Some(mode) => config
                .set("tls.client_ca_file", self.file("ca.crt"))
                .set("tls.client_auth", mode),
            None => config,
        }
    }

    /// Daemon settings: TLS with required client certificates from this CA, `allowed` the
    /// clients let in.
    pub fn configure(&self, config: TestConfig, allowed: &[&str]) -> TestConfig {
        self.server_tls(config, Some("required")).set(
            "auth.allowed_clients",
            toml::Value::Array(allowed.iter().map(|a| toml::Value::from(*a)).collect()),
        )
    }

    /// A client builder trusting only this CA, presenting `identity`'s certificate when given
    /// (the test clients' time-out and idle-connection limit; callers may add settings).
    pub fn client_builder(&self, identity: Option<&str>) -> reqwest::ClientBuilder {
        let builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_idle_timeout(POOL_IDLE)
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap()]);
        match identity {
            Some(name) => {
                let mut pem = std::fs::read(self.path(&format!("{name}.crt"))).unwrap();
                pem.extend(std::fs::read(self.path(&format!("{name}.key"))).unwrap());
                builder.identity(reqwest::Identity::from_pem(&pem).unwrap())
            }
            None => builder,
        }
    }

    /// An HTTP client trusting this CA and presenting `name`'s certificate.
    pub fn client(&self, name: &str) -> reqwest::Client {
        self.client_builder(Some(name)).build().unwrap()
    }

    /// An HTTP client trusting this CA, without a client certificate.
    pub fn anonymous_client(&self) -> reqwest::Client {
        self.client_builder(None).build().unwrap()
    }

    /// A rustls connector trusting this CA, without a client certificate, offering `alpn`
    /// (`b"h2"` or `b"http/1.1"`), for tests that write raw bytes on the TLS stream.
    pub fn rustls_connector(&self, alpn: &[u8]) -> tokio_rustls::TlsConnector {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

/// The name the server certificate holds that raw TLS clients connect to.
pub fn localhost() -> rustls_pki_types::ServerName<'static> {
    rustls_pki_types::ServerName::try_from("localhost").unwrap()
}
