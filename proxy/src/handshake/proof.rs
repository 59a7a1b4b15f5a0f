//! The handshake's key exchange and proofs.
//!
//! The SYN carries the source workload's token and the client's ephemeral X25519 public key;
//! the SYN-ACK the destination workload's token, the server's ephemeral public key and the
//! server's proof; the third ACK the client's proof. A proof is HMAC-SHA256 (a real HMAC,
//! keyed by the exchanged secret, truncated to 16 bytes) over the transcript: both
//! addresses and ports, both initial sequence numbers, both tokens and both public keys. So:
//! * a captured SYN replayed by someone else yields a SYN-ACK for a fresh server key, and
//!   without the client's private key no valid ACK proof can follow;
//! * a tampered SYN-ACK (token, key or sequence number) fails the client's check;
//! * ephemeral keys are fresh: random, never stored, and each used for at most
//!   `key_reuse_ms` (default 1 s; 0: one per connection). Within that window the agreed
//!   proof key of a (our key, their key) pair is computed once ([`KeyExchange`]): what makes
//!   each proof unique is the transcript (both ISNs, both tokens with their nonces), and
//!   what makes it unforgeable is the secret, which never leaves the enforcer.
//!
//! Tokens are bound to the handshake: the SYN token's binding is a digest of the client's
//! public key and ISN, the SYN-ACK token's a digest of the transcript so far.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use curve25519_dalek::MontgomeryPoint;
use ring::{
    agreement,
    digest::{self, SHA256},
    hmac,
    rand::{SecureRandom, SystemRandom},
};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::identity::token::Binding;

pub const PROOF_LEN: usize = 16;
pub type Proof = [u8; PROOF_LEN];
pub type PublicKey = [u8; 32];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProofError {
    #[error("key exchange failed (bad public key)")]
    KeyExchange,
    #[error("handshake proof does not verify")]
    BadProof,
}

/// What both ends agree the handshake was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transcript {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub client_isn: u32,
    pub server_isn: u32,
    pub syn_token: Vec<u8>,
    pub client_key: PublicKey,
    pub synack_token: Vec<u8>,
    pub server_key: PublicKey,
}

fn put_addr(d: &mut digest::Context, a: &SocketAddr) {
    match a {
        SocketAddr::V4(v4) => d.update(&v4.ip().octets()),
        SocketAddr::V6(v6) => d.update(&v6.ip().octets()),
    }
    d.update(&a.port().to_be_bytes());
}

fn put_bytes(d: &mut digest::Context, b: &[u8]) {
    d.update(&(b.len() as u32).to_be_bytes());
    d.update(b);
}

impl Transcript {
    /// Everything the SYN-ACK answers (all but the server's own parts).
    fn syn_part(&self, d: &mut digest::Context) {
        d.update(b"tessera-handshake-v1");
        put_addr(d, &self.client);
        put_addr(d, &self.server);
        d.update(&self.client_isn.to_be_bytes());
        put_bytes(d, &self.syn_token);
        d.update(&self.client_key);
    }

    pub fn digest(&self) -> [u8; 32] {
        let mut d = digest::Context::new(&SHA256);
        self.syn_part(&mut d);
        d.update(&self.server_isn.to_be_bytes());
        put_bytes(&mut d, &self.synack_token);
        d.update(&self.server_key);
        d.finish().as_ref().try_into().expect("32 bytes")
    }
}

/// The binding of the SYN's token: the client's public key and ISN.
pub fn syn_binding(client_key: &PublicKey, client_isn: u32) -> Binding {
    let mut d = digest::Context::new(&SHA256);
    d.update(b"tessera-syn-binding");
    d.update(client_key);
    d.update(&client_isn.to_be_bytes());
    d.finish().as_ref()[..16].try_into().expect("16 bytes")
}

/// The binding of the SYN-ACK's token: the SYN it answers and the server's key and ISN.
pub fn synack_binding(t: &Transcript) -> Binding {
    let mut d = digest::Context::new(&SHA256);
    d.update(b"tessera-synack-binding");
    t.syn_part(&mut d);
    d.update(&t.server_isn.to_be_bytes());
    d.update(&t.server_key);
    d.finish().as_ref()[..16].try_into().expect("16 bytes")
}

