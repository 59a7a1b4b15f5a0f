//! The handshake fast path in the kernel (issue 16 item 5; docs/handshake.md, "Fast path").
//!
//! After a full handshake between two workloads (through the NFQUEUE engine), both
//! enforcers hold a pair secret (`FAST_CLIENT` at the client, by caller and destination;
//! `FAST_SERVER` at the server, by key id). A later connection of the pair is proven here,
//! without any trip through user space:
//! * `capture_connect4/6` find the caller's key and mark the socket with the fast mark
//!   (not the handshake mark: none of the queueing rules match it) and remember it by cookie;
//! * `track_connect` (sock_ops) writes a kind-254 option with a SipHash tag on the SYN (over
//!   both ends and the client's ISN), on the server's SYN-ACK (adding the server's ISN) and
//!   on the client's first segments after it (over both ISNs);
//! * `verify_fast` (tc ingress, before netfilter) checks the tags of arriving SYNs (server),
//!   SYN-ACKs (client) and first ACKs (server) and sets mark bits the iptables rules use to
//!   skip the queues. Anything that fails is left unmarked and goes to the queues as today,
//!   where the engine refuses it with a flow record (`bad-proof`); a SYN-ACK that fails for a
//!   connection whose SYN we tagged is dropped here (the engine has no state for it).
use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_uid_gid, bpf_get_socket_cookie,
        bpf_ktime_get_ns, bpf_load_hdr_opt, bpf_reserve_hdr_opt, bpf_store_hdr_opt,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockOpsContext, TcContext},
};
use tessera_common::{
    AF_INET, AF_INET6,
    fast::{
        FAST_CLIENT_ENTRIES, FAST_EVENTS_BYTES, FAST_EXID, FAST_OPT_KIND, FAST_OPT_LEN,
        FAST_PENDING_ENTRIES, FAST_SERVER_ENTRIES, FastClientKey, FastConn, FastKey, FastPending,
        FastServerEntry, FastSettings, FastSock, FastTuple, LABEL_ACK, LABEL_SYN, LABEL_SYNACK,
        STAT_ACK_OK, STAT_FAILED, STAT_SYN_OK, STAT_SYNACK_DROPPED, STAT_SYNACK_OK, STATS,
        TagInput, encode_option, find_option_in,
    },
};

#[map(name = "TESSERA_FAST_SETTINGS")]
static FAST_SETTINGS: Array<FastSettings> = Array::with_max_entries(1, 0);

/// Client end: pair secrets by (caller's cgroup, uid, destination). LRU: a full map
/// forgets the least used key (that pair takes the full handshake), never refuses new ones.
#[map(name = "TESSERA_FAST_CLIENT")]
static FAST_CLIENT: LruHashMap<FastClientKey, FastKey> =
    LruHashMap::with_max_entries(FAST_CLIENT_ENTRIES, 0);

/// Server end: pair secrets by key id (LRU, as `FAST_CLIENT`; user space also sweeps
/// expired keys).
#[map(name = "TESSERA_FAST_SERVER")]
static FAST_SERVER: LruHashMap<u32, FastServerEntry> =
    LruHashMap::with_max_entries(FAST_SERVER_ENTRIES, 0);

/// Client sockets on the fast path, by cookie, until their first segments are tagged.
#[map(name = "TESSERA_FAST_SOCKS")]
static FAST_SOCKS: LruHashMap<u64, FastSock> =
    LruHashMap::with_max_entries(FAST_PENDING_ENTRIES, 0);

/// Client connections whose SYN went out tagged, by 4-tuple (local first), for `verify_fast`
/// to check their SYN-ACK.
#[map(name = "TESSERA_FAST_PENDING")]
static FAST_PENDING: LruHashMap<FastTuple, FastPending> =
    LruHashMap::with_max_entries(FAST_PENDING_ENTRIES, 0);

