//! Unauthenticated refusals, aggregated: a flood of spoofed SYNs, ACKs or TLS hellos must
//! cost a bounded number of flow records, not one per packet.
//!
//! A refusal whose source proved no identity (inbound or direct, denied or failed, no
//! SPIFFE name and no workload) is keyed by (direction, source prefix, destination address
//! and port, code, verdict). Per interval, the first refusal of a key is written at once,
//! as it is (count 1), so a single refusal is seen without delay; the others of that key
//! are only counted, and one summary record per key carries their count when the interval
//! ends. At most [`MAX_KEYS`] keys per interval: past that, refusals go to one overflow key
//! per (direction, code, verdict), whose source is the whole address space and whose port
//! is 0. So an interval writes at most `2 × (MAX_KEYS + overflow keys)` records, whatever
//! arrives; every refusal is still counted, in a record's `count`.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use crate::{
    code::Code,
    flow::{Direction, Endpoint, FlowRecord, Mode, Verdict},
    limits::{Drops, Limit, prefix},
};

/// Keys an interval aggregates separately at most (see the module doc). 256 distinct
/// prefix/port/code combinations per interval is far more than legitimate refusals need
/// to be told apart, and bounds an interval's records to a few hundred.
pub const MAX_KEYS: usize = 256;

/// How long an interval lasts (ms): a summary record per key at most this late.
pub const INTERVAL_MS: u64 = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    direction: Direction,
    /// The source prefix; None: the overflow key (any source).
    src: Option<(IpAddr, u8)>,
    /// The destination; unspecified with port 0 for the overflow key.
    dst: SocketAddr,
    code: Code,
    verdict: Verdict,
}

/// Refusals of one key beyond its first, this interval.
struct Pending {
    count: u64,
    /// The latest such refusal (its reason and destination go in the summary).
    latest: Option<FlowRecord>,
    first_ms: u64,
    last_ms: u64,
}

struct State {
    since_ms: u64,
    keys: HashMap<Key, Pending>,
    /// Keys of this interval other than the overflow ones.
    regular: usize,
}

pub struct Refusals {
    interval_ms: u64,
    max_keys: usize,
    drops: Arc<Drops>,
    state: Mutex<State>,
}

/// Whether `r` is a refusal of a source that proved no identity: inbound or direct,
/// denied or failed, without a verified workload identity, and not a request on a tunnel
/// whose peer enforcer mutual TLS authenticated (in tunnel mode a source enforcer is named
/// only then; in handshake mode it is only the one the source address points at).
pub fn unauthenticated(r: &FlowRecord) -> bool {
    let peer_authenticated = r.mode == Mode::Tunnel && r.src.enforcer.is_some();
    matches!(r.direction, Direction::Inbound | Direction::Direct)
        && matches!(r.verdict, Verdict::Denied | Verdict::Error)
        && r.src.spiffe.is_none()
        && r.src.workload.is_none()
        && !peer_authenticated
}

impl Refusals {
    pub fn new(drops: Arc<Drops>) -> Self {
        Self::with_bounds(drops, INTERVAL_MS, MAX_KEYS)
    }

    pub fn with_bounds(drops: Arc<Drops>, interval_ms: u64, max_keys: usize) -> Self {
        Self {
            interval_ms,
            max_keys,
            drops,
            state: Mutex::new(State {
                since_ms: 0,
                keys: HashMap::new(),
                regular: 0,
            }),
        }
    }

    /// Takes a record: returns it to be written now (not a refusal to aggregate, or the
    /// first of its key this interval, then with count 1), or None when it was counted
    /// into its key's summary.
    pub fn add(&self, mut rec: FlowRecord) -> Option<FlowRecord> {
        if !unauthenticated(&rec) {
            return Some(rec);
        }
        let mut key = Key {
            direction: rec.direction,
            src: Some(prefix(rec.src.addr.ip())),
            dst: rec.dst.addr,
            code: rec.code,
            verdict: rec.verdict,
        };
        let at = rec.start_ms;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.keys.contains_key(&key) && state.regular >= self.max_keys {
            self.drops.hit(Limit::RefusalKeys);
            let any = match rec.dst.addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            key.src = None;
            key.dst = SocketAddr::new(any, 0);
        }
        match state.keys.get_mut(&key) {
            Some(p) => {
                self.drops.hit(Limit::RefusalsAggregated);
                p.count += 1;
                p.first_ms = if p.count == 1 { at } else { p.first_ms.min(at) };
                p.last_ms = p.last_ms.max(at + rec.duration_ms);
                p.latest = Some(rec);
                None
            }
            None => {
                if key.src.is_some() {
                    state.regular += 1;
                }
                state.keys.insert(
                    key,
                    Pending {
                        count: 0,
                        latest: None,
                        first_ms: at,
                        last_ms: at,
                    },
                );
                rec.count = Some(1);
                Some(rec)
            }
        }
    }

    /// When the interval is over (or `force`: at shutdown), the summaries of its keys, and
    /// a new interval starts.
    pub fn drain(&self, now_ms: u64, force: bool) -> Vec<FlowRecord> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.since_ms == 0 {
            state.since_ms = now_ms;
        }
        if !force && now_ms.saturating_sub(state.since_ms) < self.interval_ms {
            return Vec::new();
        }
        state.since_ms = now_ms;
        state.regular = 0;
        state
            .keys
            .drain()
            .filter_map(|(key, p)| summary(key, p))
            .collect()
    }
}

