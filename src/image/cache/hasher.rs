//! The in-order pass over a download: its SHA-256, computed once, and (for a compressed
//! object) the feed of the decoder, on a thread of its own, off the tasks that receive the
//! bytes. Part tasks write their bytes at their offsets in the partial file and only report
//! how far each part is written; this thread reads the bytes back in order (from the page
//! cache: they were just written) as the part at the frontier grows. Nothing waits in memory:
//! a download holds its parts' write blocks, one read buffer here and the decoder's buffers
//! (docs/design.md). The scheduler starts a part only within `window` parts of the frontier,
//! so what is read back is recent. Parts on disk from an earlier run are read the same way.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use super::decompress::{BLOCK, Compression, Content, DecompressError, Decompressor, MAGIC_LEN};

/// What part tasks report.
#[derive(Debug)]
pub(super) enum Feed {
    /// Part `.0` is in the file up to object offset `.1` (exclusive).
    Written(usize, u64),
    /// The part is complete.
    End(usize),
}

/// The hash state after a number of whole parts (for checkpoints).
#[derive(Clone)]
pub(super) struct HashedPrefix {
    pub(super) parts: usize,
    pub(super) state: Vec<u8>,
}

/// What the pass found: the digest of the object as downloaded and, for a compressed object,
/// the unwrapped image.
pub(super) struct Digests {
    pub(super) sha256: String,
    pub(super) content: Option<(Compression, Content)>,
}

/// Why the pass did not complete.
#[derive(Debug)]
pub(super) enum PassError {
    /// Reading the partial file, or the part tasks went away.
    Io(String),
    /// The compressed content was refused (corrupt, truncated, too large) or not written.
    Decompress(DecompressError),
}

/// A running pass: feed it, watch its frontier, take its states, then join it.
pub(super) struct Hasher {
    pub(super) feed: mpsc::UnboundedSender<Feed>,
    /// Parts hashed so far (the frontier).
    pub(super) frontier: watch::Receiver<usize>,
    /// Recent states at part boundaries, oldest first.
    pub(super) prefixes: Arc<Mutex<VecDeque<HashedPrefix>>>,
    thread: tokio::task::JoinHandle<Result<Digests, PassError>>,
}

/// Where compressed content is unwrapped to, and its bound.
pub(super) struct Unwrap {
    pub(super) dir: PathBuf,
    pub(super) key: String,
    /// Largest content accepted (bytes).
    pub(super) limit: u64,
}

/// Where the pass starts and what it reads.
pub(super) struct Start {
    pub(super) state: Sha256,
    /// Parts already hashed.
    pub(super) hashed: usize,
    /// `on_disk[i]`: part `i` is in the partial file from an earlier run.
    pub(super) on_disk: Vec<bool>,
    pub(super) part_size: u64,
    pub(super) size: u64,
    pub(super) file: Arc<File>,
    pub(super) unwrap: Unwrap,
}

/// Prefix states kept for checkpoints (a checkpoint needs one at or below its synced prefix).
const KEPT_PREFIXES: usize = 256;

impl Hasher {
    pub(super) fn spawn(start: Start) -> Hasher {
        // Messages are a few bytes each, one per written block: unbounded is bounded by the
        // object's size over the write block.
        let (feed, rx) = mpsc::unbounded_channel();
        let (frontier_tx, frontier) = watch::channel(start.hashed);
        // The starting state is a prefix too: a checkpoint taken before the first part is
        // hashed still records which parts are on disk (resume does not wait for part 0).
        let prefixes = Arc::new(Mutex::new(VecDeque::from([HashedPrefix {
            parts: start.hashed,
            state: start.state.serialize().to_vec(),
        }])));
        let p = prefixes.clone();
        let thread =
            tokio::task::spawn_blocking(move || Pass::new(start, rx, frontier_tx, p).run());
        Hasher {
            feed,
            frontier,
            prefixes,
            thread,
        }
    }

    /// The digests, once every part was reported (drop the other senders first).
    pub(super) async fn finish(self) -> Result<Digests, PassError> {
        drop(self.feed);
        self.thread
            .await
            .map_err(|e| PassError::Io(format!("hasher thread: {e}")))?
    }

    /// The newest state at or below `parts` whole parts.
    pub(super) fn prefix_at_most(&self, parts: usize) -> Option<HashedPrefix> {
        let prefixes = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        prefixes.iter().rev().find(|p| p.parts <= parts).cloned()
    }
}

/// The state of the pass thread.
struct Pass {
    start: Start,
    rx: mpsc::UnboundedReceiver<Feed>,
    frontier: watch::Sender<usize>,
    prefixes: Arc<Mutex<VecDeque<HashedPrefix>>>,
    parts: usize,
    /// `written[i]`: part `i` is in the file up to this object offset.
    written: Vec<u64>,
    /// The decoder, once the object's first bytes showed a wrapper.
    decoder: Option<Decompressor>,
    /// Whether the first bytes were looked at.
    detected: bool,
}

