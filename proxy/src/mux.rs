//! Several application connections per tunnel (tunnel protocol 6).
//!
//! A held connection used to cost a tunnel of its own: a descriptor and a TLS session at
//! each end. Now a tunnel is one HTTP/2 connection inside the mutual-TLS session, and each
//! application connection is one `CONNECT` stream on it, as ztunnel's HBONE does. The
//! maintained `h2` crate brings what a framing of our own would have to get right again:
//! per-stream and per-connection flow control, a bound on concurrent streams, a reset that
//! stays on its stream, checked frame sizes, and the mitigations for HTTP/2's known floods
//! (rapid reset, CONTINUATION, header lists).
//!
//! * The request (`docs/wire.md`: destination, hints, the source's token) rides in the
//!   stream's [`REQUEST_HEADER`]; the answer (status, code, the destination's token) in the
//!   response's [`RESPONSE_HEADER`], `200` when connected.
//! * Application bytes are DATA frames; a half-close is END_STREAM on that direction; a
//!   broken connection is `RST_STREAM` (CANCEL), which resets the other end's application
//!   socket and leaves the tunnel's other streams alone.
//! * A held, idle connection owns no buffer: its reader waits for readability first and
//!   only then takes a buffer, and `h2` hands received data over as `Bytes`.
//!
//! The request is built as a value ([`connect_request`]) and the answer read from a
//! response ([`answer_of`]), both testable without sockets.
use std::{
    future::{Future, poll_fn},
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    task::Poll,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream, client::SendRequest};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use crate::{
    copy::{Ended, Transferred},
    socket::reset_on_close,
    wire::{REQUEST_HEADER, RESPONSE_HEADER, Request, Response, Status, WireError},
};

/// Concurrent streams a tunnel's server end accepts (`SETTINGS_MAX_CONCURRENT_STREAMS`).
/// Past it a stream waits for a slot (`h2` queues it); a source enforcer opens another
/// tunnel well before ([`STREAMS_PER_TUNNEL`]).
pub const MAX_STREAMS: u32 = 1_024;
/// Streams a source enforcer puts on one tunnel before it opens another.
pub const STREAMS_PER_TUNNEL: usize = 512;
/// Per-stream receive window: what a peer may send ahead of the application reading it.
/// One round trip on a LAN at 10 Gbit/s is well under this. ztunnel uses 4 MiB; a smaller
/// one means more streams must stall before they hold up the tunnel (below).
pub const STREAM_WINDOW: u32 = 1 << 20;
/// Per-tunnel receive window: bounds the bytes buffered for all streams of a tunnel whose
/// applications read (memory per tunnel, whatever the number of streams). Bytes a stream
/// holds count against it until its application takes them, so 32 streams whose
/// applications stop reading would stall the tunnel's other streams: a stalled stream
/// therefore lends its tunnel a window's worth from [`STALL_BUDGET`] ([`Window`]).
pub const TUNNEL_WINDOW: u32 = 32 << 20;
/// A stream whose application has not taken a chunk for this long is stalled.
pub const STALL_AFTER: Duration = Duration::from_millis(100);
/// What stalled streams may hold beyond their tunnels' windows, all tunnels of this
/// enforcer together: the memory a stalled application can pin, at most.
pub static STALL_BUDGET: StallBudget = StallBudget::new(256 << 20);
/// Largest DATA frame either end sends: four TLS records of payload.
pub const MAX_FRAME: u32 = 64 * 1024;
/// Largest header list accepted: a request carries one token (at most `MAX_TOKEN` bytes,
/// base64) and a few pseudo-headers.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Bytes an application connection reads into one buffer: the first read of a burst takes
/// the small size (a request, a reply), each read that fills its buffer doubles the next
/// one up to the large size (a bulk transfer: fewer reads per byte). 256 KiB reads measured
/// 0.16x direct throughput against ztunnel's 0.24x in the same rounds; 64 KiB ones 0.18x
/// against 0.21x (`--peers`, 2026-12-01).
const READ_SMALL: usize = 16 * 1024;
const READ_LARGE: usize = 64 * 1024;
/// Bytes handed to `h2` per stream and not yet sent, at most (within the peer's window).
const SEND_BUFFER: usize = 1 << 20;
/// Streams a peer may open and reset before we accept them (rapid-reset floods), and
/// streams we may reset for its protocol errors, before the tunnel is closed.
const PENDING_ACCEPT_RESETS: usize = 64;
const LOCAL_ERROR_RESETS: usize = 256;

