//! Test certificates made with rcgen, and the TLS clients that trust them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::daemon::{POOL_IDLE, TestConfig};

/// A test PKI written as PEM files into `dir`: `ca.crt`, a server certificate for localhost
/// and 127.0.0.1 (`server.crt`/`server.key`), and one client certificate per name
/// (`<name>.crt`/`<name>.key`, the name as CN).
pub struct TestPki {
    pub dir: PathBuf,
    pub ca_pem: String,
}

impl TestPki {
    pub fn create(dir: &Path, clients: &[&str]) -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        std::fs::write(dir.join("ca.crt"), &ca_pem).unwrap();
        let issue = |file: &str, cn: &str, sans: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.join(format!("{file}.crt")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        };
        issue(
            "server",
            "provisioner.test",
            vec!["localhost".into(), "127.0.0.1".into()],
        );
        for name in clients {
            issue(name, name, vec![]);
        }
        TestPki {
            dir: dir.to_path_buf(),
            ca_pem,
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Daemon settings: TLS with required client certificates from this CA.
    pub fn configure(&self, config: TestConfig, allowed: &[&str]) -> TestConfig {
        let p = |f: &str| self.path(f).display().to_string();
        config
            .set("tls.cert_file", p("server.crt"))
            .set("tls.key_file", p("server.key"))
            .set("tls.client_ca_file", p("ca.crt"))
            .set("tls.client_auth", "required")
            .set(
                "auth.allowed_clients",
                toml::Value::Array(allowed.iter().map(|a| toml::Value::from(*a)).collect()),
            )
    }

    /// An HTTP client trusting this CA and presenting `name`'s certificate.
    pub fn client(&self, name: &str) -> reqwest::Client {
        let mut pem = std::fs::read(self.path(&format!("{name}.crt"))).unwrap();
        pem.extend(std::fs::read(self.path(&format!("{name}.key"))).unwrap());
        reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_idle_timeout(POOL_IDLE)
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap()])
            .identity(reqwest::Identity::from_pem(&pem).unwrap())
            .build()
            .unwrap()
    }
}
