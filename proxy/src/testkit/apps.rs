//! The applications at both ends of a tunnel: workloads, real TCP servers on loopback that
//! report how each connection went, and helpers for the client side.
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};
use std::{future::Future, io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinSet,
};

/// How long any one step of a test may take (a connection, an answer, a flow record).
pub const STEP: Duration = Duration::from_secs(15);

/// Awaits `f`, failing the test if it takes longer than [`STEP`].
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// What a workload does with each connection.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Sends back what it receives; at EOF shuts down its write side.
    Echo,
    /// Reads until EOF, then sends this many bytes and shuts down (a request, then a reply).
    ReplyAfterEof(usize),
    /// Sends this many bytes while reading until EOF, then shuts down (both ways at once).
    Talk(usize),
}

/// What a workload saw on one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Who connected (the delivery address of the enforcer, for a tunnelled connection).
    pub peer: SocketAddr,
    pub received: u64,
    /// `Ok` if the client ended with EOF and everything was sent; else the error's kind
    /// (`ConnectionReset` for a reset).
    pub end: Result<(), io::ErrorKind>,
}

/// A workload listening on 127.0.0.1.
pub struct Workload {
    pub addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
    /// Connections open now.
    open: Arc<AtomicUsize>,
    _tasks: JoinSet<()>,
}

impl Workload {
    pub async fn start(behaviour: Behaviour) -> Self {
        // A backlog above the tunnel's stream limit: a test delivering that many connections
        // at once must not meet the kernel's accept queue instead of the enforcer's limits.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)))
            .expect("bind");
        let listener = socket.listen(4096).expect("listen");
        let addr = listener.local_addr().expect("local address");
        let (tx, seen) = mpsc::unbounded_channel();
        let open = Arc::new(AtomicUsize::new(0));
        let counted = open.clone();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let (tx, open) = (tx.clone(), counted.clone());
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (received, end) = serve(stream, behaviour).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                    let end = end.map_err(|e| e.kind());
                    let _ = tx.send(Seen {
                        peer,
                        received,
                        end,
                    });
                });
            }
        });
        Self {
            addr,
            seen,
            open,
            _tasks: tasks,
        }
    }

    /// Connections open at the workload now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// What the workload saw on its next connection, once that connection ended.
    pub async fn seen(&mut self) -> Seen {
        within("a workload connection to end", self.seen.recv())
            .await
            .expect("the workload runs")
    }
}

/// Serves one connection; returns the bytes received and how it ended.
async fn serve(mut stream: TcpStream, behaviour: Behaviour) -> (u64, io::Result<()>) {
    let (mut r, mut w) = stream.split();
    match behaviour {
        Behaviour::Echo => {
            let mut buf = vec![0u8; 64 * 1024];
            let mut n = 0u64;
            loop {
                match r.read(&mut buf).await {
                    Ok(0) => return (n, w.shutdown().await),
                    Ok(k) => {
                        n += k as u64;
                        if let Err(e) = w.write_all(&buf[..k]).await {
                            return (n, Err(e));
                        }
                    }
                    Err(e) => return (n, Err(e)),
                }
            }
        }
        Behaviour::ReplyAfterEof(len) => match drain(&mut r).await {
            (n, Ok(())) => (n, send(&mut w, len).await),
            failed => failed,
        },
        Behaviour::Talk(len) => {
            let ((n, read), sent) = tokio::join!(drain(&mut r), send(&mut w, len));
            (n, read.and(sent))
        }
    }
}

/// Reads until EOF; returns the byte count (also when the read failed).
pub async fn drain<R: AsyncRead + Unpin>(r: &mut R) -> (u64, io::Result<()>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return (n, Ok(())),
            Ok(k) => n += k as u64,
            Err(e) => return (n, Err(e)),
        }
    }
}

/// Writes `len` bytes of [`pattern`], then shuts down the write side.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, len: usize) -> io::Result<()> {
    w.write_all(&pattern(len)).await?;
    w.shutdown().await
}

/// `len` bytes that are not all alike.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Reads the whole stream until EOF.
pub async fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    within("reading to EOF", stream.read_to_end(&mut got))
        .await
        .expect("a clean end of stream");
    got
}

/// Asserts that the connection is (or gets) reset, without receiving a byte.
pub async fn expect_reset(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    match within("a reset", stream.read(&mut buf)).await {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("expected a reset, got {other:?}"),
    }
}
