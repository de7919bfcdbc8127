//! The client subcommands' arguments and the options every one of them takes (server, TLS,
//! token, output format), as clap definitions the binary flattens into its command line.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use super::fleet_args::FleetArgs;

/// How the server is reached and how answers are printed.
#[derive(Debug, Clone, Args)]
pub struct ClientOptions {
    /// The daemon's API (http://host:port or https://host:port).
    #[arg(
        long,
        global = true,
        env = "LVP_SERVER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// CA certificate (PEM) that signed the server's certificate; without it the system's
    /// roots are used.
    #[arg(long, global = true, value_name = "PEM")]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (with --key).
    #[arg(long, global = true, value_name = "PEM", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, global = true, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
    /// File holding an API token (the token alone; `#` lines are skipped). The environment
    /// variable LVP_TOKEN is used when this is not given.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// `text` for people, `json` for scripts (the API's own body, nothing else on stdout).
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// How answers are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// The subcommands that talk to a running daemon.
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Provision a volume from an image (add --wait to follow it to the end).
    Provision(Box<ProvisionArgs>),
    /// Jobs: show, list, follow, cancel.
    #[command(subcommand)]
    Job(JobCommand),
    /// The image cache: list, prefetch, delete.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Volumes: delete, grow, upload small content (cloud-init seeds).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Images: the declared ones, check one before provisioning from it.
    #[command(subcommand)]
    Image(ImageCommand),
    /// The daemon's health.
    Health,
    /// Every daemon of a hosts file at once: status, prefetch an image, declared images.
    Fleet(FleetArgs),
}

/// Following a job.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Follow the job until it ends (exit status 0 only when it completed).
    #[arg(long)]
    pub wait: bool,
    /// On Ctrl-C while waiting, cancel the job without asking.
    #[arg(long)]
    pub cancel_on_interrupt: bool,
}

/// `provision`.
#[derive(Debug, Clone, Args)]
pub struct ProvisionArgs {
    /// Image to write (s3://bucket/key, https://..., file:///...).
    #[arg(long, required_unless_present = "image", conflicts_with = "image")]
    pub image_url: Option<String>,
    /// A declared image's name (`[[images]]`, see `image list`) instead of --image-url.
    #[arg(long)]
    pub image: Option<String>,
    /// Volume to create or overwrite.
    #[arg(long)]
    pub volume: String,
    /// Volume size in GiB.
    #[arg(long)]
    pub size_gb: u64,
    /// Format of the image (the daemon checks it).
    #[arg(long, value_parser = ["qcow2", "raw", "vmdk", "vhdx", "vpc", "vdi", "auto"])]
    pub image_type: Option<String>,
    /// Echoed in the job, its logs and traces.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Digest the image must match: `sha256:<hex>` or `sha512:<hex>`.
    #[arg(long, conflicts_with = "checksum_url")]
    pub checksum: Option<String>,
    /// Checksum manifest (SHA256SUMS, SHA512SUMS, CHECKSUM; signed or not) listing the image.
    #[arg(long)]
    pub checksum_url: Option<String>,
    /// Idempotency-Key to send (default: a new random one; pass the same key when retrying
    /// the same request from a script to get the job it already made).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    #[command(flatten)]
    pub encrypt: EncryptArgs,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// Encryption of a new volume (`provision`, `volume clone`).
#[derive(Debug, Clone, Args)]
pub struct EncryptArgs {
    /// Make the volume LUKS-encrypted (the job's `encryption` says where the key is).
    #[arg(long)]
    pub encrypt: bool,
    /// With --encrypt: an existing libvirt secret (usage volume, not private) holding the
    /// passphrase; default: the daemon makes one.
    #[arg(long, requires = "encrypt")]
    pub secret_uuid: Option<String>,
}

impl EncryptArgs {
    /// The request's `encryption` field, when asked for.
    pub fn body(&self) -> Option<serde_json::Value> {
        self.encrypt.then(|| match &self.secret_uuid {
            Some(uuid) => serde_json::json!({"format": "luks", "secret_uuid": uuid}),
            None => serde_json::json!({"format": "luks"}),
        })
    }
}

/// `job ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum JobCommand {
    /// Show one job.
    Get { id: String },
    /// List jobs, newest first.
    List {
        /// Only jobs in this state.
        #[arg(long, value_parser = ["pending", "running", "completed", "failed", "cancelled"])]
        status: Option<String>,
        /// At most this many (1..=1000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Follow a job until it ends (exit status 0 only when it completed).
    Watch {
        id: String,
        /// On Ctrl-C, cancel the job without asking.
        #[arg(long)]
        cancel_on_interrupt: bool,
    },
    /// Cancel a job (stops it and removes a volume it created).
    Cancel { id: String },
}

/// `cache ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum CacheCommand {
    /// List cached images, most recently used first.
    List {
        #[arg(long, default_value_t = 0)]
        offset: usize,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Download an image into the cache (a prefetch job): a URL, or a declared image's name.
    Fetch {
        #[arg(value_name = "IMAGE_URL|NAME")]
        image_url: String,
        #[arg(long, value_parser = ["qcow2", "raw", "vmdk", "vhdx", "vpc", "vdi", "auto"])]
        image_type: Option<String>,
        /// Idempotency-Key to send (default: a new random one).
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Delete a cache entry by its key (64 hex digits, see `cache list`).
    Delete {
        /// Its own id: `key` is the global --key (the client key of mutual TLS).
        #[arg(id = "cache_key", value_name = "KEY")]
        key: String,
    },
}

/// `volume ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum VolumeCommand {
    /// Delete a volume (absent is fine; refused while a job or a VM uses it).
    Delete { name: String },
    /// Write a small file (a cloud-init seed image) into a new volume.
    Upload { name: String, file: PathBuf },
    /// Grow a volume (a running VM using it is told the new size; volumes never shrink).
    Resize {
        name: String,
        /// The new size in GiB (at least the current size).
        #[arg(long)]
        size_gb: u64,
    },
    /// Copy a volume into a new one (a clone job: a thin snapshot on a thin pool, else a copy).
    Clone {
        name: String,
        /// The new volume.
        #[arg(long)]
        target: String,
        /// Its size in GiB (at least the source's; default: the source's size).
        #[arg(long)]
        size_gb: Option<u64>,
        /// Copy a source a running VM uses, as it is (crash-consistent at best).
        #[arg(long)]
        allow_in_use: bool,
        /// Idempotency-Key to send (default: a new random one).
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        encrypt: EncryptArgs,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// `image ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum ImageCommand {
    /// The declared images (`[[images]]`): version, cached, last and next check, last error.
    #[command(visible_alias = "ls")]
    List,
    /// Check an image without provisioning: format, sizes, cache state, whether the daemon
    /// would accept it (reads only the header of an uncached image).
    Inspect {
        image_url: String,
        #[arg(long, value_parser = ["qcow2", "raw", "vmdk", "vhdx", "vpc", "vdi", "auto"])]
        image_type: Option<String>,
    },
}
