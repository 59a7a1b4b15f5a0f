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
//! Start-up is all or nothing. It first **prepares** everything that can fail: keys,
//! certificates (also peers'), the policy, the flow store (its lock) and log, listeners,
//! the system programs handshake mode runs, the eBPF programs with a new generation of
//! links attached beside the previous run's (the pinned settings and protected ports left
//! as they are), the NFQUEUE workers, and the new iptables rules in chains nothing jumps to
//! yet. Only then does it **commit**, in an order without a gap: in tunnel mode the
//! protected ports (steered to the new listeners) before the settings, then the previous
//! run's handshake rules, if any, go; in handshake mode the new rules in force before the
//! protected ports are emptied. A start that fails leaves the previous run's capture and
//! rules in force exactly as they were.
//!
//! Serving tasks are supervised ([`supervise`]): one that fails, panics or ends is logged
//! and restarted with backoff, listeners on the socket bound at start-up. One that cannot
//! be restarted stops the enforcer **with capture left attached** whatever
//! `--keep-attached` says: captured connections are then refused until an enforcer is back
//! (fail closed), never let through uncaptured.
use std::{
    collections::HashMap,
    future::Future,
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
    delivery::{Delivery, DeliverySource},
    dns::DnsTable,
    flow::{FlowLog, Mode},
    handshake::engine::{Engine, Setup},
    identity::{session::Tokens, token::KeyId},
    inbound::{Inbound, TlsGate},
    limits::Limit,
    local::{LocalAddrs, LocalServices, LocalWorkload},
    outbound::Outbound,
    peers::{Directory, Peer, PeerTable},
    pool::{TunnelDialer, TunnelPool},
    refusals::Refusals,
    registry::ConnectionRegistry,
    socket::listen,
    tls::{CertSlot, Credentials},
};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};
use tokio_rustls::TlsAcceptor;

use crate::{
    capture::Capture,
    config::{Config, DataPathMode, DeliveryMode},
    delivery::{DeliveryMap, Routing},
    flowstore::FlowStore,
    metrics::Metrics,
    policy,
    sources::dynamic::DynamicWorkloads,
    workloads::{BpfCaptureLookup, WorkloadIndex},
};

mod control;
mod supervise;
use supervise::{GaveUp, Supervisor, TaskFuture};

/// What the configuration says about this host, read once.
pub struct HostState {
    /// Enrolled workloads' identities, by name.
    pub identities: HashMap<String, Arc<LocalWorkload>>,
    /// Workloads by the port they serve.
    pub services: LocalServices,
    pub ports: Vec<u16>,
    /// Routes to peers; under a control plane also who may open tunnels, in which scope.
    pub peers: Arc<Directory>,
}

impl HostState {
    /// Under a control plane every workload's identity carries this enforcer's scope (from
    /// its certificate), as peers will stamp it; a workload declaring a scope label with
    /// another value is a configuration error.
    pub fn new(config: &Config) -> Result<Self> {
        let scope = control::own_scope(config)?;
        let identities = config
            .workloads
            .iter()
            .map(|w| {
                let mut local = policy::identity(config, w);
                local.identity = tessera_proxy::identity::scope::stamp(local.identity, &scope)
                    .map_err(|e| anyhow::anyhow!("workload {:?}: label {e}", w.name))?;
                Ok((w.name.clone(), Arc::new(local)))
            })
            .collect::<Result<HashMap<String, Arc<LocalWorkload>>>>()?;
        // The containers' ports are served by containers, never by their parent cgroup.
        let containers = config.containers.as_ref().map(|c| c.name.as_str());
        let served: Vec<(u16, Arc<LocalWorkload>)> = config
            .workloads
            .iter()
            .filter(|w| Some(w.name.as_str()) != containers)
            .flat_map(|w| w.ports.iter().map(|&p| (p, identities[&w.name].clone())))
            .collect();
        let peers = if config.control.is_some() {
            Arc::new(Directory::managed(control::members(&config.peers)))
        } else {
            Arc::new(Directory::fixed(
                PeerTable::new(config.peers.iter().flat_map(|p| {
                    let peer = Peer {
                        name: p.name.clone(),
                        tunnel: p.tunnel,
                    };
                    p.serves.iter().map(move |net| (*net, peer.clone()))
                })),
                config
                    .peers
                    .iter()
                    .flat_map(|p| {
                        p.workloads
                            .iter()
                            .map(|l| (tessera_policy::Labels::new(l.clone()), p.serves.clone()))
                    })
                    .collect(),
            ))
        };
        let containers_ports = config.containers.iter().flat_map(|c| c.ports.clone());
        Ok(Self {
            ports: served
                .iter()
                .map(|(p, _)| *p)
                .chain(containers_ports)
                .collect(),
            services: LocalServices::new(served),
            identities,
            peers,
        })
    }
}

