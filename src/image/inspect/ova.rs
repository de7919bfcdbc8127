//! OVA: a tar holding an OVF descriptor (first) and the files it references. The members are
//! walked by their headers only (the `tar` crate over our ranged reads, seeking past data),
//! at most `MAX_MEMBERS` of them, each a plain file with a plain name (no `/`, no `..`, no
//! link, device or directory, no duplicate); the OVF (at most `MAX_OVF_BYTES`) is read with
//! `quick-xml`, and the first `Disk` of its `DiskSection` leads through its `fileRef` to a
//! `File` of `References` whose `href` names the member holding the disk. That member's place
//! is returned; the caller inspects it as an image of its own.

use std::io::Read;

use quick_xml::events::{BytesStart, Event};

use super::read::{Cursor, ReadAt, within};
use super::verdict::{InspectError, Member, OvaFault};

/// Most members an OVA may have (an OVF, a manifest, a certificate and a few disks).
pub(crate) const MAX_MEMBERS: usize = 64;
/// Longest member name, in bytes.
pub(crate) const MAX_NAME_BYTES: usize = 255;
/// Largest OVF descriptor read.
pub(crate) const MAX_OVF_BYTES: u64 = 1 << 20;
/// The checks this module applies (reported by preflight).
pub(crate) const CHECKS: &[&str] = &[
    "at most 64 members, plain files with plain names (no path, no ..)",
    "OVF descriptor first, at most 1 MiB",
    "first disk of the OVF found among the members",
    "the disk inspected as an image of its own",
];

/// Whether the bytes start like a tar archive (`ustar` at offset 257).
pub(crate) fn is_tar(head: &[u8]) -> bool {
    head.len() >= 262 && &head[257..262] == b"ustar"
}

fn refuse(fault: OvaFault, detail: impl Into<String>) -> InspectError {
    InspectError::ova(fault, detail)
}

/// The member of `src` that holds the OVA's disk.
pub(crate) fn locate_disk(src: &dyn ReadAt) -> Result<Member, InspectError> {
    let archive_err = |e: std::io::Error| refuse(OvaFault::Archive, e.to_string());
    let mut archive = tar::Archive::new(Cursor { src, pos: 0 });
    let mut members: Vec<(String, Member)> = Vec::new();
    let mut ovf = None;
    for entry in archive.entries_with_seek().map_err(archive_err)? {
        if members.len() >= MAX_MEMBERS {
            return Err(refuse(
                OvaFault::MemberCount,
                format!("more than {MAX_MEMBERS} members"),
            ));
        }
        let mut entry = entry.map_err(archive_err)?;
        let name = check_name(&entry.path_bytes())?;
        let kind = entry.header().entry_type();
        if !kind.is_file() {
            return Err(refuse(
                OvaFault::MemberType,
                format!("member {name:?} is not a plain file ({kind:?})"),
            ));
        }
        let member = Member {
            offset: entry.raw_file_position(),
            size: entry.size(),
        };
        if !within(member.offset, member.size, src.size()) {
            return Err(refuse(
                OvaFault::Archive,
                format!("member {name:?} runs past the file"),
            ));
        }
        if members.iter().any(|(n, _)| *n == name) {
            return Err(refuse(
                OvaFault::MemberName,
                format!("member {name:?} twice"),
            ));
        }
        if members.is_empty() {
            ovf = Some(read_ovf(&name, member, &mut entry)?);
        }
        members.push((name, member));
    }
    let ovf = ovf.ok_or_else(|| refuse(OvaFault::Descriptor, "the archive is empty"))?;
    let href = first_disk_href(&ovf)?;
    members
        .iter()
        .find(|(n, _)| *n == href)
        .map(|(_, m)| *m)
        .ok_or_else(|| {
            refuse(
                OvaFault::Disk,
                format!("the OVF's disk {href:?} is not in the archive"),
            )
        })
}

/// A member name: UTF-8, at most `MAX_NAME_BYTES`, no path separator, no `..`, no control
/// characters.
fn check_name(raw: &[u8]) -> Result<String, InspectError> {
    let shown = String::from_utf8_lossy(&raw[..raw.len().min(80)]).into_owned();
    let bad = |why: &str| refuse(OvaFault::MemberName, format!("member name {shown:?} {why}"));
    let name = std::str::from_utf8(raw).map_err(|_| bad("is not UTF-8"))?;
    if name.len() > MAX_NAME_BYTES {
        return Err(bad("is too long"));
    }
    if name.is_empty() || name == "." || name.contains("..") {
        return Err(bad("climbs out of the archive"));
    }
    if name.contains(['/', '\\']) || name.chars().any(char::is_control) {
        return Err(bad("is a path or holds control characters"));
    }
    Ok(name.to_string())
}

