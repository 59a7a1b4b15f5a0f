//! TCP-handshake mode in the kernel: the iptables rules (nft backend) that queue exactly the
//! handshake packets to us, and the NFQUEUE workers that run them through the engine
//! (`tessera_proxy::handshake::engine`).
//!
//! Rules (IPv4 and IPv6 alike, in four chains of our own; docs/handshake.md has the table):
//! * `raw PREROUTING` (before conntrack, so the kernel never sees a token): packets carrying
//!   our option, every SYN-ACK (a missing token is a refusal for our own handshakes), resets
//!   (a refusal by the peer) and SYNs to workload ports go to the ingress queue.
//! * `mangle PREROUTING`: a packet the engine marked proven stamps its connection
//!   (connmark); any other packet to a workload port of an unproven connection goes to the
//!   engine, which passes only those queued behind their connection's proof. So a
//!   connection reaches the application only once the client proved itself.
//! * `mangle OUTPUT` / `POSTROUTING` (after conntrack, which so never sees a token either):
//!   the SYN of sockets the connect hooks marked, their packets until the first ACK went, and
//!   SYN-ACKs from workload ports go to the egress queue; the engine's acked bit is saved in
//!   the connmark, after which nothing of the connection is queued.
//!
//! Fail closed: while no enforcer reads the queues, queued packets are dropped (only
//! SYN-ACKs and resets bypass: they only answer SYNs that an enforcer sent). `fail_open` lets SYNs
//! to workload ports through instead. No sysctl is changed.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tessera_proxy::{
    authz::{Authorizer, LiveGuard, Side},
    flow::{FlowLog, now_ms},
    handshake::engine::{Engine, LiveConnection, PacketVerdict},
};
use tokio::sync::mpsc;

use crate::config::{Config, HandshakeConfig};

/// Our chains: (table, built-in chain that jumps to it, name). Two generations, so that a
/// restarted enforcer puts its rules in before it takes the previous run's out: there is no
/// moment without them.
fn chains(generation: u8) -> [(&'static str, &'static str, String); 4] {
    [
        ("raw", "PREROUTING", format!("TESSERA-HS-RAW{generation}")),
        ("mangle", "PREROUTING", format!("TESSERA-HS-IN{generation}")),
        ("mangle", "OUTPUT", format!("TESSERA-HS-LOCAL{generation}")),
        (
            "mangle",
            "POSTROUTING",
            format!("TESSERA-HS-OUT{generation}"),
        ),
    ]
}
const GENERATIONS: [u8; 2] = [1, 2];
const TOOLS: [&str; 2] = ["iptables", "ip6tables"];

