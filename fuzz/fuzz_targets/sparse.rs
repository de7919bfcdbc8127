//! Shared by the fuzz targets: an image described sparsely, so a few fuzzed bytes can stand
//! for a large file (a VHDX keeps its metadata megabytes in). Input: the image size (u64 LE),
//! then patches, each an offset (u32 LE), a length (u16 LE) and that many bytes; everything
//! not patched reads as zeros. `make-seeds.sh` encodes real qemu-img output this way.

use libvirt_volume_provisioner::image::inspect::{InspectError, ReadAt};

/// The largest image a fuzz input describes.
const MAX_SIZE: u64 = 64 << 20;

/// A zero image of `size` bytes with patches laid over it.
pub struct Sparse {
    pub size: u64,
    pub patches: Vec<(u64, Vec<u8>)>,
}

impl Sparse {
    /// Decodes an input; `None` when it is too short to hold a size.
    pub fn decode(data: &[u8]) -> Option<Sparse> {
        let size = u64::from_le_bytes(data.get(..8)?.try_into().ok()?) % (MAX_SIZE + 1);
        let mut patches = Vec::new();
        let mut rest = &data[8..];
        while rest.len() >= 6 {
            let offset = u32::from_le_bytes(rest[..4].try_into().unwrap()) as u64;
            let len = u16::from_le_bytes([rest[4], rest[5]]) as usize;
            let bytes = &rest[6..6 + len.min(rest.len() - 6)];
            patches.push((offset, bytes.to_vec()));
            rest = &rest[6 + bytes.len()..];
        }
        Some(Sparse { size, patches })
    }

    /// Writes `magic` at `offset` (so a target reaches the inspector it is about).
    pub fn stamp(&mut self, offset: u64, magic: &[u8]) {
        self.patches.push((offset, magic.to_vec()));
    }
}

impl ReadAt for Sparse {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, InspectError> {
        let end = offset.saturating_add(len as u64).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        for (at, bytes) in &self.patches {
            let (from, to) = ((*at).max(offset), (at + bytes.len() as u64).min(end));
            if from < to {
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
            }
        }
        Ok(out)
    }
}

/// What every verdict must satisfy, whatever the bytes.
pub fn check(src: &Sparse) {
    use libvirt_volume_provisioner::image::inspect::inspect;
    if let Ok(v) = inspect(src) {
        assert!(v.virtual_size > 0);
        assert!(v.virtual_size <= 64 << 40);
        if let Some(m) = v.ova_disk {
            assert!(m.offset.checked_add(m.size).is_some_and(|e| e <= src.size));
        }
    }
}
