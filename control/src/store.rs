//! Everything the control plane knows lives behind one trait, so that one machine runs on a
//! file ([`Embedded`], redb) and a fleet on etcd without the rest of the crate changing.
//!
//! The model is etcd's, the smaller of the two: keys are strings, every write gets the next
//! store-wide revision, an entry's `version` is the revision that last wrote it, and a
//! conditional write ([`Store::put_if`]) succeeds only if the key is still at the version
//! the caller read (or still absent). That one primitive is what makes a join token work
//! exactly once when two enforcers race with it. A [`Watch`] is a snapshot of a prefix plus
//! every later change, in revision order, with nothing missed between the two.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

/// One key and its value as of the revision that last wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    /// The store revision of the last write to this key.
    pub version: u64,
}

/// A change, as watches deliver it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put(Entry),
    Delete { key: String, revision: u64 },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(e) => &e.key,
            Event::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> u64 {
        match self {
            Event::Put(e) => e.version,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("store {path}: held by another process (is another `tessera server` running?)")]
    Locked { path: PathBuf },
    #[error("store: {0}")]
    Backend(String),
    /// The watcher was too slow and changes were dropped: take a new snapshot.
    #[error("store watch fell {0} changes behind: resynchronise")]
    Lagged(u64),
    #[error("store closed")]
    Closed,
    /// A store on the network (etcd) did not answer: names the endpoints.
    #[error("store {endpoints}: unreachable: {reason}")]
    Unreachable { endpoints: String, reason: String },
}

/// The control plane's state.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError>;
    /// Writes unconditionally; the new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError>;
    /// Writes only if `key` is at version `expect` (`None`: absent). `Ok(None)`: someone
    /// else wrote first, nothing was written.
    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Option<u64>,
    ) -> Result<Option<u64>, StoreError>;
    /// Whether the key existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// A snapshot of `prefix` and every change after it.
    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError>;
}

/// A snapshot and the changes after it (see [`Store::watch`]).
pub struct Watch {
    pub snapshot: Vec<Entry>,
    /// The revision the snapshot is at; events at or below it are already in it.
    pub revision: u64,
    prefix: String,
    feed: Feed,
}

/// Where a watch's changes come from: the embedded store's broadcast of every write, or a
/// channel a backend's task fills with the changes under the prefix (etcd).
enum Feed {
    Broadcast(broadcast::Receiver<Event>),
    Channel {
        rx: tokio::sync::mpsc::Receiver<Result<Event, StoreError>>,
        _task: AbortOnDrop,
    },
}

/// Stops the task feeding a watch when the watch is dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Watch {
    /// A watch fed by `rx`, which must have been subscribed before the snapshot was read.
    pub fn new(
        prefix: &str,
        snapshot: Vec<Entry>,
        revision: u64,
        rx: broadcast::Receiver<Event>,
    ) -> Self {
        Self {
            snapshot,
            revision,
            prefix: prefix.to_string(),
            feed: Feed::Broadcast(rx),
        }
    }

    /// A watch fed by `task` through `rx`: the changes after `revision`, in order, then an
    /// error if they stop (the task ends with the watch).
    pub fn from_channel(
        prefix: &str,
        snapshot: Vec<Entry>,
        revision: u64,
        rx: tokio::sync::mpsc::Receiver<Result<Event, StoreError>>,
        task: tokio::task::AbortHandle,
    ) -> Self {
        Self {
            snapshot,
            revision,
            prefix: prefix.to_string(),
            feed: Feed::Channel {
                rx,
                _task: AbortOnDrop(task),
            },
        }
    }

    /// The next change under the prefix. [`StoreError::Lagged`]: changes were lost, watch anew.
    pub async fn next(&mut self) -> Result<Event, StoreError> {
        loop {
            let ev = match &mut self.feed {
                Feed::Broadcast(rx) => match rx.recv().await {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        return Err(StoreError::Lagged(n));
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(StoreError::Closed),
                },
                Feed::Channel { rx, .. } => match rx.recv().await {
                    Some(Ok(ev)) => ev,
                    Some(Err(e)) => return Err(e),
                    None => return Err(StoreError::Closed),
                },
            };
            if ev.revision() > self.revision && ev.key().starts_with(&self.prefix) {
                self.revision = ev.revision();
                return Ok(ev);
            }
        }
    }
}

const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
/// Changes a watcher may fall behind by before it must resynchronise.
const WATCH_BUFFER: usize = 16_384;

/// The default store: one redb file, for a control plane on one machine.
#[derive(Clone)]
pub struct Embedded {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Held across a write and its broadcast so that watchers see revision order.
    write: Mutex<()>,
    events: broadcast::Sender<Event>,
}

fn backend(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{}: {e}", path.display()))
}

impl Embedded {
    /// Opens (or creates, mode 0600) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.into(),
                reason: e.to_string(),
            })?;
        }
        // redb creates the file with the process umask: make it ours alone first.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| StoreError::Open {
                    path: path.into(),
                    reason: e.to_string(),
                })?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path: path.into() },
            redb::DatabaseError::Storage(redb::StorageError::Io(io))
                if io.kind() == std::io::ErrorKind::WouldBlock =>
            {
                StoreError::Locked { path: path.into() }
            }
            e => StoreError::Open {
                path: path.into(),
                reason: e.to_string(),
            },
        })?;
        let tx = db.begin_write().map_err(|e| backend(path, e))?;
        tx.open_table(KV).map_err(|e| backend(path, e))?;
        tx.open_table(META).map_err(|e| backend(path, e))?;
        tx.commit().map_err(|e| backend(path, e))?;
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path: path.into(),
                write: Mutex::new(()),
                events,
            }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Backend(format!("store task: {e}")))?
    }
}

