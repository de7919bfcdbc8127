//! Compressed sources: gzip, xz, bzip2 and zstd, recognised by their magic bytes (never by
//! the file name) and unwrapped while the download arrives. The in-order reader of a download
//! (`hasher.rs`) hands the compressed bytes, in order, to a dedicated thread through a small
//! pool of fixed buffers (the bound of what waits between the two); that thread runs the
//! blocking decoder and writes the content sequentially into a temporary file of the cache
//! directory, hashing it and counting it against the size bound (a decompression bomb stops at
//! the bound, its output removed). What it leaves is the image the cache keeps.

use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Size of one buffer between the reader and the decoder, and of one write of the content.
pub(super) const BLOCK: usize = 1 << 20;
/// Buffers in flight between the reader and the decoder.
const BUFFERS: usize = 4;
/// Largest zstd window accepted (2^27 = 128 MiB: zstd's own default limit, what
/// `zstd --long=27` and levels up to 22 produce).
const ZSTD_WINDOW_LOG_MAX: u32 = 27;
/// Memory the xz decoder may use with its threads (liblzma uses fewer threads to stay below).
const XZ_MEMLIMIT_THREADING: u64 = 256 << 20;
/// Memory the xz decoder may never exceed (xz -9 needs 65 MiB single-threaded): an xz file
/// asking for more is refused.
const XZ_MEMLIMIT_STOP: u64 = 512 << 20;

/// A compression wrapper around an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Compression {
    Gzip,
    Xz,
    Bzip2,
    Zstd,
}

/// Bytes needed to recognise every wrapper.
pub(crate) const MAGIC_LEN: usize = 6;

impl Compression {
    /// The wrapper `head` (the first bytes of the object) starts with, if any.
    pub(crate) fn detect(head: &[u8]) -> Option<Compression> {
        match head {
            [0x1f, 0x8b, 0x08, ..] => Some(Compression::Gzip),
            [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => Some(Compression::Xz),
            // "BZh" and the block size digit; the block magic (pi) follows.
            [b'B', b'Z', b'h', b'1'..=b'9', ..] => Some(Compression::Bzip2),
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Some(Compression::Zstd),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Bzip2 => "bzip2",
            Compression::Zstd => "zstd",
        }
    }
}

/// Why the content could not be unwrapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecompressError {
    /// The content grew past the bound (a decompression bomb, or an image too large).
    #[error(
        "the {compression} image decompresses to more than {limit} bytes \
         (cache.max_image_bytes or cache.max_size_bytes)"
    )]
    TooLarge {
        compression: &'static str,
        limit: u64,
    },
    /// The compressed stream is damaged or cut short.
    #[error("the {compression} stream is corrupt or truncated: {message}")]
    Corrupt {
        compression: &'static str,
        message: String,
    },
    /// Writing the content failed (the disk, not the data).
    #[error("writing the decompressed image: {0}")]
    Io(String),
    /// The download stopped before every compressed byte arrived.
    #[error("the download stopped before the compressed image was complete")]
    Aborted,
}

impl DecompressError {
    /// Label for `image_errors_total{error_type}` (one of `FetchError::KINDS`).
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            DecompressError::TooLarge { .. } => "too_large",
            DecompressError::Corrupt { .. } => "corrupt_compressed",
            DecompressError::Io(_) => "io",
            DecompressError::Aborted => "stopped",
        }
    }
}

/// The unwrapped image: a temporary file (removed when this is dropped unless it was kept),
/// its SHA-256 and its size.
#[derive(Debug)]
pub(crate) struct Content {
    path: Option<PathBuf>,
    pub(crate) sha256: String,
    pub(crate) size: u64,
}

impl Content {
    /// Where the content is (until it is persisted or dropped).
    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().expect("not persisted yet")
    }

    /// Renames the file to `to` (the caller syncs the directory).
    pub(crate) fn persist(mut self, to: &Path) -> std::io::Result<()> {
        let path = self.path.take().expect("persisted once");
        std::fs::rename(&path, to).inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })
    }
}

