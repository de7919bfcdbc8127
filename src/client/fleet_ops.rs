//! What `fleet` does on one host, through that host's `Api`: its status (health and cache), a
//! prefetch followed to the job's end, its declared images. Each returns the host's outcome and
//! keeps the host's live line up to date.

use std::time::{Duration, Instant};

use indicatif::HumanBytes;
use serde_json::{Value, json};

use super::fleet_report::{Failure, Outcome, field};
use super::fleet_view::HostLine;
use super::http::{Api, ClientError, ConnectKind};
use super::watch::JobView;

/// Time between two looks at a host's job.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long a host's job is still followed while its daemon cannot be reached (a restart:
/// the job survives it).
const OUTAGE_GRACE: Duration = Duration::from_secs(60);
/// Cache entries read for the status' count and size (the API's largest page).
const CACHE_PAGE: usize = 1000;

/// Health, version, uptime, jobs and cache of one host. The cache listing needs the
/// credentials, so a host that answers here also accepts this client.
pub(crate) async fn status(api: &Api, line: &HostLine) -> Outcome {
    line.show("asking", "", None);
    let health = api.get("/health").await?;
    let cache = api
        .get(&format!("/api/v1/cache/images?offset=0&limit={CACHE_PAGE}"))
        .await?;
    let cache_bytes: u64 = cache["images"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["size"].as_u64())
        .sum();
    let result = json!({
        "health": health["status"],
        "version": health["version"],
        "uptime": health["uptime"],
        "jobs_running": health["jobs"]["running"],
        "job_slots": health["jobs"]["slots"],
        "cached_images": cache["count"],
        "cache_bytes": cache_bytes,
    });
    line.done(
        true,
        &format!(
            "{} {}, {} cached",
            field(&result["health"], "?"),
            field(&result["version"], "?"),
            result["cached_images"]
        ),
    );
    Ok(result)
}

/// The declared images of one host. A daemon without `GET /api/v1/images` (404/405) fails
/// with `no_declared_images_support`: nothing is made up in its place.
pub(crate) async fn images(api: &Api, line: &HostLine) -> Outcome {
    line.show("asking", "", None);
    match api.get("/api/v1/images").await {
        Ok(list) => {
            let n = list["images"].as_array().map_or(0, Vec::len);
            line.done(true, &format!("{n} declared images"));
            Ok(list)
        }
        Err(ClientError::Refused { status, .. }) if status == 404 || status == 405 => {
            Err(Failure::new(
                "no_declared_images_support",
                format!(
                    "this daemon has no GET /api/v1/images (HTTP {status}): it predates declared \
                     images ([[images]]); `cache list` shows what it has cached"
                ),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// Asks one host to fetch an image into its cache (`body`, sent with `key` as its
/// Idempotency-Key) and follows the job to its end.
pub(crate) async fn prefetch(api: &Api, line: &HostLine, body: &Value, key: &str) -> Outcome {
    line.show("submitting", "", Some(0.0));
    let accepted = submit(api, body, key).await?;
    let id = accepted["job_id"]
        .as_str()
        .and_then(|id| uuid::Uuid::parse_str(id).ok())
        .ok_or_else(|| Failure::new("protocol", "no job id (a UUID) in the answer"))?
        .to_string();
    line.show("accepted", &format!("job {id}"), Some(0.0));
    let last = follow(api, line, &id).await?;
    let job: JobView = serde_json::from_value(last.clone())
        .map_err(|e| Failure::new("protocol", format!("job status: {e}")))?;
    match job.status.as_str() {
        "completed" => {
            let hit = if job.cache_hit { " (cache hit)" } else { "" };
            let size = HumanBytes(job.progress.bytes_total);
            line.done(true, &format!("cached, {size}{hit}"));
            Ok(last)
        }
        status => Err(Failure::new(
            if status == "cancelled" {
                "job_cancelled"
            } else {
                "job_failed"
            },
            format!(
                "job {id} {status}: {}",
                job.error.as_deref().unwrap_or("no reason given")
            ),
        )),
    }
}

/// POSTs the prefetch; a request lost on the way (not refused) is sent again with the same
/// Idempotency-Key, which cannot make a second job.
async fn submit(api: &Api, body: &Value, key: &str) -> Result<Value, ClientError> {
    let mut attempt = 0;
    loop {
        match api.post("/api/v1/cache/fetch", body, Some(key)).await {
            Err(ClientError::Connect { kind, .. })
                if attempt < 2 && kind != ConnectKind::Refused =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(attempt)).await;
            }
            other => return other.map(|(_, v)| v),
        }
    }
}

/// Polls a job until it is terminal, showing its stage and percent; its last status.
async fn follow(api: &Api, line: &HostLine, id: &str) -> Result<Value, ClientError> {
    let mut unreachable_since: Option<Instant> = None;
    loop {
        match api.get(&format!("/api/v1/jobs/{id}")).await {
            Ok(value) => {
                unreachable_since = None;
                let job: JobView = serde_json::from_value(value.clone())
                    .map_err(|e| ClientError::Protocol(format!("job status: {e}")))?;
                if job.is_terminal() {
                    return Ok(value);
                }
                show_job(line, &job);
            }
            Err(e) if e.is_unreachable() => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > OUTAGE_GRACE {
                    return Err(e);
                }
                line.show("reconnecting", &format!("job {id}: {e}"), None);
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn show_job(line: &HostLine, job: &JobView) {
    let p = &job.progress;
    let state = if job.status == "pending" {
        "queued"
    } else {
        p.stage.as_str()
    };
    let mut detail = format!("{:5.1}%", p.percent);
    if p.bytes_total > 0 {
        detail += &format!(
            "  {}/{}",
            HumanBytes(p.bytes_processed),
            HumanBytes(p.bytes_total)
        );
    }
    line.show(state, &detail, Some(p.percent));
}