/// The HTTP/2 settings of a tunnel's source end.
pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(TUNNEL_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_reset_streams(LOCAL_ERROR_RESETS)
        .enable_push(false);
    b
}

/// The HTTP/2 settings of a tunnel's destination end.
pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(TUNNEL_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(MAX_STREAMS)
        .max_pending_accept_reset_streams(PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(LOCAL_ERROR_RESETS))
        .max_concurrent_reset_streams(LOCAL_ERROR_RESETS);
    b
}

/// The HTTP/2 request that opens a stream for `request`: `CONNECT` to the destination, the
/// request (with its token) in [`REQUEST_HEADER`].
pub fn connect_request(request: &Request) -> http::Request<()> {
    connect_with(request.dst.to_string(), request.to_header().into_bytes())
}

/// A `CONNECT` request carrying `header` as-is (tests send what an honest enforcer never
/// would).
pub fn connect_with(authority: String, header: Vec<u8>) -> http::Request<()> {
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::CONNECT;
    *req.version_mut() = http::Version::HTTP_2;
    *req.uri_mut() = http::Uri::builder()
        .authority(authority)
        .build()
        .unwrap_or_default();
    if let Ok(mut value) = http::HeaderValue::from_bytes(&header) {
        // Never indexed (RFC 7541 §7.1.3): a token is different every time, and a value
        // that must stay secret never enters a compression table.
        value.set_sensitive(true);
        req.headers_mut().insert(REQUEST_HEADER, value);
    }
    req
}

/// The request a stream carries.
pub fn request_of<B>(req: &http::Request<B>) -> Result<Request, WireError> {
    if req.method() != http::Method::CONNECT {
        return Err(WireError::Malformed("a tunnel stream must be CONNECT"));
    }
    let value = req
        .headers()
        .get(REQUEST_HEADER)
        .ok_or(WireError::Truncated("tessera-request header"))?;
    Request::from_header(value.as_bytes())
}

/// The HTTP/2 response carrying `answer`: `200` when connected, `403` for a refusal.
pub fn response_for(answer: &Response) -> http::Response<()> {
    let mut resp = http::Response::new(());
    *resp.status_mut() = if answer.status == Status::Connected {
        http::StatusCode::OK
    } else {
        http::StatusCode::FORBIDDEN
    };
    if let Ok(mut value) = http::HeaderValue::from_str(&answer.to_header()) {
        value.set_sensitive(true);
        resp.headers_mut().insert(RESPONSE_HEADER, value);
    }
    resp
}

/// The answer a response carries (its HTTP status must agree with it).
pub fn answer_of<B>(resp: &http::Response<B>) -> Result<Response, WireError> {
    let value = resp
        .headers()
        .get(RESPONSE_HEADER)
        .ok_or(WireError::Truncated("tessera-response header"))?;
    let answer = Response::from_header(value.as_bytes())?;
    if (answer.status == Status::Connected) != (resp.status() == http::StatusCode::OK) {
        return Err(WireError::Malformed(
            "HTTP status disagrees with the answer",
        ));
    }
    Ok(answer)
}

/// HTTP/2's largest window (2^31 - 1).
const MAX_WINDOW: u64 = (1 << 31) - 1;

/// Bytes that stalled streams may hold beyond their tunnels' windows (see [`Window`]).
pub struct StallBudget {
    left: AtomicU64,
    size: u64,
}

impl StallBudget {
    pub const fn new(bytes: u64) -> Self {
        StallBudget {
            left: AtomicU64::new(bytes),
            size: bytes,
        }
    }

    /// Takes up to `want` bytes: what was left of them.
    fn take(&self, want: u64) -> u64 {
        let mut got = 0;
        let _ = self.left.fetch_update(Relaxed, Relaxed, |left| {
            got = left.min(want);
            Some(left - got)
        });
        got
    }

