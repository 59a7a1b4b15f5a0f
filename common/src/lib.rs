//! Types shared by the eBPF programs (`tessera-ebpf`) and user space.
//!
//! Every type here is `#[repr(C)]` with explicit padding so that both sides agree on
//! the layout byte for byte. Addresses are stored as the kernel hands them to us
//! (network byte order, IPv4 in `addr[0]`); ports in host byte order.
#![no_std]

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
    pub const PROG_CONNECT4: &str = "capture_connect4";
    pub const PROG_CONNECT6: &str = "capture_connect6";
    pub const PROG_SOCKOPS: &str = "track_connect";
    pub const PROG_SK_LOOKUP: &str = "steer_inbound";
    pub const PROG_SETSOCKOPT: &str = "guard_setsockopt";
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
    /// Source address (network byte order) the proxy uses to deliver tunnelled
    /// connections to local workloads; `sk_lookup` lets exactly these through.
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
/// its source address and port. Unique while the connection lives, because every
/// redirected connection has the same destination (the outbound listener).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// Network byte order; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub family: u16,
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

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` structs of integers with explicit padding fields.
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::ClosedConn {}
}
