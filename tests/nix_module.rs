//! The NixOS module against the daemon, without nixpkgs: the module's pure tables and renderings
//! are evaluated with `nix-instantiate --eval` (Debian's nix-bin, installed by .ci/run), then
//! - tests/fixtures/nixos-example.toml must be exactly what the module renders for its example,
//!   and the real binary's `check-config` must accept it (with the credentials the unit passes);
//! - every settings key the module can write must exist in the daemon's configuration, and every
//!   typed option's default must be the daemon's default (no drift);
//! - docs/nixos.md must list every module option with its default, and show the example;
//! - the module function, evaluated with stand-ins for nixpkgs' lib (nix/module-smoke.nix), must
//!   compute the expected unit, assertions and volume-group script;
//! - as root: the volume-group script, as the module renders it, run against loop devices, and
//!   the directory backend's open check under the module's capabilities and ProtectProc.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

mod common;

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
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = common::Pki::create(pki_dir.path(), &[]);
    let pem = |file: &str| std::fs::read_to_string(pki.path(file)).unwrap();
    for name in names {
        let content = if name.contains("token") {
            "ci:0123456789abcdef0123456789abcdef0123\n".to_string()
        } else if name.ends_with(".key") {
            pem("server.key")
        } else if name.contains("ca") {
            pki.ca_pem.clone()
        } else if name.ends_with(".crt") {
            pem("server.crt")
        } else {
            "secret-value\n".to_string()
        };
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    dir
}

