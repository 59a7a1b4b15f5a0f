//! The peers' lane: packets from the addresses the directory lists for peer enforcers go to
//! a queue of their own, read by a worker of its own, so that a flood of spoofed handshake
//! packets (random sources, queued because they carry our option or are SYNs to a workload
//! port) fills the strangers' queue and the kernel drops there, while known peers' handshakes
//! are still served (issue 12 item 4: legitimate connections keep working during a flood).
//!
//! The lane decides which queue, never the verdict: every packet in it goes through the same
//! engine checks as any other. An attacker who spoofs a peer's address lands in the lane,
//! and is limited by the engine's per-prefix budgets like anyone else; an address missing
//! from the set (a peer behind NAT, a directory change not yet applied) only loses the
//! priority.
//!
//! The addresses live in two ipsets (`hash:net`, per family; an ipset is per network
//! namespace), referenced by the rules of both generations. Their contents are replaced
//! atomically (`ipset restore` into a scratch set, then `swap`) at start-up and on each
//! directory change. `ipset` runs by absolute path, like `iptables` ([`super::tools`]).
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result};
use ipnet::IpNet;
use tessera_proxy::peers::{Directory, PeerTable};

use super::tools::{SYSTEM_DIRS, find, run_program as run};

/// The ipsets the rules match on: (iptables family, set name).
pub const SETS: [(&str, &str); 2] = [("inet", "tessera-peers4"), ("inet6", "tessera-peers6")];

/// The set of addresses of family `v6`.
pub fn set_name(v6: bool) -> &'static str {
    SETS[usize::from(v6)].1
}

/// `ipset`, by absolute path, found once at start-up.
pub struct Lane {
    ipset: PathBuf,
}

impl Lane {
    /// Finds `ipset` and makes both sets (empty, if they do not exist yet): the rules that
    /// reference them can only be made after this.
    pub fn new() -> Result<Self> {
        let dirs = SYSTEM_DIRS.map(Path::new);
        let ipset =
            find("ipset", &dirs).context("handshake mode needs ipset (Debian package `ipset`)")?;
        let lane = Self { ipset };
        let mut script = String::new();
        for (family, name) in SETS {
            script += &format!("create {name} hash:net family {family} -exist\n");
        }
        lane.restore(&script)?;
        Ok(lane)
    }

    /// Makes the sets hold exactly the peers' addresses of `table`, each set replaced at
    /// once.
    pub fn sync(&self, table: &PeerTable) -> Result<usize> {
        let (script, n) = script(table);
        self.restore(&script)?;
        Ok(n)
    }

    fn restore(&self, script: &str) -> Result<()> {
        run(&self.ipset, &["restore"], Some(script)).map(drop)
    }

    /// Follows the directory: the sets change with it, until the enforcer stops. A failure
    /// is logged and leaves the previous contents (priority only; nothing is admitted by
    /// them).
    pub fn follow(self: Arc<Self>, directory: Arc<Directory>) {
        let mut changes = directory.changes();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let (lane, table) = (self.clone(), directory.table());
                let done = tokio::task::spawn_blocking(move || lane.sync(&table))
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")));
                match done {
                    Ok(n) => tracing::debug!(addresses = n, "peers' lane follows the directory"),
                    Err(e) => tracing::warn!(
                        error = format!("{e:#}"),
                        "cannot update the peers' lane (the previous addresses stay)"
                    ),
                }
            }
        });
    }
}

/// Removes both sets (after the rules that use them; a set still referenced stays).
pub fn remove_sets() {
    let dirs = SYSTEM_DIRS.map(Path::new);
    let Ok(ipset) = find("ipset", &dirs) else {
        return;
    };
    for (_, name) in SETS {
        let _ = run(&ipset, &["destroy", name], None);
    }
}

/// The `ipset restore` input that fills each set anew: a scratch set is filled, swapped in
/// and destroyed. With the number of addresses.
fn script(table: &PeerTable) -> (String, usize) {
    let mut nets: Vec<IpNet> = table
        .routes()
        .map(|(net, _)| net.trunc())
        // hash:net holds /1 to /32 (/128): a default route makes every source a peer's,
        // which is no lane at all.
        .filter(|net| net.prefix_len() > 0)
        .map(|net| match net.addr() {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if net.prefix_len() >= 96 => {
                    IpNet::new(IpAddr::V4(v4), net.prefix_len() - 96).unwrap_or(net)
                }
                _ => net,
            },
            IpAddr::V4(_) => net,
        })
        .collect();
    nets.sort();
    nets.dedup();
    let mut s = String::new();
    for (family, name) in SETS {
        let scratch = format!("{name}-new");
        s += &format!("create {name} hash:net family {family} -exist\n");
        s += &format!("create {scratch} hash:net family {family} -exist\n");
        s += &format!("flush {scratch}\n");
        for net in nets
            .iter()
            .filter(|n| n.addr().is_ipv6() == (family == "inet6"))
        {
            s += &format!("add {scratch} {net} -exist\n");
        }
        s += &format!("swap {scratch} {name}\n");
        s += &format!("destroy {scratch}\n");
    }
    (s, nets.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proxy::peers::Peer;

    #[test]
    fn the_sets_are_replaced_whole_with_the_peers_addresses_of_their_family() {
        let peer = |name: &str| Peer {
            name: name.into(),
            tunnel: "10.0.0.1:15008".parse().unwrap(),
        };
        let table = PeerTable::new([
            ("10.0.0.1/32".parse().unwrap(), peer("a")),
            ("10.0.1.7/24".parse().unwrap(), peer("a")),
            ("fd00::1/128".parse().unwrap(), peer("b")),
            ("::ffff:10.0.0.9/128".parse().unwrap(), peer("b")),
            ("0.0.0.0/0".parse().unwrap(), peer("c")),
        ]);
        let (s, n) = script(&table);
        assert_eq!(n, 4);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(
            lines,
            [
                "create tessera-peers4 hash:net family inet -exist",
                "create tessera-peers4-new hash:net family inet -exist",
                "flush tessera-peers4-new",
                "add tessera-peers4-new 10.0.0.1/32 -exist",
                "add tessera-peers4-new 10.0.0.9/32 -exist",
                "add tessera-peers4-new 10.0.1.0/24 -exist",
                "swap tessera-peers4-new tessera-peers4",
                "destroy tessera-peers4-new",
                "create tessera-peers6 hash:net family inet6 -exist",
                "create tessera-peers6-new hash:net family inet6 -exist",
                "flush tessera-peers6-new",
                "add tessera-peers6-new fd00::1/128 -exist",
                "swap tessera-peers6-new tessera-peers6",
                "destroy tessera-peers6-new",
            ]
        );
        // No peers: both sets emptied, not left as they were.
        let (s, n) = script(&PeerTable::default());
        assert_eq!(n, 0);
        assert!(!s.contains("add "));
        assert_eq!(s.matches("swap ").count(), 2);
    }
}
