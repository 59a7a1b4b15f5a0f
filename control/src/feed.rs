//! What a server's watch streams are fed from: **one** store watch per server (the
//! directory's records and the current policy), kept as an in-memory directory and fanned
//! out to every enforcer's stream, rather than one store watch (and one full read of the
//! store for its snapshot) per enforcer.
//!
//! With a watch of its own per enforcer, a server on etcd had N etcd watches, each sent
//! every write under the prefix — enrolments, reports, join tokens and every enforcer's
//! map — and each new stream read the whole store for its snapshot: the work grew with
//! N × writes. Here each write reaches the server once, is turned into at most one line,
//! serialised once, and the line is shared by the streams (issue 14, fleet bench).
//!
//! * A stream starts from the feed's directory and policy (its snapshot) and receives
//!   the changes after it, in store order, through a bounded broadcast: a stream that
//!   falls [`BUFFER`] lines behind is ended, and its enforcer watches again (fresh
//!   snapshot), as before.
//! * When the store watch fails (etcd unreachable, compacted past the feed), every stream
//!   is ended and the feed re-reads the store; until it has, new streams are refused as
//!   unavailable (503, retryable): enforcers keep what they have (fail static).
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::broadcast;

use crate::{
    api::WatchMessage,
    policy::{self, PolicyVersion},
    registry::{self, DirectoryEntry},
    store::{Event, Store, StoreError, Watch},
};

/// Lines a stream may fall behind by before it is ended (it then starts over).
pub const BUFFER: usize = 8192;
const RETRY_MAX: Duration = Duration::from_secs(5);

/// One change, as every stream sends it.
#[derive(Clone, Debug)]
pub enum Line {
    /// A serialised [`WatchMessage`] (with its newline); `left` names the enforcer that
    /// left the directory, if it is a removal (its own stream says `Revoked` instead).
    Message {
        line: bytes::Bytes,
        left: Option<String>,
    },
    /// The feed lost the store: every stream ends.
    Reset,
}

/// The directory and policy as of `revision`.
#[derive(Default)]
struct State {
    synced: bool,
    revision: u64,
    directory: BTreeMap<String, DirectoryEntry>,
    policy: Option<PolicyVersion>,
}

pub struct Feed {
    state: Mutex<State>,
    tx: broadcast::Sender<Line>,
}

/// A stream's start: the snapshot line and the changes after it.
pub struct Subscription {
    pub snapshot: bytes::Bytes,
    pub changes: broadcast::Receiver<Line>,
}

pub fn line(m: &WatchMessage) -> bytes::Bytes {
    let mut v = serde_json::to_vec(m).expect("serialisable");
    v.push(b'\n');
    v.into()
}

/// Stops the feed's task with the server.
pub struct FeedTask(tokio::task::AbortHandle);

