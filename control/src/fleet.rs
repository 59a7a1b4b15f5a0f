//! The fleet's map at the control plane (issue 14): every enforcer sends its own map (what
//! it saw, aggregated per edge: identities, port, verdict, counts, bytes, first and last
//! seen, rules, codes), the server keeps each enforcer's latest in the store, and serves
//! their merge: one map of the whole fleet that survives a server restart and that every
//! replica on a shared store serves alike.
//!
//! * Both ends of a connection report it; the merge takes the larger view of each edge, so
//!   a connection counts once ([`tessera_proxy::map::merge`]); a handshake-mode refusal
//!   the source saw only as `ADDR (via host-b)` folds into host-b's identity edge.
//! * An edge's reporter is the enforcer whose certificate sent it, never a claim in the
//!   body: a rogue enforcer can add what it says it saw, under its own name only.
//! * Bounded: a map of more than [`MAX_EDGES`] edges or [`MAX_NODES`] nodes is refused whole
//!   (an enforcer's own map is bounded well below: its unauthenticated sources are folded).
use serde::{Deserialize, Serialize};
use tessera_proxy::map::{self, Map};

use crate::store::{Store, StoreError};

/// Each enforcer's latest map, under its name.
pub const PREFIX: &str = "fleet/maps/";
pub const MAX_EDGES: usize = 16_384;
pub const MAX_NODES: usize = 16_384;
/// The largest body the map route takes.
pub const MAX_BODY: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the map of {reporter} has {edges} edges and {nodes} nodes: at most {MAX_EDGES} and {MAX_NODES}"
    )]
    TooLarge {
        reporter: String,
        edges: usize,
        nodes: usize,
    },
    #[error("the stored map of {reporter} is unreadable: {error}")]
    Corrupt { reporter: String, error: String },
}

/// What the store keeps per enforcer.
#[derive(Debug, Serialize)]
struct Stored {
    received_ms: u64,
    map: Map,
}

/// [`Stored`] as read back (through [`WireMap`]).
#[derive(Deserialize)]
struct StoredWire {
    #[allow(dead_code)]
    received_ms: u64,
    map: WireMap,
}

/// A map as its JSON carries it (the same JSON as [`Map`]'s), read without
/// `#[serde(flatten)]`: [`Edge`]'s flattened key and stats make serde buffer every field of
/// every edge before reading it, which was a quarter of a server's CPU while it took 50,000
/// flow records/s (fleet bench, `perf`).
#[derive(Deserialize)]
pub struct WireMap {
    nodes: Vec<map::Node>,
    edges: Vec<WireEdge>,
}

#[derive(Deserialize)]
struct WireEdge {
    src: String,
    dst: String,
    port: u16,
    #[serde(default)]
    protocol: tessera_proxy::flow::Protocol,
    verdict: String,
    connections: u64,
    bytes_sent: u64,
    bytes_received: u64,
    first_seen_ms: u64,
    last_seen_ms: u64,
    rules: std::collections::BTreeSet<String>,
    codes: std::collections::BTreeSet<tessera_proxy::code::Code>,
    reason: String,
    reporters: std::collections::BTreeSet<String>,
    #[serde(default)]
    new: bool,
}

impl From<WireMap> for Map {
    fn from(w: WireMap) -> Self {
        Map {
            nodes: w.nodes,
            edges: w
                .edges
                .into_iter()
                .map(|e| map::Edge {
                    key: map::EdgeKey {
                        src: e.src,
                        dst: e.dst,
                        port: e.port,
                        protocol: e.protocol,
                        verdict: e.verdict,
                    },
                    stats: map::EdgeStats {
                        connections: e.connections,
                        bytes_sent: e.bytes_sent,
                        bytes_received: e.bytes_received,
                        first_seen_ms: e.first_seen_ms,
                        last_seen_ms: e.last_seen_ms,
                        rules: e.rules,
                        codes: e.codes,
                        reason: e.reason,
                    },
                    reporters: e.reporters,
                    new: e.new,
                })
                .collect(),
        }
    }
}

/// Keeps `reporter`'s map (replacing its previous one), each edge reported by it alone.
pub async fn ingest(
    store: &dyn Store,
    reporter: &str,
    mut map: Map,
    now_ms: u64,
) -> Result<(), FleetError> {
    if map.edges.len() > MAX_EDGES || map.nodes.len() > MAX_NODES {
        return Err(FleetError::TooLarge {
            reporter: reporter.to_string(),
            edges: map.edges.len(),
            nodes: map.nodes.len(),
        });
    }
    for e in &mut map.edges {
        e.reporters = [reporter.to_string()].into();
    }
    let value = serde_json::to_vec(&Stored {
        received_ms: now_ms,
        map,
    })
    .expect("serialisable");
    store.put(&format!("{PREFIX}{reporter}"), value).await?;
    Ok(())
}

/// The fleet's map: every enforcer's latest, merged.
pub async fn fleet_map(store: &dyn Store) -> Result<Map, FleetError> {
    merged(&store.list(PREFIX).await?)
}

