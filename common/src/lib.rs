//! Types shared by the eBPF programs (`tessera-ebpf`) and user space.
//!
//! Every type here is `#[repr(C)]` with explicit padding so that both sides agree on
//! the layout byte for byte. Addresses are stored as the kernel hands them to us
//! (network byte order, IPv4 in `addr[0]`); ports in host byte order.
#![no_std]

pub mod fast;

/// `AF_INET` / `AF_INET6` as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Names of the maps and programs, shared so that user space cannot drift from the object.
pub mod names {
    pub const SETTINGS: &str = "TESSERA_SETTINGS";
    pub const COOKIE_ORIG: &str = "TESSERA_COOKIE_ORIG";
    pub const CLIENT_ORIG: &str = "TESSERA_CLIENT_ORIG";
    pub const PROTECTED_PORTS: &str = "TESSERA_PROTECTED_PORTS";
    pub const INBOUND_LISTENER: &str = "TESSERA_INBOUND_LISTENER";
    pub const CLOSED: &str = "TESSERA_CLOSED";
    pub const DELIVERY: &str = "TESSERA_DELIVERY";
    pub const HOST_NETNS: &str = "TESSERA_HOST_NETNS";
    pub const ADOPTED_NETNS: &str = "TESSERA_ADOPTED_NETNS";
    pub const PROG_GUARD_ADOPTED: &str = "guard_adopted";
    pub const PROG_CONNECT4: &str = "capture_connect4";
    pub const PROG_CONNECT6: &str = "capture_connect6";
    pub const PROG_SOCKOPS: &str = "track_connect";
    pub const PROG_SK_LOOKUP: &str = "steer_inbound";
    pub const PROG_SETSOCKOPT: &str = "guard_setsockopt";
    pub const PROG_SOCK_CREATE: &str = "guard_sock_create";
    pub const PROG_EGRESS: &str = "guard_egress";
    pub const PROG_INGRESS: &str = "guard_ingress";
    pub const NONTCP_ALLOW: &str = "TESSERA_NONTCP_ALLOW";
    pub const NONTCP_WORKLOADS: &str = "TESSERA_NONTCP_WORKLOADS";
    pub const NONTCP_FLOWS: &str = "TESSERA_NONTCP_FLOWS";
    pub const FAST_SETTINGS: &str = "TESSERA_FAST_SETTINGS";
    pub const FAST_CLIENT: &str = "TESSERA_FAST_CLIENT";
    pub const FAST_SERVER: &str = "TESSERA_FAST_SERVER";
    pub const FAST_STATS: &str = "TESSERA_FAST_STATS";
    pub const FAST_EVENTS: &str = "TESSERA_FAST_EVENTS";
    pub const FAST_NOFAST: &str = "TESSERA_FAST_NOFAST";
    pub const PROG_VERIFY_FAST: &str = "verify_fast";
}

/// Index of the inbound listener sockets in the `INBOUND_LISTENER` sockmap.
pub const INBOUND_LISTENER_V4: u32 = 0;
pub const INBOUND_LISTENER_V6: u32 = 1;

/// Capacity of the connection-tracking maps. They are LRU maps, so an entry whose
/// connection never reached the proxy is evicted instead of leaking.
pub const ORIG_MAP_ENTRIES: u32 = 65_536;
pub const PROTECTED_PORT_ENTRIES: u32 = 1_024;
/// Size of the ring buffer of closed connections (bytes; a power of two, whole pages).
pub const CLOSED_RING_BYTES: u32 = 1 << 20;
/// Sockets in FIN_WAIT2 remembered at once (LRU).
pub const FIN_WAIT2_ENTRIES: u32 = 65_536;
/// Network namespaces of workloads with a network of their own (pods, containers) that the
/// enforcer serves at once.
pub const ADOPTED_NETNS_ENTRIES: u32 = 4_096;
/// Deliveries being connected at once (each entry lives from bind() to connect()'s end).
pub const DELIVERY_ENTRIES: u32 = 16_384;