/// The messages of the module's assertions that fail in an evaluated configuration (its
/// `assertions` list).
fn failed_assertions(config: &Value) -> Vec<String> {
    config["assertions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["assertion"] != true)
        .map(|a| {
            a["message"]
                .as_str()
                .map_or_else(|| a.to_string(), str::to_string)
        })
        .collect()
}

/// Asserts that bash parses `script` (`what` names it in the failure).
fn assert_bash_syntax(script: &str, what: &str) {
    let (ok, out) = common::output_of(Command::new("bash").args(["-n", "-c", script]));
    assert!(ok, "{what}: {out}");
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
    // `images.<name>` rendered into `[[images]]`, in attribute-name order, with the defaults.
    let images = effective["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{images:?}");
    assert_eq!(images[0]["name"], "debian-12");
    assert_eq!(images[0]["image_type"], "raw");
    assert_eq!(
        images[0]["checksum_url"],
        "https://images.example.com/SHA256SUMS"
    );
    assert_eq!(images[1]["name"], "ubuntu-24.04");
    assert_eq!(images[1]["golden"], true);
    assert_eq!(images[1]["image_type"], "qcow2");
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
    // The volume groups' submodule options.
    options.push((
        "lvm.volumeGroups.<name>.devices".into(),
        "(required)".into(),
    ));
    options.push(("lvm.volumeGroups.<name>.thinPools".into(), "{ }".into()));
    options.push((
        "lvm.volumeGroups.<name>.thinPools.<name>.size".into(),
        "(required)".into(),
    ));
    options.push((
        "lvm.volumeGroups.<name>.thinPools.<name>.chunkSize".into(),
        "null".into(),
    ));
    // The declared images' submodule options.
    options.push(("images.<name>.url".into(), "(required)".into()));
    for (field, default) in [
        ("checksum", "\"\""),
        ("checksumUrl", "\"\""),
        ("imageType", "\"qcow2\""),
        ("golden", "false"),
        ("refresh", "\"6h\""),
    ] {
        options.push((format!("images.<name>.{field}"), default.into()));
    }
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
    let failed = failed_assertions(example);
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

    // The daemon's LVM commands are narrowed to the group's devices.
    assert_eq!(
        example["settings"]["volumes"]["lvm"]["devices"],
        serde_json::json!(["/dev/vdb"])
    );
    assert_eq!(
        example["moduleSettings"]["volumes"]["lvm"]["devices"],
        serde_json::json!(["/dev/vdb"])
    );
    assert_eq!(example["typeErrors"], Value::Array(vec![]));

    let vg = &example["volumeGroupUnits"]["libvirt-volume-provisioner-vg-vg_vms"];
    assert_eq!(
        strings(&vg["before"]),
        ["libvirt-volume-provisioner.service"]
    );
    assert_eq!(strings(&vg["requires"]), ["dev-vdb.device"]);
    assert_eq!(vg["serviceConfig"]["Type"], "oneshot");
    assert_eq!(vg["serviceConfig"]["PrivateNetwork"], true);
    // Read access to every block device (the check for a group of the same name must see all
    // disks), write access to the declared ones only.
    assert_eq!(
        strings(&vg["serviceConfig"]["DeviceAllow"]),
        [
            "/dev/mapper/control rw",
            "block-device-mapper rw",
            "/dev/vdb rw",
            "block-* r"
        ]
    );
    let script = vg["script"].as_str().unwrap();
    assert_bash_syntax(script, "volume-group script");
    assert!(
        script.starts_with("set -euo pipefail\nvg='vg_vms'\ndevices=('/dev/vdb')\n"),
        "{script}"
    );
    assert_script_never_destroys(script);
}

/// Static check of the volume-group script (comments skipped): no command that writes to a
/// device except one non-forced `vgcreate`; `wipefs` only as a listing (`--no-act`, no `--all`
/// or `--offset`); `dd` only reading. tests `volume_group_script_on_loop_devices` checks the
/// commands it really runs.
fn assert_script_never_destroys(script: &str) {
    // Quoted text is message text, unless it holds a command substitution.
    let unquoted = |line: &str| -> String {
        let mut out = String::new();
        let mut rest = line;
        while let Some(i) = rest.find(['"', '\'']) {
            out.push_str(&rest[..i]);
            let quote = rest.as_bytes()[i] as char;
            let body = &rest[i + 1..];
            let end = body.find(quote).unwrap_or(body.len());
            if body[..end].contains("$(") {
                out.push_str(&body[..end]);
            }
            rest = body.get(end + 1..).unwrap_or("");
        }
        out.push_str(rest);
        out
    };
    let words = |line: &str| -> Vec<String> {
        unquoted(line)
            .split(|c: char| c.is_whitespace() || "$();|&".contains(c))
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mut vgcreate = 0;
    let mut lvcreate = 0;
    for line in script
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
    {
        let w = words(line);
        for (i, word) in w.iter().enumerate() {
            let args = &w[i + 1..];
            match word.as_str() {
                "pvcreate" | "pvremove" | "vgremove" | "lvremove" | "vgextend" | "lvconvert"
                | "lvresize" | "lvextend" | "sfdisk" | "sgdisk" | "blkdiscard" | "pvmove" => {
                    panic!("volume-group script runs {line:?}")
                }
                // Thin pools only (the arguments are built in `args=(--type thin-pool ...)`),
                // never forced, and with stdin closed so that no prompt to wipe is answered.
                "lvcreate" => {
                    lvcreate += 1;
                    assert!(
                        line.contains("\"${args[@]}\"")
                            && line.contains("</dev/null")
                            && !args.iter().any(|a| {
                                [
                                    "-f",
                                    "-ff",
                                    "--force",
                                    "-y",
                                    "--yes",
                                    "-W",
                                    "--wipesignatures",
                                ]
                                .contains(&a.as_str())
                            }),
                        "lvcreate that is not the thin pool's: {line:?}"
                    );
                }
                w if w.starts_with("mkfs") => panic!("volume-group script runs {line:?}"),
                "wipefs" => assert!(
                    args.first().is_some_and(|a| a == "--no-act")
                        && !args.iter().any(|a| {
                            ["-a", "--all", "-o", "--offset", "-f", "--force", "-b"]
                                .contains(&a.as_str())
                        }),
                    "wipefs that is not a listing: {line:?}"
                ),
                "dd" => assert!(
                    !args.iter().any(|a| a.starts_with("of=")),
                    "dd that writes: {line:?}"
                ),
                "vgcreate" => {
                    vgcreate += 1;
                    assert!(
                        !args.iter().any(|a| {
                            ["-f", "-ff", "--force", "-y", "--yes"].contains(&a.as_str())
                        }),
                        "forced vgcreate: {line:?}"
                    );
                }
                _ => {}
            }
        }
    }
    assert_eq!(
        vgcreate, 1,
        "one vgcreate creates the group and its physical volumes"
    );
    assert_eq!(lvcreate, 1, "one lvcreate, for thin pools");
    assert!(
        script.contains("args=(--type thin-pool --size \"$size\" --name \"$pool\")"),
        "lvcreate makes anything but thin pools"
    );
}

#[test]
fn module_creates_declared_thin_pools_and_defaults_to_the_first() {
    let thin = &module_smoke()["thinPools"];
    assert_eq!(thin["typeErrors"], Value::Array(vec![]));
    assert_eq!(thin["settings"]["volumes"]["lvm"]["volume_group"], "vg_a");
    assert_eq!(thin["settings"]["volumes"]["lvm"]["thin_pool"], "apool");
    assert_eq!(
        thin["moduleSettings"]["volumes"]["lvm"]["thin_pool"],
        "apool"
    );
    let unit = &thin["volumeGroupUnits"]["libvirt-volume-provisioner-vg-vg_a"];
    let script = unit["script"].as_str().unwrap();
    assert!(
        script.contains("\nthin_pools=('apool|100G|128K' 'zpool|10G|')\n"),
        "{script}"
    );
    assert!(
        script.contains("\nthin_pools=()\n")
            || thin["volumeGroupUnits"]["libvirt-volume-provisioner-vg-vg_b"]["script"]
                .as_str()
                .unwrap()
                .contains("\nthin_pools=()\n"),
        "a group without pools gets an empty list"
    );
    assert_script_never_destroys(script);
    assert!(
        strings(&thin["daemon"]["path"])
            .iter()
            .any(|p| p.ends_with("-thin-provisioning-tools")),
        "daemon PATH: {}",
        thin["daemon"]["path"]
    );
    // Without pools the default stays empty (linear LVs).
    assert_eq!(
        module_smoke()["example"]["settings"]["volumes"]["lvm"]["thin_pool"],
        ""
    );
}

#[test]
fn module_refuses_secrets_in_the_store() {
    let failed = failed_assertions(&module_smoke()["storeSecrets"]);
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
    // Only what the "volume is open" check needs (see
    // `directory_backend_sees_volumes_other_users_hold_open`).
    assert_eq!(
        strings(&directory["CapabilityBoundingSet"]),
        ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"]
    );
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
    // The group in use is the first one; the daemon's LVM commands see only its devices.
    let lvm = &privileged["settings"]["volumes"]["lvm"];
    assert_eq!(lvm["volume_group"], "vg_fast");
    assert_eq!(
        lvm["devices"],
        serde_json::json!(["/dev/disk/by-id/nvme-a", "/dev/disk/by-id/nvme-b"])
    );
    // What the module itself defines is what is rendered (the rest are typed defaults: the thin
    // pool settings).
    let defined = privileged["moduleSettings"]["volumes"]["lvm"]
        .as_object()
        .expect("the module defines volumes.lvm");
    assert_eq!(
        defined.keys().map(String::as_str).collect::<Vec<_>>(),
        ["devices", "thin_pool", "volume_group"]
    );
    for (key, value) in defined {
        assert_eq!(&lvm[key], value, "volumes.lvm.{key}");
    }
}

#[test]
fn module_has_no_meta_doc_and_the_flake_builds_the_manual() {
    // meta.doc hands docs/nixos.md to the NixOS manual build, whose nixos-render-docs refuses it.
    assert_eq!(module_smoke()["example"]["hasMetaDoc"], false);
    // The flake check that would catch this class of breakage: a full nixosSystem with the
    // module and the documentation on, its manual built (it runs with `nix flake check`, which
    // needs nixpkgs and cannot run here).
    let flake = std::fs::read_to_string(repo().join("flake.nix")).unwrap();
    for needle in [
        "nixos-manual =",
        "lib.nixosSystem",
        "documentation.nixos.enable = true;",
        "config.system.build.manual.manualHTML",
        "config.system.build.toplevel.drvPath",
    ] {
        assert!(flake.contains(needle), "flake.nix lacks {needle:?}");
    }
}

#[test]
fn module_names_an_invalid_volume_group_instead_of_defaulting_to_it() {
    let smoke = &module_smoke()["invalidFirst"];
    let failed = failed_assertions(smoke);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].contains("lvm.volumeGroups.-bad:"), "{failed:?}");
    // "-bad" sorts first, but the default is the first valid name, so no typed setting fails
    // its type (which nixpkgs would report before any assertion).
    assert_eq!(
        smoke["moduleSettings"]["volumes"]["lvm"]["volume_group"],
        "good"
    );
    assert_eq!(smoke["settings"]["volumes"]["lvm"]["volume_group"], "good");
    assert_eq!(smoke["typeErrors"], Value::Array(vec![]));
}

