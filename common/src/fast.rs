//! The handshake fast path's kernel-side cryptography and wire format, shared by the eBPF
//! programs (which write and verify the option) and user space (which installs the keys and
//! tests both against a reference implementation).
//!
//! After a first full handshake between two workloads, both enforcers hold a 128-bit pair
//! secret and a key id (derived from that handshake's proof key and transcript, see
//! `tessera_proxy::handshake::fast`). Later connections of the pair carry, in their SYN,
//! SYN-ACK and first ACK, a 16-byte TCP option (RFC 6994 experimental kind 254, its own
//! ExID) holding the key id and a 64-bit SipHash-2-4 tag over both addresses, both ports,
//! the ISNs seen so far, the key's epoch and a per-packet label. SipHash is a PRF built for
//! short inputs from add-rotate-xor on 64-bit words: no tables, no helpers, a bounded
//! number of instructions, so the verifier accepts it and it costs about 100 ns per tag.
//! There are no HMAC helpers in BPF. The code here is plain `no_std` Rust, compiled into
//! the eBPF object and unit-tested on the host against the `siphasher` crate.

/// TCP option kind of the fast path's proof: RFC 6994 shared experimental kind 254 (the
/// full handshake's messages use 253, so the rules that queue those never match this).
pub const FAST_OPT_KIND: u8 = 254;
/// Length of the whole option: kind, length, ExID (2), key id (4), tag (8).
pub const FAST_OPT_LEN: u8 = 16;
/// Our RFC 6994 experiment identifier (distinct from the full handshake's 0x7E55).
pub const FAST_EXID: u16 = 0x7E56;

/// Labels mixed into the tag: one per packet of the handshake, so that no tag is valid
/// as another packet's (a SYN's tag replayed as a first ACK's, say).
pub const LABEL_SYN: u64 = u64::from_le_bytes(*b"tfv1-SYN");
pub const LABEL_SYNACK: u64 = u64::from_le_bytes(*b"tfv1-SAK");
pub const LABEL_ACK: u64 = u64::from_le_bytes(*b"tfv1-ACK");

/// Words of a tag's input (64 bytes).
pub const MAC_WORDS: usize = 8;

#[inline(always)]
fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

