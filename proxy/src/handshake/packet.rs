//! Carrying a handshake message inside a TCP handshake packet, and taking it out again.
//!
//! TCP options have no room for a signature, so the message rides as payload appended to the
//! packet, announced by an RFC 6994 experimental option at the start of the TCP options:
//!
//! ```text
//! kind 253 | length 6 | ExID 0x7E55 | message length u16 | NOP | NOP
//! ```
//!
//! (8 bytes, so the TCP header stays a multiple of 4.) [`attach`] inserts the option block
//! before the packet's own options and appends the message; [`detach`] removes exactly those
//! bytes, so the packet the kernel's TCP (and conntrack) then sees is byte-identical to the
//! one the sender's kernel wrote. Both fix the IP length fields and recompute the IPv4 header
//! and TCP checksums. IPv4 and IPv6 (without extension headers) are handled.
use std::net::{IpAddr, SocketAddr};

use pnet_packet::{
    ipv4::{self, Ipv4Packet, MutableIpv4Packet},
    ipv6::{Ipv6Packet, MutableIpv6Packet},
    tcp::{self, MutableTcpPacket, TcpPacket},
};
use thiserror::Error;

pub const OPTION_KIND: u8 = 253;
/// Our experimental option identifier (RFC 6994; not IANA-registered).
pub const EXID: u16 = 0x7E55;
const BLOCK: usize = 8;
const MAX_TCP_HEADER: usize = 60;
const IPPROTO_TCP: u8 = 6;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("not an IPv4 or IPv6 packet")]
    NotIp,
    #[error("not TCP (or IPv6 extension headers, which are not supported)")]
    NotTcp,
    #[error("truncated packet: {0}")]
    Truncated(&'static str),
    #[error("malformed handshake option: {0}")]
    BadOption(&'static str),
    #[error("no room in the TCP header for the handshake option")]
    NoRoom,
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
}

/// A packet split into IP header, TCP header and TCP payload.
struct Parts<'a> {
    v6: bool,
    ip: &'a [u8],
    tcp: &'a [u8],
    data: &'a [u8],
}

fn split(packet: &[u8]) -> Result<Parts<'_>, PacketError> {
    let version = packet.first().ok_or(PacketError::Truncated("empty"))? >> 4;
    let (v6, ip_len, total) = match version {
        4 => {
            let ip = Ipv4Packet::new(packet).ok_or(PacketError::Truncated("IPv4 header"))?;
            if ip.get_next_level_protocol().0 != IPPROTO_TCP {
                return Err(PacketError::NotTcp);
            }
            let ihl = ip.get_header_length() as usize * 4;
            (false, ihl, ip.get_total_length() as usize)
        }
        6 => {
            let ip = Ipv6Packet::new(packet).ok_or(PacketError::Truncated("IPv6 header"))?;
            if ip.get_next_header().0 != IPPROTO_TCP {
                return Err(PacketError::NotTcp);
            }
            (true, 40, 40 + ip.get_payload_length() as usize)
        }
        _ => return Err(PacketError::NotIp),
    };
    if ip_len < 20 || total < ip_len || packet.len() < total {
        return Err(PacketError::Truncated("IP length"));
    }
    let segment = &packet[ip_len..total];
    let tcp = TcpPacket::new(segment).ok_or(PacketError::Truncated("TCP header"))?;
    let off = tcp.get_data_offset() as usize * 4;
    if off < 20 || off > segment.len() {
        return Err(PacketError::Truncated("TCP data offset"));
    }
    Ok(Parts {
        v6,
        ip: &packet[..ip_len],
        tcp: &segment[..off],
        data: &segment[off..],
    })
}

/// The key id and tag of the fast path's option (kind 254, `tessera_common::fast`) if the
/// packet carries one. Such a packet reaching the engine is one the kernel could not verify.
pub fn fast_option(packet: &[u8]) -> Option<(u32, u64)> {
    let p = split(packet).ok()?;
    tessera_common::fast::find_option(&p.tcp[20..])
}