/// Per-enforcer settings, written by user space into a one-element array before any
/// program is attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Port of the outbound listener on 127.0.0.1 and [::1] (host byte order).
    pub outbound_port: u16,
    pub _pad0: u16,
    /// `SO_MARK` carried by the proxy's own sockets: never captured (no loops).
    pub proxy_mark: u32,
    /// The `localhost` delivery source (network byte order). Informational: `sk_lookup`
    /// lets deliveries through by registration (`TESSERA_DELIVERY`), never by address.
    pub delivery_src4: u32,
    /// 1 once user space has filled the settings; programs do nothing before that.
    pub ready: u32,
    /// [`MODE_TUNNEL`] or [`MODE_HANDSHAKE`].
    pub mode: u32,
    /// `SO_MARK` the connect hooks give an enrolled workload's socket in handshake mode, so
    /// that iptables queues its handshake packets (and only those) to the enforcer.
    pub handshake_mark: u32,
    /// Process id (thread-group id, as the init pid namespace numbers it) of the enforcer,
    /// whose proxy sockets alone the connect hooks leave alone: the proxy's mark is not
    /// enough on its own.
    pub proxy_tgid: u32,
}

/// Connects are redirected to the outbound proxy (tunnel mode).
pub const MODE_TUNNEL: u32 = 0;
/// Connects go ahead unchanged, their socket marked: the enforcer authenticates each
/// connection in its TCP handshake (NFQUEUE) and the data stays in the kernel.
pub const MODE_HANDSHAKE: u32 = 1;

/// The original destination of a captured connection and who opened it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Destination address, network byte order; IPv4 uses `addr[0]` only.
    pub addr: [u32; 4],
    /// Destination port, host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Thread-group id (pid) of the process that called connect().
    pub pid: u32,
    /// Real uid of that process.
    pub uid: u32,
    /// cgroup v2 id (the cgroup directory's inode number) of that process.
    pub cgroup_id: u64,
}

/// The client end of a redirected connection, as the proxy sees it after accept():
/// its source address and port, and the network namespace it connected in. Unique while
/// the connection lives, because every redirected connection in one namespace has the same
/// destination (the outbound listener there); two pods' loopback addresses are the same
/// numbers, so the namespace is part of the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// Network byte order; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
    /// The network namespace's cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`).
    pub netns: u64,
}

/// A connection the proxy is opening to a local workload (a delivery), as `sk_lookup` sees
/// its SYN: the proxy registers it between bind() and connect(), so that exactly its own
/// sockets pass the inbound guard. Never a source address alone: anyone local can send from
/// a loopback address, and only the proxy holds this bound (address, port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    /// The delivery's source address (network byte order; IPv4 in `addr[0]`).
    pub addr: [u32; 4],
    /// `AF_INET` or `AF_INET6` (of the connection as `sk_lookup` sees it).
    pub family: u16,
    /// The delivery's source port (host byte order).
    pub port: u16,
    /// The workload port it connects to (host byte order).
    pub dst_port: u16,
    pub _pad: u16,
}

/// A connection of an enrolled workload that closed (handshake mode), from `sock_ops`'
/// state callback: what the enforcer needs to finish its flow record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClosedConn {
    /// Network byte order; IPv4 (also IPv4-mapped) in `[0]`.
    pub local: [u32; 4],
    pub remote: [u32; 4],
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    /// `AF_INET` or `AF_INET6` (of the addresses as stored here).
    pub family: u16,
    /// The TCP state the socket closed from (`TCP_FIN_WAIT2`, `TCP_LAST_ACK`, ...): tells
    /// which FINs the counts below include.
    pub old_state: u16,
    /// The kernel's `bytes_acked`: sequence space this end sent that the peer acknowledged,
    /// payload plus the SYN (active opener) and the FIN, once acknowledged.
    pub bytes_acked: u64,
    /// The kernel's `bytes_received`: payload plus the peer's FIN, once received.
    pub bytes_received: u64,
    /// When it closed: `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub at_ns: u64,
    /// `bytes_received` when the socket entered FIN_WAIT2 (`u64::MAX`: it did not): a
    /// socket closing from there counted the peer's FIN only if it grew since.
    pub received_at_fin_wait2: u64,
}

/// Capacity of the non-TCP allow map (addresses and networks, per workload, direction,
/// protocol and port), of the workloads map, and of the non-TCP flow counters (LRU).
pub const NONTCP_ALLOW_ENTRIES: u32 = 65_536;
pub const NONTCP_WORKLOAD_ENTRIES: u32 = 1_024;
pub const NONTCP_FLOW_ENTRIES: u32 = 65_536;

/// [`NonTcpKey::direction`]: what the workload sends, and what it receives.
pub const DIR_EGRESS: u8 = 0;
pub const DIR_INGRESS: u8 = 1;
/// IP protocol numbers as the programs use them (ICMPv6 is keyed as ICMP).
pub const PROTO_ICMP: u8 = 1;
/// In the allow map: a port a workload declares (any source may connect; the proxy or the
/// handshake decides). In flow counts: a connection refused at an undeclared port.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
/// Not a protocol: a raw socket the socket-creation guard refused (no address yet).
pub const PROTO_RAW: u8 = 255;

