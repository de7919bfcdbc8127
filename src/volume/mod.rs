//! Volumes: the backend seam (`backend.rs`: the trait, what a backend reports, the reuse rule),
//! the name rules (`names.rs`), what wiping means (`wipe.rs`), typed errors (`error.rs`), shared block-device work
//! (`blockdev.rs`), encrypted volumes (`encrypt/`: LUKS keys, crypto-erase), clone stores (`clones.rs`: golden copies new volumes are cloned from), the
//! backends (`directory.rs` with `reflink.rs`, `lvm/`), the libvirt wrapper (`libvirt/`), and
//! selecting what the settings ask for (`select.rs` from the plain `spec.rs`). Everything
//! backend-specific lives below this folder; the rest of the daemon sees the trait, the clone
//! store trait and `select`.

mod backend;
mod blockdev;
pub(crate) mod clones;
pub(crate) mod directory;
pub(crate) mod encrypt;
mod error;
pub(crate) mod libvirt;
mod lvm;
mod names;
mod reflink;
mod select;
pub(crate) mod spec;
mod wipe;

pub(crate) use backend::{
    Blocker, BlockerKind, NewVolume, VolumeBackend, VolumeInfo, check_reusable,
};
#[cfg(test)]
pub(crate) use backend::{Grown, Overwrite};
pub(crate) use error::VolumeError;
pub(crate) use names::{gib_to_bytes, validate_lvm_name, validate_volume_name};
pub(crate) use select::{Volumes, select};
pub(crate) use wipe::{Wipe, WipeMode, WipeProgress, effective as effective_wipe};
