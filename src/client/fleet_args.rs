//! `fleet`'s arguments: the hosts file, how many hosts are worked on at once, how long one host
//! may take, and the three things it does on every host (status, prefetch, images).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

/// `fleet --hosts FILE <command>`: one command on every daemon a file lists.
#[derive(Debug, Clone, Args)]
pub struct FleetArgs {
    /// File of daemon base URLs (http://host:port or https://host:port), one a line; `#`
    /// starts a comment. The client options (--cacert, --cert/--key, --token-file) apply to
    /// every host.
    #[arg(long, value_name = "FILE")]
    pub hosts: PathBuf,
    /// Hosts worked on at once. A prefetch holds its host's slot until that host's job has
    /// ended, so the image's source sees at most this many downloads from the fleet.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: u16,
    /// Longest time one host may take (for a prefetch: until its job ends; the job goes on
    /// when this runs out).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub host_timeout: Duration,
    #[command(subcommand)]
    pub command: FleetCommand,
}

/// What `fleet` does on every host.
#[derive(Debug, Clone, Subcommand)]
pub enum FleetCommand {
    /// Health, version, uptime, running jobs and cached images of every host (a table).
    Status,
    /// Download an image into every host's cache and follow each host's job to its end.
    Prefetch {
        /// An image URL (s3://, https://, file://: sent as `image_url`) or the name of a
        /// declared image (sent as `image`).
        image: String,
        /// Format of the image (the daemons check it).
        #[arg(long, value_parser = ["qcow2", "raw"])]
        image_type: Option<String>,
    },
    /// The declared images of every host (`GET /api/v1/images`); a host whose daemon has no
    /// declared images yet fails with `no_declared_images_support`.
    Images,
}
