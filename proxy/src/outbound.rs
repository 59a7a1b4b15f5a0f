//! The outbound side: connections that the eBPF connect hooks redirected to us.
//!
//! For each accepted connection: find its original destination and origin (recorded by the
//! eBPF programs, keyed by the client's address and port). If an enforcer serves the
//! destination, take a tunnel to it, send the request (with the source's identity), and on
//! its answer (with the destination's identity) decide egress policy before the first
//! application byte flows. A destination without an enforcer is reached directly only if
//! policy allows it. Anything refused is reset: a captured connection never goes around us.
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use crate::{
    admission::{Admission, Carried, Facing, carry},
    authz::Party,
    capture::{CaptureLookup, Captured},
    code::Code,
    copy::{Ended, splice_plain},
    flow::{Direction, Endpoint, FlowRecord, FlowTracker, now_ms},
    identity::{
        Identity,
        session::{Refusal, Tokens},
    },
    mux::{AskError, Counts, splice},
    peers::{Directory, Peer},
    pool::{Carrying, Tunnel, TunnelPool},
    route::{self, Plan, Route},
    socket::{connect_marked, reset_on_close},
    wire::{Response, Status},
};

pub struct Outbound {
    /// Workloads' own network namespaces (set once they are served): a connection captured
    /// in one reaches a destination without an enforcer from there.
    pub namespaces: std::sync::OnceLock<Arc<dyn crate::delivery::Namespaces>>,
    pub admission: Arc<Admission>,
    pub lookup: Arc<dyn CaptureLookup>,
    pub peers: Arc<Directory>,
    pub pool: Arc<TunnelPool>,
    pub tokens: Arc<Tokens>,
    pub mark: u32,
}

/// How long the peer may take to answer a request (it connects to its workload meanwhile).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
const EXTERNAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a tunnel could not be opened (the peer is unreachable, or did not answer).
#[derive(Debug, thiserror::Error)]
#[error("peer enforcer {peer} unreachable: {error}")]
pub struct Unreachable {
    peer: String,
    error: io::Error,
}

