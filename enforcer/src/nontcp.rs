//! Non-TCP policy in the kernel (issue 12 item 6): what the `udp` and `icmp` rules allow
//! enrolled workloads (and the TCP ports they declare, the only ones a connection from
//! outside may reach), written into the eBPF allow map, and the programs' counts of what
//! they allowed and refused, drained into flow records.
//!
//! The programs (`guard_sock_create`, `guard_egress`, `guard_ingress`) decide every packet
//! on their own: this module only keeps their maps in step with the policy in force, the
//! DNS answers for its names and the configured resolvers ([`wanted`] is the pure part, and
//! [`NonTcp::sync`] writes only the difference). It runs as one task that looks twice a
//! second, so reloads and DNS changes reach the kernel within that time; until then the
//! previous entries stay in force.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{
    HashMap as BpfHashMap, MapData,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::IpNet;
use tessera_common::{
    DIR_EGRESS, DIR_INGRESS, NONTCP_ALLOW_ENTRIES, NONTCP_KEY_FIXED_BITS, NonTcpAllow,
    NonTcpFlowCount, NonTcpFlowKey, NonTcpKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_RAW, PROTO_TCP,
    PROTO_UDP, VERDICT_ALLOWED, VERDICT_OBSERVED, WL_ICMP, WL_OBSERVE,
};
use tessera_policy::{
    CompiledPolicy, Labels,
    parse::{Mode as PolicyMode, Peer, Protocol},
    selector::Selector,
};
use tessera_proxy::{
    code::Code,
    dns::DnsTable,
    flow::{self, Direction, Endpoint, FlowLog, FlowRecord, Verdict},
    peers::Directory,
    registry::ConnectionRegistry,
};

/// How often the maps are brought in step and the counts drained into records.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// The rule name flow records cite for DNS to the configured resolvers.
pub const RESOLVERS_RULE: &str = "policy.dns_servers";
/// The "rule" of a workload's declared TCP ports (never cited: allowed SYNs are not counted).
pub const DECLARED_PORTS_RULE: &str = "workload.ports";

/// An enrolled workload as the non-TCP programs know it.
#[derive(Clone, Debug)]
pub struct Enrolled {
    pub name: String,
    pub cgroup_id: u64,
    pub labels: Labels,
    pub observe: bool,
    /// The TCP ports it declares: the only ones a connection from outside may reach.
    pub ports: Vec<u16>,
}

/// The cgroup v2 id of the cgroup at `path` (its directory's inode number).
pub fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("cannot stat cgroup {}", path.display()))?
        .ino())
}

/// A full allow-map key: prefix length and data.
pub type Entry = (u32, NonTcpKey);

/// What the maps should hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// Allow entries and the index (in `rules`) of the rule each comes from.
    pub allow: HashMap<Entry, u32>,
    /// `WL_*` flags by cgroup id (every enrolled workload has an entry).
    pub workloads: HashMap<u64, u32>,
    pub rules: Vec<Arc<str>>,
    /// Entries left out because the map would overflow (reported, never silently).
    pub overflow: usize,
}

fn mapped(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The allow-map prefix of a network (IPv4 as `::ffff:0:0/96` plus its bits).
fn prefix(net: &IpNet) -> (u32, [u8; 16]) {
    let bits = match net {
        IpNet::V4(n) => 96 + u32::from(n.prefix_len()),
        IpNet::V6(n) => u32::from(n.prefix_len()),
    };
    (NONTCP_KEY_FIXED_BITS + bits, mapped(net.network()))
}

/// How a rule's other side becomes addresses: `dns(name)` gives a DNS name's current
/// addresses, `serving(selector)` the addresses served by the other enforcers whose
/// workloads it selects (the directory's, see `Directory::nets_serving`).
pub struct Resolve<'a> {
    pub dns: &'a dyn Fn(&str) -> Vec<IpAddr>,
    pub serving: &'a dyn Fn(&Selector) -> Vec<IpNet>,
}

