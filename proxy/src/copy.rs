//! Splicing an application connection and a tunnel.
//!
//! `tokio::io::copy_bidirectional_with_sizes` gives us what we need: one fixed buffer per
//! direction (no per-chunk allocation), a write side shut down when its read side reaches
//! EOF (half-close: over TLS that is a `close_notify`, then TCP FIN), and backpressure,
//! since a direction only reads when its previous chunk was written. What it does not do
//! is turn a reset on one side into a reset on the other; [`splice`] adds that.
use std::io;

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::socket::reset_on_close;

/// Buffer per direction: large enough for TLS records of 16 KiB to be filled in a few reads.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// Bytes moved by a finished splice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the application socket to the other side.
    pub from_app: u64,
    /// From the other side to the application socket.
    pub to_app: u64,
}

/// Splices `app` with `other` until both directions are done or one fails. On failure the
/// application socket is closed with a RST so the application sees the break.
pub async fn splice<T>(app: &mut TcpStream, other: &mut T) -> io::Result<Transferred>
where
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    match tokio::io::copy_bidirectional_with_sizes(app, other, BUFFER_SIZE, BUFFER_SIZE).await {
        Ok((from_app, to_app)) => Ok(Transferred { from_app, to_app }),
        Err(e) => {
            reset_on_close(app);
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
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    /// app client <-> [app_side | splice | other_side] <-> echo-ish server
    #[tokio::test]
    async fn half_close_lets_the_reply_through_and_counts_bytes() {
        let (mut app_client, mut app_side) = pair().await;
        let (mut other_side, mut server) = pair().await;
        let spliced = tokio::spawn(async move { splice(&mut app_side, &mut other_side).await });
        let payload = vec![7u8; 300_000];
        app_client.write_all(&payload).await.unwrap();
        app_client.shutdown().await.unwrap(); // half-close: we are done sending
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap(); // EOF arrives through the splice
        assert_eq!(got, payload);
        server.write_all(b"reply after EOF").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        app_client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after EOF");
        let t = spliced.await.unwrap().unwrap();
        assert_eq!(
            t,
            Transferred {
                from_app: 300_000,
                to_app: 15
            }
        );
    }

    #[tokio::test]
    async fn a_reset_on_the_far_side_resets_the_application() {
        let (mut app_client, mut app_side) = pair().await;
        let (mut other_side, server) = pair().await;
        let spliced = tokio::spawn(async move { splice(&mut app_side, &mut other_side).await });
        reset_on_close(&server);
        drop(server);
        // Writes into the broken splice fail; the application then sees a reset, not EOF.
        let mut buf = [0u8; 16];
        let mut saw_reset = false;
        for _ in 0..50 {
            let _ = app_client.write_all(&[1u8; 1024]).await;
            match tokio::time::timeout(
                std::time::Duration::from_millis(100),
                app_client.read(&mut buf),
            )
            .await
            {
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    saw_reset = true;
                    break;
                }
                Ok(Ok(0)) => panic!("application saw a clean EOF instead of a reset"),
                _ => {}
            }
        }
        assert!(saw_reset, "application never saw the reset");
        assert!(spliced.await.unwrap().is_err());
    }
}
