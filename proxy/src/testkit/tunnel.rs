//! Two enforcers in one process, over loopback: host-a (the source: workload `web`, whose
//! connections the test makes) and host-b (the destination: workloads `echo`, `reply` and
//! `talk`), each with its real outbound listener, tunnel listener, direct listener, tunnel
//! pool, mutual TLS (certificates from a test CA), tokens, policy and flow log. What is fake
//! is only what the kernel does in production:
//!
//! * capture: the client application connects straight to host-a's outbound listener, after
//!   registering its capture record (the original destination and who connects) by its own
//!   address in [`Captures`], which stands in for the eBPF map;
//! * `sk_lookup`: each host's direct listener stands for its protected ports as `sk_lookup`
//!   steers connections there: the workload `guarded` is declared on the direct listener's
//!   own port;
//! * separate hosts: both are 127.0.0.1. host-b serves 127.0.0.1 with one port per workload;
//!   host-a routes 127.0.0.1 and [`NOT_B`] (not an address of host-b) to host-b, and
//!   [`BEHIND_C`] to host-c, whose tunnel port is closed; [`OUTSIDE`] has no enforcer. Sockets
//!   are not marked (mark 0): no capture to escape, and no `CAP_NET_ADMIN` needed.
//!
//! host-a reaches host-b's tunnel listener through a [`Link`], which a test can cut (every
//! tunnel between the two dies at once, as when host-b restarts). Flow records of each host
//! are collected in order ([`Host::record`]). A test that needs a peer to misbehave drives
//! a tunnel to host-b itself ([`Fixture::rogue`], [`Fixture::dial_b`]).
//!
//! Everything runs on the caller's tokio runtime. On a current-thread runtime (what
//! `#[tokio::test]` gives) [`Fixture::reload`] puts a policy in force at both hosts before
//! either reacts, as one policy file deployed to both would.
use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use rcgen::{Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tessera_policy::{CompiledPolicy, Labels};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::mpsc,
    task::JoinSet,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};

use super::apps::{Behaviour, STEP, Workload, within};
use crate::flow::now_ms;
use crate::{
    admission::Admission,
    authz::{Decisions, PolicyMode},
    capture::{Capture, CaptureLookup, Captured, Origin},
    delivery::{Delivery, DeliverySource, NoGate},
    flow::{FlowLog, FlowRecord, FlowSink, Mode},
    identity::{
        Identity,
        session::{Role, SessionSecrets, Tokens},
        signer::{Signer, seal_session_claims, sequence_nonce},
        spiffe_id, test_ca,
        token::{Binding, Claim, Claims},
    },
    inbound::Inbound,
    local::{LocalAddrs, LocalServices, LocalWorkload},
    outbound::Outbound,
    peers::{Directory, Peer, PeerTable},
    pool::{TunnelDialer, TunnelPool},
    registry::ConnectionRegistry,
    socket, tls,
    wire::{Request, Response},
};

pub const TRUST_DOMAIN: &str = "td";
/// No mark: setting one needs `CAP_NET_ADMIN`, and nothing here is captured.
pub const MARK: u32 = 0;
pub const DELIVERY_SRC: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 77);
pub const SKEW_MS: u64 = 1_000;
/// host-a routes it to host-b, which has no such address.
pub const NOT_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// host-a routes it to host-c, whose tunnel port is closed.
pub const BEHIND_C: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// No enforcer serves it: host-a's egress policy decides.
pub const OUTSIDE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
/// Bytes the `reply` workload sends after EOF, and the `talk` workload while reading.
pub const REPLY_LEN: usize = 100_003;
pub const TALK_LEN: usize = 700_001;

/// web (at host-a) may reach every workload labelled `app=api` (all of host-b's).
pub const WEB_TO_API: &str = "rules:\n  - {name: web-to-api, action: allow, from: {labels: [app=web]}, to: {labels: [app=api]}}\n";

