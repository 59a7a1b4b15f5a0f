//! `tessera flows`: reads flow logs (JSON lines) of one or more enforcers and prints the
//! connectivity summary: one row per (source, destination, port, verdict).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
};

use anyhow::{Context, Result};
use serde::Serialize;
use tessera_proxy::flow::{Endpoint, FlowRecord, Verdict};

#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Edge {
    pub src: String,
    pub dst: String,
    pub port: u16,
    pub verdict: String,
    /// Connections (the larger of the counts its reporters give: both ends record one).
    pub connections: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub reporters: BTreeSet<String>,
    /// The policy rules that decided, at either end.
    pub rules: BTreeSet<String>,
    /// A refusal reason, when there was one.
    pub reason: String,
}

#[derive(Clone, Copy)]
enum Role {
    Source,
    Destination,
}

fn label(e: &Endpoint, role: Role) -> String {
    match (&e.workload, &e.enforcer, role) {
        (Some(w), Some(enf), _) => format!("{w}@{enf}"),
        (Some(w), None, _) => w.clone(),
        // No workload behind it: a peer nobody vouched for, or a destination without an enforcer.
        (None, _, Role::Source) => format!("{} (unauthenticated)", e.addr.ip()),
        (None, Some(enf), Role::Destination) => format!("{} (via {enf})", e.addr.ip()),
        (None, None, Role::Destination) => format!("{} (external)", e.addr.ip()),
    }
}

pub fn read(paths: &[impl AsRef<Path>]) -> Result<Vec<FlowRecord>> {
    let mut out = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            out.push(
                serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: not a flow record", path.display(), i + 1))?,
            );
        }
    }
    Ok(out)
}

pub fn edges(records: &[FlowRecord]) -> Vec<Edge> {
    // (src, dst, port, verdict) -> reporter -> (count, sent, received)
    type Counts = BTreeMap<String, (u64, u64, u64)>;
    let mut by_edge: BTreeMap<(String, String, u16, String), (Counts, BTreeSet<String>, String)> =
        BTreeMap::new();
    for r in records {
        let verdict = match r.verdict {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::ObservedDeny => "observed-would-deny",
            Verdict::Error => "error",
        };
        let key = (
            label(&r.src, Role::Source),
            label(&r.dst, Role::Destination),
            r.dst.addr.port(),
            verdict.to_owned(),
        );
        let (reporters, rules, reason) = by_edge.entry(key).or_default();
        rules.extend(r.rule.clone());
        let c = reporters.entry(r.reporter.clone()).or_default();
        *c = (c.0 + 1, c.1 + r.bytes_sent, c.2 + r.bytes_received);
        if reason.is_empty() && !r.reason.is_empty() {
            *reason = r.reason.clone();
        }
    }
    by_edge
        .into_iter()
        .map(
            |((src, dst, port, verdict), (reporters, rules, reason))| Edge {
                src,
                dst,
                port,
                verdict,
                connections: reporters.values().map(|c| c.0).max().unwrap_or(0),
                bytes_sent: reporters.values().map(|c| c.1).max().unwrap_or(0),
                bytes_received: reporters.values().map(|c| c.2).max().unwrap_or(0),
                reporters: reporters.into_keys().collect(),
                rules,
                reason,
            },
        )
        .collect()
}

pub fn table(edges: &[Edge]) -> String {
    let headers = [
        "SOURCE",
        "DESTINATION",
        "PORT",
        "VERDICT",
        "CONNS",
        "BYTES OUT",
        "BYTES BACK",
        "SEEN BY",
        "RULE",
        "REASON",
    ];
    let rows: Vec<[String; 10]> = edges
        .iter()
        .map(|e| {
            [
                e.src.clone(),
                e.dst.clone(),
                e.port.to_string(),
                e.verdict.clone(),
                e.connections.to_string(),
                e.bytes_sent.to_string(),
                e.bytes_received.to_string(),
                e.reporters.iter().cloned().collect::<Vec<_>>().join(","),
                e.rules.iter().cloned().collect::<Vec<_>>().join(","),
                e.reason.clone(),
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proxy::flow::Direction;

    fn rec(
        reporter: &str,
        direction: Direction,
        verdict: Verdict,
        src_wl: Option<&str>,
        bytes: u64,
    ) -> FlowRecord {
        FlowRecord {
            start_ms: 0,
            duration_ms: 1,
            reporter: reporter.into(),
            direction,
            src: Endpoint {
                addr: "10.77.0.1:5000".parse().unwrap(),
                workload: src_wl.map(Into::into),
                enforcer: src_wl.map(|_| "host-a".into()),
                pid: None,
                uid: None,
                spiffe: None,
            },
            dst: Endpoint {
                addr: "10.77.0.2:8080".parse().unwrap(),
                workload: Some("api".into()),
                enforcer: Some("host-b".into()),
                pid: None,
                uid: None,
                spiffe: None,
            },
            verdict,
            rule: None,
            reason: if verdict == Verdict::Denied {
                "unauthenticated".into()
            } else {
                String::new()
            },
            bytes_sent: bytes,
            bytes_received: 2 * bytes,
            pooled: None,
        }
    }

    #[test]
    fn both_ends_of_a_connection_make_one_edge_and_refusals_another() {
        let records = vec![
            rec(
                "host-a",
                Direction::Outbound,
                Verdict::Allowed,
                Some("web"),
                10,
            ),
            rec(
                "host-b",
                Direction::Inbound,
                Verdict::Allowed,
                Some("web"),
                10,
            ),
            rec(
                "host-a",
                Direction::Outbound,
                Verdict::Allowed,
                Some("web"),
                5,
            ),
            rec(
                "host-b",
                Direction::Inbound,
                Verdict::Allowed,
                Some("web"),
                5,
            ),
            rec("host-b", Direction::Direct, Verdict::Denied, None, 0),
        ];
        let e = edges(&records);
        assert_eq!(e.len(), 2);
        let allowed = e.iter().find(|e| e.verdict == "allowed").unwrap();
        assert_eq!(
            (allowed.src.as_str(), allowed.dst.as_str()),
            ("web@host-a", "api@host-b")
        );
        assert_eq!(
            (
                allowed.connections,
                allowed.bytes_sent,
                allowed.bytes_received
            ),
            (2, 15, 30)
        );
        assert_eq!(allowed.reporters.len(), 2);
        let denied = e.iter().find(|e| e.verdict == "denied").unwrap();
        assert_eq!(denied.src, "10.77.0.1 (unauthenticated)");
        assert_eq!(denied.reason, "unauthenticated");
        let t = table(&e);
        assert!(t.starts_with("SOURCE"));
        assert!(t.contains("web@host-a") && t.contains("unauthenticated"));
    }
}