impl Outbound {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        self.serve_in(listener, None).await
    }

    /// Serves a listener in another network namespace than the enforcer's (`netns`: its
    /// cookie), one a workload with a network of its own connects in: its capture records
    /// are that namespace's.
    pub async fn serve_in(
        self: Arc<Self>,
        listener: TcpListener,
        netns: Option<u64>,
    ) -> io::Result<()> {
        loop {
            let (app, client) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = app.set_nodelay(true);
            let this = self.clone();
            tokio::spawn(async move { this.handle(app, client, netns).await });
        }
    }

    async fn handle(&self, app: TcpStream, client: SocketAddr, netns: Option<u64>) {
        let mut flow = self.admission.track(
            Direction::Outbound,
            Endpoint::addr(client),
            Endpoint::addr(client),
        );
        // Attesting the process may block (hashing, NSS): never on this worker.
        let captured = match self.lookup.take(client, netns).resolve_blocking().await {
            Ok(captured) => captured,
            Err(why) => {
                reset_on_close(&app);
                return flow.fail(Code::NoCapture, why);
            }
        };
        flow.src.captured(&captured, self.admission.name());
        flow.dst = Endpoint::addr(captured.dst);
        let table = self.peers.table();
        let plan = route::plan(&captured, &table);
        match plan.route {
            Route::Peer(peer) => self.via_tunnel(app, &captured, &plan, peer, flow).await,
            Route::External => self.external(app, &captured, &plan, flow, netns).await,
        }
    }

    /// Connects to `dst` from the workload's own namespace (cookie `netns`), as the workload
    /// itself would have: its routes, its source address, its network's filters.
    async fn connect_from_namespace(&self, netns: u64, dst: SocketAddr) -> io::Result<TcpStream> {
        let Some(ns) = self.namespaces.get().cloned() else {
            return Err(io::Error::other("its network namespace is not served"));
        };
        let domain = socket2::Domain::for_address(dst);
        let socket = tokio::task::spawn_blocking(move || ns.socket_in(netns, domain))
            .await
            .map_err(io::Error::other)?
            .ok_or_else(|| io::Error::other("its network namespace is no longer served"))??;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        match tokio::time::timeout(EXTERNAL_CONNECT_TIMEOUT, socket.connect(dst)).await {
            Ok(s) => s,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} from the workload's namespace timed out"),
            )),
        }
    }

    /// A destination no enforcer serves: reached directly if policy allows it.
    async fn external(
        &self,
        mut app: TcpStream,
        captured: &Captured,
        plan: &Plan<'_>,
        mut flow: FlowTracker,
        netns: Option<u64>,
    ) {
        let ip = captured.dst.ip();
        flow.dst.dns_name = self.admission.decisions().dns().name_of(ip);
        let attempt = plan.attempt(route::external_party(captured));
        let Some(mut guard) = self.admission.admit(attempt, &mut flow, Code::Policy, |r| {
            format!("no enforcer serves {ip}; {r}")
        }) else {
            reset_on_close(&app);
            return flow.finish();
        };
        let connected = match netns {
            None => connect_marked(captured.dst, self.mark, None, EXTERNAL_CONNECT_TIMEOUT).await,
            Some(netns) => self.connect_from_namespace(netns, captured.dst).await,
        };
        let mut remote = match connected {
            Ok(s) => s,
            Err(e) => {
                reset_on_close(&app);
                return flow.fail(
                    Code::PeerUnreachable,
                    format!("external destination unreachable: {e}"),
                );
            }
        };
        let plain = async { splice_plain(&mut app, &mut remote).await.map(Ended::Clean) };
        let carried = carry(&mut guard, &mut flow, Facing::Source, plain, |e| {
            format!("connection broken: {e}")
        })
        .await;
        if carried == Carried::Revoked {
            reset_on_close(&app);
            reset_on_close(&remote);
        }
        flow.finish()
    }

    async fn via_tunnel(
        &self,
        mut app: TcpStream,
        captured: &Captured,
        plan: &Plan<'_>,
        peer: &Peer,
        mut flow: FlowTracker,
    ) {
        flow.dst.enforcer = Some(peer.name.clone());
        let Some((mut carrying, dst_identity)) = self.answered(peer, captured, &mut flow).await
        else {
            reset_on_close(&app);
            return flow.finish();
        };
        let dst = Party::workload(dst_identity.labels, Some(captured.dst.ip()));
        let attempt = plan.attempt(dst);
        let Some(mut guard) = self
            .admission
            .admit(attempt, &mut flow, Code::Policy, |r| format!("egress {r}"))
        else {
            // Egress denied: nothing was sent yet; the peer resets its delivered connection.
            carrying.stream.reset();
            reset_on_close(&app);
            return flow.finish();
        };
        let counts = Counts::default();
        let spliced = splice(&mut app, &mut carrying.stream, &counts);
        let carried = carry(&mut guard, &mut flow, Facing::Source, spliced, |e| {
            format!("tunnel to {} broke: {e}", peer.name)
        })
        .await;
        if matches!(carried, Carried::Revoked | Carried::Broken) {
            // Cut short: the bytes moved so far are in the counts.
            let (sent, received) = Facing::Source.bytes(counts.transferred());
            flow.transferred(sent, received);
        }
        if carried == Carried::Revoked {
            // Tell the peer (it resets its side); the tunnel's other streams go on.
            reset_on_close(&app);
            carrying.stream.reset();
        }
        flow.finish()
    }

    /// Opens a stream for the connection and reads the peer's answer: the stream and the
    /// destination workload's proven identity, or None with the refusal (or failure)
    /// recorded in `flow`.
    async fn answered(
        &self,
        peer: &Peer,
        captured: &Captured,
        flow: &mut FlowRecord,
    ) -> Option<(Carrying, Identity)> {
        let (tunnel, pooled, answer, carrying) = match self.open(peer, captured).await {
            Ok(opened) => opened,
            Err(e) => {
                // No decision was made: the verdict stays `error`.
                flow.fail(Code::PeerUnreachable, e.to_string());
                return None;
            }
        };
        flow.pooled = Some(pooled);
        // The answer's proof says who accepted (or refused) at the other end.
        let dst_identity = answer
            .proof
            .as_ref()
            .map(|proof| tunnel.check(&self.tokens, proof, captured.dst, now_ms()));
        if let Some(Ok(id)) = &dst_identity {
            flow.dst.identified_by_peer(id);
            flow.dst.enforcer = Some(peer.name.clone());
        }
        let Some(mut carrying) = carrying.filter(|_| answer.status == Status::Connected) else {
            if answer.status == Status::Unauthenticated {
                // The peer may not have cached what we sent: start cold again.
                tunnel.forget_sent();
            }
            let reason = format!("{} refused: {}", peer.name, answer.reason);
            // The peer's refusal code, as its own flow record has it.
            match answer.status {
                Status::NotServed | Status::Denied | Status::Unauthenticated => {
                    flow.refuse(answer.code, reason)
                }
                _ => flow.fail(answer.code, reason),
            }
            return None;
        };
        match dst_identity {
            Some(Ok(id)) => Some((carrying, id)),
            refused => {
                // We cannot tell who accepted: nothing was sent yet; reset the peer's side.
                let refusal = match refused {
                    Some(Err(e)) => e,
                    _ => Refusal::NoToken,
                };
                carrying.stream.reset();
                let code = refusal.code();
                let reason = format!(
                    "destination {refusal} ({code}) in the answer of {}",
                    peer.name
                );
                flow.refuse(code, reason);
                None
            }
        }
    }

    /// Takes a tunnel and asks on a stream of it. A pooled tunnel that turns out dead (the
    /// peer restarted, say) is retried once on a fresh one: no application byte has been
    /// sent yet, so the retry is invisible.
    async fn open(
        &self,
        peer: &Peer,
        captured: &Captured,
    ) -> Result<(Arc<Tunnel>, bool, Response, Option<Carrying>), Unreachable> {
        let unreachable = |error: io::Error| Unreachable {
            peer: peer.name.clone(),
            error,
        };
        let (tunnel, pooled) = self.pool.get(peer).await.map_err(unreachable)?;
        match self.exchange(&tunnel, captured).await {
            Ok((answer, carrying)) => Ok((tunnel, pooled, answer, carrying)),
            Err(e @ AskError::Tunnel(_)) if pooled => {
                tracing::debug!(peer = %peer.name, error = %e, "pooled tunnel was dead; dialing a fresh one");
                tunnel.retire();
                let tunnel = self.pool.dial(peer).await.map_err(unreachable)?;
                let (answer, carrying) = self
                    .exchange(&tunnel, captured)
                    .await
                    .map_err(|e| unreachable(e.into_io()))?;
                Ok((tunnel, false, answer, carrying))
            }
            Err(e) => {
                if matches!(e, AskError::Tunnel(_)) {
                    tunnel.retire();
                }
                Err(unreachable(e.into_io()))
            }
        }
    }

    /// Opens a stream with the request, with a token for the source bound to the tunnel's
    /// session, and reads the answer.
    async fn exchange(
        &self,
        tunnel: &Arc<Tunnel>,
        captured: &Captured,
    ) -> Result<(Response, Option<Carrying>), AskError> {
        tunnel
            .ask(
                &self.tokens,
                &captured.identity,
                captured.dst,
                &captured.origin,
                now_ms(),
            )?
            .answer(ANSWER_TIMEOUT)
            .await
    }
}