/// How one enforcer is configured (the parts tests vary).
#[derive(Clone, Debug)]
pub struct HostSpec {
    /// Policy YAML.
    pub policy: String,
    /// Sign tokens (false: unsigned identities, `[identity] tokens = false`).
    pub tokens: bool,
    /// `[identity] token_lifetime_ms`: of the tokens it signs, and the longest it accepts.
    pub lifetime_ms: u32,
}

impl Default for HostSpec {
    fn default() -> Self {
        Self {
            policy: WEB_TO_API.into(),
            tokens: true,
            lifetime_ms: 10_000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub a: HostSpec,
    pub b: HostSpec,
    /// `[tunnel] pool_size` of both hosts.
    pub pool_size: usize,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            a: HostSpec::default(),
            b: HostSpec::default(),
            pool_size: 2,
        }
    }
}

pub fn policy(yaml: &str) -> Arc<CompiledPolicy> {
    tessera_policy::load("policy.yaml", yaml).expect("a valid policy")
}

/// The identity of workload `workload` of enforcer `enforcer`, labelled `app=<app>`.
pub fn identity(enforcer: &str, workload: &str, app: &str) -> Identity {
    Identity {
        spiffe: spiffe_id(TRUST_DOMAIN, enforcer, workload),
        labels: Labels::new([
            ("app", app),
            ("tessera.io/enforcer", enforcer),
            ("tessera.io/workload", workload),
        ]),
    }
}

/// The capture record of a connection by host-a's workload `web` to `dst`.
pub fn web(dst: SocketAddr) -> Captured {
    Captured {
        dst,
        origin: Origin {
            workload: "web".into(),
            pid: 4242,
            uid: 1000,
            cgroup_id: 7,
        },
        identity: identity("host-a", "web", "web"),
        observe: false,
    }
}

/// The cluster CA.
pub struct TestCa {
    key: KeyPair,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new() -> Self {
        let (key, der) = test_ca::ca();
        Self { key, der }
    }

    /// An enforcer's Ed25519 key (PKCS#8) and certificate (DER) for `name`, as
    /// `tessera ca issue` makes them.
    pub fn issue(&self, name: &str) -> (Vec<u8>, Vec<u8>) {
        test_ca::enforcer(name, &self.key, &self.der)
    }

