//! The connections handshakes let through, from their handshake to their end: a policy
//! reload that denies one closes it; when one ends (the kernel reports it, with its byte
//! counts, through `sock_ops` and the `TESSERA_CLOSED` ring buffer) its flow record is
//! written. One task for all of them: a connection costs a registration, no task of its own.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitStatus, Output},
    sync::Arc,
    time::{Duration, Instant},
};

use tessera_proxy::{
    authz::{Attempt, Ruling, Side},
    flow::{FlowTracker, now_ms},
    handshake::engine::LiveConnection,
    registry::{ConnectionGuard, ConnectionRegistry},
};
use tokio::sync::mpsc;

use super::{closed::Closed, tools::ENV};
use crate::metrics::Metrics;

/// A connection a handshake let through, and when (monotonic clock, ns). The decision is
/// shared: the fast path's connections of one key all register its full handshake's.
pub struct Registered {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub attempt: Arc<Attempt>,
    pub ruling: Ruling,
    pub flow: FlowTracker,
    pub at_ns: u64,
}

impl Registered {
    /// The connection a full handshake let through at `at_ns`.
    pub fn of(conn: LiveConnection, at_ns: u64) -> Self {
        let LiveConnection {
            local,
            remote,
            attempt,
            ruling,
            flow,
        } = conn;
        Self {
            local,
            remote,
            attempt: Arc::new(attempt),
            ruling,
            flow,
            at_ns,
        }
    }
}

/// `ss` (by the absolute path found at start-up) with `args`, in a clean environment.
async fn ss(program: &Path, args: &[&str]) -> std::io::Result<Output> {
    tokio::process::Command::new(program)
        .env_clear()
        .envs(ENV)
        .args(args)
        .output()
        .await
}

/// `ss` arguments listing open TCP sockets (any state but LISTEN and TIME_WAIT), numeric,
/// without a header.
const OPEN_SOCKETS: &[&str] = &[
    "-t",
    "-n",
    "-H",
    "exclude",
    "time-wait",
    "exclude",
    "listening",
];

/// Sockets of this network namespace that are open (any state but LISTEN and TIME_WAIT),
/// as (local, remote), IPv4-mapped addresses as IPv4. Through `ss` (netlink sock_diag):
/// the kernel skips TIME_WAIT sockets itself, where /proc/net/tcp formats every one of
/// them (tens of thousands at a high connection rate).
async fn open_sockets(program: &Path) -> Option<HashSet<(SocketAddr, SocketAddr)>> {
    let out = ss(program, OPEN_SOCKETS).await;
    match out {
        Ok(out) if out.status.success() => Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(parse_ss_line)
                .collect(),
        ),
        Ok(out) => {
            tracing::warn!(stderr = %String::from_utf8_lossy(&out.stderr).trim(), "ss failed: live connections not pruned");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot run ss: live connections not pruned");
            None
        }
    }
}

/// One line of `ss -t -n -H`: `state recv-q send-q local peer`.
fn parse_ss_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let mut f = line.split_whitespace().skip(3);
    let addr = |s: &str| -> Option<SocketAddr> {
        match s.parse::<SocketAddr>().ok()? {
            SocketAddr::V6(v6) => Some(match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), v6.port()),
                None => SocketAddr::V6(v6),
            }),
            v4 => Some(v4),
        }
    };
    Some((addr(f.next()?)?, addr(f.next()?)?))
}

/// Why a connection policy revoked may still be open.
#[derive(Debug, thiserror::Error)]
enum RevocationFailure {
    #[error("cannot run {program}: {error}")]
    CannotRun {
        program: String,
        error: std::io::Error,
    },
    #[error("ss -K src {local} dst {remote} failed ({status}): {stderr}")]
    Failed {
        local: String,
        remote: String,
        status: ExitStatus,
        stderr: String,
    },
    /// `ss -K` said nothing wrong but the socket is still there: no CAP_NET_ADMIN, a kernel
    /// without CONFIG_INET_DIAG_DESTROY (ss then skips the socket silently).
    #[error("the socket is still open after ss -K: {0}")]
    StillOpen(String),
}

