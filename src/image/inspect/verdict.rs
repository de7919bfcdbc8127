//! What the inspector concludes: the verdict on an acceptable image (`Inspection`, stored with
//! the cache entry) and every reason an image is refused (`InspectError`, whose `kind` is the
//! reason code of metrics and job errors).

use serde::{Deserialize, Serialize};

use crate::image::ImageType;

/// The largest virtual size any format may declare (64 TiB, VHDX's own maximum and beyond
/// what the other formats' drivers accept).
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// The variant of a format, where the format has several (reported by preflight and status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Subformat {
    /// VMDK: one sparse extent inside the file, grain directory in the header.
    #[serde(rename = "monolithicSparse")]
    MonolithicSparse,
    /// VMDK: one compressed sparse extent, grain directory in the footer (OVA disks).
    #[serde(rename = "streamOptimized")]
    StreamOptimized,
    /// VHD and VDI: all blocks preallocated.
    #[serde(rename = "fixed")]
    Fixed,
    /// VHD, VHDX and VDI: blocks allocated on write.
    #[serde(rename = "dynamic")]
    Dynamic,
}

impl Subformat {
    /// The name as reported (VMware's and QEMU's spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::StreamOptimized => "streamOptimized",
            Subformat::Fixed => "fixed",
            Subformat::Dynamic => "dynamic",
        }
    }
}

/// Where an image lies inside a container file (the disk member of an OVA): qemu-img reads
/// exactly these bytes, through a `raw` driver with this offset and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub offset: u64,
    pub size: u64,
}

/// The verdict on an acceptable image (stored with the cache entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspection {
    pub format: ImageType,
    /// Size of the disk the image describes (from the format's header, or the raw file size).
    pub virtual_size: u64,
    /// The format's variant, where it has several (entries of older versions: none).
    #[serde(default)]
    pub subformat: Option<Subformat>,
    /// Set when the image is the disk inside an OVA: where it lies in the file.
    #[serde(default)]
    pub ova_disk: Option<Member>,
}

impl Inspection {
    /// A verdict on a bare image (not inside a container).
    pub(crate) fn bare(format: ImageType, virtual_size: u64, subformat: Option<Subformat>) -> Self {
        Inspection {
            format,
            virtual_size,
            subformat,
            ova_disk: None,
        }
    }
}

/// What is wrong with an OVA (the reason codes of its refusals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OvaFault {
    /// More members than `MAX_OVA_MEMBERS`.
    MemberCount,
    /// A member name that is absolute, climbs out (`..`), is too long or has odd characters.
    MemberName,
    /// A link, a device, a directory or another non-file member.
    MemberType,
    /// No OVF descriptor first, or one that cannot be read or names no disk.
    Descriptor,
    /// The disk the OVF names is missing, misplaced, or itself unacceptable as a disk.
    Disk,
    /// Not a readable tar archive.
    Archive,
}

impl OvaFault {
    fn kind(self) -> &'static str {
        match self {
            OvaFault::MemberCount => "ova_member_count",
            OvaFault::MemberName => "ova_member_name",
            OvaFault::MemberType => "ova_member_type",
            OvaFault::Descriptor => "ova_descriptor",
            OvaFault::Disk => "ova_disk",
            OvaFault::Archive => "ova_archive",
        }
    }
}

/// Why an image is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InspectError {
    /// A 0-byte file: it would become an all-zero volume, which no one asks for.
    #[error("image is empty (0 bytes)")]
    Empty,
    #[error("{format} header is truncated: the file has {len} bytes, the header needs {need}")]
    Truncated {
        format: ImageType,
        len: u64,
        need: u64,
    },
    #[error("unsupported qcow2 version {0} (only 2 and 3 are accepted)")]
    Version(u32),
    #[error("qcow2 image names a backing file; backing files are refused")]
    BackingFile,
    /// A VMDK, VHDX, VHD or VDI that refers to a parent image (a differencing disk).
    #[error("{format} image refers to a parent image ({detail}); differencing images are refused")]
    Parent { format: ImageType, detail: String },
    #[error("qcow2 image uses an external data file; external data files are refused")]
    ExternalDataFile,
    #[error("qcow2 image is encrypted (crypt_method {0}); encrypted images are refused")]
    Encrypted(u32),
    #[error("qcow2 image is marked corrupt")]
    Corrupt,
    #[error("qcow2 image has unsupported incompatible features 0x{0:x}")]
    IncompatibleFeatures(u64),
    #[error("{format} header is impossible: {detail}")]
    Impossible { format: ImageType, detail: String },
    /// A VMDK text descriptor (not a single-file VMDK): its extent lines name other files.
    #[error(
        "image is a VMDK descriptor file, whose extents name other files; only single-file \
         VMDKs (monolithicSparse, streamOptimized) are accepted"
    )]
    DescriptorFile,
    /// A VMDK whose embedded descriptor names other files or more than one extent.
    #[error("vmdk extent refused: {0}")]
    Extent(String),
    /// A variant of the format that is refused (a VMDK createType, a VHD or VDI disk type).
    #[error("{format} subformat {name} is not accepted")]
    Subformat { format: ImageType, name: String },
    #[error("{format} image declares a virtual size of {size} bytes, above the limit of {max}")]
    VirtualSize {
        format: ImageType,
        size: u64,
        max: u64,
    },
    #[error("ova refused: {detail}")]
    Ova { fault: OvaFault, detail: String },
    #[error("image_type is {requested} but the image is {detected}")]
    FormatMismatch {
        requested: ImageType,
        detected: ImageType,
    },
    #[error("cannot read image: {0}")]
    Io(String),
}