/// SipHash-2-4 of the message made of `words` as little-endian 8-byte blocks (its length
/// is `8 * MAC_WORDS` bytes), under the 128-bit key `(k0, k1)` (the key's two little-endian
/// halves). Equal to the reference SipHash-2-4 of those 64 bytes.
#[inline(always)]
pub fn siphash24(k0: u64, k1: u64, words: &[u64; MAC_WORDS]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let mut i = 0;
    while i < MAC_WORDS {
        let m = words[i];
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
        i += 1;
    }
    // The final block: no bytes left over, the length (mod 256) in the top byte.
    let b = ((MAC_WORDS as u64 * 8) & 0xff) << 56;
    v[3] ^= b;
    round(&mut v);
    round(&mut v);
    v[0] ^= b;
    v[2] ^= 0xff;
    round(&mut v);
    round(&mut v);
    round(&mut v);
    round(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// What a tag covers. Addresses as the kernel stores them (network byte order in each
/// u32; IPv4 in `[0]`, the rest zero), ports in host byte order, ISNs as on the wire (host
/// byte order values). `server_isn` is 0 in the SYN's tag (not chosen yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TagInput {
    pub label: u64,
    pub epoch: u32,
    pub key_id: u32,
    pub client: [u32; 4],
    pub server: [u32; 4],
    pub client_port: u16,
    pub server_port: u16,
    pub family: u16,
    pub client_isn: u32,
    pub server_isn: u32,
}

#[inline(always)]
fn pair(a: u32, b: u32) -> u64 {
    (a as u64) | ((b as u64) << 32)
}

impl TagInput {
    /// The input as SipHash blocks (fixed layout: both ends and the test vectors agree).
    #[inline(always)]
    pub fn words(&self) -> [u64; MAC_WORDS] {
        [
            self.label,
            pair(self.epoch, self.key_id),
            pair(self.client[0], self.client[1]),
            pair(self.client[2], self.client[3]),
            pair(self.server[0], self.server[1]),
            pair(self.server[2], self.server[3]),
            (self.client_port as u64)
                | ((self.server_port as u64) << 16)
                | ((self.family as u64) << 32),
            pair(self.client_isn, self.server_isn),
        ]
    }

    /// The 64-bit tag under the pair secret `key` (its two little-endian halves).
    #[inline(always)]
    pub fn tag(&self, key: &[u64; 2]) -> u64 {
        siphash24(key[0], key[1], &self.words())
    }
}

/// The option's bytes: kind 254, length 16, ExID, key id (big-endian), tag (big-endian).
#[inline(always)]
pub fn encode_option(key_id: u32, tag: u64) -> [u8; FAST_OPT_LEN as usize] {
    let mut o = [0u8; FAST_OPT_LEN as usize];
    o[0] = FAST_OPT_KIND;
    o[1] = FAST_OPT_LEN;
    let exid = FAST_EXID.to_be_bytes();
    o[2] = exid[0];
    o[3] = exid[1];
    let id = key_id.to_be_bytes();
    let mut i = 0;
    while i < 4 {
        o[4 + i] = id[i];
        i += 1;
    }
    let t = tag.to_be_bytes();
    let mut i = 0;
    while i < 8 {
        o[8 + i] = t[i];
        i += 1;
    }
    o
}

/// The key id and tag of a fast-path option, if `o` is one (right kind, length and ExID).
#[inline(always)]
pub fn decode_option(o: &[u8; FAST_OPT_LEN as usize]) -> Option<(u32, u64)> {
    if o[0] != FAST_OPT_KIND
        || o[1] != FAST_OPT_LEN
        || u16::from_be_bytes([o[2], o[3]]) != FAST_EXID
    {
        return None;
    }
    let key_id = u32::from_be_bytes([o[4], o[5], o[6], o[7]]);
    let tag = u64::from_be_bytes([o[8], o[9], o[10], o[11], o[12], o[13], o[14], o[15]]);
    Some((key_id, tag))
}

/// Finds the fast-path option among a TCP header's options (`opts`: the bytes after the
/// fixed 20-byte header) and decodes it. Bounded: at most 40 bytes are walked.
pub fn find_option(opts: &[u8]) -> Option<(u32, u64)> {
    let mut buf = [0u8; 40];
    let n = if opts.len() < 40 { opts.len() } else { 40 };
    let mut i = 0;
    while i < n {
        buf[i] = opts[i];
        i += 1;
    }
    find_option_in(&buf, n)
}

/// [`find_option`] over the first `n` bytes of a fixed buffer, without any operation that
/// could panic (the eBPF verifier accepts no panic path): every access is checked with
/// `get`, every loop bounded.
#[inline(always)]
pub fn find_option_in<const N: usize>(opts: &[u8; N], n: usize) -> Option<(u32, u64)> {
    let n = if n < 40 { n } else { 40 };
    let mut i = 0usize;
    // Each step consumes at least one byte: at most 40 steps.
    let mut steps = 0;
    while steps < 40 && i < n {
        steps += 1;
        let kind = *opts.get(i)?;
        if kind == 0 {
            return None;
        }
        if kind == 1 {
            i += 1;
            continue;
        }
        let len = *opts.get(i + 1)? as usize;
        if len < 2 || i + len > n {
            return None;
        }
        if kind == FAST_OPT_KIND && len == FAST_OPT_LEN as usize {
            let mut o = [0u8; FAST_OPT_LEN as usize];
            let mut j = 0;
            while j < FAST_OPT_LEN as usize {
                o[j] = *opts.get(i + j)?;
                j += 1;
            }
            if let Some(v) = decode_option(&o) {
                return Some(v);
            }
        }
        i += len;
    }
    None
}

/// Key of the client's fast map: who connects (cgroup and uid of the caller, as the connect
/// hook sees them) and to where. A pair secret serves only the workload that completed the
/// full handshake, towards the same destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FastClientKey {
    pub cgroup_id: u64,
    pub uid: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Destination port, host byte order.
    pub port: u16,
    /// Destination address, network byte order; IPv4 in `[0]`.
    pub addr: [u32; 4],
}

/// A pair secret as one end holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastKey {
    /// The secret's two little-endian halves.
    pub secret: [u64; 2],
    pub key_id: u32,
    pub epoch: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) after which the key is not used.
    pub expires_ns: u64,
}

