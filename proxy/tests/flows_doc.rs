//! Keeps `docs/flows.md` true: every field a flow record, an endpoint, a map, a node or an
//! edge serializes is listed in its table there, and every field listed there is one they
//! serialize; every refusal code and every value of the enums records carry is documented.
//!
//! The values below are built with exhaustive struct literals (no `..Default::default()`)
//! and every optional field set: a new field does not compile here until it is given a
//! value, and then fails this test until `docs/flows.md` documents it.
use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use tessera_proxy::{
    code::Code,
    flow::{Direction, Endpoint, FlowRecord, Mode, Protocol, Verdict},
    map::{Edge, EdgeKey, EdgeStats, Map, Node},
};

const DOC: &str = include_str!("../../docs/flows.md");

/// The names in the first column (`` | `name` | ``) of the table under the heading
/// `## title` (or `### title`), up to the next heading.
fn documented(title: &str) -> BTreeSet<String> {
    let mut lines = DOC.lines();
    lines
        .find(|l| l.trim_start_matches('#').trim() == title && l.starts_with("##"))
        .unwrap_or_else(|| panic!("docs/flows.md has no section {title:?}"));
    let fields: BTreeSet<String> = lines
        .take_while(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("| `"))
        .map(|l| l.split('`').next().unwrap().to_owned())
        .collect();
    assert!(!fields.is_empty(), "section {title:?} lists no fields");
    fields
}

/// The keys of a JSON object.
fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn assert_same(title: &str, json: &Value) {
    let (doc, made) = (documented(title), keys(json));
    let missing: Vec<_> = made.difference(&doc).collect();
    let stale: Vec<_> = doc.difference(&made).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/flows.md, section {title:?}: undocumented fields {missing:?}; documented but \
         never serialized {stale:?}"
    );
}

fn endpoint(addr: &str) -> Endpoint {
    Endpoint {
        addr: addr.parse().unwrap(),
        workload: Some("web".into()),
        enforcer: Some("host-a".into()),
        pid: Some(4242),
        uid: Some(1000),
        spiffe: Some("spiffe://tessera.local/enforcer/host-a/workload/web".into()),
        dns_name: Some("db.example".into()),
        labels: BTreeMap::from([("app".into(), "web".into())]),
        prefix: Some("203.0.113.0/24".into()),
    }
}

fn record() -> FlowRecord {
    FlowRecord {
        start_ms: 1_700_000_000_000,
        duration_ms: 12,
        reporter: "host-a".into(),
        direction: Direction::Outbound,
        src: endpoint("10.77.0.1:40000"),
        dst: endpoint("10.77.0.2:8080"),
        protocol: Protocol::Udp,
        mode: Mode::Handshake,
        verdict: Verdict::Denied,
        reason: "ingress: no rule allows it".into(),
        code: Code::Policy,
        rule: Some("web-api".into()),
        bytes_sent: 1,
        bytes_received: 2,
        pooled: Some(true),
        count: Some(3),
        packets: Some(4),
    }
}

fn map() -> Map {
    Map {
        nodes: vec![Node {
            name: "web@host-a".into(),
            spiffe: Some("spiffe://tessera.local/enforcer/host-a/workload/web".into()),
            workload: Some("web".into()),
            enforcer: Some("host-a".into()),
            labels: BTreeMap::from([("app".into(), "web".into())]),
        }],
        edges: vec![Edge {
            key: EdgeKey {
                src: "web@host-a".into(),
                dst: "api@host-b".into(),
                port: 53,
                protocol: Protocol::Udp,
                verdict: "denied".into(),
            },
            stats: EdgeStats {
                connections: 1,
                bytes_sent: 2,
                bytes_received: 3,
                first_seen_ms: 4,
                last_seen_ms: 5,
                rules: BTreeSet::from(["web-api".into()]),
                codes: BTreeSet::from([Code::Policy]),
                reason: "ingress: no rule allows it".into(),
            },
            reporters: BTreeSet::from(["host-a".into()]),
            new: true,
        }],
    }
}

#[test]
fn every_field_of_a_flow_record_and_its_endpoints_is_documented_and_nothing_else() {
    let json = serde_json::to_value(record()).unwrap();
    assert_same("Flow record", &json);
    assert_same("Endpoint", &json["src"]);
    assert_same("Endpoint", &json["dst"]);
}

#[test]
fn every_field_of_a_map_its_nodes_and_edges_is_documented_and_nothing_else() {
    let json = serde_json::to_value(map()).unwrap();
    assert_same("Map", &json);
    assert_same("Node", &json["nodes"][0]);
    assert_same("Edge", &json["edges"][0]);
}

#[test]
fn every_code_is_documented_and_nothing_else() {
    let made: BTreeSet<String> = Code::ALL
        .iter()
        .filter(|c| !c.is_clean())
        .map(|c| c.as_str().to_owned())
        .collect();
    let doc = documented("Codes");
    assert_eq!(
        made,
        doc,
        "docs/flows.md, section \"Codes\": undocumented {:?}, stale {:?}",
        made.difference(&doc).collect::<Vec<_>>(),
        doc.difference(&made).collect::<Vec<_>>()
    );
}

#[test]
fn every_value_of_the_records_enums_is_documented() {
    // Exhaustive matches: a new variant does not compile until it is listed here.
    let verdicts = [
        Verdict::Allowed,
        Verdict::Denied,
        Verdict::ObservedDeny,
        Verdict::Error,
    ];
    let _ = |v: Verdict| match v {
        Verdict::Allowed | Verdict::Denied | Verdict::ObservedDeny | Verdict::Error => (),
    };
    let directions = [Direction::Outbound, Direction::Inbound, Direction::Direct];
    let _ = |d: Direction| match d {
        Direction::Outbound | Direction::Inbound | Direction::Direct => (),
    };
    let modes = [Mode::Tunnel, Mode::Handshake];
    let _ = |m: Mode| match m {
        Mode::Tunnel | Mode::Handshake => (),
    };
    let protocols = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp, Protocol::Raw];
    let _ = |p: Protocol| match p {
        Protocol::Tcp | Protocol::Udp | Protocol::Icmp | Protocol::Raw => (),
    };
    let values: Vec<Value> = verdicts
        .iter()
        .map(|v| serde_json::to_value(v).unwrap())
        .chain(directions.iter().map(|v| serde_json::to_value(v).unwrap()))
        .chain(modes.iter().map(|v| serde_json::to_value(v).unwrap()))
        .chain(protocols.iter().map(|v| serde_json::to_value(v).unwrap()))
        .collect();
    for v in values {
        let v = v.as_str().unwrap();
        assert!(
            DOC.contains(&format!("`{v}`")),
            "docs/flows.md does not document the value `{v}`"
        );
    }
}
