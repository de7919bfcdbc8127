//! Test harness shared by the integration tests. Each concern has its own file; this module only
//! declares them and re-exports their items, so that a test's `use common::*;` reaches them all.
//! Every test binary compiles this module on its own and uses part of it, hence the allowance.
#![allow(dead_code)]

pub mod daemon;
pub mod gpg;
pub mod images;
pub mod libvirt;
pub mod metrics;
pub mod pki;
pub mod proxies;
pub mod secrets;
pub mod servers;
pub mod terminal;
pub mod vm;

// Not every binary uses every file.
#[allow(unused_imports)]
pub use {
    daemon::*, gpg::*, images::*, metrics::*, pki::*, proxies::*, secrets::*, servers::*,
    terminal::*, vm::*,
};
