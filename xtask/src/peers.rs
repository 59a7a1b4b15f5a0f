//! `cargo xtask bench --peers`: Tessera side by side with two other ways of putting TLS
//! between two hosts, measured with the same load programs, servers and test net in the same
//! run, so that a ratio means the same thing in every column:
//!
//! * **ztunnel** (Istio ambient's node proxy) in HBONE mode: one per host, `FAKE_CA` (a
//!   built-in test root, so the two trust each other without istiod), workloads from a local
//!   file, the client's traffic captured with an iptables REDIRECT to its port 15001. Built
//!   once from `../shared/peers/` into a cache directory (`--ztunnel PATH` to use another
//!   binary); never in CI.
//! * **stunnel4** (Debian): client mode on the client host (plaintext in through a REDIRECT,
//!   TLS 1.3 out, mutual certificates), server mode on the server host.
//!
//! ztunnel's ports (15001, 15006, 15008) are hard-coded and are Tessera's too, so the peers
//! run on four more test hosts of the same net (same bridge, same kernel): `peer-a`, the
//! direct client, in a namespace without netfilter rules (REDIRECT turns on connection
//! tracking); `zt-a` and `st-a`, the peers' clients, each with its REDIRECT rules; `peer-b`,
//! the server host of all three (iperf3 and the echo server, ztunnel's and stunnel's server
//! ends). Tessera's columns are host-a (enrolled) to host-b (protected ports).
//!
//! Every round measures direct, ztunnel, stunnel, Tessera's tunnel mode and its TCP-handshake
//! mode one after the other (each proxy started for its turn and stopped after it, so only
//! one runs at a time); a figure is the median of the rounds with min–max, each ratio taken
//! against the direct figure of its own round. The CPU steal (`/proc/stat`) is read for every
//! round and every system in it; a round with steal above [`STEAL_LIMIT_PCT`] is run again
//! (bounded) and, if the steal stays high, kept and flagged.
//!
//! Why a proxy costs what it costs per connection is counted, not guessed: after each
//! proxy's measured connection-rate run, a second short one and a short round-trip run go
//! under `perf stat` attached to its processes (every thread, also those started during the
//! run) and give the system calls and context switches per connection and per round trip,
//! both ends together. The counting slows those runs, which is why they are separate: no
//! other figure is taken while perf watches.
use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use tessera_tests::{Host, TestNet};

use crate::bench::{CpuTimes, out_json, rss_kib, spread};

/// The ztunnel source the bench builds: `../shared/peers/ztunnel-<ZTUNNEL_COMMIT>.tar.gz`.
const ZTUNNEL_COMMIT: &str = "62d82653";
/// Rounds with more CPU steal than this are repeated (then flagged).
pub const STEAL_LIMIT_PCT: f64 = 5.0;
/// ztunnel's own sockets carry this mark (`PACKET_MARK`); the REDIRECT skips them.
const ZTUNNEL_MARK: &str = "1337";

/// The extra test hosts the peers run on (after host-a and host-b).
pub const HOSTS: [&str; 4] = ["peer-a", "zt-a", "st-a", "peer-b"];

/// The servers' plain ports on peer-b (the same programs as host-b's unprotected ones).
const IPERF_PORT: u16 = 5202;
const ECHO_PORT: u16 = 7002;
/// stunnel: the client's accept ports (REDIRECT targets) and the server's TLS ports.
const ST_CLIENT: [u16; 2] = [16202, 17002];
const ST_SERVER: [u16; 2] = [26202, 27002];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Direct,
    Ztunnel,
    Stunnel,
    Tunnel,
    Handshake,
}

/// The order of every round.
const ORDER: [System; 5] = [
    System::Direct,
    System::Ztunnel,
    System::Stunnel,
    System::Tunnel,
    System::Handshake,
];

impl System {
    fn key(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::Ztunnel => "ztunnel",
            System::Stunnel => "stunnel",
            System::Tunnel => "tessera_tunnel",
            System::Handshake => "tessera_handshake",
        }
    }

    fn label(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::Ztunnel => "ztunnel HBONE",
            System::Stunnel => "stunnel TLS1.3",
            System::Tunnel => "Tessera tunnel",
            System::Handshake => "Tessera handshake",
        }
    }
}

/// Figures that are ratios to direct (higher or lower is better: see the table).
const RATIO_FIGURES: [&str; 4] = [
    "throughput_bps",
    "connections_per_second",
    "latency_p50_us",
    "latency_p99_us",
];
/// Figures of the proxies themselves (none for direct).
const OWN_FIGURES: [&str; 8] = [
    "cpu_ms_per_1000_connections",
    "syscalls_per_connection",
    "context_switches_per_connection",
    "syscalls_per_round_trip",
    "context_switches_per_round_trip",
    "cpu_us_per_round_trip",
    "idle_rss_kib_client",
    "idle_rss_kib_server",
];
/// The counted runs (see the module's doc): 2 s of new connections, 5,000 round trips.
const COUNTED_SECS: &str = "2";
const COUNTED_TRIPS: &str = "5000";

