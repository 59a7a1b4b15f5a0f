//! `tessera flows --log` and `tessera map`: flow logs (JSON lines) of one or more enforcers
//! and the connectivity table printed from a map.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use tessera_proxy::flow::FlowRecord;

use crate::map::Map;

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

pub fn table(map: &Map) -> String {
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
    let rows: Vec<[String; 10]> = map
        .edges
        .iter()
        .map(|e| {
            [
                e.key.src.clone(),
                e.key.dst.clone(),
                e.key.port_label(),
                if e.new {
                    format!("{} NEW", e.key.verdict)
                } else {
                    e.key.verdict.clone()
                },
                e.stats.connections.to_string(),
                e.stats.bytes_sent.to_string(),
                e.stats.bytes_received.to_string(),
                e.reporters.iter().cloned().collect::<Vec<_>>().join(","),
                e.stats.rules.iter().cloned().collect::<Vec<_>>().join(","),
                e.stats.reason.clone(),
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
    use tessera_proxy::flow::{Direction, Endpoint, Verdict};

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
                dns_name: None,
                labels: Default::default(),
                prefix: None,
            },
            dst: Endpoint {
                addr: "10.77.0.2:8080".parse().unwrap(),
                workload: Some("api".into()),
                enforcer: Some("host-b".into()),
                pid: None,
                uid: None,
                spiffe: None,
                dns_name: None,
                labels: Default::default(),
                prefix: None,
            },
            protocol: Default::default(),
            mode: Default::default(),
            verdict,
            code: Default::default(),
            rule: None,
            reason: if verdict == Verdict::Denied {
                "unauthenticated".into()
            } else {
                String::new()
            },
            bytes_sent: bytes,
            bytes_received: 2 * bytes,
            pooled: None,
            count: None,
            packets: None,
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
        let m = crate::map::from_records(&records);
        let e = &m.edges;
        assert_eq!(e.len(), 2);
        let allowed = e.iter().find(|e| e.key.verdict == "allowed").unwrap();
        assert_eq!(
            (allowed.key.src.as_str(), allowed.key.dst.as_str()),
            ("web@host-a", "api@host-b")
        );
        assert_eq!(
            (
                allowed.stats.connections,
                allowed.stats.bytes_sent,
                allowed.stats.bytes_received
            ),
            (2, 15, 30)
        );
        assert_eq!(allowed.reporters.len(), 2);
        let denied = e.iter().find(|e| e.key.verdict == "denied").unwrap();
        assert_eq!(denied.key.src, "10.77.0.1 (unauthenticated)");
        assert_eq!(denied.stats.reason, "unauthenticated");
        assert!(m.nodes.iter().any(|n| n.name == "web@host-a"));
        assert!(crate::map::dot(&m).contains("\"web@host-a\" -> \"api@host-b\""));
        let t = table(&m);
        assert!(t.starts_with("SOURCE"));
        assert!(t.contains("web@host-a") && t.contains("unauthenticated"));
    }
}
