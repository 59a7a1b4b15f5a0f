//! The enforcer's flow store: a bounded buffer of recent flow records (for the API and live
//! follow), the aggregated connectivity map persisted in an embedded database (redb) so a
//! restart keeps it, and the Prometheus metrics flows feed.
use std::{
    collections::{HashSet, VecDeque},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use redb::{Database, ReadableTable, TableDefinition};
use tessera_proxy::flow::{FlowRecord, FlowSink};
use tokio::sync::broadcast;

use tessera_proxy::limits::{Drops, Limit};

use crate::{
    map::{Aggregate, EdgeKey, EdgeStats, Map, Node},
    metrics::Metrics,
};

/// Edge key (JSON) -> edge stats (JSON).
const EDGES: TableDefinition<&str, &[u8]> = TableDefinition::new("edges");
/// Node name -> node (JSON).
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");

/// Unauthenticated sources (addresses or prefixes) the map and the metrics name at most;
/// later ones are counted under [`OTHER_SOURCES`]. Each costs a node, its edges, a row in
/// the database and metric series: 1024 keeps the map readable and its file small (a few
/// hundred KB) whatever a flood of spoofed sources does, and is far more outsiders than a
/// map is useful for.
pub const MAX_UNAUTHENTICATED_SOURCES: usize = 1024;

/// Edges from unauthenticated sources at most; past that their port is recorded as 0 (a
/// flood to random ports cannot make an edge per port).
pub const MAX_UNAUTHENTICATED_EDGES: usize = 4096;

/// The node unauthenticated sources past the bound are counted under.
pub const OTHER_SOURCES: &str = "other sources (unauthenticated)";

/// Whether a map node name is that of a source without an identity.
fn unauthenticated_source(name: &str) -> bool {
    name.ends_with(" (unauthenticated)")
}

struct Inner {
    recent: VecDeque<Arc<FlowRecord>>,
    map: Aggregate,
    dirty_edges: HashSet<EdgeKey>,
    dirty_nodes: HashSet<String>,
    /// The unauthenticated source nodes on the map (at most the bound, and `other`).
    outsiders: HashSet<String>,
    /// Edges from them.
    outsider_edges: usize,
}

impl Inner {
    /// The source node name a record is counted under: its own, unless it is a new
    /// unauthenticated source past the bound (counted in `drops`).
    fn bounded(&mut self, src: String, drops: &Drops) -> String {
        if !unauthenticated_source(&src) {
            return src;
        }
        if self.outsiders.contains(&src) {
            src
        } else if self.outsiders.len() < MAX_UNAUTHENTICATED_SOURCES {
            self.outsiders.insert(src.clone());
            src
        } else {
            drops.hit(Limit::MapSources);
            OTHER_SOURCES.to_owned()
        }
    }
}

pub struct FlowStore {
    pub name: String,
    capacity: usize,
    inner: Mutex<Inner>,
    db: Option<Database>,
    live: broadcast::Sender<Arc<FlowRecord>>,
    pub metrics: Arc<Metrics>,
    /// The end of the baseline window (Unix ms): an edge first seen later is new.
    baseline_end_ms: std::sync::atomic::AtomicU64,
}

impl FlowStore {
    /// Edges first seen more than `window_ms` after the map's first edge (or, for an empty
    /// map, after now) are counted as new.
    pub fn set_baseline(&self, window_ms: u64) {
        let inner = self.inner.lock().expect("lock");
        let start = inner
            .map
            .edges
            .values()
            .map(|s| s.first_seen_ms)
            .min()
            .unwrap_or_else(tessera_proxy::flow::now_ms);
        self.baseline_end_ms.store(
            start.saturating_add(window_ms),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Opens (or creates) the map database at `db_path` and loads the map it holds.
    pub fn open(
        name: String,
        db_path: Option<&Path>,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        let mut map = Aggregate::default();
        let db = match db_path {
            None => None,
            Some(path) => {
                let db = open_db(path)?;
                load(&db, &mut map)
                    .with_context(|| format!("flows.map_db: cannot read {}", path.display()))?;
                Some(db)
            }
        };
        let (live, _) = broadcast::channel(1024);
        Ok(Arc::new(Self {
            name,
            capacity,
            inner: Mutex::new(Inner {
                recent: VecDeque::with_capacity(capacity.min(4096)),
                outsiders: map
                    .nodes
                    .keys()
                    .filter(|n| unauthenticated_source(n))
                    .cloned()
                    .collect(),
                outsider_edges: map
                    .edges
                    .keys()
                    .filter(|k| unauthenticated_source(&k.src))
                    .count(),
                map,
                dirty_edges: HashSet::new(),
                dirty_nodes: HashSet::new(),
            }),
            db,
            live,
            metrics,
            baseline_end_ms: u64::MAX.into(),
        }))
    }

    /// Recent records, oldest first, that satisfy `keep`.
    pub fn recent(&self, keep: impl Fn(&FlowRecord) -> bool) -> Vec<Arc<FlowRecord>> {
        let inner = self.inner.lock().expect("lock");
        inner.recent.iter().filter(|r| keep(r)).cloned().collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowRecord>> {
        self.live.subscribe()
    }

    pub fn map(&self) -> Map {
        self.inner.lock().expect("lock").map.map(&self.name)
    }

    /// Writes changed edges and nodes to the database.
    pub fn flush(&self) -> Result<()> {
        let Some(db) = &self.db else { return Ok(()) };
        let (edges, nodes): (Vec<(EdgeKey, EdgeStats)>, Vec<Node>) = {
            let mut inner = self.inner.lock().expect("lock");
            let edges = inner
                .dirty_edges
                .drain()
                .collect::<Vec<_>>()
                .into_iter()
                .filter_map(|k| inner.map.edges.get(&k).map(|s| (k, s.clone())))
                .collect();
            let nodes = inner
                .dirty_nodes
                .drain()
                .collect::<Vec<_>>()
                .into_iter()
                .filter_map(|n| inner.map.nodes.get(&n).cloned())
                .collect();
            (edges, nodes)
        };
        if edges.is_empty() && nodes.is_empty() {
            return Ok(());
        }
        let tx = db.begin_write()?;
        {
            let mut t = tx.open_table(EDGES)?;
            for (k, s) in &edges {
                t.insert(
                    serde_json::to_string(k)?.as_str(),
                    serde_json::to_vec(s)?.as_slice(),
                )?;
            }
            let mut t = tx.open_table(NODES)?;
            for n in &nodes {
                t.insert(n.name.as_str(), serde_json::to_vec(n)?.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Flushes the map to the database every `every` until the process ends.
    pub async fn keep_flushed(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.flush() {
                tracing::warn!(error = format!("{e:#}"), "cannot persist the flow map");
            }
        }
    }
}

/// Opens (or creates) the map database: a file private to the enforcer's user (0600, its
/// missing directories 0700; a looser existing file is tightened, a symbolic link or another
/// user's file refused), locked for this process alone. A lock someone else holds (another
/// enforcer with the same `map_db`, or any process holding `flock` on it) is an error at
/// once, never a wait.
fn open_db(path: &Path) -> Result<Database> {
    use tessera_proxy::flow::{create_private_dirs, open_private_file};
    let at = |e: std::io::Error| anyhow::anyhow!("flows.map_db: {e}");
    if let Some(dir) = path.parent() {
        create_private_dirs(dir).map_err(at)?;
    }
    let file = open_private_file(
        path,
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
    )
    .map_err(at)?;
    // redb takes `flock(LOCK_EX | LOCK_NB)` on the file: a held lock fails here at once.
    match redb::Builder::new().create_file(file) {
        Ok(db) => Ok(db),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(anyhow::anyhow!(
            "flows.map_db: {} is locked by another process (another enforcer using the same \
             map_db, or a process holding a lock on it; `fuser -v {}` names it)",
            path.display(),
            path.display()
        )),
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context(format!("flows.map_db: cannot open {}", path.display())))
        }
    }
}

fn load(db: &Database, map: &mut Aggregate) -> Result<()> {
    let tx = db.begin_write()?;
    // Create the tables on first use, so reads below find them.
    tx.open_table(EDGES)?;
    tx.open_table(NODES)?;
    tx.commit()?;
    let tx = db.begin_read()?;
    for row in tx.open_table(EDGES)?.iter()? {
        let (k, v) = row?;
        let key: EdgeKey = serde_json::from_str(k.value())?;
        map.edges.insert(key, serde_json::from_slice(v.value())?);
    }
    for row in tx.open_table(NODES)?.iter()? {
        let (k, v) = row?;
        map.nodes
            .insert(k.value().to_owned(), serde_json::from_slice(v.value())?);
    }
    Ok(())
}

impl FlowSink for FlowStore {
    fn record(&self, rec: Arc<FlowRecord>) {
        // Node names are made once and serve both the metrics and the map.
        let [src, dst] = crate::map::node_names(&rec);
        let drops = &self.metrics.drops;
        let [src, dst] = {
            let mut inner = self.inner.lock().expect("lock");
            if inner.recent.len() == self.capacity {
                inner.recent.pop_front();
            }
            inner.recent.push_back(rec.clone());
            let src = inner.bounded(src, drops);
            let mut port = rec.dst.addr.port();
            if unauthenticated_source(&src) {
                let key = EdgeKey {
                    src: src.clone(),
                    dst: dst.clone(),
                    port,
                    protocol: rec.protocol,
                    verdict: crate::map::verdict_name(rec.verdict).into(),
                };
                if !inner.map.edges.contains_key(&key) {
                    if inner.outsider_edges >= MAX_UNAUTHENTICATED_EDGES {
                        drops.hit(Limit::MapSources);
                        port = 0;
                    }
                    let zero = EdgeKey { port, ..key };
                    if !inner.map.edges.contains_key(&zero) {
                        inner.outsider_edges += 1;
                    }
                }
            }
            let (key, names) = inner.map.add_keyed(&rec, [src, dst], port);
            if inner.map.last_was_new
                && rec.start_ms
                    > self
                        .baseline_end_ms
                        .load(std::sync::atomic::Ordering::Relaxed)
            {
                self.metrics.new_edge();
            }
            inner.dirty_edges.insert(key.clone());
            for n in names.clone() {
                if !inner.dirty_nodes.contains(&n) {
                    inner.dirty_nodes.insert(n);
                }
            }
            names
        };
        self.metrics.observe(&rec, &src, &dst);
        let _ = self.live.send(rec);
    }
}

/// Filters of `GET /api/flows` and `tessera flows`.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct FlowFilter {
    /// A workload name at either end.
    pub workload: Option<String>,
    /// `allowed`, `denied`, `observed-would-deny`, `error`.
    pub verdict: Option<String>,
    /// Only records that started at or after this time (Unix ms).
    pub since: Option<u64>,
}

impl FlowFilter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        let verdict = crate::map::verdict_name(r.verdict);
        self.workload.as_ref().is_none_or(|w| {
            r.src.workload.as_deref() == Some(w) || r.dst.workload.as_deref() == Some(w)
        }) && self.verdict.as_ref().is_none_or(|v| v == verdict)
            && self.since.is_none_or(|s| r.start_ms >= s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proxy::flow::{Direction, Endpoint, Verdict};

    fn rec(verdict: Verdict, code: &str, bytes: u64) -> FlowRecord {
        let mut src = Endpoint::addr("10.77.0.1:5000".parse().unwrap());
        src.workload = Some("web".into());
        src.enforcer = Some("host-a".into());
        let mut dst = Endpoint::addr("10.77.0.2:8080".parse().unwrap());
        dst.workload = Some("api".into());
        dst.enforcer = Some("host-b".into());
        FlowRecord {
            start_ms: 1_000,
            duration_ms: 5,
            reporter: "host-b".into(),
            direction: Direction::Inbound,
            src,
            dst,
            protocol: Default::default(),
            mode: Default::default(),
            verdict,
            reason: if code.is_empty() {
                "".into()
            } else {
                format!("x ({code})")
            },
            code: code.parse().expect("a known code"),
            rule: None,
            bytes_sent: bytes,
            bytes_received: bytes * 2,
            pooled: None,
            count: None,
            packets: None,
        }
    }

    #[test]
    fn edges_first_seen_after_the_baseline_window_are_counted_new_once_and_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("map.redb");
        let new_edges = |m: &Metrics| {
            let text = m.render();
            text.lines()
                .find_map(|l| l.strip_prefix("tessera_map_new_edges_total "))
                .unwrap_or_else(|| panic!("no counter: {text}"))
                .trim()
                .to_string()
        };
        let metrics = Arc::new(Metrics::new());
        let store = FlowStore::open("host-b".into(), Some(&db), 2, metrics.clone()).unwrap();
        // The baseline: web -> api at t=1,000 (the map's first edge), window 10 s.
        store.record(Arc::new(rec(Verdict::Allowed, "", 1)));
        store.set_baseline(10_000);
        // Within the window: a new edge, but part of the baseline.
        let mut r = rec(Verdict::Denied, "policy", 0);
        r.start_ms = 5_000;
        store.record(Arc::new(r));
        assert_eq!(new_edges(&metrics), "0");
        // After it: new, counted once however often it is seen again.
        for t in [20_000, 21_000] {
            let mut r = rec(Verdict::Allowed, "", 1);
            r.dst.addr.set_port(9090);
            r.start_ms = t;
            store.record(Arc::new(r));
        }
        assert_eq!(new_edges(&metrics), "1");
        // An old edge seen again later is not new.
        let mut r = rec(Verdict::Allowed, "", 1);
        r.start_ms = 30_000;
        store.record(Arc::new(r));
        assert_eq!(new_edges(&metrics), "1");
        store.flush().unwrap();
        drop(store);
        // After a restart the baseline is still the map's first edge (reloaded).
        let metrics = Arc::new(Metrics::new());
        let store = FlowStore::open("host-b".into(), Some(&db), 2, metrics.clone()).unwrap();
        store.set_baseline(10_000);
        let mut r = rec(Verdict::Allowed, "", 1);
        r.dst.addr.set_port(7070);
        r.start_ms = 40_000;
        store.record(Arc::new(r));
        assert_eq!(new_edges(&metrics), "1");
        let mut m = store.map();
        assert_eq!(tessera_proxy::map::mark_new(&mut m, 10_000), 2);
    }

    #[test]
    fn unauthenticated_sources_are_bounded_on_the_map_and_never_labels() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("map.redb");
        let metrics = Arc::new(Metrics::new());
        let store = FlowStore::open("host-b".into(), Some(&db), 2, metrics.clone()).unwrap();
        let n = MAX_UNAUTHENTICATED_SOURCES as u32 + 500;
        for i in 0..n {
            let mut r = rec(Verdict::Denied, "not-served", 0);
            r.src = Endpoint::addr(std::net::SocketAddr::new(
                std::net::Ipv4Addr::from(0x0b00_0000u32 + (i << 8)).into(),
                1024 + (i % 60_000) as u16,
            ));
            // A flood to random ports: edges past the bound go to port 0.
            r.dst.addr.set_port((i % 60_000) as u16 + 1);
            store.record(Arc::new(r));
        }
        store.flush().unwrap();
        let map = store.map();
        let outsiders = map
            .nodes
            .iter()
            .filter(|n| unauthenticated_source(&n.name))
            .count();
        assert_eq!(outsiders, MAX_UNAUTHENTICATED_SOURCES + 1, "and `other`");
        let other: u64 = map
            .edges
            .iter()
            .filter(|e| e.key.src == OTHER_SOURCES)
            .map(|e| e.stats.connections)
            .sum();
        assert_eq!(other, 500);
        assert!(map.edges.len() <= MAX_UNAUTHENTICATED_EDGES + 2);
        assert!(metrics.drops.get(Limit::MapSources) >= 500);
        let text = metrics.render();
        assert!(!text.contains("(unauthenticated)"), "{text}");
        assert!(
            text.contains(&format!(
                "tessera_connections_total{{src=\"unauthenticated\",dst=\"api@host-b\",verdict=\"denied\"}} {n}"
            )),
            "{text}"
        );
        // Reopened: the bound holds across a restart.
        drop(store);
        let store = FlowStore::open("host-b".into(), Some(&db), 2, metrics).unwrap();
        let mut r = rec(Verdict::Denied, "not-served", 0);
        r.src = Endpoint::addr("198.51.100.1:5".parse().unwrap());
        store.record(Arc::new(r));
        assert!(
            store
                .map()
                .nodes
                .iter()
                .all(|n| !n.name.starts_with("198.51.100.1"))
        );
    }

    #[test]
    fn the_database_is_private_and_a_held_lock_is_named() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state/map.redb");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        let metrics = Arc::new(Metrics::new());
        let store = FlowStore::open("host-b".into(), Some(&db), 2, metrics.clone()).unwrap();
        assert_eq!((mode(&db), mode(db.parent().unwrap())), (0o600, 0o700));
        // A second open of a database this process holds: the lock is taken.
        let e = FlowStore::open("host-b".into(), Some(&db), 2, metrics.clone())
            .err()
            .expect("locked");
        assert_eq!(
            e.to_string().split(" (").next().unwrap(),
            format!(
                "flows.map_db: {} is locked by another process",
                db.display()
            )
        );
        drop(store);
        // A world-readable database (as older versions made it) is tightened on open.
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        FlowStore::open("host-b".into(), Some(&db), 2, metrics).unwrap();
        assert_eq!(mode(&db), 0o600);
    }

    #[test]
    fn the_map_survives_a_reopen_and_the_buffer_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("map.redb");
        let metrics = Arc::new(Metrics::new());
        {
            let store = FlowStore::open("host-b".into(), Some(&db), 2, metrics.clone()).unwrap();
            for _ in 0..3 {
                store.record(Arc::new(rec(Verdict::Allowed, "", 10)));
            }
            store.record(Arc::new(rec(Verdict::Denied, "replay", 0)));
            assert_eq!(store.recent(|_| true).len(), 2, "bounded buffer");
            let denied = FlowFilter {
                verdict: Some("denied".into()),
                ..Default::default()
            };
            assert_eq!(store.recent(|r| denied.matches(r)).len(), 1);
            store.flush().unwrap();
        }
        let store = FlowStore::open("host-b".into(), Some(&db), 2, metrics.clone()).unwrap();
        let map = store.map();
        assert_eq!(map.edges.len(), 2);
        let allowed = map
            .edges
            .iter()
            .find(|e| e.key.verdict == "allowed")
            .unwrap();
        assert_eq!(
            (
                allowed.stats.connections,
                allowed.stats.bytes_sent,
                allowed.stats.bytes_received
            ),
            (3, 30, 60)
        );
        let denied = map
            .edges
            .iter()
            .find(|e| e.key.verdict == "denied")
            .unwrap();
        assert!(
            denied
                .stats
                .codes
                .contains(&tessera_proxy::code::Code::Replay)
        );
        assert!(map.nodes.iter().any(|n| n.name == "web@host-a"));
        let text = metrics.render();
        assert!(
            text.contains("tessera_token_failures_total{reason=\"replay\"} 1"),
            "{text}"
        );
    }
}