    fn give(&self, n: u64) {
        self.left.fetch_add(n, Relaxed);
    }

    /// Bytes not lent now.
    pub fn left(&self) -> u64 {
        self.left.load(Relaxed)
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

/// A tunnel's receive window, grown by what its stalled streams may hold.
///
/// Bytes a stream has received count against the tunnel's window until its application
/// takes them, so without this a few streams whose applications stop reading would stop
/// every other stream of the tunnel. A stalled stream (its application has not taken a
/// chunk for [`STALL_AFTER`]) lends the tunnel its own window's worth from the enforcer's
/// [`StallBudget`], and the task that drives the tunnel raises the HTTP/2 connection window
/// by it (`set_target_window_size`); the stream gives it back once its application reads
/// again (or it ends). The other streams keep the whole [`TUNNEL_WINDOW`] until the budget
/// is spent; the memory stalled applications can pin stays within the budget.
pub struct Window {
    budget: &'static StallBudget,
    lent: AtomicU64,
    changed: tokio::sync::Notify,
}

impl Window {
    pub fn new(budget: &'static StallBudget) -> Arc<Self> {
        Arc::new(Window {
            budget,
            lent: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// The connection window the tunnel should have now.
    pub fn target(&self) -> u32 {
        let lent = self.lent.load(Relaxed);
        (TUNNEL_WINDOW as u64 + lent).min(MAX_WINDOW) as u32
    }

    /// Resolves when [`Window::target`] may have changed.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// A stalled stream's loan: a stream window's worth, or what is left of the budget.
    fn lend(&self) -> Loan<'_> {
        let n = self.budget.take(STREAM_WINDOW as u64);
        if n > 0 {
            self.lent.fetch_add(n, Relaxed);
            self.changed.notify_one();
        }
        Loan { window: self, n }
    }
}

/// Returned to the budget when dropped: the stream's application read again, or the
/// stream ended.
struct Loan<'a> {
    window: &'a Window,
    n: u64,
}

impl Drop for Loan<'_> {
    fn drop(&mut self) {
        if self.n > 0 {
            self.window.lent.fetch_sub(self.n, Relaxed);
            self.window.budget.give(self.n);
            self.window.changed.notify_one();
        }
    }
}

/// An application connection's stream on a tunnel: both directions, and its tunnel's
/// window (which it grows while its application stalls).
pub struct Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub window: Arc<Window>,
}

impl Stream {
    /// Resets the stream (the other end resets its application connection); the tunnel
    /// and its other streams go on.
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CANCEL);
    }
}

/// Bytes moved by a splice so far, kept outside it so that a splice cut short (revoked)
/// still has its bytes counted.
#[derive(Default)]
pub struct Counts {
    from_app: AtomicU64,
    to_app: AtomicU64,
}

impl Counts {
    pub fn transferred(&self) -> Transferred {
        Transferred {
            from_app: self.from_app.load(Relaxed),
            to_app: self.to_app.load(Relaxed),
        }
    }
}

/// Why an ask got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The tunnel is gone or refused the stream (a pooled tunnel that died, say): nothing
    /// was delivered, the request may be sent again on another tunnel.
    #[error("tunnel failed: {0}")]
    Tunnel(#[from] h2::Error),
    #[error("bad answer: {0}")]
    Answer(#[from] WireError),
    #[error("no answer from the peer enforcer")]
    TimedOut,
    /// No token could be made for the source (nothing was sent).
    #[error("cannot prove the source's identity: {0}")]
    Proof(String),
}

impl AskError {
    pub fn into_io(self) -> io::Error {
        match self {
            AskError::TimedOut => io::Error::new(io::ErrorKind::TimedOut, self.to_string()),
            AskError::Answer(_) | AskError::Proof(_) => {
                io::Error::new(io::ErrorKind::InvalidData, self.to_string())
            }
            AskError::Tunnel(_) => io::Error::other(self.to_string()),
        }
    }
}

/// Opens a stream with `req` on `send` (the caller holds whatever ordering it needs while
/// this runs: it only queues the HEADERS frame).
pub fn open(
    send: &mut SendRequest<Bytes>,
    req: http::Request<()>,
) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>), h2::Error> {
    send.send_request(req, false)
}

