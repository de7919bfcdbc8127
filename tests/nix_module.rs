//! The NixOS module against the daemon, without nixpkgs: the module's pure tables and renderings
//! are evaluated with `nix-instantiate --eval` (Debian's nix-bin, installed by .ci/run), then
//! - tests/fixtures/nixos-example.toml must be exactly what the module renders for its example,
//!   and the real binary's `check-config` must accept it (with the credentials the unit passes);
//! - every settings key the module can write must exist in the daemon's configuration, and every
//!   typed option's default must be the daemon's default (no drift);
//! - docs/nixos.md must list every module option with its default, and show the example;
//! - the module function, evaluated with stand-ins for nixpkgs' lib (nix/module-smoke.nix), must
//!   compute the expected unit, assertions and volume-group script.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_libvirt-volume-provisioner");
const PREFIX: &str = "services.libvirt-volume-provisioner.";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `nix-instantiate --eval --strict --json FILE`, parsed.
fn nix_eval(file: &str) -> Value {
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", file])
        // Debian's nix-bin names a build-users group that need not exist; nothing is built.
        .env("NIX_CONFIG", "build-users-group =")
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run nix-instantiate ({e}); install Debian's nix-bin (see .ci/run)")
        });
    assert!(
        out.status.success(),
        "nix-instantiate {file} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("nix-instantiate printed JSON")
}

fn module_data() -> &'static Value {
    static DATA: OnceLock<Value> = OnceLock::new();
    DATA.get_or_init(|| nix_eval("nix/module-data.nix"))
}

fn module_smoke() -> &'static Value {
    static SMOKE: OnceLock<Value> = OnceLock::new();
    SMOKE.get_or_init(|| nix_eval("nix/module-smoke.nix"))
}

fn path_of(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("a path is a list")
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn lookup<'a>(root: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(root, |v, key| v.get(key))
}

fn toml_file_as_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    serde_json::to_value(table).unwrap()
}

