//! Flow records: one per connection attempt the proxy sees, allowed or refused.
//!
//! A connection's record is owned by its [`FlowTracker`] from the first packet or accept
//! until it is written, **exactly once**: when the path that handles it finishes it, or,
//! if a path forgets (an early return, a panic, a dropped task), when the tracker is
//! dropped. Records then go through a bounded channel to a writer task that appends them
//! as JSON lines to the flow log, so the connection path never waits on the disk; a full
//! channel drops the record and counts it ([`FlowLog::dropped`]) instead of growing.
use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::{io::AsyncWriteExt, sync::mpsc};

use crate::{authz::Ruling, capture::Captured, code::Code, identity::Identity, refusals::Refusals};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// A local workload's connection, captured and carried to a peer enforcer.
    Outbound,
    /// A tunnel from a peer enforcer, delivered to a local workload.
    Inbound,
    /// A connection that tried to reach a protected port directly (not through a tunnel).
    Direct,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// A connection (records written before the field existed are TCP).
    #[default]
    Tcp,
    /// Datagrams between a workload and one peer address and port, over an interval.
    Udp,
    /// ICMP (or ICMPv6) packets between a workload and one peer address, over an interval.
    Icmp,
    /// A raw socket the workload tried to open (refused): no peer yet.
    Raw,
}

impl Protocol {
    pub fn is_tcp(&self) -> bool {
        *self == Protocol::Tcp
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::Raw => "raw",
        }
    }
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

impl Mode {
    /// Its name, as records and configuration files spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tunnel => "tunnel",
            Self::Handshake => "handshake",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// For a summary of unauthenticated refusals ([`crate::refusals`]): the source prefix
    /// it counts (`203.0.113.0/24`; `0.0.0.0/0` for the overflow of a flood); `addr` is
    /// then its network address with port 0.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub prefix: Option<String>,
}

/// Labels as flow records carry them.
pub fn label_map(labels: &tessera_policy::Labels) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

impl Endpoint {
    /// The identity a verified proof (or this host's own attestation) gave this end.
    pub fn identified(&mut self, id: &Identity) {
        self.spiffe = Some(id.spiffe.clone());
        self.labels = label_map(&id.labels);
    }

    /// As [`Endpoint::identified`], and its workload and enforcer from the identity's
    /// reserved labels (an identity from a peer, where nothing else names them).
    pub fn identified_by_peer(&mut self, id: &Identity) {
        use crate::identity::reserved;
        self.workload = id.labels.get(reserved::WORKLOAD).map(str::to_owned);
        if let Some(e) = id.labels.get(reserved::ENFORCER) {
            self.enforcer = Some(e.to_owned());
        }
        self.identified(id);
    }

