//! Tokens on a tunnel: each tunnel (one mutual-TLS session between two enforcers) gets a
//! [`TunnelSession`] holding the session's exporter value (what tokens are bound to) and the
//! peer's certified key; [`Tokens`] signs this side's proofs and checks the peer's.
//!
//! A peer enforcer may only vouch for its own workloads: a token must be signed by the key
//! of the certificate the peer presented in this TLS session, and the identity it carries
//! must name that enforcer (`tessera.io/enforcer` and the SPIFFE path). So a compromised
//! enforcer cannot impersonate another host's workloads, and a token lifted from one session
//! is useless on any other.
use std::{collections::HashSet, net::SocketAddr};

use rustls::pki_types::CertificateDer;
use thiserror::Error;

use crate::code::Code;

use super::{
    Identity,
    signer::{Signer, identity_digest},
    token::{Binding, Digest, KeyId, MAX_TOKEN, TokenError},
    verifier::{Verifier, certified_key},
};

/// RFC 5705/8446 exporter label for the session binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tessera-token-binding";

/// The exporter value of a TLS session: equal at both ends of it, unrelated on any other.
pub fn session_binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<Binding, rustls::Error> {
    conn.export_keying_material([0u8; 16], EXPORTER_LABEL, None)
}

/// How a tunnel header proves the identity of the workload at its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proof {
    /// A signed token (see `docs/token.md`).
    Token(Vec<u8>),
    /// The identity, unsigned: only from enforcers configured with `tokens = false` (the
    /// benchmark baseline); an enforcer with tokens on refuses it.
    Unsigned(Identity),
}

/// Why a peer's proof was refused. `code()` is what flows and metrics record.
#[derive(Debug, Error)]
pub enum Refusal {
    #[error("token rejected: {0}")]
    Token(#[from] TokenError),
    #[error("no token: the peer sent an unsigned identity")]
    NoToken,
    #[error("token signed by a key other than the one of the peer's TLS certificate")]
    IssuerNotPeer,
    #[error("enforcer {peer} vouched for {spiffe}, which is not one of its workloads")]
    ForeignIdentity { peer: String, spiffe: String },
    #[error("peer certificate: {0}")]
    PeerCertificate(String),
    #[error("identity too large for a token ({0} bytes)")]
    TooLarge(usize),
}

impl Refusal {
    pub fn code(&self) -> Code {
        match self {
            Self::Token(e) => e.code(),
            Self::NoToken => Code::NoToken,
            Self::IssuerNotPeer => Code::IssuerNotPeer,
            Self::ForeignIdentity { .. } => Code::ForeignIdentity,
            Self::PeerCertificate(_) => Code::UntrustedIssuer,
            Self::TooLarge(_) => Code::Oversized,
        }
    }
}

/// One TLS session with a peer enforcer, from either end.
#[derive(Debug)]
pub struct TunnelSession {
    /// The peer enforcer's name (the DNS name of its certificate).
    pub peer: String,
    pub binding: Binding,
    /// The key id of the peer certificate's Ed25519 key.
    pub peer_key: KeyId,
    /// Identities this side already sent in full on this session: later tokens for them
    /// carry just the digest.
    sent_cold: HashSet<Digest>,
}

impl TunnelSession {
    /// Back to cold tokens (after a refusal the peer may not have cached what we sent).
    pub fn forget_sent(&mut self) {
        self.sent_cold.clear();
    }
}

pub struct Tokens {
    trust_domain: String,
    signer: Signer,
    /// False: tokens off (unsigned identities; the benchmark baseline).
    sign: bool,
    verifier: Verifier,
    ca: Vec<Vec<u8>>,
    lifetime_ms: u32,
}

impl Tokens {
    /// `key_pkcs8`: this enforcer's Ed25519 key (its certificate's). `ca`: the cluster CA
    /// certificates (DER). `sign`: false for unsigned identities (benchmark baseline only).
    pub fn new(
        trust_domain: String,
        key_pkcs8: &[u8],
        ca: Vec<Vec<u8>>,
        lifetime_ms: u32,
        skew_ms: u64,
        sign: bool,
    ) -> Result<Self, super::signer::KeyError> {
        let signer = Signer::from_pkcs8(key_pkcs8)?;
        let verifier = Verifier::new(skew_ms, lifetime_ms);
        // Our own key: tokens between workloads of this host need no special case.
        verifier.trust(signer.public_key());
        Ok(Self {
            trust_domain,
            signer,
            sign,
            verifier,
            ca,
            lifetime_ms,
        })
    }