/// The server's entry for a key id: the key, and the client address it was agreed with
/// (a tag from any other address is refused before any hashing).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastServerEntry {
    pub key: FastKey,
    /// The client's address (network byte order; IPv4 in `[0]`), the server's port.
    pub client: [u32; 4],
    pub server_port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// What the fast path's programs need from the configuration (a one-element array;
/// `socket_mark` 0: the fast path is off).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastSettings {
    /// `SO_MARK` of client sockets on the fast path (differs from the handshake mark, so
    /// that no queueing rule matches them).
    pub socket_mark: u32,
    /// Packet mark bit `verify_fast` sets on a verified SYN (server) or SYN-ACK (client):
    /// the raw rules let it pass, and it is saved in the connmark (the server's SYN-ACK is
    /// then not queued).
    pub fast_bit: u32,
    /// The handshake's proven bit, set on a verified first ACK (server).
    pub proven_bit: u32,
    pub _pad: u32,
}

/// A connection's 4-tuple as one end sees it (local first); addresses as in
/// [`FastClientKey`], IPv4-mapped ones as IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FastTuple {
    pub local: [u32; 4],
    pub remote: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    pub _pad: u16,
}

/// A client socket on the fast path (by cookie): its key, and once its SYN went, its ISN
/// and how many segments after it were tagged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastSock {
    pub key: FastKey,
    /// Where the key came from (forgotten if the server refuses it).
    pub client: FastClientKey,
    pub client_isn: u32,
    pub tagged: u32,
}

/// A client connection whose SYN went out tagged, until its SYN-ACK.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPending {
    pub key: FastKey,
    pub client: FastClientKey,
    pub client_isn: u32,
    /// 1 once the server refused the fast SYN (a reset: it holds no key for it, or its
    /// listener cannot tag): the SYN's retransmission goes the full handshake's way.
    pub fallback: u32,
}

/// A connection the fast path let through, reported when it is established (client:
/// `ACTIVE_ESTABLISHED`; server: `PASSIVE_ESTABLISHED`) in the `TESSERA_FAST_EVENTS` ring,
/// so that the enforcer records and watches it like a connection of the full handshake.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastConn {
    pub tuple: FastTuple,
    pub key_id: u32,
    /// 1 at the server end, 0 at the client end.
    pub server: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when it was established.
    pub at_ns: u64,
}

/// Size of the fast path's event ring (bytes; a power of two, whole pages).
pub const FAST_EVENTS_BYTES: u32 = 1 << 20;

/// Indexes of the fast path's counters (`TESSERA_FAST_STATS`).
pub const STAT_SYN_OK: u32 = 0;
pub const STAT_SYNACK_OK: u32 = 1;
pub const STAT_ACK_OK: u32 = 2;
/// A tag that did not verify, or an unknown / expired key id, or the wrong peer.
pub const STAT_FAILED: u32 = 3;
/// A SYN-ACK for a tagged SYN without a valid tag, dropped.
pub const STAT_SYNACK_DROPPED: u32 = 4;
pub const STATS: u32 = 5;

