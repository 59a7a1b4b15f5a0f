//! `cargo xtask bench`: the data path measured on test hosts, each figure **direct** (the
//! same client and server programs, unenrolled, to an unprotected port) and **through
//! Tessera** (enrolled client, protected port, mutual-TLS tunnel), in the same run.
//!
//! JSON output (`--json PATH`), schema 1; every figure is a number:
//! * `throughput_bps.{direct,tessera,ratio}`: iperf3 bulk TCP, bits/s received; ratio = tessera/direct.
//! * `connections_per_second.{direct,tessera,ratio}`: open + 1-byte echo + close, 4 client threads.
//! * `latency_us.{p50,p99}.{direct,tessera,ratio}`: 64-byte request/response on one connection.
//! * `pool.{pooled_cps,unpooled_cps,speedup}`: connection rate through Tessera with the warm
//!   tunnel pool and with pooling off (every connection pays a TLS handshake).
//! * `tokens.{with_cps,without_cps,ratio,added_us_per_connection}`: connection rate through
//!   Tessera with signed identity tokens (the default) and with unsigned identities, and the
//!   wall time per connection the tokens add at saturation (signing and verifying at both
//!   ends: request and answer).
//! * `handshake.{throughput_bps,connections_per_second,latency_us.{p50,p99}}.{direct,handshake,ratio}`:
//!   the same figures in TCP-handshake mode (tokens in the handshake, data in the kernel),
//!   each right after its own direct baseline; `handshake.queued_packets_per_connection`;
//!   `handshake.key_per_connection.connections_per_second.{direct,handshake,ratio}`: with a
//!   new ephemeral X25519 key for every connection (`key_reuse_ms = 0`);
//!   `handshake.fast_path{,_key_per_connection}.{connections_per_second.{direct,handshake,ratio,ratio_spread},queued_packets_per_connection,cpu_ms_per_1000_connections}`:
//!   the in-kernel fast path warm (median of 3 alternating repeats; the figures above are
//!   with it off: the full handshake for every connection);
//!   `handshake.queues_only.{connections_per_second.{direct,handshake,ratio},cpu_ms_per_1000_connections}`:
//!   the same rules and NFQUEUE workers passing every packet unverified (`pass_through`):
//!   what the queues alone cost, the ceiling for any engine behind them.
//! * `cpu_ms_per_1000_connections.{tunnel,handshake}`: CPU time both enforcers spend per
//!   1,000 new connections (from /proc/<pid>/stat during the connection-rate run).
//! * `memory.{idle_rss_kib,loaded_rss_kib,per_connection_kib}.{host-a,host-b}` and
//!   `memory.open_connections`: enforcer resident memory idle and holding that many
//!   tunnelled connections; `memory.descriptors_per_connection.{host-a,host-b}`: open
//!   descriptors each enforcer gains per held connection (1 with streams multiplexed on a
//!   few tunnels).
//! * `control.enforcer_start_ms.{enrolling,from_cache}`: enforcer process spawn to its
//!   `enforcer ready` log line, with enrolment (no cache, a new join token) and restarted from
//!   the cache; `control.enrolment_round_trip_ms`: the enrolment request alone (the control
//!   client's first connection to `enrolled with the control plane`, enforcer log);
//!   `control.policy_in_force_ms.{logged,probed,apply_command}`: from the start of `tessera
//!   policy apply` to the last enforcer's `policy from the control plane in force` line of
//!   that version, to a probe's first connection the new policy allows, and the command's
//!   own run time; `control.server_rss_kib.{idle,with_watchers,per_watcher,watchers}`.
//!   Each timing is `{median,min,max,n}` in ms.
//! * `fleet.n{N}_r{R}.{summary,rounds}` (`--only fleet`, N = 100 and `--fleet-n`, R = 1 and 3
//!   replicas; see `fleet.rs`): each round's figures (enrolments/s, policy and directory
//!   propagation p50/p99/max in ms, stored flow records/s, per-replica CPU and memory, etcd
//!   writes, the round's CPU steal) and, in `summary`, each figure's `{median,min,max,n}`
//!   over the rounds.
//! * `peers` (`--peers`; see `peers.rs`): direct, ztunnel (HBONE), stunnel (TLS 1.3) and
//!   Tessera's two modes side by side, round by round: `peers.summary.<figure>.<system>` and
//!   `peers.ratio.<figure>.<system>` (to direct in the same round) as `{median,min,max,n}`,
//!   every round's figures and CPU steal in `peers.rounds`.
//! * `latency_rounds.{p50_ratio,p99_ratio}` (`--only latency`): tunnel-mode request latency in
//!   alternating direct/tunnel rounds for 30 s after a start, as `{median,min,max,n}`, and
//!   every round's `load rr` report (p50, p90, p99, p99.9, max, how the slowest 1 % cluster)
//!   with its CPU steal in `latency_rounds.rounds`.
//! * `cpu_steal_pct.{tunnel,handshake,control,memory,fleet,peers,latency}`: the share of the
//!   machine's CPU time the hypervisor took (steal, `/proc/stat`) while each section ran.
use std::{
    fs,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tessera_tests::{ControlServer, Host, TestNet};

pub(crate) fn out_json(out: &std::process::Output, what: &str) -> Result<Value> {
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(out.stdout.trim_ascii())
        .with_context(|| format!("{what}: {}", String::from_utf8_lossy(&out.stdout)))
}

pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .context("no VmRSS")
}

struct Bench<'a> {
    net: &'a TestNet,
    load: String,
    /// The echo server on 7001 (in the server workload), restarted by the fast path's
    /// section: a listener opened before the enforcer cannot tag SYN-ACKs.
    echo_pid: std::cell::Cell<u32>,
    secs: u64,
}

