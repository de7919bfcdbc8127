//! VMDK: only the single-file sparse subformats `monolithicSparse` and `streamOptimized`
//! (a `KDMV` sparse header with an embedded descriptor). The descriptor is parsed line by
//! line and anything not understood is refused: it must name exactly one SPARSE extent whose
//! name holds no path, no parent (`parentCID` unset, no `parentFileNameHint`), and nothing
//! else. Text descriptor files are refused outright (CVE-2022-47951: their extent lines are
//! host paths). Facts from QEMU's block/vmdk.c and OpenStack's format_inspector.

use super::read::{ReadAt, exact, le16, le32, le64, within};
use super::verdict::{InspectError, Inspection, Subformat, check_virtual_size};
use crate::image::ImageType;

pub(crate) const MAGIC: [u8; 4] = *b"KDMV";
/// How a VMDK text descriptor file starts (refused wherever it is found).
pub(crate) const DESCRIPTOR_FILE: &[u8] = b"# Disk DescriptorFile";
/// `gd_offset` meaning "the grain directory is in the footer" (streamOptimized).
const GD_AT_END: u64 = u64::MAX;
/// The largest embedded descriptor (QEMU's own limit: 1 MiB).
const MAX_DESCRIPTOR_SECTORS: u64 = 2048;
/// The checks this module applies (reported by preflight).
pub(crate) const CHECKS: &[&str] = &[
    "magic",
    "version 1 to 3",
    "subformat monolithicSparse or streamOptimized",
    "embedded descriptor with exactly one SPARSE extent naming no path",
    "no parent (parentCID, parentFileNameHint)",
    "grain directory and footer inside the file",
    "virtual size bound",
];

fn impossible(detail: impl Into<String>) -> InspectError {
    InspectError::impossible(ImageType::Vmdk, detail)
}

/// The fields of a sparse extent header QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    version: u32,
    capacity: u64,
    grain: u64,
    desc_offset: u64,
    desc_size: u64,
    gtes_per_gt: u32,
    gd_offset: u64,
    compress: u16,
}

impl Header {
    fn parse(b: &[u8]) -> Result<Header, InspectError> {
        if b[..4] != MAGIC {
            return Err(impossible("sparse header without the KDMV magic"));
        }
        let h = Header {
            version: le32(b, 4),
            capacity: le64(b, 12),
            grain: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            gtes_per_gt: le32(b, 44),
            gd_offset: le64(b, 56),
            compress: le16(b, 77),
        };
        if !(1..=3).contains(&h.version) {
            return Err(impossible(format!("version {}", h.version)));
        }
        if !h.grain.is_power_of_two() || h.grain > 0x20_0000 {
            return Err(impossible(format!("grain of {} sectors", h.grain)));
        }
        if !(1..=512).contains(&h.gtes_per_gt) {
            return Err(impossible(format!(
                "{} entries per grain table",
                h.gtes_per_gt
            )));
        }
        if h.compress > 1 {
            return Err(impossible(format!("compression algorithm {}", h.compress)));
        }
        if h.desc_offset != 1 || !(1..=MAX_DESCRIPTOR_SECTORS).contains(&h.desc_size) {
            return Err(InspectError::Extent(format!(
                "the embedded descriptor must start at sector 1 and be at most \
                 {MAX_DESCRIPTOR_SECTORS} sectors (found sector {}, {} sectors)",
                h.desc_offset, h.desc_size
            )));
        }
        Ok(h)
    }

    fn virtual_size(&self) -> Result<u64, InspectError> {
        let size = self
            .capacity
            .checked_mul(512)
            .ok_or_else(|| impossible(format!("capacity of {} sectors", self.capacity)))?;
        check_virtual_size(ImageType::Vmdk, size)
    }
}

/// Inspects a VMDK that starts with the `KDMV` magic.
pub(crate) fn inspect(src: &dyn ReadAt) -> Result<Inspection, InspectError> {
    let size = src.size();
    let mut header = Header::parse(&exact(src, ImageType::Vmdk, 0, 512)?)?;
    if header.gd_offset == GD_AT_END {
        header = footer(src, &header)?;
    }
    let virtual_size = header.virtual_size()?;
    if !within(header.gd_offset.saturating_mul(512), 512, size) || header.gd_offset == 0 {
        return Err(impossible(format!(
            "grain directory at sector {} lies outside the file",
            header.gd_offset
        )));
    }
    let desc_len = (header.desc_size * 512) as usize;
    if !within(512, desc_len as u64, size) {
        return Err(impossible(
            "the embedded descriptor runs past the end of the file",
        ));
    }
    let desc = src.read_at(512, desc_len)?;
    let subformat = check_descriptor(&desc, header.capacity)?;
    Ok(Inspection::bare(
        ImageType::Vmdk,
        virtual_size,
        Some(subformat),
    ))
}