/// Server end: the ISNs of each SYN-ACK written for a fast SYN, by 4-tuple (local first),
/// until the client's tagged ACK: a tag is accepted only over the server's *current* ISN,
/// so an ACK replayed from an earlier connection of the same 4-tuple never proves a new one.
#[map(name = "TESSERA_FAST_SYNACKS")]
static FAST_SYNACKS: LruHashMap<FastTuple, [u32; 3]> =
    LruHashMap::with_max_entries(FAST_PENDING_ENTRIES, 0);

/// Server end: the SYNs `verify_fast` proved, by 4-tuple (local first): (client ISN, key
/// id). The listener's `sock_ops` tags a SYN-ACK only for such a SYN, so a SYN that merely
/// names a key id (a full-handshake SYN with a victim's id beside its token) gets no tag
/// and no fast record.
#[map(name = "TESSERA_FAST_VERIFIED")]
static FAST_VERIFIED: LruHashMap<FastTuple, [u32; 2]> =
    LruHashMap::with_max_entries(FAST_PENDING_ENTRIES, 0);

/// Server end: local ports whose listener was opened while the fast path ran (its
/// SYN-ACKs can carry a tag). A fast SYN to any other port is left to the engine, which
/// refuses it; the client then retries by the full handshake.
#[map(name = "TESSERA_FAST_LISTENERS")]
static FAST_LISTENERS: HashMap<u16, u32> = HashMap::with_max_entries(4096, 0);

/// Client end: destinations whose server refused a fast SYN, until when (ns): no key is
/// installed for them (user space checks) until then, so a server that cannot take the
/// fast path costs one delayed connection per pair, not every other one.
#[map(name = "TESSERA_FAST_NOFAST")]
static FAST_NOFAST: LruHashMap<FastClientKey, u64> =
    LruHashMap::with_max_entries(FAST_CLIENT_ENTRIES, 0);

/// Connections the fast path let through, as they are established (for flow records).
#[map(name = "TESSERA_FAST_EVENTS")]
static FAST_EVENTS: RingBuf = RingBuf::with_byte_size(FAST_EVENTS_BYTES, 0);

/// Counters per CPU ([`STATS`] of them): what the fast path verified and refused.
#[map(name = "TESSERA_FAST_STATS")]
static FAST_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS, 0);

pub(super) const WRITE_HDR_OPT_CB_FLAG: i32 = 1 << 6;
const BPF_SOCK_OPS_TCP_LISTEN_CB: u32 = 11;
const BPF_SOCK_OPS_HDR_OPT_LEN_CB: u32 = 14;
const BPF_SOCK_OPS_WRITE_HDR_OPT_CB: u32 = 15;
const BPF_LOAD_HDR_OPT_TCP_SYN: u64 = 1;
const TCP_FLAG_SYN: u32 = 0x02;
const TCP_FLAG_RST: u32 = 0x04;
const TCP_FLAG_ACK: u32 = 0x10;
/// Segments of a client connection tagged at most after its SYN (the first ACK and its
/// retransmissions, or the first data segment if that ACK was lost).
const MAX_TAGGED: u32 = 4;

fn count(stat: u32) {
    if let Some(p) = FAST_STATS.get_ptr_mut(stat) {
        // SAFETY: a pointer into this CPU's slot of a per-CPU array.
        unsafe { *p += 1 };
    }
}

pub(super) fn settings() -> Option<FastSettings> {
    let s = *FAST_SETTINGS.get(0)?;
    (s.socket_mark != 0).then_some(s)
}

fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Connect hook, handshake mode: the socket's fast mark if the caller holds a live pair
/// secret for this destination (the socket then never meets the queues), else None.
pub(super) fn client_mark(
    ctx: &SockAddrContext,
    addr: [u32; 4],
    port: u16,
    family: u16,
) -> Option<u32> {
    let s = settings()?;
    // SAFETY: plain helpers valid in cgroup/connect programs.
    let (cgroup_id, uid) = unsafe {
        (
            bpf_get_current_cgroup_id(),
            bpf_get_current_uid_gid() as u32,
        )
    };
    let key = FastClientKey {
        cgroup_id,
        uid,
        family,
        port,
        addr,
    };
    // SAFETY: the value is copied out at once.
    let k = unsafe { FAST_CLIENT.get(&key) }.copied()?;
    if k.expires_ns <= now() {
        let _ = FAST_CLIENT.remove(&key);
        return None;
    }
    // SAFETY: valid helper for cgroup/connect programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let sock = FastSock {
        key: k,
        client: key,
        client_isn: 0,
        tagged: 0,
    };
    FAST_SOCKS.insert(&cookie, &sock, 0).ok()?;
    Some(s.socket_mark)
}

/// The socket's own addresses (IPv4-mapped as IPv4), local first.
fn tuple(ctx: &SockOpsContext) -> FastTuple {
    let (local, remote, family) = if ctx.family() == u32::from(AF_INET) {
        (
            [ctx.local_ip4(), 0, 0, 0],
            [ctx.remote_ip4(), 0, 0, 0],
            AF_INET,
        )
    } else {
        let (l, family) = super::unmapped(ctx.local_ip6());
        (l, super::unmapped(ctx.remote_ip6()).0, family)
    };
    FastTuple {
        local,
        remote,
        local_port: ctx.local_port() as u16,
        remote_port: u16::from_be((ctx.remote_port() >> 16) as u16),
        family,
        _pad: 0,
    }
}

/// The outgoing segment's sequence and acknowledgment numbers (WRITE_HDR_OPT_CB: the
/// header is written before the callback).
fn seq_ack(ctx: &SockOpsContext) -> Option<(u32, u32)> {
    // SAFETY: packet pointers of the sock_ops context, bounds-checked before the reads.
    unsafe {
        let data = (*ctx.ops).__bindgen_anon_3.skb_data as usize;
        let end = (*ctx.ops).__bindgen_anon_4.skb_data_end as usize;
        if data + 12 > end {
            return None;
        }
        let seq = u32::from_be(core::ptr::read_unaligned((data + 4) as *const u32));
        let ack = u32::from_be(core::ptr::read_unaligned((data + 8) as *const u32));
        Some((seq, ack))
    }
}

/// The SYN's fast option, read while answering it (SYN-ACK callbacks).
fn syn_option(ctx: &SockOpsContext) -> Option<(u32, u64)> {
    let mut o = [0u8; FAST_OPT_LEN as usize];
    o[0] = FAST_OPT_KIND;
    o[1] = 4;
    let exid = FAST_EXID.to_be_bytes();
    o[2] = exid[0];
    o[3] = exid[1];
    // SAFETY: the buffer lives on our stack, `len` is its size.
    let rc = unsafe {
        bpf_load_hdr_opt(
            ctx.ops,
            o.as_mut_ptr() as *mut core::ffi::c_void,
            FAST_OPT_LEN as u32,
            BPF_LOAD_HDR_OPT_TCP_SYN,
        )
    };
    if rc != FAST_OPT_LEN as i64 {
        return None;
    }
    tessera_common::fast::decode_option(&o)
}

fn store(ctx: &SockOpsContext, key_id: u32, tag: u64) {
    let o = encode_option(key_id, tag);
    // SAFETY: the option lives on our stack.
    unsafe {
        bpf_store_hdr_opt(
            ctx.ops,
            o.as_ptr() as *const core::ffi::c_void,
            FAST_OPT_LEN as u32,
            0,
        )
    };
}

fn reserve(ctx: &SockOpsContext) {
    // SAFETY: valid in HDR_OPT_LEN_CB.
    unsafe { bpf_reserve_hdr_opt(ctx.ops, FAST_OPT_LEN as u32, 0) };
}