impl Bench<'_> {
    fn client(&self) -> &Host {
        self.net.host("host-a")
    }

    /// `tessera`: enrolled client to the protected port; otherwise unenrolled to the plain one.
    fn wl(tessera: bool) -> Option<&'static str> {
        tessera.then_some("client")
    }

    fn iperf(&self, tessera: bool) -> Result<f64> {
        let port = if tessera { "5201" } else { "5202" };
        let t = self.secs.to_string();
        let out = self.net.run(
            self.client(),
            Self::wl(tessera),
            "iperf3",
            &["-c", "10.77.0.2", "-p", port, "-t", &t, "-J"],
            Duration::from_secs(self.secs + 30),
        )?;
        let v = out_json(&out, "iperf3")?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 reported no throughput")
    }

    fn connrate(&self, tessera: bool) -> Result<f64> {
        Ok(self.connrate_counted(tessera)?.0)
    }

    /// The connection rate and how many connections were made.
    fn connrate_counted(&self, tessera: bool) -> Result<(f64, f64)> {
        let addr = if tessera {
            "10.77.0.2:7001"
        } else {
            "10.77.0.2:7002"
        };
        let secs = self.secs.to_string();
        let out = self.net.run(
            self.client(),
            Self::wl(tessera),
            &self.load,
            &["load", "connrate", addr, &secs, "500000", "4"],
            Duration::from_secs(self.secs + 30),
        )?;
        let v = out_json(&out, "connrate")?;
        if v["errors"].as_u64().unwrap_or(0) > 0 {
            eprintln!(
                "bench: connrate ({}) saw {} errors",
                if tessera { "tessera" } else { "direct" },
                v["errors"]
            );
        }
        Ok((
            v["per_second"].as_f64().context("no rate")?,
            v["connections"].as_f64().context("no count")?,
        ))
    }

    /// CPU time (user + system) both enforcers have used so far, in seconds.
    fn enforcer_cpu_secs(&self) -> Result<f64> {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
        let mut total = 0.0;
        for h in ["host-a", "host-b"] {
            let pid = self
                .net
                .enforcer_pid(self.net.host(h))
                .context("enforcer pid")?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
            // Fields after the command name (which may hold spaces): utime is the 14th field.
            let rest = stat.rsplit_once(')').context("stat")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            total += (f[11].parse::<f64>()? + f[12].parse::<f64>()?) / ticks;
        }
        Ok(total)
    }

    /// Packets handed to NFQUEUE so far in both test hosts (the queues' id sequences).
    fn queued_packets(&self) -> Result<u64> {
        let mut total = 0;
        for h in ["host-a", "host-b"] {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &self.net.host(h).netns])
                .args(["cat", "/proc/net/netfilter/nfnetlink_queue"])
                .output()?;
            // queue portid waiting copy_mode copy_range dropped user_dropped id_sequence 1
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(seq) = line.split_whitespace().nth(7) {
                    total += seq.parse::<u64>().unwrap_or(0);
                }
            }
        }
        Ok(total)
    }

    fn latency(&self, tessera: bool) -> Result<(f64, f64)> {
        let v = self.latency_detail(tessera)?;
        Ok((
            v["p50_us"].as_f64().context("p50")?,
            v["p99_us"].as_f64().context("p99")?,
        ))
    }

    /// One `load rr` run's whole report (percentiles, how the slowest 1 % cluster in time).
    fn latency_detail(&self, tessera: bool) -> Result<Value> {
        let addr = if tessera {
            "10.77.0.2:7001"
        } else {
            "10.77.0.2:7002"
        };
        let count = (self.secs * 4000).to_string();
        let out = self.net.run(
            self.client(),
            Self::wl(tessera),
            &self.load,
            &["load", "rr", addr, &count],
            Duration::from_secs(90),
        )?;
        out_json(&out, "rr")
    }

    fn memory(&self, n: usize) -> Result<(Value, Value, Value, Value)> {
        let (a, b) = (self.net.host("host-a"), self.net.host("host-b"));
        let pids = [
            self.net.enforcer_pid(a).context("enforcer a")?,
            self.net.enforcer_pid(b).context("enforcer b")?,
        ];
        let idle = [rss_kib(pids[0])?, rss_kib(pids[1])?];
        let idle_fds = [open_fds(pids[0])?, open_fds(pids[1])?];
        let ready = self.net.dir.join("hold.ready");
        self.net.spawn(
            a,
            Some("client"),
            &self.load,
            &[
                "load",
                "hold",
                "10.77.0.2:7001",
                &n.to_string(),
                ready.to_str().unwrap(),
                "300",
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(240);
        while !ready.exists() {
            if Instant::now() > deadline {
                bail!("{n} connections were not open within 240 s");
            }
            thread::sleep(Duration::from_millis(100));
        }
        thread::sleep(Duration::from_millis(500));
        let loaded = [rss_kib(pids[0])?, rss_kib(pids[1])?];
        let loaded_fds = [open_fds(pids[0])?, open_fds(pids[1])?];
        let opened = fs::read_to_string(&ready)?;
        eprintln!(
            "bench: {n} connections opened in {} s",
            opened.split_whitespace().nth(1).unwrap_or("?")
        );
        fs::remove_file(&ready)?; // tells the holder to close its connections and exit
        let per = |i: usize| (loaded[i].saturating_sub(idle[i])) as f64 / n as f64;
        let fds = |i: usize| (loaded_fds[i].saturating_sub(idle_fds[i])) as f64 / n as f64;
        Ok((
            json!({"host-a": idle[0], "host-b": idle[1]}),
            json!({"host-a": loaded[0], "host-b": loaded[1]}),
            json!({"host-a": per(0), "host-b": per(1)}),
            json!({"host-a": fds(0), "host-b": fds(1)}),
        ))
    }
}

/// Descriptors process `pid` has open.
fn open_fds(pid: u32) -> Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("/proc/{pid}/fd"))?
        .count())
}

fn ratio(t: f64, d: f64) -> f64 {
    if d > 0.0 { t / d } else { 0.0 }
}

/// Which parts of the bench to run (`--only`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Tunnel,
    Handshake,
    Memory,
    Control,
    /// The control plane under a simulated fleet (see `fleet.rs`).
    Fleet,
    /// Side by side with ztunnel and stunnel (see `peers.rs`; also `--peers`).
    Peers,
    /// Tunnel-mode request latency alone, in alternating rounds (direct, then Tessera) for
    /// 30 s after the enforcers start (long enough for pooled tunnels to idle out and be
    /// replaced), each round with its CPU steal: the tail, and whether it comes in bursts.
    Latency,
}

pub struct Options<'a> {
    pub json: Option<&'a Path>,
    pub quick: bool,
    /// Sections to run; empty: all.
    pub only: Vec<Section>,
    /// Record CPU profiles (`perf record -g`) of both enforcers during each mode's
    /// connection-rate CPU run, into this file with the section as extension.
    pub perf: Option<&'a Path>,
    /// Simulated enforcers in the fleet section (also run with 100).
    pub fleet_n: usize,
    /// The ztunnel binary for the side-by-side section (None: that section does not run).
    pub ztunnel: Option<&'a Path>,
}

