//! Policy files (YAML). Every error names the file, line and column and what is wrong, and
//! all errors are reported at once.
//!
//! ```yaml
//! rules:
//!   - name: web-to-api           # unique; flows cite it
//!     action: allow              # allow | deny
//!     mode: enforce              # enforce (default) | observe: a deny that only records
//!     from:                      # any of these (OR)
//!       - labels:                # all of these (AND)
//!           - app=web
//!           - env in (prod, staging)
//!       - cidr: 192.0.2.0/24     # external sources by address
//!     to:
//!       - labels: [app=api]
//!       - dns: api.example.com   # external destinations by name
//!     ports: [8080, "9000-9100"] # default: every port
//!     protocol: tcp              # tcp (default) | udp | icmp
//! ```
//!
//! `udp` and `icmp` rules only allow (anything they do not allow is denied), and `icmp`
//! rules have no ports. Their local side is enrolled workloads by labels; the other side is
//! `cidr`, `dns`, or `labels` of workloads on other enforcers, which stand for the addresses
//! those enforcers serve (as the control plane's directory lists them: packets carry no
//! token). An enrolled workload's UDP, ICMP and raw traffic is denied unless such a rule
//! allows it.
use std::{collections::HashSet, fmt};

use ipnet::IpNet;
use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use crate::selector::{Expr, Selector};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

/// Whether a denial is enforced or only recorded: of a rule (`mode: observe`), of the
/// whole policy in force, or of a workload. The one enum for it, here and in the data
/// plane and configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Observe,
}

