//! The handshake engine: what an enforcer does with each handshake packet the kernel hands
//! it. No sockets, no kernel: a packet goes in; a verdict, the rewritten packet and packets
//! to send (resets) come out. Each handshake's flow record is owned by its [`FlowTracker`]
//! from the first packet, moves with the handshake (pending, then live, then to the
//! enforcer's watcher) and is written exactly once: at a refusal, an expiry, or when the
//! connection ends. The NFQUEUE workers only move bytes.
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

use super::{
    packet::{self, Segment},
    proof::KeyExchange,
};
use crate::{
    admission::Admission,
    authz::{Attempt, Ruling},
    capture::CaptureLookup,
    code::Code,
    flow::{Direction, Endpoint, FlowTracker},
    identity::{session::Tokens, token::KeyId},
    limits::{Drops, RateLimiter},
    local::LocalServices,
    peers::Directory,
};

mod client;
#[cfg(any(test, feature = "testkit"))]
#[doc(hidden)]
pub mod fixture;
mod server;
#[cfg(test)]
mod tests;

use client::{ClientHandshake, ClientStep};
use server::{ServerHandshake, ServerStep};

/// What to do with the queued packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketVerdict {
    Accept,
    Drop,
}

/// What the engine did with one packet.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: PacketVerdict,
    /// The packet to let through instead of the queued one (None: unchanged).
    pub packet: Option<Vec<u8>>,
    /// Mark bits to set on the packet.
    pub mark: u32,
    /// IP packets to send (resets to the other end of a refused handshake).
    pub send: Vec<Vec<u8>>,
    /// A connection this packet let through, to watch for policy reloads and to record
    /// when it ends.
    pub live: Option<Box<LiveConnection>>,
    /// The fast path's pair secret this packet's completed handshake agreed (client: at
    /// the verified SYN-ACK; server: at the verified ACK), for the enforcer to install for
    /// the pair's later connections (`tessera_common::fast`).
    pub fast: Option<Box<crate::handshake::fast::FastGrant>>,
}

/// An allowed connection, as policy reloads re-check it: if a new policy denies it, the
/// enforcer closes its socket (the kernel resets the peer) and records why.
#[derive(Debug)]
pub struct LiveConnection {
    /// The end on this host, and the other.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// What was decided, and the ruling (the registry re-decides it if a policy was
    /// applied since).
    pub attempt: Attempt,
    pub ruling: Ruling,
    /// The record of the allowed handshake, written when the connection ends (with its
    /// byte counts and duration).
    pub flow: FlowTracker,
}

