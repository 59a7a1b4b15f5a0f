//! The inbound side.
//!
//! * The tunnel listener terminates mutual TLS from peer enforcers, reads the request
//!   header, checks that the destination is a workload port of this host (a tunnel is never
//!   a relay to a third host), connects to the workload (from the peer's own address by
//!   default: [`crate::delivery`]), answers, and splices.
//! * The direct listener receives connections that `sk_lookup` steered away from a
//!   protected port because they did not come through a tunnel. They come from an
//!   unauthenticated peer and are refused (later policy may allow external sources).
use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::OwnedSemaphorePermit,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::{
    admission::{Admission, Carried, Facing, carry},
    authz::{Attempt, Party, Side},
    code::Code,
    copy::{Ended, splice_plain},
    delivery::Delivery,
    flow::{Direction, Endpoint, FlowRecord, FlowTracker, now_ms},
    identity::session::{Proof, Role, SessionSecrets, Tokens, TunnelSession},
    limits::{Drops, Limit, RateLimiter},
    local::{LocalAddrs, LocalServices, LocalWorkload},
    mux::{self, Counts, Stream, splice},
    peers::Directory,
    registry::ConnectionGuard,
    socket::reset_on_close,
    tls::peer_name,
    wire::{Request, Response, Status, WireError},
};

pub struct Inbound {
    pub admission: Arc<Admission>,
    pub tokens: Arc<Tokens>,
    pub acceptor: TlsAcceptor,
    pub services: LocalServices,
    pub addrs: LocalAddrs,
    /// How connections are delivered to local workloads (and let through `sk_lookup`).
    pub delivery: Delivery,
    /// Peers' addresses: a peer's own address of the other family than its tunnel's, to
    /// deliver from (original source).
    pub peers: Arc<Directory>,
    /// How long a tunnel may stay idle before its header (pooled tunnels wait here).
    pub idle_timeout: Duration,
    /// Bounds on the TLS handshakes strangers can make us do.
    pub gate: TlsGate,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes in progress at most. A handshake holds a task, buffers and, for a peer
/// that stalls, up to [`HANDSHAKE_TIMEOUT`]: without a bound, connections that never finish
/// their hello grow memory without limit. Peers keep warm pooled tunnels, but a burst of
/// hundreds of concurrent connections from one peer dials hundreds of tunnels at once
/// (the datapath test opens 300): 1,024 at once leaves room for that; past it a
/// connection is closed at once (and counted).
pub const MAX_TLS_HANDSHAKES: usize = 1024;

/// TLS handshakes a source prefix (/24, /64) may start per second, and at once. A
/// handshake costs ~1 ms of CPU (key exchange, certificate check); a peer opens a pool's
/// worth at start and a few after, so 200/s with a burst of 400 never slows a peer and
/// holds one prefix's flood to a fraction of a core.
pub const TLS_RATE: u32 = 200;
pub const TLS_BURST: u32 = 400;
/// Prefixes with a TLS rate bucket of their own at most.
const TLS_BUCKETS: usize = 4_096;

/// The bounds on tunnel TLS handshakes: concurrent ones, and their rate per source prefix.
pub struct TlsGate {
    slots: Arc<tokio::sync::Semaphore>,
    rate: RateLimiter,
    drops: Arc<Drops>,
}

impl TlsGate {
    /// Counts the bounds it hits in `drops`.
    pub fn new(drops: Arc<Drops>) -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_TLS_HANDSHAKES)),
            rate: RateLimiter::new(TLS_RATE, TLS_BURST, TLS_BUCKETS),
            drops,
        }
    }

    /// A slot for a TLS handshake from `remote`, or why there is none. A known peer's
    /// address (one a peer enforcer serves: it completed a TCP handshake from there, which
    /// an off-path spoofer cannot) is held to neither bound: a burst of its workloads'
    /// connections dials as many tunnels at once, and must not be refused as a flood.
    fn admit(
        &self,
        remote: SocketAddr,
        known_peer: bool,
    ) -> Result<Option<OwnedSemaphorePermit>, (Code, String)> {
        if known_peer {
            return Ok(None);
        }
        if !self.rate.allow(remote.ip(), now_ms(), &self.drops) {
            let reason = format!(
                "{} is over its rate of TLS handshakes ({TLS_RATE} a second)",
                remote.ip()
            );
            return Err((Code::RateLimited, reason));
        }
        self.slots
            .clone()
            .try_acquire_owned()
            .map(Some)
            .map_err(|_| {
                self.drops.hit(Limit::TlsHandshakes);
                let reason = format!("{MAX_TLS_HANDSHAKES} TLS handshakes are in progress already");
                (Code::Overloaded, reason)
            })
    }
}
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