/// The map's contents for `policy` in force over `workloads`. `resolvers` may be reached
/// with UDP on their port by every workload.
pub fn wanted(
    policy: &CompiledPolicy,
    policy_mode: PolicyMode,
    workloads: &[Enrolled],
    resolvers: &[SocketAddr],
    resolve: &Resolve<'_>,
) -> Wanted {
    let mut w = Wanted::default();
    let rule_index = |w: &mut Wanted, name: &Arc<str>| -> u32 {
        match w.rules.iter().position(|r| r == name) {
            Some(i) => i as u32,
            None => {
                w.rules.push(name.clone());
                (w.rules.len() - 1) as u32
            }
        }
    };
    let capacity = NONTCP_ALLOW_ENTRIES as usize;
    for wl in workloads {
        let mut flags = 0;
        if wl.observe || policy_mode == PolicyMode::Observe {
            flags |= WL_OBSERVE;
        }
        let add = |w: &mut Wanted, direction, protocol, port: u16, net: &IpNet, rule| {
            let (prefix_len, addr) = prefix(net);
            let key = NonTcpKey {
                cgroup_id: wl.cgroup_id.to_ne_bytes(),
                direction,
                protocol,
                port: port.to_be_bytes(),
                addr,
            };
            if w.allow.len() >= capacity && !w.allow.contains_key(&(prefix_len, key)) {
                w.overflow += 1;
                return;
            }
            // The first rule (in file order) to allow it is the one records cite.
            w.allow.entry((prefix_len, key)).or_insert(rule);
        };
        if !resolvers.is_empty() {
            let rule = rule_index(&mut w, &Arc::from(RESOLVERS_RULE));
            for r in resolvers {
                add(
                    &mut w,
                    DIR_EGRESS,
                    PROTO_UDP,
                    r.port(),
                    &IpNet::from(r.ip()),
                    rule,
                );
            }
        }
        if !wl.ports.is_empty() {
            let rule = rule_index(&mut w, &Arc::from(DECLARED_PORTS_RULE));
            let any = IpNet::V6(ipnet::Ipv6Net::default());
            for &port in &wl.ports {
                // `::/0` covers IPv4 too (as `::ffff:a.b.c.d`).
                add(&mut w, DIR_INGRESS, PROTO_TCP, port, &any, rule);
            }
        }
        for a in policy.nontcp_allows(&wl.labels) {
            let rule = rule_index(&mut w, &a.rule);
            let protocol = match a.protocol {
                Protocol::Udp => PROTO_UDP,
                Protocol::Icmp => {
                    if !a.inbound {
                        flags |= WL_ICMP;
                    }
                    PROTO_ICMP
                }
                Protocol::Tcp => continue,
            };
            let direction = if a.inbound { DIR_INGRESS } else { DIR_EGRESS };
            let mut nets = Vec::new();
            for p in &a.peers {
                match p {
                    Peer::Cidr(net) => nets.push(*net),
                    Peer::Dns(name) => {
                        nets.extend((resolve.dns)(name).into_iter().map(IpNet::from))
                    }
                    // Workloads on other enforcers: the addresses those enforcers serve.
                    Peer::Labels(selector) => nets.extend((resolve.serving)(selector)),
                }
            }
            // An entry per port (the map matches ports exactly; 0 stands for every port).
            let ports: Vec<u16> = if a.ports.is_empty() || protocol == PROTO_ICMP {
                vec![0]
            } else {
                a.ports.iter().flat_map(|&(lo, hi)| lo..=hi).collect()
            };
            for net in &nets {
                for &port in &ports {
                    add(&mut w, direction, protocol, port, net, rule);
                }
            }
        }
        w.workloads.insert(wl.cgroup_id, flags);
    }
    w
}