impl Outcome {
    /// Let the packet through unchanged, nothing else.
    pub fn accept() -> Self {
        Self {
            verdict: PacketVerdict::Accept,
            packet: None,
            mark: 0,
            send: Vec::new(),
            live: None,
            fast: None,
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
    fn with_live(mut self, live: LiveConnection) -> Self {
        self.live = Some(Box::new(live));
        self
    }
}

/// What an engine works with; the enforcer builds it from its configuration.
pub struct Setup {
    /// Decides and starts records (this enforcer's name, handshake mode).
    pub admission: Arc<Admission>,
    pub tokens: Arc<Tokens>,
    /// Routes to peers (the control plane's directory changes them while running).
    pub peers: Arc<Directory>,
    /// The certified key of each peer enforcer, by name (from its certificate; the control
    /// plane's directory changes them while running).
    pub peer_keys: Arc<std::sync::RwLock<HashMap<String, KeyId>>>,
    pub lookup: Arc<dyn CaptureLookup>,
    pub services: LocalServices,
    /// Mark bit given to an inbound packet whose connection is proven.
    pub proven_mark: u32,
    /// Mark bit given to an outbound packet once its connection's proof went out.
    pub acked_mark: u32,
    /// How long an unfinished handshake is remembered (ms).
    pub pending_ms: u64,
    /// How long one ephemeral X25519 key serves (ms; 0: a new key per connection).
    pub key_reuse_ms: u64,
    /// Where the engine counts the bounds it hits (pending handshakes, rate limits).
    pub drops: Arc<Drops>,
}

type FourTuple = (SocketAddr, SocketAddr);

/// Why a handshake is refused: its code and the reason its record gives.
type Refused = (Code, String);

/// How long a server end remembers that a connection proved itself (for the packets queued
/// behind its proof).
const PROVEN_KEPT_MS: u64 = 2_000;

/// Server handshakes pending at most (each waits for its proof up to `pending_ms`). Only
/// SYNs whose token verified get one, so a flood cannot fill it without tokens; the bound
/// is there for a peer that sends SYNs and never proves them. 65,536 × ~1 KB at most.
pub const MAX_PENDING: usize = 65_536;

/// Token signature checks a source prefix (/24, /64) may cost per second, and at once. A
/// check is ~50 µs: 5,000/s is a quarter of a core, several times what one peer host opens
/// in handshake mode on the benchmark. Only SYNs from a configured peer's address get this
/// far (the cheap checks come first).
pub const VERIFY_RATE: u32 = 5_000;
pub const VERIFY_BURST: u32 = 10_000;
/// Prefixes with a verification bucket of their own at most.
const VERIFY_BUCKETS: usize = 4_096;

pub struct Engine {
    setup: Setup,
    /// Ephemeral keys of this end as a client and as a server.
    client_keys: KeyExchange,
    server_keys: KeyExchange,
    clients: Mutex<HashMap<FourTuple, ClientHandshake>>,
    servers: Mutex<HashMap<FourTuple, ServerHandshake>>,
    /// Connections proven at this (server) end lately, and when: packets queued behind the
    /// proof pass.
    proven: Mutex<HashMap<FourTuple, u64>>,
    /// Token checks per source prefix.
    verify_rate: RateLimiter,
}

fn has(flags: u8, bits: u8) -> bool {
    flags & bits == bits
}

impl Engine {
    pub fn new(setup: Setup) -> Self {
        Self {
            client_keys: KeyExchange::new(setup.key_reuse_ms),
            server_keys: KeyExchange::new(setup.key_reuse_ms),
            setup,
            clients: Mutex::default(),
            servers: Mutex::default(),
            proven: Mutex::default(),
            verify_rate: RateLimiter::new(VERIFY_RATE, VERIFY_BURST, VERIFY_BUCKETS),
        }
    }

    /// Starts the record of a handshake that starts now.
    fn track(
        &self,
        direction: Direction,
        src: SocketAddr,
        dst: SocketAddr,
        now_ms: u64,
    ) -> FlowTracker {
        self.setup
            .admission
            .track_at(direction, Endpoint::addr(src), Endpoint::addr(dst), now_ms)
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
        // The kernel would drop a packet whose checksums are wrong; rewriting it would fix
        // them and hand it a packet nobody sent. Checked before anything else is done.
        if !packet::checksums_ok(packet) {
            return Outcome::drop();
        }
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
        let refused = format!("{} refused the connection (reset)", seg.src);
        let mut clients = self.lock_clients();
        let key = (seg.dst, seg.src);
        let refused_our_syn = clients.get(&key).is_some_and(|h| {
            matches!(h.step, ClientStep::AwaitSynAck { .. }) && seg.ack == h.isn.wrapping_add(1)
        });
        if refused_our_syn
            && let Some(ClientHandshake {
                step: ClientStep::AwaitSynAck { flow, .. },
                ..
            }) = clients.remove(&key)
        {
            flow.refuse_at(Code::PeerRefused, refused.clone(), now_ms);
        }
        drop(clients);
        let mut servers = self.lock_servers();
        let key = (seg.src, seg.dst);
        let refused_our_synack = servers.get(&key).is_some_and(|h| {
            matches!(h.step, ServerStep::AwaitAck { .. }) && seg.seq == h.isn.wrapping_add(1)
        });
        if refused_our_synack && let Some(h) = servers.remove(&key) {
            h.live.flow.refuse_at(Code::PeerRefused, refused, now_ms);
        }
        Outcome::accept()
    }

    /// Forgets handshakes that did not finish in time; each is recorded as refused.
    /// Returns how many.
    pub fn expire(&self, now_ms: u64) -> usize {
        let ttl = self.setup.pending_ms;
        let late = |started_ms: u64| now_ms.saturating_sub(started_ms) >= ttl;
        let mut expired = 0;
        let clients: Vec<_> = self
            .lock_clients()
            .extract_if(|_, h| late(h.started_ms))
            .collect();
        for (_, h) in clients {
            expired += 1;
            if let ClientStep::AwaitSynAck { peer, flow, .. } = h.step {
                let reason =
                    format!("no SYN-ACK with a token from {peer} (refused, reset or unreachable)");
                flow.refuse_at(Code::NoAnswer, reason, now_ms);
            }
        }
        // Packets queued behind a proof are handled within milliseconds.
        self.lock_proven()
            .retain(|_, at| now_ms.saturating_sub(*at) < PROVEN_KEPT_MS);
        let servers: Vec<_> = self
            .lock_servers()
            .extract_if(|_, h| late(h.started_ms))
            .collect();
        for (_, h) in servers {
            expired += 1;
            let code = match h.step {
                ServerStep::AwaitSynAck { .. } => Code::NoAnswer,
                ServerStep::AwaitAck { .. } => Code::NoProof,
            };
            let reason = format!("the handshake did not finish ({code})");
            h.live.flow.refuse_at(code, reason, now_ms);
        }
        expired
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
