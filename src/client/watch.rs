//! Following a job to its end: the progress stream (`GET /api/v1/jobs/{id}/events`, resumed
//! with `Last-Event-ID` when the connection drops; polling when the server refuses a stream),
//! shown as a live bar on a terminal (stage, percent, bytes, rate, ETA) or as plain lines
//! otherwise, and Ctrl-C, which asks whether to cancel the job.

use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use indicatif::{HumanBytes, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use serde_json::Value;

use super::http::{Api, ClientError};

/// Progress streams that break off without the daemon going away, before the command gives up.
const MAX_RECONNECTS: u32 = 10;
/// How long the command keeps trying while the daemon cannot be reached (a restart: the job
/// survives it).
const RECONNECT_FOR: Duration = Duration::from_secs(120);
/// A progress stream that sends nothing (not even the daemon's heartbeat) for this long is
/// dropped and asked for again.
const STREAM_SILENCE: Duration = Duration::from_secs(45);
/// Poll interval when no stream can be had.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Least time between two plain progress lines of the same stage.
const PLAIN_LINE_INTERVAL: Duration = Duration::from_secs(5);

/// The fields of a StatusResponse this command shows; every string as it may be printed on a
/// terminal (control characters escaped).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct JobView {
    #[serde(deserialize_with = "escaped")]
    pub(crate) job_id: String,
    #[serde(deserialize_with = "escaped")]
    pub(crate) status: String,
    pub(crate) progress: ProgressView,
    #[serde(default, deserialize_with = "escaped_opt")]
    pub(crate) error: Option<String>,
    #[serde(default, deserialize_with = "escaped_opt")]
    pub(crate) volume_path: Option<String>,
    #[serde(default, deserialize_with = "escaped_opt")]
    pub(crate) image_path: Option<String>,
    #[serde(default)]
    pub(crate) cache_hit: bool,
    pub(crate) queue_position: Option<u64>,
    /// Where an encrypted volume's key is.
    #[serde(default)]
    pub(crate) encryption: Option<EncryptionView>,
}

/// The `encryption` of a job's status: the libvirt secret or the key file.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct EncryptionView {
    #[serde(default, deserialize_with = "escaped_opt")]
    pub(crate) secret_uuid: Option<String>,
    #[serde(default, deserialize_with = "escaped_opt")]
    pub(crate) key_file: Option<String>,
}

impl EncryptionView {
    /// `encrypted (LUKS), key in libvirt secret <uuid>` or `... in <file>`.
    pub(crate) fn describe(&self) -> String {
        match (&self.secret_uuid, &self.key_file) {
            (Some(uuid), _) => format!("encrypted (LUKS), key in libvirt secret {uuid}"),
            (None, Some(file)) => format!("encrypted (LUKS), key in {file}"),
            (None, None) => "encrypted (LUKS)".into(),
        }
    }
}

/// A job's progress as the API sends it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ProgressView {
    #[serde(deserialize_with = "escaped")]
    pub(crate) stage: String,
    pub(crate) percent: f64,
    pub(crate) bytes_processed: u64,
    pub(crate) bytes_total: u64,
    pub(crate) eta_seconds: Option<f64>,
}

/// A string of the server's, escaped for a terminal.
fn escaped<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    Ok(crate::text::escape(&s).into_owned())
}

fn escaped_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    Ok(s.map(|s| crate::text::escape(&s).into_owned()))
}

impl JobView {
    pub(crate) fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }
}

/// How the waiting ended.
pub(crate) enum Outcome {
    /// The job reached a terminal state (its last StatusResponse, as sent).
    Finished(Value),
    /// Ctrl-C and the job was left running.
    Detached,
}

/// Where progress goes.
pub(crate) enum Display {
    /// A live bar on the terminal.
    Bar(Box<LiveBar>),
    /// A line per state change and every few seconds.
    Plain(PlainLines),
    /// Nothing (`--output json`: stdout carries only the final body).
    Quiet,
}

