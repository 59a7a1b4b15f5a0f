//! The connections handshakes let through, from their handshake to their end: a policy
//! reload that denies one closes it; when one ends (the kernel reports it, with its byte
//! counts, through `sock_ops` and the `TESSERA_CLOSED` ring buffer) its flow record is
//! written. One task for all of them: a connection costs a registration, no task of its own.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tessera_proxy::{
    authz::Side,
    flow::{FlowTracker, now_ms},
    handshake::engine::LiveConnection,
    registry::{ConnectionGuard, ConnectionRegistry},
};
use tokio::sync::mpsc;

use super::closed::Closed;

/// A connection a handshake let through, and when (monotonic clock, ns).
pub struct Registered {
    pub conn: LiveConnection,
    pub at_ns: u64,
}

/// Sockets of this network namespace that are open (any state but LISTEN and TIME_WAIT),
/// as (local, remote), IPv4-mapped addresses as IPv4. Through `ss` (netlink sock_diag):
/// the kernel skips TIME_WAIT sockets itself, where /proc/net/tcp formats every one of
/// them (tens of thousands at a high connection rate).
async fn open_sockets() -> Option<HashSet<(SocketAddr, SocketAddr)>> {
    let out = tokio::process::Command::new("ss")
        .args([
            "-t",
            "-n",
            "-H",
            "exclude",
            "time-wait",
            "exclude",
            "listening",
        ])
        .output()
        .await;
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

/// Closes a connection's socket on this host (SOCK_DESTROY through `ss -K`): the kernel
/// resets the peer, the application sees the reset.
async fn destroy(local: SocketAddr, remote: SocketAddr) {
    let forms = |a: SocketAddr| -> Vec<String> {
        match a {
            SocketAddr::V4(v4) => vec![
                v4.to_string(),
                format!("[{}]:{}", v4.ip().to_ipv6_mapped(), v4.port()),
            ],
            SocketAddr::V6(v6) => vec![v6.to_string()],
        }
    };
    // A socket of an IPv6 listener holds IPv4 peers in their mapped form.
    for (l, r) in forms(local).into_iter().zip(forms(remote)) {
        let result = tokio::process::Command::new("ss")
            .args(["-K", "-t", "-n", "-H", "src", &l, "dst", &r])
            .output()
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, %local, %remote, "cannot close a revoked connection (ss -K)");
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
}

impl Watcher {
    async fn register(&mut self, r: Registered) {
        let Registered { conn, at_ns } = r;
        let LiveConnection {
            local,
            remote,
            attempt,
            ruling,
            flow,
        } = conn;
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
                destroy(local, remote).await;
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
                w.revoked = Some(reason);
                // The kernel reports the close (and the bytes) like any other.
                destroy(key.0, key.1).await;
            }
        }
    }

    /// Connections that ended without a close report (a full ring buffer, a socket the
    /// programs do not see): recorded without byte counts.
    async fn sweep(&mut self) {
        let Some(open) = open_sockets().await else {
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

/// Watches the connections handshakes let through until they end.
pub async fn watch(
    registry: Arc<ConnectionRegistry>,
    mut incoming: mpsc::Receiver<Registered>,
    mut closes: mpsc::Receiver<Closed>,
) {
    const SWEEP: Duration = Duration::from_secs(30);
    // Let the next events gather: one wake-up per batch, not per connection.
    const COALESCE: Duration = Duration::from_millis(10);
    let mut w = Watcher {
        watched: HashMap::new(),
        registry: registry.clone(),
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
}
