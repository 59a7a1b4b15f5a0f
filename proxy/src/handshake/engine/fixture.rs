//! Two engines wired to each other, host-a (client, workload web) and host-b (server),
//! with a throwaway CA: what the engine's tests and its benchmark run on
//! (`--features testkit` outside the crate's own tests).
#![allow(missing_docs)]
use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use pnet_packet::tcp::TcpFlags;
use tessera_policy::Labels;

use super::{Engine, Setup};
use crate::{
    admission::Admission,
    authz::{Decisions, PolicyMode},
    capture::{Capture, CaptureLookup, Captured, Origin},
    flow::{FlowLog, FlowRecord, Mode},
    handshake::packet,
    identity::{Identity, reserved, session::Tokens, spiffe_id, test_ca},
    local::{LocalServices, LocalWorkload},
    peers::{Directory, Peer, PeerTable},
    registry::ConnectionRegistry,
};

pub const NOW: u64 = 1_800_000_000_000;
pub const C: &str = "10.0.0.1:40000";
pub const S: &str = "10.0.0.2:80";
pub const PROVEN: u32 = 0x100;
pub const ACKED: u32 = 0x200;
pub const POLICY: &str = "rules:\n  - {name: web-api, action: allow, from: {labels: [app=web]}, to: {labels: [app=api]}}\n";

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub fn identity(enforcer: &str, workload: &str, app: &str) -> Identity {
    Identity {
        spiffe: spiffe_id("td", enforcer, workload),
        labels: Labels::new([
            ("app", app),
            (reserved::ENFORCER, enforcer),
            (reserved::WORKLOAD, workload),
        ]),
    }
}

/// The capture record the eBPF programs leave for each connect of web from C.
pub struct WebCaptures(Captured);

impl CaptureLookup for WebCaptures {
    fn take(&self, client: SocketAddr, _netns: Option<u64>) -> Capture {
        (client == addr(C)).then(|| self.0.clone()).into()
    }
}

pub struct Pair {
    pub a: End,
    pub b: End,
}

/// One enforcer's engine and the flow records it wrote.
pub struct End {
    pub engine: Engine,
    flows: std::sync::Mutex<tokio::sync::mpsc::Receiver<FlowRecord>>,
}

impl End {
    /// The records written since the last call (records of live connections are written
    /// when they end, by whoever holds them).
    pub fn records(&self) -> Vec<FlowRecord> {
        let mut rx = self.flows.lock().expect("lock");
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }
}

impl std::ops::Deref for End {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

/// The CA's certificate, and each enforcer's key and certificate, by name.
struct Cluster {
    ca: Vec<u8>,
    keys: HashMap<String, Vec<u8>>,
    certs: HashMap<String, Vec<u8>>,
}

fn engine(
    cluster: &Cluster,
    (name, peer, peer_net): (&str, &str, &str),
    server_app: &str,
    key_reuse_ms: u64,
) -> End {
    let Cluster { ca, keys, certs } = cluster;
    let tokens = Arc::new(
        Tokens::new(
            "td".into(),
            &keys[name],
            vec![ca.clone()],
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
    let decisions = Decisions::new(policy, PolicyMode::Enforce, Default::default());
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    let admission = Admission::new(
        name.into(),
        Mode::Handshake,
        Arc::new(ConnectionRegistry::new(Arc::new(decisions))),
        FlowLog::to_channel(tx),
    );
    let engine = Engine::new(Setup {
        admission: Arc::new(admission),
        tokens,
        peers: Arc::new(Directory::fixed(
            PeerTable::new([(
                peer_net.parse().unwrap(),
                Peer {
                    name: peer.into(),
                    tunnel: addr("10.0.0.9:15008"),
                },
            )]),
            Vec::new(),
        )),
        peer_keys: Arc::new(std::sync::RwLock::new(HashMap::from([(
            peer.to_owned(),
            peer_key,
        )]))),
        lookup: Arc::new(WebCaptures(Captured {
            dst: addr(S),
            origin: Origin {
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
        key_reuse_ms,
        drops: Default::default(),
    });
    End {
        engine,
        flows: std::sync::Mutex::new(rx),
    }
}

/// host-a (client, workload web) and host-b (server, workload `server_app` on port 80).
pub fn pair(server_app: &str) -> Pair {
    pair_with(server_app, 1_000)
}

/// As [`pair`], each end's ephemeral keys serving `key_reuse_ms`.
pub fn pair_with(server_app: &str, key_reuse_ms: u64) -> Pair {
    let ca = test_ca::ca();
    let mut certs = HashMap::new();
    let mut keys = HashMap::new();
    for name in ["host-a", "host-b"] {
        let (key, cert) = test_ca::enforcer(name, &ca.0, &ca.1);
        keys.insert(name.to_owned(), key);
        certs.insert(name.to_owned(), cert);
    }
    let cluster = Cluster {
        ca: ca.1,
        keys,
        certs,
    };
    Pair {
        a: engine(
            &cluster,
            ("host-a", "host-b", "10.0.0.2/32"),
            server_app,
            key_reuse_ms,
        ),
        b: engine(
            &cluster,
            ("host-b", "host-a", "10.0.0.1/32"),
            server_app,
            key_reuse_ms,
        ),
    }
}

pub fn syn() -> Vec<u8> {
    packet::build(addr(C), addr(S), 1000, 0, TcpFlags::SYN)
}
pub fn synack() -> Vec<u8> {
    packet::build(addr(S), addr(C), 5000, 1001, TcpFlags::SYN | TcpFlags::ACK)
}
pub fn ack() -> Vec<u8> {
    packet::build(addr(C), addr(S), 1001, 5001, TcpFlags::ACK)
}

/// One whole handshake through both engines (client ISN `isn`, server ISN `isn + 4000`),
/// as the kernels would hand over each packet; true if both ends let it through and the
/// server proved the client.
pub fn connect(p: &Pair, isn: u32, now_ms: u64) -> bool {
    use super::PacketVerdict::Accept;
    let (c, s) = (addr(C), addr(S));
    let server_isn = isn.wrapping_add(4000);
    let pass = |o: super::Outcome, original: Vec<u8>| -> Option<Vec<u8>> {
        (o.verdict == Accept).then(|| o.packet.unwrap_or(original))
    };
    let syn = packet::build(c, s, isn, 0, TcpFlags::SYN);
    let Some(syn) = pass(p.a.egress(&syn, now_ms), syn) else {
        return false;
    };
    if p.b.ingress(&syn, now_ms).verdict != Accept {
        return false;
    }
    let synack = packet::build(
        s,
        c,
        server_isn,
        isn.wrapping_add(1),
        TcpFlags::SYN | TcpFlags::ACK,
    );
    let Some(synack) = pass(p.b.egress(&synack, now_ms), synack) else {
        return false;
    };
    if p.a.ingress(&synack, now_ms).verdict != Accept {
        return false;
    }
    let ack = packet::build(
        c,
        s,
        isn.wrapping_add(1),
        server_isn.wrapping_add(1),
        TcpFlags::ACK,
    );
    let Some(ack) = pass(p.a.egress(&ack, now_ms), ack) else {
        return false;
    };
    p.b.ingress(&ack, now_ms).mark == PROVEN
}
