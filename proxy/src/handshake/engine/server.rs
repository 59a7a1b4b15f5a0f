//! The server end: a SYN for a workload port in, its SYN-ACK out, the client's proof in.
use std::sync::Arc;

use super::{Engine, LiveConnection, Outcome, Refused, attach_or_drop};
use crate::{
    authz::{Attempt, Party, Side},
    code::Code,
    flow::{Direction, FlowTracker},
    handshake::{
        fast::{FastGrant, FastPair, FastPeer},
        message::Message,
        packet::{self, Segment},
        proof::{self, ProofKey, PublicKey, Role, Transcript},
    },
    identity::token::KeyId,
    limits::Limit,
    local::LocalWorkload,
};

pub(super) struct ServerHandshake {
    pub(super) isn: u32,
    pub(super) started_ms: u64,
    pub(super) syn_message: Vec<u8>,
    /// What the connection is once the client proves itself; its record is also what a
    /// refusal or an expiry is written from.
    pub(super) live: LiveConnection,
    pub(super) step: ServerStep,
    /// The client's enforcer, for the fast path's key.
    pub(super) peer: FastPeer,
}

pub(super) enum ServerStep {
    AwaitSynAck {
        /// The key of the client's enforcer (whose pair key seals our token).
        peer_key: KeyId,
        client_key: PublicKey,
        syn_token: Vec<u8>,
        workload: Arc<LocalWorkload>,
    },
    AwaitAck {
        server_isn: u32,
        synack_message: Vec<u8>,
        /// The transcript's digest: what the client's proof must be over.
        transcript: [u8; 32],
        key: ProofKey,
    },
}

impl Engine {
    pub(super) fn server_syn(&self, packet: &[u8], seg: &Segment, now_ms: u64) -> Outcome {
        let key = (seg.src, seg.dst);
        let detached = packet::detach(packet);
        let mut servers = self.lock_servers();
        if let Some(h) = servers.get(&key).filter(|h| h.isn == seg.seq) {
            // A retransmitted (or duplicated) SYN: accepted again only with the very same
            // message, which was verified already.
            return match detached {
                Ok(Some((clean, m))) if m == h.syn_message => syn_without_data(&clean),
                _ => Outcome::drop(),
            };
        }
        let mut flow = self.track(Direction::Inbound, seg.src, seg.dst, now_ms);
        flow.dst.enforcer = Some(self.setup.admission.name().to_owned());
        let Some(workload) = self.setup.services.workload(seg.dst.port()) else {
            let reason = format!("no workload serves port {}", seg.dst.port());
            return refuse_syn(seg, flow, Code::NotServed, reason, now_ms);
        };
        flow.dst.identified_by_peer(&workload.identity);
        flow.dst.workload = Some(workload.name.clone());
        match detached {
            Ok(None) if packet::fast_option(packet).is_some() => {
                // The kernel's fast path did not verify it (unknown or expired key, wrong
                // peer, or a forged tag): it never becomes a token-less SYN.
                let reason = format!(
                    "fast path SYN from {}: its tag does not verify (unknown, expired or revoked key, or forged)",
                    seg.src
                );
                refuse_syn(seg, flow, Code::BadProof, reason, now_ms)
            }
            Ok(None) => self.syn_without_token(seg, flow, &workload, now_ms),
            Err(e) => {
                let reason = format!("SYN from {}: {e}", seg.src);
                refuse_syn(seg, flow, Code::Malformed, reason, now_ms)
            }
            Ok(Some(_)) if servers.len() >= super::MAX_PENDING => {
                self.setup.drops.hit(Limit::PendingHandshakes);
                let reason = format!(
                    "{} handshakes are pending already: the SYN from {} is refused",
                    servers.len(),
                    seg.src
                );
                refuse_syn(seg, flow, Code::Overloaded, reason, now_ms)
            }
            Ok(Some((clean, message))) => {
                match self.syn_with_token(seg, flow, workload, message, now_ms) {
                    Ok(h) => {
                        // A new connection on a 4-tuple proven before: nothing of it
                        // passes before its proof.
                        self.lock_proven().remove(&key);
                        servers.insert(key, h);
                        syn_without_data(&clean)
                    }
                    Err(refused) => refused,
                }
            }
        }
    }