pub fn run(bin: &Path, opts: &Options) -> Result<()> {
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("TESSERA_BIN", bin) };
    let load = bin.with_file_name("xtask").to_string_lossy().into_owned();
    let quick = opts.quick;
    let secs = if quick { 2 } else { 5 };
    let wants = |s: Section| {
        (opts.only.is_empty() && !matches!(s, Section::Peers | Section::Latency))
            || opts.only.contains(&s)
    };

    let mut result = json!({
        "schema": 1,
        "quick": quick,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    });
    let mut steal = serde_json::Map::new();
    // The fleet needs no test hosts: loopback only.
    if opts.only == [Section::Fleet] {
        let t = CpuTimes::now()?;
        result["fleet"] = crate::fleet::section(&load, bin, opts.fleet_n, quick)?;
        steal.insert("fleet".into(), json!(t.steal_pct_since()?));
        result["cpu_steal_pct"] = steal.into();
        return report(&result, opts);
    }
    let peers = opts.ztunnel;
    let plain: &[&str] = if peers.is_some() {
        &crate::peers::HOSTS
    } else {
        &[]
    };
    let net = TestNet::with_plain_hosts(&["host-a", "host-b"], plain)?;
    let (a, b) = (net.host("host-a"), net.host("host-b"));
    // The load generator's host only (a test namespace): reuse TIME_WAIT ports, so that the
    // connection-rate runs measure connections, not the search for a free port (the direct
    // baseline to one address:port would otherwise exhaust it over the run).
    // The widened range must not hand the enforcer's own ports to the load's sockets: a
    // handshake-mode enforcer does not bind the tunnel mode's ports, and the next
    // tunnel-mode start would find them taken.
    let reserved = format!(
        "15001,15006,{},{}",
        tessera_tests::TUNNEL_PORT,
        tessera_tests::API_PORT
    );
    for (key, value) in [
        ("net.ipv4.tcp_tw_reuse", "1"),
        ("net.ipv4.ip_local_port_range", "1024 65000"),
        ("net.ipv4.ip_local_reserved_ports", reserved.as_str()),
    ] {
        tessera_tests::sh(
            "ip",
            &[
                "netns",
                "exec",
                &a.netns,
                "sysctl",
                "-q",
                "-w",
                &format!("{key}={value}"),
            ],
        )?;
    }
    net.add_workload(a, "client", &[("app", "bench-client")], &[])?;
    net.add_workload(b, "server", &[("app", "bench-server")], &[5201, 7001])?;
    // Each section starts the enforcers in the mode it measures.
    let servers = [
        net.spawn(b, Some("server"), "iperf3", &["-s", "-p", "5201"])?,
        net.spawn(b, None, "iperf3", &["-s", "-p", "5202"])?,
        net.spawn(b, Some("server"), &load, &["load", "serve-echo", "7001"])?,
        net.spawn(b, None, &load, &["load", "serve-echo", "7002"])?,
    ];
    for (pid, port) in servers.iter().zip([5201, 5202, 7001, 7002]) {
        net.wait_listening(*pid, port)?;
    }
    let bench = Bench {
        net: &net,
        load,
        secs,
        echo_pid: std::cell::Cell::new(servers[2]),
    };

    let mut cpu = serde_json::Map::new();
    if wants(Section::Tunnel) {
        let t = CpuTimes::now()?;
        let (tunnel, cpu_ms) = tunnel_mode(&bench, opts.perf)?;
        steal.insert("tunnel".into(), json!(t.steal_pct_since()?));
        merge(&mut result, tunnel);
        cpu.insert("tunnel".into(), json!(cpu_ms));
    }
    if wants(Section::Handshake) {
        let t = CpuTimes::now()?;
        let (handshake, cpu_ms) = handshake_mode(&bench, opts.perf)?;
        steal.insert("handshake".into(), json!(t.steal_pct_since()?));
        result["handshake"] = handshake;
        cpu.insert("handshake".into(), json!(cpu_ms));
    }
    if wants(Section::Latency) {
        let t = CpuTimes::now()?;
        result["latency_rounds"] = latency_rounds(&bench)?;
        steal.insert("latency".into(), json!(t.steal_pct_since()?));
    }
    result["cpu_ms_per_1000_connections"] = cpu.into();
    if let Some(ztunnel) = peers {
        let t = CpuTimes::now()?;
        result["peers"] =
            crate::peers::section(&net, &bench.load, quick, ztunnel, &|| restart_echo(&bench))?;
        steal.insert("peers".into(), json!(t.steal_pct_since()?));
    }
    // Memory before the control plane: that section stops the data-path enforcers.
    if wants(Section::Memory) {
        let t = CpuTimes::now()?;
        result["memory"] = memory(&bench, quick)?;
        steal.insert("memory".into(), json!(t.steal_pct_since()?));
    }
    if wants(Section::Control) {
        // Test hosts of its own; the data-path enforcers stay out of its way.
        for h in [a, b] {
            net.stop_enforcer(h, false)?;
        }
        let t = CpuTimes::now()?;
        result["control"] = control(&bench.load, quick)?;
        steal.insert("control".into(), json!(t.steal_pct_since()?));
    }
    if wants(Section::Fleet) {
        let t = CpuTimes::now()?;
        result["fleet"] = crate::fleet::section(&bench.load, bin, opts.fleet_n, quick)?;
        steal.insert("fleet".into(), json!(t.steal_pct_since()?));
    }
    result["cpu_steal_pct"] = steal.into();
    report(&result, opts)
}