/// Waits for the answer to a stream opened with [`open`]: the answer and, when connected,
/// the stream (a refused stream has ended).
pub async fn answered(
    response: h2::client::ResponseFuture,
    send: SendStream<Bytes>,
    window: &Arc<Window>,
    timeout: Duration,
) -> Result<(Response, Option<Stream>), AskError> {
    let resp = match tokio::time::timeout(timeout, response).await {
        Ok(r) => r?,
        Err(_) => return Err(AskError::TimedOut),
    };
    let answer = answer_of(&resp)?;
    let stream = (answer.status == Status::Connected).then(|| Stream {
        send,
        recv: resp.into_body(),
        window: window.clone(),
    });
    Ok((answer, stream))
}

/// The source end of a tunnel: opens streams; `closed` is set when the tunnel has closed.
pub struct Client {
    pub send: SendRequest<Bytes>,
    pub closed: Arc<AtomicBool>,
    pub window: Arc<Window>,
}

/// Starts HTTP/2 on a tunnel's TLS session, source end. The connection is driven by a task
/// of its own, which keeps its receive window at [`Window::target`] and ends (failing every
/// stream) when the tunnel closes.
pub async fn client<T>(io: T) -> Result<Client, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    client_with(io, &STALL_BUDGET).await
}

/// [`client`] with another budget for stalled streams (tests).
pub async fn client_with<T>(io: T, budget: &'static StallBudget) -> Result<Client, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut conn) = client_builder().handshake(io).await?;
    let closed = Arc::new(AtomicBool::new(false));
    let window = Window::new(budget);
    let (flag, w) = (closed.clone(), window.clone());
    tokio::spawn(async move {
        let result = loop {
            tokio::select! {
                r = &mut conn => break r,
                _ = w.changed() => conn.set_target_window_size(w.target()),
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "tunnel closed");
        }
        flag.store(true, Relaxed);
    });
    Ok(Client {
        send,
        closed,
        window,
    })
}

enum UpEnd {
    Eof,
    /// The application read failed; the stream was reset.
    Reset(String),
}

enum DownEnd {
    Eof,
    /// The peer reset the stream, or the application write failed.
    Reset(String),
}

/// Whether an error ends only this stream (the peer's or our reset), not the tunnel.
fn is_stream_reset(e: &h2::Error) -> bool {
    e.is_reset() && !e.is_go_away() && !e.is_io()
}

fn tunnel_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().expect("an I/O error");
    }
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!("tunnel failed: {e}"),
    )
}

async fn app_to_stream(
    app: &mut ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    total: &AtomicU64,
) -> io::Result<UpEnd> {
    let mut size = READ_SMALL;
    loop {
        // A buffer only once there is something to read: a held connection costs none.
        if let Err(e) = app.readable().await {
            send.send_reset(Reason::CANCEL);
            return Ok(UpEnd::Reset(format!("application connection broke: {e}")));
        }
        let mut buf = BytesMut::with_capacity(size);
        // A read through `poll_read` (not `try_read`): a short read tells tokio the socket
        // is drained, so the next wait goes straight to epoll instead of costing a
        // `recvfrom` that fails with EAGAIN: two system calls fewer per round trip
        // (`bench --peers`, "syscalls / round trip").
        let n = match app.read_buf(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                send.send_reset(Reason::CANCEL);
                return Ok(UpEnd::Reset(format!("application connection broke: {e}")));
            }
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(tunnel_error)?;
            return Ok(UpEnd::Eof);
        }
        size = if n == size {
            (size * 2).min(READ_LARGE)
        } else {
            READ_SMALL
        };
        let mut chunk = buf.freeze();
        // Only as much as the peer's windows allow: the rest waits here, not in `h2`.
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) if is_stream_reset(&e) => {
                    return Ok(UpEnd::Reset("the peer reset the connection".into()));
                }
                Some(Err(e)) => return Err(tunnel_error(e)),
                None => return Ok(UpEnd::Reset("the peer reset the connection".into())),
            };
            if granted == 0 {
                continue;
            }
            let part = chunk.split_to(granted.min(chunk.len()));
            let len = part.len() as u64;
            match send.send_data(part, false) {
                Ok(()) => total.fetch_add(len, Relaxed),
                Err(e) if is_stream_reset(&e) => {
                    return Ok(UpEnd::Reset("the peer reset the connection".into()));
                }
                Err(e) => return Err(tunnel_error(e)),
            };
        }
    }
}