    /// A SYN without a token: a peer without an enforcer; policy on external networks
    /// decides, and an allowed connection is proven at once (nothing to prove later).
    fn syn_without_token(
        &self,
        seg: &Segment,
        mut flow: FlowTracker,
        workload: &LocalWorkload,
        now_ms: u64,
    ) -> Outcome {
        let admission = &self.setup.admission;
        flow.direction = Direction::Direct;
        flow.src.dns_name = admission.decisions().dns().name_of(seg.src.ip());
        let attempt = ingress(seg, workload, Party::external(seg.src.ip()));
        let Some(ruling) = admission.decide(&attempt, &mut flow, Code::Unauthenticated, |r| {
            format!("unauthenticated: the SYN carried no token; {r}")
        }) else {
            flow.finish_at(now_ms);
            return reset_client(seg);
        };
        let live = LiveConnection {
            local: seg.dst,
            remote: seg.src,
            attempt,
            ruling,
            flow,
        };
        Outcome {
            mark: self.setup.proven_mark,
            ..Outcome::accept()
        }
        .with_live(live)
    }

    /// A SYN with a token: its enforcer must be a configured peer with a certified key,
    /// the token must verify (bound to the client's key and ISN), and ingress policy must
    /// allow its identity. The handshake then waits for our SYN-ACK; a refusal resets the
    /// client.
    fn syn_with_token(
        &self,
        seg: &Segment,
        mut flow: FlowTracker,
        workload: Arc<LocalWorkload>,
        message: Vec<u8>,
        now_ms: u64,
    ) -> Result<ServerHandshake, Outcome> {
        let refused = |flow, code, reason| Err(refuse_syn(seg, flow, code, reason, now_ms));
        let (client_key, token) = match Message::decode(&message) {
            Ok(Message::Syn { client_key, token }) => (client_key, token),
            Ok(_) => {
                let reason = "the SYN carried no SYN message".into();
                return refused(flow, Code::Malformed, reason);
            }
            Err(e) => return refused(flow, Code::Malformed, format!("SYN from {}: {e}", seg.src)),
        };
        let directory = self.setup.peers.generation();
        let table = self.setup.peers.table();
        let Some(peer) = table.lookup(seg.src.ip()) else {
            let reason = format!(
                "a token from {}, which no configured enforcer serves",
                seg.src.ip()
            );
            return refused(flow, Code::IssuerNotPeer, reason);
        };
        flow.src.enforcer = Some(peer.name.clone());
        let peer_key = self
            .setup
            .peer_keys
            .read()
            .ok()
            .and_then(|k| k.get(&peer.name).copied());
        let Some(peer_key) = peer_key else {
            let reason = format!("no certificate configured for peer {}", peer.name);
            return refused(flow, Code::UntrustedIssuer, reason);
        };
        if !self
            .verify_rate
            .allow(seg.src.ip(), now_ms, &self.setup.drops)
        {
            let reason = format!(
                "{} is over its rate of token checks ({} a second)",
                seg.src.ip(),
                super::VERIFY_RATE
            );
            return refused(flow, Code::RateLimited, reason);
        }
        let binding = proof::syn_binding(&client_key, seg.seq);
        let tokens = &self.setup.tokens;
        let src_identity =
            match tokens.check_token(&token, &peer.name, &peer_key, seg.dst, &binding, now_ms) {
                Ok(id) => id,
                Err(e) => {
                    let reason = format!("source {e} ({}) in the SYN from {}", e.code(), peer.name);
                    return refused(flow, e.code(), reason);
                }
            };
        // Under a control plane: the peer's scope, from its certificate, on what it vouches.
        let src_identity = match self.setup.peers.admit(&peer.name) {
            Ok(Some(scope)) => match crate::identity::scope::stamp(src_identity, &scope) {
                Ok(id) => id,
                Err(e) => {
                    let reason = format!(
                        "source {e} ({}) in the SYN from {}",
                        Code::OutOfScope,
                        peer.name
                    );
                    return refused(flow, Code::OutOfScope, reason);
                }
            },
            Ok(None) => src_identity,
            Err(e) => return refused(flow, Code::NotInDirectory, e.to_string()),
        };
        flow.src.identified_by_peer(&src_identity);
        flow.src.enforcer = Some(peer.name.clone());
        let src = Party::workload(src_identity.labels, Some(seg.src.ip()));
        let attempt = ingress(seg, &workload, src);
        let admission = &self.setup.admission;
        let Some(ruling) = admission.decide(&attempt, &mut flow, Code::Policy, |r| {
            format!("ingress {r}")
        }) else {
            flow.finish_at(now_ms);
            return Err(reset_client(seg));
        };
        let live = LiveConnection {
            local: seg.dst,
            remote: seg.src,
            attempt,
            ruling,
            flow,
        };
        Ok(ServerHandshake {
            isn: seg.seq,
            started_ms: now_ms,
            syn_message: message,
            live,
            peer: FastPeer {
                name: peer.name.clone(),
                key: peer_key,
                directory,
            },
            step: ServerStep::AwaitSynAck {
                peer_key,
                client_key,
                syn_token: token,
                workload,
            },
        })
    }