impl Display {
    /// The bar on a terminal, plain lines when stdout is not one or `NO_COLOR` is set, and
    /// nothing for `--output json`.
    pub(crate) fn choose(json: bool) -> Display {
        if json {
            Display::Quiet
        } else if std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
            Display::Bar(Box::new(LiveBar::new()))
        } else {
            Display::Plain(PlainLines::default())
        }
    }

    fn show(&mut self, job: &JobView) {
        match self {
            Display::Bar(bar) => bar.show(job),
            Display::Plain(lines) => lines.show(job),
            Display::Quiet => {}
        }
    }

    /// Runs `f` (a prompt) with the bar out of the way.
    fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match self {
            Display::Bar(bar) => bar.bar.suspend(f),
            _ => f(),
        }
    }

    fn finish(&mut self) {
        if let Display::Bar(bar) = self {
            bar.bar.finish_and_clear();
        }
    }
}

/// The terminal bar and what it needs to compute a rate.
pub(crate) struct LiveBar {
    bar: ProgressBar,
    /// Stage, bytes and time of the previous update (for the rate).
    last: Option<(String, u64, Instant)>,
    /// Smoothed bytes per second of the current stage.
    rate: Option<f64>,
}

impl LiveBar {
    fn new() -> LiveBar {
        let bar = ProgressBar::with_draw_target(Some(1000), ProgressDrawTarget::stdout());
        bar.set_style(
            ProgressStyle::with_template("{prefix:>12} [{bar:40}] {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        LiveBar {
            bar,
            last: None,
            rate: None,
        }
    }

    fn show(&mut self, job: &JobView) {
        let p = &job.progress;
        let now = Instant::now();
        if let Some((stage, bytes, at)) = &self.last {
            let secs = now.duration_since(*at).as_secs_f64();
            if *stage == p.stage && p.bytes_processed >= *bytes && secs > 0.05 {
                let sample = (p.bytes_processed - bytes) as f64 / secs;
                self.rate = Some(self.rate.map_or(sample, |r| 0.7 * r + 0.3 * sample));
            } else if *stage != p.stage {
                self.rate = None;
            }
        }
        self.last = Some((p.stage.clone(), p.bytes_processed, now));
        self.bar.set_prefix(p.stage.clone());
        self.bar.set_position((p.percent * 10.0).round() as u64);
        let mut msg = format!("{:5.1}%", p.percent);
        if p.bytes_total > 0 {
            msg += &format!(
                "  {}/{}",
                HumanBytes(p.bytes_processed),
                HumanBytes(p.bytes_total)
            );
        }
        if let Some(rate) = self.rate.filter(|r| *r > 0.0) {
            msg += &format!("  {}/s", HumanBytes(rate as u64));
        }
        if let Some(eta) = p.eta_seconds {
            msg += &format!(
                "  ETA {}",
                HumanDuration(Duration::from_secs_f64(eta.max(0.0)))
            );
        }
        if let Some(pos) = job.queue_position.filter(|_| job.status == "pending") {
            msg += &format!("  (queued, position {pos})");
        }
        self.bar.set_message(msg);
    }
}

/// Plain progress lines: one per state or stage change, else one every few seconds.
#[derive(Default)]
pub(crate) struct PlainLines {
    last: Option<(String, String, Instant)>,
}

impl PlainLines {
    fn show(&mut self, job: &JobView) {
        if job.is_terminal() {
            return;
        }
        let p = &job.progress;
        let now = Instant::now();
        let changed = self.last.as_ref().is_none_or(|(status, stage, at)| {
            *status != job.status
                || *stage != p.stage
                || now.duration_since(*at) >= PLAIN_LINE_INTERVAL
        });
        if !changed {
            return;
        }
        self.last = Some((job.status.clone(), p.stage.clone(), now));
        let mut line = format!(
            "job {}: {} {} {:.1}%",
            job.job_id, job.status, p.stage, p.percent
        );
        if p.bytes_total > 0 {
            line += &format!(
                " ({} of {})",
                HumanBytes(p.bytes_processed),
                HumanBytes(p.bytes_total)
            );
        }
        if let Some(eta) = p.eta_seconds {
            line += &format!(
                " ETA {}",
                HumanDuration(Duration::from_secs_f64(eta.max(0.0)))
            );
        }
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
}

/// What Ctrl-C does while waiting.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OnInterrupt {
    /// Cancel the job without asking (`--cancel-on-interrupt`).
    Cancel,
    /// Ask on the terminal; leave the job running when there is none to ask on.
    Ask,
}

/// Follows job `id` until it ends or the user interrupts.
pub(crate) async fn follow(
    api: &Api,
    id: &str,
    display: Display,
    on_interrupt: OnInterrupt,
) -> Result<Outcome, ClientError> {
    // Shared by the stream (which updates it between awaits) and the Ctrl-C prompt.
    let display = RefCell::new(display);
    let display = &display;
    let watching = watch_events(api, id, display);
    let mut watching = std::pin::pin!(watching);
    loop {
        tokio::select! {
            r = &mut watching => {
                display.borrow_mut().finish();
                return r.map(Outcome::Finished);
            }
            _ = tokio::signal::ctrl_c() => {
                if should_cancel(&display.borrow(), id, on_interrupt) {
                    display.borrow_mut().finish();
                    let (_, body) = api
                        .post(&format!("/api/v1/jobs/{id}/cancel"), &Value::Object(Default::default()), None)
                        .await?;
                    eprintln!("cancel requested for job {id} ({})", body["status"].as_str().unwrap_or("?"));
                    // Follow the job to its cancelled state.
                    let quiet = RefCell::new(Display::Quiet);
                    return watch_events(api, id, &quiet).await.map(Outcome::Finished);
                }
                if !std::io::stdin().is_terminal() {
                    display.borrow_mut().finish();
                    return Ok(Outcome::Detached);
                }
                // Answered no: keep watching.
            }
        }
    }
}

/// Whether Ctrl-C should cancel the job (asking when a person can answer).
fn should_cancel(display: &Display, id: &str, on_interrupt: OnInterrupt) -> bool {
    match on_interrupt {
        OnInterrupt::Cancel => true,
        OnInterrupt::Ask if std::io::stdin().is_terminal() => display.suspend(|| {
            eprint!("\ncancel job {id}? [y/N] ");
            let _ = std::io::stderr().flush();
            let mut answer = String::new();
            let _ = std::io::stdin().read_line(&mut answer);
            let yes = matches!(answer.trim(), "y" | "Y" | "yes");
            if !yes {
                eprintln!("not cancelled; still following (Ctrl-C again to ask again)");
            }
            yes
        }),
        OnInterrupt::Ask => {
            eprintln!(
                "\ninterrupted: job {id} was not cancelled and goes on; follow it with `job watch \
                 {id}` or pass --cancel-on-interrupt"
            );
            false
        }
    }
}

/// What the command has seen of a job's stream so far.
#[derive(Default)]
struct Seen {
    /// The id of the last event (sent back as `Last-Event-ID` on reconnect).
    event_id: Option<String>,
    /// The last status.
    status: Option<Value>,
}

/// How one progress stream ended.
enum StreamEnd {
    /// With the job's terminal status.
    Terminal(Value),
    /// The server refused a stream (429): poll instead.
    Refused,
    /// Before the terminal state (connection cut, daemon restarting, idle).
    BrokeOff,
}

/// Reads the progress stream until the terminal event. When the connection ends early it
/// reconnects (with `Last-Event-ID`); while the daemon cannot be reached (it restarts, a
/// proxy in front says 502-504) it keeps trying with backoff for `RECONNECT_FOR`, since the
/// job survives a restart; it polls when the server refuses a stream.
async fn watch_events(
    api: &Api,
    id: &str,
    display: &RefCell<Display>,
) -> Result<Value, ClientError> {
    let mut seen = Seen::default();
    let mut outage = Outage::default();
    let mut broke_off = 0;
    loop {
        match stream_once(api, id, display, &mut seen).await {
            Ok(StreamEnd::Terminal(value)) => return Ok(value),
            Ok(StreamEnd::Refused) => return poll(api, id, display).await,
            Ok(StreamEnd::BrokeOff) => outage.clear(),
            Err(e) => {
                outage.wait_or_give_up(e).await?;
                continue;
            }
        }
        // The stream ended before the terminal state; a finished job whose final state the
        // client already has sends nothing more, so ask for the job itself.
        match api.get(&format!("/api/v1/jobs/{id}")).await {
            Ok(current) => {
                if serde_json::from_value::<JobView>(current.clone()).is_ok_and(|j| j.is_terminal())
                {
                    return Ok(current);
                }
            }
            Err(e) => {
                outage.wait_or_give_up(e).await?;
                continue;
            }
        }
        broke_off += 1;
        if broke_off > MAX_RECONNECTS {
            return Err(ClientError::connect(
                super::http::ConnectKind::Closed,
                format!("the progress stream of job {id} broke off {MAX_RECONNECTS} times"),
            ));
        }
    }
}

/// One progress stream, from the request to its end.
async fn stream_once(
    api: &Api,
    id: &str,
    display: &RefCell<Display>,
    seen: &mut Seen,
) -> Result<StreamEnd, ClientError> {
    let mut req = api.stream_request(&format!("/api/v1/jobs/{id}/events"));
    if let Some(event_id) = &seen.event_id {
        req = req.header("last-event-id", event_id);
    }
    let resp = req.send().await.map_err(|e| api.explain(&e))?;
    if resp.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
        return Ok(StreamEnd::Refused);
    }
    if !resp.status().is_success() {
        api.json_of(resp).await?;
        return Err(ClientError::Protocol(
            "error status without error body".into(),
        ));
    }
    let mut events = super::http::bounded_lines(resp.bytes_stream()).eventsource();
    loop {
        // The daemon sends a heartbeat comment every few seconds: silence means it is gone.
        let event = match tokio::time::timeout(STREAM_SILENCE, events.next()).await {
            Ok(Some(Ok(event))) => event,
            Ok(Some(Err(_)) | None) | Err(_) => return Ok(StreamEnd::BrokeOff),
        };
        if event.data.is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&event.data)
            .map_err(|e| ClientError::Protocol(format!("progress event: {e}")))?;
        let job: JobView = serde_json::from_value(value.clone())
            .map_err(|e| ClientError::Protocol(format!("progress event: {e}")))?;
        if !event.id.is_empty() {
            seen.event_id = Some(event.id.clone());
        }
        display.borrow_mut().show(&job);
        seen.status = Some(value.clone());
        if job.is_terminal() {
            return Ok(StreamEnd::Terminal(value));
        }
    }
}

