//! The LVM backend, by concern: what the LVM tools report (`report.rs`), the names and tags the
//! daemon gives LVs (`naming.rs`), the thin pool's use and safety rule (`thin.rs`), the backend
//! itself (`backend.rs`), and golden images on the thin pool, its clone store (`golden.rs`).
//! Only `volume/select.rs` builds these.

mod backend;
mod golden;
mod naming;
pub(crate) mod report;
mod thin;

pub(crate) use backend::LvmBackend;
pub(crate) use golden::GoldenImages;
pub(crate) use thin::ThinPool;
