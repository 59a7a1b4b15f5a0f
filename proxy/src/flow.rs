//! Flow records: one per connection attempt the proxy sees, allowed or refused.
//!
//! Records go through a channel to a writer task that appends them as JSON lines to the
//! configured flow log, so the connection path never waits on the disk.
use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::SystemTime};

use serde::{Deserialize, Serialize};
use tokio::{io::AsyncWriteExt, sync::mpsc};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// A local workload's connection, captured and carried to a peer enforcer.
    Outbound,
    /// A tunnel from a peer enforcer, delivered to a local workload.
    Inbound,
    /// A connection that tried to reach a protected port directly (not through a tunnel).
    Direct,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
}

/// Which data path carried the connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Through the proxies and a mutual-TLS tunnel.
    #[default]
    Tunnel,
    /// Authenticated in its own TCP handshake; the data stayed in the kernel.
    Handshake,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Allowed,
    Denied,
    /// Policy denied it but the connection went ahead because of observe mode.
    #[serde(rename = "observed-would-deny")]
    ObservedDeny,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The workload's name, when it is an enrolled workload.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub workload: Option<String>,
    /// The enforcer that vouches for this end, when known.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub enforcer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub uid: Option<u32>,
    /// The SPIFFE name of the identity a verified token proved for this end.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub spiffe: Option<String>,
    /// For a peer without an enforcer: a policy `dns:` name that resolves to its address.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dns_name: Option<String>,
    /// Its identity labels (declared and derived), as policy saw them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub labels: BTreeMap<String, String>,
}

/// Labels as flow records carry them.
pub fn label_map(labels: &tessera_policy::Labels) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

impl Endpoint {
    pub fn addr(addr: SocketAddr) -> Self {
        Self {
            addr,
            workload: None,
            enforcer: None,
            pid: None,
            uid: None,
            spiffe: None,
            dns_name: None,
            labels: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Milliseconds since the Unix epoch when the connection was accepted.
    pub start_ms: u64,
    pub duration_ms: u64,
    /// The enforcer that wrote this record.
    pub reporter: String,
    pub direction: Direction,
    pub src: Endpoint,
    pub dst: Endpoint,
    /// Always `tcp` today.
    #[serde(default)]
    pub protocol: Protocol,
    /// The data path that carried it.
    #[serde(default)]
    pub mode: Mode,
    pub verdict: Verdict,
    /// Why it was refused or failed; empty when allowed and clean.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub reason: String,
    /// Why it was refused, as a short stable code for metrics and filters: `policy`,
    /// `policy-reload`, a token refusal (`no-token`, `bad-signature`, `expired`, `replay`,
    /// `wrong-session`, ...), `unauthenticated` (a direct connection), `not-served`,
    /// `peer-unreachable`, `workload-unreachable`, `bad-header`, `tls-handshake`,
    /// `no-capture`, `broken`. Empty when allowed and clean.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub code: String,
    /// The policy rule that decided at this end (none: default deny, or no policy step).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rule: Option<String>,
    /// Bytes from the source to the destination, and back.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Whether the tunnel came warm from the pool (outbound only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pooled: Option<bool>,
}

impl FlowRecord {
    /// A record of a connection attempt that starts now: no verdict yet (`error` until
    /// the path that handles it says otherwise), nothing transferred.
    pub fn new(
        reporter: &str,
        mode: Mode,
        direction: Direction,
        src: Endpoint,
        dst: Endpoint,
        start_ms: u64,
    ) -> Self {
        Self {
            start_ms,
            duration_ms: 0,
            reporter: reporter.to_owned(),
            direction,
            src,
            dst,
            protocol: Protocol::Tcp,
            mode,
            verdict: Verdict::Error,
            reason: String::new(),
            code: String::new(),
            rule: None,
            bytes_sent: 0,
            bytes_received: 0,
            pooled: None,
        }
    }

    /// A live connection closed because a new policy (or DNS answer) no longer allows it.
    pub fn revoked_by(&mut self, reason: String) {
        self.verdict = Verdict::Denied;
        self.reason = reason;
        self.code = "policy-reload".into();
    }

    /// The code for a record whose refusal site did not set one.
    pub fn default_code(&self) -> &'static str {
        match self.verdict {
            Verdict::Allowed if self.reason.is_empty() => "",
            Verdict::Allowed | Verdict::Error => "broken",
            Verdict::Denied | Verdict::ObservedDeny => "policy",
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Receives every flow record, off the connection path (in the writer task).
pub trait FlowSink: Send + Sync + 'static {
    fn record(&self, rec: std::sync::Arc<FlowRecord>);
}

/// Records the writer takes at once at most.
const BATCH: usize = 256;
/// How long records may wait to be written with the next ones.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(10);

/// Where flow records go. Cloning is cheap; dropping every clone ends the writer.
#[derive(Clone)]
pub struct FlowLog {
    tx: mpsc::UnboundedSender<FlowRecord>,
}

impl FlowLog {
    /// Starts the writer task; `path` of `None` keeps records in logs only. Every record
    /// also goes to `sink` (the enforcer's flow store), if any.
    pub fn start(
        path: Option<PathBuf>,
        sink: Option<std::sync::Arc<dyn FlowSink>>,
    ) -> std::io::Result<Self> {
        let file = match &path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)?,
                )
            }
            None => None,
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<FlowRecord>();
        tokio::spawn(async move {
            let mut file = file.map(tokio::fs::File::from_std);
            let mut batch = Vec::with_capacity(BATCH);
            let mut lines = Vec::with_capacity(512 * BATCH);
            // Records that arrive together are written together: one write (and one trip to
            // the blocking pool) per batch, not per record.
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                lines.clear();
                for rec in &batch {
                    // Per record at debug only: the flow log and the API are the record.
                    tracing::debug!(
                        target: "tessera::flow",
                        direction = ?rec.direction,
                        src = %rec.src.addr,
                        src_workload = rec.src.workload.as_deref().unwrap_or("-"),
                        dst = %rec.dst.addr,
                        dst_workload = rec.dst.workload.as_deref().unwrap_or("-"),
                        verdict = ?rec.verdict,
                        reason = %rec.reason,
                        bytes_sent = rec.bytes_sent,
                        bytes_received = rec.bytes_received,
                        "flow"
                    );
                    if file.is_some() && serde_json::to_writer(&mut lines, rec).is_ok() {
                        lines.push(b'\n');
                    }
                }
                if let Some(f) = file.as_mut() {
                    if let Err(e) = f.write_all(&lines).await {
                        tracing::warn!(error = %e, "cannot append to the flow log");
                    }
                    let _ = f.flush().await;
                }
                for rec in batch.drain(..) {
                    if let Some(sink) = &sink {
                        sink.record(std::sync::Arc::new(rec));
                    }
                }
                // Let the next records gather: at a high connection rate every send would
                // otherwise wake this task (a futex and an eventfd write per record).
                tokio::time::sleep(COALESCE).await;
            }
        });
        Ok(Self { tx })
    }

    pub fn record(&self, rec: FlowRecord) {
        let _ = self.tx.send(rec);
    }
}
