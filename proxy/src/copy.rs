//! Splicing an application connection with a tunnel.
//!
//! Inside a tunnel the bytes travel in frames, so that the end of one application connection
//! is not the end of the tunnel: after both directions ended cleanly the tunnel carries the
//! next connection (no new TLS handshake, no new TCP connection). A frame is a 4-byte
//! big-endian header, `kind << 30 | len`, then `len` bytes:
//!
//! * `DATA` (0): application bytes, at most [`MAX_FRAME`].
//! * `EOF` (1): the sender's application half-closed (its write side is done); the other
//!   direction goes on. The receiver shuts down its application socket's write side.
//! * `RESET` (2): the sender's application connection broke; the receiver resets its own.
//!   A tunnel that carried a reset is not reused.
//!
//! Each direction has one fixed buffer (no per-chunk allocation) and only reads when its last
//! chunk was written (backpressure). Header and payload go out in one write, so each frame is
//! encrypted as one TLS record run, never a tiny record for the header.
use std::{
    io,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf},
    net::{
        TcpStream,
        tcp::{ReadHalf as TcpReadHalf, WriteHalf as TcpWriteHalf},
    },
};

use crate::socket::reset_on_close;

/// Payload per frame at most (what a receiver accepts).
pub const MAX_FRAME: usize = 64 * 1024;
const HEADER: usize = 4;
/// Payload per frame a sender reads at most: header and payload fill exactly four TLS
/// records (16 KiB of plaintext each). A 64 KiB payload would leave its last 4 bytes for a
/// fifth record of their own: 22 bytes of TLS overhead and a seal for 4 bytes of data.
const SEND_PAYLOAD: usize = 4 * 16 * 1024 - HEADER;
const KIND_DATA: u32 = 0;
const KIND_EOF: u32 = 1;
const KIND_RESET: u32 = 2;
const LEN_MASK: u32 = (1 << 30) - 1;

/// Bytes moved by a finished splice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the application socket into the tunnel.
    pub from_app: u64,
    /// From the tunnel to the application socket.
    pub to_app: u64,
}

/// How a splice ended.
#[derive(Debug)]
pub enum Ended {
    /// Both directions finished with EOF: the tunnel can carry another connection.
    Clean(Transferred),
    /// The application side or the peer broke the connection; the application socket was
    /// reset. The tunnel must not be reused.
    Reset {
        transferred: Transferred,
        reason: String,
    },
}

/// Buffers of one tunnel, reused by every connection it carries, and the byte counts of
/// the current connection (kept here so that they survive a splice that is cancelled).
pub struct Buffers {
    up: Box<[u8]>,
    down: Box<[u8]>,
    from_app: AtomicU64,
    to_app: AtomicU64,
}

impl Buffers {
    /// Bytes moved by the current (or last) connection, also after a cancelled splice.
    pub fn transferred(&self) -> Transferred {
        Transferred {
            from_app: self.from_app.load(Relaxed),
            to_app: self.to_app.load(Relaxed),
        }
    }
}

impl Default for Buffers {
    fn default() -> Self {
        Self {
            up: vec![0; HEADER + MAX_FRAME].into_boxed_slice(),
            down: vec![0; MAX_FRAME].into_boxed_slice(),
            from_app: AtomicU64::new(0),
            to_app: AtomicU64::new(0),
        }
    }
}

enum UpEnd {
    Eof,
    /// The application read failed; a RESET frame was sent.
    Reset(String),
}

enum DownEnd {
    Eof,
    /// The peer sent RESET, or the application write failed.
    Reset(String),
}

// Byte counts live outside the direction futures: a direction cut short by the other one's
// reset still has its bytes counted.
async fn app_to_tunnel<W: AsyncWrite + Unpin>(
    app: &mut TcpReadHalf<'_>,
    tunnel: &mut W,
    buf: &mut [u8],
    total: &AtomicU64,
) -> io::Result<UpEnd> {
    loop {
        let n = match app.read(&mut buf[HEADER..HEADER + SEND_PAYLOAD]).await {
            Ok(n) => n,
            Err(e) => {
                tunnel.write_all(&(KIND_RESET << 30).to_be_bytes()).await?;
                tunnel.flush().await?;
                return Ok(UpEnd::Reset(format!("application connection broke: {e}")));
            }
        };
        if n == 0 {
            tunnel.write_all(&(KIND_EOF << 30).to_be_bytes()).await?;
            tunnel.flush().await?;
            return Ok(UpEnd::Eof);
        }
        buf[..HEADER].copy_from_slice(&(KIND_DATA << 30 | n as u32).to_be_bytes());
        tunnel.write_all(&buf[..HEADER + n]).await?;
        tunnel.flush().await?;
        total.fetch_add(n as u64, Relaxed);
    }
}

