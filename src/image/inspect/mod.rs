//! Image inspection in Rust, before any qemu-img call: decides the format from the bytes
//! (magic numbers, never names) and runs that format's checks (one file per format); an OVA's
//! disk is found in the tar and inspected as an image of its own. Implements the checklist of
//! `shared/reference/image-safety.md`. Everything reads through `ReadAt`, so the same code
//! judges a cached file, a remote object by ranges (preflight) and fuzzed bytes.

mod ova;
pub mod qcow2;
mod read;
mod vdi;
mod verdict;
mod vhdx;
mod vmdk;
mod vpc;

pub(crate) use qcow2::MAX_HEADER_READ;
pub use qcow2::QCOW2_MAGIC;
pub use read::{Bytes, ReadAt};
pub(crate) use read::{FileSource, Ranges};
pub use verdict::{InspectError, Inspection, Member, OvaFault, Subformat};

use crate::image::ImageType;
use read::Window;

/// What the bytes look like, before the format's own checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Qcow2,
    Vmdk,
    /// A VMDK text descriptor (always refused).
    VmdkDescriptor,
    Vhdx,
    /// VHD with its footer copy at the start (dynamic).
    VpcDynamic,
    /// VHD with its footer only at the end (fixed).
    VpcFixed,
    Vdi,
    Ova,
    Raw,
}

/// Decides what the image is from its first bytes (and, for a fixed VHD, its last 512).
pub fn detect(src: &dyn ReadAt) -> Result<Detected, InspectError> {
    if src.size() == 0 {
        return Err(InspectError::Empty);
    }
    let head = src.read_at(0, 512)?;
    let starts = |magic: &[u8]| head.starts_with(magic);
    let vdi = head.len() >= vdi::SIGNATURE_OFFSET + 4
        && u32::from_le_bytes(
            head[vdi::SIGNATURE_OFFSET..vdi::SIGNATURE_OFFSET + 4]
                .try_into()
                .expect("4 bytes"),
        ) == vdi::SIGNATURE;
    Ok(if starts(&QCOW2_MAGIC) {
        Detected::Qcow2
    } else if starts(&vmdk::MAGIC) {
        Detected::Vmdk
    } else if starts(vmdk::DESCRIPTOR_FILE) {
        Detected::VmdkDescriptor
    } else if starts(&vhdx::MAGIC) {
        Detected::Vhdx
    } else if starts(&vpc::COOKIE) {
        Detected::VpcDynamic
    } else if vdi {
        Detected::Vdi
    } else if ova::is_tar(&head) {
        Detected::Ova
    } else if vpc::has_footer_at_end(src)? {
        Detected::VpcFixed
    } else {
        Detected::Raw
    })
}

/// Inspects an image: its format, virtual size and subformat, or why it is refused.
pub fn inspect(src: &dyn ReadAt) -> Result<Inspection, InspectError> {
    match detect(src)? {
        Detected::Ova => {
            let disk = ova::locate_disk(src)?;
            let window = Window {
                inner: src,
                offset: disk.offset,
                len: disk.size,
            };
            match detect(&window) {
                Ok(Detected::Ova) => Err(InspectError::ova(
                    OvaFault::Disk,
                    "the disk is itself an OVA",
                )),
                Ok(_) => Ok(Inspection {
                    ova_disk: Some(disk),
                    ..inspect_bare(&window)?
                }),
                Err(e) => Err(InspectError::ova(OvaFault::Disk, e.to_string())),
            }
        }
        _ => inspect_bare(src),
    }
}

/// Inspects an image that is not a container.
fn inspect_bare(src: &dyn ReadAt) -> Result<Inspection, InspectError> {
    match detect(src)? {
        Detected::Qcow2 => qcow2::inspect(src),
        Detected::Vmdk => vmdk::inspect(src),
        Detected::VmdkDescriptor => Err(InspectError::DescriptorFile),
        Detected::Vhdx => vhdx::inspect(src),
        Detected::VpcDynamic => vpc::inspect(src, true),
        Detected::VpcFixed => vpc::inspect(src, false),
        Detected::Vdi => vdi::inspect(src),
        Detected::Ova => Err(InspectError::ova(OvaFault::Disk, "nested OVA")),
        Detected::Raw => Ok(Inspection::bare(ImageType::Raw, src.size(), None)),
    }
}

/// The checks the inspector applies to what `detect` found (reported by preflight).
pub fn checks(found: Detected) -> &'static [&'static str] {
    match found {
        Detected::Qcow2 => qcow2::CHECKS,
        Detected::Vmdk | Detected::VmdkDescriptor => vmdk::CHECKS,
        Detected::Vhdx => vhdx::CHECKS,
        Detected::VpcDynamic | Detected::VpcFixed => vpc::CHECKS,
        Detected::Vdi => vdi::CHECKS,
        Detected::Ova => ova::CHECKS,
        Detected::Raw => &["no format magic: read as raw"],
    }
}

/// The checks an accepted image went through (reported by preflight): its format's, the
/// OVA's when it came from one, and the explicit format of every qemu-img call.
pub fn checks_of(found: &Inspection) -> Vec<&'static str> {
    let mut out = Vec::new();
    if found.ova_disk.is_some() {
        out.extend(ova::CHECKS);
    }
    out.extend(match found.format {
        ImageType::Qcow2 => qcow2::CHECKS,
        ImageType::Vmdk => vmdk::CHECKS,
        ImageType::Vhdx => vhdx::CHECKS,
        ImageType::Vpc => vpc::CHECKS,
        ImageType::Vdi => vdi::CHECKS,
        ImageType::Raw => checks(Detected::Raw),
    });
    out.push("explicit format (-f, or --image-opts driver) on every qemu-img call");
    out
}

/// Inspects the start of an image (`head`: the first bytes) of a file of `file_len` bytes.
/// Reads past `head` come back short (a format that needs them reports a truncated header).
pub fn inspect_bytes(head: &[u8], file_len: u64) -> Result<Inspection, InspectError> {
    inspect(&Bytes {
        data: head,
        size: file_len,
    })
}

/// Checks the detected format against what the request declared.
pub(crate) fn check_requested(
    found: &Inspection,
    requested: ImageType,
) -> Result<(), InspectError> {
    if found.format != requested {
        return Err(InspectError::FormatMismatch {
            requested,
            detected: found.format,
        });
    }
    Ok(())
}

/// Inspects an image file (reads only what the format's checks need, at most
/// `read::READ_BUDGET` bytes; blocking).
pub(crate) fn inspect_file(path: &std::path::Path) -> Result<Inspection, InspectError> {
    inspect(&FileSource::open(path)?)
}

#[cfg(test)]
mod tests;
