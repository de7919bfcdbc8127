//! The progress stream, `GET /api/v1/jobs/{id}/events` (Server-Sent Events): the job's
//! StatusResponse at once, then one event per stored change (state changes at once, progress
//! at most every `PROGRESS_INTERVAL`), ending after the terminal state. Each event's `id` is
//! the record's `updated_at` in microseconds, so a client reconnecting with `Last-Event-ID`
//! is not sent a state it already has. Heartbeat comments keep idle proxies from closing the
//! stream; at most `server.max_event_streams` streams are open at once (429 beyond), and
//! every stream ends when the daemon shuts down or the client goes away.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warp::Reply;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::sse::Event;

use super::ApiState;
use super::auth::Caller;
use super::error::ApiError;
use super::views::StatusResponse;
use crate::jobs::model::Job;
use crate::jobs::store::Store;

/// Least time between two progress events of one stream (state changes are not held back).
pub(crate) const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Time between heartbeat comments while nothing changes.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// Streams open now (counted against `server.max_event_streams`).
#[derive(Default)]
pub(crate) struct StreamCount(Arc<AtomicUsize>);

/// One open stream's place in the count, given back when the stream ends.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl StreamCount {
    /// A place for one more stream, if fewer than `max` are open.
    fn take(&self, max: usize) -> Option<StreamSlot> {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| StreamSlot(self.0.clone()))
    }
}

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
    headers: http::HeaderMap,
    state: Arc<ApiState>,
) -> Result<Response, ApiError> {
    caller?;
    let id = super::handlers::parse_job_id(&raw_id)?;
    let max = state.settings.current().server.max_event_streams;
    let slot = state.event_streams.take(max).ok_or_else(|| ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        message: format!(
            "{max} progress streams are open (server.max_event_streams); poll \
             GET /api/v1/jobs/{id} or retry later"
        ),
        retry_after: Some(5),
    })?;
    let store = state.engine.store().clone();
    // Subscribed before the first read, so no change between the two is missed.
    let updates = store.subscribe();
    let job = store
        .get_job(id)
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))?;
    let (tx, mut rx) = mpsc::channel::<Event>(8);
    let feed = Feed {
        id,
        store,
        state: state.clone(),
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
    state: Arc<ApiState>,
    /// Events to the response; closed when the client goes away.
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
        let view = StatusResponse::from_job(job, self.state.engine.queue_position(job.id));
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

    #[test]
    fn the_stream_count_is_bounded_and_slots_come_back() {
        let count = StreamCount::default();
        let a = count.take(2).unwrap();
        let _b = count.take(2).unwrap();
        assert!(count.take(2).is_none());
        drop(a);
        assert!(count.take(2).is_some());
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
