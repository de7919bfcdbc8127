//! Writing uploaded content into a new volume (`PUT /api/v1/volumes/{name}/content`, small
//! files such as cloud-init seed images): under the engine's per-volume lock (as deletion
//! takes it), only into a volume this upload creates, with exactly the declared number of
//! bytes and, when given, the declared SHA-256, within `server.body_timeout` between pieces and
//! at an average of at least `MIN_UPLOAD_RATE` overall. Anything short of that removes the volume
//! again, so a failed or dropped upload leaves nothing behind; an upload in progress is
//! recorded durably before its volume is created, so one cut off by a crash is removed at
//! the next start.

use std::time::Duration;

use bytes::Buf;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::engine::Engine;
use super::state::{Holder, VolumeClaim};
use crate::volume::{NewVolume, VolumeError, VolumeInfo, WipeMode};

/// What an upload asks for.
pub(crate) struct UploadRequest {
    pub(crate) volume: String,
    /// Bytes the body must have (its Content-Length).
    pub(crate) length: u64,
    /// SHA-256 (lowercase hex) the body must have, when the client sent one.
    pub(crate) sha256: Option<String>,
    /// Longest wait for the next piece of the body.
    pub(crate) idle_timeout: Duration,
    /// Uploads allowed in progress at once (`volumes.upload_max_concurrent`).
    pub(crate) max_concurrent: usize,
}

/// A finished upload.
#[derive(Debug)]
pub(crate) struct Uploaded {
    pub(crate) volume: VolumeInfo,
    pub(crate) sha256: String,
}

/// Why an upload failed (the volume, if it was made, is removed again).
#[derive(Debug, thiserror::Error)]
pub(crate) enum UploadError {
    #[error("volume {volume} is busy with {holder}")]
    Busy { volume: String, holder: Holder },
    #[error(
        "{0} uploads are in progress (volumes.upload_max_concurrent); retry when one has finished"
    )]
    TooMany(usize),
    #[error("volume {0} exists; uploads only create new volumes (delete it first)")]
    Exists(String),
    #[error("the body ended after {got} of the {want} bytes Content-Length declared")]
    Short { got: u64, want: u64 },
    #[error("the body is longer than the {0} bytes Content-Length declared")]
    Long(u64),
    #[error("no data for {0:?}; the upload was abandoned")]
    Stalled(Duration),
    #[error(
        "the body did not arrive within {0:?} (server.body_timeout plus {MIN_UPLOAD_RATE} bytes/s); \
         the upload was abandoned"
    )]
    TooSlow(Duration),
    #[error("cannot read the body: {0}")]
    Body(String),
    #[error("SHA-256 mismatch: the header declared {expected}, the body has {actual}")]
    Checksum { expected: String, actual: String },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("job store: {0}")]
    Store(String),
}

/// Slowest accepted average rate of an upload's body: a client trickling bytes just inside the
/// idle timeout must not hold a volume and an upload slot for days.
pub(crate) const MIN_UPLOAD_RATE: u64 = 64 * 1024;

/// Longest time the body of `length` bytes may take.
fn upload_deadline(length: u64, idle_timeout: Duration) -> Duration {
    idle_timeout + Duration::from_secs(length.div_ceil(MIN_UPLOAD_RATE))
}

/// The sled tree of uploads in progress: volume name -> owner recorded with the volume.
const UPLOADS_TREE: &str = "uploads";

/// Records (`Some(owner)`) or forgets (`None`) an upload in progress, durably.
async fn record_upload(
    tree: &crate::store::Tree,
    volume: &str,
    owner: Option<&str>,
) -> Result<(), UploadError> {
    let r = match owner {
        Some(owner) => tree.insert(volume.as_bytes(), owner.as_bytes().to_vec()),
        None => tree.remove(volume.as_bytes()),
    }
    .and_then(|_| tree.flush());
    r.map(|_| ())
        .map_err(|e| UploadError::Store(format!("recording the upload: {e}")))
}

/// An upload's body as the steps below read it.
type Body<'a> = futures::stream::BoxStream<'a, Result<bytes::Bytes, String>>;

impl Engine {
    /// Creates `request.volume` and writes `body` into it; on any failure the volume is
    /// removed again.
    pub(crate) async fn upload_volume<S, B, E>(
        &self,
        request: UploadRequest,
        body: S,
    ) -> Result<Uploaded, UploadError>
    where
        S: Stream<Item = Result<B, E>> + Send + Unpin,
        B: Buf,
        E: std::fmt::Display,
    {
        // One body type below: the chunks as `Bytes` (free for warp's), errors as text.
        let body: Body<'_> = body
            .map(|chunk| {
                chunk
                    .map(|mut b| b.copy_to_bytes(b.remaining()))
                    .map_err(|e| e.to_string())
            })
            .boxed();
        let name = request.volume.clone();
        let _claim = {
            let mut st = self.state();
            let uploading = st
                .volumes
                .values()
                .filter(|h| matches!(h, Holder::Uploading))
                .count();
            if let Some(holder) = st.volumes.get(&name) {
                return Err(UploadError::Busy {
                    volume: name,
                    holder: *holder,
                });
            }
            if uploading >= request.max_concurrent {
                return Err(UploadError::TooMany(uploading));
            }
            VolumeClaim::take(self.shared(), &mut st, &name, Holder::Uploading).map_err(
                |holder| UploadError::Busy {
                    volume: name.clone(),
                    holder,
                },
            )?
        };
        self.upload_locked(request, body).await
    }

