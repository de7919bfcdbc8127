//! `fleet --hosts FILE status | prefetch IMAGE | images`: one command on every daemon a file
//! lists, at most `--concurrency` hosts at once, each with its own live line, then a table or a
//! summary naming every failed host with its reason (or one JSON document), and an exit status
//! that is not 0 when any host failed.

use std::path::Path;
use std::rc::Rc;

use futures::future::join_all;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::args::{ClientOptions, OutputFormat};
use super::exit;
use super::fleet_args::{FleetArgs, FleetCommand};
use super::fleet_ops;
use super::fleet_report::{self, Failure, HostOutcome, Outcome};
use super::fleet_view::{HostLine, Live};
use super::http::Api;

/// Largest hosts file read.
const MAX_HOSTS_FILE: u64 = 1 << 20;
/// Most hosts one run works on.
const MAX_HOSTS: usize = 10_000;
/// Widest host column of the live lines.
const MAX_LABEL: usize = 40;

/// Runs a fleet command; returns the exit status: 0 when every host succeeded, 1 when any
/// failed, 4 when the hosts file or the client options are unusable, 130 on Ctrl-C.
pub(crate) async fn run(opts: &ClientOptions, args: FleetArgs) -> u8 {
    let json = opts.output == OutputFormat::Json;
    let hosts = match read_hosts(&args.hosts) {
        Ok(h) => h,
        Err(message) => return unusable(json, &message),
    };
    let apis = match hosts
        .iter()
        .map(|h| {
            Api::new(&ClientOptions {
                server: h.clone(),
                ..opts.clone()
            })
        })
        .collect::<Result<Vec<Api>, _>>()
    {
        Ok(a) => a,
        Err(e) => return unusable(json, &e.to_string()),
    };
    let live = Live::choose(json);
    let name = command_name(&args.command);
    let work = every_host(&hosts, &apis, &args, &live);
    let outcomes = tokio::select! {
        outcomes = work => outcomes,
        _ = tokio::signal::ctrl_c() => {
            live.clear();
            eprintln!("interrupted: jobs already submitted go on (`job list` on each host shows them)");
            return exit::INTERRUPTED;
        }
    };
    report(json, name, &live, &outcomes);
    if outcomes.iter().any(|h| h.outcome.is_err()) {
        exit::FAILED
    } else {
        exit::OK
    }
}

/// An unusable hosts file or client option: said on stderr (and as JSON on stdout).
fn unusable(json: bool, message: &str) -> u8 {
    eprintln!("error: {message}");
    if json {
        println!("{}", json!({"error": "unusable", "message": message}));
    }
    exit::UNREACHABLE
}

fn command_name(command: &FleetCommand) -> &'static str {
    match command {
        FleetCommand::Status => "status",
        FleetCommand::Prefetch { .. } => "prefetch",
        FleetCommand::Images => "images",
    }
}

/// The command on every host, at most `--concurrency` at once, each within `--host-timeout`;
/// the outcomes in hosts-file order.
async fn every_host(
    hosts: &[String],
    apis: &[Api],
    args: &FleetArgs,
    live: &Live,
) -> Vec<HostOutcome> {
    let slots = Rc::new(Semaphore::new(usize::from(args.concurrency)));
    let width = hosts
        .iter()
        .map(|h| h.chars().count())
        .max()
        .unwrap_or(4)
        .min(MAX_LABEL);
    let request = Request::of(&args.command);
    let runs = hosts.iter().zip(apis).map(|(host, api)| {
        let line = live.line(&label(host), width);
        let slots = slots.clone();
        let request = &request;
        async move {
            let _slot = slots
                .acquire()
                .await
                .expect("the semaphore is never closed");
            let outcome = tokio::time::timeout(args.host_timeout, request.on(api, &line))
                .await
                .unwrap_or_else(|_| {
                    Err(Failure::new(
                        "host_timeout",
                        format!(
                            "no result within --host-timeout {} (a job goes on)",
                            humantime::format_duration(args.host_timeout)
                        ),
                    ))
                });
            if let Err(f) = &outcome {
                line.done(false, &format!("[{}] {}", f.reason, f.message));
            }
            HostOutcome {
                host: host.clone(),
                outcome,
            }
        }
    });
    join_all(runs).await
}

/// What is asked of each host, built once.
enum Request {
    Status,
    Images,
    /// The prefetch body and the Idempotency-Key of this run (one key for every host: each
    /// daemon keeps its own keys, and a retry within the run reuses it).
    Prefetch {
        body: Value,
        key: String,
    },
}

impl Request {
    fn of(command: &FleetCommand) -> Request {
        match command {
            FleetCommand::Status => Request::Status,
            FleetCommand::Images => Request::Images,
            FleetCommand::Prefetch { image, image_type } => Request::Prefetch {
                body: prefetch_body(image, image_type.as_deref()),
                key: uuid::Uuid::new_v4().to_string(),
            },
        }
    }

