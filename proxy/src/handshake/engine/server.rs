//! The server end: a SYN for a workload port in, its SYN-ACK out, the client's proof in.
use std::sync::Arc;

use super::{Engine, LiveConnection, Outcome, attach_or_drop};
use crate::{
    authz::{Attempt, Party, Side},
    code::Code,
    flow::{Direction, FlowTracker},
    handshake::{
        message::Message,
        packet::{self, Segment},
        proof::{self, ProofKey, PublicKey, Role, Transcript},
    },
    identity::token::KeyId,
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
                Ok(Some((clean, m))) if m == h.syn_message => Outcome::rewrite(clean),
                _ => Outcome::drop(),
            };
        }
        let mut rec = self.track(Direction::Inbound, seg.src, seg.dst, now_ms);
        rec.dst.enforcer = Some(self.setup.admission.name().to_owned());
        // A refused SYN is dropped and the client gets a reset at once.
        let reset_client = || Outcome {
            send: vec![packet::reset(seg.dst, seg.src, 0, seg.seq.wrapping_add(1))],
            ..Outcome::drop()
        };
        let denied = |flow: FlowTracker| {
            flow.finish_at(now_ms);
            reset_client()
        };
        let refused = |flow: FlowTracker, code: Code, reason: String| {
            flow.refuse_at(code, reason, now_ms);
            reset_client()
        };
        let Some(workload) = self.setup.services.workload(seg.dst.port()).cloned() else {
            let reason = format!("no workload serves port {}", seg.dst.port());
            return refused(rec, Code::NotServed, reason);
        };
        rec.dst.identified_by_peer(&workload.identity);
        rec.dst.workload = Some(workload.name.clone());
        let attempt = |src: Party| Attempt {
            side: Side::Ingress,
            src,
            dst: Party::workload(workload.identity.labels.clone(), None),
            port: seg.dst.port(),
            observe: workload.observe,
        };
        let (clean, message) = match detached {
            Ok(Some(d)) => d,
            Ok(None) => {
                // No token: a peer without an enforcer; policy on external networks decides.
                rec.direction = Direction::Direct;
                rec.src.dns_name = self.setup.admission.decisions().dns().name_of(seg.src.ip());
                let attempt = attempt(Party::external(seg.src.ip()));
                let Some(ruling) =
                    self.setup
                        .admission
                        .decide(&attempt, &mut rec, Code::Unauthenticated, |r| {
                            format!("unauthenticated: the SYN carried no token; {r}")
                        })
                else {
                    return denied(rec);
                };
                // Nothing to prove later: the connection is proven now.
                let live = LiveConnection {
                    local: seg.dst,
                    remote: seg.src,
                    attempt,
                    ruling,
                    flow: rec,
                };
                return Outcome {
                    mark: self.setup.proven_mark,
                    ..Outcome::accept()
                }
                .with_live(live);
            }
            Err(e) => return refused(rec, Code::Malformed, format!("SYN from {}: {e}", seg.src)),
        };
        let (client_key, token) = match Message::decode(&message) {
            Ok(Message::Syn { client_key, token }) => (client_key, token),
            Ok(_) => {
                let reason = "the SYN carried no SYN message".into();
                return refused(rec, Code::Malformed, reason);
            }
            Err(e) => return refused(rec, Code::Malformed, format!("SYN from {}: {e}", seg.src)),
        };
        let Some(peer) = self.setup.peers.lookup(seg.src.ip()) else {
            let reason = format!(
                "a token from {}, which no configured enforcer serves",
                seg.src.ip()
            );
            return refused(rec, Code::IssuerNotPeer, reason);
        };
        rec.src.enforcer = Some(peer.name.clone());
        let Some(peer_key) = self.setup.peer_keys.get(&peer.name) else {
            let reason = format!("no certificate configured for peer {}", peer.name);
            return refused(rec, Code::UntrustedIssuer, reason);
        };
        let src_identity = match self.setup.tokens.check_token(
            &token,
            &peer.name,
            peer_key,
            seg.dst,
            &proof::syn_binding(&client_key, seg.seq),
            now_ms,
        ) {
            Ok(id) => id,
            Err(e) => {
                let reason = format!("source {e} ({}) in the SYN from {}", e.code(), peer.name);
                return refused(rec, e.code(), reason);
            }
        };
        rec.src.identified_by_peer(&src_identity);
        rec.src.enforcer = Some(peer.name.clone());
        let attempt = attempt(Party::workload(
            src_identity.labels.clone(),
            Some(seg.src.ip()),
        ));
        let Some(ruling) = self
            .setup
            .admission
            .decide(&attempt, &mut rec, Code::Policy, |r| format!("ingress {r}"))
        else {
            return denied(rec);
        };
        // A new connection on a 4-tuple proven before: nothing of it passes before its proof.
        self.lock_proven().remove(&key);
        let live = LiveConnection {
            local: seg.dst,
            remote: seg.src,
            attempt,
            ruling,
            flow: rec,
        };
        servers.insert(
            key,
            ServerHandshake {
                isn: seg.seq,
                started_ms: now_ms,
                syn_message: message,
                live,
                step: ServerStep::AwaitSynAck {
                    peer_key: *peer_key,
                    client_key,
                    syn_token: token,
                    workload,
                },
            },
        );
        Outcome::rewrite(clean)
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
            ServerStep::AwaitSynAck {
                peer_key,
                client_key,
                syn_token,
                workload,
            } => {
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
                let token = self.setup.tokens.seal_cold(
                    peer_key,
                    &workload.identity,
                    seg.dst,
                    proof::synack_binding(&transcript),
                    now_ms,
                );
                let key_agreed = self.server_keys.agree(&ephemeral, client_key);
                let (token, proof_key) = match (token, key_agreed) {
                    (Ok(t), Ok(k)) => (t, k),
                    (Err(e), _) => {
                        let (code, reason) = (e.code(), format!("cannot sign a token: {e}"));
                        if let Some(h) = servers.remove(&key) {
                            h.live.flow.refuse_at(code, reason, now_ms);
                        }
                        return Outcome::drop();
                    }
                    (_, Err(e)) => {
                        let reason = format!("SYN key: {e}");
                        if let Some(h) = servers.remove(&key) {
                            h.live.flow.refuse_at(Code::BadProof, reason, now_ms);
                        }
                        return Outcome::drop();
                    }
                };
                transcript.synack_token = token.clone();
                let digest = transcript.digest();
                let synack_message = Message::SynAck {
                    server_key: transcript.server_key,
                    proof: proof_key.prove_digest(Role::Server, &digest),
                    token,
                }
                .encode();
                let out = attach_or_drop(packet, &synack_message);
                h.step = ServerStep::AwaitAck {
                    server_isn: seg.seq,
                    synack_message,
                    transcript: digest,
                    key: proof_key,
                };
                out
            }
        }
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
                    Outcome::drop()
                };
            }
            Err(e) => {
                let Some(h) = self.lock_servers().remove(&key) else {
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
        let pending = self.lock_servers().remove(&key).filter(|h| {
            matches!(&h.step, ServerStep::AwaitAck { server_isn, .. } if seg.ack == server_isn.wrapping_add(1))
        });
        let Some(h) = pending else {
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
        let live = h.live;
        Outcome {
            mark: self.setup.proven_mark,
            ..Outcome::rewrite(clean)
        }
        .with_live(live)
    }
}
