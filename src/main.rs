//! Command line: `serve`, `check-config`, `version`, and the client subcommands that talk to a
//! running daemon (`provision`, `job`, `cache`, `volume`, `image`, `health`; `src/client/`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use libvirt_volume_provisioner::client::{self, ClientCommand, ClientOptions};
use libvirt_volume_provisioner::config::{self, ConfigSource, Profile};

/// The command line.
#[derive(Parser)]
#[command(name = "libvirt-volume-provisioner", version, about)]
struct Cli {
    /// Configuration file (TOML). Without this option a missing default file is fine.
    #[arg(long, short, global = true, env = "LVP_CONFIG")]
    config: Option<PathBuf>,
    /// Start from the embedded defaults: directory volumes and all state under ./var
    /// (no root, no external service) instead of the production defaults.
    #[arg(long, global = true)]
    embedded: bool,
    /// How client subcommands reach the daemon and print answers.
    #[command(flatten)]
    client: ClientOptions,
    #[command(subcommand)]
    command: Command,
}

/// What to do.
#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve,
    /// Print the effective configuration as TOML (secrets redacted); fail on any error.
    CheckConfig,
    /// Print the version.
    Version,
    #[command(flatten)]
    Client(ClientCommand),
}

fn main() -> ExitCode {
    let Cli {
        config,
        embedded,
        client: client_options,
        command,
    } = Cli::parse();
    let source = ConfigSource {
        explicit: config.is_some(),
        path: config.unwrap_or_else(|| PathBuf::from(ConfigSource::DEFAULT_PATH)),
        profile: if embedded {
            Profile::Embedded
        } else {
            Profile::Host
        },
    };
    match command {
        Command::Client(command) => client::run(client_options, command),
        Command::Version => {
            println!("libvirt-volume-provisioner v{}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig => check_config(&source),
        Command::Serve => serve(source),
    }
}

fn check_config(source: &ConfigSource) -> ExitCode {
    match config::load(source) {
        Ok(settings) => match libvirt_volume_provisioner::check_security(&settings) {
            Ok(_) => {
                print!("{}", config::redacted_toml(&settings));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(source: ConfigSource) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(libvirt_volume_provisioner::serve(source)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks of the whole command line.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// A positional `key` beside the global `--key` shared clap's argument id and panicked when
    /// `cache delete` ran (clap's debug_assert does not see it; parsing does).
    #[test]
    fn cache_delete_takes_its_key_beside_the_global_key_option() {
        let cli = Cli::try_parse_from([
            "lvp", "--cert", "c.pem", "--key", "k.pem", "cache", "delete", "abc",
        ])
        .unwrap();
        let _ = cli;
    }
}