/// An enforcer serving: its tasks, and what shutdown must put back.
pub struct Running {
    tasks: Supervisor,
    capture: Capture,
    /// Original-source delivery's routing, removed at shutdown.
    routing: Option<Routing>,
    store: Arc<FlowStore>,
    mode: DataPathMode,
    /// A serving task could not be restarted: capture stays attached at exit.
    fail_closed: bool,
    /// What the control plane's changes are applied to.
    live: Arc<control::Live>,
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
    // `[containers]`: their parent cgroup is enrolled like a workload (made if missing).
    let expanded = config.with_container_parent().map_err(anyhow::Error::msg)?;
    let config = &expanded;
    // The enforcer under an enrolled cgroup (a DaemonSet's pod under the kubelet's pod
    // root) is exempt from capture, before it makes any socket.
    let exempt = Arc::new(crate::nontcp::Exempt::default());
    if let Some(own) = own_cgroup_under_enrolled(config)? {
        let pin = config
            .pin_dir()
            .join("maps")
            .join(tessera_common::names::NONTCP_WORKLOADS);
        crate::nontcp::exempt_in_pinned(&pin, crate::nontcp::cgroup_id(&own)?)?;
        tracing::info!(cgroup = %own.display(), "the enforcer runs under an enrolled cgroup: exempt from capture");
        exempt.insert("enforcer", own);
    }
    let identity = Credentials::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    // What TLS presents, replaceable when the control plane renews the certificate.
    let cert = CertSlot::new(&identity)?;
    let mut host = HostState::new(config)?;
    let core = core(config, &identity)?;
    let mut tasks = Supervisor::default();
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
    if config.mode() == DataPathMode::Handshake {
        // iptables, ip6tables and ss by absolute path, found now (never through $PATH).
        let tools = crate::handshake::tools()?;
        tracing::debug!(?tools, "system programs");
    }
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
    // Capture's new generation, attached beside the previous run's with the pinned maps
    // (settings, protected ports) left as they are: nothing in force changes yet.
    let mut capture = Capture::prepare(config)?;
    // Its maps are pinned now: the exemptions go in before anything is attached.
    for id in exempt.ids() {
        let pin = config
            .pin_dir()
            .join("maps")
            .join(tessera_common::names::NONTCP_WORKLOADS);
        crate::nontcp::exempt_in_pinned(&pin, id)?;
    }
    let client_map = capture.take_client_map()?;
    let containers = containers(config)?;
    if let Some(c) = &containers {
        c.registry.serve_exemptions(exempt.clone());
    }
    if let Some(c) = &containers {
        host.services = host.services.clone().with_dynamic(c.registry.clone());
    }
    let lookup = capture_lookup(config, &host, client_map, &containers)?;
    let mut live = control::Live {
        registry: core.registry.clone(),
        metrics: core.metrics.clone(),
        directory: host.peers.clone(),
        tokens: core.tokens.clone(),
        pool: None,
        cert: cert.clone(),
        peer_keys: Arc::new(std::sync::RwLock::new(peer_keys)),
        flows: core.store.clone(),
        fast: None,
    };
    let mut routing = None;
    // Commit: the new run goes in force in an order without a gap, and nothing after it
    // can fail in a way that needs undoing.
    match tunnel_listeners {
        Some(listeners) => {
            let gate = Arc::new(DeliveryMap::new(capture.take_delivery_map()?));
            let source = match config.bpf.delivery {
                DeliveryMode::OriginalSource => {
                    routing = Some(Routing::install(&config.bpf)?);
                    DeliverySource::OriginalSource
                }
                DeliveryMode::Localhost => DeliverySource::Localhost(config.bpf.delivery_source),
            };
            let mut delivery = Delivery {
                namespaces: None,
                source,
                mark: config.bpf.delivery_mark,
                gate,
            };
            let pool = pool(config, &identity, &cert, &core, &host)?;
            live.pool = Some(pool.clone());
            let outbound = Arc::new(Outbound {
                namespaces: std::sync::OnceLock::new(),
                admission: core.admission(config, Mode::Tunnel),
                lookup: lookup.clone(),
                peers: host.peers.clone(),
                pool,
                tokens: core.tokens.clone(),
                mark: config.bpf.proxy_mark,
            });
            if let Some(c) = &containers {
                // Containers with a network of their own are served in it.
                let adopted = crate::netns::Adopted::new(
                    config.listen.outbound_port,
                    config.bpf.proxy_mark,
                    capture.take_adopted()?,
                    config.pin_dir().join("adopted"),
                    outbound.clone(),
                    tokio::runtime::Handle::current(),
                )?;
                c.registry.serve_networks(adopted.clone());
                let _ = outbound.namespaces.set(adopted.clone());
                if let Some(socket) = &c.hook {
                    serve_hook(&mut tasks, socket, c, adopted.clone())?;
                }
                delivery.namespaces = Some(adopted);
            }
            let inbound = inbound(config, &identity, &cert, &core, &host, delivery)?;
            let previous = capture.previous_mode();
            // Protected ports (sk_lookup to our inbound listeners) in before anything goes.
            capture.commit(config, Some((&listeners.in_v4, listeners.in_v6.as_ref())))?;
            if previous == Some(DataPathMode::Handshake) {
                // The ports are guarded by sk_lookup now: the previous run's rules go.
                crate::handshake::remove_rules();
            }
            lookup.forget_stale();
            listeners.serve(&mut tasks, outbound, inbound)?;
        }
        None => {
            let setup =
                handshake_setup(config, &core, &host, lookup.clone(), live.peer_keys.clone());
            let fast =
                crate::handshake::fast::FastPath::start(capture.ebpf_mut(), &config.handshake)?
                    .map(Arc::new);
            if let Some(fast) = &fast {
                // The peers' standings its keys will rely on; the control plane's changes
                // to them revoke only the keys they concern (`control::Live::peers`).
                fast.directory_changed(&host.peers, &live.peer_keys);
                live.fast = Some(fast.clone());
            }
            // Workers first (binding the queues can fail): once the rules are in, queued
            // packets need a reader.
            crate::handshake::start(
                config,
                host.peers.clone(),
                Arc::new(Engine::new(setup)),
                core.registry.clone(),
                capture.take_closed_ring()?,
                core.metrics.clone(),
                fast,
            )?;
            let rules = crate::handshake::prepare_rules(&config.handshake, &host.ports)?;
            // The rules in force first; only then may sk_lookup stop guarding the ports.
            rules.commit()?;
            capture.commit(config, None)?;
            lookup.forget_stale();
        }
    }
    serve_common(config, &core, api, &mut tasks)?;
    serve_containers(containers, &mut tasks);
    serve_nontcp(config, &core, &host, &mut capture, &mut tasks, exempt)?;
    // Starting's peak (the eBPF programs loaded against the kernel's BTF) is over.
    if let Err(e) = crate::alloc::return_unused() {
        tracing::debug!(error = %e, "returning the start's unused memory failed");
    }
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
        routing,
        store: core.store,
        mode: config.mode(),
        fail_closed: false,
        live: Arc::new(live),
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
    store.set_baseline(config.flows.baseline_secs.saturating_mul(1000));
    // Unauthenticated refusals are aggregated per source prefix and interval: a flood
    // costs a bounded number of records (tessera_proxy::refusals).
    let refusals = Arc::new(Refusals::new(metrics.drops.clone()));
    let flows = FlowLog::start_with(
        config.flows.log.clone(),
        Some(store.clone()),
        Some(refusals),
    )
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
    .map(|t| t.with_signed_tunnel_tokens(id.signed_tunnel_tokens))
    .map_err(|e| anyhow::anyhow!("tls.key: {}: {e}", config.tls.key.display()))
}

