//! The server end: a SYN for a workload port in, its SYN-ACK out, the client's proof in.
use std::sync::Arc;

use super::{Engine, LiveConnection, Outcome, allow, attach_or_drop, refuse, set_identity};
use crate::{
    authz::{Party, Side},
    flow::{Direction, FlowRecord},
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
        let mut rec = self.record(Direction::Inbound, seg.src, seg.dst, now_ms);
        rec.dst.enforcer = Some(self.setup.name.clone());
        let reset_client = || packet::reset(seg.dst, seg.src, 0, seg.seq.wrapping_add(1));
        let refused = |rec: FlowRecord, code: &str, reason: String| {
            Outcome {
                send: vec![reset_client()],
                ..Outcome::drop()
            }
            .with_flow(refuse(rec, code, reason))
        };
        let Some(workload) = self.setup.services.workload(seg.dst.port()).cloned() else {
            return refused(
                rec,
                "not-served",
                format!("no workload serves port {}", seg.dst.port()),
            );
        };
        set_identity(&mut rec.dst, &workload.identity);
        rec.dst.workload = Some(workload.name.clone());
        let dst_party = Party::workload(workload.identity.labels.clone(), None);
        let (clean, message) = match detached {
            Ok(Some(d)) => d,
            Ok(None) => {
                // No token: a peer without an enforcer; policy on external networks decides.
                rec.direction = Direction::Direct;
                rec.src.dns_name = self.setup.authz.dns().name_of(seg.src.ip());
                let outcome = self.setup.authz.check(
                    &Party::external(seg.src.ip()),
                    &dst_party,
                    seg.dst.port(),
                    workload.observe,
                );
                rec.rule = outcome.rule.clone();
                if !outcome.allowed {
                    return refused(
                        rec,
                        "unauthenticated",
                        format!(
                            "unauthenticated: the SYN carried no token; {}",
                            outcome.reason
                        ),
                    );
                }
                // Nothing to prove later: the connection is proven now.
                let rec = allow(rec, &outcome);
                let live = LiveConnection {
                    side: Side::Ingress,
                    local: seg.dst,
                    remote: seg.src,
                    src: Party::external(seg.src.ip()),
                    dst: dst_party,
                    port: seg.dst.port(),
                    observe: workload.observe,
                    record: rec,
                };
                return Outcome {
                    mark: self.setup.proven_mark,
                    ..Outcome::accept()
                }
                .with_live(live);
            }
            Err(e) => return refused(rec, "malformed", format!("SYN from {}: {e}", seg.src)),
        };
        let (client_key, token) = match Message::decode(&message) {
            Ok(Message::Syn { client_key, token }) => (client_key, token),
            Ok(_) => return refused(rec, "malformed", "the SYN carried no SYN message".into()),
            Err(e) => return refused(rec, "malformed", format!("SYN from {}: {e}", seg.src)),
        };
        let Some(peer) = self.setup.peers.lookup(seg.src.ip()) else {
            return refused(
                rec,
                "issuer-not-peer",
                format!(
                    "a token from {}, which no configured enforcer serves",
                    seg.src.ip()
                ),
            );
        };
        rec.src.enforcer = Some(peer.name.clone());
        let Some(peer_key) = self.setup.peer_keys.get(&peer.name) else {
            return refused(
                rec,
                "untrusted-issuer",
                format!("no certificate configured for peer {}", peer.name),
            );
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
                return refused(
                    rec,
                    e.reason(),
                    format!("source {e} ({}) in the SYN from {}", e.reason(), peer.name),
                );
            }
        };
        set_identity(&mut rec.src, &src_identity);
        let src_party = Party::workload(src_identity.labels.clone(), Some(seg.src.ip()));
        let outcome =
            self.setup
                .authz
                .check(&src_party, &dst_party, seg.dst.port(), workload.observe);
        if !outcome.allowed {
            rec.rule = outcome.rule.clone();
            return refused(rec, "policy", format!("ingress {}", outcome.reason));
        }
        let rec = allow(rec, &outcome);
        // A new connection on a 4-tuple proven before: nothing of it passes before its proof.
        self.lock_proven().remove(&key);
        let live = LiveConnection {
            side: Side::Ingress,
            local: seg.dst,
            remote: seg.src,
            src: src_party,
            dst: dst_party,
            port: seg.dst.port(),
            observe: workload.observe,
            record: rec,
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
                        let rec = refuse(
                            h.live.record.clone(),
                            e.reason(),
                            format!("cannot sign a token: {e}"),
                        );
                        servers.remove(&key);
                        return Outcome::drop().with_flow(rec);
                    }
                    (_, Err(e)) => {
                        let rec =
                            refuse(h.live.record.clone(), "bad-proof", format!("SYN key: {e}"));
                        servers.remove(&key);
                        return Outcome::drop().with_flow(rec);
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
                return Outcome {
                    send: vec![packet::reset(seg.dst, seg.src, seg.ack, seg.seq)],
                    ..Outcome::drop()
                }
                .with_flow(refuse(
                    h.live.record,
                    "malformed",
                    format!("ACK from {}: {e}", seg.src),
                ));
            }
        };
        let pending = self.lock_servers().remove(&key).filter(|h| {
            matches!(&h.step, ServerStep::AwaitAck { server_isn, .. } if seg.ack == server_isn.wrapping_add(1))
        });
        let Some(h) = pending else {
            // A proof for no handshake of ours (a replay, or a stray): never passed on.
            let mut rec = self.record(Direction::Inbound, seg.src, seg.dst, now_ms);
            rec.dst.enforcer = Some(self.setup.name.clone());
            return Outcome::drop().with_flow(refuse(
                rec,
                "no-handshake",
                format!("an ACK proof from {} for no pending handshake", seg.src),
            ));
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
                    Err(("bad-proof", "the ACK proof does not verify".to_owned()))
                }
            }
            Ok(_) => Err(("malformed", "the ACK carried no ACK message".into())),
            Err(e) => Err(("malformed", format!("ACK from {}: {e}", seg.src))),
        };
        if let Err((code, reason)) = verified {
            return Outcome {
                send: vec![packet::reset(seg.dst, seg.src, seg.ack, seg.seq)],
                ..Outcome::drop()
            }
            .with_flow(refuse(h.live.record, code, reason));
        }
        self.lock_proven().insert(key, now_ms);
        let mut live = h.live;
        live.record.duration_ms = now_ms.saturating_sub(h.started_ms);
        Outcome {
            mark: self.setup.proven_mark,
            ..Outcome::rewrite(clean)
        }
        .with_live(live)
    }
}
