//! The client end: a local workload's SYN out, the server's SYN-ACK in, the first ACK out.
use std::sync::Arc;

use pnet_packet::tcp::TcpFlags;

use super::{Engine, LiveConnection, Outcome, PacketVerdict, Refused, attach_or_drop};
use crate::{
    authz::Party,
    capture::Captured,
    code::Code,
    flow::{Direction, FlowTracker},
    handshake::{
        fast::{FastGrant, FastPair, FastPeer},
        message::Message,
        packet::{self, Segment},
        proof::{self, Ephemeral, Proof, ProofKey, PublicKey, Role, Transcript},
    },
    identity::{Identity, token::KeyId},
    route::{self, Route},
};

pub(super) struct ClientHandshake {
    pub(super) isn: u32,
    pub(super) started_ms: u64,
    pub(super) step: ClientStep,
}

pub(super) enum ClientStep {
    /// Our SYN went to an enforcer with this message; waiting for its SYN-ACK.
    AwaitSynAck {
        /// The connection's record so far (written at a refusal or expiry; once allowed it
        /// goes with the live connection).
        flow: Box<FlowTracker>,
        syn_message: Vec<u8>,
        syn_token: Vec<u8>,
        client_key: PublicKey,
        ephemeral: Arc<Ephemeral>,
        peer: String,
        peer_key: KeyId,
        /// The directory's generation when the SYN was sealed (for the fast path's key).
        directory: u64,
        captured: Box<Captured>,
    },
    /// The SYN-ACK verified; the first ACK carries `ack_message`.
    Proven {
        server_isn: u32,
        synack_message: Vec<u8>,
        ack_message: Vec<u8>,
        proof_sent: bool,
    },
    /// A destination without an enforcer that policy allows: nothing to add.
    External,
}

impl Engine {
    pub(super) fn client_syn(&self, packet: &[u8], seg: &Segment, now_ms: u64) -> Outcome {
        let key = (seg.src, seg.dst);
        if let Some(h) = self.lock_clients().get(&key).filter(|h| h.isn == seg.seq) {
            // A retransmitted SYN: the same message again.
            return match &h.step {
                ClientStep::AwaitSynAck { syn_message, .. } => attach_or_drop(packet, syn_message),
                _ => Outcome::accept(),
            };
        }
        let mut rec = self.track(Direction::Outbound, seg.src, seg.dst, now_ms);
        rec.src.enforcer = Some(self.setup.admission.name().to_owned());
        // The workload's RST: the connect fails at once instead of timing out.
        let reset_app = || Outcome {
            send: vec![packet::reset(seg.dst, seg.src, 0, seg.seq.wrapping_add(1))],
            ..Outcome::drop()
        };
        let refused = |flow: FlowTracker, code: Code, reason: String| {
            flow.refuse_at(code, reason, now_ms);
            reset_app()
        };
        // Attestation may take a while on a first contact: outside the engine's locks.
        let captured = match self.setup.lookup.take(seg.src, None).resolve() {
            Ok(captured) => captured,
            Err(reason) => return refused(rec, Code::NoCapture, reason),
        };
        rec.src.captured(&captured, self.setup.admission.name());
        let directory = self.setup.peers.generation();
        let table = self.setup.peers.table();
        let plan = route::plan(&captured, &table);
        let Route::Peer(peer) = plan.route else {
            return self.syn_to_external(seg, rec, &captured, &plan, now_ms);
        };
        rec.dst.enforcer = Some(peer.name.clone());
        let peer_key = self
            .setup
            .peer_keys
            .read()
            .ok()
            .and_then(|k| k.get(&peer.name).copied());
        let Some(peer_key) = peer_key else {
            let reason = format!("no certificate configured for peer {}", peer.name);
            return refused(rec, Code::UntrustedIssuer, reason);
        };
        let ephemeral = self.client_keys.key(now_ms);
        let client_key = ephemeral.public;
        let binding = proof::syn_binding(&client_key, seg.seq);
        let token = match self.setup.tokens.seal_cold(
            &peer_key,
            &captured.identity,
            seg.dst,
            binding,
            now_ms,
        ) {
            Ok(t) => t,
            Err(e) => return refused(rec, e.code(), format!("cannot sign a token: {e}")),
        };
        let syn_message = Message::Syn {
            client_key,
            token: token.clone(),
        }
        .encode();
        let out = attach_or_drop(packet, &syn_message);
        if out.verdict == PacketVerdict::Accept {
            self.lock_clients().insert(
                key,
                ClientHandshake {
                    isn: seg.seq,
                    started_ms: now_ms,
                    step: ClientStep::AwaitSynAck {
                        flow: Box::new(rec),
                        syn_message,
                        syn_token: token,
                        client_key,
                        ephemeral,
                        peer: peer.name.clone(),
                        peer_key,
                        directory,
                        captured: Box::new(captured),
                    },
                },
            );
        }
        out
    }