/// The first member: the OVF descriptor, read whole.
fn read_ovf(name: &str, member: Member, data: &mut impl Read) -> Result<Vec<u8>, InspectError> {
    if !name.to_ascii_lowercase().ends_with(".ovf") {
        return Err(refuse(
            OvaFault::Descriptor,
            format!("the first member {name:?} is not an .ovf"),
        ));
    }
    if member.size > MAX_OVF_BYTES {
        return Err(refuse(
            OvaFault::Descriptor,
            format!(
                "the OVF has {} bytes (at most {MAX_OVF_BYTES})",
                member.size
            ),
        ));
    }
    let mut ovf = Vec::with_capacity(member.size as usize);
    data.take(MAX_OVF_BYTES)
        .read_to_end(&mut ovf)
        .map_err(|e| refuse(OvaFault::Descriptor, e.to_string()))?;
    Ok(ovf)
}

/// The attribute of an element by local name (`ovf:href` and `href` alike).
fn attr(e: &BytesStart<'_>, name: &str) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.local_name().as_ref() == name.as_bytes())
        .and_then(|a| a.normalized_value(quick_xml::XmlVersion::Implicit1_0).ok())
        .map(|v| v.into_owned())
}

/// The `href` of the file the OVF's first disk refers to.
pub(crate) fn first_disk_href(ovf: &[u8]) -> Result<String, InspectError> {
    let bad = |why: String| refuse(OvaFault::Descriptor, why);
    let mut reader = quick_xml::Reader::from_reader(ovf);
    let mut files: Vec<(String, String)> = Vec::new();
    let mut first_disk = None;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e) | Event::Empty(e)) => match e.local_name().as_ref() {
                b"File" => {
                    if let (Some(id), Some(href)) = (attr(&e, "id"), attr(&e, "href")) {
                        files.push((id, href));
                    }
                }
                b"Disk" if first_disk.is_none() => {
                    first_disk = Some(
                        attr(&e, "fileRef")
                            .ok_or_else(|| bad("the first Disk has no fileRef".into()))?,
                    );
                }
                _ => {}
            },
            Ok(Event::DocType(_)) => return Err(bad("the OVF has a DOCTYPE".into())),
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => return Err(bad(format!("the OVF is not well-formed XML: {e}"))),
        }
    }
    let file_ref = first_disk.ok_or_else(|| bad("the OVF names no Disk".into()))?;
    files
        .into_iter()
        .find(|(id, _)| *id == file_ref)
        .map(|(_, href)| href)
        .ok_or_else(|| bad(format!("no File with id {file_ref:?} in References")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:id="file0" ovf:href="notes.txt"/>
    <File ovf:id="file1" ovf:href="disk1.vmdk" ovf:size="1024"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1"
          ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:diskId="vmdisk2" ovf:fileRef="file0"/>
  </DiskSection>
</Envelope>"#;

    #[test]
    fn the_first_disk_is_found_through_its_file() {
        assert_eq!(first_disk_href(OVF.as_bytes()).unwrap(), "disk1.vmdk");
    }

    #[test]
    fn odd_descriptors_are_refused() {
        for bad in [
            OVF.replace("ovf:fileRef=\"file1\"", ""),
            OVF.replace("ovf:id=\"file1\"", "ovf:id=\"file9\""),
            OVF.replace("<DiskSection>", "<DiskSection"),
            format!("<!DOCTYPE x [<!ENTITY a \"aaaa\">]>{OVF}"),
            "<Envelope/>".to_string(),
        ] {
            let e = first_disk_href(bad.as_bytes()).unwrap_err();
            assert_eq!(e.kind(), "ova_descriptor", "{e}");
        }
    }

    #[test]
    fn names_are_plain() {
        assert!(check_name(b"disk1.vmdk").is_ok());
        assert!(check_name(b"My VM-disk1.vmdk").is_ok());
        for bad in [
            &b"../etc/shadow"[..],
            b"/etc/shadow",
            b"a/b",
            b"..",
            b"",
            b"a\nb",
            b"\xff",
        ] {
            assert_eq!(
                check_name(bad).unwrap_err().kind(),
                "ova_member_name",
                "{bad:?}"
            );
        }
        assert!(check_name(&[b'a'; 256]).is_err());
    }
}
