//! Compiling a policy into an index, and deciding.
//!
//! Rules are not scanned one by one per connection. Each side of a rule (`from`, `to`) is a
//! list of peers. A label selector is indexed under its **most selective** exact `key=value`
//! clause (the one fewest selectors share, chosen at compile time), so an identity's labels
//! lead straight to a handful of candidate selectors, each then checked in full; selectors
//! without an exact clause are always candidates. (Trireme counted every clause; counting
//! makes a label that thousands of selectors share cost thousands of updates per lookup.)
//! Addresses are matched against networks and resolved DNS names.
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use rustc_hash::FxHashMap;

use crate::{
    labels::Labels,
    parse::{Action, Mode, Peer, Policy, Protocol},
    selector::{Expr, Value},
};

/// One end of a connection as policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    /// The workload's identity; `None` for a peer without one (an external address).
    pub labels: Option<&'a Labels>,
    pub addr: Option<IpAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The rule that decided; `None` when no rule matched (default deny).
    pub rule: Option<Arc<str>>,
    /// A matching deny rule in observe mode: it would have denied.
    pub observed_deny: Option<Arc<str>>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    /// Why, in words, for flow records and `explain`.
    pub fn reason(&self) -> String {
        match (&self.verdict, &self.rule) {
            (Verdict::Allow, Some(r)) => format!("allowed by rule {r}"),
            (Verdict::Deny, Some(r)) => format!("denied by rule {r}"),
            (Verdict::Deny, None) => "denied: no rule allows it (default deny)".into(),
            (Verdict::Allow, None) => "allowed".into(),
        }
    }
}

struct CompiledRule {
    name: Arc<str>,
    action: Action,
    mode: Mode,
    ports: Vec<(u16, u16)>,
    protocol: Protocol,
    /// Kept for `udp`/`icmp` rules only, which eBPF enforces from addresses
    /// ([`CompiledPolicy::nontcp_allows`]).
    from: Vec<Peer>,
    to: Vec<Peer>,
}

/// What one `udp`/`icmp` rule allows one enrolled workload (by its labels): to send to
/// `peers` (`inbound == false`) or to receive from them (`inbound == true`), on `ports`
/// (the workload's own ports when inbound; empty: every port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonTcpAllow {
    pub rule: Arc<str>,
    pub protocol: Protocol,
    pub inbound: bool,
    /// The other side: `Cidr`, `Dns`, or `Labels` of workloads on other enforcers (which
    /// the enforcer turns into the addresses those enforcers serve).
    pub peers: Vec<Peer>,
    pub ports: Vec<(u16, u16)>,
    pub mode: Mode,
}

/// Label keys and exact values, as small integers: selectors compare integers held in
/// contiguous arrays instead of chasing strings scattered over the heap (uncached decisions
/// are bound by memory latency, not by arithmetic).
#[derive(Default)]
struct Symbols(FxHashMap<String, u32>);

impl Symbols {
    fn intern(&mut self, s: &str) -> u32 {
        let next = self.0.len() as u32;
        *self.0.entry(s.to_owned()).or_insert(next)
    }
    fn get(&self, s: &str) -> Option<u32> {
        self.0.get(s).copied()
    }
}

/// A value in compiled form: an exact symbol or a prefix.
#[derive(Clone, Debug)]
enum CValue {
    Exact(u32),
    Prefix(String),
}

#[derive(Clone, Debug)]
enum CExpr {
    Eq(u32, CValue),
    NotEq(u32, CValue),
    In(u32, Vec<CValue>),
    NotIn(u32, Vec<CValue>),
    Exists(u32),
    NotExists(u32),
}

/// One identity label as the compiled policy sees it: the key's symbol, the value's symbol
/// (if the policy names that value exactly), and the value itself (for prefixes).
struct SymLabel<'a> {
    key: u32,
    value: Option<u32>,
    text: &'a str,
}

fn value_matches(v: &CValue, l: &SymLabel<'_>) -> bool {
    match v {
        CValue::Exact(sym) => l.value == Some(*sym),
        CValue::Prefix(p) => l.text.starts_with(p.as_str()),
    }
}

fn find<'a, 'b>(labels: &'b [SymLabel<'a>], key: u32) -> Option<&'b SymLabel<'a>> {
    labels.iter().find(|l| l.key == key)
}