    /// A SYN to a destination no enforcer serves: egress policy on external networks
    /// decides now; an allowed connection needs nothing more from us.
    fn syn_to_external(
        &self,
        seg: &Segment,
        mut flow: FlowTracker,
        captured: &Captured,
        plan: &route::Plan<'_>,
        now_ms: u64,
    ) -> Outcome {
        let admission = &self.setup.admission;
        let ip = seg.dst.ip();
        flow.dst.dns_name = admission.decisions().dns().name_of(ip);
        let attempt = plan.attempt(route::external_party(captured));
        let Some(ruling) = admission.decide(&attempt, &mut flow, Code::Policy, |r| {
            format!("no enforcer serves {ip}; {r}")
        }) else {
            flow.finish_at(now_ms);
            // The workload's RST: the connect fails at once instead of timing out.
            return Outcome {
                send: vec![packet::reset(seg.dst, seg.src, 0, seg.seq.wrapping_add(1))],
                ..Outcome::drop()
            };
        };
        self.lock_clients().insert(
            (seg.src, seg.dst),
            ClientHandshake {
                isn: seg.seq,
                started_ms: now_ms,
                step: ClientStep::External,
            },
        );
        let live = LiveConnection {
            local: seg.src,
            remote: seg.dst,
            attempt,
            ruling,
            flow,
        };
        Outcome::accept().with_live(live)
    }

    pub(super) fn client_synack(&self, packet: &[u8], seg: &Segment, now_ms: u64) -> Outcome {
        let key = (seg.dst, seg.src);
        let detached = packet::detach(packet);
        let mut clients = self.lock_clients();
        let Some(mut h) = clients
            .remove(&key)
            .filter(|h| seg.ack == h.isn.wrapping_add(1))
        else {
            // Not a handshake of ours. A token-bearing SYN-ACK nobody asked for is dropped;
            // anything else is someone else's connection.
            return match detached {
                Ok(None) => Outcome::accept(),
                _ => Outcome::drop(),
            };
        };
        let (out, next) = match h.step {
            ClientStep::External => {
                let out = match detached {
                    Ok(None) => Outcome::accept(),
                    // Our enforcer did not ask for a token; one arrives anyway: not ours.
                    Ok(Some((clean, _))) => Outcome::rewrite(clean),
                    Err(_) => Outcome::drop(),
                };
                (out, Some(ClientStep::External))
            }
            step @ ClientStep::Proven { .. } => synack_again(seg, h.isn, detached, step),
            step @ ClientStep::AwaitSynAck { .. } => {
                self.synack_verify(seg, h.isn, detached, step, now_ms)
            }
        };
        // A handshake that goes on stays; a refused one is forgotten.
        if let Some(step) = next {
            h.step = step;
            clients.insert(key, h);
        }
        out
    }

