//! `cargo xtask bench --only fleet` (issue 14): the control plane under a fleet. N simulated
//! enforcers in one process — each with its own key, a real join token, real enrolment over
//! TLS, its issued certificate for mutual TLS and its own watch stream — against 1 or 3
//! `tessera server` replicas (the release binary) on a real 3-member etcd cluster on
//! loopback.
//!
//! The bench itself (`section`) runs each configuration (100 and N enforcers, 1 and 3
//! replicas) a few times, each in a fresh child process (`xtask load fleet`, release build)
//! with a fresh etcd, and summarises every figure as median, min and max. The child:
//!
//! 1. starts etcd (3 members) and the replicas, makes N join tokens and N keys (untimed);
//! 2. **enrolment**: N enrolments, `concurrency` at a time, each on a new TLS connection,
//!    spread over the replicas (enforcer i asks replica i mod R first);
//! 3. every enforcer opens its watch (mutual TLS with its certificate), reads the snapshot
//!    and reports what it serves (a tunnel address and a /32), as an enforcer does at start;
//! 4. **policy**: `policy apply` through the admin API, timed from just before the request
//!    to each enforcer's watch delivering that version: p50 / p99 / max across enforcers;
//! 5. **directory**: a new enforcer enrols; from its enrolment request to each of the N
//!    watches delivering its entry;
//! 6. **server resources**: per replica, the watches it holds, VmRSS and VmHWM, and CPU
//!    (utime + stime from /proc/PID/stat) per phase and over a 10 s idle window;
//! 7. **ingestion**: every enforcer posts its map of `edges` edge aggregates (a *record* is
//!    one edge aggregate: source, destination, port, verdict with its counts). The figure
//!    counts only records the server stored, checked by reading the fleet's map back
//!    through the admin API: each must be there, reported by its sender, with the counts of
//!    this round.
//!
//! Every process (etcd, servers) dies with the child (PR_SET_PDEATHSIG) and is killed and its
//! directory removed when the child ends; the bench kills a child that overruns.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tessera_control::{
    api::WatchMessage,
    client::{Client, Identity},
    plane::{Credential, EnrolRequest},
    registry::Serves,
};
use tessera_proxy::map::{Edge, EdgeKey, EdgeStats, Map, Node};

use crate::bench::CpuTimes;

/// What one child run measures.
#[derive(Clone, Debug, clap::Args)]
pub struct FleetArgs {
    /// The `tessera` binary the replicas run.
    #[arg(long)]
    pub tessera: PathBuf,
    /// Simulated enforcers.
    #[arg(long)]
    pub n: usize,
    /// `tessera server` replicas.
    #[arg(long)]
    pub replicas: usize,
    /// Requests in flight at once (enrolment, watch opening, map posts).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Edge aggregates in each enforcer's map.
    #[arg(long, default_value_t = 100)]
    pub edges: usize,
    /// Policy changes timed.
    #[arg(long, default_value_t = 5)]
    pub policy_changes: usize,
    /// Enforcers joining a running fleet, timed until all N see them.
    #[arg(long, default_value_t = 5)]
    pub joins: usize,
    /// Rounds of map posts by every enforcer.
    #[arg(long, default_value_t = 3)]
    pub ingest_rounds: usize,
}

// ---------------------------------------------------------------------------------------
// The bench's side: configurations, repeats, summaries.

/// Runs every configuration `repeats` times (each in a child); the summary and the rounds.
pub fn section(load: &str, bin: &Path, fleet_n: usize, quick: bool) -> Result<Value> {
    let repeats = if quick { 1 } else { 3 };
    let mut sizes = vec![fleet_n.min(100), fleet_n];
    sizes.dedup();
    let mut out = serde_json::Map::new();
    for replicas in [1usize, 3] {
        for &n in &sizes {
            let mut rounds = Vec::new();
            for r in 0..repeats {
                eprintln!(
                    "bench: fleet, {n} enforcers, {replicas} replica(s), round {}/{repeats}",
                    r + 1
                );
                rounds.push(child(load, bin, n, replicas, quick)?);
            }
            out.insert(
                format!("n{n}_r{replicas}"),
                json!({"summary": summarise(&rounds), "rounds": rounds}),
            );
        }
    }
    Ok(Value::Object(out))
}

