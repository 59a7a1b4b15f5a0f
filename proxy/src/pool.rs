//! Warm tunnels. A mutual-TLS handshake costs a round trip and public-key operations; paying
//! it on every application connect would cap the connection rate. Instead each peer has a
//! pool of tunnels already past the handshake. An application connection takes one; when the
//! connection ends cleanly the tunnel comes back (see `copy`: the end of a connection is a
//! frame, not the end of the tunnel), and when the pool runs low it dials replacements in the
//! background. A tunnel carries one application connection at a time (no multiplexing), so
//! bulk transfers are not throttled by a shared window and a reset stays on its connection.
use std::{
    collections::{HashMap, VecDeque},
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::{
    copy::Buffers,
    identity::session::{Role, SessionSecrets, Tokens, TunnelSession},
    peers::Peer,
    socket::connect_marked,
};

/// A mutual-TLS connection to a peer enforcer, its token session and splice buffers.
pub struct Tunnel {
    pub stream: TlsStream<TcpStream>,
    pub session: TunnelSession,
    pub buffers: Buffers,
}

/// Opens new tunnels: a marked TCP connection and a TLS 1.3 handshake verifying the peer.
pub struct TunnelDialer {
    connector: TlsConnector,
    tokens: Arc<Tokens>,
    mark: u32,
    timeout: Duration,
}

impl TunnelDialer {
    pub fn new(
        config: Arc<rustls::ClientConfig>,
        tokens: Arc<Tokens>,
        mark: u32,
        timeout: Duration,
    ) -> Self {
        Self {
            connector: TlsConnector::from(config),
            tokens,
            mark,
            timeout,
        }
    }

    pub async fn dial(&self, peer: &Peer) -> io::Result<Tunnel> {
        let tcp = connect_marked(peer.tunnel, self.mark, None, self.timeout).await?;
        let name = ServerName::try_from(peer.name.clone()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("peer name {:?}: {e}", peer.name),
            )
        })?;
        let stream =
            match tokio::time::timeout(self.timeout, self.connector.connect(name, tcp)).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("TLS handshake with {} timed out", peer.name),
                    ));
                }
            };
        // rustls checked the certificate against the CA and the peer's name; the session
        // takes its Ed25519 key and the exporter values (binding, token keys).
        let conn = stream.get_ref().1;
        let secrets = SessionSecrets::of(conn).map_err(io::Error::other)?;
        let cert = conn.peer_certificates().and_then(|c| c.first());
        let session = self
            .tokens
            .session(peer.name.clone(), cert, &secrets, Role::Client)
            .map_err(|e| io::Error::other(format!("peer {}: {e}", peer.name)))?;
        Ok(Tunnel {
            stream,
            session,
            buffers: Buffers::default(),
        })
    }
}

#[derive(Default)]
struct PeerPool {
    /// Idle tunnels, oldest first, each with the instant it must no longer be handed out.
    idle: Mutex<VecDeque<(Instant, Tunnel)>>,
    /// Counts the tunnels stored, to spread their expiries (see [`TunnelPool::expiry`]).
    stored: AtomicUsize,
    dialing: AtomicUsize,
    /// After failed dials, no background dial until this instant; the delay doubles with
    /// each failure (a down peer is not hammered) and resets on success.
    backoff: Mutex<(Option<Instant>, Duration)>,
    /// A task keeps this pool warm.
    warmed: AtomicBool,
}