async fn stream_to_app(
    recv: &mut RecvStream,
    app: &mut WriteHalf<'_>,
    window: &Window,
    total: &AtomicU64,
) -> io::Result<DownEnd> {
    loop {
        match recv.data().await {
            None => {
                let _ = app.shutdown().await;
                return Ok(DownEnd::Eof);
            }
            Some(Ok(bytes)) => {
                let n = bytes.len();
                if let Err(e) = deliver(app, &bytes, window).await {
                    return Ok(DownEnd::Reset(format!("application write failed: {e}")));
                }
                // Window back to the peer only once delivered: backpressure end to end.
                let _ = recv.flow_control().release_capacity(n);
                total.fetch_add(n as u64, Relaxed);
            }
            Some(Err(e)) if is_stream_reset(&e) => {
                return Ok(DownEnd::Reset("the peer's connection was reset".into()));
            }
            Some(Err(e)) => return Err(tunnel_error(e)),
        }
    }
}

/// Writes a chunk to the application. Most writes complete at once (no timer is made for
/// them); one that waits [`STALL_AFTER`] marks the stream stalled, and it lends its tunnel
/// a window until the write completes (see [`Window`]).
async fn deliver(app: &mut WriteHalf<'_>, bytes: &[u8], window: &Window) -> io::Result<()> {
    let mut write = std::pin::pin!(app.write_all(bytes));
    if let Poll::Ready(r) = poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
        return r;
    }
    match tokio::time::timeout(STALL_AFTER, write.as_mut()).await {
        Ok(r) => r,
        Err(_) => {
            let _loan = window.lend();
            write.await
        }
    }
}