/// A streamOptimized VMDK's footer (the last 1536 bytes: footer marker, a second header
/// whose grain directory offset QEMU uses instead of the first's, end-of-stream marker),
/// checked as OpenStack checks it and returned as the header in force.
fn footer(src: &dyn ReadAt, first: &Header) -> Result<Header, InspectError> {
    let size = src.size();
    if size < 512 + 1536 {
        return Err(impossible(
            "grain directory in a footer, but no room for one",
        ));
    }
    let tail = exact(src, ImageType::Vmdk, size - 1536, 1536)?;
    let marker_ok = |m: &[u8], value_zero: bool, kind: u32| {
        (!value_zero || le64(m, 0) == 0)
            && le32(m, 8) == 0
            && le32(m, 12) == kind
            && m[16..512].iter().all(|&b| b == 0)
    };
    if !marker_ok(&tail[..512], false, 3) {
        return Err(impossible("footer marker is invalid"));
    }
    if !marker_ok(&tail[1024..], true, 0) {
        return Err(impossible("end-of-stream marker is invalid"));
    }
    let footer = Header::parse(&tail[512..1024])?;
    if footer.gd_offset == GD_AT_END {
        return Err(impossible("footer points at another footer"));
    }
    let same = Header {
        gd_offset: first.gd_offset,
        ..footer
    };
    if same != *first {
        return Err(impossible("footer and header disagree"));
    }
    Ok(footer)
}

/// What one descriptor line is.
enum Line<'a> {
    Skip,
    Field(&'a str, &'a str),
    Extent(&'a str),
}

fn classify(line: &str) -> Result<Line<'_>, InspectError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') || line.starts_with("ddb.") {
        return Ok(Line::Skip);
    }
    let first = line.split_whitespace().next().unwrap_or("");
    if ["RW", "RDONLY", "NOACCESS"].contains(&first.to_ascii_uppercase().as_str()) {
        return Ok(Line::Extent(line));
    }
    if let Some((key, value)) = line.split_once('=') {
        let key = key.trim();
        if !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
        {
            return Ok(Line::Field(key, value.trim().trim_matches('"')));
        }
    }
    Err(impossible(format!(
        "unrecognised descriptor line {:?}",
        line.chars().take(80).collect::<String>()
    )))
}

/// Checks the embedded descriptor and returns the subformat it declares.
fn check_descriptor(raw: &[u8], capacity: u64) -> Result<Subformat, InspectError> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let text = std::str::from_utf8(&raw[..end])
        .map_err(|_| impossible("the embedded descriptor is not text"))?;
    let mut subformat = None;
    let mut extents = Vec::new();
    for line in text.lines() {
        match classify(line)? {
            Line::Skip => {}
            Line::Extent(e) => extents.push(e),
            Line::Field(key, value) => {
                if let Some(s) = check_field(key, value)? {
                    subformat = Some(s);
                }
            }
        }
    }
    let subformat = subformat.ok_or_else(|| impossible("the descriptor has no createType"))?;
    match extents.as_slice() {
        [one] => check_extent(one, capacity)?,
        _ => {
            return Err(InspectError::Extent(format!(
                "{} extents (exactly one, inside the file, is accepted)",
                extents.len()
            )));
        }
    }
    Ok(subformat)
}

/// One `key=value` line: `createType` gives the subformat; parents are refused; keys not
/// known to be harmless are refused.
fn check_field(key: &str, value: &str) -> Result<Option<Subformat>, InspectError> {
    match key.to_ascii_lowercase().as_str() {
        "createtype" => match value.to_ascii_lowercase().as_str() {
            "monolithicsparse" => Ok(Some(Subformat::MonolithicSparse)),
            "streamoptimized" => Ok(Some(Subformat::StreamOptimized)),
            _ => Err(InspectError::Subformat {
                format: ImageType::Vmdk,
                name: value.chars().take(40).collect(),
            }),
        },
        "parentcid" if value.eq_ignore_ascii_case("ffffffff") => Ok(None),
        "parentcid" => Err(InspectError::Parent {
            format: ImageType::Vmdk,
            detail: format!("parentCID {}", value.chars().take(16).collect::<String>()),
        }),
        "parentfilenamehint" => Err(InspectError::Parent {
            format: ImageType::Vmdk,
            detail: "parentFileNameHint".into(),
        }),
        "version" | "encoding" | "cid" | "isnativesnapshot" => Ok(None),
        _ => Err(impossible(format!(
            "unknown descriptor field {:?}",
            key.chars().take(40).collect::<String>()
        ))),
    }
}

