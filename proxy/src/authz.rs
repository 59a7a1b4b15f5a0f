//! Policy decisions on the connection path.
//!
//! Both ends decide: the source enforcer checks the connection against the destination's
//! identity (egress), the destination enforcer against the source's identity (ingress). The
//! policy in force can be replaced at any time ([`Authorizer::replace`]); decisions are cached
//! per compiled policy, so a replacement invalidates them. **Live connections that the new
//! policy denies are closed** (reset) at once: a reload is how an operator cuts off access,
//! and letting such connections run until they end would keep it open indefinitely.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use arc_swap::ArcSwap;
use tessera_policy::{
    CompiledPolicy, Labels, Subject, Verdict,
    cache::{DecisionCache, Interner},
};
use tokio::sync::watch;

use crate::dns::DnsTable;

/// What happens when policy denies: `Enforce` refuses, `Observe` only records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyMode {
    Enforce,
    Observe,
}

/// One end of a connection, owned (for the live-connection registry).
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

/// The outcome of a check, as flows record it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the connection may proceed (true also when a denial is only observed).
    pub allowed: bool,
    /// Denied by policy but let through because of observe mode.
    pub observed_deny: bool,
    /// The rule that decided, if any.
    pub rule: Option<String>,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Ingress,
    Egress,
}

struct Live {
    src: Party,
    dst: Party,
    port: u16,
    observe: bool,
    side: Side,
    close: watch::Sender<Option<String>>,
}

pub struct Authorizer {
    current: ArcSwap<DecisionCache>,
    dns: DnsTable,
    interner: Interner,
    mode: PolicyMode,
    live: Mutex<HashMap<u64, Live>>,
    next: AtomicU64,
    /// Bumped after each policy replacement (watchers of many connections wait on it).
    reloads: watch::Sender<u64>,
}

/// Decisions cached per compiled policy, at most this many.
const CACHE_ENTRIES: usize = 1 << 20;

impl Authorizer {
    pub fn new(policy: Arc<CompiledPolicy>, mode: PolicyMode) -> Self {
        Self {
            current: ArcSwap::from_pointee(DecisionCache::new(policy, CACHE_ENTRIES)),
            dns: DnsTable::default(),
            interner: Interner::default(),
            mode,
            live: Mutex::default(),
            next: AtomicU64::new(1),
            reloads: watch::channel(0).0,
        }
    }

    /// Changes each time a policy replaces the previous one (after live connections were
    /// re-checked and the revoked ones told).
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    pub fn rule_count(&self) -> usize {
        self.current.load().policy.rule_count()
    }

    /// Decides a connection. `observe` puts this workload in observe mode.
    pub fn check(&self, src: &Party, dst: &Party, port: u16, observe: bool) -> Outcome {
        let cache = self.current.load();
        let s = self.interner.intern(src.labels.as_ref(), src.addr);
        let d = self.interner.intern(dst.labels.as_ref(), dst.addr);
        let resolved = |name: &str, addr: IpAddr| self.dns.resolves(name, addr);
        let decision = cache.decide((s, &src.subject()), (d, &dst.subject()), port, &resolved);
        let rule = decision.rule.as_deref().map(str::to_owned);
        match decision.verdict {
            Verdict::Allow => Outcome {
                allowed: true,
                observed_deny: decision.observed_deny.is_some(),
                reason: match &decision.observed_deny {
                    Some(o) => format!("{} (observe: rule {o} would deny)", decision.reason()),
                    None => decision.reason(),
                },
                rule,
            },
            Verdict::Deny if self.mode == PolicyMode::Observe || observe => Outcome {
                allowed: true,
                observed_deny: true,
                reason: format!("observe: would be {}", decision.reason()),
                rule,
            },
            Verdict::Deny => Outcome {
                allowed: false,
                observed_deny: false,
                reason: decision.reason(),
                rule,
            },
        }
    }

