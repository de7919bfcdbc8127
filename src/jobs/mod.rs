//! Jobs: the model and state machine, progress estimation, the durable store, the engine
//! (queue, slots, cancel, recovery), idempotent submission, deleting, growing, cloning and
//! uploading volumes under its locks, and the runner (what a job does; a wipe job's step in `wipe.rs`;
//! encrypted volumes' steps in `encrypted.rs`).

pub(crate) mod clone;
pub(crate) mod declared;
pub(crate) mod delete;
mod encrypted;
pub(crate) mod engine;
mod error;
mod golden;
mod handle;
pub(crate) mod idempotency;
pub(crate) mod model;
pub(crate) mod progress;
pub(crate) mod resize;
pub(crate) mod runner;
mod state;
pub(crate) mod store;
pub(crate) mod upload;

/// Every `reason` code a failed job can carry (the API checks that each is one of its codes).
#[cfg(test)]
pub(crate) const FAILURE_REASONS: &[&str] = &error::JobError::REASONS;
mod wipe;