#[test]
fn host_additions_to_device_allow_and_read_write_paths_are_merged() {
    let example = &module_smoke()["example"]["daemon"]["serviceConfig"];
    let added = &module_smoke()["hostAdditions"]["daemon"]["serviceConfig"];
    let mut want = strings(&example["DeviceAllow"]);
    want.push("/dev/md0 rw");
    assert_eq!(strings(&added["DeviceAllow"]), want);
    let mut want = strings(&example["ReadWritePaths"]);
    want.push("/srv/extra");
    assert_eq!(strings(&added["ReadWritePaths"]), want);
    // Scalars stay mkDefault: the host's value replaces the module's.
    assert_eq!(example["ProtectProc"], "invisible");
    assert_eq!(added["ProtectProc"], "default");
}

/// Why root-only checks cannot run here, or None. Without root they are skipped loudly, except
/// on CI (`CI=true`), where that is a failure.
fn root_checks_unavailable(tools: &[&str]) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let reason = if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
        Some("not running as root".to_string())
    } else {
        tools
            .iter()
            .find(|t| find_tool(t).is_none())
            .map(|t| format!("{t} is not installed"))
    };
    if let Some(reason) = &reason {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "on CI this check must run, but {reason}"
        );
        eprintln!("\n!!!!!!!! SKIPPED: {reason}; this root-only check did NOT run. !!!!!!!!\n");
    }
    reason
}

