//! Policy decisions on the connection path: pure, cached, and replaceable at any time.
//!
//! Both ends decide: the source enforcer checks a connection against the destination's
//! identity (egress), the destination enforcer against the source's identity (ingress).
//! [`Decisions`] holds the policy in force with its decision cache and label interner; it
//! does nothing else: live connections and what happens to them on a reload are the
//! [`crate::registry`]'s, and DNS resolutions are read from the [`DnsTable`] it is given.
use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use arc_swap::ArcSwap;
use tessera_policy::{
    CompiledPolicy, Labels, Subject, Verdict,
    cache::{DecisionCache, Interner},
};

use crate::dns::DnsTable;

/// What happens when policy denies: `Enforce` refuses, `Observe` only records (the policy
/// language's own enum: a rule's, the policy's and a workload's mode are the same thing).
pub use tessera_policy::parse::Mode as PolicyMode;

/// Which end of a connection this enforcer decides for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The destination's end: the source's identity is checked.
    Ingress,
    /// The source's end: the destination's identity is checked.
    Egress,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Ingress => "ingress",
            Side::Egress => "egress",
        }
    }
}

/// One end of a connection, owned (the registry keeps it to re-decide on a reload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Party {
    pub labels: Option<Labels>,
    pub addr: Option<IpAddr>,
}

impl Party {
    pub fn workload(labels: Labels, addr: Option<IpAddr>) -> Self {
        Self {
            labels: Some(labels),
            addr,
        }
    }
    pub fn external(addr: IpAddr) -> Self {
        Self {
            labels: None,
            addr: Some(addr),
        }
    }
    fn subject(&self) -> Subject<'_> {
        Subject {
            labels: self.labels.as_ref(),
            addr: self.addr,
        }
    }
}

/// A connection to decide: who, to whom, which port, at which end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub side: Side,
    pub src: Party,
    pub dst: Party,
    pub port: u16,
    /// The local workload is in observe mode (its denials are recorded, not enforced).
    pub observe: bool,
}

/// A decision, as flows record it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruling {
    /// Whether the connection may proceed (true also when a denial is only observed).
    pub allowed: bool,
    /// Denied by policy but let through because of observe mode.
    pub observed_deny: bool,
    /// The rule that decided, if any.
    pub rule: Option<String>,
    pub reason: String,
    /// The policy generation it was made under (see [`Decisions::generation`]).
    pub generation: u64,
}

pub struct Decisions {
    current: ArcSwap<DecisionCache>,
    dns: Arc<DnsTable>,
    interner: Interner,
    mode: PolicyMode,
    /// Bumped by every replacement, before decisions under the new policy are made.
    generation: AtomicU64,
}

/// Decisions cached per compiled policy, at most this many.
const CACHE_ENTRIES: usize = 1 << 20;

impl Decisions {
    pub fn new(policy: Arc<CompiledPolicy>, mode: PolicyMode, dns: Arc<DnsTable>) -> Self {
        Self {
            current: ArcSwap::from_pointee(DecisionCache::new(policy, CACHE_ENTRIES)),
            dns,
            interner: Interner::default(),
            mode,
            generation: AtomicU64::new(0),
        }
    }

    /// Policy subjects the interner had no room for (decided without the cache).
    pub fn uninterned(&self) -> u64 {
        self.interner.refused()
    }

    pub fn rule_count(&self) -> usize {
        self.current.load().policy.rule_count()
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<CompiledPolicy> {
        self.current.load().policy.clone()
    }

    /// Changes with every replacement: a decision made under an older generation may no
    /// longer hold.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The DNS names the policy in force mentions.
    pub fn dns_names(&self) -> Vec<String> {
        self.current.load().policy.dns_names.clone()
    }

    /// Resolutions of those names.
    pub fn dns(&self) -> &DnsTable {
        &self.dns
    }

    /// Decides a connection.
    pub fn check(&self, a: &Attempt) -> Ruling {
        let generation = self.generation();
        let cache = self.current.load();
        let s = self.interner.intern(a.src.labels.as_ref(), a.src.addr);
        let d = self.interner.intern(a.dst.labels.as_ref(), a.dst.addr);
        let resolved = |name: &str, addr: IpAddr| self.dns.resolves(name, addr);
        let decision = cache.decide(
            (s, &a.src.subject()),
            (d, &a.dst.subject()),
            a.port,
            &resolved,
        );
        let rule = decision.rule.as_deref().map(str::to_owned);
        match decision.verdict {
            Verdict::Allow => Ruling {
                allowed: true,
                observed_deny: decision.observed_deny.is_some(),
                reason: match &decision.observed_deny {
                    Some(o) => format!("{} (observe: rule {o} would deny)", decision.reason()),
                    None => decision.reason(),
                },
                rule,
                generation,
            },
            Verdict::Deny if self.mode == PolicyMode::Observe || a.observe => Ruling {
                allowed: true,
                observed_deny: true,
                reason: format!("observe: would be {}", decision.reason()),
                rule,
                generation,
            },
            Verdict::Deny => Ruling {
                allowed: false,
                observed_deny: false,
                reason: decision.reason(),
                rule,
                generation,
            },
        }
    }

    /// Puts `policy` in force (cached decisions go with the old one). Live connections are
    /// the registry's to re-check: see [`crate::registry::ConnectionRegistry::apply`].
    pub fn replace(&self, policy: Arc<CompiledPolicy>) {
        self.current
            .store(Arc::new(DecisionCache::new(policy, CACHE_ENTRIES)));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Arc<CompiledPolicy> {
        tessera_policy::load("p.yaml", text).unwrap()
    }

    pub(crate) const WEB_API: &str = "rules:\n  - {name: web-api, action: allow, from: {labels: [app=web]}, to: {labels: [app=api]}}\n";

    fn party(s: &str) -> Party {
        Party::workload(Labels::parse(s).unwrap(), None)
    }

    fn attempt(src: &str, dst: &str, observe: bool) -> Attempt {
        Attempt {
            side: Side::Egress,
            src: party(src),
            dst: party(dst),
            port: 80,
            observe,
        }
    }

    #[test]
    fn enforce_observe_and_workload_observe() {
        let a = Decisions::new(policy(WEB_API), PolicyMode::Enforce, Default::default());
        let ok = a.check(&attempt("app=web", "app=api", false));
        assert!(ok.allowed && !ok.observed_deny);
        assert_eq!(ok.rule.as_deref(), Some("web-api"));
        let no = a.check(&attempt("app=api", "app=web", false));
        assert!(!no.allowed);
        assert_eq!(no.reason, "denied: no rule allows it (default deny)");
        let watched = a.check(&attempt("app=api", "app=web", true));
        assert!(
            watched.allowed && watched.observed_deny,
            "workload in observe mode"
        );
        let o = Decisions::new(policy(WEB_API), PolicyMode::Observe, Default::default());
        let r = o.check(&attempt("app=api", "app=web", false));
        assert!(r.allowed && r.observed_deny);
        assert!(r.reason.starts_with("observe: would be denied"));
    }

    #[test]
    fn a_replacement_drops_cached_decisions_and_moves_the_generation() {
        let a = Decisions::new(policy(WEB_API), PolicyMode::Enforce, Default::default());
        let before = a.check(&attempt("app=web", "app=api", false));
        assert!(before.allowed);
        a.replace(policy("rules: []\n"));
        let after = a.check(&attempt("app=web", "app=api", false));
        assert!(
            !after.allowed,
            "the cached decision went with the old policy"
        );
        assert_eq!(after.generation, before.generation + 1);
    }
}
