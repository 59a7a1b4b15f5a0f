//! Tunnel mode's deliveries to local workloads, the kernel side (issue 12 item 7: loopback
//! was trusted both ways).
//!
//! * [`DeliveryMap`]: the proxy registers each delivery socket (bound address and port, and
//!   the workload port) in `TESSERA_DELIVERY` while it connects; `sk_lookup` lets exactly
//!   those SYNs through to protected ports. A source address alone (127.0.0.77, ::1) no
//!   longer passes: any local user could send from it.
//! * [`Routing`] (`delivery = "original-source"`, the default): deliveries come from the
//!   peer's own address on transparent sockets, so the application's replies would be routed
//!   to the peer's host. The ztunnel way brings them back: delivery sockets carry
//!   `delivery_mark`; `mangle OUTPUT` saves it in the connection's connmark and restores it
//!   on the application's packets; `ip rule fwmark M lookup T` with `local default dev lo`
//!   in table T (IPv4 and IPv6) delivers them to this host, to the proxy's socket.
//!   Installed at start-up after removing whatever a previous run left, removed at shutdown;
//!   a failure half-way removes what was put in.
use std::{io, net::SocketAddr, path::Path, sync::Mutex};

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use tessera_common::{AF_INET, AF_INET6, DeliveryKey};
use tessera_proxy::delivery::DeliveryGate;

use crate::{
    config::Bpf,
    handshake::{SYSTEM_DIRS, find, run_program, tools},
};

/// `bpf_map_update_elem` flag: insert only, never replace (linux/bpf.h).
const BPF_NOEXIST: u64 = 1;

/// The `sk_lookup` guard's map of deliveries being connected.
pub struct DeliveryMap(Mutex<HashMap<MapData, DeliveryKey, u32>>);

impl DeliveryMap {
    pub fn new(map: HashMap<MapData, DeliveryKey, u32>) -> Self {
        Self(Mutex::new(map))
    }
}

/// The key `sk_lookup` builds for the SYN of a delivery from `src` to `dst_port`.
pub fn key(src: SocketAddr, dst_port: u16) -> DeliveryKey {
    let (addr, family) = match src {
        SocketAddr::V4(a) => ([u32::from_ne_bytes(a.ip().octets()), 0, 0, 0], AF_INET),
        SocketAddr::V6(a) => {
            let o = a.ip().octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], AF_INET6)
        }
    };
    DeliveryKey {
        addr,
        family,
        port: src.port(),
        dst_port,
        _pad: 0,
    }
}

impl DeliveryGate for DeliveryMap {
    fn open(&self, src: SocketAddr, dst_port: u16) -> io::Result<()> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // BPF_NOEXIST: a concurrent delivery that shares the address and port (SO_REUSEADDR
        // lets two transparent sockets bind it) must not share the registration, or the
        // first to finish would unregister the other's SYN. The proxy takes another port.
        map.insert(key(src, dst_port), 1, BPF_NOEXIST)
            .map_err(|e| match e {
                aya::maps::MapError::SyscallError(s)
                    if s.io_error.raw_os_error() == Some(libc::EEXIST) =>
                {
                    io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("a delivery from {src} is already being connected"),
                    )
                }
                e => io::Error::other(format!("cannot register the delivery from {src}: {e}")),
            })
    }

    fn close(&self, src: SocketAddr, dst_port: u16) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = map.remove(&key(src, dst_port)) {
            tracing::warn!(%src, dst_port, error = %e, "cannot unregister a delivery");
        }
    }
}

/// Our chain in `mangle OUTPUT` (both families).
const CHAIN: &str = "TESSERA-DELIVER";

/// The routing that brings the replies of original-source deliveries back to this host.
pub struct Routing {
    mark: u32,
    table: u32,
}

fn run(tool: &Path, args: &[String]) -> Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_program(tool, &args, None).map(drop)
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// The `iptables`/`ip6tables` rules of our chain, as `-t mangle -A ...` strings.
pub fn iptables_rules(mark: u32) -> [String; 2] {
    [
        // A delivery socket's packet: its connection remembers the mark...
        format!("-t mangle -A {CHAIN} -m mark --mark {mark:#x} -j CONNMARK --set-mark {mark:#x}"),
        // ... and the application's packets of that connection get it (then the route
        // lookup again, by `ip rule fwmark`, sends them to this host).
        format!("-t mangle -A {CHAIN} -m connmark --mark {mark:#x} -j MARK --set-mark {mark:#x}"),
    ]
}

