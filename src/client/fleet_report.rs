//! What `fleet` found on each host and how it is told: a host's outcome (its answer, or a
//! failure with a stable reason code), the tables of `status` and `images`, the summary with
//! every failure's reason, and the one JSON document of `--output json`.

use indicatif::HumanBytes;
use serde_json::{Value, json};

use super::http::{ClientError, ConnectKind};

/// Why one host failed: a stable code to decide on, and the words for a person.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failure {
    /// snake_case: the daemon's own `reason` for a refused request, else one of the client's
    /// (`connection_refused`, `tls_handshake`, `connection_closed`, `timeout`, `unreachable`,
    /// `protocol`, `setup`, `http_<status>`, `job_failed`, `job_cancelled`, `host_timeout`,
    /// `no_declared_images_support`).
    pub(crate) reason: String,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(reason: &str, message: impl Into<String>) -> Failure {
        Failure {
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let reason = match &e {
            ClientError::Setup(_) => "setup".to_string(),
            ClientError::Protocol(_) => "protocol".to_string(),
            ClientError::Refused { status, reason, .. } => {
                reason.clone().unwrap_or_else(|| format!("http_{status}"))
            }
            ClientError::Connect { kind, .. } => match kind {
                ConnectKind::Refused => "connection_refused",
                ConnectKind::Tls => "tls_handshake",
                ConnectKind::Closed => "connection_closed",
                ConnectKind::Timeout => "timeout",
                ConnectKind::Other => "unreachable",
            }
            .to_string(),
        };
        Failure {
            reason: crate::text::escape(&reason).into_owned(),
            message: e.to_string(),
        }
    }
}

/// One host's outcome: what it answered (the command's own summary of it), or why it failed.
pub(crate) type Outcome = Result<Value, Failure>;

/// A host and its outcome, in hosts-file order.
pub(crate) struct HostOutcome {
    /// The host's base URL as the file gives it (trailing `/` removed).
    pub(crate) host: String,
    pub(crate) outcome: Outcome,
}

/// A string field of an answer as it may be printed on a terminal.
pub(crate) fn field(value: &Value, missing: &str) -> String {
    crate::text::escape(value.as_str().unwrap_or(missing)).into_owned()
}

/// The one JSON document of `--output json`: every host's outcome and the counts.
pub(crate) fn json_document(command: &str, outcomes: &[HostOutcome]) -> Value {
    let hosts: Vec<Value> = outcomes
        .iter()
        .map(|h| match &h.outcome {
            Ok(result) => json!({"host": h.host, "ok": true, "result": result}),
            Err(f) => {
                json!({"host": h.host, "ok": false, "reason": f.reason, "message": f.message})
            }
        })
        .collect();
    let failed = outcomes.iter().filter(|h| h.outcome.is_err()).count();
    json!({
        "command": command,
        "hosts": hosts,
        "ok": outcomes.len() - failed,
        "failed": failed,
    })
}

/// The closing lines: counts, then each failed host with its reason and message.
pub(crate) fn summary(command: &str, outcomes: &[HostOutcome]) -> String {
    let failed: Vec<&HostOutcome> = outcomes.iter().filter(|h| h.outcome.is_err()).collect();
    let mut out = format!(
        "fleet {command}: {} hosts, {} ok, {} failed",
        outcomes.len(),
        outcomes.len() - failed.len(),
        failed.len()
    );
    for h in failed {
        if let Err(f) = &h.outcome {
            out += &format!(
                "\n  FAILED {}  [{}]  {}",
                crate::text::escape(&h.host),
                f.reason,
                f.message
            );
        }
    }
    out
}

/// Width of the host column: the longest host, within bounds.
fn host_width(outcomes: &[HostOutcome]) -> usize {
    outcomes
        .iter()
        .map(|h| h.host.chars().count())
        .max()
        .unwrap_or(4)
        .clamp(4, 48)
}