pub struct TunnelPool {
    dialer: Arc<TunnelDialer>,
    /// Idle tunnels kept per peer; 0 disables pooling and reuse.
    size: usize,
    /// An idle tunnel older than this is closed instead of used (the server side gives up
    /// on idle tunnels after a longer timeout, so we never hand out a dead one).
    max_idle: Duration,
    peers: Mutex<HashMap<Peer, Arc<PeerPool>>>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const MAINTENANCE_TICK: Duration = Duration::from_millis(250);
/// Replacements for tunnels that idled out, dialed per peer and tick at most. Tunnels warmed
/// together would idle out together, and replacing a whole pool at once is a burst of TLS
/// handshakes (a few ms of CPU each, at both ends) that stalls the connections carried on
/// the same threads (docs/wire.md, "Latency"). Expiries are spread too (see
/// [`TunnelPool::expiry`]); a burst of application connections that drains the pool still
/// refills it at once.
const MAINTENANCE_DIALS: usize = 1;
/// Idle lifetimes are spread over `max_idle / 2 ..= max_idle` in this many steps.
const EXPIRY_STEPS: u32 = 16;

impl TunnelPool {
    pub fn new(dialer: TunnelDialer, size: usize, max_idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            dialer: Arc::new(dialer),
            size,
            max_idle,
            peers: Mutex::default(),
        })
    }

    fn peer_pool(&self, peer: &Peer) -> Arc<PeerPool> {
        self.peers
            .lock()
            .expect("lock")
            .entry(peer.clone())
            .or_default()
            .clone()
    }

    /// A tunnel to `peer`, and whether it came warm from the pool.
    pub async fn get(self: &Arc<Self>, peer: &Peer) -> io::Result<(Tunnel, bool)> {
        if self.size == 0 {
            return Ok((self.dialer.dial(peer).await?, false));
        }
        let pool = self.peer_pool(peer);
        let warm = {
            let mut idle = pool.idle.lock().expect("lock");
            // Newest first: the most recently used tunnel is the most surely alive.
            let mut found = None;
            let now = Instant::now();
            while let Some((expires, tunnel)) = idle.pop_back() {
                if now < expires {
                    found = Some(tunnel);
                    break;
                }
            }
            found
        };
        // Tunnels come back when their connection ends; dial more only when a burst of
        // concurrent connections has drained the pool below half.
        if self.have(&pool) < self.size.div_ceil(2) {
            self.refill(peer, &pool);
        }
        match warm {
            Some(tunnel) => Ok((tunnel, true)),
            None => Ok((self.dialer.dial(peer).await?, false)),
        }
    }

    /// Returns a tunnel whose last connection ended cleanly, for the next connection. The
    /// pool keeps the most recently used tunnels; beyond its size the oldest idle one goes.
    pub fn put(&self, peer: &Peer, tunnel: Tunnel) {
        if self.size == 0 {
            return;
        }
        let pool = self.peer_pool(peer);
        let mut idle = pool.idle.lock().expect("lock");
        idle.push_back((Self::expiry(self.max_idle, &pool), tunnel));
        while idle.len() > self.size {
            idle.pop_front();
        }
    }

    /// A fresh tunnel, bypassing the pool (used to retry after a pooled one turned out dead).
    pub async fn dial(&self, peer: &Peer) -> io::Result<Tunnel> {
        self.dialer.dial(peer).await
    }

    /// Keeps the pools of these peers warm: fills them now and, every tick, drops tunnels
    /// idle too long and dials replacements (with backoff while a peer is unreachable).
    pub fn warm<'a>(self: &Arc<Self>, peers: impl IntoIterator<Item = &'a Peer>) {
        if self.size == 0 {
            return;
        }
        for peer in peers {
            {
                let mut pools = self.peers.lock().expect("lock");
                if pools
                    .get(peer)
                    .is_some_and(|p| p.warmed.load(Ordering::Relaxed))
                {
                    continue;
                }
                pools
                    .entry(peer.clone())
                    .or_default()
                    .warmed
                    .store(true, Ordering::Relaxed);
            }
            let (this, peer) = (Arc::downgrade(self), peer.clone());
            tokio::spawn(async move {
                // The first pass fills the pool at once; later ones replace what idled out
                // a few at a time.
                let mut dials = usize::MAX;
                loop {
                    let Some(this) = this.upgrade() else { return };
                    // Forgotten (left the directory): stop keeping it warm.
                    let Some(pool) = this.peers.lock().expect("lock").get(&peer).cloned() else {
                        return;
                    };
                    pool.idle
                        .lock()
                        .expect("lock")
                        .retain(|(expires, _)| Instant::now() < *expires);
                    this.refill_at_most(&peer, &pool, dials);
                    dials = MAINTENANCE_DIALS;
                    drop(this);
                    tokio::time::sleep(MAINTENANCE_TICK).await;
                }
            });
        }
    }

    /// When a tunnel stored now must no longer be handed out: after `max_idle`, less a
    /// step that each stored tunnel advances, so that tunnels stored together (a pool warmed
    /// at start) do not all idle out, and need replacing, in the same instant.
    fn expiry(max_idle: Duration, pool: &PeerPool) -> Instant {
        let step = (pool.stored.fetch_add(1, Ordering::Relaxed) % EXPIRY_STEPS as usize) as u32;
        Instant::now() + max_idle - max_idle * step / (2 * EXPIRY_STEPS)
    }

    fn have(&self, pool: &PeerPool) -> usize {
        pool.idle.lock().expect("lock").len() + pool.dialing.load(Ordering::Relaxed)
    }

    /// Dials up to the pool's size at once: a burst of connections drained it.
    fn refill(self: &Arc<Self>, peer: &Peer, pool: &Arc<PeerPool>) {
        self.refill_at_most(peer, pool, usize::MAX);
    }

    /// Dials up to the pool's size, `most` at a time (counting dials still in progress).
    fn refill_at_most(self: &Arc<Self>, peer: &Peer, pool: &Arc<PeerPool>, most: usize) {
        if let (Some(until), _) = *pool.backoff.lock().expect("lock")
            && Instant::now() < until
        {
            return;
        }
        let dialing = pool.dialing.load(Ordering::Relaxed);
        let missing = self.size.saturating_sub(self.have(pool));
        for _ in 0..missing.min(most.saturating_sub(dialing)) {
            pool.dialing.fetch_add(1, Ordering::Relaxed);
            let (dialer, pool, peer) = (self.dialer.clone(), pool.clone(), peer.clone());
            let max_idle = self.max_idle;
            tokio::spawn(async move {
                match dialer.dial(&peer).await {
                    Ok(tunnel) => {
                        let expires = Self::expiry(max_idle, &pool);
                        pool.idle.lock().expect("lock").push_back((expires, tunnel));
                        *pool.backoff.lock().expect("lock") = (None, BACKOFF_MIN);
                    }
                    Err(e) => {
                        tracing::debug!(peer = %peer.name, error = %e, "warming a tunnel failed");
                        let mut backoff = pool.backoff.lock().expect("lock");
                        // Dials fail in batches; only the first failure of a batch starts (and
                        // lengthens) a backoff period.
                        let in_backoff = backoff.0.is_some_and(|until| Instant::now() < until);
                        if !in_backoff {
                            let delay = backoff.1.clamp(BACKOFF_MIN, BACKOFF_MAX);
                            *backoff = (Some(Instant::now() + delay), (delay * 2).min(BACKOFF_MAX));
                        }
                    }
                }
                pool.dialing.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    /// Drops the idle tunnels to enforcer `name` and stops keeping its pool warm.
    pub fn forget(&self, name: &str) {
        self.peers
            .lock()
            .expect("lock")
            .retain(|p, _| p.name != name);
    }

    /// Idle tunnels per peer name (for status and tests).
    pub fn idle_counts(&self) -> Vec<(String, usize)> {
        self.peers
            .lock()
            .expect("lock")
            .iter()
            .map(|(p, pool)| (p.name.clone(), pool.idle.lock().expect("lock").len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::tunnel::{SKEW_MS, TRUST_DOMAIN, TestCa};
    use tokio::net::TcpListener;

    /// A pool of `size` to a peer that accepts TCP and never answers TLS: each dial stays in
    /// progress until its (long) timeout, so the count of accepted connections is the count
    /// of dials the pool started.
    async fn pool_to_a_silent_peer(size: usize) -> (Arc<TunnelPool>, Peer, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = Peer {
            name: "host-b".into(),
            tunnel: listener.local_addr().unwrap(),
        };
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
        let ca = TestCa::new();
        let (key, cert) = ca.issue("host-a");
        let tokens = Tokens::new(
            TRUST_DOMAIN.into(),
            &key,
            vec![ca.der.clone()],
            60_000,
            SKEW_MS,
            true,
        )
        .unwrap();
        let dialer = TunnelDialer::new(
            ca.tls(&key, &cert).client_config().unwrap(),
            Arc::new(tokens),
            0,
            Duration::from_secs(60),
        );
        (
            TunnelPool::new(dialer, size, Duration::from_secs(20)),
            peer,
            accepted,
        )
    }

    async fn until_accepted(accepted: &AtomicUsize, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while accepted.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "only {accepted:?} of {n} dials");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn replacements_are_dialed_one_at_a_time_and_a_drained_pool_refills_at_once() {
        let (pool, peer, accepted) = pool_to_a_silent_peer(8).await;
        let p = pool.peer_pool(&peer);
        // Maintenance ticks while a replacement is still being dialed start no other.
        for _ in 0..3 {
            pool.refill_at_most(&peer, &p, MAINTENANCE_DIALS);
        }
        until_accepted(&accepted, 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        assert_eq!(p.dialing.load(Ordering::Relaxed), 1);
        // A burst of connections that drains the pool refills the rest at once.
        pool.refill(&peer, &p);
        until_accepted(&accepted, 8).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(accepted.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn tunnels_stored_together_idle_out_at_different_times() {
        let pool = PeerPool::default();
        let max_idle = Duration::from_secs(16);
        let before = Instant::now();
        let mut lifetimes: Vec<Duration> = (0..EXPIRY_STEPS)
            .map(|_| TunnelPool::expiry(max_idle, &pool) - before)
            .collect();
        lifetimes.sort();
        lifetimes.dedup();
        assert_eq!(lifetimes.len(), EXPIRY_STEPS as usize, "{lifetimes:?}");
        assert!(lifetimes[0] >= max_idle / 2, "{lifetimes:?}");
        assert!(*lifetimes.last().unwrap() <= max_idle + Duration::from_secs(1));
        // Half a second apart at least: a pool of 16 needs one replacement per 2 ticks.
        for w in lifetimes.windows(2) {
            assert!(w[1] - w[0] >= Duration::from_millis(400), "{lifetimes:?}");
        }
    }
}