/// The maps, and what was last written to them.
pub struct NonTcp {
    allow: LpmTrie<MapData, NonTcpKey, NonTcpAllow>,
    workloads_map: BpfHashMap<MapData, u64, u32>,
    flows_map: BpfHashMap<MapData, NonTcpFlowKey, NonTcpFlowCount>,
    installed: HashMap<Entry, u32>,
    installed_workloads: HashMap<u64, u32>,
    rules: Vec<Arc<str>>,
    /// Counts already recorded, per flow.
    recorded: HashMap<NonTcpFlowKey, (u64, u64)>,
    /// Each workload's name and identity labels, for its records.
    names: HashMap<u64, (String, std::collections::BTreeMap<String, String>)>,
    reporter: String,
    mode: flow::Mode,
}

impl NonTcp {
    /// Takes the maps over, forgetting whatever a previous run left in them: what is
    /// allowed is what this run computes.
    pub fn new(
        mut allow: LpmTrie<MapData, NonTcpKey, NonTcpAllow>,
        mut workloads_map: BpfHashMap<MapData, u64, u32>,
        flows_map: BpfHashMap<MapData, NonTcpFlowKey, NonTcpFlowCount>,
        workloads: &[Enrolled],
        reporter: String,
        mode: flow::Mode,
    ) -> Self {
        let stale: Vec<Key<NonTcpKey>> = allow.keys().filter_map(Result::ok).collect();
        for k in &stale {
            let _ = allow.remove(k);
        }
        let stale: Vec<u64> = workloads_map.keys().filter_map(Result::ok).collect();
        for k in &stale {
            let _ = workloads_map.remove(k);
        }
        let mut recorded = HashMap::new();
        // Counts from before this run are not this run's to record.
        for (k, c) in flows_map.iter().filter_map(Result::ok) {
            recorded.insert(k, (c.packets, c.bytes));
        }
        Self {
            allow,
            workloads_map,
            flows_map,
            installed: HashMap::new(),
            installed_workloads: HashMap::new(),
            rules: Vec::new(),
            recorded,
            names: workloads
                .iter()
                .map(|w| {
                    let labels = w
                        .labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    (w.cgroup_id, (w.name.clone(), labels))
                })
                .collect(),
            reporter,
            mode,
        }
    }

    /// Writes the difference between what the maps hold and `w`: new and changed entries
    /// first, then removals, so that during a change the map allows at most what the old
    /// and the new policy together allow, and never less than both do.
    pub fn sync(&mut self, w: Wanted) -> Result<()> {
        if w.overflow > 0 {
            tracing::error!(
                left_out = w.overflow,
                capacity = NONTCP_ALLOW_ENTRIES,
                "non-TCP allow map full: some udp/icmp rule entries are not in force (denied)"
            );
        }
        for (&(prefix_len, data), &rule) in &w.allow {
            if self.installed.get(&(prefix_len, data)) != Some(&rule) {
                self.allow
                    .insert(
                        &Key::new(prefix_len, data),
                        NonTcpAllow { rule, _pad: 0 },
                        0,
                    )
                    .context("writing the non-TCP allow map")?;
            }
        }
        for (&(prefix_len, data), _) in self.installed.iter() {
            if !w.allow.contains_key(&(prefix_len, data)) {
                let _ = self.allow.remove(&Key::new(prefix_len, data));
            }
        }
        for (&id, &flags) in &w.workloads {
            if self.installed_workloads.get(&id) != Some(&flags) {
                self.workloads_map
                    .insert(id, flags, 0)
                    .context("writing the non-TCP workloads map")?;
            }
        }
        for id in self.installed_workloads.keys() {
            if !w.workloads.contains_key(id) {
                let _ = self.workloads_map.remove(id);
            }
        }
        if self.installed != w.allow {
            tracing::info!(entries = w.allow.len(), "non-TCP policy in force");
        }
        self.installed = w.allow;
        self.installed_workloads = w.workloads;
        // (A count made just before this sync may carry an index of the previous table: its
        // record can cite the wrong rule name, never change a verdict.)
        self.rules = w.rules;
        Ok(())
    }