fn stop_tagging(ctx: &SockOpsContext, cookie: u64) {
    let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 & !WRITE_HDR_OPT_CB_FLAG);
    let _ = FAST_SOCKS.remove(&cookie);
}

/// sock_ops callbacks of the fast path (handshake mode). Returns whether it handled `op`.
pub(super) fn sock_ops(ctx: &SockOpsContext, op: u32) -> bool {
    match op {
        super::BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: valid helper for sock_ops programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: lookup only.
            if unsafe { FAST_SOCKS.get(&cookie) }.is_some() {
                let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | WRITE_HDR_OPT_CB_FLAG);
            }
            false
        }
        super::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: valid helper for sock_ops programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: copied out at once.
            if let Some(sock) = unsafe { FAST_SOCKS.get(&cookie) }.copied() {
                report(tuple(ctx), sock.key.key_id, 0);
            }
            false
        }
        super::BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let t = tuple(ctx);
            // SAFETY: copied out at once.
            if let Some([_, _, key_id]) = unsafe { FAST_SYNACKS.get(&t) }.copied() {
                let _ = FAST_SYNACKS.remove(&t);
                let _ = FAST_VERIFIED.remove(&t);
                report(t, key_id, 1);
            }
            false
        }
        BPF_SOCK_OPS_TCP_LISTEN_CB => {
            if settings().is_some()
                && ctx
                    .set_cb_flags(ctx.cb_flags() as i32 | WRITE_HDR_OPT_CB_FLAG)
                    .is_ok()
            {
                let _ = FAST_LISTENERS.insert(&(ctx.local_port() as u16), &1, 0);
            }
            true
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB | BPF_SOCK_OPS_WRITE_HDR_OPT_CB => {
            // SAFETY: a field of the context every sock_ops program may read.
            let flags = unsafe { (*ctx.ops).skb_tcp_flags };
            let write = op == BPF_SOCK_OPS_WRITE_HDR_OPT_CB;
            if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN | TCP_FLAG_ACK {
                server_synack(ctx, write);
            } else {
                client_segment(ctx, flags, write);
            }
            true
        }
        _ => false,
    }
}

/// Reports an established fast connection (no wake-up: the enforcer drains the ring on
/// an interval, before the close reports, so a close never comes before its connection).
fn report(tuple: FastTuple, key_id: u32, server: u32) {
    let c = FastConn {
        tuple,
        key_id,
        server,
        at_ns: now(),
    };
    let _ = FAST_EVENTS.output::<FastConn>(&c, 1);
}

/// The server's SYN-ACK answering a fast SYN: tagged over both ISNs.
fn server_synack(ctx: &SockOpsContext, write: bool) {
    if ctx.arg(0) & 2 != 0 {
        // A syncookie SYN-ACK: no state to come back to; the slow path decides.
        return;
    }
    let Some((key_id, _)) = syn_option(ctx) else {
        return;
    };
    let t = tuple(ctx);
    // SAFETY: copied out at once.
    let Some([verified_isn, verified_id]) = (unsafe { FAST_VERIFIED.get(&t) }).copied() else {
        return;
    };
    if verified_id != key_id {
        return;
    }
    // SAFETY: copied out at once.
    let Some(e) = (unsafe { FAST_SERVER.get(&key_id) }).copied() else {
        return;
    };
    if e.key.expires_ns <= now()
        || e.family != t.family
        || e.server_port != t.local_port
        || e.client != t.remote
    {
        return;
    }
    if !write {
        reserve(ctx);
        return;
    }
    let Some((server_isn, ack)) = seq_ack(ctx) else {
        return;
    };
    if ack.wrapping_sub(1) != verified_isn {
        return;
    }
    let input = TagInput {
        label: LABEL_SYNACK,
        epoch: e.key.epoch,
        key_id,
        client: t.remote,
        server: t.local,
        client_port: t.remote_port,
        server_port: t.local_port,
        family: t.family,
        client_isn: ack.wrapping_sub(1),
        server_isn,
    };
    let _ = FAST_SYNACKS.insert(&t, &[input.client_isn, server_isn, key_id], 0);
    store(ctx, key_id, input.tag(&e.key.secret));
}

