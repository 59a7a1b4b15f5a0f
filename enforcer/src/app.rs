//! The one place that wires an enforcer together: [`build`] turns a [`Config`] into a
//! [`Running`] enforcer, [`Running::wait`] serves until a signal or a failure, and
//! [`Running::shutdown`] leaves the host as it was (or capture in force).
//!
//! What the configuration says about this host is read once into a [`HostState`]
//! (workloads, the ports they serve, peers, peers' keys); the policy, its decisions and the
//! registry of live connections are made once and shared by whichever data path the
//! configuration names, and **only that data path is started**: tunnel mode's listeners
//! and pool, or handshake mode's queues and rules.
//!
//! Order matters for failing safely: everything that can fail without touching the kernel
//! (keys, certificates, listeners, the flow store) comes before capture is attached.
use std::{
    collections::HashMap,
    io,
    net::{Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use futures_util::FutureExt;
use tessera_proxy::{
    admission::Admission,
    authz::Decisions,
    capture::CaptureLookup,
    dns::DnsTable,
    flow::{FlowLog, Mode},
    handshake::engine::{Engine, Setup},
    identity::{session::Tokens, token::KeyId},
    inbound::Inbound,
    local::{LocalAddrs, LocalServices, LocalWorkload},
    outbound::Outbound,
    peers::{Peer, PeerTable},
    pool::{TunnelDialer, TunnelPool},
    registry::ConnectionRegistry,
    socket::listen,
    tls::Credentials,
};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;

use crate::{
    capture::Capture,
    config::{Config, DataPathMode},
    flowstore::FlowStore,
    metrics::Metrics,
    policy,
    workloads::{BpfCaptureLookup, WorkloadIndex},
};

/// What the configuration says about this host, read once.
pub struct HostState {
    /// Enrolled workloads' identities, by name.
    pub identities: HashMap<String, Arc<LocalWorkload>>,
    /// Workloads by the port they serve.
    pub services: LocalServices,
    pub ports: Vec<u16>,
    pub peers: PeerTable,
}

impl HostState {
    pub fn new(config: &Config) -> Self {
        let identities: HashMap<String, Arc<LocalWorkload>> = config
            .workloads
            .iter()
            .map(|w| (w.name.clone(), Arc::new(policy::identity(config, w))))
            .collect();
        let served: Vec<(u16, Arc<LocalWorkload>)> = config
            .workloads
            .iter()
            .flat_map(|w| w.ports.iter().map(|&p| (p, identities[&w.name].clone())))
            .collect();
        let peers = PeerTable::new(config.peers.iter().flat_map(|p| {
            let peer = Peer {
                name: p.name.clone(),
                tunnel: p.tunnel,
            };
            p.serves.iter().map(move |net| (*net, peer.clone()))
        }));
        Self {
            ports: served.iter().map(|(p, _)| *p).collect(),
            services: LocalServices::new(served),
            identities,
            peers,
        }
    }
}

/// An enforcer serving: its tasks, and what shutdown must put back.
pub struct Running {
    tasks: JoinSet<io::Result<()>>,
    capture: Capture,
    store: Arc<FlowStore>,
    mode: DataPathMode,
}

/// Shared by both data paths: decisions, live connections, records.
struct Core {
    registry: Arc<ConnectionRegistry>,
    dns: Arc<DnsTable>,
    flows: FlowLog,
    store: Arc<FlowStore>,
    metrics: Arc<Metrics>,
    tokens: Arc<Tokens>,
}

impl Core {
    fn admission(&self, config: &Config, mode: Mode) -> Arc<Admission> {
        let registry = self.registry.clone();
        Arc::new(Admission::new(
            config.name.clone(),
            mode,
            registry,
            self.flows.clone(),
        ))
    }
}

/// Builds and starts the enforcer `config` describes.
pub async fn build(config: &Config) -> Result<Running> {
    let identity = Credentials::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    let host = HostState::new(config);
    let core = core(config, &identity)?;
    let mut tasks = JoinSet::new();
    // Everything that can fail without touching the kernel comes first: listeners (a port
    // in use stops us here), peers' certificates, the API's address.
    let tunnel_listeners = match config.mode() {
        DataPathMode::Tunnel => Some(TunnelListeners::bind(config)?),
        DataPathMode::Handshake => None,
    };
    let peer_keys = match config.mode() {
        DataPathMode::Handshake => peer_keys(config, &core.tokens)?,
        DataPathMode::Tunnel => HashMap::new(),
    };
    let api = match crate::api::Settings::from_config(config)? {
        Some(settings) => {
            let addr = settings.listen;
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("flows.api: cannot listen on {addr}"))?;
            let router = crate::api::router(core.store.clone(), settings)?;
            Some((listener, router))
        }
        None => None,
    };
    let mut capture = Capture::start(config)?;
    let lookup = capture_lookup(config, &host, &mut capture)?;
    match tunnel_listeners {
        Some(listeners) => {
            capture.set_inbound_listeners(&listeners.in_v4, listeners.in_v6.as_ref())?;
            let pool = pool(config, &identity, &core, &host)?;
            let outbound = Arc::new(Outbound {
                admission: core.admission(config, Mode::Tunnel),
                lookup,
                peers: host.peers.clone(),
                pool,
                tokens: core.tokens.clone(),
                mark: config.bpf.proxy_mark,
            });
            let inbound = inbound(config, &identity, &core, &host)?;
            listeners.serve(&mut tasks, outbound, inbound);
        }
        None => {
            let setup = handshake_setup(config, &core, &host, lookup, peer_keys);
            // Workers first: once the rules are in, queued packets need a reader.
            crate::handshake::start(
                config,
                Arc::new(Engine::new(setup)),
                core.registry.clone(),
                capture.take_closed_ring()?,
            )?;
            crate::handshake::install_rules(&config.handshake, &host.ports)?;
        }
    }
    serve_common(config, &core, api, &mut tasks);
    tracing::info!(
        name = %config.name,
        workloads = config.workloads.len(),
        peers = config.peers.len(),
        policy_rules = core.registry.decisions().rule_count(),
        tunnel = %config.listen.tunnel,
        tokens = config.identity.tokens,
        mode = config.mode().as_str(),
        "enforcer ready"
    );
    Ok(Running {
        tasks,
        capture,
        store: core.store,
        mode: config.mode(),
    })
}

/// Policy, decisions and the live-connection registry; tokens; the flow store and log.
fn core(config: &Config, identity: &Credentials) -> Result<Core> {
    let dns = Arc::new(DnsTable::default());
    let decisions = Decisions::new(
        policy::load(config.policy.file.as_deref())?,
        config.policy.mode,
        dns.clone(),
    );
    let registry = Arc::new(ConnectionRegistry::new(Arc::new(decisions)));
    let tokens = Arc::new(tokens(config, identity)?);
    let metrics = Arc::new(Metrics::new());
    let store = FlowStore::open(
        config.name.clone(),
        Some(&config.map_db()),
        config.flows.recent,
        metrics.clone(),
    )?;
    let flows = FlowLog::start(config.flows.log.clone(), Some(store.clone()))
        .map_err(|e| anyhow::anyhow!("flows.log: {e}"))?;
    Ok(Core {
        registry,
        dns,
        flows,
        store,
        metrics,
        tokens,
    })
}

/// The token signer and verifier: this enforcer's certificate key signs, peers' keys
/// verify through the cluster CA.
fn tokens(config: &Config, identity: &Credentials) -> Result<Tokens> {
    use rustls::pki_types::PrivateKeyDer;
    let PrivateKeyDer::Pkcs8(key) = &identity.key else {
        anyhow::bail!(
            "tls.key: {}: not a PKCS#8 Ed25519 key; issue one with `tessera ca issue`",
            config.tls.key.display()
        );
    };
    let id = &config.identity;
    Tokens::new(
        id.trust_domain.clone(),
        key.secret_pkcs8_der(),
        identity.ca.iter().map(|c| c.to_vec()).collect(),
        id.token_lifetime_ms,
        id.clock_skew_ms,
        id.tokens,
    )
    .map_err(|e| anyhow::anyhow!("tls.key: {}: {e}", config.tls.key.display()))
}

/// The certified keys of the peers whose certificates the configuration names.
fn peer_keys(config: &Config, tokens: &Tokens) -> Result<HashMap<String, KeyId>> {
    let mut keys = HashMap::new();
    for (i, p) in config.peers.iter().enumerate() {
        let Some(path) = &p.cert else { continue };
        let at = || format!("peer[{i}] {:?}: cert: {}", p.name, path.display());
        let certs = tessera_proxy::tls::certs(path).with_context(at)?;
        let key = tokens
            .trust_peer(certs[0].as_ref())
            .map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        keys.insert(p.name.clone(), key);
    }
    Ok(keys)
}

/// The capture records the connect hooks leave, with the workloads they belong to.
fn capture_lookup(
    config: &Config,
    host: &HostState,
    capture: &mut Capture,
) -> Result<Arc<dyn CaptureLookup>> {
    let roots = config
        .workloads
        .iter()
        .map(|w| (w.name.clone(), w.cgroup.clone()))
        .collect();
    Ok(Arc::new(BpfCaptureLookup {
        map: Mutex::new(capture.take_client_map()?),
        workloads: WorkloadIndex::new(roots),
        identities: host.identities.clone(),
        attestor: Arc::default(),
    }))
}

/// Tunnel mode's listeners, bound before anything in the kernel changes.
struct TunnelListeners {
    out_v4: TcpListener,
    out_v6: Option<TcpListener>,
    in_v4: TcpListener,
    in_v6: Option<TcpListener>,
    tunnel: TcpListener,
}

impl TunnelListeners {
    fn bind(config: &Config) -> Result<Self> {
        let mark = config.bpf.proxy_mark;
        let loopback4 = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let loopback6 = |port| SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        let (out_port, in_port) = (config.listen.outbound_port, config.listen.inbound_port);
        let tunnel = config.listen.tunnel;
        Ok(Self {
            out_v4: listen(loopback4(out_port), mark).with_context(|| {
                format!("listen.outbound_port: cannot listen on 127.0.0.1:{out_port}")
            })?,
            out_v6: listen(loopback6(out_port), mark).ok(),
            in_v4: listen(loopback4(in_port), mark).with_context(|| {
                format!("listen.inbound_port: cannot listen on 127.0.0.1:{in_port}")
            })?,
            in_v6: listen(loopback6(in_port), mark).ok(),
            tunnel: listen(tunnel, mark)
                .with_context(|| format!("listen.tunnel: cannot listen on {tunnel}"))?,
        })
    }

    fn serve(
        self,
        tasks: &mut JoinSet<io::Result<()>>,
        outbound: Arc<Outbound>,
        inbound: Arc<Inbound>,
    ) {
        tasks.spawn(outbound.clone().serve(self.out_v4));
        if let Some(l) = self.out_v6 {
            tasks.spawn(outbound.serve(l));
        }
        tasks.spawn(inbound.clone().serve_direct(self.in_v4));
        if let Some(l) = self.in_v6 {
            tasks.spawn(inbound.clone().serve_direct(l));
        }
        tasks.spawn(inbound.serve_tunnels(self.tunnel));
    }
}

/// Warm tunnels to every peer.
fn pool(
    config: &Config,
    identity: &Credentials,
    core: &Core,
    host: &HostState,
) -> Result<Arc<TunnelPool>> {
    let dialer = TunnelDialer::new(
        identity.client_config()?,
        core.tokens.clone(),
        config.bpf.proxy_mark,
        Duration::from_secs(5),
    );
    let pool = TunnelPool::new(
        dialer,
        config.tunnel.pool_size,
        Duration::from_secs(config.tunnel.pool_max_idle_secs),
    );
    pool.warm(host.peers.peers());
    Ok(pool)
}

fn inbound(
    config: &Config,
    identity: &Credentials,
    core: &Core,
    host: &HostState,
) -> Result<Arc<Inbound>> {
    Ok(Arc::new(Inbound {
        admission: core.admission(config, Mode::Tunnel),
        tokens: core.tokens.clone(),
        acceptor: TlsAcceptor::from(identity.server_config()?),
        services: host.services.clone(),
        addrs: LocalAddrs::default(),
        mark: config.bpf.proxy_mark,
        delivery_src4: config.bpf.delivery_source,
        idle_timeout: Duration::from_secs(config.tunnel.idle_timeout_secs),
    }))
}

fn handshake_setup(
    config: &Config,
    core: &Core,
    host: &HostState,
    lookup: Arc<dyn CaptureLookup>,
    peer_keys: HashMap<String, KeyId>,
) -> Setup {
    Setup {
        admission: core.admission(config, Mode::Handshake),
        tokens: core.tokens.clone(),
        peers: host.peers.clone(),
        peer_keys,
        lookup,
        services: host.services.clone(),
        proven_mark: config.handshake.proven_bit,
        acked_mark: config.handshake.acked_bit,
        pending_ms: u64::from(config.identity.token_lifetime_ms) + config.identity.clock_skew_ms,
        key_reuse_ms: config.handshake.key_reuse_ms,
    }
}

/// What both modes run: DNS for policy names, the API, the flow map's persistence, policy
/// reloads, and the metrics read at scrape time.
fn serve_common(
    config: &Config,
    core: &Core,
    api: Option<(TcpListener, axum::Router)>,
    tasks: &mut JoinSet<io::Result<()>>,
) {
    match tessera_proxy::dns::resolver(&config.policy.dns_servers) {
        Ok(resolver) => {
            let resolving = tessera_proxy::dns::keep_resolved(
                resolver,
                core.dns.clone(),
                core.registry.clone(),
            );
            tasks.spawn(resolving.map(Ok));
        }
        // Names in policy then match nothing (fail closed); say so.
        Err(e) => {
            tracing::warn!(error = %e, "no DNS resolver: policy dns: names will match nothing")
        }
    }
    if let Some((listener, router)) = api {
        tasks.spawn(async move { axum::serve(listener, router).await });
    }
    tasks.spawn(
        core.store
            .clone()
            .keep_flushed(Duration::from_secs(1))
            .map(Ok),
    );
    let registry = core.registry.clone();
    core.metrics.count_open_with(move || registry.live_count());
    let flows = core.flows.clone();
    core.metrics
        .count_dropped_flows_with(move || flows.dropped());
    if let Some(file) = config.policy.file.clone() {
        let (registry, metrics) = (core.registry.clone(), core.metrics.clone());
        tasks.spawn(async move {
            policy::watch(file, registry, metrics)
                .await
                .map_err(io::Error::other)
        });
    }
}

impl Running {
    /// Serves until SIGTERM or SIGINT (Ok) or until a task fails (the error).
    pub async fn wait(&mut self) -> Result<()> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); Ok(()) }
            Some(res) = self.tasks.join_next() => match res {
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("a listener failed")),
                Ok(Ok(())) => Ok(()),
                Err(e) => Err(anyhow::Error::new(e).context("a listener task panicked")),
            },
        }
    }

    /// Stops every task, persists the flow map, and detaches capture unless
    /// `keep_attached` (then captured connections fail closed until an enforcer starts).
    pub fn shutdown(mut self, keep_attached: bool) {
        self.tasks.abort_all();
        if self.mode == DataPathMode::Handshake && !keep_attached {
            crate::handshake::remove_rules();
        }
        if let Err(e) = self.store.flush() {
            tracing::warn!(error = format!("{e:#}"), "cannot persist the flow map");
        }
        self.capture.shutdown(keep_attached);
    }
}