/// A time during which the daemon could not be reached.
#[derive(Default)]
struct Outage {
    /// When it began, and the attempts since.
    since: Option<(Instant, u32)>,
}

impl Outage {
    /// The daemon answered again.
    fn clear(&mut self) {
        self.since = None;
    }

    /// Waits before the next attempt when `e` says the daemon cannot be reached (for at most
    /// `RECONNECT_FOR` in all); any other error, or a longer outage, ends the command.
    async fn wait_or_give_up(&mut self, e: ClientError) -> Result<(), ClientError> {
        if !e.is_unreachable() {
            return Err(e);
        }
        let (since, attempts) = self.since.get_or_insert((Instant::now(), 0));
        if since.elapsed() >= RECONNECT_FOR {
            return Err(e);
        }
        *attempts += 1;
        if *attempts == 1 {
            eprintln!(
                "the daemon cannot be reached ({e}); retrying for up to {}s",
                RECONNECT_FOR.as_secs()
            );
        }
        let backoff = Duration::from_millis(250 << (*attempts).min(5)).min(Duration::from_secs(5));
        tokio::time::sleep(backoff).await;
        Ok(())
    }
}

/// Polls `GET /api/v1/jobs/{id}` until the job ends (through daemon restarts, as above).
async fn poll(api: &Api, id: &str, display: &RefCell<Display>) -> Result<Value, ClientError> {
    let mut outage = Outage::default();
    loop {
        let value = match api.get(&format!("/api/v1/jobs/{id}")).await {
            Ok(value) => {
                outage.clear();
                value
            }
            Err(e) => {
                outage.wait_or_give_up(e).await?;
                continue;
            }
        };
        let job: JobView = serde_json::from_value(value.clone())
            .map_err(|e| ClientError::Protocol(format!("job status: {e}")))?;
        display.borrow_mut().show(&job);
        if job.is_terminal() {
            return Ok(value);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