impl Drop for Content {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What the decoder thread receives.
enum Input {
    Bytes(Vec<u8>),
    /// Every compressed byte was sent.
    End,
}

/// The decoder thread of one download, fed in order.
pub(super) struct Decompressor {
    compression: Compression,
    full: SyncSender<Input>,
    empty: Receiver<Vec<u8>>,
    thread: std::thread::JoinHandle<Result<Content, DecompressError>>,
}

impl Decompressor {
    /// Starts the thread writing the content of `compression` into a new temporary file
    /// in `dir`, refusing more than `limit` bytes of it.
    pub(super) fn spawn(
        compression: Compression,
        dir: &Path,
        key: &str,
        limit: u64,
    ) -> Result<Decompressor, DecompressError> {
        let path = dir.join(format!("{key}.content.{:08x}.tmp", rand::random::<u32>()));
        let out = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| DecompressError::Io(format!("{}: {e}", path.display())))?
        };
        let (full, full_rx) = sync_channel(BUFFERS);
        let (empty_tx, empty) = sync_channel(BUFFERS);
        for _ in 0..BUFFERS {
            let _ = empty_tx.send(Vec::with_capacity(BLOCK));
        }
        let input = ChannelInput {
            full: full_rx,
            empty: empty_tx,
            current: Vec::new(),
            pos: 0,
            ended: false,
        };
        let sink = Sink {
            out,
            path: path.clone(),
            sha: Sha256::new(),
            size: 0,
            limit,
        };
        let thread = std::thread::Builder::new()
            .name("lvp-decompress".into())
            .spawn(move || run(compression, input, sink))
            .map_err(|e| DecompressError::Io(format!("starting the decoder thread: {e}")))?;
        Ok(Decompressor {
            compression,
            full,
            empty,
            thread,
        })
    }

    pub(super) fn compression(&self) -> Compression {
        self.compression
    }

    /// A buffer to fill (waits while every buffer is with the decoder). `None`: the decoder
    /// ended (call `finish` for its error).
    pub(super) fn buffer(&self) -> Option<Vec<u8>> {
        self.empty.recv().ok()
    }

    /// Hands a filled buffer to the decoder. `false`: the decoder ended.
    pub(super) fn send(&self, buf: Vec<u8>) -> bool {
        self.full.send(Input::Bytes(buf)).is_ok()
    }

    /// Tells the decoder the input is complete and waits for the content. When the decoder
    /// ended early, its error.
    pub(super) fn finish(self) -> Result<Content, DecompressError> {
        let _ = self.full.send(Input::End);
        drop(self.full);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(DecompressError::Io("the decoder thread panicked".into())))
    }

    /// The decoder's error after it ended early (`buffer` or `send` failed).
    pub(super) fn failure(self) -> DecompressError {
        drop(self.full);
        match self.thread.join() {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => DecompressError::Corrupt {
                compression: self.compression.as_str(),
                message: "the stream ended before the object did (data after its end)".into(),
            },
            Err(_) => DecompressError::Io("the decoder thread panicked".into()),
        }
    }
}

/// The decoder's input: buffers from the reader, given back once consumed. EOF is the `End`
/// message; a reader gone without it is an error (the download stopped).
struct ChannelInput {
    full: Receiver<Input>,
    empty: SyncSender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl Read for ChannelInput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChannelInput {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.pos == self.current.len() && !self.ended {
            let used = std::mem::take(&mut self.current);
            if used.capacity() > 0 {
                // The reader may be gone already; the buffer is then simply freed.
                let _ = self.empty.try_send(used);
            }
            self.pos = 0;
            match self.full.recv() {
                Ok(Input::Bytes(b)) => self.current = b,
                Ok(Input::End) => self.ended = true,
                Err(_) => return Err(std::io::Error::other(Aborted)),
            }
        }
        Ok(&self.current[self.pos..])
    }

    fn consume(&mut self, amount: usize) {
        self.pos = (self.pos + amount).min(self.current.len());
    }
}

/// Marks the reader gone without `End` inside an `io::Error`.
#[derive(Debug)]
struct Aborted;

impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the download stopped")
    }
}

impl std::error::Error for Aborted {}

/// Where the content goes: the temporary file, its hash and its bound.
struct Sink {
    out: File,
    path: PathBuf,
    sha: Sha256,
    size: u64,
    limit: u64,
}

/// Why the content could not be written (kept apart from the decoder's own errors).
enum SinkError {
    TooLarge,
    Io(std::io::Error),
}

impl Sink {
    /// Reads `decoder` to its end into the file.
    fn drain(&mut self, decoder: &mut impl Read, buf: &mut [u8]) -> Result<(), Failure> {
        loop {
            let n = match decoder.read(buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Decoder(e)),
            };
            if self.size + n as u64 > self.limit {
                return Err(Failure::Sink(SinkError::TooLarge));
            }
            self.sha.update(&buf[..n]);
            self.out
                .write_all(&buf[..n])
                .map_err(|e| Failure::Sink(SinkError::Io(e)))?;
            self.size += n as u64;
        }
    }
}

