//! Warm tunnels. A mutual-TLS handshake costs a round trip and public-key operations; paying
//! it on every application connect would cap the connection rate. Instead each peer has a
//! few tunnels already past the handshake, and every application connection is a stream on
//! one of them (tunnel protocol 6, [`crate::mux`]): the least loaded, until each carries
//! [`STREAMS_PER_TUNNEL`], then on a new one. Streams of one tunnel have their own flow
//! control, so a bulk transfer does not starve the others, and a reset stays on its stream.
//! A tunnel that carried nothing for a while is closed (before the peer would close it) and
//! the pool dials replacements in the background.
use std::{
    collections::HashMap,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::{
    identity::{
        Identity,
        session::{Proof, Refusal, Role, SessionSecrets, Tokens, TunnelSession},
    },
    mux::{self, AskError, STREAMS_PER_TUNNEL, Stream},
    peers::Peer,
    socket::connect_marked,
    wire::{Request, Response, Source},
};

/// A tunnel to a peer enforcer: HTTP/2 over mutual TLS, its token session, and the streams
/// it carries.
pub struct Tunnel {
    /// The peer enforcer's name.
    pub peer: String,
    send: SendRequest<Bytes>,
    /// Tokens are sealed and their streams opened under this lock, so the peer receives
    /// them in sequence order; answers' tokens are checked under it.
    session: Mutex<TunnelSession>,
    /// Streams open on it.
    active: AtomicUsize,
    /// Streams it carried since it was opened.
    carried: AtomicUsize,
    /// Set when the HTTP/2 connection has ended.
    closed: Arc<AtomicBool>,
    /// Its receive window, grown while streams' applications stall.
    window: Arc<mux::Window>,
    /// When it last carried no stream, and how long it may stay so.
    idle_since: Mutex<Option<Instant>>,
    max_idle: Mutex<Duration>,
}

/// A stream's claim on its tunnel: counted while it lives.
pub struct Slot(Arc<Tunnel>);

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("lock") = Some(Instant::now());
        }
    }
}

