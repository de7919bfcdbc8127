//! What the daemon needs to know of a LUKS volume's on-disk header (the format QEMU's `luks`
//! driver writes, LUKS1): its magic, where the payload starts, and how the header and key
//! slots are destroyed (crypto-erase). Plain file and block-device I/O; no tool is run.

use std::io::Read;
use std::path::Path;

use crate::volume::blockdev;
use crate::volume::error::VolumeError;

/// The first bytes of every LUKS header.
const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// Where the big-endian payload offset (in 512-byte sectors) lies in a LUKS1 header.
const PAYLOAD_OFFSET_AT: usize = 104;

/// Room an encrypted volume gets on top of the size asked for, so that the payload the guest
/// sees is at least that size: QEMU's header with 8 key slots of aes-256-xts is 2068480 bytes
/// (4040 sectors); 16 MiB leaves room for other ciphers and a whole LVM extent.
pub(crate) const HEADER_ALLOWANCE: u64 = 16 << 20;

/// The payload offset in bytes when `path` starts with a LUKS1 header; `None` when it does not
/// (never formatted, or already erased).
pub(crate) fn payload_offset(path: &Path) -> Result<Option<u64>, VolumeError> {
    let mut head = [0u8; 108];
    let mut file = std::fs::File::open(path).map_err(|e| VolumeError::io(path, e))?;
    if let Err(e) = file.read_exact(&mut head) {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Ok(None),
            _ => Err(VolumeError::io(path, e)),
        };
    }
    Ok(parse_offset(&head))
}

fn parse_offset(head: &[u8; 108]) -> Option<u64> {
    if &head[..6] != MAGIC {
        return None;
    }
    let sectors = u32::from_be_bytes(head[PAYLOAD_OFFSET_AT..].try_into().ok()?);
    Some(u64::from(sectors) * 512)
}

/// Destroys the header and every key slot of the volume at `path`: zeros over its first
/// `max(payload offset, HEADER_ALLOWANCE)` bytes (all of it when smaller), flushed to stable
/// storage. The payload left behind is ciphertext nothing can decrypt. Safe to repeat.
pub(crate) fn erase_header(path: &Path) -> Result<(), VolumeError> {
    let span = payload_offset(path)?.unwrap_or(0).max(HEADER_ALLOWANCE);
    blockdev::zero_head(path, span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_payload_offset_of_a_luks1_header() {
        let mut head = [0u8; 108];
        head[..6].copy_from_slice(MAGIC);
        head[104..108].copy_from_slice(&4040u32.to_be_bytes());
        assert_eq!(parse_offset(&head), Some(2_068_480));
        head[0] = b'X';
        assert_eq!(parse_offset(&head), None);
    }

    #[test]
    fn erasing_a_file_zeroes_the_header_and_keeps_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        let mut data = vec![0x5au8; 20 << 20];
        data[..6].copy_from_slice(MAGIC);
        data[104..108].copy_from_slice(&4040u32.to_be_bytes());
        std::fs::write(&path, &data).unwrap();
        assert_eq!(payload_offset(&path).unwrap(), Some(2_068_480));
        erase_header(&path).unwrap();
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after.len(), 20 << 20);
        assert!(after[..HEADER_ALLOWANCE as usize].iter().all(|b| *b == 0));
        assert!(
            after[HEADER_ALLOWANCE as usize..]
                .iter()
                .all(|b| *b == 0x5a)
        );
        assert_eq!(payload_offset(&path).unwrap(), None);
        erase_header(&path).unwrap();
    }
}
