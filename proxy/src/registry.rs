//! The live connections of both data paths, and what a policy change does to them.
//!
//! Every connection that policy let through holds a [`ConnectionGuard`] for as long as it
//! lives (a tunnelled connection in its task; a handshake-mode connection in the watcher
//! that waits for its end). When a policy is applied ([`ConnectionRegistry::apply`]) or
//! DNS answers change (the same policy again, with a fresh cache) every live connection is decided
//! again and **the ones no longer allowed are revoked at once**: a reload is how an
//! operator cuts off access, and letting such connections run until they end would keep it
//! open indefinitely. A connection registered after a replacement it was not decided under
//! is decided again at registration, so none slips between a decision and its guard.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tessera_policy::CompiledPolicy;
use tokio::sync::watch;

use crate::{
    authz::{Attempt, Decisions, Ruling},
    dns::PolicyNames,
};

struct Live {
    /// Shared with whoever decided it (the fast path's connections share their key's).
    attempt: Arc<Attempt>,
    close: watch::Sender<Option<String>>,
}

pub struct ConnectionRegistry {
    decisions: Arc<Decisions>,
    live: Mutex<HashMap<u64, Live>>,
    next: AtomicU64,
    /// Bumped after each re-check (watchers of many connections wait on it).
    reloads: watch::Sender<u64>,
}

/// Why a connection was revoked, as its flow record says it.
fn revocation(attempt: &Attempt, ruling: &Ruling) -> String {
    format!(
        "closed by policy reload ({}): {}",
        attempt.side.as_str(),
        ruling.reason
    )
}

impl ConnectionRegistry {
    pub fn new(decisions: Arc<Decisions>) -> Self {
        Self {
            decisions,
            live: Mutex::default(),
            next: AtomicU64::new(1),
            reloads: watch::channel(0).0,
        }
    }

    pub fn decisions(&self) -> &Arc<Decisions> {
        &self.decisions
    }

    /// Changes each time live connections were re-checked (and the revoked ones told).
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Registers a connection that `ruling` allowed. If a policy was applied since that
    /// decision, it is decided again now: the guard then comes back already revoked.
    pub fn register(
        self: &Arc<Self>,
        attempt: impl Into<Arc<Attempt>>,
        ruling: &Ruling,
    ) -> ConnectionGuard {
        let attempt = attempt.into();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut live = self.lock();
        let revoked = (ruling.generation != self.decisions.generation())
            .then(|| self.decisions.check(&attempt))
            .filter(|now| !now.allowed)
            .map(|now| revocation(&attempt, &now));
        let (close, closed) = watch::channel(revoked.clone());
        if revoked.is_none() {
            live.insert(id, Live { attempt, close });
        }
        ConnectionGuard {
            registry: self.clone(),
            id,
            closed,
        }
    }

    /// Puts `policy` in force and revokes the live connections it denies; returns how many.
    pub fn apply(&self, policy: Arc<CompiledPolicy>) -> usize {
        // Under the lock: a registration either sees the new generation or is re-checked.
        let live = self.lock();
        self.decisions.replace(policy);
        drop(live);
        self.recheck()
    }

    /// Decides every live connection again under the decisions in force; revokes the ones
    /// no longer allowed and returns how many.
    fn recheck(&self) -> usize {
        let mut live = self.lock();
        let mut closed = 0;
        live.retain(|_, conn| {
            let ruling = self.decisions.check(&conn.attempt);
            if ruling.allowed {
                return true;
            }
            let _ = conn.close.send(Some(revocation(&conn.attempt, &ruling)));
            closed += 1;
            false
        });
        drop(live);
        self.reloads.send_modify(|n| *n += 1);
        closed
    }

    /// Revokes the live connections with a workload that enforcer `name` vouched for (it
    /// left the directory: revoked or removed by the control plane); returns how many.
    pub fn revoke_enforcer(&self, name: &str) -> usize {
        let reason = format!("closed: enforcer {name} left the directory");
        let by = |p: &crate::authz::Party| {
            p.labels
                .as_ref()
                .and_then(|l| l.get(crate::identity::reserved::ENFORCER))
                == Some(name)
        };
        let mut live = self.lock();
        let mut closed = 0;
        live.retain(|_, conn| {
            if by(&conn.attempt.src) || by(&conn.attempt.dst) {
                let _ = conn.close.send(Some(reason.clone()));
                closed += 1;
                false
            } else {
                true
            }
        });
        drop(live);
        if closed > 0 {
            // Handshake mode's watcher looks at its guards when told (it holds many): without
            // this, a revoked enforcer's connections there stayed open.
            self.reloads.send_modify(|n| *n += 1);
        }
        closed
    }

    pub fn live_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PolicyNames for ConnectionRegistry {
    fn names(&self) -> Vec<String> {
        self.decisions.dns_names()
    }
    fn resolutions_changed(&self) -> usize {
        // Cached decisions matched names against the old answers: the same policy again,
        // with a fresh cache (and a new generation, so in-flight decisions are re-made).
        self.apply(self.decisions.policy())
    }
}

/// A live connection's registration; it ends when the guard is dropped.
pub struct ConnectionGuard {
    registry: Arc<ConnectionRegistry>,
    id: u64,
    closed: watch::Receiver<Option<String>>,
}

impl ConnectionGuard {
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

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tessera_policy::Labels;

    use super::*;
    use crate::authz::{Party, PolicyMode, Side};

    fn policy(text: &str) -> Arc<CompiledPolicy> {
        tessera_policy::load("p.yaml", text).unwrap()
    }

