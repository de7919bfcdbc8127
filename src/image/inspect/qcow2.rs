//! qcow2: versions 2 and 3 only; refuses backing files, external data files, encryption,
//! unknown incompatible features and impossible geometry (the qcow2 checklist of
//! `shared/reference/image-safety.md`).

use super::read::{ReadAt, be32, be64, within};
use super::verdict::{InspectError, Inspection, check_virtual_size};
use crate::image::ImageType;

pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Largest header area read: one cluster at the largest accepted cluster size (2 MiB).
pub(crate) const MAX_HEADER_READ: usize = 1 << 21;
/// QEMU's own limit of the L1 table (QCOW_MAX_L1_SIZE).
const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's own limit of the refcount table (QCOW_MAX_REFTABLE_SIZE).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The checks this module applies (reported by preflight).
pub(crate) const CHECKS: &[&str] = &[
    "magic",
    "version 2 or 3",
    "no backing file",
    "no external data file",
    "not encrypted",
    "known incompatible features only",
    "tables inside the file",
    "virtual size bound",
];

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;

const EXT_END: u32 = 0x0000_0000;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_ENCRYPTION: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

fn impossible(msg: impl Into<String>) -> InspectError {
    InspectError::impossible(ImageType::Qcow2, msg)
}

/// Inspects a qcow2 image (reads its first cluster, at most `MAX_HEADER_READ` bytes).
pub(crate) fn inspect(src: &dyn ReadAt) -> Result<Inspection, InspectError> {
    let head = src.read_at(0, MAX_HEADER_READ)?;
    inspect_qcow2(&head, src.size())
}

fn need(head: &[u8], file_len: u64, n: usize) -> Result<(), InspectError> {
    if head.len() < n {
        return Err(InspectError::Truncated {
            format: ImageType::Qcow2,
            len: file_len.min(head.len() as u64),
            need: n as u64,
        });
    }
    Ok(())
}

