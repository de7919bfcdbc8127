//! The operator's command line: subcommands of the daemon's binary that talk to a running
//! daemon over its HTTP API (and nothing else: no job, image or volume internals), with a live
//! progress bar while waiting and exit statuses scripts can rely on.

mod args;
mod commands;
mod fleet;
mod fleet_args;
mod fleet_ops;
mod fleet_report;
mod fleet_view;
mod http;
mod watch;

use std::process::ExitCode;

pub use args::{ClientCommand, ClientOptions, OutputFormat};
pub use fleet_args::{FleetArgs, FleetCommand};

/// Exit statuses of the client subcommands.
pub mod exit {
    /// The request succeeded; with `--wait`/`job watch`, the job completed.
    pub const OK: u8 = 0;
    /// The job failed, or the server refused the request (4xx/5xx).
    pub const FAILED: u8 = 1;
    /// The job was cancelled.
    pub const CANCELLED: u8 = 3;
    /// The server could not be reached (nothing listening, TLS refused, timeout), or the
    /// options or files given are unusable.
    pub const UNREACHABLE: u8 = 4;
    /// Interrupted while waiting; the job was left running.
    pub const INTERRUPTED: u8 = 130;
}

/// Runs one client subcommand to its exit status.
pub fn run(options: ClientOptions, command: ClientCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(exit::UNREACHABLE);
        }
    };
    ExitCode::from(runtime.block_on(commands::run(&options, command)))
}