impl CExpr {
    fn matches(&self, labels: &[SymLabel<'_>]) -> bool {
        match self {
            CExpr::Eq(k, v) => find(labels, *k).is_some_and(|l| value_matches(v, l)),
            CExpr::NotEq(k, v) => !find(labels, *k).is_some_and(|l| value_matches(v, l)),
            CExpr::In(k, vs) => {
                find(labels, *k).is_some_and(|l| vs.iter().any(|v| value_matches(v, l)))
            }
            CExpr::NotIn(k, vs) => {
                !find(labels, *k).is_some_and(|l| vs.iter().any(|v| value_matches(v, l)))
            }
            CExpr::Exists(k) => find(labels, *k).is_some(),
            CExpr::NotExists(k) => find(labels, *k).is_none(),
        }
    }
}

fn compile_value(symbols: &mut Symbols, v: &Value) -> CValue {
    match v {
        Value::Exact(s) => CValue::Exact(symbols.intern(s)),
        Value::Prefix(p) => CValue::Prefix(p.clone()),
    }
}

fn compile_expr(symbols: &mut Symbols, e: &Expr) -> CExpr {
    match e {
        Expr::Eq(k, v) => CExpr::Eq(symbols.intern(k), compile_value(symbols, v)),
        Expr::NotEq(k, v) => CExpr::NotEq(symbols.intern(k), compile_value(symbols, v)),
        Expr::In(k, vs) => CExpr::In(
            symbols.intern(k),
            vs.iter().map(|v| compile_value(symbols, v)).collect(),
        ),
        Expr::NotIn(k, vs) => CExpr::NotIn(
            symbols.intern(k),
            vs.iter().map(|v| compile_value(symbols, v)).collect(),
        ),
        Expr::Exists(k) => CExpr::Exists(symbols.intern(k)),
        Expr::NotExists(k) => CExpr::NotExists(symbols.intern(k)),
    }
}

/// The index over one side (`from` or `to`) of every rule.
#[derive(Default)]
struct SideIndex {
    /// Selectors as (rule, range in `exprs`): all of a selector's expressions sit together.
    selectors: Vec<(u32, u32, u32)>,
    exprs: Vec<CExpr>,
    /// (key, value) symbols -> selectors indexed under exactly that clause.
    by_exact: FxHashMap<(u32, u32), Vec<u32>>,
    /// Selectors without an exact clause: always candidates.
    unindexed: Vec<u32>,
    cidrs: Vec<(IpNet, u32)>,
    dns: Vec<(String, u32)>,
}

impl SideIndex {
    fn add(&mut self, symbols: &mut Symbols, rule: u32, peer: &Peer) {
        match peer {
            Peer::Labels(sel) => {
                let start = self.exprs.len() as u32;
                self.exprs
                    .extend(sel.0.iter().map(|e| compile_expr(symbols, e)));
                self.selectors.push((rule, start, self.exprs.len() as u32));
            }
            Peer::Cidr(net) => self.cidrs.push((*net, rule)),
            Peer::Dns(name) => self.dns.push((name.clone(), rule)),
        }
    }

    fn exact_clauses(&self, s: usize) -> impl Iterator<Item = (u32, u32)> + '_ {
        let (_, a, b) = self.selectors[s];
        self.exprs[a as usize..b as usize]
            .iter()
            .filter_map(|e| match e {
                CExpr::Eq(k, CValue::Exact(v)) => Some((*k, *v)),
                _ => None,
            })
    }

    /// Indexes each selector under its most selective exact clause.
    fn build(&mut self) {
        let mut frequency: FxHashMap<(u32, u32), usize> = FxHashMap::default();
        for s in 0..self.selectors.len() {
            for clause in self.exact_clauses(s) {
                *frequency.entry(clause).or_default() += 1;
            }
        }
        let mut by_exact: FxHashMap<(u32, u32), Vec<u32>> = FxHashMap::default();
        let mut unindexed = Vec::new();
        for s in 0..self.selectors.len() {
            match self.exact_clauses(s).min_by_key(|c| frequency[c]) {
                Some(clause) => by_exact.entry(clause).or_default().push(s as u32),
                None => unindexed.push(s as u32),
            }
        }
        (self.by_exact, self.unindexed) = (by_exact, unindexed);
    }

