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
//!   `handshake.queues_only.{connections_per_second.{direct,handshake,ratio},cpu_ms_per_1000_connections}`:
//!   the same rules and NFQUEUE workers passing every packet unverified (`pass_through`):
//!   what the queues alone cost, the ceiling for any engine behind them.
//! * `cpu_ms_per_1000_connections.{tunnel,handshake}`: CPU time both enforcers spend per
//!   1,000 new connections (from /proc/<pid>/stat during the connection-rate run).
//! * `memory.{idle_rss_kib,loaded_rss_kib,per_connection_kib}.{host-a,host-b}` and
//!   `memory.open_connections`: enforcer resident memory idle and holding that many
//!   tunnelled connections.
use std::{
    fs,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tessera_tests::{Host, TestNet};

fn out_json(out: &std::process::Output, what: &str) -> Result<Value> {
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

fn rss_kib(pid: u32) -> Result<u64> {
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
        let v = out_json(&out, "rr")?;
        Ok((
            v["p50_us"].as_f64().context("p50")?,
            v["p99_us"].as_f64().context("p99")?,
        ))
    }

    fn memory(&self, n: usize) -> Result<(Value, Value, Value)> {
        let (a, b) = (self.net.host("host-a"), self.net.host("host-b"));
        let pids = [
            self.net.enforcer_pid(a).context("enforcer a")?,
            self.net.enforcer_pid(b).context("enforcer b")?,
        ];
        let idle = [rss_kib(pids[0])?, rss_kib(pids[1])?];
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
        let opened = fs::read_to_string(&ready)?;
        eprintln!(
            "bench: {n} connections opened in {} s",
            opened.split_whitespace().nth(1).unwrap_or("?")
        );
        fs::remove_file(&ready)?; // tells the holder to close its connections and exit
        let per = |i: usize| (loaded[i].saturating_sub(idle[i])) as f64 / n as f64;
        Ok((
            json!({"host-a": idle[0], "host-b": idle[1]}),
            json!({"host-a": loaded[0], "host-b": loaded[1]}),
            json!({"host-a": per(0), "host-b": per(1)}),
        ))
    }
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
}

pub struct Options<'a> {
    pub json: Option<&'a Path>,
    pub quick: bool,
    /// Sections to run; empty: all.
    pub only: Vec<Section>,
    /// Record a CPU profile (`perf record -g`) of both enforcers during the handshake-mode
    /// connection-rate run into this file.
    pub perf: Option<&'a Path>,
}

pub fn run(bin: &Path, opts: &Options) -> Result<()> {
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("TESSERA_BIN", bin) };
    let load = bin.with_file_name("xtask").to_string_lossy().into_owned();
    let quick = opts.quick;
    let secs = if quick { 2 } else { 5 };
    let wants = |s: Section| opts.only.is_empty() || opts.only.contains(&s);

    let net = TestNet::new(&["host-a", "host-b"])?;
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
    };

    let mut result = json!({
        "schema": 1,
        "quick": quick,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    });
    let mut cpu = serde_json::Map::new();
    if wants(Section::Tunnel) {
        let (tunnel, cpu_ms) = tunnel_mode(&bench)?;
        merge(&mut result, tunnel);
        cpu.insert("tunnel".into(), json!(cpu_ms));
    }
    if wants(Section::Handshake) {
        let (handshake, cpu_ms) = handshake_mode(&bench, opts.perf)?;
        result["handshake"] = handshake;
        cpu.insert("handshake".into(), json!(cpu_ms));
    }
    result["cpu_ms_per_1000_connections"] = cpu.into();
    if wants(Section::Memory) {
        result["memory"] = memory(&bench, quick)?;
    }
    print_table(&result);
    if let Some(path) = opts.json {
        fs::write(path, serde_json::to_string_pretty(&result)? + "\n")
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
fn tunnel_mode(bench: &Bench) -> Result<(Value, f64)> {
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
    let (_, cpu_ms, _) = rate_and_cpu(bench)?;
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

/// TCP-handshake mode: each figure right after its own direct baseline (this VM drifts over
/// a run: TIME_WAIT build-up, neighbours; the ratios should compare like with like).
fn handshake_mode(bench: &Bench, perf: Option<&Path>) -> Result<(Value, f64)> {
    eprintln!("bench: TCP-handshake mode (tokens in SYN / SYN-ACK / ACK, data in the kernel)");
    restart(bench, |o| {
        o.handshake = true;
        o.tokens = true;
    })?;
    let tp_d = bench.iperf(false)?;
    let tp = bench.iperf(true)?;
    let cr_d = bench.connrate(false)?;
    let profiler = perf.map(|out| start_perf(bench, out)).transpose()?;
    let (cr, cpu_ms, queued_per_conn) = rate_and_cpu(bench)?;
    if let Some(mut p) = profiler {
        // SIGINT makes perf write its file and exit.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        p.wait()?;
    }
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
    restart(bench, |o| o.key_reuse_ms = None)?;
    Ok((
        json!({
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
    // The source enforcer holds two descriptors per tunnelled connection; where the hard
    // limit cannot be raised (no CAP_SYS_RESOURCE) it caps how many can be held.
    let fd_hard_limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, h)| h)
        .unwrap_or(0);
    let open_connections = (if quick { 2_000 } else { 10_000 })
        .min((fd_hard_limit.saturating_sub(1_000) / 2) as usize);
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
    let (idle, loaded, per_conn) = bench.memory(open_connections)?;
    Ok(json!({
        "idle_rss_kib": idle,
        "loaded_rss_kib": loaded,
        "per_connection_kib": per_conn,
        "open_connections": open_connections,
        "fd_hard_limit": fd_hard_limit,
    }))
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
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
        println!(
            "packets through NFQUEUE per connection (both hosts): {:.2}; enforcer CPU per 1,000 connections with the queues only: {:.0} ms",
            f(&h["queued_packets_per_connection"]),
            f(&h["queues_only"]["cpu_ms_per_1000_connections"])
        );
    }
    let cpu = &r["cpu_ms_per_1000_connections"];
    println!("\nenforcer CPU per 1,000 new connections (both ends):");
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
    }
}