/// Reassembles a packet from its parts and fixes lengths and checksums.
fn assemble(v6: bool, ip: &[u8], tcp_header: &[u8], data: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ip.len() + tcp_header.len() + 512);
    out.extend_from_slice(ip);
    out.extend_from_slice(tcp_header);
    for d in data {
        out.extend_from_slice(d);
    }
    let ip_len = ip.len();
    let seg_len = out.len() - ip_len;
    {
        let (ip_part, seg) = out.split_at_mut(ip_len);
        let mut t = MutableTcpPacket::new(seg).expect("length checked");
        t.set_data_offset((tcp_header.len() / 4) as u8);
        t.set_checksum(0);
        if v6 {
            let mut h = MutableIpv6Packet::new(ip_part).expect("length checked");
            h.set_payload_length(seg_len as u16);
            let (s, d) = (h.get_source(), h.get_destination());
            let sum = tcp::ipv6_checksum(&t.to_immutable(), &s, &d);
            t.set_checksum(sum);
        } else {
            let mut h = MutableIpv4Packet::new(ip_part).expect("length checked");
            h.set_total_length((ip_len + seg_len) as u16);
            h.set_checksum(0);
            let sum = ipv4::checksum(&h.to_immutable());
            h.set_checksum(sum);
            let (s, d) = (h.get_source(), h.get_destination());
            let sum = tcp::ipv4_checksum(&t.to_immutable(), &s, &d);
            t.set_checksum(sum);
        }
    }
    out
}

/// The packet without its payload (lengths and checksums fixed): a SYN's data (TCP Fast
/// Open) must not reach an application before its sender proved itself. The sender's
/// kernel sends it again once the connection is established.
pub fn without_payload(packet: &[u8]) -> Result<Vec<u8>, PacketError> {
    let p = split(packet)?;
    if p.data.is_empty() {
        return Ok(packet.to_vec());
    }
    Ok(assemble(p.v6, p.ip, p.tcp, &[]))
}

/// The packet with its lengths and checksums made right again (tests: a packet an attacker
/// edited as a whole, checksums included).
#[cfg(any(test, feature = "testkit"))]
pub fn with_checksums_fixed(packet: &[u8]) -> Vec<u8> {
    let p = split(packet).expect("a TCP packet");
    assemble(p.v6, p.ip, p.tcp, &[p.data])
}

/// The packet with `data` appended to its payload (tests: a SYN carrying TCP Fast Open data).
#[cfg(any(test, feature = "testkit"))]
pub fn with_payload(packet: &[u8], data: &[u8]) -> Vec<u8> {
    let p = split(packet).expect("a TCP packet");
    assemble(p.v6, p.ip, p.tcp, &[p.data, data])
}

/// The packet with `message` attached (option block first among the TCP options, message
/// after any payload the packet already carries).
pub fn attach(packet: &[u8], message: &[u8]) -> Result<Vec<u8>, PacketError> {
    if message.len() > 1200 {
        return Err(PacketError::TooLarge(message.len()));
    }
    let p = split(packet)?;
    if p.tcp.len() + BLOCK > MAX_TCP_HEADER {
        return Err(PacketError::NoRoom);
    }
    let mut header = Vec::with_capacity(p.tcp.len() + BLOCK);
    header.extend_from_slice(&p.tcp[..20]);
    header.extend_from_slice(&[OPTION_KIND, 6]);
    header.extend_from_slice(&EXID.to_be_bytes());
    header.extend_from_slice(&(message.len() as u16).to_be_bytes());
    header.extend_from_slice(&[1, 1]);
    header.extend_from_slice(&p.tcp[20..]);
    Ok(assemble(p.v6, p.ip, &header, &[p.data, message]))
}

/// A packet restored as its sender's kernel wrote it, and the message it carried.
pub type Detached = (Vec<u8>, Vec<u8>);

/// If the packet carries our option: the packet as its sender's kernel wrote it, and the
/// message. `Ok(None)`: no handshake option (an ordinary packet, or a peer without an
/// enforcer).
pub fn detach(packet: &[u8]) -> Result<Option<Detached>, PacketError> {
    let p = split(packet)?;
    let opts = &p.tcp[20..];
    if opts.first() != Some(&OPTION_KIND) {
        // Ours is always first; a 253 option elsewhere is someone else's experiment.
        return Ok(None);
    }
    if opts.len() < BLOCK {
        return Err(PacketError::BadOption("truncated option"));
    }
    if opts[1] != 6 {
        return Err(PacketError::BadOption("wrong option length"));
    }
    if u16::from_be_bytes([opts[2], opts[3]]) != EXID {
        return Ok(None);
    }
    if opts[6..8] != [1, 1] {
        return Err(PacketError::BadOption("padding"));
    }
    let len = u16::from_be_bytes([opts[4], opts[5]]) as usize;
    if len > p.data.len() {
        return Err(PacketError::BadOption(
            "announced message longer than the payload",
        ));
    }
    let (data, message) = p.data.split_at(p.data.len() - len);
    let mut header = Vec::with_capacity(p.tcp.len() - BLOCK);
    header.extend_from_slice(&p.tcp[..20]);
    header.extend_from_slice(&opts[BLOCK..]);
    // A full handshake's packet never carries the fast path's option as well: one that does
    // (crafted, or written by a previous run's hooks) must not reach a listener, whose
    // callback would answer it in the kernel (docs/handshake.md, "Fast path").
    nop_fast_options(&mut header[20..]);
    Ok(Some((
        assemble(p.v6, p.ip, &header, &[data]),
        message.to_vec(),
    )))
}