/// The certified keys of the peers whose certificates the configuration names.
fn peer_keys(config: &Config, tokens: &Tokens) -> Result<HashMap<String, KeyId>> {
    let mut keys = HashMap::new();
    for (i, p) in config.peers.iter().enumerate() {
        let Some(path) = &p.cert else { continue };
        let at = || format!("peer[{i}] {:?}: cert: {}", p.name, path.display());
        let certs = tessera_proxy::tls::certs(path).with_context(at)?;
        // (loading checked it already; the file is read again here)
        crate::config::check_peer_cert_name(
            &format!("peer[{i}] {:?}", p.name),
            &p.name,
            path,
            &certs[0],
        )
        .map_err(anyhow::Error::msg)?;
        let key = tokens
            .trust_peer(certs[0].as_ref())
            .map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        keys.insert(p.name.clone(), key);
    }
    Ok(keys)
}

/// The enforcer's own cgroup if it is below an enrolled one (it is then exempt from
/// capture); an enrolled cgroup of its own is refused: the enforcer's sockets would be its
/// workload's.
fn own_cgroup_under_enrolled(config: &Config) -> Result<Option<std::path::PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("/proc/self/cgroup")?;
    let Some(rel) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Ok(None);
    };
    let rel = rel.trim().trim_start_matches('/');
    for mount in crate::attest::cgroup2_mounts() {
        let own = mount.join(rel);
        for w in &config.workloads {
            if own == w.cgroup {
                anyhow::bail!(
                    "workload {}: cgroup {} is the enforcer's own: run the enforcer outside \
                     its workloads' cgroups",
                    w.name,
                    w.cgroup.display()
                );
            }
            if own.starts_with(&w.cgroup) {
                return Ok(Some(own));
            }
        }
    }
    Ok(None)
}