    /// Identities evicted from the warm-token cache because it was full.
    pub fn evicted_identities(&self) -> u64 {
        self.verifier.evicted_identities()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn signing(&self) -> bool {
        self.sign
    }

    fn signer(&self) -> Option<&Signer> {
        self.sign.then_some(&self.signer)
    }

    /// A session for a TLS connection whose peer presented `cert` (already verified by
    /// rustls against the CA; checked here again for the Ed25519 key tokens use).
    pub fn session(
        &self,
        peer: String,
        cert: Option<&CertificateDer<'_>>,
        binding: Binding,
    ) -> Result<TunnelSession, Refusal> {
        let cert = cert.ok_or_else(|| Refusal::PeerCertificate("none presented".into()))?;
        let mut last = None;
        for ca in &self.ca {
            match certified_key(cert.as_ref(), ca) {
                Ok((key, until)) => {
                    return Ok(TunnelSession {
                        peer,
                        binding,
                        peer_key: self.verifier.trust_until(&key, until)?,
                        sent_cold: HashSet::new(),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(Refusal::PeerCertificate(
            last.map(|e| e.to_string())
                .unwrap_or_else(|| "no CA".into()),
        ))
    }

    /// Trusts a peer enforcer's certificate (DER) for tokens that arrive without TLS (in a
    /// TCP handshake): its key, and the pair key of it and ours, are trusted until the
    /// certificate expires.
    pub fn trust_peer(&self, cert: &[u8]) -> Result<KeyId, Refusal> {
        let mut last = None;
        for ca in &self.ca {
            match certified_key(cert, ca) {
                Ok((key, until)) => {
                    let id = self.verifier.trust_until(&key, until)?;
                    self.verifier
                        .trust_pair(id, self.signer.pair_key(&key)?, until);
                    return Ok(id);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(Refusal::PeerCertificate(
            last.map(|e| e.to_string())
                .unwrap_or_else(|| "no CA".into()),
        ))
    }

    /// Forgets a peer enforcer's key, its pair key and what it vouched for (it left the
    /// control plane's directory): its tokens are refused from now on.
    pub fn forget_peer(&self, id: &KeyId) {
        self.verifier.forget(id);
    }

    /// A cold token for `identity`, meant for `dst` (served by the enforcer with key `peer`),
    /// bound to `binding` (a TCP handshake's keys and sequence numbers), sealed with the pair
    /// key of that enforcer and this one. Handshake mode requires tokens.
    pub fn seal_cold(
        &self,
        peer: &KeyId,
        identity: &Identity,
        dst: SocketAddr,
        binding: Binding,
        now_ms: u64,
    ) -> Result<Vec<u8>, Refusal> {
        let signer = self.signer().ok_or(Refusal::NoToken)?;
        let pair = self.verifier.pair(peer, now_ms)?;
        let token = signer.seal_cold(&pair, identity, dst, binding, now_ms, self.lifetime_ms);
        if token.len() > MAX_TOKEN {
            return Err(Refusal::TooLarge(token.len()));
        }
        Ok(token)
    }

    /// Checks a token that enforcer `peer` (key `peer_key`) sent for a connection to `dst`
    /// bound to `binding`: the same checks as on a tunnel.
    pub fn check_token(
        &self,
        token: &[u8],
        peer: &str,
        peer_key: &KeyId,
        dst: SocketAddr,
        binding: &Binding,
        now_ms: u64,
    ) -> Result<Identity, Refusal> {
        let verified = self.verifier.verify(token, now_ms, dst, binding)?;
        if &verified.issuer != peer_key {
            return Err(Refusal::IssuerNotPeer);
        }
        if !vouches(&self.trust_domain, peer, &verified.identity) {
            return Err(Refusal::ForeignIdentity {
                peer: peer.to_owned(),
                spiffe: verified.identity.spiffe,
            });
        }
        Ok(verified.identity)
    }

    /// This side's proof for `identity` on `session`, meant for `dst`.
    pub fn prove(
        &self,
        session: &mut TunnelSession,
        identity: &Identity,
        dst: SocketAddr,
        now_ms: u64,
    ) -> Result<Proof, Refusal> {
        let Some(signer) = self.signer() else {
            return Ok(Proof::Unsigned(identity.clone()));
        };
        let digest = identity_digest(identity);
        let warm = session.sent_cold.contains(&digest);
        let token = signer.sign(
            identity,
            warm,
            dst,
            session.binding,
            now_ms,
            self.lifetime_ms,
        );
        if token.len() > MAX_TOKEN {
            return Err(Refusal::TooLarge(token.len()));
        }
        if !warm {
            session.sent_cold.insert(digest);
        }
        Ok(Proof::Token(token))
    }

    /// Checks the peer's proof for a connection to `dst` on `session`.
    pub fn check(
        &self,
        session: &TunnelSession,
        proof: &Proof,
        dst: SocketAddr,
        now_ms: u64,
    ) -> Result<Identity, Refusal> {
        let identity = match proof {
            Proof::Token(token) => {
                let verified = self.verifier.verify(token, now_ms, dst, &session.binding)?;
                if verified.issuer != session.peer_key {
                    return Err(Refusal::IssuerNotPeer);
                }
                verified.identity
            }
            Proof::Unsigned(_) if self.sign => return Err(Refusal::NoToken),
            Proof::Unsigned(identity) => identity.clone(),
        };
        if !vouches(&self.trust_domain, &session.peer, &identity) {
            return Err(Refusal::ForeignIdentity {
                peer: session.peer.clone(),
                spiffe: identity.spiffe,
            });
        }
        Ok(identity)
    }
}

/// Whether enforcer `peer` may vouch for `identity`: only for its own workloads.
pub fn vouches(trust_domain: &str, peer: &str, identity: &Identity) -> bool {
    let prefix = format!("spiffe://{trust_domain}/enforcer/{peer}/workload/");
    identity.spiffe.starts_with(&prefix)
        && identity.labels.get(super::reserved::ENFORCER) == Some(peer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::spiffe_id;
    use rcgen::KeyPair;
    use tessera_policy::Labels;

    const NOW: u64 = 1_800_000_000_000;

    struct Host {
        tokens: Tokens,
        cert: Vec<u8>,
    }

    use crate::identity::test_ca::ca;

    fn host(name: &str, ca: &(KeyPair, Vec<u8>), sign: bool) -> Host {
        let (key, cert) = crate::identity::test_ca::enforcer(name, &ca.0, &ca.1);
        Host {
            tokens: Tokens::new("td".into(), &key, vec![ca.1.clone()], 10_000, 1_000, sign)
                .unwrap(),
            cert,
        }
    }

    fn workload(enforcer: &str, name: &str) -> Identity {
        Identity {
            spiffe: spiffe_id("td", enforcer, name),
            labels: Labels::new([
                ("app", name),
                ("tessera.io/enforcer", enforcer),
                ("tessera.io/workload", name),
            ]),
        }
    }

    /// Sessions for the two ends of one TLS connection between `a` and `b`.
    fn pair(a: &Host, b: &Host, binding: Binding) -> (TunnelSession, TunnelSession) {
        let at_a = a
            .tokens
            .session("b".into(), Some(&b.cert.clone().into()), binding)
            .unwrap();
        let at_b = b
            .tokens
            .session("a".into(), Some(&a.cert.clone().into()), binding)
            .unwrap();
        (at_a, at_b)
    }

    #[test]
    fn first_token_is_cold_then_warm_and_both_verify() {
        let ca = ca();
        let (a, b) = (host("a", &ca, true), host("b", &ca, true));
        let (mut at_a, at_b) = pair(&a, &b, [1; 16]);
        let dst = "10.0.0.2:80".parse().unwrap();
        let web = workload("a", "web");
        let Proof::Token(cold) = a.tokens.prove(&mut at_a, &web, dst, NOW).unwrap() else {
            panic!("tokens on")
        };
        let Proof::Token(warm) = a.tokens.prove(&mut at_a, &web, dst, NOW).unwrap() else {
            panic!("tokens on")
        };
        assert!(warm.len() < cold.len());
        for t in [cold, warm] {
            let got = b.tokens.check(&at_b, &Proof::Token(t), dst, NOW).unwrap();
            assert_eq!(got, web);
        }
    }

    #[test]
    fn a_peer_cannot_vouch_for_another_hosts_workload() {
        let ca = ca();
        let (a, b) = (host("a", &ca, true), host("b", &ca, true));
        let (mut at_a, at_b) = pair(&a, &b, [1; 16]);
        let dst = "10.0.0.2:80".parse().unwrap();
        let stolen = workload("c", "db");
        let proof = a.tokens.prove(&mut at_a, &stolen, dst, NOW).unwrap();
        let err = b.tokens.check(&at_b, &proof, dst, NOW).unwrap_err();
        assert_eq!(err.code().as_str(), "foreign-identity", "{err}");
    }

    #[test]
    fn a_token_signed_by_another_certified_enforcer_is_refused_on_this_session() {
        let ca = ca();
        let (a, b, c) = (
            host("a", &ca, true),
            host("b", &ca, true),
            host("c", &ca, true),
        );
        let (_, at_b) = pair(&a, &b, [1; 16]);
        // c signs for a's workload on a session it does not hold (same binding value even).
        let (mut c_to_b, _) = pair(&c, &b, [1; 16]);
        let dst = "10.0.0.2:80".parse().unwrap();
        let proof = c
            .tokens
            .prove(&mut c_to_b, &workload("a", "web"), dst, NOW)
            .unwrap();
        let err = b.tokens.check(&at_b, &proof, dst, NOW).unwrap_err();
        assert_eq!(err.code().as_str(), "issuer-not-peer", "{err}");
    }

    #[test]
    fn unsigned_identities_are_refused_when_tokens_are_on() {
        let ca = ca();
        let (a, b) = (host("a", &ca, false), host("b", &ca, true));
        let (mut at_a, at_b) = pair(&a, &b, [1; 16]);
        let dst = "10.0.0.2:80".parse().unwrap();
        let proof = a
            .tokens
            .prove(&mut at_a, &workload("a", "web"), dst, NOW)
            .unwrap();
        assert!(matches!(proof, Proof::Unsigned(_)));
        let err = b.tokens.check(&at_b, &proof, dst, NOW).unwrap_err();
        assert_eq!(err.code().as_str(), "no-token");
    }

    #[test]
    fn a_certificate_from_another_ca_gives_no_session() {
        let (ca1, ca2) = (ca(), ca());
        let a = host("a", &ca1, true);
        let stranger = host("x", &ca2, true);
        let err = a
            .tokens
            .session("x".into(), Some(&stranger.cert.clone().into()), [0; 16])
            .unwrap_err();
        assert_eq!(err.code().as_str(), "untrusted-issuer");
    }
}
