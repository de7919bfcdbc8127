//! Documentation stays true: docs/configuration.md names every settings key with its
//! environment variable and whether it reloads live or needs a restart (the same answer the
//! reloader gives).

use libvirt_volume_provisioner::config::Settings;
use libvirt_volume_provisioner::config::reload::{needs_restart, setting_keys};

#[test]
fn configuration_doc_lists_every_key_with_its_reload_column() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let all = setting_keys(&Settings::default());
    assert!(all.len() > 40, "{all:?}");
    for key in all {
        let env = format!("LVP_{}", key.replace('.', "__").to_ascii_uppercase());
        let reload = if needs_restart(&key) {
            "restart"
        } else {
            "live"
        };
        let row = format!("| `{key}` | `{env}` | {reload} |");
        assert!(
            doc.contains(&row),
            "docs/configuration.md lacks the row `{row}` (key, environment variable, reload)"
        );
    }
}
