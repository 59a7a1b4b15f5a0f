//! What splicing ends with, and splicing two plain TCP connections.
//!
//! A connection through a tunnel is spliced with its HTTP/2 stream ([`crate::mux`]); one to
//! or from a peer without an enforcer (that policy allows) is spliced with another TCP
//! connection here. Both report the bytes moved and whether the connection ended cleanly
//! (both sides half-closed) or in a reset.
use std::io;

use tokio::net::TcpStream;

use crate::socket::reset_on_close;

/// Bytes a plain splice buffers per direction at most.
const PLAIN_BUFFER: usize = 64 * 1024;

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
    /// Both directions finished with EOF.
    Clean(Transferred),
    /// The application side or the peer broke the connection; the application socket was
    /// reset.
    Reset {
        transferred: Transferred,
        reason: String,
    },
}

/// Splices two plain TCP connections (no tunnel framing): a connection to or from a peer
/// without an enforcer that policy allows. A failure on one side resets the other.
pub async fn splice_plain(app: &mut TcpStream, other: &mut TcpStream) -> io::Result<Transferred> {
    match tokio::io::copy_bidirectional_with_sizes(app, other, PLAIN_BUFFER, PLAIN_BUFFER).await {
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