/// The transport a rule is about. TCP connects are decided per connection by the proxy;
/// UDP and ICMP by eBPF on each packet, from addresses computed out of the rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Workloads whose identity matches.
    Labels(Selector),
    /// Peers whose address is in the network (typically hosts without an enforcer).
    Cidr(IpNet),
    /// Peers whose address a DNS name resolves to (resolved by the caller).
    Dns(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    pub mode: Mode,
    pub from: Vec<Peer>,
    pub to: Vec<Peer>,
    /// Inclusive ranges; empty means every port.
    pub ports: Vec<(u16, u16)>,
    /// `tcp` unless the rule says otherwise.
    pub protocol: Protocol,
    /// Line of the rule in its file (for `explain`).
    pub line: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub line: usize,
    /// 1-based.
    pub column: usize,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrors {
    pub file: String,
    pub errors: Vec<PolicyError>,
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: {}", self.file, e.line, e.column, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

struct Ctx {
    errors: Vec<PolicyError>,
}

type Node<'a> = MarkedYaml<'a>;

impl Ctx {
    fn err(&mut self, node: &Node<'_>, message: impl Into<String>) {
        let m = node.span.start;
        self.errors.push(PolicyError {
            line: m.line(),
            column: m.col() + 1,
            message: message.into(),
        });
    }

    /// The entries of a mapping, checking keys against `known`.
    fn mapping<'n, 'a>(
        &mut self,
        node: &'n Node<'a>,
        what: &str,
        known: &[&str],
    ) -> Vec<(&'n str, &'n Node<'a>)> {
        let YamlData::Mapping(map) = &node.data else {
            self.err(node, format!("{what} must be a mapping"));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in map.iter() {
            match scalar_str(k) {
                Some(key) if known.contains(&key) => out.push((key, v)),
                Some(key) => self.err(
                    k,
                    format!(
                        "unknown field {key:?} in {what} (expected one of: {})",
                        known.join(", ")
                    ),
                ),
                None => self.err(k, format!("{what} keys must be strings")),
            }
        }
        out
    }

    fn string(&mut self, node: &Node<'_>, what: &str) -> Option<String> {
        match scalar_str(node) {
            Some(s) => Some(s.to_owned()),
            None => {
                self.err(node, format!("{what} must be a string"));
                None
            }
        }
    }

    fn list<'n, 'a>(&mut self, node: &'n Node<'a>, what: &str) -> Vec<&'n Node<'a>> {
        match &node.data {
            YamlData::Sequence(items) => items.iter().collect(),
            // A single item stands for a one-item list.
            YamlData::Value(_) | YamlData::Representation(..) | YamlData::Mapping(_) => vec![node],
            _ => {
                self.err(node, format!("{what} must be a list"));
                Vec::new()
            }
        }
    }
}

fn scalar_str<'n>(node: &'n Node<'_>) -> Option<&'n str> {
    match &node.data {
        YamlData::Value(Scalar::String(s)) => Some(s.as_ref()),
        YamlData::Representation(s, _, _) => Some(s.as_ref()),
        _ => None,
    }
}

fn scalar_int(node: &Node<'_>) -> Option<i64> {
    match &node.data {
        YamlData::Value(Scalar::Integer(i)) => Some(*i),
        _ => None,
    }
}

const RULE_FIELDS: &[&str] = &["name", "action", "mode", "from", "to", "ports", "protocol"];
const PEER_FIELDS: &[&str] = &["labels", "cidr", "dns"];

fn peers(ctx: &mut Ctx, node: &Node<'_>, what: &str) -> Vec<Peer> {
    let mut out = Vec::new();
    for item in ctx.list(node, what) {
        let entries = ctx.mapping(item, &format!("a {what} entry"), PEER_FIELDS);
        if entries.len() != 1 {
            if !entries.is_empty() {
                ctx.err(
                    item,
                    format!("a {what} entry has exactly one of: labels, cidr, dns"),
                );
            } else if matches!(item.data, YamlData::Mapping(_)) {
                ctx.err(
                    item,
                    format!("a {what} entry needs one of: labels, cidr, dns"),
                );
            }
            continue;
        }
        let (kind, value) = entries[0];
        match kind {
            "labels" => {
                let mut exprs = Vec::new();
                for e in ctx.list(value, "labels") {
                    let Some(text) = ctx.string(e, "a label expression") else {
                        continue;
                    };
                    match Expr::parse(&text) {
                        Ok(expr) => exprs.push(expr),
                        // `[k in (a, b)]`: YAML's flow list split the set at its comma.
                        Err(m) if text.contains('(') != text.contains(')') => ctx.err(
                            e,
                            format!(
                                "{m} (quote expressions with commas inside [ ], or use a - list)"
                            ),
                        ),
                        Err(m) => ctx.err(e, m.to_string()),
                    }
                }
                out.push(Peer::Labels(Selector(exprs)));
            }
            "cidr" => {
                for c in ctx.list(value, "cidr") {
                    let Some(text) = ctx.string(c, "a network") else {
                        continue;
                    };
                    let parsed = text
                        .parse::<IpNet>()
                        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
                    match parsed {
                        Ok(net) => out.push(Peer::Cidr(net.trunc())),
                        Err(_) => ctx.err(
                            c,
                            format!("{text:?} is not a network (like 10.0.0.0/8) or an address"),
                        ),
                    }
                }
            }
            _ => {
                for d in ctx.list(value, "dns") {
                    let Some(name) = ctx.string(d, "a DNS name") else {
                        continue;
                    };
                    let ok = !name.is_empty()
                        && name.len() <= 253
                        && name.split('.').all(|l| {
                            !l.is_empty()
                                && l.len() <= 63
                                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                        });
                    if ok {
                        out.push(Peer::Dns(name.to_ascii_lowercase()));
                    } else {
                        ctx.err(d, format!("{name:?} is not a DNS name"));
                    }
                }
            }
        }
    }
    out
}

fn ports(ctx: &mut Ctx, node: &Node<'_>) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    let port = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p != 0);
    for p in ctx.list(node, "ports") {
        if let Some(i) = scalar_int(p) {
            match u16::try_from(i).ok().filter(|p| *p != 0) {
                Some(v) => out.push((v, v)),
                None => ctx.err(p, format!("port {i} is out of range 1-65535")),
            }
            continue;
        }
        let Some(text) = scalar_str(p) else {
            ctx.err(p, "a port is a number or a range like \"9000-9100\"");
            continue;
        };
        let range = match text.split_once('-') {
            Some((a, b)) => port(a).zip(port(b)),
            None => port(text).map(|v| (v, v)),
        };
        match range {
            Some((a, b)) if a <= b => out.push((a, b)),
            Some(_) => ctx.err(p, format!("port range {text:?} is backwards")),
            None => ctx.err(
                p,
                format!("{text:?} is not a port (1-65535) or a range like \"9000-9100\""),
            ),
        }
    }
    out
}

fn rule(ctx: &mut Ctx, node: &Node<'_>, index: usize) -> Option<Rule> {
    let before = ctx.errors.len();
    let what = format!("rule {}", index + 1);
    let entries = ctx.mapping(node, &what, RULE_FIELDS);
    let field = |name: &str| entries.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let name = match field("name") {
        Some(n) => ctx.string(n, "name").unwrap_or_default(),
        None => {
            ctx.err(node, format!("{what} has no name"));
            String::new()
        }
    };
    let action = match field("action").map(|a| (a, scalar_str(a))) {
        Some((_, Some("allow"))) => Action::Allow,
        Some((_, Some("deny"))) => Action::Deny,
        Some((a, _)) => {
            ctx.err(a, "action must be allow or deny");
            Action::Deny
        }
        None => {
            ctx.err(
                node,
                format!("{what} ({name}) has no action (allow or deny)"),
            );
            Action::Deny
        }
    };
    let mode = match field("mode").map(|m| (m, scalar_str(m))) {
        None | Some((_, Some("enforce"))) => Mode::Enforce,
        Some((_, Some("observe"))) => Mode::Observe,
        Some((m, _)) => {
            ctx.err(m, "mode must be enforce or observe");
            Mode::Enforce
        }
    };
    let protocol = match field("protocol").map(|p| (p, scalar_str(p))) {
        None | Some((_, Some("tcp"))) => Protocol::Tcp,
        Some((_, Some("udp"))) => Protocol::Udp,
        Some((_, Some("icmp"))) => Protocol::Icmp,
        Some((p, _)) => {
            ctx.err(p, "protocol must be tcp, udp or icmp");
            Protocol::Tcp
        }
    };
    if protocol != Protocol::Tcp
        && action == Action::Deny
        && let Some(a) = field("action")
    {
        ctx.err(
            a,
            format!(
                "a {} rule can only allow (what no rule allows is denied)",
                protocol.as_str()
            ),
        );
    }
    let from = match field("from") {
        Some(f) => peers(ctx, f, "from"),
        None => {
            ctx.err(node, format!("{what} ({name}) has no from"));
            Vec::new()
        }
    };
    let to = match field("to") {
        Some(t) => peers(ctx, t, "to"),
        None => {
            ctx.err(node, format!("{what} ({name}) has no to"));
            Vec::new()
        }
    };
    let ports = field("ports").map(|p| ports(ctx, p)).unwrap_or_default();
    if protocol == Protocol::Icmp
        && let Some(p) = field("ports")
    {
        ctx.err(p, "an icmp rule has no ports");
    }
    (ctx.errors.len() == before).then_some(Rule {
        name,
        action,
        mode,
        from,
        to,
        ports,
        protocol,
        line: node.span.start.line(),
    })
}

/// Parses a policy file's text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyErrors> {
    let fail = |errors| PolicyErrors {
        file: file.to_owned(),
        errors,
    };
    let docs = MarkedYaml::load_from_str(text).map_err(|e| {
        let m = e.marker();
        fail(vec![PolicyError {
            line: m.line(),
            column: m.col() + 1,
            message: format!("YAML: {}", e.info()),
        }])
    })?;
    let mut ctx = Ctx { errors: Vec::new() };
    let Some(doc) = docs.first() else {
        return Err(fail(vec![PolicyError {
            line: 1,
            column: 1,
            message: "empty policy: expected `rules:`".into(),
        }]));
    };
    if docs.len() > 1 {
        ctx.err(&docs[1], "one YAML document per policy file");
    }
    let mut policy = Policy::default();
    let entries = ctx.mapping(doc, "the policy", &["rules"]);
    match entries.iter().find(|(k, _)| *k == "rules") {
        Some((_, rules)) => {
            let YamlData::Sequence(items) = &rules.data else {
                ctx.err(rules, "rules must be a list");
                return Err(fail(ctx.errors));
            };
            let mut names = HashSet::new();
            for (i, item) in items.iter().enumerate() {
                if let Some(r) = rule(&mut ctx, item, i) {
                    if !names.insert(r.name.clone()) {
                        ctx.err(item, format!("rule name {:?} is used twice", r.name));
                    }
                    policy.rules.push(r);
                }
            }
        }
        None if ctx.errors.is_empty() => ctx.err(doc, "the policy has no `rules:` list"),
        None => {}
    }
    if ctx.errors.is_empty() {
        Ok(policy)
    } else {
        ctx.errors.sort_by_key(|e| (e.line, e.column));
        Err(fail(ctx.errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
rules:
  - name: web-to-api
    action: allow
    from:
      - labels:
          - app=web
          - env in (prod, staging)
    to:
      - labels: app=api
    ports: [8080, \"9000-9100\"]
  - name: no-db-from-web
    action: deny
    mode: observe
    from: {labels: [app=web]}
    to:
      - labels: [app=db]
      - cidr: 192.0.2.0/24
      - dns: DB.example.com
";

    #[test]
    fn a_good_policy_parses() {
        let p = parse("p.yaml", GOOD).unwrap();
        assert_eq!(p.rules.len(), 2);
        let r = &p.rules[0];
        assert_eq!(
            (r.name.as_str(), r.action, r.mode, r.line),
            ("web-to-api", Action::Allow, Mode::Enforce, 2)
        );
        assert_eq!(
            r.from,
            vec![Peer::Labels(Selector(vec![
                Expr::parse("app=web").unwrap(),
                Expr::parse("env in (prod, staging)").unwrap()
            ]))]
        );
        assert_eq!(r.ports, vec![(8080, 8080), (9000, 9100)]);
        assert_eq!(
            r.to,
            vec![Peer::Labels(Selector(vec![
                Expr::parse("app=api").unwrap()
            ]))]
        );
        let d = &p.rules[1];
        assert_eq!((d.action, d.mode), (Action::Deny, Mode::Observe));
        assert_eq!(d.to[1], Peer::Cidr("192.0.2.0/24".parse().unwrap()));
        assert_eq!(d.to[2], Peer::Dns("db.example.com".into()));
        assert!(d.ports.is_empty());
    }

    /// Golden test of `check` messages: every error, with file, line and column.
    #[test]
    fn every_error_is_reported_with_its_position() {
        let bad = "\
rules:
  - name: one
    action: permit
    from:
      - labels: [app==]
    to:
      - cidr: 10.0.0.300/8
    ports: [0, \"90-80\", http]
    colour: blue
  - name: one
    action: allow
    from: [{labels: [tier in prod]}]
  - action: deny
    from: [{dns: \"bad name\"}]
    to: [{labels: [a], cidr: 10.0.0.0/8}]
    protocol: sctp
";
        let err = parse("policy.yaml", bad).unwrap_err();
        let want = "\
policy.yaml:3:13: action must be allow or deny
policy.yaml:5:18: empty value
policy.yaml:7:15: \"10.0.0.300/8\" is not a network (like 10.0.0.0/8) or an address
policy.yaml:8:13: port 0 is out of range 1-65535
policy.yaml:8:16: port range \"90-80\" is backwards
policy.yaml:8:25: \"http\" is not a port (1-65535) or a range like \"9000-9100\"
policy.yaml:9:5: unknown field \"colour\" in rule 1 (expected one of: name, action, mode, from, to, ports, protocol)
policy.yaml:10:5: rule 2 (one) has no to
policy.yaml:12:22: expected a set like (a, b), found \"prod\"
policy.yaml:13:5: rule 3 has no name
policy.yaml:14:18: \"bad name\" is not a DNS name
policy.yaml:15:10: a to entry has exactly one of: labels, cidr, dns
policy.yaml:16:15: protocol must be tcp, udp or icmp";
        assert_eq!(err.to_string(), want);
    }

    #[test]
    fn udp_and_icmp_rules_parse_and_tcp_is_the_default() {
        let text = "\
rules:
  - name: dns
    action: allow
    from: [{labels: [app=web]}]
    to: [{cidr: 10.0.0.53}]
    ports: [53]
    protocol: udp
  - name: ping
    action: allow
    from: [{labels: [app=web]}]
    to: [{dns: gw.example.com}]
    protocol: icmp
  - name: syslog-in
    action: allow
    from: [{cidr: 10.0.0.0/24}]
    to: [{labels: [app=web]}]
    ports: [514]
    protocol: udp
  - name: web
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=api]}]
";
        let p = parse("p.yaml", text).unwrap();
        let protocols: Vec<_> = p.rules.iter().map(|r| r.protocol).collect();
        assert_eq!(
            protocols,
            [Protocol::Udp, Protocol::Icmp, Protocol::Udp, Protocol::Tcp]
        );
        assert_eq!(p.rules[0].ports, vec![(53, 53)]);
    }

    /// Golden test of what a `udp`/`icmp` rule may not say, each error positioned; labels on
    /// both sides (workloads on other enforcers) are allowed.
    #[test]
    fn nontcp_rules_only_allow_and_icmp_has_no_ports() {
        let bad = "\
rules:
  - name: a
    action: deny
    from: [{labels: [app=web]}]
    to: [{cidr: 10.0.0.0/8}]
    protocol: udp
  - name: b
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=api]}]
    protocol: udp
  - name: c
    action: allow
    from: [{labels: [app=web]}]
    to: [{cidr: 10.0.0.1}]
    ports: [7]
    protocol: icmp
";
        let err = parse("p.yaml", bad).unwrap_err().to_string();
        let want = "\
p.yaml:3:13: a udp rule can only allow (what no rule allows is denied)
p.yaml:16:12: an icmp rule has no ports";
        assert_eq!(err, want);
        let between = "rules:\n  - {name: b, action: allow, protocol: udp, from: {labels: [app=web]}, to: {labels: [app=api]}}\n";
        assert_eq!(parse("p.yaml", between).unwrap().rules.len(), 1);
    }

    #[test]
    fn yaml_syntax_errors_and_empty_files_are_positioned() {
        let err = parse("p.yaml", "rules:\n  - name: [unclosed\n").unwrap_err();
        assert_eq!(err.errors.len(), 1);
        assert!(err.to_string().starts_with("p.yaml:3:"), "{err}");
        assert!(err.to_string().contains("YAML:"), "{err}");
        assert_eq!(
            parse("p.yaml", "").unwrap_err().to_string(),
            "p.yaml:1:1: empty policy: expected `rules:`"
        );
        assert_eq!(parse("p.yaml", "rulez: []\n").unwrap_err().errors.len(), 1);
    }

    #[test]
    fn a_set_split_by_a_flow_list_gets_a_hint() {
        let text = "rules:\n  - {name: a, action: allow, from: {labels: [env in (a, b)]}, to: {labels: []}}\n";
        let err = parse("p.yaml", text).unwrap_err().to_string();
        assert!(err.contains("quote expressions with commas"), "{err}");
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let two = "rules:\n  - {name: a, action: allow, from: {labels: []}, to: {labels: []}}\n  - {name: a, action: deny, from: {labels: []}, to: {labels: []}}\n";
        let err = parse("p.yaml", two).unwrap_err();
        assert_eq!(err.to_string(), "p.yaml:3:5: rule name \"a\" is used twice");
    }
}
