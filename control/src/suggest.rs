//! `tessera policy suggest`: a least-privilege allow policy written from what the fleet's
//! map saw (issue 14, item 3: baselining in the product itself).
//!
//! Each edge that was allowed or would have been denied (observe mode) becomes part of one
//! allow rule per (source group, destination group): a group is a workload's values of the
//! chosen label keys (`--group-by`, e.g. `app`), so `web@host-a` and `web@host-c` fall
//! under one `app=web` rule; its ports are every port seen between the groups. An address
//! without an identity becomes a `cidr:` (a `dns:` name where the map knows it). Each rule is
//! commented with its evidence: connections, first and last seen, who reported them. Edges
//! refused outright are left out: the policy in force already decided them. The text is
//! checked with the policy parser before it is returned, and every edge it came from is
//! allowed by it (tested).
//!
//! Edges carry their protocol: UDP and ICMP edges become `protocol: udp` / `protocol: icmp`
//! rules (ICMP without ports), checked against the policy in force as eBPF enforces them
//! (the rules' addresses and labels, [`tessera_policy::CompiledPolicy::nontcp_allows`]).
//! Refused raw sockets are left out (no policy allows them). A review before
//! `tessera policy apply` is expected.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write,
    net::IpAddr,
};

use tessera_proxy::{
    flow::Protocol,
    map::{Edge, Map, Node},
};

/// How to group and which edges to take.
#[derive(Clone)]
pub struct Options {
    /// Label keys whose values name a group (a workload with none of them is named by all
    /// its declared labels).
    pub group_by: Vec<String>,
    /// Only edges last seen at or after this time (Unix ms).
    pub since_ms: u64,
    /// The policy in force, to say of each rule whether it would change anything (the
    /// diff): which of its edges that policy does not allow.
    pub in_force: Option<std::sync::Arc<tessera_policy::CompiledPolicy>>,
}

/// A suggested policy.
#[derive(Clone, Debug)]
pub struct Suggestion {
    /// The policy file's text.
    pub text: String,
    pub rules: usize,
    /// Edges used.
    pub edges: usize,
    /// Edges left out, each with why.
    pub skipped: Vec<String>,
}

/// One side of a rule, as it will be written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Labels(Vec<String>),
    Cidr(String),
    Dns(String),
}

