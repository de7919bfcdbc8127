//! The bound on open progress streams (`server.max_event_streams`, and per client address
//! `server.max_event_streams_per_peer`): places taken as guards, given back when a stream ends.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use uuid::Uuid;

use super::error::{ApiError, Reason};
use super::peers::{PeerSlot, PeerSlots};

/// Streams open now: all of them (against `server.max_event_streams`) and per client address
/// (against `server.max_event_streams_per_peer`, counted as connections are in `peers.rs`), so
/// one host (many HTTP/1.1 connections, or one h2 connection's streams) cannot take them all.
pub(crate) struct StreamCount {
    all: Arc<AtomicUsize>,
    per_peer: Arc<PeerSlots>,
}

impl Default for StreamCount {
    fn default() -> Self {
        StreamCount {
            all: Arc::default(),
            per_peer: PeerSlots::new(usize::MAX),
        }
    }
}

/// One open stream's places in the counts, given back when the stream ends.
pub(crate) struct StreamSlot {
    all: Arc<AtomicUsize>,
    _peer: Option<PeerSlot>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.all.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Which bound refused a stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StreamRefusal {
    /// `server.max_event_streams` are open.
    All(usize),
    /// The client address holds `server.max_event_streams_per_peer`.
    Peer(usize),
}

impl StreamCount {
    /// Streams open now.
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.all.load(Ordering::SeqCst)
    }

    /// A place for one more stream from `peer` (unknown in in-process tests: only the overall
    /// bound applies), if fewer than `max` are open and the peer holds fewer than `per_peer`.
    pub(crate) fn take(
        &self,
        max: usize,
        per_peer: usize,
        peer: Option<IpAddr>,
    ) -> Result<StreamSlot, StreamRefusal> {
        let peer_slot = match peer {
            Some(ip) => Some(
                self.per_peer
                    .try_acquire_within(ip, per_peer)
                    .ok_or(StreamRefusal::Peer(per_peer))?,
            ),
            None => None,
        };
        self.all
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                (open < max).then_some(open + 1)
            })
            .map_err(|_| StreamRefusal::All(max))?;
        Ok(StreamSlot {
            all: self.all.clone(),
            _peer: peer_slot,
        })
    }
}

impl StreamRefusal {
    pub(crate) fn into_error(self, id: Uuid) -> ApiError {
        let message = match self {
            StreamRefusal::All(max) => format!(
                "{max} progress streams are open (server.max_event_streams); poll \
                 GET /api/v1/jobs/{id} or retry later"
            ),
            StreamRefusal::Peer(max) => format!(
                "this client address holds {max} progress streams \
                 (server.max_event_streams_per_peer); close one, poll GET /api/v1/jobs/{id} \
                 or retry later"
            ),
        };
        ApiError::too_many(Reason::TooManyStreams, message, 5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_count_is_bounded_and_slots_come_back() {
        let count = StreamCount::default();
        let a = count.take(2, 2, None).unwrap();
        let _b = count.take(2, 2, None).unwrap();
        assert_eq!(count.take(2, 2, None).err(), Some(StreamRefusal::All(2)));
        drop(a);
        assert!(count.take(2, 2, None).is_ok());
    }

    #[test]
    fn one_peer_cannot_take_every_stream() {
        let count = StreamCount::default();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let a = count.take(4, 2, ip("192.0.2.1")).unwrap();
        let _b = count.take(4, 2, ip("192.0.2.1")).unwrap();
        assert_eq!(
            count.take(4, 2, ip("192.0.2.1")).err(),
            Some(StreamRefusal::Peer(2))
        );
        // Another address still gets its streams, up to the overall bound.
        let _c = count.take(4, 2, ip("192.0.2.2")).unwrap();
        let _d = count.take(4, 2, ip("192.0.2.3")).unwrap();
        assert_eq!(
            count.take(4, 2, ip("192.0.2.4")).err(),
            Some(StreamRefusal::All(4))
        );
        // A refusal by the overall bound gives the peer's place back.
        drop(a);
        let _e = count.take(4, 2, ip("192.0.2.1")).unwrap();
        assert_eq!(count.all.load(Ordering::SeqCst), 4);
    }
}
