//! Prometheus metrics (`GET /metrics`), fed by flow records and policy reloads.
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use std::sync::Arc;

use tessera_proxy::{
    code::{Code, Kind},
    flow::FlowRecord,
    limits::{Drops, Limit},
};

use crate::map::verdict_name;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Connection {
    src: String,
    dst: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Bytes {
    src: String,
    dst: String,
    /// `sent` (source to destination) or `received`.
    direction: String,
}

/// A refusal code as a label value: the label set is the closed set of codes.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct CodeLabel(Code);

impl EncodeLabelValue for CodeLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.0.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: CodeLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    /// One of the closed set [`Limit::ALL`].
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reload {
    result: String,
}

/// Reads a count kept elsewhere.
type Counted = Box<dyn Fn() -> u64 + Send + Sync>;

/// The source label of connections from sources without an identity.
pub const UNAUTHENTICATED: &str = "unauthenticated";

pub struct Metrics {
    registry: Registry,
    connections: Family<Connection, Counter>,
    refusals: Family<Reason, Counter>,
    bytes: Family<Bytes, Counter>,
    token_failures: Family<Reason, Counter>,
    reloads: Family<Reload, Counter>,
    open: Gauge,
    /// Reads the number of open connections at scrape time.
    count_open: std::sync::OnceLock<Box<dyn Fn() -> usize + Send + Sync>>,
    dropped_flows: Counter,
    /// Reads the number of flow records dropped (a full writer queue) at scrape time.
    count_dropped_flows: std::sync::OnceLock<Box<dyn Fn() -> u64 + Send + Sync>>,
    /// Connections a policy reload revoked that could not be closed (handshake mode).
    revocation_failures: Counter,
    /// Map edges first seen after the baseline window.
    new_edges: Counter,
    /// How often each bound on state or work was hit; the parts that enforce them count
    /// here, the counters are read at scrape time.
    pub drops: Arc<Drops>,
    limit_drops: Family<LimitLabel, Counter>,
    /// Bounds counted by parts that keep their own counter (the policy interner, the
    /// token verifier): read at scrape time.
    counted_elsewhere: std::sync::Mutex<Vec<(Limit, Counted)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tessera");
        let connections = Family::<Connection, Counter>::default();
        let refusals = Family::<Reason, Counter>::default();
        let bytes = Family::<Bytes, Counter>::default();
        let token_failures = Family::<Reason, Counter>::default();
        let reloads = Family::<Reload, Counter>::default();
        let open = Gauge::default();
        registry.register(
            "open_connections",
            "Connections open through this enforcer now (either direction)",
            open.clone(),
        );
        registry.register(
            "connections",
            "Connection attempts seen, by source and destination identity and verdict (allowed ones counted when they close)",
            connections.clone(),
        );
        registry.register(
            "refusals",
            "Refused or failed connections by reason code",
            refusals.clone(),
        );
        registry.register(
            "bytes",
            "Application bytes carried, by source and destination identity",
            bytes.clone(),
        );
        registry.register(
            "token_failures",
            "Identity tokens refused, by reason",
            token_failures.clone(),
        );
        registry.register(
            "policy_reloads",
            "Policy reloads by result (ok: in force; rejected: the previous policy stayed)",
            reloads.clone(),
        );
        let dropped_flows = Counter::default();
        registry.register(
            "flow_records_dropped",
            "Flow records dropped because the flow writer could not keep up (its queue is bounded)",
            dropped_flows.clone(),
        );
        let revocation_failures = Counter::default();
        registry.register(
            "revocation_failures",
            "Live connections a policy reload revoked that could not be closed (ss -K failed or the socket stayed open): they go on despite the policy",
            revocation_failures.clone(),
        );
        let new_edges = Counter::default();
        registry.register(
            "map_new_edges",
            "Edges of the connectivity map first seen after the baseline window ([flows] baseline_secs after the map's first edge): who talks to whom that did not before",
            new_edges.clone(),
        );
        let limit_drops = Family::<LimitLabel, Counter>::default();
        registry.register(
            "limit_drops",
            "Times a bound on what unauthenticated traffic can make the enforcer keep or do was hit, by bound (refusals aggregated, keys folded, caches full, handshakes refused, rate limits)",
            limit_drops.clone(),
        );
        for l in Limit::ALL {
            let _ = limit_drops.get_or_create(&LimitLabel { limit: l.as_str() });
        }
        Self {
            registry,
            drops: Arc::default(),
            limit_drops,
            counted_elsewhere: Default::default(),
            connections,
            refusals,
            bytes,
            token_failures,
            reloads,
            open,
            count_open: std::sync::OnceLock::new(),
            dropped_flows,
            count_dropped_flows: std::sync::OnceLock::new(),
            revocation_failures,
            new_edges,
        }
    }

    /// A map edge appeared after the baseline window.
    pub fn new_edge(&self) {
        self.new_edges.inc();
    }

    /// A revoked connection could not be closed.
    pub fn revocation_failed(&self) {
        self.revocation_failures.inc();
    }

    /// Counts a record whose source and destination nodes are named `src` and `dst`.
    /// A source without an identity is labelled `unauthenticated`, whatever its address:
    /// label values are never chosen by whoever can send a packet.
    pub fn observe(&self, r: &FlowRecord, src: &str, dst: &str) {
        let src = if src.ends_with(" (unauthenticated)") {
            UNAUTHENTICATED
        } else {
            src
        };
        let (src, dst) = (src.to_owned(), dst.to_owned());
        let n = r.attempts();
        self.connections
            .get_or_create(&Connection {
                src: src.clone(),
                dst: dst.clone(),
                verdict: verdict_name(r.verdict).into(),
            })
            .inc_by(n);
        for (direction, n) in [("sent", r.bytes_sent), ("received", r.bytes_received)] {
            if n > 0 {
                self.bytes
                    .get_or_create(&Bytes {
                        src: src.clone(),
                        dst: dst.clone(),
                        direction: direction.into(),
                    })
                    .inc_by(n);
            }
        }
        if !r.code.is_clean() {
            let reason = Reason {
                reason: CodeLabel(r.code),
            };
            self.refusals.get_or_create(&reason).inc_by(n);
            if r.code.kind() == Kind::Token {
                self.token_failures.get_or_create(&reason).inc_by(n);
            }
        }
    }

    /// Where the open-connections gauge comes from (read at each scrape).
    pub fn count_open_with(&self, f: impl Fn() -> usize + Send + Sync + 'static) {
        let _ = self.count_open.set(Box::new(f));
    }

    /// Where the dropped-flow-records counter comes from (read at each scrape).
    pub fn count_dropped_flows_with(&self, f: impl Fn() -> u64 + Send + Sync + 'static) {
        let _ = self.count_dropped_flows.set(Box::new(f));
    }

    /// Where the count of `limit` comes from, for a part that keeps its own counter (read
    /// at each scrape).
    pub fn count_limit_with(&self, limit: Limit, f: impl Fn() -> u64 + Send + Sync + 'static) {
        self.counted_elsewhere
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((limit, Box::new(f)));
    }

    pub fn policy_reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&Reload {
                result: if ok { "ok" } else { "rejected" }.into(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        if let Some(count) = self.count_open.get() {
            self.open.set(count() as i64);
        }
        if let Some(count) = self.count_dropped_flows.get() {
            let now = count();
            self.dropped_flows
                .inc_by(now.saturating_sub(self.dropped_flows.get()));
        }
        for (limit, count) in self
            .counted_elsewhere
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let (now, have) = (count(), self.drops.get(*limit));
            self.drops.add(*limit, now.saturating_sub(have));
        }
        for (l, now) in self.drops.all() {
            let c = self
                .limit_drops
                .get_or_create(&LimitLabel { limit: l.as_str() });
            c.inc_by(now.saturating_sub(c.get()));
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