/// `[containers]`: the registry of the containers' identities, its questions, the runtime.
struct Containers {
    registry: Arc<DynamicWorkloads>,
    questions: tokio::sync::mpsc::Receiver<std::path::PathBuf>,
    runtime: Source,
    wait: Duration,
    /// The cgroup v2 mount the parent is in.
    mount: std::path::PathBuf,
    /// `hook_socket`.
    hook: Option<std::path::PathBuf>,
}

/// Answers the runtime's hook (`tessera oci-hook`) on `socket`, bound now (a path that
/// cannot be bound stops the start-up, naming it).
fn serve_hook(
    tasks: &mut Supervisor,
    socket: &std::path::Path,
    c: &Containers,
    networks: Arc<crate::netns::Adopted>,
) -> Result<()> {
    let listener = crate::sources::hook::bind(socket)?;
    tracing::info!(socket = %socket.display(), "serving the container runtime's hook");
    let (parent, mount) = (c.registry.root().to_owned(), c.mount.clone());
    tasks.spawn("container hook", move || {
        let listener = listener.try_clone()?;
        let (parent, mount, networks) = (parent.clone(), mount.clone(), networks.clone());
        Ok(Box::pin(crate::sources::hook::serve(
            listener, parent, mount, networks,
        )) as TaskFuture)
    });
    Ok(())
}

/// Whom `[containers]` follows.
enum Source {
    Podman(crate::sources::podman::Runtime),
    /// This node's pods (`node`), from the API server.
    #[cfg(feature = "kube")]
    Kubernetes {
        settings: crate::sources::kube::KubeSettings,
        node: String,
    },
}