    async fn upload_locked(
        &self,
        request: UploadRequest,
        body: Body<'_>,
    ) -> Result<Uploaded, UploadError> {
        let volumes = &self.context().volumes;
        if volumes.inspect(&request.volume).await?.is_some() {
            return Err(UploadError::Exists(request.volume));
        }
        let owner = format!("upload-{}", uuid::Uuid::new_v4());
        let record = self.store().tree(UPLOADS_TREE);
        record_upload(&record, &request.volume, Some(&owner)).await?;
        let volume = match volumes
            .create(&NewVolume {
                name: &request.volume,
                size_bytes: request.length,
                owner: &owner,
            })
            .await
        {
            Ok(v) => v,
            Err(e) => {
                record_upload(&record, &request.volume, None).await?;
                return Err(match e {
                    VolumeError::Conflict(_) => UploadError::Exists(request.volume.clone()),
                    other => UploadError::Volume(other),
                });
            }
        };
        let result = match self.fill(&volume, &request, body).await {
            Ok(sha256) => Ok(Uploaded { volume, sha256 }),
            Err(e) => {
                if let Err(rollback) = volumes.remove_created(&volume.name, &owner).await {
                    tracing::error!(
                        volume = %volume.name,
                        error = %rollback,
                        "cannot remove the volume of a failed upload"
                    );
                    // The record stays: the next start tries again.
                    return Err(e);
                }
                Err(e)
            }
        };
        record_upload(&record, &request.volume, None).await?;
        result
    }

    /// Removes the volumes of uploads a crash cut off (called at start, before any job runs).
    pub(crate) async fn recover_uploads(&self) {
        let record = self.store().tree(UPLOADS_TREE);
        for (name, owner) in record.iter().filter_map(Result::ok) {
            let name = String::from_utf8_lossy(&name).into_owned();
            let owner = String::from_utf8_lossy(&owner).into_owned();
            match self.context().volumes.remove_created(&name, &owner).await {
                Ok(()) => {
                    tracing::warn!(volume = %name, "removed the volume of an upload interrupted by a restart");
                    let _ = record.remove(name.as_bytes());
                }
                Err(e) => tracing::error!(
                    volume = %name,
                    error = %e,
                    "cannot remove the volume of an upload interrupted by a restart"
                ),
            }
        }
        let _ = record.flush();
    }

    /// Writes the body into the new volume; returns its SHA-256.
    async fn fill(
        &self,
        volume: &VolumeInfo,
        request: &UploadRequest,
        mut body: Body<'_>,
    ) -> Result<String, UploadError> {
        let volumes = &self.context().volumes;
        // A new LV may hold an earlier volume's data past the upload's end.
        volumes
            .prepare_overwrite(
                volume,
                request.length,
                WipeMode::Zero,
                &CancellationToken::new(),
            )
            .await?;
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&volume.path)
            .await
            .map_err(|e| VolumeError::io(&volume.path, e))?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let allowed = upload_deadline(request.length, request.idle_timeout);
        let deadline = tokio::time::Instant::now() + allowed;
        loop {
            let idle = tokio::time::Instant::now() + request.idle_timeout;
            let next = tokio::time::timeout_at(idle.min(deadline), body.next())
                .await
                .map_err(|_| {
                    if idle < deadline {
                        UploadError::Stalled(request.idle_timeout)
                    } else {
                        UploadError::TooSlow(allowed)
                    }
                })?;
            let Some(chunk) = next else { break };
            let mut chunk = chunk.map_err(UploadError::Body)?;
            while chunk.has_remaining() {
                let part = chunk.chunk();
                if written + part.len() as u64 > request.length {
                    return Err(UploadError::Long(request.length));
                }
                hasher.update(part);
                file.write_all(part)
                    .await
                    .map_err(|e| VolumeError::io(&volume.path, e))?;
                written += part.len() as u64;
                let n = part.len();
                chunk.advance(n);
            }
        }
        if written < request.length {
            return Err(UploadError::Short {
                got: written,
                want: request.length,
            });
        }
        let actual = hex::encode(hasher.finalize());
        if let Some(expected) = &request.sha256
            && *expected != actual
        {
            return Err(UploadError::Checksum {
                expected: expected.clone(),
                actual,
            });
        }
        file.flush()
            .await
            .map_err(|e| VolumeError::io(&volume.path, e))?;
        drop(file);
        volumes.flush(volume).await?;
        Ok(actual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_body_has_a_deadline_from_its_length() {
        let idle = Duration::from_secs(30);
        assert_eq!(upload_deadline(1, idle), Duration::from_secs(31));
        assert_eq!(
            upload_deadline(64 << 20, idle),
            Duration::from_secs(30 + 1024)
        );
    }
}
