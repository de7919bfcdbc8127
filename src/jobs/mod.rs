//! Jobs: the model and state machine, progress estimation, the durable store, the engine
//! (queue, slots, cancel, recovery) and the runner (what a job does).

pub(crate) mod engine;
pub(crate) mod model;
pub(crate) mod progress;
pub(crate) mod runner;
pub(crate) mod store;