fn merged(entries: &[crate::store::Entry]) -> Result<Map, FleetError> {
    let mut maps = Vec::with_capacity(entries.len());
    for entry in entries {
        let reporter = entry.key.trim_start_matches(PREFIX).to_string();
        let stored: StoredWire =
            serde_json::from_slice(&entry.value).map_err(|e| FleetError::Corrupt {
                reporter,
                error: e.to_string(),
            })?;
        maps.push(stored.map.into());
    }
    Ok(map::merge(maps))
}

/// The fleet map's JSON as last served, with what it was made from (each report's key and
/// store version). A request that finds the same reports gets the same bytes, without
/// decoding, merging and serialising every enforcer's map again: a security team's pages
/// refresh the map far more often than a thousand enforcers' reports change it.
#[derive(Default)]
pub struct MapCache {
    last: std::sync::Mutex<Option<Made>>,
}

/// Each report's key and store version, and the JSON made from them.
type Made = (Vec<(String, u64)>, bytes::Bytes);

impl MapCache {
    /// The fleet map as JSON, made again only if a report changed since the last request.
    pub async fn json(&self, store: &dyn Store) -> Result<bytes::Bytes, FleetError> {
        let entries = store.list(PREFIX).await?;
        let made_from: Vec<(String, u64)> =
            entries.iter().map(|e| (e.key.clone(), e.version)).collect();
        if let Some((from, body)) = &*self.last.lock().expect("lock")
            && *from == made_from
        {
            return Ok(body.clone());
        }
        let body = bytes::Bytes::from(serde_json::to_vec(&merged(&entries)?).map_err(|e| {
            FleetError::Corrupt {
                reporter: "(the merged map)".into(),
                error: e.to_string(),
            }
        })?);
        *self.last.lock().expect("lock") = Some((made_from, body.clone()));
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tessera_proxy::map::{Edge, EdgeKey, EdgeStats, Node};

    use super::*;
    use crate::store::Embedded;

    fn edge(connections: u64, reporter: &str) -> Edge {
        Edge {
            key: EdgeKey {
                src: "web@host-a".into(),
                dst: "api@host-b".into(),
                port: 8080,
                protocol: Default::default(),
                verdict: "allowed".into(),
            },
            stats: EdgeStats {
                connections,
                bytes_sent: 10 * connections,
                first_seen_ms: 100,
                last_seen_ms: 200 + connections,
                rules: BTreeSet::from(["web-to-api".to_string()]),
                ..Default::default()
            },
            reporters: BTreeSet::from([reporter.to_string()]),
            new: false,
        }
    }

    fn node(name: &str) -> Node {
        Node {
            name: name.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn both_ends_count_once_reporters_are_the_senders_and_it_survives_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.redb");
        {
            let s = Embedded::open(&path).unwrap();
            let a = Map {
                nodes: vec![node("web@host-a"), node("api@host-b")],
                edges: vec![edge(5, "host-a")],
            };
            // host-b saw the same 5 connections (and claims someone else reported them).
            let b = Map {
                nodes: vec![node("api@host-b")],
                edges: vec![edge(5, "host-z")],
            };
            ingest(&s, "host-a", a, 1).await.unwrap();
            ingest(&s, "host-b", b, 2).await.unwrap();
            // A newer map from host-a replaces its older one.
            let a2 = Map {
                nodes: vec![node("web@host-a")],
                edges: vec![edge(7, "host-a")],
            };
            ingest(&s, "host-a", a2, 3).await.unwrap();
        }
        let s = Embedded::open(&path).unwrap();
        let m = fleet_map(&s).await.unwrap();
        assert_eq!(m.edges.len(), 1, "{m:?}");
        let e = &m.edges[0];
        assert_eq!(e.stats.connections, 7, "the larger view, not the sum");
        assert_eq!(e.stats.bytes_sent, 70);
        assert_eq!(
            e.reporters,
            BTreeSet::from(["host-a".to_string(), "host-b".to_string()])
        );
        assert_eq!(m.nodes.len(), 2);
    }

    #[test]
    fn the_wire_form_reads_exactly_what_a_map_writes() {
        let mut e = edge(3, "host-a");
        e.new = true;
        e.key.protocol = tessera_proxy::flow::Protocol::Udp;
        e.stats.codes.insert(tessera_proxy::code::Code::default());
        e.stats.reason = "why".into();
        let m = Map {
            nodes: vec![node("web@host-a")],
            edges: vec![e, edge(1, "host-b")],
        };
        let w: WireMap = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(Map::from(w), m);
        // A field missing is refused as before.
        let mut v = serde_json::to_value(&m).unwrap();
        v["edges"][0].as_object_mut().unwrap().remove("port");
        assert!(serde_json::from_value::<WireMap>(v).is_err());
    }

    #[tokio::test]
    async fn an_oversized_map_is_refused_whole_and_the_previous_one_stays() {
        let d = tempfile::tempdir().unwrap();
        let s = Embedded::open(&d.path().join("c.redb")).unwrap();
        let small = Map {
            nodes: vec![node("web@host-a")],
            edges: vec![edge(1, "host-a")],
        };
        ingest(&s, "host-a", small, 1).await.unwrap();
        let mut big = Map::default();
        for i in 0..=MAX_EDGES {
            let mut e = edge(1, "host-a");
            e.key.port = (i % 65_535) as u16;
            e.key.src = format!("n{i}");
            big.edges.push(e);
        }
        let err = ingest(&s, "host-a", big, 2).await.unwrap_err();
        assert!(err.to_string().contains("host-a"), "{err}");
        let m = fleet_map(&s).await.unwrap();
        assert_eq!(m.edges.len(), 1);
        assert_eq!(m.edges[0].stats.connections, 1);
    }

    /// A handshake-mode refusal as each end's map has it (the source saw only host-b's
    /// address) is one denied edge of the fleet map, with both reporters.
    #[tokio::test]
    async fn a_refusal_seen_by_both_ends_is_one_denied_edge_of_the_fleet_map() {
        use tessera_proxy::code::Code;
        let d = tempfile::tempdir().unwrap();
        let s = Embedded::open(&d.path().join("c.redb")).unwrap();
        let who = |name: &str, workload: Option<&str>, enforcer: &str| Node {
            name: name.into(),
            workload: workload.map(Into::into),
            enforcer: Some(enforcer.into()),
            ..Default::default()
        };
        let refusal = |dst: &str, code: Code, reporter: &str| {
            let mut e = edge(1, reporter);
            e.key.dst = dst.into();
            e.key.port = 9000;
            e.key.verdict = "denied".into();
            e.stats.codes = BTreeSet::from([code]);
            e.stats.rules.clear();
            e
        };
        let via = "10.77.0.2 (via host-b)";
        let a = Map {
            nodes: vec![
                who("web@host-a", Some("web"), "host-a"),
                who(via, None, "host-b"),
            ],
            edges: vec![refusal(via, Code::PeerRefused, "host-a")],
        };
        let b = Map {
            nodes: vec![
                who("web@host-a", Some("web"), "host-a"),
                who("api@host-b", Some("api"), "host-b"),
            ],
            edges: vec![refusal("api@host-b", Code::Policy, "host-b")],
        };
        ingest(&s, "host-a", a, 1).await.unwrap();
        ingest(&s, "host-b", b, 2).await.unwrap();
        let m = fleet_map(&s).await.unwrap();
        assert_eq!(m.edges.len(), 1, "{m:#?}");
        let e = &m.edges[0];
        assert_eq!(
            (e.key.src.as_str(), e.key.dst.as_str()),
            ("web@host-a", "api@host-b")
        );
        assert_eq!(
            e.reporters,
            BTreeSet::from(["host-a".to_string(), "host-b".to_string()])
        );
        assert_eq!(
            e.stats.codes,
            BTreeSet::from([Code::Policy, Code::PeerRefused])
        );
        assert!(m.nodes.iter().all(|n| n.name != via), "{m:#?}");
    }

    /// The cached JSON is the map's, is reused while no report changes (the same bytes,
    /// not made again) and follows each new report, also one that only re-sends a map.
    #[tokio::test]
    async fn the_served_map_is_made_again_only_when_a_report_changed() {
        let d = tempfile::tempdir().unwrap();
        let s = Embedded::open(&d.path().join("s.redb")).unwrap();
        let cache = MapCache::default();
        let one = Map {
            edges: vec![edge(3, "host-a")],
            ..Default::default()
        };
        ingest(&s, "host-a", one.clone(), 1_000).await.unwrap();
        let first = cache.json(&s).await.unwrap();
        let as_map: Map = serde_json::from_slice(&first).unwrap();
        assert_eq!(as_map, fleet_map(&s).await.unwrap());
        let again = cache.json(&s).await.unwrap();
        assert_eq!(
            first.as_ptr(),
            again.as_ptr(),
            "no report changed: the same bytes"
        );
        ingest(&s, "host-b", one.clone(), 2_000).await.unwrap();
        let second = cache.json(&s).await.unwrap();
        assert_ne!(first.as_ptr(), second.as_ptr());
        let as_map: Map = serde_json::from_slice(&second).unwrap();
        assert_eq!(as_map, fleet_map(&s).await.unwrap());
        assert_eq!(as_map.edges[0].reporters.len(), 2);
        // host-a reports more connections on the same edge.
        let more = Map {
            edges: vec![edge(7, "host-a")],
            ..Default::default()
        };
        ingest(&s, "host-a", more, 3_000).await.unwrap();
        let third: Map = serde_json::from_slice(&cache.json(&s).await.unwrap()).unwrap();
        assert_eq!(third, fleet_map(&s).await.unwrap());
        assert_eq!(third.edges[0].stats.connections, 7);
    }
}