fn containers(config: &Config) -> Result<Option<Containers>> {
    let Some(c) = &config.containers else {
        return Ok(None);
    };
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let kubernetes = c.runtime == crate::config::ContainerRuntime::Kubernetes;
    let base = crate::sources::dynamic::Base {
        layout: if kubernetes {
            crate::sources::dynamic::Layout::Pods
        } else {
            crate::sources::dynamic::Layout::Containers
        },
        trust_domain: config.identity.trust_domain.clone(),
        enforcer: config.name.clone(),
        host,
        scope: control::own_scope(config)?,
        select: c.select.clone(),
        observe: c.observe,
        ports: c.ports.clone(),
        taken_names: config.workloads.iter().map(|w| w.name.clone()).collect(),
    };
    let (registry, questions) = DynamicWorkloads::new(c.cgroup.clone(), base);
    let mount = crate::attest::cgroup2_mounts()
        .into_iter()
        .filter(|m| c.cgroup.starts_with(m))
        .max_by_key(|m| m.as_os_str().len())
        .with_context(|| {
            format!(
                "containers: cgroup: {} is in no cgroup v2 mount",
                c.cgroup.display()
            )
        })?;
    let runtime = if kubernetes {
        #[cfg(feature = "kube")]
        {
            let settings = c.kube_settings();
            let node = settings
                .node_name()
                .map_err(|e| anyhow::anyhow!("containers: {e}"))?;
            Source::Kubernetes { settings, node }
        }
        #[cfg(not(feature = "kube"))]
        anyhow::bail!("containers: runtime: this build has no Kubernetes support");
    } else {
        Source::Podman(crate::sources::podman::Runtime::new(
            c.socket.clone(),
            mount.clone(),
        ))
    };
    Ok(Some(Containers {
        registry,
        questions,
        runtime,
        wait: Duration::from_millis(c.wait_ms),
        mount,
        hook: c.hook_socket.clone(),
    }))
}

/// Follows the container runtime (restarted like any task if it ends).
fn serve_containers(containers: Option<Containers>, tasks: &mut Supervisor) {
    let Some(c) = containers else { return };
    let questions = Arc::new(tokio::sync::Mutex::new(c.questions));
    let registry = c.registry;
    match c.runtime {
        Source::Podman(runtime) => tasks.spawn("container runtime", move || {
            let (registry, runtime, questions) =
                (registry.clone(), runtime.clone(), questions.clone());
            let following = async move {
                let mut questions = questions.lock().await;
                crate::sources::podman::follow(runtime, registry, &mut questions).await;
                Ok(())
            };
            Ok(Box::pin(following) as TaskFuture)
        }),
        #[cfg(feature = "kube")]
        Source::Kubernetes { settings, node } => tasks.spawn("kubernetes pods", move || {
            let (registry, questions) = (registry.clone(), questions.clone());
            let (settings, node) = (settings.clone(), node.clone());
            let following = async move {
                let mut questions = questions.lock().await;
                crate::sources::kube::follow(settings, node, registry, &mut questions)
                    .await
                    .map_err(|e| std::io::Error::other(format!("{e:#}")))
            };
            Ok(Box::pin(following) as TaskFuture)
        }),
    }
}

/// The capture records the connect hooks leave, with the workloads they belong to.
fn capture_lookup(
    config: &Config,
    host: &HostState,
    map: aya::maps::HashMap<aya::maps::MapData, tessera_common::ClientKey, tessera_common::OrigDst>,
    containers: &Option<Containers>,
) -> Result<Arc<BpfCaptureLookup>> {
    let host_netns = crate::capture::own_netns_cookie()?;
    let roots = config
        .workloads
        .iter()
        .map(|w| (w.name.clone(), w.cgroup.clone()))
        .collect();
    Ok(Arc::new(BpfCaptureLookup {
        map: Mutex::new(map),
        workloads: WorkloadIndex::new(roots),
        identities: host.identities.clone(),
        attestor: Arc::default(),
        containers: containers.as_ref().map(|c| (c.registry.clone(), c.wait)),
        host_netns,
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
            out_v6: listen_v6(loopback6(out_port), mark, "listen.outbound_port")?,
            in_v4: listen(loopback4(in_port), mark).with_context(|| {
                format!("listen.inbound_port: cannot listen on 127.0.0.1:{in_port}")
            })?,
            in_v6: listen_v6(loopback6(in_port), mark, "listen.inbound_port")?,
            tunnel: listen(tunnel, mark)
                .with_context(|| format!("listen.tunnel: cannot listen on {tunnel}"))?,
        })
    }

    fn serve(
        self,
        tasks: &mut Supervisor,
        outbound: Arc<Outbound>,
        inbound: Arc<Inbound>,
    ) -> Result<()> {
        for l in [Some(self.out_v4), self.out_v6].into_iter().flatten() {
            let outbound = outbound.clone();
            serve_listener(tasks, "outbound", l, move |l| outbound.clone().serve(l))?;
        }
        for l in [Some(self.in_v4), self.in_v6].into_iter().flatten() {
            let inbound = inbound.clone();
            serve_listener(tasks, "inbound", l, move |l| {
                inbound.clone().serve_direct(l)
            })?;
        }
        serve_listener(tasks, "tunnel", self.tunnel, move |l| {
            inbound.clone().serve_tunnels(l)
        })
    }
}

