//! The outbound side: connections that the eBPF connect hooks redirected to us.
//!
//! For each accepted connection: find its original destination and origin (recorded by the
//! eBPF programs, keyed by the client's address and port). If an enforcer serves the
//! destination, take a tunnel to it, send the request (with the source's identity), and on
//! its answer (with the destination's identity) decide egress policy before the first
//! application byte flows. A destination without an enforcer is reached directly only if
//! policy allows it. Anything refused is reset: a captured connection never goes around us.
use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};

use crate::{
    authz::{Authorizer, Party, Side},
    copy::{Ended, is_disconnect, send_reset, splice, splice_plain},
    flow::{Direction, Endpoint, FlowLog, FlowRecord, Mode, Verdict, label_map, now_ms},
    identity::{
        Identity,
        session::{Refusal, Tokens},
    },
    peers::{Peer, PeerTable},
    pool::{Tunnel, TunnelPool},
    socket::{connect_marked, reset_on_close},
    wire::{Request, Response, Source, Status},
};

/// The original destination of a captured connection and who made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    pub dst: SocketAddr,
    pub source: Source,
    /// The source's identity: its workload's, plus what the enforcer derived from the
    /// connecting process (uid, executable).
    pub identity: Identity,
    /// The source workload is in policy observe mode.
    pub observe: bool,
}

/// Finds (and forgets) the capture record of a redirected connection by its client address.
pub trait CaptureLookup: Send + Sync + 'static {
    fn take(&self, client: SocketAddr) -> Option<Captured>;
}

pub struct Outbound {
    /// This enforcer's name (the reporter of its flows).
    pub name: String,
    pub lookup: Arc<dyn CaptureLookup>,
    pub peers: PeerTable,
    pub pool: Arc<TunnelPool>,
    pub authz: Arc<Authorizer>,
    pub tokens: Arc<Tokens>,
    pub flows: FlowLog,
    pub mark: u32,
}