    /// A certificate for `name` with a key of another algorithm (e.g. ECDSA P-256).
    pub fn issue_with(
        &self,
        name: &str,
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate_for(alg).expect("key");
        let issuer = Issuer::from_ca_cert_der(&self.der.clone().into(), &self.key).expect("CA");
        let cert = rcgen::CertificateParams::new(vec![name.into()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("certificate");
        (key.serialize_der(), cert.der().to_vec())
    }

    /// TLS material presenting `cert` (with `key`) and trusting this CA.
    pub fn tls(&self, key: &[u8], cert: &[u8]) -> tls::Credentials {
        tls::Credentials {
            ca: vec![CertificateDer::from(self.der.clone())],
            chain: vec![CertificateDer::from(cert.to_vec())],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
        }
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// The fake capture map: records by client address, taken once (as the eBPF map's are).
#[derive(Default)]
pub struct Captures(Mutex<HashMap<SocketAddr, Captured>>);

impl Captures {
    pub fn insert(&self, client: SocketAddr, captured: Captured) {
        self.0.lock().expect("lock").insert(client, captured);
    }
}

impl CaptureLookup for Captures {
    fn take(&self, client: SocketAddr, _netns: Option<u64>) -> Capture {
        self.0.lock().expect("lock").remove(&client).into()
    }
}

/// Hands each flow record to the test.
struct Collect(mpsc::UnboundedSender<FlowRecord>);

impl FlowSink for Collect {
    fn record(&self, rec: Arc<FlowRecord>) {
        let _ = self.0.send((*rec).clone());
    }
}

/// One enforcer, running.
pub struct Host {
    pub name: &'static str,
    pub registry: Arc<ConnectionRegistry>,
    pub pool: Arc<TunnelPool>,
    /// Where captured connections land.
    pub outbound: SocketAddr,
    pub tunnel: SocketAddr,
    /// The direct listener: the port of its workload `guarded`.
    pub direct: SocketAddr,
    /// Its tokens (signer and verifier), shared with its outbound and inbound sides.
    pub tokens: Arc<Tokens>,
    flows: mpsc::UnboundedReceiver<FlowRecord>,
    _tasks: JoinSet<io::Result<()>>,
}

impl Host {
    /// This host's next flow record.
    pub async fn record(&mut self) -> FlowRecord {
        let what = format!("a flow record from {}", self.name);
        within(&what, self.flows.recv())
            .await
            .expect("the flow log runs")
    }
}

/// What differs between the two hosts.
struct Plan {
    name: &'static str,
    spec: HostSpec,
    pool_size: usize,
    peers: PeerTable,
    /// Workload names and their ports (each labelled `app=api`).
    services: Vec<(&'static str, u16)>,
    lookup: Arc<dyn CaptureLookup>,
}

/// Builds and starts one enforcer the way the enforcer's daemon does (tunnel mode), on
/// loopback listeners. The only place the data plane's parts are constructed.
fn start_host(ca: &TestCa, plan: Plan) -> Host {
    let Plan {
        name,
        spec,
        pool_size,
        peers,
        services,
        lookup,
    } = plan;
    let [outbound_l, tunnel_l, direct_l] =
        [(); 3].map(|_| socket::listen((Ipv4Addr::LOCALHOST, 0).into(), MARK).expect("listen"));
    let addr = |l: &TcpListener| l.local_addr().expect("local address");
    let (outbound_addr, tunnel, direct) = (addr(&outbound_l), addr(&tunnel_l), addr(&direct_l));
    let (key, cert) = ca.issue(name);
    let tls = ca.tls(&key, &cert);
    let tokens = Arc::new(
        Tokens::new(
            TRUST_DOMAIN.into(),
            &key,
            vec![ca.der.clone()],
            spec.lifetime_ms,
            SKEW_MS,
            spec.tokens,
        )
        .expect("tokens"),
    );
    let decisions = Decisions::new(
        policy(&spec.policy),
        PolicyMode::Enforce,
        Default::default(),
    );
    let registry = Arc::new(ConnectionRegistry::new(Arc::new(decisions)));
    let (tx, flows) = mpsc::unbounded_channel();
    let flow_log = FlowLog::start(None, Some(Arc::new(Collect(tx)))).expect("flow log");
    let admission = Arc::new(Admission::new(
        name.into(),
        Mode::Tunnel,
        registry.clone(),
        flow_log,
    ));
    let dialer = TunnelDialer::new(
        tls.client_config().expect("client TLS"),
        tokens.clone(),
        MARK,
        STEP,
    );
    let pool = TunnelPool::new(dialer, pool_size, Duration::from_secs(20));
    pool.warm(&peers.peers().cloned().collect::<HashSet<Peer>>());
    let services = services
        .into_iter()
        .chain([("guarded", direct.port())])
        .map(|(workload, port)| {
            let workload = LocalWorkload {
                name: workload.into(),
                identity: identity(name, workload, "api"),
                observe: false,
            };
            (port, Arc::new(workload))
        });
    let outbound = Arc::new(Outbound {
        namespaces: std::sync::OnceLock::new(),
        admission: admission.clone(),
        lookup,
        peers: Arc::new(Directory::fixed(peers, Vec::new())),
        pool: pool.clone(),
        tokens: tokens.clone(),
        mark: MARK,
    });
    let inbound = Arc::new(Inbound {
        admission,
        tokens: tokens.clone(),
        acceptor: TlsAcceptor::from(tls.server_config().expect("server TLS")),
        services: LocalServices::new(services),
        addrs: LocalAddrs::default(),
        delivery: Delivery {
            namespaces: None,
            source: DeliverySource::Localhost(DELIVERY_SRC),
            mark: MARK,
            gate: Arc::new(NoGate),
        },
        peers: Arc::new(Directory::fixed(PeerTable::default(), Vec::new())),
        idle_timeout: Duration::from_secs(60),
        gate: crate::inbound::TlsGate::new(Default::default()),
    });
    let mut tasks = JoinSet::new();
    tasks.spawn(outbound.serve(outbound_l));
    tasks.spawn(inbound.clone().serve_tunnels(tunnel_l));
    tasks.spawn(inbound.serve_direct(direct_l));
    Host {
        name,
        registry,
        pool,
        outbound: outbound_addr,
        tunnel,
        direct,
        tokens,
        flows,
        _tasks: tasks,
    }
}

/// A TCP relay in front of host-b's tunnel listener: the network between the hosts, which
/// a test can cut.
pub struct Link {
    pub addr: SocketAddr,
    relays: Arc<Mutex<JoinSet<()>>>,
    _accept: JoinSet<()>,
}

impl Link {
    pub async fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let relays = Arc::new(Mutex::new(JoinSet::new()));
        let mut accept = JoinSet::new();
        let set = relays.clone();
        accept.spawn(async move {
            while let Ok((mut from, _)) = listener.accept().await {
                set.lock().expect("lock").spawn(async move {
                    if let Ok(mut to) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut from, &mut to).await;
                    }
                });
            }
        });
        Self {
            addr,
            relays,
            _accept: accept,
        }
    }

    /// Closes every connection through the link (new ones pass again), and returns once
    /// they are closed.
    pub async fn cut(&self) {
        let mut cut = std::mem::take(&mut *self.relays.lock().expect("lock"));
        cut.abort_all();
        within("the link's connections to close", async {
            while cut.join_next().await.is_some() {}
        })
        .await
    }
}

/// An address of `ip` where nothing listens: a socket holds the port (bound, not
/// listening, so connections to it are refused) for as long as it lives.
pub struct ClosedPort {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
}

impl ClosedPort {
    pub fn on(ip: Ipv4Addr) -> Self {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::from((ip, 0)).into())
            .expect("bind");
        let addr = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("local address");
        Self {
            addr,
            _socket: socket,
        }
    }
}

/// host-a, host-b, the link between them, host-b's workloads, and the capture map.
pub struct Fixture {
    pub ca: TestCa,
    pub a: Host,
    pub b: Host,
    pub link: Link,
    pub captures: Arc<Captures>,
    /// host-b's workloads: `echo`, `reply` ([`REPLY_LEN`] bytes after EOF), `talk`
    /// ([`TALK_LEN`] bytes while reading).
    pub echo: Workload,
    pub reply: Workload,
    pub talk: Workload,
    /// host-b's workload `down`: declared, but nothing listens on its port.
    pub down: ClosedPort,
    /// A port of 127.0.0.1 that no workload of host-b serves.
    pub unserved: ClosedPort,
    /// host-c's tunnel port.
    _host_c: ClosedPort,
}

impl Fixture {
    pub async fn start(spec: Spec) -> Self {
        let ca = TestCa::new();
        let echo = Workload::start(Behaviour::Echo).await;
        let reply = Workload::start(Behaviour::ReplyAfterEof(REPLY_LEN)).await;
        let talk = Workload::start(Behaviour::Talk(TALK_LEN)).await;
        let [down, unserved, host_c] = [(); 3].map(|_| ClosedPort::on(Ipv4Addr::LOCALHOST));
        let b = start_host(
            &ca,
            Plan {
                name: "host-b",
                spec: spec.b,
                pool_size: spec.pool_size,
                peers: PeerTable::default(),
                services: vec![
                    ("echo", echo.addr.port()),
                    ("reply", reply.addr.port()),
                    ("talk", talk.addr.port()),
                    ("down", down.addr.port()),
                ],
                lookup: Arc::new(Captures::default()),
            },
        );
        let link = Link::start(b.tunnel).await;
        let to_b = Peer {
            name: "host-b".into(),
            tunnel: link.addr,
        };
        let to_c = Peer {
            name: "host-c".into(),
            tunnel: host_c.addr,
        };
        let net = |ip: Ipv4Addr| ipnet::IpNet::from(IpAddr::V4(ip));
        let captures = Arc::new(Captures::default());
        let a = start_host(
            &ca,
            Plan {
                name: "host-a",
                spec: spec.a,
                pool_size: spec.pool_size,
                peers: PeerTable::new([
                    (net(Ipv4Addr::LOCALHOST), to_b.clone()),
                    (net(NOT_B), to_b),
                    (net(BEHIND_C), to_c),
                ]),
                services: vec![],
                lookup: captures.clone(),
            },
        );
        Self {
            ca,
            a,
            b,
            link,
            captures,
            echo,
            reply,
            talk,
            down,
            unserved,
            _host_c: host_c,
        }
    }