// ---------------------------------------------------------------------------------------
// The ztunnel binary: found or built once, cached.

/// The cache directory: `$XDG_CACHE_HOME/tessera-peers` or `~/.cache/tessera-peers`.
fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(
            std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?,
        )
        .join(".cache"),
    };
    Ok(base.join("tessera-peers"))
}

/// The ztunnel binary: `explicit` if given, else the cached build, else built now from
/// `../shared/peers/` (once: ~25 minutes on 2 cores). Refuses to run in CI.
pub fn ztunnel_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
        bail!("`bench --peers` never runs in CI (it builds and runs third-party proxies)");
    }
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("--ztunnel {}: no such file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let cache = cache_dir()?.join(format!("ztunnel-{ZTUNNEL_COMMIT}"));
    let bin = cache.join("ztunnel");
    if bin.is_file() {
        return Ok(bin);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tarball = root.join(format!("../shared/peers/ztunnel-{ZTUNNEL_COMMIT}.tar.gz"));
    if !tarball.is_file() {
        bail!(
            "no ztunnel binary in {} and no source at {} to build it from (or pass --ztunnel PATH)",
            bin.display(),
            tarball.display()
        );
    }
    if tessera_tests::which("protoc").is_none() {
        bail!(
            "building ztunnel needs protoc: apt-get install protobuf-compiler (or `cargo xtask setup`)"
        );
    }
    let src = cache.join("src");
    let log = cache.join("build.log");
    eprintln!(
        "bench: no cached ztunnel; building it once from {} into {} (about 25 minutes on 2 cores; log: {})",
        tarball.display(),
        cache.display(),
        log.display()
    );
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src)?;
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&src)
        .status()?;
    if !status.success() {
        bail!("cannot unpack {}", tarball.display());
    }
    let target = cache.join("target");
    let out = fs::File::create(&log)?;
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "build",
            "--profile",
            "quick-release",
            "--features",
            "testing",
        ])
        .args(["--bin", "ztunnel"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &target)
        .env("CARGO_INCREMENTAL", "0")
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        let text = fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        bail!(
            "building ztunnel failed ({status}); last lines of {}:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    fs::copy(target.join("quick-release/ztunnel"), &bin)?;
    eprintln!("bench: ztunnel built and cached at {}", bin.display());
    Ok(bin)
}

/// Installs Debian's `package` if `program` is missing: only `--peers` needs stunnel4 and
/// perf.
fn ensure(program: &str, package: &str) -> Result<PathBuf> {
    if let Some(p) = tessera_tests::which(program) {
        return Ok(p);
    }
    eprintln!("bench: installing {package} (Debian) for the side-by-side bench");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    match tessera_tests::which(program) {
        Some(p) if ok => Ok(p),
        _ => bail!("{program} is missing and could not be installed (apt-get install {package})"),
    }
}

// ---------------------------------------------------------------------------------------
// Guards: whatever a round starts is gone when it ends, also on failure.

/// Proxy processes of one turn: SIGTERM, then SIGKILL after 5 s, when dropped.
struct Procs(Vec<Child>);

impl Procs {
    fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }

    /// Fails (with the log) if one of them has exited.
    fn check_alive(&mut self, logs: &[PathBuf]) -> Result<()> {
        for (c, log) in self.0.iter_mut().zip(logs) {
            if let Some(status) = c.try_wait()? {
                bail!("{} exited ({status}):\n{}", log.display(), tail(log, 30));
            }
        }
        Ok(())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.0 {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Tessera's two enforcers for one turn: stopped when dropped.
struct Enforcers<'a>(&'a TestNet);

impl Drop for Enforcers<'_> {
    fn drop(&mut self) {
        for h in ["host-a", "host-b"] {
            let _ = self.0.stop_enforcer(self.0.host(h), false);
        }
    }
}

/// An iptables rule in a test host's `nat` OUTPUT chain, deleted when dropped (the
/// namespace goes with the TestNet anyway; this keeps a failed run's rules from lingering
/// while it unwinds).
struct NatRule {
    netns: String,
    spec: Vec<String>,
}

impl NatRule {
    fn add(netns: &str, spec: &[&str]) -> Result<Self> {
        let spec: Vec<String> = spec.iter().map(|s| s.to_string()).collect();
        iptables(netns, "-A", &spec)?;
        Ok(Self {
            netns: netns.to_string(),
            spec,
        })
    }
}

impl Drop for NatRule {
    fn drop(&mut self) {
        let _ = iptables(&self.netns, "-D", &self.spec);
    }
}

fn iptables(netns: &str, op: &str, spec: &[String]) -> Result<()> {
    let mut args = vec![
        "netns", "exec", netns, "iptables", "-w", "-t", "nat", op, "OUTPUT",
    ];
    args.extend(spec.iter().map(String::as_str));
    tessera_tests::sh("ip", &args).map(drop)
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// The section.

struct Peers<'a> {
    net: &'a TestNet,
    load: &'a str,
    secs: u64,
    ztunnel: PathBuf,
    stunnel: PathBuf,
    dir: PathBuf,
    server: Ipv4Addr,
    /// HBONE connections seen at peer-b's port 15008 while a ztunnel connection was open.
    hbone_seen: std::cell::Cell<usize>,
    /// See [`section`].
    restart_echo: &'a dyn Fn() -> Result<()>,
}

/// Where a system's client runs and what it connects to.
struct Route<'a> {
    host: &'a Host,
    workload: Option<&'a str>,
    iperf: String,
    echo: String,
}

