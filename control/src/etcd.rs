//! The fleet's store: etcd, so that several `tessera server` replicas share one state and
//! survive the loss of a machine (`tessera server run --store etcd://...`).
//!
//! The [`Store`] model is etcd's own, so the mapping is direct: a key's `version` is its
//! `mod_revision`, a write's revision is the cluster's, and [`Store::put_if`] is one
//! transaction comparing the key's `mod_revision` (or, for "still absent", its
//! `create_revision` with 0). A [`Watch`] is a range read at revision R and an etcd watch
//! from R + 1, so nothing is missed or doubled between the two. Every key lives under a
//! prefix (default `/tessera/`) so that several installations can share one etcd.
//!
//! When etcd cannot be reached, requests fail after [`REQUEST_TIMEOUT`] with
//! [`StoreError::Unreachable`] naming the endpoints, and open watches end with an error:
//! the server answers 503 and enforcers keep what they have (they fail static).
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue,
    Txn, TxnOp, WatchOptions,
};

use crate::store::{Entry, Event, Store, StoreError, Watch};

/// The prefix keys live under when the URL names none.
pub const DEFAULT_PREFIX: &str = "/tessera/";
/// How long one request may take before the store counts etcd as unreachable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Changes a watch may hold for a slow reader; past that the feed waits (etcd buffers).
const WATCH_BUFFER: usize = 1024;

/// Where the store is: `etcd://host:port[,host:port...][/prefix]`, or `etcds://...` for
/// etcd over TLS with a client certificate ([`EtcdTls`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdUrl {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// Ends with `/`.
    pub prefix: String,
    /// `etcds://`: TLS, etcd's certificate checked against a CA, ours presented.
    pub tls: bool,
}

/// TLS to etcd (`etcds://`): the CA that signed the members' certificates, and this
/// server's client certificate and key, which etcd started with `--client-cert-auth`
/// requires. The store holds the control plane's CA key: it must never cross a network in
/// the clear, nor be readable by whoever can reach etcd's port.
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdTls { .. }")
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "store URL {url:?}: {reason} (expected etcd://host:port[,host:port...][/prefix], or etcds:// for TLS)"
)]
pub struct UrlError {
    url: String,
    reason: &'static str,
}

impl std::str::FromStr for EtcdUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, UrlError> {
        let bad = |reason| UrlError {
            url: url.to_string(),
            reason,
        };
        let (tls, rest) = match (url.strip_prefix("etcd://"), url.strip_prefix("etcds://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(bad("not etcd:// or etcds://")),
        };
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, DEFAULT_PREFIX),
        };
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let (host, port) = h.rsplit_once(':').ok_or(bad("an endpoint has no :port"))?;
            if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad("an endpoint is not host:port"));
            }
            if h.contains(['@', '?', '#', ' ']) {
                return Err(bad("an endpoint is not host:port"));
            }
            endpoints.push(h.to_string());
        }
        let mut prefix = prefix.to_string();
        if prefix == "/" {
            return Err(bad("the prefix is empty: name one, e.g. /tessera"));
        }
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Self {
            endpoints,
            prefix,
            tls,
        })
    }
}

impl std::fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}{}",
            if self.tls { "etcds" } else { "etcd" },
            self.endpoints.join(","),
            self.prefix.trim_end_matches('/')
        )
    }
}

/// The control plane's state in etcd, under a prefix.
///
/// One client per member, used in turn: the store sticks to a member until it cannot be
/// connected to, then moves on to the next, so that a dead member costs one failed
/// connection rather than a share of all requests.
#[derive(Clone)]
pub struct EtcdStore {
    clients: Arc<Vec<Client>>,
    /// `host:port` of each client's member.
    endpoints: Arc<Vec<String>>,
    current: Arc<AtomicUsize>,
    prefix: String,
    /// For errors: the endpoints, as given.
    name: String,
}

impl EtcdStore {
    /// Connects and checks that etcd answers: an unreachable etcd is an error naming it.
    pub async fn connect(url: &EtcdUrl) -> Result<Self, StoreError> {
        Self::connect_with(url, None).await
    }

