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
    idle: Mutex<VecDeque<(Instant, Tunnel)>>,
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
            while let Some((since, tunnel)) = idle.pop_back() {
                if since.elapsed() < self.max_idle {
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
        idle.push_back((Instant::now(), tunnel));
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
                loop {
                    let Some(this) = this.upgrade() else { return };
                    // Forgotten (left the directory): stop keeping it warm.
                    let Some(pool) = this.peers.lock().expect("lock").get(&peer).cloned() else {
                        return;
                    };
                    pool.idle
                        .lock()
                        .expect("lock")
                        .retain(|(since, _)| since.elapsed() < this.max_idle);
                    this.refill(&peer, &pool);
                    drop(this);
                    tokio::time::sleep(MAINTENANCE_TICK).await;
                }
            });
        }
    }

    fn have(&self, pool: &PeerPool) -> usize {
        pool.idle.lock().expect("lock").len() + pool.dialing.load(Ordering::Relaxed)
    }

    fn refill(self: &Arc<Self>, peer: &Peer, pool: &Arc<PeerPool>) {
        if let (Some(until), _) = *pool.backoff.lock().expect("lock")
            && Instant::now() < until
        {
            return;
        }
        for _ in self.have(pool)..self.size {
            pool.dialing.fetch_add(1, Ordering::Relaxed);
            let (dialer, pool, peer) = (self.dialer.clone(), pool.clone(), peer.clone());
            tokio::spawn(async move {
                match dialer.dial(&peer).await {
                    Ok(tunnel) => {
                        pool.idle
                            .lock()
                            .expect("lock")
                            .push_back((Instant::now(), tunnel));
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