/// The path of a program on PATH or in the sbin directories.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Loop devices, an LVM configuration of their own, and logging wrappers for every tool the
/// volume-group script may run. Everything is removed on drop.
struct LoopLab {
    dir: tempfile::TempDir,
    loops: Vec<String>,
    links: PathBuf,
    tag: String,
}

/// Tools the volume-group script uses, and tools it must never run; all are wrapped so that
/// every invocation is logged.
const WRAPPED: &[&str] = &[
    "pvs",
    "vgs",
    "lvs",
    "vgcreate",
    "blkid",
    "wipefs",
    "lsblk",
    "blockdev",
    "dd",
    "stat",
    "pvcreate",
    "pvremove",
    "vgremove",
    "lvremove",
    "lvcreate",
    "vgextend",
    "sfdisk",
    "sgdisk",
    "blkdiscard",
    "mkfs",
    "mkfs.ext4",
    "pvmove",
];

impl LoopLab {
    fn new(test: &str) -> LoopLab {
        let dir = tempfile::tempdir().unwrap();
        let lvm = dir.path().join("lvm");
        std::fs::create_dir_all(&lvm).unwrap();
        // As in the LVM test VM (tests/vm/vm-run.sh): no udev here, backups kept in the lab.
        std::fs::write(
            lvm.join("lvm.conf"),
            format!(
                "devices {{ obtain_device_list_from_udev = 0 hints = \"none\" }}\n\
                 activation {{ udev_sync = 0 udev_rules = 0 monitoring = 0 }}\n\
                 global {{ use_lvmpolld = 0 }}\n\
                 backup {{ backup_dir = \"{0}/backup\" archive_dir = \"{0}/archive\" }}\n",
                lvm.display()
            ),
        )
        .unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let log = dir.path().join("commands.log");
        for tool in WRAPPED {
            if let Some(real) = find_tool(tool) {
                let wrapper = bin.join(tool);
                std::fs::write(
                    &wrapper,
                    format!(
                        "#!/bin/sh\nprintf '%s' {tool} >> '{log}'\nfor a in \"$@\"; do printf ' %s' \"$a\" >> '{log}'; done\necho >> '{log}'\nexec '{real}' \"$@\"\n",
                        log = log.display(),
                        real = real.display()
                    ),
                )
                .unwrap();
                Command::new("chmod")
                    .arg("755")
                    .arg(&wrapper)
                    .status()
                    .unwrap();
            }
        }
        // Device names under /dev, as /dev/disk/by-id symlinks would be (LVM finds devices by
        // their names under /dev).
        let tag = format!("lvp-nixtest-{}-{test}", std::process::id());
        let links = Path::new("/dev").join(&tag);
        std::fs::create_dir_all(&links).unwrap();
        LoopLab {
            dir,
            loops: Vec::new(),
            links,
            tag,
        }
    }

    fn lvm_env(&self) -> PathBuf {
        self.dir.path().join("lvm")
    }

