//! The SHA-256 of a download, computed once, in order, on a thread of its own (off the tasks
//! that receive the bytes). Parts arrive out of order: the bytes of the part at the hash
//! frontier are hashed as they come, later parts wait in memory until the frontier reaches
//! them. The scheduler starts a part only within `window` parts of the frontier, so at most
//! `(window - 1) * part_size` bytes wait here (the reorder window; docs/design.md). Parts
//! already on disk from an earlier run are read back from the partial file instead.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

/// What part tasks send.
pub(super) enum Feed {
    /// The next bytes of a part (in order within the part).
    Bytes(usize, Bytes),
    /// The part is complete.
    End(usize),
}

/// The hash state after a number of whole parts (for checkpoints).
#[derive(Clone)]
pub(super) struct HashedPrefix {
    pub(super) parts: usize,
    pub(super) state: Vec<u8>,
}

/// A running hasher: feed it, watch its frontier, take its states, then join it.
pub(super) struct Hasher {
    pub(super) feed: mpsc::UnboundedSender<Feed>,
    /// Parts hashed so far (the frontier).
    pub(super) frontier: watch::Receiver<usize>,
    /// Recent states at part boundaries, oldest first.
    pub(super) prefixes: Arc<Mutex<VecDeque<HashedPrefix>>>,
    thread: tokio::task::JoinHandle<std::io::Result<String>>,
}

/// Where the hasher starts and what it reads from disk.
pub(super) struct Start {
    pub(super) state: Sha256,
    /// Parts already hashed.
    pub(super) hashed: usize,
    /// `on_disk[i]`: part `i` is in the partial file from an earlier run (read it back).
    pub(super) on_disk: Vec<bool>,
    pub(super) part_size: u64,
    pub(super) size: u64,
    pub(super) file: Arc<File>,
}

/// Prefix states kept for checkpoints (a checkpoint needs one at or below its synced prefix).
const KEPT_PREFIXES: usize = 256;

impl Hasher {
    pub(super) fn spawn(start: Start) -> Hasher {
        let (feed, rx) = mpsc::unbounded_channel();
        let (frontier_tx, frontier) = watch::channel(start.hashed);
        // The starting state is a prefix too: a checkpoint taken before the first part is
        // hashed still records which parts are on disk (resume does not wait for part 0).
        let prefixes = Arc::new(Mutex::new(VecDeque::from([HashedPrefix {
            parts: start.hashed,
            state: start.state.serialize().to_vec(),
        }])));
        let p = prefixes.clone();
        let thread = tokio::task::spawn_blocking(move || run(start, rx, frontier_tx, p));
        Hasher {
            feed,
            frontier,
            prefixes,
            thread,
        }
    }

    /// The hex digest, once every part was fed (drop the other senders first).
    pub(super) async fn finish(self) -> std::io::Result<String> {
        drop(self.feed);
        self.thread
            .await
            .map_err(|e| std::io::Error::other(format!("hasher thread: {e}")))?
    }

    /// The newest state at or below `parts` whole parts.
    pub(super) fn prefix_at_most(&self, parts: usize) -> Option<HashedPrefix> {
        let prefixes = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        prefixes.iter().rev().find(|p| p.parts <= parts).cloned()
    }
}

fn run(
    start: Start,
    mut rx: mpsc::UnboundedReceiver<Feed>,
    frontier: watch::Sender<usize>,
    prefixes: Arc<Mutex<VecDeque<HashedPrefix>>>,
) -> std::io::Result<String> {
    let parts = start.size.div_ceil(start.part_size).max(1) as usize;
    let mut hasher = start.state;
    let mut next = start.hashed;
    // Bytes of parts beyond the frontier, and which of them are complete.
    let mut waiting: BTreeMap<usize, Vec<Bytes>> = BTreeMap::new();
    let mut complete = vec![false; parts];
    let mut read_back = vec![0u8; 1 << 20];
    loop {
        if next >= parts {
            return Ok(hex::encode(hasher.finalize()));
        }
        if start.on_disk[next] {
            let from = next as u64 * start.part_size;
            let to = (from + start.part_size).min(start.size);
            let mut off = from;
            while off < to {
                let n = ((to - off) as usize).min(read_back.len());
                start.file.read_exact_at(&mut read_back[..n], off)?;
                hasher.update(&read_back[..n]);
                off += n as u64;
            }
        } else {
            // Bytes that came while the part was beyond the frontier go first.
            for chunk in waiting.remove(&next).unwrap_or_default() {
                hasher.update(&chunk);
            }
        }
        if start.on_disk[next] || complete[next] {
            next += 1;
            let mut p = prefixes.lock().unwrap_or_else(|e| e.into_inner());
            p.push_back(HashedPrefix {
                parts: next,
                state: hasher.serialize().to_vec(),
            });
            if p.len() > KEPT_PREFIXES {
                p.pop_front();
            }
            drop(p);
            frontier.send_replace(next);
            continue;
        }
        match rx.blocking_recv() {
            Some(Feed::Bytes(part, bytes)) if part == next => hasher.update(&bytes),
            Some(Feed::Bytes(part, bytes)) => waiting.entry(part).or_default().push(bytes),
            Some(Feed::End(part)) => complete[part] = true,
            None => {
                return Err(std::io::Error::other(format!(
                    "the download ended at part {next} of {parts} before every part was hashed"
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_starting_state_is_a_prefix_before_any_part_is_hashed() {
        let h = Hasher::spawn(Start {
            state: Sha256::new(),
            hashed: 0,
            on_disk: vec![false; 4],
            part_size: 16,
            size: 64,
            file: Arc::new(tempfile::tempfile().unwrap()),
        });
        let prefix = h
            .prefix_at_most(0)
            .expect("a checkpoint needs no hashed part");
        assert_eq!(prefix.parts, 0);
        assert_eq!(prefix.state, Sha256::new().serialize().to_vec());
    }

    #[tokio::test]
    async fn parts_in_any_order_hash_like_the_whole() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let part = 1024u64;
        let tmp = tempfile::tempfile().unwrap();
        // Parts 2 and 5 are "on disk" from an earlier run.
        tmp.write_all_at(&data, 0).unwrap();
        let parts = data.len().div_ceil(part as usize);
        let mut on_disk = vec![false; parts];
        on_disk[2] = true;
        on_disk[5] = true;
        let h = Hasher::spawn(Start {
            state: Sha256::new(),
            hashed: 0,
            on_disk: on_disk.clone(),
            part_size: part,
            size: data.len() as u64,
            file: Arc::new(tmp),
        });
        let order = [9, 3, 0, 7, 1, 4, 8, 6];
        for &i in &order {
            let from = i * part as usize;
            let to = (from + part as usize).min(data.len());
            for chunk in data[from..to].chunks(100) {
                h.feed
                    .send(Feed::Bytes(i, Bytes::copy_from_slice(chunk)))
                    .unwrap();
            }
            h.feed.send(Feed::End(i)).unwrap();
        }
        let prefix = loop {
            if let Some(p) = h.prefix_at_most(4) {
                break p;
            }
            tokio::task::yield_now().await;
        };
        assert!(prefix.parts <= 4);
        let digest = h.finish().await.unwrap();
        assert_eq!(digest, hex::encode(Sha256::digest(&data)));
    }
}