/// How decoding stopped without the content.
enum Failure {
    Decoder(std::io::Error),
    Sink(SinkError),
}

fn run(
    compression: Compression,
    mut input: ChannelInput,
    mut sink: Sink,
) -> Result<Content, DecompressError> {
    let mut buf = vec![0u8; BLOCK];
    let result = decode(compression, &mut input, &mut sink, &mut buf).and_then(|()| {
        // Anything after the end of the (last) stream is not part of the image.
        match input.fill_buf() {
            Ok([]) => Ok(()),
            Ok(_) => Err(Failure::Decoder(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "data after the end of the compressed stream",
            ))),
            Err(e) => Err(Failure::Decoder(e)),
        }
    });
    let name = compression.as_str();
    let failed = match result {
        Ok(()) => match sink.out.sync_all() {
            Ok(()) => {
                return Ok(Content {
                    path: Some(sink.path),
                    sha256: hex::encode(sink.sha.finalize()),
                    size: sink.size,
                });
            }
            Err(e) => DecompressError::Io(e.to_string()),
        },
        Err(Failure::Sink(SinkError::TooLarge)) => DecompressError::TooLarge {
            compression: name,
            limit: sink.limit,
        },
        Err(Failure::Sink(SinkError::Io(e))) => DecompressError::Io(e.to_string()),
        Err(Failure::Decoder(e)) if e.get_ref().is_some_and(|i| i.is::<Aborted>()) => {
            DecompressError::Aborted
        }
        Err(Failure::Decoder(e)) => DecompressError::Corrupt {
            compression: name,
            message: e.to_string(),
        },
    };
    drop(sink.out);
    let _ = std::fs::remove_file(&sink.path);
    Err(failed)
}

/// Runs the decoder of `compression` over the whole input. Concatenated streams (`cat a.gz
/// b.gz`, several xz streams, several zstd frames, several bzip2 streams) are one image.
fn decode(
    compression: Compression,
    input: &mut ChannelInput,
    sink: &mut Sink,
    buf: &mut [u8],
) -> Result<(), Failure> {
    match compression {
        Compression::Gzip => sink.drain(&mut flate2::bufread::MultiGzDecoder::new(input), buf),
        Compression::Bzip2 => sink.drain(&mut bzip2::bufread::MultiBzDecoder::new(input), buf),
        Compression::Zstd => {
            let mut d =
                zstd::stream::read::Decoder::with_buffer(input).map_err(Failure::Decoder)?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(Failure::Decoder)?;
            sink.drain(&mut d, buf)
        }
        Compression::Xz => loop {
            let stream = xz_stream().map_err(Failure::Decoder)?;
            let mut d = liblzma::bufread::XzDecoder::new_stream(&mut *input, stream);
            sink.drain(&mut d, buf)?;
            if input.fill_buf().map_err(Failure::Decoder)?.is_empty() {
                return Ok(());
            }
        },
    }
}

/// The first bytes (at most `max`) of the image inside `head`, the first bytes of an object
/// wrapped by `compression`: what a preflight inspects without the whole object. A stream cut
/// short (as `head` is) gives what it decoded; a corrupt one, what came before the damage.
pub(crate) fn content_prefix(compression: Compression, head: &[u8], max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let decoder: std::io::Result<Box<dyn Read + '_>> = match compression {
        Compression::Gzip => Ok(Box::new(flate2::bufread::MultiGzDecoder::new(head))),
        Compression::Bzip2 => Ok(Box::new(bzip2::bufread::MultiBzDecoder::new(head))),
        Compression::Zstd => zstd::stream::read::Decoder::with_buffer(head).and_then(|mut d| {
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            Ok(Box::new(d) as Box<dyn Read>)
        }),
        Compression::Xz => liblzma::stream::Stream::new_stream_decoder(XZ_MEMLIMIT_STOP, 0)
            .map(|s| Box::new(liblzma::bufread::XzDecoder::new_stream(head, s)) as Box<dyn Read>)
            .map_err(std::io::Error::other),
    };
    if let Ok(decoder) = decoder {
        let _ = decoder.take(max as u64).read_to_end(&mut out);
    }
    out
}

