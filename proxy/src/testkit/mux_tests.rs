//! Hostile HTTP/2 on a tunnel (protocol 6), written frame by frame by a certified enforcer:
//! what `h2` as a client never sends. Each test shows the refusal at host-b and that what
//! it holds stays bounded, over the same in-process hosts as `tunnel_tests`.
use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

use super::{apps::*, tunnel::*};
use crate::{
    flow::Verdict,
    wire::{REQUEST_HEADER, Request},
};

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const CANCEL: u32 = 0x8;

/// A frame as read from host-b.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    fn error_code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

/// HTTP/2 by hand on a TLS session with host-b.
struct Raw {
    tls: TlsStream<TcpStream>,
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), `first` holding the flag bits.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2).
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// The header block of a stream asking for `request`.
fn block(request: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    hpack_literal(&mut out, ":method", b"CONNECT");
    hpack_literal(&mut out, ":authority", request.dst.to_string().as_bytes());
    hpack_literal(&mut out, REQUEST_HEADER, request.to_header().as_bytes());
    out
}

impl Raw {
    /// The client preface and empty SETTINGS.
    async fn start(tls: TlsStream<TcpStream>) -> Self {
        let mut raw = Self { tls };
        raw.tls
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        raw.frame(SETTINGS, 0, 0, &[]).await;
        raw
    }

    async fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let _ = self
            .tls
            .write_all(&encode(kind, flags, stream, payload))
            .await;
    }

    /// Writes frames back to back, in one go.
    async fn frames(&mut self, frames: &[u8]) {
        let _ = self.tls.write_all(frames).await;
        let _ = self.tls.flush().await;
    }

    /// The next frame from host-b (SETTINGS acknowledged on the way), or None once the
    /// tunnel is closed.
    async fn next(&mut self) -> Option<Frame> {
        let mut head = [0u8; 9];
        self.tls.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        self.tls.read_exact(&mut payload).await.ok()?;
        let frame = Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
            payload,
        };
        if frame.kind == SETTINGS && frame.flags & ACK == 0 {
            self.frame(SETTINGS, ACK, 0, &[]).await;
        }
        Some(frame)
    }

    /// Reads frames until one matches, or the tunnel closes (None); bounded in time.
    async fn until(&mut self, what: &str, pred: impl Fn(&Frame) -> bool) -> Option<Frame> {
        within(what, async {
            while let Some(f) = self.next().await {
                if pred(&f) {
                    return Some(f);
                }
            }
            None
        })
        .await
    }
}

