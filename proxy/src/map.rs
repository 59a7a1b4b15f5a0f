//! The connectivity map: flow records aggregated into edges keyed by identity, not address.
//!
//! Each enforcer aggregates what it saw ([`Aggregate`]); maps of several enforcers merge
//! ([`merge`]): both ends of a connection report it, so an edge's counts are the largest any
//! one reporter gives, not their sum; a refusal the source saw only as an address behind
//! the destination's enforcer folds into the destination's identity edge
//! (`fold_refusals_via`). The JSON of every type here is documented in `docs/flows.md`.
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
                // Both ends count the same connections: the larger view wins.
                Some(e) => absorb(e, &edge),
            }
        }
    }
    fold_refusals_via(&mut edges, &mut nodes);
    Map {
        nodes: nodes.into_values().collect(),
        edges: edges.into_values().collect(),
    }
}

/// Folds the merged stats and reporters of `from` into `into` (the same connections seen
/// by both ends: the larger view of each count).
fn absorb(into: &mut Edge, from: &Edge) {
    let (a, b) = (&mut into.stats, &from.stats);
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
    into.reporters.extend(from.reporters.iter().cloned());
}

/// The enforcer `E` of a destination node `ADDR (via E)`: an address behind an enforcer
/// whose workload this reporter did not learn (handshake mode: the destination refused the
/// SYN before sending its identity).
fn via_enforcer<'a>(name: &str, nodes: &'a BTreeMap<String, Node>) -> Option<&'a str> {
    let node = nodes.get(name)?;
    let enforcer = node.enforcer.as_deref()?;
    (node.workload.is_none() && name.ends_with(&format!(" (via {enforcer})"))).then_some(enforcer)
}

