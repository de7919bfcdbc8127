//! VHDX: the file identifier, the two headers, both region tables (which must agree, so QEMU
//! reads what we read whichever it picks), the metadata table: virtual size, block size,
//! sector size, and no parent (the `has_parent` flag or a parent locator item). Unknown
//! regions or metadata items marked required are refused. Facts from QEMU's block/vhdx.c and
//! the MS-VHDX specification.

use super::read::{ReadAt, exact, le16, le32, le64, within};
use super::verdict::{InspectError, Inspection, Subformat, check_virtual_size};
use crate::image::ImageType;

pub(crate) const MAGIC: [u8; 8] = *b"vhdxfile";
const HEADERS: [u64; 2] = [64 << 10, 128 << 10];
const REGION_TABLES: [u64; 2] = [192 << 10, 256 << 10];
const MAX_ENTRIES: u32 = 2047;
/// The checks this module applies (reported by preflight).
pub(crate) const CHECKS: &[&str] = &[
    "magic",
    "headers and both region tables agree",
    "no unknown required region or metadata item",
    "no parent (has_parent flag, parent locator)",
    "block and sector sizes",
    "block allocation table covers the virtual size",
    "virtual size bound",
];

/// A GUID as VHDX stores it, from its registry form `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`
/// (the first three fields little-endian, the last two as written).
const fn guid(text: &str) -> [u8; 16] {
    const fn hex(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'F' => c - b'A' + 10,
            _ => panic!("not an upper-case hex digit"),
        }
    }
    let t = text.as_bytes();
    assert!(t.len() == 36, "not a GUID");
    let mut raw = [0u8; 16];
    let (mut i, mut n) = (0, 0);
    while i < t.len() {
        if t[i] == b'-' {
            i += 1;
            continue;
        }
        raw[n] = (hex(t[i]) << 4) | hex(t[i + 1]);
        (i, n) = (i + 2, n + 1);
    }
    [
        raw[3], raw[2], raw[1], raw[0], raw[5], raw[4], raw[7], raw[6], raw[8], raw[9], raw[10],
        raw[11], raw[12], raw[13], raw[14], raw[15],
    ]
}

const BAT_REGION: [u8; 16] = guid("2DC27766-F623-4200-9D64-115E9BFD4A08");
const METADATA_REGION: [u8; 16] = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E");
const FILE_PARAMETERS: [u8; 16] = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
const VIRTUAL_DISK_SIZE: [u8; 16] = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
const PAGE83: [u8; 16] = guid("BECA12AB-B2E6-4523-93EF-C309E000C746");
const LOGICAL_SECTOR: [u8; 16] = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
const PHYSICAL_SECTOR: [u8; 16] = guid("CDA348C7-445D-4471-9CC9-E9885251C556");
const PARENT_LOCATOR: [u8; 16] = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");

fn impossible(detail: impl Into<String>) -> InspectError {
    InspectError::impossible(ImageType::Vhdx, detail)
}

fn parent(detail: &str) -> InspectError {
    InspectError::Parent {
        format: ImageType::Vhdx,
        detail: detail.into(),
    }
}

/// A region's place in the file.
#[derive(Clone, Copy)]
struct Region {
    offset: u64,
    len: u64,
}

/// Inspects a VHDX (starts with `vhdxfile`).
pub(crate) fn inspect(src: &dyn ReadAt) -> Result<Inspection, InspectError> {
    check_headers(src)?;
    let (bat, meta) = region_table(src)?;
    let m = metadata(src, meta)?;
    let virtual_size = check_virtual_size(ImageType::Vhdx, m.virtual_size)?;
    if !virtual_size.is_multiple_of(m.logical_sector as u64) {
        return Err(impossible(
            "virtual size is not a multiple of the sector size",
        ));
    }
    // QEMU's BAT geometry: one payload entry per block, one sector-bitmap entry per chunk.
    let chunk_ratio = ((1u64 << 23) * m.logical_sector as u64) / m.block_size as u64;
    let blocks = virtual_size.div_ceil(m.block_size as u64);
    let entries = blocks + (blocks - 1) / chunk_ratio.max(1);
    if entries.saturating_mul(8) > bat.len {
        return Err(impossible(format!(
            "block allocation table of {} bytes cannot map {virtual_size} bytes",
            bat.len
        )));
    }
    let subformat = if m.fixed {
        Subformat::Fixed
    } else {
        Subformat::Dynamic
    };
    Ok(Inspection::bare(
        ImageType::Vhdx,
        virtual_size,
        Some(subformat),
    ))
}

/// At least one of the two headers carries the `head` signature, and each that does is
/// version 1.
fn check_headers(src: &dyn ReadAt) -> Result<(), InspectError> {
    let mut found = false;
    for at in HEADERS {
        let h = exact(src, ImageType::Vhdx, at, 80)?;
        if &h[..4] != b"head" {
            continue;
        }
        found = true;
        let version = le16(&h, 66);
        if version != 1 {
            return Err(impossible(format!("header version {version}")));
        }
    }
    if !found {
        return Err(impossible("no header carries the head signature"));
    }
    Ok(())
}