/// Overwrites every fast path option (kind 254 with its ExID) in the TCP options `opts`
/// with NOPs: the header keeps its length, the kernel skips them.
fn nop_fast_options(opts: &mut [u8]) {
    use tessera_common::fast::{FAST_EXID, FAST_OPT_KIND};
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return,
            1 => i += 1,
            kind => {
                let Some(&len) = opts.get(i + 1) else { return };
                let len = len as usize;
                if len < 2 || i + len > opts.len() {
                    return;
                }
                if kind == FAST_OPT_KIND
                    && len >= 4
                    && opts[i + 2..i + 4] == FAST_EXID.to_be_bytes()
                {
                    opts[i..i + len].fill(1);
                }
                i += len;
            }
        }
    }
}

/// Whether the TCP checksum (and for IPv4 the header checksum) of `packet` is right.
pub fn checksums_ok(packet: &[u8]) -> bool {
    let Ok(p) = split(packet) else { return false };
    let seg_len = p.tcp.len() + p.data.len();
    let seg = &packet[p.ip.len()..p.ip.len() + seg_len];
    let Some(t) = TcpPacket::new(seg) else {
        return false;
    };
    if p.v6 {
        let h = Ipv6Packet::new(p.ip).expect("split checked");
        tcp::ipv6_checksum(&t, &h.get_source(), &h.get_destination()) == t.get_checksum()
    } else {
        let h = Ipv4Packet::new(p.ip).expect("split checked");
        ipv4::checksum(&h) == h.get_checksum()
            && tcp::ipv4_checksum(&t, &h.get_source(), &h.get_destination()) == t.get_checksum()
    }
}

/// The TCP flags of a packet (for the queue's dispatch).
pub fn tcp_flags(packet: &[u8]) -> Result<u8, PacketError> {
    let p = split(packet)?;
    Ok(TcpPacket::new(p.tcp)
        .ok_or(PacketError::Truncated("TCP header"))?
        .get_flags())
}

/// What the handshake engine needs to know of a TCP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
}

pub fn segment(packet: &[u8]) -> Result<Segment, PacketError> {
    let p = split(packet)?;
    let t = TcpPacket::new(p.tcp).ok_or(PacketError::Truncated("TCP header"))?;
    let (src, dst): (IpAddr, IpAddr) = if p.v6 {
        let h = Ipv6Packet::new(p.ip).expect("split checked");
        (h.get_source().into(), h.get_destination().into())
    } else {
        let h = Ipv4Packet::new(p.ip).expect("split checked");
        (h.get_source().into(), h.get_destination().into())
    };
    Ok(Segment {
        src: SocketAddr::new(src, t.get_source()),
        dst: SocketAddr::new(dst, t.get_destination()),
        seq: t.get_sequence(),
        ack: t.get_acknowledgement(),
        flags: t.get_flags(),
    })
}

/// A RST (with ACK) from `from` to `to`: how a refused handshake ends at once at the other
/// end instead of by timeout. `ack` must acknowledge the peer's SYN (its ISN + 1) for a
/// socket in SYN-SENT to accept it.
pub fn reset(from: SocketAddr, to: SocketAddr, seq: u32, ack: u32) -> Vec<u8> {
    build(from, to, seq, ack, tcp::TcpFlags::RST | tcp::TcpFlags::ACK)
}

