//! The connectivity map: flow records aggregated into edges keyed by identity, not address.
//!
//! Each enforcer aggregates what it saw ([`Aggregate`]); maps of several enforcers merge
//! ([`merge`]): both ends of a connection report it, so an edge's counts are the largest any
//! one reporter gives, not their sum.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::{
    code::Code,
    flow::{Endpoint, FlowRecord, Protocol, Verdict},
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy)]
pub enum Role {
    Source,
    Destination,
}

/// A node's name on the map: `workload@enforcer`, or an address without an identity.
pub fn node_name(e: &Endpoint, role: Role) -> String {
    match (&e.workload, &e.enforcer, role) {
        (Some(w), Some(enf), _) => format!("{w}@{enf}"),
        (Some(w), None, _) => w.clone(),
        // No workload behind it: a peer nobody vouched for, or a destination without an enforcer.
        (None, _, Role::Source) => match (&e.prefix, &e.dns_name) {
            // A summary of refusals from a whole prefix (tessera_proxy::refusals).
            (Some(prefix), _) => format!("{prefix} (unauthenticated)"),
            (None, Some(name)) => format!("{name} {} (unauthenticated)", e.addr.ip()),
            (None, None) => format!("{} (unauthenticated)", e.addr.ip()),
        },
        (None, Some(enf), Role::Destination) => format!("{} (via {enf})", e.addr.ip()),
        (None, None, Role::Destination) => match &e.dns_name {
            Some(name) => format!("{name} {} (external)", e.addr.ip()),
            None => format!("{} (external)", e.addr.ip()),
        },
    }
}

/// The names of a record's source and destination nodes.
pub fn node_names(r: &FlowRecord) -> [String; 2] {
    [
        node_name(&r.src, Role::Source),
        node_name(&r.dst, Role::Destination),
    ]
}

pub fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allowed => "allowed",
        Verdict::Denied => "denied",
        Verdict::ObservedDeny => "observed-would-deny",
        Verdict::Error => "error",
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EdgeKey {
    pub src: String,
    pub dst: String,
    pub port: u16,
    /// `tcp` (connections; left out of the JSON, as in maps stored before the field
    /// existed), `udp` or `icmp` (packets over an interval), `raw` (refused raw sockets).
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
    pub verdict: String,
}

impl EdgeKey {
    /// The port as people write it: `7000` for TCP, `53/udp`, `icmp` (no port).
    pub fn port_label(&self) -> String {
        match self.protocol {
            Protocol::Tcp => self.port.to_string(),
            Protocol::Icmp | Protocol::Raw => self.protocol.as_str().to_string(),
            Protocol::Udp => format!("{}/udp", self.port),
        }
    }
}

/// What one reporter saw on one edge.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeStats {
    pub connections: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// Rules that decided.
    pub rules: BTreeSet<String>,
    /// Refusal codes seen (`policy`, `replay`, ...).
    pub codes: BTreeSet<Code>,
    /// The latest refusal reason.
    pub reason: String,
}

/// A map node: what is known of one identity (or address).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub spiffe: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub enforcer: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub labels: BTreeMap<String, String>,
}

/// One edge of a (merged) map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    #[serde(flatten)]
    pub key: EdgeKey,
    #[serde(flatten)]
    pub stats: EdgeStats,
    pub reporters: BTreeSet<String>,
    /// First seen after the baseline window ([`mark_new`]): a connection nobody made while
    /// the baseline was taken.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub new: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Map {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

/// One reporter's aggregate.
#[derive(Default)]
pub struct Aggregate {
    pub edges: HashMap<EdgeKey, EdgeStats>,
    pub nodes: HashMap<String, Node>,
    /// Whether the last record added made a new edge.
    pub last_was_new: bool,
}

impl Aggregate {
    /// Adds a record; returns the edge key and the node names it touched.
    pub fn add(&mut self, r: &FlowRecord) -> (EdgeKey, [String; 2]) {
        self.add_named(r, node_names(r))
    }

    /// [`Aggregate::add`] with the record's node names already made (see [`node_names`]).
    pub fn add_named(&mut self, r: &FlowRecord, names: [String; 2]) -> (EdgeKey, [String; 2]) {
        self.add_keyed(r, names, r.dst.addr.port())
    }

    /// [`Aggregate::add_named`] on the edge of destination port `port` (the flow store
    /// folds the ports of unauthenticated sources past its bound into 0).
    pub fn add_keyed(
        &mut self,
        r: &FlowRecord,
        [src, dst]: [String; 2],
        port: u16,
    ) -> (EdgeKey, [String; 2]) {
        for (name, e) in [(&src, &r.src), (&dst, &r.dst)] {
            let node = self.nodes.entry(name.clone()).or_insert_with(|| Node {
                name: name.clone(),
                ..Node::default()
            });
            // Later records may know more (a verified token); keep what is known.
            for (have, seen) in [
                (&mut node.spiffe, &e.spiffe),
                (&mut node.workload, &e.workload),
                (&mut node.enforcer, &e.enforcer),
            ] {
                if have.is_none() && seen.is_some() {
                    have.clone_from(seen);
                }
            }
            if !e.labels.is_empty() {
                // Per-process labels differ between connections; keep the common ones
                // (the workload's) once several processes were seen.
                if node.labels.is_empty() {
                    node.labels = e.labels.clone();
                } else {
                    node.labels.retain(|k, v| e.labels.get(k) == Some(v));
                }
            }
        }
        let key = EdgeKey {
            src: src.clone(),
            dst: dst.clone(),
            port,
            protocol: r.protocol,
            verdict: verdict_name(r.verdict).into(),
        };
        self.last_was_new = !self.edges.contains_key(&key);
        let s = self.edges.entry(key.clone()).or_default();
        let end = r.start_ms + r.duration_ms;
        if s.connections == 0 || r.start_ms < s.first_seen_ms {
            s.first_seen_ms = r.start_ms;
        }
        s.last_seen_ms = s.last_seen_ms.max(end);
        s.connections += r.attempts();
        s.bytes_sent += r.bytes_sent;
        s.bytes_received += r.bytes_received;
        s.rules.extend(r.rule.clone());
        if !r.code.is_clean() {
            s.codes.insert(r.code);
        }
        if !r.reason.is_empty() {
            s.reason = r.reason.clone();
        }
        (key, [src, dst])
    }

