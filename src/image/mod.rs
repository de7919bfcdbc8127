//! Images: where they come from (sources), the local verified cache, and header inspection.

mod bandwidth;
pub(crate) mod cache;
mod client;
mod format;
pub mod inspect;
pub(crate) mod preflight;
mod remote;
pub(crate) mod settings;
pub(crate) mod source;

pub use format::{DeclaredImageType, ImageType};