/// Runs the side-by-side section on `net` (which has host-a, host-b and [`HOSTS`]); host-b
/// already serves iperf3 on 5201 and the echo server on 7001 to the enrolled `server`
/// workload, host-a has the enrolled `client`.
///
/// `restart_echo` restarts host-b's echo server and warms it with one connection: called
/// once Tessera's handshake mode runs, so that the fast path serves it as in the handshake
/// section.
pub fn section(
    net: &TestNet,
    load: &str,
    quick: bool,
    ztunnel: &Path,
    restart_echo: &dyn Fn() -> Result<()>,
) -> Result<Value> {
    let started = Instant::now();
    let stunnel = ensure("stunnel4", "stunnel4")?;
    ensure("perf", "linux-perf")?;
    let secs = if quick { 2 } else { 5 };
    let repeats = 3;
    let max_attempts = if quick { 1 } else { 2 };
    let dir = net.dir.join("peers");
    fs::create_dir_all(&dir)?;
    let server = net.host("peer-b").addr;
    let p = Peers {
        net,
        load,
        secs,
        ztunnel: ztunnel.to_path_buf(),
        stunnel,
        dir,
        server,
        hbone_seen: std::cell::Cell::new(0),
        restart_echo,
    };
    let _rules = p.prepare()?;

    let mut rounds = vec![];
    let mut used: Vec<Value> = vec![];
    for round in 1..=repeats {
        let mut best: Option<Value> = None;
        for attempt in 1..=max_attempts {
            eprintln!("bench: peers, round {round}/{repeats} (attempt {attempt})");
            let t = CpuTimes::now()?;
            let mut systems = Map::new();
            for sys in ORDER {
                systems.insert(sys.key().into(), p.measure(sys)?);
            }
            let steal = t.steal_pct_since()?;
            let r = json!({
                "round": round,
                "attempt": attempt,
                "steal_pct": steal,
                "flagged": steal > STEAL_LIMIT_PCT,
                // Not steal, but what else ran on this VM's cores (other builds, say).
                "loadavg_1m": loadavg(),
                "systems": systems,
            });
            rounds.push(r.clone());
            if best
                .as_ref()
                .is_none_or(|b| b["steal_pct"].as_f64().unwrap_or(f64::MAX) > steal)
            {
                best = Some(r);
            }
            if steal <= STEAL_LIMIT_PCT {
                break;
            }
            eprintln!(
                "bench: peers, round {round}: CPU steal {steal:.1}% > {STEAL_LIMIT_PCT}%{}",
                if attempt < max_attempts {
                    ", running it again"
                } else {
                    ", kept and flagged"
                }
            );
        }
        used.extend(best);
    }
    let mut summary = Map::new();
    let mut ratios = Map::new();
    for fig in RATIO_FIGURES.iter().chain(&OWN_FIGURES) {
        let mut per = Map::new();
        let mut per_ratio = Map::new();
        for sys in ORDER {
            let vals: Vec<f64> = used
                .iter()
                .filter_map(|r| r["systems"][sys.key()][fig].as_f64())
                .collect();
            if vals.is_empty() {
                continue;
            }
            per.insert(sys.key().into(), spread(&vals));
            if RATIO_FIGURES.contains(fig) && sys != System::Direct {
                let rs: Vec<f64> = used
                    .iter()
                    .filter_map(|r| {
                        let s = &r["systems"];
                        let d = s["direct"][fig].as_f64()?;
                        (d > 0.0).then(|| s[sys.key()][fig].as_f64().map(|v| v / d))?
                    })
                    .collect();
                per_ratio.insert(sys.key().into(), spread(&rs));
            }
        }
        summary.insert((*fig).into(), per.into());
        if !per_ratio.is_empty() {
            ratios.insert((*fig).into(), per_ratio.into());
        }
    }
    let steals: Vec<f64> = used
        .iter()
        .filter_map(|r| r["steal_pct"].as_f64())
        .collect();
    Ok(json!({
        "systems": ORDER.iter().map(|s| s.key()).collect::<Vec<_>>(),
        "repeats": repeats,
        "seconds_per_run": secs,
        "steal_limit_pct": STEAL_LIMIT_PCT,
        "steal_pct": spread(&steals),
        "kept_attempts": used.iter().map(|r| format!("{}.{}", r["round"], r["attempt"])).collect::<Vec<_>>(),
        "flagged_rounds": used.iter().filter(|r| r["flagged"] == true).map(|r| r["round"].clone()).collect::<Vec<_>>(),
        "summary": summary,
        "ratio": ratios,
        "rounds": rounds,
        "ztunnel": {
            "binary": p.ztunnel.display().to_string(),
            "source_commit": ZTUNNEL_COMMIT,
            "hbone_connections_seen_on_15008": p.hbone_seen.get(),
        },
        "section_seconds": started.elapsed().as_secs_f64(),
    }))
}

