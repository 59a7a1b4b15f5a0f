//! Socket plumbing: every socket the proxy opens carries the proxy's mark so the eBPF
//! connect hooks never capture it (no loops).
//!
//! Mark 0 means "no mark": it is what an unmarked socket carries anyway, so it is not set.
//! Setting `SO_MARK` needs `CAP_NET_ADMIN` (or `CAP_NET_RAW`) even for 0, and the in-process
//! tests (`testkit`) run unprivileged with mark 0.
use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Connects to `dst` from a socket marked with `mark`, optionally bound to `bind`.
pub async fn connect_marked(
    dst: SocketAddr,
    mark: u32,
    bind: Option<SocketAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    set_mark(&socket, mark)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(bind) = bind {
        // Many deliveries share one source address. Leaving the port to connect() (not
        // bind()) lets the kernel pick it per 4-tuple and reuse TIME_WAIT ports; a port
        // chosen at bind time is exclusive, and the range runs out at a few hundred
        // connections a second.
        socket.set_reuse_address(true)?;
        if bind.is_ipv4() {
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )?;
        }
        socket.bind(&bind.into())?;
    }
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(stream) => stream,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out"),
        )),
    }
}

/// A listener with the proxy's mark, a large backlog, and `SO_REUSEADDR` so that a
/// restarted enforcer can bind again at once.
pub fn listen(addr: SocketAddr, mark: u32) -> io::Result<TcpListener> {
    TcpListener::from_std(listen_std(addr, mark)?)
}

/// [`listen`] without a runtime (non-blocking): for a thread that makes sockets in another
/// network namespace, handed to the runtime afterwards.
pub fn listen_std(addr: SocketAddr, mark: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    set_mark(&socket, mark)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Marks `socket` with `mark`; 0 leaves it unmarked (see the module documentation).
fn set_mark(socket: &Socket, mark: u32) -> io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    socket.set_mark(mark)
}

/// Makes the next close of `stream` send a RST instead of a FIN, so an application sees a
/// refused or broken connection as such, not as a clean end of stream.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
