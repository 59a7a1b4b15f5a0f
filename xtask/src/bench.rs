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
//!   each right after its own direct baseline.
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

pub fn run(bin: &Path, json_path: Option<&Path>, quick: bool) -> Result<()> {
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("TESSERA_BIN", bin) };
    let load = bin.with_file_name("xtask").to_string_lossy().into_owned();
    let secs = if quick { 2 } else { 5 };
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

    let net = TestNet::new(&["host-a", "host-b"])?;
    let (a, b) = (net.host("host-a"), net.host("host-b"));
    // The load generator's host only (a test namespace): reuse TIME_WAIT ports, so that the
    // connection-rate runs measure connections, not the search for a free port (the direct
    // baseline to one address:port would otherwise exhaust it over the run).
    for (key, value) in [
        ("net.ipv4.tcp_tw_reuse", "1"),
        ("net.ipv4.ip_local_port_range", "1024 65000"),
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
    net.start_enforcers()?;
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

    eprintln!("bench: throughput (iperf3, {secs} s each)");
    let (tp_d, tp_t) = (bench.iperf(false)?, bench.iperf(true)?);
    eprintln!("bench: connection rate ({secs} s each)");
    let (cr_d, cr_t) = (bench.connrate(false)?, bench.connrate(true)?);
    eprintln!("bench: request latency");
    let ((p50_d, p99_d), (p50_t, p99_t)) = (bench.latency(false)?, bench.latency(true)?);
    eprintln!("bench: connection rate without the tunnel pool");
    for h in [a, b] {
        net.stop_enforcer(h, false)?;
    }
    net.options.lock().unwrap().pool_size = 0;
    net.start_enforcers()?;
    let cr_nopool = bench.connrate(true)?;

    eprintln!("bench: connection rate with identity tokens off (unsigned identities)");
    for h in [a, b] {
        net.stop_enforcer(h, false)?;
    }
    {
        let mut o = net.options.lock().unwrap();
        o.pool_size = 16;
        o.tokens = false;
    }
    net.start_enforcers()?;
    let cr_notokens = bench.connrate(true)?;

    // Enforcer CPU per 1,000 new connections, tunnel mode (tokens on) then handshake mode.
    for h in [a, b] {
        net.stop_enforcer(h, false)?;
    }
    net.options.lock().unwrap().tokens = true;
    net.start_enforcers()?;
    let cpu_per_k = |bench: &Bench| -> Result<(f64, f64)> {
        let before = bench.enforcer_cpu_secs()?;
        let (rate, n) = bench.connrate_counted(true)?;
        let used = bench.enforcer_cpu_secs()? - before;
        Ok((rate, if n > 0.0 { used * 1e3 / n * 1e3 } else { 0.0 }))
    };
    eprintln!("bench: enforcer CPU per 1,000 connections, tunnel mode");
    let (_, cpu_tunnel_ms) = cpu_per_k(&bench)?;

    eprintln!("bench: TCP-handshake mode (tokens in SYN / SYN-ACK / ACK, data in the kernel)");
    for h in [a, b] {
        net.stop_enforcer(h, false)?;
    }
    net.options.lock().unwrap().handshake = true;
    net.start_enforcers()?;
    // Each figure right after its direct baseline: this VM drifts over a run (TIME_WAIT
    // build-up, neighbours), and the ratios should compare like with like.
    let hs_tp_d = bench.iperf(false)?;
    let hs_tp = bench.iperf(true)?;
    let hs_cr_d = bench.connrate(false)?;
    let (hs_cr, cpu_handshake_ms) = cpu_per_k(&bench)?;
    let (hs_p50_d, hs_p99_d) = bench.latency(false)?;
    let (hs_p50, hs_p99) = bench.latency(true)?;

    // Memory last: holding thousands of connections leaves the host's TCP state (TIME_WAIT,
    // ports) busy for a while, which would skew the rates measured after it.
    for h in [a, b] {
        net.stop_enforcer(h, false)?;
    }
    net.options.lock().unwrap().handshake = false;
    net.start_enforcers()?;
    eprintln!("bench: memory with {open_connections} open tunnelled connections");
    let (idle, loaded, per_conn) = bench.memory(open_connections)?;
    // Wall time per connection at saturation (4 client threads on this machine's cores).
    let token_cost_us = if cr_t > 0.0 && cr_notokens > 0.0 {
        1e6 / cr_t - 1e6 / cr_notokens
    } else {
        0.0
    };

    let result = json!({
        "schema": 1,
        "quick": quick,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "throughput_bps": {"direct": tp_d, "tessera": tp_t, "ratio": ratio(tp_t, tp_d)},
        "connections_per_second": {"direct": cr_d, "tessera": cr_t, "ratio": ratio(cr_t, cr_d)},
        "latency_us": {
            "p50": {"direct": p50_d, "tessera": p50_t, "ratio": ratio(p50_t, p50_d)},
            "p99": {"direct": p99_d, "tessera": p99_t, "ratio": ratio(p99_t, p99_d)},
        },
        "pool": {"pooled_cps": cr_t, "unpooled_cps": cr_nopool, "speedup": ratio(cr_t, cr_nopool)},
        "tokens": {"with_cps": cr_t, "without_cps": cr_notokens, "ratio": ratio(cr_t, cr_notokens), "added_us_per_connection": token_cost_us},
        "handshake": {
            "throughput_bps": {"direct": hs_tp_d, "handshake": hs_tp, "ratio": ratio(hs_tp, hs_tp_d)},
            "connections_per_second": {"direct": hs_cr_d, "handshake": hs_cr, "ratio": ratio(hs_cr, hs_cr_d)},
            "latency_us": {
                "p50": {"direct": hs_p50_d, "handshake": hs_p50, "ratio": ratio(hs_p50, hs_p50_d)},
                "p99": {"direct": hs_p99_d, "handshake": hs_p99, "ratio": ratio(hs_p99, hs_p99_d)},
            },
        },
        "cpu_ms_per_1000_connections": {"tunnel": cpu_tunnel_ms, "handshake": cpu_handshake_ms},
        "memory": {"idle_rss_kib": idle, "loaded_rss_kib": loaded, "per_connection_kib": per_conn, "open_connections": open_connections, "fd_hard_limit": fd_hard_limit},
    });

    let row = |name: &str, d: String, t: String, r: f64, target: &str| {
        println!(
            "{name:<34} {d:>12} {t:>12} {:>8} {target}",
            format!("{r:.2}x")
        );
    };
    println!(
        "\n{:<34} {:>12} {:>12} {:>8} target",
        "metric", "direct", "tessera", "ratio"
    );
    row(
        "throughput (Gbit/s)",
        format!("{:.2}", tp_d / 1e9),
        format!("{:.2}", tp_t / 1e9),
        ratio(tp_t, tp_d),
        ">= 0.5x",
    );
    row(
        "new connections / s",
        format!("{cr_d:.0}"),
        format!("{cr_t:.0}"),
        ratio(cr_t, cr_d),
        ">= 0.5x",
    );
    row(
        "request latency p50 (us)",
        format!("{p50_d:.1}"),
        format!("{p50_t:.1}"),
        ratio(p50_t, p50_d),
        "",
    );
    row(
        "request latency p99 (us)",
        format!("{p99_d:.1}"),
        format!("{p99_t:.1}"),
        ratio(p99_t, p99_d),
        "added <= 2x direct",
    );
    row(
        "connections / s, pool off vs on",
        format!("{cr_nopool:.0}"),
        format!("{cr_t:.0}"),
        ratio(cr_t, cr_nopool),
        "(pool speed-up)",
    );
    row(
        "connections / s, tokens off vs on",
        format!("{cr_notokens:.0}"),
        format!("{cr_t:.0}"),
        ratio(cr_t, cr_notokens),
        &format!("(tokens add {token_cost_us:.0} us per connection)"),
    );
    println!(
        "\nTCP-handshake mode\n{:<34} {:>12} {:>12} {:>8} target",
        "metric", "direct", "handshake", "ratio"
    );
    row(
        "throughput (Gbit/s)",
        format!("{:.2}", hs_tp_d / 1e9),
        format!("{:.2}", hs_tp / 1e9),
        ratio(hs_tp, hs_tp_d),
        ">= 0.95x",
    );
    row(
        "new connections / s",
        format!("{hs_cr_d:.0}"),
        format!("{hs_cr:.0}"),
        ratio(hs_cr, hs_cr_d),
        ">= 0.7x",
    );
    row(
        "request latency p50 (us)",
        format!("{hs_p50_d:.1}"),
        format!("{hs_p50:.1}"),
        ratio(hs_p50, hs_p50_d),
        "",
    );
    row(
        "request latency p99 (us)",
        format!("{hs_p99_d:.1}"),
        format!("{hs_p99:.1}"),
        ratio(hs_p99, hs_p99_d),
        "<= 1.2x",
    );
    println!(
        "enforcer CPU per 1,000 new connections (both ends): tunnel {cpu_tunnel_ms:.0} ms, handshake {cpu_handshake_ms:.0} ms\n"
    );
    println!(
        "enforcer RSS idle (KiB)            host-a {} host-b {}\nenforcer RSS, {open_connections} open conns (KiB) host-a {} host-b {}  ({:.1} / {:.1} KiB per connection)",
        idle["host-a"],
        idle["host-b"],
        loaded["host-a"],
        loaded["host-b"],
        per_conn["host-a"].as_f64().unwrap_or(0.0),
        per_conn["host-b"].as_f64().unwrap_or(0.0)
    );
    if let Some(path) = json_path {
        fs::write(path, serde_json::to_string_pretty(&result)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nJSON written to {}", path.display());
    }
    Ok(())
}
