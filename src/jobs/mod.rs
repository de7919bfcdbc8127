//! Jobs: the model and state machine, progress estimation, the durable store, the engine
//! (queue, slots, cancel, recovery) and the runner (what a job does).

pub mod engine;
pub mod model;
pub mod progress;
pub mod runner;
pub mod store;
