//! VDI (VirtualBox): version 1.1, normal (dynamic) or fixed images; undo and differencing
//! images, a link or parent UUID are refused; block map and data inside the file, sizes that
//! agree with each other. Facts from QEMU's block/vdi.c.

use super::read::{ReadAt, exact, le32, le64, within};
use super::verdict::{InspectError, Inspection, Subformat, check_virtual_size};
use crate::image::ImageType;

/// The signature at offset 0x40.
pub(crate) const SIGNATURE: u32 = 0xbeda_107f;
pub(crate) const SIGNATURE_OFFSET: usize = 0x40;
const VERSION: u32 = 0x0001_0001;
const TYPE_NORMAL: u32 = 1;
const TYPE_FIXED: u32 = 2;
const TYPE_DIFF: u32 = 4;
/// The only block size QEMU accepts (1 MiB).
const BLOCK_SIZE: u32 = 1 << 20;
/// QEMU's VDI_BLOCKS_IN_IMAGE_MAX.
const MAX_BLOCKS: u32 = 0x3fff_ffff;
/// The checks this module applies (reported by preflight).
pub(crate) const CHECKS: &[&str] = &[
    "signature and version",
    "normal or fixed image type (undo and differencing refused)",
    "no link or parent UUID",
    "block size, sector size, block map and data inside the file",
    "virtual size bound",
];

fn impossible(detail: impl Into<String>) -> InspectError {
    InspectError::impossible(ImageType::Vdi, detail)
}

/// Inspects a VDI (the signature at 0x40).
pub(crate) fn inspect(src: &dyn ReadAt) -> Result<Inspection, InspectError> {
    let size = src.size();
    let h = exact(src, ImageType::Vdi, 0, 512)?;
    if le32(&h, 0x44) != VERSION {
        return Err(impossible(format!("version 0x{:08x}", le32(&h, 0x44))));
    }
    let image_type = le32(&h, 0x4c);
    let subformat = match image_type {
        TYPE_NORMAL => Subformat::Dynamic,
        TYPE_FIXED => Subformat::Fixed,
        TYPE_DIFF => {
            return Err(InspectError::Parent {
                format: ImageType::Vdi,
                detail: "differencing image".into(),
            });
        }
        other => {
            return Err(InspectError::Subformat {
                format: ImageType::Vdi,
                name: format!("image type {other}"),
            });
        }
    };
    for (at, what) in [(0x1a8, "link UUID"), (0x1b8, "parent UUID")] {
        if h[at..at + 16].iter().any(|&b| b != 0) {
            return Err(InspectError::Parent {
                format: ImageType::Vdi,
                detail: what.into(),
            });
        }
    }
    let (bmap, data) = (le32(&h, 0x154) as u64, le32(&h, 0x158) as u64);
    let sector_size = le32(&h, 0x168);
    let disk_size = le64(&h, 0x170);
    let (block_size, block_extra) = (le32(&h, 0x178), le32(&h, 0x17c));
    let (blocks, allocated) = (le32(&h, 0x180), le32(&h, 0x184));
    if sector_size != 512 || block_size != BLOCK_SIZE || block_extra != 0 {
        return Err(impossible(format!(
            "sector size {sector_size}, block size {block_size}, block extra {block_extra}"
        )));
    }
    if blocks > MAX_BLOCKS || allocated > blocks {
        return Err(impossible(format!(
            "{blocks} blocks, {allocated} allocated"
        )));
    }
    let virtual_size = check_virtual_size(ImageType::Vdi, disk_size)?;
    if virtual_size > blocks as u64 * block_size as u64 {
        return Err(impossible(format!(
            "disk size {virtual_size} larger than {blocks} blocks of {block_size}"
        )));
    }
    if !bmap.is_multiple_of(512) || !data.is_multiple_of(512) || bmap < 512 {
        return Err(impossible("block map or data offset unaligned"));
    }
    let data_bytes = allocated as u64 * block_size as u64;
    if bmap + blocks as u64 * 4 > data || !within(data, data_bytes, size) {
        return Err(impossible(format!(
            "block map at {bmap} ({blocks} entries) and data at {data} ({allocated} blocks) \
             do not fit a file of {size} bytes"
        )));
    }
    Ok(Inspection::bare(
        ImageType::Vdi,
        virtual_size,
        Some(subformat),
    ))
}