impl Drop for FeedTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Feed {
    /// Reads the store and follows it (in a task that lives as long as the [`FeedTask`]).
    /// If the first read fails the feed keeps trying; streams are refused until it works.
    pub async fn start(store: Arc<dyn Store>) -> (Arc<Feed>, FeedTask) {
        let (tx, _) = broadcast::channel(BUFFER);
        let feed = Arc::new(Feed {
            state: Mutex::new(State::default()),
            tx,
        });
        let first = feed.sync(store.as_ref()).await;
        if let Err(e) = &first {
            tracing::warn!(error = %e, "watch feed: store unreadable; retrying");
        }
        let f = feed.clone();
        let task = tokio::spawn(async move {
            let mut watches = first.ok();
            let mut delay = Duration::from_millis(100);
            loop {
                let Some((dir, pol)) = watches.as_mut() else {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                    match f.sync(store.as_ref()).await {
                        Ok(w) => {
                            tracing::info!("watch feed: following the store again");
                            watches = Some(w);
                            delay = Duration::from_millis(100);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "watch feed: store unreadable; retrying")
                        }
                    }
                    continue;
                };
                let ev = tokio::select! {
                    ev = dir.next() => ev,
                    ev = pol.next() => ev,
                };
                match ev {
                    Ok(ev) => f.apply(&ev),
                    Err(e) => {
                        tracing::warn!(error = %e, "watch feed: store watch ended; every stream starts over");
                        f.state.lock().unwrap_or_else(|e| e.into_inner()).synced = false;
                        let _ = f.tx.send(Line::Reset);
                        watches = None;
                    }
                }
            }
        });
        (feed, FeedTask(task.abort_handle()))
    }

    /// Reads the directory and policy afresh and watches both from there.
    async fn sync(&self, store: &dyn Store) -> Result<(Watch, Watch), StoreError> {
        let dir = store.watch(registry::PREFIX).await?;
        let pol = store.watch(policy::CURRENT).await?;
        let mut directory = BTreeMap::new();
        for e in &dir.snapshot {
            if let Ok(r) = registry::decode(e)
                && let Some(entry) = r.entry()
            {
                directory.insert(r.name.clone(), entry);
            }
        }
        let policy = pol
            .snapshot
            .iter()
            .find(|e| e.key == policy::CURRENT)
            .and_then(|e| serde_json::from_slice(&e.value).ok());
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *s = State {
            synced: true,
            revision: dir.revision.max(pol.revision),
            directory,
            policy,
        };
        Ok((dir, pol))
    }

    /// One change from the store: the state updated and, if a stream must hear of it, one
    /// line for all of them (sent under the lock, so that a new stream's snapshot and the
    /// changes after it neither miss nor repeat one).
    fn apply(&self, ev: &Event) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let revision = ev.revision();
        s.revision = s.revision.max(revision);
        let key = ev.key();
        if key == policy::CURRENT {
            if let Event::Put(e) = ev {
                match serde_json::from_slice::<PolicyVersion>(&e.value) {
                    Ok(policy) => {
                        s.policy = Some(policy.clone());
                        let line = line(&WatchMessage::Policy { revision, policy });
                        let _ = self.tx.send(Line::Message { line, left: None });
                    }
                    Err(err) => tracing::error!(error = %err, "stored policy unreadable"),
                }
            }
            return;
        }
        let Some(name) = key.strip_prefix(registry::PREFIX) else {
            return;
        };
        // A record this server cannot read (e.g. written by a newer replica) changes
        // nothing: only a readable record that is no longer active, or a delete, takes an
        // enforcer out (and tells it it was revoked).
        let entry = match ev {
            Event::Put(e) => match registry::decode(e) {
                Ok(r) => r.entry(),
                Err(err) => {
                    tracing::error!(enforcer = %name, error = %err, "stored enforcer record unreadable: the previous entry stays");
                    return;
                }
            },
            Event::Delete { .. } => None,
        };
        let msg = match entry {
            Some(entry) if s.directory.get(name) != Some(&entry) => {
                s.directory.insert(name.to_string(), entry.clone());
                Some((WatchMessage::Upsert { revision, entry }, None))
            }
            Some(_) => None,
            None if s.directory.remove(name).is_some() => Some((
                WatchMessage::Remove {
                    revision,
                    name: name.to_string(),
                },
                Some(name.to_string()),
            )),
            None => None,
        };
        if let Some((m, left)) = msg {
            let _ = self.tx.send(Line::Message {
                line: line(&m),
                left,
            });
        }
    }

    /// A new stream: its snapshot and the changes after it; `None` while the feed has lost
    /// the store.
    pub fn subscribe(&self) -> Option<Subscription> {
        let (revision, directory, policy, changes) = {
            let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if !s.synced {
                return None;
            }
            (
                s.revision,
                s.directory.values().cloned().collect::<Vec<_>>(),
                s.policy.clone(),
                self.tx.subscribe(),
            )
        };
        Some(Subscription {
            snapshot: line(&WatchMessage::Snapshot {
                revision,
                directory,
                policy,
            }),
            changes,
        })
    }

    /// The revision the feed is at (for pings).
    pub fn revision(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .revision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{registry, store::Embedded};

    /// The next change line, skipping nothing (the feed sends only changes).
    async fn next(rx: &mut broadcast::Receiver<Line>) -> Option<(String, Option<String>)> {
        match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
            Ok(Ok(Line::Message { line, left })) => {
                Some((String::from_utf8_lossy(&line).into_owned(), left))
            }
            _ => None,
        }
    }

    /// A record this server cannot read leaves the enforcer in the directory (its stream is
    /// not told it was revoked); a delete takes it out and says who left.
    #[tokio::test]
    async fn an_unreadable_record_changes_nothing_and_a_delete_says_who_left() {
        let d = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(Embedded::open(&d.path().join("c.redb")).unwrap());
        let rec = registry::tests::active("host-a", &["10.0.0.1/32"]);
        store
            .put(&registry::key("host-a"), serde_json::to_vec(&rec).unwrap())
            .await
            .unwrap();
        let (feed, _task) = Feed::start(store.clone()).await;
        let mut sub = None;
        for _ in 0..100 {
            sub = feed.subscribe();
            if sub.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sub = sub.expect("the feed never synced");
        assert!(String::from_utf8_lossy(&sub.snapshot).contains("host-a"));
        let mut rx = sub.changes;
        store
            .put(&registry::key("host-a"), b"{not a record".to_vec())
            .await
            .unwrap();
        assert_eq!(
            next(&mut rx).await,
            None,
            "an unreadable record was sent as a change"
        );
        store.delete(&registry::key("host-a")).await.unwrap();
        let (line, left) = next(&mut rx).await.expect("the delete was not sent");
        assert!(
            line.contains("\"remove\"") || line.contains("host-a"),
            "{line}"
        );
        assert_eq!(left.as_deref(), Some("host-a"));
    }
}
