//! The token layout (version 1), all integers big-endian:
//!
//! ```text
//! version u8 (=1) | kind u8 (0 cold, 1 warm) | issuer key id [8] | issued_ms u64
//! | lifetime_ms u32 | nonce [16] | dst: family u8 (4|6), addr [4|16], port u16
//! | binding [16] (TLS exporter of the tunnel session)
//! | cold: spiffe_len u8, spiffe, label count u8, (key_len u8, key, value_len u8, value)*
//! | warm: identity digest [32] (SHA-256 of the cold identity encoding)
//! | signature [64] (Ed25519 over every byte before it)
//! ```
//!
//! Version 2 (TCP-handshake mode) is the same layout with a different seal: instead of the
//! signature, a 16-byte tag, HMAC-SHA256 over every byte before it keyed by the *pair key*
//! of the issuer and the receiver (see `Signer::pair_key`). Only those two enforcers hold
//! it, and a verifier only accepts tags whose issuer is the other one.
//!
//! Version 3 (tunnel sessions) is again the same layout with a 16-byte HMAC-SHA256 tag, keyed
//! by the *issuing side's key of one TLS session* (RFC 8446 exporter, see
//! `session::SessionSecrets`): only the two ends of that session hold it, so the tag proves to
//! the other end (and to nobody else) that this session's peer vouched for these claims. Its
//! nonce is the issuer's sequence number on the session (a big-endian u128 from 1), so replay
//! protection is one counter per session instead of a cache of nonces.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tessera_policy::Labels;
use thiserror::Error;

use super::Identity;
use crate::code::Code;

pub const VERSION: u8 = 1;
/// Tokens sealed with a pair key (TCP-handshake mode).
pub const VERSION_PAIR: u8 = 2;
pub const PAIR_TAG_LEN: usize = 16;
/// Tokens sealed with a key of one tunnel's TLS session.
pub const VERSION_SESSION: u8 = 3;
pub const SESSION_TAG_LEN: usize = 16;
/// No token is larger; longer input is refused before parsing.
/// Typical cold tokens are well under 512 bytes (see docs/token.md); the limit leaves room
/// for Kubernetes-length cgroup paths and container ids among the derived labels.
pub const MAX_TOKEN: usize = 1024;
pub const SIGNATURE_LEN: usize = 64;

pub type KeyId = [u8; 8];
pub type Nonce = [u8; 16];
pub type Binding = [u8; 16];
pub type Digest = [u8; 32];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The full identity (first contact).
    Cold(Identity),
    /// The digest of an identity the peer verified before.
    Warm(Digest),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub issuer: KeyId,
    pub issued_ms: u64,
    pub lifetime_ms: u32,
    pub nonce: Nonce,
    /// The destination the token is meant for.
    pub dst: SocketAddr,
    /// Binds the token to one TLS session.
    pub binding: Binding,
    pub claim: Claim,
}

/// Why a token was refused. Each has a stable short name for flow records.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("truncated token ({0})")]
    Truncated(&'static str),
    #[error("oversized token: {0} bytes exceed {MAX_TOKEN}")]
    Oversized(usize),
    #[error("unsupported token version {0}")]
    Version(u8),
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token signed by a key the cluster CA did not certify")]
    UnknownIssuer,
    #[error("certificate not issued by the cluster CA: {0}")]
    Uncertified(String),
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token issued in the future (beyond the allowed clock skew)")]
    NotYetValid,
    #[error("token lifetime too long")]
    LifetimeTooLong,
    #[error("token is for another destination ({0})")]
    WrongDestination(SocketAddr),
    #[error("token belongs to another TLS session")]
    WrongSession,
    #[error("replayed token")]
    Replayed,
    #[error("token issued by a key other than the one of the peer's TLS certificate")]
    IssuerNotPeer,
    #[error("warm token for an identity not verified before")]
    UnknownIdentity,
}

