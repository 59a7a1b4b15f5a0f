//! An enforcer's token-signing key: Ed25519, the key of its certificate from the cluster CA.
use std::net::SocketAddr;

use curve25519_dalek::Scalar;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use ring::{
    hmac,
    rand::{SecureRandom, SystemRandom},
    signature::{Ed25519KeyPair, KeyPair},
};

use super::{
    Identity,
    token::{
        Binding, Claim, Claims, Digest, KeyId, Nonce, PAIR_TAG_LEN, TokenError, VERSION_PAIR,
        VERSION_SESSION, encode_identity, encode_unsealed, encode_unsigned,
    },
};

/// The HMAC tag that seals a version-2 token (`sealed`: every byte before the tag).
pub fn pair_tag(key: &hmac::Key, sealed: &[u8]) -> [u8; PAIR_TAG_LEN] {
    hmac::sign(key, sealed).as_ref()[..PAIR_TAG_LEN]
        .try_into()
        .expect("16 bytes")
}

/// The key id of a public key: the first 8 bytes of its SHA-256.
pub fn key_id(public_key: &[u8]) -> KeyId {
    ring::digest::digest(&ring::digest::SHA256, public_key).as_ref()[..8]
        .try_into()
        .expect("8 bytes")
}

/// The digest a warm token carries for `id`.
pub fn identity_digest(id: &Identity) -> Digest {
    let mut enc = Vec::with_capacity(128);
    encode_identity(&mut enc, id);
    ring::digest::digest(&ring::digest::SHA256, &enc)
        .as_ref()
        .try_into()
        .expect("32 bytes")
}

pub struct Signer {
    key: Ed25519KeyPair,
    /// The X25519 form of the same key (the clamped Ed25519 secret scalar), for pair keys.
    exchange: Scalar,
    id: KeyId,
    rng: SystemRandom,
}

impl Drop for Signer {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.exchange.zeroize();
    }
}

/// A key that is not an Ed25519 PKCS#8 key.
#[derive(Debug, thiserror::Error)]
#[error("the key is not an Ed25519 PKCS#8 key ({0}); reissue it with `tessera ca issue`")]
pub struct KeyError(String);