/// One run in a child process, bounded in time (the child's own children die with it).
fn child(load: &str, bin: &Path, n: usize, replicas: usize, quick: bool) -> Result<Value> {
    let mut cmd = Command::new(load);
    cmd.args(["load", "fleet", "--tessera"]).arg(bin).args([
        "--n",
        &n.to_string(),
        "--replicas",
        &replicas.to_string(),
    ]);
    if quick {
        cmd.args([
            "--policy-changes",
            "3",
            "--joins",
            "3",
            "--ingest-rounds",
            "2",
        ]);
    }
    let mut c = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start xtask load fleet")?;
    let mut stdout = c.stdout.take().context("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let limit = Duration::from_secs(300 + n as u64 / 2);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = c.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            bail!("fleet run ({n} enforcers, {replicas} replicas) overran {limit:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("fleet run ({n} enforcers, {replicas} replicas) failed ({status})");
    }
    serde_json::from_str(text.trim()).with_context(|| format!("fleet run printed: {text}"))
}

/// Every number in the rounds, by path, as `{median, min, max, n}` (lists are left out).
fn summarise(rounds: &[Value]) -> Value {
    fn walk(v: &Value, path: &str, into: &mut Vec<(String, f64)>) {
        match v {
            Value::Number(n) => into.push((path.to_string(), n.as_f64().unwrap_or(0.0))),
            Value::Object(m) => {
                for (k, v) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(v, &p, into);
                }
            }
            _ => {}
        }
    }
    let mut by: Vec<(String, Vec<f64>)> = Vec::new();
    for r in rounds {
        let mut leaves = Vec::new();
        walk(r, "", &mut leaves);
        for (p, x) in leaves {
            match by.iter_mut().find(|(q, _)| *q == p) {
                Some((_, xs)) => xs.push(x),
                None => by.push((p, vec![x])),
            }
        }
    }
    let mut out = serde_json::Map::new();
    for (p, xs) in by {
        out.insert(p, crate::bench::spread(&xs));
    }
    Value::Object(out)
}

// ---------------------------------------------------------------------------------------
// The child: etcd, replicas, simulated enforcers.