/// A client socket on the fast path: its SYN, then its first segments after the SYN-ACK.
fn client_segment(ctx: &SockOpsContext, flags: u32, write: bool) {
    // SAFETY: valid helper for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(sock) = FAST_SOCKS.get_ptr_mut(&cookie) else {
        // A server's child (it inherits the listener's flags) or a finished client.
        let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 & !WRITE_HDR_OPT_CB_FLAG);
        return;
    };
    // SAFETY: an LRU map value, ours while this callback runs on the locked socket.
    let sock = unsafe { &mut *sock };
    let syn = flags & TCP_FLAG_SYN != 0;
    if syn && !write {
        let t = tuple(ctx);
        // SAFETY: copied out at once.
        if let Some(p) = unsafe { FAST_PENDING.get(&t) }.copied()
            && p.fallback == 1
        {
            // The server refused our fast SYN: this retransmission takes the full
            // handshake (the handshake mark: the queues' rules take it from here).
            let _ = FAST_PENDING.remove(&t);
            if let Some(mut mark) = super::settings().map(|s| s.handshake_mark) {
                // SAFETY: SO_MARK on the socket this callback runs for; the value is a
                // live u32 on our stack.
                unsafe {
                    aya_ebpf::helpers::bpf_setsockopt(
                        ctx.ops as *mut _,
                        super::SOL_SOCKET,
                        super::SO_MARK,
                        &mut mark as *mut u32 as *mut core::ffi::c_void,
                        4,
                    )
                };
            }
            stop_tagging(ctx, cookie);
            return;
        }
    }
    if !write {
        // SAFETY: a field readable from any sock_ops program on a full socket.
        let snd_nxt = unsafe { (*ctx.ops).snd_nxt };
        if syn
            || (sock.client_isn != 0
                && snd_nxt == sock.client_isn.wrapping_add(1)
                && sock.tagged < MAX_TAGGED)
        {
            reserve(ctx);
        } else if !syn && sock.client_isn != 0 {
            stop_tagging(ctx, cookie);
        }
        return;
    }
    let Some((seq, ack)) = seq_ack(ctx) else {
        return;
    };
    let t = tuple(ctx);
    let mut input = TagInput {
        label: LABEL_SYN,
        epoch: sock.key.epoch,
        key_id: sock.key.key_id,
        client: t.local,
        server: t.remote,
        client_port: t.local_port,
        server_port: t.remote_port,
        family: t.family,
        client_isn: seq,
        server_isn: 0,
    };
    if syn {
        sock.client_isn = seq;
        let pending = FastPending {
            key: sock.key,
            client: sock.client,
            client_isn: seq,
            fallback: 0,
        };
        let _ = FAST_PENDING.insert(&t, &pending, 0);
    } else {
        if flags & TCP_FLAG_ACK == 0 || seq != sock.client_isn.wrapping_add(1) {
            return;
        }
        input.label = LABEL_ACK;
        input.client_isn = seq.wrapping_sub(1);
        input.server_isn = ack.wrapping_sub(1);
        sock.tagged += 1;
        let _ = FAST_PENDING.remove(&t);
    }
    store(ctx, sock.key.key_id, input.tag(&sock.key.secret));
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;

/// What `verify_fast` reads of a TCP segment.
struct Seg {
    src: [u32; 4],
    dst: [u32; 4],
    family: u16,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u32,
    opt: Option<(u32, u64)>,
    /// Bytes of the L3 packet beyond the TCP header (a SYN with data: TCP Fast Open).
    payload: bool,
}

