//! The NFQUEUE workers: a thread per queue runs each packet through the engine and carries
//! out its outcome (verdict, rewritten packet, mark, resets, records, live connections).
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tessera_proxy::{
    flow::now_ms,
    handshake::engine::{Engine, Outcome, PacketVerdict},
};
use tokio::sync::mpsc;

use super::{closed::monotonic_ns, live::Registered};

/// Sends the engine's resets (raw IP, our own mark so that nothing of ours queues them).
pub(super) struct RawSender {
    v4: Socket,
    v6: Option<Socket>,
}

impl RawSender {
    pub(super) fn new(mark: u32) -> Result<Self> {
        let raw = |domain| -> std::io::Result<Socket> {
            // IPPROTO_RAW: we write the IP header ourselves.
            let s = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
            s.set_mark(mark)?;
            Ok(s)
        };
        Ok(Self {
            v4: raw(Domain::IPV4).context("raw IPv4 socket for resets")?,
            v6: raw(Domain::IPV6).ok(),
        })
    }

    fn send(&self, packet: &[u8]) {
        let Ok(seg) = tessera_proxy::handshake::packet::segment(packet) else {
            return;
        };
        let to = SockAddr::from(SocketAddr::new(seg.dst.ip(), 0));
        let sock = match seg.dst.ip() {
            IpAddr::V4(_) => Some(&self.v4),
            IpAddr::V6(_) => self.v6.as_ref(),
        };
        if let Some(sock) = sock
            && let Err(e) = sock.send_to(packet, &to)
        {
            tracing::debug!(error = %e, to = %seg.dst, "cannot send a reset");
        }
    }
}

/// Which side a worker's queue is on (ingress has two queues: strangers and peers' lane).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Queue {
    /// Packets leaving this host (our clients' SYNs and ACKs, our servers' SYN-ACKs).
    Egress,
    /// Packets arriving.
    Ingress,
}

/// What decides on queued packets.
#[derive(Clone)]
pub(super) enum Handler {
    Engine(Arc<Engine>),
    /// Benchmark baseline (`[handshake] pass_through`): every packet passes unchanged, with
    /// the marks that end the queueing where the engine would set them (client: its first
    /// ACK; server: the client's ACK). What is left is the cost of the queues themselves.
    PassThrough {
        proven: u32,
        acked: u32,
    },
}

impl Handler {
    fn handle(&self, queue: Queue, packet: &[u8], now_ms: u64) -> Outcome {
        match self {
            Self::Engine(engine) => match queue {
                Queue::Egress => engine.egress(packet, now_ms),
                Queue::Ingress => engine.ingress(packet, now_ms),
            },
            Self::PassThrough { proven, acked } => {
                let syn = tessera_proxy::handshake::packet::segment(packet)
                    .is_ok_and(|seg| seg.flags & pnet_packet::tcp::TcpFlags::SYN != 0);
                Outcome {
                    mark: match (syn, queue) {
                        (true, _) => 0,
                        (false, Queue::Egress) => *acked,
                        (false, Queue::Ingress) => *proven,
                    },
                    ..Outcome::accept()
                }
            }
        }
    }
}

pub(super) fn worker(
    queue_num: u16,
    side: Queue,
    handler: Handler,
    sender: Arc<RawSender>,
    live: mpsc::Sender<Registered>,
    fast: Option<Arc<super::fast::FastPath>>,
) -> Result<()> {
    let mut queue = nfq::Queue::open().context("cannot open an NFQUEUE socket")?;
    queue
        .bind(queue_num)
        .with_context(|| format!("handshake.queue: cannot bind NFQUEUE {queue_num}"))?;
    queue.set_copy_range(queue_num, u16::MAX)?;
    queue.set_queue_max_len(queue_num, 8192)?;
    // A failed or full queue drops (fail closed), never accepts.
    queue.set_fail_open(queue_num, false)?;
    let _ = queue.set_recv_enobufs(false);
    loop {
        let mut msg = match queue.recv() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(queue = queue_num, error = %e, "NFQUEUE receive failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let now = now_ms();
        let mut outcome = handler.handle(side, msg.get_payload(), now);
        if let (Some(fast), Some(grant)) = (&fast, outcome.fast.take()) {
            let template = outcome.live.as_deref().and_then(super::fast::Template::of);
            fast.grant(*grant, template);
        }
        if let Some(p) = outcome.packet {
            msg.set_payload(p);
        }
        if outcome.mark != 0 {
            let mark = msg.get_nfmark() | outcome.mark;
            msg.set_nfmark(mark);
        }
        // Before the verdict: nothing of the connection can happen before it, so its close
        // (timed by the kernel on the same clock) is always later than this.
        let registered_ns = outcome.live.is_some().then(monotonic_ns);
        msg.set_verdict(match outcome.verdict {
            PacketVerdict::Accept => nfq::Verdict::Accept,
            PacketVerdict::Drop => nfq::Verdict::Drop,
        });
        if let Err(e) = queue.verdict(msg) {
            tracing::warn!(queue = queue_num, error = %e, "NFQUEUE verdict failed");
        }
        for p in &outcome.send {
            sender.send(p);
        }
        if let (Some(conn), Some(at_ns)) = (outcome.live, registered_ns) {
            // Bounded: a watcher that lags slows the handshakes down (this thread waits)
            // rather than losing a connection that a reload must be able to revoke.
            let _ = live.blocking_send(Registered::of(*conn, at_ns));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::tcp::TcpFlags;
    use tessera_proxy::handshake::packet;

    #[test]
    fn pass_through_marks_where_the_engine_would_and_changes_nothing() {
        let h = Handler::PassThrough {
            proven: 0x100,
            acked: 0x200,
        };
        let (c, s) = (
            "10.0.0.1:4000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let syn = packet::build(c, s, 1, 0, TcpFlags::SYN);
        let synack = packet::build(s, c, 9, 2, TcpFlags::SYN | TcpFlags::ACK);
        let ack = packet::build(c, s, 2, 10, TcpFlags::ACK);
        for (side, p, mark) in [
            (Queue::Egress, &syn, 0),
            (Queue::Ingress, &syn, 0),
            (Queue::Egress, &synack, 0),
            (Queue::Ingress, &synack, 0),
            (Queue::Egress, &ack, 0x200),
            (Queue::Ingress, &ack, 0x100),
        ] {
            let o = h.handle(side, p, 0);
            assert_eq!(
                (o.verdict, o.packet, o.mark),
                (PacketVerdict::Accept, None, mark)
            );
        }
    }
}
