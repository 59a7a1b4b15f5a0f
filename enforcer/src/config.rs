//! The enforcer's configuration file (TOML). See the README for an example.
//!
//! Loading validates everything that can be checked before start-up, and every error names
//! the file and the field: `host-a.toml: workload[1] "api": cgroup: ... does not exist`.
use std::{
    collections::{BTreeMap, HashSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This enforcer's name; its certificate must carry it as a DNS name.
    pub name: String,
    /// Which data path carries this host's workloads' connections (absent: tunnel; see
    /// [`Config::mode`]). It used to be `[handshake] mode`, which is still read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<DataPathMode>,
    #[serde(default)]
    pub listen: Listen,
    /// Certificate, key and CA (static configuration); under `[control]` the control plane
    /// issues them and this section must be left out.
    #[serde(default, skip_serializing_if = "Tls::is_unset")]
    pub tls: Tls,
    /// The control plane this enforcer enrols with and follows (instead of `[tls]`,
    /// `[[peer]]` and `policy.file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<crate::control::ControlConfig>,
    #[serde(default)]
    pub bpf: Bpf,
    #[serde(default, rename = "workload", skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<Workload>,
    /// Containers a runtime starts, enrolled as they start (see [`Containers`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containers: Option<Containers>,
    #[serde(default, rename = "peer", skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub tunnel: Tunnel,
    #[serde(default)]
    pub flows: Flows,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub handshake: HandshakeConfig,
}

/// `enforce` or `observe`: the data plane's own enum.
pub use tessera_proxy::authz::PolicyMode;
/// Which data path carries this host's workloads' connections (`tunnel` by default, or
/// `handshake`): the data plane's own enum, as flow records name it.
pub use tessera_proxy::flow::Mode as DataPathMode;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandshakeConfig {
    /// The data path mode's old place, read for old files (with a warning); loading moves
    /// it to the top-level [`Config::mode`], so a loaded config never has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<DataPathMode>,
    /// First of the three NFQUEUE numbers used (egress, ingress, then the peers' lane of
    /// ingress: packets from the directory's peer addresses).
    pub queue: u16,
    /// `SO_MARK` the connect hooks give enrolled workloads' sockets (queued handshakes).
    pub socket_mark: u32,
    /// Bit marking a proven connection (packet mark, saved in the connmark).
    pub proven_bit: u32,
    /// Connmark bit set once a connection's first ACK was queued (no further queueing).
    pub acked_bit: u32,
    /// If the enforcer is not there to verify, let SYNs to workload ports through
    /// unauthenticated. Default false: fail closed.
    pub fail_open: bool,
    /// How long one ephemeral X25519 key serves handshakes (ms); 0: a new key for every
    /// connection. Within the window the key exchange with a peer's key is done once.
    pub key_reuse_ms: u64,
    /// Benchmark baseline only: queue as usual but let every handshake through unverified,
    /// to measure what the queues themselves cost (`cargo xtask bench`). Never in production.
    pub pass_through: bool,
    /// The in-kernel fast path (docs/handshake.md, "Fast path"): how long the pair secret a
    /// full handshake agrees proves the same workloads' later connections in the kernel
    /// (seconds); 0 turns the fast path off (every connection takes the full handshake).
    pub fast_path_secs: u64,
    /// `SO_MARK` of client sockets on the fast path: a mark of its own, which no queueing
    /// rule matches (distinct from every other socket and delivery mark).
    pub fast_socket_mark: u32,
    /// Packet / connmark bit of a connection whose SYN (server) or SYN-ACK (client) the tc
    /// verifier proved (a single bit, distinct from every other bit and mark).
    pub fast_bit: u32,
    /// Connmark bit of a client connection whose SYN left on the fast path: its SYN-ACK is
    /// dropped unless the tc verifier proved it (fail closed whatever tc saw).
    pub fast_client_bit: u32,
}

impl HandshakeConfig {
    /// `SO_MARK` of client sockets on the fast path ([`Self::fast_socket_mark`]).
    pub fn fast_socket_mark(&self) -> u32 {
        self.fast_socket_mark
    }

    /// Packet / connmark bit of a kernel-verified fast connection ([`Self::fast_bit`]).
    pub fn fast_bit(&self) -> u32 {
        self.fast_bit
    }
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        Self {
            mode: None,
            queue: 7700,
            socket_mark: 0x7e55_0002,
            proven_bit: 0x0000_0100,
            acked_bit: 0x0000_0200,
            fail_open: false,
            key_reuse_ms: 1_000,
            pass_through: false,
            fast_path_secs: 300,
            fast_socket_mark: 0x7e55_0004,
            fast_bit: 0x0000_0400,
            fast_client_bit: 0x0000_0800,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// The SPIFFE trust domain: identities are `spiffe://<trust_domain>/enforcer/<name>/workload/<w>`.
    pub trust_domain: String,
    /// How long a token is valid after it is issued (milliseconds).
    pub token_lifetime_ms: u32,
    /// How far peers' clocks may differ (milliseconds).
    pub clock_skew_ms: u64,
    /// Sign identity tokens (default). `false` sends identities unsigned: only for measuring
    /// the tokens' cost (`cargo xtask bench`); an enforcer with tokens on refuses such peers.
    pub tokens: bool,
    /// Sign tunnel tokens with this enforcer's Ed25519 key (version 1, a proof a third party
    /// can check) instead of sealing them with the TLS session's key (version 3, the
    /// default: the session already proves which enforcer speaks). Peers accept either.
    pub signed_tunnel_tokens: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            trust_domain: "tessera.local".into(),
            token_lifetime_ms: 10_000,
            clock_skew_ms: 5_000,
            tokens: true,
            signed_tunnel_tokens: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The policy file (YAML). Without one, any enrolled workload may reach any other through
    /// tunnels, and peers without an identity are refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// `enforce` (default): denials refuse. `observe`: denials are only recorded.
    pub mode: PolicyMode,
    /// DNS servers for the policy's `dns:` names (default: the system's, /etc/resolv.conf).
    pub dns_servers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Outbound listener port on 127.0.0.1 and [::1]: captured connects land here.
    pub outbound_port: u16,
    /// Listener port (loopback) that `sk_lookup` steers direct connections to.
    pub inbound_port: u16,
    /// Where peer enforcers reach our tunnel listener.
    pub tunnel: SocketAddr,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            tunnel: "0.0.0.0:15008".parse().expect("valid"),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    /// Not given (under `[control]`).
    pub fn is_unset(&self) -> bool {
        *self == Tls::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bpf {
    /// Where programs, links and maps are pinned (default `/sys/fs/bpf/tessera/<name>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin_dir: Option<PathBuf>,
    /// The network namespace whose inbound connections `sk_lookup` guards.
    pub netns: PathBuf,
    /// `SO_MARK` on the proxy's own sockets, so they are never captured.
    pub proxy_mark: u32,
    /// Where tunnel mode's deliveries to local workloads come from: the peer's own
    /// address (`original-source`, the default: applications see the real peer) or
    /// `delivery_source` / ::1 (`localhost`: every peer looks like a local client).
    pub delivery: DeliveryMode,
    /// Source address for `localhost` deliveries (must be in 127.0.0.0/8).
    pub delivery_source: Ipv4Addr,
    /// `original-source`: `SO_MARK` of delivery sockets; the replies of their connections
    /// get it too (connmark) and are routed back to this host by `delivery_table`.
    pub delivery_mark: u32,
    /// `original-source`: the routing table (and `ip rule` priority) that sends packets
    /// with `delivery_mark` to this host (`local default dev lo`).
    pub delivery_table: u32,
}

/// `[bpf] delivery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    #[default]
    OriginalSource,
    Localhost,
}

impl Default for Bpf {
    fn default() -> Self {
        Self {
            pin_dir: None,
            netns: "/proc/self/ns/net".into(),
            proxy_mark: 0x7e55_0001,
            delivery: DeliveryMode::OriginalSource,
            delivery_source: Ipv4Addr::new(127, 0, 0, 77),
            delivery_mark: 0x7e55_0003,
            delivery_table: 7755,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    /// The workload's cgroup v2 directory; its processes (and its sub-cgroups') are captured.
    pub cgroup: PathBuf,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// TCP ports this workload serves: reachable only through Tessera tunnels.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Record this workload's policy denials without enforcing them.
    #[serde(default)]
    pub observe: bool,
}

/// `[containers]`: a container runtime's containers, enrolled as the runtime starts them
/// (`enforcer/src/sources/`).
///
/// The rule that selects them is where the runtime puts them: every container whose cgroup
/// is under `cgroup` (`podman run --cgroup-parent`, or `cgroup_parent` in containers.conf
/// for all of them). Capture is attached to that parent before any container starts, so a
/// container is under Tessera from its first instruction; its identity comes from the
/// runtime's API. `select` narrows it further: a container under the parent without those
/// labels is refused every connection, as any cgroup under an enrolled one is that no
/// identity can be found for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Containers {
    /// Whose containers: `podman` (its API socket) or `kubernetes` (this node's pods, from
    /// the API server; `cgroup` is then the kubelet's pod cgroup root).
    #[serde(default, skip_serializing_if = "ContainerRuntime::is_podman")]
    pub runtime: ContainerRuntime,
    /// `runtime = "kubernetes"`: the pod source's settings (`[containers.kubernetes]`: node,
    /// cgroup_driver, label_selector, max_pods).
    #[cfg(feature = "kube")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<crate::sources::kube::KubeSettings>,
    /// The runtime's Docker-compatible API socket (podman: `podman system service`).
    #[serde(default = "default_container_socket")]
    pub socket: PathBuf,
    /// Where the enforcer answers `tessera oci-hook` (the runtime's `prestart` hook), so
    /// that a container with a network of its own is served before it runs (tunnel mode,
    /// podman; see docs/containers.md). None: no hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_socket: Option<PathBuf>,
    /// The parent cgroup v2 directory of the containers to enrol (created at start-up if
    /// its own parent exists).
    pub cgroup: PathBuf,
    /// The name flow records give connections of processes in the parent itself (none
    /// normally) and the UDP/ICMP policy the containers share.
    #[serde(default = "default_containers_name")]
    pub name: String,
    /// Labels a container must have been started with to be given an identity.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub select: BTreeMap<String, String>,
    /// Record the containers' policy denials without enforcing them.
    #[serde(default)]
    pub observe: bool,
    /// How long a container's first connection waits for the runtime to say who it is
    /// before it is refused.
    #[serde(default = "default_container_wait_ms")]
    pub wait_ms: u64,
    /// TCP ports containers may serve: protected from start-up (reachable only through
    /// Tessera, before any container listens); a connection to one is delivered to the
    /// enrolled container whose runtime says it exposes the port (`--expose`) or that was
    /// started with the label `tessera.ports` listing it (podman drops `--expose` for a
    /// container on the host's network), refused as not served if none does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// `[containers] runtime`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerRuntime {
    #[default]
    Podman,
    Kubernetes,
}

impl ContainerRuntime {
    fn is_podman(&self) -> bool {
        *self == ContainerRuntime::Podman
    }
}

fn default_container_socket() -> PathBuf {
    PathBuf::from("/run/podman/podman.sock")
}
fn default_containers_name() -> String {
    "containers".into()
}
fn default_container_wait_ms() -> u64 {
    5_000
}

impl Containers {
    /// `runtime = "kubernetes"`: the pod source's settings, its cgroup root `cgroup`.
    #[cfg(feature = "kube")]
    pub fn kube_settings(&self) -> crate::sources::kube::KubeSettings {
        crate::sources::kube::KubeSettings {
            cgroup_root: self.cgroup.clone(),
            ..self.kubernetes.clone().unwrap_or_default()
        }
    }

    /// The pseudo-workload capture is attached with: the parent cgroup, no declared labels.
    pub fn parent_workload(&self) -> Workload {
        Workload {
            name: self.name.clone(),
            cgroup: self.cgroup.clone(),
            labels: BTreeMap::new(),
            ports: self.ports.clone(),
            observe: self.observe,
        }
    }
}

impl Config {
    /// This configuration with the containers' parent cgroup enrolled like a workload
    /// (created first if missing): what capture attaches to and the daemon runs.
    pub fn with_container_parent(&self) -> Result<Config, String> {
        let Some(c) = &self.containers else {
            return Ok(self.clone());
        };
        if !c.cgroup.is_dir() {
            std::fs::create_dir(&c.cgroup).map_err(|e| {
                format!(
                    "containers: cgroup: cannot create {}: {e}",
                    c.cgroup.display()
                )
            })?;
        }
        validate_cgroup("containers", &c.cgroup)?;
        let mut expanded = self.clone();
        expanded.workloads.push(c.parent_workload());
        Ok(expanded)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer enforcer's name (the DNS name in its certificate).
    pub name: String,
    /// Its tunnel listener.
    pub tunnel: SocketAddr,
    /// Destination addresses whose workloads it protects.
    pub serves: Vec<IpNet>,
    /// Its certificate (PEM): handshake mode verifies its tokens without TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Its HTTP API (its `[flows] api`): the only address `GET /api/map?peers=` fetches
    /// this peer's map from. Without it, this peer's map cannot be merged through our API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<SocketAddr>,
    /// The bearer token file of that API (its `[flows] api_token_file`, or a copy): sent
    /// only to this peer. Same rules as ours: mode 0600 or stricter, owned by our user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<PathBuf>,
    /// The labels of its workloads (each a table, e.g. `[{app = "metrics"}]`): a `udp` or
    /// `icmp` rule that names such workloads stands for the addresses this peer `serves`.
    /// Under a control plane, the directory fills it (with the peer's scope stamped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tunnel {
    /// Warm tunnels kept per peer (0 disables pooling: every connection handshakes).
    pub pool_size: usize,
    /// A pooled tunnel idle longer than this is not used (seconds).
    pub pool_max_idle_secs: u64,
    /// The server closes a tunnel that sends no header within this time (seconds).
    pub idle_timeout_secs: u64,
}

impl Default for Tunnel {
    fn default() -> Self {
        Self {
            pool_size: 16,
            pool_max_idle_secs: 20,
            idle_timeout_secs: 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Flows {
    /// Append flow records as JSON lines to this file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
    /// The local HTTP API (flows, live follow, map, /metrics); "" turns it off. On a
    /// loopback address it serves only requests addressed to an IP address or `localhost`
    /// (the Host header: no DNS rebinding); any other address needs `api_token_file`.
    pub api: String,
    /// A file holding the API's bearer token (mode 0600 or stricter, owned by the
    /// enforcer's user): every request must carry `Authorization: Bearer <token>`.
    /// Required when `api` is not a loopback address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<PathBuf>,
    /// The embedded database holding the aggregated map across restarts (default
    /// `/var/lib/tessera/<name>/map.redb`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map_db: Option<PathBuf>,
    /// Recent flow records kept in memory for the API.
    pub recent: usize,
    /// The baseline window: an edge of the map first seen more than this long after the
    /// map's first edge is new (`tessera_map_new_edges_total`).
    pub baseline_secs: u64,
}

impl Default for Flows {
    fn default() -> Self {
        Self {
            log: None,
            api: "127.0.0.1:15090".into(),
            api_token_file: None,
            map_db: None,
            recent: 10_000,
            baseline_secs: 86_400,
        }
    }
}

impl Flows {
    pub fn api_addr(&self) -> Option<SocketAddr> {
        (!self.api.is_empty()).then(|| self.api.parse().expect("validated"))
    }
}

/// `statfs` magic of cgroup v2.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

pub fn is_cgroup2_dir(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let err = |message: String| ConfigError {
            file: file.clone(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| err(e.to_string().trim_end().to_owned()))?;
        config.adopt_old_mode_key(&file).map_err(err)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate().map_err(err)?;
        for ignored in config.ignored_by_handshake_mode() {
            tracing::warn!("{file}: {ignored}");
        }
        Ok(config)
    }

    /// The data path mode: top-level `mode`, else the old `[handshake] mode`, else tunnel.
    pub fn mode(&self) -> DataPathMode {
        self.mode.or(self.handshake.mode).unwrap_or_default()
    }

    /// Moves the old `[handshake] mode` to the top-level `mode`, with a warning; both set
    /// and different is an error.
    fn adopt_old_mode_key(&mut self, file: &str) -> Result<(), String> {
        let Some(old) = self.handshake.mode.take() else {
            return Ok(());
        };
        if let Some(new) = self.mode.filter(|new| *new != old) {
            return Err(format!(
                "mode: {:?} and handshake.mode: {:?} differ; keep only the top-level mode \
                 (handshake.mode is its old place)",
                new.as_str(),
                old.as_str()
            ));
        }
        tracing::warn!(
            "{file}: handshake.mode is deprecated: write `mode = {:?}` at the top of the file",
            old.as_str()
        );
        self.mode = Some(old);
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        if let Some(c) = self.control.as_mut() {
            c.resolve_paths(base);
        }
        for p in [&mut self.tls.ca, &mut self.tls.cert, &mut self.tls.key] {
            if p.as_os_str().is_empty() {
                continue;
            }
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(log) = self.flows.log.as_mut().filter(|l| l.is_relative()) {
            *log = base.join(&*log);
        }
        if let Some(db) = self.flows.map_db.as_mut().filter(|d| d.is_relative()) {
            *db = base.join(&*db);
        }
        if let Some(t) = self
            .flows
            .api_token_file
            .as_mut()
            .filter(|t| t.is_relative())
        {
            *t = base.join(&*t);
        }
        if let Some(file) = self.policy.file.as_mut().filter(|f| f.is_relative()) {
            *file = base.join(&*file);
        }
        for peer in &mut self.peers {
            if let Some(cert) = peer.cert.as_mut().filter(|c| c.is_relative()) {
                *cert = base.join(&*cert);
            }
            if let Some(t) = peer.api_token_file.as_mut().filter(|t| t.is_relative()) {
                *t = base.join(&*t);
            }
        }
    }

    pub fn map_db(&self) -> PathBuf {
        self.flows.map_db.clone().unwrap_or_else(|| {
            PathBuf::from("/var/lib/tessera")
                .join(&self.name)
                .join("map.redb")
        })
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.bpf
            .pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/tessera").join(&self.name))
    }

    /// Checks everything that can be checked before start-up, section by section, in the
    /// order a reader meets them; the first problem found is the error.
    fn validate(&self) -> Result<(), String> {
        if !valid_name(&self.name) {
            return Err(format!(
                "name: {:?} must be 1-63 letters, digits, '-', '.' or '_'",
                self.name
            ));
        }
        self.validate_listen()?;
        self.validate_control()?;
        self.validate_tls()?;
        self.validate_policy()?;
        self.validate_flows()?;
        self.validate_identity()?;
        self.validate_bpf()?;
        self.validate_workloads()?;
        self.validate_containers()?;
        self.validate_peers()?;
        self.validate_handshake()
    }

    /// `[listen]`: both local listener ports set and distinct.
    fn validate_listen(&self) -> Result<(), String> {
        let l = &self.listen;
        let ports = [
            ("outbound_port", l.outbound_port),
            ("inbound_port", l.inbound_port),
        ];
        for (field, port) in ports {
            if port == 0 {
                return Err(format!("listen.{field}: must not be 0"));
            }
        }
        if l.outbound_port == l.inbound_port {
            return Err("listen.inbound_port: must differ from listen.outbound_port".into());
        }
        Ok(())
    }

    /// `[control]`: what the control plane gives is not also given here.
    fn validate_control(&self) -> Result<(), String> {
        let Some(c) = &self.control else {
            return Ok(());
        };
        c.validate()?;
        // (After bootstrap these are the control plane's own files and peers.)
        let bootstrapped = self.tls.cert.starts_with(&c.state_dir);
        if !bootstrapped {
            if !self.tls.is_unset() {
                return Err("tls: the control plane issues the certificate; remove [tls]".into());
            }
            if !self.peers.is_empty() {
                return Err(
                    "peer: the control plane's directory lists the peers; remove [[peer]]".into(),
                );
            }
            if self.policy.file.is_some() {
                return Err(
                    "policy.file: the control plane distributes the policy; remove it".into(),
                );
            }
        }
        Ok(())
    }

    /// Checks again after the control plane's state was filled in (see `control`).
    pub fn revalidate(&self) -> Result<(), String> {
        self.validate()
    }

    /// `[tls]`: the CA, certificate and key files can be opened.
    fn validate_tls(&self) -> Result<(), String> {
        if self.control.is_some() && self.tls.is_unset() {
            return Ok(());
        }
        for (field, path) in [
            ("tls.ca", &self.tls.ca),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            if path.as_os_str().is_empty() {
                return Err(format!(
                    "{field}: missing: both modes need [tls] ca, cert and key (in handshake \
                     mode the key seals this host's tokens and the CA checks the peers' \
                     certificates), unless [control] issues them"
                ));
            }
            std::fs::File::open(path)
                .map_err(|e| format!("{field}: cannot read {}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// `[policy]`: the policy file, if any, can be read and parses.
    fn validate_policy(&self) -> Result<(), String> {
        if let Some(file) = &self.policy.file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("policy.file: cannot read {}: {e}", file.display()))?;
            tessera_policy::parse::parse(&file.display().to_string(), &text)
                .map_err(|e| format!("policy.file: invalid policy:\n{e}"))?;
        }
        Ok(())
    }

    /// `[flows]`: the API address (or ""), authentication unless it is on loopback, a
    /// private token file, and a non-empty recent buffer.
    fn validate_flows(&self) -> Result<(), String> {
        let api = match self.flows.api.as_str() {
            "" => None,
            a => Some(a.parse::<SocketAddr>().map_err(|_| {
                format!("flows.api: {a:?} is not an address:port (\"\" turns the API off)")
            })?),
        };
        match (&self.flows.api_token_file, api) {
            (None, Some(addr)) if !crate::api::is_loopback(addr) => {
                return Err(format!(
                    "flows.api: {addr} is not a loopback address, so the API needs \
                     authentication: set flows.api_token_file (a file holding a bearer token, \
                     mode 0600), or listen on 127.0.0.1"
                ));
            }
            (Some(file), _) => {
                crate::api::read_token_file(file)
                    .map_err(|e| format!("flows.api_token_file: {e}"))?;
            }
            _ => {}
        }
        if self.flows.recent == 0 {
            return Err("flows.recent: must be at least 1".into());
        }
        Ok(())
    }

    /// `[identity]`: the trust domain's spelling, token lifetime and clock skew bounds.
    fn validate_identity(&self) -> Result<(), String> {
        let id = &self.identity;
        if id.trust_domain.is_empty()
            || !id
                .trust_domain
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c))
        {
            return Err(format!(
                "identity.trust_domain: {:?} must be lowercase letters, digits, '-', '.' or '_'",
                id.trust_domain
            ));
        }
        if !(100..=300_000).contains(&id.token_lifetime_ms) {
            return Err(format!(
                "identity.token_lifetime_ms: {} must be between 100 and 300000",
                id.token_lifetime_ms
            ));
        }
        if id.clock_skew_ms > 300_000 {
            return Err(format!(
                "identity.clock_skew_ms: {} must be at most 300000",
                id.clock_skew_ms
            ));
        }
        Ok(())
    }

    /// `[bpf]`: the delivery source is a loopback address; the delivery mark is no other
    /// mark of ours; the delivery table is not one of the kernel's own.
    fn validate_bpf(&self) -> Result<(), String> {
        let b = &self.bpf;
        if !b.delivery_source.is_loopback() {
            return Err(format!(
                "bpf.delivery_source: {} is not in 127.0.0.0/8",
                b.delivery_source
            ));
        }
        if b.delivery_mark == 0
            || b.delivery_mark == b.proxy_mark
            || b.delivery_mark == self.handshake.socket_mark
        {
            return Err(format!(
                "bpf.delivery_mark: {:#x} must be non-zero and differ from bpf.proxy_mark and handshake.socket_mark",
                b.delivery_mark
            ));
        }
        if b.delivery_table == 0 || b.delivery_table >= 32_766 {
            return Err(format!(
                "bpf.delivery_table: {} must be between 1 and 32765 (a table and rule priority of our own)",
                b.delivery_table
            ));
        }
        Ok(())
    }

    /// `[[workload]]`: unique valid names, real cgroup v2 directories, well-formed labels,
    /// and ports served by one workload only, none of them the enforcer's own.
    fn validate_workloads(&self) -> Result<(), String> {
        let mut names = HashSet::new();
        let mut served_ports = HashSet::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = format!("workload[{i}] {:?}", w.name);
            if !valid_name(&w.name) {
                return Err(format!(
                    "{at}: name must be 1-63 letters, digits, '-', '.' or '_'"
                ));
            }
            if !names.insert(&w.name) {
                return Err(format!("{at}: name is used by another workload"));
            }
            validate_cgroup(&at, &w.cgroup)?;
            validate_labels(&at, &w.labels)?;
            self.validate_workload_ports(&at, &w.ports, &mut served_ports)?;
        }
        Ok(())
    }

    /// `[containers]`: an absolute socket path, a parent cgroup that is (or can be made) a
    /// cgroup v2 directory and is no workload's, a name no workload has, valid selectors.
    fn validate_containers(&self) -> Result<(), String> {
        let Some(c) = &self.containers else {
            return Ok(());
        };
        if !c.socket.is_absolute() {
            return Err(format!(
                "containers: socket: {} must be an absolute path",
                c.socket.display()
            ));
        }
        if !valid_name(&c.name) {
            return Err(format!(
                "containers: name: {:?} must be 1-63 letters, digits, '-', '.' or '_'",
                c.name
            ));
        }
        if let Some(w) = self.workloads.iter().find(|w| w.name == c.name) {
            return Err(format!(
                "containers: name: {:?} is the name of a [[workload]]; choose another",
                w.name
            ));
        }
        if c.cgroup.is_dir() {
            validate_cgroup("containers", &c.cgroup)?;
        } else {
            let parent = c.cgroup.parent().filter(|_| c.cgroup.is_absolute());
            match parent {
                Some(p) if is_cgroup2_dir(p) => {}
                _ => {
                    return Err(format!(
                        "containers: cgroup: {} must be an absolute path to a cgroup v2 \
                         directory or to a new one in an existing cgroup v2 directory",
                        c.cgroup.display()
                    ));
                }
            }
        }
        if let Some(w) = self
            .workloads
            .iter()
            .find(|w| c.cgroup.starts_with(&w.cgroup) || w.cgroup.starts_with(&c.cgroup))
        {
            return Err(format!(
                "containers: cgroup: {} overlaps workload {:?}'s cgroup {}",
                c.cgroup.display(),
                w.name,
                w.cgroup.display()
            ));
        }
        validate_labels("containers: select", &c.select)?;
        self.validate_runtime(c)?;
        let mut served: HashSet<u16> = self
            .workloads
            .iter()
            .flat_map(|w| w.ports.clone())
            .collect();
        self.validate_workload_ports("containers", &c.ports, &mut served)?;
        if c.wait_ms == 0 || c.wait_ms > 60_000 {
            return Err(format!(
                "containers: wait_ms: {} must be 1-60000",
                c.wait_ms
            ));
        }
        Ok(())
    }

    /// `[containers] runtime` and its section.
    fn validate_runtime(&self, c: &Containers) -> Result<(), String> {
        if let Some(hook) = &c.hook_socket {
            if !hook.is_absolute() {
                return Err(format!(
                    "containers: hook_socket: {} must be an absolute path",
                    hook.display()
                ));
            }
            if c.runtime != ContainerRuntime::Podman {
                return Err(
                    "containers: hook_socket: only for runtime = \"podman\" (the \
                            runtime's OCI hook)"
                        .to_string(),
                );
            }
        }
        #[cfg(feature = "kube")]
        if c.runtime == ContainerRuntime::Podman && c.kubernetes.is_some() {
            return Err("containers: kubernetes: only with runtime = \"kubernetes\"".to_string());
        }
        if c.runtime != ContainerRuntime::Kubernetes {
            return Ok(());
        }
        if self.mode() == DataPathMode::Handshake {
            return Err(
                "containers: runtime: \"kubernetes\" needs mode = \"tunnel\" (pods have \
                 networks of their own, which only tunnel mode serves)"
                    .to_string(),
            );
        }
        #[cfg(feature = "kube")]
        {
            if let Some(k) = &c.kubernetes
                && k.cgroup_root != crate::sources::kube::KubeSettings::default().cgroup_root
            {
                return Err(
                    "containers: kubernetes: cgroup_root: set [containers] cgroup \
                            (the kubelet's pod cgroup root) instead"
                        .to_string(),
                );
            }
            c.kube_settings()
                .validate()
                .map_err(|e| format!("containers: {e}"))
        }
        #[cfg(not(feature = "kube"))]
        Err("containers: runtime: this build has no Kubernetes support (feature kube)".into())
    }

    /// One workload's `ports`: real ports, not the enforcer's listeners, not already taken
    /// by an earlier workload (`served_ports` collects them).
    fn validate_workload_ports(
        &self,
        at: &str,
        ports: &[u16],
        served_ports: &mut HashSet<u16>,
    ) -> Result<(), String> {
        let l = &self.listen;
        for &port in ports {
            if port == 0 {
                return Err(format!("{at}: ports: 0 is not a port"));
            }
            if port == l.outbound_port || port == l.inbound_port || port == l.tunnel.port() {
                return Err(format!(
                    "{at}: ports: {port} is one of the enforcer's own listener ports"
                ));
            }
            if !served_ports.insert(port) {
                return Err(format!(
                    "{at}: ports: {port} is already served by another workload"
                ));
            }
        }
        Ok(())
    }

    /// `[[peer]]`: unique valid names, something served, a reachable tunnel address, and a
    /// readable certificate (required in handshake mode).
    fn validate_peers(&self) -> Result<(), String> {
        let mut peer_names = HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            let at = format!("peer[{i}] {:?}", p.name);
            if !valid_name(&p.name) {
                return Err(format!(
                    "{at}: name must be 1-63 letters, digits, '-', '.' or '_'"
                ));
            }
            if !peer_names.insert(&p.name) {
                return Err(format!("{at}: name is used by another peer"));
            }
            if p.serves.is_empty() {
                return Err(format!(
                    "{at}: serves: list at least one address or network"
                ));
            }
            for (j, labels) in p.workloads.iter().enumerate() {
                validate_labels(&format!("{at}: workloads[{j}]"), labels)?;
            }
            if p.tunnel.port() == 0 || p.tunnel.ip().is_unspecified() {
                return Err(format!(
                    "{at}: tunnel: {} is not a reachable address",
                    p.tunnel
                ));
            }
            self.validate_peer_cert(&at, &p.name, p.cert.as_deref())?;
            validate_peer_api(&at, p)?;
        }
        Ok(())
    }

    /// One peer's `cert`: readable if given, issued to the peer's name if it holds a
    /// certificate (anything else fails at start-up, where its key is read), and required
    /// in handshake mode.
    fn validate_peer_cert(&self, at: &str, name: &str, cert: Option<&Path>) -> Result<(), String> {
        match cert {
            Some(cert) => {
                std::fs::File::open(cert)
                    .map_err(|e| format!("{at}: cert: cannot read {}: {e}", cert.display()))?;
                if let Ok(certs) = tessera_proxy::tls::certs(cert) {
                    check_peer_cert_name(at, name, cert, &certs[0])?;
                }
            }
            None if self.mode() == DataPathMode::Handshake => {
                return Err(format!(
                    "{at}: cert: handshake mode needs each peer's certificate (no TLS carries it)"
                ));
            }
            None => {}
        }
        Ok(())
    }

    /// `[handshake]`: three queue numbers, single distinct mark bits that overlap neither
    /// socket mark, a bounded key reuse window, and a socket mark of its own.
    fn validate_handshake(&self) -> Result<(), String> {
        let h = &self.handshake;
        if h.queue >= u16::MAX - 1 {
            return Err(
                "handshake.queue: needs three queue numbers (queue, queue + 1, queue + 2)".into(),
            );
        }
        for (field, bit) in [("proven_bit", h.proven_bit), ("acked_bit", h.acked_bit)] {
            if bit.count_ones() != 1 {
                return Err(format!("handshake.{field}: {bit:#x} must be a single bit"));
            }
            if h.socket_mark & bit != 0 || self.bpf.proxy_mark & bit != 0 {
                return Err(format!(
                    "handshake.{field}: {bit:#x} overlaps handshake.socket_mark or bpf.proxy_mark"
                ));
            }
        }
        if h.key_reuse_ms > 60_000 {
            return Err(format!(
                "handshake.key_reuse_ms: {} is over the limit of 60000 (one minute)",
                h.key_reuse_ms
            ));
        }
        if h.proven_bit == h.acked_bit {
            return Err("handshake.acked_bit: must differ from handshake.proven_bit".into());
        }
        if h.socket_mark == 0 || h.socket_mark == self.bpf.proxy_mark {
            return Err(format!(
                "handshake.socket_mark: {:#x} must be non-zero and differ from bpf.proxy_mark",
                h.socket_mark
            ));
        }
        if h.fast_path_secs != 0 {
            self.validate_fast_marks()?;
        }
        Ok(())
    }

    /// The fast path's marks: two single bits distinct from each other, from the proven and
    /// acked bits and from every socket and delivery mark (a zero or shared bit would let
    /// the raw table's `RETURN` match packets no verifier proved); a fast socket mark that
    /// equals no other mark (no queueing or delivery rule may match it).
    fn validate_fast_marks(&self) -> Result<(), String> {
        let h = &self.handshake;
        let marks = [
            ("handshake.socket_mark", h.socket_mark),
            ("bpf.proxy_mark", self.bpf.proxy_mark),
            ("bpf.delivery_mark", self.bpf.delivery_mark),
            ("handshake.fast_socket_mark", h.fast_socket_mark),
        ];
        let bits = [
            ("handshake.proven_bit", h.proven_bit),
            ("handshake.acked_bit", h.acked_bit),
        ];
        for (field, bit) in [
            ("fast_bit", h.fast_bit),
            ("fast_client_bit", h.fast_client_bit),
        ] {
            if bit.count_ones() != 1 {
                return Err(format!(
                    "handshake.{field}: {bit:#x} must be a single non-zero bit"
                ));
            }
            for (other, b) in bits {
                if b == bit {
                    return Err(format!("handshake.{field}: {bit:#x} equals {other}"));
                }
            }
            for (other, m) in marks {
                if m & bit != 0 {
                    return Err(format!(
                        "handshake.{field}: {bit:#x} overlaps {other} ({m:#x})"
                    ));
                }
            }
        }
        if h.fast_bit == h.fast_client_bit {
            return Err("handshake.fast_client_bit: must differ from handshake.fast_bit".into());
        }
        let m = h.fast_socket_mark;
        if m == 0 {
            return Err("handshake.fast_socket_mark: must be non-zero".into());
        }
        for (other, o) in &marks[..3] {
            if *o == m {
                return Err(format!("handshake.fast_socket_mark: {m:#x} equals {other}"));
            }
        }
        for (other, b) in bits {
            if m & b != 0 {
                return Err(format!(
                    "handshake.fast_socket_mark: {m:#x} overlaps {other}"
                ));
            }
        }
        Ok(())
    }

    /// In handshake mode: the settings given (other than their defaults) that only tunnel
    /// mode reads, each named with why it is ignored (warnings: the file still works).
    /// What handshake mode needs is checked where it is validated: `[tls]` (or `[control]`)
    /// and each `[[peer]] cert`.
    pub fn ignored_by_handshake_mode(&self) -> Vec<String> {
        if self.mode() != DataPathMode::Handshake {
            return Vec::new();
        }
        let (l, listen) = (&self.listen, Listen::default());
        let (t, tunnel) = (&self.tunnel, Tunnel::default());
        let (b, bpf) = (&self.bpf, Bpf::default());
        [
            (
                "listen.tunnel",
                l.tunnel != listen.tunnel,
                "no tunnel listener",
            ),
            (
                "listen.outbound_port",
                l.outbound_port != listen.outbound_port,
                "connections are not redirected to a proxy",
            ),
            (
                "listen.inbound_port",
                l.inbound_port != listen.inbound_port,
                "no proxy takes direct connections",
            ),
            (
                "tunnel.pool_size",
                t.pool_size != tunnel.pool_size,
                "no tunnels",
            ),
            (
                "tunnel.pool_max_idle_secs",
                t.pool_max_idle_secs != tunnel.pool_max_idle_secs,
                "no tunnels",
            ),
            (
                "tunnel.idle_timeout_secs",
                t.idle_timeout_secs != tunnel.idle_timeout_secs,
                "no tunnels",
            ),
            ("bpf.delivery", b.delivery != bpf.delivery, "no deliveries"),
            (
                "bpf.delivery_source",
                b.delivery_source != bpf.delivery_source,
                "no deliveries",
            ),
            (
                "bpf.delivery_table",
                b.delivery_table != bpf.delivery_table,
                "no deliveries",
            ),
            (
                "containers.hook_socket",
                self.containers
                    .as_ref()
                    .is_some_and(|c| c.hook_socket.is_some()),
                "containers' own networks are not served",
            ),
        ]
        .into_iter()
        .filter(|(_, set, _)| *set)
        .map(|(field, _, why)| {
            format!("{field}: ignored in handshake mode ({why}: it is read in tunnel mode only)")
        })
        .collect()
    }
}

/// A `[[peer]]`'s certificate must be issued to the peer's `name`: its (first) DNS name,
/// as `tessera ca issue --name` writes it and tunnels check it. Otherwise handshake mode
/// would take tokens signed by one enforcer for another's (the name in the configuration
/// is the one connections are recorded and decided under). `at`: `peer[i] "name"`.
pub fn check_peer_cert_name(
    at: &str,
    name: &str,
    path: &Path,
    cert: &rustls::pki_types::CertificateDer<'_>,
) -> Result<(), String> {
    match tessera_proxy::tls::peer_name(cert) {
        Some(issued) if issued == name => Ok(()),
        Some(issued) => Err(format!(
            "{at}: cert: {} is issued to {issued:?}, not to the peer's name {name:?}",
            path.display()
        )),
        None => Err(format!(
            "{at}: cert: {} names no enforcer (no DNS name); the peer's name is {name:?}",
            path.display()
        )),
    }
}

/// One peer's `api` (a reachable address) and `api_token_file` (only with `api`, private).
fn validate_peer_api(at: &str, p: &PeerConfig) -> Result<(), String> {
    if let Some(api) = p.api
        && (api.port() == 0 || api.ip().is_unspecified())
    {
        return Err(format!("{at}: api: {api} is not a reachable address"));
    }
    if let Some(file) = &p.api_token_file {
        if p.api.is_none() {
            return Err(format!(
                "{at}: api_token_file: set only with api (the address the token is sent to)"
            ));
        }
        crate::api::read_token_file(file).map_err(|e| format!("{at}: api_token_file: {e}"))?;
    }
    Ok(())
}

/// A workload's `cgroup`: an absolute path to an existing cgroup v2 directory.
fn validate_cgroup(at: &str, cgroup: &Path) -> Result<(), String> {
    if !cgroup.is_absolute() {
        return Err(format!(
            "{at}: cgroup: {} must be an absolute path",
            cgroup.display()
        ));
    }
    if !cgroup.is_dir() {
        return Err(format!("{at}: cgroup: {} does not exist", cgroup.display()));
    }
    if !is_cgroup2_dir(cgroup) {
        return Err(format!(
            "{at}: cgroup: {} is not a cgroup v2 directory",
            cgroup.display()
        ));
    }
    Ok(())
}

/// A workload's `labels`: well-formed keys, none in the reserved `tessera.io/` prefix,
/// values of at most 253 bytes.
fn validate_labels(at: &str, labels: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in labels {
        if k.is_empty()
            || !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            return Err(format!(
                "{at}: labels: key {k:?} may hold only letters, digits, '-', '_', '.', '/'"
            ));
        }
        if tessera_proxy::identity::reserved::is_reserved(k) {
            return Err(format!(
                "{at}: labels: {k:?} is reserved: tessera.io/ labels are derived, never declared"
            ));
        }
        if v.len() > 253 {
            return Err(format!(
                "{at}: labels: value of {k:?} is longer than 253 bytes"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration example in the README uses only fields that exist, with valid values.
    #[test]
    fn the_readme_example_parses() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("### Configuration (TOML)")
            .and_then(|i| readme[i..].find("```toml").map(|j| i + j + "```toml".len()))
            .expect("the README has a configuration example");
        let end = start + readme[start..].find("```").expect("closed block");
        let config: Config = toml::from_str(&readme[start..end]).expect("README example");
        // The mode in its place, the top level (not the old `[handshake] mode`).
        assert_eq!(config.mode, Some(DataPathMode::Tunnel));
        assert_eq!(config.handshake.mode, None);
        assert_eq!(config.handshake.socket_mark, 0x7e55_0002);
        assert_eq!(
            config.peers[0].cert.as_deref(),
            Some(Path::new("ca/host-b.pem"))
        );
    }

    /// The cgroup v2 mount of this machine, from /proc/self/mountinfo.
    fn cgroup2_root() -> PathBuf {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines()
            .find_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                let mount_point = pre.split_whitespace().nth(4)?;
                (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
            })
            .expect("cgroup v2 must be mounted for these tests")
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for f in ["ca.pem", "a.pem", "a.key"] {
                std::fs::write(dir.path().join(f), "x").unwrap();
            }
            Self { dir }
        }
        fn load(&self, body: &str) -> Result<Config, ConfigError> {
            self.load_with("", body)
        }
        /// `top`: top-level keys (before any table).
        fn load_with(&self, top: &str, body: &str) -> Result<Config, ConfigError> {
            let text = format!(
                "name = \"host-a\"\n{top}[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n{body}"
            );
            let path = self.dir.path().join("host-a.toml");
            std::fs::write(&path, text).unwrap();
            Config::load(&path)
        }
    }

    #[test]
    fn the_mode_is_a_top_level_key_defaulting_to_tunnel() {
        let f = Fixture::new();
        let c = f.load("").unwrap();
        assert_eq!((c.mode, c.mode()), (None, DataPathMode::Tunnel));
        let c = f.load_with("mode = \"handshake\"\n", "").unwrap();
        assert_eq!(c.mode, Some(DataPathMode::Handshake));
        assert_eq!(c.mode(), DataPathMode::Handshake);
        assert!(
            message(f.load_with("mode = \"kernel\"\n", "")).contains("unknown variant `kernel`")
        );
        // Handshake mode needs the peers' certificates, wherever the mode is set.
        let peer =
            "[[peer]]\nname = \"b\"\ntunnel = \"10.0.0.2:15008\"\nserves = [\"10.0.0.2/32\"]\n";
        assert!(
            message(f.load_with("mode = \"handshake\"\n", peer)).contains("peer[0] \"b\": cert")
        );
        assert!(
            message(f.load(&format!("[handshake]\nmode = \"handshake\"\n{peer}")))
                .contains("peer[0] \"b\": cert")
        );
    }

    /// Runs `f` with a tracing subscriber that writes to the returned buffer.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (out, text)
    }

    #[test]
    fn the_fast_path_marks_are_single_distinct_bits_and_a_mark_of_their_own() {
        let f = Fixture::new();
        let c = f.load_with("mode = \"handshake\"\n", "").unwrap();
        let h = &c.handshake;
        // The defaults: the fast socket mark is no other mark (it was the delivery mark).
        for m in [h.socket_mark, c.bpf.proxy_mark, c.bpf.delivery_mark] {
            assert_ne!(h.fast_socket_mark(), m);
        }
        let bits = [h.proven_bit, h.acked_bit, h.fast_bit, h.fast_client_bit];
        assert!(bits.iter().all(|b| b.count_ones() == 1));
        assert_eq!(bits.iter().fold(0, |a, b| a | b).count_ones(), 4);
        for (text, field) in [
            ("fast_bit = 0", "handshake.fast_bit"),
            ("fast_bit = 0x300", "handshake.fast_bit"),
            (
                "fast_bit = 0x100",
                "handshake.fast_bit: 0x100 equals handshake.proven_bit",
            ),
            (
                "fast_bit = 0x200",
                "handshake.fast_bit: 0x200 equals handshake.acked_bit",
            ),
            ("fast_bit = 0x2", "overlaps handshake.socket_mark"),
            ("fast_client_bit = 0x400", "handshake.fast_client_bit"),
            ("fast_client_bit = 0x1", "overlaps bpf.proxy_mark"),
            (
                "fast_socket_mark = 0x7e550003",
                "fast_socket_mark: 0x7e550003 equals bpf.delivery_mark",
            ),
            (
                "fast_socket_mark = 0x7e550002",
                "equals handshake.socket_mark",
            ),
            ("fast_socket_mark = 0", "handshake.fast_socket_mark"),
            (
                "fast_socket_mark = 0x7e550104",
                "overlaps handshake.proven_bit",
            ),
        ] {
            let e = f
                .load_with("mode = \"handshake\"\n", &format!("[handshake]\n{text}\n"))
                .map(|_| ())
                .expect_err(text);
            assert!(format!("{e:#}").contains(field), "{text}: {e:#}");
        }
        // Off: not checked (nothing uses them).
        f.load_with(
            "mode = \"handshake\"\n",
            "[handshake]\nfast_path_secs = 0\nfast_bit = 0\n",
        )
        .unwrap();
    }

    #[test]
    fn the_old_handshake_mode_key_is_accepted_with_a_warning() {
        let f = Fixture::new();
        let (c, log) = logged(|| f.load("[handshake]\nmode = \"handshake\"\n"));
        let c = c.unwrap();
        // Moved to its new place: one source of truth once loaded.
        assert_eq!(
            (c.mode, c.handshake.mode),
            (Some(DataPathMode::Handshake), None)
        );
        assert_eq!(c.mode(), DataPathMode::Handshake);
        assert!(
            log.contains("WARN") && log.contains("host-a.toml: handshake.mode is deprecated"),
            "{log}"
        );
        // The same value in both places: accepted too (with the warning).
        let (c, log) =
            logged(|| f.load_with("mode = \"tunnel\"\n", "[handshake]\nmode = \"tunnel\"\n"));
        assert_eq!(c.unwrap().mode(), DataPathMode::Tunnel);
        assert!(log.contains("handshake.mode is deprecated"), "{log}");
        // The new key alone: no warning.
        let (c, log) = logged(|| f.load_with("mode = \"handshake\"\n", ""));
        assert_eq!(c.unwrap().mode(), DataPathMode::Handshake);
        assert!(log.is_empty(), "{log}");
    }

    #[test]
    fn the_mode_set_differently_in_both_places_is_an_error_naming_both() {
        let f = Fixture::new();
        let m = message(f.load_with("mode = \"tunnel\"\n", "[handshake]\nmode = \"handshake\"\n"));
        assert!(
            m.contains("host-a.toml: mode: \"tunnel\" and handshake.mode: \"handshake\" differ"),
            "{m}"
        );
    }

    #[test]
    fn a_config_round_trips_through_toml() {
        let f = Fixture::new();
        let cg = cgroup2_root();
        std::fs::write(f.dir.path().join("policy.yaml"), "rules: []\n").unwrap();
        std::fs::write(f.dir.path().join("b.pem"), "x").unwrap();
        let c = f
            .load_with(
                "mode = \"handshake\"\n",
                &format!(
                    "[bpf]\npin_dir = \"/sys/fs/bpf/tessera/t\"\n\
                     [tunnel]\npool_size = 3\n\
                     [flows]\nlog = \"flows.jsonl\"\napi = \"\"\nrecent = 7\n\
                     [policy]\nfile = \"policy.yaml\"\nmode = \"observe\"\ndns_servers = [\"10.0.0.53:53\"]\n\
                     [identity]\ntokens = false\nsigned_tunnel_tokens = true\n\
                     [handshake]\nfail_open = true\nkey_reuse_ms = 0\n\
                     [[workload]]\nname = \"web\"\ncgroup = \"{}\"\nlabels = {{ app = \"web\", \"x/y\" = \"z\" }}\nports = [8080, 9000]\nobserve = true\n\
                     [[peer]]\nname = \"host-b\"\ntunnel = \"10.77.0.2:15008\"\nserves = [\"10.77.0.2/32\", \"fd77::2/128\"]\ncert = \"b.pem\"\n",
                    cg.display()
                ),
            )
            .unwrap();
        let text = toml::to_string(&c).unwrap();
        let path = f.dir.path().join("again.toml");
        std::fs::write(&path, &text).unwrap();
        let again = Config::load(&path).unwrap();
        assert_eq!(again, c, "{text}");
        // Nothing was lost on the way: the values are the ones written above.
        assert_eq!(again.mode, Some(DataPathMode::Handshake));
        assert_eq!(again.policy.mode, PolicyMode::Observe);
        assert_eq!(again.flows.log, Some(f.dir.path().join("flows.jsonl")));
        assert_eq!(again.peers[0].serves.len(), 2);
        assert_eq!(again.workloads[0].labels["x/y"], "z");
        assert!(again.handshake.fail_open && !again.identity.tokens);
        assert!(again.identity.signed_tunnel_tokens);
        // A config made in code (relative paths, defaults) round-trips too, paths unchanged.
        let made = Config {
            name: "host-c".into(),
            mode: None,
            listen: Listen::default(),
            tls: Tls {
                ca: "ca/ca.pem".into(),
                cert: "ca/host-c.pem".into(),
                key: "ca/host-c.key".into(),
            },
            control: None,
            containers: None,
            bpf: Bpf::default(),
            workloads: Vec::new(),
            peers: Vec::new(),
            tunnel: Tunnel::default(),
            flows: Flows::default(),
            policy: PolicyConfig::default(),
            identity: IdentityConfig::default(),
            handshake: HandshakeConfig::default(),
        };
        let text = toml::to_string(&made).unwrap();
        assert!(text.contains("ca = \"ca/ca.pem\""), "{text}");
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), made, "{text}");
    }

    #[test]
    fn a_complete_config_loads_with_defaults_and_resolved_paths() {
        let f = Fixture::new();
        let cg = cgroup2_root();
        let c = f
            .load(&format!(
                "[[workload]]\nname = \"web\"\ncgroup = \"{}\"\nlabels = {{ app = \"web\" }}\nports = [8080]\n\
                 [[peer]]\nname = \"host-b\"\ntunnel = \"10.77.0.2:15008\"\nserves = [\"10.77.0.2/32\"]\n",
                cg.display()
            ))
            .unwrap();
        assert_eq!(c.listen.outbound_port, 15001);
        assert_eq!(c.workloads[0].ports, vec![8080]);
        assert_eq!(c.tls.ca, f.dir.path().join("ca.pem"));
        assert_eq!(c.pin_dir(), PathBuf::from("/sys/fs/bpf/tessera/host-a"));
    }

    fn message(r: Result<Config, ConfigError>) -> String {
        r.expect_err("config must be rejected").to_string()
    }

    #[test]
    fn an_api_off_loopback_needs_a_private_token_file() {
        use std::os::unix::fs::PermissionsExt;
        let f = Fixture::new();
        // Loopback (the default, or set): no token needed.
        assert!(f.load("").is_ok());
        assert!(f.load("[flows]\napi = \"[::1]:15090\"\n").is_ok());
        let m = message(f.load("[flows]\napi = \"10.0.0.1:15090\"\n"));
        assert!(
            m.contains("flows.api: 10.0.0.1:15090 is not a loopback address")
                && m.contains("set flows.api_token_file"),
            "{m}"
        );
        assert!(
            message(f.load("[flows]\napi = \"0.0.0.0:15090\"\n")).contains("flows.api_token_file")
        );
        let token = f.dir.path().join("api.token");
        std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
        let set_mode = |m| std::fs::set_permissions(&token, std::fs::Permissions::from_mode(m));
        set_mode(0o644).unwrap();
        let with_token = "[flows]\napi = \"10.0.0.1:15090\"\napi_token_file = \"api.token\"\n";
        let m = message(f.load(with_token));
        assert!(
            m.contains(&format!(
                "flows.api_token_file: {} is mode 0644: it must be 0600 or stricter",
                token.display()
            )),
            "{m}"
        );
        set_mode(0o600).unwrap();
        let c = f.load(with_token).unwrap();
        assert_eq!(c.flows.api_token_file, Some(token.clone()), "resolved");
        // A peer's API: its token file only with its address, and private too.
        let peer =
            "[[peer]]\nname = \"b\"\ntunnel = \"10.0.0.2:15008\"\nserves = [\"10.0.0.2/32\"]\n";
        let m = message(f.load(&format!("{peer}api_token_file = \"api.token\"\n")));
        assert!(
            m.contains("peer[0] \"b\": api_token_file: set only with api"),
            "{m}"
        );
        let ok = format!("{peer}api = \"10.0.0.2:15090\"\napi_token_file = \"api.token\"\n");
        assert_eq!(
            f.load(&ok).unwrap().peers[0].api,
            Some("10.0.0.2:15090".parse().unwrap())
        );
        set_mode(0o604).unwrap();
        assert!(message(f.load(&ok)).contains("peer[0] \"b\": api_token_file:"));
        assert!(
            message(f.load(&format!("{peer}api = \"0.0.0.0:15090\"\n")))
                .contains("peer[0] \"b\": api: 0.0.0.0:15090 is not a reachable address")
        );
    }

    #[test]
    fn a_missing_cgroup_is_named() {
        let f = Fixture::new();
        let m = message(f.load(
            "[[workload]]\nname = \"web\"\ncgroup = \"/sys/fs/cgroup/unified/nope-tessera\"\n",
        ));
        assert!(m.contains("host-a.toml: workload[0] \"web\": cgroup: /sys/fs/cgroup/unified/nope-tessera does not exist"), "{m}");
    }

    #[test]
    fn containers_settings_are_checked_field_by_field() {
        let f = Fixture::new();
        let cg = "/sys/fs/cgroup/unified";
        if !is_cgroup2_dir(Path::new(cg)) {
            return; // Hosts with cgroup v2 elsewhere: the e2e tests cover them.
        }
        let section =
            |extra: &str| format!("[containers]\ncgroup = \"{cg}/tessera-new-parent\"\n{extra}");
        let ok = f
            .load(&section("ports = [9000]\nselect = { team = \"blue\" }\n"))
            .unwrap();
        let c = ok.containers.unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/podman/podman.sock"));
        assert_eq!((c.name.as_str(), c.wait_ms), ("containers", 5_000));
        for (extra, want) in [
            (
                "socket = \"podman.sock\"\n",
                "containers: socket: podman.sock must be an absolute path",
            ),
            ("name = \"a b\"\n", "containers: name: \"a b\" must be"),
            (
                "select = { \"tessera.io/image\" = \"x\" }\n",
                "containers: select: labels: \"tessera.io/image\" is reserved",
            ),
            ("wait_ms = 0\n", "containers: wait_ms: 0 must be 1-60000"),
            ("ports = [15008]\n", "containers: ports: 15008"),
            ("runtime = \"docker\"\n", "unknown variant `docker`"),
            (
                "hook_socket = \"hook.sock\"\n",
                "containers: hook_socket: hook.sock must be an absolute path",
            ),
            (
                "runtime = \"kubernetes\"\nhook_socket = \"/run/h.sock\"\n",
                "containers: hook_socket: only for runtime = \"podman\"",
            ),
            (
                "[containers.kubernetes]\nmax_pods = 5\n",
                "containers: kubernetes: only with runtime = \"kubernetes\"",
            ),
            (
                "runtime = \"kubernetes\"\n[containers.kubernetes]\nmax_pods = 0\n",
                "containers: kubernetes: max_pods: must be between 1 and 65536",
            ),
            (
                "runtime = \"kubernetes\"\n[containers.kubernetes]\ncgroup_root = \"/x\"\n",
                "containers: kubernetes: cgroup_root: set [containers] cgroup",
            ),
            (
                "runtime = \"kubernetes\"\n[containers.kubernetes]\nnode = \"A B\"\n",
                "containers: kubernetes: node:",
            ),
        ] {
            let m = message(f.load(&section(extra)));
            assert!(m.contains(want), "{extra}: {m}");
        }
        let m = message(f.load(&format!(
            "[containers]\ncgroup = \"{}/x/y\"\n",
            f.dir.path().display()
        )));
        assert!(
            m.contains("containers: cgroup:") && m.contains("cgroup v2"),
            "{m}"
        );
        // The parent is no workload's, and its name no workload's either.
        let m = message(f.load(&format!(
            "[containers]\ncgroup = \"{cg}\"\nname = \"web\"\n\
             [[workload]]\nname = \"web\"\ncgroup = \"{cg}\"\n"
        )));
        assert!(
            m.contains("containers: name: \"web\" is the name of a [[workload]]"),
            "{m}"
        );
        let m = message(f.load(&format!(
            "[containers]\ncgroup = \"{cg}\"\n[[workload]]\nname = \"web\"\ncgroup = \"{cg}\"\n"
        )));
        assert!(m.contains("overlaps workload \"web\""), "{m}");
        // Pods: tunnel mode only (they have networks of their own).
        let m = message(f.load_with(
            "mode = \"handshake\"\n",
            &section("runtime = \"kubernetes\"\n"),
        ));
        assert!(m.contains("needs mode = \"tunnel\""), "{m}");
        let k = f
            .load(&section(
                "runtime = \"kubernetes\"\n[containers.kubernetes]\nnode = \"node-a\"\n",
            ))
            .unwrap()
            .containers
            .unwrap();
        assert_eq!(k.runtime, ContainerRuntime::Kubernetes);
        assert_eq!(k.kube_settings().cgroup_root, k.cgroup);
    }

    #[test]
    fn a_directory_that_is_not_a_cgroup_is_named() {
        let f = Fixture::new();
        let m = message(f.load(&format!(
            "[[workload]]\nname = \"web\"\ncgroup = \"{}\"\n",
            f.dir.path().display()
        )));
        assert!(m.contains("is not a cgroup v2 directory"), "{m}");
    }

    #[test]
    fn a_bad_address_is_named_with_its_line() {
        let f = Fixture::new();
        let m = message(f.load("[listen]\ntunnel = \"10.0.0.300:15008\"\n"));
        assert!(
            m.contains("host-a.toml") && m.contains("line 7") && m.contains("tunnel"),
            "{m}"
        );
    }

    #[test]
    fn an_unreadable_certificate_is_named() {
        let f = Fixture::new();
        std::fs::remove_file(f.dir.path().join("a.key")).unwrap();
        let m = message(f.load(""));
        assert!(
            m.contains("tls.key: cannot read") && m.contains("a.key"),
            "{m}"
        );
    }

    #[test]
    fn a_peer_certificate_issued_to_another_name_is_named_with_both_names() {
        let f = Fixture::new();
        let ca = f.dir.path().join("ca");
        crate::ca::init(&ca, "tessera.local").unwrap();
        for name in ["host-b", "host-c"] {
            crate::ca::issue(&ca, name, &[], &ca).unwrap();
        }
        let peer = |name: &str, cert: &str| {
            format!(
                "[[peer]]\nname = \"{name}\"\ntunnel = \"10.0.0.2:15008\"\nserves = [\"10.0.0.2/32\"]\ncert = \"ca/{cert}.pem\"\n"
            )
        };
        // Its own certificate: fine, in either mode.
        let c = f.load(&peer("host-b", "host-b")).unwrap();
        assert_eq!(c.peers[0].name, "host-b");
        f.load_with("mode = \"handshake\"\n", &peer("host-b", "host-b"))
            .unwrap();
        // host-c's certificate configured as host-b (the second peer): refused, naming the
        // configuration file, the peer, the certificate file and both names.
        let two = format!("{}{}", peer("host-b", "host-b"), peer("host-x", "host-c"));
        for top in ["", "mode = \"handshake\"\n"] {
            let m = message(f.load_with(top, &two));
            let want = format!(
                "{}: peer[1] \"host-x\": cert: {} is issued to \"host-c\", not to the peer's name \"host-x\"",
                f.dir.path().join("host-a.toml").display(),
                ca.join("host-c.pem").display()
            );
            assert_eq!(m, want);
        }
        // A certificate without a DNS name (the CA's own) names no enforcer.
        let m = message(f.load(&peer("host-b", "ca")));
        assert!(
            m.contains("peer[0] \"host-b\": cert:") && m.contains("names no enforcer"),
            "{m}"
        );
    }

    #[test]
    fn unknown_fields_reserved_labels_and_port_clashes_are_rejected() {
        let f = Fixture::new();
        assert!(message(f.load("colour = \"blue\"\n")).contains("unknown field `colour`"));
        let cg = cgroup2_root();
        let w = |extra: &str| {
            format!(
                "[[workload]]\nname = \"web\"\ncgroup = \"{}\"\n{extra}",
                cg.display()
            )
        };
        assert!(
            message(f.load(&w("labels = { \"tessera.io/uid\" = \"0\" }\n")))
                .contains("is reserved")
        );
        assert!(message(f.load(&w("ports = [15008]\n"))).contains("enforcer's own listener ports"));
        let two = format!(
            "{}\n{}",
            w("ports = [80]\n"),
            w("ports = [80]\n").replace("\"web\"", "\"api\"")
        );
        assert!(message(f.load(&two)).contains("already served"));
        let peer = "[[peer]]\nname = \"b\"\ntunnel = \"10.0.0.2:15008\"\nserves = []\n";
        assert!(message(f.load(peer)).contains("peer[0] \"b\": serves"));
    }

    /// Handshake mode says what it ignores (tunnel-only settings given: a warning naming
    /// the file and the field) and what it lacks (`[tls]`, a peer's `cert`: errors naming
    /// the field); tunnel mode, or handshake mode with the defaults, warns of nothing.
    #[test]
    fn handshake_mode_names_the_settings_it_ignores_and_those_it_lacks() {
        let f = Fixture::new();
        let tunnel_only = "[listen]\ntunnel = \"0.0.0.0:16008\"\n[tunnel]\npool_size = 4\n\
                           [bpf]\ndelivery = \"localhost\"\n";
        let (c, log) = logged(|| f.load_with("mode = \"handshake\"\n", tunnel_only));
        assert_eq!(c.unwrap().mode(), DataPathMode::Handshake);
        for field in ["listen.tunnel", "tunnel.pool_size", "bpf.delivery"] {
            assert!(
                log.contains(&format!("host-a.toml: {field}: ignored in handshake mode")),
                "{field}: {log}"
            );
        }
        assert_eq!(log.matches("ignored in handshake mode").count(), 3, "{log}");
        let (c, log) = logged(|| f.load_with("mode = \"tunnel\"\n", tunnel_only));
        assert_eq!(c.unwrap().mode(), DataPathMode::Tunnel);
        assert!(log.is_empty(), "{log}");
        let (c, log) = logged(|| f.load_with("mode = \"handshake\"\n", ""));
        assert!(c.is_ok());
        assert!(log.is_empty(), "{log}");
        // No [tls] (and no [control]): the field, and that handshake mode needs it too.
        let path = f.dir.path().join("host-a.toml");
        std::fs::write(&path, "name = \"host-a\"\nmode = \"handshake\"\n").unwrap();
        let m = message(Config::load(&path));
        assert!(
            m.contains("host-a.toml") && m.contains("tls.ca: missing") && m.contains("handshake"),
            "{m}"
        );
    }
}