/// [`NONTCP_WORKLOADS`](names::NONTCP_WORKLOADS) flags, by cgroup id.
/// The workload may open ICMP sockets (some `icmp` rule allows it something).
pub const WL_ICMP: u32 = 1;
/// Denials are only recorded (observe mode).
pub const WL_OBSERVE: u32 = 2;
/// Not a workload although under an enrolled cgroup: the enforcer itself, a node agent on
/// the host's network (a Kubernetes `hostNetwork` pod). Nothing of it is captured or
/// guarded (the deepest entry decides, as for workloads).
pub const WL_EXEMPT: u32 = 4;

/// Bits of [`NonTcpKey`] before its address: an allow entry for a network of `n` bits has
/// prefix length `NONTCP_KEY_FIXED_BITS + 96 + n` (IPv4, as `::ffff:a.b.c.d`) or
/// `NONTCP_KEY_FIXED_BITS + n` (IPv6).
pub const NONTCP_KEY_FIXED_BITS: u32 = 96;

/// The data of a key of the non-TCP allow map (an LPM trie matching on the address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NonTcpKey {
    /// cgroup v2 id of the enrolled workload, native byte order (bytes: no padding
    /// anywhere in the key).
    pub cgroup_id: [u8; 8],
    /// [`DIR_EGRESS`] or [`DIR_INGRESS`].
    pub direction: u8,
    /// [`PROTO_UDP`], [`PROTO_ICMP`] or [`PROTO_TCP`] (declared ports, ingress only).
    pub protocol: u8,
    /// Big-endian: the peer's port when sending, the workload's own when receiving; 0
    /// stands for every port.
    pub port: [u8; 2],
    /// The peer's address; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
}

/// What an allow entry says: the rule that allowed it (index into the enforcer's table of
/// non-TCP rules, for flow records).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NonTcpAllow {
    pub rule: u32,
    pub _pad: u32,
}

/// [`NonTcpFlowKey::verdict`].
pub const VERDICT_DENIED: u8 = 0;
pub const VERDICT_ALLOWED: u8 = 1;
/// Denied by policy, let through because the workload or policy only observes.
pub const VERDICT_OBSERVED: u8 = 2;

/// A non-TCP flow as the programs count it: per workload, direction, protocol, peer,
/// port and verdict. The enforcer drains the counts into flow records on an interval.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NonTcpFlowKey {
    pub cgroup_id: u64,
    /// The peer; IPv4 as `::ffff:a.b.c.d`; all zero for a refused socket.
    pub addr: [u8; 16],
    /// Host byte order: the peer's port (egress) or the workload's (ingress).
    pub port: u16,
    pub direction: u8,
    /// [`PROTO_UDP`], [`PROTO_ICMP`], [`PROTO_ICMPV6`], [`PROTO_RAW`] or another IP protocol.
    pub protocol: u8,
    pub verdict: u8,
    pub _pad: [u8; 3],
}

/// Counts of a [`NonTcpFlowKey`] since the programs first saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NonTcpFlowCount {
    pub packets: u64,
    pub bytes: u64,
    /// The allowing rule (as in [`NonTcpAllow`]); `u32::MAX`: none.
    pub rule: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the first and the last packet.
    pub first_ns: u64,
    pub last_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` structs of integers with explicit padding fields.
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::ClosedConn {}
    unsafe impl aya::Pod for super::DeliveryKey {}
    unsafe impl aya::Pod for super::NonTcpKey {}
    unsafe impl aya::Pod for super::NonTcpAllow {}
    unsafe impl aya::Pod for super::NonTcpFlowKey {}
    unsafe impl aya::Pod for super::NonTcpFlowCount {}
    unsafe impl aya::Pod for super::fast::FastClientKey {}
    unsafe impl aya::Pod for super::fast::FastKey {}
    unsafe impl aya::Pod for super::fast::FastServerEntry {}
    unsafe impl aya::Pod for super::fast::FastSettings {}
    unsafe impl aya::Pod for super::fast::FastTuple {}
    unsafe impl aya::Pod for super::fast::FastSock {}
    unsafe impl aya::Pod for super::fast::FastPending {}
    unsafe impl aya::Pod for super::fast::FastConn {}
}