    /// The source of a captured connection: who made it, on this enforcer's word.
    pub fn captured(&mut self, c: &Captured, enforcer: &str) {
        self.workload = Some(c.origin.workload.clone()).filter(|w| !w.is_empty());
        self.pid = Some(c.origin.pid);
        self.uid = Some(c.origin.uid);
        self.enforcer = Some(enforcer.to_owned());
        self.identified(&c.identity);
    }

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
            prefix: None,
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
    /// `tcp` (a connection: the default, also for records written before the field
    /// existed), `udp` or `icmp` (the packets of one workload to or from one peer and
    /// port over an interval), `raw` (a refused raw socket).
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
    /// `no-capture`, `broken`, `rate-limited`, `overloaded`. Empty when allowed and clean.
    #[serde(skip_serializing_if = "Code::is_clean", default)]
    pub code: Code,
    /// The policy rule that decided at this end (none: default deny, or no policy step).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rule: Option<String>,
    /// Bytes from the source to the destination, and back.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Whether the tunnel came warm from the pool (outbound only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pooled: Option<bool>,
    /// How many connection attempts the record stands for: set on unauthenticated
    /// refusals, which are aggregated ([`crate::refusals`]): 1 for the first of its kind in
    /// an interval, the number of the others for the interval's summary. Absent: one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub count: Option<u64>,
    /// For `udp`/`icmp`/`raw` records: how many packets (or refused sockets) the record
    /// stands for (one record per workload, peer, port and verdict per interval).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub packets: Option<u64>,
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
            code: Code::Clean,
            rule: None,
            bytes_sent: 0,
            bytes_received: 0,
            pooled: None,
            count: None,
            packets: None,
        }
    }

    /// How many connection attempts the record stands for (see [`FlowRecord::count`]).
    pub fn attempts(&self) -> u64 {
        self.count.unwrap_or(1)
    }

    /// Policy's ruling on the connection at this end: the rule, the verdict and, for a
    /// denial, the code `refused` with the reason as `wording` puts it (the policy's
    /// reason is its argument). An observed denial keeps the policy's reason.
    pub fn ruled(&mut self, ruling: &Ruling, refused: Code, wording: impl FnOnce(&str) -> String) {
        self.rule = ruling.rule.clone();
        if !ruling.allowed {
            return self.refuse(refused, wording(&ruling.reason));
        }
        self.code = Code::Clean;
        if ruling.observed_deny {
            self.verdict = Verdict::ObservedDeny;
            self.reason = ruling.reason.clone();
        } else {
            self.verdict = Verdict::Allowed;
        }
    }

    /// Refused at this end (or by the other, which said why).
    pub fn refuse(&mut self, code: Code, reason: String) {
        self.verdict = Verdict::Denied;
        self.code = code;
        self.reason = reason;
    }

    /// It could not be made, for a reason that is not a decision (unreachable, no
    /// capture, a refusal the other end gave without deciding): verdict `error`, even if
    /// policy had allowed it.
    pub fn fail(&mut self, code: Code, reason: String) {
        self.verdict = Verdict::Error;
        self.code = code;
        self.reason = reason;
    }

    /// It was made, then broke: the verdict stays (the decision stood).
    pub fn broke(&mut self, code: Code, reason: String) {
        self.code = code;
        self.reason = reason;
    }

    /// A connection that ended with a reset after it was allowed: broken, for the
    /// reset's reason, unless a revocation (a denial) already explains it.
    pub fn reset(&mut self, reason: String) {
        if self.verdict != Verdict::Denied {
            self.broke(Code::Broken, reason);
        }
    }

    /// Bytes from the source to the destination, and back.
    pub fn transferred(&mut self, sent: u64, received: u64) {
        (self.bytes_sent, self.bytes_received) = (sent, received);
    }

    /// A live connection closed because a new policy (or DNS answer) no longer allows it.
    pub fn revoked_by(&mut self, reason: String) {
        self.verdict = Verdict::Denied;
        self.reason = reason;
        self.code = Code::PolicyReload;
    }

    /// The code for a record whose path did not set one: an error without a code is a
    /// broken connection; a denial without one, policy's.
    fn default_code(&self) -> Code {
        match self.verdict {
            Verdict::Allowed | Verdict::ObservedDeny => Code::Clean,
            Verdict::Error => Code::Broken,
            Verdict::Denied => Code::Policy,
        }
    }

    /// Ready to be written: the duration since `start`, and a code if none was set.
    pub fn close(&mut self, start: Instant) {
        self.duration_ms = start.elapsed().as_millis() as u64;
        if self.code.is_clean() {
            self.code = self.default_code();
        }
    }
}

/// Owns one connection's record until it is written, exactly once (see the module doc).
/// Dereferences to the record so the path that handles the connection fills it in.
pub struct FlowTracker {
    record: Option<FlowRecord>,
    start: Instant,
    flows: FlowLog,
}

impl FlowTracker {
    pub fn new(flows: &FlowLog, record: FlowRecord) -> Self {
        Self {
            record: Some(record),
            start: Instant::now(),
            flows: flows.clone(),
        }
    }

    /// Writes the record (consumes the tracker: a record cannot be written twice).
    pub fn finish(mut self) {
        self.write();
    }

    /// Refuses the connection with `code` and writes the record.
    pub fn refuse(mut self, code: Code, reason: String) {
        self.refuse_in_place(code, reason);
        self.finish();
    }

    /// Records a failure (`code`, `reason`) and writes the record.
    pub fn fail(mut self, code: Code, reason: String) {
        FlowRecord::fail(&mut self, code, reason);
        self.finish();
    }

    /// Writes the record, its duration by the caller's clock (the handshake engine's
    /// packet times, in ms since the epoch).
    pub fn finish_at(mut self, now_ms: u64) {
        if let Some(rec) = &mut self.record {
            rec.duration_ms = now_ms.saturating_sub(rec.start_ms);
        }
        self.write_as_is();
    }

    /// Refuses the connection with `code` and writes the record (see
    /// [`FlowTracker::finish_at`]).
    pub fn refuse_at(mut self, code: Code, reason: String, now_ms: u64) {
        self.refuse_in_place(code, reason);
        self.finish_at(now_ms);
    }

    /// Writes nothing: what was tracked turned out not to be a connection attempt (a
    /// tunnel that came up, before it carries any request).
    pub fn discard(mut self) {
        self.record = None;
    }

