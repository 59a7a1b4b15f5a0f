//! Delivering an admitted connection to a local workload, and proving to the inbound guard
//! (`sk_lookup`) that the connection is the proxy's.
//!
//! A source address proves nothing on this host: any local user can connect from 127.0.0.77
//! or ::1. So each delivery socket is bound first (to an address and port that only it then
//! holds: no `SO_REUSEADDR`), registered by that bound address and port and the workload
//! port in the guard's map ([`DeliveryGate`]), connected, and unregistered: the guard lets
//! exactly the registered SYN through.
//!
//! Where the delivery comes from ([`DeliverySource`]):
//! * `OriginalSource` (the default): from the peer's own address (the tunnel's remote
//!   address, which the TCP handshake vouches for, not a header field a peer could choose),
//!   on a transparent socket (`IP_TRANSPARENT`), so the application sees the real peer and
//!   never mistakes it for a local client. The socket carries `mark`, and the enforcer's
//!   routing sends the application's replies back to this host (see
//!   `tessera_enforcer::delivery`).
//! * `Localhost`: from 127.0.0.77 / ::1, as before (the application sees every peer as a
//!   local client: only for applications that trust no source address).
//!
//! A workload with a network namespace of its own (a pod, a container on a bridge) is
//! delivered to inside that namespace ([`Namespaces`]): from its loopback, the one way in
//! that namespace's guard (`guard_adopted`) leaves open to its served ports.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// Where deliveries come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverySource {
    /// The peer's address, on a transparent socket.
    OriginalSource,
    /// This IPv4 loopback address (IPv6: ::1).
    Localhost(Ipv4Addr),
}

/// The inbound guard's list of deliveries being connected.
pub trait DeliveryGate: Send + Sync + 'static {
    /// Lets the SYN from `src` to the local `dst_port` through the guard.
    fn open(&self, src: SocketAddr, dst_port: u16) -> io::Result<()>;
    /// Forgets it (the connection is established or failed).
    fn close(&self, src: SocketAddr, dst_port: u16);
}

/// No guard to tell (in-process tests, which run without eBPF).
pub struct NoGate;

impl DeliveryGate for NoGate {
    fn open(&self, _: SocketAddr, _: u16) -> io::Result<()> {
        Ok(())
    }
    fn close(&self, _: SocketAddr, _: u16) {}
}

/// The network namespaces of local workloads with a network of their own.
pub trait Namespaces: Send + Sync + 'static {
    /// Whether a workload with the address `dst` is served in a namespace of its own (a
    /// cheap check, on the async workers).
    fn serves(&self, dst: IpAddr) -> bool;
    /// A new TCP socket (of `dst`'s family) in the namespace of the workload that has the
    /// address `dst`; `None` if no such workload is served here. May block (the socket is
    /// made by a thread in that namespace).
    fn socket_for(&self, dst: IpAddr) -> Option<io::Result<Socket>>;
    /// A new TCP socket of `domain` in the served namespace with cookie `netns` (a
    /// workload's connection to a destination no enforcer serves leaves from its own
    /// network, never the host's); `None` if that namespace is not served. May block.
    fn socket_in(&self, netns: u64, domain: socket2::Domain) -> Option<io::Result<Socket>>;
}

/// How the proxy connects to local workloads.
#[derive(Clone)]
pub struct Delivery {
    /// Workloads with a network of their own, if any are served.
    pub namespaces: Option<Arc<dyn Namespaces>>,
    pub source: DeliverySource,
    /// `SO_MARK` of delivery sockets (0: none). In original-source mode the enforcer routes
    /// the replies of connections with this mark back to this host.
    pub mark: u32,
    pub gate: Arc<dyn DeliveryGate>,
}

/// Unregisters a delivery however its connect ends.
struct Registered<'a> {
    gate: &'a dyn DeliveryGate,
    src: SocketAddr,
    dst_port: u16,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.gate.close(self.src, self.dst_port);
    }
}

impl Delivery {
    /// The address a delivery to `dst` comes from, for a connection from `peer` (the
    /// peer's address of `dst`'s family, if known), and whether it needs a transparent
    /// socket. Original source without a peer address of that family is an error: never a
    /// loopback address in its place.
    pub fn source_for(&self, peer: Option<IpAddr>, dst: SocketAddr) -> io::Result<(IpAddr, bool)> {
        match self.source {
            DeliverySource::Localhost(v4) => Ok((
                match dst {
                    SocketAddr::V4(_) => IpAddr::V4(v4),
                    SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                },
                false,
            )),
            DeliverySource::OriginalSource => match peer.map(|p| p.to_canonical()) {
                Some(peer) if peer.is_ipv4() == dst.is_ipv4() => Ok((peer, true)),
                _ => Err(io::Error::other(format!(
                    "no address of the peer in {dst}'s family to deliver from (list it as a single \
                     address in the peer's `serves`, or set bpf.delivery = \"localhost\")"
                ))),
            },
        }
    }