    const WEB_API: &str = "rules:\n  - {name: web-api, action: allow, from: {labels: [app=web]}, to: {labels: [app=api]}}\n";
    const ONLY_TEAM_X: &str =
        "rules:\n  - {name: x, action: allow, from: {labels: [team=x]}, to: {labels: [app=api]}}\n";

    fn attempt(side: Side, src: &str) -> Attempt {
        Attempt {
            side,
            src: Party::workload(Labels::parse(src).unwrap(), None),
            dst: Party::workload(Labels::parse("app=api").unwrap(), None),
            port: 80,
            observe: false,
        }
    }

    fn registry() -> Arc<ConnectionRegistry> {
        let d = Decisions::new(policy(WEB_API), PolicyMode::Enforce, Default::default());
        Arc::new(ConnectionRegistry::new(Arc::new(d)))
    }

    fn admit(r: &Arc<ConnectionRegistry>, a: Attempt) -> ConnectionGuard {
        let ruling = r.decisions().check(&a);
        assert!(ruling.allowed);
        r.register(a, &ruling)
    }

    #[tokio::test]
    async fn applying_a_policy_revokes_exactly_the_connections_it_denies() {
        let r = registry();
        let mut web_api = admit(&r, attempt(Side::Egress, "app=web"));
        let mut other = admit(&r, attempt(Side::Ingress, "app=web,team=x"));
        assert_eq!(r.live_count(), 2);
        assert_eq!(r.apply(policy(ONLY_TEAM_X)), 1);
        let reason = tokio::time::timeout(Duration::from_secs(1), web_api.revoked())
            .await
            .unwrap();
        assert_eq!(
            reason,
            "closed by policy reload (egress): denied: no rule allows it (default deny)"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(50), other.revoked())
                .await
                .is_err(),
            "still allowed"
        );
        assert_eq!(r.live_count(), 1, "the revoked one is no longer watched");
        drop(web_api);
        drop(other);
        assert_eq!(r.live_count(), 0);
        // New checks see the new policy (the old cached decision is gone).
        assert!(
            !r.decisions()
                .check(&attempt(Side::Egress, "app=web"))
                .allowed
        );
    }

    #[test]
    fn a_connection_decided_before_a_reload_is_decided_again_at_registration() {
        let r = registry();
        let a = attempt(Side::Ingress, "app=web");
        let stale = r.decisions().check(&a);
        assert!(stale.allowed);
        r.apply(policy(ONLY_TEAM_X));
        let guard = r.register(a.clone(), &stale);
        assert_eq!(
            guard.revocation().as_deref(),
            Some("closed by policy reload (ingress): denied: no rule allows it (default deny)")
        );
        assert_eq!(r.live_count(), 0);
        // One decided under the policy in force is registered as it is.
        let x = attempt(Side::Ingress, "app=web,team=x");
        let fresh = r.decisions().check(&x);
        let guard = r.register(x, &fresh);
        assert_eq!(guard.revocation(), None);
        assert_eq!(r.live_count(), 1);
    }

    #[test]
    fn changed_resolutions_drop_cached_decisions() {
        let dns = Arc::new(crate::dns::DnsTable::default());
        let text = "rules:\n  - {name: r, action: allow, from: {labels: [app=web]}, to: {dns: registry.test}}\n";
        let d = Decisions::new(policy(text), PolicyMode::Enforce, dns.clone());
        let r = Arc::new(ConnectionRegistry::new(Arc::new(d)));
        let a = Attempt {
            side: Side::Egress,
            src: Party::workload(Labels::parse("app=web").unwrap(), None),
            dst: Party::external("192.0.2.7".parse().unwrap()),
            port: 80,
            observe: false,
        };
        dns.set("registry.test", ["192.0.2.7".parse().unwrap()].into());
        let ruling = r.decisions().check(&a);
        assert!(ruling.allowed);
        let guard = r.register(a.clone(), &ruling);
        dns.set("registry.test", ["192.0.2.8".parse().unwrap()].into());
        assert_eq!(PolicyNames::resolutions_changed(&*r), 1);
        assert!(!r.decisions().check(&a).allowed, "no stale cached decision");
        assert!(guard.revocation().is_some());
    }

    #[tokio::test]
    async fn reloads_are_announced_after_the_recheck() {
        let r = registry();
        let mut reloads = r.reloads();
        let guard = admit(&r, attempt(Side::Egress, "app=web"));
        r.apply(policy(ONLY_TEAM_X));
        tokio::time::timeout(Duration::from_secs(1), reloads.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(guard.revocation().is_some(), "told before the announcement");
    }

    /// Handshake mode's watcher looks at its guards only when reloads are announced: a
    /// revoked enforcer's connections must be announced too (they stayed open before).
    #[test]
    fn revoking_an_enforcer_tells_its_connections_and_announces_it() {
        let r = registry();
        let mut reloads = r.reloads();
        let by = |name: &str| {
            attempt(
                Side::Ingress,
                &format!("app=web,{}={name}", crate::identity::reserved::ENFORCER),
            )
        };
        let gone = admit(&r, by("host-c"));
        let kept = admit(&r, by("host-a"));
        assert_eq!(r.revoke_enforcer("host-c"), 1);
        assert!(reloads.has_changed().unwrap(), "announced");
        reloads.mark_unchanged();
        assert_eq!(
            gone.revocation().as_deref(),
            Some("closed: enforcer host-c left the directory")
        );
        assert_eq!(kept.revocation(), None);
        // Nothing of its left: nothing announced.
        assert_eq!(r.revoke_enforcer("host-c"), 0);
        assert!(!reloads.has_changed().unwrap());
    }
}