/// A directory holding a file for each credential name, as systemd's LoadCredential would,
/// with content the daemon accepts: a CA and a server certificate made with rcgen for
/// certificate names, its key for key names, a token file, a secret otherwise.
fn credentials_dir(names: &[String]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    for name in names {
        let content = if name.contains("token") {
            "ci:0123456789abcdef0123456789abcdef0123\n".to_string()
        } else if name.ends_with(".key") {
            server_key.serialize_pem()
        } else if name.contains("ca") {
            ca.pem()
        } else if name.ends_with(".crt") {
            server.pem()
        } else {
            "secret-value\n".to_string()
        };
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    dir
}

fn all_credential_names() -> Vec<String> {
    module_data()["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

/// Runs `check-config` on `config` with nothing from this process's environment but
/// `CREDENTIALS_DIRECTORY` (when given).
fn check_config(config: &Path, credentials: Option<&Path>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .arg("--config")
        .arg(config)
        .arg("check-config");
    if let Some(dir) = credentials {
        cmd.env("CREDENTIALS_DIRECTORY", dir);
    }
    cmd.output().unwrap()
}

fn effective_config(config: &Path, credentials: Option<&Path>) -> Value {
    let out = check_config(config, credentials);
    assert!(
        out.status.success(),
        "check-config {} failed: {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let table: toml::Table = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    serde_json::to_value(table).unwrap()
}

/// The daemon's effective configuration for an empty file: its built-in host defaults.
fn daemon_defaults() -> Value {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    effective_config(&empty, None)
}

fn fixture() -> PathBuf {
    repo().join("tests/fixtures/nixos-example.toml")
}

#[test]
fn fixture_is_what_the_module_renders_for_its_example() {
    let rendered = &module_data()["example"];
    let fixture = toml_file_as_json(&fixture());
    assert_eq!(
        &fixture,
        rendered,
        "tests/fixtures/nixos-example.toml differs from the module's rendering of \
         nixos-module/example.nix; the rendering is:\n{}",
        toml::to_string_pretty(rendered).unwrap()
    );
}

#[test]
fn daemon_accepts_the_example_with_the_units_credentials() {
    let names: Vec<String> = module_data()["exampleLoadCredentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let entry = entry.as_str().unwrap();
            let (name, path) = entry.split_once(':').expect("LoadCredential is name:path");
            assert!(
                path.starts_with('/') && !path.starts_with("/nix/store/"),
                "{entry}"
            );
            name.to_string()
        })
        .collect();
    assert!(names.contains(&"tls.key".to_string()), "{names:?}");
    let creds = credentials_dir(&names);
    let effective = effective_config(&fixture(), Some(creds.path()));
    assert_eq!(effective["volumes"]["lvm"]["volume_group"], "vg_vms");
    assert_eq!(effective["tls"]["key_file"], "tls.key");
    assert_eq!(effective["server"]["listen"], "0.0.0.0:8443");

    // The file settings are credential names: without the credentials directory they are not found.
    let out = check_config(&fixture(), None);
    assert!(
        !out.status.success(),
        "check-config passed without credentials"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read") && names.iter().any(|n| stderr.contains(n.as_str())),
        "{stderr}"
    );
}

#[test]
fn daemon_accepts_every_key_the_module_can_write() {
    let everything = &module_data()["everything"];
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("everything.toml");
    std::fs::write(&config, toml::to_string_pretty(everything).unwrap()).unwrap();
    let creds = credentials_dir(&all_credential_names());
    let effective = effective_config(&config, Some(creds.path()));
    assert_eq!(
        effective["volumes"]["lvm"]["volume_group"], "vg_a",
        "the first volume group in attribute-name order is the default"
    );
    assert_eq!(
        effective["telemetry"]["service_name"],
        "provisioner-everything"
    );
    assert_eq!(effective["telemetry"]["otlp_ca_file"], "otlp-ca.crt");
    assert_eq!(effective["auth"]["tokens_file"], "api-tokens");
}

#[test]
fn module_settings_keys_exist_in_the_daemon_with_its_defaults() {
    let defaults = daemon_defaults();
    let data = module_data();
    for option in data["typedSettings"].as_array().unwrap() {
        let path = path_of(&option["path"]);
        let key = path.join(".");
        let daemon = lookup(&defaults, &path)
            .unwrap_or_else(|| panic!("settings.{key} is not a key of the daemon's configuration"));
        let module = &option["default"];
        if option["type"] == "duration" {
            let parse = |v: &Value| humantime::parse_duration(v.as_str().unwrap()).unwrap();
            assert_eq!(parse(module), parse(daemon), "default of settings.{key}");
        } else {
            assert_eq!(module, daemon, "default of settings.{key}");
        }
    }
    for table in ["credentials", "mapped"] {
        for entry in data[table].as_array().unwrap() {
            let path = path_of(&entry["setting"]);
            assert!(
                lookup(&defaults, &path).is_some(),
                "{table}: settings.{} is not a key of the daemon's configuration",
                path.join(".")
            );
        }
    }
}

/// The module's options and their defaults as written in docs/nixos.md (`null`, `"text"`, `[ ]`).
fn expected_options() -> Vec<(String, String)> {
    fn literal(v: &Value) -> String {
        match v {
            Value::Null => "null".into(),
            Value::String(s) => format!("\"{s}\""),
            Value::Array(items) if items.is_empty() => "[ ]".into(),
            Value::Array(items) => format!(
                "[ {} ]",
                items.iter().map(literal).collect::<Vec<_>>().join(" ")
            ),
            other => other.to_string(),
        }
    }
    let data = module_data();
    let mut options = Vec::new();
    for option in data["typedSettings"].as_array().unwrap() {
        let name = format!("settings.{}", path_of(&option["path"]).join("."));
        options.push((name, literal(&option["default"])));
    }
    for table in ["credentials", "mapped"] {
        for entry in data[table].as_array().unwrap() {
            options.push((path_of(&entry["option"]).join("."), "null".into()));
        }
    }
    // Options written by hand in the module: `    name = lib.mkOption {` at the options level,
    // with their `default = ...;` line.
    let module = std::fs::read_to_string(repo().join("nixos-module/default.nix")).unwrap();
    let declaration = regex::Regex::new(
        r"^    ([A-Za-z][A-Za-z0-9.]*) = (?:lib\.)?(mkOption|mkEnableOption|mkPackageOption)\b",
    )
    .unwrap();
    let default = regex::Regex::new(r"^      default = (.+);$").unwrap();
    let lines: Vec<&str> = module.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(caps) = declaration.captures(line) else {
            continue;
        };
        let name = caps[1].to_string();
        let value = match &caps[2] {
            "mkEnableOption" => "false".to_string(),
            "mkPackageOption" => "pkgs.libvirt-volume-provisioner".to_string(),
            _ => lines[i + 1..]
                .iter()
                .take_while(|l| !declaration.is_match(l))
                .find_map(|l| default.captures(l).map(|c| c[1].to_string()))
                .unwrap_or_else(|| panic!("no default line for {name} in the module")),
        };
        options.push((name, value));
    }
    // The volume groups' submodule option.
    options.push((
        "lvm.volumeGroups.<name>.devices".into(),
        "(required)".into(),
    ));
    options
}

#[test]
fn docs_list_every_option_with_its_default() {
    let docs = std::fs::read_to_string(repo().join("docs/nixos.md")).unwrap();
    let options = expected_options();
    for name in [
        "enable",
        "package",
        "settings",
        "lvm.volumeGroups",
        "openFirewall",
    ] {
        assert!(
            options.iter().any(|(n, _)| n == name),
            "the module parser missed {name}: {options:?}"
        );
    }
    for (name, default) in &options {
        let cell = format!("`{PREFIX}{name}`");
        let row = docs
            .lines()
            .find(|l| l.starts_with(&format!("| {cell} ")))
            .unwrap_or_else(|| panic!("docs/nixos.md has no table row for {PREFIX}{name}"));
        let default_cell = if default == "(required)" {
            default.clone()
        } else {
            format!("`{default}`")
        };
        assert!(
            row.contains(&format!("| {default_cell} |")),
            "docs/nixos.md: {PREFIX}{name} should show the default {default_cell}: {row}"
        );
    }
    // And no row for an option the module does not have.
    let known: BTreeSet<String> = options
        .iter()
        .map(|(n, _)| format!("{PREFIX}{n}"))
        .collect();
    for line in docs
        .lines()
        .filter(|l| l.starts_with(&format!("| `{PREFIX}")))
    {
        let name = line.trim_start_matches("| `").split('`').next().unwrap();
        assert!(
            known.contains(name),
            "docs/nixos.md lists {name}, which the module does not have"
        );
    }
}

#[test]
fn docs_show_the_example_configuration() {
    let docs = std::fs::read_to_string(repo().join("docs/nixos.md")).unwrap();
    let example = std::fs::read_to_string(repo().join("nixos-module/example.nix")).unwrap();
    let body = &example[example.find("{\n").unwrap()..];
    let mut rest = docs.as_str();
    for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let at = rest.find(line).unwrap_or_else(|| {
            panic!("docs/nixos.md does not show this example line (in order): {line}")
        });
        rest = &rest[at + line.len()..];
    }
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

#[test]
fn module_computes_the_hardened_unit_for_the_example() {
    let example = &module_smoke()["example"];
    let failed: Vec<&Value> = example["assertions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["assertion"] != true)
        .collect();
    assert!(
        failed.is_empty(),
        "assertions fail for the example: {failed:?}"
    );
    assert_eq!(example["warnings"], Value::Array(vec![]));
    assert_eq!(
        example["enabledGuard"], "if",
        "everything is under mkIf cfg.enable"
    );

    let daemon = &example["daemon"];
    let sc = &daemon["serviceConfig"];
    assert!(
        sc["ExecStart"]
            .as_str()
            .unwrap()
            .ends_with("/bin/libvirt-volume-provisioner --config /etc/libvirt-volume-provisioner/config.toml serve"),
        "{}",
        sc["ExecStart"]
    );
    assert!(
        sc["ExecReload"]
            .as_str()
            .unwrap()
            .ends_with("/bin/kill -HUP $MAINPID")
    );
    assert_eq!(strings(&daemon["reloadTriggers"]).len(), 1);
    assert_eq!(
        strings(&sc["LoadCredential"]),
        strings(&module_data()["exampleLoadCredentials"])
    );
    assert_eq!(
        strings(&sc["CapabilityBoundingSet"]),
        ["CAP_SYS_ADMIN", "CAP_IPC_LOCK", "CAP_SYS_NICE"]
    );
    assert_eq!(
        strings(&sc["DeviceAllow"]),
        [
            "/dev/mapper/control rw",
            "block-device-mapper rw",
            "/dev/vdb rw"
        ]
    );
    assert_eq!(sc["DevicePolicy"], "closed");
    assert_eq!(sc["ProtectSystem"], "strict");
    assert_eq!(sc["NoNewPrivileges"], true);
    for path in ["-/etc/lvm", "-/run/lvm", "-/run/lock/lvm"] {
        assert!(strings(&sc["ReadWritePaths"]).contains(&path), "{path}");
    }
    assert_eq!(
        sc["User"],
        Value::Null,
        "runs as root: LVM does not work unprivileged"
    );
    let vg_unit = "libvirt-volume-provisioner-vg-vg_vms.service";
    assert_eq!(strings(&daemon["requires"]), [vg_unit]);
    assert!(strings(&daemon["after"]).contains(&vg_unit));
    assert_eq!(example["firewallPorts"], serde_json::json!([8443]));
    assert_eq!(example["kernelModules"], serde_json::json!(["dm_mod"]));

    let vg = &example["volumeGroupUnits"]["libvirt-volume-provisioner-vg-vg_vms"];
    assert_eq!(
        strings(&vg["before"]),
        ["libvirt-volume-provisioner.service"]
    );
    assert_eq!(strings(&vg["requires"]), ["dev-vdb.device"]);
    assert_eq!(vg["serviceConfig"]["Type"], "oneshot");
    assert_eq!(vg["serviceConfig"]["PrivateNetwork"], true);
    let script = vg["script"].as_str().unwrap();
    let syntax = Command::new("bash")
        .args(["-n", "-c", script])
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "volume-group script: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    assert!(script.contains("blkid -p"), "probes for signatures");
    // Nothing that destroys data: no wiping or formatting command, no forced or auto-confirmed
    // pvcreate/vgcreate.
    for line in script.lines().map(str::trim) {
        let command = line.split_whitespace().next().unwrap_or("");
        for destructive in [
            "wipefs",
            "dd",
            "sfdisk",
            "sgdisk",
            "blkdiscard",
            "lvremove",
            "vgremove",
            "pvremove",
        ] {
            assert_ne!(command, destructive, "volume-group script runs {line:?}");
        }
        assert!(
            !command.starts_with("mkfs"),
            "volume-group script runs {line:?}"
        );
        if command == "pvcreate" || command == "vgcreate" {
            for flag in line.split_whitespace() {
                assert!(
                    !["-f", "-ff", "--force", "-y", "--yes"].contains(&flag),
                    "volume-group script runs {line:?}"
                );
            }
        }
    }
    assert!(script.contains("pvcreate ") && script.contains("vgcreate "));
}

#[test]
fn module_refuses_secrets_in_the_store() {
    let failed: Vec<String> = module_smoke()["storeSecrets"]["assertions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["assertion"] != true)
        .map(|a| a["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(failed.len(), 3, "{failed:#?}");
    for needle in [
        "tls.keyFile",
        "settings.tls.cert_file",
        "settings.s3.secret_key",
    ] {
        assert!(
            failed.iter().any(|m| m.contains(needle)),
            "{needle}: {failed:#?}"
        );
    }
}

#[test]
fn module_grants_lvm_privileges_only_for_the_lvm_backend() {
    let smoke = module_smoke();
    let directory = &smoke["directory"]["daemon"]["serviceConfig"];
    assert_eq!(directory["CapabilityBoundingSet"], "", "empty bounding set");
    assert_eq!(directory["DeviceAllow"], Value::Array(vec![]));
    assert!(strings(&directory["ReadWritePaths"]).contains(&"/srv/volumes"));
    assert_eq!(
        smoke["directory"]["units"],
        serde_json::json!(["libvirt-volume-provisioner"])
    );

    let privileged = &smoke["privilegedPort"];
    assert!(
        strings(&privileged["daemon"]["serviceConfig"]["CapabilityBoundingSet"])
            .contains(&"CAP_NET_BIND_SERVICE")
    );
    assert_eq!(privileged["firewallPorts"], serde_json::json!([443]));
    assert_eq!(
        strings(&privileged["daemon"]["requires"]),
        [
            "libvirt-volume-provisioner-vg-vg_fast.service",
            "libvirt-volume-provisioner-vg-vg_slow.service"
        ]
    );
}

#[test]
fn module_defines_the_libvirt_pool_only_when_asked() {
    let smoke = module_smoke();
    let example = &smoke["example"];
    assert_eq!(
        example["poolUnit"],
        Value::Null,
        "definePool is off by default"
    );
    let pool_unit = "libvirt-volume-provisioner-pool.service";
    assert!(!strings(&example["daemon"]["wants"]).contains(&pool_unit));

    let declared = &smoke["definePool"];
    let failed: Vec<&Value> = declared["assertions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["assertion"] != true)
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    let unit = &declared["poolUnit"];
    assert_eq!(strings(&unit["requires"]), ["libvirtd.service"]);
    assert_eq!(
        strings(&unit["after"]),
        [
            "libvirtd.service",
            "libvirt-volume-provisioner-vg-vg_a.service",
            "libvirt-volume-provisioner-vg-vg_b.service"
        ],
        "after libvirtd and the volume groups"
    );
    assert_eq!(
        strings(&unit["before"]),
        ["libvirt-volume-provisioner.service"]
    );
    let daemon = &declared["daemon"];
    assert!(strings(&daemon["wants"]).contains(&pool_unit));
    assert!(strings(&daemon["after"]).contains(&pool_unit));
    assert!(
        !strings(&daemon["requires"]).contains(&pool_unit),
        "a pool that cannot be defined does not keep the daemon from starting"
    );
    let sc = &unit["serviceConfig"];
    assert_eq!(sc["Type"], "oneshot");
    assert_eq!(sc["RemainAfterExit"], true);
    assert_eq!(sc["CapabilityBoundingSet"], "");
    assert_eq!(strings(&sc["RestrictAddressFamilies"]), ["AF_UNIX"]);

    let script = unit["script"].as_str().unwrap();
    let syntax = Command::new("bash")
        .args(["-n", "-c", script])
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "pool script: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    // Over the daemon's volume group (the first declared one), with the names quoted.
    assert!(script.contains("pool='vms pool'"), "{script}");
    assert!(script.contains("vg='vg_a'"), "{script}");
    let define = script
        .find(r#"pool-define-as "$pool" logical --source-name "$vg" --target "/dev/$vg""#)
        .expect("defines a logical pool over the volume group");
    let exists = script.find("pool-info \"$pool\"").unwrap();
    assert!(
        !script
            .lines()
            .map(str::trim)
            .any(|l| !l.starts_with('#') && l.contains("virsh") && l.contains("| grep")),
        "grep -q on a pipe from virsh fails under pipefail (SIGPIPE):\n{script}"
    );
    let leave = script[exists..].find("exit 0").map(|i| i + exists).unwrap();
    assert!(
        exists < leave && leave < define,
        "an existing pool is left before anything is defined:\n{script}"
    );
    for forbidden in ["pool-undefine", "pool-destroy", "pool-delete", "pool-build"] {
        assert!(!script.contains(forbidden), "pool script runs {forbidden}");
    }
    assert!(script.contains("pool-autostart \"$pool\"") && script.contains("pool-start \"$pool\""));

    let refused: Vec<String> = smoke["definePoolWithoutPool"]["assertions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["assertion"] != true)
        .map(|a| a["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("libvirt.definePool") && refused[0].contains("settings.libvirt.pool"),
        "{refused:?}"
    );
}