fn report(result: &Value, opts: &Options) -> Result<()> {
    print_table(result);
    if let Some(f) = result.get("fleet") {
        crate::fleet::print_table(f);
    }
    if let Some(p) = result.get("peers") {
        crate::peers::print_table(p);
    }
    if let Some(path) = opts.json {
        fs::write(path, serde_json::to_string_pretty(result)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nJSON written to {}", path.display());
    }
    Ok(())
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(into), Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

/// Restarts both enforcers with changed test options.
fn restart(bench: &Bench, change: impl FnOnce(&mut tessera_tests::EnforcerOptions)) -> Result<()> {
    let net = bench.net;
    for h in ["host-a", "host-b"] {
        net.stop_enforcer(net.host(h), false)?;
    }
    change(&mut net.options.lock().unwrap());
    net.start_enforcers()
}

/// Connection rate through Tessera, the enforcers' CPU time per 1,000 of those
/// connections (ms), and the packets queued to the enforcers per connection.
fn rate_and_cpu(bench: &Bench) -> Result<(f64, f64, f64)> {
    let queued_before = bench.queued_packets()?;
    let before = bench.enforcer_cpu_secs()?;
    let (rate, n) = bench.connrate_counted(true)?;
    let used = bench.enforcer_cpu_secs()? - before;
    let queued = (bench.queued_packets()? - queued_before) as f64;
    let per = |x: f64| if n > 0.0 { x / n } else { 0.0 };
    Ok((rate, per(used * 1e6), per(queued)))
}

/// Tunnel mode: throughput, connection rate, latency, pool and token costs, CPU.
fn tunnel_mode(bench: &Bench, perf: Option<&Path>) -> Result<(Value, f64)> {
    let secs = bench.secs;
    restart(bench, |o| {
        o.handshake = false;
        o.pool_size = 16;
        o.tokens = true;
    })?;
    eprintln!("bench: throughput (iperf3, {secs} s each)");
    let (tp_d, tp_t) = (bench.iperf(false)?, bench.iperf(true)?);
    eprintln!("bench: connection rate ({secs} s each)");
    let (cr_d, cr_t) = (bench.connrate(false)?, bench.connrate(true)?);
    eprintln!("bench: request latency");
    let ((p50_d, p99_d), (p50_t, p99_t)) = (bench.latency(false)?, bench.latency(true)?);
    eprintln!("bench: connection rate without the tunnel pool");
    restart(bench, |o| o.pool_size = 0)?;
    let cr_nopool = bench.connrate(true)?;
    eprintln!("bench: connection rate with identity tokens off (unsigned identities)");
    restart(bench, |o| {
        o.pool_size = 16;
        o.tokens = false;
    })?;
    let cr_notokens = bench.connrate(true)?;
    eprintln!("bench: enforcer CPU per 1,000 connections, tunnel mode");
    restart(bench, |o| o.tokens = true)?;
    let (_, cpu_ms, _) = profiled(bench, perf, "tunnel", || rate_and_cpu(bench))?;
    if perf.is_some() {
        // Where a bulk transfer's CPU goes (`FILE.tunnel-bytes`): a run of its own, since
        // perf slows what it watches; its figure is not kept.
        eprintln!("bench: profiling a tunnelled transfer (not a figure)");
        profiled(bench, perf, "tunnel-bytes", || bench.iperf(true))?;
    }
    // Wall time per connection at saturation (4 client threads on this machine's cores).
    let token_cost_us = if cr_t > 0.0 && cr_notokens > 0.0 {
        1e6 / cr_t - 1e6 / cr_notokens
    } else {
        0.0
    };
    Ok((
        json!({
            "throughput_bps": {"direct": tp_d, "tessera": tp_t, "ratio": ratio(tp_t, tp_d)},
            "connections_per_second": {"direct": cr_d, "tessera": cr_t, "ratio": ratio(cr_t, cr_d)},
            "latency_us": {
                "p50": {"direct": p50_d, "tessera": p50_t, "ratio": ratio(p50_t, p50_d)},
                "p99": {"direct": p99_d, "tessera": p99_t, "ratio": ratio(p99_t, p99_d)},
            },
            "pool": {"pooled_cps": cr_t, "unpooled_cps": cr_nopool, "speedup": ratio(cr_t, cr_nopool)},
            "tokens": {"with_cps": cr_t, "without_cps": cr_notokens, "ratio": ratio(cr_t, cr_notokens), "added_us_per_connection": token_cost_us},
        }),
        cpu_ms,
    ))
}

/// `--only latency`: tunnel-mode request latency in alternating rounds for 30 s after a
/// fresh start (at least 3 rounds), each a ratio to its own direct run, with its steal.
fn latency_rounds(bench: &Bench) -> Result<Value> {
    restart(bench, |o| {
        o.handshake = false;
        o.pool_size = 16;
        o.tokens = true;
    })?;
    let started = Instant::now();
    let (mut rounds, mut p50, mut p99) = (Vec::new(), Vec::new(), Vec::new());
    while rounds.len() < 3 || started.elapsed() < Duration::from_secs(30) {
        let t = CpuTimes::now()?;
        let d = bench.latency_detail(false)?;
        let x = bench.latency_detail(true)?;
        let steal = t.steal_pct_since()?;
        let r = |q: &str| ratio(x[q].as_f64().unwrap_or(0.0), d[q].as_f64().unwrap_or(0.0));
        eprintln!(
            "bench: latency round {} at {:.0} s (steal {steal:.1} %): p50 {:.2}x p99 {:.2}x\n  direct  {d}\n  tessera {x}",
            rounds.len() + 1,
            started.elapsed().as_secs_f64(),
            r("p50_us"),
            r("p99_us"),
        );
        p50.push(r("p50_us"));
        p99.push(r("p99_us"));
        rounds.push(json!({"direct": d, "tessera": x, "steal_pct": steal}));
    }
    Ok(json!({"p50_ratio": spread(&p50), "p99_ratio": spread(&p99), "rounds": rounds}))
}

/// TCP-handshake mode: each figure right after its own direct baseline (this VM drifts over
/// a run: TIME_WAIT build-up, neighbours; the ratios should compare like with like).
fn handshake_mode(bench: &Bench, perf: Option<&Path>) -> Result<(Value, f64)> {
    eprintln!("bench: TCP-handshake mode (tokens in SYN / SYN-ACK / ACK, data in the kernel)");
    // The full handshake for every connection: the fast path off.
    restart(bench, |o| {
        o.handshake = true;
        o.tokens = true;
        o.fast_path_secs = Some(0);
    })?;
    let tp_d = bench.iperf(false)?;
    let tp = bench.iperf(true)?;
    let cr_d = bench.connrate(false)?;
    let (cr, cpu_ms, queued_per_conn) = profiled(bench, perf, "handshake", || rate_and_cpu(bench))?;
    let (p50_d, p99_d) = bench.latency(false)?;
    let (p50, p99) = bench.latency(true)?;
    // The queues alone: the same rules and workers, every packet passed unverified. What
    // this reaches is the ceiling of any engine behind NFQUEUE on this machine.
    eprintln!("bench: handshake mode, queues only (pass-through, no engine)");
    restart(bench, |o| o.pass_through = true)?;
    let floor_d = bench.connrate(false)?;
    let (floor, floor_cpu_ms, _) = rate_and_cpu(bench)?;
    // Strict freshness: a new ephemeral key for every connection (`key_reuse_ms = 0`).
    eprintln!("bench: handshake mode, a new ephemeral key per connection");
    restart(bench, |o| {
        o.pass_through = false;
        o.key_reuse_ms = Some(0);
    })?;
    let fresh_d = bench.connrate(false)?;
    let fresh = bench.connrate(true)?;
    // The in-kernel fast path, warm: after one full handshake, the pair's connections are
    // proven by sock_ops and tc (docs/handshake.md, "Fast path"). Alternating repeats, each
    // a ratio to the direct run just before it; the median and the spread are reported.
    eprintln!("bench: handshake mode, the fast path warm (3 alternating repeats)");
    restart(bench, |o| o.fast_path_secs = None)?;
    let fast_key_per_conn = fast_repeats(bench)?;
    restart(bench, |o| o.key_reuse_ms = None)?;
    let fast = profiled(bench, perf, "fast", || fast_repeats(bench))?;
    Ok((
        json!({
            "fast_path": fast,
            "fast_path_key_per_connection": fast_key_per_conn,
            "throughput_bps": {"direct": tp_d, "handshake": tp, "ratio": ratio(tp, tp_d)},
            "connections_per_second": {"direct": cr_d, "handshake": cr, "ratio": ratio(cr, cr_d)},
            "queued_packets_per_connection": queued_per_conn,
            "key_per_connection": {
                "connections_per_second": {"direct": fresh_d, "handshake": fresh, "ratio": ratio(fresh, fresh_d)},
            },
            "queues_only": {
                "connections_per_second": {"direct": floor_d, "handshake": floor, "ratio": ratio(floor, floor_d)},
                "cpu_ms_per_1000_connections": floor_cpu_ms,
            },
            "latency_us": {
                "p50": {"direct": p50_d, "handshake": p50, "ratio": ratio(p50, p50_d)},
                "p99": {"direct": p99_d, "handshake": p99, "ratio": ratio(p99, p99_d)},
            },
        }),
        cpu_ms,
    ))
}

/// Connection rates with the fast path warm: 3 alternating (direct, Tessera) pairs; the
/// median ratio with its spread, the packets queued per connection and the enforcers' CPU.
/// Restarts host-b's echo server (7001) so that its listener is opened while the running
/// enforcers' fast path is attached (a listener older than it gets no fast path:
/// docs/handshake.md, "Limits"), and warms the pair with one connection (the full
/// handshake that agrees the key).
fn restart_echo(bench: &Bench) -> Result<()> {
    let old = bench.echo_pid.get();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let b = bench.net.host("host-b");
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Ok(pid) = bench.net.spawn(
            b,
            Some("server"),
            &bench.load,
            &["load", "serve-echo", "7001"],
        ) && bench.net.wait_listening(pid, 7001).is_ok()
        {
            break pid;
        }
        anyhow::ensure!(Instant::now() < deadline, "cannot restart the echo server");
        std::thread::sleep(Duration::from_millis(200));
    };
    bench.echo_pid.set(pid);
    // Warm: one connection of the pair takes the full handshake (and agrees the key).
    let _ = bench.net.run(
        bench.client(),
        Bench::wl(true),
        &bench.load,
        &["load", "connrate", "10.77.0.2:7001", "1", "1", "1"],
        Duration::from_secs(30),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

fn fast_repeats(bench: &Bench) -> Result<Value> {
    restart_echo(bench)?;
    let (mut ratios, mut direct, mut tessera, mut queued, mut cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let d = bench.connrate(false)?;
        let (t, cpu_ms, q) = rate_and_cpu(bench)?;
        ratios.push(ratio(t, d));
        direct.push(d);
        tessera.push(t);
        queued.push(q);
        cpu.push(cpu_ms);
    }
    Ok(json!({
        "connections_per_second": {
            "direct": spread(&direct)["median"],
            "handshake": spread(&tessera)["median"],
            "ratio": spread(&ratios)["median"],
            "ratio_spread": spread(&ratios),
        },
        "queued_packets_per_connection": spread(&queued)["median"],
        "cpu_ms_per_1000_connections": spread(&cpu)["median"],
    }))
}

/// Runs `f` under `perf record -g` of both enforcers when asked (`--perf FILE`: the profile
/// of section `name` goes to `FILE.name`).
fn profiled<T>(
    bench: &Bench,
    perf: Option<&Path>,
    name: &str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let profiler = perf
        .map(|out| start_perf(bench, &out.with_extension(name)))
        .transpose()?;
    let result = f();
    if let Some(mut p) = profiler {
        // SIGINT makes perf write its file and exit.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        p.wait()?;
    }
    result
}

fn start_perf(bench: &Bench, out: &Path) -> Result<std::process::Child> {
    let pids: Vec<String> = ["host-a", "host-b"]
        .iter()
        .filter_map(|h| bench.net.enforcer_pid(bench.net.host(h)))
        .map(|p| p.to_string())
        .collect();
    let child = std::process::Command::new("perf")
        .args(["record", "-g", "-q", "-o"])
        .arg(out)
        .args(["-p", &pids.join(",")])
        .spawn()
        .context("cannot start perf (is it installed?)")?;
    thread::sleep(Duration::from_millis(300));
    Ok(child)
}

/// Memory last: holding thousands of connections leaves the host's TCP state (TIME_WAIT,
/// ports) busy for a while, which would skew the rates measured after it.
fn memory(bench: &Bench, quick: bool) -> Result<Value> {
    // Each enforcer holds one descriptor per tunnelled connection (the streams share a few
    // tunnels), and so does the load program; where the hard limit cannot be raised (no
    // CAP_SYS_RESOURCE) it caps how many can be held.
    let fd_hard_limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, h)| h)
        .unwrap_or(0);
    let open_connections =
        (if quick { 2_000 } else { 10_000 }).min(fd_hard_limit.saturating_sub(1_000) as usize);
    if open_connections < 10_000 && !quick {
        eprintln!(
            "bench: holding {open_connections} connections, not 10000: the open-file hard limit here is {fd_hard_limit}"
        );
    }
    restart(bench, |o| {
        o.handshake = false;
        o.pool_size = 16;
        o.tokens = true;
    })?;
    eprintln!("bench: memory with {open_connections} open tunnelled connections");
    let (idle, loaded, per_conn, fds) = bench.memory(open_connections)?;
    Ok(json!({
        "idle_rss_kib": idle,
        "loaded_rss_kib": loaded,
        "per_connection_kib": per_conn,
        "descriptors_per_connection": fds,
        "open_connections": open_connections,
        "fd_hard_limit": fd_hard_limit,
    }))
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let ms = |v: &Value| {
        if v["n"].as_u64().unwrap_or(0) == 0 {
            "not measured".to_string()
        } else {
            format!(
                "{:>8.1} ms  ({:.1} - {:.1}, n={})",
                f(&v["median"]),
                f(&v["min"]),
                f(&v["max"]),
                v["n"]
            )
        }
    };
    let row = |name: &str, fig: &Value, scale: f64, prec: usize, then: &str, target: &str| {
        let (d, t) = (f(&fig["direct"]), f(&fig[then]));
        println!(
            "{name:<34} {:>12} {:>12} {:>8} {target}",
            format!("{:.prec$}", d / scale),
            format!("{:.prec$}", t / scale),
            format!("{:.2}x", f(&fig["ratio"]))
        );
    };
    let header = |title: &str, col: &str| {
        println!(
            "\n{title}{:<34} {:>12} {:>12} {:>8} target",
            "metric", "direct", col, "ratio"
        );
    };
    if r.get("throughput_bps").is_some() {
        header("", "tessera");
        row(
            "throughput (Gbit/s)",
            &r["throughput_bps"],
            1e9,
            2,
            "tessera",
            ">= 0.5x",
        );
        row(
            "new connections / s",
            &r["connections_per_second"],
            1.0,
            0,
            "tessera",
            ">= 0.5x",
        );
        row(
            "request latency p50 (us)",
            &r["latency_us"]["p50"],
            1.0,
            1,
            "tessera",
            "",
        );
        row(
            "request latency p99 (us)",
            &r["latency_us"]["p99"],
            1.0,
            1,
            "tessera",
            "added <= 2x direct",
        );
        let (pool, tokens) = (&r["pool"], &r["tokens"]);
        println!(
            "{:<34} {:>12.0} {:>12.0} {:>8} (pool speed-up)",
            "connections / s, pool off vs on",
            f(&pool["unpooled_cps"]),
            f(&pool["pooled_cps"]),
            format!("{:.2}x", f(&pool["speedup"]))
        );
        println!(
            "{:<34} {:>12.0} {:>12.0} {:>8} (tokens add {:.0} us per connection)",
            "connections / s, tokens off vs on",
            f(&tokens["without_cps"]),
            f(&tokens["with_cps"]),
            format!("{:.2}x", f(&tokens["ratio"])),
            f(&tokens["added_us_per_connection"])
        );
    }
    if let Some(h) = r.get("handshake") {
        header("TCP-handshake mode\n", "handshake");
        row(
            "throughput (Gbit/s)",
            &h["throughput_bps"],
            1e9,
            2,
            "handshake",
            ">= 0.95x",
        );
        row(
            "new connections / s",
            &h["connections_per_second"],
            1.0,
            0,
            "handshake",
            ">= 0.7x",
        );
        row(
            "request latency p50 (us)",
            &h["latency_us"]["p50"],
            1.0,
            1,
            "handshake",
            "",
        );
        row(
            "request latency p99 (us)",
            &h["latency_us"]["p99"],
            1.0,
            1,
            "handshake",
            "<= 1.2x",
        );
        row(
            "new conns / s, key per connection",
            &h["key_per_connection"]["connections_per_second"],
            1.0,
            0,
            "handshake",
            "(key_reuse_ms = 0)",
        );
        row(
            "new conns / s, queues only",
            &h["queues_only"]["connections_per_second"],
            1.0,
            0,
            "handshake",
            "(pass-through: the queues' own ceiling)",
        );
        row(
            "new conns / s, fast path warm",
            &h["fast_path"]["connections_per_second"],
            1.0,
            0,
            "handshake",
            ">= 0.9x (median of 3)",
        );
        row(
            "  ... key per connection",
            &h["fast_path_key_per_connection"]["connections_per_second"],
            1.0,
            0,
            "handshake",
            ">= 0.5x (median of 3)",
        );
        let sp = &h["fast_path"]["connections_per_second"]["ratio_spread"];
        println!(
            "fast path: ratio min-max {:.2}-{:.2}; packets through NFQUEUE per connection {:.3}; enforcer CPU per 1,000 connections {:.0} ms",
            f(&sp["min"]),
            f(&sp["max"]),
            f(&h["fast_path"]["queued_packets_per_connection"]),
            f(&h["fast_path"]["cpu_ms_per_1000_connections"])
        );
        println!(
            "packets through NFQUEUE per connection (both hosts): {:.2}; enforcer CPU per 1,000 connections with the queues only: {:.0} ms",
            f(&h["queued_packets_per_connection"]),
            f(&h["queues_only"]["cpu_ms_per_1000_connections"])
        );
    }
    let cpu = &r["cpu_ms_per_1000_connections"];
    if cpu.as_object().is_some_and(|c| !c.is_empty()) {
        println!("\nenforcer CPU per 1,000 new connections (both ends):");
    }
    for mode in ["tunnel", "handshake"] {
        if let Some(ms) = cpu.get(mode) {
            println!("  {mode:<10} {:.0} ms", f(ms));
        }
    }
    if let Some(m) = r.get("memory") {
        let n = &m["open_connections"];
        println!(
            "enforcer RSS idle (KiB)            host-a {} host-b {}\nenforcer RSS, {n} open conns (KiB) host-a {} host-b {}  ({:.1} / {:.1} KiB per connection)",
            m["idle_rss_kib"]["host-a"],
            m["idle_rss_kib"]["host-b"],
            m["loaded_rss_kib"]["host-a"],
            m["loaded_rss_kib"]["host-b"],
            f(&m["per_connection_kib"]["host-a"]),
            f(&m["per_connection_kib"]["host-b"])
        );
        println!(
            "enforcer descriptors per open conn  host-a {:.2} host-b {:.2}  (target: 1, <= 20 KiB)",
            f(&m["descriptors_per_connection"]["host-a"]),
            f(&m["descriptors_per_connection"]["host-b"])
        );
    }
    if let Some(c) = r.get("control") {
        let p = &c["policy_in_force_ms"];
        let m = &c["server_rss_kib"];
        println!("\ncontrol plane (median, min - max)");
        println!(
            "{:<44} {}",
            "enforcer start to ready, enrolling",
            ms(&c["enforcer_start_ms"]["enrolling"])
        );
        println!(
            "{:<44} {}",
            "enforcer start to ready, from the cache",
            ms(&c["enforcer_start_ms"]["from_cache"])
        );
        println!(
            "{:<44} {}",
            "enrolment request (round trip)",
            ms(&c["enrolment_round_trip_ms"])
        );
        println!(
            "{:<44} {}",
            format!("policy apply -> in force at all {} (log)", p["enforcers"]),
            ms(&p["logged"])
        );
        println!(
            "{:<44} {}",
            "policy apply -> allowed connection works",
            ms(&p["probed"])
        );
        println!(
            "{:<44} {}",
            "`tessera policy apply` command itself",
            ms(&p["apply_command"])
        );
        println!(
            "{:<44} {:>8} KiB idle, {} KiB with {} more watch streams ({:.1} KiB each)",
            "server RSS",
            m["idle"],
            m["with_watchers"],
            m["watchers"],
            f(&m["per_watcher"])
        );
    }
    if let Some(Value::Object(steal)) = r.get("cpu_steal_pct") {
        let parts: Vec<String> = steal
            .iter()
            .map(|(k, v)| format!("{k} {:.1}%", f(v)))
            .collect();
        if !parts.is_empty() {
            println!("\nCPU steal during each section: {}", parts.join(", "));
        }
    }
}

/// Host-wide CPU time counters (`/proc/stat`, the `cpu` line): the share a hypervisor took
/// from this VM (steal) while a section ran says how far its figures can be trusted.
#[derive(Clone, Copy)]
pub(crate) struct CpuTimes {
    steal: u64,
    total: u64,
}

impl CpuTimes {
    pub(crate) fn now() -> Result<Self> {
        let stat = fs::read_to_string("/proc/stat")?;
        let line = stat.lines().next().context("/proc/stat is empty")?;
        // cpu user nice system idle iowait irq softirq steal guest guest_nice
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        if f.len() < 8 {
            bail!("/proc/stat: unexpected cpu line {line:?}");
        }
        Ok(Self {
            steal: f[7],
            total: f.iter().sum(),
        })
    }

    /// Percent of all CPU time stolen since `self`.
    pub(crate) fn steal_pct_since(&self) -> Result<f64> {
        let now = Self::now()?;
        let total = now.total.saturating_sub(self.total);
        Ok(if total == 0 {
            0.0
        } else {
            100.0 * now.steal.saturating_sub(self.steal) as f64 / total as f64
        })
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `2026-11-30T10:20:00.123456Z` (the enforcer's and server's log timestamps, UTC) as Unix
/// seconds.
fn parse_timestamp(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|v| v.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3_600 + mm * 60) as f64 + ss)
}

/// A log's lines (colour codes removed) with their timestamps.
fn log_lines(text: &str) -> Vec<(f64, String)> {
    text.lines()
        .filter_map(|l| {
            let plain = crate::peers::strip_ansi(l);
            let ts = parse_timestamp(plain.split_whitespace().next()?)?;
            Some((ts, plain))
        })
        .collect()
}

fn first_line<'a>(lines: &'a [(f64, String)], needle: &str) -> Option<&'a (f64, String)> {
    lines.iter().find(|(_, l)| l.contains(needle))
}