    /// One flow record per counted flow with packets since the last drain.
    pub fn drain(&mut self, flows: &FlowLog) {
        let now_ms = flow::now_ms();
        let now_ns = ktime_ns();
        let counted: Vec<_> = self.flows_map.iter().filter_map(Result::ok).collect();
        for (key, count) in counted {
            let (packets0, bytes0) = self.recorded.get(&key).copied().unwrap_or((0, 0));
            if count.packets <= packets0 {
                continue;
            }
            self.recorded.insert(key, (count.packets, count.bytes));
            let record = self.record(
                &key,
                &count,
                count.packets - packets0,
                count.bytes.saturating_sub(bytes0),
                now_ms,
                now_ns,
            );
            flows.record(record);
        }
        // Forget flows the LRU map evicted.
        if self.recorded.len() > 2 * tessera_common::NONTCP_FLOW_ENTRIES as usize {
            let live: std::collections::HashSet<_> =
                self.flows_map.keys().filter_map(Result::ok).collect();
            self.recorded.retain(|k, _| live.contains(k));
        }
    }

    fn record(
        &self,
        key: &NonTcpFlowKey,
        count: &NonTcpFlowCount,
        packets: u64,
        bytes: u64,
        now_ms: u64,
        now_ns: u64,
    ) -> FlowRecord {
        let peer_ip = {
            let v6 = Ipv6Addr::from(key.addr);
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        };
        let unspecified = if peer_ip.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        };
        let mut workload = Endpoint::addr(SocketAddr::new(
            unspecified,
            if key.direction == DIR_INGRESS {
                key.port
            } else {
                0
            },
        ));
        if let Some((name, labels)) = self.names.get(&key.cgroup_id) {
            workload.workload = Some(name.clone());
            workload.labels = labels.clone();
        }
        workload.enforcer = Some(self.reporter.clone());
        let peer = Endpoint::addr(SocketAddr::new(
            peer_ip,
            if key.direction == DIR_EGRESS {
                key.port
            } else {
                0
            },
        ));
        let (direction, src, dst) = if key.direction == DIR_INGRESS {
            (Direction::Inbound, peer, workload)
        } else {
            (Direction::Outbound, workload, peer)
        };
        let age_ms = now_ns.saturating_sub(count.first_ns) / 1_000_000;
        let mut r = FlowRecord::new(
            &self.reporter,
            self.mode,
            direction,
            src,
            dst,
            now_ms.saturating_sub(age_ms),
        );
        r.protocol = match key.protocol {
            PROTO_TCP => flow::Protocol::Tcp,
            PROTO_UDP => flow::Protocol::Udp,
            PROTO_ICMP | PROTO_ICMPV6 => flow::Protocol::Icmp,
            PROTO_RAW => flow::Protocol::Raw,
            _ => flow::Protocol::Raw,
        };
        r.duration_ms = count.last_ns.saturating_sub(count.first_ns) / 1_000_000;
        r.rule = self.rules.get(count.rule as usize).map(|r| r.to_string());
        if key.direction == DIR_INGRESS {
            r.bytes_received = bytes;
        } else {
            r.bytes_sent = bytes;
        }
        let what = match key.protocol {
            PROTO_TCP => "a connection to a port the workload does not declare",
            PROTO_UDP => "udp",
            PROTO_ICMP | PROTO_ICMPV6 => "icmp",
            PROTO_RAW => "a raw socket",
            _ => "this IP protocol",
        };
        match key.verdict {
            VERDICT_ALLOWED => {
                r.verdict = Verdict::Allowed;
                r.code = Code::Clean;
            }
            VERDICT_OBSERVED => {
                r.verdict = Verdict::ObservedDeny;
                r.reason = format!("no rule allows {what} (observe: let through)");
            }
            _ => r.refuse(
                Code::Policy,
                format!("denied: no rule allows {what} (default deny)"),
            ),
        }
        // Packets, not connections: how many this record stands for.
        r.packets = Some(packets);
        r
    }
}