    /// A delivery socket for `dst`, not yet bound.
    fn socket(&self, dst: SocketAddr, transparent: bool) -> io::Result<Socket> {
        // Non-blocking from the start (SOCK_NONBLOCK): one system call fewer per delivery.
        let socket = Socket::new(Domain::for_address(dst), Type::STREAM.nonblocking(), None)?;
        if self.mark != 0 {
            socket.set_mark(self.mark)?;
        }
        if transparent {
            match dst {
                SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
                SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
            }
        }
        socket.set_tcp_nodelay(true)?;
        // While this socket holds the address and port nobody else may bind them, or they
        // would pass the guard as this delivery. From the peer's address (original source)
        // that takes IP_TRANSPARENT, which no unprivileged process has, so SO_REUSEADDR is
        // safe there, and needed: it lets ports whose earlier deliveries sit in TIME_WAIT be
        // bound again (thousands of connections a second exhaust the range otherwise).
        // From 127.0.0.77 anyone may bind: no SO_REUSEADDR, so nobody can share the port.
        if transparent {
            socket.set_reuse_address(true)?;
        }
        Ok(socket)
    }

    /// Connects to the local workload at `dst` for a connection from `peer` (its address of
    /// `dst`'s family).
    ///
    /// The source port is chosen here, at random in the host's ephemeral range, and bound
    /// explicitly: the guard needs it before the SYN, and `bind(port 0)` searches the whole
    /// range under the kernel's bind-hash locks, which with thousands of deliveries in
    /// TIME_WAIT cost most of the enforcer's CPU (the tunnel's connection rate halved). A
    /// port that is taken (bound, registered by a concurrent delivery, or a 4-tuple still in
    /// TIME_WAIT) is skipped; after [`PORT_TRIES`] of them the kernel chooses.
    pub async fn connect(
        &self,
        peer: Option<IpAddr>,
        dst: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        if let Some(ns) = self.namespaces.as_ref().filter(|n| n.serves(dst.ip())) {
            let (ns, ip) = (ns.clone(), dst.ip());
            let made = tokio::task::spawn_blocking(move || ns.socket_for(ip))
                .await
                .map_err(io::Error::other)?;
            if let Some(socket) = made {
                return self.connect_in_namespace(socket?, dst, timeout).await;
            }
        }
        let (src, transparent) = self.source_for(peer, dst)?;
        let ports = ports::ephemeral();
        let mut last = None;
        for attempt in 0..=PORT_TRIES {
            let port = if attempt < PORT_TRIES {
                ports.random()
            } else {
                0
            };
            match self
                .connect_from(SocketAddr::new(src, port), transparent, dst, timeout)
                .await
            {
                Err(e) if port != 0 && taken(&e) => last = Some(e),
                done => return done,
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no delivery port")))
    }

    /// Delivers to a workload in a network namespace of its own, over that namespace's
    /// loopback (from 127.0.0.77 or ::1): the namespace's guard lets loopback through and
    /// nothing else to a served port, so no registration is needed, and none is made (the
    /// host's guard must not learn an address and port bound in another namespace).
    async fn connect_in_namespace(
        &self,
        socket: Socket,
        dst: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        // The socket is of the canonical address's family (socket_for's).
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        let src = match (dst, self.source) {
            (SocketAddr::V4(_), DeliverySource::Localhost(v4)) => IpAddr::V4(v4),
            (SocketAddr::V4(_), DeliverySource::OriginalSource) => {
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 77))
            }
            (SocketAddr::V6(_), _) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        if self.mark != 0 {
            socket.set_mark(self.mark)?;
        }
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        socket.bind(&SocketAddr::new(src, 0).into())?;
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        match tokio::time::timeout(timeout, socket.connect(dst)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(io::Error::new(
                e.kind(),
                format!("connect to {dst} in its network namespace: {e}"),
            )),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} in its network namespace timed out"),
            )),
        }
    }

    async fn connect_from(
        &self,
        src: SocketAddr,
        transparent: bool,
        dst: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let socket = self.socket(dst, transparent)?;
        socket.bind(&src.into())?;
        // A chosen port is what was bound; only the kernel's choice must be asked for.
        let bound = if src.port() != 0 {
            src
        } else {
            socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("delivery socket has no address"))?
        };
        self.gate.open(bound, dst.port())?;
        let _registered = Registered {
            gate: self.gate.as_ref(),
            src: bound,
            dst_port: dst.port(),
        };
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        match tokio::time::timeout(timeout, socket.connect(dst)).await {
            Ok(stream) => stream,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} from {bound} timed out"),
            )),
        }
    }
}

/// Random source ports tried before the kernel's own search.
pub const PORT_TRIES: usize = 16;

/// Whether a delivery failed only because its source port was taken.
fn taken(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
    )
}

