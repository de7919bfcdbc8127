//! Documentation stays true: docs/configuration.md names every settings key with its
//! environment variable and whether it reloads live or needs a restart.

use libvirt_volume_provisioner::config::Settings;

fn keys(prefix: &str, value: &toml::Value, out: &mut Vec<String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                keys(&p, v, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn configuration_doc_lists_every_key() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let value = toml::Value::try_from(Settings::default()).unwrap();
    let mut all = Vec::new();
    keys("", &value, &mut all);
    assert!(all.len() > 40, "{all:?}");
    for key in all {
        let env = format!("LVP_{}", key.replace('.', "__").to_ascii_uppercase());
        assert!(
            doc.contains(&format!("| `{key}` | `{env}` |")),
            "docs/configuration.md lacks {key} ({env})"
        );
    }
}