/// A TCP segment without options or data (IPv4 if both ends are IPv4, else IPv6).
pub fn build(from: SocketAddr, to: SocketAddr, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let mut tcp_header = [0u8; 20];
    {
        let mut t = MutableTcpPacket::new(&mut tcp_header).expect("20 bytes");
        t.set_source(from.port());
        t.set_destination(to.port());
        t.set_sequence(seq);
        t.set_acknowledgement(ack);
        t.set_flags(flags);
        t.set_window(64_240);
    }
    match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = [0u8; 20];
            let mut h = MutableIpv4Packet::new(&mut ip).expect("20 bytes");
            h.set_version(4);
            h.set_header_length(5);
            h.set_ttl(64);
            h.set_next_level_protocol(pnet_packet::ip::IpNextHeaderProtocol(IPPROTO_TCP));
            h.set_source(s);
            h.set_destination(d);
            assemble(false, &ip, &tcp_header, &[])
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a,
                IpAddr::V4(a) => a.to_ipv6_mapped(),
            };
            let mut ip = [0u8; 40];
            let mut h = MutableIpv6Packet::new(&mut ip).expect("40 bytes");
            h.set_version(6);
            h.set_hop_limit(64);
            h.set_next_header(pnet_packet::ip::IpNextHeaderProtocol(IPPROTO_TCP));
            h.set_source(v6(s));
            h.set_destination(v6(d));
            assemble(true, &ip, &tcp_header, &[])
        }
    }
}