    /// Connects `web` to `dst`: what the application's `connect(dst)` becomes once the eBPF
    /// programs redirected it to host-a's outbound listener.
    pub async fn connect(&self, dst: SocketAddr) -> TcpStream {
        self.connect_as(Some(web(dst))).await
    }

    /// Connects to host-a's outbound listener with this capture record (none: as if the
    /// eBPF programs had left none).
    pub async fn connect_as(&self, captured: Option<Captured>) -> TcpStream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        let client = socket.local_addr().expect("local address");
        if let Some(captured) = captured {
            self.captures.insert(client, captured);
        }
        let stream = within("connecting to host-a", socket.connect(self.a.outbound))
            .await
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
    }

    /// Waits until host-a's pool holds `n` open tunnels to host-b.
    pub async fn warm(&self, n: usize) {
        let idle = || {
            self.a
                .pool
                .open_counts()
                .into_iter()
                .find(|(peer, _)| peer == "host-b")
                .map_or(0, |(_, idle)| idle)
        };
        // The pool reports no event when it fills: look every few milliseconds.
        within("host-a's pool to warm up", async {
            while idle() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }

    /// Puts `yaml` in force at both hosts at once (as when one policy file is deployed).
    pub fn reload(&self, yaml: &str) {
        let p = policy(yaml);
        self.a.registry.apply(p.clone());
        self.b.registry.apply(p);
    }

    /// A TLS connection to host-b's tunnel listener (not through the link) with `config`.
    pub async fn dial_b(
        &self,
        config: Arc<rustls::ClientConfig>,
    ) -> io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.b.tunnel).await?;
        let name = ServerName::try_from("host-b").expect("a DNS name");
        within(
            "a TLS handshake with host-b",
            TlsConnector::from(config).connect(name, tcp),
        )
        .await
    }