impl Pass {
    fn new(
        start: Start,
        rx: mpsc::UnboundedReceiver<Feed>,
        frontier: watch::Sender<usize>,
        prefixes: Arc<Mutex<VecDeque<HashedPrefix>>>,
    ) -> Pass {
        let parts = start.size.div_ceil(start.part_size).max(1) as usize;
        let written = (0..parts)
            .map(|i| {
                let r = part_range(&start, i);
                if start.on_disk[i] { r.end } else { r.start }
            })
            .collect();
        Pass {
            start,
            rx,
            frontier,
            prefixes,
            parts,
            written,
            decoder: None,
            detected: false,
        }
    }

    fn run(mut self) -> Result<Digests, PassError> {
        let mut hasher = self.start.state.clone();
        let mut next = self.start.hashed;
        let mut pos = next as u64 * self.start.part_size;
        let mut buf = vec![0u8; BLOCK];
        if pos > 0 {
            // A resumed download: the hash state covers the prefix, the decoder does not.
            self.detect()?;
            self.unwrap_prefix(pos, &mut buf)?;
        }
        loop {
            if next >= self.parts {
                return self.done(hex::encode(hasher.finalize()));
            }
            let range = part_range(&self.start, next);
            let avail = self.written[next];
            // Read whole blocks while the part grows; its last bytes once it is complete.
            if avail > pos && (avail - pos >= BLOCK as u64 || avail == range.end) {
                let n = ((avail - pos) as usize).min(BLOCK);
                if !self.detected {
                    if pos + (n as u64) < MAGIC_LEN.min(self.start.size as usize) as u64 {
                        self.wait()?;
                        continue;
                    }
                    self.detect()?;
                }
                let bytes = self.read(pos, n, &mut buf)?;
                hasher.update(bytes);
                self.unwrap_block(n, &buf)?;
                pos += n as u64;
                continue;
            }
            if pos == range.end {
                next += 1;
                self.hashed(next, &hasher);
                continue;
            }
            self.wait()?;
        }
    }

    /// Waits for the next report of a part task.
    fn wait(&mut self) -> Result<(), PassError> {
        match self.rx.blocking_recv() {
            Some(Feed::Written(part, upto)) => {
                self.written[part] = self.written[part].max(upto);
                Ok(())
            }
            Some(Feed::End(part)) => {
                self.written[part] = part_range(&self.start, part).end;
                Ok(())
            }
            None => Err(PassError::Io(
                "the download ended before every part was hashed".into(),
            )),
        }
    }

    /// Records the state after `parts` whole parts and moves the frontier.
    fn hashed(&self, parts: usize, hasher: &Sha256) {
        let mut p = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        p.push_back(HashedPrefix {
            parts,
            state: hasher.serialize().to_vec(),
        });
        if p.len() > KEPT_PREFIXES {
            p.pop_front();
        }
        drop(p);
        self.frontier.send_replace(parts);
    }

