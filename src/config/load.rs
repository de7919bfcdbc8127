//! Configuration layering with figment: built-in defaults < TOML file < environment
//! (the Go service's variable names first, then `LVP_SECTION__KEY`), followed by validation.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

use super::Settings;

/// Which built-in defaults to start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// A production hypervisor: LVM volumes, state under /var.
    Host,
    /// Runs from the current directory without root: directory volumes, state under ./var.
    Embedded,
}

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// The path was given explicitly (`--config`): a missing file is then an error.
    pub explicit: bool,
    pub profile: Profile,
}

impl ConfigSource {
    pub const DEFAULT_PATH: &'static str = "/etc/libvirt-volume-provisioner/config.toml";
}

/// Why the configuration could not be loaded (the message names the file or key).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
    #[error("cannot read configuration file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Go service environment names and the settings keys they map to.
const LEGACY_ENV: &[(&str, &str)] = &[
    ("DB_PATH", "storage.data_dir"),
    ("MINIO_ENDPOINT", "s3.endpoint"),
    ("MINIO_ACCESS_KEY_ID", "s3.access_key"),
    ("MINIO_ACCESS_KEY", "s3.access_key"),
    ("MINIO_SECRET_ACCESS_KEY", "s3.secret_key"),
    ("MINIO_SECRET_KEY", "s3.secret_key"),
    ("MINIO_REGION", "s3.region"),
    ("MINIO_BUCKET", "s3.bucket"),
    ("LVM_VOLUME_GROUP", "volumes.lvm.volume_group"),
    ("LOG_LEVEL", "log.level"),
    ("LOG_FORMAT", "log.format"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "telemetry.otlp_endpoint"),
    ("OTEL_SERVICE_NAME", "telemetry.service_name"),
];

/// Loads and validates the settings from defaults, the file and the process environment.
pub fn load(source: &ConfigSource) -> Result<Settings, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Settings::for_profile(source.profile)));
    match std::fs::metadata(&source.path) {
        Ok(_) => {
            // Open it ourselves so permission problems get a precise message.
            std::fs::File::open(&source.path).map_err(|e| ConfigError::Unreadable {
                path: source.path.clone(),
                source: e,
            })?;
            figment = figment.merge(Toml::file_exact(&source.path));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if source.explicit {
                return Err(ConfigError::Missing(source.path.clone()));
            }
        }
        Err(e) => {
            return Err(ConfigError::Unreadable {
                path: source.path.clone(),
                source: e,
            });
        }
    }
    figment = merge_legacy_env(figment)?;
    figment = figment.merge(Env::prefixed("LVP_").split("__"));
    let settings: Settings = figment
        .extract()
        .map_err(|e| ConfigError::Invalid(describe_in(&figment, e)))?;
    settings
        .validate()
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    check_secret_files(&settings)?;
    Ok(settings)
}

/// The Go service's variables. Each is a plain string: `MINIO_SECRET_KEY=12345` stays a string.
fn merge_legacy_env(mut figment: Figment) -> Result<Figment, ConfigError> {
    for (var, key) in LEGACY_ENV {
        if let Some(value) = non_empty_env(var) {
            let value = if *key == "log.format" {
                value.to_ascii_lowercase()
            } else {
                value
            };
            figment = figment.merge(Serialized::default(key, value));
        }
    }
    let host = non_empty_env("HOST");
    let port = non_empty_env("PORT");
    if host.is_some() || port.is_some() {
        let listen: String = figment
            .extract_inner("server.listen")
            .map_err(|e| ConfigError::Invalid(describe(e)))?;
        let (cur_host, cur_port) = split_host_port(&listen);
        let host = host.unwrap_or(cur_host);
        let port = port.unwrap_or(cur_port);
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        };
        figment = figment.merge(Serialized::default(
            "server.listen",
            format!("{host}:{port}"),
        ));
    }
    Ok(figment)
}