impl Peers<'_> {
    fn host(&self, name: &str) -> &Host {
        self.net.host(name)
    }

    /// Servers on peer-b, sysctls, certificates, configuration files and the REDIRECT rules.
    fn prepare(&self) -> Result<Vec<NatRule>> {
        let net = self.net;
        let b = self.host("peer-b");
        // As on host-a: reuse TIME_WAIT ports, a wide port range that keeps the proxies'
        // and servers' ports out of it. peer-b too: ztunnel's and stunnel's server ends
        // open a connection to the local server for every client connection.
        let reserved =
            "5202,7002,15000,15001,15006,15008,15020,15021,15053,16202,17002,26202,27002";
        for h in HOSTS {
            for (key, value) in [
                ("net.ipv4.tcp_tw_reuse", "1"),
                ("net.ipv4.ip_local_port_range", "1024 65000"),
                ("net.ipv4.ip_local_reserved_ports", reserved),
            ] {
                tessera_tests::sh(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &self.host(h).netns,
                        "sysctl",
                        "-q",
                        "-w",
                        &format!("{key}={value}"),
                    ],
                )?;
            }
        }
        let servers = [
            net.spawn(b, None, "iperf3", &["-s", "-p", &IPERF_PORT.to_string()])?,
            net.spawn(
                b,
                None,
                self.load,
                &["load", "serve-echo", &ECHO_PORT.to_string()],
            )?,
        ];
        for (pid, port) in servers.iter().zip([IPERF_PORT, ECHO_PORT]) {
            net.wait_listening(*pid, port)?;
        }
        self.write_ztunnel_workloads()?;
        self.write_stunnel_files()?;
        let server = self.server.to_string();
        let zt = self.host("zt-a");
        let st = self.host("st-a");
        let mut rules = vec![NatRule::add(
            &zt.netns,
            &[
                "-p",
                "tcp",
                "!",
                "-o",
                "lo",
                "-d",
                &server,
                "-m",
                "multiport",
                "--dports",
                &format!("{IPERF_PORT},{ECHO_PORT}"),
                "-m",
                "mark",
                "!",
                "--mark",
                "0x539/0xfff",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ],
        )?];
        for (dport, to) in [IPERF_PORT, ECHO_PORT].into_iter().zip(ST_CLIENT) {
            rules.push(NatRule::add(
                &st.netns,
                &[
                    "-p",
                    "tcp",
                    "!",
                    "-o",
                    "lo",
                    "-d",
                    &server,
                    "--dport",
                    &dport.to_string(),
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    &to.to_string(),
                ],
            )?);
        }
        Ok(rules)
    }

    fn write_ztunnel_workloads(&self) -> Result<()> {
        let (zt, b) = (self.host("zt-a"), self.host("peer-b"));
        let yaml = format!(
            "workloads:\n\
             - {{uid: \"cluster1//v1/Pod/default/client\", name: client, namespace: default, serviceAccount: client,\n   \
             workloadIps: [\"{}\"], protocol: HBONE, node: {}, network: \"\", services: {{}}}}\n\
             - {{uid: \"cluster1//v1/Pod/default/server\", name: server, namespace: default, serviceAccount: server,\n   \
             workloadIps: [\"{}\"], protocol: HBONE, node: {}, network: \"\", services: {{}}}}\n",
            zt.addr, zt.name, b.addr, b.name
        );
        fs::write(self.dir.join("workloads.yaml"), yaml)?;
        Ok(())
    }

    /// A CA and two certificates (ECDSA P-256, as ztunnel's) and both stunnel configurations.
    fn write_stunnel_files(&self) -> Result<()> {
        let d = &self.dir;
        let s = |p: &str| d.join(p).to_string_lossy().into_owned();
        let openssl = |args: &[&str]| tessera_tests::sh("openssl", args).map(drop);
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        let (ca_key, ca_pem) = (s("ca.key"), s("ca.pem"));
        ca.extend([
            "-keyout",
            &ca_key,
            "-out",
            &ca_pem,
            "-subj",
            "/CN=bench-ca",
            "-days",
            "2",
        ]);
        openssl(&ca)?;
        for name in ["client", "server"] {
            let (key, csr, pem) = (
                s(&format!("{name}.key")),
                s(&format!("{name}.csr")),
                s(&format!("{name}.pem")),
            );
            let subj = format!("/CN={name}");
            let mut req = vec!["req"];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(&req)?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
            ])?;
        }
        // `syslog = no` and `foreground = quiet` with `output`: with no syslog daemon here
        // glibc would write every log line to the console (20x slower).
        let common = |name: &str| {
            format!(
                "foreground = quiet\nsyslog = no\noutput = {}\npid =\n\
                 socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n\
                 cert = {}\nkey = {}\nCAfile = {ca_pem}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n",
                s(&format!("stunnel-{name}.log")),
                s(&format!("{name}.pem")),
                s(&format!("{name}.key")),
            )
        };
        let mut client = common("client") + "client = yes\ncheckHost = server\n";
        let mut server = common("server") + "requireCert = yes\n";
        for (i, svc) in ["iperf", "echo"].iter().enumerate() {
            let app = [IPERF_PORT, ECHO_PORT][i];
            client += &format!(
                "[{svc}]\naccept = {}\nconnect = {}:{}\n",
                ST_CLIENT[i], self.server, ST_SERVER[i]
            );
            server += &format!(
                "[{svc}]\naccept = {}:{}\nconnect = {}:{app}\n",
                self.server, ST_SERVER[i], self.server
            );
        }
        fs::write(d.join("stunnel-client.conf"), client)?;
        fs::write(d.join("stunnel-server.conf"), server)?;
        Ok(())
    }

    fn route(&self, sys: System) -> Route<'_> {
        let peer = |host: &str| Route {
            host: self.host(host),
            workload: None,
            iperf: format!("{}:{IPERF_PORT}", self.server),
            echo: format!("{}:{ECHO_PORT}", self.server),
        };
        match sys {
            System::Direct => peer("peer-a"),
            System::Ztunnel => peer("zt-a"),
            System::Stunnel => peer("st-a"),
            System::Tunnel | System::Handshake => {
                let b = self.host("host-b").addr;
                Route {
                    host: self.host("host-a"),
                    workload: Some("client"),
                    iperf: format!("{b}:5201"),
                    echo: format!("{b}:7001"),
                }
            }
        }
    }

    /// A process in `host`'s namespace (its unenrolled cgroup), output to `log`.
    fn spawn(
        &self,
        host: &Host,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Child> {
        let out = fs::File::create(log)?;
        let mut cmd = self.net.command(
            host,
            &self.net.cgroup(host, None),
            program.to_str().unwrap(),
            args,
        );
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        cmd.spawn()
            .with_context(|| format!("cannot start {} on {}", program.display(), host.name))
    }

    fn start_ztunnel(&self) -> Result<Procs> {
        let yaml = self.dir.join("workloads.yaml");
        let mut procs = Procs(vec![]);
        let mut logs = vec![];
        for (host, name) in [("zt-a", "client"), ("peer-b", "server")] {
            let h = self.host(host);
            let info = format!("default/{name}/{name}");
            let log = self.dir.join(format!("ztunnel-{host}.log"));
            let env = [
                ("FAKE_CA", "true"),
                ("XDS_ADDRESS", ""),
                ("LOCAL_XDS_PATH", yaml.to_str().unwrap()),
                ("PROXY_MODE", "dedicated"),
                ("PROXY_WORKLOAD_INFO", info.as_str()),
                ("PACKET_MARK", ZTUNNEL_MARK),
                ("ENABLE_ORIG_SRC", "false"),
                ("NODE_NAME", host),
            ];
            procs.0.push(self.spawn(h, &self.ztunnel, &[], &env, &log)?);
            logs.push(log);
        }
        // Ready (certificates from the fake CA, workloads loaded) on :15021.
        for host in ["zt-a", "peer-b"] {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                procs.check_alive(&logs)?;
                let out = self.net.run(
                    self.host(host),
                    None,
                    "curl",
                    &["-sf", "-m", "2", "http://127.0.0.1:15021/healthz/ready"],
                    Duration::from_secs(10),
                )?;
                if out.status.success() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "ztunnel on {host} not ready within 60 s:\n{}",
                        tail(&self.dir.join(format!("ztunnel-{host}.log")), 30)
                    );
                }
                thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(procs)
    }

    fn start_stunnel(&self) -> Result<Procs> {
        let mut procs = Procs(vec![]);
        let mut logs = vec![];
        for (host, name) in [("st-a", "client"), ("peer-b", "server")] {
            let conf = self.dir.join(format!("stunnel-{name}.conf"));
            let log = self.dir.join(format!("stunnel-{name}.out"));
            procs.0.push(self.spawn(
                self.host(host),
                &self.stunnel,
                &[conf.to_str().unwrap()],
                &[],
                &log,
            )?);
            logs.push(log);
        }
        let pids = procs.pids();
        for (pid, port) in [
            (pids[0], ST_CLIENT[0]),
            (pids[0], ST_CLIENT[1]),
            (pids[1], ST_SERVER[0]),
            (pids[1], ST_SERVER[1]),
        ] {
            procs.check_alive(&logs)?;
            self.net.wait_listening(pid, port)?;
        }
        Ok(procs)
    }

    fn start_tessera(&self, handshake: bool) -> Result<(Enforcers<'_>, Vec<u32>)> {
        let net = self.net;
        let guard = Enforcers(net);
        for h in ["host-a", "host-b"] {
            net.stop_enforcer(net.host(h), false)?;
        }
        {
            let mut o = net.options.lock().unwrap();
            o.handshake = handshake;
            o.pool_size = 16;
            o.tokens = true;
            o.pass_through = false;
            o.key_reuse_ms = None;
        }
        net.start_enforcers()?;
        let pids = ["host-a", "host-b"]
            .iter()
            .map(|h| net.enforcer_pid(net.host(h)).context("enforcer pid"))
            .collect::<Result<_>>()?;
        Ok((guard, pids))
    }

    /// One system's turn in a round: start it, its idle memory, throughput, connection rate
    /// with the CPU it took, latency; stop it.
    fn measure(&self, sys: System) -> Result<Value> {
        let t = CpuTimes::now()?;
        let mut procs = None;
        let mut tessera = None;
        let pids: Vec<u32> = match sys {
            System::Direct => vec![],
            System::Ztunnel => procs.insert(self.start_ztunnel()?).pids(),
            System::Stunnel => procs.insert(self.start_stunnel()?).pids(),
            System::Tunnel | System::Handshake => {
                let (g, pids) = self.start_tessera(sys == System::Handshake)?;
                tessera = Some(g);
                if sys == System::Handshake {
                    (self.restart_echo)()?;
                }
                pids
            }
        };
        thread::sleep(Duration::from_millis(300));
        let rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect::<Result<_>>()?;
        let route = self.route(sys);
        let tp = self.iperf(&route)?;
        let cpu0 = cpu_secs(&pids)?;
        let (cps, n) = self.connrate(&route, sys)?;
        let cpu = cpu_secs(&pids)? - cpu0;
        let counted = if pids.is_empty() {
            None
        } else {
            let conns = ["load", "connrate", &route.echo, COUNTED_SECS, "500000", "4"];
            let trips = ["load", "rr", &route.echo, COUNTED_TRIPS];
            Some((
                self.counted(&route, sys, &pids, &conns, "connections")?,
                self.counted(&route, sys, &pids, &trips, "count")?,
            ))
        };
        let (p50, p99) = self.latency(&route)?;
        match sys {
            System::Ztunnel => self.check_hbone(&route)?,
            System::Stunnel => self.check_stunnel()?,
            _ => {}
        }
        drop(procs);
        drop(tessera);
        let mut v = json!({
            "throughput_bps": tp,
            "connections_per_second": cps,
            "connections": n,
            "latency_p50_us": p50,
            "latency_p99_us": p99,
            "steal_pct": t.steal_pct_since()?,
        });
        if !pids.is_empty() {
            v["cpu_ms_per_1000_connections"] = json!(if n > 0.0 { cpu * 1e6 / n } else { 0.0 });
            v["idle_rss_kib_client"] = json!(rss[0]);
            v["idle_rss_kib_server"] = json!(rss[1]);
        }
        if let Some((c, t)) = counted {
            v["syscalls_per_connection"] = json!(c.syscalls);
            v["context_switches_per_connection"] = json!(c.switches);
            v["syscalls_per_round_trip"] = json!(t.syscalls);
            v["context_switches_per_round_trip"] = json!(t.switches);
            v["cpu_us_per_round_trip"] = json!(t.cpu_us);
        }
        eprintln!(
            "bench: peers, {:<18} {:>6.2} Gbit/s {:>7.0} conn/s p50 {:>6.0} us p99 {:>6.0} us (steal {:.1}%)",
            sys.label(),
            tp / 1e9,
            cps,
            p50,
            p99,
            v["steal_pct"].as_f64().unwrap_or(0.0)
        );
        Ok(v)
    }

    fn iperf(&self, r: &Route) -> Result<f64> {
        let (ip, port) = r.iperf.rsplit_once(':').unwrap();
        let t = self.secs.to_string();
        let out = self.net.run(
            r.host,
            r.workload,
            "iperf3",
            &["-c", ip, "-p", port, "-t", &t, "-J"],
            Duration::from_secs(self.secs + 30),
        )?;
        out_json(&out, "iperf3")?["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 reported no throughput")
    }

    fn connrate(&self, r: &Route, sys: System) -> Result<(f64, f64)> {
        let secs = self.secs.to_string();
        let out = self.net.run(
            r.host,
            r.workload,
            self.load,
            &["load", "connrate", &r.echo, &secs, "500000", "4"],
            Duration::from_secs(self.secs + 30),
        )?;
        let v = out_json(&out, "connrate")?;
        if v["errors"].as_u64().unwrap_or(0) > 0 {
            eprintln!(
                "bench: peers, connrate ({}) saw {} errors",
                sys.label(),
                v["errors"]
            );
        }
        Ok((
            v["per_second"].as_f64().context("no rate")?,
            v["connections"].as_f64().context("no count")?,
        ))
    }

    /// `load ARGS` with `perf stat` counting the system calls and context switches of
    /// `pids` (every thread, also new ones), per unit of the load's JSON field `per` (its
    /// connections, its round trips).
    fn counted(
        &self,
        r: &Route,
        sys: System,
        pids: &[u32],
        args: &[&str],
        per: &str,
    ) -> Result<Counted> {
        let out = self
            .dir
            .join(format!("perf-stat-{}-{}.csv", sys.key(), args[1]));
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        let mut perf = Command::new("perf")
            .args([
                "stat",
                "-x",
                ",",
                "-e",
                "raw_syscalls:sys_enter,context-switches,task-clock",
            ])
            .args(["-p", &list.join(","), "-o"])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start perf stat (apt-get install linux-perf)")?;
        let perf_guard = PerfStat(Some(&mut perf));
        thread::sleep(Duration::from_millis(200));
        let run = self
            .net
            .run(r.host, r.workload, self.load, args, Duration::from_secs(60));
        drop(perf_guard);
        let n = out_json(&run?, args[1])?[per]
            .as_f64()
            .with_context(|| format!("counted {}: no {per}", args[1]))?;
        let text = fs::read_to_string(&out)
            .with_context(|| format!("perf stat wrote no {}", out.display()))?;
        let count = |event: &str| -> Result<f64> {
            text.lines()
                .find(|l| l.split(',').nth(2) == Some(event))
                .and_then(|l| l.split(',').next()?.parse::<f64>().ok())
                .with_context(|| format!("{}: no count of {event}", out.display()))
        };
        if n <= 0.0 {
            bail!("counted {} ({}): nothing done", args[1], sys.label());
        }
        Ok(Counted {
            syscalls: count("raw_syscalls:sys_enter")? / n,
            switches: count("context-switches")? / n,
            // task-clock is in milliseconds.
            cpu_us: count("task-clock")? * 1000.0 / n,
        })
    }

    fn latency(&self, r: &Route) -> Result<(f64, f64)> {
        let count = (self.secs * 4000).to_string();
        let out = self.net.run(
            r.host,
            r.workload,
            self.load,
            &["load", "rr", &r.echo, &count],
            Duration::from_secs(90),
        )?;
        let v = out_json(&out, "rr")?;
        Ok((
            v["p50_us"].as_f64().context("p50")?,
            v["p99_us"].as_f64().context("p99")?,
        ))
    }

    /// ztunnel really carried the traffic over HBONE: while a client connection is held open
    /// peer-b has an established connection on :15008 (HBONE), and the client's access log
    /// names the HBONE address.
    fn check_hbone(&self, r: &Route) -> Result<()> {
        let ready = self.dir.join("hbone-hold.ready");
        let _ = fs::remove_file(&ready);
        let holder = self.net.command(
            r.host,
            &self.net.cgroup(r.host, None),
            self.load,
            &["load", "hold", &r.echo, "1", ready.to_str().unwrap(), "30"],
        );
        let mut holder = Procs(vec![{
            let mut c = holder;
            c.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?
        }]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            if Instant::now() > deadline {
                bail!("ztunnel: a held connection through it did not open within 20 s");
            }
            if let Some(s) = holder.0[0].try_wait()? {
                bail!("ztunnel: the held connection failed ({s})");
            }
            thread::sleep(Duration::from_millis(50));
        }
        let out = tessera_tests::sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.host("peer-b").netns,
                "ss",
                "-Htn",
                "state",
                "established",
                "( sport = :15008 )",
            ],
        )?;
        let hbone = out.lines().filter(|l| !l.trim().is_empty()).count();
        let _ = fs::remove_file(&ready);
        holder.0[0].wait()?;
        holder.0.clear();
        let log =
            strip_ansi(&fs::read_to_string(self.dir.join("ztunnel-zt-a.log")).unwrap_or_default());
        let needle = format!("dst.hbone_addr={}:", self.server);
        if hbone == 0 || !log.contains(&needle) {
            bail!(
                "ztunnel did not carry the traffic over HBONE: {hbone} connections on peer-b:15008, \
                 access log with {needle:?}: {}",
                log.contains(&needle)
            );
        }
        self.hbone_seen.set(self.hbone_seen.get().max(hbone));
        Ok(())
    }

    /// stunnel's server end accepted the connections (the REDIRECT sent them through it).
    fn check_stunnel(&self) -> Result<()> {
        let log = fs::read_to_string(self.dir.join("stunnel-server.log")).unwrap_or_default();
        if !log.contains("Service [echo] accepted connection") {
            bail!(
                "stunnel's server end logged no accepted connection: the traffic did not go through it\n{}",
                tail(&self.dir.join("stunnel-server.log"), 20)
            );
        }
        Ok(())
    }
}

