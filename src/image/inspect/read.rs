//! Where the inspector reads from: byte ranges of an image by offset (`ReadAt`), over a slice
//! (fuzzing, unit tests), a file (the cache, with a budget of bytes), a window of another
//! source (the disk inside an OVA), or ranges fetched from a remote source (preflight, which
//! learns from a miss what to fetch next). Plus the little- and big-endian field readers.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use super::verdict::InspectError;

/// The most bytes one inspection of a file reads (headers, tables it checks, an OVA's
/// descriptor and tar headers): far more than any accepted image needs.
pub(crate) const READ_BUDGET: u64 = 16 << 20;

/// Random access to an image's bytes.
pub trait ReadAt {
    /// The image's length in bytes.
    fn size(&self) -> u64;
    /// The bytes `offset .. offset + len`, clamped to the end of the image (shorter only
    /// there, or when the source holds fewer bytes than the image has, as a slice of a head).
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, InspectError>;
}

/// The first bytes of an image of `size` bytes (the rest is unknown: reads past the slice
/// come back short, and the format's checks report a truncated header).
pub struct Bytes<'a> {
    pub data: &'a [u8],
    pub size: u64,
}

impl ReadAt for Bytes<'_> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, InspectError> {
        let end = offset.saturating_add(len as u64).min(self.size);
        let have = self.data.len() as u64;
        if offset >= end || offset >= have {
            return Ok(Vec::new());
        }
        Ok(self.data[offset as usize..end.min(have) as usize].to_vec())
    }
}

/// A file, read with `pread`, at most `READ_BUDGET` bytes in all.
pub(crate) struct FileSource {
    file: File,
    size: u64,
    spent: Cell<u64>,
}

impl FileSource {
    pub(crate) fn open(path: &std::path::Path) -> Result<FileSource, InspectError> {
        let io = |e: io::Error| InspectError::Io(e.to_string());
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        Ok(FileSource {
            file,
            size,
            spent: Cell::new(0),
        })
    }
}

impl ReadAt for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, InspectError> {
        let end = offset.saturating_add(len as u64).min(self.size);
        let want = end.saturating_sub(offset);
        let spent = self.spent.get() + want;
        if spent > READ_BUDGET {
            return Err(InspectError::Io(format!(
                "inspection would read more than {READ_BUDGET} bytes"
            )));
        }
        self.spent.set(spent);
        let mut buf = vec![0u8; want as usize];
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(InspectError::Io(e.to_string())),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }
}

/// `len` bytes of another source, from `offset` on (the disk member of an OVA).
pub(crate) struct Window<'a> {
    pub(crate) inner: &'a dyn ReadAt,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

impl ReadAt for Window<'_> {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, InspectError> {
        let end = offset.saturating_add(len as u64).min(self.len);
        if offset >= end {
            return Ok(Vec::new());
        }
        self.inner
            .read_at(self.offset + offset, (end - offset) as usize)
    }
}

/// Ranges of a remote image fetched so far. A read of bytes not fetched fails and is remembered
/// (`missing`), so the caller can fetch them and run the inspection again.
pub(crate) struct Ranges {
    size: u64,
    chunks: Vec<(u64, Vec<u8>)>,
    missing: RefCell<Option<(u64, u64)>>,
}

impl Ranges {
    pub(crate) fn new(size: u64) -> Ranges {
        Ranges {
            size,
            chunks: Vec::new(),
            missing: RefCell::new(None),
        }
    }

    /// Adds the bytes fetched at `offset`.
    pub(crate) fn add(&mut self, offset: u64, data: Vec<u8>) {
        self.chunks.push((offset, data));
    }

    /// The first range the last inspection wanted and did not find (cleared by the call).
    pub(crate) fn take_missing(&self) -> Option<(u64, u64)> {
        self.missing.borrow_mut().take()
    }
}

impl ReadAt for Ranges {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, InspectError> {
        let end = offset.saturating_add(len as u64).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        for (start, data) in &self.chunks {
            let stop = start + data.len() as u64;
            if *start <= offset && end <= stop {
                return Ok(data[(offset - start) as usize..(end - start) as usize].to_vec());
            }
        }
        self.missing
            .borrow_mut()
            .get_or_insert((offset, end - offset));
        Err(InspectError::Io(format!(
            "bytes {offset}..{end} of the image were not read"
        )))
    }
}

/// A `Read + Seek` view of a source (for the tar reader).
pub(crate) struct Cursor<'a> {
    pub(crate) src: &'a dyn ReadAt,
    pub(crate) pos: u64,
}

impl Read for Cursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(64 << 10);
        let data = self
            .src
            .read_at(self.pos, want)
            .map_err(|e| io::Error::other(e.to_string()))?;
        buf[..data.len()].copy_from_slice(&data);
        self.pos += data.len() as u64;
        Ok(data.len())
    }
}

impl Seek for Cursor<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let base = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.src.size().checked_add_signed(d),
        };
        self.pos = base.ok_or_else(|| io::Error::other("seek out of range"))?;
        Ok(self.pos)
    }
}

/// Reads exactly `len` bytes at `offset`, or reports the header of `format` as truncated.
pub(crate) fn exact(
    src: &dyn ReadAt,
    format: crate::image::ImageType,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, InspectError> {
    let data = src.read_at(offset, len)?;
    if data.len() < len {
        return Err(InspectError::Truncated {
            format,
            len: src.size().min(offset + data.len() as u64),
            need: offset + len as u64,
        });
    }
    Ok(data)
}

/// `offset .. offset + len` lies within a file of `size` bytes.
pub(crate) fn within(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_remember_what_they_miss() {
        let mut r = Ranges::new(100);
        r.add(0, vec![1; 10]);
        assert_eq!(r.read_at(2, 4).unwrap(), vec![1; 4]);
        assert!(r.read_at(8, 4).is_err());
        assert_eq!(r.take_missing(), Some((8, 4)));
        assert_eq!(r.take_missing(), None);
        assert_eq!(r.read_at(98, 10).ok(), None);
        assert_eq!(r.take_missing(), Some((98, 2)));
    }

    #[test]
    fn windows_and_slices_clamp() {
        let data = [7u8; 20];
        let b = Bytes {
            data: &data,
            size: 30,
        };
        assert_eq!(b.read_at(15, 10).unwrap().len(), 5);
        assert!(b.read_at(25, 10).unwrap().is_empty());
        let w = Window {
            inner: &b,
            offset: 10,
            len: 4,
        };
        assert_eq!(w.read_at(0, 100).unwrap().len(), 4);
        assert!(w.read_at(4, 1).unwrap().is_empty());
    }
}