/// `fleet status`'s table: one row per host.
pub(crate) fn status_table(outcomes: &[HostOutcome]) -> String {
    let w = host_width(outcomes);
    let mut out = format!(
        "{:<w$}  {:<8}  {:<10}  {:>12}  {:>5}  {:>6}  {:>10}",
        "HOST", "HEALTH", "VERSION", "UPTIME", "JOBS", "CACHED", "CACHE SIZE"
    );
    for h in outcomes {
        let host = crate::text::escape(&h.host);
        out += &match &h.outcome {
            Ok(s) => format!(
                "\n{host:<w$}  {:<8}  {:<10}  {:>12}  {:>5}  {:>6}  {:>10}",
                field(&s["health"], "?"),
                field(&s["version"], "?"),
                field(&s["uptime"], "?"),
                format!("{}/{}", s["jobs_running"], s["job_slots"]),
                s["cached_images"].to_string(),
                HumanBytes(s["cache_bytes"].as_u64().unwrap_or(0)).to_string(),
            ),
            Err(f) => format!("\n{host:<w$}  FAILED    [{}]", f.reason),
        };
    }
    out
}

/// `fleet images`' table: one row per declared image per host.
pub(crate) fn images_table(outcomes: &[HostOutcome]) -> String {
    let w = host_width(outcomes);
    let mut out = format!(
        "{:<w$}  {:<24}  {:<6}  {:<6}  {:<19}  {:<25}  ERROR",
        "HOST", "IMAGE", "CACHED", "GOLDEN", "DIGEST", "LAST CHECKED"
    );
    for h in outcomes {
        let host = crate::text::escape(&h.host);
        let images = match &h.outcome {
            Err(f) => {
                out += &format!("\n{host:<w$}  FAILED [{}]", f.reason);
                continue;
            }
            Ok(v) => v["images"].as_array().cloned().unwrap_or_default(),
        };
        if images.is_empty() {
            out += &format!("\n{host:<w$}  (no declared images)");
        }
        for i in images {
            let digest: String = field(&i["digest"], "-").chars().take(19).collect();
            out += &format!(
                "\n{host:<w$}  {:<24}  {:<6}  {:<6}  {digest:<19}  {:<25}  {}",
                field(&i["name"], "?"),
                yes_no(&i["cached"]),
                yes_no(&i["golden"]),
                field(&i["last_checked"], "-"),
                field(&i["last_error"], "-"),
            );
        }
    }
    out
}

fn yes_no(v: &Value) -> &'static str {
    match v.as_bool() {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes() -> Vec<HostOutcome> {
        vec![
            HostOutcome {
                host: "http://hv1:8080".into(),
                outcome: Ok(json!({"job_id": "x"})),
            },
            HostOutcome {
                host: "http://hv2:8080".into(),
                outcome: Err(Failure::new("queue_full", "the queue is full (HTTP 429)")),
            },
        ]
    }

    #[test]
    fn summary_names_each_failure_with_its_reason() {
        let s = summary("prefetch", &outcomes());
        assert!(
            s.starts_with("fleet prefetch: 2 hosts, 1 ok, 1 failed"),
            "{s}"
        );
        assert!(s.contains("FAILED http://hv2:8080  [queue_full]  the queue is full"));
    }

    #[test]
    fn json_document_counts_and_keeps_reasons() {
        let v = json_document("prefetch", &outcomes());
        assert_eq!(v["ok"], 1);
        assert_eq!(v["failed"], 1);
        assert_eq!(v["hosts"][1]["reason"], "queue_full");
        assert_eq!(v["hosts"][0]["result"]["job_id"], "x");
    }

    #[test]
    fn reasons_come_from_the_error_kind() {
        let refused = ClientError::Refused {
            status: 503,
            reason: None,
            message: "m".into(),
            body: json!({}),
        };
        assert_eq!(Failure::from(refused).reason, "http_503");
        let e = ClientError::connect(ConnectKind::Refused, "nothing listens");
        assert_eq!(Failure::from(e).reason, "connection_refused");
    }
}