/// How long the peer may take to answer a request (it connects to its workload meanwhile).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
const EXTERNAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Outbound {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
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
            tokio::spawn(async move { this.handle(app, client).await });
        }
    }

    async fn handle(&self, mut app: TcpStream, client: SocketAddr) {
        let start = Instant::now();
        let mut record = FlowRecord::new(
            &self.name,
            Mode::Tunnel,
            Direction::Outbound,
            Endpoint::addr(client),
            Endpoint::addr(client),
            now_ms(),
        );
        let Some(captured) = self.lookup.take(client) else {
            reset_on_close(&app);
            record.reason = "no capture record for this connection".into();
            record.code = "no-capture".into();
            return self.finish(record, start);
        };
        record.src.workload = Some(captured.source.workload.clone()).filter(|w| !w.is_empty());
        record.src.pid = Some(captured.source.pid);
        record.src.uid = Some(captured.source.uid);
        record.src.enforcer = Some(self.name.clone());
        record.src.spiffe = Some(captured.identity.spiffe.clone());
        record.src.labels = label_map(&captured.identity.labels);
        record.dst = Endpoint::addr(captured.dst);
        let src = Party::workload(captured.identity.labels.clone(), None);

        match self.peers.lookup(captured.dst.ip()) {
            Some(peer) => {
                self.via_tunnel(app, captured, src, peer, record, start)
                    .await
            }
            None => self.external(&mut app, &captured, src, record, start).await,
        }
    }

    /// A destination no enforcer serves: reached directly if policy allows it.
    async fn external(
        &self,
        app: &mut TcpStream,
        captured: &Captured,
        src: Party,
        mut record: FlowRecord,
        start: Instant,
    ) {
        let dst = Party::external(captured.dst.ip());
        record.dst.dns_name = self.authz.dns().name_of(captured.dst.ip());
        let outcome = self
            .authz
            .check(&src, &dst, captured.dst.port(), captured.observe);
        record.rule = outcome.rule.clone();
        if !outcome.allowed {
            reset_on_close(app);
            record.verdict = Verdict::Denied;
            record.reason = format!(
                "no enforcer serves {}; {}",
                captured.dst.ip(),
                outcome.reason
            );
            return self.finish(record, start);
        }
        let mut remote =
            match connect_marked(captured.dst, self.mark, None, EXTERNAL_CONNECT_TIMEOUT).await {
                Ok(s) => s,
                Err(e) => {
                    reset_on_close(app);
                    record.reason = format!("external destination unreachable: {e}");
                    record.code = "peer-unreachable".into();
                    return self.finish(record, start);
                }
            };
        record.verdict = if outcome.observed_deny {
            Verdict::ObservedDeny
        } else {
            Verdict::Allowed
        };
        record.reason = outcome.reason;
        let mut guard = self.authz.register(
            Side::Egress,
            src,
            dst,
            captured.dst.port(),
            captured.observe,
        );
        tokio::select! {
            r = splice_plain(app, &mut remote) => match r {
                Ok(t) => (record.bytes_sent, record.bytes_received) = (t.from_app, t.to_app),
                Err(e) => {
                    record.reason = format!("connection broken: {e}");
                    record.code = "broken".into();
                }
            },
            reason = guard.revoked() => {
                reset_on_close(app);
                reset_on_close(&remote);
                record.revoked_by(reason);
            }
        }
        self.finish(record, start)
    }

    async fn via_tunnel(
        &self,
        mut app: TcpStream,
        captured: Captured,
        src: Party,
        peer: &Peer,
        mut record: FlowRecord,
        start: Instant,
    ) {
        record.dst.enforcer = Some(peer.name.clone());
        let port = captured.dst.port();
        let (mut tunnel, pooled, answer) = match self.open(peer, &captured).await {
            Ok(opened) => opened,
            Err(reason) => {
                reset_on_close(&app);
                record.reason = reason;
                return self.finish(record, start);
            }
        };
        record.pooled = Some(pooled);
        // The answer's proof says who accepted (or refused) at the other end.
        let dst_identity = answer.proof.as_ref().map(|proof| {
            self.tokens
                .check(&tunnel.session, proof, captured.dst, now_ms())
        });
        if let Some(Ok(id)) = &dst_identity {
            record.dst.workload = id.labels.get("tessera.io/workload").map(str::to_owned);
            record.dst.spiffe = Some(id.spiffe.clone());
            record.dst.labels = label_map(&id.labels);
        }
        if answer.status != Status::Connected {
            reset_on_close(&app);
            if answer.status == Status::Unauthenticated {
                // The peer may not have cached what we sent: start cold again.
                tunnel.session.forget_sent();
            }
            // A refusal leaves the tunnel clean: it can carry the next connection.
            self.pool.put(peer, tunnel);
            record.verdict = match answer.status {
                Status::NotServed | Status::Denied | Status::Unauthenticated => Verdict::Denied,
                _ => Verdict::Error,
            };
            record.reason = format!("{} refused: {}", peer.name, answer.reason);
            // The peer's refusal code, as its own flow record has it.
            record.code = answer.code.clone();
            return self.finish(record, start);
        }
        let dst_identity = match dst_identity {
            Some(Ok(id)) => id,
            refused => {
                // We cannot tell who accepted: nothing was sent yet; reset both sides.
                let refusal = match refused {
                    Some(Err(e)) => e,
                    _ => Refusal::NoToken,
                };
                let _ = send_reset(&mut tunnel.stream).await;
                reset_on_close(&app);
                record.verdict = Verdict::Denied;
                record.reason = format!(
                    "destination {refusal} ({}) in the answer of {}",
                    refusal.reason(),
                    peer.name
                );
                record.code = refusal.reason().into();
                return self.finish(record, start);
            }
        };
        let dst = Party::workload(dst_identity.labels, Some(captured.dst.ip()));
        let outcome = self.authz.check(&src, &dst, port, captured.observe);
        record.rule = outcome.rule.clone();
        if !outcome.allowed {
            // Egress denied: nothing was sent yet; the peer resets its delivered connection.
            let _ = send_reset(&mut tunnel.stream).await;
            reset_on_close(&app);
            record.verdict = Verdict::Denied;
            record.reason = format!("egress {}", outcome.reason);
            record.code = "policy".into();
            return self.finish(record, start);
        }
        record.verdict = if outcome.observed_deny {
            Verdict::ObservedDeny
        } else {
            Verdict::Allowed
        };
        if outcome.observed_deny {
            record.reason = outcome.reason;
        }
        let mut guard = self
            .authz
            .register(Side::Egress, src, dst, port, captured.observe);
        let ended = tokio::select! {
            r = splice(&mut app, &mut tunnel.stream, &mut tunnel.buffers) => Some(r),
            reason = guard.revoked() => {
                record.revoked_by(reason);
                None
            }
        };
        // Both ends revoke on a reload; whichever is first resets the other. Cite the reload
        // here too if it applies to us.
        if let (Some(Ok(Ended::Reset { .. }) | Err(_)), Some(reason)) = (&ended, guard.revocation())
        {
            record.revoked_by(reason);
        }
        match ended {
            None => {
                // Revoked: tell the peer (it resets its side), then drop the tunnel.
                let t = tunnel.buffers.transferred();
                (record.bytes_sent, record.bytes_received) = (t.from_app, t.to_app);
                reset_on_close(&app);
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), send_reset(&mut tunnel.stream))
                        .await;
            }
            Some(Ok(Ended::Clean(t))) => {
                (record.bytes_sent, record.bytes_received) = (t.from_app, t.to_app);
                self.pool.put(peer, tunnel);
            }
            Some(Ok(Ended::Reset {
                transferred: t,
                reason,
            })) => {
                (record.bytes_sent, record.bytes_received) = (t.from_app, t.to_app);
                if record.verdict != Verdict::Denied {
                    record.reason = reason;
                }
            }
            Some(Err(e)) => {
                if !is_disconnect(&e) {
                    tracing::debug!(error = %e, "tunnel failed during a connection");
                }
                if record.verdict != Verdict::Denied {
                    record.reason = format!("tunnel to {} broke: {e}", peer.name);
                    record.code = "broken".into();
                }
            }
        }
        self.finish(record, start)
    }

    /// Takes a tunnel and exchanges the header. A pooled tunnel that turns out dead (the
    /// peer restarted, say) is retried once on a fresh one: no application byte has been
    /// sent yet, so the retry is invisible.
    async fn open(
        &self,
        peer: &Peer,
        captured: &Captured,
    ) -> Result<(Tunnel, bool, Response), String> {
        let unreachable = |e: io::Error| format!("peer enforcer {} unreachable: {e}", peer.name);
        let (mut tunnel, pooled) = self.pool.get(peer).await.map_err(unreachable)?;
        match self.exchange(&mut tunnel, captured).await {
            Ok(answer) => Ok((tunnel, pooled, answer)),
            Err(e) if pooled => {
                tracing::debug!(peer = %peer.name, error = %e, "pooled tunnel was dead; dialing a fresh one");
                let mut tunnel = self.pool.dial(peer).await.map_err(unreachable)?;
                let answer = self
                    .exchange(&mut tunnel, captured)
                    .await
                    .map_err(unreachable)?;
                Ok((tunnel, false, answer))
            }
            Err(e) => Err(unreachable(e)),
        }
    }

    /// Sends the request, with a token for the source bound to this tunnel's session, and
    /// reads the answer.
    async fn exchange(&self, tunnel: &mut Tunnel, captured: &Captured) -> io::Result<Response> {
        let proof = self
            .tokens
            .prove(
                &mut tunnel.session,
                &captured.identity,
                captured.dst,
                now_ms(),
            )
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let request = Request {
            dst: captured.dst,
            source: captured.source.clone(),
            proof,
        };
        tunnel.stream.write_all(&request.encode()).await?;
        tunnel.stream.flush().await?;
        match tokio::time::timeout(ANSWER_TIMEOUT, Response::read(&mut tunnel.stream)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(io::Error::other(e.to_string())),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no answer from the peer enforcer",
            )),
        }
    }

    fn finish(&self, mut record: FlowRecord, start: Instant) {
        record.duration_ms = start.elapsed().as_millis() as u64;
        if record.code.is_empty() {
            record.code = record.default_code().into();
        }
        self.flows.record(record);
    }
}
