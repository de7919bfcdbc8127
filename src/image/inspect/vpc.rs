//! VHD (QEMU's `vpc`): fixed disks (the footer only at the end) and dynamic disks (a footer
//! copy at the start and a `cxsparse` header); differencing disks (type 4, a parent UUID,
//! name or locator) are refused. The virtual size is computed as QEMU computes it (geometry or
//! `current_size`, by creator). Facts from QEMU's block/vpc.c.

use super::read::{ReadAt, be32, be64, exact, within};
use super::verdict::{InspectError, Inspection, Subformat, check_virtual_size};
use crate::image::ImageType;

pub(crate) const COOKIE: [u8; 8] = *b"conectix";
const SPARSE_COOKIE: [u8; 8] = *b"cxsparse";
/// QEMU's limit: 2040 GiB (VHD_MAX_SECTORS).
const MAX_SECTORS: u64 = 0xff00_0000;
/// Geometry that means "use current_size" (VHD_MAX_GEOMETRY).
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;
/// The checks this module applies (reported by preflight).
pub(crate) const CHECKS: &[&str] = &[
    "footer cookie",
    "fixed or dynamic disk type (differencing refused)",
    "no parent UUID, name or locator",
    "block table inside the file and covering the virtual size",
    "virtual size bound",
];

fn impossible(detail: impl Into<String>) -> InspectError {
    InspectError::impossible(ImageType::Vpc, detail)
}

/// Whether the last 512 bytes are a VHD footer (a fixed VHD: no magic at the start).
pub(crate) fn has_footer_at_end(src: &dyn ReadAt) -> Result<bool, InspectError> {
    let size = src.size();
    if size < 1024 {
        return Ok(false);
    }
    Ok(src.read_at(size - 512, 8)? == COOKIE)
}

/// Inspects a VHD: `at_start` when the footer copy is at offset 0 (dynamic), else the footer
/// is the file's last 512 bytes (fixed).
pub(crate) fn inspect(src: &dyn ReadAt, at_start: bool) -> Result<Inspection, InspectError> {
    let size = src.size();
    let offset = if at_start {
        0
    } else {
        size.saturating_sub(512)
    };
    let footer = exact(src, ImageType::Vpc, offset, 512)?;
    if footer[..8] != COOKIE {
        return Err(impossible("no conectix footer"));
    }
    let disk_type = be32(&footer, 60);
    // QEMU decides by where the footer is, not by the type field: both must agree.
    let expected = if at_start { TYPE_DYNAMIC } else { TYPE_FIXED };
    if disk_type == TYPE_DIFFERENCING {
        return Err(InspectError::Parent {
            format: ImageType::Vpc,
            detail: "differencing disk".into(),
        });
    }
    if disk_type != expected {
        return Err(InspectError::Subformat {
            format: ImageType::Vpc,
            name: format!("disk type {disk_type} with the footer at offset {offset}"),
        });
    }
    let virtual_size = virtual_size(&footer)?;
    if at_start {
        check_dynamic(src, be64(&footer, 16), virtual_size)?;
    } else if virtual_size > size - 512 {
        return Err(impossible(format!(
            "fixed disk of {virtual_size} bytes in a file of {size}"
        )));
    }
    let subformat = if at_start {
        Subformat::Dynamic
    } else {
        Subformat::Fixed
    };
    Ok(Inspection::bare(
        ImageType::Vpc,
        virtual_size,
        Some(subformat),
    ))
}

/// QEMU's rule: the CHS geometry gives the size, except for images made by Hyper-V, Disk2VHD,
/// XenServer, QEMU's own `qem2` and blktap, or with the maximum geometry: then `current_size`.
fn virtual_size(footer: &[u8]) -> Result<u64, InspectError> {
    let chs = (u16::from_be_bytes([footer[56], footer[57]]) as u64)
        * footer[58] as u64
        * footer[59] as u64;
    let creator = &footer[28..32];
    let use_chs = ![b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"]
        .iter()
        .any(|c| creator == *c);
    let sectors = if !use_chs || chs == MAX_GEOMETRY {
        be64(footer, 48) / 512
    } else {
        chs
    };
    if sectors > MAX_SECTORS {
        return Err(InspectError::VirtualSize {
            format: ImageType::Vpc,
            size: sectors.saturating_mul(512),
            max: MAX_SECTORS * 512,
        });
    }
    check_virtual_size(ImageType::Vpc, sectors * 512)
}

/// The dynamic disk header at `data_offset`: the `cxsparse` cookie, no parent, a block table
/// inside the file that covers the virtual size.
fn check_dynamic(
    src: &dyn ReadAt,
    data_offset: u64,
    virtual_size: u64,
) -> Result<(), InspectError> {
    let size = src.size();
    if !within(data_offset, 1024, size) {
        return Err(impossible(format!(
            "dynamic header at {data_offset} lies beyond the file"
        )));
    }
    let h = exact(src, ImageType::Vpc, data_offset, 1024)?;
    if h[..8] != SPARSE_COOKIE {
        return Err(impossible("dynamic header without the cxsparse cookie"));
    }
    let parent = |detail: &str| InspectError::Parent {
        format: ImageType::Vpc,
        detail: detail.into(),
    };
    if h[40..56].iter().any(|&b| b != 0) {
        return Err(parent("parent UUID"));
    }
    if h[64..576].iter().any(|&b| b != 0) {
        return Err(parent("parent name"));
    }
    if h[576..768].chunks_exact(24).any(|l| be32(l, 0) != 0) {
        return Err(parent("parent locator"));
    }
    let table_offset = be64(&h, 16);
    let entries = be32(&h, 28) as u64;
    let block_size = be32(&h, 32) as u64;
    if !block_size.is_power_of_two() || block_size < 512 {
        return Err(impossible(format!("block size {block_size}")));
    }
    if entries > MAX_SECTORS * 512 / block_size || entries * block_size < virtual_size {
        return Err(impossible(format!(
            "block table of {entries} entries of {block_size} bytes for {virtual_size} bytes"
        )));
    }
    if !within(table_offset, entries * 4, size) {
        return Err(impossible("block table lies beyond the file"));
    }
    Ok(())
}
