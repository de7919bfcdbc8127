//! Growing a volume on request (`POST /api/v1/volumes/{name}/resize`): under the engine's
//! per-volume lock, grow only (a smaller size is refused, the same size changes nothing), never
//! a golden image or what is not a plain data volume. A volume a running domain uses is grown
//! too, and the domain is told (the backend's libvirt wrapper).

use super::engine::Engine;
use super::state::{Holder, VolumeClaim};
use crate::volume::encrypt::luks;
use crate::volume::{self, Blocker, BlockerKind, VolumeError};

/// Why a volume was not grown.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ResizeError {
    #[error("volume {volume} is in use by {holder}")]
    Busy { volume: String, holder: Holder },
    #[error("volume {0} does not exist")]
    NotFound(String),
    #[error("volume {volume} cannot be resized: {blocker}")]
    Blocked { volume: String, blocker: Blocker },
    /// Volumes only grow: a filesystem inside would be cut.
    #[error(
        "volume {volume} has {have} bytes; {asked} bytes would shrink it, and volumes only grow \
         (the file system inside would be cut)"
    )]
    Shrink {
        volume: String,
        have: u64,
        asked: u64,
    },
    #[error("size_gb {0} is out of range")]
    Size(u64),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The resize's task ended without an answer (a panic; the name was given back).
    #[error("the resize failed: {0}")]
    Task(String),
}

/// A volume after a resize.
#[derive(Debug, Clone)]
pub(crate) struct Resized {
    pub(crate) size_bytes: u64,
    /// Whether it grew (the same size changes nothing).
    pub(crate) changed: bool,
    /// The running domain told about the new size, if one uses the volume.
    pub(crate) domain: Option<String>,
}

impl Engine {
    /// Grows the volume `name` to `size_gb` GiB. Runs on its own task, like a deletion: a
    /// caller that goes away does not cut it short, and the name is given back when it ends.
    pub(crate) async fn resize_volume(
        &self,
        name: &str,
        size_gb: u64,
    ) -> Result<Resized, ResizeError> {
        let engine = self.clone();
        let name = name.to_string();
        tokio::spawn(async move { engine.resize_here(&name, size_gb).await })
            .await
            .map_err(|e| ResizeError::Task(e.to_string()))?
    }

    async fn resize_here(&self, name: &str, size_gb: u64) -> Result<Resized, ResizeError> {
        let asked = volume::gib_to_bytes(size_gb).ok_or(ResizeError::Size(size_gb))?;
        let _claim = {
            let mut st = self.state();
            VolumeClaim::take(self.shared(), &mut st, name, Holder::Resizing).map_err(|holder| {
                ResizeError::Busy {
                    volume: name.to_string(),
                    holder,
                }
            })?
        };
        let volumes = &self.context().volumes;
        let target = volumes
            .inspect(name)
            .await?
            .ok_or_else(|| ResizeError::NotFound(name.to_string()))?;
        // Open (a running VM) is what a live resize is for; the rest is refused as elsewhere.
        if let Some(blocker) = target
            .reuse_blocker
            .clone()
            .filter(|b| matches!(b.kind, BlockerKind::Golden | BlockerKind::NotAVolume))
        {
            return Err(ResizeError::Blocked {
                volume: name.to_string(),
                blocker,
            });
        }
        // An encrypted volume is its size plus room for the LUKS header: sizes here are the
        // size asked for, and the running domain is told the payload's size.
        let (allowance, header) = match self.context().encryption.record(name)? {
            Some(_) => {
                let offset = luks::payload_offset(&target.path)?.unwrap_or(0);
                (luks::HEADER_ALLOWANCE, offset)
            }
            None => (0, 0),
        };
        let have = target.size_bytes.saturating_sub(allowance);
        if asked < have {
            return Err(ResizeError::Shrink {
                volume: name.to_string(),
                have,
                asked,
            });
        }
        if asked == have {
            return Ok(Resized {
                size_bytes: have,
                changed: false,
                domain: None,
            });
        }
        let grown = volumes.grow(&target, asked + allowance, header).await?;
        Ok(Resized {
            size_bytes: grown.size_bytes - allowance,
            changed: true,
            domain: grown.live_domain,
        })
    }
}