/// The run's directory and processes: killed and removed on drop.
struct Scratch {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Scratch {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("tessera-fleet-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            children: Vec::new(),
        })
    }

    /// Starts `cmd` logging to `log` in the run's directory; it dies if this process dies.
    fn spawn(&mut self, mut cmd: Command, log: &str) -> Result<u32> {
        let f = std::fs::File::create(self.dir.join(log))?;
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .process_group(0);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let c = cmd.spawn().with_context(|| format!("cannot start {log}"))?;
        let pid = c.id();
        self.children.push(c);
        Ok(pid)
    }

    fn log_tail(&self, log: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A plain HTTP/1.0 request to etcd's client port (health, revision, status); the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// etcd's current revision: how many writes it has applied.
fn etcd_revision(addr: &str) -> Result<u64> {
    let v: Value = serde_json::from_str(&http(addr, "POST", "/v3/kv/range", r#"{"key":"AA=="}"#)?)?;
    v["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .context("etcd range: no revision")
}

/// The watches etcd member `addr` holds (its `etcd_debugging_mvcc_watcher_total` gauge).
fn etcd_watchers(addr: &str) -> Result<u64> {
    let text = http(addr, "GET", "/metrics", "")?;
    text.lines()
        .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .context("etcd metrics: no watcher gauge")
}

fn etcd_db_size(addr: &str) -> Result<u64> {
    let v: Value = serde_json::from_str(&http(addr, "POST", "/v3/maintenance/status", "{}")?)?;
    v["dbSize"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .context("etcd status: no dbSize")
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_secs(pid: u32) -> Result<f64> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok((f[11].parse::<f64>()? + f[12].parse::<f64>()?) / ticks)
}

/// VmRSS and VmHWM (KiB).
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// p50, p99 and max (ms) of durations.
fn percentiles(mut ms: Vec<f64>) -> Value {
    if ms.is_empty() {
        return json!({"n": 0});
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    json!({"p50": at(0.5), "p99": at(0.99), "max": ms[ms.len() - 1], "n": ms.len()})
}

/// The median of each of p50 / p99 / max over several timed events (and the events).
fn over_events(events: &[Value]) -> Value {
    let mut out = serde_json::Map::new();
    for k in ["p50", "p99", "max"] {
        let mut xs: Vec<f64> = events.iter().filter_map(|e| e[k].as_f64()).collect();
        xs.sort_by(f64::total_cmp);
        if !xs.is_empty() {
            out.insert(k.into(), json!(xs[xs.len() / 2]));
            out.insert(format!("{k}_worst"), json!(xs[xs.len() - 1]));
        }
    }
    out.insert("events".into(), json!(events.len()));
    Value::Object(out)
}

const ETCD: &str = "/usr/bin/etcd";

/// `xtask load fleet`: one run; prints its figures as JSON on stdout.
pub fn run_child(a: FleetArgs) -> Result<()> {
    // Descriptors: one connection per simulated enforcer here and one per watch in the
    // servers (which inherit this limit).
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    if (hard as usize) < a.n + 1000 {
        bail!("open-file limit {hard} is too low for {} enforcers", a.n);
    }
    if !Path::new(ETCD).exists() {
        bail!("{ETCD} is missing (cargo xtask setup installs etcd-server)");
    }
    let steal = CpuTimes::now()?;
    let mut s = Scratch::new()?;
    // etcd: 3 members on loopback.
    let members: Vec<(String, String)> = (0..3)
        .map(|_| {
            Ok((
                format!("127.0.0.1:{}", free_port()?),
                format!("127.0.0.1:{}", free_port()?),
            ))
        })
        .collect::<Result<_>>()?;
    let initial: Vec<String> = members
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://{peer}"))
        .collect();
    let mut etcd_pids = Vec::new();
    for (i, (client, peer)) in members.iter().enumerate() {
        let mut cmd = Command::new(ETCD);
        cmd.args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(s.dir.join(format!("etcd-m{i}")))
            .args(["--listen-client-urls", &format!("http://{client}")])
            .args(["--advertise-client-urls", &format!("http://{client}")])
            .args(["--listen-peer-urls", &format!("http://{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args([
                "--initial-cluster-token",
                &format!("fleet-{}", std::process::id()),
            ])
            .args(["--max-request-bytes", "20971520"])
            .args(["--auto-compaction-retention", "1h"]);
        etcd_pids.push(s.spawn(cmd, &format!("etcd-m{i}.log"))?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, (client, _)) in members.iter().enumerate() {
        while !http(client, "GET", "/health", "")
            .map(|b| b.contains("\"true\""))
            .unwrap_or(false)
        {
            if Instant::now() > deadline {
                bail!(
                    "etcd m{i} not healthy in 60 s:\n{}",
                    s.log_tail(&format!("etcd-m{i}.log"))
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let store = format!(
        "etcd://{}/bench",
        members
            .iter()
            .map(|(c, _)| c.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    // The replicas, one after the other (the first makes the CA).
    let mut servers = Vec::new();
    let mut server_pids = Vec::new();
    for i in 0..a.replicas {
        let port = free_port()?;
        let state = s.dir.join(format!("server-{i}"));
        let ready = s.dir.join(format!("server-{i}.ready"));
        let mut cmd = Command::new(&a.tessera);
        cmd.args(["server", "run", "--state-dir"])
            .arg(&state)
            .args(["--store", &store])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--name", "127.0.0.1"])
            // Every simulated enforcer enrols from 127.0.0.1: the per-source limit
            // (default 5/s) would measure the limiter. The total limit (500/s per
            // replica) stays as it is.
            .args(["--enrol-rate", "100000"])
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "warn");
        let log = format!("server-{i}.log");
        server_pids.push(s.spawn(cmd, &log)?);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            if Instant::now() > deadline {
                bail!("replica {i} not ready in 60 s:\n{}", s.log_tail(&log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        servers.push(format!("https://127.0.0.1:{port}"));
    }
    let ca = std::fs::read_to_string(s.dir.join("server-0/ca.pem"))?;
    let admin_token = tessera_control::admin::read_file(&s.dir.join("server-0/admin.token"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let env = Env {
        a: a.clone(),
        servers,
        server_pids: server_pids.clone(),
        etcd: members[0].0.clone(),
        etcd_all: members.iter().map(|(c, _)| c.clone()).collect(),
        ca,
        admin_token,
    };
    let mut result = rt.block_on(measure(&env))?;
    let mut etcd_rss = 0;
    let mut etcd_cpu = 0.0;
    for pid in &etcd_pids {
        etcd_rss += memory_kib(*pid)?.0;
        etcd_cpu += cpu_secs(*pid)?;
    }
    result["etcd"]["rss_kib_3_members"] = json!(etcd_rss);
    result["etcd"]["cpu_s_3_members"] = json!(etcd_cpu);
    result["etcd"]["db_size_bytes"] = json!(etcd_db_size(&members[0].0)?);
    result["bench_process_cpu_s"] = json!(cpu_secs(std::process::id())?);
    result["cpu_steal_pct"] = json!(steal.steal_pct_since()?);
    drop(rt);
    drop(s);
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

struct Env {
    a: FleetArgs,
    servers: Vec<String>,
    server_pids: Vec<u32>,
    etcd: String,
    etcd_all: Vec<String>,
    ca: String,
    admin_token: String,
}

impl Env {
    /// The servers as enforcer `i` is configured with them: its own replica first.
    fn servers_for(&self, i: usize) -> Vec<String> {
        let r = self.servers.len();
        (0..r).map(|k| self.servers[(i + k) % r].clone()).collect()
    }

    fn admin(&self) -> Result<Client> {
        Ok(Client::new(&self.servers[..1], &self.ca, None)?)
    }

    fn cpu(&self) -> Result<Vec<f64>> {
        self.server_pids.iter().map(|p| cpu_secs(*p)).collect()
    }
}

/// CPU ms each replica used between two readings.
fn cpu_ms(before: &[f64], after: &[f64]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (a - b) * 1e3)
        .collect()
}

struct Enrolled {
    name: String,
    key: Vec<u8>,
    cert: String,
}

fn csr(key: &rcgen::KeyPair) -> Result<String> {
    Ok(rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(key)?
        .pem()?)
}

/// A new key and its signing request.
fn keypair() -> Result<(rcgen::KeyPair, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let req = csr(&key)?;
    Ok((key, req))
}

/// Enrols `name` with `token` on a new connection, retrying refusals that say so
/// (rate limits); the enrolment and how many retries it took.
async fn enrol(
    env: &Env,
    i: usize,
    name: &str,
    token: &str,
    key: &rcgen::KeyPair,
    csr: &str,
) -> Result<(Enrolled, u64)> {
    let req = EnrolRequest {
        name: name.to_string(),
        csr: csr.to_string(),
        credential: Credential::Token(token.to_string()),
    };
    let client = Client::new(&env.servers_for(i), &env.ca, None)?;
    let mut retries = 0;
    loop {
        match client.enrol(&req).await {
            Ok(e) => {
                return Ok((
                    Enrolled {
                        name: name.to_string(),
                        key: key.serialize_der(),
                        cert: e.cert,
                    },
                    retries,
                ));
            }
            Err(e) if e.retryable() && retries < 200 => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => bail!("enrolment of {name}: {e}"),
        }
    }
}

/// What the watch streams delivered, when.
#[derive(Default)]
struct Seen {
    /// Policy version -> when each stream delivered it.
    policy: Mutex<HashMap<u64, Vec<Instant>>>,
    /// Joining enforcer -> when each stream delivered its entry.
    joined: Mutex<HashMap<String, Vec<Instant>>>,
    broken: AtomicU64,
    messages: AtomicU64,
}

/// Waits until `count()` reaches `n` (at most `limit`).
async fn wait_for(what: &str, n: usize, limit: Duration, count: impl Fn() -> usize) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let c = count();
        if c >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: {c} of {n} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

const POLICY: &str = "rules:\n  - name: bench-v{V}\n    action: allow\n    from: [{labels: [app=web]}]\n    to: [{labels: [app=api]}]\n    ports: [{PORT}]\n";

fn policy_text(v: usize) -> String {
    POLICY
        .replace("{V}", &v.to_string())
        .replace("{PORT}", &(8000 + v % 1000).to_string())
}

/// Enforcer `i`'s map in ingestion round `round`: `edges` edges from its own workloads.
fn map_of(name: &str, i: usize, edges: usize, round: u64) -> Map {
    let now = 1_800_000_000_000 + round * 1000;
    Map {
        nodes: vec![Node {
            name: format!("w@{name}"),
            enforcer: Some(name.to_string()),
            ..Default::default()
        }],
        edges: (0..edges)
            .map(|j| Edge {
                key: EdgeKey {
                    src: format!("w{j}@{name}"),
                    dst: format!("api{}@sim-{:05}", j % 16, (i + 1 + j) % 100_000),
                    port: 8080,
                    protocol: Default::default(),
                    verdict: "allowed".into(),
                },
                stats: EdgeStats {
                    connections: round + 1,
                    bytes_sent: 1000 * (round + 1),
                    bytes_received: 500 * (round + 1),
                    first_seen_ms: 1_800_000_000_000,
                    last_seen_ms: now,
                    rules: ["bench".to_string()].into(),
                    ..Default::default()
                },
                reporters: Default::default(),
                new: false,
            })
            .collect(),
    }
}

async fn measure(env: &Env) -> Result<Value> {
    let a = &env.a;
    let n = a.n;
    let admin = env.admin()?;
    let scope: tessera_control::scope::Scope = "site=bench".parse().map_err(anyhow::Error::msg)?;
    // Untimed: tokens and keys for N + joins enforcers.
    eprintln!("fleet: {n} join tokens and keys");
    let total = n + a.joins;
    let tokens: Vec<String> = futures_util::stream::iter(0..total)
        .map(|_| {
            let (admin, scope, t) = (admin.clone(), scope.clone(), env.admin_token.clone());
            async move {
                admin
                    .create_token(&t, &scope, Duration::from_secs(3600))
                    .await
                    .map(|r| r.token)
            }
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let keys: Vec<(rcgen::KeyPair, String)> =
        (0..total).map(|_| keypair()).collect::<Result<_>>()?;

    // Enrolment.
    eprintln!("fleet: {n} enrolments, {} at a time", a.concurrency);
    let rev0 = etcd_revision(&env.etcd)?;
    let cpu0 = env.cpu()?;
    let t0 = Instant::now();
    let enrolled: Vec<(Enrolled, u64)> = futures_util::stream::iter(0..n)
        .map(|i| {
            let (token, (key, csr)) = (&tokens[i], &keys[i]);
            async move { enrol(env, i, &format!("sim-{i:05}"), token, key, csr).await }
        })
        .buffer_unordered(a.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let enrol_s = t0.elapsed().as_secs_f64();
    let cpu1 = env.cpu()?;
    let rev1 = etcd_revision(&env.etcd)?;
    let mem_enrolled: Vec<(u64, u64)> = env
        .server_pids
        .iter()
        .map(|p| memory_kib(*p))
        .collect::<Result<_>>()?;
    let retries: u64 = enrolled.iter().map(|(_, r)| r).sum();

    // Watches, each followed by the enforcer's report.
    eprintln!("fleet: {n} watches and reports");
    let seen = Arc::new(Seen::default());
    let t0 = Instant::now();
    let opened: Vec<(Client, String)> = futures_util::stream::iter(enrolled.iter().enumerate())
        .map(|(i, (e, _))| {
            let seen = seen.clone();
            async move {
                let client = Client::new(
                    &env.servers_for(i),
                    &env.ca,
                    Some(Identity {
                        cert_pem: &e.cert,
                        key_pkcs8: &e.key,
                    }),
                )?;
                let (server, stream) = client.watch().await?;
                let mut stream = Box::pin(stream);
                match stream.next().await {
                    Some(Ok(WatchMessage::Snapshot { .. })) => {}
                    other => bail!("{}: the watch began with {other:?}", e.name),
                }
                let serves = Serves {
                    tunnel: Some(
                        format!(
                            "10.{}.{}.{}:15008",
                            128 + i / 65536,
                            (i / 256) % 256,
                            i % 256
                        )
                        .parse()?,
                    ),
                    serves: vec![
                        format!("10.{}.{}.{}/32", 128 + i / 65536, (i / 256) % 256, i % 256)
                            .parse()?,
                    ],
                    ..Default::default()
                };
                client.report(&serves, 0).await?;
                tokio::spawn(async move {
                    while let Some(m) = stream.next().await {
                        let at = Instant::now();
                        seen.messages.fetch_add(1, Ordering::Relaxed);
                        match m {
                            Ok(WatchMessage::Policy { policy, .. }) => {
                                let mut p = seen.policy.lock().unwrap();
                                p.entry(policy.version).or_default().push(at);
                            }
                            Ok(WatchMessage::Upsert { entry, .. })
                                if entry.name.starts_with("join-") =>
                            {
                                let mut j = seen.joined.lock().unwrap();
                                let v = j.entry(entry.name).or_default();
                                // Its first appearance (a later report changes it again).
                                v.push(at);
                            }
                            Ok(_) => {}
                            Err(_) => {
                                seen.broken.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                });
                Ok((client, server))
            }
        })
        .buffered(a.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let watch_s = t0.elapsed().as_secs_f64();
    let cpu2 = env.cpu()?;
    // Settle: a first policy reaches everyone (every stream has caught up with the reports).
    let warm = admin
        .apply_policy(&env.admin_token, "bench.yaml", &policy_text(0))
        .await?
        .version;
    let s2 = seen.clone();
    wait_for("warm-up policy", n, Duration::from_secs(120), move || {
        s2.policy.lock().unwrap().get(&warm).map_or(0, Vec::len)
    })
    .await?;

    // Policy changes.
    eprintln!("fleet: {} policy changes", a.policy_changes);
    let cpu3 = env.cpu()?;
    let (mut changes, mut apply_ms) = (Vec::new(), Vec::new());
    for k in 1..=a.policy_changes {
        let t0 = Instant::now();
        let v = admin
            .apply_policy(&env.admin_token, "bench.yaml", &policy_text(k))
            .await?
            .version;
        apply_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let s2 = seen.clone();
        wait_for("policy in force", n, Duration::from_secs(60), move || {
            s2.policy.lock().unwrap().get(&v).map_or(0, Vec::len)
        })
        .await?;
        let at = seen.policy.lock().unwrap()[&v].clone();
        changes.push(percentiles(
            at.iter().map(|t| (*t - t0).as_secs_f64() * 1e3).collect(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let cpu4 = env.cpu()?;

    // Enforcers joining the running fleet.
    eprintln!("fleet: {} enforcers join", a.joins);
    let (mut joins, mut join_enrol_ms) = (Vec::new(), Vec::new());
    for j in 0..a.joins {
        let name = format!("join-{j}");
        let (key, csr) = &keys[n + j];
        let t0 = Instant::now();
        enrol(env, j, &name, &tokens[n + j], key, csr).await?;
        join_enrol_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let (s2, name2) = (seen.clone(), name.clone());
        wait_for(
            "new enforcer in the directory",
            n,
            Duration::from_secs(60),
            move || s2.joined.lock().unwrap().get(&name2).map_or(0, Vec::len),
        )
        .await?;
        let at = seen.joined.lock().unwrap()[&name].clone();
        joins.push(percentiles(
            at.iter().map(|t| (*t - t0).as_secs_f64() * 1e3).collect(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Resources with the fleet watching: memory, and CPU over an idle window (pings).
    let mut watchers = vec![0usize; env.servers.len()];
    for (_, server) in &opened {
        if let Some(r) = env.servers.iter().position(|s| s == server) {
            watchers[r] += 1;
        }
    }
    let idle = Duration::from_secs(10);
    let cpu5 = env.cpu()?;
    tokio::time::sleep(idle).await;
    let cpu6 = env.cpu()?;
    let mem: Vec<(u64, u64)> = env
        .server_pids
        .iter()
        .map(|p| memory_kib(*p))
        .collect::<Result<_>>()?;
    let etcd_watches = env
        .etcd_all
        .iter()
        .map(|m| etcd_watchers(m))
        .sum::<Result<u64>>()?;

    // Map ingestion.
    eprintln!(
        "fleet: {} rounds of {n} maps of {} edges",
        a.ingest_rounds, a.edges
    );
    let mut ingest = Vec::new();
    let rev_ingest0 = etcd_revision(&env.etcd)?;
    let cpu7 = env.cpu()?;
    let mut ingest_s_total = 0.0;
    for round in 0..a.ingest_rounds as u64 {
        let maps: Vec<Map> = enrolled
            .iter()
            .enumerate()
            .map(|(i, (e, _))| map_of(&e.name, i, a.edges, round))
            .collect();
        let t0 = Instant::now();
        let sent: Vec<Result<()>> = futures_util::stream::iter(opened.iter().zip(&maps))
            .map(|((client, _), m)| async move { Ok(client.report_map(m).await?) })
            .buffer_unordered(a.concurrency)
            .collect()
            .await;
        let secs = t0.elapsed().as_secs_f64();
        ingest_s_total += secs;
        let refused = sent.iter().filter(|r| r.is_err()).count();
        if let Some(Err(e)) = sent.iter().find(|r| r.is_err()) {
            eprintln!("fleet: {refused} map posts refused, e.g. {e:#}");
        }
        // What the server kept: the fleet's map read back.
        let t1 = Instant::now();
        let fleet = admin.fleet_map(&env.admin_token).await?;
        let read_ms = t1.elapsed().as_secs_f64() * 1e3;
        let stored = fleet
            .edges
            .iter()
            .filter(|e| {
                e.stats.connections == round + 1
                    && e.stats.bytes_sent == 1000 * (round + 1)
                    && e.reporters.len() == 1
                    && e.key
                        .src
                        .split_once('@')
                        .is_some_and(|(_, by)| e.reporters.contains(by))
            })
            .count();
        ingest.push(json!({
            "records_sent": n * a.edges,
            "records_stored": stored,
            "posts_refused": refused,
            "seconds": secs,
            "records_per_second": stored as f64 / secs,
            "fleet_map_read_ms": read_ms,
            "fleet_map_edges": fleet.edges.len(),
        }));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let cpu8 = env.cpu()?;
    let rev_ingest1 = etcd_revision(&env.etcd)?;
    let mem_end: Vec<(u64, u64)> = env
        .server_pids
        .iter()
        .map(|p| memory_kib(*p))
        .collect::<Result<_>>()?;
    let broken = seen.broken.load(Ordering::Relaxed);
    let messages = seen.messages.load(Ordering::Relaxed);

    let rates: Vec<f64> = ingest
        .iter()
        .filter_map(|r| r["records_per_second"].as_f64())
        .collect();
    let mut sorted = rates.clone();
    sorted.sort_by(f64::total_cmp);
    let median_rate = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let per_k = |ms: f64, count: usize| {
        if count > 0 {
            ms * 1000.0 / count as f64
        } else {
            0.0
        }
    };
    let mut replicas = serde_json::Map::new();
    for r in 0..env.servers.len() {
        let share = n.div_ceil(env.servers.len());
        replicas.insert(
            format!("r{r}"),
            json!({
                "watchers": watchers[r],
                "rss_kib": mem[r].0,
                "hwm_kib": mem_end[r].1,
                "rss_kib_after_ingest": mem_end[r].0,
                "rss_kib_before_watches": mem_enrolled[r].0,
                "rss_kib_per_1000_watchers": per_k(mem[r].0.saturating_sub(mem_enrolled[r].0) as f64, watchers[r]),
                "cpu_ms": {
                    "enrolment": cpu_ms(&cpu0, &cpu1)[r],
                    "watch_and_report": cpu_ms(&cpu1, &cpu2)[r],
                    "policy_changes": cpu_ms(&cpu3, &cpu4)[r],
                    "idle_10s": cpu_ms(&cpu5, &cpu6)[r],
                    "ingest": cpu_ms(&cpu7, &cpu8)[r],
                },
                "cpu_ms_per_1000_enrolments": per_k(cpu_ms(&cpu0, &cpu1)[r], share),
                "idle_cpu_pct_per_1000_watchers": per_k(cpu_ms(&cpu5, &cpu6)[r] / idle.as_secs_f64() / 10.0, watchers[r]),
                "ingest_cpu_ms_per_1000_records": per_k(cpu_ms(&cpu7, &cpu8)[r], share * a.edges * a.ingest_rounds),
            }),
        );
    }
    Ok(json!({
        "n": n,
        "replicas": env.servers.len(),
        "concurrency": a.concurrency,
        "enrolment": {
            "per_second": n as f64 / enrol_s,
            "seconds": enrol_s,
            "retries": retries,
            "etcd_writes_per_enrolment": (rev1 - rev0) as f64 / n as f64,
        },
        "watch_and_report": {"seconds": watch_s, "per_second": n as f64 / watch_s},
        "policy_in_force_ms": over_events(&changes),
        "policy_apply_request_ms": crate::bench::spread(&apply_ms),
        "directory_visible_ms": over_events(&joins),
        "join_enrolment_ms": crate::bench::spread(&join_enrol_ms),
        "ingest": {
            "edges_per_map": a.edges,
            "records_per_second": median_rate,
            "records_per_second_per_replica": median_rate / env.servers.len() as f64,
            "etcd_writes": rev_ingest1 - rev_ingest0,
            "seconds": ingest_s_total,
            "rounds": ingest,
        },
        "servers": replicas,
        "watch_messages": messages,
        "etcd_watches_with_fleet_watching": etcd_watches,
        "watches_broken": broken,
        "etcd": {},
    }))
}

/// The fleet's figures: one column per configuration, each `median (min - max)` over the
/// rounds.
pub fn print_table(f: &Value) {
    let Some(configs) = f.as_object() else {
        return;
    };
    let cols: Vec<(&String, &Value)> = configs.iter().collect();
    println!("\ncontrol plane under a simulated fleet (median, min - max over rounds)");
    let mut head = format!("{:<44}", "metric");
    for (k, _) in &cols {
        head.push_str(&format!(" {k:>24}"));
    }
    println!("{head}");
    let rows: &[(&str, &str, f64, &str)] = &[
        ("enrolments / s", "enrolment.per_second", 1.0, ">= 200"),
        (
            "policy in force at all: p50 (ms)",
            "policy_in_force_ms.p50",
            1.0,
            "",
        ),
        (
            "policy in force at all: p99 (ms)",
            "policy_in_force_ms.p99",
            1.0,
            "< 1000",
        ),
        (
            "policy in force at all: max (ms)",
            "policy_in_force_ms.max",
            1.0,
            "",
        ),
        (
            "new enforcer visible: p50 (ms)",
            "directory_visible_ms.p50",
            1.0,
            "",
        ),
        (
            "new enforcer visible: p99 (ms)",
            "directory_visible_ms.p99",
            1.0,
            "",
        ),
        (
            "new enforcer visible: max (ms)",
            "directory_visible_ms.max",
            1.0,
            "",
        ),
        (
            "watch + report, all (s)",
            "watch_and_report.seconds",
            1.0,
            "",
        ),
        (
            "flow records / s (stored)",
            "ingest.records_per_second",
            1.0,
            "",
        ),
        (
            "flow records / s per replica",
            "ingest.records_per_second_per_replica",
            1.0,
            ">= 50000",
        ),
        (
            "replica 0 RSS with watches (MiB)",
            "servers.r0.rss_kib",
            1024.0,
            "",
        ),
        ("replica 0 VmHWM (MiB)", "servers.r0.hwm_kib", 1024.0, ""),
        (
            "replica 0 CPU ms / 1,000 enrolments",
            "servers.r0.cpu_ms_per_1000_enrolments",
            1.0,
            "",
        ),
        (
            "replica 0 idle CPU % / 1,000 watches",
            "servers.r0.idle_cpu_pct_per_1000_watchers",
            1.0,
            "",
        ),
        (
            "replica 0 CPU ms / 1,000 records",
            "servers.r0.ingest_cpu_ms_per_1000_records",
            1.0,
            "",
        ),
        (
            "etcd writes per enrolment",
            "enrolment.etcd_writes_per_enrolment",
            1.0,
            "",
        ),
        ("CPU steal (%)", "cpu_steal_pct", 1.0, ""),
    ];
    for (name, path, scale, target) in rows {
        let mut line = format!("{name:<44}");
        for (_, c) in &cols {
            let v = &c["summary"][*path];
            let cell = match (v["median"].as_f64(), v["min"].as_f64(), v["max"].as_f64()) {
                (Some(m), Some(lo), Some(hi)) => {
                    let p = if m / scale >= 100.0 { 0 } else { 1 };
                    format!("{:.p$} ({:.p$}-{:.p$})", m / scale, lo / scale, hi / scale)
                }
                _ => "-".into(),
            };
            line.push_str(&format!(" {cell:>24}"));
        }
        println!("{line} {target}");
    }
}
