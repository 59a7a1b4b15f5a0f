//! The enforcer part of the test hosts: the `tessera` binary under test, the workloads and
//! policies a test declares, each host's enforcer configuration (a
//! [`tessera_enforcer::config::Config`] written through serde, never by hand), starting and
//! stopping enforcers, and reading the flow records they write.
//!
//! An enforcer is a child of its [`Host`]; the [`TestNet`] stops every one when it is
//! dropped.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use ipnet::IpNet;
use tessera_enforcer::config::{
    Bpf, Config, DataPathMode, DeliveryMode, Flows, HandshakeConfig, IdentityConfig, Listen,
    PeerConfig, PolicyConfig, Tls, Tunnel, Workload,
};
use tessera_enforcer::control::ControlConfig;
use tessera_proxy::flow::FlowRecord;

use crate::{Host, TestNet, sh};

/// The `tessera` binary under test: `$TESSERA_BIN`, or the newest of target/{debug,release}.
pub fn tessera_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TESSERA_BIN") {
        return Ok(PathBuf::from(p));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    ["debug", "release"]
        .iter()
        .map(|p| target.join(p).join("tessera"))
        .filter(|p| p.is_file())
        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
        .ok_or_else(|| anyhow!("no tessera binary under {}: build it first (`cargo build -p tessera-enforcer`; `cargo xtask test` does)", target.display()))
}

#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<u16>,
}

/// Settings of the enforcers a test starts.
#[derive(Clone, Debug)]
pub struct EnforcerOptions {
    pub pool_size: usize,
    pub keep_attached: bool,
    /// Policy files by host name; `"*"` applies to hosts without one of their own.
    pub policies: BTreeMap<String, PathBuf>,
    /// `[policy] dns_servers` for every enforcer.
    pub dns_servers: Vec<String>,
    /// `[identity] tokens` (false only to measure what tokens cost).
    pub tokens: bool,
    /// `mode = "handshake"`: tokens in the TCP handshake, no tunnels (else `"tunnel"`).
    pub handshake: bool,
    /// `[handshake] fail_open`.
    pub fail_open: bool,
    /// `[handshake] pass_through` (benchmark baseline: the queues without the engine).
    pub pass_through: bool,
    /// `[handshake] key_reuse_ms` (None: the default).
    pub key_reuse_ms: Option<u64>,
    /// `[handshake] fast_path_secs` (None: the default; 0: the fast path off).
    pub fast_path_secs: Option<u64>,
    /// `[flows] api` on 127.0.0.1 (reachable from the host itself only) instead of the
    /// host's address.
    pub api_loopback: bool,
    /// `[flows] api_token_file` (and each `[[peer]] api_token_file`): the test net's token
    /// ([`TestNet::api_token_file`]). Required by an API off loopback.
    pub api_token: bool,
    /// Where the flow log and the map database go: this subdirectory of the test directory
    /// (the enforcer creates it), or the test directory itself.
    pub state_subdir: Option<String>,
    /// `[bpf] delivery = "localhost"` (deliveries from 127.0.0.77 / ::1) instead of the
    /// default `"original-source"`.
    pub localhost_delivery: bool,
    /// Enrol with a control plane (`[control]`) instead of the test net's CA, peer list and
    /// policy files (see [`TestNet::join`]).
    pub control: Option<crate::control::ControlOptions>,
    /// `[containers]` by host name.
    pub containers: BTreeMap<String, tessera_enforcer::config::Containers>,
    /// Addresses a host serves besides its own (its containers' own networks), in the
    /// `[[peer]] serves` the other hosts get for it.
    pub serves_extra: BTreeMap<String, Vec<IpNet>>,
    /// The cgroup a host's enforcer runs in, if not its own `enforcer` cgroup (e.g. a pod's
    /// under the kubelet's root, as a DaemonSet's).
    pub enforcer_cgroup: BTreeMap<String, PathBuf>,
}

impl Default for EnforcerOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            keep_attached: false,
            policies: BTreeMap::new(),
            dns_servers: Vec::new(),
            tokens: true,
            handshake: false,
            fail_open: false,
            pass_through: false,
            key_reuse_ms: None,
            fast_path_secs: None,
            api_loopback: false,
            api_token: true,
            state_subdir: None,
            localhost_delivery: false,
            control: None,
            containers: BTreeMap::new(),
            serves_extra: BTreeMap::new(),
            enforcer_cgroup: BTreeMap::new(),
        }
    }
}