/// CLOCK_MONOTONIC in ns, the clock `bpf_ktime_get_ns` reads.
fn ktime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Cgroups under an enrolled one that are not workloads (`WL_EXEMPT`): the enforcer's
/// own, node agents on the host's network (Kubernetes `hostNetwork` pods), by a key of
/// who reported them. Paths, resolved to cgroup ids at each sync (a pod's cgroup may
/// appear after its report).
#[derive(Default)]
pub struct Exempt(std::sync::Mutex<std::collections::BTreeMap<String, std::path::PathBuf>>);

impl Exempt {
    pub fn insert(&self, key: &str, cgroup: std::path::PathBuf) {
        self.0.lock().expect("lock").insert(key.to_owned(), cgroup);
    }

    pub fn remove(&self, key: &str) {
        self.0.lock().expect("lock").remove(key);
    }

    /// The cgroup ids of the exempt cgroups that exist now.
    pub fn ids(&self) -> Vec<u64> {
        let paths: Vec<std::path::PathBuf> =
            self.0.lock().expect("lock").values().cloned().collect();
        paths.iter().filter_map(|p| cgroup_id(p).ok()).collect()
    }
}

/// Writes `id` as exempt into the pinned workloads map at `pin` (if an earlier run left
/// one): capture a previous run left attached must not refuse the enforcer's own sockets
/// (its marked listeners, its API client) before this run's maps are in step.
pub fn exempt_in_pinned(pin: &Path, id: u64) -> Result<bool> {
    if !pin.exists() {
        return Ok(false);
    }
    let data =
        aya::maps::MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let mut map: aya::maps::HashMap<_, u64, u32> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
    map.insert(id, tessera_common::WL_EXEMPT, 0)
        .with_context(|| format!("writing {}", pin.display()))?;
    Ok(true)
}