    /// The SYN-ACK our SYN waited for: the server's key, proof and token, then egress
    /// policy on the destination's identity. Allowed: the connection goes live and the
    /// handshake waits for our first ACK. Refused: the workload gets a reset instead of the
    /// SYN-ACK, the server's half-open connection one too.
    fn synack_verify(
        &self,
        seg: &Segment,
        isn: u32,
        detached: Detached,
        step: ClientStep,
        now_ms: u64,
    ) -> (Outcome, Option<ClientStep>) {
        let ClientStep::AwaitSynAck {
            flow,
            syn_token,
            client_key,
            ephemeral,
            peer,
            peer_key,
            directory,
            captured,
            ..
        } = step
        else {
            unreachable!("called for a handshake awaiting its SYN-ACK");
        };
        let reset = |flow: FlowTracker, code: Code, reason: String| {
            flow.refuse_at(code, reason, now_ms);
            let to_server = packet::reset(seg.dst, seg.src, seg.ack, seg.seq.wrapping_add(1));
            let to_app = packet::reset(
                seg.src,
                seg.dst,
                seg.seq.wrapping_add(1),
                isn.wrapping_add(1),
            );
            let out = Outcome {
                send: vec![to_server],
                ..Outcome::rewrite(to_app)
            };
            (out, None)
        };
        let mut flow = *flow;
        let pending = Pending {
            syn_token,
            client_key,
            ephemeral,
            peer: &peer,
            peer_key,
        };
        let (synack, dst_identity, proof_key, digest) =
            match self.check_synack(seg, isn, detached, pending, now_ms) {
                Ok(checked) => checked,
                Err((code, reason)) => return reset(flow, code, reason),
            };
        flow.dst.identified_by_peer(&dst_identity);
        let table = self.setup.peers.table();
        let plan = route::plan(&captured, &table);
        let attempt = plan.attempt(Party::workload(dst_identity.labels, Some(seg.src.ip())));
        let admission = &self.setup.admission;
        let Some(ruling) =
            admission.decide(&attempt, &mut flow, Code::Policy, |r| format!("egress {r}"))
        else {
            let reason = flow.reason.clone();
            return reset(flow, Code::Policy, reason);
        };
        let ack_message = Message::Ack {
            proof: proof_key.prove_digest(Role::Client, &digest),
        }
        .encode();
        let live = LiveConnection {
            local: seg.dst,
            remote: seg.src,
            attempt,
            ruling,
            flow,
        };
        let proven = ClientStep::Proven {
            server_isn: seg.seq,
            synack_message: synack.message,
            ack_message,
            proof_sent: false,
        };
        let mut out = Outcome::rewrite(synack.clean).with_live(live);
        out.fast = Some(Box::new(FastGrant {
            pair: FastPair::derive(&proof_key, &digest),
            peer: FastPeer {
                name: peer,
                key: peer_key,
                directory,
            },
            local: seg.dst,
            remote: seg.src,
            caller: Some((captured.origin.cgroup_id, captured.origin.uid)),
        }));
        (out, Some(proven))
    }

    /// The SYN-ACK's message, the server's proof over the transcript, and the destination
    /// workload's token (bound to the transcript): the parsed SYN-ACK, who the destination
    /// is, and the key and digest our own proof is made with.
    fn check_synack(
        &self,
        seg: &Segment,
        isn: u32,
        detached: Detached,
        pending: Pending<'_>,
        now_ms: u64,
    ) -> Result<(SynAck, Identity, ProofKey, [u8; 32]), Refused> {
        let peer = pending.peer;
        let synack = parse_synack(detached, peer)?;
        let transcript = Transcript {
            client: seg.dst,
            server: seg.src,
            client_isn: isn,
            server_isn: seg.seq,
            syn_token: pending.syn_token,
            client_key: pending.client_key,
            synack_token: synack.token.clone(),
            server_key: synack.server_key,
        };
        let digest = transcript.digest();
        let Ok(proof_key) = self
            .client_keys
            .agree(&pending.ephemeral, &synack.server_key)
        else {
            return Err((Code::BadProof, format!("SYN-ACK of {peer}: bad key")));
        };
        if proof_key
            .check_digest(Role::Server, &digest, &synack.proof)
            .is_err()
        {
            let reason = format!("the SYN-ACK proof of {peer} does not verify");
            return Err((Code::BadProof, reason));
        }
        let binding = proof::synack_binding(&transcript);
        let tokens = &self.setup.tokens;
        let dst_identity = tokens
            .check_token(
                &transcript.synack_token,
                peer,
                &pending.peer_key,
                seg.dst,
                &binding,
                now_ms,
            )
            .map_err(|e| {
                let reason = format!("destination {e} ({}) in the SYN-ACK of {peer}", e.code());
                (e.code(), reason)
            })?;
        Ok((synack, dst_identity, proof_key, digest))
    }