/// Splices `app` with its stream until both directions end. On a reset (either side) the
/// application socket is reset and the stream too; an error is the tunnel failing, which
/// also resets the application socket.
pub async fn splice(
    app: &mut TcpStream,
    stream: &mut Stream,
    counts: &Counts,
) -> io::Result<Ended> {
    let reason = {
        let (mut app_r, mut app_w) = app.split();
        let Stream { send, recv, window } = stream;
        let mut down = Box::pin(stream_to_app(recv, &mut app_w, window, &counts.to_app));
        let mut up = Box::pin(app_to_stream(&mut app_r, send, &counts.from_app));
        let ends = tokio::select! {
            u = &mut up => match u {
                Ok(u) => down.await.map(|d| (u, d)),
                Err(e) => Err(e),
            },
            d = &mut down => match d {
                Ok(DownEnd::Reset(reason)) => {
                    // Nothing more can be delivered: stop reading the application.
                    drop(up);
                    Ok((UpEnd::Reset(reason.clone()), DownEnd::Reset(reason)))
                }
                Ok(d) => up.await.map(|u| (u, d)),
                Err(e) => Err(e),
            },
        };
        match ends {
            Ok((UpEnd::Eof, DownEnd::Eof)) => None,
            Ok((_, DownEnd::Reset(reason)) | (UpEnd::Reset(reason), _)) => Some(Ok(reason)),
            Err(e) => Some(Err(e)),
        }
    };
    let transferred = counts.transferred();
    match reason {
        None => Ok(Ended::Clean(transferred)),
        Some(Ok(reason)) => {
            stream.reset();
            reset_on_close(app);
            Ok(Ended::Reset {
                transferred,
                reason,
            })
        }
        Some(Err(e)) => {
            reset_on_close(app);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{code::Code, wire::tests::sample};
    use tokio::{io::AsyncReadExt, net::TcpListener};

    #[test]
    fn a_request_and_its_answer_ride_in_headers_and_come_back_equal() {
        let req = connect_request(&sample());
        assert_eq!(req.method(), http::Method::CONNECT);
        assert_eq!(req.uri().authority().unwrap().as_str(), "10.77.0.2:8080");
        assert_eq!(request_of(&req).unwrap(), sample());
        let answer = Response::new(Status::Denied, "no").with_code(Code::Policy);
        let resp = response_for(&answer);
        assert_eq!(resp.status(), http::StatusCode::FORBIDDEN);
        let got = answer_of(&resp).unwrap();
        assert_eq!(
            (got.status, got.code, got.reason),
            (Status::Denied, Code::Policy, "no".into())
        );
    }

    #[test]
    fn hostile_headers_are_refused_with_their_reason() {
        let mut not_connect = connect_request(&sample());
        *not_connect.method_mut() = http::Method::GET;
        let empty = connect_with("10.77.0.2:8080".into(), Vec::new());
        let mut missing = connect_request(&sample());
        missing.headers_mut().clear();
        let garbage = connect_with("10.77.0.2:8080".into(), b"%%%".to_vec());
        let huge = connect_with("10.77.0.2:8080".into(), vec![b'A'; 20_000]);
        let mut truncated_bytes = sample().encode();
        truncated_bytes.truncate(20);
        use base64::Engine as _;
        let truncated = connect_with(
            "10.77.0.2:8080".into(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(truncated_bytes)
                .into_bytes(),
        );
        let reasons: Vec<String> = [not_connect, missing, empty, garbage, huge, truncated]
            .iter()
            .map(|r| request_of(r).unwrap_err().to_string())
            .collect();
        assert_eq!(
            reasons,
            [
                "malformed header: a tunnel stream must be CONNECT",
                "header truncated: tessera-request header",
                "header truncated: preamble",
                "malformed header: header value is not base64url",
                "header body of 20000 bytes exceeds the 8192-byte limit",
                "header truncated: body",
            ]
        );
        // An answer whose HTTP status says connected but whose body refuses is refused.
        let mut lying = response_for(&Response::new(Status::Denied, "no"));
        *lying.status_mut() = http::StatusCode::OK;
        assert!(answer_of(&lying).is_err());
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    /// An h2 tunnel over an in-memory pipe: the client handle and the server's accepted
    /// streams (each answered connected).
    async fn tunnel() -> (
        Client,
        tokio::sync::mpsc::Receiver<Stream>,
        tokio::task::JoinHandle<()>,
    ) {
        tunnel_with(&STALL_BUDGET).await
    }

    /// [`tunnel`] whose source end lends from `budget`.
    async fn tunnel_with(
        budget: &'static StallBudget,
    ) -> (
        Client,
        tokio::sync::mpsc::Receiver<Stream>,
        tokio::task::JoinHandle<()>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let server = tokio::spawn(async move {
            let mut conn = server_builder().handshake::<_, Bytes>(b).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let answer = match request_of(&req) {
                    Ok(_) => Response::new(Status::Connected, "web"),
                    Err(e) => Response::new(Status::BadRequest, e.to_string()),
                };
                let send = respond.send_response(response_for(&answer), false).unwrap();
                let _ = tx
                    .send(Stream {
                        send,
                        recv: req.into_body(),
                        window: Window::new(&STALL_BUDGET),
                    })
                    .await;
            }
        });
        let client = client_with(a, budget).await.unwrap();
        (client, rx, server)
    }

    async fn connect(client: &mut Client) -> Stream {
        let (resp, stream) = open(&mut client.send, connect_request(&sample())).unwrap();
        let (answer, stream) = answered(resp, stream, &client.window, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(answer.status, Status::Connected);
        stream.unwrap()
    }

    /// client app <-> [splice] <-stream-> [splice] <-> server app.
    async fn path(
        send: &mut Client,
        accepted: &mut tokio::sync::mpsc::Receiver<Stream>,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(io::Result<Ended>, io::Result<Ended>)>,
    ) {
        let mut s1 = connect(send).await;
        let mut s2 = accepted.recv().await.unwrap();
        let (client, mut app1) = pair().await;
        let (mut app2, server) = pair().await;
        // Small socket buffers between the source's splice and its application, so that
        // an application that does not read stalls its stream after a few hundred KiB.
        for (s, rcv) in [(&client, true), (&app1, false)] {
            let s = socket2::SockRef::from(s);
            let set = if rcv {
                s.set_recv_buffer_size(64 << 10)
            } else {
                s.set_send_buffer_size(64 << 10)
            };
            set.unwrap();
        }
        let ends = tokio::spawn(async move {
            let (c1, c2) = (Counts::default(), Counts::default());
            tokio::join!(
                splice(&mut app1, &mut s1, &c1),
                splice(&mut app2, &mut s2, &c2)
            )
        });
        (client, server, ends)
    }

    #[tokio::test]
    async fn many_connections_share_a_tunnel_with_half_close_and_exact_counts() {
        let (mut send, mut accepted, _server) = tunnel().await;
        let mut paths = Vec::new();
        for i in 0..8u8 {
            paths.push((i, path(&mut send, &mut accepted).await));
        }
        let mut tasks = Vec::new();
        for (i, (mut client, mut server, ends)) in paths {
            tasks.push(tokio::spawn(async move {
                let payload = vec![i; 300_000 + i as usize];
                let writer = {
                    let payload = payload.clone();
                    async move {
                        client.write_all(&payload).await.unwrap();
                        client.shutdown().await.unwrap(); // half-close
                        client
                    }
                };
                let reader = async {
                    let mut got = Vec::new();
                    server.read_to_end(&mut got).await.unwrap();
                    got
                };
                let (mut client, got) = tokio::join!(writer, reader);
                assert_eq!(got, payload);
                server.write_all(b"reply after EOF").await.unwrap();
                server.shutdown().await.unwrap();
                let mut reply = Vec::new();
                client.read_to_end(&mut reply).await.unwrap();
                assert_eq!(reply, b"reply after EOF");
                match ends.await.unwrap() {
                    (Ok(Ended::Clean(x)), Ok(Ended::Clean(y))) => {
                        assert_eq!((x.from_app, x.to_app), (payload.len() as u64, 15));
                        assert_eq!((y.from_app, y.to_app), (15, payload.len() as u64));
                    }
                    other => panic!("not clean: {other:?}"),
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_reset_resets_its_own_connection_and_leaves_the_others_exact() {
        let (mut send, mut accepted, _server) = tunnel().await;
        let (mut c1, s1, ends1) = path(&mut send, &mut accepted).await;
        let (mut c2, mut s2, ends2) = path(&mut send, &mut accepted).await;
        c1.write_all(b"hello").await.unwrap();
        reset_on_close(&s1);
        drop(s1);
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let _ = c1.write_all(&[1u8; 1024]).await;
                match c1.read(&mut buf).await {
                    Err(e) => break e.kind(),
                    Ok(0) => panic!("a clean EOF instead of a reset"),
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("the reset reaches the client");
        assert_eq!(r, io::ErrorKind::ConnectionReset);
        let (e1, e2) = ends1.await.unwrap();
        assert!(matches!(e1, Ok(Ended::Reset { .. })), "{e1:?}");
        assert!(matches!(e2, Ok(Ended::Reset { .. })), "{e2:?}");
        // The other connection on the same tunnel is untouched.
        c2.write_all(&[7u8; 100_000]).await.unwrap();
        c2.shutdown().await.unwrap();
        let mut got = Vec::new();
        s2.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, vec![7u8; 100_000]);
        s2.shutdown().await.unwrap();
        match ends2.await.unwrap() {
            (Ok(Ended::Clean(x)), Ok(Ended::Clean(_))) => assert_eq!(x.from_app, 100_000),
            other => panic!("not clean: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_tunnel_that_fails_resets_every_application_on_it() {
        let (mut send, mut accepted, server) = tunnel().await;
        let (mut c1, _s1, ends1) = path(&mut send, &mut accepted).await;
        let (mut c2, _s2, ends2) = path(&mut send, &mut accepted).await;
        server.abort(); // the server's end of the tunnel goes away
        for c in [&mut c1, &mut c2] {
            let mut buf = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
                .await
                .expect("the failure reaches the application");
            assert!(
                matches!(r, Err(ref e) if e.kind() == io::ErrorKind::ConnectionReset),
                "{r:?}"
            );
        }
        let (e1, _) = ends1.await.unwrap();
        let (e2, _) = ends2.await.unwrap();
        assert!(e1.is_err() && e2.is_err(), "{e1:?} {e2:?}");
    }

    /// `n` streams whose destination applications send 2 MiB each and whose source
    /// applications never read, on a tunnel lending from `budget`; returns once every
    /// stalled stream took what the budget had for it (or 20 s passed).
    async fn stalled(
        n: usize,
        budget: &'static StallBudget,
    ) -> (Client, tokio::sync::mpsc::Receiver<Stream>, Vec<TcpStream>) {
        let (mut client, mut accepted, _server) = tunnel_with(budget).await;
        let mut readers = Vec::new();
        for _ in 0..n {
            let (c, mut s, _ends) = path(&mut client, &mut accepted).await;
            tokio::spawn(async move {
                let _ = s.write_all(&vec![7u8; 2 << 20]).await;
                // Held open: the stream ends when its source application is dropped.
                std::future::pending::<()>().await;
            });
            readers.push(c);
        }
        let want = (n as u64 * STREAM_WINDOW as u64).min(budget.size());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while budget.size() - budget.left() < want && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (client, accepted, readers)
    }

    /// Reads 2 MiB from each stalled application, all at once (one at a time could wait
    /// for ever once the budget is spent: the window freed by one reader may go to a
    /// stream nobody reads yet); their streams repay their loans.
    async fn drain(readers: Vec<TcpStream>) {
        let mut all = tokio::task::JoinSet::new();
        for mut c in readers {
            all.spawn(async move {
                let mut got = vec![0u8; 2 << 20];
                tokio::time::timeout(Duration::from_secs(20), c.read_exact(&mut got))
                    .await
                    .expect("a stalled stream resumes")
                    .unwrap();
                assert!(got.iter().all(|b| *b == 7));
                c
            });
        }
        let mut held = Vec::new();
        while let Some(c) = all.join_next().await {
            held.push(c.unwrap());
        }
    }

    /// Drains the stalled applications; then every loan is back in `budget` and the
    /// tunnel's window is its own 32 MiB again.
    async fn drain_and_check_repaid(
        readers: Vec<TcpStream>,
        budget: &'static StallBudget,
        client: &Client,
    ) {
        drain(readers).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while budget.left() < budget.size() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(budget.left(), budget.size());
        assert_eq!(client.window.target(), TUNNEL_WINDOW);
    }

    #[tokio::test]
    async fn streams_whose_applications_stall_do_not_hold_up_the_others_of_their_tunnel() {
        // 40 stalled streams hold 40 MiB: more than the tunnel's 32 MiB window.
        let budget: &'static StallBudget = Box::leak(Box::new(StallBudget::new(256 << 20)));
        let (mut client, mut accepted, readers) = stalled(40, budget).await;
        assert_eq!(budget.size() - budget.left(), 40 * STREAM_WINDOW as u64);
        assert_eq!(client.window.target(), TUNNEL_WINDOW + 40 * STREAM_WINDOW);
        // A stream whose application reads still gets 4 MiB through.
        let (mut c, mut s, _ends) = path(&mut client, &mut accepted).await;
        let payload: Vec<u8> = (0..4u32 << 20).map(|i| i as u8).collect();
        let mut got = vec![0u8; payload.len()];
        let (w, r) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(s.write_all(&payload), c.read_exact(&mut got))
        })
        .await
        .expect("the active stream was held up by the stalled ones");
        w.unwrap();
        r.unwrap();
        assert!(got == payload);
        // Once the stalled applications read, every loan is back and the window with it.
        drain_and_check_repaid(readers, budget, &client).await;
    }

    #[tokio::test]
    async fn stalled_streams_lend_no_more_than_the_budget() {
        let budget: &'static StallBudget = Box::leak(Box::new(StallBudget::new(4 << 20)));
        let (client, _accepted, readers) = stalled(40, budget).await;
        // Every stalled stream is waiting; only 4 MiB was lent among them.
        tokio::time::sleep(STALL_AFTER * 3).await;
        assert_eq!(budget.left(), 0);
        assert_eq!(client.window.target(), TUNNEL_WINDOW + (4 << 20));
        drain_and_check_repaid(readers, budget, &client).await;
    }
}