/// Keeps the maps in step with the policy in force and DNS answers, and drains the
/// counts into flow records, every [`INTERVAL`].
#[allow(clippy::too_many_arguments)]
pub async fn keep_in_force(
    mut nontcp: NonTcp,
    registry: Arc<ConnectionRegistry>,
    dns: Arc<DnsTable>,
    directory: Arc<Directory>,
    workloads: Vec<Enrolled>,
    resolvers: Vec<SocketAddr>,
    policy_mode: PolicyMode,
    flows: FlowLog,
    exempt: Arc<Exempt>,
) {
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tick.tick().await;
        let policy = registry.decisions().policy();
        let resolve = Resolve {
            dns: &|n| dns.addrs(n),
            serving: &|s| directory.nets_serving(|l| s.matches(l)),
        };
        let mut w = wanted(&policy, policy_mode, &workloads, &resolvers, &resolve);
        for id in exempt.ids() {
            w.workloads.insert(id, tessera_common::WL_EXEMPT);
        }
        if let Err(e) = nontcp.sync(w) {
            tracing::error!(error = format!("{e:#}"), "non-TCP policy not updated");
        }
        nontcp.drain(&flows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> Vec<Enrolled> {
        vec![Enrolled {
            name: "web".into(),
            cgroup_id: 42,
            labels: Labels::parse("app=web").unwrap(),
            observe: false,
            ports: vec![8080],
        }]
    }

    fn policy(text: &str) -> Arc<CompiledPolicy> {
        tessera_policy::load("p.yaml", text).unwrap()
    }

    #[test]
    fn rules_resolvers_and_names_become_entries() {
        let p = policy(
            "rules:\n\
             - {name: dns, action: allow, protocol: udp, from: {labels: [app=web]}, to: [{cidr: 10.0.0.0/24}, {dns: ns.test}], ports: [53, \"60-61\"]}\n\
             - {name: ping, action: allow, protocol: icmp, from: {labels: [app=web]}, to: {cidr: \"fd00::/64\"}}\n\
             - {name: in, action: allow, protocol: udp, from: {cidr: 192.0.2.7}, to: {labels: [app=web]}, ports: [514]}\n\
             - {name: statsd, action: allow, protocol: udp, from: {labels: [app=web]}, to: {labels: [app=metrics]}, ports: [8125]}\n\
             - {name: nobody, action: allow, protocol: udp, from: {labels: [app=web]}, to: {labels: [app=none]}}\n",
        );
        let resolve = |n: &str| {
            assert_eq!(n, "ns.test");
            vec!["10.9.9.9".parse().unwrap()]
        };
        // Workloads on other enforcers: the addresses their enforcers serve.
        let serving = |s: &Selector| {
            if s.matches(&Labels::parse("app=metrics").unwrap()) {
                vec!["10.1.0.2/32".parse().unwrap()]
            } else {
                Vec::new()
            }
        };
        let w = wanted(
            &p,
            PolicyMode::Enforce,
            &web(),
            &["10.0.0.53:53".parse().unwrap()],
            &Resolve {
                dns: &resolve,
                serving: &serving,
            },
        );
        // resolver + declared port + 2 networks x 3 ports + 1 icmp network + 1 inbound
        // source + 1 workload elsewhere (another selector matching no one adds nothing).
        assert_eq!(w.allow.len(), 1 + 1 + 6 + 1 + 1 + 1, "{:?}", w.allow);
        assert_eq!(w.workloads.get(&42), Some(&WL_ICMP));
        let key = |dir, proto, port: u16, ip: &str, bits| {
            let net: IpNet = format!("{ip}/{bits}").parse().unwrap();
            let (len, addr) = prefix(&net);
            (
                len,
                NonTcpKey {
                    cgroup_id: 42u64.to_ne_bytes(),
                    direction: dir,
                    protocol: proto,
                    port: port.to_be_bytes(),
                    addr,
                },
            )
        };
        let rule = |e| w.rules[w.allow[&e] as usize].to_string();
        assert_eq!(
            rule(key(DIR_EGRESS, PROTO_UDP, 53, "10.0.0.53", 32)),
            RESOLVERS_RULE
        );
        assert_eq!(rule(key(DIR_EGRESS, PROTO_UDP, 61, "10.0.0.0", 24)), "dns");
        assert_eq!(rule(key(DIR_EGRESS, PROTO_UDP, 60, "10.9.9.9", 32)), "dns");
        assert_eq!(rule(key(DIR_EGRESS, PROTO_ICMP, 0, "fd00::", 64)), "ping");
        assert_eq!(
            rule(key(DIR_INGRESS, PROTO_UDP, 514, "192.0.2.7", 32)),
            "in"
        );
        assert_eq!(
            rule(key(DIR_EGRESS, PROTO_UDP, 8125, "10.1.0.2", 32)),
            "statsd"
        );
        // IPv4 networks sit under ::ffff:0:0/96.
        assert_eq!(
            key(DIR_EGRESS, PROTO_UDP, 61, "10.0.0.0", 24).0,
            NONTCP_KEY_FIXED_BITS + 96 + 24
        );
    }

    #[test]
    fn without_rules_a_workload_has_no_entries_and_observe_is_flagged() {
        let p = policy(
            "rules:\n- {name: t, action: allow, from: {labels: [app=web]}, to: {cidr: 0.0.0.0/0}}\n",
        );
        let mut web = web();
        web[0].ports.clear();
        let w = wanted(
            &p,
            PolicyMode::Observe,
            &web,
            &[],
            &Resolve {
                dns: &|_| Vec::new(),
                serving: &|_| Vec::new(),
            },
        );
        assert!(w.allow.is_empty());
        assert_eq!(w.workloads.get(&42), Some(&WL_OBSERVE));
    }
}