/// Whether the packet starts with an Ethernet header: the device's L3 protocol equals the
/// ethertype at byte 12 and the network header the kernel found is the one 14 bytes in
/// (an L3 device — tun, WireGuard, ipip, gre — has no link header: nothing is read there).
fn ethernet(ctx: &TcContext, proto: u16) -> bool {
    if u16::from_be(ctx.skb.protocol() as u16) != proto {
        return false;
    }
    let mut net = [0u8; 8];
    // SAFETY: the buffer lives on our stack, 8 bytes long.
    let rc = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes_relative(
            ctx.skb.skb as *const _,
            0,
            net.as_mut_ptr() as *mut core::ffi::c_void,
            8,
            aya_ebpf::bindings::bpf_hdr_start_off::BPF_HDR_START_NET,
        )
    };
    let here: Result<[u8; 8], _> = ctx.load(ETH_HLEN);
    rc == 0 && here.is_ok_and(|h| h == net)
}

fn parse(ctx: &TcContext) -> Option<Seg> {
    let proto: u16 = u16::from_be(ctx.load(12).ok()?);
    if !ethernet(ctx, proto) {
        return None;
    }
    let (src, dst, family, l4, l3_len) = if proto == ETH_P_IP {
        let vhl: u8 = ctx.load(ETH_HLEN).ok()?;
        let p: u8 = ctx.load(ETH_HLEN + 9).ok()?;
        if p != IPPROTO_TCP {
            return None;
        }
        // A fragment (more fragments, or an offset) is never marked: its TCP header and
        // options may be incomplete; netfilter sees it reassembled, unmarked.
        let frag: u16 = u16::from_be(ctx.load(ETH_HLEN + 6).ok()?);
        if frag & 0x3fff != 0 {
            return None;
        }
        let s: u32 = ctx.load(ETH_HLEN + 12).ok()?;
        let d: u32 = ctx.load(ETH_HLEN + 16).ok()?;
        let total: u16 = u16::from_be(ctx.load(ETH_HLEN + 2).ok()?);
        let ihl = ((vhl & 0x0f) as usize) * 4;
        (
            [s, 0, 0, 0],
            [d, 0, 0, 0],
            AF_INET,
            ETH_HLEN + ihl,
            (total as usize).saturating_sub(ihl),
        )
    } else if proto == ETH_P_IPV6 {
        // Extension headers (fragments among them) are never parsed: not marked.
        let next: u8 = ctx.load(ETH_HLEN + 6).ok()?;
        if next != IPPROTO_TCP {
            return None;
        }
        let s: [u32; 4] = ctx.load(ETH_HLEN + 8).ok()?;
        let d: [u32; 4] = ctx.load(ETH_HLEN + 24).ok()?;
        let plen: u16 = u16::from_be(ctx.load(ETH_HLEN + 4).ok()?);
        (s, d, AF_INET6, ETH_HLEN + 40, plen as usize)
    } else {
        return None;
    };
    let sport = u16::from_be(ctx.load(l4).ok()?);
    let dport = u16::from_be(ctx.load(l4 + 2).ok()?);
    let seq = u32::from_be(ctx.load(l4 + 4).ok()?);
    let ack = u32::from_be(ctx.load(l4 + 8).ok()?);
    let off: u8 = ctx.load(l4 + 12).ok()?;
    let flags: u8 = ctx.load(l4 + 13).ok()?;
    let opt_len = ((off >> 4) as usize * 4).saturating_sub(20);
    // 64 bytes, the length masked to 6 bits after a volatile read: the verifier then
    // knows the helper's length is within the buffer, whatever the compiler did with the
    // arithmetic before.
    let mut opts = [0u8; 64];
    let opt_len = opt_len as u32;
    // SAFETY: a read of a local.
    let opt_len = (unsafe { core::ptr::read_volatile(&opt_len) } & 0x3f) as usize;
    let opt = if opt_len >= FAST_OPT_LEN as usize {
        // SAFETY: the buffer lives on our stack; `opt_len` is within its 64 bytes.
        let rc = unsafe {
            aya_ebpf::helpers::bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                (l4 + 20) as u32,
                opts.as_mut_ptr() as *mut core::ffi::c_void,
                opt_len as u32,
            )
        };
        if rc != 0 {
            return None;
        }
        find_option_in(&opts, opt_len)
    } else {
        None
    };
    Some(Seg {
        src,
        dst,
        family,
        sport,
        dport,
        seq,
        ack,
        flags: flags as u32,
        opt,
        payload: l3_len > (off >> 4) as usize * 4,
    })
}