    /// A loop device over a new sparse file of `mib` MiB, named `/dev/<tag>/<name>` too.
    fn disk(&mut self, name: &str, mib: u64) -> String {
        let file = self.dir.path().join(format!("{name}.img"));
        std::fs::File::create(&file)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        self.loops.push(dev.clone());
        std::os::unix::fs::symlink(&dev, self.links.join(name)).unwrap();
        dev
    }

    /// The `/dev/<tag>/<name>` name of a disk.
    fn link(&self, name: &str) -> String {
        self.links.join(name).display().to_string()
    }

    /// Runs a command with the lab's LVM configuration; panics when it fails.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let (ok, out) = common::output_of(
            Command::new(find_tool(program).unwrap())
                .args(args)
                .env("LVM_SYSTEM_DIR", self.lvm_env())
                .env("LVM_SUPPRESS_FD_WARNINGS", "1"),
        );
        assert!(ok, "{program} {args:?}: {out}");
        out
    }

    /// A volume-group name unique to this run.
    fn vg(&self, name: &str) -> String {
        format!("{}_{name}", self.tag.replace('-', "_"))
    }

    /// The module's volume-group script for `vg` on `devices`, run as the unit would run it (with
    /// the tools wrapped); its success and output, and the commands it ran.
    fn script(&self, vg: &str, devices: &[&str]) -> (bool, String, Vec<String>) {
        let list = devices
            .iter()
            .map(|d| format!("\"{d}\""))
            .collect::<Vec<_>>()
            .join(" ");
        let out = Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json", "nix/vg-script.nix"])
            .args([
                "--argstr",
                "name",
                vg,
                "--arg",
                "devices",
                &format!("[ {list} ]"),
            ])
            .env("NIX_CONFIG", "build-users-group =")
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script: String = serde_json::from_slice(&out.stdout).unwrap();
        let log = self.dir.path().join("commands.log");
        let _ = std::fs::remove_file(&log);
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let (ok, output) = common::output_of(
            Command::new("bash")
                .arg("-c")
                .arg(&script)
                .env("PATH", path)
                .env("LVM_SYSTEM_DIR", self.lvm_env())
                .env("LVM_SUPPRESS_FD_WARNINGS", "1")
                .stdin(std::process::Stdio::null()),
        );
        let commands = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        (ok, output, commands)
    }

    /// SHA-256 of a whole device.
    fn digest(&self, dev: &str) -> String {
        use sha2::Digest;
        let bytes = std::fs::read(dev).unwrap();
        hex::encode(sha2::Sha256::digest(&bytes))
    }

    /// The physical volumes of `vg` (device names).
    fn members(&self, vg: &str) -> Vec<String> {
        let out = self.run(
            "pvs",
            &[
                "--noheadings",
                "-o",
                "pv_name",
                "--select",
                &format!("vg_name={vg}"),
            ],
        );
        let mut pvs: Vec<String> = out.split_whitespace().map(str::to_string).collect();
        pvs.sort();
        pvs
    }

    fn detach(&mut self, dev: &str) {
        let (ok, out) = common::output_of(Command::new("losetup").arg("-d").arg(dev));
        assert!(ok, "losetup -d {dev}: {out}");
        self.loops.retain(|d| d != dev);
    }

    fn detach_all(&mut self) {
        for dev in self.loops.drain(..) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
        let _ = std::fs::remove_dir_all(&self.links);
        let _ = std::fs::create_dir_all(&self.links);
    }
}

impl Drop for LoopLab {
    fn drop(&mut self) {
        self.detach_all();
        let _ = std::fs::remove_dir_all(&self.links);
    }
}

/// Checks the commands a run of the volume-group script executed: nothing that writes to a
/// device except vgcreate (not forced, on exactly `devices`), wipefs only listing, dd only
/// reading.
fn assert_ran_nothing_destructive(commands: &[String], devices: &[&str]) {
    for c in commands {
        let w: Vec<&str> = c.split(' ').collect();
        match w[0] {
            "pvcreate" | "pvremove" | "vgremove" | "lvremove" | "lvcreate" | "vgextend"
            | "sfdisk" | "sgdisk" | "blkdiscard" | "pvmove" => panic!("ran {c}"),
            t if t.starts_with("mkfs") => panic!("ran {c}"),
            "wipefs" => assert!(
                w.contains(&"--no-act")
                    && !w
                        .iter()
                        .any(|a| ["-a", "--all", "-o", "--offset", "-f", "--force"].contains(a)),
                "ran {c}"
            ),
            "dd" => assert!(!w.iter().any(|a| a.starts_with("of=")), "ran {c}"),
            "vgcreate" => {
                assert!(
                    !w.iter()
                        .any(|a| ["-f", "-ff", "--force", "-y", "--yes"].contains(a)),
                    "ran {c}"
                );
                assert!(w.ends_with(devices), "vgcreate on other devices: {c}");
            }
            _ => {}
        }
    }
}