fn non_empty_env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

fn split_host_port(listen: &str) -> (String, String) {
    match listen.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.to_string()),
        None => (listen.to_string(), "8080".to_string()),
    }
}

/// figment's error, one line per problem, naming key and source.
fn describe(err: figment::Error) -> String {
    err.into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// As `describe`, and an error inside an `[[images]]` entry also names the image (its position
/// alone does not tell an operator which declaration is wrong).
fn describe_in(figment: &Figment, err: figment::Error) -> String {
    err.into_iter()
        .map(|e| {
            let name = match e.path.as_slice() {
                [images, index, ..] if images == "images" => {
                    let entry = index.parse::<usize>().ok().and_then(|i| {
                        figment
                            .find_value("images")
                            .ok()?
                            .into_array()?
                            .into_iter()
                            .nth(i)
                    });
                    entry
                        .and_then(|v| v.into_dict())
                        .and_then(|mut d| d.remove("name"))
                        .and_then(|v| v.into_string())
                }
                _ => None,
            };
            match name {
                Some(name) => format!("images.{name}: {e}"),
                None => e.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Secret and certificate files must be readable now, not at the first request.
fn check_secret_files(settings: &Settings) -> Result<(), ConfigError> {
    let files = [
        ("s3.secret_key_file", &settings.s3.secret_key_file),
        ("s3.ca_file", &settings.s3.ca_file),
        ("tls.cert_file", &settings.tls.cert_file),
        ("tls.key_file", &settings.tls.key_file),
        ("tls.client_ca_file", &settings.tls.client_ca_file),
        ("auth.tokens_file", &settings.auth.tokens_file),
        ("telemetry.otlp_ca_file", &settings.telemetry.otlp_ca_file),
    ];
    for (key, value) in files {
        if value.is_empty() {
            continue;
        }
        let path = resolve_credential(value);
        if let Err(e) = std::fs::File::open(&path) {
            return Err(ConfigError::Invalid(format!(
                "{key}: cannot read {}: {e}",
                path.display()
            )));
        }
    }
    Ok(())
}

/// A secret file setting: an absolute path, or a name looked up in systemd's
/// `$CREDENTIALS_DIRECTORY` (`LoadCredential=`) when that is set, else relative to the cwd.
pub(crate) fn resolve_credential(value: &str) -> PathBuf {
    let path = Path::new(value);
    if path.is_absolute() {
        return path.to_path_buf();
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let candidate = Path::new(&dir).join(path);
        if candidate.exists() {
            return candidate;
        }
    }
    path.to_path_buf()
}

/// The effective settings as TOML, with secrets replaced by `<redacted>` (keys, and
/// credentials written into endpoint URLs).
pub fn redacted_toml(settings: &Settings) -> String {
    let mut s = settings.clone();
    for secret in [&mut s.s3.secret_key, &mut s.s3.access_key] {
        if !secret.is_empty() {
            *secret = "<redacted>".into();
        }
    }
    for url in [&mut s.s3.endpoint, &mut s.telemetry.otlp_endpoint] {
        *url = redact_url(url);
    }
    toml::to_string_pretty(&s).unwrap_or_else(|e| format!("# cannot render settings: {e}\n"))
}

/// The URL with its userinfo (`user:password@`) replaced by `<redacted>`, for logs and
/// displays; anything without userinfo is returned as is.
pub(crate) fn redact_url(url: &str) -> String {
    match userinfo_span(url) {
        Some((start, end)) => format!("{}<redacted>{}", &url[..start], &url[end..]),
        None => url.to_string(),
    }
}

/// The URL without its userinfo (for clients that authenticate otherwise, e.g. S3 with SigV4,
/// so no request URL and no error message ever carries it).
pub(crate) fn without_userinfo(url: &str) -> String {
    match userinfo_span(url) {
        // Drop the `@` too.
        Some((start, end)) => format!("{}{}", &url[..start], &url[end + 1..]),
        None => url.to_string(),
    }
}

/// Byte range of the userinfo of `scheme://userinfo@host...` (without the `@`).
fn userinfo_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let at = url[start..authority_end].rfind('@')? + start;
    Some((start, at))
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature
mod tests {
    use super::*;
    use crate::config::{LogFormat, VolumeBackendKind};
    use figment::Jail;
    use std::time::Duration;

    fn source(path: &str, explicit: bool) -> ConfigSource {
        ConfigSource {
            path: path.into(),
            explicit,
            profile: Profile::Host,
        }
    }

    #[test]
    fn defaults_match_the_contract() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let s = load(&source("absent.toml", false)).unwrap();
            assert_eq!(s.server.listen, "127.0.0.1:8080");
            assert_eq!(s.jobs.max_concurrent, 2);
            assert_eq!(s.jobs.queue_capacity, 64);
            assert_eq!(s.jobs.timeout, Duration::from_secs(180 * 60));
            assert_eq!(s.jobs.retention, Duration::from_secs(7 * 86400));
            assert_eq!(s.cache.max_size_bytes, 21474836480);
            assert_eq!(s.volumes.backend, VolumeBackendKind::Lvm);
            assert_eq!(s.log.format, LogFormat::Json);
            Ok(())
        });
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let err = load(&source("nope.toml", true)).unwrap_err();
            assert!(
                err.to_string().contains("nope.toml does not exist"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "c.toml",
                r#"
                [jobs]
                max_concurrent = 4
                timeout = "30m"
                [volumes]
                backend = "directory"
                [volumes.directory]
                path = "/srv/vols"
                "#,
            )?;
            let s = load(&source("c.toml", true)).unwrap();
            assert_eq!(s.jobs.max_concurrent, 4);
            assert_eq!(s.jobs.timeout, Duration::from_secs(1800));
            assert_eq!(s.volumes.backend, VolumeBackendKind::Directory);
            assert_eq!(s.jobs.queue_capacity, 64, "untouched keys keep defaults");

            jail.set_env("LVP_JOBS__MAX_CONCURRENT", "3");
            jail.set_env("LVP_SOURCES__FILE_ROOTS", r#"["/srv/images"]"#);
            let s = load(&source("c.toml", true)).unwrap();
            assert_eq!(s.jobs.max_concurrent, 3);
            assert_eq!(s.sources.file_roots, vec![PathBuf::from("/srv/images")]);
            Ok(())
        });
    }

    #[test]
    fn legacy_env_names_apply_and_lvp_names_win() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            // A non-loopback plain-HTTP listener needs an explicit opt-in and authentication.
            jail.create_file("tokens", "")?;
            jail.set_env("LVP_TLS__ALLOW_INSECURE_HTTP", "true");
            jail.set_env("LVP_AUTH__TOKENS_FILE", "tokens");
            jail.set_env("HOST", "0.0.0.0");
            jail.set_env("PORT", "9090");
            jail.set_env("MINIO_ENDPOINT", "https://minio.example.com");
            jail.set_env("MINIO_ACCESS_KEY_ID", "AKID");
            jail.set_env("MINIO_SECRET_KEY", "12345");
            jail.set_env("LVM_VOLUME_GROUP", "vg_fast");
            jail.set_env("LOG_FORMAT", "TEXT");
            jail.set_env("OTEL_SERVICE_NAME", "prov-a");
            let s = load(&source("absent.toml", false)).unwrap();
            assert_eq!(s.server.listen, "0.0.0.0:9090");
            assert_eq!(s.s3.endpoint, "https://minio.example.com");
            assert_eq!(s.s3.access_key, "AKID");
            assert_eq!(s.s3.secret_key, "12345", "numeric secrets stay strings");
            assert_eq!(s.volumes.lvm.volume_group, "vg_fast");
            assert_eq!(s.log.format, LogFormat::Text);
            assert_eq!(s.telemetry.service_name, "prov-a");

            jail.set_env("LVP_VOLUMES__LVM__VOLUME_GROUP", "vg_new");
            let s = load(&source("absent.toml", false)).unwrap();
            assert_eq!(s.volumes.lvm.volume_group, "vg_new");
            Ok(())
        });
    }

    #[test]
    fn port_alone_keeps_configured_host() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("tokens", "")?;
            jail.create_file(
                "c.toml",
                "[server]\nlisten = \"10.1.2.3:8080\"\n[tls]\nallow_insecure_http = true\n\
                 [auth]\ntokens_file = \"tokens\"\n",
            )?;
            jail.set_env("PORT", "8443");
            let s = load(&source("c.toml", true)).unwrap();
            assert_eq!(s.server.listen, "10.1.2.3:8443");
            Ok(())
        });
    }

    #[test]
    fn non_loopback_listener_needs_tls_and_authentication() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            for f in ["tokens", "server.crt", "server.key", "ca.crt"] {
                jail.create_file(f, "")?;
            }
            let check = |toml: &str| {
                std::fs::write("c.toml", toml).unwrap();
                load(&source("c.toml", true)).map_err(|e| e.to_string())
            };
            let public = "[server]\nlisten = \"0.0.0.0:8443\"\n";
            let tls = "[tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n";

            let err = check(public).unwrap_err();
            assert!(
                err.contains("tls.cert_file: the API would be plain HTTP on 0.0.0.0:8443"),
                "{err}"
            );
            let err = check(&format!("{public}{tls}")).unwrap_err();
            assert!(
                err.contains("auth: no client authentication is configured"),
                "{err}"
            );
            let err = check(&format!("{public}[tls]\nallow_insecure_http = true\n")).unwrap_err();
            assert!(err.contains("auth: no client authentication"), "{err}");
            check(&format!("{public}{tls}client_ca_file = \"ca.crt\"\n")).unwrap();
            check(&format!("{public}{tls}[auth]\ntokens_file = \"tokens\"\n")).unwrap();
            check(&format!(
                "{public}[tls]\nallow_insecure_http = true\n[auth]\ntokens_file = \"tokens\"\n"
            ))
            .unwrap();
            // Loopback: plain HTTP and no authentication are the development default.
            check("[server]\nlisten = \"127.0.0.1:8080\"\n").unwrap();
            check("[server]\nlisten = \"[::1]:8080\"\n").unwrap();

            let err = check("[auth]\nallowed_clients = [\"orchestrator\"]\n").unwrap_err();
            assert!(
                err.contains("auth.allowed_clients: lists certificate names"),
                "{err}"
            );
            let err = check(&format!(
                "{tls}client_ca_file = \"ca.crt\"\n[auth]\nallowed_clients = [\"a b\"]\n"
            ))
            .unwrap_err();
            assert!(err.contains("`a b` is not a certificate name"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("c.toml", "[jobs]\nmax_concurent = 3\n")?;
            let err = load(&source("c.toml", true)).unwrap_err().to_string();
            assert!(err.contains("max_concurent"), "{err}");
            jail.create_file("d.toml", "[jobz]\nmax_concurrent = 3\n")?;
            let err = load(&source("d.toml", true)).unwrap_err().to_string();
            assert!(err.contains("jobz"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn invalid_values_are_errors() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            for (toml, needle) in [
                ("[jobs]\nmax_concurrent = 0\n", "jobs.max_concurrent"),
                ("[server]\nlisten = \"localhost\"\n", "server.listen"),
                ("[jobs]\ntimeout = \"soon\"\n", "timeout"),
                (
                    "[volumes.lvm]\nvolume_group = \"-bad\"\n",
                    "volumes.lvm.volume_group",
                ),
                ("[log]\nformat = \"xml\"\n", "format"),
                ("[telemetry]\nsampling_ratio = 1.5\n", "sampling_ratio"),
                ("[tls]\ncert_file = \"/x.pem\"\n", "tls.cert_file"),
                ("[s3]\nendpoint = \"http://m:9000\"\n", "allow_http"),
                ("[libvirt]\npool = \"--all\"\n", "libvirt.pool"),
                ("[libvirt]\npool = \"a/b\"\n", "libvirt.pool"),
                ("[libvirt]\npool = \"vg0\"\nuri = \"\"\n", "libvirt.uri"),
                (
                    "[volumes.lvm]\ndevices = [\"/dev/vdb,/dev/vdc\"]\n",
                    "volumes.lvm.devices",
                ),
                (
                    "[volumes.lvm]\ndevices = [\"vdb\"]\n",
                    "volumes.lvm.devices",
                ),
                (
                    "[volumes.lvm]\nthin_pool = \"pool/x\"\n",
                    "volumes.lvm.thin_pool",
                ),
                (
                    "[volumes.lvm]\nthin_pool_max_percent = 0\n",
                    "volumes.lvm.thin_pool_max_percent",
                ),
                (
                    "[volumes.lvm]\nthin_pool_max_percent = 101\n",
                    "volumes.lvm.thin_pool_max_percent",
                ),
                (
                    "[volumes.lvm]\ngolden_max_bytes = 0\n",
                    "volumes.lvm.golden_images = false",
                ),
            ] {
                jail.create_file("c.toml", toml)?;
                let err = load(&source("c.toml", true)).unwrap_err().to_string();
                assert!(err.contains(needle), "{toml}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn lvm_devices_from_file_and_environment() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("c.toml", "")?;
            let s = load(&source("c.toml", true)).unwrap();
            assert!(s.volumes.lvm.devices.is_empty(), "default: no narrowing");
            jail.create_file(
                "c.toml",
                "[volumes.lvm]\ndevices = [\"/dev/disk/by-id/nvme-a\", \"/dev/vdb\"]\n",
            )?;
            let s = load(&source("c.toml", true)).unwrap();
            assert_eq!(
                s.volumes.lvm.devices,
                ["/dev/disk/by-id/nvme-a", "/dev/vdb"]
            );
            jail.set_env("LVP_VOLUMES__LVM__DEVICES", "[\"/dev/vdc\"]");
            let s = load(&source("c.toml", true)).unwrap();
            assert_eq!(s.volumes.lvm.devices, ["/dev/vdc"]);
            Ok(())
        });
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact_url("https://user:pa%40ss@minio.example.com:9000/x"),
            "https://<redacted>@minio.example.com:9000/x"
        );
        assert_eq!(
            without_userinfo("https://user:pass@minio.example.com:9000"),
            "https://minio.example.com:9000"
        );
        assert_eq!(
            redact_url("https://minio.example.com/a@b"),
            "https://minio.example.com/a@b"
        );
        assert_eq!(redact_url(""), "");
        let mut s = Settings::default();
        s.s3.endpoint = "https://ak:sk-secret@minio.example.com".into();
        s.telemetry.otlp_endpoint = "https://otel:tok-secret@collector:4317".into();
        let out = redacted_toml(&s);
        assert!(
            !out.contains("sk-secret") && !out.contains("tok-secret"),
            "{out}"
        );
        assert!(out.contains("https://<redacted>@collector:4317"), "{out}");
    }

    #[test]
    fn redaction_hides_secrets() {
        let mut s = Settings::default();
        s.s3.secret_key = "supersecret".into();
        s.s3.access_key = "AKIDVALUE".into();
        let out = redacted_toml(&s);
        assert!(!out.contains("supersecret") && !out.contains("AKIDVALUE"));
        assert!(out.contains("<redacted>"));
        let back: Settings = toml::from_str(&out).unwrap();
        assert_eq!(back.jobs, s.jobs, "rendered TOML round-trips");
    }
}