    /// An enforcer `name` with a certificate from the cluster CA that speaks the tunnel
    /// protocol by hand: to send what an honest enforcer never would.
    pub async fn rogue(&self, name: &str) -> Rogue {
        let (tls, keys) = self.rogue_tls(name).await;
        let client = crate::mux::client(tls).await.expect("HTTP/2 with host-b");
        Rogue {
            send: client.send,
            closed: client.closed,
            window: client.window,
            keys,
        }
    }

    /// A TLS session of enforcer `name` with host-b, before HTTP/2 (tests write raw frames
    /// on it), and what seals its tokens.
    pub async fn rogue_tls(&self, name: &str) -> (TlsStream<TcpStream>, Sealer) {
        let (key, cert) = self.ca.issue(name);
        let config = self
            .ca
            .tls(&key, &cert)
            .client_config()
            .expect("client TLS");
        let tls = self.dial_b(config).await.expect("TLS with host-b");
        let secrets = SessionSecrets::of(tls.get_ref().1).expect("exporter");
        let keys = Sealer {
            binding: secrets.binding,
            secrets,
            seq: 0,
            signer: Signer::from_pkcs8(&key).expect("an Ed25519 key"),
        };
        (tls, keys)
    }
}

/// A tunnel to host-b driven by the test (see [`Fixture::rogue`]); it seals tokens as its
/// [`Sealer`] (`rogue.seal(..)`, `rogue.binding`).
pub struct Rogue {
    /// Opens streams on the tunnel.
    pub send: h2::client::SendRequest<bytes::Bytes>,
    /// Set once host-b closed the tunnel.
    pub closed: Arc<std::sync::atomic::AtomicBool>,
    pub window: Arc<crate::mux::Window>,
    pub keys: Sealer,
}