fn set_mark(ctx: &TcContext, bits: u32) {
    // SAFETY: reading the context's mark.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | bits);
}

/// Clears the fast and proven bits whoever set them (another tc or XDP program, a mark
/// carried over a same-namespace veth): only this program's verdict sets them here.
fn clear_bits(ctx: &TcContext, s: &FastSettings) {
    // SAFETY: reading the context's mark.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let bits = s.fast_bit | s.proven_bit;
    if mark & bits != 0 {
        ctx.set_mark(mark & !bits);
    }
}

/// tc ingress on the host's interfaces: the fast path's proofs, before netfilter.
#[classifier]
pub fn verify_fast(ctx: TcContext) -> i32 {
    let Some(s) = settings() else {
        return TC_ACT_OK as i32;
    };
    clear_bits(&ctx, &s);
    let Some(seg) = parse(&ctx) else {
        return TC_ACT_OK as i32;
    };
    let syn = seg.flags & TCP_FLAG_SYN != 0;
    let ackf = seg.flags & TCP_FLAG_ACK != 0;
    if seg.flags & TCP_FLAG_RST != 0 {
        // A reset for a connection whose SYN we tagged: the server has no key for it (it
        // restarted, or the key expired there). Forget ours: the next connection takes the
        // full handshake.
        let t = FastTuple {
            local: seg.dst,
            remote: seg.src,
            local_port: seg.dport,
            remote_port: seg.sport,
            family: seg.family,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        if let Some(mut p) = unsafe { FAST_PENDING.get(&t) }.copied()
            && p.fallback == 0
            && seg.ack == p.client_isn.wrapping_add(1)
        {
            // The reset never reaches the socket, which retransmits its SYN by the full
            // handshake (`client_segment`): a connection is delayed, not refused.
            let _ = FAST_CLIENT.remove(&p.client);
            let _ = FAST_NOFAST.insert(&p.client, &p.key.expires_ns, 0);
            p.fallback = 1;
            let _ = FAST_PENDING.insert(&t, &p, 0);
            return TC_ACT_SHOT as i32;
        }
        return TC_ACT_OK as i32;
    }
    if syn && ackf {
        // Client end: the answer to a SYN we tagged must carry the server's tag.
        let t = FastTuple {
            local: seg.dst,
            remote: seg.src,
            local_port: seg.dport,
            remote_port: seg.sport,
            family: seg.family,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        let Some(p) = (unsafe { FAST_PENDING.get(&t) }).copied() else {
            return TC_ACT_OK as i32;
        };
        let ok = match seg.opt {
            Some((key_id, tag))
                if key_id == p.key.key_id && seg.ack == p.client_isn.wrapping_add(1) =>
            {
                let input = TagInput {
                    label: LABEL_SYNACK,
                    epoch: p.key.epoch,
                    key_id,
                    client: seg.dst,
                    server: seg.src,
                    client_port: seg.dport,
                    server_port: seg.sport,
                    family: seg.family,
                    client_isn: p.client_isn,
                    server_isn: seg.seq,
                };
                input.tag(&p.key.secret) == tag
            }
            _ => false,
        };
        if ok {
            count(STAT_SYNACK_OK);
            set_mark(&ctx, s.fast_bit);
            return TC_ACT_OK as i32;
        }
        // Not proven: dropped (the engine holds no state for this connection; mangle
        // PREROUTING would drop it too). Only an answer to our SYN (its ack) forgets the
        // key: an off-path SYN-ACK with any other ack costs nothing. An untagged answer
        // (a syncookie, a listener older than the fast path, a key revoked or expired
        // there meanwhile) is a server that cannot take this fast SYN: as for its reset,
        // the socket's SYN retransmission takes the full handshake.
        count(STAT_SYNACK_DROPPED);
        if seg.ack == p.client_isn.wrapping_add(1) {
            let _ = FAST_CLIENT.remove(&p.client);
            if seg.opt.is_none() && p.fallback == 0 {
                let _ = FAST_NOFAST.insert(&p.client, &p.key.expires_ns, 0);
                let mut p = p;
                p.fallback = 1;
                let _ = FAST_PENDING.insert(&t, &p, 0);
            }
        }
        return TC_ACT_SHOT as i32;
    }
    let Some((key_id, tag)) = seg.opt else {
        return TC_ACT_OK as i32;
    };
    // Server end: a SYN or the client's first segments.
    // SAFETY: copied out at once.
    let Some(e) = (unsafe { FAST_SERVER.get(&key_id) }).copied() else {
        count(STAT_FAILED);
        return TC_ACT_OK as i32;
    };
    if e.key.expires_ns <= now()
        || e.family != seg.family
        || e.server_port != seg.dport
        || e.client != seg.src
    {
        count(STAT_FAILED);
        return TC_ACT_OK as i32;
    }
    if syn && unsafe { FAST_LISTENERS.get(&seg.dport) }.is_none() {
        // Its listener cannot tag the SYN-ACK (opened before the fast path ran).
        count(STAT_FAILED);
        return TC_ACT_OK as i32;
    }
    let mut input = TagInput {
        label: LABEL_SYN,
        epoch: e.key.epoch,
        key_id,
        client: seg.src,
        server: seg.dst,
        client_port: seg.sport,
        server_port: seg.dport,
        family: seg.family,
        client_isn: seg.seq,
        server_isn: 0,
    };
    let t = FastTuple {
        local: seg.dst,
        remote: seg.src,
        local_port: seg.dport,
        remote_port: seg.sport,
        family: seg.family,
        _pad: 0,
    };
    let bit = if syn {
        if seg.payload {
            // A SYN with data (TCP Fast Open): the tag does not cover it; a replayed SYN
            // must not deliver data of its own. Left to the queues.
            count(STAT_FAILED);
            return TC_ACT_OK as i32;
        }
        s.fast_bit
    } else if ackf {
        // Only over the ISNs of the SYN-ACK this host sent for the 4-tuple.
        // SAFETY: copied out at once.
        let Some([client_isn, server_isn, synack_id]) = (unsafe { FAST_SYNACKS.get(&t) }).copied()
        else {
            return TC_ACT_OK as i32;
        };
        if synack_id != key_id
            || seg.seq != client_isn.wrapping_add(1)
            || seg.ack != server_isn.wrapping_add(1)
        {
            count(STAT_FAILED);
            return TC_ACT_OK as i32;
        }
        input.label = LABEL_ACK;
        input.client_isn = client_isn;
        input.server_isn = server_isn;
        s.proven_bit
    } else {
        return TC_ACT_OK as i32;
    };
    if input.tag(&e.key.secret) == tag {
        // (the server's entry stays until its socket is established: `track_connect`
        // takes it then, for the connection's record)
        count(if syn { STAT_SYN_OK } else { STAT_ACK_OK });
        if syn {
            // For the listener's sock_ops: this SYN, and only it, gets a tagged SYN-ACK.
            let _ = FAST_VERIFIED.insert(&t, &[seg.seq, key_id], 0);
        }
        set_mark(&ctx, bit);
    } else {
        count(STAT_FAILED);
    }
    TC_ACT_OK as i32
}