    pub(super) fn server_synack(&self, packet: &[u8], seg: &Segment, now_ms: u64) -> Outcome {
        let key = (seg.dst, seg.src);
        let mut servers = self.lock_servers();
        let Some(h) = servers
            .get_mut(&key)
            .filter(|h| seg.ack == h.isn.wrapping_add(1))
        else {
            // An external peer's connection (proven at its SYN), or not ours.
            return Outcome::accept();
        };
        match &h.step {
            ServerStep::AwaitAck {
                server_isn,
                synack_message,
                ..
            } => {
                // The kernel retransmits its SYN-ACK: the same message again.
                if *server_isn == seg.seq {
                    attach_or_drop(packet, synack_message)
                } else {
                    Outcome::drop()
                }
            }
            ServerStep::AwaitSynAck { .. } => match self.seal_synack(seg, h, now_ms) {
                Ok((synack_message, digest, proof_key)) => {
                    let out = attach_or_drop(packet, &synack_message);
                    h.step = ServerStep::AwaitAck {
                        server_isn: seg.seq,
                        synack_message,
                        transcript: digest,
                        key: proof_key,
                    };
                    out
                }
                Err((code, reason)) => {
                    if let Some(h) = servers.remove(&key) {
                        h.live.flow.refuse_at(code, reason, now_ms);
                    }
                    Outcome::drop()
                }
            },
        }
    }

    /// Our SYN-ACK's message for a verified SYN: the destination workload's token (sealed
    /// with the client enforcer's pair key, bound to the transcript), a fresh key and our
    /// proof; with the transcript's digest and the proof key for the client's ACK.
    fn seal_synack(
        &self,
        seg: &Segment,
        h: &ServerHandshake,
        now_ms: u64,
    ) -> Result<(Vec<u8>, [u8; 32], ProofKey), Refused> {
        let ServerStep::AwaitSynAck {
            peer_key,
            client_key,
            syn_token,
            workload,
        } = &h.step
        else {
            unreachable!("called for a handshake awaiting its SYN-ACK");
        };
        let ephemeral = self.server_keys.key(now_ms);
        let mut transcript = Transcript {
            client: seg.dst,
            server: seg.src,
            client_isn: h.isn,
            server_isn: seg.seq,
            syn_token: syn_token.clone(),
            client_key: *client_key,
            synack_token: Vec::new(),
            server_key: ephemeral.public,
        };
        let binding = proof::synack_binding(&transcript);
        let token = self
            .setup
            .tokens
            .seal_cold(peer_key, &workload.identity, seg.dst, binding, now_ms)
            .map_err(|e| (e.code(), format!("cannot sign a token: {e}")))?;
        let proof_key = self
            .server_keys
            .agree(&ephemeral, client_key)
            .map_err(|e| (Code::BadProof, format!("SYN key: {e}")))?;
        transcript.synack_token = token.clone();
        let digest = transcript.digest();
        let synack_message = Message::SynAck {
            server_key: transcript.server_key,
            proof: proof_key.prove_digest(Role::Server, &digest),
            token,
        }
        .encode();
        Ok((synack_message, digest, proof_key))
    }

    /// The pending handshake `seg` acknowledges (its ack number is our SYN-ACK's ISN + 1),
    /// taken out; any other handshake on the 4-tuple stays as it was.
    fn take_acked(&self, key: &super::FourTuple, seg: &Segment) -> Option<ServerHandshake> {
        let mut servers = self.lock_servers();
        let acked = servers.get(key).is_some_and(|h| {
            matches!(&h.step, ServerStep::AwaitAck { server_isn, .. } if seg.ack == server_isn.wrapping_add(1))
        });
        if acked { servers.remove(key) } else { None }
    }