    fn refuse_in_place(&mut self, code: Code, reason: String) {
        FlowRecord::refuse(self, code, reason);
    }

    fn write(&mut self) {
        if let Some(rec) = &mut self.record {
            rec.close(self.start);
        }
        self.write_as_is();
    }

    fn write_as_is(&mut self) {
        if let Some(mut rec) = self.record.take() {
            if rec.code.is_clean() {
                rec.code = rec.default_code();
            }
            self.flows.record(rec);
        }
    }
}

impl std::fmt::Debug for FlowTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FlowTracker").field(&self.record).finish()
    }
}

impl std::ops::Deref for FlowTracker {
    type Target = FlowRecord;
    fn deref(&self) -> &FlowRecord {
        self.record
            .as_ref()
            .expect("a tracker holds its record until written")
    }
}

impl std::ops::DerefMut for FlowTracker {
    fn deref_mut(&mut self) -> &mut FlowRecord {
        self.record
            .as_mut()
            .expect("a tracker holds its record until written")
    }
}

/// A record other connections' records start from: the handshake fast path's later
/// connections of a pair carry the identities, rule and verdict of the full handshake
/// that allowed the pair (docs/handshake.md, "Fast path").
#[derive(Clone)]
pub struct FlowTemplate {
    record: FlowRecord,
    flows: FlowLog,
}

impl FlowTracker {
    /// This tracker's record as a template (None once it was written).
    pub fn template(&self) -> Option<FlowTemplate> {
        Some(FlowTemplate {
            record: self.record.clone()?,
            flows: self.flows.clone(),
        })
    }
}

impl FlowTemplate {
    /// The record of another connection between the same ends (`src` / `dst`: its
    /// addresses), starting at `now_ms`, its reason noting `how` it was allowed.
    pub fn start(&self, src: SocketAddr, dst: SocketAddr, now_ms: u64, how: &str) -> FlowTracker {
        self.start_as(src, dst, now_ms, self.reason_noting(how))
    }

    /// The reason of the records [`FlowTemplate::start`] makes with `how` (made once, for
    /// many connections: [`FlowTemplate::start_as`]).
    pub fn reason_noting(&self, how: &str) -> String {
        if self.record.reason.is_empty() {
            how.to_owned()
        } else {
            format!("{} ({how})", self.record.reason)
        }
    }

    /// [`FlowTemplate::start`] with the record's reason given.
    pub fn start_as(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        now_ms: u64,
        reason: String,
    ) -> FlowTracker {
        let mut r = self.record.clone();
        r.src.addr = src;
        r.dst.addr = dst;
        r.start_ms = now_ms;
        r.duration_ms = 0;
        r.bytes_sent = 0;
        r.bytes_received = 0;
        r.reason = reason;
        FlowTracker::new(&self.flows, r)
    }
}

impl Drop for FlowTracker {
    fn drop(&mut self) {
        // A path that returned (or panicked) without finishing: the record is still
        // written, and says the connection ended without a result.
        if let Some(rec) = &mut self.record
            && rec.verdict == Verdict::Error
            && rec.reason.is_empty()
        {
            rec.fail(Code::Broken, "the connection ended before a result".into());
        }
        self.write();
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
    fn record(&self, rec: Arc<FlowRecord>);
}

/// Records the writer takes at once at most.
const BATCH: usize = 256;
/// How long records may wait to be written with the next ones.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(10);

/// Records waiting for the writer at most; past that they are dropped and counted.
pub const QUEUE: usize = 65_536;

/// Where flow records go. Cloning is cheap; dropping every clone ends the writer.
#[derive(Clone)]
pub struct FlowLog {
    tx: mpsc::Sender<FlowRecord>,
    dropped: Arc<AtomicU64>,
    /// Aggregates unauthenticated refusals (None: every record as it is).
    refusals: Option<Arc<Refusals>>,
}

impl FlowLog {
    /// Starts the writer task; `path` of `None` keeps records in logs only. Every record
    /// also goes to `sink` (the enforcer's flow store), if any. The file is private to this
    /// process's user ([`open_private_file`]), its missing directories 0700.
    pub fn start(path: Option<PathBuf>, sink: Option<Arc<dyn FlowSink>>) -> std::io::Result<Self> {
        Self::start_with(path, sink, None)
    }