fn encode(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A certified rogue's raw tunnel and its first stream (id 1) connected to `dst`.
async fn connected(fx: &Fixture, dst: SocketAddr) -> (Raw, Sealer) {
    let (tls, mut keys) = fx.rogue_tls("host-r").await;
    let mut raw = Raw::start(tls).await;
    let request = keys.request("host-r", dst);
    raw.frame(HEADERS, END_HEADERS, 1, &block(&request)).await;
    let answer = raw
        .until("host-b's answer", |f| f.kind == HEADERS && f.stream == 1)
        .await
        .expect("an answer on stream 1");
    assert_eq!(answer.stream, 1);
    (raw, keys)
}

/// A peer sends more than the stream's window without waiting for WINDOW_UPDATE: host-b
/// ends the stream (or the tunnel) with FLOW_CONTROL_ERROR, and resets the workload's
/// connection; it buffered no more than the window.
#[tokio::test]
async fn data_past_the_window_is_a_flow_control_error() {
    let mut fx = Fixture::start(Spec::default()).await;
    let (mut raw, _) = connected(&fx, fx.talk.addr).await;
    let chunk = vec![7u8; 16_384];
    let mut burst = Vec::new();
    // 1 MiB window, 16 KiB frames: 65 frames overrun it by 16 KiB.
    for _ in 0..(crate::mux::STREAM_WINDOW as usize / chunk.len() + 1) {
        burst.extend_from_slice(&encode(DATA, 0, 1, &chunk));
    }
    raw.frames(&burst).await;
    let refused = raw
        .until("a flow-control error", |f| {
            matches!(f.kind, RST_STREAM | GOAWAY) && f.error_code() == 0x3
        })
        .await;
    assert!(
        refused.is_some(),
        "host-b closed the tunnel without FLOW_CONTROL_ERROR"
    );
    let b = fx.b.record().await;
    assert_eq!(b.verdict, Verdict::Allowed, "{b:?}");
    assert!(
        b.bytes_sent <= u64::from(crate::mux::STREAM_WINDOW),
        "delivered {} bytes past a {} window",
        b.bytes_sent,
        crate::mux::STREAM_WINDOW
    );
    assert!(
        b.reason.contains("broke") || b.reason.contains("reset"),
        "{}",
        b.reason
    );
}

/// Streams past SETTINGS_MAX_CONCURRENT_STREAMS are refused by the protocol; host-b
/// delivers no more than the limit at once and the tunnel's first streams still work.
#[tokio::test]
async fn a_stream_flood_past_the_limit_is_refused_and_bounded() {
    let fx = Fixture::start(Spec::default()).await;
    let (tls, mut keys) = fx.rogue_tls("host-r").await;
    let mut raw = Raw::start(tls).await;
    let limit = crate::mux::MAX_STREAMS;
    let extra = 50;
    // Wait for host-b's SETTINGS (the limit) before the flood, as a peer would.
    raw.until("host-b's settings", |f| {
        f.kind == SETTINGS && f.flags & ACK == 0
    })
    .await
    .expect("settings");
    let mut flood = Vec::new();
    for i in 0..limit + extra {
        // Each one an honest request for the echo workload, held open (no END_STREAM).
        let request = keys.request("host-r", fx.echo.addr);
        flood.extend_from_slice(&encode(HEADERS, END_HEADERS, 2 * i + 1, &block(&request)));
    }
    raw.frames(&flood).await;
    let mut answered = 0;
    let mut refused = 0;
    within("every stream answered or refused", async {
        while answered + refused < limit + extra {
            let Some(f) = raw.next().await else { break };
            match f.kind {
                HEADERS if f.payload.first() == Some(&0x88) => answered += 1,
                HEADERS => panic!("stream {} refused: {:?}", f.stream, f.payload),
                RST_STREAM => refused += 1,
                GOAWAY => panic!("host-b closed the tunnel: {:#x}", f.error_code()),
                _ => {}
            }
        }
    })
    .await;
    assert!(answered <= limit, "{answered} streams open at once");
    assert!(refused >= extra, "only {refused} refused");
    // Held at the echo workload: exactly the streams answered, never more than the limit
    // (records are written when the connections end).
    within("the deliveries to reach the workload", async {
        while fx.echo.open() < answered as usize {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fx.echo.open(), answered as usize);
    // The first stream still carries bytes both ways.
    raw.frame(DATA, 0, 1, b"still here").await;
    let echoed = raw
        .until("the echo on stream 1", |f| f.kind == DATA && f.stream == 1)
        .await
        .expect("stream 1 works");
    assert_eq!(echoed.payload, b"still here");
}

/// Open-and-reset cycles (the rapid-reset pattern, CVE-2023-44487): the tunnel is cut once
/// 64 streams were reset before host-b accepted them, host-b admitted at most that many,
/// and it holds nothing afterwards.
#[tokio::test]
async fn rapid_open_and_reset_cycles_leave_nothing_held() {
    let mut fx = Fixture::start(Spec::default()).await;
    let (tls, mut keys) = fx.rogue_tls("host-r").await;
    let mut raw = Raw::start(tls).await;
    let cycles = 2_000u32;
    let mut burst = Vec::new();
    for i in 0..cycles {
        let request = keys.request("host-r", fx.echo.addr);
        burst.extend_from_slice(&encode(HEADERS, END_HEADERS, 2 * i + 1, &block(&request)));
        burst.extend_from_slice(&encode(RST_STREAM, 0, 2 * i + 1, &CANCEL.to_be_bytes()));
    }
    raw.frames(&burst).await;
    // Read until host-b goes quiet or closes the tunnel.
    let mut goaway = None;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(f) = raw.next().await {
            if f.kind == GOAWAY {
                goaway = Some(f.error_code());
            }
        }
    })
    .await;
    drop(raw);
    // Every stream that reached admission has a record, and none is still carried: the
    // echo workload holds no connection from host-b once the records are in.
    let mut records = 0;
    while let Ok(b) = tokio::time::timeout(Duration::from_secs(2), fx.b.record()).await {
        assert_ne!(b.verdict, Verdict::Denied, "{b:?}");
        records += 1;
    }
    // `h2` cuts the tunnel (ENHANCE_YOUR_CALM) once 64 streams were reset before being
    // accepted: a burst of 2,000 cycles costs host-b at most that many admissions.
    assert_eq!(goaway, Some(0xb), "the tunnel was not cut");
    assert!(records <= 64, "{records} streams admitted of {cycles}");
    within("host-b's deliveries to end", async {
        while fx.echo.open() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A malformed frame (a DATA frame on stream 0) closes the tunnel with PROTOCOL_ERROR, and
/// every application connection it carried is reset at host-b.
#[tokio::test]
async fn a_protocol_error_closes_the_tunnel_and_resets_its_connections() {
    let mut fx = Fixture::start(Spec::default()).await;
    let (mut raw, _) = connected(&fx, fx.echo.addr).await;
    raw.frame(DATA, END_STREAM, 0, b"on the connection itself")
        .await;
    let goaway = raw
        .until("GOAWAY", |f| f.kind == GOAWAY)
        .await
        .expect("host-b sends GOAWAY");
    assert_eq!(goaway.error_code(), 0x1, "PROTOCOL_ERROR");
    let b = fx.b.record().await;
    assert!(b.reason.contains("broke"), "{}", b.reason);
    within("the echo workload's connection to end", async {
        while fx.echo.open() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}