    async fn on(&self, api: &Api, line: &HostLine) -> Outcome {
        match self {
            Request::Status => fleet_ops::status(api, line).await,
            Request::Images => fleet_ops::images(api, line).await,
            Request::Prefetch { body, key } => fleet_ops::prefetch(api, line, body, key).await,
        }
    }
}

/// `{"image_url": ...}` for a URL (it has a scheme), `{"image": ...}` for a declared name.
fn prefetch_body(image: &str, image_type: Option<&str>) -> Value {
    let mut body = if image.contains("://") {
        json!({"image_url": image})
    } else {
        json!({"image": image})
    };
    if let Some(t) = image_type {
        body["image_type"] = json!(t);
    }
    body
}

/// A host as its live line shows it: without the scheme, cut to `MAX_LABEL` characters.
fn label(host: &str) -> String {
    let bare = host.split_once("://").map_or(host, |(_, rest)| rest);
    crate::text::escape(bare).chars().take(MAX_LABEL).collect()
}

/// The end: a JSON document, or a table (status, images) or the live lines (prefetch) and
/// the summary.
fn report(json: bool, name: &str, live: &Live, outcomes: &[HostOutcome]) {
    if json {
        println!("{}", fleet_report::json_document(name, outcomes));
        return;
    }
    let table = match name {
        "status" => Some(fleet_report::status_table(outcomes)),
        "images" => Some(fleet_report::images_table(outcomes)),
        _ => None,
    };
    if let Some(table) = table {
        live.clear();
        println!("{table}");
    }
    println!("{}", fleet_report::summary(name, outcomes));
}

/// The hosts a file lists: one base URL (http:// or https://) a line, `#` starting a comment,
/// blank lines skipped; each at most once.
fn read_hosts(path: &Path) -> Result<Vec<String>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| format!("cannot read --hosts {}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_HOSTS_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read --hosts {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_HOSTS_FILE {
        return Err(format!(
            "--hosts {} is larger than {MAX_HOSTS_FILE} bytes",
            path.display()
        ));
    }
    parse_hosts(&text).map_err(|e| format!("--hosts {}: {e}", path.display()))
}

fn parse_hosts(text: &str) -> Result<Vec<String>, String> {
    let mut hosts: Vec<String> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let host = line.trim_end_matches('/').to_string();
        let valid = url::Url::parse(&host).is_ok_and(|u| {
            matches!(u.scheme(), "http" | "https") && u.host().is_some() && u.query().is_none()
        });
        if !valid {
            return Err(format!(
                "line {}: `{}` is not an http:// or https:// base URL",
                n + 1,
                crate::text::escape(line)
            ));
        }
        if hosts.contains(&host) {
            return Err(format!("line {}: {host} is listed twice", n + 1));
        }
        if hosts.len() == MAX_HOSTS {
            return Err(format!("more than {MAX_HOSTS} hosts"));
        }
        hosts.push(host);
    }
    if hosts.is_empty() {
        return Err("lists no host".into());
    }
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_skips_comments_and_blank_lines() {
        let hosts = parse_hosts(
            "# the rack\nhttp://hv1:8080\n\n  https://hv2.example.com:8443/  # second\n",
        )
        .unwrap();
        assert_eq!(hosts, ["http://hv1:8080", "https://hv2.example.com:8443"]);
    }

    #[test]
    fn hosts_file_refuses_what_is_not_a_base_url() {
        for bad in ["hv1:8080", "ftp://hv1", "http://", "http://hv1/?x=1"] {
            let e = parse_hosts(bad).unwrap_err();
            assert!(e.starts_with("line 1:"), "{bad}: {e}");
        }
        assert!(parse_hosts("# nothing\n").unwrap_err().contains("no host"));
        let twice = parse_hosts("http://a:1\nhttp://a:1/\n").unwrap_err();
        assert!(
            twice.contains("line 2") && twice.contains("twice"),
            "{twice}"
        );
    }

    #[test]
    fn prefetch_sends_a_url_as_image_url_and_a_name_as_image() {
        assert_eq!(
            prefetch_body("s3://b/k.qcow2", Some("qcow2")),
            json!({"image_url": "s3://b/k.qcow2", "image_type": "qcow2"})
        );
        assert_eq!(
            prefetch_body("ubuntu-24.04", None),
            json!({"image": "ubuntu-24.04"})
        );
    }

    #[test]
    fn labels_drop_the_scheme_and_escape() {
        assert_eq!(label("https://hv1:8443"), "hv1:8443");
        assert_eq!(label("http://a\u{1b}b"), "a\\u{1b}b");
    }
}
