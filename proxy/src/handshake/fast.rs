//! The fast path's pair secret (issue 16 item 5): what both ends of a completed full
//! handshake derive, so that the kernel can prove their later connections with a short MAC
//! in a TCP option (`tessera_common::fast`) without a trip through user space.
//!
//! The secret comes from the handshake's proof key (X25519 between ephemeral keys, which
//! never leave the two enforcers) and the transcript's digest (both ISNs, both tokens with
//! their nonces, both public keys): pair secret ‖ key id = HMAC-SHA256(proof key,
//! "tessera-fast-v1" ‖ digest), the first 16 bytes the secret and the next 4 the key id.
//! The distinct label keeps it apart from the proofs (labels "server" / "client"), which
//! travel on the wire; the digest makes it unique per handshake even when the ephemeral keys
//! (and so the proof key) are reused within `key_reuse_ms`. Both ends compute it from what
//! they already hold, so nothing is added to the handshake's messages; the key id is
//! random-looking (a collision at a server only sends a pair back to the slow path).
use std::net::SocketAddr;

use ring::hmac;
use zeroize::Zeroizing;

use super::proof::ProofKey;
use crate::identity::token::KeyId;

/// Label of the fast path's derivation (version 1).
const LABEL: &[u8] = b"tessera-fast-v1";

/// A pair secret and its id, as both ends of one full handshake derive them.
#[derive(Clone, PartialEq, Eq)]
pub struct FastPair {
    /// The SipHash key's two little-endian halves.
    pub secret: [u64; 2],
    /// The id the option carries, by which the server finds the secret.
    pub key_id: u32,
}

impl std::fmt::Debug for FastPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPair")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl FastPair {
    /// The pair of the handshake whose transcript digest is `digest`, under its proof key.
    pub fn derive(proof_key: &ProofKey, digest: &[u8; 32]) -> Self {
        let mut ctx = hmac::Context::with_key(proof_key.hmac_key());
        ctx.update(LABEL);
        ctx.update(digest);
        let out = Zeroizing::new(ctx.sign().as_ref().to_vec());
        let half = |i: usize| u64::from_le_bytes(out[i..i + 8].try_into().expect("8 bytes"));
        Self {
            secret: [half(0), half(8)],
            key_id: u32::from_be_bytes(out[16..20].try_into().expect("4 bytes")),
        }
    }
}

/// The peer enforcer whose full handshake agreed a pair secret, as this end's directory
/// knew it when the handshake began: what the key relies on, so that a directory change
/// revokes only the keys of the peer it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastPeer {
    /// Its name in the directory.
    pub name: String,
    /// Its certified key (the one its token was sealed or checked with).
    pub key: KeyId,
    /// The directory's generation ([`crate::peers::Directory::generation`]) read before
    /// anything else of the handshake's directory look-ups.
    pub directory: u64,
}

/// A pair secret one end agreed, with what its kernel needs to use it. Only a full
/// handshake with a peer enforcer agrees one: external peers have no proof key.
#[derive(Clone, Debug)]
pub struct FastGrant {
    pub pair: FastPair,
    /// Who the other end's enforcer is.
    pub peer: FastPeer,
    /// This end and the other, as the handshake's packets carried them.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Client end: the calling process's cgroup id and uid, as the connect hook saw them
    /// (the key serves only them, towards `remote`). None at the server end.
    pub caller: Option<(u64, u32)>,
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;

    use super::*;
    use crate::handshake::proof::{Ephemeral, Transcript};

    fn transcript(client_isn: u32) -> Transcript {
        let a: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        Transcript {
            client: a,
            server: b,
            client_isn,
            server_isn: 77,
            syn_token: vec![1; 40],
            client_key: [0; 32],
            synack_token: vec![2; 40],
            server_key: [0; 32],
        }
    }

    #[test]
    fn both_ends_derive_the_same_pair_and_other_handshakes_differ() {
        let rng = SystemRandom::new();
        let c = Ephemeral::generate(&rng, 0);
        let s = Ephemeral::generate(&rng, 0);
        let ck = c.agree(&s.public).unwrap();
        let sk = s.agree(&c.public).unwrap();
        let d = transcript(1).digest();
        let at_client = FastPair::derive(&ck, &d);
        let at_server = FastPair::derive(&sk, &d);
        assert_eq!(at_client, at_server);
        // Same keys (reused within the window), another handshake: another pair.
        let other = FastPair::derive(&ck, &transcript(2).digest());
        assert_ne!(other.secret, at_client.secret);
        assert_ne!(other.key_id, at_client.key_id);
        // Another exchange, same transcript: another pair.
        let e = Ephemeral::generate(&rng, 0);
        let third = FastPair::derive(&e.agree(&s.public).unwrap(), &d);
        assert_ne!(third.secret, at_client.secret);
        // Not the proofs: the secret is not any proof that travelled.
        let proof = ck.prove_digest(crate::handshake::proof::Role::Client, &d);
        assert_ne!(proof[..8], at_client.secret[0].to_le_bytes());
        // The secret does not show in Debug.
        assert!(!format!("{at_client:?}").contains(&at_client.secret[0].to_string()));
    }
}