impl TokenError {
    /// Its code for flow records and metrics.
    pub fn code(&self) -> Code {
        match self {
            Self::Truncated(_) => Code::Truncated,
            Self::Oversized(_) => Code::Oversized,
            Self::Version(_) | Self::Malformed(_) => Code::Malformed,
            Self::UnknownIssuer | Self::Uncertified(_) => Code::UntrustedIssuer,
            Self::BadSignature => Code::BadSignature,
            Self::Expired => Code::Expired,
            Self::NotYetValid => Code::NotYetValid,
            Self::LifetimeTooLong => Code::LifetimeTooLong,
            Self::WrongDestination(_) => Code::WrongDestination,
            Self::WrongSession => Code::WrongSession,
            Self::Replayed => Code::Replay,
            Self::IssuerNotPeer => Code::IssuerNotPeer,
            Self::UnknownIdentity => Code::UnknownIdentity,
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Callers bound their strings; truncation would change meaning, so refuse instead.
    assert!(s.len() <= 255, "token string longer than 255 bytes");
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// The canonical encoding of an identity (also what its digest is computed over).
pub fn encode_identity(out: &mut Vec<u8>, id: &Identity) {
    put_str(out, &id.spiffe);
    let labels: Vec<(&str, &str)> = id.labels.iter().collect();
    assert!(labels.len() <= 255, "more than 255 labels");
    out.push(labels.len() as u8);
    for (k, v) in labels {
        put_str(out, k);
        put_str(out, v);
    }
}

/// How a token is sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seal<'a> {
    /// Ed25519 signature of the issuer (version 1).
    Signature(&'a [u8]),
    /// HMAC tag keyed by the issuer's and receiver's pair key (version 2).
    PairTag(&'a [u8]),
    /// HMAC tag keyed by the issuing side's key of one TLS session (version 3).
    SessionTag(&'a [u8]),
}

/// Encodes everything but the signature (version 1).
pub fn encode_unsigned(c: &Claims) -> Vec<u8> {
    encode_unsealed(c, VERSION)
}

/// Encodes everything but the seal, for token `version`.
pub fn encode_unsealed(c: &Claims, version: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(version);
    out.push(match c.claim {
        Claim::Cold(_) => 0,
        Claim::Warm(_) => 1,
    });
    out.extend_from_slice(&c.issuer);
    out.extend_from_slice(&c.issued_ms.to_be_bytes());
    out.extend_from_slice(&c.lifetime_ms.to_be_bytes());
    out.extend_from_slice(&c.nonce);
    match c.dst.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&c.dst.port().to_be_bytes());
    out.extend_from_slice(&c.binding);
    match &c.claim {
        Claim::Cold(id) => encode_identity(&mut out, id),
        Claim::Warm(d) => out.extend_from_slice(d),
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], TokenError> {
        if self.0.len() < n {
            return Err(TokenError::Truncated(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], TokenError> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, TokenError> {
        Ok(self.take(1, what)?[0])
    }
    fn string(&mut self, what: &'static str) -> Result<String, TokenError> {
        let n = self.u8(what)? as usize;
        String::from_utf8(self.take(n, what)?.to_vec())
            .map_err(|_| TokenError::Malformed("string is not UTF-8"))
    }
}

fn read_identity(r: &mut Reader<'_>) -> Result<Identity, TokenError> {
    let spiffe = r.string("spiffe id")?;
    if !spiffe.starts_with("spiffe://") {
        return Err(TokenError::Malformed("spiffe id"));
    }
    let n = r.u8("label count")?;
    let mut labels = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let k = r.string("label key")?;
        let v = r.string("label value")?;
        if k.is_empty() {
            return Err(TokenError::Malformed("empty label key"));
        }
        labels.push((k, v));
    }
    let parsed = Labels::new(labels.clone());
    // Canonical: labels sorted and unique, exactly as encoded.
    if parsed
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect::<Vec<_>>()
        != labels
    {
        return Err(TokenError::Malformed("labels not in canonical order"));
    }
    Ok(Identity {
        spiffe,
        labels: parsed,
    })
}

/// Decodes an identity encoded by [`encode_identity`] (nothing else may follow it).
pub fn decode_identity(bytes: &[u8]) -> Result<Identity, TokenError> {
    let mut r = Reader(bytes);
    let id = read_identity(&mut r)?;
    if !r.0.is_empty() {
        return Err(TokenError::Malformed("trailing bytes"));
    }
    Ok(id)
}

/// Splits a token into its claims, the sealed bytes and the seal (nothing verified).
pub fn decode(bytes: &[u8]) -> Result<(Claims, &[u8], Seal<'_>), TokenError> {
    if bytes.len() > MAX_TOKEN {
        return Err(TokenError::Oversized(bytes.len()));
    }
    let (seal_len, what) = match bytes.first() {
        None => return Err(TokenError::Truncated("version")),
        Some(&VERSION) => (SIGNATURE_LEN, "signature"),
        Some(&VERSION_PAIR) => (PAIR_TAG_LEN, "pair tag"),
        Some(&VERSION_SESSION) => (SESSION_TAG_LEN, "session tag"),
        Some(&v) => return Err(TokenError::Version(v)),
    };
    if bytes.len() < seal_len {
        return Err(TokenError::Truncated(what));
    }
    let (signed, seal) = bytes.split_at(bytes.len() - seal_len);
    let seal = match bytes[0] {
        VERSION => Seal::Signature(seal),
        VERSION_PAIR => Seal::PairTag(seal),
        _ => Seal::SessionTag(seal),
    };
    let mut r = Reader(signed);
    r.u8("version")?;
    let kind = r.u8("kind")?;
    let issuer = r.array("issuer")?;
    let issued_ms = u64::from_be_bytes(r.array("issue time")?);
    let lifetime_ms = u32::from_be_bytes(r.array("lifetime")?);
    let nonce = r.array("nonce")?;
    let ip = match r.u8("destination family")? {
        4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>("destination")?)),
        6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>("destination")?)),
        _ => return Err(TokenError::Malformed("destination family")),
    };
    let dst = SocketAddr::new(ip, u16::from_be_bytes(r.array("destination port")?));
    let binding = r.array("session binding")?;
    let claim = match kind {
        0 => Claim::Cold(read_identity(&mut r)?),
        1 => Claim::Warm(r.array("identity digest")?),
        _ => return Err(TokenError::Malformed("kind")),
    };
    if !r.0.is_empty() {
        return Err(TokenError::Malformed("trailing bytes"));
    }
    Ok((
        Claims {
            issuer,
            issued_ms,
            lifetime_ms,
            nonce,
            dst,
            binding,
            claim,
        },
        signed,
        seal,
    ))
}