async fn tunnel_to_app<R: AsyncRead + Unpin>(
    tunnel: &mut R,
    app: &mut TcpWriteHalf<'_>,
    buf: &mut [u8],
    total: &AtomicU64,
) -> io::Result<DownEnd> {
    loop {
        let mut header = [0u8; HEADER];
        tunnel.read_exact(&mut header).await?;
        let header = u32::from_be_bytes(header);
        let (kind, len) = (header >> 30, (header & LEN_MASK) as usize);
        match kind {
            KIND_DATA if len > 0 && len <= buf.len() => {
                tunnel.read_exact(&mut buf[..len]).await?;
                if let Err(e) = app.write_all(&buf[..len]).await {
                    // Keep the framing: nothing more can be delivered, so this direction
                    // ends in a reset (the other side learns it from our RESET frame).
                    return Ok(DownEnd::Reset(format!("application write failed: {e}")));
                }
                total.fetch_add(len as u64, Relaxed);
            }
            KIND_EOF if len == 0 => {
                let _ = app.shutdown().await;
                return Ok(DownEnd::Eof);
            }
            KIND_RESET if len == 0 => {
                return Ok(DownEnd::Reset("the peer's connection was reset".into()));
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad tunnel frame header {header:#010x}"),
                ));
            }
        }
    }
}

/// Splices `app` with `tunnel` until both directions end. On a clean end (both sides sent
/// EOF) the tunnel is ready for another connection. Errors are tunnel failures: the
/// application socket has then been reset and the tunnel must be dropped.
pub async fn splice<T>(
    app: &mut TcpStream,
    tunnel: &mut T,
    buffers: &mut Buffers,
) -> io::Result<Ended>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    match both_directions(app, tunnel, buffers).await {
        Ok((transferred, None)) => Ok(Ended::Clean(transferred)),
        Ok((transferred, Some(reason))) => {
            reset_on_close(app);
            Ok(Ended::Reset {
                transferred,
                reason,
            })
        }
        Err(e) => {
            reset_on_close(app);
            Err(e)
        }
    }
}

/// Runs both directions; returns the bytes moved and, if the connection ended in a reset,
/// why.
async fn both_directions<T>(
    app: &mut TcpStream,
    tunnel: &mut T,
    buffers: &mut Buffers,
) -> io::Result<(Transferred, Option<String>)>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Buffers {
        up,
        down,
        from_app,
        to_app,
    } = buffers;
    from_app.store(0, Relaxed);
    to_app.store(0, Relaxed);
    let (from_app, to_app) = (&*from_app, &*to_app);
    let counted = || Transferred {
        from_app: from_app.load(Relaxed),
        to_app: to_app.load(Relaxed),
    };
    let (mut app_r, mut app_w) = app.split();
    let (mut tun_r, mut tun_w): (ReadHalf<&mut T>, WriteHalf<&mut T>) = tokio::io::split(tunnel);
    let mut down_fut = Box::pin(tunnel_to_app(&mut tun_r, &mut app_w, down, to_app));
    let mut up_fut = Box::pin(app_to_tunnel(&mut app_r, &mut tun_w, up, from_app));
    let (up, down) = tokio::select! {
        up = &mut up_fut => (up?, down_fut.await?),
        down = &mut down_fut => match down? {
            DownEnd::Reset(reason) => {
                // Nothing more can be delivered: stop reading the application and tell the
                // peer (its side then resets too). The tunnel is not reused after this.
                drop(up_fut);
                tun_w.write_all(&(KIND_RESET << 30).to_be_bytes()).await?;
                tun_w.flush().await?;
                return Ok((counted(), Some(reason)));
            }
            down => (up_fut.await?, down),
        },
    };
    Ok(match (up, down) {
        (UpEnd::Eof, DownEnd::Eof) => (counted(), None),
        (UpEnd::Eof | UpEnd::Reset(_), DownEnd::Reset(reason))
        | (UpEnd::Reset(reason), DownEnd::Eof) => (counted(), Some(reason)),
    })
}

/// Tells the peer that this connection is reset before any data: for a connection refused
/// after the peer already delivered it (an egress policy denial). The tunnel is not reused.
pub async fn send_reset<T: AsyncWrite + Unpin>(tunnel: &mut T) -> io::Result<()> {
    tunnel.write_all(&(KIND_RESET << 30).to_be_bytes()).await?;
    tunnel.flush().await
}