pub const TUNNEL_PORT: u16 = 15008;
/// Each enforcer's HTTP API listens on its host's address at this port (with the test net's
/// bearer token), or on 127.0.0.1 ([`EnforcerOptions::api_loopback`]).
pub const API_PORT: u16 = 15090;

impl TestNet {
    pub fn tessera(&self, args: &[&str]) -> Result<String> {
        sh(self.bin.to_str().unwrap(), args)
    }

    pub fn pin_dir(&self, host: &Host) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/tessera/{}-{}", self.id, host.name))
    }

    /// Where the enforcers keep their flow logs and map databases.
    pub fn state_dir(&self) -> PathBuf {
        match &self.options.lock().unwrap().state_subdir {
            Some(sub) => self.dir.join(sub),
            None => self.dir.clone(),
        }
    }

    pub fn flow_log(&self, host: &Host) -> PathBuf {
        self.state_dir().join(format!("{}-flows.jsonl", host.name))
    }

    pub fn map_db(&self, host: &Host) -> PathBuf {
        self.state_dir().join(format!("{}-map.redb", host.name))
    }

    /// The API address of `host`'s enforcer (as configured: loopback or the host's address).
    pub fn api_addr(&self, host: &Host) -> SocketAddr {
        if self.options.lock().unwrap().api_loopback {
            SocketAddr::from(([127, 0, 0, 1], API_PORT))
        } else {
            SocketAddr::from((host.addr, API_PORT))
        }
    }

    /// The bearer token file every enforcer of this net uses for its API (and its peers'),
    /// made on first use: a random token, mode 0600, owned by the test (root).
    pub fn api_token_file(&self) -> Result<PathBuf> {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let path = self.dir.join("api.token");
        if !path.exists() {
            let mut random = [0u8; 16];
            fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
                .context("/dev/urandom")?;
            let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
            // Written whole beside it, then linked into place: enforcers started at the same
            // moment (from threads) all get the one token, never a half-written file.
            let tmp = self.dir.join(format!("api.token.{hex}"));
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut f| writeln!(f, "{hex}"))
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            let linked = fs::hard_link(&tmp, &path);
            let _ = fs::remove_file(&tmp);
            match linked {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(e).with_context(|| format!("cannot write {}", path.display()));
                }
                _ => {}
            }
        }
        Ok(path)
    }

    /// The token in [`TestNet::api_token_file`].
    pub fn api_token(&self) -> Result<String> {
        Ok(fs::read_to_string(self.api_token_file()?)?
            .trim()
            .to_owned())
    }

    pub fn log_path(&self, host: &Host) -> PathBuf {
        self.dir.join(format!("{}-enforcer.log", host.name))
    }

    /// Declares a workload on `host`: a cgroup of its own, enrolled when the enforcer starts.
    pub fn add_workload(
        &self,
        host: &Host,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[u16],
    ) -> Result<()> {
        fs::create_dir_all(self.cgroup(host, Some(name)))?;
        host.workloads.lock().unwrap().push(WorkloadSpec {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: ports.to_vec(),
        });
        Ok(())
    }

    /// Writes a policy file for `host` (None: every host without its own) and puts it in the
    /// enforcers' configuration. A running enforcer picks up changes to the file by itself.
    pub fn write_policy(&self, host: Option<&Host>, text: &str) -> Result<PathBuf> {
        let key = host.map(|h| h.name.clone()).unwrap_or_else(|| "*".into());
        let path = self.dir.join(format!(
            "policy-{}.yaml",
            if key == "*" { "all" } else { &key }
        ));
        // Write then rename, as editors and config management do: never a half-written file.
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, &path)?;
        self.options
            .lock()
            .unwrap()
            .policies
            .insert(key, path.clone());
        Ok(path)
    }

    pub fn config_path(&self, host: &Host) -> PathBuf {
        self.dir.join(format!("{}.toml", host.name))
    }

    /// Writes `host`'s enforcer configuration: its workloads, and every other host with an
    /// enforcer as a peer serving that host's address.
    pub fn write_config(&self, host: &Host) -> Result<PathBuf> {
        let text = toml::to_string(&self.enforcer_config(host)?)?;
        let path = self.config_path(host);
        fs::write(&path, text)?;
        Ok(path)
    }

    /// `host`'s enforcer configuration as [`TestNet::write_config`] writes it. Paths under
    /// the test directory are relative to the configuration file (`ca/...`) or absolute.
    pub fn enforcer_config(&self, host: &Host) -> Result<Config> {
        let opts = self.options.lock().unwrap().clone();
        let policy = opts
            .policies
            .get(&host.name)
            .or_else(|| opts.policies.get("*"));
        let policy = match policy {
            Some(file) => PolicyConfig {
                file: Some(file.clone()),
                dns_servers: opts
                    .dns_servers
                    .iter()
                    .map(|s| s.parse().with_context(|| format!("dns server {s:?}")))
                    .collect::<Result<_>>()?,
                ..PolicyConfig::default()
            },
            None => PolicyConfig::default(),
        };
        let handshake = if opts.handshake {
            let default = HandshakeConfig::default();
            HandshakeConfig {
                fail_open: opts.fail_open,
                pass_through: opts.pass_through,
                key_reuse_ms: opts.key_reuse_ms.unwrap_or(default.key_reuse_ms),
                fast_path_secs: opts.fast_path_secs.unwrap_or(default.fast_path_secs),
                ..default
            }
        } else {
            HandshakeConfig::default()
        };
        let workloads = host
            .workloads
            .lock()
            .unwrap()
            .iter()
            .map(|w| Workload {
                name: w.name.clone(),
                cgroup: self.cgroup(host, Some(&w.name)),
                labels: w.labels.clone(),
                ports: w.ports.clone(),
                observe: false,
            })
            .collect();
        let token_file = if opts.api_token {
            Some(self.api_token_file()?)
        } else {
            None
        };
        // Peers' APIs are reachable (and so declared) only on their hosts' addresses.
        let peer_api = |peer: &Host| {
            (!opts.api_loopback)
                .then(|| (SocketAddr::from((peer.addr, API_PORT)), token_file.clone()))
        };
        let peers = self
            .hosts
            .iter()
            .filter(|p| p.name != host.name && p.with_enforcer)
            .map(|peer| PeerConfig {
                name: peer.name.clone(),
                tunnel: SocketAddr::from((peer.addr, TUNNEL_PORT)),
                serves: [
                    IpNet::from(IpAddr::from(peer.addr)),
                    IpNet::from(IpAddr::from(peer.addr6)),
                ]
                .into_iter()
                .chain(
                    opts.serves_extra
                        .get(&peer.name)
                        .into_iter()
                        .flatten()
                        .copied(),
                )
                .collect(),
                cert: Some(format!("ca/{}.pem", peer.name).into()),
                api: peer_api(peer).map(|(addr, _)| addr),
                api_token_file: peer_api(peer).and_then(|(_, token)| token),
                workloads: peer
                    .workloads
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|w| w.labels.clone())
                    .collect(),
            })
            .collect();
        let mut config = Config {
            name: host.name.clone(),
            mode: Some(if opts.handshake {
                DataPathMode::Handshake
            } else {
                DataPathMode::Tunnel
            }),
            listen: Listen {
                tunnel: SocketAddr::from((host.addr, TUNNEL_PORT)),
                ..Listen::default()
            },
            tls: Tls {
                ca: "ca/ca.pem".into(),
                cert: format!("ca/{}.pem", host.name).into(),
                key: format!("ca/{}.key", host.name).into(),
            },
            control: None,
            containers: opts.containers.get(&host.name).cloned(),
            bpf: Bpf {
                pin_dir: Some(self.pin_dir(host)),
                delivery: if opts.localhost_delivery {
                    DeliveryMode::Localhost
                } else {
                    DeliveryMode::OriginalSource
                },
                ..Bpf::default()
            },
            workloads,
            peers,
            tunnel: Tunnel {
                pool_size: opts.pool_size,
                ..Tunnel::default()
            },
            flows: Flows {
                log: Some(self.flow_log(host)),
                api: self.api_addr(host).to_string(),
                api_token_file: token_file,
                map_db: Some(self.map_db(host)),
                ..Flows::default()
            },
            policy,
            identity: IdentityConfig {
                tokens: opts.tokens,
                ..IdentityConfig::default()
            },
            handshake,
        };
        if let Some(c) = &opts.control {
            // The control plane issues the certificate, lists the peers, sends the policy.
            config.tls = Tls::default();
            config.peers = Vec::new();
            config.policy.file = None;
            let document = c.documents.get(&host.name);
            config.control = Some(ControlConfig {
                servers: c.servers_of.get(&host.name).unwrap_or(&c.servers).clone(),
                ca: c.ca.clone(),
                join_token_file: c.tokens.get(&host.name).cloned(),
                identity_document_file: document.map(|(f, _)| f.clone()),
                instance_id: document.map(|(_, i)| i.clone()),
                state_dir: self.control_state(host),
                advertise: Some(SocketAddr::from((host.addr, TUNNEL_PORT))),
                serves: vec![
                    IpNet::from(IpAddr::from(host.addr)),
                    IpNet::from(IpAddr::from(host.addr6)),
                ],
                report_secs: 2,
            });
        }
        Ok(config)
    }

    /// Starts `host`'s enforcer and waits until it serves.
    pub fn start_enforcer(&self, host: &Host) -> Result<()> {
        self.start_enforcer_with_env(host, &[])
    }

    /// [`TestNet::start_enforcer`] with extra environment variables (a hostile `PATH`, say).
    pub fn start_enforcer_with_env(&self, host: &Host, env: &[(&str, &str)]) -> Result<()> {
        let config = self.write_config(host)?;
        let ready = self.dir.join(format!("{}.ready", host.name));
        let _ = fs::remove_file(&ready);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(host))?;
        let mut args = vec![
            "run",
            "--config",
            config.to_str().unwrap(),
            "--ready-file",
            ready.to_str().unwrap(),
        ];
        if self.options.lock().unwrap().keep_attached {
            args.push("--keep-attached");
        }
        let cgroup = self
            .options
            .lock()
            .unwrap()
            .enforcer_cgroup
            .get(&host.name)
            .cloned()
            .unwrap_or_else(|| self.cgroup(host, Some("enforcer")));
        let mut child = self
            .command(host, &cgroup, self.bin.to_str().unwrap(), &args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "enforcer on {} exited ({status}) during start-up:\n{}",
                    host.name,
                    self.enforcer_log(host)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "enforcer on {} not ready within 30 s:\n{}",
                    host.name,
                    self.enforcer_log(host)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        *host.enforcer.lock().unwrap() = Some(child);
        Ok(())
    }

    pub fn start_enforcers(&self) -> Result<()> {
        for h in self.hosts.iter().filter(|h| h.with_enforcer) {
            self.start_enforcer(h)?;
        }
        // Let the tunnel pools warm (an enforcer that started before its peer retries with
        // backoff), so tests see the steady state, not first handshakes.
        thread::sleep(Duration::from_millis(1000));
        Ok(())
    }

    /// Starts two hosts' enforcers at the same moment (a race, e.g. for one join token);
    /// each one's start-up result, errors as text.
    pub fn start_enforcers_racing(
        &self,
        a: &Host,
        b: &Host,
    ) -> (Result<(), String>, Result<(), String>) {
        let barrier = std::sync::Barrier::new(2);
        let start = |h| {
            barrier.wait();
            self.start_enforcer(h).map_err(|e| format!("{e:#}"))
        };
        thread::scope(|s| {
            let ta = s.spawn(|| start(a));
            let tb = s.spawn(|| start(b));
            (ta.join().unwrap(), tb.join().unwrap())
        })
    }

    /// Stops `host`'s enforcer with SIGTERM (or SIGKILL) and waits for it.
    pub fn stop_enforcer(&self, host: &Host, kill: bool) -> Result<()> {
        let Some(mut child) = host.enforcer.lock().unwrap().take() else {
            return Ok(());
        };
        let sig = if kill { libc::SIGKILL } else { libc::SIGTERM };
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("enforcer on {} ignored SIGTERM for 10 s", host.name);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The enforcer's pid (to read its memory, say).
    pub fn enforcer_pid(&self, host: &Host) -> Option<u32> {
        host.enforcer.lock().unwrap().as_ref().map(Child::id)
    }

    pub fn enforcer_log(&self, host: &Host) -> String {
        fs::read_to_string(self.log_path(host)).unwrap_or_default()
    }

    /// Flow records `host`'s enforcer wrote so far.
    pub fn flows(&self, host: &Host) -> Vec<FlowRecord> {
        self.flows_json(host)
            .into_iter()
            .map(|v| {
                serde_json::from_value(v.clone())
                    .unwrap_or_else(|e| panic!("not a flow record ({e}): {v}"))
            })
            .collect()
    }

    /// The same records as raw JSON, for a test that checks how fields are spelled. A line
    /// being written (not yet valid JSON) is left out.
    pub fn flows_json(&self, host: &Host) -> Vec<serde_json::Value> {
        fs::read_to_string(self.flow_log(host))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until flow records matching `pred` number at least `n` on `host`.
    pub fn wait_flows(
        &self,
        host: &Host,
        n: usize,
        pred: impl Fn(&FlowRecord) -> bool,
    ) -> Vec<FlowRecord> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got: Vec<_> = self.flows(host).into_iter().filter(|f| pred(f)).collect();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}
