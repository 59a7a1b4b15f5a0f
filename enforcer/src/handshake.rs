//! TCP-handshake mode in the kernel: the iptables rules (nft backend) that queue exactly the
//! handshake packets to us, and the NFQUEUE workers that run them through the engine
//! (`tessera_proxy::handshake::engine`).
//!
//! Rules (IPv4 and IPv6 alike, in three chains of our own):
//! * `raw PREROUTING` (before conntrack, so the kernel never sees a token): packets carrying
//!   our option, every SYN-ACK (a missing token is a refusal for our own handshakes), resets
//!   (a refusal by the peer) and SYNs to workload ports go to the ingress queue.
//! * `mangle PREROUTING`: a packet the engine marked proven stamps its connection
//!   (connmark); any other packet to a workload port of an unproven connection is dropped,
//!   so a connection reaches the application only once the client proved itself.
//! * `mangle POSTROUTING` (after conntrack, which so never sees a token either): the SYN
//!   and first ACK of sockets the connect hooks marked, and SYN-ACKs from workload ports, go
//!   to the egress queue. The first ACK sets a connmark bit: nothing later is queued.
//!
//! Fail closed: while no enforcer reads the queues, queued packets are dropped (only
//! SYN-ACKs and resets bypass: they only answer SYNs that an enforcer sent). `fail_open` lets SYNs
//! to workload ports through instead. No sysctl is changed.
use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tessera_proxy::{
    flow::{FlowLog, now_ms},
    handshake::engine::{Engine, PacketVerdict},
};

use crate::config::{Config, HandshakeConfig};

/// Our chains: (table, built-in chain that jumps to it, name). Two generations, so that a
/// restarted enforcer puts its rules in before it takes the previous run's out: there is no
/// moment without them.
fn chains(generation: u8) -> [(&'static str, &'static str, String); 3] {
    [
        ("raw", "PREROUTING", format!("TESSERA-HS-RAW{generation}")),
        ("mangle", "PREROUTING", format!("TESSERA-HS-IN{generation}")),
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
    let [(_, _, raw), (_, _, input), (_, _, output)] = chains(generation);
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
    if !h.fail_open {
        for p in ports {
            r.push(format!(
                "-t mangle -A {input} ! -i lo -p tcp --dport {p} --tcp-flags SYN,RST NONE -m connmark ! --mark {pb:#x}/{pb:#x} -j DROP"
            ));
        }
    }
    r.push(format!(
        "-t mangle -A {output} ! -o lo -p tcp -m mark --mark {sm:#x} --syn -j NFQUEUE --queue-num {egress}"
    ));
    r.push(format!(
        "-t mangle -A {output} -m connmark --mark {ab:#x}/{ab:#x} -j RETURN"
    ));
    let first_ack = format!(
        "-t mangle -A {output} ! -o lo -p tcp -m mark --mark {sm:#x} --tcp-flags SYN,ACK,FIN,RST ACK"
    );
    r.push(format!(
        "{first_ack} -j CONNMARK --set-xmark {ab:#x}/{ab:#x}"
    ));
    r.push(format!("{first_ack} -j NFQUEUE --queue-num {egress}"));
    for p in ports {
        r.push(format!(
            "-t mangle -A {output} ! -o lo -p tcp --sport {p} --tcp-flags SYN,ACK SYN,ACK -j NFQUEUE --queue-num {egress}"
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

#[derive(Clone, Copy)]
enum Side {
    Egress,
    Ingress,
}

fn worker(
    queue_num: u16,
    side: Side,
    engine: Arc<Engine>,
    flows: FlowLog,
    sender: Arc<RawSender>,
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
    }
}

/// Starts the workers (a thread per queue) and the expiry of unfinished handshakes.
pub fn start(config: &Config, engine: Arc<Engine>, flows: FlowLog) -> Result<()> {
    let h = &config.handshake;
    let sender = Arc::new(RawSender::new(config.bpf.proxy_mark)?);
    for (num, side, name) in [
        (h.queue, Side::Egress, "tessera-hs-egress"),
        (h.queue + 1, Side::Ingress, "tessera-hs-ingress"),
    ] {
        let (engine, flows, sender) = (engine.clone(), flows.clone(), sender.clone());
        // Bind in the thread but report a failure to bind here, before we say ready.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let result = worker(num, side, engine, flows, sender);
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
    fn rules_queue_handshakes_only_and_fail_closed_by_default() {
        let h = HandshakeConfig::default();
        let r = rules(&h, &[8080], 1);
        assert!(r.iter().any(
            |l| l.contains("--syn --dport 8080 -j NFQUEUE --queue-num 7701")
                && !l.contains("bypass")
        ));
        assert!(
            r.iter()
                .any(|l| l.contains("--dport 8080") && l.ends_with("-j DROP"))
        );
        // Nothing is queued by payload size or per packet beyond the handshake.
        assert!(r.iter().all(|l| !l.contains("connbytes")));
        let open = HandshakeConfig {
            fail_open: true,
            ..HandshakeConfig::default()
        };
        let r = rules(&open, &[8080], 2);
        assert!(r.iter().all(|l| !l.ends_with("-j DROP")));
        assert!(
            r.iter()
                .any(|l| l.contains("--dport 8080 -j NFQUEUE") && l.contains("bypass"))
        );
    }
}
