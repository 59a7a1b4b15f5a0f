//! Connections' ends as the kernel reports them in handshake mode: `sock_ops` writes each
//! close of an enrolled workload's connection into the `TESSERA_CLOSED` ring buffer, with
//! the kernel's byte counts; this turns them into payload bytes for the flow record.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tessera_common::{AF_INET, ClosedConn, fast::FastConn};
use tokio::sync::mpsc;

/// A connection that ended, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Closed {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Payload bytes this end sent (acknowledged by the peer) and received.
    pub sent: u64,
    pub received: u64,
    /// When (monotonic clock, ns; the eBPF programs' `bpf_ktime_get_ns`).
    pub at_ns: u64,
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn addr(words: [u32; 4], family: u16, port: u16) -> SocketAddr {
    let ip: IpAddr = if family == AF_INET {
        Ipv4Addr::from(words[0].to_ne_bytes()).into()
    } else {
        let mut octets = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        Ipv6Addr::from(octets).into()
    };
    SocketAddr::new(ip, port)
}

// TCP states (include/net/tcp_states.h).
const TCP_FIN_WAIT2: u16 = 5;
const TCP_CLOSE_WAIT: u16 = 8;
const TCP_LAST_ACK: u16 = 9;
const TCP_CLOSING: u16 = 11;

impl From<&ClosedConn> for Closed {
    /// Payload bytes from the kernel's sequence-space counts, which include our FIN once
    /// acknowledged and the peer's once this socket processed it:
    /// * closing from CLOSING or LAST_ACK (the peer's FIN moved it there; ours was then
    ///   acknowledged): both FINs are in;
    /// * from CLOSE_WAIT (reset or aborted after the peer's FIN): only the peer's;
    /// * from FIN_WAIT2 (ours acknowledged): the peer's only if the count grew after the
    ///   socket entered FIN_WAIT2 (an orphaned socket hands the rest of the close to its
    ///   TIME_WAIT remnant without processing the FIN);
    /// * from anywhere else (a reset): neither.
    ///
    /// (The SYN, which an active opener's count includes, is taken off by the caller, who
    /// knows which end opened.)
    fn from(c: &ClosedConn) -> Self {
        let fin_acked = matches!(c.old_state, TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK);
        let fin_received = match c.old_state {
            TCP_CLOSE_WAIT | TCP_CLOSING | TCP_LAST_ACK => true,
            TCP_FIN_WAIT2 => {
                c.received_at_fin_wait2 == u64::MAX || c.bytes_received > c.received_at_fin_wait2
            }
            _ => false,
        };
        Self {
            local: addr(c.local, c.family, c.local_port),
            remote: addr(c.remote, c.family, c.remote_port),
            sent: c.bytes_acked.saturating_sub(u64::from(fin_acked)),
            received: c.bytes_received.saturating_sub(u64::from(fin_received)),
            at_ns: c.at_ns,
        }
    }
}

/// Reads the ring buffer of closed connections. The programs write without waking us (at a
/// high connection rate a wake-up per close would cost more than the record); a short
/// interval drains it instead.
///
/// The channel is bounded: when the watcher lags, this reader waits, and the ring buffer
/// (bounded in the kernel) fills and drops reports; the watcher's sweep then finds those
/// connections gone (recorded without byte counts). Memory never grows.
pub async fn read_closed(
    mut ring: RingBuf<MapData>,
    tx: mpsc::Sender<Closed>,
    mut fast: Option<FastEvents>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        // The fast path's connections first: each is registered before its close is read.
        if let Some(f) = &mut fast {
            loop {
                let Some(item) = f.ring.next() else { break };
                if item.len() < std::mem::size_of::<FastConn>() {
                    continue;
                }
                // SAFETY: the programs write exactly a `FastConn` (repr(C), integers).
                let c: FastConn = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                drop(item);
                if let Some(r) = f.path.registered(&c) {
                    tracing::debug!(local = %r.local, remote = %r.remote, key_id = c.key_id, "fast path connection");
                    if f.live.send(r).await.is_err() {
                        return;
                    }
                }
            }
        }
        loop {
            // (the item borrows the ring: copy it out before waiting on the channel)
            let Some(item) = ring.next() else { break };
            if item.len() < std::mem::size_of::<ClosedConn>() {
                continue;
            }
            // SAFETY: the programs write exactly a `ClosedConn` (repr(C), plain integers);
            // read_unaligned copes with the ring's 8-byte alignment.
            let c: ClosedConn = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            let c = Closed::from(&c);
            tracing::debug!(local = %c.local, remote = %c.remote, sent = c.sent, received = c.received, "connection closed");
            if tx.send(c).await.is_err() {
                return;
            }
        }
    }
}

/// The fast path's ring of established connections, what makes them records, and where
/// they go (the live-connection watch).
pub struct FastEvents {
    pub ring: RingBuf<MapData>,
    pub path: std::sync::Arc<super::fast::FastPath>,
    pub live: mpsc::Sender<super::live::Registered>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reports_give_both_ends_as_the_kernel_stores_them() {
        let v4 = ClosedConn {
            local: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
            remote: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
            local_port: 8080,
            remote_port: 42332,
            family: AF_INET,
            bytes_acked: 5,
            bytes_received: 7,
            at_ns: 9,
            old_state: TCP_LAST_ACK,
            received_at_fin_wait2: u64::MAX,
        };
        let c = Closed::from(&v4);
        assert_eq!(
            (c.local, c.remote, c.sent, c.received, c.at_ns),
            (
                "10.0.0.2:8080".parse().unwrap(),
                "10.0.0.1:42332".parse().unwrap(),
                4,
                6,
                9
            ),
            "closed last (LAST_ACK): both FINs off"
        );
        // Closed first: our FIN acknowledged; the peer's FIN in the count only if it grew
        // in FIN_WAIT2.
        let fin_in_fin_wait2 = ClosedConn {
            old_state: TCP_FIN_WAIT2,
            received_at_fin_wait2: 6,
            ..v4
        };
        let c = Closed::from(&fin_in_fin_wait2);
        assert_eq!(
            (c.sent, c.received),
            (4, 6),
            "the peer's FIN came in FIN_WAIT2"
        );
        let orphaned = ClosedConn {
            old_state: TCP_FIN_WAIT2,
            received_at_fin_wait2: 7,
            ..v4
        };
        let c = Closed::from(&orphaned);
        assert_eq!(
            (c.sent, c.received),
            (4, 7),
            "left to TIME_WAIT: no FIN counted"
        );
        let reset = ClosedConn {
            old_state: 1, // ESTABLISHED
            ..v4
        };
        assert_eq!(
            (Closed::from(&reset).sent, Closed::from(&reset).received),
            (5, 7)
        );
        let after_fin = ClosedConn {
            old_state: TCP_CLOSE_WAIT,
            ..v4
        };
        assert_eq!(
            (
                Closed::from(&after_fin).sent,
                Closed::from(&after_fin).received
            ),
            (5, 6)
        );
        let fd77 = |last: u8| {
            let mut o = [0u8; 16];
            o[0] = 0xfd;
            o[1] = 0x77;
            o[15] = last;
            [0, 1, 2, 3].map(|i| u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().unwrap()))
        };
        let v6 = ClosedConn {
            local: fd77(2),
            remote: fd77(1),
            family: tessera_common::AF_INET6,
            ..v4
        };
        assert_eq!(
            Closed::from(&v6).local,
            "[fd77::2]:8080".parse::<SocketAddr>().unwrap()
        );
    }
}