/// The forms of `(local, remote)` a socket may be listed under: a socket of an IPv6
/// listener holds IPv4 peers in their mapped form.
fn forms(local: SocketAddr, remote: SocketAddr) -> Vec<(String, String)> {
    let forms = |a: SocketAddr| -> Vec<String> {
        match a {
            SocketAddr::V4(v4) => vec![
                v4.to_string(),
                format!("[{}]:{}", v4.ip().to_ipv6_mapped(), v4.port()),
            ],
            SocketAddr::V6(v6) => vec![v6.to_string()],
        }
    };
    forms(local).into_iter().zip(forms(remote)).collect()
}

/// What one `ss -K` run says: a failure if it could not run or exited with a failure.
fn kill_result(
    program: &Path,
    (local, remote): &(String, String),
    out: std::io::Result<Output>,
) -> Result<(), RevocationFailure> {
    let out = out.map_err(|error| RevocationFailure::CannotRun {
        program: program.display().to_string(),
        error,
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(RevocationFailure::Failed {
        local: local.clone(),
        remote: remote.clone(),
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// What listing the connection's sockets after `ss -K` says: any socket listed is one
/// still open.
fn gone_result(program: &Path, out: std::io::Result<Output>) -> Result<(), RevocationFailure> {
    let out = out.map_err(|error| RevocationFailure::CannotRun {
        program: program.display().to_string(),
        error,
    })?;
    let listed = String::from_utf8_lossy(&out.stdout);
    match listed.lines().find(|l| !l.trim().is_empty()) {
        None if out.status.success() => Ok(()),
        None => Err(RevocationFailure::StillOpen(format!(
            "cannot tell: listing failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        Some(line) => Err(RevocationFailure::StillOpen(line.trim().to_owned())),
    }
}

/// Closes a connection's socket on this host (SOCK_DESTROY through `ss -K`): the kernel
/// resets the peer, the application sees the reset. Then checks that it is gone.
async fn destroy(
    program: &Path,
    local: SocketAddr,
    remote: SocketAddr,
) -> Result<(), RevocationFailure> {
    let forms = forms(local, remote);
    for form in &forms {
        let (l, r) = form;
        let out = ss(program, &["-K", "-t", "-n", "-H", "src", l, "dst", r]).await;
        kill_result(program, form, out)?;
    }
    for (l, r) in &forms {
        let args: Vec<&str> = OPEN_SOCKETS
            .iter()
            .copied()
            .chain(["src", l.as_str(), "dst", r.as_str()])
            .collect();
        let out = ss(program, &args).await;
        gone_result(program, out)?;
    }
    Ok(())
}

/// Revokes a live connection: closes it, and a failure to is logged with the connection
/// and counted (`tessera_revocation_failures_total`), never ignored: that connection goes
/// on against the policy in force.
async fn revoke_one(
    program: &Path,
    metrics: &Metrics,
    local: SocketAddr,
    remote: SocketAddr,
    reason: &str,
) {
    match destroy(program, local, remote).await {
        Ok(()) => tracing::debug!(%local, %remote, reason, "revoked connection closed"),
        Err(e) => {
            metrics.revocation_failed();
            tracing::error!(
                %local,
                %remote,
                reason,
                error = %e,
                "a connection policy revoked could not be closed: it stays open"
            );
        }
    }
}

struct Watched {
    /// The connection's record, written when it ends.
    flow: FlowTracker,
    side: Side,
    at_ns: u64,
    since: Instant,
    /// None once revoked (nothing more to watch for).
    guard: Option<ConnectionGuard>,
    /// Why policy revoked it: written as a revocation when it closes.
    revoked: Option<String>,
}

/// Writes the record of a connection that ended. `bytes`: what this end sent and
/// received, if the kernel reported its close (a connection found gone by the sweep has
/// none).
fn finished(w: Watched, bytes: Option<(u64, u64)>) {
    let mut flow = w.flow;
    if let Some((sent, received)) = bytes {
        // A record counts bytes from the source's point of view, as in tunnel mode.
        let (sent, received) = match w.side {
            // The client end opened the connection: its count includes its SYN.
            Side::Egress => (sent.saturating_sub(1), received),
            Side::Ingress => (received, sent),
        };
        flow.transferred(sent, received);
    }
    if let Some(reason) = w.revoked {
        flow.revoked_by(reason);
    }
    flow.finish_at(now_ms());
}

struct Watcher {
    registry: Arc<ConnectionRegistry>,
    watched: HashMap<(SocketAddr, SocketAddr), Watched>,
    /// `ss`, by the absolute path found at start-up.
    ss: PathBuf,
    metrics: Arc<Metrics>,
}

impl Watcher {
    async fn register(&mut self, r: Registered) {
        let Registered {
            local,
            remote,
            attempt,
            ruling,
            flow,
            at_ns,
        } = r;
        let side = attempt.side;
        let key = (local, remote);
        tracing::debug!(%local, %remote, "watching a connection");
        if let Some(old) = self.watched.remove(&key) {
            // The 4-tuple was reused: the previous connection ended (its close not seen).
            finished(old, None);
        }
        // (the registry re-decides it if a policy was applied since the handshake)
        let guard = self.registry.register(attempt, &ruling);
        let (guard, revoked) = match guard.revocation() {
            None => (Some(guard), None),
            Some(reason) => {
                revoke_one(&self.ss, &self.metrics, local, remote, &reason).await;
                (None, Some(reason))
            }
        };
        self.watched.insert(
            key,
            Watched {
                flow,
                side,
                at_ns,
                since: Instant::now(),
                guard,
                revoked,
            },
        );
    }

    fn closed(&mut self, c: Closed) {
        let key = (c.local, c.remote);
        tracing::debug!(local = %c.local, remote = %c.remote, watched = self.watched.contains_key(&key), "close report");
        // A close older than the registration belongs to an earlier connection.
        if self.watched.get(&key).is_some_and(|w| w.at_ns <= c.at_ns)
            && let Some(w) = self.watched.remove(&key)
        {
            finished(w, Some((c.sent, c.received)));
        }
    }

    async fn revoke(&mut self) {
        let revoked: Vec<_> = self
            .watched
            .iter()
            .filter_map(|(key, w)| w.guard.as_ref()?.revocation().map(|r| (*key, r)))
            .collect();
        for (key, reason) in revoked {
            if let Some(w) = self.watched.get_mut(&key) {
                w.guard = None;
                // The kernel reports the close (and the bytes) like any other.
                revoke_one(&self.ss, &self.metrics, key.0, key.1, &reason).await;
                w.revoked = Some(reason);
            }
        }
    }

    /// Connections that ended without a close report (a full ring buffer, a socket the
    /// programs do not see): recorded without byte counts.
    async fn sweep(&mut self) {
        let Some(open) = open_sockets(&self.ss).await else {
            return;
        };
        let gone: Vec<_> = self
            .watched
            .iter()
            // (a connection handed over a moment ago may not be listed yet)
            .filter(|(key, w)| !open.contains(*key) && w.since.elapsed() > Duration::from_secs(2))
            .map(|(key, _)| *key)
            .collect();
        for key in gone {
            if let Some(w) = self.watched.remove(&key) {
                finished(w, None);
            }
        }
    }
}

/// Watches the connections handshakes let through until they end. `ss`: the program, by
/// the absolute path found at start-up; revocations that fail are counted in `metrics`.
pub async fn watch(
    registry: Arc<ConnectionRegistry>,
    mut incoming: mpsc::Receiver<Registered>,
    mut closes: mpsc::Receiver<Closed>,
    ss: PathBuf,
    metrics: Arc<Metrics>,
) {
    const SWEEP: Duration = Duration::from_secs(30);
    // Let the next events gather: one wake-up per batch, not per connection.
    const COALESCE: Duration = Duration::from_millis(10);
    let mut w = Watcher {
        watched: HashMap::new(),
        registry: registry.clone(),
        ss,
        metrics,
    };
    let mut reloads = registry.reloads();
    let (mut arrived, mut ended) = (Vec::with_capacity(1024), Vec::with_capacity(1024));
    let mut sweep = tokio::time::interval(SWEEP);
    let mut closes_open = true;
    loop {
        tokio::select! {
            n = incoming.recv_many(&mut arrived, 1024) => {
                if n == 0 {
                    return;
                }
                for r in arrived.drain(..) {
                    w.register(r).await;
                }
                tokio::time::sleep(COALESCE).await;
            }
            n = closes.recv_many(&mut ended, 1024), if closes_open => {
                if n == 0 {
                    // The ring buffer's reader ended: the sweep alone finds ended connections.
                    closes_open = false;
                    continue;
                }
                // Every registration was sent before its connection could close: take in
                // those waiting first.
                while let Ok(r) = incoming.try_recv() {
                    w.register(r).await;
                }
                for c in ended.drain(..) {
                    w.closed(c);
                }
                tokio::time::sleep(COALESCE).await;
            }
            // Revocations happen only when a policy is replaced: no polling in between.
            Ok(()) = reloads.changed() => w.revoke().await,
            _ = sweep.tick(), if !w.watched.is_empty() => w.sweep().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_lines_give_both_ends_of_open_connections() {
        // As iproute2's ss prints them (-t -n -H).
        let v4 = "ESTAB 0      0               10.0.0.2:8080          10.0.0.1:42332";
        let want = Some((
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.1:42332".parse().unwrap(),
        ));
        assert_eq!(parse_ss_line(v4), want);
        let mapped = "ESTAB 0      0      [::ffff:10.0.0.2]:8080 [::ffff:10.0.0.1]:42332";
        assert_eq!(parse_ss_line(mapped), want);
        let v6 = "SYN-RECV 0 0 [fd77::2]:8080 [fd77::1]:42332";
        let (l, _) = parse_ss_line(v6).unwrap();
        assert_eq!(l.ip().to_string(), "fd77::2");
        assert_eq!(parse_ss_line("garbage"), None);
    }

    use std::os::unix::{fs::PermissionsExt, process::ExitStatusExt};

    fn output(code: i32, stdout: &str, stderr: &str) -> std::io::Result<Output> {
        Ok(Output {
            status: ExitStatus::from_raw(code << 8),
            stdout: stdout.into(),
            stderr: stderr.into(),
        })
    }

    #[test]
    fn a_failing_or_unrunnable_ss_and_a_socket_still_listed_are_failures() {
        let ss = Path::new("/usr/bin/ss");
        let form = ("10.0.0.2:8080".to_owned(), "10.0.0.1:42332".to_owned());
        assert!(kill_result(ss, &form, output(0, "", "")).is_ok());
        let e = kill_result(
            ss,
            &form,
            output(1, "", "SOCK_DESTROY answers: Operation not permitted\n"),
        )
        .unwrap_err();
        assert!(matches!(e, RevocationFailure::Failed { .. }), "{e}");
        let m = e.to_string();
        assert!(
            m.contains("src 10.0.0.2:8080 dst 10.0.0.1:42332")
                && m.contains("Operation not permitted"),
            "{m}"
        );
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = kill_result(ss, &form, Err(gone)).unwrap_err();
        assert!(e.to_string().starts_with("cannot run /usr/bin/ss"), "{e}");
        // Afterwards: nothing listed is gone; a listed socket (ss -K skips what the kernel
        // cannot destroy, silently) or a listing that failed is not.
        assert!(gone_result(ss, output(0, "", "")).is_ok());
        let still = "ESTAB 0 0 10.0.0.2:8080 10.0.0.1:42332";
        let e = gone_result(ss, output(0, still, "")).unwrap_err();
        assert!(
            matches!(&e, RevocationFailure::StillOpen(l) if l == still),
            "{e}"
        );
        let e = gone_result(ss, output(2, "", "bad filter")).unwrap_err();
        assert!(e.to_string().contains("cannot tell"), "{e}");
    }

    #[test]
    fn both_forms_of_an_ipv4_connection_are_tried() {
        let f = forms(
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.1:42332".parse().unwrap(),
        );
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].0, "[::ffff:10.0.0.2]:8080");
        let f = forms(
            "[fd77::2]:80".parse().unwrap(),
            "[fd77::1]:9".parse().unwrap(),
        );
        assert_eq!(f, [("[fd77::2]:80".into(), "[fd77::1]:9".into())]);
    }

    fn failures(metrics: &Metrics) -> u64 {
        let text = metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix("tessera_revocation_failures_total "))
            .unwrap_or_else(|| panic!("no revocation counter: {text}"))
            .parse()
            .unwrap()
    }

    /// A stand-in for ss: a script at an absolute path (as the resolved one is).
    fn fake_ss(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn every_revocation_that_does_not_close_its_connection_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let (l, r) = (
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.1:42332".parse().unwrap(),
        );
        assert_eq!(failures(&metrics), 0, "the counter is there from the start");
        // ss -K works and the socket is gone: nothing counted.
        let ok = fake_ss(dir.path(), "ss-ok", "exit 0");
        revoke_one(&ok, &metrics, l, r, "test").await;
        assert_eq!(failures(&metrics), 0);
        // ss -K fails.
        let failing = fake_ss(
            dir.path(),
            "ss-fails",
            "echo 'SOCK_DESTROY answers: Operation not permitted' >&2; exit 1",
        );
        revoke_one(&failing, &metrics, l, r, "test").await;
        assert_eq!(failures(&metrics), 1);
        // ss -K succeeds but the socket is still listed afterwards.
        let silent = fake_ss(
            dir.path(),
            "ss-silent",
            "[ \"$1\" = -K ] && exit 0; echo 'ESTAB 0 0 10.0.0.2:8080 10.0.0.1:42332'",
        );
        revoke_one(&silent, &metrics, l, r, "test").await;
        assert_eq!(failures(&metrics), 2);
        // ss cannot be run at all.
        revoke_one(&dir.path().join("no-such-ss"), &metrics, l, r, "test").await;
        assert_eq!(failures(&metrics), 3);
    }

    /// With the real ss on a real connection: the counter says exactly whether it was
    /// closed (as root with CAP_NET_ADMIN it is; as another user ss -K cannot, and that
    /// is counted rather than missed).
    #[tokio::test]
    async fn a_real_connection_is_closed_or_its_failure_counted() {
        use tokio::io::AsyncReadExt;
        let Ok(ss) =
            super::super::tools::find("ss", &super::super::tools::SYSTEM_DIRS.map(Path::new))
        else {
            eprintln!("no ss installed: skipped");
            return;
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, remote) = listener.accept().await.unwrap();
        let local = server.local_addr().unwrap();
        let metrics = Metrics::new();
        revoke_one(&ss, &metrics, local, remote, "test").await;
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(1), client.read(&mut buf)).await;
        let closed = matches!(read, Ok(Ok(0)) | Ok(Err(_)));
        eprintln!("closed by ss -K: {closed}");
        assert_eq!(
            failures(&metrics),
            u64::from(!closed),
            "closed: {closed}, read: {read:?}"
        );
        drop(server);
    }
}