/// The extent line: `RW <capacity> SPARSE "<name>"`, the name a plain file name (no path, no
/// protocol): QEMU reads a sparse VMDK's data from the file itself, and a name that could lead
/// anywhere else is refused.
fn check_extent(line: &str, capacity: u64) -> Result<(), InspectError> {
    let refuse = |why: &str| {
        InspectError::Extent(format!(
            "{why}: {:?}",
            line.chars().take(120).collect::<String>()
        ))
    };
    let (fields, name) = line
        .split_once('"')
        .ok_or_else(|| refuse("extent without a quoted file name"))?;
    let name = name
        .strip_suffix('"')
        .ok_or_else(|| refuse("extent with text after its file name"))?;
    let fields: Vec<&str> = fields.split_whitespace().collect();
    if fields.len() != 3 || !fields[2].eq_ignore_ascii_case("SPARSE") {
        return Err(refuse("extent that is not one SPARSE extent"));
    }
    if fields[1].parse::<u64>().ok() != Some(capacity) {
        return Err(refuse("extent size differs from the disk's capacity"));
    }
    if name.is_empty()
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == '\\' || c == ':' || c == '"' || c.is_control())
    {
        return Err(refuse("extent names a path"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::inspect::read::Bytes;

    const DESCRIPTOR: &str = "# Disk DescriptorFile\nversion=1\nCID=c6855766\nparentCID=ffffffff\n\
        createType=\"monolithicSparse\"\n\n# Extent description\nRW 16384 SPARSE \"m.vmdk\"\n\n\
        # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.adapterType = \"ide\"\n";

    /// A monolithicSparse header as qemu-img writes it: 8 MiB, 64 KiB grains.
    fn image(desc: &str) -> Vec<u8> {
        let mut b = vec![0u8; 0x1a * 512 + 4096];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[12..20].copy_from_slice(&16384u64.to_le_bytes());
        b[20..28].copy_from_slice(&128u64.to_le_bytes());
        b[28..36].copy_from_slice(&1u64.to_le_bytes());
        b[36..44].copy_from_slice(&20u64.to_le_bytes());
        b[44..48].copy_from_slice(&512u32.to_le_bytes());
        b[56..64].copy_from_slice(&0x1au64.to_le_bytes());
        b[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
        b
    }

    fn check(b: &[u8]) -> Result<Inspection, InspectError> {
        inspect(&Bytes {
            data: b,
            size: b.len() as u64,
        })
    }

    #[test]
    fn qemu_style_image_is_accepted() {
        let i = check(&image(DESCRIPTOR)).unwrap();
        assert_eq!(i.virtual_size, 8 << 20);
        assert_eq!(i.subformat, Some(Subformat::MonolithicSparse));
        let s = DESCRIPTOR.replace("monolithicSparse", "streamOptimized");
        assert_eq!(
            check(&image(&s)).unwrap().subformat,
            Some(Subformat::StreamOptimized)
        );
    }

    #[test]
    fn extents_naming_paths_or_many_are_refused() {
        for (from, to, kind) in [
            ("\"m.vmdk\"", "\"/etc/shadow\"", "vmdk_extent"),
            ("\"m.vmdk\"", "\"../x.img\"", "vmdk_extent"),
            ("\"m.vmdk\"", "\"json:{}\"", "vmdk_extent"),
            ("SPARSE \"m.vmdk\"", "FLAT \"m.vmdk\" 0", "vmdk_extent"),
            (
                "RW 16384 SPARSE \"m.vmdk\"",
                "RW 8192 SPARSE \"a.vmdk\"\nRW 8192 SPARSE \"b.vmdk\"",
                "vmdk_extent",
            ),
            ("RW 16384", "RW 99", "vmdk_extent"),
            ("parentCID=ffffffff", "parentCID=12345678", "parent_image"),
            (
                "version=1",
                "version=1\nparentFileNameHint=\"/etc/shadow\"",
                "parent_image",
            ),
            (
                "monolithicSparse",
                "monolithicFlat",
                "unsupported_subformat",
            ),
            (
                "monolithicSparse",
                "twoGbMaxExtentSparse",
                "unsupported_subformat",
            ),
            (
                "version=1",
                "version=1\nchangeTrackPath=\"/etc/shadow\"",
                "impossible_header",
            ),
            ("#DDB", "something odd", "impossible_header"),
        ] {
            let d = DESCRIPTOR.replace(from, to);
            let e = check(&image(&d)).unwrap_err();
            assert_eq!(e.kind(), kind, "{to}: {e}");
        }
    }

    #[test]
    fn impossible_headers_are_refused() {
        for (off, val) in [
            (4usize, 9u64),
            (20, 3),
            (44, 0),
            (28, 0),
            (36, 4096),
            (56, 1 << 40),
            (12, 1 << 40),
        ] {
            let mut b = image(DESCRIPTOR);
            if off == 4 || off == 44 {
                b[off..off + 4].copy_from_slice(&(val as u32).to_le_bytes());
            } else {
                b[off..off + 8].copy_from_slice(&val.to_le_bytes());
            }
            assert!(check(&b).is_err(), "field at {off} = {val}");
        }
    }

    #[test]
    fn stream_footer_is_checked() {
        let d = DESCRIPTOR.replace("monolithicSparse", "streamOptimized");
        let mut b = image(&d);
        b[56..64].copy_from_slice(&GD_AT_END.to_le_bytes());
        let mut footer = b[..512].to_vec();
        footer[56..64].copy_from_slice(&0x1au64.to_le_bytes());
        let mut marker = vec![0u8; 512];
        marker[12..16].copy_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&marker);
        b.extend_from_slice(&footer);
        b.extend_from_slice(&[0u8; 512]);
        assert_eq!(check(&b).unwrap().virtual_size, 8 << 20);
        // A footer with another capacity than the header: refused.
        let n = b.len();
        b[n - 1024 + 12..n - 1024 + 20].copy_from_slice(&(1u64 << 30).to_le_bytes());
        assert!(check(&b).is_err());
    }
}