impl InspectError {
    /// Every `kind` label (so the metric's series exist from the start).
    pub(crate) const KINDS: [&'static str; 22] = [
        "empty",
        "truncated",
        "unsupported_version",
        "backing_file",
        "data_file",
        "encrypted",
        "corrupt",
        "incompatible_features",
        "impossible_header",
        "vmdk_descriptor_file",
        "vmdk_extent",
        "unsupported_subformat",
        "virtual_size_limit",
        "ova_member_count",
        "ova_member_name",
        "ova_member_type",
        "ova_descriptor",
        "ova_disk",
        "ova_archive",
        "format_mismatch",
        "io",
        "parent_image",
    ];

    /// Short label for metrics (`image_errors_total{error_type}`): the refusal's reason code.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            InspectError::Empty => "empty",
            InspectError::Truncated { .. } => "truncated",
            InspectError::Version(_) => "unsupported_version",
            InspectError::BackingFile => "backing_file",
            InspectError::Parent { .. } => "parent_image",
            InspectError::ExternalDataFile => "data_file",
            InspectError::Encrypted(_) => "encrypted",
            InspectError::Corrupt => "corrupt",
            InspectError::IncompatibleFeatures(_) => "incompatible_features",
            InspectError::Impossible { .. } => "impossible_header",
            InspectError::DescriptorFile => "vmdk_descriptor_file",
            InspectError::Extent(_) => "vmdk_extent",
            InspectError::Subformat { .. } => "unsupported_subformat",
            InspectError::VirtualSize { .. } => "virtual_size_limit",
            InspectError::Ova { fault, .. } => fault.kind(),
            InspectError::FormatMismatch { .. } => "format_mismatch",
            InspectError::Io(_) => "io",
        }
    }

    /// An impossible header of `format`.
    pub(crate) fn impossible(format: ImageType, detail: impl Into<String>) -> InspectError {
        InspectError::Impossible {
            format,
            detail: detail.into(),
        }
    }

    /// A refused OVA.
    pub(crate) fn ova(fault: OvaFault, detail: impl Into<String>) -> InspectError {
        InspectError::Ova {
            fault,
            detail: detail.into(),
        }
    }
}

/// `size` within `MAX_VIRTUAL_SIZE` and not 0.
pub(crate) fn check_virtual_size(format: ImageType, size: u64) -> Result<u64, InspectError> {
    if size == 0 {
        return Err(InspectError::impossible(format, "virtual size is 0"));
    }
    if size > MAX_VIRTUAL_SIZE {
        return Err(InspectError::VirtualSize {
            format,
            size,
            max: MAX_VIRTUAL_SIZE,
        });
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_listed_once() {
        let mut seen = std::collections::HashSet::new();
        for k in InspectError::KINDS {
            assert!(seen.insert(k), "{k} twice");
        }
        let samples = [
            InspectError::Parent {
                format: ImageType::Vhdx,
                detail: "x".into(),
            },
            InspectError::DescriptorFile,
            InspectError::ova(OvaFault::MemberName, "x"),
            InspectError::ova(OvaFault::MemberCount, "x"),
        ];
        for s in samples {
            assert!(InspectError::KINDS.contains(&s.kind()), "{s:?}");
        }
    }

    #[test]
    fn old_entries_read_without_the_new_fields() {
        let old = r#"{"format":"qcow2","virtual_size":1024}"#;
        let i: Inspection = serde_json::from_str(old).unwrap();
        assert_eq!(i, Inspection::bare(ImageType::Qcow2, 1024, None));
    }
}