fn run(tool: &str, args: &[String]) -> Result<String> {
    let out = Command::new(tool)
        .arg("-w")
        .args(args)
        .output()
        .with_context(|| format!("cannot run {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// The rules of one family and generation, in order, as `-t TABLE -A CHAIN ...` strings.
fn rules(h: &HandshakeConfig, ports: &[u16], generation: u8) -> Vec<String> {
    let [(_, _, raw), (_, _, input), (_, _, local), (_, _, output)] = chains(generation);
    let (egress, ingress) = (h.queue, h.queue + 1);
    let syn_bypass = if h.fail_open { " --queue-bypass" } else { "" };
    let (sm, pb, ab) = (h.socket_mark, h.proven_bit, h.acked_bit);
    let mut r = vec![
        format!(
            "-t raw -A {raw} ! -i lo -p tcp -m tcp --tcp-option 253 -j NFQUEUE --queue-num {ingress}{syn_bypass}"
        ),
        format!(
            "-t raw -A {raw} ! -i lo -p tcp --tcp-flags SYN,ACK SYN,ACK -j NFQUEUE --queue-num {ingress} --queue-bypass"
        ),
        // Resets: a peer refusing one of our handshakes is recorded at once.
        format!(
            "-t raw -A {raw} ! -i lo -p tcp --tcp-flags RST RST -j NFQUEUE --queue-num {ingress} --queue-bypass"
        ),
    ];
    for p in ports {
        r.push(format!(
            "-t raw -A {raw} ! -i lo -p tcp --syn --dport {p} -j NFQUEUE --queue-num {ingress}{syn_bypass}"
        ));
    }
    r.push(format!(
        "-t mangle -A {input} -m mark --mark {pb:#x}/{pb:#x} -j CONNMARK --set-xmark {pb:#x}/{pb:#x}"
    ));
    // A packet of a connection that has not proven itself (yet) goes to the engine, behind
    // the proof it may have overtaken in the queue; the engine drops the rest.
    for p in ports {
        r.push(format!(
            "-t mangle -A {input} ! -i lo -p tcp --dport {p} --tcp-flags SYN,RST NONE -m connmark ! --mark {pb:#x}/{pb:#x} -j NFQUEUE --queue-num {ingress}{syn_bypass}"
        ));
    }
    // Client: everything after the SYN until the first ACK went, in OUTPUT: the acked bit the
    // engine sets is saved in the connmark at POSTROUTING, and packets behind the first ACK
    // wait behind it in the queue instead of overtaking its proof.
    r.push(format!(
        "-t mangle -A {local} ! -o lo -p tcp -m mark --mark {sm:#x} ! --syn -m connmark ! --mark {ab:#x}/{ab:#x} -j NFQUEUE --queue-num {egress}"
    ));
    r.push(format!(
        "-t mangle -A {output} ! -o lo -p tcp -m mark --mark {sm:#x} --syn -j NFQUEUE --queue-num {egress}"
    ));
    r.push(format!(
        "-t mangle -A {output} -m mark --mark {ab:#x}/{ab:#x} -j CONNMARK --set-xmark {ab:#x}/{ab:#x}"
    ));
    for p in ports {
        r.push(format!(
            "-t mangle -A {output} ! -o lo -p tcp --sport {p} --tcp-flags SYN,ACK SYN,ACK -j NFQUEUE --queue-num {egress}{syn_bypass}"
        ));
    }
    r
}

fn remove_generation(tool: &str, generation: u8) {
    for (table, builtin, chain) in chains(generation) {
        // Delete every jump (a crashed run may have left more than one).
        while run(tool, &args(&format!("-t {table} -D {builtin} -j {chain}"))).is_ok() {}
        let _ = run(tool, &args(&format!("-t {table} -F {chain}")));
        let _ = run(tool, &args(&format!("-t {table} -X {chain}")));
    }
}

/// The generation a previous run left in force, if any.
fn installed_generation(tool: &str) -> Option<u8> {
    let listing = run(tool, &args("-t raw -S PREROUTING")).ok()?;
    GENERATIONS.into_iter().find(|&g| {
        let [(_, _, raw), ..] = chains(g);
        listing.lines().any(|l| l.ends_with(&format!("-j {raw}")))
    })
}

/// Removes our rules (both generations, both families).
pub fn remove_rules() {
    for tool in TOOLS {
        for generation in GENERATIONS {
            remove_generation(tool, generation);
        }
    }
}

/// Installs the rules for both families. Rules a previous run left stay in force until the
/// new ones are in.
pub fn install_rules(h: &HandshakeConfig, ports: &[u16]) -> Result<()> {
    for tool in TOOLS {
        let old = installed_generation(tool);
        let new = if old == Some(1) { 2 } else { 1 };
        remove_generation(tool, new);
        let result = (|| -> Result<()> {
            for (table, _, chain) in chains(new) {
                run(tool, &args(&format!("-t {table} -N {chain}")))?;
            }
            for rule in rules(h, ports, new) {
                run(tool, &args(&rule))?;
            }
            for (table, builtin, chain) in chains(new) {
                run(
                    tool,
                    &args(&format!("-t {table} -I {builtin} 1 -j {chain}")),
                )?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            // What was in force stays in force.
            remove_generation(tool, new);
            return Err(e.context("installing the handshake-mode iptables rules"));
        }
        if let Some(old) = old {
            remove_generation(tool, old);
        }
    }
    Ok(())
}

/// Sends the engine's resets (raw IP, our own mark so that nothing of ours queues them).
struct RawSender {
    v4: Socket,
    v6: Option<Socket>,
}

impl RawSender {
    fn new(mark: u32) -> Result<Self> {
        let raw = |domain| -> std::io::Result<Socket> {
            // IPPROTO_RAW: we write the IP header ourselves.
            let s = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
            s.set_mark(mark)?;
            Ok(s)
        };
        Ok(Self {
            v4: raw(Domain::IPV4).context("raw IPv4 socket for resets")?,
            v6: raw(Domain::IPV6).ok(),
        })
    }

    fn send(&self, packet: &[u8]) {
        let Ok(seg) = tessera_proxy::handshake::packet::segment(packet) else {
            return;
        };
        let to = SockAddr::from(SocketAddr::new(seg.dst.ip(), 0));
        let sock = match seg.dst.ip() {
            IpAddr::V4(_) => Some(&self.v4),
            IpAddr::V6(_) => self.v6.as_ref(),
        };
        if let Some(sock) = sock
            && let Err(e) = sock.send_to(packet, &to)
        {
            tracing::debug!(error = %e, to = %seg.dst, "cannot send a reset");
        }
    }
}

fn worker(
    queue_num: u16,
    side: Side,
    engine: Arc<Engine>,
    flows: FlowLog,
    sender: Arc<RawSender>,
    live: mpsc::UnboundedSender<LiveConnection>,
) -> Result<()> {
    let mut queue = nfq::Queue::open().context("cannot open an NFQUEUE socket")?;
    queue
        .bind(queue_num)
        .with_context(|| format!("handshake.queue: cannot bind NFQUEUE {queue_num}"))?;
    queue.set_copy_range(queue_num, u16::MAX)?;
    queue.set_queue_max_len(queue_num, 8192)?;
    // A failed or full queue drops (fail closed), never accepts.
    queue.set_fail_open(queue_num, false)?;
    let _ = queue.set_recv_enobufs(false);
    loop {
        let mut msg = match queue.recv() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(queue = queue_num, error = %e, "NFQUEUE receive failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let now = now_ms();
        let outcome = match side {
            Side::Egress => engine.egress(msg.get_payload(), now),
            Side::Ingress => engine.ingress(msg.get_payload(), now),
        };
        if let Some(p) = outcome.packet {
            msg.set_payload(p);
        }
        if outcome.mark != 0 {
            let mark = msg.get_nfmark() | outcome.mark;
            msg.set_nfmark(mark);
        }
        msg.set_verdict(match outcome.verdict {
            PacketVerdict::Accept => nfq::Verdict::Accept,
            PacketVerdict::Drop => nfq::Verdict::Drop,
        });
        if let Err(e) = queue.verdict(msg) {
            tracing::warn!(queue = queue_num, error = %e, "NFQUEUE verdict failed");
        }
        for p in &outcome.send {
            sender.send(p);
        }
        for f in outcome.flows {
            flows.record(f);
        }
        if let Some(conn) = outcome.live {
            let _ = live.send(*conn);
        }
    }
}

/// Sockets of this network namespace that are open (any state but LISTEN and TIME_WAIT),
/// as (local, remote), IPv4-mapped addresses as IPv4. Through `ss` (netlink sock_diag):
/// the kernel skips TIME_WAIT sockets itself, where /proc/net/tcp formats every one of
/// them (tens of thousands at a high connection rate).
async fn open_sockets() -> Option<HashSet<(SocketAddr, SocketAddr)>> {
    let out = tokio::process::Command::new("ss")
        .args([
            "-t",
            "-n",
            "-H",
            "exclude",
            "time-wait",
            "exclude",
            "listening",
        ])
        .output()
        .await;
    match out {
        Ok(out) if out.status.success() => Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(parse_ss_line)
                .collect(),
        ),
        Ok(out) => {
            tracing::warn!(stderr = %String::from_utf8_lossy(&out.stderr).trim(), "ss failed: live connections not pruned");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot run ss: live connections not pruned");
            None
        }
    }
}

/// One line of `ss -t -n -H`: `state recv-q send-q local peer`.
fn parse_ss_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let mut f = line.split_whitespace().skip(3);
    let addr = |s: &str| -> Option<SocketAddr> {
        match s.parse::<SocketAddr>().ok()? {
            SocketAddr::V6(v6) => Some(match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), v6.port()),
                None => SocketAddr::V6(v6),
            }),
            v4 => Some(v4),
        }
    };
    Some((addr(f.next()?)?, addr(f.next()?)?))
}

/// Closes a connection's socket on this host (SOCK_DESTROY through `ss -K`): the kernel
/// resets the peer, the application sees the reset.
async fn destroy(local: SocketAddr, remote: SocketAddr) {
    let forms = |a: SocketAddr| -> Vec<String> {
        match a {
            SocketAddr::V4(v4) => vec![
                v4.to_string(),
                format!("[{}]:{}", v4.ip().to_ipv6_mapped(), v4.port()),
            ],
            SocketAddr::V6(v6) => vec![v6.to_string()],
        }
    };
    // A socket of an IPv6 listener holds IPv4 peers in their mapped form.
    for (l, r) in forms(local).into_iter().zip(forms(remote)) {
        let result = tokio::process::Command::new("ss")
            .args(["-K", "-t", "-n", "-H", "src", &l, "dst", &r])
            .output()
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, %local, %remote, "cannot close a revoked connection (ss -K)");
        }
    }
}