impl Tunnel {
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Relaxed)
    }

    /// Takes it out of use: it failed a stream (going away, or dead), so the pool drops it
    /// and no later connection tries it first. Its live streams go on while it lasts.
    pub fn retire(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    /// Streams open on it now.
    pub fn streams(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    fn idled_out(&self, now: Instant) -> bool {
        let since = *self.idle_since.lock().expect("lock");
        self.streams() == 0
            && since.is_some_and(|t| now.duration_since(t) >= *self.max_idle.lock().expect("lock"))
    }

    /// Opens a stream asking for `dst` on behalf of `identity`: its token is sealed with the
    /// session's next sequence number and its HEADERS queued in that order.
    pub fn ask(
        self: &Arc<Self>,
        tokens: &Tokens,
        identity: &Identity,
        dst: std::net::SocketAddr,
        source: &Source,
        now_ms: u64,
    ) -> Result<Asked, AskError> {
        let slot = {
            self.active.fetch_add(1, Ordering::AcqRel);
            self.carried.fetch_add(1, Ordering::Relaxed);
            Slot(self.clone())
        };
        let mut session = self.session.lock().expect("lock");
        let proof = tokens
            .prove(&mut session, identity, dst, now_ms)
            .map_err(|e| AskError::Proof(e.to_string()))?;
        let request = Request {
            dst,
            source: source.clone(),
            proof,
        };
        let (response, send) = mux::open(&mut self.send.clone(), mux::connect_request(&request))?;
        Ok(Asked {
            response,
            send,
            slot,
        })
    }

    /// Checks the peer's proof in an answer for `dst`.
    pub fn check(
        &self,
        tokens: &Tokens,
        proof: &Proof,
        dst: std::net::SocketAddr,
        now_ms: u64,
    ) -> Result<Identity, Refusal> {
        tokens.check(&mut self.session.lock().expect("lock"), proof, dst, now_ms)
    }

    /// Back to cold tokens (after a refusal the peer may not have cached what we sent).
    pub fn forget_sent(&self) {
        self.session.lock().expect("lock").forget_sent();
    }
}

/// A stream opened by [`Tunnel::ask`], waiting for its answer.
pub struct Asked {
    response: ResponseFuture,
    send: h2::SendStream<Bytes>,
    slot: Slot,
}

/// A connected stream and its claim on the tunnel.
pub struct Carrying {
    pub stream: Stream,
    pub slot: Slot,
}

impl Asked {
    /// The answer and, when connected, the stream.
    pub async fn answer(self, timeout: Duration) -> Result<(Response, Option<Carrying>), AskError> {
        let window = self.slot.0.window.clone();
        let (answer, stream) = mux::answered(self.response, self.send, &window, timeout).await?;
        let slot = self.slot;
        Ok((answer, stream.map(|stream| Carrying { stream, slot })))
    }
}

/// Opens new tunnels: a marked TCP connection, a TLS 1.3 handshake verifying the peer, and
/// HTTP/2 on top.
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

    pub async fn dial(&self, peer: &Peer) -> io::Result<Arc<Tunnel>> {
        let tcp = connect_marked(peer.tunnel, self.mark, None, self.timeout).await?;
        let name = ServerName::try_from(peer.name.clone()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("peer name {:?}: {e}", peer.name),
            )
        })?;
        let timed_out = |what: &str| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} with {} timed out", peer.name),
            )
        };
        let stream = tokio::time::timeout(self.timeout, self.connector.connect(name, tcp))
            .await
            .map_err(|_| timed_out("TLS handshake"))??;
        // rustls checked the certificate against the CA and the peer's name; the session
        // takes its Ed25519 key and the exporter values (binding, token keys).
        let conn = stream.get_ref().1;
        let secrets = SessionSecrets::of(conn).map_err(io::Error::other)?;
        let cert = conn.peer_certificates().and_then(|c| c.first());
        let session = self
            .tokens
            .session(peer.name.clone(), cert, &secrets, Role::Client)
            .map_err(|e| io::Error::other(format!("peer {}: {e}", peer.name)))?;
        let client = tokio::time::timeout(self.timeout, mux::client(stream))
            .await
            .map_err(|_| timed_out("HTTP/2 handshake"))?
            .map_err(|e| io::Error::other(format!("peer {}: HTTP/2: {e}", peer.name)))?;
        Ok(Arc::new(Tunnel {
            peer: peer.name.clone(),
            send: client.send,
            session: Mutex::new(session),
            active: AtomicUsize::new(0),
            carried: AtomicUsize::new(0),
            closed: client.closed,
            window: client.window,
            idle_since: Mutex::new(Some(Instant::now())),
            max_idle: Mutex::new(Duration::MAX),
        }))
    }
}

#[derive(Default)]
struct PeerPool {
    /// Open tunnels, oldest first.
    tunnels: Mutex<Vec<Arc<Tunnel>>>,
    /// Counts the tunnels stored, to spread their idle lifetimes (see [`TunnelPool::max_idle`]).
    stored: AtomicUsize,
    /// Where the next search for the least loaded tunnel starts.
    next: AtomicUsize,
    dialing: AtomicUsize,
    /// After failed dials, no background dial until this instant; the delay doubles with
    /// each failure (a down peer is not hammered) and resets on success.
    backoff: Mutex<(Option<Instant>, Duration)>,
    /// A task keeps this pool warm.
    warmed: AtomicBool,
}

pub struct TunnelPool {
    dialer: Arc<TunnelDialer>,
    /// Tunnels kept open per peer; 0 disables pooling and reuse (a tunnel per connection).
    size: usize,
    /// A tunnel that carried no stream for this long is closed (the server side gives up on
    /// idle tunnels after a longer timeout, so we never open a stream on a dead one).
    max_idle: Duration,
    peers: Mutex<HashMap<Peer, Arc<PeerPool>>>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const MAINTENANCE_TICK: Duration = Duration::from_millis(250);
/// Replacements for tunnels that idled out, dialed per peer and tick at most. Tunnels warmed
/// together would idle out together, and replacing a whole pool at once is a burst of TLS
/// handshakes (a few ms of CPU each, at both ends) that stalls the connections carried on
/// the same threads (docs/wire.md, "Latency"). Idle lifetimes are spread too (see
/// [`TunnelPool::max_idle`]).
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