    /// [`EtcdStore::connect`], over TLS for an `etcds://` URL (which needs `tls`; a plain
    /// `etcd://` URL refuses it, so that TLS files are never silently unused).
    pub async fn connect_with(url: &EtcdUrl, tls: Option<&EtcdTls>) -> Result<Self, StoreError> {
        let name = url.endpoints.join(",");
        let config = |reason: &str| StoreError::Unreachable {
            endpoints: name.clone(),
            reason: reason.to_string(),
        };
        let tls = match (url.tls, tls) {
            (true, Some(t)) => Some(t),
            (false, None) => None,
            (true, None) => {
                return Err(config(
                    "etcds:// needs the CA, a client certificate and its key (--etcd-ca, --etcd-cert, --etcd-key)",
                ));
            }
            (false, Some(_)) => {
                return Err(config(
                    "TLS files given for a plaintext etcd:// URL: use etcds://",
                ));
            }
        };
        let unreachable = |reason: String| StoreError::Unreachable {
            endpoints: name.clone(),
            reason,
        };
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            // A member cut off from the others ends its watches rather than going quiet.
            .with_require_leader(true);
        let mut clients = Vec::new();
        for e in &url.endpoints {
            let mut options = options.clone();
            let scheme = match tls {
                Some(t) => {
                    let host = e.rsplit_once(':').map_or(e.as_str(), |(h, _)| h);
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    options = options.with_tls(
                        etcd_client::TlsOptions::new()
                            .ca_certificate(etcd_client::Certificate::from_pem(&t.ca_pem))
                            .identity(etcd_client::Identity::from_pem(&t.cert_pem, &t.key_pem))
                            .domain_name(host),
                    );
                    "https"
                }
                None => "http",
            };
            let client = Client::connect([format!("{scheme}://{e}")], Some(options))
                .await
                .map_err(|err| StoreError::Unreachable {
                    endpoints: e.clone(),
                    reason: err.to_string(),
                })?;
            clients.push(client);
        }
        let store = Self {
            clients: Arc::new(clients),
            endpoints: Arc::new(url.endpoints.clone()),
            current: Arc::new(AtomicUsize::new(0)),
            prefix: url.prefix.clone(),
            name: name.clone(),
        };
        // The client connects lazily: ask something to know etcd is there.
        store.get("").await.map_err(|e| match e {
            StoreError::Backend(reason) => unreachable(reason),
            e => e,
        })?;
        Ok(store)
    }