    pub(super) fn server_ack(&self, packet: &[u8], seg: &Segment, now_ms: u64) -> Outcome {
        let key = (seg.src, seg.dst);
        let (clean, message) = match packet::detach(packet) {
            Ok(Some(d)) => d,
            Ok(None) => {
                // Queued because its connection was not proven when it arrived: packets that
                // were behind the proof in the queue pass; anything else is dropped (a client
                // that never proves itself ends as a `no-proof` record when its handshake
                // expires).
                return if self.lock_proven().contains_key(&key) {
                    Outcome {
                        mark: self.setup.proven_mark,
                        ..Outcome::accept()
                    }
                } else {
                    if packet::fast_option(packet).is_some() && seg.ack != 0 {
                        // A fast path ACK the kernel did not verify (a replay, a forged
                        // tag, or one over another server ISN): recorded, dropped.
                        let mut rec = self.track(Direction::Inbound, seg.src, seg.dst, now_ms);
                        rec.dst.enforcer = Some(self.setup.admission.name().to_owned());
                        let reason =
                            format!("fast path ACK from {}: its tag does not verify", seg.src);
                        rec.refuse_at(Code::BadProof, reason, now_ms);
                    }
                    Outcome::drop()
                };
            }
            Err(e) => {
                // Only an ACK of our SYN-ACK may end the handshake: a blind packet (which
                // cannot know our ISN) is dropped and changes nothing.
                let Some(h) = self.take_acked(&key, seg) else {
                    return Outcome::drop();
                };
                let reason = format!("ACK from {}: {e}", seg.src);
                h.live.flow.refuse_at(Code::Malformed, reason, now_ms);
                return Outcome {
                    send: vec![packet::reset(seg.dst, seg.src, seg.ack, seg.seq)],
                    ..Outcome::drop()
                };
            }
        };
        let Some(h) = self.take_acked(&key, seg) else {
            // A proof for no handshake of ours (a replay, or a stray): never passed on.
            let mut rec = self.track(Direction::Inbound, seg.src, seg.dst, now_ms);
            rec.dst.enforcer = Some(self.setup.admission.name().to_owned());
            let reason = format!("an ACK proof from {} for no pending handshake", seg.src);
            rec.refuse_at(Code::NoHandshake, reason, now_ms);
            return Outcome::drop();
        };
        let ServerStep::AwaitAck {
            transcript,
            key: proof_key,
            ..
        } = &h.step
        else {
            unreachable!("filtered above");
        };
        let verified = match Message::decode(&message) {
            Ok(Message::Ack { proof }) => {
                if proof_key
                    .check_digest(Role::Client, transcript, &proof)
                    .is_ok()
                {
                    Ok(())
                } else {
                    Err((Code::BadProof, "the ACK proof does not verify".to_owned()))
                }
            }
            Ok(_) => Err((Code::Malformed, "the ACK carried no ACK message".into())),
            Err(e) => Err((Code::Malformed, format!("ACK from {}: {e}", seg.src))),
        };
        if let Err((code, reason)) = verified {
            h.live.flow.refuse_at(code, reason, now_ms);
            return Outcome {
                send: vec![packet::reset(seg.dst, seg.src, seg.ack, seg.seq)],
                ..Outcome::drop()
            };
        }
        self.lock_proven().insert(key, now_ms);
        let fast = FastGrant {
            pair: FastPair::derive(proof_key, transcript),
            peer: h.peer.clone(),
            local: seg.dst,
            remote: seg.src,
            caller: None,
        };
        let live = h.live;
        let mut out = Outcome {
            mark: self.setup.proven_mark,
            ..Outcome::rewrite(clean)
        }
        .with_live(live);
        out.fast = Some(Box::new(fast));
        out
    }
}

/// The ingress attempt of a SYN for `workload` from `src`.
fn ingress(seg: &Segment, workload: &LocalWorkload, src: Party) -> Attempt {
    Attempt {
        side: Side::Ingress,
        src,
        dst: Party::workload(workload.identity.labels.clone(), None),
        port: seg.dst.port(),
        observe: workload.observe,
    }
}

/// A refused SYN is dropped and the client gets a reset at once.
fn reset_client(seg: &Segment) -> Outcome {
    Outcome {
        send: vec![packet::reset(seg.dst, seg.src, 0, seg.seq.wrapping_add(1))],
        ..Outcome::drop()
    }
}

/// Refuses a SYN with `code`: recorded, dropped, the client reset.
fn refuse_syn(
    seg: &Segment,
    flow: FlowTracker,
    code: Code,
    reason: String,
    now_ms: u64,
) -> Outcome {
    flow.refuse_at(code, reason, now_ms);
    reset_client(seg)
}

/// A verified SYN as the kernel gets it: without data it may carry (TCP Fast Open), which
/// must not reach the application before the client's proof.
fn syn_without_data(clean: &[u8]) -> Outcome {
    match packet::without_payload(clean) {
        Ok(p) => Outcome::rewrite(p),
        Err(_) => Outcome::drop(),
    }
}
