//! The inbound side.
//!
//! * The tunnel listener terminates mutual TLS from peer enforcers, reads the request
//!   header, checks that the destination is a workload port of this host (a tunnel is never
//!   a relay to a third host), connects to the workload from the delivery address, answers,
//!   and splices.
//! * The direct listener receives connections that `sk_lookup` steered away from a
//!   protected port because they did not come through a tunnel. They come from an
//!   unauthenticated peer and are refused (later policy may allow external sources).
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::{
    authz::{Authorizer, Party, Side},
    copy::{Buffers, Ended, is_disconnect, send_reset, splice, splice_plain},
    flow::{Direction, Endpoint, FlowLog, FlowRecord, Mode, Verdict, label_map, now_ms},
    identity::session::{Tokens, TunnelSession, session_binding},
    local::{LocalAddrs, LocalServices},
    socket::{connect_marked, reset_on_close},
    tls::peer_name,
    wire::{Request, Response, Status, WireError},
};

pub struct Inbound {
    pub name: String,
    pub authz: Arc<Authorizer>,
    pub tokens: Arc<Tokens>,
    pub acceptor: TlsAcceptor,
    pub services: LocalServices,
    pub addrs: LocalAddrs,
    pub mark: u32,
    /// Source address of deliveries to local workloads; `sk_lookup` lets it through.
    pub delivery_src4: Ipv4Addr,
    pub flows: FlowLog,
    /// How long a tunnel may stay idle before its header (pooled tunnels wait here).
    pub idle_timeout: Duration,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
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
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            tokio::spawn(async move { this.handle_tunnel(tcp, remote).await });
        }
    }

    fn record(&self, direction: Direction, src: Endpoint, dst: Endpoint) -> FlowRecord {
        FlowRecord::new(&self.name, Mode::Tunnel, direction, src, dst, now_ms())
    }

    async fn handle_tunnel(&self, tcp: TcpStream, remote: SocketAddr) {
        let handshake_start = Instant::now();
        let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return self.refuse_handshake(remote, handshake_start, e.to_string()),
            Err(_) => {
                return self.refuse_handshake(
                    remote,
                    handshake_start,
                    "TLS handshake timed out".into(),
                );
            }
        };
        let conn = tls.get_ref().1;
        let cert = conn.peer_certificates().and_then(|c| c.first());
        let peer = cert
            .and_then(peer_name)
            .unwrap_or_else(|| "<unnamed>".into());
        let session = session_binding(conn)
            .map_err(|e| e.to_string())
            .and_then(|binding| {
                self.tokens
                    .session(peer.clone(), cert, binding)
                    .map_err(|e| e.to_string())
            });
        let mut session = match session {
            Ok(s) => s,
            Err(e) => {
                let _ = shutdown_quietly(&mut tls).await;
                return self.refuse_handshake(remote, handshake_start, format!("{peer}: {e}"));
            }
        };
        let mut buffers = Buffers::default();
        // One tunnel carries one connection at a time, as many as the source sends.
        loop {
            // An idle (pooled) tunnel waits here until an application connection needs it.
            let request =
                match tokio::time::timeout(self.idle_timeout, Request::read(&mut tls)).await {
                    Ok(Ok(request)) => request,
                    // The source closed (or reset) an idle tunnel, or it idled out: not a
                    // connection attempt.
                    Ok(Err(WireError::Truncated("preamble") | WireError::Io(_))) | Err(_) => break,
                    Ok(Err(e)) => {
                        let mut rec = self.record(
                            Direction::Inbound,
                            Endpoint::addr(remote),
                            Endpoint::addr(remote),
                        );
                        rec.src.enforcer = Some(peer);
                        rec.verdict = Verdict::Denied;
                        rec.reason = format!("bad tunnel header: {e}");
                        rec.code = "bad-header".into();
                        let _ = Response::new(Status::BadRequest, rec.reason.clone())
                            .with_code("bad-header")
                            .write(&mut tls)
                            .await;
                        self.finish(rec, Instant::now());
                        break;
                    }
                };
            if !self
                .handle_request(&mut tls, &mut session, &mut buffers, remote, request)
                .await
            {
                break;
            }
        }
        let _ = shutdown_quietly(&mut tls).await;
    }

    /// Serves one request on a tunnel; returns whether the tunnel is clean for the next one.
    async fn handle_request(
        &self,
        tls: &mut TlsStream<TcpStream>,
        session: &mut TunnelSession,
        buffers: &mut Buffers,
        remote: SocketAddr,
        request: Request,
    ) -> bool {
        let start = Instant::now();
        let peer = session.peer.clone();
        let peer = peer.as_str();
        let mut rec = self.record(
            Direction::Inbound,
            Endpoint {
                addr: remote,
                workload: Some(request.source.workload.clone()).filter(|w| !w.is_empty()),
                enforcer: Some(peer.to_owned()),
                pid: Some(request.source.pid),
                uid: Some(request.source.uid),
                spiffe: None,
                dns_name: None,
                labels: Default::default(),
            },
            Endpoint::addr(request.dst),
        );
        rec.dst.enforcer = Some(self.name.clone());
        // Who is asking comes first: an unauthenticated request learns nothing, not even
        // whether the port is served.
        let src_identity = match self
            .tokens
            .check(session, &request.proof, request.dst, now_ms())
        {
            Ok(id) => id,
            Err(refusal) => {
                rec.verdict = Verdict::Denied;
                rec.reason = format!("source {refusal} ({})", refusal.reason());
                rec.code = refusal.reason().into();
                tracing::info!(peer, reason = refusal.reason(), error = %refusal, "refused a tunnel request");
                let answer = Response::new(
                    Status::Unauthenticated,
                    format!("{}: {refusal} ({})", self.name, refusal.reason()),
                );
                return self.answer_refusal(tls, answer, rec, start).await;
            }
        };
        rec.src.spiffe = Some(src_identity.spiffe.clone());
        rec.src.labels = label_map(&src_identity.labels);
        let local = self.addrs.contains(request.dst.ip());
        let Some(workload) = local
            .then(|| self.services.workload(request.dst.port()))
            .flatten()
            .cloned()
        else {
            rec.verdict = Verdict::Denied;
            rec.code = "not-served".into();
            rec.reason = if local {
                format!(
                    "no workload of {} serves port {}",
                    self.name,
                    request.dst.port()
                )
            } else {
                format!("{} is not an address of {}", request.dst.ip(), self.name)
            };
            let answer = Response::new(Status::NotServed, rec.reason.clone());
            return self.answer_refusal(tls, answer, rec, start).await;
        };
        rec.dst.workload = Some(workload.name.clone());
        let port = request.dst.port();
        rec.dst.spiffe = Some(workload.identity.spiffe.clone());
        rec.dst.labels = label_map(&workload.identity.labels);
        let src = Party::workload(src_identity.labels, Some(remote.ip()));
        let dst = Party::workload(workload.identity.labels.clone(), Some(request.dst.ip()));
        // Our answer proves who accepted (or refused): signed for the destination workload.
        let answer_proof =
            match self
                .tokens
                .prove(session, &workload.identity, request.dst, now_ms())
            {
                Ok(p) => p,
                Err(e) => {
                    rec.reason = format!("cannot sign for {}: {e}", workload.name);
                    let answer = Response::new(Status::Unreachable, rec.reason.clone());
                    return self.answer_refusal(tls, answer, rec, start).await;
                }
            };
        let outcome = self.authz.check(&src, &dst, port, workload.observe);
        rec.rule = outcome.rule.clone();
        if !outcome.allowed {
            rec.verdict = Verdict::Denied;
            rec.reason = format!("ingress {}", outcome.reason);
            rec.code = "policy".into();
            let answer = Response::new(
                Status::Denied,
                format!("{}: ingress {}", self.name, outcome.reason),
            )
            .with_proof(answer_proof);
            return self.answer_refusal(tls, answer, rec, start).await;
        }
        let mut delivered = match self.deliver(request.dst).await {
            Ok(s) => s,
            Err(e) => {
                rec.reason = format!("workload unreachable: {e}");
                rec.code = "workload-unreachable".into();
                let answer = Response::new(Status::Unreachable, rec.reason.clone());
                return self.answer_refusal(tls, answer, rec, start).await;
            }
        };
        if let Err(e) = Response::new(Status::Connected, workload.name.clone())
            .with_proof(answer_proof)
            .write(tls)
            .await
        {
            reset_on_close(&delivered);
            rec.reason = format!("tunnel broke before delivery: {e}");
            rec.code = "broken".into();
            self.finish(rec, start);
            return false;
        }
        rec.verdict = if outcome.observed_deny {
            Verdict::ObservedDeny
        } else {
            Verdict::Allowed
        };
        if outcome.observed_deny {
            rec.reason = outcome.reason;
        }
        let mut guard = self
            .authz
            .register(Side::Ingress, src, dst, port, workload.observe);
        // `delivered` is the workload side: bytes from it are bytes the source received.
        let ended = tokio::select! {
            r = splice(&mut delivered, tls, buffers) => Some(r),
            reason = guard.revoked() => {
                rec.revoked_by(reason);
                None
            }
        };
        if let (Some(Ok(Ended::Reset { .. }) | Err(_)), Some(reason)) = (&ended, guard.revocation())
        {
            rec.revoked_by(reason);
        }
        let clean = match ended {
            None => {
                // Revoked: tell the source (it resets its side); the tunnel is not reused.
                let t = buffers.transferred();
                (rec.bytes_sent, rec.bytes_received) = (t.to_app, t.from_app);
                reset_on_close(&delivered);
                let _ = tokio::time::timeout(Duration::from_secs(1), send_reset(tls)).await;
                false
            }
            Some(Ok(Ended::Clean(t))) => {
                (rec.bytes_sent, rec.bytes_received) = (t.to_app, t.from_app);
                true
            }
            Some(Ok(Ended::Reset {
                transferred: t,
                reason,
            })) => {
                (rec.bytes_sent, rec.bytes_received) = (t.to_app, t.from_app);
                if rec.verdict != Verdict::Denied {
                    rec.reason = reason;
                }
                false
            }
            Some(Err(e)) => {
                if !is_disconnect(&e) {
                    tracing::debug!(error = %e, "tunnel failed during a connection");
                }
                rec.reason = format!("tunnel from {peer} broke: {e}");
                rec.code = "broken".into();
                false
            }
        };
        self.finish(rec, start);
        clean
    }

    /// Answers a request that is not delivered and records it; returns whether the tunnel
    /// is still clean for the next request.
    async fn answer_refusal(
        &self,
        tls: &mut TlsStream<TcpStream>,
        answer: Response,
        mut rec: FlowRecord,
        start: Instant,
    ) -> bool {
        if rec.code.is_empty() {
            rec.code = rec.default_code().into();
        }
        // The source records the same code as we do.
        let sent = answer.with_code(rec.code.clone()).write(tls).await.is_ok();
        self.finish(rec, start);
        sent
    }

    /// Connects to a local workload from the delivery address (`sk_lookup` lets it through).
    async fn deliver(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let bind = match dst.ip() {
            IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(self.delivery_src4), 0),
            IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0),
        };
        connect_marked(dst, self.mark, Some(bind), DELIVERY_TIMEOUT).await
    }

    fn refuse_handshake(&self, remote: SocketAddr, start: Instant, reason: String) {
        let mut rec = self.record(
            Direction::Inbound,
            Endpoint::addr(remote),
            Endpoint::addr(remote),
        );
        rec.verdict = Verdict::Denied;
        rec.reason = format!("TLS handshake failed: {reason}");
        rec.code = "tls-handshake".into();
        self.finish(rec, start);
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
        let start = Instant::now();
        let dst_addr = stream.local_addr().unwrap_or(remote);
        let mut rec = self.record(
            Direction::Direct,
            Endpoint::addr(remote),
            Endpoint::addr(dst_addr),
        );
        rec.dst.enforcer = Some(self.name.clone());
        let Some(workload) = self.services.workload(dst_addr.port()).cloned() else {
            reset_on_close(&stream);
            rec.verdict = Verdict::Denied;
            rec.reason = format!(
                "no workload of {} serves port {}",
                self.name,
                dst_addr.port()
            );
            rec.code = "not-served".into();
            return self.finish(rec, start);
        };
        rec.dst.workload = Some(workload.name.clone());
        let src = Party::external(remote.ip());
        rec.src.dns_name = self.authz.dns().name_of(remote.ip());
        let dst = Party::workload(workload.identity.labels.clone(), Some(dst_addr.ip()));
        let outcome = self
            .authz
            .check(&src, &dst, dst_addr.port(), workload.observe);
        rec.rule = outcome.rule.clone();
        if !outcome.allowed {
            reset_on_close(&stream);
            rec.verdict = Verdict::Denied;
            rec.reason = format!(
                "unauthenticated: the connection did not come through a Tessera tunnel; {}",
                outcome.reason
            );
            rec.code = "unauthenticated".into();
            return self.finish(rec, start);
        }
        let mut delivered = match self.deliver(dst_addr).await {
            Ok(s) => s,
            Err(e) => {
                reset_on_close(&stream);
                rec.reason = format!("workload unreachable: {e}");
                rec.code = "workload-unreachable".into();
                return self.finish(rec, start);
            }
        };
        rec.verdict = if outcome.observed_deny {
            Verdict::ObservedDeny
        } else {
            Verdict::Allowed
        };
        rec.reason = outcome.reason;
        let mut guard =
            self.authz
                .register(Side::Ingress, src, dst, dst_addr.port(), workload.observe);
        tokio::select! {
            r = splice_plain(&mut stream, &mut delivered) => match r {
                Ok(t) => (rec.bytes_sent, rec.bytes_received) = (t.from_app, t.to_app),
                Err(e) => {
                    rec.reason = format!("connection broken: {e}");
                    rec.code = "broken".into();
                }
            },
            reason = guard.revoked() => {
                reset_on_close(&stream);
                reset_on_close(&delivered);
                rec.revoked_by(reason);
            }
        }
        self.finish(rec, start)
    }

    fn finish(&self, mut record: FlowRecord, start: Instant) {
        record.duration_ms = start.elapsed().as_millis() as u64;
        if record.code.is_empty() {
            record.code = record.default_code().into();
        }
        self.flows.record(record);
    }
}

async fn shutdown_quietly(tls: &mut TlsStream<TcpStream>) -> io::Result<()> {
    tokio::time::timeout(Duration::from_secs(1), tls.shutdown())
        .await
        .unwrap_or(Ok(()))
}