    /// A tunnel to `peer` for one more stream, and whether it was open already.
    pub async fn get(self: &Arc<Self>, peer: &Peer) -> io::Result<(Arc<Tunnel>, bool)> {
        if self.size == 0 {
            return Ok((self.dialer.dial(peer).await?, false));
        }
        let pool = self.peer_pool(peer);
        let found = {
            let mut tunnels = pool.tunnels.lock().expect("lock");
            let now = Instant::now();
            tunnels.retain(|t| t.is_open() && !t.idled_out(now));
            // The least loaded; among equals, the next after the last one taken: sequential
            // connections go round the tunnels, so none idles out (and needs replacing)
            // while the peer is in use.
            let start = pool.next.fetch_add(1, Ordering::Relaxed);
            let n = tunnels.len().max(1);
            (0..tunnels.len())
                .map(|i| &tunnels[(start + i) % n])
                .filter(|t| t.streams() < STREAMS_PER_TUNNEL)
                .min_by_key(|t| t.streams())
                .cloned()
        };
        if self.have(&pool) < self.size {
            self.refill(peer, &pool);
        }
        match found {
            Some(tunnel) => Ok((tunnel, true)),
            None => Ok((self.dial(peer).await?, false)),
        }
    }

    /// A fresh tunnel, kept for later streams (also used to retry after an open one turned
    /// out dead).
    pub async fn dial(&self, peer: &Peer) -> io::Result<Arc<Tunnel>> {
        let tunnel = self.dialer.dial(peer).await?;
        if self.size > 0 {
            self.store(&self.peer_pool(peer), tunnel.clone());
        }
        Ok(tunnel)
    }

    fn store(&self, pool: &PeerPool, tunnel: Arc<Tunnel>) {
        *tunnel.max_idle.lock().expect("lock") = Self::max_idle(self.max_idle, pool);
        pool.tunnels.lock().expect("lock").push(tunnel);
    }

    /// Keeps the pools of these peers warm: fills them now and, every tick, closes tunnels
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
                    let now = Instant::now();
                    pool.tunnels
                        .lock()
                        .expect("lock")
                        .retain(|t| t.is_open() && !t.idled_out(now));
                    this.refill_at_most(&peer, &pool, dials);
                    dials = MAINTENANCE_DIALS;
                    drop(this);
                    tokio::time::sleep(MAINTENANCE_TICK).await;
                }
            });
        }
    }

    /// How long a tunnel stored now may stay idle: `max_idle`, less a step that each stored
    /// tunnel advances, so that tunnels stored together (a pool warmed at start) do not all
    /// idle out, and need replacing, in the same instant.
    fn max_idle(max_idle: Duration, pool: &PeerPool) -> Duration {
        let step = (pool.stored.fetch_add(1, Ordering::Relaxed) % EXPIRY_STEPS as usize) as u32;
        max_idle - max_idle * step / (2 * EXPIRY_STEPS)
    }

    fn have(&self, pool: &PeerPool) -> usize {
        pool.tunnels.lock().expect("lock").len() + pool.dialing.load(Ordering::Relaxed)
    }

    /// Dials up to the pool's size at once.
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
            let (this, pool, peer) = (self.clone(), pool.clone(), peer.clone());
            tokio::spawn(async move {
                match this.dialer.dial(&peer).await {
                    Ok(tunnel) => {
                        this.store(&pool, tunnel);
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

    /// Closes the tunnels to enforcer `name` that carry nothing, and stops keeping its pool
    /// warm (streams still open end on their own, or by revocation).
    pub fn forget(&self, name: &str) {
        self.peers
            .lock()
            .expect("lock")
            .retain(|p, _| p.name != name);
    }

    /// How many streams each open tunnel to enforcer `name` carried (for tests).
    pub fn carried(&self, name: &str) -> Vec<usize> {
        let pools = self.peers.lock().expect("lock");
        pools
            .iter()
            .filter(|(p, _)| p.name == name)
            .flat_map(|(_, pool)| {
                let tunnels = pool.tunnels.lock().expect("lock");
                tunnels
                    .iter()
                    .filter(|t| t.is_open())
                    .map(|t| t.carried.load(Ordering::Relaxed))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Open tunnels per peer name (for status and tests).
    pub fn open_counts(&self) -> Vec<(String, usize)> {
        self.peers
            .lock()
            .expect("lock")
            .iter()
            .map(|(p, pool)| {
                let open = pool.tunnels.lock().expect("lock");
                (p.name.clone(), open.iter().filter(|t| t.is_open()).count())
            })
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
        let mut lifetimes: Vec<Duration> = (0..EXPIRY_STEPS)
            .map(|_| TunnelPool::max_idle(max_idle, &pool))
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