/// Reads both region tables, requires them to be the same, and returns the BAT and metadata
/// regions.
fn region_table(src: &dyn ReadAt) -> Result<(Region, Region), InspectError> {
    let size = src.size();
    let mut tables = Vec::with_capacity(2);
    for at in REGION_TABLES {
        let t = exact(src, ImageType::Vhdx, at, 16)?;
        if &t[..4] != b"regi" {
            return Err(impossible(format!(
                "region table at {at} has no regi signature"
            )));
        }
        let count = le32(&t, 8);
        if count > MAX_ENTRIES {
            return Err(impossible(format!("{count} region table entries")));
        }
        tables.push(exact(src, ImageType::Vhdx, at, 16 + count as usize * 32)?);
    }
    if tables[0] != tables[1] {
        return Err(impossible("the two region tables differ"));
    }
    let t = &tables[0];
    let (mut bat, mut meta) = (None, None);
    for e in t[16..].chunks_exact(32) {
        let region = Region {
            offset: le64(e, 16),
            len: le32(e, 24) as u64,
        };
        let slot = if e[..16] == BAT_REGION {
            &mut bat
        } else if e[..16] == METADATA_REGION {
            &mut meta
        } else if le32(e, 28) & 1 != 0 {
            return Err(impossible("an unknown region is marked required"));
        } else {
            continue;
        };
        if slot.is_some() {
            return Err(impossible("a region is listed twice"));
        }
        if !region.offset.is_multiple_of(1 << 20)
            || region.offset < 1 << 20
            || region.len == 0
            || !within(region.offset, region.len, size)
        {
            return Err(impossible(format!(
                "region at {} (+{}) is misplaced or beyond the file",
                region.offset, region.len
            )));
        }
        *slot = Some(region);
    }
    match (bat, meta) {
        (Some(b), Some(m)) => Ok((b, m)),
        _ => Err(impossible("the BAT or the metadata region is missing")),
    }
}

/// What the metadata region says.
struct Metadata {
    virtual_size: u64,
    block_size: u32,
    logical_sector: u32,
    /// `leave_blocks_allocated`: a fixed VHDX.
    fixed: bool,
}

/// Walks the metadata table: every item inside the region, the known ones read, a parent
/// refused, unknown required ones refused.
fn metadata(src: &dyn ReadAt, region: Region) -> Result<Metadata, InspectError> {
    let head = exact(src, ImageType::Vhdx, region.offset, 32)?;
    if &head[..8] != b"metadata" {
        return Err(impossible("metadata region has no metadata signature"));
    }
    let count = le16(&head, 10) as u32;
    if count > MAX_ENTRIES {
        return Err(impossible(format!("{count} metadata entries")));
    }
    let table = exact(
        src,
        ImageType::Vhdx,
        region.offset,
        32 + count as usize * 32,
    )?;
    let item = |e: &[u8], want: usize| -> Result<Vec<u8>, InspectError> {
        let (off, len) = (le32(e, 16) as u64, le32(e, 20) as u64);
        if off < 64 << 10 || len < want as u64 || !within(off, len, region.len) {
            return Err(impossible(
                "a metadata item lies outside the metadata region",
            ));
        }
        exact(src, ImageType::Vhdx, region.offset + off, want)
    };
    let (mut size, mut params, mut sector) = (None, None, None);
    for e in table[32..].chunks_exact(32) {
        let id: [u8; 16] = e[..16].try_into().expect("16 bytes");
        match id {
            PARENT_LOCATOR => return Err(parent("parent locator")),
            VIRTUAL_DISK_SIZE => size = Some(le64(&item(e, 8)?, 0)),
            FILE_PARAMETERS => params = Some(item(e, 8)?),
            LOGICAL_SECTOR => sector = Some(le32(&item(e, 4)?, 0)),
            PAGE83 | PHYSICAL_SECTOR => {}
            _ if le32(e, 24) & 4 != 0 => {
                return Err(impossible("an unknown metadata item is marked required"));
            }
            _ => {}
        }
    }
    let (Some(virtual_size), Some(params), Some(logical_sector)) = (size, params, sector) else {
        return Err(impossible(
            "virtual size, file parameters or sector size missing",
        ));
    };
    let (block_size, flags) = (le32(&params, 0), le32(&params, 4));
    if flags & 2 != 0 {
        return Err(parent("has_parent flag"));
    }
    if !block_size.is_power_of_two() || !((1 << 20)..=(256 << 20)).contains(&block_size) {
        return Err(impossible(format!("block size {block_size}")));
    }
    if logical_sector != 512 && logical_sector != 4096 {
        return Err(impossible(format!("logical sector size {logical_sector}")));
    }
    Ok(Metadata {
        virtual_size,
        block_size,
        logical_sector,
        fixed: flags & 1 != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_stored_with_the_first_three_fields_little_endian() {
        assert_eq!(
            BAT_REGION,
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08,
            ]
        );
    }
}