/// One refusal is one edge between identities. In handshake mode the destination refuses
/// the SYN before the source learns who is behind the address: the source reports the edge
/// `web@host-a -> 10.0.0.2 (via host-b)` (`peer-refused`), the destination
/// `web@host-a -> api@host-b` with its own reason. When a merged map holds both, the
/// address edge folds into the identity edge, which then has both reporters:
///
/// the identity edge must have the same source, port, protocol and verdict, a destination
/// vouched for by that enforcer, and that enforcer among its reporters; and it must be the
/// only such edge (two workloads of `host-b` refusing `web` on the same port: which one
/// the address was is not known, so both edges stay). The address node goes when no edge
/// is left on it.
fn fold_refusals_via(edges: &mut BTreeMap<EdgeKey, Edge>, nodes: &mut BTreeMap<String, Node>) {
    let mut folds = Vec::new();
    for (key, edge) in edges.iter() {
        let Some(enforcer) = via_enforcer(&key.dst, nodes) else {
            continue;
        };
        if edge.reporters.contains(enforcer) {
            continue;
        }
        let mut matches = edges.iter().filter(|(k, e)| {
            k.src == key.src
                && k.port == key.port
                && k.protocol == key.protocol
                && k.verdict == key.verdict
                && e.reporters.contains(enforcer)
                && nodes.get(&k.dst).is_some_and(|n| {
                    n.workload.is_some() && n.enforcer.as_deref() == Some(enforcer)
                })
        });
        if let (Some((target, _)), None) = (matches.next(), matches.next()) {
            folds.push((key.clone(), target.clone()));
        }
    }
    for (from, into) in folds {
        let Some(from_edge) = edges.remove(&from) else {
            continue;
        };
        if let Some(target) = edges.get_mut(&into) {
            absorb(target, &from_edge);
        }
        if !edges.keys().any(|k| k.src == from.dst || k.dst == from.dst) {
            nodes.remove(&from.dst);
        }
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
    use std::net::SocketAddr;

    use super::*;
    use crate::flow::{Direction, Mode};

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

    /// What each end of a handshake-mode refusal writes: the source (host-a) saw a reset
    /// from host-b's address; the destination (host-b) refused `web@host-a` by policy.
    fn refusal_at_both_ends(dst_workload: &str, dst_ip: &str, port: u16) -> [FlowRecord; 2] {
        let src = || Endpoint {
            workload: Some("web".into()),
            enforcer: Some("host-a".into()),
            ..Endpoint::addr("10.77.0.1:40000".parse().unwrap())
        };
        let to: SocketAddr = format!("{dst_ip}:{port}").parse().unwrap();
        let mut at_a = FlowRecord::new(
            "host-a",
            Mode::Handshake,
            Direction::Outbound,
            src(),
            Endpoint {
                enforcer: Some("host-b".into()),
                ..Endpoint::addr(to)
            },
            1_000,
        );
        at_a.refuse(
            Code::PeerRefused,
            format!("{to} refused the connection (reset)"),
        );
        let mut at_b = FlowRecord::new(
            "host-b",
            Mode::Handshake,
            Direction::Inbound,
            src(),
            Endpoint {
                workload: Some(dst_workload.into()),
                enforcer: Some("host-b".into()),
                ..Endpoint::addr(to)
            },
            1_001,
        );
        at_b.refuse(Code::Policy, "ingress: no rule allows it".into());
        [at_a, at_b]
    }

    fn denied(m: &Map) -> Vec<&Edge> {
        m.edges
            .iter()
            .filter(|e| e.key.verdict == "denied")
            .collect()
    }

    #[test]
    fn a_refusal_seen_as_an_address_at_the_source_folds_into_the_identity_edge() {
        let [a, b] = refusal_at_both_ends("api", "10.77.0.2", 9000);
        // Each end alone: its own view.
        assert_eq!(
            denied(&from_records(std::slice::from_ref(&a)))[0].key.dst,
            "10.77.0.2 (via host-b)"
        );
        // Both (in either order of the maps): one denied edge between identities.
        for records in [[a.clone(), b.clone()], [b.clone(), a.clone()]] {
            let m = from_records(&records);
            let d = denied(&m);
            assert_eq!(d.len(), 1, "{m:#?}");
            let e = d[0];
            assert_eq!(
                (e.key.src.as_str(), e.key.dst.as_str()),
                ("web@host-a", "api@host-b")
            );
            assert_eq!(e.key.port, 9000);
            assert_eq!(
                e.reporters,
                BTreeSet::from(["host-a".into(), "host-b".into()])
            );
            assert_eq!(
                e.stats.codes,
                BTreeSet::from([Code::Policy, Code::PeerRefused])
            );
            assert_eq!(e.stats.connections, 1, "one refusal, counted once");
            assert_eq!(
                e.stats.reason, "ingress: no rule allows it",
                "the decider's reason"
            );
            assert!(
                m.nodes.iter().all(|n| !n.name.contains("(via")),
                "the address node went with its edge: {m:#?}"
            );
        }
    }

    #[test]
    fn an_address_edge_stays_when_the_identity_edge_is_not_the_only_candidate() {
        let [a, b] = refusal_at_both_ends("api", "10.77.0.2", 9000);
        // host-b refused web on 9000 at two workloads: which one was 10.77.0.2 is not known.
        let [_, other] = refusal_at_both_ends("db", "10.77.0.3", 9000);
        let m = from_records(&[a.clone(), b.clone(), other]);
        assert_eq!(denied(&m).len(), 3, "{m:#?}");
        assert!(
            m.edges
                .iter()
                .any(|e| e.key.dst == "10.77.0.2 (via host-b)")
        );
        // Another port, another verdict or another source: not the same refusal.
        let [a2, mut b2] = refusal_at_both_ends("api", "10.77.0.2", 9000);
        b2.dst.addr.set_port(8080);
        let mut a3 = a2.clone();
        a3.verdict = Verdict::Error;
        let mut b3 = b.clone();
        b3.src.workload = Some("cron".into());
        for pair in [[a2, b2], [a3, b.clone()], [a.clone(), b3]] {
            let m = from_records(&pair);
            assert_eq!(m.edges.len(), 2, "{m:#?}");
        }
        // The address edge reported by host-b itself is not a source's view: left alone.
        let [mut a4, b4] = refusal_at_both_ends("api", "10.77.0.2", 9000);
        a4.reporter = "host-b".into();
        assert_eq!(from_records(&[a4, b4]).edges.len(), 2);
    }
}