    /// Registers a live, allowed connection. The receiver yields a reason when a policy
    /// replacement denies it; the registration ends when the guard is dropped.
    pub fn register(
        self: &Arc<Self>,
        side: Side,
        src: Party,
        dst: Party,
        port: u16,
        observe: bool,
    ) -> LiveGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = watch::channel(None);
        self.live.lock().expect("lock").insert(
            id,
            Live {
                src,
                dst,
                port,
                observe,
                side,
                close,
            },
        );
        LiveGuard {
            authz: self.clone(),
            id,
            closed,
        }
    }

    /// The DNS names the policy in force mentions.
    pub fn dns_names(&self) -> Vec<String> {
        self.current.load().policy.dns_names.clone()
    }

    /// Resolutions of those names (kept by `dns::keep_resolved`).
    pub fn dns(&self) -> &DnsTable {
        &self.dns
    }

    /// Re-makes every decision under the policy in force (after DNS answers changed):
    /// cached decisions are dropped and live connections no longer allowed are closed.
    pub fn reevaluate(&self) -> usize {
        self.replace(self.current.load().policy.clone())
    }

    /// Puts `policy` in force. Live connections it denies are told to close; returns how many.
    pub fn replace(&self, policy: Arc<CompiledPolicy>) -> usize {
        self.current
            .store(Arc::new(DecisionCache::new(policy, CACHE_ENTRIES)));
        let live = self.live.lock().expect("lock");
        let mut closed = 0;
        for conn in live.values() {
            let outcome = self.check(&conn.src, &conn.dst, conn.port, conn.observe);
            if !outcome.allowed {
                let side = match conn.side {
                    Side::Ingress => "ingress",
                    Side::Egress => "egress",
                };
                let _ = conn.close.send(Some(format!(
                    "closed by policy reload ({side}): {}",
                    outcome.reason
                )));
                closed += 1;
            }
        }
        drop(live);
        self.reloads.send_modify(|n| *n += 1);
        closed
    }

    pub fn live_count(&self) -> usize {
        self.live.lock().expect("lock").len()
    }
}

pub struct LiveGuard {
    authz: Arc<Authorizer>,
    id: u64,
    closed: watch::Receiver<Option<String>>,
}

impl LiveGuard {
    /// The revocation reason, if policy has revoked this connection already.
    pub fn revocation(&self) -> Option<String> {
        self.closed.borrow().clone()
    }

    /// Resolves with the reason when policy revokes this connection; never otherwise.
    pub async fn revoked(&mut self) -> String {
        loop {
            if let Some(reason) = self.closed.borrow_and_update().clone() {
                return reason;
            }
            if self.closed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.authz.live.lock().expect("lock").remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Arc<CompiledPolicy> {
        tessera_policy::load("p.yaml", text).unwrap()
    }

    const WEB_API: &str = "rules:\n  - {name: web-api, action: allow, from: {labels: [app=web]}, to: {labels: [app=api]}}\n";

    fn party(s: &str) -> Party {
        Party::workload(Labels::parse(s).unwrap(), None)
    }

    #[test]
    fn enforce_observe_and_workload_observe() {
        let a = Authorizer::new(policy(WEB_API), PolicyMode::Enforce);
        let ok = a.check(&party("app=web"), &party("app=api"), 80, false);
        assert!(ok.allowed && !ok.observed_deny);
        assert_eq!(ok.rule.as_deref(), Some("web-api"));
        let no = a.check(&party("app=api"), &party("app=web"), 80, false);
        assert!(!no.allowed);
        assert_eq!(no.reason, "denied: no rule allows it (default deny)");
        let watched = a.check(&party("app=api"), &party("app=web"), 80, true);
        assert!(
            watched.allowed && watched.observed_deny,
            "workload in observe mode"
        );
        let o = Authorizer::new(policy(WEB_API), PolicyMode::Observe);
        let r = o.check(&party("app=api"), &party("app=web"), 80, false);
        assert!(r.allowed && r.observed_deny);
        assert!(r.reason.starts_with("observe: would be denied"));
    }

    #[tokio::test]
    async fn a_replacement_closes_exactly_the_connections_it_denies() {
        let a = Arc::new(Authorizer::new(policy(WEB_API), PolicyMode::Enforce));
        let mut web_api = a.register(Side::Egress, party("app=web"), party("app=api"), 80, false);
        let mut other = a.register(
            Side::Ingress,
            party("app=web,team=x"),
            party("app=api"),
            80,
            false,
        );
        assert_eq!(a.live_count(), 2);
        let only_team_x = "rules:\n  - {name: x, action: allow, from: {labels: [team=x]}, to: {labels: [app=api]}}\n";
        assert_eq!(a.replace(policy(only_team_x)), 1);
        let reason = tokio::time::timeout(std::time::Duration::from_secs(1), web_api.revoked())
            .await
            .unwrap();
        assert_eq!(
            reason,
            "closed by policy reload (egress): denied: no rule allows it (default deny)"
        );
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), other.revoked())
                .await
                .is_err(),
            "still allowed"
        );
        drop(web_api);
        assert_eq!(a.live_count(), 1);
        // New checks see the new policy (the old cached decision is gone).
        assert!(
            !a.check(&party("app=web"), &party("app=api"), 80, false)
                .allowed
        );
    }
}