/// Capacity of the fast-path maps.
pub const FAST_CLIENT_ENTRIES: u32 = 16_384;
pub const FAST_SERVER_ENTRIES: u32 = 16_384;
pub const FAST_VERDICT_ENTRIES: u32 = 16_384;
/// Connections whose SYN went out with a fast tag, waiting for their SYN-ACK (LRU).
pub const FAST_PENDING_ENTRIES: u32 = 65_536;

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::hash::Hasher;
    use siphasher::sip::SipHasher24;

    fn reference(key: &[u64; 2], words: &[u64; MAC_WORDS]) -> u64 {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&key[0].to_le_bytes());
        k[8..].copy_from_slice(&key[1].to_le_bytes());
        let mut h = SipHasher24::new_with_key(&k);
        for w in words {
            h.write(&w.to_le_bytes());
        }
        h.finish()
    }

    #[test]
    fn siphash_matches_the_reference_on_many_inputs() {
        let mut x: u64 = 0x0123_4567_89ab_cdef;
        let mut next = || {
            // xorshift64*: deterministic, varied inputs.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        for _ in 0..1000 {
            let key = [next(), next()];
            let mut words = [0u64; MAC_WORDS];
            for w in &mut words {
                *w = next();
            }
            assert_eq!(siphash24(key[0], key[1], &words), reference(&key, &words));
        }
    }

    #[test]
    fn siphash_matches_the_reference_on_the_papers_key_and_message_pattern() {
        // The SipHash paper's key 00..0f and message pattern 00..3f (64 bytes; the paper
        // lists vectors up to 63 bytes, so the reference is siphasher).
        let key = [
            u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]),
            u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]),
        ];
        let mut words = [0u64; MAC_WORDS];
        for (i, w) in words.iter_mut().enumerate() {
            let b: [u8; 8] = core::array::from_fn(|j| (i * 8 + j) as u8);
            *w = u64::from_le_bytes(b);
        }
        assert_eq!(siphash24(key[0], key[1], &words), reference(&key, &words));
    }

    fn input() -> TagInput {
        TagInput {
            label: LABEL_SYN,
            epoch: 3,
            key_id: 0xdead_beef,
            client: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
            server: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
            client_port: 40_000,
            server_port: 8080,
            family: 2,
            client_isn: 0x1234_5678,
            server_isn: 0,
        }
    }

    #[test]
    fn every_input_changes_the_tag() {
        let key = [1, 2];
        let base = input().tag(&key);
        let variants: [fn(&mut TagInput); 11] = [
            |t| t.label = LABEL_SYNACK,
            |t| t.epoch += 1,
            |t| t.key_id ^= 1,
            |t| t.client[0] ^= 1,
            |t| t.client[3] ^= 1,
            |t| t.server[0] ^= 1 << 24,
            |t| t.client_port += 1,
            |t| t.server_port += 1,
            |t| t.family = 10,
            |t| t.client_isn += 1,
            |t| t.server_isn += 1,
        ];
        for (i, v) in variants.iter().enumerate() {
            let mut t = input();
            v(&mut t);
            assert_ne!(t.tag(&key), base, "variant {i}");
        }
        assert_ne!(input().tag(&[1, 3]), base, "key");
        // Swapping the ends is a different tag (no reflection).
        let mut t = input();
        core::mem::swap(&mut t.client, &mut t.server);
        core::mem::swap(&mut t.client_port, &mut t.server_port);
        assert_ne!(t.tag(&key), base);
    }

    #[test]
    fn option_round_trips_and_refuses_lookalikes() {
        let o = encode_option(0x0102_0304, 0x1122_3344_5566_7788);
        assert_eq!(
            o,
            [
                254, 16, 0x7e, 0x56, 1, 2, 3, 4, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88
            ]
        );
        assert_eq!(
            decode_option(&o),
            Some((0x0102_0304, 0x1122_3344_5566_7788))
        );
        let mut bad = o;
        bad[0] = 253;
        assert_eq!(decode_option(&bad), None);
        let mut bad = o;
        bad[1] = 15;
        assert_eq!(decode_option(&bad), None);
        let mut bad = o;
        bad[3] = 0x55;
        assert_eq!(decode_option(&bad), None, "the full handshake's ExID");
    }

    #[test]
    fn option_is_found_among_linux_syn_options() {
        // MSS, SACK-permitted, timestamps, NOP, window scale, then ours (40 bytes).
        let mut opts = std::vec![
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7
        ];
        opts.extend_from_slice(&encode_option(7, 99));
        opts.extend_from_slice(&[1, 1, 1, 1]);
        assert_eq!(find_option(&opts), Some((7, 99)));
        // Cut short, lying lengths, end of options before it: nothing.
        assert_eq!(find_option(&opts[..30]), None);
        let mut lying = opts.clone();
        lying[1] = 60;
        assert_eq!(find_option(&lying), None);
        let mut zero = opts.clone();
        zero[1] = 0;
        assert_eq!(find_option(&zero), None);
        let mut eol = opts.clone();
        eol[16] = 0;
        assert_eq!(find_option(&eol), None);
        // A kind-254 option of another experiment is skipped, ours after it found.
        let mut other = std::vec![254, 6, 0x12, 0x34, 0, 0];
        other.extend_from_slice(&encode_option(8, 5));
        assert_eq!(find_option(&other), Some((8, 5)));
    }
}