/// A DOS partition table with one Linux partition from sector 2048 to the end (what
/// `echo 'label: dos' | sfdisk` and a partition would write), without sfdisk.
fn write_dos_partition_table(dev: &str) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    let sectors = f.seek(SeekFrom::End(0)).unwrap() / 512;
    let mut mbr = [0u8; 512];
    mbr[440..444].copy_from_slice(&0x1234_5678u32.to_le_bytes()); // disk identifier
    let entry = &mut mbr[446..462];
    entry[4] = 0x83; // Linux
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&u32::try_from(sectors - 2048).unwrap().to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&mbr).unwrap();
    f.sync_all().unwrap();
}

/// The loop-device tests run one at a time (they pick free loop devices).
fn loop_lab(test: &str) -> Option<(std::sync::MutexGuard<'static, ()>, LoopLab)> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    root_checks_unavailable(&[
        "losetup", "pvs", "vgcreate", "pvcreate", "blkid", "wipefs", "lsblk", "mknod",
    ])
    .is_none()
    .then(|| {
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        (guard, LoopLab::new(test))
    })
}

// The volume-group unit's script, as the module renders it (nix/vg-script.nix), run for real
// against loop devices: root, and LVM without device-mapper (no LV is made).

/// Creation over a blank disk (named through a /dev symlink, as /dev/disk/by-id names are) and an
/// unused physical volume as an interrupted creation leaves it (pvcreate done, vgcreate not):
/// one vgcreate over both, narrowed to them. Before: the unused PV carried "LVM2_member" and was
/// refused on every later boot.
#[test]
fn vg_script_creates_the_group_and_resumes_an_interrupted_creation() {
    let Some((_one, mut lab)) = loop_lab("create") else {
        return;
    };
    let vg = lab.vg("new");
    let blank = lab.disk("blank", 64);
    let orphan = lab.disk("orphan", 64);
    lab.run("pvcreate", &["-q", &orphan]);
    let declared = [lab.link("blank"), orphan.clone()];
    let declared: Vec<&str> = declared.iter().map(String::as_str).collect();
    let (ok, out, commands) = lab.script(&vg, &declared);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("created volume group {vg}")), "{out}");
    assert!(
        out.contains(&format!("{orphan} is an unused LVM physical volume")),
        "{out}"
    );
    let mut want = vec![blank.clone(), orphan.clone()];
    want.sort();
    assert_eq!(lab.members(&vg), want);
    assert_ran_nothing_destructive(&commands, &declared);
    let creates: Vec<&String> = commands
        .iter()
        .filter(|c| c.starts_with("vgcreate "))
        .collect();
    assert_eq!(creates.len(), 1, "{commands:?}");
    // Narrowed to the declared devices (no devices file in the lab's LVM configuration).
    assert!(
        creates[0].contains(&format!(
            "--devices {} --devices {}",
            declared[0], declared[1]
        )),
        "{creates:?}"
    );
    // Next boot: the group exists; nothing that writes runs.
    let (ok, out, commands) = lab.script(&vg, &declared);
    assert!(ok && out.contains("nothing to create"), "{out}");
    assert!(
        !commands.iter().any(|c| c.starts_with("vgcreate")),
        "{commands:?}"
    );
    // Declaring only part of it: the group has a PV that is not declared (the daemon, narrowed
    // to the declared devices, would see a partial group).
    let (ok, out, _) = lab.script(&vg, &[declared[0]]);
    assert!(
        !ok && out.contains("are not among the declared devices"),
        "{out}"
    );
}

/// A group of the same name on an undeclared disk, a blank declared disk: refused, the blank
/// disk untouched. Before: the group counted as missing (in the unit, `vgs` could not open the
/// other disk) and a second group of that name was created.
#[test]
fn vg_script_refuses_when_a_group_of_that_name_is_on_another_disk() {
    let Some((_one, mut lab)) = loop_lab("dup") else {
        return;
    };
    let vg = lab.vg("dup");
    let other = lab.disk("other", 64);
    lab.run("vgcreate", &["-q", &vg, &other]);
    let target = lab.disk("target", 64);
    let before = lab.digest(&target);
    let (ok, out, commands) = lab.script(&vg, &[&target]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("are not among the declared devices") && out.contains(&other),
        "{out}"
    );
    assert_eq!(lab.digest(&target), before, "the declared disk was written");
    assert_eq!(lab.members(&vg), vec![other.clone()]);
    assert_ran_nothing_destructive(&commands, &[]);
}

