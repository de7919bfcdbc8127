//! The resume record of a download, `<key>.partial.json` beside `<key>.partial`: which parts
//! are in the partial file and synced, and the SHA-256 state after the first `hashed_parts`
//! of them. It is valid only for the same object (ETag and size) and the same part size; a
//! replaced object never resumes, so a download never mixes two versions.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sha2::digest::common::hazmat::SerializableState;

/// Saved after the partial file was synced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Checkpoint {
    pub(super) etag: String,
    pub(super) size: u64,
    pub(super) part_size: u64,
    /// Parts in the partial file, synced before this record was written.
    pub(super) done: Vec<usize>,
    /// Whole parts the hash state covers (all of them in `done`).
    pub(super) hashed_parts: usize,
    pub(super) sha256_state: String,
}

pub(crate) fn partial_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.partial"))
}

pub(crate) fn checkpoint_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.partial.json"))
}

/// Removes the partial file of a stopped download that no checkpoint can resume (a
/// preallocated file at the full size would otherwise hold its space as debris).
pub(super) fn discard_unresumable(dir: &Path, key: &str) {
    if !checkpoint_path(dir, key).exists() {
        let _ = std::fs::remove_file(partial_path(dir, key));
    }
}

impl Checkpoint {
    /// The checkpoint of `key` if it fits this object and part size, and the partial file is
    /// long enough to hold its parts.
    pub(super) fn load(
        dir: &Path,
        key: &str,
        etag: &str,
        size: u64,
        part_size: u64,
    ) -> Option<(Checkpoint, Sha256)> {
        let text = std::fs::read(checkpoint_path(dir, key)).ok()?;
        let cp: Checkpoint = serde_json::from_slice(&text).ok()?;
        if cp.etag != etag || cp.size != size || cp.part_size != part_size {
            return None;
        }
        let parts = size.div_ceil(part_size) as usize;
        let prefix_done = (0..cp.hashed_parts).all(|i| cp.done.contains(&i));
        if cp.done.iter().any(|&i| i >= parts) || !prefix_done {
            return None;
        }
        let len = std::fs::metadata(partial_path(dir, key)).ok()?.len();
        if len != size {
            return None;
        }
        let state = hex::decode(&cp.sha256_state).ok()?;
        let hasher = Sha256::deserialize(state.as_slice().try_into().ok()?).ok()?;
        Some((cp, hasher))
    }

    /// Writes the record atomically (temporary file, fsync, rename).
    pub(super) fn save(&self, dir: &Path, key: &str) -> std::io::Result<()> {
        use std::io::Write;
        let path = checkpoint_path(dir, key);
        // A name of its own: a final checkpoint may overlap a periodic one.
        let tmp = path.with_extension(format!("json.{:08x}.tmp", rand::random::<u32>()));
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }
}
