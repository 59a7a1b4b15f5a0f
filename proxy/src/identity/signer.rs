//! An enforcer's token-signing key: Ed25519, the key of its certificate from the cluster CA.
use std::net::SocketAddr;

use ring::{
    rand::{SecureRandom, SystemRandom},
    signature::{Ed25519KeyPair, KeyPair},
};

use super::{
    Identity,
    token::{Binding, Claim, Claims, Digest, KeyId, encode_identity, encode_unsigned},
};

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
    id: KeyId,
    rng: SystemRandom,
}

impl Signer {
    /// From a PKCS#8 Ed25519 private key (as `tessera ca issue` writes it).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, ring::error::KeyRejected> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)?;
        let id = key_id(key.public_key().as_ref());
        Ok(Self {
            key,
            id,
            rng: SystemRandom::new(),
        })
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
        let mut nonce = [0u8; 16];
        self.rng.fill(&mut nonce).expect("system randomness");
        let claim = if warm {
            Claim::Warm(identity_digest(identity))
        } else {
            Claim::Cold(identity.clone())
        };
        let claims = Claims {
            issuer: self.id,
            issued_ms: now_ms,
            lifetime_ms,
            nonce,
            dst,
            binding,
            claim,
        };
        self.sign_claims(&claims)
    }

    /// Signs exactly these claims (tests use it to build hostile tokens).
    pub fn sign_claims(&self, claims: &Claims) -> Vec<u8> {
        let mut out = encode_unsigned(claims);
        let sig = self.key.sign(&out);
        out.extend_from_slice(sig.as_ref());
        out
    }
}