/// Splices two plain TCP connections (no tunnel framing): a connection to or from a peer
/// without an enforcer that policy allows. A failure on one side resets the other.
pub async fn splice_plain(app: &mut TcpStream, other: &mut TcpStream) -> io::Result<Transferred> {
    match tokio::io::copy_bidirectional_with_sizes(app, other, MAX_FRAME, MAX_FRAME).await {
        Ok((from_app, to_app)) => Ok(Transferred { from_app, to_app }),
        Err(e) => {
            reset_on_close(app);
            reset_on_close(other);
            Err(e)
        }
    }
}

/// Whether an error is just the other side going away (not worth a warning).
pub fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::{io::DuplexStream, net::TcpListener};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    /// client app <-> [splice] <-tunnel-> [splice] <-> server app, over an in-memory tunnel.
    struct Path {
        client: TcpStream,
        server: TcpStream,
        ends: tokio::task::JoinHandle<(
            io::Result<Ended>,
            io::Result<Ended>,
            DuplexStream,
            DuplexStream,
        )>,
    }

    async fn path(mut t1: DuplexStream, mut t2: DuplexStream) -> Path {
        let (client, mut app1) = pair().await;
        let (mut app2, server) = pair().await;
        let ends = tokio::spawn(async move {
            let (mut b1, mut b2) = (Buffers::default(), Buffers::default());
            let (e1, e2) = tokio::join!(
                splice(&mut app1, &mut t1, &mut b1),
                splice(&mut app2, &mut t2, &mut b2)
            );
            (e1, e2, t1, t2)
        });
        Path {
            client,
            server,
            ends,
        }
    }

    #[tokio::test]
    async fn half_close_and_reuse_of_the_same_tunnel() {
        let (mut t1, mut t2) = tokio::io::duplex(256 * 1024);
        for round in 0..3 {
            let mut p = path(t1, t2).await;
            let payload = vec![round as u8; 300_000];
            p.client.write_all(&payload).await.unwrap();
            p.client.shutdown().await.unwrap(); // half-close: done sending
            let mut got = Vec::new();
            p.server.read_to_end(&mut got).await.unwrap(); // EOF arrives through the tunnel
            assert_eq!(got, payload);
            p.server.write_all(b"reply after EOF").await.unwrap();
            p.server.shutdown().await.unwrap();
            let mut reply = Vec::new();
            p.client.read_to_end(&mut reply).await.unwrap();
            assert_eq!(reply, b"reply after EOF");
            let (e1, e2, a, b) = p.ends.await.unwrap();
            match (e1.unwrap(), e2.unwrap()) {
                (Ended::Clean(x), Ended::Clean(y)) => {
                    assert_eq!(
                        x,
                        Transferred {
                            from_app: 300_000,
                            to_app: 15
                        }
                    );
                    assert_eq!(
                        y,
                        Transferred {
                            from_app: 15,
                            to_app: 300_000
                        }
                    );
                }
                other => panic!("round {round}: not clean: {other:?}"),
            }
            (t1, t2) = (a, b); // the same tunnel carries the next connection
        }
    }

    #[tokio::test]
    async fn a_reset_on_one_side_resets_the_other_application() {
        let (t1, t2) = tokio::io::duplex(256 * 1024);
        let mut p = path(t1, t2).await;
        p.client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        p.server.read_exact(&mut buf).await.unwrap();
        reset_on_close(&p.server);
        drop(p.server);
        let mut saw_reset = false;
        for _ in 0..50 {
            let _ = p.client.write_all(&[1u8; 1024]).await;
            match tokio::time::timeout(Duration::from_millis(100), p.client.read(&mut buf)).await {
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    saw_reset = true;
                    break;
                }
                Ok(Ok(0)) => panic!("client saw a clean EOF instead of a reset"),
                _ => {}
            }
        }
        assert!(saw_reset, "client never saw the reset");
        let (e1, e2, _, _) = p.ends.await.unwrap();
        assert!(matches!(e1.unwrap(), Ended::Reset { .. }));
        assert!(matches!(e2.unwrap(), Ended::Reset { .. }));
    }

    #[tokio::test]
    async fn a_corrupt_frame_header_is_a_tunnel_error() {
        let (t1, mut raw) = tokio::io::duplex(1024);
        let (mut client, mut app) = pair().await;
        let task = tokio::spawn(async move {
            let mut t1 = t1;
            splice(&mut app, &mut t1, &mut Buffers::default()).await
        });
        raw.write_all(&0xFFFF_FFFFu32.to_be_bytes()).await.unwrap();
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut buf = [0u8; 1];
        let r = client.read(&mut buf).await;
        assert!(
            matches!(r, Err(ref e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
    }
}