/// A loopback IPv6 listener capture uses. Failing to bind it is fatal (whoever holds the
/// port would otherwise be next to our traffic); only a host without IPv6 (no ::1) goes
/// on without it, and then the connect hooks, finding no proxy listener, refuse IPv6
/// connects (fail closed).
fn listen_v6(addr: SocketAddr, mark: u32, field: &str) -> Result<Option<TcpListener>> {
    match listen(addr, mark) {
        Ok(l) => Ok(Some(l)),
        Err(e)
            if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                || e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            tracing::warn!(%addr, error = %e, "no IPv6 loopback: IPv6 connects of workloads are refused");
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("{field}: cannot listen on {addr}")),
    }
}

/// Serves `listener` with `serve`, supervised: each run of the task gets a duplicate of the
/// socket, which the supervisor keeps open, bound (and registered for capture) while none
/// serves it.
fn serve_listener<F>(
    tasks: &mut Supervisor,
    what: &str,
    listener: TcpListener,
    serve: impl Fn(TcpListener) -> F + Send + Sync + 'static,
) -> Result<()>
where
    F: Future<Output = io::Result<()>> + Send + 'static,
{
    let addr = listener.local_addr()?;
    let kept = listener.into_std()?;
    tasks.spawn(format!("{what} listener {addr}"), move || {
        let dup = kept.try_clone()?;
        dup.set_nonblocking(true)?;
        Ok(Box::pin(serve(TcpListener::from_std(dup)?)) as TaskFuture)
    });
    Ok(())
}

/// Warm tunnels to every peer.
fn pool(
    config: &Config,
    identity: &Credentials,
    cert: &Arc<CertSlot>,
    core: &Core,
    host: &HostState,
) -> Result<Arc<TunnelPool>> {
    let dialer = TunnelDialer::new(
        identity.client_config_with(cert.clone())?,
        core.tokens.clone(),
        config.bpf.proxy_mark,
        Duration::from_secs(5),
    );
    let pool = TunnelPool::new(
        dialer,
        config.tunnel.pool_size,
        Duration::from_secs(config.tunnel.pool_max_idle_secs),
    );
    pool.warm(host.peers.table().peers());
    Ok(pool)
}

fn inbound(
    config: &Config,
    identity: &Credentials,
    cert: &Arc<CertSlot>,
    core: &Core,
    host: &HostState,
    delivery: Delivery,
) -> Result<Arc<Inbound>> {
    Ok(Arc::new(Inbound {
        admission: core.admission(config, Mode::Tunnel),
        tokens: core.tokens.clone(),
        acceptor: TlsAcceptor::from(identity.server_config_with(cert.clone())?),
        services: host.services.clone(),
        addrs: LocalAddrs::default(),
        delivery,
        peers: host.peers.clone(),
        idle_timeout: Duration::from_secs(config.tunnel.idle_timeout_secs),
        gate: TlsGate::new(core.metrics.drops.clone()),
    }))
}

fn handshake_setup(
    config: &Config,
    core: &Core,
    host: &HostState,
    lookup: Arc<dyn CaptureLookup>,
    peer_keys: Arc<std::sync::RwLock<HashMap<String, KeyId>>>,
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
        drops: core.metrics.drops.clone(),
    }
}