impl Signer {
    /// From a PKCS#8 Ed25519 private key (as `tessera ca issue` writes it).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, KeyError> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| KeyError(e.to_string()))?;
        let exchange = ed25519_dalek::SigningKey::from_pkcs8_der(pkcs8)
            .map_err(|e| KeyError(e.to_string()))?
            .to_scalar();
        let id = key_id(key.public_key().as_ref());
        Ok(Self {
            key,
            exchange,
            id,
            rng: SystemRandom::new(),
        })
    }

    /// The pair key of this enforcer and the one whose certified Ed25519 key is `peer`:
    /// X25519 of the two keys (each in its Montgomery form), through HMAC with both key ids.
    /// Both ends derive the same key and nobody else can: sealing a token with it costs an
    /// HMAC instead of an Ed25519 signature (see docs/handshake.md on using one key for
    /// both; <https://eprint.iacr.org/2021/509>).
    pub fn pair_key(&self, peer: &[u8; 32]) -> Result<hmac::Key, TokenError> {
        let peer_id = key_id(peer);
        if peer_id == self.id {
            return Err(TokenError::Uncertified("a pair key with itself".into()));
        }
        let point = ed25519_dalek::VerifyingKey::from_bytes(peer)
            .map_err(|_| TokenError::Uncertified("not a valid Ed25519 public key".into()))?
            .to_montgomery();
        let shared = (point * self.exchange).to_bytes();
        if shared == [0; 32] {
            // A small-order key: every secret yields zero.
            return Err(TokenError::Uncertified("a key of small order".into()));
        }
        let (lo, hi) = if self.id < peer_id {
            (self.id, peer_id)
        } else {
            (peer_id, self.id)
        };
        let salt = hmac::Key::new(hmac::HMAC_SHA256, b"tessera-pair-key-v1");
        let mut ctx = hmac::Context::with_key(&salt);
        ctx.update(&shared);
        ctx.update(&lo);
        ctx.update(&hi);
        Ok(hmac::Key::new(hmac::HMAC_SHA256, ctx.sign().as_ref()))
    }

    pub fn key_id(&self) -> KeyId {
        self.id
    }

    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// A token for `identity` (cold: the full identity; warm: its digest), meant for `dst`
    /// on the TLS session `binding`, valid `lifetime_ms` from `now_ms`, with a fresh nonce.
    pub fn sign(
        &self,
        identity: &Identity,
        warm: bool,
        dst: SocketAddr,
        binding: Binding,
        now_ms: u64,
        lifetime_ms: u32,
    ) -> Vec<u8> {
        let claim = if warm {
            Claim::Warm(identity_digest(identity))
        } else {
            Claim::Cold(identity.clone())
        };
        let claims = self.claims(claim, dst, binding, now_ms, lifetime_ms);
        self.sign_claims(&claims)
    }

    /// A version-3 token for `claim`, meant for `dst` on the TLS session `binding`, with the
    /// session's sequence number `seq` as its nonce, sealed with this side's key of that
    /// session (`key`): an HMAC instead of a signature, and no random nonce.
    #[allow(clippy::too_many_arguments)]
    pub fn seal_session(
        &self,
        key: &hmac::Key,
        seq: u128,
        claim: Claim,
        dst: SocketAddr,
        binding: Binding,
        now_ms: u64,
        lifetime_ms: u32,
    ) -> Vec<u8> {
        let claims = Claims {
            issuer: self.id,
            issued_ms: now_ms,
            lifetime_ms,
            nonce: sequence_nonce(seq),
            dst,
            binding,
            claim,
        };
        seal_session_claims(key, &claims)
    }

    /// Claims issued by this enforcer now, with a fresh nonce.
    fn claims(
        &self,
        claim: Claim,
        dst: SocketAddr,
        binding: Binding,
        now_ms: u64,
        lifetime_ms: u32,
    ) -> Claims {
        let mut nonce = [0u8; 16];
        self.rng.fill(&mut nonce).expect("system randomness");
        Claims {
            issuer: self.id,
            issued_ms: now_ms,
            lifetime_ms,
            nonce,
            dst,
            binding,
            claim,
        }
    }

    /// A cold version-2 token for `identity`, sealed with `pair` (see [`Self::pair_key`]).
    pub fn seal_cold(
        &self,
        pair: &hmac::Key,
        identity: &Identity,
        dst: SocketAddr,
        binding: Binding,
        now_ms: u64,
        lifetime_ms: u32,
    ) -> Vec<u8> {
        let claims = self.claims(
            Claim::Cold(identity.clone()),
            dst,
            binding,
            now_ms,
            lifetime_ms,
        );
        seal_claims(pair, &claims)
    }

    /// Signs exactly these claims (tests use it to build hostile tokens).
    pub fn sign_claims(&self, claims: &Claims) -> Vec<u8> {
        let mut out = encode_unsigned(claims);
        let sig = self.key.sign(&out);
        out.extend_from_slice(sig.as_ref());
        out
    }
}

/// Seals exactly these claims with a pair key (tests use it to build hostile tokens).
pub fn seal_claims(pair: &hmac::Key, claims: &Claims) -> Vec<u8> {
    seal_tagged(VERSION_PAIR, pair, claims)
}

/// Seals exactly these claims with a session key as a version-3 token (tests use it to
/// build hostile tokens).
pub fn seal_session_claims(key: &hmac::Key, claims: &Claims) -> Vec<u8> {
    seal_tagged(VERSION_SESSION, key, claims)
}

fn seal_tagged(version: u8, key: &hmac::Key, claims: &Claims) -> Vec<u8> {
    let mut out = encode_unsealed(claims, version);
    let tag = pair_tag(key, &out);
    out.extend_from_slice(&tag);
    out
}

/// The nonce of a version-3 token: the issuer's sequence number on the session.
pub fn sequence_nonce(seq: u128) -> Nonce {
    seq.to_be_bytes()
}
