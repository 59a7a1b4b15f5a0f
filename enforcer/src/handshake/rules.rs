//! The iptables rules (nft backend) that queue exactly the handshake packets to us.
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
//! * `raw PREROUTING`, too: a SYN to a workload port that arrives on `lo` (made on this
//!   host, to any of its addresses) is dropped: nothing local reaches a protected port.
//!
//! Fail closed: while no enforcer reads the queues, queued packets are dropped (only
//! SYN-ACKs and resets bypass: they only answer SYNs that an enforcer sent). `fail_open` lets SYNs
//! to workload ports through instead. No sysctl is changed.
use std::path::Path;

use anyhow::{Context, Result};

use super::tools::tools;
use crate::config::HandshakeConfig;

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

/// `iptables` and `ip6tables`, by the absolute paths found at start-up (never `$PATH`).
fn programs() -> Result<[&'static Path; 2]> {
    let t = tools()?;
    Ok([t.iptables.as_path(), t.ip6tables.as_path()])
}

/// `iptables -w ARGS` (waiting for the xtables lock).
fn run(tool: &Path, args: &[String]) -> Result<String> {
    let args: Vec<&str> = std::iter::once("-w")
        .chain(args.iter().map(String::as_str))
        .collect();
    super::tools::run_program(tool, &args, None)
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// The rules of one family and generation, in order, as `-t TABLE -A CHAIN ...` strings.
/// `set`: the family's ipset of peers' addresses ([`super::lane`]): each rule that queues to
/// the ingress queue has a twin before it that sends the same packets from those addresses
/// to the peers' lane instead.
fn rules(h: &HandshakeConfig, ports: &[u16], generation: u8, set: &str) -> Vec<String> {
    let [(_, _, raw), (_, _, input), (_, _, local), (_, _, output)] = chains(generation);
    let (egress, ingress, lane) = (h.queue, h.queue + 1, h.queue + 2);
    let syn_bypass = if h.fail_open { " --queue-bypass" } else { "" };
    let (sm, pb, ab) = (h.socket_mark, h.proven_bit, h.acked_bit);
    let mut r = Vec::new();
    // The fast path (docs/handshake.md): a SYN (server) or SYN-ACK (client) whose tag the
    // tc verifier checked carries the fast bit and skips the queues; its connection is
    // stamped below, so that the server's SYN-ACK is not queued either.
    let fb = h.fast_bit();
    if h.fast_path_secs != 0 {
        r.push(format!(
            "-t raw -A {raw} ! -i lo -p tcp -m mark --mark {fb:#x}/{fb:#x} -j RETURN"
        ));
    }
    // `-t TABLE -A CHAIN MATCHES` to the ingress queue, after its peers' twin.
    let mut to_ingress = |head: String, matches: String, bypass: &str| {
        r.push(format!(
            "{head} {matches} -m set --match-set {set} src -j NFQUEUE --queue-num {lane}{bypass}"
        ));
        r.push(format!(
            "{head} {matches} -j NFQUEUE --queue-num {ingress}{bypass}"
        ));
    };
    let raw_head = format!("-t raw -A {raw}");
    to_ingress(
        raw_head.clone(),
        "! -i lo -p tcp -m tcp --tcp-option 253".into(),
        syn_bypass,
    );
    to_ingress(
        raw_head.clone(),
        "! -i lo -p tcp --tcp-flags SYN,ACK SYN,ACK".into(),
        " --queue-bypass",
    );
    // Resets: a peer refusing one of our handshakes is recorded at once.
    to_ingress(
        raw_head.clone(),
        "! -i lo -p tcp --tcp-flags RST RST".into(),
        " --queue-bypass",
    );
    for p in ports {
        to_ingress(
            raw_head.clone(),
            format!("! -i lo -p tcp --syn --dport {p}"),
            syn_bypass,
        );
    }
    // A connection made on this host (to a loopback address or to one of the host's
    // own, all over `lo`) carries no proof and has no proxy to come through: a protected
    // port is not reachable that way (issue 12 item 7). `sk_lookup` refuses those to
    // loopback addresses too, but not those to the host's own addresses: their
    // `ingress_ifindex` is the address's device, not `lo`; only this rule stops them.
    for p in ports {
        r.push(format!(
            "-t raw -A {raw} -i lo -p tcp --syn --dport {p} -j DROP"
        ));
    }
    if h.fast_path_secs != 0 {
        // Fail closed at the client whatever tc saw (a fragment, a device it does not
        // run on, a pending entry evicted, no enforcer): a SYN-ACK of a connection whose
        // SYN left on the fast path is dropped unless the verifier proved it. Mangle sees
        // packets reassembled, with their connection's mark (set in OUTPUT below).
        let (fc, fb) = (h.fast_client_bit, h.fast_bit());
        r.push(format!(
            "-t mangle -A {input} -p tcp --tcp-flags SYN,ACK SYN,ACK -m connmark --mark {fc:#x}/{fc:#x} -m mark ! --mark {fb:#x}/{fb:#x} -j DROP"
        ));
    }
    r.push(format!(
        "-t mangle -A {input} -m mark --mark {pb:#x}/{pb:#x} -j CONNMARK --set-xmark {pb:#x}/{pb:#x}"
    ));
    if h.fast_path_secs != 0 {
        // Each SYN says whether its connection is on the fast path: a fast SYN that falls
        // back to the full handshake (same 4-tuple, so the same conntrack entry) must have
        // its SYN-ACK queued again, for its token.
        r.push(format!(
            "-t mangle -A {input} -p tcp --syn -j CONNMARK --set-xmark 0x0/{fb:#x}"
        ));
        r.push(format!(
            "-t mangle -A {input} -m mark --mark {fb:#x}/{fb:#x} -j CONNMARK --set-xmark {fb:#x}/{fb:#x}"
        ));
    }
    // A packet of a connection that has not proven itself (yet) goes to the engine, behind
    // the proof it may have overtaken in the queue (the same queue: all of a connection's
    // packets come from one source); the engine drops the rest.
    let mut tail = Vec::new();
    for p in ports {
        let mut to_ingress = |head: String, matches: String| {
            tail.push(format!(
                "{head} {matches} -m set --match-set {set} src -j NFQUEUE --queue-num {lane}{syn_bypass}"
            ));
            tail.push(format!(
                "{head} {matches} -j NFQUEUE --queue-num {ingress}{syn_bypass}"
            ));
        };
        to_ingress(
            format!("-t mangle -A {input}"),
            format!(
                "! -i lo -p tcp --dport {p} --tcp-flags SYN,RST NONE -m connmark ! --mark {pb:#x}/{pb:#x}"
            ),
        );
    }
    r.extend(tail);
    if h.fast_path_secs != 0 {
        // Each SYN says which path its connection is on: the fast client bit set for a
        // fast socket's SYN, cleared for any other (a fast SYN that falls back to the full
        // handshake keeps its 4-tuple, so its conntrack entry).
        let (fc, fsm) = (h.fast_client_bit, h.fast_socket_mark());
        r.push(format!(
            "-t mangle -A {local} -p tcp --syn -j CONNMARK --set-xmark 0x0/{fc:#x}"
        ));
        r.push(format!(
            "-t mangle -A {local} -p tcp --syn -m mark --mark {fsm:#x} -j CONNMARK --set-xmark {fc:#x}/{fc:#x}"
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
    if h.fast_path_secs != 0 {
        // The SYN-ACK answering a verified fast SYN: its tag is the kernel's to write.
        r.push(format!(
            "-t mangle -A {output} ! -o lo -p tcp --tcp-flags SYN,ACK SYN,ACK -m connmark --mark {fb:#x}/{fb:#x} -j RETURN"
        ));
    }
    for p in ports {
        r.push(format!(
            "-t mangle -A {output} ! -o lo -p tcp --sport {p} --tcp-flags SYN,ACK SYN,ACK -j NFQUEUE --queue-num {egress}{syn_bypass}"
        ));
    }
    r
}

fn remove_generation(tool: &Path, generation: u8) {
    for (table, builtin, chain) in chains(generation) {
        // Delete every jump (a crashed run may have left more than one).
        while run(tool, &args(&format!("-t {table} -D {builtin} -j {chain}"))).is_ok() {}
        let _ = run(tool, &args(&format!("-t {table} -F {chain}")));
        let _ = run(tool, &args(&format!("-t {table} -X {chain}")));
    }
}

/// The generation a previous run left in force, if any.
fn installed_generation(tool: &Path) -> Option<u8> {
    let listing = run(tool, &args("-t raw -S PREROUTING")).ok()?;
    GENERATIONS.into_iter().find(|&g| {
        let [(_, _, raw), ..] = chains(g);
        listing.lines().any(|l| l.ends_with(&format!("-j {raw}")))
    })
}

/// Removes our rules (both generations, both families) and the peers' lane's sets.
pub fn remove_rules() {
    let programs = match programs() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "cannot remove the handshake-mode rules"
            );
            return;
        }
    };
    for tool in programs {
        for generation in GENERATIONS {
            remove_generation(tool, generation);
        }
    }
    // Then the peers' sets, which only the rules referenced.
    super::lane::remove_sets();
}

/// The rules of a new generation, in chains of their own that nothing jumps to yet (so
/// not in force): made by [`prepare_rules`], put in force by [`PreparedRules::commit`],
/// removed again if dropped uncommitted.
pub struct PreparedRules {
    /// Per family: the program, the new generation, the one in force (if any).
    families: Vec<(&'static Path, u8, Option<u8>)>,
    committed: bool,
}

/// Makes the new generation's chains and fills them, for both families, beside the
/// generation a previous run left in force (which stays in force, untouched). Fails
/// without leaving anything of the new generation behind.
pub fn prepare_rules(h: &HandshakeConfig, ports: &[u16]) -> Result<PreparedRules> {
    let mut prepared = PreparedRules {
        families: Vec::new(),
        committed: false,
    };
    for (tool, v6) in programs()?.into_iter().zip([false, true]) {
        let old = installed_generation(tool);
        let new = if old == Some(1) { 2 } else { 1 };
        // Leftovers of a start that did not complete (nothing jumps to them).
        remove_generation(tool, new);
        prepared.families.push((tool, new, old));
        (|| -> Result<()> {
            for (table, _, chain) in chains(new) {
                run(tool, &args(&format!("-t {table} -N {chain}")))?;
            }
            for rule in rules(h, ports, new, super::lane::set_name(v6)) {
                run(tool, &args(&rule))?;
            }
            Ok(())
        })()
        .context("preparing the handshake-mode iptables rules")?;
    }
    Ok(prepared)
}

impl PreparedRules {
    /// Puts the new generation in force (jumps to its chains first in each built-in chain),
    /// then takes the previous generation out: there is no moment without rules. If a jump
    /// cannot be made, the new generation's jumps go again and the previous one stays in
    /// force as it was.
    pub fn commit(mut self) -> Result<()> {
        for (i, &(tool, new, _)) in self.families.iter().enumerate() {
            for (table, builtin, chain) in chains(new) {
                let jumped = run(
                    tool,
                    &args(&format!("-t {table} -I {builtin} 1 -j {chain}")),
                );
                if let Err(e) = jumped {
                    for &(tool, new, _) in &self.families[..=i] {
                        remove_generation(tool, new);
                    }
                    self.families.clear();
                    return Err(e.context("installing the handshake-mode iptables rules"));
                }
            }
        }
        self.committed = true;
        for &(tool, _, old) in &self.families {
            if let Some(old) = old {
                remove_generation(tool, old);
            }
        }
        Ok(())
    }
}

impl Drop for PreparedRules {
    fn drop(&mut self) {
        if !self.committed {
            for &(tool, new, _) in &self.families {
                remove_generation(tool, new);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_skips_the_queues_only_for_kernel_verified_packets() {
        let h = HandshakeConfig::default();
        let r = rules(&h, &[8080], 1, "tessera-peers4");
        // First in the raw chain: a packet tc verified (fast bit) is never queued there.
        assert_eq!(
            r[0],
            "-t raw -A TESSERA-HS-RAW1 ! -i lo -p tcp -m mark --mark 0x400/0x400 -j RETURN"
        );
        assert!(
            r.iter()
                .any(|l| l
                    .contains("-m mark --mark 0x400/0x400 -j CONNMARK --set-xmark 0x400/0x400"))
        );
        // The server's SYN-ACK of a fast connection is not queued; the skip comes before
        // the SYN-ACK queue rule.
        let skip = r
            .iter()
            .position(|l| l.contains("SYN,ACK SYN,ACK -m connmark --mark 0x400/0x400 -j RETURN"))
            .expect("SYN-ACK skip");
        let queue = r
            .iter()
            .position(|l| l.contains("--sport 8080 --tcp-flags SYN,ACK SYN,ACK -j NFQUEUE"))
            .expect("SYN-ACK queue");
        assert!(skip < queue);
        // The fast socket mark is not the handshake mark the egress rules match exactly.
        assert_ne!(h.fast_socket_mark(), h.socket_mark);
        let fsm = format!("--mark {:#x} ", h.fast_socket_mark());
        assert!(!r.iter().any(|l| l.contains(&fsm) && l.contains("NFQUEUE")));
        // Fail closed whatever tc saw: a fast socket's SYN stamps its connection, whose
        // SYN-ACK is dropped in mangle PREROUTING unless it carries the verified bit.
        assert!(r.contains(&format!(
            "-t mangle -A TESSERA-HS-LOCAL1 -p tcp --syn -m mark --mark {:#x} -j CONNMARK --set-xmark 0x800/0x800",
            h.fast_socket_mark()
        )));
        assert_eq!(
            r.iter().find(|l| l.contains("-A TESSERA-HS-IN1")).unwrap(),
            "-t mangle -A TESSERA-HS-IN1 -p tcp --tcp-flags SYN,ACK SYN,ACK -m connmark --mark 0x800/0x800 -m mark ! --mark 0x400/0x400 -j DROP"
        );
        // Off: none of it.
        let off = HandshakeConfig {
            fast_path_secs: 0,
            ..HandshakeConfig::default()
        };
        assert!(
            !rules(&off, &[8080], 1, "s")
                .iter()
                .any(|l| l.contains("0x400"))
        );
    }

    #[test]
    fn rules_queue_handshakes_only_and_fail_closed_by_default() {
        let h = HandshakeConfig::default();
        let r = rules(&h, &[8080], 1, "tessera-peers4");
        assert!(r.iter().any(
            |l| l.contains("--syn --dport 8080 -j NFQUEUE --queue-num 7701")
                && !l.contains("bypass")
        ));
        // Unproven connections to the port: to the engine, never straight to the workload.
        assert!(r.iter().any(|l| l.contains("--dport 8080")
            && l.contains("! --mark 0x100/0x100")
            && l.ends_with("-j NFQUEUE --queue-num 7701")));
        // Local connections to the port never reach it (nor bypass the guard).
        assert!(
            r.iter()
                .any(|l| l.ends_with("-i lo -p tcp --syn --dport 8080 -j DROP"))
        );
        // Every rule to the ingress queue has its twin for the peers' lane right before it,
        // matching the same packets from the peers' addresses.
        let ingress: Vec<usize> = (0..r.len())
            .filter(|&i| r[i].contains("--queue-num 7701"))
            .collect();
        assert_eq!(ingress.len(), 5);
        for i in ingress {
            let twin = r[i].replace(
                " -j NFQUEUE --queue-num 7701",
                " -m set --match-set tessera-peers4 src -j NFQUEUE --queue-num 7702",
            );
            assert_eq!(r[i - 1], twin);
        }
        // Nothing is queued by payload size or per packet beyond the handshake.
        assert!(r.iter().all(|l| !l.contains("connbytes")));
        let open = HandshakeConfig {
            fail_open: true,
            ..HandshakeConfig::default()
        };
        let r = rules(&open, &[8080], 2, "tessera-peers4");
        // Fail open: what would be queued for a workload port passes while nobody reads
        // (what arrives on lo is dropped whether or not anyone reads).
        assert!(
            r.iter()
                .filter(|l| l.contains("--dport 8080") || l.contains("--sport 8080"))
                .filter(|l| !l.contains(" -i lo "))
                .all(|l| l.ends_with("--queue-bypass"))
        );
        assert!(
            r.iter()
                .any(|l| l.ends_with("-i lo -p tcp --syn --dport 8080 -j DROP"))
        );
        assert!(
            r.iter()
                .any(|l| l.contains("--dport 8080 -j NFQUEUE") && l.contains("bypass"))
        );
    }
}