    /// This reporter's map.
    pub fn map(&self, reporter: &str) -> Map {
        let mut edges: Vec<Edge> = self
            .edges
            .iter()
            .map(|(k, s)| Edge {
                key: k.clone(),
                stats: s.clone(),
                reporters: BTreeSet::from([reporter.to_owned()]),
                new: false,
            })
            .collect();
        edges.sort_by(|a, b| a.key.cmp(&b.key));
        let mut nodes: Vec<Node> = self.nodes.values().cloned().collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Map { nodes, edges }
    }
}

/// Merges the maps of several enforcers into one.
pub fn merge(maps: impl IntoIterator<Item = Map>) -> Map {
    let mut edges: BTreeMap<EdgeKey, Edge> = BTreeMap::new();
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for m in maps {
        for n in m.nodes {
            let e = nodes.entry(n.name.clone()).or_insert_with(|| n.clone());
            e.spiffe = e.spiffe.take().or(n.spiffe);
            e.workload = e.workload.take().or(n.workload);
            e.enforcer = e.enforcer.take().or(n.enforcer);
            if e.labels.is_empty() {
                e.labels = n.labels;
            }
        }
        for edge in m.edges {
            match edges.get_mut(&edge.key) {
                None => {
                    edges.insert(edge.key.clone(), edge);
                }
                Some(e) => {
                    let (a, b) = (&mut e.stats, &edge.stats);
                    // Both ends count the same connections: the larger view wins.
                    a.connections = a.connections.max(b.connections);
                    a.bytes_sent = a.bytes_sent.max(b.bytes_sent);
                    a.bytes_received = a.bytes_received.max(b.bytes_received);
                    a.first_seen_ms = a.first_seen_ms.min(b.first_seen_ms);
                    a.last_seen_ms = a.last_seen_ms.max(b.last_seen_ms);
                    a.rules.extend(b.rules.iter().cloned());
                    a.codes.extend(b.codes.iter().cloned());
                    if a.reason.is_empty() {
                        a.reason = b.reason.clone();
                    }
                    e.reporters.extend(edge.reporters);
                }
            }
        }
    }
    Map {
        nodes: nodes.into_values().collect(),
        edges: edges.into_values().collect(),
    }
}

/// Marks the edges first seen more than `window_ms` after the map's earliest edge was: what
/// appeared after a baseline of that long. How many.
pub fn mark_new(map: &mut Map, window_ms: u64) -> usize {
    let Some(start) = map.edges.iter().map(|e| e.stats.first_seen_ms).min() else {
        return 0;
    };
    let end = start.saturating_add(window_ms);
    let mut n = 0;
    for e in &mut map.edges {
        e.new = e.stats.first_seen_ms > end;
        n += usize::from(e.new);
    }
    n
}

/// The map of a set of records (from flow log files), grouped by reporter and merged.
pub fn from_records(records: &[FlowRecord]) -> Map {
    let mut by_reporter: BTreeMap<&str, Aggregate> = BTreeMap::new();
    for r in records {
        by_reporter.entry(&r.reporter).or_default().add(r);
    }
    merge(by_reporter.into_iter().map(|(name, a)| a.map(name)))
}

/// Graphviz form of a map: nodes are identities, edges coloured by verdict.
pub fn dot(map: &Map) -> String {
    let mut out = String::from("digraph tessera {\n  rankdir=LR;\n  node [shape=box];\n");
    for n in &map.nodes {
        out += &format!("  {:?};\n", n.name);
    }
    for e in &map.edges {
        let colour = match e.key.verdict.as_str() {
            "allowed" => "darkgreen",
            "denied" => "red",
            "observed-would-deny" => "orange",
            _ => "grey",
        };
        out += &format!(
            "  {:?} -> {:?} [label=\"{}: {} conns\", color={colour}];\n",
            e.key.src,
            e.key.dst,
            e.key.port_label(),
            e.stats.connections
        );
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_first_seen_after_the_baseline_window_are_new() {
        let edge = |src: &str, first: u64| Edge {
            key: EdgeKey {
                src: src.into(),
                dst: "api@b".into(),
                port: 80,
                protocol: Default::default(),
                verdict: "allowed".into(),
            },
            stats: EdgeStats {
                first_seen_ms: first,
                last_seen_ms: first + 5,
                connections: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut m = Map {
            nodes: vec![],
            edges: vec![
                edge("web@a", 1_000),
                edge("old@a", 60_000),
                edge("late@a", 61_001),
            ],
        };
        assert_eq!(mark_new(&mut m, 60_000), 1);
        assert_eq!(
            m.edges
                .iter()
                .filter(|e| e.new)
                .map(|e| e.key.src.as_str())
                .collect::<Vec<_>>(),
            ["late@a"]
        );
        // Serialised only when set.
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json.matches("\"new\":true").count(), 1);
        assert_eq!(json.matches("\"new\"").count(), 1);
        assert_eq!(mark_new(&mut Map::default(), 0), 0);
    }
}
