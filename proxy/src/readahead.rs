//! Large reads from a tunnel's TCP socket, beneath TLS.
//!
//! rustls asks its transport for at most 4 KiB at a time (`read_tls`), so through
//! `tokio-rustls` a full 16 KiB record costs four `recvfrom` calls and a 64 KiB frame sixteen,
//! each a trip through the scheduler's readiness check as well. Beneath the TLS stream this
//! reads whatever the socket holds (up to [`CHUNK`]) in one call and hands it out from
//! memory: one copy that costs far less than the calls it saves.
//!
//! The buffer exists only while bytes wait in it or a read is in progress: a tunnel that
//! waits for its peer (pooled, or carrying an idle connection) holds none, so held
//! connections do not pay for it.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket in one call at most: four full TLS records and their
/// overhead.
pub const CHUNK: usize = 4 * (16 * 1024 + 256);

/// A transport whose reads are batched (see the module documentation); writes pass through.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    buf: Vec<u8>,
    pos: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            pos: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes read from the socket and not yet handed out (for tests).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes this transport holds in memory for reading (for tests: none while idle).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Hands out what is buffered; frees the buffer once it is drained.
    fn drain_into(&mut self, out: &mut ReadBuf<'_>) {
        let n = out.remaining().min(self.buf.len() - self.pos);
        out.put_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.buf.len() {
            this.drain_into(out);
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= CHUNK {
            // A large read needs no batching.
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        if this.buf.capacity() < CHUNK {
            this.buf.reserve_exact(CHUNK);
        }
        let mut chunk = ReadBuf::uninit(&mut this.buf.spare_capacity_mut()[..CHUNK]);
        match Pin::new(&mut this.inner).poll_read(cx, &mut chunk) {
            Poll::Pending => {
                // Nothing waits: an idle tunnel keeps no buffer.
                this.buf = Vec::new();
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let n = chunk.filled().len();
                // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
                unsafe { this.buf.set_len(n) };
                this.drain_into(out);
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::ready;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the reads that reach the transport.
    struct Counting<S> {
        inner: S,
        reads: usize,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let before = out.filled().len();
            let this = &mut *self;
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            if out.filled().len() > before {
                this.reads += 1;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_and_idle_holds_no_buffer() {
        let (mut tx, rx) = tokio::io::duplex(256 * 1024);
        let payload: Vec<u8> = (0..60_000u32).map(|i| i as u8).collect();
        tx.write_all(&payload).await.unwrap();
        let mut r = ReadAhead::new(Counting {
            inner: rx,
            reads: 0,
        });
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        while got.len() < payload.len() {
            let n = r.read(&mut small).await.unwrap();
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, payload);
        // 60,000 bytes asked for 4 KiB at a time: one read of the transport, not fifteen.
        assert_eq!(r.inner.reads, 1);
        assert_eq!(r.buffered(), 0);
        // Nothing more to read: the wait frees the buffer.
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), r.read(&mut small)).await;
        assert!(waited.is_err(), "read returned without data");
        assert_eq!(r.capacity(), 0);
        // Bytes written after the wait still arrive, in order.
        tx.write_all(b"after").await.unwrap();
        drop(tx);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"after");
    }
}