/// The private half of an ephemeral key.
enum Secret {
    /// Serves every handshake of its window.
    Reusable(Zeroizing<[u8; 32]>),
    /// Serves one handshake (`key_reuse_ms = 0`): ring's single-use key, whose X25519 is
    /// the faster one here; the agreement takes it.
    SingleUse(Mutex<Option<agreement::EphemeralPrivateKey>>),
}

/// One side's ephemeral X25519 key.
pub struct Ephemeral {
    secret: Secret,
    pub public: PublicKey,
    created_ms: u64,
}

/// HKDF-style extraction: the raw X25519 output is not used as a key directly.
fn proof_key(shared: &[u8]) -> ProofKey {
    let salt = hmac::Key::new(hmac::HMAC_SHA256, b"tessera-handshake-key");
    ProofKey(hmac::Key::new(
        hmac::HMAC_SHA256,
        hmac::sign(&salt, shared).as_ref(),
    ))
}

impl Ephemeral {
    /// A key that may serve many handshakes.
    pub fn generate(rng: &SystemRandom, now_ms: u64) -> Self {
        let mut secret = Zeroizing::new([0u8; 32]);
        rng.fill(secret.as_mut()).expect("system randomness");
        let public = MontgomeryPoint::mul_base_clamped(*secret).to_bytes();
        Self {
            secret: Secret::Reusable(secret),
            public,
            created_ms: now_ms,
        }
    }

    /// A key for exactly one handshake: a second agreement fails.
    pub fn single_use(rng: &SystemRandom, now_ms: u64) -> Self {
        let key = agreement::EphemeralPrivateKey::generate(&agreement::X25519, rng)
            .expect("system randomness");
        let public = key
            .compute_public_key()
            .expect("X25519 public key")
            .as_ref()
            .try_into()
            .expect("32 bytes");
        Self {
            secret: Secret::SingleUse(Mutex::new(Some(key))),
            public,
            created_ms: now_ms,
        }
    }

    /// The shared proof key with the peer's public key.
    pub fn agree(&self, peer: &PublicKey) -> Result<ProofKey, ProofError> {
        match &self.secret {
            Secret::Reusable(secret) => {
                let shared =
                    Zeroizing::new(MontgomeryPoint(*peer).mul_clamped(**secret).to_bytes());
                if *shared == [0; 32] {
                    // A key of small order: the exchange would yield zero for any secret.
                    return Err(ProofError::KeyExchange);
                }
                Ok(proof_key(shared.as_ref()))
            }
            Secret::SingleUse(key) => {
                let key = key
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .ok_or(ProofError::KeyExchange)?;
                // ring refuses keys of small order itself.
                agreement::agree_ephemeral(
                    key,
                    &agreement::UnparsedPublicKey::new(&agreement::X25519, peer),
                    proof_key,
                )
                .map_err(|_| ProofError::KeyExchange)
            }
        }
    }
}

/// Agreed proof keys kept at most (a bound, not a working-set size: a handful of peer keys
/// are live per window).
const AGREED_KEPT: usize = 4096;

/// One end's ephemeral keys: the current one (rotated every `reuse_ms`) and the proof keys
/// agreed with it.
pub struct KeyExchange {
    reuse_ms: u64,
    rng: SystemRandom,
    current: Mutex<Option<Arc<Ephemeral>>>,
    agreed: Mutex<HashMap<(PublicKey, PublicKey), ProofKey>>,
}

impl KeyExchange {
    /// `reuse_ms`: how long one ephemeral key serves (0: a new key per connection).
    pub fn new(reuse_ms: u64) -> Self {
        Self {
            reuse_ms,
            rng: SystemRandom::new(),
            current: Mutex::default(),
            agreed: Mutex::default(),
        }
    }

    /// The key for a handshake starting now.
    pub fn key(&self, now_ms: u64) -> Arc<Ephemeral> {
        if self.reuse_ms == 0 {
            return Arc::new(Ephemeral::single_use(&self.rng, now_ms));
        }
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        match &*current {
            Some(k) if now_ms.saturating_sub(k.created_ms) < self.reuse_ms => k.clone(),
            _ => {
                let k = Arc::new(Ephemeral::generate(&self.rng, now_ms));
                *current = Some(k.clone());
                // Keys agreed with the previous key serve only handshakes still in flight.
                self.agreed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|(mine, _), _| *mine == k.public);
                k
            }
        }
    }

    /// The proof key of `mine` and the peer's `theirs`.
    pub fn agree(&self, mine: &Ephemeral, theirs: &PublicKey) -> Result<ProofKey, ProofError> {
        if self.reuse_ms == 0 {
            return mine.agree(theirs);
        }
        let pair = (mine.public, *theirs);
        if let Some(k) = self
            .agreed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pair)
        {
            return Ok(k.clone());
        }
        let k = mine.agree(theirs)?;
        let mut agreed = self.agreed.lock().unwrap_or_else(|e| e.into_inner());
        if agreed.len() >= AGREED_KEPT {
            agreed.clear();
        }
        agreed.insert(pair, k.clone());
        Ok(k)
    }
}

