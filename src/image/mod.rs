//! Images: where they come from (sources), the local verified cache, and header inspection.

pub mod cache;
pub mod inspect;
pub mod source;