    /// Appends the rules whose side matches `subject` to `out` (unsorted, may repeat).
    fn matching(
        &self,
        labels: Option<&[SymLabel<'_>]>,
        addr: Option<IpAddr>,
        resolved: &dyn Fn(&str, IpAddr) -> bool,
        out: &mut Vec<u32>,
    ) {
        if let Some(labels) = labels {
            let indexed = labels
                .iter()
                .filter_map(|l| l.value.and_then(|v| self.by_exact.get(&(l.key, v))))
                .flatten();
            for &s in indexed.chain(self.unindexed.iter()) {
                let (rule, a, b) = self.selectors[s as usize];
                if self.exprs[a as usize..b as usize]
                    .iter()
                    .all(|e| e.matches(labels))
                {
                    out.push(rule);
                }
            }
        }
        if let Some(addr) = addr {
            let addr = match addr {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
                v4 => v4,
            };
            out.extend(
                self.cidrs
                    .iter()
                    .filter(|(n, _)| n.contains(&addr))
                    .map(|(_, r)| *r),
            );
            out.extend(
                self.dns
                    .iter()
                    .filter(|(n, _)| resolved(n, addr))
                    .map(|(_, r)| *r),
            );
        }
    }
}

/// A decision in compact form (what the cache stores): rule indices, no names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactDecision {
    pub allow: bool,
    /// Index of the deciding rule, or `NO_RULE`.
    pub rule: u32,
    /// Index of an observe-mode deny rule that matched, or `NO_RULE`.
    pub observed_deny: u32,
}

pub const NO_RULE: u32 = u32::MAX;

pub struct CompiledPolicy {
    rules: Vec<CompiledRule>,
    symbols: Symbols,
    from: SideIndex,
    to: SideIndex,
    /// Every DNS name the policy mentions (the caller resolves them).
    pub dns_names: Vec<String>,
    /// Every label key a rule's selectors read ([`Self::mentions_label`]).
    label_keys: Vec<String>,
}

impl CompiledPolicy {
    pub fn new(policy: Policy) -> Self {
        let mut c = Self {
            rules: Vec::new(),
            symbols: Symbols::default(),
            from: SideIndex::default(),
            to: SideIndex::default(),
            dns_names: Vec::new(),
            label_keys: Vec::new(),
        };
        for (i, r) in policy.rules.iter().enumerate() {
            let id = i as u32;
            for p in &r.from {
                c.from.add(&mut c.symbols, id, p);
            }
            for p in &r.to {
                c.to.add(&mut c.symbols, id, p);
            }
            for p in r.from.iter().chain(&r.to) {
                if let Peer::Labels(sel) = p {
                    for k in sel.keys() {
                        if !c.label_keys.iter().any(|x| x == k) {
                            c.label_keys.push(k.to_owned());
                        }
                    }
                }
                if let Peer::Dns(n) = p
                    && !c.dns_names.contains(n)
                {
                    c.dns_names.push(n.clone());
                }
            }
            let nontcp = r.protocol != Protocol::Tcp;
            c.rules.push(CompiledRule {
                name: r.name.as_str().into(),
                action: r.action,
                mode: r.mode,
                ports: r.ports.clone(),
                protocol: r.protocol,
                from: if nontcp { r.from.clone() } else { Vec::new() },
                to: if nontcp { r.to.clone() } else { Vec::new() },
            });
        }
        c.from.build();
        c.to.build();
        c
    }