/// The 1-minute load average (`/proc/loadavg`).
fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// `text` without terminal colour codes (ESC [ ... letter).
pub(crate) fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Per connection, both ends of a proxy together.
struct Counted {
    syscalls: f64,
    switches: f64,
    /// CPU time (perf's task-clock), µs; per connection the unperturbed figure is
    /// `cpu_ms_per_1000_connections`, from the measured run.
    cpu_us: f64,
}

/// Stops `perf stat` (SIGINT: it writes its counts and exits), also on failure.
struct PerfStat<'a>(Option<&'a mut Child>);

impl Drop for PerfStat<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = p.wait();
        }
    }
}

/// CPU time (user + system, seconds) `pids` have used so far.
fn cpu_secs(pids: &[u32]) -> Result<f64> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let mut total = 0.0;
    for pid in pids {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let rest = stat.rsplit_once(')').context("stat")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        total += (f[11].parse::<f64>()? + f[12].parse::<f64>()?) / ticks;
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------
// The table.

pub fn print_table(p: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let cell = |v: &Value, scale: f64, prec: usize, suffix: &str| {
        if v["n"].as_u64().unwrap_or(0) == 0 {
            return "-".to_string();
        }
        format!(
            "{:.prec$}{suffix} ({:.prec$}-{:.prec$})",
            f(&v["median"]) / scale,
            f(&v["min"]) / scale,
            f(&v["max"]) / scale
        )
    };
    println!(
        "\nside by side: median of {} rounds (min-max); ratios to direct in the same round; {} s runs",
        p["repeats"], p["seconds_per_run"]
    );
    print!("{:<30}", "metric");
    for sys in ORDER {
        print!(" {:>21}", sys.label());
    }
    println!();
    let rows: [(&str, &str, f64, usize); 12] = [
        ("throughput (Gbit/s; ratio)", "throughput_bps", 1e9, 2),
        (
            "new connections/s (ratio)",
            "connections_per_second",
            1.0,
            0,
        ),
        ("latency p50 (us; ratio)", "latency_p50_us", 1.0, 0),
        ("latency p99 (us; ratio)", "latency_p99_us", 1.0, 0),
        (
            "CPU ms / 1,000 conns, both",
            "cpu_ms_per_1000_connections",
            1.0,
            0,
        ),
        ("syscalls / conn, both", "syscalls_per_connection", 1.0, 0),
        (
            "context switches / conn, both",
            "context_switches_per_connection",
            1.0,
            1,
        ),
        ("CPU us / round trip, both", "cpu_us_per_round_trip", 1.0, 1),
        (
            "syscalls / round trip, both",
            "syscalls_per_round_trip",
            1.0,
            1,
        ),
        (
            "ctx switches / round trip, both",
            "context_switches_per_round_trip",
            1.0,
            1,
        ),
        ("idle RSS client (MiB)", "idle_rss_kib_client", 1024.0, 1),
        ("idle RSS server (MiB)", "idle_rss_kib_server", 1024.0, 1),
    ];
    for (label, fig, scale, prec) in rows {
        print!("{label:<30}");
        for sys in ORDER {
            let c = if RATIO_FIGURES.contains(&fig) && sys != System::Direct {
                cell(&p["ratio"][fig][sys.key()], 1.0, 2, "x")
            } else {
                cell(&p["summary"][fig][sys.key()], scale, prec, "")
            };
            print!(" {c:>21}");
        }
        println!();
    }
    let rounds: Vec<String> = p["rounds"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{}.{} {:.1}% (load {:.1}){}",
                r["round"],
                r["attempt"],
                f(&r["steal_pct"]),
                f(&r["loadavg_1m"]),
                if r["flagged"] == true {
                    " (over the limit)"
                } else {
                    ""
                }
            )
        })
        .collect();
    println!(
        "CPU steal per round (round.attempt; limit {}%): {}",
        p["steal_limit_pct"],
        rounds.join(", ")
    );
    if p["rounds"].as_array().map_or(0, Vec::len)
        > p["kept_attempts"].as_array().map_or(0, Vec::len)
    {
        let kept: Vec<&str> = p["kept_attempts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "attempts kept (the least steal of each round): {}",
            kept.join(", ")
        );
    }
    let flagged = p["flagged_rounds"].as_array().map_or(0, Vec::len);
    if flagged > 0 {
        println!(
            "FLAGGED: {flagged} round(s) kept with steal over the limit: their figures are noisy"
        );
    }
    println!(
        "ztunnel carried the traffic over HBONE (peer-b :15008 connections seen: {})",
        p["ztunnel"]["hbone_connections_seen_on_15008"]
    );
}