    /// The prefix keys live under (ends with `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// One request, on the current member and then, if that one cannot be reached, on
    /// the others in turn. A write moves on only when its request never left (the
    /// connection failed): one that may have been applied is not sent twice.
    async fn call<T, F, Fut>(&self, retry: Retry, f: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.clients.len();
        let mut last = None;
        for _ in 0..n {
            let i = self.current.load(Ordering::Relaxed) % n;
            let err = match tokio::time::timeout(REQUEST_TIMEOUT, f(self.clients[i].clone())).await
            {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    let again = match retry {
                        Retry::Read => unreachable_error(&e),
                        Retry::Write => not_sent(&e),
                    };
                    let err = self.error(e);
                    if !again {
                        return Err(err);
                    }
                    err
                }
                Err(_) if retry == Retry::Read => StoreError::Unreachable {
                    endpoints: self.name.clone(),
                    reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
                },
                Err(_) => {
                    return Err(StoreError::Unreachable {
                        endpoints: self.name.clone(),
                        reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
                    });
                }
            };
            tracing::warn!(member = %self.endpoints[i], error = %err, "etcd member unreachable, trying the next");
            // Move on, unless another request already did.
            let _ =
                self.current
                    .compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
            last = Some(err);
        }
        Err(last.unwrap_or(StoreError::Closed))
    }

    fn error(&self, e: etcd_client::Error) -> StoreError {
        match e {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
                StoreError::Unreachable {
                    endpoints: self.name.clone(),
                    reason: e.to_string(),
                }
            }
            etcd_client::Error::GRpcStatus(s) if i32::from(s.code()) == GRPC_UNAVAILABLE => {
                StoreError::Unreachable {
                    endpoints: self.name.clone(),
                    reason: s.message().to_string(),
                }
            }
            e => StoreError::Backend(format!("etcd {}: {e}", self.name)),
        }
    }

    fn entry(&self, kv: &KeyValue) -> Result<Entry, StoreError> {
        let key = kv
            .key_str()
            .ok()
            .and_then(|k| k.strip_prefix(self.prefix.as_str()))
            .ok_or_else(|| {
                StoreError::Backend(format!(
                    "etcd {}: key {:?} is not under {}",
                    self.name,
                    String::from_utf8_lossy(kv.key()),
                    self.prefix
                ))
            })?;
        Ok(Entry {
            key: key.to_string(),
            value: kv.value().to_vec(),
            version: revision(kv.mod_revision()),
        })
    }

    /// Every key under `prefix` and the revision the read is at: read in pages of
    /// [`PAGE`] keys, all at the first page's revision (one consistent view), so that no
    /// answer outgrows a gRPC message however many keys there are (a thousand enforcers'
    /// maps were 26 MB in one answer).
    async fn range(&self, prefix: &str) -> Result<(Vec<Entry>, u64), StoreError> {
        let end = prefix_end(self.full(prefix).into_bytes());
        let mut from = self.full(prefix).into_bytes();
        let mut at: Option<i64> = None;
        let mut entries = Vec::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if let Some(r) = at {
                options = options.with_revision(r);
            }
            let resp = self
                .call(Retry::Read, |c| {
                    let (from, options) = (from.clone(), options.clone());
                    async move { kv(&c).get(from, Some(options)).await }
                })
                .await?;
            let rev = *at.get_or_insert(resp.header().map(|h| h.revision()).unwrap_or(0));
            for kv in resp.kvs() {
                entries.push(self.entry(kv)?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((entries, revision(rev))),
            }
        }
    }

    /// The changes under `prefix` after revision `after`, as a watch with an empty
    /// snapshot at `after`. [`StoreError::Lagged`] if etcd compacted them away.
    pub async fn changes(&self, prefix: &str, after: u64) -> Result<Watch, StoreError> {
        let start = i64::try_from(after + 1)
            .map_err(|_| StoreError::Backend(format!("revision {after} out of range")))?;
        let key = self.full(prefix);
        // Opened and its first answer (whether the watch exists: a compacted start cancels
        // it) read on one member.
        let (sender, mut stream, first) = self
            .call(Retry::Read, |c| {
                let key = key.clone();
                async move {
                    let options = WatchOptions::new().with_prefix().with_start_revision(start);
                    let (sender, mut stream) = c
                        .watch_client()
                        .max_decoding_message_size(MAX_MESSAGE)
                        .watch(key, Some(options))
                        .await?
                        .split();
                    let first = stream.message().await?;
                    Ok((sender, stream, first))
                }
            })
            .await?;
        let first = first.ok_or(StoreError::Closed)?;
        if first.canceled() {
            return Err(self.cancelled(&first, after));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let this = self.clone();
        let task = tokio::spawn(async move {
            // Keep the request side open: dropping it ends the watch.
            let _sender = sender;
            let mut pending = Some(first);
            loop {
                let resp = match pending.take() {
                    Some(r) => r,
                    None => match stream.message().await {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            let _ = tx.send(Err(StoreError::Closed)).await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(this.error(e))).await;
                            return;
                        }
                    },
                };
                if resp.canceled() {
                    let _ = tx.send(Err(this.cancelled(&resp, after))).await;
                    return;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let change = match ev.event_type() {
                        EventType::Put => this.entry(kv).map(Event::Put),
                        EventType::Delete => this.entry(kv).map(|e| Event::Delete {
                            key: e.key,
                            revision: e.version,
                        }),
                    };
                    let failed = change.is_err();
                    if tx.send(change).await.is_err() || failed {
                        return;
                    }
                }
            }
        });
        Ok(Watch::from_channel(
            prefix,
            Vec::new(),
            after,
            rx,
            task.abort_handle(),
        ))
    }

    fn cancelled(&self, resp: &etcd_client::WatchResponse, after: u64) -> StoreError {
        if resp.compact_revision() > 0 {
            StoreError::Lagged(revision(resp.compact_revision()).saturating_sub(after))
        } else {
            StoreError::Backend(format!(
                "etcd {}: watch cancelled: {}",
                self.name,
                resp.cancel_reason()
            ))
        }
    }
}

