//! Documentation stays true: docs/configuration.md names every settings key with its
//! environment variable and whether it reloads live or needs a restart.

use libvirt_volume_provisioner::config::Settings;

#[test]
fn configuration_doc_lists_every_key() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let all = libvirt_volume_provisioner::config::reload::setting_keys(&Settings::default());
    assert!(all.len() > 40, "{all:?}");
    for key in all {
        let env = format!("LVP_{}", key.replace('.', "__").to_ascii_uppercase());
        assert!(
            doc.contains(&format!("| `{key}` | `{env}` |")),
            "docs/configuration.md lacks {key} ({env})"
        );
    }
}