impl std::ops::Deref for Rogue {
    type Target = Sealer;
    fn deref(&self) -> &Sealer {
        &self.keys
    }
}

impl std::ops::DerefMut for Rogue {
    fn deref_mut(&mut self) -> &mut Sealer {
        &mut self.keys
    }
}

/// What a test's enforcer seals its tokens with on one TLS session.
pub struct Sealer {
    /// The session's exporter value, which honest tokens are bound to.
    pub binding: Binding,
    /// The session's exporter secrets: its key seals this side's session tokens.
    pub secrets: SessionSecrets,
    /// The sequence number of its last session token.
    pub seq: u128,
    /// The key of its certificate.
    pub signer: Signer,
}

impl Sealer {
    /// A session token (version 3) for `claims` with the next sequence number as nonce,
    /// sealed with this session's client key, as an honest enforcer makes them.
    pub fn seal(&mut self, claims: Claims) -> Vec<u8> {
        self.seq += 1;
        self.seal_as(self.seq, claims)
    }

    /// A session token with sequence number `seq` (tests replay or reorder them).
    pub fn seal_as(&self, seq: u128, claims: Claims) -> Vec<u8> {
        let claims = Claims {
            nonce: sequence_nonce(seq),
            ..claims
        };
        seal_session_claims(&self.secrets.key(Role::Client), &claims)
    }

    /// Honest claims for `identity` (cold) to `dst`, issued now by this enforcer on this session.
    pub fn claims(&self, identity: &Identity, dst: SocketAddr, now_ms: u64) -> Claims {
        Claims {
            issuer: self.signer.key_id(),
            issued_ms: now_ms,
            lifetime_ms: 10_000,
            nonce: [0; 16],
            dst,
            binding: self.binding,
            claim: Claim::Cold(identity.clone()),
        }
    }

    /// An honest request from workload `web` of enforcer `enforcer` to `dst`, its token
    /// sealed with the next sequence number.
    pub fn request(&mut self, enforcer: &str, dst: SocketAddr) -> Request {
        let claims = self.claims(&identity(enforcer, "web", "web"), dst, now_ms());
        Request {
            dst,
            source: crate::capture::Origin {
                workload: "web".into(),
                ..Default::default()
            },
            proof: crate::identity::session::Proof::Token(self.seal(claims)),
        }
    }
}

impl Rogue {
    /// Opens a stream whose request header carries `bytes` (base64url, as an honest one
    /// carries an encoded request) and reads host-b's answer.
    pub async fn send(&mut self, bytes: &[u8]) -> Response {
        use base64::Engine as _;
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let req = crate::mux::connect_with("127.0.0.1:1".into(), header.into_bytes());
        let (response, send) = crate::mux::open(&mut self.send, req).expect("a stream");
        within("host-b's answer", async {
            crate::mux::answered(response, send, &self.window, Duration::from_secs(30)).await
        })
        .await
        .expect("an answer")
        .0
    }

    /// Waits until host-b has closed the tunnel.
    pub async fn until_closed(&self) {
        within("host-b to close the tunnel", async {
            while !self.closed.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }

    /// Sends `request` and reads host-b's answer.
    pub async fn ask(&mut self, request: &Request) -> Response {
        self.send(&request.encode()).await
    }
}
