//! Decisions memoised per (source identity, destination identity, port).
//!
//! Identities are interned once (a label set and address become a small number), so a
//! cached decision costs one hash-map probe on three integers. A cache belongs to one
//! compiled policy: a reload builds a new one, which is how decisions are invalidated.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use rustc_hash::FxHashMap;

use crate::{
    compile::{CompactDecision, CompiledPolicy, Decision, Subject},
    labels::Labels,
};

/// An interned subject: stable for the life of the process.
pub type SubjectId = u32;

/// What identifies a subject: its labels (if it has an identity) and its address.
type SubjectKey = (Option<Labels>, Option<IpAddr>);

/// The id of a subject the interner had no room for: its decisions are never cached.
pub const UNINTERNED: SubjectId = SubjectId::MAX;

/// Subjects interned at most. Interned ids live as long as the process, and every
/// external address is a subject of its own: without a bound, a flood of spoofed sources
/// would grow the interner forever. 65,536 subjects (a few MB) cover every workload
/// identity and many external peers; later ones are decided without the cache.
pub const MAX_SUBJECTS: usize = 65_536;

pub struct Interner {
    ids: RwLock<HashMap<SubjectKey, SubjectId>>,
    max: usize,
    /// Subjects not interned because the interner was full.
    refused: std::sync::atomic::AtomicU64,
}

impl Default for Interner {
    fn default() -> Self {
        Self::with_capacity(MAX_SUBJECTS)
    }
}

impl Interner {
    /// An interner of at most `max` subjects.
    pub fn with_capacity(max: usize) -> Self {
        Self {
            ids: RwLock::default(),
            max: max.min(UNINTERNED as usize),
            refused: Default::default(),
        }
    }

    /// The subject's id; [`UNINTERNED`] when it is new and the interner is full.
    pub fn intern(&self, labels: Option<&Labels>, addr: Option<IpAddr>) -> SubjectId {
        let key = (labels.cloned(), addr);
        if let Some(id) = self.ids.read().expect("lock").get(&key) {
            return *id;
        }
        let mut ids = self.ids.write().expect("lock");
        let next = ids.len();
        if next >= self.max && !ids.contains_key(&key) {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return UNINTERNED;
        }
        *ids.entry(key).or_insert(next as SubjectId)
    }

    /// Subjects not interned because the interner was full.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.ids.read().expect("lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct DecisionCache {
    pub policy: Arc<CompiledPolicy>,
    map: RwLock<FxHashMap<(SubjectId, SubjectId, u16), CompactDecision>>,
    max_entries: usize,
}

impl DecisionCache {
    pub fn new(policy: Arc<CompiledPolicy>, max_entries: usize) -> Self {
        Self {
            policy,
            map: RwLock::default(),
            max_entries,
        }
    }

    /// The decision for this pair, from the cache or computed (and remembered).
    pub fn decide(
        &self,
        (src_id, src): (SubjectId, &Subject<'_>),
        (dst_id, dst): (SubjectId, &Subject<'_>),
        port: u16,
        resolved: &dyn Fn(&str, IpAddr) -> bool,
    ) -> Decision {
        if let Some(d) = self.get(src_id, dst_id, port) {
            return self.policy.expand(d);
        }
        let decision = self.policy.decide_compact(src, dst, port, resolved);
        if src_id == UNINTERNED || dst_id == UNINTERNED {
            // Not interned: no key to cache it under.
            return self.policy.expand(decision);
        }
        let mut map = self.map.write().expect("lock");
        if map.len() >= self.max_entries {
            map.clear(); // bounded memory; the hot pairs come back at once
        }
        map.insert((src_id, dst_id, port), decision);
        self.policy.expand(decision)
    }

    /// Cached lookup only: the compact decision (rule indices; `policy.expand` names them).
    pub fn get(&self, src: SubjectId, dst: SubjectId, port: u16) -> Option<CompactDecision> {
        self.map
            .read()
            .expect("lock")
            .get(&(src, dst, port))
            .copied()
    }

    pub fn len(&self) -> usize {
        self.map.read().expect("lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::no_dns;

    #[test]
    fn cached_decisions_match_fresh_ones_and_memory_is_bounded() {
        let policy = crate::load("p.yaml", "rules:\n  - {name: a, action: allow, from: {labels: [app=web]}, to: {labels: [app=api]}}\n").unwrap();
        let cache = DecisionCache::new(policy.clone(), 2);
        let interner = Interner::default();
        let (web, api) = (
            Labels::parse("app=web").unwrap(),
            Labels::parse("app=api").unwrap(),
        );
        let (w, a) = (
            interner.intern(Some(&web), None),
            interner.intern(Some(&api), None),
        );
        assert_eq!(
            interner.intern(Some(&Labels::parse("app=web").unwrap()), None),
            w,
            "same labels, same id"
        );
        let (sw, sa) = (
            Subject {
                labels: Some(&web),
                addr: None,
            },
            Subject {
                labels: Some(&api),
                addr: None,
            },
        );
        assert!(cache.get(w, a, 80).is_none());
        let d = cache.decide((w, &sw), (a, &sa), 80, &no_dns);
        assert!(d.allowed());
        assert_eq!(cache.get(w, a, 80).map(|c| policy.expand(c)), Some(d));
        assert!(!cache.decide((a, &sa), (w, &sw), 80, &no_dns).allowed());
        cache.decide((w, &sw), (a, &sa), 81, &no_dns);
        assert!(cache.len() <= 2);
    }

    #[test]
    fn the_interner_is_bounded_and_uninterned_subjects_are_decided_uncached() {
        let policy = crate::load("p.yaml", "rules:\n  - {name: a, action: allow, from: {cidr: 10.0.0.0/8}, to: {labels: [app=api]}}\n").unwrap();
        let cache = DecisionCache::new(policy, 1 << 10);
        let interner = Interner::with_capacity(3);
        let api = Labels::parse("app=api").unwrap();
        let a = interner.intern(Some(&api), None);
        let ids: Vec<_> = (0..100u8)
            .map(|i| interner.intern(None, Some(IpAddr::from([10, 0, 0, i]))))
            .collect();
        assert_eq!(interner.len(), 3);
        assert_eq!(interner.refused(), 98);
        assert_eq!(ids[50], UNINTERNED);
        assert_eq!(
            interner.intern(Some(&api), None),
            a,
            "known subjects keep their id"
        );
        let sa = Subject {
            labels: Some(&api),
            addr: None,
        };
        let addr = IpAddr::from([10, 0, 0, 50]);
        let src = Subject {
            labels: None,
            addr: Some(addr),
        };
        assert!(
            cache
                .decide((UNINTERNED, &src), (a, &sa), 80, &no_dns)
                .allowed()
        );
        assert_eq!(cache.len(), 0, "nothing cached under the uninterned id");
    }
}