/// What both modes run: DNS for policy names, the API, the flow map's persistence, policy
/// reloads, and the metrics read at scrape time.
fn serve_common(
    config: &Config,
    core: &Core,
    api: Option<(TcpListener, axum::Router)>,
    tasks: &mut Supervisor,
) -> Result<()> {
    match tessera_proxy::dns::resolver(&config.policy.dns_servers) {
        Ok(resolver) => {
            let (dns, registry) = (core.dns.clone(), core.registry.clone());
            tasks.spawn("policy DNS names", move || {
                let resolving = tessera_proxy::dns::keep_resolved(
                    resolver.clone(),
                    dns.clone(),
                    registry.clone(),
                );
                Ok(Box::pin(resolving.map(Ok)) as TaskFuture)
            });
        }
        // Names in policy then match nothing (fail closed); say so.
        Err(e) => {
            tracing::warn!(error = %e, "no DNS resolver: policy dns: names will match nothing")
        }
    }
    if let Some((listener, router)) = api {
        serve_listener(tasks, "API", listener, move |l| {
            let router = router.clone();
            async move { axum::serve(l, router).await }
        })?;
    }
    let store = core.store.clone();
    tasks.spawn("flow map persistence", move || {
        let flushing = store.clone().keep_flushed(Duration::from_secs(1));
        Ok(Box::pin(flushing.map(Ok)) as TaskFuture)
    });
    let registry = core.registry.clone();
    core.metrics.count_open_with(move || registry.live_count());
    let flows = core.flows.clone();
    core.metrics
        .count_dropped_flows_with(move || flows.dropped());
    let registry = core.registry.clone();
    core.metrics
        .count_limit_with(Limit::Interner, move || registry.decisions().uninterned());
    let tokens = core.tokens.clone();
    core.metrics
        .count_limit_with(Limit::WarmIdentities, move || tokens.evicted_identities());
    // (Under a control plane the policy arrives from it, not by watching the file.)
    if let Some(file) = config
        .policy
        .file
        .clone()
        .filter(|_| config.control.is_none())
    {
        let (registry, metrics) = (core.registry.clone(), core.metrics.clone());
        tasks.spawn("policy reloads", move || {
            let watching = policy::watch(file.clone(), registry.clone(), metrics.clone());
            Ok(Box::pin(watching.map(|r| r.map_err(io::Error::other))) as TaskFuture)
        });
    }
    Ok(())
}

/// Non-TCP policy (issue 12 item 6): keeps the eBPF allow map in step with the policy and
/// drains the programs' counts into flow records.
fn serve_nontcp(
    config: &Config,
    core: &Core,
    host: &HostState,
    capture: &mut Capture,
    tasks: &mut Supervisor,
    exempt: Arc<crate::nontcp::Exempt>,
) -> Result<()> {
    let mut workloads = Vec::new();
    for w in &config.workloads {
        workloads.push(crate::nontcp::Enrolled {
            name: w.name.clone(),
            cgroup_id: crate::nontcp::cgroup_id(&w.cgroup)
                .with_context(|| format!("workload {}", w.name))?,
            labels: host.identities[&w.name].identity.labels.clone(),
            observe: w.observe,
            ports: w.ports.clone(),
        });
    }
    let (allow, flags, counts) = capture.take_nontcp_maps()?;
    let mode = match config.mode() {
        DataPathMode::Tunnel => Mode::Tunnel,
        DataPathMode::Handshake => Mode::Handshake,
    };
    let nontcp =
        crate::nontcp::NonTcp::new(allow, flags, counts, &workloads, config.name.clone(), mode);
    // One owner of the maps: the task keeps them for its life (it never ends by itself).
    let state = Arc::new(Mutex::new(Some(nontcp)));
    let (registry, dns, flows) = (core.registry.clone(), core.dns.clone(), core.flows.clone());
    let directory = host.peers.clone();
    let (resolvers, policy_mode) = (config.policy.dns_servers.clone(), config.policy.mode);
    tasks.spawn("non-TCP policy", move || {
        let nontcp = state
            .lock()
            .expect("lock")
            .take()
            .ok_or_else(|| io::Error::other("the non-TCP maps went with a previous run"))?;
        Ok(Box::pin(
            crate::nontcp::keep_in_force(
                nontcp,
                registry.clone(),
                dns.clone(),
                directory.clone(),
                workloads.clone(),
                resolvers.clone(),
                policy_mode,
                flows.clone(),
                exempt.clone(),
            )
            .map(Ok),
        ) as TaskFuture)
    });
    Ok(())
}