impl Inbound {
    pub async fn serve_tunnels(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "tunnel accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let known_peer = self.peers.table().lookup(remote.ip()).is_some();
            let permit = match self.gate.admit(remote, known_peer) {
                Ok(p) => p,
                Err((code, reason)) => {
                    reset_on_close(&tcp);
                    let flow = self.handshake_flow(&tcp, remote);
                    flow.refuse(code, reason);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            tokio::spawn(async move { this.handle_tunnel(tcp, remote, permit).await });
        }
    }

    /// This enforcer's name.
    fn name(&self) -> &str {
        self.admission.name()
    }

    /// The record of a tunnel's TLS handshake: from `remote` to our tunnel port (never
    /// keyed by the remote's ephemeral port).
    fn handshake_flow(&self, tcp: &TcpStream, remote: SocketAddr) -> FlowTracker {
        let local = tcp.local_addr().unwrap_or(remote);
        let mut dst = Endpoint::addr(local);
        dst.enforcer = Some(self.name().to_owned());
        self.admission
            .track(Direction::Inbound, Endpoint::addr(remote), dst)
    }

    async fn handle_tunnel(
        self: &Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        // A failed handshake is recorded; a tunnel that carries requests records each one.
        let flow = self.handshake_flow(&tcp, remote);
        let local = flow.dst.addr;
        let refuse_handshake = |flow: FlowTracker, reason: String| {
            flow.refuse(
                Code::TlsHandshake,
                format!("TLS handshake failed: {reason}"),
            )
        };
        let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return refuse_handshake(flow, e.to_string()),
            Err(_) => return refuse_handshake(flow, "TLS handshake timed out".into()),
        };
        drop(permit);
        let conn = tls.get_ref().1;
        let cert = conn.peer_certificates().and_then(|c| c.first());
        let peer = cert
            .and_then(peer_name)
            .unwrap_or_else(|| "<unnamed>".into());
        let session = SessionSecrets::of(conn)
            .map_err(|e| e.to_string())
            .and_then(|secrets| {
                self.tokens
                    .session(peer.clone(), cert, &secrets, Role::Server)
                    .map_err(|e| e.to_string())
            });
        let mut session = match session {
            Ok(s) => s,
            Err(e) => {
                let _ = shutdown_quietly(&mut tls).await;
                return refuse_handshake(flow, format!("{peer}: {e}"));
            }
        };
        // Under a control plane only the directory's enforcers may open tunnels.
        if let Err(e) = self.peers.admit(&peer) {
            tracing::warn!(%peer, %remote, "tunnel from an enforcer not in the directory refused");
            let _ = shutdown_quietly(&mut tls).await;
            return flow.refuse(Code::NotInDirectory, e.to_string());
        }
        // The tunnel is up: not a connection attempt of its own (each request is).
        flow.discard();
        let mut conn = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            mux::server_builder().handshake::<_, Bytes>(tls),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "tunnel closed before its HTTP/2 preface");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "no HTTP/2 preface on a tunnel");
                return;
            }
        };
        let mut directory = self.peers.changes();
        let live = Arc::new(Live::default());
        // Grown while streams' applications stall (see `mux::Window`).
        let window = mux::Window::new(&mux::STALL_BUDGET);
        let mut ticks = tokio::time::interval(self.idle_timeout / 4);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing = false;
        // Each stream is one application connection. Streams are admitted here, in the
        // order they arrive (tokens carry the session's sequence numbers in that order),
        // then delivered and carried by tasks of their own; this loop keeps the tunnel's
        // I/O going.
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                changed = directory.changed(), if !closing => {
                    if changed.is_err() || self.peers.admit(&peer).is_err() {
                        tracing::warn!(%peer, "closing a tunnel: its enforcer left the directory");
                        conn.graceful_shutdown();
                        closing = true;
                    }
                    continue;
                }
                _ = window.changed() => {
                    conn.set_target_window_size(window.target());
                    continue;
                }
                _ = ticks.tick(), if !closing => {
                    // Idle for the timeout (the source's pool closes idle tunnels sooner).
                    if live.idle_for() >= self.idle_timeout {
                        conn.graceful_shutdown();
                        closing = true;
                    }
                    continue;
                }
            };
            let (request, respond) = match next {
                Some(Ok(stream)) => stream,
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "tunnel failed");
                    break;
                }
                None => break,
            };
            let (http, body) = request.into_parts();
            let request = match mux::request_of(&http::Request::from_parts(http, ())) {
                Ok(request) => request,
                Err(e) => {
                    let mut dst = Endpoint::addr(local);
                    dst.enforcer = Some(self.name().to_owned());
                    let mut flow =
                        self.admission
                            .track(Direction::Inbound, Endpoint::addr(remote), dst);
                    if matches!(e, WireError::Version(_)) {
                        tracing::warn!(%peer, error = %e, "tunnel protocol mismatch");
                    }
                    let reason = format!("bad tunnel header from {peer}: {e}");
                    flow.src.enforcer = Some(peer.clone());
                    let refused = Refused::new(Status::BadRequest, Code::BadHeader, reason);
                    self.answer_refusal(respond, refused, flow);
                    // A peer that sends what no enforcer would is not served again.
                    conn.graceful_shutdown();
                    closing = true;
                    continue;
                }
            };
            let mut flow = self.request_flow(&session, remote, &request);
            match self.admit(&mut session, remote, &request, &mut flow) {
                Ok(admitted) => {
                    let (this, live, window) = (self.clone(), live.clone(), window.clone());
                    let peer = session.peer.clone();
                    live.start();
                    tokio::spawn(async move {
                        let delivered = Delivering {
                            peer,
                            remote,
                            request,
                            admitted,
                            respond,
                            body,
                            window,
                        };
                        this.deliver_stream(delivered, flow).await;
                        live.end();
                    });
                }
                Err(refused) => self.answer_refusal(respond, refused, flow),
            }
        }
    }

    /// The record of one tunnel request.
    fn request_flow(
        &self,
        session: &TunnelSession,
        remote: SocketAddr,
        request: &Request,
    ) -> FlowTracker {
        let mut src = Endpoint::addr(remote);
        src.workload = Some(request.source.workload.clone()).filter(|w| !w.is_empty());
        src.enforcer = Some(session.peer.clone());
        src.pid = Some(request.source.pid);
        src.uid = Some(request.source.uid);
        let mut flow = self
            .admission
            .track(Direction::Inbound, src, Endpoint::addr(request.dst));
        flow.dst.enforcer = Some(self.name().to_owned());
        flow
    }

    /// Delivers an admitted stream to its workload, answers, and carries it.
    async fn deliver_stream(&self, d: Delivering, mut flow: FlowTracker) {
        let Delivering {
            peer,
            remote,
            request,
            admitted,
            mut respond,
            body,
            window,
        } = d;
        let Admitted {
            workload,
            proof,
            mut guard,
        } = admitted;
        let peer_addr = self.peer_address(&peer, remote, request.dst);
        let mut delivered = match self.deliver(peer_addr, request.dst).await {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("workload unreachable: {e}");
                let refused =
                    Refused::new(Status::Unreachable, Code::WorkloadUnreachable, reason).failure();
                return self.answer_refusal(respond, refused, flow);
            }
        };
        let answer = Response::new(Status::Connected, workload.name.clone()).with_proof(proof);
        let send = match respond.send_response(mux::response_for(&answer), false) {
            Ok(send) => send,
            Err(e) => {
                reset_on_close(&delivered);
                return flow.fail(Code::Broken, format!("tunnel broke before delivery: {e}"));
            }
        };
        let mut stream = Stream {
            send,
            recv: body,
            window,
        };
        let counts = Counts::default();
        // `delivered` is the workload side: bytes from it are bytes the source received.
        let spliced = splice(&mut delivered, &mut stream, &counts);
        let carried = carry(&mut guard, &mut flow, Facing::Destination, spliced, |e| {
            format!("tunnel from {peer} broke: {e}")
        })
        .await;
        if matches!(carried, Carried::Revoked | Carried::Broken) {
            // Cut short: the bytes moved so far are in the counts.
            let (sent, received) = Facing::Destination.bytes(counts.transferred());
            flow.transferred(sent, received);
        }
        if carried == Carried::Revoked {
            // Tell the source (it resets its side); the tunnel's other streams go on.
            reset_on_close(&delivered);
            stream.reset();
        }
        flow.finish();
    }

    /// The admission phases of a tunnel request: who asks (its token), for which local
    /// workload, our proof for that workload, and ingress policy.
    fn admit(
        &self,
        session: &mut TunnelSession,
        remote: SocketAddr,
        request: &Request,
        flow: &mut FlowTracker,
    ) -> Result<Admitted, Refused> {
        // Who is asking comes first: an unauthenticated request learns nothing, not even
        // whether the port is served. Its enforcer must (still) be in the directory, and
        // the identity it vouches for gets that enforcer's scope from its certificate.
        let scope = self.peers.admit(&session.peer).map_err(|e| {
            Refused::new(Status::Unauthenticated, Code::NotInDirectory, e.to_string())
                .answer(format!("{}: {e}", self.name()))
        })?;
        let src_identity = self
            .tokens
            .check(session, &request.proof, request.dst, now_ms())
            .map_err(|refusal| {
                tracing::info!(peer = %session.peer, reason = %refusal.code(), error = %refusal, "refused a tunnel request");
                Refused::new(
                    Status::Unauthenticated,
                    refusal.code(),
                    format!("source {refusal} ({})", refusal.code()),
                )
                .answer(format!("{}: {refusal} ({})", self.name(), refusal.code()))
            })?;
        let src_identity = match scope {
            Some(scope) => crate::identity::scope::stamp(src_identity, &scope).map_err(|e| {
                tracing::warn!(peer = %session.peer, error = %e, "refused a claim outside its enforcer's scope");
                Refused::new(
                    Status::Unauthenticated,
                    Code::OutOfScope,
                    format!("source {e} ({})", Code::OutOfScope),
                )
                .answer(format!("{}: {e} ({})", self.name(), Code::OutOfScope))
            })?,
            None => src_identity,
        };
        flow.src.identified(&src_identity);
        let workload = self.workload_for(request.dst)?;
        flow.dst.workload = Some(workload.name.clone());
        flow.dst.identified(&workload.identity);
        let port = request.dst.port();
        // Our answer proves who accepted (or refused): signed for the destination workload.
        let proof = self
            .tokens
            .prove(session, &workload.identity, request.dst, now_ms())
            .map_err(|e| {
                let reason = format!("cannot sign for {}: {e}", workload.name);
                Refused::new(Status::Unreachable, Code::Broken, reason).failure()
            })?;
        let attempt = Attempt {
            side: Side::Ingress,
            src: Party::workload(src_identity.labels, Some(remote.ip())),
            dst: Party::workload(workload.identity.labels.clone(), Some(request.dst.ip())),
            port,
            observe: workload.observe,
        };
        let guard = self
            .admission
            .admit(attempt, flow, Code::Policy, |r| format!("ingress {r}"))
            .ok_or_else(|| {
                Refused::new(Status::Denied, Code::Policy, flow.reason.clone())
                    .answer(format!("{}: {}", self.name(), flow.reason))
                    .with_proof(proof.clone())
            })?;
        Ok(Admitted {
            workload,
            proof,
            guard,
        })
    }

    /// The local workload a tunnel request is for: only this host's addresses and served
    /// ports (a tunnel is never a relay to a third host).
    fn workload_for(&self, dst: SocketAddr) -> Result<Arc<LocalWorkload>, Refused> {
        let local = self.addrs.contains(dst.ip());
        // A workload with a network of its own (a pod), at its own address (never one of
        // this host's: those are the host's workloads').
        if !local && let Some(w) = self.services.at_address(dst) {
            return Ok(w);
        }
        local
            .then(|| self.services.workload(dst.port()))
            .flatten()
            .ok_or_else(|| {
                let reason = if local {
                    format!("no workload of {} serves port {}", self.name(), dst.port())
                } else {
                    format!("{} is not an address of {}", dst.ip(), self.name())
                };
                Refused::new(Status::NotServed, Code::NotServed, reason)
            })
    }

    /// Answers a request that is not delivered (the stream ends there) and records it.
    fn answer_refusal(
        &self,
        mut respond: SendResponse<Bytes>,
        refused: Refused,
        mut flow: FlowTracker,
    ) {
        let rec: &mut FlowRecord = &mut flow;
        if refused.denied {
            rec.refuse(refused.code, refused.reason);
        } else {
            rec.fail(refused.code, refused.reason);
        }
        // The source records the same code as we do.
        let mut answer = Response::new(refused.status, refused.answer).with_code(flow.code);
        answer.proof = refused.proof;
        flow.finish();
        let _ = respond.send_response(mux::response_for(&answer), true);
    }

    /// Connects to a local workload for a connection from `peer` (the tunnel's, or the
    /// direct client's, address): registered with `sk_lookup`, which lets it through.
    async fn deliver(&self, peer: Option<IpAddr>, dst: SocketAddr) -> io::Result<TcpStream> {
        self.delivery.connect(peer, dst, DELIVERY_TIMEOUT).await
    }

    /// The address of the peer enforcer `name` in `dst`'s family: where its tunnel came
    /// from (the TCP handshake vouches for it; never a header field the peer chose), or, for
    /// the other family, its single address in our peer table.
    fn peer_address(&self, name: &str, remote: SocketAddr, dst: SocketAddr) -> Option<IpAddr> {
        let ip = remote.ip().to_canonical();
        if ip.is_ipv4() == dst.is_ipv4() {
            Some(ip)
        } else {
            self.peers.table().host_address(name, dst.is_ipv6())
        }
    }

    /// Connections steered here by `sk_lookup` because they tried to reach a protected port
    /// directly. Their local address is the one they asked for. They come from a peer
    /// without a Tessera identity: refused unless policy allows that address (a `cidr:` or
    /// `dns:` source), in which case they are delivered like a tunnelled connection.
    pub async fn serve_direct(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "direct accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            tokio::spawn(async move { this.handle_direct(stream, remote).await });
        }
    }

    async fn handle_direct(&self, mut stream: TcpStream, remote: SocketAddr) {
        let dst_addr = stream.local_addr().unwrap_or(remote);
        let mut flow = self.admission.track(
            Direction::Direct,
            Endpoint::addr(remote),
            Endpoint::addr(dst_addr),
        );
        flow.dst.enforcer = Some(self.name().to_owned());
        let Some(workload) = self.services.workload(dst_addr.port()) else {
            reset_on_close(&stream);
            let reason = format!(
                "no workload of {} serves port {}",
                self.name(),
                dst_addr.port()
            );
            return flow.refuse(Code::NotServed, reason);
        };
        flow.dst.workload = Some(workload.name.clone());
        flow.src.dns_name = self.admission.decisions().dns().name_of(remote.ip());
        let attempt = Attempt {
            side: Side::Ingress,
            src: Party::external(remote.ip()),
            dst: Party::workload(workload.identity.labels.clone(), Some(dst_addr.ip())),
            port: dst_addr.port(),
            observe: workload.observe,
        };
        let Some(mut guard) =
            self.admission
                .admit(attempt, &mut flow, Code::Unauthenticated, |r| {
                    format!(
                        "unauthenticated: the connection did not come through a Tessera tunnel; {r}"
                    )
                })
        else {
            reset_on_close(&stream);
            return flow.finish();
        };
        let mut delivered = match self.deliver(Some(remote.ip()), dst_addr).await {
            Ok(s) => s,
            Err(e) => {
                reset_on_close(&stream);
                return flow.fail(
                    Code::WorkloadUnreachable,
                    format!("workload unreachable: {e}"),
                );
            }
        };
        let plain = async {
            splice_plain(&mut stream, &mut delivered)
                .await
                .map(Ended::Clean)
        };
        let carried = carry(&mut guard, &mut flow, Facing::Source, plain, |e| {
            format!("connection broken: {e}")
        })
        .await;
        if carried == Carried::Revoked {
            reset_on_close(&stream);
            reset_on_close(&delivered);
        }
        flow.finish()
    }
}