/// The log `path` from byte `from` on.
fn log_since(path: &Path, from: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default()).into_owned()
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Median, min and max (ms) of some samples.
pub(crate) fn spread(samples: &[f64]) -> Value {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return json!({"n": 0});
    }
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    json!({"median": median, "min": s[0], "max": s[s.len() - 1], "n": s.len()})
}

/// One timed enforcer start (from just before the process is spawned).
struct Start {
    /// Spawn to the `enforcer ready` log line.
    ready_ms: f64,
    /// The enrolment request: the control client's first connection attempt to the
    /// `enrolled with the control plane` line (None on a start from the cache).
    enrol_ms: Option<f64>,
}

/// The enforcer's log lines that mark enrolment; `reqwest::connect=debug` adds the line
/// where the control client opens its first connection (the enrolment request's start).
const CONTROL_START_LOG: &str = "info,reqwest::connect=debug";

fn timed_start(net: &TestNet, host: &Host, cold: bool) -> Result<Start> {
    let log = net.log_path(host);
    let from = file_len(&log);
    let t0 = unix_now();
    net.start_enforcer_with_env(host, &[("RUST_LOG", CONTROL_START_LOG)])?;
    let lines = log_lines(&log_since(&log, from));
    let ready = first_line(&lines, "enforcer ready")
        .with_context(|| format!("{}: no 'enforcer ready' line", host.name))?
        .0;
    let enrolled = first_line(&lines, "enrolled with the control plane");
    let cached = first_line(&lines, "starting from the cached identity");
    if cold != enrolled.is_some() || cold == cached.is_some() {
        bail!(
            "{}: expected a start {} but the log says otherwise:\n{}",
            host.name,
            if cold {
                "with enrolment"
            } else {
                "from the cache"
            },
            log_since(&log, from)
        );
    }
    let enrol_ms = match (enrolled, first_line(&lines, "starting new connection")) {
        (Some(done), Some(start)) => Some((done.0 - start.0) * 1e3),
        _ => None,
    };
    Ok(Start {
        ready_ms: (ready - t0) * 1e3,
        enrol_ms,
    })
}