/// The `ip` commands (without `-4`/`-6`) that install the routing of one family.
pub fn ip_commands(mark: u32, table: u32, v6: bool) -> [String; 2] {
    let default = if v6 { "::/0" } else { "0.0.0.0/0" };
    [
        format!("route replace local {default} dev lo table {table}"),
        format!("rule add fwmark {mark:#x} lookup {table} pref {table}"),
    ]
}

impl Routing {
    /// Installs the routing for both families (after removing a previous run's).
    pub fn install(bpf: &Bpf) -> Result<Self> {
        let routing = Self {
            mark: bpf.delivery_mark,
            table: bpf.delivery_table,
        };
        routing.remove();
        if let Err(e) = routing.put_in() {
            routing.remove();
            return Err(e.context("installing the original-source delivery routing (bpf.delivery)"));
        }
        tracing::info!(
            mark = format!("{:#x}", routing.mark),
            table = routing.table,
            "original-source delivery: replies routed back by mark"
        );
        Ok(routing)
    }

    fn put_in(&self) -> Result<()> {
        let t = tools()?;
        let ip = find("ip", &SYSTEM_DIRS.map(Path::new))?;
        for (family, tool) in [("-4", &t.iptables), ("-6", &t.ip6tables)] {
            let v6 = family == "-6";
            for cmd in ip_commands(self.mark, self.table, v6) {
                let mut args = vec![family.to_owned()];
                args.extend(words(&cmd));
                run(&ip, &args)?;
            }
            run(tool, &words(&format!("-w -t mangle -N {CHAIN}")))?;
            for rule in iptables_rules(self.mark) {
                let mut args = vec!["-w".to_owned()];
                args.extend(words(&rule));
                run(tool, &args)?;
            }
            run(
                tool,
                &words(&format!("-w -t mangle -I OUTPUT 1 -j {CHAIN}")),
            )?;
        }
        Ok(())
    }

    /// Removes the routing (both families); what is not there is skipped.
    pub fn remove(&self) {
        let (Ok(t), Ok(ip)) = (tools(), find("ip", &SYSTEM_DIRS.map(Path::new))) else {
            tracing::warn!("cannot remove the delivery routing: iptables or ip not found");
            return;
        };
        for (family, tool) in [("-4", &t.iptables), ("-6", &t.ip6tables)] {
            while run(tool, &words(&format!("-w -t mangle -D OUTPUT -j {CHAIN}"))).is_ok() {}
            let _ = run(tool, &words(&format!("-w -t mangle -F {CHAIN}")));
            let _ = run(tool, &words(&format!("-w -t mangle -X {CHAIN}")));
            let pref = self.table.to_string();
            while run(
                &ip,
                &[
                    family.into(),
                    "rule".into(),
                    "del".into(),
                    "pref".into(),
                    pref.clone(),
                ],
            )
            .is_ok()
            {}
            let default = if family == "-6" { "::/0" } else { "0.0.0.0/0" };
            let _ = run(
                &ip,
                &words(&format!(
                    "{family} route del local {default} dev lo table {}",
                    self.table
                )),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_what_sk_lookup_reads() {
        let k = key("127.0.0.77:40000".parse().unwrap(), 8080);
        assert_eq!(k.addr, [u32::from_ne_bytes([127, 0, 0, 77]), 0, 0, 0]);
        assert_eq!((k.family, k.port, k.dst_port), (AF_INET, 40000, 8080));
        let k = key("[::1]:1".parse().unwrap(), 2);
        assert_eq!(k.addr, [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);
        assert_eq!(k.family, AF_INET6);
    }

    #[test]
    fn replies_are_marked_by_connection_and_routed_to_lo() {
        let r = iptables_rules(0x7e55_0003);
        assert!(r[0].contains("-m mark --mark 0x7e550003 -j CONNMARK --set-mark 0x7e550003"));
        assert!(r[1].contains("-m connmark --mark 0x7e550003 -j MARK --set-mark 0x7e550003"));
        let c = ip_commands(0x7e55_0003, 7755, true);
        assert_eq!(c[0], "route replace local ::/0 dev lo table 7755");
        assert_eq!(c[1], "rule add fwmark 0x7e550003 lookup 7755 pref 7755");
    }
}