#[cfg(test)]
fn payload_of(packet: &[u8]) -> Vec<u8> {
    split(packet).map(|p| p.data.to_vec()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::{ip::IpNextHeaderProtocols, tcp::TcpFlags};
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A SYN as Linux writes it: MSS, SACK permitted, timestamps, NOP, window scale.
    fn tcp_segment(flags: u8, data: &[u8]) -> Vec<u8> {
        let opts = [
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ];
        tcp_segment_with(flags, &opts, data)
    }

    /// A segment with the TCP options `opts` (a multiple of 4 bytes).
    fn tcp_segment_with(flags: u8, opts: &[u8], data: &[u8]) -> Vec<u8> {
        let mut seg = vec![0u8; 20 + opts.len() + data.len()];
        seg[20..20 + opts.len()].copy_from_slice(opts);
        seg[20 + opts.len()..].copy_from_slice(data);
        let mut t = MutableTcpPacket::new(&mut seg).unwrap();
        t.set_source(40000);
        t.set_destination(8080);
        t.set_sequence(0x1234_5678);
        t.set_acknowledgement(if flags & TcpFlags::ACK != 0 { 99 } else { 0 });
        t.set_data_offset(((20 + opts.len()) / 4) as u8);
        t.set_flags(flags);
        t.set_window(64240);
        seg
    }

    /// An IPv4 header from 10.77.0.1 to 10.77.0.2 (lengths and checksum: `assemble`'s).
    fn ipv4_header() -> Vec<u8> {
        let mut ip = vec![0u8; 20];
        let mut h = MutableIpv4Packet::new(&mut ip).unwrap();
        h.set_version(4);
        h.set_header_length(5);
        h.set_ttl(64);
        h.set_next_level_protocol(IpNextHeaderProtocols::Tcp);
        h.set_source(Ipv4Addr::new(10, 77, 0, 1));
        h.set_destination(Ipv4Addr::new(10, 77, 0, 2));
        ip
    }

    fn v4(flags: u8, data: &[u8]) -> Vec<u8> {
        let seg = tcp_segment(flags, data);
        assemble(false, &ipv4_header(), &seg[..40], &[&seg[40..]])
    }

    fn v6(flags: u8, data: &[u8]) -> Vec<u8> {
        let seg = tcp_segment(flags, data);
        let mut pkt = vec![0u8; 40];
        let mut h = MutableIpv6Packet::new(&mut pkt).unwrap();
        h.set_version(6);
        h.set_next_header(IpNextHeaderProtocols::Tcp);
        h.set_hop_limit(64);
        h.set_source("fd77::1".parse::<Ipv6Addr>().unwrap());
        h.set_destination("fd77::2".parse::<Ipv6Addr>().unwrap());
        assemble(true, &pkt, &seg[..40], &[&seg[40..]])
    }

    /// A full handshake's SYN that also carries a fast path option (crafted: the kernel
    /// never writes both) loses the fast option on its way to the kernel: its listener would
    /// otherwise answer it with a tagged SYN-ACK. Other options stay as they were.
    #[test]
    fn a_fast_path_option_never_rides_through_the_engine_into_the_kernel() {
        let fast = tessera_common::fast::encode_option(7, 0x1122_3344_5566_7788);
        let mut opts = vec![2, 4, 0x05, 0xb4];
        opts.extend_from_slice(&fast);
        let seg = tcp_segment_with(TcpFlags::SYN, &opts, b"");
        let syn = assemble(false, &ipv4_header(), &seg, &[]);
        assert_eq!(fast_option(&syn), Some((7, 0x1122_3344_5566_7788)));
        let carried = attach(&syn, &[0xA5; 100]).unwrap();
        let (restored, message) = detach(&carried).unwrap().expect("our message");
        assert_eq!(message, vec![0xA5; 100]);
        assert_eq!(fast_option(&restored), None, "the fast option went through");
        assert!(checksums_ok(&restored));
        let p = split(&restored).unwrap();
        assert_eq!(
            &p.tcp[20..24],
            &[2, 4, 0x05, 0xb4],
            "the MSS option is kept"
        );
        assert_eq!(
            &p.tcp[24..],
            &[1u8; 16][..],
            "NOPs in the fast option's place"
        );
        assert_eq!(p.tcp.len(), seg.len(), "the header keeps its length");
    }

    #[test]
    fn attach_then_detach_gives_back_the_very_same_packet_v4_and_v6() {
        for (name, syn) in [
            ("v4", v4(TcpFlags::SYN, b"")),
            ("v6", v6(TcpFlags::SYN, b"")),
        ] {
            assert!(checksums_ok(&syn), "{name}: test packet");
            let message = vec![0xA5; 460];
            let carried = attach(&syn, &message).unwrap();
            assert!(checksums_ok(&carried), "{name}: checksums after attach");
            assert_eq!(carried.len(), syn.len() + 8 + message.len());
            assert_eq!(tcp_flags(&carried).unwrap(), TcpFlags::SYN);
            let (restored, got) = detach(&carried).unwrap().expect("our option");
            assert_eq!(got, message, "{name}");
            assert_eq!(restored, syn, "{name}: byte-identical after detach");
        }
    }

    #[test]
    fn data_already_in_the_packet_stays_in_front_of_the_message() {
        let ack = v4(TcpFlags::ACK, b"GET / HTTP/1.1\r\n");
        let carried = attach(&ack, &[7; 16]).unwrap();
        assert!(payload_of(&carried).starts_with(b"GET / HTTP/1.1\r\n"));
        let (restored, proof) = detach(&carried).unwrap().unwrap();
        assert_eq!((restored, proof), (ack, vec![7; 16]));
    }

    #[test]
    fn packets_without_our_option_pass_untouched() {
        let syn = v4(TcpFlags::SYN, b"");
        assert_eq!(detach(&syn).unwrap(), None);
    }

    #[test]
    fn truncated_and_lying_options_are_refused() {
        let carried = attach(&v4(TcpFlags::SYN, b""), &[1; 100]).unwrap();
        // The option announces more message than the packet carries.
        let mut lying = carried.clone();
        let at = 20 + 20 + 4;
        lying[at..at + 2].copy_from_slice(&500u16.to_be_bytes());
        assert!(matches!(detach(&lying), Err(PacketError::BadOption(_))));
        // Wrong option length byte.
        let mut bad = carried.clone();
        bad[20 + 20 + 1] = 4;
        assert!(matches!(detach(&bad), Err(PacketError::BadOption(_))));
        // Cut anywhere: refused, never a panic.
        for cut in 0..carried.len() {
            let _ = detach(&carried[..cut]);
        }
        assert!(matches!(
            detach(&carried[..30]),
            Err(PacketError::Truncated(_))
        ));
    }

    #[test]
    fn a_full_tcp_header_has_no_room_and_non_tcp_is_refused() {
        let mut syn = v4(TcpFlags::SYN, b"");
        // Grow the options to 40 bytes (NOPs): a 60-byte header.
        let mut seg = syn[20..].to_vec();
        seg.splice(40..40, [1u8; 20]);
        let hdr = syn[..20].to_vec();
        syn = assemble(false, &hdr, &seg[..60], &[&seg[60..]]);
        assert_eq!(attach(&syn, b"x"), Err(PacketError::NoRoom));
        let mut udp = v4(TcpFlags::SYN, b"");
        udp[9] = 17;
        assert_eq!(attach(&udp, b"x"), Err(PacketError::NotTcp));
        assert_eq!(attach(&[0x50; 40], b"x"), Err(PacketError::NotIp));
    }
}
