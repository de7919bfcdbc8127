//! The progress stream, `GET /api/v1/jobs/{id}/events` (Server-Sent Events): the job's
//! StatusResponse at once, then one event per stored change (state changes at once, progress
//! at most every `PROGRESS_INTERVAL`), ending after the terminal state. Each event's `id` is
//! the record's `updated_at` in microseconds, so a client reconnecting with `Last-Event-ID`
//! is not sent a state it already has. Heartbeat comments keep idle proxies from closing the
//! stream; at most `server.max_event_streams` streams are open at once and at most
//! `server.max_event_streams_per_peer` from one client address (429 beyond), and
//! every stream ends when the daemon shuts down or the client goes away.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warp::Reply;
use warp::reply::Response;
use warp::sse::Event;

use super::auth::Caller;
use super::conn::ConnInfo;
use super::error::{ApiError, Reason};
use super::state::ApiState;
use super::streams::StreamSlot;
use super::views::StatusResponse;
use crate::jobs::model::Job;
use crate::jobs::store::Store;

/// Least time between two progress events of one stream (state changes are not held back).
pub(crate) const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Events of one stream waiting for the client to read them.
const EVENTS_BUFFERED: usize = 8;
/// Time between heartbeat comments while nothing changes.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// The event id of a record: when it was last updated, in microseconds.
fn event_id(job: &Job) -> i64 {
    job.updated_at.timestamp_micros()
}

/// `Last-Event-ID` as a number; anything else counts as absent (the stream starts over).
pub(crate) fn parse_last_event_id(headers: &http::HeaderMap) -> Option<i64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

pub(crate) async fn events(
    raw_id: String,
    caller: Result<Caller, ApiError>,
    conn: Option<ConnInfo>,
    headers: http::HeaderMap,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    caller?;
    let id = super::handlers::parse_job_id(&raw_id)?;
    let server = &state.settings.current().server;
    let slot = state
        .event_streams
        .take(
            server.max_event_streams,
            server.max_event_streams_per_peer,
            conn.map(|c| c.remote.ip()),
        )
        .map_err(|refusal| refusal.into_error(id))?;
    let store = state.engine.store().clone();
    // Subscribed before the first read, so no change between the two is missed.
    let updates = store.subscribe();
    let job = store
        .get_job(id)
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| ApiError::not_found(Reason::JobNotFound, format!("job {id} not found")))?;
    let (tx, mut rx) = mpsc::channel::<Event>(EVENTS_BUFFERED);
    let engine = state.engine.clone();
    let feed = Feed {
        id,
        store,
        queue_position: Box::new(move |id| engine.queue_position(id)),
        tx,
        stopping: state.stopping.clone(),
    };
    tokio::spawn(feed.run(job, updates, parse_last_event_id(&headers), slot));
    let stream =
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>)));
    let stream = warp::sse::keep_alive().interval(HEARTBEAT).stream(stream);
    let mut resp = warp::sse::reply(stream).into_response();
    // Proxies such as nginx buffer responses unless told not to.
    resp.headers_mut()
        .insert("x-accel-buffering", http::HeaderValue::from_static("no"));
    Ok(resp)
}

/// What one stream's task needs.
struct Feed {
    id: Uuid,
    store: Store,
    /// The job's place in the queue (shown while it is pending).
    queue_position: Box<dyn Fn(Uuid) -> Option<usize> + Send + Sync>,
    /// Events to the response (a few at most: a slow reader holds the feed back, and the
    /// feed then skips to the latest stored state); closed when the client goes away.
    tx: mpsc::Sender<Event>,
    /// Fires when the daemon shuts down.
    stopping: CancellationToken,
}

