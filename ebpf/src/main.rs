//! Tessera's eBPF programs.
//!
//! * `capture_connect4` / `capture_connect6` (cgroup/connect4, cgroup/connect6), attached to
//!   each enrolled workload's cgroup: rewrite a TCP connect() to the local proxy's outbound
//!   listener and remember the original destination and the caller, keyed by socket cookie.
//!   The rewrite happens only if the socket listening there is the proxy's own (it carries
//!   the proxy's mark, which an unprivileged process cannot set): while the proxy is down,
//!   or if anyone else listens on its port, the connect fails (EPERM) and nothing is
//!   recorded. A workload's connection can never reach another local listener in plaintext.
//!   In handshake mode they leave the destination alone and mark the socket instead, so that
//!   iptables queues the connection's handshake packets to the enforcer.
//! * `track_connect` (sock_ops), attached to the same cgroups: at TCP_CONNECT_CB the source
//!   port is known, so the record is re-keyed by the client's (address, port), which is what
//!   the proxy sees after accept(): one map lookup finds it. In handshake mode it also asks
//!   for state callbacks on established connections and reports each one's close, with its
//!   byte counts, in the `TESSERA_CLOSED` ring buffer (flow records, live-connection watch).
//! * `steer_inbound` (sk_lookup), attached to the host's network namespace: a connection to a
//!   protected port that is not one of the proxy's own deliveries (registered by the proxy in
//!   `TESSERA_DELIVERY` by its bound source address and port, which only the proxy holds) is
//!   handed to the proxy's inbound listener, never to the application. With no listener it
//!   is dropped. A source address proves nothing: any local user can send from 127.0.0.77 or
//!   ::1. In handshake mode (iptables guards what arrives from other hosts) it guards the
//!   connections made on this host (arriving on `lo`): only registered deliveries pass.
//! * `guard_setsockopt` (cgroup/setsockopt), attached to each enrolled workload's cgroup:
//!   refuses (EPERM) the options that would let a privileged workload forge what the
//!   programs and the host trust: `SO_MARK` (the proxy's mark exempts a socket from capture
//!   and marks its listener as the proxy's), `IP_HDRINCL`/`IPV6_HDRINCL` (hand-made headers)
//!   and `IP_TRANSPARENT`/`IPV6_TRANSPARENT` (foreign source addresses). The proxy and the
//!   enforcer run outside enrolled cgroups, and marks set by eBPF (`bpf_setsockopt`) do not
//!   pass through this hook.
//! * `guard_sock_create` (cgroup/sock_create): an enrolled workload may not open a raw IP
//!   socket, except an ICMP one (raw or ping socket) when some `icmp` rule allows it
//!   something. Where its packets may go is `guard_egress`'s to decide.
//! * `guard_egress` / `guard_ingress` (cgroup_skb egress/ingress): every IP packet an
//!   enrolled workload's sockets send or receive that is not TCP (TCP is the connect hooks'
//!   and the proxy's) must be allowed by `TESSERA_NONTCP_ALLOW`, which the enforcer computes
//!   from the `udp`/`icmp` rules (networks, resolved names, the configured resolvers).
//!   Received datagrams are also allowed from a peer and port the workload may send to
//!   (replies). A TCP SYN arriving at a workload's socket passes only to a port it declares
//!   or over loopback (undeclared ports are closed to other hosts). Each decision is counted per workload, direction, protocol, peer, port and
//!   verdict in `TESSERA_NONTCP_FLOWS`, which the enforcer drains into flow records.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    mod fast;
    use aya_ebpf::{
        EbpfContext,
        bindings::{
            BPF_F_CURRENT_NETNS, bpf_sock_addr, bpf_sock_tuple,
            bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
            sk_action,
        },
        helpers::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id,
            bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_netns_cookie,
            bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_setsockopt, bpf_sk_lookup_tcp,
            bpf_sk_release, bpf_skb_ancestor_cgroup_id,
        },
        macros::{
            cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sock_ops,
        },
        maps::{Array, HashMap, LpmTrie, LruHashMap, RingBuf, SockMap, lpm_trie::Key as LpmKey},
        programs::{
            SkBuffContext, SkLookupContext, SockAddrContext, SockContext, SockOpsContext,
            SockoptContext,
        },
    };
    use tessera_common::{
        ADOPTED_NETNS_ENTRIES, AF_INET, AF_INET6, CLOSED_RING_BYTES, ClientKey, ClosedConn,
        DELIVERY_ENTRIES, DeliveryKey, FIN_WAIT2_ENTRIES, INBOUND_LISTENER_V4, INBOUND_LISTENER_V6,
        MODE_HANDSHAKE, ORIG_MAP_ENTRIES, OrigDst, PROTECTED_PORT_ENTRIES, Settings,
    };
    use tessera_common::{
        DIR_EGRESS, DIR_INGRESS, NONTCP_ALLOW_ENTRIES, NONTCP_FLOW_ENTRIES, NONTCP_KEY_FIXED_BITS,
        NONTCP_WORKLOAD_ENTRIES, NonTcpAllow, NonTcpFlowCount, NonTcpFlowKey, NonTcpKey,
        PROTO_ICMP, PROTO_ICMPV6, PROTO_RAW, PROTO_UDP, VERDICT_ALLOWED, VERDICT_DENIED,
        VERDICT_OBSERVED, WL_EXEMPT, WL_ICMP, WL_OBSERVE,
    };

    const IPPROTO_TCP: u32 = 6;
    pub(super) const SOL_SOCKET: i32 = 1;
    pub(super) const SO_MARK: i32 = 36;
    const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
    const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
    const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
    const BPF_SOCK_OPS_STATE_CB: u32 = 10;
    const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 1 << 2;
    const TCP_CLOSE: u32 = 7;
    const TCP_FIN_WAIT2: u32 = 5;
    const BPF_RB_NO_WAKEUP: u64 = 1;
    /// 127.0.0.1 in network byte order, as it sits in the u32 the kernel hands us.
    const LOOPBACK4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
    /// ::1 and ::ffff:0:0/96 words, network byte order.
    const V6_LOOPBACK_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);
    const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    #[map(name = "TESSERA_SETTINGS")]
    static SETTINGS: Array<Settings> = Array::pinned(1, 0);

    /// The cookie of the network namespace the enforcer serves (0: not written yet). An
    /// enrolled workload's connect from any other namespace (a container with a network of
    /// its own) is refused: its packets would meet neither the proxy nor the handshake's
    /// rules, which live in this one.
    #[map(name = "TESSERA_HOST_NETNS")]
    static HOST_NETNS: Array<u64> = Array::pinned(1, 0);

    /// Network namespaces of enrolled workloads with a network of their own (pods,
    /// containers) where the enforcer keeps an outbound listener (key: the namespace's
    /// cookie; value unused). Tunnel mode only: their connects are captured there like the
    /// host's.
    #[map(name = "TESSERA_ADOPTED_NETNS")]
    static ADOPTED_NETNS: HashMap<u64, u32> = HashMap::pinned(ADOPTED_NETNS_ENTRIES, 0);

    #[map(name = "TESSERA_COOKIE_ORIG")]
    static COOKIE_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_MAP_ENTRIES, 0);

    #[map(name = "TESSERA_CLIENT_ORIG")]
    static CLIENT_ORIG: LruHashMap<ClientKey, OrigDst> = LruHashMap::pinned(ORIG_MAP_ENTRIES, 0);

    /// Local TCP ports whose listeners only the proxy may reach from outside. Value unused.
    #[map(name = "TESSERA_PROTECTED_PORTS")]
    static PROTECTED_PORTS: HashMap<u32, u32> = HashMap::pinned(PROTECTED_PORT_ENTRIES, 0);

    /// The proxy's deliveries being connected (see [`DeliveryKey`]); value unused.
    #[map(name = "TESSERA_DELIVERY")]
    static DELIVERY: HashMap<DeliveryKey, u32> = HashMap::pinned(DELIVERY_ENTRIES, 0);

    #[map(name = "TESSERA_INBOUND_LISTENER")]
    static INBOUND_LISTENER: SockMap = SockMap::pinned(2, 0);

    /// Connections that closed (handshake mode), for the enforcer to finish their records.
    #[map(name = "TESSERA_CLOSED")]
    static CLOSED: RingBuf = RingBuf::pinned(CLOSED_RING_BYTES, 0);

    /// `bytes_received` of sockets as they entered FIN_WAIT2, by socket cookie: whether the
    /// peer's FIN is in the count at close depends on what happened since.
    #[map(name = "TESSERA_FIN_WAIT2")]
    static FIN_WAIT2: LruHashMap<u64, u64> = LruHashMap::pinned(FIN_WAIT2_ENTRIES, 0);

    /// Whether the connecting socket is in a network namespace the enforcer does not serve:
    /// neither its own nor (tunnel mode) one it adopted, where its listener waits.
    fn foreign_netns(ctx: &SockAddrContext, tunnel: bool) -> bool {
        let want = HOST_NETNS.get(0).copied().unwrap_or(0);
        if want == 0 {
            return false;
        }
        // SAFETY: bpf_get_netns_cookie is allowed in cgroup/connect programs, on their context.
        let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) };
        // SAFETY: lookup in a plain hash map.
        cookie != want && !(tunnel && unsafe { ADOPTED_NETNS.get(&cookie) }.is_some())
    }

    /// Whether the calling process is exempt from capture (`WL_EXEMPT`: the enforcer, a
    /// node agent), though under an enrolled cgroup.
    fn exempt_current() -> bool {
        // SAFETY: a helper with a plain integer argument, valid in cgroup programs.
        enrolled(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) }).1 & WL_EXEMPT != 0
    }

    /// Connect hooks return 1 to let connect() proceed (with the address we may have
    /// rewritten); 0 would fail it with EPERM.
    const CONNECT_PROCEED: i32 = 1;

    fn settings() -> Option<Settings> {
        let settings = *SETTINGS.get(0)?;
        if settings.ready == 1 {
            Some(settings)
        } else {
            None
        }
    }

    /// Whether this socket belongs to the proxy itself: it carries the proxy's mark (which
    /// `guard_setsockopt` forbids enrolled workloads to set) *and* the enforcer's own
    /// process calls connect() (a pid a workload cannot take while the enforcer lives).
    fn is_proxy_socket(sa: *mut bpf_sock_addr, settings: &Settings) -> bool {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if settings.proxy_tgid == 0 || tgid != settings.proxy_tgid {
            return false;
        }
        // SAFETY: `sk` is a valid socket pointer for cgroup/connect programs.
        unsafe {
            let sk = (*sa).__bindgen_anon_1.sk;
            !sk.is_null() && (*sk).mark == settings.proxy_mark
        }
    }

    /// Handshake mode: the connect goes ahead unchanged, its socket marked so that iptables
    /// hands its handshake packets to the enforcer. Without the mark the connection would
    /// leave unauthenticated, so a failure fails the connect.
    /// A caller holding a live pair secret for the destination takes the fast path
    /// instead (`fast`): its socket gets the fast mark, which no queueing rule matches.
    fn mark_for_handshake(
        ctx: &SockAddrContext,
        settings: &Settings,
        addr: [u32; 4],
        port: u16,
        family: u16,
    ) -> i32 {
        let mut mark =
            fast::client_mark(ctx, addr, port, family).unwrap_or(settings.handshake_mark);
        // SAFETY: bpf_setsockopt(SOL_SOCKET, SO_MARK) is allowed in cgroup/connect hooks;
        // the option value is a live u32 on our stack.
        let rc = unsafe {
            bpf_setsockopt(
                ctx.as_ptr(),
                SOL_SOCKET,
                SO_MARK,
                &mut mark as *mut u32 as *mut core::ffi::c_void,
                4,
            )
        };
        if rc == 0 { CONNECT_PROCEED } else { 0 }
    }

    const TCP_LISTEN: u32 = 10;

    /// Whether the socket that would accept a connection to the proxy's outbound port at
    /// `tuple`'s destination is the proxy's own listener: a listening socket with the
    /// proxy's mark (setting SO_MARK needs CAP_NET_ADMIN). Anyone else's listener there, or
    /// none, and the captured connect must fail.
    fn proxy_listens(
        ctx: &SockAddrContext,
        tuple: &mut bpf_sock_tuple,
        size: usize,
        settings: &Settings,
    ) -> bool {
        // SAFETY: bpf_sk_lookup_tcp is allowed in cgroup/connect programs; the tuple lives
        // on our stack; every socket it returns is released below.
        unsafe {
            let sk = bpf_sk_lookup_tcp(
                ctx.as_ptr(),
                tuple as *mut bpf_sock_tuple,
                size as u32,
                BPF_F_CURRENT_NETNS as u64,
                0,
            );
            if sk.is_null() {
                return false;
            }
            let ours = (*sk).state == TCP_LISTEN && (*sk).mark == settings.proxy_mark;
            bpf_sk_release(sk as *mut core::ffi::c_void);
            ours
        }
    }

    /// [`proxy_listens`] on 127.0.0.1.
    fn proxy_listens4(ctx: &SockAddrContext, settings: &Settings) -> bool {
        let mut tuple = bpf_sock_tuple {
            __bindgen_anon_1: aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1 {
                ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                    saddr: LOOPBACK4_BE,
                    daddr: LOOPBACK4_BE,
                    sport: 0,
                    dport: settings.outbound_port.to_be(),
                },
            },
        };
        let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>();
        proxy_listens(ctx, &mut tuple, size, settings)
    }

    /// [`proxy_listens`] on ::1.
    fn proxy_listens6(ctx: &SockAddrContext, settings: &Settings) -> bool {
        let loopback = [0, 0, 0, V6_LOOPBACK_LAST];
        let mut tuple = bpf_sock_tuple {
            __bindgen_anon_1: aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1 {
                ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                    saddr: loopback,
                    daddr: loopback,
                    sport: 0,
                    dport: settings.outbound_port.to_be(),
                },
            },
        };
        let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>();
        proxy_listens(ctx, &mut tuple, size, settings)
    }

    fn record(ctx: &SockAddrContext, addr: [u32; 4], port: u16, family: u16) -> bool {
        // SAFETY: plain helper calls valid in cgroup/connect programs.
        let (cookie, pid_tgid, uid_gid, cgroup_id) = unsafe {
            (
                bpf_get_socket_cookie(ctx.as_ptr()),
                bpf_get_current_pid_tgid(),
                bpf_get_current_uid_gid(),
                bpf_get_current_cgroup_id(),
            )
        };
        let orig = OrigDst {
            addr,
            port,
            family,
            pid: (pid_tgid >> 32) as u32,
            uid: uid_gid as u32,
            cgroup_id,
        };
        COOKIE_ORIG.insert(cookie, orig, 0).is_ok()
    }

    #[cgroup_sock_addr(connect4)]
    pub fn capture_connect4(ctx: SockAddrContext) -> i32 {
        let sa = ctx.sock_addr;
        let Some(settings) = settings() else {
            return CONNECT_PROCEED;
        };
        // SAFETY: reading and writing the connect4 context fields the verifier allows.
        unsafe {
            if (*sa).protocol != IPPROTO_TCP || is_proxy_socket(sa, &settings) || exempt_current() {
                return CONNECT_PROCEED;
            }
            let ip = (*sa).user_ip4;
            // Host-local destinations (127.0.0.0/8) stay local.
            if ip.to_ne_bytes()[0] == 127 {
                return CONNECT_PROCEED;
            }
            if foreign_netns(&ctx, settings.mode != MODE_HANDSHAKE) {
                return 0;
            }
            let port = u16::from_be((*sa).user_port as u16);
            let tunnel = settings.mode != MODE_HANDSHAKE;
            if tunnel && !proxy_listens4(&ctx, &settings) {
                // Nobody, or not the proxy, listens where we would send it: fail closed.
                return 0;
            }
            if !record(&ctx, [ip, 0, 0, 0], port, AF_INET) {
                // Without a record the proxy could not route it: fail closed.
                return 0;
            }
            if !tunnel {
                return mark_for_handshake(&ctx, &settings, [ip, 0, 0, 0], port, AF_INET);
            }
            (*sa).user_ip4 = LOOPBACK4_BE;
            (*sa).user_port = u32::from(settings.outbound_port.to_be());
        }
        CONNECT_PROCEED
    }

    #[cgroup_sock_addr(connect6)]
    pub fn capture_connect6(ctx: SockAddrContext) -> i32 {
        let sa = ctx.sock_addr;
        let Some(settings) = settings() else {
            return CONNECT_PROCEED;
        };
        // SAFETY: reading and writing the connect6 context fields the verifier allows.
        unsafe {
            if (*sa).protocol != IPPROTO_TCP || is_proxy_socket(sa, &settings) || exempt_current() {
                return CONNECT_PROCEED;
            }
            let ip = [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ];
            let port = u16::from_be((*sa).user_port as u16);
            let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX;
            if mapped {
                // A dual-stack socket connecting to an IPv4 peer.
                if ip[3].to_ne_bytes()[0] == 127 {
                    return CONNECT_PROCEED;
                }
                if foreign_netns(&ctx, settings.mode != MODE_HANDSHAKE) {
                    return 0;
                }
                let tunnel = settings.mode != MODE_HANDSHAKE;
                // It will reach the IPv4 listener (as ::ffff:127.0.0.1).
                if tunnel && !proxy_listens4(&ctx, &settings) {
                    return 0;
                }
                if !record(&ctx, [ip[3], 0, 0, 0], port, AF_INET) {
                    return 0;
                }
                if !tunnel {
                    return mark_for_handshake(&ctx, &settings, [ip[3], 0, 0, 0], port, AF_INET);
                }
                (*sa).user_ip6[3] = LOOPBACK4_BE;
            } else {
                if ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == V6_LOOPBACK_LAST {
                    return CONNECT_PROCEED;
                }
                if foreign_netns(&ctx, settings.mode != MODE_HANDSHAKE) {
                    return 0;
                }
                let tunnel = settings.mode != MODE_HANDSHAKE;
                if tunnel && !proxy_listens6(&ctx, &settings) {
                    return 0;
                }
                if !record(&ctx, ip, port, AF_INET6) {
                    return 0;
                }
                if !tunnel {
                    return mark_for_handshake(&ctx, &settings, ip, port, AF_INET6);
                }
                (*sa).user_ip6[0] = 0;
                (*sa).user_ip6[1] = 0;
                (*sa).user_ip6[2] = 0;
                (*sa).user_ip6[3] = V6_LOOPBACK_LAST;
            }
            (*sa).user_port = u32::from(settings.outbound_port.to_be());
        }
        CONNECT_PROCEED
    }

    /// An IPv4-mapped IPv6 address as IPv4 (`[v4, 0, 0, 0]`, AF_INET); others unchanged.
    fn unmapped(ip: [u32; 4]) -> ([u32; 4], u16) {
        if ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX {
            ([ip[3], 0, 0, 0], AF_INET)
        } else {
            (ip, AF_INET6)
        }
    }

    /// Handshake mode: established connections of enrolled workloads report their close.
    fn watch_close(ctx: &SockOpsContext) -> u32 {
        match ctx.op() {
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
                let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG);
            }
            BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
                // An accepted socket inherits its listener's flags: it writes no options
                // (the fast path's SYN-ACK tag is the listener's).
                let flags = (ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG)
                    & !fast::WRITE_HDR_OPT_CB_FLAG;
                let _ = ctx.set_cb_flags(flags);
            }
            BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_FIN_WAIT2 => {
                // SAFETY: a state callback runs on a full TCP socket.
                let received = unsafe { (*ctx.ops).bytes_received };
                // SAFETY: valid helper for sock_ops programs.
                let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
                let _ = FIN_WAIT2.insert(&cookie, &received, 0);
            }
            BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
                // SAFETY: valid helper for sock_ops programs.
                let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
                // SAFETY: the value is copied out before the entry is removed.
                let received_at_fin_wait2 = match unsafe { FIN_WAIT2.get(&cookie) } {
                    Some(v) => {
                        let v = *v;
                        let _ = FIN_WAIT2.remove(&cookie);
                        v
                    }
                    None => u64::MAX,
                };
                let (local, remote, family) = if ctx.family() == u32::from(AF_INET) {
                    (
                        [ctx.local_ip4(), 0, 0, 0],
                        [ctx.remote_ip4(), 0, 0, 0],
                        AF_INET,
                    )
                } else {
                    let (l, family) = unmapped(ctx.local_ip6());
                    (l, unmapped(ctx.remote_ip6()).0, family)
                };
                // SAFETY: a state callback runs on a full TCP socket; these fields are
                // readable from any sock_ops program.
                let (bytes_acked, bytes_received) =
                    unsafe { ((*ctx.ops).bytes_acked, (*ctx.ops).bytes_received) };
                let closed = ClosedConn {
                    local,
                    remote,
                    local_port: ctx.local_port() as u16,
                    // The remote port comes in network byte order in the upper half (the
                    // kernel shifts it there on little-endian machines).
                    remote_port: u16::from_be((ctx.remote_port() >> 16) as u16),
                    family,
                    old_state: ctx.arg(0) as u16,
                    bytes_acked,
                    bytes_received,
                    // SAFETY: a helper without arguments.
                    at_ns: unsafe { bpf_ktime_get_ns() },
                    received_at_fin_wait2,
                };
                // A full ring drops the event; the enforcer's periodic sweep finds the
                // connection gone and records it without byte counts.
                // No wake-up per record: the enforcer drains the ring on an interval.
                let _ = CLOSED.output::<ClosedConn>(&closed, BPF_RB_NO_WAKEUP);
            }
            _ => {}
        }
        1
    }

    #[sock_ops]
    pub fn track_connect(ctx: SockOpsContext) -> u32 {
        let handshake = settings().is_some_and(|s| s.mode == MODE_HANDSHAKE);
        if handshake && fast::sock_ops(&ctx, ctx.op()) {
            return 1;
        }
        if handshake && ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
            return watch_close(&ctx);
        }
        if ctx.op() == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == TCP_CLOSE {
            // A captured connection closed: its record, if the proxy did not take it.
            let _ = CLIENT_ORIG.remove(&client_key(&ctx));
            return 1;
        }
        if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
            return 1;
        }
        // SAFETY: valid helper for sock_ops programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: the value is copied out before the entry is removed.
        let Some(orig) = (unsafe { COOKIE_ORIG.get(&cookie) }).copied() else {
            return 1;
        };
        let key = client_key(&ctx);
        let _ = CLIENT_ORIG.insert(&key, &orig, 0);
        let _ = COOKIE_ORIG.remove(&cookie);
        // Its record must not outlive it: the close callback forgets it (a record left by
        // a connection the proxy never accepted could otherwise be claimed by whoever
        // connects from the same address and port later).
        let _ = ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG);
        1
    }

    /// The capture-record key of a connecting socket: its local address and port, an
    /// IPv4-mapped address as IPv4 (what the proxy sees after accept()).
    fn client_key(ctx: &SockOpsContext) -> ClientKey {
        let family = ctx.family() as u16;
        let addr = if u32::from(family) == u32::from(AF_INET) {
            [ctx.local_ip4(), 0, 0, 0]
        } else {
            let ip = ctx.local_ip6();
            if ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX {
                [ip[3], 0, 0, 0]
            } else {
                ip
            }
        };
        let family = if addr[1] == 0
            && addr[2] == 0
            && addr[3] == 0
            && family == AF_INET6
            && ctx.local_ip6()[2] == V4_MAPPED_PREFIX
        {
            AF_INET
        } else {
            family
        };
        ClientKey {
            addr,
            port: ctx.local_port() as u16,
            family,
            _pad: 0,
            // SAFETY: bpf_get_netns_cookie is allowed in sock_ops programs, on their context.
            netns: unsafe { bpf_get_netns_cookie(ctx.ops as *mut _) },
        }
    }

    /// The loopback device's index (1 in every network namespace): what a connection made on
    /// this host arrives on, whichever local address it was sent to.
    const LOOPBACK_IFINDEX: u32 = 1;

    #[sk_lookup]
    pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
        let lookup = ctx.lookup;
        // SAFETY: reading sk_lookup context fields.
        let (protocol, family, local_port, remote4, remote6, remote_port, ifindex) = unsafe {
            (
                (*lookup).protocol,
                (*lookup).family,
                (*lookup).local_port,
                (*lookup).remote_ip4,
                (*lookup).remote_ip6,
                (*lookup).remote_port,
                (*lookup).ingress_ifindex,
            )
        };
        if protocol != IPPROTO_TCP {
            return sk_action::SK_PASS;
        }
        // SAFETY: lookup in a plain hash map.
        if unsafe { PROTECTED_PORTS.get(&local_port) }.is_none() {
            return sk_action::SK_PASS;
        }
        let Some(settings) = settings() else {
            return sk_action::SK_DROP;
        };
        // Handshake mode: what comes from other hosts is iptables' to guard.
        if settings.mode == MODE_HANDSHAKE && ifindex != LOOPBACK_IFINDEX {
            return sk_action::SK_PASS;
        }
        let (addr, index) = if family == u32::from(AF_INET) {
            ([remote4, 0, 0, 0], INBOUND_LISTENER_V4)
        } else {
            (remote6, INBOUND_LISTENER_V6)
        };
        let key = DeliveryKey {
            addr,
            family: family as u16,
            port: u16::from_be(remote_port),
            dst_port: local_port as u16,
            _pad: 0,
        };
        // SAFETY: lookup in a plain hash map.
        if unsafe { DELIVERY.get(&key) }.is_some() {
            return sk_action::SK_PASS;
        }
        // Fail closed: a protected port is never reached around the proxy.
        match INBOUND_LISTENER.redirect_sk_lookup(&ctx, index, 0) {
            Ok(()) => sk_action::SK_PASS,
            Err(_) => sk_action::SK_DROP,
        }
    }

    /// `sk_lookup` in the network namespace of a workload with a network of its own: a
    /// protected port there is reached only from a loopback address, which is how the
    /// enforcer delivers what its tunnels carry (and how the workload's own processes talk
    /// to each other); the kernel drops a loopback source arriving on any other interface
    /// as a martian. Anything else addressed to it is refused: it would reach the workload
    /// around the tunnel.
    #[sk_lookup]
    pub fn guard_adopted(ctx: SkLookupContext) -> u32 {
        let lookup = ctx.lookup;
        // SAFETY: reading sk_lookup context fields.
        let (protocol, family, local_port, remote4, remote6) = unsafe {
            (
                (*lookup).protocol,
                (*lookup).family,
                (*lookup).local_port,
                (*lookup).remote_ip4,
                (*lookup).remote_ip6,
            )
        };
        if protocol != IPPROTO_TCP {
            return sk_action::SK_PASS;
        }
        let loopback = if family == u32::from(AF_INET) {
            remote4.to_ne_bytes()[0] == 127
        } else {
            let mapped = remote6[0] == 0 && remote6[1] == 0 && remote6[2] == V4_MAPPED_PREFIX;
            (mapped && remote6[3].to_ne_bytes()[0] == 127)
                || (remote6[0] == 0
                    && remote6[1] == 0
                    && remote6[2] == 0
                    && remote6[3] == V6_LOOPBACK_LAST)
        };
        if loopback {
            return sk_action::SK_PASS;
        }
        // SAFETY: lookup in a plain hash map.
        if unsafe { PROTECTED_PORTS.get(&local_port) }.is_none() {
            return sk_action::SK_PASS;
        }
        sk_action::SK_DROP
    }

    const SOL_IP: i32 = 0;
    const SOL_IPV6: i32 = 41;
    const IP_HDRINCL: i32 = 3;
    const IP_TRANSPARENT: i32 = 19;
    const IPV6_HDRINCL: i32 = 36;
    const IPV6_TRANSPARENT: i32 = 75;
    /// cgroup/setsockopt verdicts: 1 lets the kernel apply the option, 0 fails it (EPERM).
    const SOCKOPT_PROCEED: i32 = 1;
    const SOCKOPT_REFUSE: i32 = 0;

    /// Options an enrolled workload may never set, whatever its capabilities.
    pub(crate) fn forbidden_option(level: i32, optname: i32) -> bool {
        matches!(
            (level, optname),
            (SOL_SOCKET, SO_MARK)
                | (SOL_IP, IP_HDRINCL)
                | (SOL_IP, IP_TRANSPARENT)
                | (SOL_IPV6, IPV6_HDRINCL)
                | (SOL_IPV6, IPV6_TRANSPARENT)
        )
    }

    #[cgroup_sockopt(setsockopt)]
    pub fn guard_setsockopt(ctx: SockoptContext) -> i32 {
        // SAFETY: level and optname are readable in every cgroup/setsockopt program.
        let (level, optname) = unsafe { ((*ctx.sockopt).level, (*ctx.sockopt).optname) };
        if forbidden_option(level, optname) && !exempt_current() {
            SOCKOPT_REFUSE
        } else {
            SOCKOPT_PROCEED
        }
    }

    /// What enrolled workloads may send and receive besides TCP (see `NonTcpKey`).
    #[map(name = "TESSERA_NONTCP_ALLOW")]
    static NONTCP_ALLOW: LpmTrie<NonTcpKey, NonTcpAllow> = LpmTrie::pinned(NONTCP_ALLOW_ENTRIES, 0);

    /// Enrolled workloads by cgroup id: `WL_*` flags. A sub-cgroup of an enrolled one is
    /// that workload's (the deepest enrolled ancestor decides).
    #[map(name = "TESSERA_NONTCP_WORKLOADS")]
    static NONTCP_WORKLOADS: HashMap<u64, u32> = HashMap::pinned(NONTCP_WORKLOAD_ENTRIES, 0);

    /// Non-TCP decisions, counted.
    #[map(name = "TESSERA_NONTCP_FLOWS")]
    static NONTCP_FLOWS: LruHashMap<NonTcpFlowKey, NonTcpFlowCount> =
        LruHashMap::pinned(NONTCP_FLOW_ENTRIES, 0);

    const SOCK_RAW: u32 = 3;
    const IPPROTO_ICMP: u32 = 1;
    const IPPROTO_ICMPV6: u32 = 58;
    const IPPROTO_UDP: u8 = 17;
    const IPPROTO_TCP8: u8 = 6;
    /// cgroup/sock_create and cgroup_skb verdicts.
    const SK_ALLOW: i32 = 1;
    const SK_REFUSE: i32 = 0;
    const NO_RULE: u32 = u32::MAX;

    /// Flags of an enrolled cgroup; `NOT_ENROLLED` for any other. (Sentinels rather than
    /// `Option`s: the payload of a `None` is undefined, and the verifier refuses code that
    /// stores an undefined register.)
    fn workload_flags(cgroup_id: u64) -> u32 {
        // SAFETY: lookup in a plain hash map; the value is copied out.
        match unsafe { NONTCP_WORKLOADS.get(&cgroup_id) } {
            Some(flags) => *flags,
            None => NOT_ENROLLED,
        }
    }

    const NOT_ENROLLED: u32 = u32::MAX;

    /// How deep below the root an enrolled cgroup's descendants are looked for.
    const MAX_CGROUP_DEPTH: i32 = 16;

    /// The enrolled workload a cgroup belongs to (its processes and its sub-cgroups'): the
    /// deepest enrolled cgroup among its ancestors and itself, and its flags; `(0, 0)` if
    /// none. `ancestor(level)` is the id of the ancestor at `level` (0 past the cgroup).
    fn enrolled(ancestor: impl Fn(i32) -> u64) -> (u64, u32) {
        let mut found = (0, 0);
        for level in 1..=MAX_CGROUP_DEPTH {
            let id = ancestor(level);
            if id == 0 {
                break;
            }
            let flags = workload_flags(id);
            if flags != NOT_ENROLLED {
                found = (id, flags);
            }
        }
        found
    }

    /// Adds one packet of `bytes` to the counters of `key`.
    fn count(key: &NonTcpFlowKey, bytes: u64, rule: u32) {
        // SAFETY: a helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        if let Some(c) = NONTCP_FLOWS.get_ptr_mut(key) {
            // SAFETY: `c` points into the map's value. (Plain adds: the BPF target has no
            // atomics in `core`; two CPUs counting the same flow at once may lose a count,
            // which only makes the record's numbers approximate.)
            unsafe {
                (*c).packets += 1;
                (*c).bytes += bytes;
                (*c).last_ns = now;
                (*c).rule = rule;
            }
            return;
        }
        let fresh = NonTcpFlowCount {
            packets: 1,
            bytes,
            rule,
            _pad: 0,
            first_ns: now,
            last_ns: now,
        };
        let _ = NONTCP_FLOWS.insert(key, &fresh, 0);
    }

    #[cgroup_sock(sock_create)]
    pub fn guard_sock_create(ctx: SockContext) -> i32 {
        // SAFETY: type and protocol are readable in cgroup/sock_create programs.
        let (ty, protocol) = unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol) };
        let icmp = protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6;
        if ty != SOCK_RAW && !icmp {
            return SK_ALLOW;
        }
        // SAFETY: a helper with a plain integer argument.
        let (cgroup_id, flags) =
            enrolled(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) });
        if flags & WL_EXEMPT != 0 {
            return SK_ALLOW;
        }
        // Any raw protocol but ICMP could forge what no rule allows: never.
        let allowed = icmp && flags & WL_ICMP != 0;
        let verdict = if allowed {
            VERDICT_ALLOWED
        } else if flags & WL_OBSERVE != 0 {
            VERDICT_OBSERVED
        } else {
            VERDICT_DENIED
        };
        if verdict != VERDICT_ALLOWED {
            let key = NonTcpFlowKey {
                cgroup_id,
                addr: [0; 16],
                port: 0,
                direction: DIR_EGRESS,
                protocol: if icmp { protocol as u8 } else { PROTO_RAW },
                verdict,
                _pad: [0; 3],
            };
            count(&key, 0, NO_RULE);
        }
        if verdict == VERDICT_DENIED {
            SK_REFUSE
        } else {
            SK_ALLOW
        }
    }

    const TCP_SYN: u8 = 0x02;
    const TCP_ACK: u8 = 0x10;

    /// 127.0.0.0/8 (IPv4-mapped), ::1.
    fn is_loopback(addr: &[u8; 16]) -> bool {
        let zero10 = addr[..10].iter().all(|b| *b == 0);
        (zero10 && addr[10] == 0xff && addr[11] == 0xff && addr[12] == 127)
            || (zero10 && addr[10..15].iter().all(|b| *b == 0) && addr[15] == 1)
    }

    /// The parts of an IP packet the guards decide on.
    struct Packet {
        protocol: u8,
        /// A TCP segment with SYN and without ACK: a connection's first packet.
        syn: bool,
        src: [u8; 16],
        dst: [u8; 16],
        sport: u16,
        dport: u16,
    }

    /// Reads the IP header (and the UDP ports) of a packet; `None` for what is not IPv4 or
    /// IPv6, a non-first fragment, or too short.
    fn parse(ctx: &SkBuffContext) -> Option<Packet> {
        let first: u8 = ctx.load(0).ok()?;
        let mut p = Packet {
            protocol: 0,
            syn: false,
            src: [0; 16],
            dst: [0; 16],
            sport: 0,
            dport: 0,
        };
        let l4 = match first >> 4 {
            4 => {
                let ihl = usize::from(first & 0x0f) * 4;
                if ihl < 20 {
                    return None;
                }
                let frag: [u8; 2] = ctx.load(6).ok()?;
                if u16::from_be_bytes(frag) & 0x1fff != 0 {
                    return None;
                }
                p.protocol = ctx.load(9).ok()?;
                let src: [u8; 4] = ctx.load(12).ok()?;
                let dst: [u8; 4] = ctx.load(16).ok()?;
                p.src[10] = 0xff;
                p.src[11] = 0xff;
                p.dst[10] = 0xff;
                p.dst[11] = 0xff;
                p.src[12..].copy_from_slice(&src);
                p.dst[12..].copy_from_slice(&dst);
                ihl
            }
            6 => {
                p.protocol = ctx.load(6).ok()?;
                p.src = ctx.load(8).ok()?;
                p.dst = ctx.load(24).ok()?;
                40
            }
            _ => return None,
        };
        if p.protocol == IPPROTO_UDP || p.protocol == IPPROTO_TCP8 {
            let ports: [u8; 4] = ctx.load(l4).ok()?;
            p.sport = u16::from_be_bytes([ports[0], ports[1]]);
            p.dport = u16::from_be_bytes([ports[2], ports[3]]);
        }
        if p.protocol == IPPROTO_TCP8 {
            let flags: u8 = ctx.load(l4 + 13).ok()?;
            p.syn = flags & TCP_SYN != 0 && flags & TCP_ACK == 0;
        }
        Some(p)
    }

    /// The rule of the allow entry for sending `protocol` to `addr`:`port` (or receiving on
    /// `port` from `addr`), an entry for every port included; `NO_RULE` if none.
    fn allowed(cgroup_id: u64, direction: u8, protocol: u8, port: u16, addr: &[u8; 16]) -> u32 {
        let protocol = if protocol == PROTO_ICMPV6 {
            PROTO_ICMP
        } else {
            protocol
        };
        let mut key = LpmKey::new(
            NONTCP_KEY_FIXED_BITS + 128,
            NonTcpKey {
                cgroup_id: cgroup_id.to_ne_bytes(),
                direction,
                protocol,
                port: port.to_be_bytes(),
                addr: *addr,
            },
        );
        if let Some(a) = NONTCP_ALLOW.get(&key) {
            return a.rule;
        }
        if port == 0 {
            return NO_RULE;
        }
        key.data.port = [0, 0];
        match NONTCP_ALLOW.get(&key) {
            Some(a) => a.rule,
            None => NO_RULE,
        }
    }

    /// The non-TCP guard of an enrolled workload's packets (`direction`: sent or received).
    fn guard(ctx: &SkBuffContext, direction: u8) -> i32 {
        let Some(p) = parse(ctx) else {
            // Not IP, or a fragment past the first: nothing we could decide on.
            return SK_REFUSE;
        };
        let egress = direction == DIR_EGRESS;
        let skb = ctx.skb.skb;
        // TCP is the connect hooks' and the proxy's, except a connection arriving at a
        // workload's listener. Tunnel mode: only over loopback (the proxy's deliveries come
        // from this host, or from inside the workload's own namespace; what comes from
        // elsewhere to a protected port is steered to the proxy before any workload socket
        // sees it, so anything else went around it — a namespace not served yet, say).
        // Handshake mode: on a port it declares (the handshake decides), or from a
        // loopback address (local processes).
        let tunnel = settings().is_some_and(|s| s.mode != MODE_HANDSHAKE);
        if p.protocol == IPPROTO_TCP8 {
            // SAFETY: ifindex is readable in cgroup_skb programs.
            let via_loopback = unsafe { (*skb).ifindex } == LOOPBACK_IFINDEX;
            if egress || !p.syn || (tunnel && via_loopback) || (!tunnel && is_loopback(&p.src)) {
                return SK_ALLOW;
            }
        }
        // SAFETY: a cgroup_skb program's context is an skb.
        let (cgroup_id, flags) =
            enrolled(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) });
        if flags & WL_EXEMPT != 0 {
            return SK_ALLOW;
        }
        let (peer, peer_port, own_port) = if egress {
            (&p.dst, p.dport, p.sport)
        } else {
            (&p.src, p.sport, p.dport)
        };
        let udp_or_icmp =
            p.protocol == PROTO_UDP || p.protocol == PROTO_ICMP || p.protocol == PROTO_ICMPV6;
        if p.protocol == IPPROTO_TCP8 && !tunnel {
            // A connection to a declared port goes ahead unrecorded (the handshake decides
            // it); to any other, it is refused and counted.
            if allowed(cgroup_id, DIR_INGRESS, IPPROTO_TCP8, own_port, peer) != NO_RULE {
                return SK_ALLOW;
            }
        }
        let mut rule = NO_RULE;
        let port = if egress { peer_port } else { own_port };
        if udp_or_icmp {
            rule = allowed(cgroup_id, direction, p.protocol, port, peer);
            if rule == NO_RULE
                && !egress
                && allowed(cgroup_id, DIR_EGRESS, p.protocol, peer_port, peer) != NO_RULE
            {
                // A reply: from a peer and port the workload may send to. Counted with the
                // sending side's flow (it is part of that exchange).
                return SK_ALLOW;
            }
        }
        let verdict = if rule != NO_RULE {
            VERDICT_ALLOWED
        } else if flags & WL_OBSERVE != 0 {
            VERDICT_OBSERVED
        } else {
            VERDICT_DENIED
        };
        let key = NonTcpFlowKey {
            cgroup_id,
            addr: *peer,
            port,
            direction,
            protocol: p.protocol,
            verdict,
            _pad: [0; 3],
        };
        count(&key, u64::from(ctx.len()), rule);
        if verdict == VERDICT_DENIED {
            SK_REFUSE
        } else {
            SK_ALLOW
        }
    }

    #[cgroup_skb(egress)]
    pub fn guard_egress(ctx: SkBuffContext) -> i32 {
        guard(&ctx, DIR_EGRESS)
    }

    #[cgroup_skb(ingress)]
    pub fn guard_ingress(ctx: SkBuffContext) -> i32 {
        guard(&ctx, DIR_INGRESS)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Built for the host only so that workspace-wide `cargo build` works; the real
    // object is built for bpfel-unknown-none by enforcer/build.rs.
}