/// Devices that cannot be opened or read are never blank: a block device node without a driver
/// (open fails with ENXIO, as it fails with EPERM for a device the unit may not open) and an
/// unbound loop device (0 bytes), each next to a blank disk that must stay untouched. Before:
/// blkid's exit status 2, which it also returns for "cannot open", counted as "nothing found".
#[test]
fn vg_script_refuses_devices_it_cannot_read() {
    let Some((_one, mut lab)) = loop_lab("unreadable") else {
        return;
    };
    let vg = lab.vg("unreadable");
    let good = lab.disk("good", 64);
    let devices = std::fs::read_to_string("/proc/devices").unwrap();
    let major = (240..255)
        .find(|m| {
            !devices
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&m.to_string()))
        })
        .expect("a free block major among the experimental ones (240-254)");
    let ghost = lab.link("ghost");
    lab.run("mknod", &[&ghost, "b", &major.to_string(), "0"]);
    let before = lab.digest(&good);
    let (ok, out, commands) = lab.script(&vg, &[&good, &ghost]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("refusing to create {vg}: cannot open {ghost}")),
        "{out}"
    );
    assert!(out.contains("nothing was written"), "{out}");
    assert_eq!(lab.digest(&good), before);
    assert_ran_nothing_destructive(&commands, &[]);
    let unbound = String::from_utf8(
        Command::new("losetup")
            .arg("--find")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let (ok, out, commands) = lab.script(&vg, &[&good, &unbound]);
    assert!(
        !ok && out.contains(&format!("{unbound} has 0 bytes")),
        "{out}"
    );
    assert_eq!(lab.digest(&good), before);
    assert_ran_nothing_destructive(&commands, &[]);
}

/// Data of every kind is refused and left as it was: a partition table, a physical volume of
/// another group, and a PV marked in use whose group is not visible (it has no metadata area of
/// its own and the group's other disk is gone).
#[test]
fn vg_script_refuses_devices_that_carry_data() {
    let Some((_one, mut lab)) = loop_lab("data") else {
        return;
    };
    let vg = lab.vg("data");
    let parted = lab.disk("parted", 64);
    write_dos_partition_table(&parted);
    let member = lab.disk("member", 64);
    lab.run("vgcreate", &["-q", &lab.vg("owner"), &member]);
    let used = lab.disk("used", 64);
    let mda = lab.disk("mda", 64);
    lab.run("pvcreate", &["-q", "--metadatacopies", "0", &used]);
    lab.run("vgcreate", &["-q", &lab.vg("gone"), &mda, &used]);
    lab.detach(&mda);
    let devices = [parted.as_str(), member.as_str(), used.as_str()];
    let before: Vec<String> = devices.iter().map(|d| lab.digest(d)).collect();
    let (ok, out, commands) = lab.script(&vg, &devices);
    assert!(!ok, "{out}");
    for needle in [
        format!("{parted} carries a partition table (dos)"),
        format!("{member} is an LVM physical volume of another group"),
        format!("{used} is an LVM physical volume of another group, or marked in use"),
    ] {
        assert!(out.contains(&needle), "{needle}: {out}");
    }
    let after: Vec<String> = devices.iter().map(|d| lab.digest(d)).collect();
    assert_eq!(after, before, "a refused device was written");
    assert_ran_nothing_destructive(&commands, &[]);
}