    /// [`FlowLog::start`], unauthenticated refusals aggregated by `refusals` (their
    /// summaries written when each interval ends, and at the end).
    pub fn start_with(
        path: Option<PathBuf>,
        sink: Option<Arc<dyn FlowSink>>,
        refusals: Option<Arc<Refusals>>,
    ) -> std::io::Result<Self> {
        let file = match &path {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    create_private_dirs(dir)?;
                }
                Some(open_private_file(
                    p,
                    std::fs::OpenOptions::new().create(true).append(true),
                )?)
            }
            None => None,
        };
        let (tx, mut rx) = mpsc::channel::<FlowRecord>(QUEUE);
        let summaries = refusals.clone();
        tokio::spawn(async move {
            let mut file = file.map(tokio::fs::File::from_std);
            let mut batch = Vec::with_capacity(BATCH);
            let mut lines = Vec::with_capacity(512 * BATCH);
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Records that arrive together are written together: one write (and one trip to
            // the blocking pool) per batch, not per record.
            loop {
                let ended = tokio::select! {
                    n = rx.recv_many(&mut batch, BATCH) => n == 0,
                    _ = tick.tick() => false,
                };
                if let Some(agg) = &summaries {
                    batch.extend(agg.drain(now_ms(), ended));
                }
                if batch.is_empty() {
                    if ended {
                        break;
                    }
                    continue;
                }
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
                        sink.record(Arc::new(rec));
                    }
                }
                if ended {
                    break;
                }
                // Let the next records gather: at a high connection rate every send would
                // otherwise wake this task (a futex and an eventfd write per record).
                tokio::time::sleep(COALESCE).await;
            }
        });
        Ok(Self {
            tx,
            dropped: Arc::default(),
            refusals,
        })
    }

    /// A log whose records go to `tx` (tests read them there).
    pub fn to_channel(tx: mpsc::Sender<FlowRecord>) -> Self {
        Self {
            tx,
            dropped: Arc::default(),
            refusals: None,
        }
    }

    /// Queues a record for the writer; never waits. A full queue drops it (counted). An
    /// unauthenticated refusal may instead be counted into its interval's summary.
    pub fn record(&self, rec: FlowRecord) {
        let rec = match &self.refusals {
            Some(agg) => match agg.add(rec) {
                Some(rec) => rec,
                None => return,
            },
            None => rec,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(rec) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Creates `dir` and whichever of its parents are missing with mode 0700. Directories that
/// already exist are left as they are: they belong to whoever made them (`/var/lib`, `/tmp`),
/// and what the enforcer keeps in them is protected by the files' own modes.
pub fn create_private_dirs(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display())))
}

/// Opens `path` with `options` as a file only this process's user can read or write:
///
/// * a new file is created with mode 0600;
/// * an existing file with group or other permission bits is tightened to 0600 (files of
///   older versions were 0644), with a warning;
/// * a symbolic link, something that is not a regular file, or a file another user owns is
///   refused: someone who could make it could also keep it open, or point it elsewhere.
pub fn open_private_file(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let named = |e: io::Error, what: &str| {
        io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
    };
    let file = options
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is a symbolic link: refusing to follow it (point the setting at the file itself)",
                        path.display()
                    ),
                )
            } else {
                named(e, "cannot open")
            }
        })?;
    let meta = file.metadata().map_err(|e| named(e, "cannot stat"))?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is owned by uid {}, not by this process's user (uid {me}): refusing to write \
                 to a file someone else made (remove it, or chown it)",
                path.display(),
                meta.uid()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| named(e, "cannot tighten its mode to 0600"))?;
        tracing::warn!(
            file = %path.display(),
            was = format!("{mode:04o}"),
            "tightened to mode 0600: only the enforcer's user may read it"
        );
    }
    Ok(file)
}

#[cfg(test)]
mod private_file_tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn new_files_are_0600_in_new_directories_0700() {
        let dir = std::env::temp_dir().join(format!("tessera-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let deep = dir.join("a/b");
        create_private_dirs(&deep).unwrap();
        assert_eq!((mode(&dir.join("a")), mode(&deep)), (0o700, 0o700));
        let f = deep.join("flows.jsonl");
        open_private_file(&f, OpenOptions::new().create(true).append(true)).unwrap();
        assert_eq!(mode(&f), 0o600);
        // An existing, world-readable file is tightened.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        open_private_file(&f, OpenOptions::new().create(true).append(true)).unwrap();
        assert_eq!(mode(&f), 0o600);
        // A symbolic link is refused, whatever it points at.
        let link = deep.join("link.jsonl");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let e = open_private_file(&link, OpenOptions::new().create(true).append(true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a symbolic link"), "{e}");
        // So is a directory.
        let e = open_private_file(&deep, OpenOptions::new().read(true))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
