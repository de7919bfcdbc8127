//! Connections per client address: at most `server.max_connections_per_peer` open at once from
//! one peer, so a single host cannot take every connection slot before it has authenticated.
//! IPv4 peers count by address, IPv6 peers by their /64 (one host usually holds a whole /64),
//! IPv4-mapped IPv6 addresses as the IPv4 address they carry. Progress streams use the same
//! counting for `server.max_event_streams_per_peer` (`events.rs`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// Open connections per peer, shared by the listener and every connection task.
pub(crate) struct PeerSlots {
    /// Connections one peer may hold.
    limit: usize,
    /// Open connections by peer key; a peer with none has no entry.
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection of a peer; dropping it frees the slot.
pub(crate) struct PeerSlot {
    slots: Arc<PeerSlots>,
    key: IpAddr,
}

impl PeerSlots {
    pub(crate) fn new(limit: usize) -> Arc<PeerSlots> {
        Arc::new(PeerSlots {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a new connection from `ip`, or `None` when the peer already holds `limit`.
    pub(crate) fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        self.try_acquire_within(ip, self.limit)
    }

    /// A slot for `ip` under `limit` (a live setting read per request) instead of the limit
    /// given at construction.
    pub(crate) fn try_acquire_within(
        self: &Arc<Self>,
        ip: IpAddr,
        limit: usize,
    ) -> Option<PeerSlot> {
        let key = peer_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(key).or_insert(0);
        if *count >= limit {
            if *count == 0 {
                open.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            slots: self.clone(),
            key,
        })
    }

    #[cfg(test)]
    fn open_for(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap();
        open.get(&peer_key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The address connections are counted under.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_gets_at_most_limit_slots_and_others_are_unaffected() {
        let slots = PeerSlots::new(2);
        let a = slots.try_acquire(ip("127.0.0.2")).unwrap();
        let _b = slots.try_acquire(ip("127.0.0.2")).unwrap();
        assert!(slots.try_acquire(ip("127.0.0.2")).is_none());
        assert!(slots.try_acquire(ip("127.0.0.3")).is_some());
        drop(a);
        assert!(slots.try_acquire(ip("127.0.0.2")).is_some());
    }

    #[test]
    fn released_slots_leave_no_entry() {
        let slots = PeerSlots::new(1);
        drop(slots.try_acquire(ip("10.0.0.1")).unwrap());
        assert!(slots.open.lock().unwrap().is_empty());
    }

    #[test]
    fn ipv6_peers_count_by_slash_64_and_mapped_ipv4_as_ipv4() {
        let slots = PeerSlots::new(1);
        let _a = slots.try_acquire(ip("2001:db8:1:2::1")).unwrap();
        assert!(slots.try_acquire(ip("2001:db8:1:2:ffff::9")).is_none());
        assert!(slots.try_acquire(ip("2001:db8:1:3::1")).is_some());
        let _v4 = slots.try_acquire(ip("192.0.2.7")).unwrap();
        assert!(slots.try_acquire(ip("::ffff:192.0.2.7")).is_none());
        assert_eq!(slots.open_for(ip("::ffff:192.0.2.7")), 1);
    }
}