/// An admitted stream on its way to the workload.
struct Delivering {
    /// The source enforcer.
    peer: String,
    remote: SocketAddr,
    request: Request,
    admitted: Admitted,
    respond: SendResponse<Bytes>,
    body: RecvStream,
    /// The tunnel's.
    window: Arc<mux::Window>,
}

/// The streams a tunnel carries, and since when it carries none.
struct Live {
    active: std::sync::atomic::AtomicUsize,
    idle_since: std::sync::Mutex<std::time::Instant>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            active: Default::default(),
            idle_since: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl Live {
    fn start(&self) {
        self.active
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
    fn end(&self) {
        if self
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            *self.idle_since.lock().expect("lock") = std::time::Instant::now();
        }
    }
    /// How long the tunnel has carried no stream (zero while it carries one).
    fn idle_for(&self) -> Duration {
        if self.active.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        self.idle_since.lock().expect("lock").elapsed()
    }
}

/// An admitted tunnel request, before delivery.
struct Admitted {
    workload: Arc<LocalWorkload>,
    /// Our proof for the destination workload, for the answer.
    proof: Proof,
    guard: ConnectionGuard,
}

/// Why a tunnel request was not delivered: what its record says and what the source is
/// answered.
#[derive(Debug)]
struct Refused {
    status: Status,
    code: Code,
    /// For the record.
    reason: String,
    /// For the source (by default the record's reason).
    answer: String,
    /// Our proof for the destination workload, when one was chosen.
    proof: Option<Proof>,
    /// A refusal (verdict `denied`) rather than a failure (`error`).
    denied: bool,
}

impl Refused {
    fn new(status: Status, code: Code, reason: String) -> Self {
        Self {
            status,
            code,
            answer: reason.clone(),
            reason,
            proof: None,
            denied: true,
        }
    }
    fn answer(mut self, answer: String) -> Self {
        self.answer = answer;
        self
    }
    fn with_proof(mut self, proof: Proof) -> Self {
        self.proof = Some(proof);
        self
    }
    /// Not a decision: the connection could not be made.
    fn failure(mut self) -> Self {
        self.denied = false;
        self
    }
}

async fn shutdown_quietly(tls: &mut TlsStream<TcpStream>) -> io::Result<()> {
    tokio::time::timeout(Duration::from_secs(1), tls.shutdown())
        .await
        .unwrap_or(Ok(()))
}
