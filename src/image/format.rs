//! The image formats the daemon accepts (the inspector's verdict, and what a request's
//! `image_type` may declare): qcow2, raw, vmdk, vhdx, vpc (VHD) and vdi; `auto` in a request
//! leaves the choice to the inspector.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An accepted image format (what qemu-img is told with `-f`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageType {
    Qcow2,
    Raw,
    /// VMware VMDK, single-file sparse subformats only.
    Vmdk,
    /// Hyper-V VHDX.
    Vhdx,
    /// Virtual PC / Hyper-V VHD (QEMU's driver name `vpc`).
    Vpc,
    /// VirtualBox VDI.
    Vdi,
}

impl ImageType {
    /// Every format, in the order the API documents them.
    pub const ALL: [ImageType; 6] = [
        ImageType::Qcow2,
        ImageType::Raw,
        ImageType::Vmdk,
        ImageType::Vhdx,
        ImageType::Vpc,
        ImageType::Vdi,
    ];

    /// The name in requests, job status and qemu-img's `-f`.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageType::Qcow2 => "qcow2",
            ImageType::Raw => "raw",
            ImageType::Vmdk => "vmdk",
            ImageType::Vhdx => "vhdx",
            ImageType::Vpc => "vpc",
            ImageType::Vdi => "vdi",
        }
    }

    /// A declared `image_type`: `Some(format)`, or `None` for `auto` (the inspector decides);
    /// `Err` for a name that is neither.
    pub fn parse_declared(name: &str) -> Result<Option<ImageType>, String> {
        if name == "auto" {
            return Ok(None);
        }
        ImageType::ALL
            .into_iter()
            .find(|t| t.as_str() == name)
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "image_type `{name}` is not supported (use {}, or auto)",
                    ImageType::ALL.map(ImageType::as_str).join(", ")
                )
            })
    }
}

impl fmt::Display for ImageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a request may declare as `image_type` (the OpenAPI schema of the field): one of the
/// formats, or `auto` (the inspector decides from the bytes; the job status reports it as
/// `image_format`). A schema only: its values come from `ImageType::ALL`.
pub struct DeclaredImageType;

impl utoipa::PartialSchema for DeclaredImageType {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let names = ImageType::ALL.map(ImageType::as_str).into_iter();
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some(
                "What a request may declare as `image_type` (the OpenAPI schema of the field): \
                 one of the\nformats, or `auto`.",
            ))
            .enum_values(Some(names.chain(["auto"])))
            .into()
    }
}

impl utoipa::ToSchema for DeclaredImageType {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_names() {
        for t in ImageType::ALL {
            assert_eq!(ImageType::parse_declared(t.as_str()), Ok(Some(t)));
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
        assert_eq!(ImageType::parse_declared("auto"), Ok(None));
        let e = ImageType::parse_declared("ova").unwrap_err();
        assert!(
            e.contains("qcow2, raw, vmdk, vhdx, vpc, vdi, or auto"),
            "{e}"
        );
    }
}
