//! Warm tunnels. A mutual-TLS handshake costs a round trip and two signatures; paying it on
//! every application connect would halve the connection rate. Instead each peer has a small
//! pool of connections already past the handshake: an application connection takes one and
//! the pool dials a replacement in the background. A tunnel carries one application
//! connection (no multiplexing), so bulk transfers are not throttled by a shared window and
//! a reset on one connection cannot hurt another.
use std::{
    collections::{HashMap, VecDeque},
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::{peers::Peer, socket::connect_marked};

pub type Tunnel = TlsStream<TcpStream>;

/// Opens new tunnels: a marked TCP connection and a TLS 1.3 handshake verifying the peer.
pub struct TunnelDialer {
    connector: TlsConnector,
    mark: u32,
    timeout: Duration,
}

impl TunnelDialer {
    pub fn new(config: Arc<rustls::ClientConfig>, mark: u32, timeout: Duration) -> Self {
        Self {
            connector: TlsConnector::from(config),
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
        match tokio::time::timeout(self.timeout, self.connector.connect(name, tcp)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("TLS handshake with {} timed out", peer.name),
            )),
        }
    }
}

#[derive(Default)]
struct PeerPool {
    idle: Mutex<VecDeque<(Instant, Tunnel)>>,
    dialing: AtomicUsize,
    /// After a failed dial, no background dial until this instant (a down peer is not
    /// hammered; application connections still dial, and fail, on their own).
    backoff_until: Mutex<Option<Instant>>,
}

pub struct TunnelPool {
    dialer: Arc<TunnelDialer>,
    /// Idle tunnels kept per peer; 0 disables pooling.
    size: usize,
    /// An idle tunnel older than this is closed instead of used (the server side gives up
    /// on idle tunnels after a longer timeout, so we never hand out a dead one).
    max_idle: Duration,
    peers: Mutex<HashMap<Peer, Arc<PeerPool>>>,
}

const BACKOFF: Duration = Duration::from_secs(1);

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
            // Newest first: the freshest tunnel is the least likely to have been closed.
            let mut found = None;
            while let Some((since, tunnel)) = idle.pop_back() {
                if since.elapsed() < self.max_idle {
                    found = Some(tunnel);
                    break;
                }
            }
            found
        };
        self.refill(peer, &pool);
        match warm {
            Some(tunnel) => Ok((tunnel, true)),
            None => Ok((self.dialer.dial(peer).await?, false)),
        }
    }

    /// A fresh tunnel, bypassing the pool (used to retry after a pooled one turned out dead).
    pub async fn dial(&self, peer: &Peer) -> io::Result<Tunnel> {
        self.dialer.dial(peer).await
    }

    /// Starts filling the pools of these peers ahead of the first connection.
    pub fn warm<'a>(self: &Arc<Self>, peers: impl IntoIterator<Item = &'a Peer>) {
        for peer in peers {
            let pool = self.peer_pool(peer);
            self.refill(peer, &pool);
        }
    }

    fn refill(self: &Arc<Self>, peer: &Peer, pool: &Arc<PeerPool>) {
        if let Some(until) = *pool.backoff_until.lock().expect("lock") {
            if Instant::now() < until {
                return;
            }
        }
        let have = pool.idle.lock().expect("lock").len() + pool.dialing.load(Ordering::Relaxed);
        for _ in have..self.size {
            pool.dialing.fetch_add(1, Ordering::Relaxed);
            let (dialer, pool, peer) = (self.dialer.clone(), pool.clone(), peer.clone());
            tokio::spawn(async move {
                match dialer.dial(&peer).await {
                    Ok(tunnel) => pool
                        .idle
                        .lock()
                        .expect("lock")
                        .push_back((Instant::now(), tunnel)),
                    Err(e) => {
                        tracing::debug!(peer = %peer.name, error = %e, "warming a tunnel failed");
                        *pool.backoff_until.lock().expect("lock") = Some(Instant::now() + BACKOFF);
                    }
                }
                pool.dialing.fetch_sub(1, Ordering::Relaxed);
            });
        }
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