/// `setpriv --bounding-set` argument for a systemd `CapabilityBoundingSet=` value.
fn bounding_set(value: &Value) -> String {
    let caps: Vec<String> = match value {
        Value::String(s) if s.is_empty() => vec![],
        Value::Array(items) => items
            .iter()
            .map(|c| {
                c.as_str()
                    .unwrap()
                    .trim_start_matches("CAP_")
                    .to_ascii_lowercase()
            })
            .collect(),
        other => panic!("CapabilityBoundingSet {other}"),
    };
    std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs the real daemon (directory backend) under the sandbox pieces its "volume is open" check
/// depends on: /proc mounted as ProtectProc= mounts it, the capability bounding set, no new
/// privileges; `DELETE`s a volume, which a process of another user (nobody, as QEMU runs as its
/// own user) holds open when `held`. Returns the status, the body, whether the volume is still
/// there, and the daemon's bounding set.
async fn delete_volume_under(
    bounding: &str,
    protect_proc: &str,
    held: bool,
) -> (u16, Value, bool, u64) {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let config = common::TestConfig::new(dir);
    let volumes = dir.join("volumes");
    std::fs::create_dir_all(&volumes).unwrap();
    let volume = volumes.join("vm-1");
    std::fs::write(&volume, vec![0u8; 1 << 20]).unwrap();
    // Another user's process in either case (holding the volume as its stdin, or /dev/null).
    let stdin = if held {
        std::fs::File::open(&volume).unwrap()
    } else {
        std::fs::File::open("/dev/null").unwrap()
    };
    let mut holder = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "sleep",
            "300",
        ])
        .stdin(stdin)
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", holder.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&status).is_ok_and(|s| s.contains("Uid:\t65534\t")) {
        assert!(std::time::Instant::now() < deadline, "holder did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let hidepid = match protect_proc {
        "default" => String::new(),
        other => format!("mount -t proc -o hidepid={other} proc /proc && "),
    };
    let inner = format!(
        "{hidepid}exec setpriv --bounding-set={bounding} --inh-caps=-all --no-new-privs -- \"$@\""
    );
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, config.render()).unwrap();
    let d = common::Daemon::spawn_wrapped(
        dir,
        &config_path,
        &[],
        "http",
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &inner,
            "sh",
        ],
    );
    // The sandbox really applies to the daemon: its bounding set, its /proc.
    let caps = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let mounts = std::fs::read_to_string(format!("/proc/{}/mounts", d.pid())).unwrap();
    assert!(
        hidepid.is_empty() || mounts.contains(&format!("hidepid={protect_proc}")),
        "{mounts}"
    );
    let (code, body) = common::delete(&common::client(), &d.url("/api/v1/volumes/vm-1")).await;
    let still_there = volume.exists();
    drop(d);
    let _ = holder.kill();
    let _ = holder.wait();
    let bnd = caps
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    (code, body, still_there, bnd)
}

/// The directory backend refuses to delete or overwrite a volume another process holds open, and
/// refuses when it cannot tell; on a NixOS host that process is QEMU, running as its own user.
/// Under the module's sandbox for the directory backend (its CapabilityBoundingSet and
/// ProtectProc, from nix/module-smoke.nix) the daemon must see that holder, and delete a volume
/// nobody holds. Controls: with the module's former empty bounding set, or with CAP_SYS_PTRACE
/// alone, it cannot see other users' open files, so it refuses every volume.
#[tokio::test]
async fn directory_backend_sees_volumes_other_users_hold_open() {
    if root_checks_unavailable(&["setpriv", "unshare", "mount", "sleep"]).is_some() {
        return;
    }
    let sc = &module_smoke()["directory"]["daemon"]["serviceConfig"];
    let protect_proc = sc["ProtectProc"].as_str().unwrap();
    let bounding = bounding_set(&sc["CapabilityBoundingSet"]);

    let (code, body, still_there, bnd) = delete_volume_under(&bounding, protect_proc, true).await;
    // CAP_DAC_READ_SEARCH (2) and CAP_SYS_PTRACE (19), nothing else.
    assert_eq!(bnd, (1 << 2) | (1 << 19), "bounding set {bnd:#x}");
    assert_eq!(code, 409, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("open by process"), "{body}");
    assert!(still_there);
    let (code, body, still_there, _) = delete_volume_under(&bounding, protect_proc, false).await;
    assert_eq!((code, still_there), (200, false), "{body}");

    for control in ["-all", "-all,+sys_ptrace"] {
        let (code, body, still_there, _) = delete_volume_under(control, protect_proc, false).await;
        assert_eq!(code, 409, "{control}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("cannot tell whether another process has it open"),
            "{control}: {body}"
        );
        assert!(still_there);
    }
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
    let failed = failed_assertions(declared);
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
    assert_bash_syntax(script, "pool script");
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

    let refused = failed_assertions(&smoke["definePoolWithoutPool"]);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("libvirt.definePool") && refused[0].contains("settings.libvirt.pool"),
        "{refused:?}"
    );
}