    /// Whether any rule's selectors read the label `key` (on either side).
    pub fn mentions_label(&self, key: &str) -> bool {
        self.label_keys.iter().any(|k| k == key)
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// What the `udp`/`icmp` rules allow a workload with `labels`: sending to the `to` side
    /// of rules whose `from` selects it, receiving from the `from` side of rules whose `to`
    /// selects it. In file order.
    pub fn nontcp_allows(&self, labels: &Labels) -> Vec<NonTcpAllow> {
        let selects = |peers: &[Peer]| {
            peers
                .iter()
                .any(|p| matches!(p, Peer::Labels(s) if s.matches(labels)))
        };
        let mut out = Vec::new();
        for r in &self.rules {
            if r.protocol == Protocol::Tcp || r.action != Action::Allow {
                continue;
            }
            for (inbound, own, other) in [(false, &r.from, &r.to), (true, &r.to, &r.from)] {
                let peers = other.clone();
                if selects(own) && !peers.is_empty() {
                    out.push(NonTcpAllow {
                        rule: r.name.clone(),
                        protocol: r.protocol,
                        inbound,
                        peers,
                        ports: r.ports.clone(),
                        mode: r.mode,
                    });
                }
            }
        }
        out
    }

    /// Decides a connection from `src` to `dst` on `port`. `resolved(name, addr)` says
    /// whether `name` currently resolves to `addr`.
    pub fn decide(
        &self,
        src: &Subject<'_>,
        dst: &Subject<'_>,
        port: u16,
        resolved: &dyn Fn(&str, IpAddr) -> bool,
    ) -> Decision {
        self.expand(self.decide_compact(src, dst, port, resolved))
    }

    /// An identity's labels in symbol form. Keys the policy never names cannot matter to
    /// any expression, so they are left out.
    fn symbolize<'a>(&self, labels: &'a Labels) -> Vec<SymLabel<'a>> {
        labels
            .iter()
            .filter_map(|(k, v)| {
                Some(SymLabel {
                    key: self.symbols.get(k)?,
                    value: self.symbols.get(v),
                    text: v,
                })
            })
            .collect()
    }

    /// The rule names of a compact decision.
    pub fn expand(&self, d: CompactDecision) -> Decision {
        let name = |i: u32| (i != NO_RULE).then(|| self.rules[i as usize].name.clone());
        Decision {
            verdict: if d.allow {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            rule: name(d.rule),
            observed_deny: name(d.observed_deny),
        }
    }

    pub fn decide_compact(
        &self,
        src: &Subject<'_>,
        dst: &Subject<'_>,
        port: u16,
        resolved: &dyn Fn(&str, IpAddr) -> bool,
    ) -> CompactDecision {
        let src_labels = src.labels.map(|l| self.symbolize(l));
        let mut from = Vec::new();
        self.from
            .matching(src_labels.as_deref(), src.addr, resolved, &mut from);
        if from.is_empty() {
            return CompactDecision {
                allow: false,
                rule: NO_RULE,
                observed_deny: NO_RULE,
            };
        }
        let dst_labels = dst.labels.map(|l| self.symbolize(l));
        let mut to = Vec::new();
        self.to
            .matching(dst_labels.as_deref(), dst.addr, resolved, &mut to);
        from.sort_unstable();
        from.dedup();
        to.sort_unstable();
        to.dedup();
        // Rules matching both sides, in file order.
        let (mut i, mut j) = (0, 0);
        let (mut allow, mut observed) = (NO_RULE, NO_RULE);
        while i < from.len() && j < to.len() {
            match from[i].cmp(&to[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    let id = from[i];
                    let r = &self.rules[id as usize];
                    // Connections are TCP: `udp`/`icmp` rules decide packets in eBPF.
                    let tcp = r.protocol == Protocol::Tcp;
                    if tcp
                        && (r.ports.is_empty()
                            || r.ports.iter().any(|&(a, b)| a <= port && port <= b))
                    {
                        match (r.action, r.mode) {
                            // Deny wins.
                            (Action::Deny, Mode::Enforce) => {
                                return CompactDecision {
                                    allow: false,
                                    rule: id,
                                    observed_deny: NO_RULE,
                                };
                            }
                            (Action::Deny, Mode::Observe) if observed == NO_RULE => observed = id,
                            (Action::Allow, _) if allow == NO_RULE => allow = id,
                            _ => {}
                        }
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        CompactDecision {
            allow: allow != NO_RULE,
            rule: allow,
            observed_deny: observed,
        }
    }
}

/// For callers with no DNS names resolved.
pub fn no_dns(_: &str, _: IpAddr) -> bool {
    false
}

/// The rule names per line, for `explain` output.
pub fn rule_lines(policy: &Policy) -> HashMap<String, usize> {
    policy
        .rules
        .iter()
        .map(|r| (r.name.clone(), r.line))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;
    use proptest::prelude::*;

    #[test]
    fn the_label_keys_a_policys_selectors_read_are_known() {
        let p = crate::load(
            "p.yaml",
            "rules:\n  - {name: a, action: allow, from: {labels: [app=web, 'tessera.io/exe in (/usr/bin/curl)']}, to: {labels: [app=api]}}\n  - {name: b, action: deny, from: {cidr: 10.0.0.0/8}, to: {labels: ['!tessera.io/exe-sha256']}}\n",
        )
        .unwrap();
        for k in ["app", "tessera.io/exe", "tessera.io/exe-sha256"] {
            assert!(p.mentions_label(k), "{k}");
        }
        assert!(!p.mentions_label("tessera.io/uid"));
    }

    const POLICY: &str = "\
rules:
  - {name: web-to-api, action: allow, from: {labels: [app=web]}, to: {labels: [app=api]}, ports: [8080]}
  - {name: api-to-db, action: allow, from: {labels: [app=api]}, to: {labels: [app=db]}}
  - {name: no-prod-from-dev, action: deny, from: {labels: [env=dev]}, to: {labels: [env=prod]}}
  - {name: audit-web-db, action: deny, mode: observe, from: {labels: [app=web]}, to: {labels: [app=db]}}
  - {name: web-to-db-reports, action: allow, from: {labels: [app=web, team=reports]}, to: {labels: [app=db]}}
  - {name: partners, action: allow, from: {cidr: 192.0.2.0/24}, to: {labels: [app=api]}}
  - {name: to-registry, action: allow, from: {labels: [app=web]}, to: {dns: registry.example.com}, ports: [443]}
";

    fn decide(p: &CompiledPolicy, src: &str, dst: &str, port: u16) -> Decision {
        let (s, d) = (Labels::parse(src).unwrap(), Labels::parse(dst).unwrap());
        p.decide(
            &Subject {
                labels: Some(&s),
                addr: None,
            },
            &Subject {
                labels: Some(&d),
                addr: None,
            },
            port,
            &no_dns,
        )
    }

    fn policy() -> CompiledPolicy {
        CompiledPolicy::new(parse("p.yaml", POLICY).unwrap())
    }

    #[test]
    fn allow_rules_ports_and_default_deny() {
        let p = policy();
        let d = decide(&p, "app=web", "app=api", 8080);
        assert_eq!(
            (d.verdict, d.rule.as_deref()),
            (Verdict::Allow, Some("web-to-api"))
        );
        assert_eq!(
            decide(&p, "app=web", "app=api", 8081).verdict,
            Verdict::Deny,
            "port not allowed"
        );
        let d = decide(&p, "app=api", "app=web", 8080);
        assert_eq!(
            (d.verdict, d.rule.clone()),
            (Verdict::Deny, None),
            "rules are directional"
        );
        assert_eq!(d.reason(), "denied: no rule allows it (default deny)");
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = policy();
        let d = decide(&p, "app=api,env=dev", "app=db,env=prod", 5432);
        assert_eq!(
            (d.verdict, d.rule.as_deref()),
            (Verdict::Deny, Some("no-prod-from-dev"))
        );
        assert_eq!(
            decide(&p, "app=api,env=dev", "app=db,env=dev", 5432).verdict,
            Verdict::Allow
        );
    }

    #[test]
    fn observe_mode_deny_only_records() {
        let p = policy();
        let d = decide(&p, "app=web,team=reports", "app=db", 5432);
        assert_eq!(
            (d.verdict, d.rule.as_deref(), d.observed_deny.as_deref()),
            (
                Verdict::Allow,
                Some("web-to-db-reports"),
                Some("audit-web-db")
            )
        );
        let d = decide(&p, "app=web", "app=db", 5432);
        assert_eq!(
            (d.verdict, d.rule.as_deref(), d.observed_deny.as_deref()),
            (Verdict::Deny, None, Some("audit-web-db"))
        );
    }

    #[test]
    fn external_peers_by_network_and_dns_name() {
        let p = policy();
        let api = Labels::parse("app=api").unwrap();
        let partner = Subject {
            labels: None,
            addr: Some("192.0.2.9".parse().unwrap()),
        };
        let d = p.decide(
            &partner,
            &Subject {
                labels: Some(&api),
                addr: None,
            },
            80,
            &no_dns,
        );
        assert_eq!(d.rule.as_deref(), Some("partners"));
        let stranger = Subject {
            labels: None,
            addr: Some("198.51.100.1".parse().unwrap()),
        };
        assert_eq!(
            p.decide(
                &stranger,
                &Subject {
                    labels: Some(&api),
                    addr: None
                },
                80,
                &no_dns
            )
            .verdict,
            Verdict::Deny
        );
        let web = Labels::parse("app=web").unwrap();
        let registry = Subject {
            labels: None,
            addr: Some("203.0.113.7".parse().unwrap()),
        };
        let resolves = |n: &str, a: IpAddr| {
            n == "registry.example.com" && a == "203.0.113.7".parse::<IpAddr>().unwrap()
        };
        let d = p.decide(
            &Subject {
                labels: Some(&web),
                addr: None,
            },
            &registry,
            443,
            &resolves,
        );
        assert_eq!(d.rule.as_deref(), Some("to-registry"));
        assert_eq!(
            p.decide(
                &Subject {
                    labels: Some(&web),
                    addr: None
                },
                &registry,
                443,
                &no_dns
            )
            .verdict,
            Verdict::Deny,
            "unresolved name matches nothing"
        );
        assert_eq!(p.dns_names, vec!["registry.example.com".to_owned()]);
    }

    /// The reference semantics: a plain scan of every rule, no index.
    fn scan(policy: &Policy, src: &Labels, dst: &Labels, port: u16) -> Verdict {
        let side = |peers: &[Peer], l: &Labels| {
            peers
                .iter()
                .any(|p| matches!(p, Peer::Labels(s) if s.matches(l)))
        };
        let hits: Vec<_> = policy
            .rules
            .iter()
            .filter(|r| side(&r.from, src) && side(&r.to, dst))
            .filter(|r| r.ports.is_empty() || r.ports.iter().any(|&(a, b)| a <= port && port <= b))
            .collect();
        if hits
            .iter()
            .any(|r| r.action == Action::Deny && r.mode == Mode::Enforce)
        {
            Verdict::Deny
        } else if hits.iter().any(|r| r.action == Action::Allow) {
            Verdict::Allow
        } else {
            Verdict::Deny
        }
    }

    fn arb_labels() -> impl Strategy<Value = Labels> {
        let k = prop::sample::select(vec!["app", "env", "team"]);
        let v = prop::sample::select(vec!["web", "api", "db", "prod", "dev", "x"]);
        prop::collection::btree_map(k, v, 0..3).prop_map(Labels::new)
    }

    fn arb_expr() -> impl Strategy<Value = String> {
        let k = prop::sample::select(vec!["app", "env", "team"]);
        let v = prop::sample::select(vec!["web", "api", "db", "prod", "dev", "x", "w*"]);
        (k, v, 0..6u8).prop_map(|(k, v, op)| match op {
            0 | 1 => format!("{k}={v}"),
            2 => format!("{k}!={v}"),
            3 => format!("{k} in ({v}, x)"),
            4 => format!("{k} notin ({v})"),
            _ => format!("!{k}"),
        })
    }

    fn arb_policy() -> impl Strategy<Value = String> {
        let rule = (
            prop::collection::vec(arb_expr(), 0..3),
            prop::collection::vec(arb_expr(), 0..3),
            any::<bool>(),
            prop::option::of(1u16..4),
        );
        prop::collection::vec(rule, 1..12).prop_map(|rules| {
            let mut s = String::from("rules:\n");
            for (i, (from, to, allow, port)) in rules.into_iter().enumerate() {
                let ports = port.map(|p| format!(", ports: [{p}]")).unwrap_or_default();
                s += &format!(
                    "  - {{name: r{i}, action: {}, from: {{labels: [{}]}}, to: {{labels: [{}]}}{ports}}}\n",
                    if allow { "allow" } else { "deny" },
                    from.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>().join(", "),
                    to.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>().join(", "),
                );
            }
            s
        })
    }

    proptest! {
        /// The index decides exactly as a plain scan of the rules would.
        #[test]
        fn the_index_agrees_with_a_linear_scan(text in arb_policy(), src in arb_labels(), dst in arb_labels(), port in 1u16..4) {
            let policy = parse("p.yaml", &text).unwrap();
            let compiled = CompiledPolicy::new(policy.clone());
            let got = compiled.decide(&Subject { labels: Some(&src), addr: None }, &Subject { labels: Some(&dst), addr: None }, port, &no_dns);
            prop_assert_eq!(got.verdict, scan(&policy, &src, &dst, port), "policy:\n{}", text);
        }

        /// A `udp` or `icmp` rule never changes a TCP decision, whatever it selects.
        #[test]
        fn nontcp_rules_never_decide_tcp(text in arb_policy(), src in arb_labels(), dst in arb_labels(), port in 1u16..4, icmp in any::<bool>()) {
            let policy = parse("p.yaml", &text).unwrap();
            let mut with = policy.clone();
            for (i, r) in policy.rules.iter().enumerate() {
                let mut extra = r.clone();
                extra.name = format!("nontcp-{i}");
                extra.action = Action::Allow;
                extra.protocol = if icmp { Protocol::Icmp } else { Protocol::Udp };
                with.rules.insert(0, extra);
            }
            let subject = |l| Subject { labels: Some(l), addr: None };
            let before = CompiledPolicy::new(policy).decide(&subject(&src), &subject(&dst), port, &no_dns);
            let after = CompiledPolicy::new(with).decide(&subject(&src), &subject(&dst), port, &no_dns);
            prop_assert_eq!(before, after, "policy:\n{}", text);
        }
    }

    fn web_labels() -> Labels {
        Labels::parse("app=web").unwrap()
    }

    #[test]
    fn nontcp_allows_name_the_rules_other_side_for_a_workload() {
        let text = "\
rules:
  - {name: dns, action: allow, protocol: udp, from: {labels: [app=web]}, to: [{cidr: 10.0.0.53}, {dns: ns.example.com}], ports: [53]}
  - {name: ping, action: allow, protocol: icmp, from: {labels: [app=web]}, to: {cidr: 10.0.0.0/8}}
  - {name: syslog-in, action: allow, protocol: udp, from: {cidr: 192.0.2.0/24}, to: {labels: [app=web]}, ports: [514]}
  - {name: api-udp, action: allow, protocol: udp, from: {labels: [app=api]}, to: {cidr: 10.0.0.9}}
  - {name: statsd, action: allow, protocol: udp, from: {labels: [app=web]}, to: {labels: [app=metrics]}, ports: [8125]}
  - {name: tcp-any, action: allow, from: {labels: [app=web]}, to: {cidr: 0.0.0.0/0}}
";
        let p = CompiledPolicy::new(parse("p.yaml", text).unwrap());
        let web = p.nontcp_allows(&Labels::parse("app=web").unwrap());
        let got: Vec<_> = web
            .iter()
            .map(|a| {
                (
                    a.rule.as_ref(),
                    a.protocol,
                    a.inbound,
                    a.peers.len(),
                    a.ports.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("dns", Protocol::Udp, false, 2, vec![(53, 53)]),
                ("ping", Protocol::Icmp, false, 1, vec![]),
                ("syslog-in", Protocol::Udp, true, 1, vec![(514, 514)]),
                ("statsd", Protocol::Udp, false, 1, vec![(8125, 8125)]),
            ]
        );
        // Between workloads: each end gets the other's selector (the enforcer turns it into
        // the addresses of the enforcers that serve such workloads).
        let metrics = p.nontcp_allows(&Labels::parse("app=metrics").unwrap());
        assert_eq!(metrics.len(), 1);
        assert!(metrics[0].inbound);
        assert!(matches!(&metrics[0].peers[..], [Peer::Labels(s)] if s.matches(&web_labels())));
        assert!(
            matches!(&web[3].peers[..], [Peer::Labels(s)] if s.matches(&Labels::parse("app=metrics").unwrap()))
        );
        assert_eq!(
            web[1].peers,
            vec![Peer::Cidr("10.0.0.0/8".parse().unwrap())]
        );
        // The udp rule to 10.0.0.9 is api's; nothing for a workload no rule selects.
        assert!(
            p.nontcp_allows(&Labels::parse("app=db").unwrap())
                .is_empty()
        );
        // A udp rule does not allow TCP: the tcp-any rule decides a TCP connection to the
        // udp rule's address and port.
        let web = Labels::parse("app=web").unwrap();
        let d = p.decide(
            &Subject {
                labels: Some(&web),
                addr: None,
            },
            &Subject {
                labels: None,
                addr: Some("10.0.0.53".parse().unwrap()),
            },
            53,
            &no_dns,
        );
        assert_eq!(d.rule.as_deref(), Some("tcp-any"), "{d:?}");
    }
}