impl Inner {
    fn read_prefix(&self, prefix: &str) -> Result<(Vec<Entry>, u64), StoreError> {
        let p = &self.path;
        let tx = self.db.begin_read().map_err(|e| backend(p, e))?;
        let kv = tx.open_table(KV).map_err(|e| backend(p, e))?;
        let meta = tx.open_table(META).map_err(|e| backend(p, e))?;
        let revision = meta
            .get(REVISION)
            .map_err(|e| backend(p, e))?
            .map(|v| v.value())
            .unwrap_or(0);
        let mut out = Vec::new();
        for item in kv.range(prefix..).map_err(|e| backend(p, e))? {
            let (k, v) = item.map_err(|e| backend(p, e))?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            let (version, value) = v.value();
            out.push(Entry {
                key: key.to_string(),
                value: value.to_vec(),
                version,
            });
        }
        Ok((out, revision))
    }

    /// One write: `f` sees the key's current version and says what to store (`Some(value)`)
    /// or delete (`None`); `Err(())` declines. Returns the event, if anything changed.
    fn write(
        &self,
        key: &str,
        f: impl FnOnce(Option<u64>) -> Result<Option<Vec<u8>>, ()>,
    ) -> Result<Option<Event>, StoreError> {
        let p = &self.path;
        let _order = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let tx = self.db.begin_write().map_err(|e| backend(p, e))?;
        let event = {
            let mut kv = tx.open_table(KV).map_err(|e| backend(p, e))?;
            let mut meta = tx.open_table(META).map_err(|e| backend(p, e))?;
            let current = kv.get(key).map_err(|e| backend(p, e))?.map(|v| v.value().0);
            let Ok(change) = f(current) else {
                return Ok(None);
            };
            if change.is_none() && current.is_none() {
                return Ok(None);
            }
            let revision = meta
                .get(REVISION)
                .map_err(|e| backend(p, e))?
                .map(|v| v.value())
                .unwrap_or(0)
                + 1;
            meta.insert(REVISION, revision).map_err(|e| backend(p, e))?;
            match change {
                Some(value) => {
                    kv.insert(key, (revision, value.as_slice()))
                        .map_err(|e| backend(p, e))?;
                    Event::Put(Entry {
                        key: key.to_string(),
                        value,
                        version: revision,
                    })
                }
                None => {
                    kv.remove(key).map_err(|e| backend(p, e))?;
                    Event::Delete {
                        key: key.to_string(),
                        revision,
                    }
                }
            }
        };
        tx.commit().map_err(|e| backend(p, e))?;
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event.clone());
        Ok(Some(event))
    }
}

#[async_trait]
impl Store for Embedded {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let key = key.to_string();
        self.blocking(move |inner| {
            let (mut entries, _) = inner.read_prefix(&key)?;
            entries.retain(|e| e.key == key);
            Ok(entries.pop())
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |inner| Ok(inner.read_prefix(&prefix)?.0))
            .await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        let key = key.to_string();
        self.blocking(move |inner| {
            let ev = inner.write(&key, |_| Ok(Some(value)))?;
            Ok(ev.map(|e| e.revision()).unwrap_or(0))
        })
        .await
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        let key = key.to_string();
        self.blocking(move |inner| {
            let ev = inner.write(&key, |current| {
                if current == expect {
                    Ok(Some(value))
                } else {
                    Err(())
                }
            })?;
            Ok(ev.map(|e| e.revision()))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.blocking(move |inner| Ok(inner.write(&key, |_| Ok(None))?.is_some()))
            .await
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        let rx = self.inner.events.subscribe();
        let p = prefix.to_string();
        let (snapshot, revision) = self.blocking(move |inner| inner.read_prefix(&p)).await?;
        Ok(Watch::new(prefix, snapshot, revision, rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The contract every store keeps (put_if exactly once, racing writers, watches) is
    // tested against this one and etcd alike in control/tests/store.rs.

    #[tokio::test]
    async fn list_is_by_prefix_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        {
            let s = Embedded::open(&path).unwrap();
            s.put("enforcers/a", b"1".to_vec()).await.unwrap();
            s.put("enforcers/b", b"2".to_vec()).await.unwrap();
            s.put("enforcersz", b"x".to_vec()).await.unwrap();
            s.put("policy/current", b"p".to_vec()).await.unwrap();
            // A second open while this one holds the file names it.
            match Embedded::open(&path) {
                Err(StoreError::Locked { path: p }) => assert_eq!(p, path),
                other => panic!("expected a lock error, got {:?}", other.err()),
            }
        }
        let s = Embedded::open(&path).unwrap();
        let keys: Vec<_> = s
            .list("enforcers/")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(keys, ["enforcers/a", "enforcers/b"]);
        // Revisions continue after a restart rather than starting over.
        assert_eq!(s.put("x", vec![]).await.unwrap(), 5);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the store holds the CA key: {mode:o}");
    }
}
