//! The HTTP API: the route table (`routes/`), the shared state (`state.rs`), the handlers, the
//! server and its connection limits, authentication, TLS.

mod activity;
pub(crate) mod auth;
mod bodies;
mod caller;
mod conn;
mod declared;
pub(crate) mod error;
mod events;
mod handlers;
mod lifecycle;
pub(crate) mod openapi;
mod origin;
mod peers;
mod preflight;
mod reason;
mod request;
mod routes;
mod scope;
pub(crate) mod server;
pub(crate) mod state;
mod streams;
mod strict_json;
pub(crate) mod tls;
mod upload;
mod views;

pub(crate) use routes::routes;
