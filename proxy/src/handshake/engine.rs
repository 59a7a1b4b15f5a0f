//! The handshake engine: what an enforcer does with each handshake packet the kernel hands
//! it. Pure (no sockets, no kernel): a packet goes in; a verdict, the rewritten packet,
//! packets to send (resets) and flow records come out. The NFQUEUE workers only move bytes.
//!
//! Client end (a local workload connects out; its socket carries the handshake mark):
//! * SYN out: the workload's cold token and a fresh X25519 key are attached, if an enforcer
//!   serves the destination; otherwise egress policy on external networks decides at once.
//! * SYN-ACK in: the server's proof, its token (bound to the transcript) and egress policy
//!   are checked before the kernel sees the packet; any failure turns it into a reset.
//! * first ACK out: the client's proof is attached.
//!
//! Server end (a SYN reaches a workload port of this host):
//! * SYN in: the token is checked and ingress policy decided; the message is taken off
//!   before the kernel (and conntrack) see the packet. A SYN without a token is an external
//!   peer: policy on external networks decides.
//! * SYN-ACK out: the destination workload's token, a fresh key and the server's proof.
//! * ACK in: the client's proof; only then is the connection marked proven (the kernel
//!   drops every other packet of an unproven connection to a protected port).
//!
//! Retransmitted SYNs and SYN-ACKs (same 4-tuple and sequence number) get the same message
//! again; a replayed SYN of a finished handshake is refused by the token's nonce cache.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use pnet_packet::tcp::TcpFlags;
use ring::rand::SystemRandom;

use super::{
    message::Message,
    packet::{self, Segment},
    proof::{self, Ephemeral, ProofKey, PublicKey, Role, Transcript},
};
use crate::{
    authz::{Authorizer, Outcome as PolicyOutcome, Party, Side},
    flow::{Direction, Endpoint, FlowRecord, Mode, Verdict, label_map},
    identity::{
        Identity,
        session::{Refusal, Tokens},
        token::KeyId,
    },
    local::{LocalServices, LocalWorkload},
    outbound::{CaptureLookup, Captured},
    peers::PeerTable,
};

/// What to do with the queued packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketVerdict {
    Accept,
    Drop,
}

#[derive(Debug)]
pub struct Outcome {
    pub verdict: PacketVerdict,
    /// The packet to let through instead of the queued one (None: unchanged).
    pub packet: Option<Vec<u8>>,
    /// Mark bits to set on the packet.
    pub mark: u32,
    /// IP packets to send (resets to the other end of a refused handshake).
    pub send: Vec<Vec<u8>>,
    pub flows: Vec<FlowRecord>,
    /// A connection this packet let through, to watch for policy reloads.
    pub live: Option<Box<LiveConnection>>,
}

/// An allowed connection, as policy reloads re-check it: if a new policy denies it, the
/// enforcer closes its socket (the kernel resets the peer) and records why.
#[derive(Clone, Debug)]
pub struct LiveConnection {
    pub side: Side,
    /// The end on this host, and the other.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub src: Party,
    pub dst: Party,
    pub port: u16,
    pub observe: bool,
    /// The record of the allowed handshake (a revocation is written from it).
    pub record: FlowRecord,
}

impl Outcome {
    fn accept() -> Self {
        Self {
            verdict: PacketVerdict::Accept,
            packet: None,
            mark: 0,
            send: Vec::new(),
            flows: Vec::new(),
            live: None,
        }
    }
    fn rewrite(packet: Vec<u8>) -> Self {
        Self {
            packet: Some(packet),
            ..Self::accept()
        }
    }
    fn drop() -> Self {
        Self {
            verdict: PacketVerdict::Drop,
            ..Self::accept()
        }
    }
    fn with_flow(mut self, rec: FlowRecord) -> Self {
        self.flows.push(rec);
        self
    }
    fn with_live(mut self, live: LiveConnection) -> Self {
        self.live = Some(Box::new(live));
        self
    }
}

/// What an engine works with; the enforcer builds it from its configuration.
pub struct Setup {
    pub name: String,
    pub tokens: Arc<Tokens>,
    pub authz: Arc<Authorizer>,
    pub peers: PeerTable,
    /// The certified key of each peer enforcer, by name (from its configured certificate).
    pub peer_keys: HashMap<String, KeyId>,
    pub lookup: Arc<dyn CaptureLookup>,
    pub services: LocalServices,
    /// Mark bit given to an inbound packet whose connection is proven.
    pub proven_mark: u32,
    /// Mark bit given to an outbound packet once its connection's proof went out.
    pub acked_mark: u32,
    /// How long an unfinished handshake is remembered (ms).
    pub pending_ms: u64,
}

type FourTuple = (SocketAddr, SocketAddr);

/// How long a server end remembers that a connection proved itself (for the packets queued
/// behind its proof).
const PROVEN_KEPT_MS: u64 = 2_000;

struct ClientHandshake {
    isn: u32,
    started_ms: u64,
    record: FlowRecord,
    step: ClientStep,
}

