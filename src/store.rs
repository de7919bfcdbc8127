//! The daemon's sled database, able to recover from a failed disk. sled remembers the first
//! I/O error it meets (a full file system, say) and refuses every later operation with it,
//! even once space is back; the only way out is to close and reopen the database. So no
//! module keeps sled handles: a `Tree` here names a tree and resolves it on each call against
//! the database currently open, and `Db::reopen` swaps in a fresh instance.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sled::IVec;

/// How long a reopen waits for operations in flight to let go of the old instance.
const REOPEN_WAIT: Duration = Duration::from_secs(5);
/// How long opening waits for the database's lock: the process of a previous instance that
/// was just killed can hold it for a moment (seen in the crash test right after a SIGKILL).
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// Free space a reopen needs: opening writes to the database, and an open that fails leaves
/// the store closed (even reads fail), while the old, failed instance still serves reads. So
/// a full file system keeps the old instance until space is back.
const REOPEN_MIN_FREE: u64 = 4 << 20;

/// The sled database (cheap to clone; every clone sees the same, current instance).
#[derive(Clone)]
pub(crate) struct Db {
    inner: Arc<DbInner>,
}

/// What every clone of a `Db` shares.
struct DbInner {
    /// The database directory (`<storage.data_dir>/db`).
    path: PathBuf,
    /// The open instance; `None` between a failed reopen and the next successful one.
    current: RwLock<Option<sled::Db>>,
}

/// An error meaning the database is not open (a reopen failed and is retried by the probe).
fn closed() -> sled::Error {
    sled::Error::Io(std::io::Error::other(
        "the job store is closed after a failed reopen",
    ))
}

fn open_at(path: &Path) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(path)
        .flush_every_ms(Some(200))
        .open()
}

impl Db {
    /// Opens (or creates) the database at `path`, waiting up to `LOCK_WAIT` for another
    /// process to release it.
    pub(crate) fn open(path: &Path) -> sled::Result<Db> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match open_at(path) {
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && std::time::Instant::now() < deadline =>
                {
                    tracing::warn!(
                        path = %path.display(),
                        "the job store is locked by another process (a previous instance still \
                         exiting?); waiting"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => break other?,
            }
        };
        Ok(Db {
            inner: Arc::new(DbInner {
                path: path.to_path_buf(),
                current: RwLock::new(Some(db)),
            }),
        })
    }

    /// The instance open now.
    pub(crate) fn current(&self) -> sled::Result<sled::Db> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(closed)
    }

    /// A tree of the database, by name.
    pub(crate) fn tree(&self, name: &'static str) -> Tree {
        Tree {
            db: self.clone(),
            name,
        }
    }

    /// Closes the instance and opens the database again: what brings sled back after a write
    /// failure. Waits (bounded) for operations in flight to drop the old instance.
    pub(crate) async fn reopen(&self) -> sled::Result<()> {
        self.check_room()?;
        let old = self
            .inner
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(old);
        let deadline = tokio::time::Instant::now() + REOPEN_WAIT;
        loop {
            let path = self.inner.path.clone();
            let opened = tokio::task::spawn_blocking(move || open_at(&path))
                .await
                .map_err(|e| sled::Error::Io(std::io::Error::other(e)))?;
            match opened {
                Ok(db) => {
                    *self
                        .inner
                        .current
                        .write()
                        .unwrap_or_else(|e| e.into_inner()) = Some(db);
                    return Ok(());
                }
                // Another handle of the old instance still holds the file lock.
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Db {
    /// Fails when the file system holding the database has less than `REOPEN_MIN_FREE` free.
    fn check_room(&self) -> sled::Result<()> {
        let s = nix::sys::statvfs::statvfs(&self.inner.path)
            .map_err(|e| sled::Error::Io(std::io::Error::from(e)))?;
        let free = s.blocks_available().saturating_mul(s.fragment_size());
        if free < REOPEN_MIN_FREE {
            return Err(sled::Error::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "{} has {free} bytes free; the job store is reopened once at least \
                     {REOPEN_MIN_FREE} are (free space on that file system)",
                    self.inner.path.display()
                ),
            )));
        }
        Ok(())
    }
}

/// A named tree of the database, resolved on every call (see the module comment). The
/// methods mirror `sled::Tree`'s.
#[derive(Clone)]
pub(crate) struct Tree {
    db: Db,
    name: &'static str,
}

impl Tree {
    fn resolve(&self) -> sled::Result<sled::Tree> {
        self.db.current()?.open_tree(self.name)
    }

    pub(crate) fn get(&self, key: &[u8]) -> sled::Result<Option<IVec>> {
        self.resolve()?.get(key)
    }

    pub(crate) fn insert(&self, key: &[u8], value: Vec<u8>) -> sled::Result<Option<IVec>> {
        self.resolve()?.insert(key, value)
    }

    pub(crate) fn remove(&self, key: &[u8]) -> sled::Result<Option<IVec>> {
        self.resolve()?.remove(key)
    }

    /// Every `(key, value)` pair, in key order.
    pub(crate) fn entries(&self) -> sled::Result<Vec<(IVec, IVec)>> {
        self.iter().collect()
    }

    /// Iterates the `(key, value)` pairs, in key order (one error when the tree is unusable).
    pub(crate) fn iter(&self) -> Box<dyn Iterator<Item = sled::Result<(IVec, IVec)>> + Send> {
        match self.resolve() {
            Ok(tree) => Box::new(tree.iter()),
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }

    /// Waits until the tree's writes are on disk.
    pub(crate) fn flush(&self) -> sled::Result<usize> {
        self.resolve()?.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trees_follow_a_reopened_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let tree = db.tree("t");
        tree.insert(b"k", b"v1".to_vec()).unwrap();
        tree.flush().unwrap();
        db.reopen().await.unwrap();
        assert_eq!(tree.get(b"k").unwrap().unwrap(), b"v1".as_ref());
        tree.insert(b"k", b"v2".to_vec()).unwrap();
        assert_eq!(tree.entries().unwrap().len(), 1);
        assert_eq!(tree.remove(b"k").unwrap().unwrap(), b"v2".as_ref());
    }

    #[tokio::test]
    async fn reopen_waits_for_handles_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let held = db.current().unwrap();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(held);
        });
        db.reopen().await.unwrap();
        release.await.unwrap();
        db.tree("t").insert(b"k", b"v".to_vec()).unwrap();
    }
}