/// One record for the `p.count` refusals of `key` after its first.
fn summary(key: Key, p: Pending) -> Option<FlowRecord> {
    let mut rec = p.latest?;
    rec.start_ms = p.first_ms;
    rec.duration_ms = p.last_ms.saturating_sub(p.first_ms);
    rec.count = Some(p.count);
    rec.bytes_sent = 0;
    rec.bytes_received = 0;
    let (net, len) = key.src.unwrap_or((IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
    let (net, len) = match (key.src, key.dst.ip()) {
        (None, IpAddr::V6(_)) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        _ => (net, len),
    };
    let mut src = Endpoint::addr(SocketAddr::new(net, 0));
    src.prefix = Some(format!("{net}/{len}"));
    src.enforcer = rec.src.enforcer.take();
    rec.src = src;
    if key.src.is_none() {
        let mut dst = Endpoint::addr(key.dst);
        dst.enforcer = rec.dst.enforcer.take();
        rec.dst = dst;
        rec.rule = None;
    }
    rec.reason = format!("{} refusals like: {}", p.count, rec.reason);
    Some(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(src: &str, port: u16, code: Code, at: u64) -> FlowRecord {
        let mut r = FlowRecord::new(
            "host-b",
            crate::flow::Mode::Handshake,
            Direction::Inbound,
            Endpoint::addr(src.parse().unwrap()),
            Endpoint::addr(SocketAddr::new("10.77.0.2".parse().unwrap(), port)),
            at,
        );
        r.refuse(code, format!("refused {src}"));
        r
    }

    #[test]
    fn the_first_refusal_of_a_key_is_written_the_rest_summarised_with_their_count() {
        let drops = Arc::new(Drops::default());
        let agg = Refusals::with_bounds(drops.clone(), 1_000, 4);
        assert!(agg.drain(100, false).is_empty());
        let first = agg.add(refusal("203.0.113.7:40001", 8080, Code::NoHandshake, 100));
        assert_eq!(first.as_ref().and_then(|r| r.count), Some(1));
        assert_eq!(
            first.unwrap().src.addr.port(),
            40001,
            "the first is as it was"
        );
        // Same /24, other ports and hosts: one key.
        for i in 0..100u16 {
            let src = format!("203.0.113.{}:{}", i % 250, 20000 + i);
            assert!(
                agg.add(refusal(&src, 8080, Code::NoHandshake, 200 + u64::from(i)))
                    .is_none()
            );
        }
        // An identified source, or a request on a tunnel its enforcer authenticated, is
        // not aggregated.
        let mut ok = refusal("203.0.113.7:40002", 8080, Code::Policy, 300);
        ok.src.spiffe = Some("spiffe://x".into());
        assert!(agg.add(ok).is_some());
        for _ in 0..2 {
            let mut tunnelled = refusal("203.0.113.7:40003", 8080, Code::Replay, 300);
            tunnelled.mode = Mode::Tunnel;
            tunnelled.src.enforcer = Some("host-a".into());
            assert!(agg.add(tunnelled).is_some_and(|r| r.count.is_none()));
        }
        // In handshake mode the enforcer a source address points at proves nothing.
        let mut claimed = refusal("203.0.113.8:40004", 8080, Code::NoHandshake, 300);
        claimed.src.enforcer = Some("host-a".into());
        assert!(agg.add(claimed).is_none(), "counted with the first");
        assert!(agg.drain(500, false).is_empty(), "interval not over");
        let out = agg.drain(1_200, false);
        assert_eq!(out.len(), 1, "{out:?}");
        let s = &out[0];
        assert_eq!(s.count, Some(101));
        assert_eq!(s.src.prefix.as_deref(), Some("203.0.113.0/24"));
        assert_eq!(s.src.addr.port(), 0, "no ephemeral port in a summary");
        assert_eq!((s.start_ms, s.duration_ms), (200, 100));
        assert_eq!(drops.get(Limit::RefusalsAggregated), 101);
    }

    #[test]
    fn keys_per_interval_are_bounded_by_an_overflow_key() {
        let drops = Arc::new(Drops::default());
        let agg = Refusals::with_bounds(drops.clone(), 1_000, 4);
        agg.drain(1, false);
        let written = (0..10_000u32)
            .filter_map(|i| {
                let src = format!(
                    "{}.{}.{}.1:{}",
                    1 + i % 200,
                    (i >> 8) as u8,
                    i as u8,
                    1024 + i % 60000
                );
                agg.add(refusal(&src, (i % 50_000) as u16 + 1, Code::NotServed, 10))
            })
            .count();
        assert_eq!(written, 5, "4 keys and the overflow key's first");
        let out = agg.drain(2_000, false);
        assert_eq!(out.len(), 1, "only the overflow key had more");
        assert_eq!(out[0].count, Some(9_995));
        assert_eq!(out[0].src.prefix.as_deref(), Some("0.0.0.0/0"));
        assert_eq!(out[0].dst.addr.port(), 0);
        assert_eq!(drops.get(Limit::RefusalKeys), 9_996);
        // A new interval: keys start again.
        assert!(
            agg.add(refusal("198.51.100.1:9", 80, Code::NotServed, 2_100))
                .is_some()
        );
    }
}