enum ClientStep {
    /// Our SYN went to an enforcer with this message; waiting for its SYN-ACK.
    AwaitSynAck {
        syn_message: Vec<u8>,
        syn_token: Vec<u8>,
        client_key: PublicKey,
        ephemeral: Ephemeral,
        peer: String,
        peer_key: KeyId,
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

struct ServerHandshake {
    isn: u32,
    started_ms: u64,
    syn_message: Vec<u8>,
    record: FlowRecord,
    /// What the connection is once the client proves itself.
    live: LiveConnection,
    step: ServerStep,
}

enum ServerStep {
    AwaitSynAck {
        client_key: PublicKey,
        syn_token: Vec<u8>,
        workload: Arc<LocalWorkload>,
    },
    AwaitAck {
        server_isn: u32,
        synack_message: Vec<u8>,
        transcript: Box<Transcript>,
        key: ProofKey,
    },
}

pub struct Engine {
    setup: Setup,
    rng: SystemRandom,
    clients: Mutex<HashMap<FourTuple, ClientHandshake>>,
    servers: Mutex<HashMap<FourTuple, ServerHandshake>>,
    /// Connections proven at this (server) end lately, and when: packets queued behind the
    /// proof pass.
    proven: Mutex<HashMap<FourTuple, u64>>,
}

fn has(flags: u8, bits: u8) -> bool {
    flags & bits == bits
}

/// A refusal as a flow records it.
fn refuse(mut rec: FlowRecord, code: &str, reason: String) -> FlowRecord {
    rec.verdict = Verdict::Denied;
    rec.code = code.into();
    rec.reason = reason;
    rec
}

fn allow(mut rec: FlowRecord, outcome: &PolicyOutcome) -> FlowRecord {
    rec.rule = outcome.rule.clone();
    rec.verdict = if outcome.observed_deny {
        Verdict::ObservedDeny
    } else {
        Verdict::Allowed
    };
    if outcome.observed_deny {
        rec.reason = outcome.reason.clone();
    }
    rec
}

fn set_identity(end: &mut Endpoint, id: &Identity) {
    end.workload = id.labels.get("tessera.io/workload").map(str::to_owned);
    end.enforcer = id.labels.get("tessera.io/enforcer").map(str::to_owned);
    end.spiffe = Some(id.spiffe.clone());
    end.labels = label_map(&id.labels);
}

impl Engine {
    pub fn new(setup: Setup) -> Self {
        Self {
            setup,
            rng: SystemRandom::new(),
            clients: Mutex::default(),
            servers: Mutex::default(),
            proven: Mutex::default(),
        }
    }

    fn record(
        &self,
        direction: Direction,
        src: SocketAddr,
        dst: SocketAddr,
        now_ms: u64,
    ) -> FlowRecord {
        FlowRecord {
            start_ms: now_ms,
            duration_ms: 0,
            reporter: self.setup.name.clone(),
            direction,
            src: Endpoint::addr(src),
            dst: Endpoint::addr(dst),
            protocol: Default::default(),
            mode: Mode::Handshake,
            verdict: Verdict::Error,
            reason: String::new(),
            code: String::new(),
            rule: None,
            bytes_sent: 0,
            bytes_received: 0,
            pooled: None,
        }
    }

    /// A packet leaving this host: a marked workload's SYN or first ACK, or a SYN-ACK from
    /// a workload port.
    pub fn egress(&self, packet: &[u8], now_ms: u64) -> Outcome {
        let Ok(seg) = packet::segment(packet) else {
            // Not something we queue; never let a parse failure open a hole, never panic.
            return Outcome::drop();
        };
        if has(seg.flags, TcpFlags::SYN | TcpFlags::ACK) {
            self.server_synack(packet, &seg, now_ms)
        } else if has(seg.flags, TcpFlags::SYN) {
            self.client_syn(packet, &seg, now_ms)
        } else if has(seg.flags, TcpFlags::ACK) {
            self.client_ack(packet, &seg)
        } else {
            Outcome::accept()
        }
    }

    /// A packet arriving: a SYN for a workload port, a SYN-ACK, or an ACK with a proof.
    pub fn ingress(&self, packet: &[u8], now_ms: u64) -> Outcome {
        let Ok(seg) = packet::segment(packet) else {
            return Outcome::drop();
        };
        if has(seg.flags, TcpFlags::RST) {
            self.reset_in(&seg, now_ms)
        } else if has(seg.flags, TcpFlags::SYN | TcpFlags::ACK) {
            self.client_synack(packet, &seg, now_ms)
        } else if has(seg.flags, TcpFlags::SYN) {
            self.server_syn(packet, &seg, now_ms)
        } else {
            self.server_ack(packet, &seg, now_ms)
        }
    }

    /// A reset for a handshake in progress: the other end refused it. Its enforcer records
    /// why; this end records that it was refused, at once rather than at expiry.
    fn reset_in(&self, seg: &Segment, now_ms: u64) -> Outcome {
        let mut out = Outcome::accept();
        let mut clients = self.lock_clients();
        let key = (seg.dst, seg.src);
        let refused_our_syn = clients.get(&key).is_some_and(|h| {
            matches!(h.step, ClientStep::AwaitSynAck { .. }) && seg.ack == h.isn.wrapping_add(1)
        });
        if refused_our_syn && let Some(h) = clients.remove(&key) {
            let mut rec = refuse(
                h.record,
                "peer-refused",
                format!("{} refused the connection (reset)", seg.src),
            );
            rec.duration_ms = now_ms.saturating_sub(h.started_ms);
            out.flows.push(rec);
        }
        drop(clients);
        let mut servers = self.lock_servers();
        let key = (seg.src, seg.dst);
        let refused_our_synack = servers.get(&key).is_some_and(|h| {
            matches!(h.step, ServerStep::AwaitAck { .. }) && seg.seq == h.isn.wrapping_add(1)
        });
        if refused_our_synack && let Some(h) = servers.remove(&key) {
            out.flows.push(refuse(
                h.record,
                "peer-refused",
                format!("{} refused the connection (reset)", seg.src),
            ));
        }
        out
    }

    // ---- client end ----

    fn client_syn(&self, packet: &[u8], seg: &Segment, now_ms: u64) -> Outcome {
        let key = (seg.src, seg.dst);
        let mut clients = self.lock_clients();
        if let Some(h) = clients.get(&key).filter(|h| h.isn == seg.seq) {
            // A retransmitted SYN: the same message again.
            return match &h.step {
                ClientStep::AwaitSynAck { syn_message, .. } => attach_or_drop(packet, syn_message),
                _ => Outcome::accept(),
            };
        }
        let mut rec = self.record(Direction::Outbound, seg.src, seg.dst, now_ms);
        rec.src.enforcer = Some(self.setup.name.clone());
        // The workload's RST: the connect fails at once instead of timing out.
        let reset_app = || packet::reset(seg.dst, seg.src, 0, seg.seq.wrapping_add(1));
        let Some(captured) = self.setup.lookup.take(seg.src) else {
            let rec = refuse(
                rec,
                "no-capture",
                "no capture record for this connection".into(),
            );
            return Outcome {
                send: vec![reset_app()],
                ..Outcome::drop()
            }
            .with_flow(rec);
        };
        rec.src.workload = Some(captured.source.workload.clone()).filter(|w| !w.is_empty());
        rec.src.pid = Some(captured.source.pid);
        rec.src.uid = Some(captured.source.uid);
        rec.src.spiffe = Some(captured.identity.spiffe.clone());
        rec.src.labels = label_map(&captured.identity.labels);

        let Some(peer) = self.setup.peers.lookup(seg.dst.ip()) else {
            // No enforcer there: egress policy on external networks decides now.
            rec.dst.dns_name = self.setup.authz.dns().name_of(seg.dst.ip());
            let src = Party::workload(captured.identity.labels.clone(), None);
            let outcome = self.setup.authz.check(
                &src,
                &Party::external(seg.dst.ip()),
                seg.dst.port(),
                captured.observe,
            );
            if !outcome.allowed {
                rec.rule = outcome.rule.clone();
                let rec = refuse(
                    rec,
                    "policy",
                    format!("no enforcer serves {}; {}", seg.dst.ip(), outcome.reason),
                );
                return Outcome {
                    send: vec![reset_app()],
                    ..Outcome::drop()
                }
                .with_flow(rec);
            }
            let rec = allow(rec, &outcome);
            clients.insert(
                key,
                ClientHandshake {
                    isn: seg.seq,
                    started_ms: now_ms,
                    record: rec.clone(),
                    step: ClientStep::External,
                },
            );
            let live = LiveConnection {
                side: Side::Egress,
                local: seg.src,
                remote: seg.dst,
                src,
                dst: Party::external(seg.dst.ip()),
                port: seg.dst.port(),
                observe: captured.observe,
                record: rec.clone(),
            };
            return Outcome::accept().with_flow(rec).with_live(live);
        };
        rec.dst.enforcer = Some(peer.name.clone());
        let Some(peer_key) = self.setup.peer_keys.get(&peer.name).copied() else {
            let rec = refuse(
                rec,
                "untrusted-issuer",
                format!("no certificate configured for peer {}", peer.name),
            );
            return Outcome {
                send: vec![reset_app()],
                ..Outcome::drop()
            }
            .with_flow(rec);
        };
        let ephemeral = Ephemeral::generate(&self.rng);
        let client_key = ephemeral.public;
        let binding = proof::syn_binding(&client_key, seg.seq);
        let token = match self
            .setup
            .tokens
            .sign_cold(&captured.identity, seg.dst, binding, now_ms)
        {
            Ok(t) => t,
            Err(e) => {
                let rec = refuse(rec, e.reason(), format!("cannot sign a token: {e}"));
                return Outcome {
                    send: vec![reset_app()],
                    ..Outcome::drop()
                }
                .with_flow(rec);
            }
        };
        let syn_message = Message::Syn {
            client_key,
            token: token.clone(),
        }
        .encode();
        let out = attach_or_drop(packet, &syn_message);
        if out.verdict == PacketVerdict::Accept {
            clients.insert(
                key,
                ClientHandshake {
                    isn: seg.seq,
                    started_ms: now_ms,
                    record: rec,
                    step: ClientStep::AwaitSynAck {
                        syn_message,
                        syn_token: token,
                        client_key,
                        ephemeral,
                        peer: peer.name.clone(),
                        peer_key,
                        captured: Box::new(captured),
                    },
                },
            );
        }
        out
    }

    fn client_synack(&self, packet: &[u8], seg: &Segment, now_ms: u64) -> Outcome {
        let key = (seg.dst, seg.src);
        let detached = packet::detach(packet);
        let mut clients = self.lock_clients();
        let Some(h) = clients
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
        let ClientHandshake {
            isn,
            started_ms,
            record: rec,
            step,
        } = h;
        // Refusal: the workload's socket gets a reset instead of the SYN-ACK, the server's
        // half-open connection one too.
        let reset = |rec: FlowRecord, code: &str, reason: String| {
            let rec = refuse(rec, code, reason);
            Outcome {
                send: vec![packet::reset(
                    seg.dst,
                    seg.src,
                    seg.ack,
                    seg.seq.wrapping_add(1),
                )],
                ..Outcome::rewrite(packet::reset(
                    seg.src,
                    seg.dst,
                    seg.seq.wrapping_add(1),
                    isn.wrapping_add(1),
                ))
            }
            .with_flow(rec)
        };
        match step {
            ClientStep::External => {
                clients.insert(
                    key,
                    ClientHandshake {
                        isn,
                        started_ms,
                        record: rec,
                        step: ClientStep::External,
                    },
                );
                match detached {
                    Ok(None) => Outcome::accept(),
                    // Our enforcer did not ask for a token; one arrives anyway: not ours to use.
                    Ok(Some((clean, _))) => Outcome::rewrite(clean),
                    Err(_) => Outcome::drop(),
                }
            }
            ClientStep::Proven {
                server_isn,
                synack_message,
                ack_message,
                proof_sent,
            } => {
                // A retransmitted SYN-ACK (the same one only): our proof was lost on the way.
                // The kernel's answer to it is not queued again (the connection's first ACK
                // is behind it), so the proof goes out in an ACK of our own.
                let same = matches!(&detached, Ok(Some((_, m))) if *m == synack_message)
                    && seg.seq == server_isn;
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
                            send: packet::attach(&ack, &ack_message).into_iter().collect(),
                            ..Outcome::rewrite(clean)
                        }
                    }
                    _ => Outcome::drop(),
                };
                clients.insert(
                    key,
                    ClientHandshake {
                        isn,
                        started_ms,
                        record: rec,
                        step: ClientStep::Proven {
                            server_isn,
                            synack_message,
                            ack_message,
                            proof_sent,
                        },
                    },
                );
                out
            }
            ClientStep::AwaitSynAck {
                syn_message: _,
                syn_token,
                client_key,
                ephemeral,
                peer,
                peer_key,
                captured,
            } => {
                let (clean, message) = match detached {
                    Ok(Some(d)) => d,
                    Ok(None) => {
                        return reset(
                            rec,
                            "no-token",
                            format!("the SYN-ACK of {peer} carried no token"),
                        );
                    }
                    Err(e) => return reset(rec, "malformed", format!("SYN-ACK of {peer}: {e}")),
                };
                let (server_key, server_proof, token) = match Message::decode(&message) {
                    Ok(Message::SynAck {
                        server_key,
                        proof,
                        token,
                    }) => (server_key, proof, token),
                    Ok(_) => {
                        return reset(
                            rec,
                            "malformed",
                            format!("SYN-ACK of {peer}: not a SYN-ACK message"),
                        );
                    }
                    Err(e) => return reset(rec, "malformed", format!("SYN-ACK of {peer}: {e}")),
                };
                let transcript = Transcript {
                    client: seg.dst,
                    server: seg.src,
                    client_isn: isn,
                    server_isn: seg.seq,
                    syn_token,
                    client_key,
                    synack_token: token,
                    server_key,
                };
                let Ok(proof_key) = ephemeral.agree(&server_key) else {
                    return reset(rec, "bad-proof", format!("SYN-ACK of {peer}: bad key"));
                };
                if proof_key
                    .check(Role::Server, &transcript, &server_proof)
                    .is_err()
                {
                    return reset(
                        rec,
                        "bad-proof",
                        format!("the SYN-ACK proof of {peer} does not verify"),
                    );
                }
                let dst_identity = match self.setup.tokens.check_token(
                    &transcript.synack_token,
                    &peer,
                    &peer_key,
                    seg.dst,
                    &proof::synack_binding(&transcript),
                    now_ms,
                ) {
                    Ok(id) => id,
                    Err(e) => return reset_refusal(reset, rec, &peer, e),
                };
                let mut rec = rec;
                set_identity(&mut rec.dst, &dst_identity);
                let (src, dst) = (
                    Party::workload(captured.identity.labels.clone(), None),
                    Party::workload(dst_identity.labels.clone(), Some(seg.src.ip())),
                );
                let outcome = self
                    .setup
                    .authz
                    .check(&src, &dst, seg.src.port(), captured.observe);
                if !outcome.allowed {
                    rec.rule = outcome.rule.clone();
                    return reset(rec, "policy", format!("egress {}", outcome.reason));
                }
                let rec = allow(rec, &outcome);
                let ack_message = Message::Ack {
                    proof: proof_key.prove(Role::Client, &transcript),
                }
                .encode();
                clients.insert(
                    key,
                    ClientHandshake {
                        isn,
                        started_ms,
                        record: rec.clone(),
                        step: ClientStep::Proven {
                            server_isn: seg.seq,
                            synack_message: message,
                            ack_message,
                            proof_sent: false,
                        },
                    },
                );
                let live = LiveConnection {
                    side: Side::Egress,
                    local: seg.dst,
                    remote: seg.src,
                    src,
                    dst,
                    port: seg.src.port(),
                    observe: captured.observe,
                    record: rec.clone(),
                };
                Outcome::rewrite(clean).with_flow(rec).with_live(live)
            }
        }
    }

    /// A packet of a marked connection before its first ACK was handled: the first carries
    /// the proof; each gets the acked bit, which the kernel saves in the connmark so that
    /// nothing later of the connection is queued. (Packets queued behind the proof keep
    /// their order: the queue is FIFO.)
    fn client_ack(&self, packet: &[u8], seg: &Segment) -> Outcome {
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

    // ---- server end ----

    fn server_syn(&self, packet: &[u8], seg: &Segment, now_ms: u64) -> Outcome {
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
                    record: rec.clone(),
                };
                return Outcome {
                    mark: self.setup.proven_mark,
                    ..Outcome::accept()
                }
                .with_flow(rec)
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
            record: rec.clone(),
        };
        servers.insert(
            key,
            ServerHandshake {
                isn: seg.seq,
                started_ms: now_ms,
                syn_message: message,
                record: rec,
                live,
                step: ServerStep::AwaitSynAck {
                    client_key,
                    syn_token: token,
                    workload,
                },
            },
        );
        Outcome::rewrite(clean)
    }

    fn server_synack(&self, packet: &[u8], seg: &Segment, now_ms: u64) -> Outcome {
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
                client_key,
                syn_token,
                workload,
            } => {
                let ephemeral = Ephemeral::generate(&self.rng);
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
                let token = self.setup.tokens.sign_cold(
                    &workload.identity,
                    seg.dst,
                    proof::synack_binding(&transcript),
                    now_ms,
                );
                let key_agreed = ephemeral.agree(client_key);
                let (token, proof_key) = match (token, key_agreed) {
                    (Ok(t), Ok(k)) => (t, k),
                    (Err(e), _) => {
                        let rec = refuse(
                            h.record.clone(),
                            e.reason(),
                            format!("cannot sign a token: {e}"),
                        );
                        servers.remove(&key);
                        return Outcome::drop().with_flow(rec);
                    }
                    (_, Err(e)) => {
                        let rec = refuse(h.record.clone(), "bad-proof", format!("SYN key: {e}"));
                        servers.remove(&key);
                        return Outcome::drop().with_flow(rec);
                    }
                };
                transcript.synack_token = token.clone();
                let synack_message = Message::SynAck {
                    server_key: transcript.server_key,
                    proof: proof_key.prove(Role::Server, &transcript),
                    token,
                }
                .encode();
                let out = attach_or_drop(packet, &synack_message);
                h.step = ServerStep::AwaitAck {
                    server_isn: seg.seq,
                    synack_message,
                    transcript: Box::new(transcript),
                    key: proof_key,
                };
                out
            }
        }
    }

    fn server_ack(&self, packet: &[u8], seg: &Segment, now_ms: u64) -> Outcome {
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
                    h.record,
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
        let refused = |code: &str, reason: String| {
            Outcome {
                send: vec![packet::reset(seg.dst, seg.src, seg.ack, seg.seq)],
                ..Outcome::drop()
            }
            .with_flow(refuse(h.record.clone(), code, reason))
        };
        let proof = match Message::decode(&message) {
            Ok(Message::Ack { proof }) => proof,
            Ok(_) => return refused("malformed", "the ACK carried no ACK message".into()),
            Err(e) => return refused("malformed", format!("ACK from {}: {e}", seg.src)),
        };
        if proof_key.check(Role::Client, transcript, &proof).is_err() {
            return refused("bad-proof", "the ACK proof does not verify".into());
        }
        self.lock_proven().insert(key, now_ms);
        let mut rec = h.record.clone();
        rec.duration_ms = now_ms.saturating_sub(h.started_ms);
        let mut live = h.live.clone();
        live.record = rec.clone();
        Outcome {
            mark: self.setup.proven_mark,
            ..Outcome::rewrite(clean)
        }
        .with_flow(rec)
        .with_live(live)
    }

    /// Forgets handshakes that did not finish in time; each becomes a flow record.
    pub fn expire(&self, now_ms: u64) -> Vec<FlowRecord> {
        let ttl = self.setup.pending_ms;
        let mut out = Vec::new();
        self.lock_clients().retain(|_, h| {
            if now_ms.saturating_sub(h.started_ms) < ttl {
                return true;
            }
            if let ClientStep::AwaitSynAck { peer, .. } = &h.step {
                out.push(refuse(
                    h.record.clone(),
                    "no-answer",
                    format!("no SYN-ACK with a token from {peer} (refused, reset or unreachable)"),
                ));
            }
            false
        });
        // Packets queued behind a proof are handled within milliseconds.
        self.lock_proven()
            .retain(|_, at| now_ms.saturating_sub(*at) < PROVEN_KEPT_MS);
        self.lock_servers().retain(|_, h| {
            if now_ms.saturating_sub(h.started_ms) < ttl {
                return true;
            }
            let code = match h.step {
                ServerStep::AwaitSynAck { .. } => "no-answer",
                ServerStep::AwaitAck { .. } => "no-proof",
            };
            out.push(refuse(
                h.record.clone(),
                code,
                format!("the handshake did not finish ({code})"),
            ));
            false
        });
        out
    }

    /// Handshakes in progress (client end, server end).
    pub fn pending(&self) -> (usize, usize) {
        (self.lock_clients().len(), self.lock_servers().len())
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, HashMap<FourTuple, ClientHandshake>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_proven(&self) -> std::sync::MutexGuard<'_, HashMap<FourTuple, u64>> {
        self.proven.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_servers(&self) -> std::sync::MutexGuard<'_, HashMap<FourTuple, ServerHandshake>> {
        self.servers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn attach_or_drop(packet: &[u8], message: &[u8]) -> Outcome {
    match packet::attach(packet, message) {
        Ok(p) => Outcome::rewrite(p),
        // No room for the option (a full TCP header): fail closed.
        Err(_) => Outcome::drop(),
    }
}

fn reset_refusal(
    reset: impl Fn(FlowRecord, &str, String) -> Outcome,
    rec: FlowRecord,
    peer: &str,
    e: Refusal,
) -> Outcome {
    let reason = format!("destination {e} ({}) in the SYN-ACK of {peer}", e.reason());
    reset(rec, e.reason(), reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        authz::PolicyMode,
        identity::{spiffe_id, test_ca},
        peers::Peer,
        wire::Source,
    };
    use tessera_policy::Labels;

    const NOW: u64 = 1_800_000_000_000;
    const C: &str = "10.0.0.1:40000";
    const S: &str = "10.0.0.2:80";
    const PROVEN: u32 = 0x100;
    const ACKED: u32 = 0x200;
    const POLICY: &str = "rules:\n  - {name: web-api, action: allow, from: {labels: [app=web]}, to: {labels: [app=api]}}\n";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn identity(enforcer: &str, workload: &str, app: &str) -> Identity {
        Identity {
            spiffe: spiffe_id("td", enforcer, workload),
            labels: Labels::new([
                ("app", app),
                ("tessera.io/enforcer", enforcer),
                ("tessera.io/workload", workload),
            ]),
        }
    }

    /// The capture record the eBPF programs leave for each connect of web from C.
    struct WebCaptures(Captured);

    impl CaptureLookup for WebCaptures {
        fn take(&self, client: SocketAddr) -> Option<Captured> {
            (client == addr(C)).then(|| self.0.clone())
        }
    }

    struct Pair {
        a: Engine,
        b: Engine,
    }

    fn engine(
        name: &str,
        peer: &str,
        peer_net: &str,
        ca: &(rcgen::KeyPair, Vec<u8>),
        certs: &HashMap<String, Vec<u8>>,
        keys: &HashMap<String, Vec<u8>>,
        server_app: &str,
    ) -> Engine {
        let tokens = Arc::new(
            Tokens::new(
                "td".into(),
                &keys[name],
                vec![ca.1.clone()],
                10_000,
                1_000,
                true,
            )
            .unwrap(),
        );
        let peer_key = tokens.trust_peer(&certs[peer]).unwrap();
        let policy = tessera_policy::load("p.yaml", POLICY).unwrap();
        let workload = Arc::new(LocalWorkload {
            name: "api".into(),
            identity: identity(name, "api", server_app),
            observe: false,
        });
        Engine::new(Setup {
            name: name.into(),
            tokens,
            authz: Arc::new(Authorizer::new(policy, PolicyMode::Enforce)),
            peers: PeerTable::new([(
                peer_net.parse().unwrap(),
                Peer {
                    name: peer.into(),
                    tunnel: addr("10.0.0.9:15008"),
                },
            )]),
            peer_keys: HashMap::from([(peer.to_owned(), peer_key)]),
            lookup: Arc::new(WebCaptures(Captured {
                dst: addr(S),
                source: Source {
                    workload: "web".into(),
                    pid: 42,
                    uid: 0,
                    cgroup_id: 7,
                },
                identity: identity(name, "web", "web"),
                observe: false,
            })),
            services: LocalServices::new([(80, workload)]),
            proven_mark: PROVEN,
            acked_mark: ACKED,
            pending_ms: 11_000,
        })
    }

    /// host-a (client, workload web) and host-b (server, workload `server_app` on port 80).
    fn pair(server_app: &str) -> Pair {
        let ca = test_ca::ca();
        let mut certs = HashMap::new();
        let mut keys = HashMap::new();
        for name in ["host-a", "host-b"] {
            let (key, cert) = test_ca::enforcer(name, &ca.0, &ca.1);
            keys.insert(name.to_owned(), key);
            certs.insert(name.to_owned(), cert);
        }
        Pair {
            a: engine(
                "host-a",
                "host-b",
                "10.0.0.2/32",
                &ca,
                &certs,
                &keys,
                server_app,
            ),
            b: engine(
                "host-b",
                "host-a",
                "10.0.0.1/32",
                &ca,
                &certs,
                &keys,
                server_app,
            ),
        }
    }

    fn syn() -> Vec<u8> {
        packet::build(addr(C), addr(S), 1000, 0, TcpFlags::SYN)
    }
    fn synack() -> Vec<u8> {
        packet::build(addr(S), addr(C), 5000, 1001, TcpFlags::SYN | TcpFlags::ACK)
    }
    fn ack() -> Vec<u8> {
        packet::build(addr(C), addr(S), 1001, 5001, TcpFlags::ACK)
    }

    fn wire(o: &Outcome) -> Vec<u8> {
        assert_eq!(o.verdict, PacketVerdict::Accept, "{o:?}");
        o.packet.clone().expect("a message attached")
    }

    /// The same packet with its message changed by `f` (checksums right: as an attacker would).
    fn tamper(packet: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let (clean, mut message) = packet::detach(packet).unwrap().unwrap();
        f(&mut message);
        packet::attach(&clean, &message).unwrap()
    }

    fn refused(o: &Outcome, code: &str) {
        let flow = o.flows.last().unwrap_or_else(|| panic!("no flow: {o:?}"));
        assert_eq!(flow.verdict, Verdict::Denied, "{flow:?}");
        assert_eq!(flow.code, code, "{flow:?}");
        assert_eq!(flow.mode, Mode::Handshake);
        assert_eq!(o.mark, 0, "a refusal never marks a connection proven");
    }

    /// Runs SYN and SYN-ACK through both ends; returns the SYN and SYN-ACK as sent.
    fn up_to_synack(p: &Pair) -> (Vec<u8>, Vec<u8>) {
        let syn_wire = wire(&p.a.egress(&syn(), NOW));
        let at_b = p.b.ingress(&syn_wire, NOW);
        assert_eq!(
            wire(&at_b),
            syn(),
            "the server's kernel sees the SYN as sent"
        );
        let synack_wire = wire(&p.b.egress(&synack(), NOW));
        (syn_wire, synack_wire)
    }

    #[test]
    fn honest_handshake_is_proven_at_both_ends_and_restores_every_packet() {
        let p = pair("api");
        let (syn_wire, synack_wire) = up_to_synack(&p);
        // A retransmitted SYN carries the very same message and is accepted again.
        assert_eq!(wire(&p.a.egress(&syn(), NOW)), syn_wire);
        assert_eq!(wire(&p.b.ingress(&syn_wire, NOW)), syn());
        let at_a = p.a.ingress(&synack_wire, NOW);
        assert_eq!(wire(&at_a), synack());
        let flow = &at_a.flows[0];
        assert_eq!(flow.verdict, Verdict::Allowed);
        assert_eq!(flow.dst.workload.as_deref(), Some("api"));
        assert_eq!(flow.rule.as_deref(), Some("web-api"));
        // A retransmitted SYN-ACK (same message) still passes.
        assert_eq!(wire(&p.b.egress(&synack(), NOW)), synack_wire);
        assert_eq!(wire(&p.a.ingress(&synack_wire, NOW)), synack());
        let at_a_ack = p.a.egress(&ack(), NOW);
        assert_eq!(at_a_ack.mark, ACKED, "the kernel stops queueing after this");
        let ack_wire = wire(&at_a_ack);
        // Data queued behind the first ACK at the client passes unchanged.
        let data = packet::build(addr(C), addr(S), 1001, 5001, TcpFlags::ACK | TcpFlags::PSH);
        let behind = p.a.egress(&data, NOW);
        assert_eq!(
            (behind.verdict, behind.packet.is_none(), behind.mark),
            (PacketVerdict::Accept, true, ACKED)
        );
        let at_b = p.b.ingress(&ack_wire, NOW);
        assert_eq!(wire(&at_b), ack());
        assert_eq!(at_b.mark, PROVEN);
        // ... and at the server, where it was queued behind the proof.
        let behind = p.b.ingress(&data, NOW);
        assert_eq!(
            (behind.verdict, behind.mark),
            (PacketVerdict::Accept, PROVEN)
        );
        let flow = &at_b.flows[0];
        assert_eq!(flow.verdict, Verdict::Allowed);
        assert_eq!(flow.src.workload.as_deref(), Some("web"));
        // Both ends hand the connection over for policy reloads, each from its side.
        let live_b = at_b.live.as_ref().expect("server end live");
        assert_eq!(
            (live_b.side, live_b.local, live_b.remote),
            (Side::Ingress, addr(S), addr(C))
        );
        let live_a = at_a.live.as_ref().expect("client end live");
        assert_eq!(
            (live_a.side, live_a.local, live_a.remote),
            (Side::Egress, addr(C), addr(S))
        );
        assert_eq!(
            flow.src.spiffe.as_deref(),
            Some("spiffe://td/enforcer/host-a/workload/web")
        );
    }

    #[test]
    fn a_replayed_syn_is_refused_once_its_handshake_is_over() {
        let p = pair("api");
        let (syn_wire, synack_wire) = up_to_synack(&p);
        p.a.ingress(&synack_wire, NOW);
        let ack_wire = wire(&p.a.egress(&ack(), NOW));
        assert_eq!(p.b.ingress(&ack_wire, NOW).mark, PROVEN);
        let replay = p.b.ingress(&syn_wire, NOW + 10);
        assert_eq!(replay.verdict, PacketVerdict::Drop);
        assert_eq!(replay.send.len(), 1, "the sender gets a reset");
        refused(&replay, "replay");
        // Its proof, replayed too, proves nothing.
        let again = p.b.ingress(&ack_wire, NOW + 10);
        assert_eq!(again.verdict, PacketVerdict::Drop);
        refused(&again, "no-handshake");
    }

    #[test]
    fn forged_garbage_and_truncated_syns_are_refused_with_their_reason() {
        let p = pair("api");
        let syn_wire = wire(&p.a.egress(&syn(), NOW));
        // The token's signature is its last bytes, the message's last bytes too.
        let forged = tamper(&syn_wire, |m| *m.last_mut().unwrap() ^= 1);
        let o = p.b.ingress(&forged, NOW);
        assert_eq!(o.verdict, PacketVerdict::Drop);
        refused(&o, "bad-signature");
        let garbage = tamper(&syn_wire, |m| m.iter_mut().for_each(|b| *b = 0xA5));
        refused(&p.b.ingress(&garbage, NOW), "malformed");
        // Cut inside the message: the option announces more than the packet holds.
        let cut = &syn_wire[..syn_wire.len() - 40];
        let mut cut = cut.to_vec();
        let total = cut.len() as u16;
        cut[2..4].copy_from_slice(&total.to_be_bytes());
        let o = p.b.ingress(&cut, NOW);
        assert_eq!(o.verdict, PacketVerdict::Drop);
        refused(&o, "malformed");
        // The honest SYN still gets through afterwards (nothing above consumed its nonce).
        assert_eq!(wire(&p.b.ingress(&syn_wire, NOW)), syn());
    }

    #[test]
    fn a_syn_without_a_token_is_an_external_peer_and_policy_refuses_it() {
        let p = pair("api");
        let o = p.b.ingress(&syn(), NOW);
        assert_eq!(o.verdict, PacketVerdict::Drop);
        assert_eq!(o.send.len(), 1);
        refused(&o, "unauthenticated");
        assert_eq!(o.flows[0].direction, Direction::Direct);
    }

    #[test]
    fn a_tampered_synack_turns_into_a_reset_for_the_client() {
        for (what, f) in [
            (
                "proof",
                Box::new(|m: &mut Vec<u8>| m[40] ^= 1) as Box<dyn Fn(&mut Vec<u8>)>,
            ),
            ("token", Box::new(|m: &mut Vec<u8>| m[60] ^= 1)),
            ("key", Box::new(|m: &mut Vec<u8>| m[5] ^= 1)),
        ] {
            let p = pair("api");
            let (_, synack_wire) = up_to_synack(&p);
            let bad = tamper(&synack_wire, f);
            let o = p.a.ingress(&bad, NOW);
            assert_eq!(o.verdict, PacketVerdict::Accept, "{what}");
            let rst = packet::segment(o.packet.as_ref().unwrap()).unwrap();
            assert!(
                rst.flags & TcpFlags::RST != 0,
                "{what}: the workload gets a reset"
            );
            assert_eq!(rst.ack, 1001, "{what}: acknowledging its SYN");
            refused(&o, "bad-proof");
            // And nothing proves the connection afterwards.
            assert_eq!(p.a.egress(&ack(), NOW).packet, None, "{what}");
        }
        // A SYN-ACK whose sequence number was changed on the way.
        let p = pair("api");
        let (_, synack_wire) = up_to_synack(&p);
        let (clean, message) = packet::detach(&synack_wire).unwrap().unwrap();
        let mut clean = clean;
        clean[24] ^= 1; // inside the TCP sequence number (IPv4 header of 20 bytes)
        let moved = packet::attach(&clean, &message).unwrap();
        refused(&p.a.ingress(&moved, NOW), "bad-proof");
        // A SYN-ACK without any token, for a SYN that carried one.
        let p = pair("api");
        up_to_synack(&p);
        refused(&p.a.ingress(&synack(), NOW), "no-token");
    }

    #[test]
    fn a_missing_or_wrong_ack_proof_never_proves_the_connection() {
        let p = pair("api");
        let (_, synack_wire) = up_to_synack(&p);
        p.a.ingress(&synack_wire, NOW);
        let ack_wire = wire(&p.a.egress(&ack(), NOW));
        let wrong = tamper(&ack_wire, |m| m[3] ^= 1);
        let o = p.b.ingress(&wrong, NOW);
        assert_eq!(o.verdict, PacketVerdict::Drop);
        refused(&o, "bad-proof");

        // An ACK without a proof (or data overtaking it) is dropped; the handshake stays
        // open for the proof.
        let p = pair("api");
        let (_, synack_wire) = up_to_synack(&p);
        p.a.ingress(&synack_wire, NOW);
        let o = p.b.ingress(&ack(), NOW);
        assert_eq!(o.verdict, PacketVerdict::Drop);
        assert!(o.flows.is_empty() && o.mark == 0, "{o:?}");
        assert_eq!(p.b.pending(), (0, 1));

        // An ACK that never comes: the handshake expires and says so.
        let p = pair("api");
        up_to_synack(&p);
        assert!(p.b.expire(NOW + 1_000).is_empty());
        let expired = p.b.expire(NOW + 11_000);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].code, "no-proof");
        assert_eq!(p.b.pending(), (0, 0));
    }

    #[test]
    fn a_lost_ack_proof_is_sent_again_when_the_synack_is_retransmitted() {
        let p = pair("api");
        let (_, synack_wire) = up_to_synack(&p);
        p.a.ingress(&synack_wire, NOW);
        let _lost = wire(&p.a.egress(&ack(), NOW));
        // The server's kernel retransmits; its enforcer attaches the same message.
        let again = wire(&p.b.egress(&synack(), NOW + 1_000));
        let o = p.a.ingress(&again, NOW + 1_000);
        assert_eq!(wire(&o), synack());
        assert_eq!(o.send.len(), 1, "our own ACK with the proof");
        let at_b = p.b.ingress(&o.send[0], NOW + 1_000);
        assert_eq!(at_b.mark, PROVEN);
        assert_eq!(at_b.flows[0].verdict, Verdict::Allowed);
    }

    #[test]
    fn a_new_connection_on_a_proven_four_tuple_must_prove_itself_again() {
        let p = pair("api");
        let (_, synack_wire) = up_to_synack(&p);
        p.a.ingress(&synack_wire, NOW);
        let ack_wire = wire(&p.a.egress(&ack(), NOW));
        assert_eq!(p.b.ingress(&ack_wire, NOW).mark, PROVEN);
        // The client reuses the 4-tuple (TIME_WAIT reuse) with a new ISN.
        let syn2 = packet::build(addr(C), addr(S), 9000, 0, TcpFlags::SYN);
        let syn2_wire = wire(&p.a.egress(&syn2, NOW + 1_000));
        wire(&p.b.ingress(&syn2_wire, NOW + 1_000));
        let data = packet::build(addr(C), addr(S), 9001, 7001, TcpFlags::ACK | TcpFlags::PSH);
        let o = p.b.ingress(&data, NOW + 1_000);
        assert_eq!(
            o.verdict,
            PacketVerdict::Drop,
            "the old proof does not cover it"
        );
        assert_eq!(o.mark, 0);
    }

    #[test]
    fn a_reset_answering_a_handshake_is_recorded_as_refused_at_once() {
        // The server refused the SYN (here: a reset as its enforcer sends it).
        let p = pair("db");
        let syn_wire = wire(&p.a.egress(&syn(), NOW));
        let at_b = p.b.ingress(&syn_wire, NOW);
        let o = p.a.ingress(&at_b.send[0], NOW);
        assert_eq!(
            o.verdict,
            PacketVerdict::Accept,
            "the workload gets the reset"
        );
        refused(&o, "peer-refused");
        assert_eq!(p.a.pending(), (0, 0));
        // A reset for no handshake of ours is just passed on.
        assert!(p.a.ingress(&at_b.send[0], NOW).flows.is_empty());
    }

    #[test]
    fn egress_and_ingress_policy_each_refuse_at_their_end() {
        // The server's workload is app=db: web may not reach it. host-b refuses at the SYN.
        let p = pair("db");
        let syn_wire = wire(&p.a.egress(&syn(), NOW));
        let o = p.b.ingress(&syn_wire, NOW);
        assert_eq!(o.verdict, PacketVerdict::Drop);
        refused(&o, "policy");
        assert_eq!(o.flows[0].src.workload.as_deref(), Some("web"));
    }
}
