//! Single-flight downloads: at most one download per cache key. Jobs wanting the key join its
//! flight as waiters (a `cache_fetch` job is a waiter like any other). When the last waiter
//! leaves before the end (its job cancelled or timed out), the download is stopped, its
//! partial file stays for a later resume, and the flight leaves the table, so the next job
//! starts afresh instead of inheriting a result nobody waited for. Flights are told apart by
//! an id: a late waiter never removes a newer flight of the same key.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{CacheEntry, FetchError, Transfer};

pub(super) type FlightResult = Result<CacheEntry, FetchError>;
/// A download's outcome, awaited by every waiter.
pub(super) type SharedResult = Shared<BoxFuture<'static, FlightResult>>;

/// One running download.
struct Flight {
    id: u64,
    progress: watch::Receiver<Transfer>,
    result: SharedResult,
    /// Jobs waiting for this download.
    waiters: usize,
    /// Cancelled when the last waiter leaves early: the download task stops.
    stop: CancellationToken,
}

/// What a new download is given by the table.
pub(super) struct Start {
    /// The download stops when this is cancelled.
    pub(super) stop: CancellationToken,
    /// A stopped download of the same key that may still be winding down: the new one waits
    /// for its end before touching the partial file they share.
    pub(super) previous: Option<SharedResult>,
    /// Keys of the other downloads in flight (their partial files are not to be touched).
    pub(super) busy: Vec<String>,
}

/// The downloads in progress, by cache key.
#[derive(Default)]
pub(super) struct Flights {
    next_id: AtomicU64,
    table: Mutex<HashMap<String, Flight>>,
    /// Stopped downloads, until the next download of the key takes them as `previous`.
    stopping: Mutex<HashMap<String, SharedResult>>,
}

/// A job's place in a flight. Dropping it leaves the flight; the last one to leave before the
/// download ended stops it.
pub(super) struct Waiter<'a> {
    flights: &'a Flights,
    key: String,
    id: u64,
    pub(super) progress: watch::Receiver<Transfer>,
    pub(super) result: SharedResult,
}

impl Flights {
    /// Joins the download of `key`, starting it with `start` if none runs. `start` returns the
    /// progress channel and the download's outcome.
    pub(super) fn join<F>(&self, key: &str, start: F) -> Result<Waiter<'_>, FetchError>
    where
        F: FnOnce(
            Start,
        ) -> Result<
            (watch::Receiver<Transfer>, BoxFuture<'static, FlightResult>),
            FetchError,
        >,
    {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if !table.contains_key(key) {
            let previous = self
                .stopping
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(key);
            let stop = CancellationToken::new();
            let (progress, result) = start(Start {
                stop: stop.clone(),
                previous,
                busy: table.keys().cloned().collect(),
            })?;
            let flight = Flight {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                progress,
                result: result.shared(),
                waiters: 0,
                stop,
            };
            table.insert(key.to_string(), flight);
        }
        let flight = table.get_mut(key).expect("inserted above");
        flight.waiters += 1;
        Ok(Waiter {
            flights: self,
            key: key.to_string(),
            id: flight.id,
            progress: flight.progress.clone(),
            result: flight.result.clone(),
        })
    }

    /// Number of downloads in progress.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Waiter<'_> {
    /// The download ended (this waiter saw its outcome): the flight leaves the table, so a
    /// later job looks at the index (or starts a new download) instead of this outcome.
    pub(super) fn finished(&self) {
        let mut table = self.flights.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.get(&self.key).is_some_and(|f| f.id == self.id) {
            table.remove(&self.key);
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut table = self.flights.table.lock().unwrap_or_else(|e| e.into_inner());
        let Some(flight) = table.get_mut(&self.key).filter(|f| f.id == self.id) else {
            return; // finished, or already replaced by a newer flight
        };
        flight.waiters -= 1;
        if flight.waiters > 0 {
            return;
        }
        let flight = table.remove(&self.key).expect("looked up above");
        if flight.result.peek().is_none() {
            tracing::info!(key = %self.key, "no job waits for the download any more; stopping it");
            flight.stop.cancel();
            self.flights
                .stopping
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(self.key.clone(), flight.result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Started = (
        watch::Receiver<Transfer>,
        tokio::sync::oneshot::Sender<FlightResult>,
        CancellationToken,
    );

    /// Joins `key`, starting a flight whose outcome the test sends.
    fn join<'a>(flights: &'a Flights, key: &str, started: &mut Option<Started>) -> Waiter<'a> {
        flights
            .join(key, |start| {
                let (tx, rx) = watch::channel(Transfer::default());
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                *started = Some((rx.clone(), done_tx, start.stop));
                let fut = async move {
                    done_rx
                        .await
                        .unwrap_or_else(|_| Err(FetchError::Io("dropped".into())))
                }
                .boxed();
                drop(tx);
                Ok((rx, fut))
            })
            .unwrap()
    }

    #[tokio::test]
    async fn last_waiter_leaving_stops_the_download_and_clears_the_table() {
        let flights = Flights::default();
        let mut first = None;
        let a = join(&flights, "k", &mut first);
        let mut again = None;
        let b = join(&flights, "k", &mut again);
        assert!(again.is_none(), "the second job joins the running download");
        let (_, done, stop) = first.take().unwrap();
        drop(a);
        assert!(!stop.is_cancelled(), "another job still waits");
        drop(b);
        assert!(stop.is_cancelled(), "nobody waits: the download stops");
        assert_eq!(flights.len(), 0, "no stale flight stays behind");
        let _ = done.send(Err(FetchError::Stopped));

        // The next job starts a fresh download, told about the stopping one.
        let mut next = None;
        let c = flights
            .join("k", |start| {
                assert!(start.previous.is_some(), "waits for the stopped download");
                let (_tx, rx) = watch::channel(Transfer::default());
                next = Some(());
                Ok((rx, async { Err(FetchError::Stopped) }.boxed()))
            })
            .unwrap();
        assert!(next.is_some());
        drop(c);
    }

    #[tokio::test]
    async fn a_late_waiter_does_not_remove_a_newer_flight() {
        let flights = Flights::default();
        let mut first = None;
        let early = join(&flights, "k", &mut first);
        let late = join(&flights, "k", &mut None);
        let (_, done, _) = first.take().unwrap();
        let _ = done.send(Err(FetchError::Transfer("boom".into())));
        assert!(early.result.clone().await.is_err());
        // One job sees the outcome first; the flight leaves the table and a new one starts.
        early.finished();
        drop(early);
        let mut second = None;
        let newer = join(&flights, "k", &mut second);
        assert!(
            second.is_some(),
            "a new download started, not the old outcome"
        );
        // The other job of the old flight finishes and leaves afterwards.
        late.finished();
        drop(late);
        assert_eq!(flights.len(), 1, "the newer flight is still there");
        let (_, _, stop) = second.unwrap();
        assert!(!stop.is_cancelled(), "and still running");
        drop(newer);
    }
}