/// Watches the connections handshakes let through: a policy reload that denies one closes
/// it and records why. One task for all of them (a connection costs a registration, no task
/// of its own); connections that ended are forgotten at the next pruning.
async fn watch_live(
    authz: Arc<Authorizer>,
    flows: FlowLog,
    mut incoming: mpsc::UnboundedReceiver<LiveConnection>,
) {
    const PRUNE: Duration = Duration::from_secs(20);
    let mut watched: HashMap<(SocketAddr, SocketAddr), (LiveGuard, LiveConnection, Instant)> =
        HashMap::new();
    let mut reloads = authz.reloads();
    let mut arrived = Vec::with_capacity(1024);
    let mut prune = tokio::time::interval(PRUNE);
    loop {
        tokio::select! {
            n = incoming.recv_many(&mut arrived, 1024) => {
                if n == 0 {
                    return;
                }
                for conn in arrived.drain(..) {
                    // A policy may have been replaced since the handshake was decided.
                    let now = authz.check(&conn.src, &conn.dst, conn.port, conn.observe);
                    if !now.allowed {
                        destroy(conn.local, conn.remote).await;
                        let side = match conn.side {
                            Side::Ingress => "ingress",
                            Side::Egress => "egress",
                        };
                        let mut rec = conn.record;
                        rec.revoked_by(format!("closed by policy reload ({side}): {}", now.reason));
                        flows.record(rec);
                        continue;
                    }
                    let guard = authz.register(
                        conn.side,
                        conn.src.clone(),
                        conn.dst.clone(),
                        conn.port,
                        conn.observe,
                    );
                    watched.insert((conn.local, conn.remote), (guard, conn, Instant::now()));
                }
                // Let the next ones gather (one wake-up per batch, not per connection).
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Revocations happen only when a policy is replaced: no polling in between.
            Ok(()) = reloads.changed() => {
                let revoked: Vec<_> = watched
                    .iter()
                    .filter_map(|(key, (guard, _, _))| guard.revocation().map(|r| (*key, r)))
                    .collect();
                for (key, reason) in revoked {
                    let Some((_, conn, _)) = watched.remove(&key) else { continue };
                    destroy(conn.local, conn.remote).await;
                    let mut rec = conn.record;
                    rec.revoked_by(reason);
                    flows.record(rec);
                }
            }
            _ = prune.tick(), if !watched.is_empty() => {
                if let Some(open) = open_sockets().await {
                    // (a connection handed over a moment ago may not be listed yet)
                    watched.retain(|key, (_, _, since)| {
                        open.contains(key) || since.elapsed() < Duration::from_secs(2)
                    });
                }
            }
        }
    }
}

/// Starts the workers (a thread per queue) and the expiry of unfinished handshakes.
pub fn start(
    config: &Config,
    engine: Arc<Engine>,
    authz: Arc<Authorizer>,
    flows: FlowLog,
) -> Result<()> {
    let h = &config.handshake;
    let sender = Arc::new(RawSender::new(config.bpf.proxy_mark)?);
    let (live_tx, live_rx) = mpsc::unbounded_channel();
    tokio::spawn(watch_live(authz, flows.clone(), live_rx));
    for (num, side, name) in [
        (h.queue, Side::Egress, "tessera-hs-egress"),
        (h.queue + 1, Side::Ingress, "tessera-hs-ingress"),
    ] {
        let (engine, flows, sender) = (engine.clone(), flows.clone(), sender.clone());
        let live_tx = live_tx.clone();
        // Bind in the thread but report a failure to bind here, before we say ready.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let result = worker(num, side, engine, flows, sender, live_tx);
                if let Err(e) = &result {
                    tracing::error!(
                        queue = num,
                        error = format!("{e:#}"),
                        "handshake worker stopped"
                    );
                }
                let _ = tx.send(result.map(|_| ()));
            })?;
        // A worker that is running has nothing to report within this time.
        if let Ok(Err(e)) = rx.recv_timeout(Duration::from_millis(200)) {
            return Err(e);
        }
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for f in engine.expire(now_ms()) {
                flows.record(f);
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_lines_give_both_ends_of_open_connections() {
        // As iproute2's ss prints them (-t -n -H).
        let v4 = "ESTAB 0      0               10.0.0.2:8080          10.0.0.1:42332";
        let want = Some((
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.1:42332".parse().unwrap(),
        ));
        assert_eq!(parse_ss_line(v4), want);
        let mapped = "ESTAB 0      0      [::ffff:10.0.0.2]:8080 [::ffff:10.0.0.1]:42332";
        assert_eq!(parse_ss_line(mapped), want);
        let v6 = "SYN-RECV 0 0 [fd77::2]:8080 [fd77::1]:42332";
        let (l, _) = parse_ss_line(v6).unwrap();
        assert_eq!(l.ip().to_string(), "fd77::2");
        assert_eq!(parse_ss_line("garbage"), None);
    }

    #[test]
    fn rules_queue_handshakes_only_and_fail_closed_by_default() {
        let h = HandshakeConfig::default();
        let r = rules(&h, &[8080], 1);
        assert!(r.iter().any(
            |l| l.contains("--syn --dport 8080 -j NFQUEUE --queue-num 7701")
                && !l.contains("bypass")
        ));
        // Unproven connections to the port: to the engine, never straight to the workload.
        assert!(r.iter().any(|l| l.contains("--dport 8080")
            && l.contains("! --mark 0x100/0x100")
            && l.ends_with("-j NFQUEUE --queue-num 7701")));
        // Nothing is queued by payload size or per packet beyond the handshake.
        assert!(r.iter().all(|l| !l.contains("connbytes")));
        let open = HandshakeConfig {
            fail_open: true,
            ..HandshakeConfig::default()
        };
        let r = rules(&open, &[8080], 2);
        // Fail open: what would be queued for a workload port passes while nobody reads.
        assert!(
            r.iter()
                .filter(|l| l.contains("--dport 8080") || l.contains("--sport 8080"))
                .all(|l| l.ends_with("--queue-bypass"))
        );
        assert!(
            r.iter()
                .any(|l| l.contains("--dport 8080 -j NFQUEUE") && l.contains("bypass"))
        );
    }
}