impl Side {
    fn yaml(&self) -> String {
        match self {
            Side::Labels(l) => format!(
                "[{{labels: [{}]}}]",
                l.iter()
                    .map(|e| format!("\"{e}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Side::Cidr(c) => format!("[{{cidr: \"{c}\"}}]"),
            Side::Dns(d) => format!("[{{dns: \"{d}\"}}]"),
        }
    }

    fn name(&self) -> String {
        let raw = match self {
            Side::Labels(l) => l
                .iter()
                .map(|e| e.split_once('=').map_or(e.as_str(), |(_, v)| v))
                .collect::<Vec<_>>()
                .join("-"),
            Side::Cidr(c) => c.replace(['/', '.', ':'], "-"),
            Side::Dns(d) => d.replace('.', "-"),
        };
        raw.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect()
    }
}

#[derive(Default)]
struct Evidence {
    ports: BTreeSet<u16>,
    connections: u64,
    first_ms: u64,
    last_ms: u64,
    reporters: BTreeSet<String>,
    observed: bool,
    edges: usize,
    /// Edges the policy in force does not allow, and the rules that allow the others.
    new_edges: usize,
    in_force_rules: BTreeSet<String>,
}

/// The address a node's name starts with (`10.0.0.4 (external)`, `10.0.0.0/24 (...)`), and
/// a DNS name before it if any (`api.example.com 192.0.2.1 (external)`).
fn address_of(name: &str) -> Option<(Option<String>, String)> {
    let words: Vec<&str> = name.split_whitespace().collect();
    for (i, w) in words.iter().enumerate() {
        if let Ok(ip) = w.parse::<IpAddr>() {
            let cidr = format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 });
            let dns = (i > 0).then(|| words[0].to_string());
            return Some((dns, cidr));
        }
        if let Ok(net) = w.parse::<ipnet::IpNet>() {
            return Some((None, net.to_string()));
        }
    }
    None
}

fn side(node: Option<&Node>, name: &str, group_by: &[String]) -> Option<Side> {
    if let Some(n) = node.filter(|n| n.workload.is_some()) {
        let declared: Vec<(&String, &String)> = n
            .labels
            .iter()
            .filter(|(k, _)| !tessera_proxy::identity::reserved::is_reserved(k))
            .collect();
        let grouped: Vec<String> = group_by
            .iter()
            .filter_map(|k| n.labels.get(k).map(|v| format!("{k}={v}")))
            .collect();
        if !grouped.is_empty() {
            return Some(Side::Labels(grouped));
        }
        if !declared.is_empty() {
            return Some(Side::Labels(
                declared.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            ));
        }
        return None;
    }
    let (dns, cidr) = address_of(name)?;
    Some(match dns {
        Some(d) => Side::Dns(d),
        None => Side::Cidr(cidr),
    })
}

fn rfc3339(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// The rule of `policy` that allows the edge `key`, if it does (`dns:` names are taken to
/// resolve to the address the map names them with).
fn allowed_by(
    policy: &tessera_policy::CompiledPolicy,
    nodes: &BTreeMap<&str, &Node>,
    key: &tessera_proxy::map::EdgeKey,
) -> Option<String> {
    let labels = |name: &str| {
        nodes
            .get(name)
            .filter(|n| n.workload.is_some())
            .map(|n| tessera_policy::Labels::new(n.labels.clone()))
    };
    let addr = |name: &str| -> Option<IpAddr> {
        address_of(name).and_then(|(_, c)| c.split('/').next()?.parse().ok())
    };
    let (ls, ld) = (labels(&key.src), labels(&key.dst));
    if !key.protocol.is_tcp() {
        return nontcp_allowed_by(
            policy,
            key,
            [ls.as_ref(), ld.as_ref()],
            [addr(&key.src), addr(&key.dst)],
        );
    }
    let dns: Option<String> = address_of(&key.dst).and_then(|(d, _)| d);
    let d = policy.decide(
        &tessera_policy::Subject {
            labels: ls.as_ref(),
            addr: addr(&key.src),
        },
        &tessera_policy::Subject {
            labels: ld.as_ref(),
            addr: addr(&key.dst),
        },
        key.port,
        &|name, _| dns.as_deref() == Some(name),
    );
    (d.verdict == tessera_policy::Verdict::Allow)
        .then(|| d.rule.map(|r| r.to_string()).unwrap_or_default())
}

/// [`allowed_by`] for a UDP or ICMP edge, as eBPF enforces it: a rule of that protocol
/// selecting one side by its labels and naming the other (labels, or an address in a
/// `cidr:`), on the edge's port (ICMP: any). Either end may hold the workload.
fn nontcp_allowed_by(
    policy: &tessera_policy::CompiledPolicy,
    key: &tessera_proxy::map::EdgeKey,
    [ls, ld]: [Option<&tessera_policy::Labels>; 2],
    [as_, ad]: [Option<IpAddr>; 2],
) -> Option<String> {
    let want = match key.protocol {
        Protocol::Udp => tessera_policy::parse::Protocol::Udp,
        Protocol::Icmp => tessera_policy::parse::Protocol::Icmp,
        Protocol::Tcp | Protocol::Raw => return None,
    };
    let names = |peers: &[tessera_policy::parse::Peer],
                 labels: Option<&tessera_policy::Labels>,
                 addr: Option<IpAddr>| {
        peers.iter().any(|p| match p {
            tessera_policy::parse::Peer::Labels(sel) => labels.is_some_and(|l| sel.matches(l)),
            tessera_policy::parse::Peer::Cidr(net) => addr.is_some_and(|a| net.contains(&a)),
            tessera_policy::parse::Peer::Dns(_) => false,
        })
    };
    let port_ok = |ports: &[(u16, u16)]| {
        want == tessera_policy::parse::Protocol::Icmp
            || ports.is_empty()
            || ports.iter().any(|&(lo, hi)| (lo..=hi).contains(&key.port))
    };
    // From the source workload's rules (sending), else the destination's (receiving).
    let sides = [(ls, false, ld, ad), (ld, true, ls, as_)];
    for (own, inbound, other_labels, other_addr) in sides {
        let Some(own) = own else { continue };
        if let Some(a) = policy.nontcp_allows(own).into_iter().find(|a| {
            a.protocol == want
                && a.inbound == inbound
                && a.mode == tessera_policy::parse::Mode::Enforce
                && port_ok(&a.ports)
                && names(&a.peers, other_labels, other_addr)
        }) {
            return Some(a.rule.to_string());
        }
    }
    None
}

/// The allow policy that covers the map's allowed and would-deny edges.
pub fn suggest(map: &Map, o: &Options) -> Suggestion {
    let nodes: BTreeMap<&str, &Node> = map.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut groups: BTreeMap<(Protocol, Side, Side), Evidence> = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut used = 0;
    for Edge {
        key,
        stats,
        reporters,
        ..
    } in &map.edges
    {
        if key.verdict != "allowed" && key.verdict != "observed-would-deny" {
            continue;
        }
        if key.protocol == Protocol::Raw {
            skipped.push(format!(
                "{} -> {}: a raw socket, which no policy allows",
                key.src, key.dst
            ));
            continue;
        }
        if stats.last_seen_ms < o.since_ms {
            continue;
        }
        let (Some(from), Some(to)) = (
            side(nodes.get(key.src.as_str()).copied(), &key.src, &o.group_by),
            side(nodes.get(key.dst.as_str()).copied(), &key.dst, &o.group_by),
        ) else {
            skipped.push(format!(
                "{} -> {} port {}: no labels or address to name a side by",
                key.src, key.dst, key.port
            ));
            continue;
        };
        used += 1;
        let e = groups
            .entry((key.protocol, from, to))
            .or_insert_with(|| Evidence {
                first_ms: u64::MAX,
                ..Default::default()
            });
        e.ports.insert(key.port);
        e.connections += stats.connections;
        e.first_ms = e.first_ms.min(stats.first_seen_ms);
        e.last_ms = e.last_ms.max(stats.last_seen_ms);
        e.reporters.extend(reporters.iter().cloned());
        e.observed |= key.verdict == "observed-would-deny";
        e.edges += 1;
        if let Some(p) = &o.in_force {
            match allowed_by(p, &nodes, key) {
                Some(rule) => {
                    e.in_force_rules.insert(rule);
                }
                None => e.new_edges += 1,
            }
        }
    }
    let mut text = format!(
        "# Suggested by `tessera policy suggest` from the fleet's map: {used} edges in {} rules,\n\
         # grouped by {}. Every rule allows what was seen (allowed, or denied only in observe\n\
         # mode); anything else stays denied. Review before `tessera policy apply`.\n",
        groups.len(),
        if o.group_by.is_empty() {
            "declared labels".to_string()
        } else {
            o.group_by.join(", ")
        }
    );
    if groups.is_empty() {
        text.push_str("rules: []\n");
    } else {
        text.push_str("rules:\n");
    }
    let mut names = BTreeSet::new();
    for ((protocol, from, to), e) in &groups {
        let base = match protocol {
            Protocol::Tcp => format!("{}-to-{}", from.name(), to.name()),
            p => format!("{}-to-{}-{}", from.name(), to.name(), p.as_str()),
        };
        let mut name = base.clone();
        let mut i = 2;
        while !names.insert(name.clone()) {
            name = format!("{base}-{i}");
            i += 1;
        }
        let _ = writeln!(
            text,
            "  # {} connections over {} edges, first seen {}, last seen {}, reported by {}{}",
            e.connections,
            e.edges,
            rfc3339(e.first_ms),
            rfc3339(e.last_ms),
            e.reporters.iter().cloned().collect::<Vec<_>>().join(", "),
            if e.observed {
                "; some would have been denied (observe mode)"
            } else {
                ""
            }
        );
        if o.in_force.is_some() {
            let _ = writeln!(
                text,
                "  # {}",
                if e.new_edges == 0 {
                    format!(
                        "in force already: allowed by {}",
                        e.in_force_rules
                            .iter()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    format!(
                        "NEW: {} of its {} edges are not allowed by the policy in force",
                        e.new_edges, e.edges
                    )
                }
            );
        }
        let ports: Vec<String> = e.ports.iter().map(u16::to_string).collect();
        let _ = write!(text, "  - name: {name}\n    action: allow\n",);
        if *protocol != Protocol::Tcp {
            let _ = writeln!(text, "    protocol: {}", protocol.as_str());
        }
        let _ = write!(text, "    from: {}\n    to: {}\n", from.yaml(), to.yaml(),);
        if *protocol != Protocol::Icmp {
            let _ = writeln!(text, "    ports: [{}]", ports.join(", "));
        }
    }
    Suggestion {
        rules: groups.len(),
        edges: used,
        skipped,
        text,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tessera_policy::{CompiledPolicy, Labels, Subject, Verdict};
    use tessera_proxy::map::{EdgeKey, EdgeStats};

    use super::*;

    fn node(name: &str, labels: &[(&str, &str)]) -> Node {
        Node {
            name: name.into(),
            workload: name
                .split('@')
                .next()
                .filter(|_| name.contains('@'))
                .map(Into::into),
            enforcer: name.split_once('@').map(|(_, e)| e.into()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn edge(src: &str, dst: &str, port: u16, verdict: &str, n: u64, last: u64) -> Edge {
        Edge {
            key: EdgeKey {
                src: src.into(),
                dst: dst.into(),
                port,
                protocol: Protocol::Tcp,
                verdict: verdict.into(),
            },
            stats: EdgeStats {
                connections: n,
                first_seen_ms: 1_700_000_000_000,
                last_seen_ms: last,
                ..Default::default()
            },
            reporters: BTreeSet::from(["host-a".to_string()]),
            new: false,
        }
    }

    fn fleet() -> Map {
        let t = 1_700_000_100_000;
        Map {
            nodes: vec![
                node("web@host-a", &[("app", "web"), ("tessera.io/uid", "33")]),
                node("web@host-c", &[("app", "web")]),
                node("api@host-b", &[("app", "api"), ("tier", "back")]),
                node("db@host-c", &[("app", "db")]),
                node("batch@host-d", &[("team", "data")]),
            ],
            edges: vec![
                edge("web@host-a", "api@host-b", 8080, "allowed", 7, t),
                edge("web@host-c", "api@host-b", 8080, "allowed", 2, t),
                edge(
                    "web@host-a",
                    "api@host-b",
                    9090,
                    "observed-would-deny",
                    1,
                    t,
                ),
                edge("api@host-b", "db@host-c", 6379, "allowed", 3, t),
                edge("web@host-a", "db@host-c", 6379, "denied", 5, t),
                edge("batch@host-d", "db@host-c", 6379, "allowed", 1, t),
                edge(
                    "web@host-a",
                    "api.example.com 192.0.2.7 (external)",
                    443,
                    "allowed",
                    1,
                    t,
                ),
                edge(
                    "10.0.9.4 (unauthenticated)",
                    "api@host-b",
                    8080,
                    "allowed",
                    1,
                    t,
                ),
                edge("web@host-a", "api@host-b", 7000, "allowed", 1, 5),
            ],
        }
    }

    fn subject<'a>(name: &str, labels: &'a Option<Labels>) -> Subject<'a> {
        Subject {
            labels: labels.as_ref(),
            addr: address_of(name).and_then(|(_, c)| c.split('/').next()?.parse().ok()),
        }
    }

    #[test]
    fn a_suggestion_parses_and_allows_every_edge_it_came_from_and_nothing_refused() {
        let map = fleet();
        let s = suggest(
            &map,
            &Options {
                group_by: vec!["app".into()],
                since_ms: 1_000,
                in_force: None,
            },
        );
        let policy = tessera_policy::parse::parse("suggested.yaml", &s.text)
            .unwrap_or_else(|e| panic!("{e}\n{}", s.text));
        // web (both hosts) -> api on 8080 and 9090: one rule; api -> db; batch -> db (its
        // declared labels: no `app`); web -> a DNS name; an address -> api.
        assert_eq!(s.rules, 5, "{}", s.text);
        assert_eq!(policy.rules.len(), 5);
        assert!(s.text.contains("ports: [8080, 9090]"), "{}", s.text);
        assert!(s.text.contains("9 connections") || s.text.contains("10 connections"));
        assert!(s.text.contains("observe mode"));
        assert!(s.text.contains("dns: \"api.example.com\""), "{}", s.text);
        assert!(s.text.contains("cidr: \"10.0.9.4/32\""), "{}", s.text);
        assert!(s.text.contains("team=data"), "{}", s.text);
        assert!(!s.text.contains("tessera.io/uid"), "{}", s.text);
        // The edge last seen before --since is not there: no port 7000.
        assert!(!s.text.contains("7000"), "{}", s.text);
        let compiled = CompiledPolicy::new(policy);
        let nodes: BTreeMap<&str, &Node> = map.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
        let labels = |name: &str| -> Option<Labels> {
            nodes.get(name).map(|n| Labels::new(n.labels.clone()))
        };
        let resolved = |name: &str, _: IpAddr| name == "api.example.com";
        for e in &map.edges {
            let (ls, ld) = (labels(&e.key.src), labels(&e.key.dst));
            let d = compiled.decide(
                &subject(&e.key.src, &ls),
                &subject(&e.key.dst, &ld),
                e.key.port,
                &resolved,
            );
            let wanted = e.key.verdict != "denied" && e.stats.last_seen_ms >= 1_000;
            assert_eq!(
                d.verdict == Verdict::Allow,
                wanted,
                "{:?} -> {:?}: {d:?}\n{}",
                e.key,
                d,
                s.text
            );
        }
    }

    #[test]
    fn an_empty_map_suggests_an_empty_policy_that_parses() {
        let s = suggest(
            &Map::default(),
            &Options {
                group_by: vec!["app".into()],
                since_ms: 0,
                in_force: None,
            },
        );
        assert_eq!(s.rules, 0);
        assert!(
            tessera_policy::parse::parse("s.yaml", &s.text).is_ok(),
            "{}",
            s.text
        );
    }

    /// The suggestion for [`fleet`] against the policy `in_force` (its text).
    fn against(in_force: &str) -> String {
        let policy = tessera_policy::load("in-force.yaml", in_force).unwrap();
        suggest(
            &fleet(),
            &Options {
                group_by: vec!["app".into()],
                since_ms: 1_000,
                in_force: Some(policy),
            },
        )
        .text
    }

    #[test]
    fn each_rule_says_whether_the_policy_in_force_already_allows_what_it_covers() {
        let s = against(
            "rules:\n  - {name: web-api, action: allow, from: {labels: [app=web]}, to: {labels: [app=api]}, ports: [8080]}\n",
        );
        // web -> api: 8080 allowed by web-api, 9090 (observe) not: NEW.
        assert!(
            s.contains("# NEW: 1 of its 3 edges are not allowed by the policy in force"),
            "{s}"
        );
        // api -> db: nothing in force allows it.
        assert!(s.contains("# NEW: 1 of its 1 edges"), "{s}");
        let s = against(
            "rules:\n  - {name: any, action: allow, from: {labels: []}, to: {labels: []}}\n",
        );
        assert!(s.contains("in force already: allowed by any"), "{s}");
    }

    #[test]
    fn udp_and_icmp_edges_become_rules_of_their_protocol_checked_as_ebpf_checks_them() {
        let t = 1_700_000_100_000;
        let on = |mut e: Edge, p: Protocol| {
            e.key.protocol = p;
            e
        };
        let map = Map {
            nodes: vec![
                node("web@host-a", &[("app", "web")]),
                node("metrics@host-b", &[("app", "metrics")]),
            ],
            edges: vec![
                on(
                    edge("web@host-a", "metrics@host-b", 8125, "allowed", 40, t),
                    Protocol::Udp,
                ),
                on(
                    edge("web@host-a", "10.0.0.53 (external)", 53, "allowed", 9, t),
                    Protocol::Udp,
                ),
                on(
                    edge("web@host-a", "10.0.0.1 (external)", 0, "allowed", 3, t),
                    Protocol::Icmp,
                ),
                on(
                    edge("web@host-a", "10.0.0.1 (external)", 0, "allowed", 1, t),
                    Protocol::Raw,
                ),
                edge("web@host-a", "metrics@host-b", 8125, "allowed", 2, t),
            ],
        };
        let policy = tessera_policy::load(
            "in-force.yaml",
            "rules:\n  - {name: statsd, action: allow, protocol: udp, from: {labels: [app=web]}, to: {labels: [app=metrics]}, ports: [8125]}\n",
        )
        .unwrap();
        let s = suggest(
            &map,
            &Options {
                group_by: vec!["app".into()],
                since_ms: 0,
                in_force: Some(policy),
            },
        );
        let parsed = tessera_policy::parse::parse("suggested.yaml", &s.text)
            .unwrap_or_else(|e| panic!("{e}\n{}", s.text));
        // TCP and UDP to metrics are two rules; DNS over UDP; ICMP without ports; the raw
        // socket left out with a reason.
        assert_eq!(parsed.rules.len(), 4, "{}", s.text);
        use tessera_policy::parse::Protocol as P;
        let by = |name: &str| {
            parsed
                .rules
                .iter()
                .find(|r| r.name == name)
                .unwrap_or_else(|| panic!("{name}: {}", s.text))
        };
        assert_eq!(by("web-to-metrics-udp").protocol, P::Udp);
        assert_eq!(by("web-to-metrics").protocol, P::Tcp);
        assert_eq!(by("web-to-10-0-0-53-32-udp").protocol, P::Udp);
        assert_eq!(by("web-to-10-0-0-1-32-icmp").protocol, P::Icmp);
        assert!(by("web-to-10-0-0-1-32-icmp").ports.is_empty(), "{}", s.text);
        assert_eq!(s.skipped.len(), 1, "{:?}", s.skipped);
        assert!(s.skipped[0].contains("raw socket"));
        // The policy in force allows statsd over UDP (rule statsd), not over TCP, and not DNS.
        let comment_of = |rule: &str| {
            let i = s.text.find(&format!("  - name: {rule}\n")).unwrap();
            s.text[..i].lines().last().unwrap().to_string()
        };
        assert_eq!(
            comment_of("web-to-metrics-udp"),
            "  # in force already: allowed by statsd"
        );
        assert!(comment_of("web-to-metrics").contains("NEW"), "{}", s.text);
        assert!(
            comment_of("web-to-10-0-0-53-32-udp").contains("NEW"),
            "{}",
            s.text
        );
        // Everything suggested, compiled, allows what it came from (the UDP/ICMP rules as
        // eBPF reads them).
        let compiled = CompiledPolicy::new(parsed);
        let nodes: BTreeMap<&str, &Node> = map.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
        for e in map.edges.iter().filter(|e| e.key.protocol != Protocol::Raw) {
            assert!(
                allowed_by(&compiled, &nodes, &e.key).is_some(),
                "{:?} not allowed by the suggestion:\n{}",
                e.key,
                s.text
            );
        }
    }
}
