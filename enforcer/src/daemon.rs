//! `tessera run`: capture, proxy, and an orderly exit.
use std::{
    collections::HashMap,
    net::{Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use futures_util::FutureExt;
use tessera_proxy::{
    admission::Admission,
    authz::{Decisions, PolicyMode},
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
    tls::Identity,
};
use tokio::signal::unix::{SignalKind, signal};
use tokio_rustls::TlsAcceptor;

use crate::{
    capture::Capture,
    config::{Config, DataPathMode, PolicyModeConfig},
    policy,
    workloads::{BpfCaptureLookup, WorkloadIndex},
};

pub struct RunOptions {
    pub config: PathBuf,
    pub keep_attached: bool,
    pub ready_file: Option<PathBuf>,
}

/// Each proxied connection holds two descriptors (application side and tunnel side), so the
/// default limit would cap an enforcer far below the connections a host makes.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANT: u64 = 1 << 20;
    if setrlimit(Resource::RLIMIT_NOFILE, WANT, WANT).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < WANT
    {
        // Without CAP_SYS_RESOURCE the hard limit cannot be raised.
        tracing::warn!(
            limit = soft,
            max_connections = soft.saturating_sub(200) / 2,
            "open file limit could not be raised: each proxied connection holds two descriptors"
        );
    }
}

/// The token signer and verifier: this enforcer's certificate key signs, peers' keys
/// verify through the cluster CA.
fn tokens(config: &Config, identity: &Identity) -> Result<Tokens> {
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

fn peer_table(config: &Config) -> PeerTable {
    PeerTable::new(config.peers.iter().flat_map(|p| {
        let peer = Peer {
            name: p.name.clone(),
            tunnel: p.tunnel,
        };
        p.serves.iter().map(move |net| (*net, peer.clone()))
    }))
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

pub async fn run(opts: RunOptions) -> Result<()> {
    raise_fd_limit();
    let config = Config::load(&opts.config)?;
    let identity = Identity::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    let mark = config.bpf.proxy_mark;

    // Listeners first: if a port is taken we stop before touching the kernel.
    let loopback4 = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let loopback6 = |port| SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let (out_port, in_port) = (config.listen.outbound_port, config.listen.inbound_port);
    let out_v4 = listen(loopback4(out_port), mark)
        .with_context(|| format!("listen.outbound_port: cannot listen on 127.0.0.1:{out_port}"))?;
    let out_v6 = listen(loopback6(out_port), mark).ok();
    let in_v4 = listen(loopback4(in_port), mark)
        .with_context(|| format!("listen.inbound_port: cannot listen on 127.0.0.1:{in_port}"))?;
    let in_v6 = listen(loopback6(in_port), mark).ok();
    let tunnel = listen(config.listen.tunnel, mark)
        .with_context(|| format!("listen.tunnel: cannot listen on {}", config.listen.tunnel))?;

    let mode = match config.policy.mode {
        PolicyModeConfig::Enforce => PolicyMode::Enforce,
        PolicyModeConfig::Observe => PolicyMode::Observe,
    };
    let dns = Arc::new(DnsTable::default());
    let decisions = Decisions::new(
        policy::load(config.policy.file.as_deref())?,
        mode,
        dns.clone(),
    );
    let registry = Arc::new(ConnectionRegistry::new(Arc::new(decisions)));
    let identities: HashMap<String, Arc<LocalWorkload>> = config
        .workloads
        .iter()
        .map(|w| (w.name.clone(), Arc::new(policy::identity(&config, w))))
        .collect();

    let mut capture = Capture::start(&config)?;
    capture.set_inbound_listeners(&in_v4, in_v6.as_ref())?;
    let lookup = Arc::new(BpfCaptureLookup {
        map: Mutex::new(capture.take_client_map()?),
        workloads: WorkloadIndex::new(
            config
                .workloads
                .iter()
                .map(|w| (w.name.clone(), w.cgroup.clone()))
                .collect(),
        ),
        identities: identities.clone(),
        attestor: Arc::default(),
    });
    let tokens = Arc::new(tokens(&config, &identity)?);

    let metrics = Arc::new(crate::metrics::Metrics::new());
    let store = crate::flowstore::FlowStore::open(
        config.name.clone(),
        Some(&config.map_db()),
        config.flows.recent,
        metrics.clone(),
    )?;
    let flows = FlowLog::start(config.flows.log.clone(), Some(store.clone()))
        .with_context(|| format!("flows.log: cannot open {:?}", config.flows.log))?;
    let peers = peer_table(&config);
    let dialer = TunnelDialer::new(
        identity.client_config()?,
        tokens.clone(),
        mark,
        Duration::from_secs(5),
    );
    let pool = TunnelPool::new(
        dialer,
        config.tunnel.pool_size,
        Duration::from_secs(config.tunnel.pool_max_idle_secs),
    );
    // In handshake mode no workload connection takes a tunnel: nothing to warm.
    if config.mode() == DataPathMode::Tunnel {
        pool.warm(peers.peers());
    }

    let services: Vec<(u16, Arc<LocalWorkload>)> = config
        .workloads
        .iter()
        .flat_map(|w| w.ports.iter().map(|&p| (p, identities[&w.name].clone())))
        .collect();
    let handshake_mode = config.mode() == DataPathMode::Handshake;
    let admission = |mode| {
        let flows = flows.clone();
        Arc::new(Admission::new(
            config.name.clone(),
            mode,
            registry.clone(),
            flows,
        ))
    };
    if handshake_mode {
        let engine = Arc::new(Engine::new(Setup {
            admission: admission(Mode::Handshake),
            tokens: tokens.clone(),
            peers: peer_table(&config),
            peer_keys: peer_keys(&config, &tokens)?,
            lookup: lookup.clone(),
            services: LocalServices::new(services.clone()),
            proven_mark: config.handshake.proven_bit,
            acked_mark: config.handshake.acked_bit,
            pending_ms: u64::from(config.identity.token_lifetime_ms)
                + config.identity.clock_skew_ms,
            key_reuse_ms: config.handshake.key_reuse_ms,
        }));
        // Workers first: once the rules are in, queued packets need a reader.
        crate::handshake::start(
            &config,
            engine,
            registry.clone(),
            capture.take_closed_ring()?,
        )?;
        let ports: Vec<u16> = services.iter().map(|(p, _)| *p).collect();
        crate::handshake::install_rules(&config.handshake, &ports)?;
    }

    let outbound = Arc::new(Outbound {
        admission: admission(Mode::Tunnel),
        lookup,
        peers,
        pool,
        tokens: tokens.clone(),
        mark,
    });
    let inbound = Arc::new(Inbound {
        admission: admission(Mode::Tunnel),
        tokens,
        acceptor: TlsAcceptor::from(identity.server_config()?),
        services: LocalServices::new(services),
        addrs: LocalAddrs::default(),
        mark,
        delivery_src4: config.bpf.delivery_source,
        idle_timeout: Duration::from_secs(config.tunnel.idle_timeout_secs),
    });

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(outbound.clone().serve(out_v4));
    if let Some(l) = out_v6 {
        tasks.spawn(outbound.serve(l));
    }
    tasks.spawn(inbound.clone().serve_direct(in_v4));
    if let Some(l) = in_v6 {
        tasks.spawn(inbound.clone().serve_direct(l));
    }
    tasks.spawn(inbound.serve_tunnels(tunnel));
    match tessera_proxy::dns::resolver(&config.policy.dns_servers) {
        Ok(resolver) => {
            let resolving = tessera_proxy::dns::keep_resolved(resolver, dns, registry.clone());
            tasks.spawn(resolving.map(Ok));
        }
        // Names in policy then match nothing (fail closed); say so.
        Err(e) => {
            tracing::warn!(error = %e, "no DNS resolver: policy dns: names will match nothing")
        }
    }
    if let Some(addr) = config.flows.api_addr() {
        // Bind now: a taken port stops start-up with the field named.
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("flows.api: cannot listen on {addr}"))?;
        let router = crate::api::router(store.clone());
        tasks.spawn(async move { axum::serve(listener, router).await });
    }
    tasks.spawn(store.clone().keep_flushed(Duration::from_secs(1)).map(Ok));
    {
        let registry = registry.clone();
        metrics.count_open_with(move || registry.live_count());
        let flows = flows.clone();
        metrics.count_dropped_flows_with(move || flows.dropped());
    }
    if let Some(file) = config.policy.file.clone() {
        let registry = registry.clone();
        let metrics = metrics.clone();
        tasks.spawn(async move {
            policy::watch(file, registry, metrics)
                .await
                .map_err(std::io::Error::other)
        });
    }

    tracing::info!(
        name = %config.name,
        workloads = config.workloads.len(),
        peers = config.peers.len(),
        policy_rules = registry.decisions().rule_count(),
        tunnel = %config.listen.tunnel,
        tokens = config.identity.tokens,
        mode = ?config.mode(),
        "enforcer ready"
    );
    if let Some(ready) = &opts.ready_file {
        std::fs::write(ready, std::process::id().to_string())
            .with_context(|| format!("cannot write {}", ready.display()))?;
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let result = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: stopping"); Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT: stopping"); Ok(()) }
        Some(res) = tasks.join_next() => match res {
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("a listener failed")),
            Ok(Ok(())) => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context("a listener task panicked")),
        },
    };
    tasks.abort_all();
    if handshake_mode && !opts.keep_attached {
        crate::handshake::remove_rules();
    }
    if let Err(e) = store.flush() {
        tracing::warn!(error = format!("{e:#}"), "cannot persist the flow map");
    }
    capture.shutdown(opts.keep_attached);
    result
}