    fn read<'b>(&self, at: u64, n: usize, buf: &'b mut [u8]) -> Result<&'b [u8], PassError> {
        self.start
            .file
            .read_exact_at(&mut buf[..n], at)
            .map_err(|e| PassError::Io(format!("reading the partial file: {e}")))?;
        Ok(&buf[..n])
    }

    /// Looks at the object's first bytes (on disk by now) and starts a decoder for a wrapper.
    fn detect(&mut self) -> Result<(), PassError> {
        self.detected = true;
        let n = MAGIC_LEN.min(self.start.size as usize);
        let mut head = [0u8; MAGIC_LEN];
        self.read(0, n, &mut head)?;
        if let Some(compression) = Compression::detect(&head[..n]) {
            let u = &self.start.unwrap;
            let decoder = Decompressor::spawn(compression, &u.dir, &u.key, u.limit)
                .map_err(PassError::Decompress)?;
            self.decoder = Some(decoder);
        }
        Ok(())
    }

    /// Feeds the decoder the bytes before `upto` (a resumed prefix), read from the file.
    fn unwrap_prefix(&mut self, upto: u64, buf: &mut [u8]) -> Result<(), PassError> {
        if self.decoder.is_none() {
            return Ok(());
        }
        let mut at = 0;
        while at < upto {
            let n = ((upto - at) as usize).min(BLOCK);
            self.read(at, n, buf)?;
            self.unwrap_block(n, buf)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Hands `buf[..n]` (the next bytes of the object) to the decoder, if there is one.
    fn unwrap_block(&mut self, n: usize, buf: &[u8]) -> Result<(), PassError> {
        let Some(decoder) = &self.decoder else {
            return Ok(());
        };
        let sent = decoder.buffer().is_some_and(|mut b| {
            b.clear();
            b.extend_from_slice(&buf[..n]);
            decoder.send(b)
        });
        if sent {
            return Ok(());
        }
        let decoder = self.decoder.take().expect("checked");
        Err(PassError::Decompress(decoder.failure()))
    }

    fn done(mut self, sha256: String) -> Result<Digests, PassError> {
        let content = match self.decoder.take() {
            None => None,
            Some(d) => {
                let compression = d.compression();
                Some((compression, d.finish().map_err(PassError::Decompress)?))
            }
        };
        Ok(Digests { sha256, content })
    }
}

fn part_range(start: &Start, index: usize) -> std::ops::Range<u64> {
    let from = index as u64 * start.part_size;
    from..(from + start.part_size).min(start.size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(file: File, size: u64, part: u64, on_disk: Vec<bool>, dir: &std::path::Path) -> Start {
        Start {
            state: Sha256::new(),
            hashed: 0,
            on_disk,
            part_size: part,
            size,
            file: Arc::new(file),
            unwrap: Unwrap {
                dir: dir.to_path_buf(),
                key: "k".into(),
                limit: 1 << 30,
            },
        }
    }

    #[tokio::test]
    async fn the_starting_state_is_a_prefix_before_any_part_is_hashed() {
        let tmp = tempfile::tempdir().unwrap();
        let h = Hasher::spawn(start(
            tempfile::tempfile().unwrap(),
            64 << 20,
            16 << 20,
            vec![false; 4],
            tmp.path(),
        ));
        let prefix = h
            .prefix_at_most(0)
            .expect("a checkpoint needs no hashed part");
        assert_eq!(prefix.parts, 0);
        assert_eq!(prefix.state, Sha256::new().serialize().to_vec());
    }

    /// Writes the parts of `data` in a scrambled order, reporting each block, with parts 2
    /// and 5 "on disk" from an earlier run; the pass must see the whole in order.
    async fn scrambled(data: &[u8], dir: &std::path::Path) -> Digests {
        let part = 1u64 << 20;
        let tmp = tempfile::tempfile().unwrap();
        let parts = data.len().div_ceil(part as usize);
        let mut on_disk = vec![false; parts];
        for i in [2, 5] {
            on_disk[i] = true;
            let from = i * part as usize;
            tmp.write_all_at(
                &data[from..(from + part as usize).min(data.len())],
                from as u64,
            )
            .unwrap();
        }
        let file = tmp.try_clone().unwrap();
        let h = Hasher::spawn(start(tmp, data.len() as u64, part, on_disk, dir));
        let order = [9, 3, 0, 7, 1, 4, 8, 6].into_iter().chain(10..parts);
        for i in order {
            let from = i * part as usize;
            let to = (from + part as usize).min(data.len());
            for (j, chunk) in data[from..to].chunks(300_000).enumerate() {
                let at = from + j * 300_000;
                file.write_all_at(chunk, at as u64).unwrap();
                h.feed
                    .send(Feed::Written(i, (at + chunk.len()) as u64))
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
        h.finish().await.unwrap()
    }

    #[tokio::test]
    async fn parts_in_any_order_hash_like_the_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..10_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let d = scrambled(&data, tmp.path()).await;
        assert_eq!(d.sha256, hex::encode(Sha256::digest(&data)));
        assert!(d.content.is_none());
    }

    #[tokio::test]
    async fn a_compressed_object_is_unwrapped_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        // Incompressible, so the gzip file spans the ten parts the scrambled order names.
        let image: Vec<u8> = (0..12 << 20).map(|_| rand::random::<u8>()).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &image).unwrap();
        let packed = gz.finish().unwrap();
        let d = scrambled(&packed, tmp.path()).await;
        assert_eq!(d.sha256, hex::encode(Sha256::digest(&packed)));
        let (compression, content) = d.content.expect("a gzip wrapper");
        assert_eq!(compression, Compression::Gzip);
        assert_eq!(content.size, image.len() as u64);
        assert_eq!(content.sha256, hex::encode(Sha256::digest(&image)));
        drop(content);
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "dropped content is removed"
        );
    }

    #[tokio::test]
    async fn a_resumed_compressed_download_unwraps_again_from_the_first_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let image: Vec<u8> = (0..5 << 20).map(|_| rand::random::<u8>()).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &image).unwrap();
        let packed = gz.finish().unwrap();
        let part = 1u64 << 20;
        let parts = packed.len().div_ceil(part as usize);
        // Parts 0 and 1 were downloaded and hashed before a restart.
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&packed[..2 << 20], 0).unwrap();
        let mut state = Sha256::new();
        state.update(&packed[..2 << 20]);
        let mut on_disk = vec![false; parts];
        on_disk[..2].fill(true);
        let writer = file.try_clone().unwrap();
        let mut s = start(file, packed.len() as u64, part, on_disk, tmp.path());
        s.state = state;
        s.hashed = 2;
        let h = Hasher::spawn(s);
        for i in 2..parts {
            let from = i * part as usize;
            let to = (from + part as usize).min(packed.len());
            writer.write_all_at(&packed[from..to], from as u64).unwrap();
            h.feed.send(Feed::End(i)).unwrap();
        }
        let d = h.finish().await.unwrap();
        assert_eq!(d.sha256, hex::encode(Sha256::digest(&packed)));
        let (_, content) = d.content.expect("a gzip wrapper");
        assert_eq!(content.sha256, hex::encode(Sha256::digest(&image)));
    }
}