/// The key both ends derive from the exchange; it signs and checks proofs.
#[derive(Clone)]
pub struct ProofKey(hmac::Key);

#[derive(Clone, Copy)]
pub enum Role {
    Server,
    Client,
}

impl ProofKey {
    /// The HMAC key, for the fast path's derivation (`super::fast`).
    pub(super) fn hmac_key(&self) -> &hmac::Key {
        &self.0
    }

    pub fn prove(&self, role: Role, t: &Transcript) -> Proof {
        self.prove_digest(role, &t.digest())
    }

    /// [`Self::prove`] of a transcript whose digest is at hand (one digest serves both
    /// proofs of an end).
    pub fn prove_digest(&self, role: Role, digest: &[u8; 32]) -> Proof {
        let label: &[u8] = match role {
            Role::Server => b"server",
            Role::Client => b"client",
        };
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(label);
        ctx.update(digest);
        ctx.sign().as_ref()[..PROOF_LEN]
            .try_into()
            .expect("16 bytes")
    }

    /// Constant-time check of the peer's proof.
    pub fn check(&self, role: Role, t: &Transcript, proof: &Proof) -> Result<(), ProofError> {
        self.check_digest(role, &t.digest(), proof)
    }

    /// [`Self::check`] of a transcript whose digest is at hand.
    pub fn check_digest(
        &self,
        role: Role,
        digest: &[u8; 32],
        proof: &Proof,
    ) -> Result<(), ProofError> {
        use subtle::ConstantTimeEq;
        let want = self.prove_digest(role, digest);
        if bool::from(want.ct_eq(proof)) {
            Ok(())
        } else {
            Err(ProofError::BadProof)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Exchange {
        transcript: Transcript,
        client_key: ProofKey,
        server_key: ProofKey,
    }

    fn handshake(rng: &SystemRandom) -> Exchange {
        let client = Ephemeral::generate(rng, 0);
        let server = Ephemeral::generate(rng, 0);
        let transcript = Transcript {
            client: "10.77.0.1:40000".parse().unwrap(),
            server: "10.77.0.2:8080".parse().unwrap(),
            client_isn: 1,
            server_isn: 2,
            syn_token: vec![1; 197],
            client_key: client.public,
            synack_token: vec![2; 157],
            server_key: server.public,
        };
        Exchange {
            server_key: server.agree(&transcript.client_key).unwrap(),
            client_key: client.agree(&transcript.server_key).unwrap(),
            transcript,
        }
    }

    #[test]
    fn both_proofs_verify_on_an_honest_handshake() {
        let rng = SystemRandom::new();
        let x = handshake(&rng);
        let server_proof = x.server_key.prove(Role::Server, &x.transcript);
        x.client_key
            .check(Role::Server, &x.transcript, &server_proof)
            .unwrap();
        let client_proof = x.client_key.prove(Role::Client, &x.transcript);
        x.server_key
            .check(Role::Client, &x.transcript, &client_proof)
            .unwrap();
        // A proof for one role is not a proof for the other (no reflection).
        assert_eq!(
            x.server_key
                .check(Role::Client, &x.transcript, &server_proof),
            Err(ProofError::BadProof)
        );
    }

    #[test]
    fn a_tampered_synack_fails_the_clients_check() {
        let rng = SystemRandom::new();
        let x = handshake(&rng);
        let server_proof = x.server_key.prove(Role::Server, &x.transcript);
        for tamper in [
            |t: &mut Transcript| t.synack_token[0] ^= 1,
            |t: &mut Transcript| t.server_isn += 1,
            |t: &mut Transcript| t.server_key[0] ^= 1,
            |t: &mut Transcript| t.server.set_port(8081),
        ] {
            let mut seen_by_client = x.transcript.clone();
            tamper(&mut seen_by_client);
            assert_eq!(
                x.client_key
                    .check(Role::Server, &seen_by_client, &server_proof),
                Err(ProofError::BadProof)
            );
        }
    }

    #[test]
    fn a_replayed_syn_cannot_be_completed_without_the_clients_key() {
        let rng = SystemRandom::new();
        let original = handshake(&rng);
        let ack_proof = original
            .client_key
            .prove(Role::Client, &original.transcript);
        // The replayer resends the captured SYN; the server answers with a fresh key.
        let fresh = Ephemeral::generate(&rng, 0);
        let mut replay = original.transcript.clone();
        replay.server_key = fresh.public;
        replay.server_isn = 777;
        let server_key = fresh.agree(&replay.client_key).unwrap();
        // The only proof the replayer has is the original ACK's: it does not verify.
        assert_eq!(
            server_key.check(Role::Client, &replay, &ack_proof),
            Err(ProofError::BadProof)
        );
        // Nor does a guess.
        assert_eq!(
            server_key.check(Role::Client, &replay, &[0; 16]),
            Err(ProofError::BadProof)
        );
    }

    #[test]
    fn bindings_change_with_every_input() {
        let rng = SystemRandom::new();
        let x = handshake(&rng);
        let b = syn_binding(&x.transcript.client_key, 1);
        assert_ne!(b, syn_binding(&x.transcript.client_key, 2));
        let mut other = x.transcript.clone();
        other.client_key[0] ^= 1;
        assert_ne!(b, syn_binding(&other.client_key, 1));
        assert_ne!(synack_binding(&x.transcript), synack_binding(&other));
    }

    #[test]
    fn a_bad_public_key_is_refused() {
        let rng = SystemRandom::new();
        // The all-zero point is of small order: X25519 yields zero, which is refused.
        assert_eq!(
            Ephemeral::generate(&rng, 0).agree(&[0; 32]).err(),
            Some(ProofError::KeyExchange)
        );
    }

    #[test]
    fn a_single_use_key_agrees_once_and_like_a_reusable_one() {
        let rng = SystemRandom::new();
        let t = handshake(&rng).transcript;
        let (one, other) = (Ephemeral::single_use(&rng, 0), Ephemeral::generate(&rng, 0));
        let a = one.agree(&other.public).unwrap();
        let b = other.agree(&one.public).unwrap();
        assert_eq!(a.prove(Role::Server, &t), b.prove(Role::Server, &t));
        // Its secret is gone after the first agreement.
        assert_eq!(
            one.agree(&other.public).err(),
            Some(ProofError::KeyExchange)
        );
        // A key of small order is refused.
        assert_eq!(
            Ephemeral::single_use(&rng, 0).agree(&[0; 32]).err(),
            Some(ProofError::KeyExchange)
        );
    }

    #[test]
    fn keys_are_reused_only_within_their_window() {
        let x = KeyExchange::new(1_000);
        let a = x.key(5_000);
        assert_eq!(a.public, x.key(5_999).public);
        let b = x.key(6_000);
        assert_ne!(a.public, b.public);
        // No reuse at all with a window of 0.
        let fresh = KeyExchange::new(0);
        assert_ne!(fresh.key(1).public, fresh.key(1).public);
    }

    #[test]
    fn a_cached_agreement_equals_a_fresh_one_and_is_per_pair() {
        let rng = SystemRandom::new();
        let x = KeyExchange::new(1_000);
        let mine = x.key(0);
        let (p1, p2) = (Ephemeral::generate(&rng, 0), Ephemeral::generate(&rng, 0));
        let t = handshake(&rng).transcript;
        let direct = mine.agree(&p1.public).unwrap().prove(Role::Client, &t);
        for _ in 0..2 {
            let cached = x.agree(&mine, &p1.public).unwrap();
            assert_eq!(cached.prove(Role::Client, &t), direct);
            // The peer derives the same key.
            assert_eq!(
                p1.agree(&mine.public).unwrap().prove(Role::Client, &t),
                direct
            );
        }
        let other = x.agree(&mine, &p2.public).unwrap();
        assert_ne!(other.prove(Role::Client, &t), direct);
        // A bad key is refused, cached or not.
        assert!(x.agree(&mine, &[0; 32]).is_err());
    }
}