    /// A packet of a marked connection before its first ACK was handled: the first carries
    /// the proof; each gets the acked bit, which the kernel saves in the connmark so that
    /// nothing later of the connection is queued. (Packets queued behind the proof keep
    /// their order: the queue is FIFO.)
    pub(super) fn client_ack(&self, packet: &[u8], seg: &Segment) -> Outcome {
        let mut clients = self.lock_clients();
        let mut out = match clients.get_mut(&(seg.src, seg.dst)) {
            Some(ClientHandshake {
                step:
                    ClientStep::Proven {
                        ack_message,
                        proof_sent,
                        ..
                    },
                ..
            }) if !*proof_sent && seg.flags & TcpFlags::ACK != 0 => {
                *proof_sent = true;
                attach_or_drop(packet, ack_message)
            }
            _ => Outcome::accept(),
        };
        out.mark = self.setup.acked_mark;
        out
    }
}

/// A SYN-ACK split from its message, as `packet::detach` gives it.
type Detached = Result<Option<packet::Detached>, packet::PacketError>;

/// What our SYN left to check the SYN-ACK against.
struct Pending<'a> {
    syn_token: Vec<u8>,
    client_key: PublicKey,
    ephemeral: Arc<Ephemeral>,
    peer: &'a str,
    peer_key: KeyId,
}

/// A SYN-ACK with its message taken apart.
struct SynAck {
    /// The packet as the server's kernel wrote it.
    clean: Vec<u8>,
    /// The message as sent (a retransmission must carry the very same).
    message: Vec<u8>,
    server_key: PublicKey,
    proof: Proof,
    token: Vec<u8>,
}

/// The SYN-ACK message of `peer`.
fn parse_synack(detached: Detached, peer: &str) -> Result<SynAck, Refused> {
    let (clean, message) = match detached {
        Ok(Some(d)) => d,
        Ok(None) => {
            let reason = format!("the SYN-ACK of {peer} carried no token");
            return Err((Code::NoToken, reason));
        }
        Err(e) => return Err((Code::Malformed, format!("SYN-ACK of {peer}: {e}"))),
    };
    match Message::decode(&message) {
        Ok(Message::SynAck {
            server_key,
            proof,
            token,
        }) => Ok(SynAck {
            clean,
            message,
            server_key,
            proof,
            token,
        }),
        Ok(_) => Err((
            Code::Malformed,
            format!("SYN-ACK of {peer}: not a SYN-ACK message"),
        )),
        Err(e) => Err((Code::Malformed, format!("SYN-ACK of {peer}: {e}"))),
    }
}

/// A SYN-ACK for a handshake we proved already: a retransmission (the same one only) means
/// our proof was lost on the way. The kernel's answer to it is not queued again (the
/// connection's first ACK is behind it), so the proof goes out in an ACK of our own.
fn synack_again(
    seg: &Segment,
    isn: u32,
    detached: Detached,
    step: ClientStep,
) -> (Outcome, Option<ClientStep>) {
    let ClientStep::Proven {
        server_isn,
        ref synack_message,
        ref ack_message,
        ..
    } = step
    else {
        unreachable!("called for a proven handshake");
    };
    let same =
        matches!(&detached, Ok(Some((_, m))) if m == synack_message) && seg.seq == server_isn;
    let out = match detached {
        Ok(Some((clean, _))) if same => {
            let ack = packet::build(
                seg.dst,
                seg.src,
                isn.wrapping_add(1),
                server_isn.wrapping_add(1),
                TcpFlags::ACK,
            );
            Outcome {
                send: packet::attach(&ack, ack_message).into_iter().collect(),
                ..Outcome::rewrite(clean)
            }
        }
        _ => Outcome::drop(),
    };
    (out, Some(step))
}