impl Feed {
    /// Sends the job's states until it is terminal, the client leaves or the daemon stops.
    async fn run(
        self,
        job: Job,
        mut updates: broadcast::Receiver<Arc<Job>>,
        last_event_id: Option<i64>,
        _slot: StreamSlot,
    ) {
        let mut sent: Option<Job> = None;
        if last_event_id.is_some_and(|seen| seen >= event_id(&job)) {
            // The client has this state; a terminal one ends the stream with nothing new.
            sent = Some(job.clone());
        } else if !self.send(&job).await {
            return;
        }
        let mut last_sent_at = Instant::now();
        let mut held: Option<Job> = None;
        let mut current = job;
        while !current.status.is_terminal() {
            let due = last_sent_at + PROGRESS_INTERVAL;
            tokio::select! {
                _ = self.tx.closed() => return,
                _ = self.stopping.cancelled() => return,
                _ = tokio::time::sleep_until(due), if held.is_some() => {
                    let job = held.take().expect("checked");
                    if !self.send(&job).await {
                        return;
                    }
                    last_sent_at = Instant::now();
                    sent = Some(job);
                    continue;
                }
                update = updates.recv() => match update {
                    Ok(job) if job.id == self.id => current = (*job).clone(),
                    Ok(_) => continue,
                    // Fell behind: the stored record is the latest state.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        match self.store.get_job(self.id) {
                            Ok(Some(job)) => current = job,
                            _ => return,
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
            let state_changed = sent.as_ref().is_none_or(|s| s.status != current.status);
            if state_changed || Instant::now() >= due {
                held = None;
                if !self.send(&current).await {
                    return;
                }
                last_sent_at = Instant::now();
                sent = Some(current.clone());
            } else {
                held = Some(current.clone());
            }
        }
    }

    /// Sends one event; `false` when the client is gone.
    async fn send(&self, job: &Job) -> bool {
        let view = StatusResponse::from_job(job, (self.queue_position)(job.id));
        let Ok(data) = serde_json::to_string(&view) else {
            return false;
        };
        let event = Event::default().id(event_id(job).to_string()).data(data);
        self.tx.send(event).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::streams::StreamCount;

    /// A client that reads nothing while a job makes thousands of updates: the feed keeps at
    /// most `EVENTS_BUFFERED` events for it (no backlog grows), and once the client reads, it
    /// skips to the latest state and ends with the terminal one.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_gets_a_bounded_backlog_and_then_the_latest_state() {
        use crate::jobs::model::{JobStatus, tests::job};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut j = job();
        j.transition(JobStatus::Running, None, chrono::Utc::now())
            .unwrap();
        store.put_job_nowait(&j).unwrap();
        let (tx, mut rx) = mpsc::channel::<Event>(EVENTS_BUFFERED);
        let feed = Feed {
            id: j.id,
            store: store.clone(),
            queue_position: Box::new(|_| None),
            tx,
            stopping: CancellationToken::new(),
        };
        let count = StreamCount::default();
        let slot = count.take(1, 1, None).unwrap();
        let task = tokio::spawn(feed.run(j.clone(), store.subscribe(), None, slot));
        const UPDATES: u32 = 5_000;
        for i in 1..=UPDATES {
            j.progress.percent = f64::from(i) * 99.0 / f64::from(UPDATES);
            j.updated_at += chrono::Duration::microseconds(1);
            store.put_job_nowait(&j).unwrap();
            tokio::time::advance(Duration::from_millis(100)).await;
            tokio::task::yield_now().await;
        }
        assert_eq!(
            rx.len(),
            EVENTS_BUFFERED,
            "the feed waits for the reader instead of queueing"
        );
        assert!(!task.is_finished());
        j.transition(JobStatus::Completed, None, chrono::Utc::now())
            .unwrap();
        j.updated_at += chrono::Duration::seconds(1);
        store.put_job_nowait(&j).unwrap();
        let mut received = Vec::new();
        while let Some(event) = rx.recv().await {
            received.push(format!("{event:?}"));
        }
        task.await.unwrap();
        assert!(
            received.len() <= EVENTS_BUFFERED + 2,
            "{} events after {UPDATES} updates",
            received.len()
        );
        let last = received.last().unwrap();
        assert!(last.contains("completed"), "{last}");
        assert_eq!(count.open(), 0, "the slot came back");
    }

    #[test]
    fn last_event_id_must_be_a_number() {
        let mut h = http::HeaderMap::new();
        assert_eq!(parse_last_event_id(&h), None);
        h.insert("last-event-id", "1733050000000000".parse().unwrap());
        assert_eq!(parse_last_event_id(&h), Some(1_733_050_000_000_000));
        h.insert("last-event-id", "abc".parse().unwrap());
        assert_eq!(parse_last_event_id(&h), None);
    }
}
