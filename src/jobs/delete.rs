//! Deleting a volume on request (`DELETE /api/v1/volumes/{name}`): under the engine's
//! per-volume lock, so no job can start on the name while it is removed, and only when nothing
//! has the volume open and it is a plain data volume.

use super::engine::{Engine, Holder};
use crate::volume::{Blocker, VolumeError};

/// Why a volume was not deleted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeleteError {
    #[error("volume {volume} is in use by {holder}")]
    Busy { volume: String, holder: Holder },
    #[error("volume {volume} cannot be deleted: {blocker}")]
    Blocked { volume: String, blocker: Blocker },
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

impl Engine {
    /// Removes the volume `name` (absent is success); `true` when it existed.
    pub(crate) async fn delete_volume(&self, name: &str) -> Result<bool, DeleteError> {
        {
            let mut st = self.state();
            if let Some(holder) = st.volumes.get(name) {
                return Err(DeleteError::Busy {
                    volume: name.to_string(),
                    holder: *holder,
                });
            }
            st.volumes.insert(name.to_string(), Holder::Deleting);
        }
        let result = self.delete_locked(name).await;
        self.state().volumes.remove(name);
        result
    }

    async fn delete_locked(&self, name: &str) -> Result<bool, DeleteError> {
        let volumes = &self.context().volumes;
        let Some(volume) = volumes.inspect(name).await? else {
            return Ok(false);
        };
        if let Some(blocker) = volume.reuse_blocker.filter(Blocker::forbids_removal) {
            return Err(DeleteError::Blocked {
                volume: name.to_string(),
                blocker,
            });
        }
        volumes.remove(name).await?;
        Ok(true)
    }
}