/// liblzma's multi-threaded decoder: it decodes the blocks of an xz file made with `xz -T`
/// (xz 5.4 and later split by default then) on several threads, and single-block files on one.
fn xz_stream() -> std::io::Result<liblzma::stream::Stream> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    liblzma::stream::MtStreamBuilder::new()
        .threads(threads)
        .memlimit_threading(XZ_MEMLIMIT_THREADING)
        .memlimit_stop(XZ_MEMLIMIT_STOP)
        .decoder()
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compress(tool: &str, args: &[&str], data: &[u8]) -> Vec<u8> {
        use std::process::{Command, Stdio};
        let mut child = Command::new(tool)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let data = data.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&data));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(out.status.success(), "{tool}");
        out.stdout
    }

    fn unwrap(
        compression: Compression,
        bytes: &[u8],
        limit: u64,
        dir: &Path,
    ) -> Result<Content, DecompressError> {
        let d = Decompressor::spawn(compression, dir, "k", limit).unwrap();
        for piece in bytes.chunks(300_000) {
            let Some(mut buf) = d.buffer() else {
                return Err(d.failure());
            };
            buf.clear();
            buf.extend_from_slice(piece);
            if !d.send(buf) {
                return Err(d.failure());
            }
        }
        d.finish()
    }

    const TOOLS: [(Compression, &str, &[&str]); 4] = [
        (Compression::Gzip, "gzip", &["-c"]),
        (Compression::Xz, "xz", &["-c", "-T2", "--block-size=1MiB"]),
        (Compression::Bzip2, "bzip2", &["-c"]),
        (Compression::Zstd, "zstd", &["-c", "-q"]),
    ];

    #[test]
    fn every_tool_round_trips_and_is_recognised_by_its_magic() {
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| ((i % 251) ^ (i / 4096)) as u8)
            .collect();
        for (compression, tool, args) in TOOLS {
            let packed = compress(tool, args, &data);
            assert_eq!(Compression::detect(&packed), Some(compression), "{tool}");
            let content = unwrap(compression, &packed, 1 << 30, tmp.path()).unwrap();
            assert_eq!(content.size, data.len() as u64, "{tool}");
            assert_eq!(content.sha256, hex::encode(Sha256::digest(&data)), "{tool}");
            let to = tmp.path().join(format!("{tool}.img"));
            content.persist(&to).unwrap();
            assert_eq!(std::fs::read(&to).unwrap(), data, "{tool}");
        }
        assert_eq!(Compression::detect(b"QFI\xfb\0\0\0\x03"), None);
        assert_eq!(Compression::detect(b"BZh0"), None);
    }

    #[test]
    fn bombs_truncation_and_corruption_fail_and_leave_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let zeros = vec![0u8; 8 << 20];
        for (compression, tool, args) in TOOLS {
            let packed = compress(tool, args, &zeros);
            let e = unwrap(compression, &packed, 1 << 20, tmp.path()).unwrap_err();
            assert!(matches!(e, DecompressError::TooLarge { .. }), "{tool}: {e}");
            let cut = &packed[..packed.len() - 9];
            let e = unwrap(compression, cut, 1 << 30, tmp.path()).unwrap_err();
            assert!(matches!(e, DecompressError::Corrupt { .. }), "{tool}: {e}");
            let mut trailing = packed.clone();
            trailing.extend_from_slice(b"garbage!");
            let e = unwrap(compression, &trailing, 1 << 30, tmp.path()).unwrap_err();
            assert!(matches!(e, DecompressError::Corrupt { .. }), "{tool}: {e}");
        }
        // A gzip member whose CRC-32 trailer is wrong.
        let mut gz = compress("gzip", &["-c"], b"some image bytes");
        let at = gz.len() - 8;
        gz[at] ^= 0xff;
        let e = unwrap(Compression::Gzip, &gz, 1 << 30, tmp.path()).unwrap_err();
        assert!(matches!(e, DecompressError::Corrupt { .. }), "{e}");
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_reader_gone_without_end_aborts_and_removes_the_output() {
        let tmp = tempfile::tempdir().unwrap();
        let packed = compress("gzip", &["-c"], &[7u8; 100_000]);
        let d = Decompressor::spawn(Compression::Gzip, tmp.path(), "k", 1 << 30).unwrap();
        let mut buf = d.buffer().unwrap();
        buf.extend_from_slice(&packed[..100]);
        assert!(d.send(buf));
        assert_eq!(d.failure(), DecompressError::Aborted);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