/// The host's ephemeral port range, without its reserved ports.
mod ports {
    use std::{ops::RangeInclusive, sync::OnceLock};

    pub struct Ephemeral {
        range: RangeInclusive<u16>,
        reserved: Vec<RangeInclusive<u16>>,
    }

    /// Read once from `/proc/sys/net/ipv4` (the enforcer's network namespace; the kernel's
    /// defaults if unreadable).
    pub fn ephemeral() -> &'static Ephemeral {
        static PORTS: OnceLock<Ephemeral> = OnceLock::new();
        PORTS.get_or_init(|| {
            let read = |f: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}"));
            parse(
                &read("ip_local_port_range").unwrap_or_default(),
                &read("ip_local_reserved_ports").unwrap_or_default(),
            )
        })
    }

    pub fn parse(range: &str, reserved: &str) -> Ephemeral {
        let mut bounds = range
            .split_whitespace()
            .filter_map(|p| p.parse::<u16>().ok());
        let range = match (bounds.next(), bounds.next()) {
            (Some(lo), Some(hi)) if 0 < lo && lo <= hi => lo..=hi,
            _ => 32768..=60999,
        };
        let reserved = reserved
            .trim()
            .split(',')
            .filter_map(|r| match r.split_once('-') {
                Some((lo, hi)) => Some(lo.trim().parse().ok()?..=hi.trim().parse().ok()?),
                None => {
                    let p = r.trim().parse().ok()?;
                    Some(p..=p)
                }
            })
            .collect();
        Ephemeral { range, reserved }
    }

    impl Ephemeral {
        /// A port of the range that is not reserved (0 if none could be found).
        pub fn random(&self) -> u16 {
            let span = u32::from(self.range.end() - self.range.start()) + 1;
            for _ in 0..8 {
                let mut b = [0u8; 4];
                if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err()
                {
                    return 0;
                }
                let p = self.range.start() + (u32::from_ne_bytes(b) % span) as u16;
                if !self.reserved.iter().any(|r| r.contains(&p)) {
                    return p;
                }
            }
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records what the gate was told, in order.
    #[derive(Default)]
    struct Recording(Mutex<Vec<(bool, SocketAddr, u16)>>);

    impl DeliveryGate for Recording {
        fn open(&self, src: SocketAddr, dst_port: u16) -> io::Result<()> {
            self.0.lock().unwrap().push((true, src, dst_port));
            Ok(())
        }
        fn close(&self, src: SocketAddr, dst_port: u16) {
            self.0.lock().unwrap().push((false, src, dst_port));
        }
    }

    #[tokio::test]
    async fn a_delivery_is_registered_by_its_bound_address_until_connected() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let gate = Arc::new(Recording::default());
        let delivery = Delivery {
            namespaces: None,
            source: DeliverySource::Localhost(Ipv4Addr::new(127, 0, 0, 77)),
            mark: 0,
            gate: gate.clone(),
        };
        let peer = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
        let stream = delivery
            .connect(peer, dst, Duration::from_secs(5))
            .await
            .unwrap();
        let (_accepted, seen) = listener.accept().await.unwrap();
        assert_eq!(seen, stream.local_addr().unwrap());
        assert_eq!(seen.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 77)));
        let told = gate.0.lock().unwrap().clone();
        assert_eq!(
            told,
            vec![(true, seen, dst.port()), (false, seen, dst.port())]
        );
    }

    #[test]
    fn original_source_is_the_peer_and_never_loopback_in_its_place() {
        let delivery = Delivery {
            namespaces: None,
            source: DeliverySource::OriginalSource,
            mark: 0,
            gate: Arc::new(NoGate),
        };
        let v4dst: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let v6dst: SocketAddr = "[fd00::2]:80".parse().unwrap();
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            delivery.source_for(Some(peer), v4dst).unwrap(),
            (peer, true)
        );
        assert_eq!(
            delivery.source_for(Some(mapped), v4dst).unwrap(),
            (peer, true)
        );
        assert!(delivery.source_for(Some(peer), v6dst).is_err());
        assert!(delivery.source_for(None, v6dst).is_err());
    }

    #[test]
    fn delivery_ports_are_random_in_the_ephemeral_range_and_never_reserved() {
        let ports = ports::parse("1024\t1100\n", "1024-1090,1095\n");
        let seen: std::collections::HashSet<u16> = (0..2_000).map(|_| ports.random()).collect();
        assert!(
            seen.iter()
                .all(|p| (1091..=1100).contains(p) && *p != 1095 || *p == 0)
        );
        // All nine free ports come up (a fixed or sequential choice would not).
        assert_eq!(seen.iter().filter(|p| **p != 0).count(), 9, "{seen:?}");
        // Unreadable or nonsense: the kernel's defaults.
        let d = ports::parse("", "");
        assert!((32768..=60999).contains(&d.random()));
        let d = ports::parse("9000 8000", "x");
        assert!((32768..=60999).contains(&d.random()));
    }
}