/// Keys per page of a range read.
const PAGE: i64 = 256;
/// Largest answer (or watch message) taken from etcd: a page of large values (an
/// enforcer's map may be up to 16 MiB; etcd bounds each write by its --max-request-bytes).
const MAX_MESSAGE: usize = 256 << 20;

/// A KV client that takes answers up to [`MAX_MESSAGE`] (gRPC's default is 4 MiB).
fn kv(c: &Client) -> etcd_client::KvClient {
    c.kv_client().max_decoding_message_size(MAX_MESSAGE)
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(mut prefix: Vec<u8>) -> Vec<u8> {
    while let Some(last) = prefix.pop() {
        if last < 0xff {
            prefix.push(last + 1);
            return prefix;
        }
    }
    // Every key (etcd's "\0" range end).
    vec![0]
}

/// gRPC's status code for "the service is unavailable" (no leader, member down).
const GRPC_UNAVAILABLE: i32 = 14;

/// Whether a request may go to another member after failing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads (and opening a watch): always.
    Read,
    /// Writes: only if the request never reached etcd.
    Write,
}

/// The member could not be reached or could not serve (no leader).
fn unreachable_error(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => i32::from(s.code()) == GRPC_UNAVAILABLE,
        _ => false,
    }
}

/// The request failed before it was sent: the connection to the member failed.
fn not_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            i32::from(s.code()) == GRPC_UNAVAILABLE && {
                let m = s.message().to_ascii_lowercase();
                m.contains("connect error") || m.contains("dns error")
            }
        }
        _ => false,
    }
}

fn revision(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let key = self.full(key);
        let resp = self
            .call(Retry::Read, |c| {
                let key = key.clone();
                async move { kv(&c).get(key, None).await }
            })
            .await?;
        resp.kvs().first().map(|kv| self.entry(kv)).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        Ok(self.range(prefix).await?.0)
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        let key = self.full(key);
        let resp = self
            .call(Retry::Write, |c| {
                let (key, value) = (key.clone(), value.clone());
                async move { c.kv_client().put(key, value, None).await }
            })
            .await?;
        Ok(resp.header().map(|h| revision(h.revision())).unwrap_or(0))
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        let full = self.full(key);
        let compare = match expect {
            // Absent: never created (or deleted since).
            None => Compare::create_revision(full.clone(), CompareOp::Equal, 0),
            Some(v) => {
                let v = i64::try_from(v)
                    .map_err(|_| StoreError::Backend(format!("version {v} out of range")))?;
                Compare::mod_revision(full.clone(), CompareOp::Equal, v)
            }
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(full, value, None)]);
        let resp = self
            .call(Retry::Write, |c| {
                let txn = txn.clone();
                async move { c.kv_client().txn(txn).await }
            })
            .await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        Ok(Some(
            resp.header().map(|h| revision(h.revision())).unwrap_or(0),
        ))
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let key = self.full(key);
        let resp = self
            .call(Retry::Write, |c| {
                let key = key.clone();
                async move { c.kv_client().delete(key, None::<DeleteOptions>).await }
            })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, StoreError> {
        let (snapshot, at) = self.range(prefix).await?;
        let mut w = self.changes(prefix, at).await?;
        w.snapshot = snapshot;
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_endpoints_and_prefix() {
        let u: EtcdUrl = "etcd://127.0.0.1:2379".parse().unwrap();
        assert_eq!(u.endpoints, ["127.0.0.1:2379"]);
        assert_eq!(u.prefix, DEFAULT_PREFIX);
        let u: EtcdUrl = "etcd://a:1,b:2,[::1]:3/prod/tessera".parse().unwrap();
        assert_eq!(u.endpoints, ["a:1", "b:2", "[::1]:3"]);
        assert_eq!(u.prefix, "/prod/tessera/");
        assert_eq!(u.to_string(), "etcd://a:1,b:2,[::1]:3/prod/tessera");
        for bad in [
            "http://a:1",
            "etcd://",
            "etcd://a",
            "etcd://a:0",
            "etcd://a:x",
            "etcd://:1",
            "etcd://a:1,/p",
            "etcd://a:1/",
            "etcd://u@a:1",
        ] {
            let e = bad.parse::<EtcdUrl>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