/// web may reach api (the probe's connection); the other version allows nothing it uses.
const POLICY_ALLOW: &str = "\
rules:
  - name: bench-web-to-api
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=api]}]
";
const POLICY_DENY: &str = "\
rules:
  - name: bench-nothing-used
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=nobody]}]
";

/// Applies `text` centrally; the version, and when the command started (Unix seconds).
fn apply_policy(net: &TestNet, srv: &ControlServer, text: &str) -> Result<(u64, f64)> {
    let file = net.dir.join("bench-policy.yaml");
    fs::write(&file, text)?;
    let t0 = unix_now();
    let out = net.control_admin(srv, &["policy", "apply", file.to_str().unwrap()])?;
    let version = out
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .and_then(|v| v.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .with_context(|| format!("policy apply printed no version: {out}"))?;
    Ok((version, t0))
}

/// When each enforcer logged that `version` is in force (Unix seconds), waiting for it.
fn in_force(net: &TestNet, hosts: &[&Host], offsets: &[u64], version: u64) -> Result<Vec<f64>> {
    let needle = format!("version={version} ");
    let deadline = Instant::now() + Duration::from_secs(20);
    hosts
        .iter()
        .zip(offsets)
        .map(|(h, from)| {
            loop {
                let lines = log_lines(&log_since(&net.log_path(h), *from));
                if let Some((ts, _)) = lines.iter().find(|(_, l)| {
                    l.contains("policy from the control plane in force") && l.contains(&needle)
                }) {
                    break Ok(*ts);
                }
                if Instant::now() > deadline {
                    bail!(
                        "{}: policy version {version} not in force within 20 s:\n{}",
                        h.name,
                        log_since(&net.log_path(h), *from)
                    );
                }
                thread::sleep(Duration::from_millis(20));
            }
        })
        .collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// An Ed25519 private key in PEM (PKCS#8 v1 or v2) as PKCS#8 v1 PEM.
fn ed25519_pkcs8_v1(pem: &str) -> Result<String> {
    let b64: Vec<u8> = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| l.trim().bytes())
        .filter(|c| *c != b'=')
        .collect();
    let mut der = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in b64 {
        let v = B64
            .iter()
            .position(|x| *x == c)
            .context("key.pem: not base64")? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            der.push((acc >> bits) as u8);
        }
    }
    // SEQUENCE { INTEGER v, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } ...
    const HEAD: [u8; 11] = [
        0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];
    let at = der
        .windows(11)
        .position(|w| w == HEAD)
        .context("key.pem: not an Ed25519 PKCS#8 key")?;
    let seed = der
        .get(at + 11..at + 43)
        .context("key.pem: truncated Ed25519 key")?;
    let mut v1 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    v1.extend_from_slice(seed);
    let mut out = String::new();
    for chunk in v1.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                B64[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    Ok(format!(
        "-----BEGIN PRIVATE KEY-----\n{out}\n-----END PRIVATE KEY-----\n"
    ))
}

/// Established TCP connections to the control plane's port (in its host's namespace).
fn control_connections(net: &TestNet, srv: &ControlServer) -> Result<usize> {
    let out = tessera_tests::sh(
        "ip",
        &[
            "netns",
            "exec",
            &net.host(&srv.host).netns,
            "ss",
            "-Htn",
            "state",
            "established",
            &format!("( sport = :{} )", tessera_tests::CONTROL_PORT),
        ],
    )?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

/// The control plane (`tessera server`) on a host of its own and two enforcers that enrol
/// with it: start-up with enrolment vs from the cache, the enrolment request, how long a
/// policy change takes to be in force everywhere, and the server's memory.
fn control(load: &str, quick: bool) -> Result<Value> {
    let net = TestNet::with_plain_hosts(&["host-a", "host-b"], &["control"])?;
    let (a, b) = (net.host("host-a"), net.host("host-b"));
    net.add_workload(a, "web", &[("app", "web")], &[])?;
    net.add_workload(b, "api", &[("app", "api")], &[7000])?;
    let echo = net.spawn(b, Some("api"), load, &["load", "serve-echo", "7000"])?;
    net.wait_listening(echo, 7000)?;
    let srv = net.start_control(net.host("control"), &[])?;

    // Enrolment: every round removes both enforcers from the control plane and their
    // caches, joins them again with new tokens and starts them (enrolment), then restarts
    // each (from the cache).
    let rounds = if quick { 2 } else { 3 };
    eprintln!("bench: control plane, {rounds} rounds of enrolment and restart from the cache");
    let (mut cold, mut cached, mut enrol) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        for h in [a, b] {
            if round > 0 {
                net.stop_enforcer(h, false)?;
                // Removal needs a revoked enforcer (which is stopped already).
                for what in ["revoke", "remove"] {
                    net.control_admin(&srv, &["server", "enforcer", what, &h.name])?;
                }
                fs::remove_dir_all(net.control_state(h))?;
            }
            net.join(h, &srv, "site=bench")?;
            let s = timed_start(&net, h, true)?;
            cold.push(s.ready_ms);
            enrol.extend(s.enrol_ms);
        }
        for h in [a, b] {
            net.stop_enforcer(h, false)?;
            cached.push(timed_start(&net, h, false)?.ready_ms);
        }
    }
    if enrol.is_empty() {
        eprintln!(
            "bench: the enforcer logged no 'starting new connection' line: enrolment round trip not measured"
        );
    }
    // Both follow the control plane (their watches are open) before a policy is applied.
    let deadline = Instant::now() + Duration::from_secs(20);
    while control_connections(&net, &srv)? < 2 {
        if Instant::now() > deadline {
            bail!("the enforcers did not open their watches within 20 s");
        }
        thread::sleep(Duration::from_millis(50));
    }

    // Policy changes: each iteration applies a policy that denies web -> api, then (timed)
    // one that allows it, with a probe from web retrying every 5 ms. Figures: from the start
    // of `tessera policy apply` to the last enforcer's log line of that version in force,
    // and to the probe's first echo (the change in force on the path, end to end).
    let iterations = if quick { 3 } else { 6 };
    eprintln!("bench: control plane, {iterations} policy changes");
    let hosts = [a, b];
    let (mut logged, mut probed, mut command) = (vec![], vec![], vec![]);
    for i in 0..iterations {
        let offsets: Vec<u64> = hosts.iter().map(|h| file_len(&net.log_path(h))).collect();
        let (v, _) = apply_policy(&net, &srv, POLICY_DENY)?;
        in_force(&net, &hosts, &offsets, v)?;
        let ready = net.dir.join(format!("probe-{i}.ready"));
        let out = net.dir.join(format!("probe-{i}.json"));
        net.spawn(
            a,
            Some("web"),
            load,
            &[
                "load",
                "probe",
                "10.77.0.2:7000",
                "20",
                "5",
                ready.to_str().unwrap(),
                out.to_str().unwrap(),
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            if Instant::now() > deadline {
                bail!("the probe did not start failing within 10 s (denied policy in force?)");
            }
            thread::sleep(Duration::from_millis(10));
        }
        let offsets: Vec<u64> = hosts.iter().map(|h| file_len(&net.log_path(h))).collect();
        let (v, t0) = apply_policy(&net, &srv, POLICY_ALLOW)?;
        command.push((unix_now() - t0) * 1e3);
        let when = in_force(&net, &hosts, &offsets, v)?;
        let last = when.iter().copied().fold(f64::MIN, f64::max);
        logged.push((last - t0) * 1e3);
        let deadline = Instant::now() + Duration::from_secs(25);
        while !out.exists() {
            if Instant::now() > deadline {
                bail!("the probe never got through after policy version {v}");
            }
            thread::sleep(Duration::from_millis(10));
        }
        let r: Value = serde_json::from_str(&fs::read_to_string(&out)?)?;
        let at = r["unix_us"].as_f64().context("probe result")? / 1e6;
        probed.push((at - t0) * 1e3);
    }

    // Server memory: idle with the two enforcers enrolled and watching, then with more
    // watch streams (curl with host-a's certificate, as an enforcer would) held open.
    thread::sleep(Duration::from_millis(500));
    let idle_rss = rss_kib(srv.pid)?;
    let watchers = if quick { 50 } else { 100 };
    eprintln!("bench: control plane memory, idle and with {watchers} more watch streams");
    let cache = net.control_state(a);
    let cert = cache.join("cert.pem");
    // curl's OpenSSL 3.0 does not read the PKCS#8 v2 form (with the public key) of the
    // cached Ed25519 key: the same key as PKCS#8 v1.
    let key = net.dir.join("watcher-key.pem");
    fs::write(
        &key,
        ed25519_pkcs8_v1(&fs::read_to_string(cache.join("key.pem"))?)?,
    )?;
    let server_ca = srv.state.join("ca.pem");
    let watch_url = format!("{}/v1/watch", srv.url);
    let before = control_connections(&net, &srv)?;
    let mut curls = Vec::with_capacity(watchers);
    for _ in 0..watchers {
        curls.push(net.spawn(
            net.host("control"),
            None,
            "curl",
            &[
                "-sS",
                "-N",
                "-o",
                "/dev/null",
                "-m",
                "120",
                "--cacert",
                server_ca.to_str().unwrap(),
                "--cert",
                cert.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
                &watch_url,
            ],
        )?);
    }
    // Each curl holds one connection (counted at the server's end).
    let deadline = Instant::now() + Duration::from_secs(30);
    while control_connections(&net, &srv)? < before + watchers {
        if Instant::now() > deadline {
            bail!(
                "only {} of {watchers} watch streams open within 30 s:\n{}",
                control_connections(&net, &srv)?.saturating_sub(before),
                fs::read_to_string(net.dir.join("control-other-curl.log")).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(500));
    let watched_rss = rss_kib(srv.pid)?;
    for pid in curls {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    Ok(json!({
        "enforcer_start_ms": {"enrolling": spread(&cold), "from_cache": spread(&cached)},
        "enrolment_round_trip_ms": spread(&enrol),
        "policy_in_force_ms": {
            "logged": spread(&logged),
            "probed": spread(&probed),
            "apply_command": spread(&command),
            "enforcers": hosts.len(),
        },
        "server_rss_kib": {
            "idle": idle_rss,
            "watchers": watchers,
            "with_watchers": watched_rss,
            "per_watcher": (watched_rss.saturating_sub(idle_rss)) as f64 / watchers as f64,
        },
    }))
}