/// Why serving stopped.
#[derive(Debug)]
enum Stop {
    /// SIGTERM or SIGINT.
    Signal(&'static str),
    /// A serving task could not be restarted.
    GaveUp(GaveUp),
}

impl Stop {
    /// Whether capture stays attached at exit: if asked to (`--keep-attached`), and always
    /// after a task could not be restarted (fail closed: better refused than uncaptured).
    fn keeps_capture(&self, keep_attached: bool) -> bool {
        keep_attached || matches!(self, Stop::GaveUp(_))
    }
}

/// Serves (restarting tasks that end) until `signalled` or until a task cannot be
/// restarted.
async fn serve_until(
    tasks: &mut Supervisor,
    signalled: impl Future<Output = &'static str>,
) -> Stop {
    tokio::select! {
        s = signalled => Stop::Signal(s),
        gave_up = tasks.run() => Stop::GaveUp(gave_up),
    }
}

impl Running {
    /// Follows the control plane: its directory, policy and renewals reach the data path.
    pub fn follow_control(&self, agent: crate::control::Agent) {
        let live = self.live.clone();
        tokio::spawn(agent.run(live));
    }

    /// Serves until SIGTERM or SIGINT (Ok), restarting serving tasks that fail, panic or
    /// end; a task that cannot be restarted is the error (and capture then stays attached
    /// at [`Running::shutdown`]).
    pub async fn wait(&mut self) -> Result<()> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let signalled = async {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        };
        let stop = serve_until(&mut self.tasks, signalled).await;
        self.fail_closed = stop.keeps_capture(false);
        match stop {
            Stop::Signal(s) => {
                tracing::info!("{s}: stopping");
                Ok(())
            }
            Stop::GaveUp(gave_up) => {
                tracing::error!(
                    error = %gave_up,
                    "a serving task cannot be restarted: the enforcer exits and leaves capture \
                     attached (fail closed: captured connections are refused until an enforcer is back)"
                );
                Err(anyhow::Error::new(gave_up)
                    .context("a serving task cannot be restarted (capture left attached)"))
            }
        }
    }

    /// Stops every task, persists the flow map, and detaches capture unless
    /// `keep_attached` or a serving task could not be restarted (then captured connections
    /// fail closed until an enforcer starts).
    pub fn shutdown(mut self, keep_attached: bool) {
        if self.fail_closed && !keep_attached {
            tracing::warn!(
                "capture stays attached (as with --keep-attached): a serving task could not be restarted"
            );
        }
        let keep_attached = keep_attached || self.fail_closed;
        self.tasks.abort_all();
        if self.mode == DataPathMode::Handshake && !keep_attached {
            crate::handshake::remove_rules();
        }
        // No proxy delivers any more: its routing goes, whatever stays attached.
        if let Some(routing) = self.routing.take() {
            routing.remove();
        }
        if let Err(e) = self.store.flush() {
            tracing::warn!(error = format!("{e:#}"), "cannot persist the flow map");
        }
        if self.mode == DataPathMode::Handshake {
            // Capture may stay attached (pinned connect hooks keep this run's maps alive)
            // while our tc verifiers go with us: no socket may take the fast path then.
            crate::handshake::fast::FastPath::disable(self.capture.ebpf_mut());
        }
        self.capture.shutdown(keep_attached);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::{supervise::tests::*, *};

    #[tokio::test]
    async fn a_failing_task_is_restarted_and_a_signal_detaches_capture_unless_asked() {
        let starts = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Supervisor::new(quick());
        tasks.spawn("listener", failing_then_serving(2, starts.clone()));
        let signalled = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            "SIGTERM"
        };
        let stop = serve_until(&mut tasks, signalled).await;
        assert!(matches!(stop, Stop::Signal("SIGTERM")), "{stop:?}");
        assert_eq!(starts.lock().unwrap().len(), 3, "restarted twice");
        assert!(!stop.keeps_capture(false));
        assert!(stop.keeps_capture(true));
    }

    #[tokio::test]
    async fn a_task_that_cannot_be_restarted_stops_the_enforcer_with_capture_kept() {
        let starts = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Supervisor::new(quick());
        // Never serves: fails, panics, fails, ... until given up.
        tasks.spawn(
            "inbound listener [::1]:15006",
            failing_then_serving(u32::MAX, starts.clone()),
        );
        let stop = serve_until(&mut tasks, std::future::pending()).await;
        let Stop::GaveUp(gave_up) = &stop else {
            panic!("{stop:?}")
        };
        assert_eq!(gave_up.task, "inbound listener [::1]:15006");
        assert!(
            gave_up.last.starts_with("panicked: serving task 4 panics"),
            "{gave_up}"
        );
        // Without --keep-attached too: fail closed.
        assert!(stop.keeps_capture(false));
    }
}