fn inspect_qcow2(head: &[u8], file_len: u64) -> Result<Inspection, InspectError> {
    need(head, file_len, 72)?;
    let version = be32(head, 4);
    if version != 2 && version != 3 {
        return Err(InspectError::Version(version));
    }
    let backing_offset = be64(head, 8);
    let backing_size = be32(head, 16);
    let cluster_bits = be32(head, 20);
    let virtual_size = be64(head, 24);
    let crypt_method = be32(head, 32);
    let l1_size = be32(head, 36) as u64;
    let l1_offset = be64(head, 40);
    let refcount_offset = be64(head, 48);
    let refcount_clusters = be32(head, 56) as u64;
    let nb_snapshots = be32(head, 60) as u64;
    let snapshots_offset = be64(head, 64);

    if backing_offset != 0 || backing_size != 0 {
        return Err(InspectError::BackingFile);
    }
    if crypt_method != 0 {
        return Err(InspectError::Encrypted(crypt_method));
    }
    if !(9..=21).contains(&cluster_bits) {
        return Err(impossible(format!(
            "cluster_bits {cluster_bits} outside 9..=21"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;

    let (header_len, incompatible) = if version == 3 {
        need(head, file_len, 104)?;
        let incompatible = be64(head, 72);
        let refcount_order = be32(head, 96);
        let header_len = be32(head, 100) as u64;
        if refcount_order > 6 {
            return Err(impossible(format!(
                "refcount_order {refcount_order} above 6"
            )));
        }
        if header_len < 104 || !header_len.is_multiple_of(8) {
            return Err(impossible(format!("header_length {header_len}")));
        }
        (header_len, incompatible)
    } else {
        (72, 0)
    };
    if header_len > cluster_size {
        return Err(impossible(format!(
            "header_length {header_len} larger than a cluster ({cluster_size})"
        )));
    }
    need(head, file_len, header_len as usize)?;

    if incompatible & (1 << 1) != 0 {
        return Err(InspectError::Corrupt);
    }
    if incompatible & (1 << 2) != 0 {
        return Err(InspectError::ExternalDataFile);
    }
    let unknown = incompatible & !(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION_TYPE);
    if unknown != 0 {
        return Err(InspectError::IncompatibleFeatures(unknown));
    }
    if header_len > 104 {
        let compression_type = head[104];
        if compression_type > 1 {
            return Err(impossible(format!(
                "compression type {compression_type} (only zlib and zstd exist)"
            )));
        }
        if compression_type != 0 && incompatible & INCOMPAT_COMPRESSION_TYPE == 0 {
            return Err(impossible(
                "compression type set without its incompatible feature bit",
            ));
        }
    }

    // Geometry: the tables must exist inside the file and cover the virtual size.
    if virtual_size == 0 {
        return Err(impossible("virtual size is 0"));
    }
    let l2_entries = cluster_size / 8;
    let bytes_per_l1 = cluster_size
        .checked_mul(l2_entries)
        .ok_or_else(|| impossible("cluster geometry overflows"))?;
    let l1_needed = virtual_size.div_ceil(bytes_per_l1);
    if l1_size < l1_needed {
        return Err(impossible(format!(
            "L1 table of {l1_size} entries cannot map a virtual size of {virtual_size} bytes"
        )));
    }
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(impossible(format!(
            "L1 table of {l1_size} entries is too large"
        )));
    }
    if !l1_offset.is_multiple_of(cluster_size) || !within(l1_offset, l1_size * 8, file_len) {
        return Err(impossible(format!(
            "L1 table at {l1_offset} (+{} bytes) is unaligned or beyond the file ({file_len} bytes)",
            l1_size * 8
        )));
    }
    if l1_offset < cluster_size {
        return Err(impossible("L1 table overlaps the header"));
    }
    let reftable_bytes = refcount_clusters
        .checked_mul(cluster_size)
        .ok_or_else(|| impossible("refcount table size overflows"))?;
    if reftable_bytes == 0 || reftable_bytes > MAX_REFTABLE_BYTES.max(cluster_size) {
        return Err(impossible(format!(
            "refcount table of {refcount_clusters} clusters"
        )));
    }
    if !refcount_offset.is_multiple_of(cluster_size)
        || refcount_offset < cluster_size
        || !within(refcount_offset, reftable_bytes, file_len)
    {
        return Err(impossible(format!(
            "refcount table at {refcount_offset} is unaligned, overlaps the header or lies beyond the file"
        )));
    }
    if nb_snapshots > 65536 {
        return Err(impossible(format!("{nb_snapshots} snapshots")));
    }
    if nb_snapshots > 0
        && (!snapshots_offset.is_multiple_of(8)
            || !within(snapshots_offset, nb_snapshots * 40, file_len))
    {
        return Err(impossible(format!(
            "snapshot table at {snapshots_offset} lies beyond the file"
        )));
    }

    check_extensions(head, file_len, header_len, cluster_size)?;

    let virtual_size = check_virtual_size(ImageType::Qcow2, virtual_size)?;
    Ok(Inspection::bare(ImageType::Qcow2, virtual_size, None))
}

/// Walks the header extensions (between the header and the end of the first cluster).
fn check_extensions(
    head: &[u8],
    file_len: u64,
    header_len: u64,
    cluster_size: u64,
) -> Result<(), InspectError> {
    let area_end = cluster_size.min(file_len);
    let mut off = header_len;
    loop {
        if off + 8 > area_end {
            // No end marker inside the first cluster.
            return Err(impossible("header extensions run past the first cluster"));
        }
        need(head, file_len, (off + 8) as usize)?;
        let ext_type = be32(head, off as usize);
        let ext_len = be32(head, off as usize + 4) as u64;
        if ext_type == EXT_END {
            return Ok(());
        }
        let padded = ext_len.div_ceil(8) * 8;
        let data_end = off + 8 + padded;
        if data_end > area_end {
            return Err(impossible(format!(
                "header extension 0x{ext_type:08x} of {ext_len} bytes runs past the first cluster"
            )));
        }
        match ext_type {
            EXT_DATA_FILE => return Err(InspectError::ExternalDataFile),
            EXT_ENCRYPTION => return Err(InspectError::Encrypted(0)),
            EXT_BACKING_FORMAT => return Err(InspectError::BackingFile),
            EXT_FEATURE_TABLE | EXT_BITMAPS => {}
            // Unknown extensions are ignorable by the qcow2 specification.
            _ => {}
        }
        off = data_end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid qcow2 v3 header: 64 KiB clusters, 1 GiB virtual size.
    fn header() -> Vec<u8> {
        let cluster = 1u64 << 16;
        let mut h = vec![0u8; 4 * cluster as usize];
        h[..4].copy_from_slice(&QCOW2_MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        // One L1 entry maps 512 MiB with 64 KiB clusters.
        h[36..40].copy_from_slice(&2u32.to_be_bytes());
        h[40..48].copy_from_slice(&(3 * cluster).to_be_bytes());
        h[48..56].copy_from_slice(&cluster.to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h
    }

    fn check(h: &[u8]) -> Result<Inspection, InspectError> {
        inspect_qcow2(h, h.len() as u64)
    }

    #[test]
    fn valid_header_reports_virtual_size() {
        let i = check(&header()).unwrap();
        assert_eq!(i.format, ImageType::Qcow2);
        assert_eq!(i.virtual_size, 1 << 30);
    }

    #[test]
    fn hostile_headers_are_rejected() {
        let mut h = header();
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        assert_eq!(check(&h), Err(InspectError::BackingFile));

        let mut h = header();
        h[72..80].copy_from_slice(&(1u64 << 2).to_be_bytes());
        assert_eq!(check(&h), Err(InspectError::ExternalDataFile));

        let mut h = header();
        h[112..116].copy_from_slice(&EXT_DATA_FILE.to_be_bytes());
        h[116..120].copy_from_slice(&11u32.to_be_bytes());
        assert_eq!(check(&h), Err(InspectError::ExternalDataFile));

        let mut h = header();
        h[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(check(&h), Err(InspectError::Encrypted(2)));

        let mut h = header();
        h[72..80].copy_from_slice(&(1u64 << 1).to_be_bytes());
        assert_eq!(check(&h), Err(InspectError::Corrupt));

        let mut h = header();
        h[72..80].copy_from_slice(&(1u64 << 4).to_be_bytes());
        assert_eq!(check(&h), Err(InspectError::IncompatibleFeatures(1 << 4)));

        let mut h = header();
        h[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(check(&h), Err(InspectError::Version(4)));

        let mut h = header();
        h[20..24].copy_from_slice(&30u32.to_be_bytes());
        assert!(matches!(check(&h), Err(InspectError::Impossible { .. })));

        let mut h = header();
        h[24..32].copy_from_slice(&(1u64 << 50).to_be_bytes());
        assert!(
            matches!(check(&h), Err(InspectError::Impossible { .. })),
            "L1 too small"
        );

        let mut h = header();
        h[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(
            matches!(check(&h), Err(InspectError::Impossible { .. })),
            "L1 beyond file"
        );

        let h = header();
        assert!(matches!(
            inspect_qcow2(&h[..50], 50),
            Err(InspectError::Truncated { .. })
        ));
    }

    #[test]
    fn dirty_and_compression_bits_are_fine() {
        let mut h = header();
        h[72..80].copy_from_slice(&(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION_TYPE).to_be_bytes());
        h[104] = 1;
        assert!(check(&h).is_ok());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let base = header();
        for i in 0..base.len().min(200) {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut h = base.clone();
                h[i] = v;
                let _ = check(&h);
                let _ = inspect_qcow2(&h[..i], i as u64);
                let _ = inspect_qcow2(&h, 10);
            }
        }
    }
}
