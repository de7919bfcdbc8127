//! What a served connection is doing, for the limits hyper does not have: whether its first
//! request has arrived (`server.first_request_timeout`) and how long it has had no request in
//! progress (`server.h2_idle_timeout`; HTTP/2 pings are not requests, so a client answering
//! them still counts as idle). The request handler marks requests; the connection task waits.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Requests of one connection so far.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    /// Requests whose handler is running.
    open: usize,
    /// Requests whose headers have arrived, ever.
    started: u64,
}

/// Request activity of one connection.
pub(crate) struct Activity {
    load: watch::Sender<Load>,
}

/// A request in progress; dropping it ends the request.
pub(crate) struct InProgress(Arc<Activity>);

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity {
            load: watch::Sender::new(Load::default()),
        }
    }

    /// Marks a request whose headers have arrived, until the guard is dropped.
    pub(crate) fn request(self: &Arc<Self>) -> InProgress {
        self.load.send_modify(|l| {
            l.open += 1;
            l.started += 1;
        });
        InProgress(self.clone())
    }

    /// Resolves at `deadline` unless a request has arrived by then; otherwise never.
    pub(crate) async fn no_request_by(&self, deadline: Instant) {
        let mut rx = self.load.subscribe();
        let arrived = tokio::time::timeout_at(deadline, rx.wait_for(|l| l.started > 0))
            .await
            .is_ok();
        if arrived {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once no request has been in progress for `idle` without interruption.
    pub(crate) async fn idle_for(&self, idle: Duration) {
        let mut rx = self.load.subscribe();
        loop {
            let quiet = rx.wait_for(|l| l.open == 0).await.is_ok();
            if !quiet {
                return;
            }
            rx.mark_unchanged();
            tokio::select! {
                _ = tokio::time::sleep(idle) => return,
                // A request started (or ended) meanwhile: wait for quiet again.
                _ = rx.changed() => {}
            }
        }
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.load.send_modify(|l| l.open -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_end_of_the_last_request() {
        let activity = Arc::new(Activity::new());
        let started = Instant::now();
        let guard = activity.request();
        let idle = activity.idle_for(Duration::from_secs(10));
        tokio::pin!(idle);
        tokio::select! {
            _ = &mut idle => panic!("idle while a request is open"),
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        drop(guard);
        idle.await;
        assert_eq!(started.elapsed(), Duration::from_secs(40));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_restarts_the_idle_time() {
        let activity = Arc::new(Activity::new());
        let started = Instant::now();
        let idle = activity.idle_for(Duration::from_secs(10));
        tokio::pin!(idle);
        tokio::select! {
            _ = &mut idle => panic!("idle too early"),
            _ = tokio::time::sleep(Duration::from_secs(6)) => {}
        }
        drop(activity.request());
        idle.await;
        assert_eq!(started.elapsed(), Duration::from_secs(16));
    }

    #[tokio::test(start_paused = true)]
    async fn first_request_deadline() {
        let activity = Arc::new(Activity::new());
        let deadline = Instant::now() + Duration::from_secs(5);
        activity.no_request_by(deadline).await;
        assert_eq!(Instant::now(), deadline);

        let activity = Arc::new(Activity::new());
        drop(activity.request());
        tokio::select! {
            _ = activity.no_request_by(Instant::now() + Duration::from_secs(5)) => {
                panic!("a request arrived")
            }
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}
