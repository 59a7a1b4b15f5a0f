//! Tokens on a tunnel: each tunnel (one mutual-TLS session between two enforcers) gets a
//! [`TunnelSession`] holding the session's exporter values (the binding tokens name, and the
//! two keys that seal them) and the peer's certified key; [`Tokens`] seals this side's proofs
//! and checks the peer's.
//!
//! Inside the session the channel already proves which enforcer speaks, so by default a
//! proof is a version-3 token: the same claims (identity, destination, session, time), sealed
//! with an HMAC under this side's session key instead of an Ed25519 signature, with the
//! sender's sequence number on the session as nonce (replay state: one counter per session).
//! Such a tag proves nothing to a third party; signed (version-1) tokens, which do, are still
//! made when configured (`Tokens::with_signed_tunnel_tokens`) and accepted on any tunnel.
//!
//! A peer enforcer may only vouch for its own workloads: a token must be signed by the key
//! of the certificate the peer presented in this TLS session, and the identity it carries
//! must name that enforcer (`tessera.io/enforcer` and the SPIFFE path). So a compromised
//! enforcer cannot impersonate another host's workloads, and a token lifted from one session
//! is useless on any other.
use std::{collections::HashSet, net::SocketAddr};

use ring::hmac;
use rustls::pki_types::CertificateDer;
use thiserror::Error;

use crate::code::Code;

use super::{
    Identity,
    replay::ReplayWindow,
    signer::{Signer, identity_digest},
    token::{Binding, Claim, Digest, KeyId, MAX_TOKEN, TokenError, VERSION_SESSION},
    verifier::{Verifier, certified_key},
};

/// RFC 5705/8446 exporter label for the session binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tessera-token-binding";

/// RFC 5705/8446 exporter label and context of the keys that seal version-3 tokens (distinct
/// from the binding's: knowing the binding, which tokens carry in clear, says nothing of them).
pub const SESSION_KEY_LABEL: &[u8] = b"EXPORTER-tessera-session-token-key";
pub const SESSION_KEY_CONTEXT: &[u8] = b"tessera tunnel protocol 5";

/// The exporter value of a TLS session: equal at both ends of it, unrelated on any other.
pub fn session_binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<Binding, rustls::Error> {
    conn.export_keying_material([0u8; 16], EXPORTER_LABEL, None)
}

/// Which end of the TLS session this side is: the client (the source enforcer, which
/// dialled the tunnel) or the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// What both ends of one TLS session derive from it with the exporter, and nobody else can:
/// the binding tokens name, and one key per direction (each end seals with its own and
/// checks the other's, so a token reflected back to its sender fails).
pub struct SessionSecrets {
    pub binding: Binding,
    client_key: [u8; 32],
    server_key: [u8; 32],
}

impl Drop for SessionSecrets {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.client_key.zeroize();
        self.server_key.zeroize();
    }
}

impl SessionSecrets {
    /// The secrets of the TLS session `conn` (after its handshake).
    pub fn of<D>(conn: &rustls::ConnectionCommon<D>) -> Result<Self, rustls::Error> {
        let binding = session_binding(conn)?;
        let mut keys =
            conn.export_keying_material([0u8; 64], SESSION_KEY_LABEL, Some(SESSION_KEY_CONTEXT))?;
        let secrets = Self::from_parts(
            binding,
            keys[..32].try_into().expect("32 bytes"),
            keys[32..].try_into().expect("32 bytes"),
        );
        use zeroize::Zeroize;
        keys.zeroize();
        Ok(secrets)
    }

    /// Secrets from their parts (tests: sessions without a TLS handshake).
    #[doc(hidden)]
    pub fn from_parts(binding: Binding, client_key: [u8; 32], server_key: [u8; 32]) -> Self {
        Self {
            binding,
            client_key,
            server_key,
        }
    }

    /// The key that seals the tokens `role` issues on this session.
    pub fn key(&self, role: Role) -> hmac::Key {
        let key = match role {
            Role::Client => &self.client_key,
            Role::Server => &self.server_key,
        };
        hmac::Key::new(hmac::HMAC_SHA256, key)
    }
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
    /// Seals this side's version-3 tokens; checks the peer's.
    seal: hmac::Key,
    open: hmac::Key,
    /// The sequence number of this side's last version-3 token on the session.
    sent_seq: u128,
    /// The sequence numbers accepted from the peer (streams may be answered out of order).
    received: ReplayWindow,
    /// Whether this side sends an identity's digest once the peer has it in full. Only
    /// requests do: they reach the peer in the order they were sealed. Answers to streams
    /// arrive in any order, so the destination's answers always carry the identity.
    warm_proofs: bool,
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
    /// Sign tunnel tokens (version 1, a transferable proof) instead of sealing them with
    /// the session key (version 3, the default).
    signed_tunnel: bool,
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
            signed_tunnel: false,
        })
    }

    /// Signs tunnel tokens with the enforcer's Ed25519 key (version 1) instead of sealing
    /// them with the session key: for when a proof must convince a third party.
    pub fn with_signed_tunnel_tokens(mut self, signed: bool) -> Self {
        self.signed_tunnel = signed;
        self
    }

    /// Whether tunnel tokens are signed (version 1) rather than session-sealed.
    pub fn signed_tunnel_tokens(&self) -> bool {
        self.signed_tunnel
    }

    /// Nonces the verifier remembers against replays (version-1 and 2 tokens only).
    pub fn remembered_nonces(&self) -> usize {
        self.verifier.remembered_nonces()
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
    /// rustls against the CA; checked here again for the Ed25519 key tokens use), this side
    /// being its `role` end.
    pub fn session(
        &self,
        peer: String,
        cert: Option<&CertificateDer<'_>>,
        secrets: &SessionSecrets,
        role: Role,
    ) -> Result<TunnelSession, Refusal> {
        let other = match role {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        };
        let cert = cert.ok_or_else(|| Refusal::PeerCertificate("none presented".into()))?;
        let mut last = None;
        for ca in &self.ca {
            match certified_key(cert.as_ref(), ca) {
                Ok((key, until)) => {
                    return Ok(TunnelSession {
                        peer,
                        binding: secrets.binding,
                        peer_key: self.verifier.trust_until(&key, until)?,
                        sent_cold: HashSet::new(),
                        seal: secrets.key(role),
                        open: secrets.key(other),
                        sent_seq: 0,
                        received: ReplayWindow::default(),
                        warm_proofs: role == Role::Client,
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
        let warm = session.warm_proofs && session.sent_cold.contains(&digest);
        let token = if self.signed_tunnel {
            signer.sign(
                identity,
                warm,
                dst,
                session.binding,
                now_ms,
                self.lifetime_ms,
            )
        } else {
            session.sent_seq += 1;
            let claim = if warm {
                Claim::Warm(digest)
            } else {
                Claim::Cold(identity.clone())
            };
            signer.seal_session(
                &session.seal,
                session.sent_seq,
                claim,
                dst,
                session.binding,
                now_ms,
                self.lifetime_ms,
            )
        };
        if token.len() > MAX_TOKEN {
            return Err(Refusal::TooLarge(token.len()));
        }
        if !warm {
            session.sent_cold.insert(digest);
        }
        Ok(Proof::Token(token))
    }

    /// Checks the peer's proof for a connection to `dst` on `session`: a session-sealed
    /// (version 3) or signed (version 1) token.
    pub fn check(
        &self,
        session: &mut TunnelSession,
        proof: &Proof,
        dst: SocketAddr,
        now_ms: u64,
    ) -> Result<Identity, Refusal> {
        let identity = match proof {
            Proof::Token(token) => {
                let verified = if token.first() == Some(&VERSION_SESSION) {
                    self.verifier.verify_session(
                        token,
                        now_ms,
                        dst,
                        &session.binding,
                        (&session.peer_key, &session.open),
                        &mut session.received,
                    )?
                } else {
                    self.verifier.verify(token, now_ms, dst, &session.binding)?
                };
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
    /// (`a` dials: it is the TLS client.) The keys follow from the binding here; a real
    /// session's are exporter values (`testkit/tunnel_tests.rs` uses real ones).
    fn pair(a: &Host, b: &Host, binding: Binding) -> (TunnelSession, TunnelSession) {
        let secrets = secrets(binding);
        let at_a = a
            .tokens
            .session(
                "b".into(),
                Some(&b.cert.clone().into()),
                &secrets,
                Role::Client,
            )
            .unwrap();
        let at_b = b
            .tokens
            .session(
                "a".into(),
                Some(&a.cert.clone().into()),
                &secrets,
                Role::Server,
            )
            .unwrap();
        (at_a, at_b)
    }

    fn secrets(binding: Binding) -> SessionSecrets {
        SessionSecrets::from_parts(binding, [binding[0] | 0x40; 32], [binding[0] | 0x80; 32])
    }

    #[test]
    fn first_token_is_cold_then_warm_and_both_verify() {
        let ca = ca();
        let (a, b) = (host("a", &ca, true), host("b", &ca, true));
        let (mut at_a, mut at_b) = pair(&a, &b, [1; 16]);
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
            let got = b
                .tokens
                .check(&mut at_b, &Proof::Token(t), dst, NOW)
                .unwrap();
            assert_eq!(got, web);
        }
    }

    #[test]
    fn a_peer_cannot_vouch_for_another_hosts_workload() {
        let ca = ca();
        let (a, b) = (host("a", &ca, true), host("b", &ca, true));
        let (mut at_a, mut at_b) = pair(&a, &b, [1; 16]);
        let dst = "10.0.0.2:80".parse().unwrap();
        let stolen = workload("c", "db");
        let proof = a.tokens.prove(&mut at_a, &stolen, dst, NOW).unwrap();
        let err = b.tokens.check(&mut at_b, &proof, dst, NOW).unwrap_err();
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
        let (_, mut at_b) = pair(&a, &b, [1; 16]);
        // c signs for a's workload on a session it does not hold (same binding value even).
        let (mut c_to_b, _) = pair(&c, &b, [1; 16]);
        let dst = "10.0.0.2:80".parse().unwrap();
        let proof = c
            .tokens
            .prove(&mut c_to_b, &workload("a", "web"), dst, NOW)
            .unwrap();
        let err = b.tokens.check(&mut at_b, &proof, dst, NOW).unwrap_err();
        assert_eq!(err.code().as_str(), "issuer-not-peer", "{err}");
    }

    #[test]
    fn unsigned_identities_are_refused_when_tokens_are_on() {
        let ca = ca();
        let (a, b) = (host("a", &ca, false), host("b", &ca, true));
        let (mut at_a, mut at_b) = pair(&a, &b, [1; 16]);
        let dst = "10.0.0.2:80".parse().unwrap();
        let proof = a
            .tokens
            .prove(&mut at_a, &workload("a", "web"), dst, NOW)
            .unwrap();
        assert!(matches!(proof, Proof::Unsigned(_)));
        let err = b.tokens.check(&mut at_b, &proof, dst, NOW).unwrap_err();
        assert_eq!(err.code().as_str(), "no-token");
    }

    #[test]
    fn a_certificate_from_another_ca_gives_no_session() {
        let (ca1, ca2) = (ca(), ca());
        let a = host("a", &ca1, true);
        let stranger = host("x", &ca2, true);
        let err = a
            .tokens
            .session(
                "x".into(),
                Some(&stranger.cert.clone().into()),
                &secrets([0; 16]),
                Role::Server,
            )
            .unwrap_err();
        assert_eq!(err.code().as_str(), "untrusted-issuer");
    }

    /// Session tokens (version 3): the default proof on a tunnel.
    mod session_tokens {
        use super::*;
        use crate::identity::{
            scope,
            signer::{seal_session_claims, sequence_nonce},
            token::{Claims, SESSION_TAG_LEN, VERSION, decode},
        };
        use std::collections::BTreeMap;

        const DST: &str = "10.0.0.2:80";

        fn dst() -> SocketAddr {
            DST.parse().unwrap()
        }

        fn token(proof: Proof) -> Vec<u8> {
            match proof {
                Proof::Token(t) => t,
                other => panic!("expected a token: {other:?}"),
            }
        }

        fn hosts() -> (Host, Host) {
            let ca = ca();
            (host("a", &ca, true), host("b", &ca, true))
        }

        fn check(b: &Host, at_b: &mut TunnelSession, t: &[u8]) -> Result<Identity, Refusal> {
            b.tokens.check(at_b, &Proof::Token(t.to_vec()), dst(), NOW)
        }

        fn code(r: Result<Identity, Refusal>) -> &'static str {
            r.expect_err("refused").code().as_str()
        }

        #[test]
        fn tokens_are_sealed_with_the_session_key_cold_then_warm_and_verify() {
            let (a, b) = hosts();
            let (mut at_a, mut at_b) = pair(&a, &b, [1; 16]);
            let web = workload("a", "web");
            let cold = token(a.tokens.prove(&mut at_a, &web, dst(), NOW).unwrap());
            let warm = token(a.tokens.prove(&mut at_a, &web, dst(), NOW).unwrap());
            assert_eq!((cold[0], warm[0]), (VERSION_SESSION, VERSION_SESSION));
            // The tag replaces the signature: 48 bytes shorter than version 1.
            let (_, _, seal) = decode(&warm).unwrap();
            assert!(
                matches!(seal, crate::identity::token::Seal::SessionTag(t) if t.len() == SESSION_TAG_LEN)
            );
            assert_eq!(warm.len(), 157 - 64 + SESSION_TAG_LEN, "docs/token.md");
            // Sequence numbers 1 and 2 are the nonces.
            assert_eq!(decode(&cold).unwrap().0.nonce, sequence_nonce(1));
            assert_eq!(decode(&warm).unwrap().0.nonce, sequence_nonce(2));
            for t in [&cold, &warm] {
                assert_eq!(check(&b, &mut at_b, t).unwrap(), web);
            }
            // And the other way: b's answer, sealed with the server's key.
            let api = workload("b", "api");
            let answer = token(b.tokens.prove(&mut at_b, &api, dst(), NOW).unwrap());
            assert_eq!(
                a.tokens
                    .check(&mut at_a, &Proof::Token(answer), dst(), NOW)
                    .unwrap(),
                api
            );
            // No nonce was remembered anywhere.
            assert_eq!(
                b.tokens.remembered_nonces() + a.tokens.remembered_nonces(),
                0
            );
        }

        #[test]
        fn a_token_from_another_session_is_refused_even_relabelled() {
            let (a, b) = hosts();
            let (mut one, _) = pair(&a, &b, [1; 16]);
            let (_, mut two) = pair(&a, &b, [2; 16]);
            let lifted = token(
                a.tokens
                    .prove(&mut one, &workload("a", "web"), dst(), NOW)
                    .unwrap(),
            );
            assert_eq!(code(check(&b, &mut two, &lifted)), "wrong-session");
            // Rewritten to name session two: the tag is under session one's key.
            let mut relabelled = lifted.clone();
            let (claims, _, _) = decode(&lifted).unwrap();
            let at = relabelled
                .windows(16)
                .position(|w| w == claims.binding)
                .unwrap();
            relabelled[at..at + 16].copy_from_slice(&two.binding);
            assert_eq!(code(check(&b, &mut two, &relabelled)), "bad-signature");
            // Resealed by the peer itself with session one's key for session two's binding:
            // the key, not the binding field, is what ties it to a session.
            let resealed = seal_session_claims(
                &secrets([1; 16]).key(Role::Client),
                &Claims {
                    binding: two.binding,
                    nonce: sequence_nonce(7),
                    ..claims
                },
            );
            assert_eq!(code(check(&b, &mut two, &resealed)), "bad-signature");
            // The refusals spent nothing: a genuine token of session two still passes.
            let (mut two_a, _) = pair(&a, &b, [2; 16]);
            let fresh = token(
                a.tokens
                    .prove(&mut two_a, &workload("a", "web"), dst(), NOW)
                    .unwrap(),
            );
            check(&b, &mut two, &fresh).unwrap();
        }

        #[test]
        fn a_token_reflected_to_its_sender_is_refused() {
            let (a, b) = hosts();
            let (mut at_a, _) = pair(&a, &b, [1; 16]);
            let own = token(
                a.tokens
                    .prove(&mut at_a, &workload("a", "web"), dst(), NOW)
                    .unwrap(),
            );
            // a checks with the server's key; its own token is under the client's.
            let err = a
                .tokens
                .check(&mut at_a, &Proof::Token(own), dst(), NOW)
                .unwrap_err();
            assert_eq!(err.code().as_str(), "bad-signature", "{err}");
        }

        #[test]
        fn tampered_identity_labels_destination_or_time_are_refused() {
            let (a, b) = hosts();
            let (mut at_a, mut at_b) = pair(&a, &b, [1; 16]);
            let t = token(
                a.tokens
                    .prove(&mut at_a, &workload("a", "web"), dst(), NOW)
                    .unwrap(),
            );
            let (claims, _, _) = decode(&t).unwrap();
            let find = |needle: &[u8]| t.windows(needle.len()).position(|w| w == needle).unwrap();
            let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
            // A label value ("app=web" -> "app=adm"), the SPIFFE name, the destination.
            let mut label = t.clone();
            let at = find(b"web");
            label[at..at + 3].copy_from_slice(b"adm");
            cases.push(("label", label));
            let mut spiffe = t.clone();
            let at = find(b"enforcer/a/");
            spiffe[at + 9] = b'c';
            cases.push(("spiffe", spiffe));
            let mut addr = t.clone();
            let at = find(&[4, 10, 0, 0, 2]);
            addr[at + 4] = 3;
            cases.push(("destination", addr));
            let mut time = t.clone();
            time[10 + 7] ^= 1; // the low byte of issued_ms
            cases.push(("issue time", time));
            let mut tag = t.clone();
            *tag.last_mut().unwrap() ^= 1;
            cases.push(("tag", tag));
            for (what, bad) in cases {
                assert_eq!(code(check(&b, &mut at_b, &bad)), "bad-signature", "{what}");
            }
            // Honest claims for another destination fail as such.
            let other = seal_session_claims(
                &secrets([1; 16]).key(Role::Client),
                &Claims {
                    dst: "10.0.0.3:80".parse().unwrap(),
                    nonce: sequence_nonce(9),
                    ..claims.clone()
                },
            );
            assert_eq!(code(check(&b, &mut at_b, &other)), "wrong-destination");
            // The peer naming another enforcer's key as issuer, under the right key.
            let issuer = seal_session_claims(
                &secrets([1; 16]).key(Role::Client),
                &Claims {
                    issuer: [9; 8],
                    nonce: sequence_nonce(10),
                    ..claims
                },
            );
            assert_eq!(code(check(&b, &mut at_b, &issuer)), "issuer-not-peer");
            // None of them advanced the sequence: the original still passes.
            check(&b, &mut at_b, &t).unwrap();
        }

        #[test]
        fn replayed_and_too_old_sequence_numbers_are_refused_late_ones_pass_once() {
            let (a, b) = hosts();
            let (mut at_a, mut at_b) = pair(&a, &b, [1; 16]);
            let web = workload("a", "web");
            let first = token(a.tokens.prove(&mut at_a, &web, dst(), NOW).unwrap());
            let second = token(a.tokens.prove(&mut at_a, &web, dst(), NOW).unwrap());
            let third = token(a.tokens.prove(&mut at_a, &web, dst(), NOW).unwrap());
            check(&b, &mut at_b, &first).unwrap();
            assert_eq!(code(check(&b, &mut at_b, &first)), "replay");
            check(&b, &mut at_b, &third).unwrap();
            // Streams are answered concurrently: an older token not used yet still passes,
            // once.
            check(&b, &mut at_b, &second).unwrap();
            assert_eq!(code(check(&b, &mut at_b, &second)), "replay");
            assert_eq!(code(check(&b, &mut at_b, &third)), "replay");
            // One more than the window behind the newest: refused though never used.
            let early = token(a.tokens.prove(&mut at_a, &web, dst(), NOW).unwrap());
            let mut newest = Vec::new();
            for _ in 0..crate::identity::replay::WINDOW {
                newest = token(a.tokens.prove(&mut at_a, &web, dst(), NOW).unwrap());
            }
            check(&b, &mut at_b, &newest).unwrap();
            assert_eq!(code(check(&b, &mut at_b, &early)), "replay");
            // Expired tokens are refused too (the counter does not replace time).
            let late = token(
                a.tokens
                    .prove(&mut at_a, &web, dst(), NOW - 60_000)
                    .unwrap(),
            );
            assert_eq!(code(check(&b, &mut at_b, &late)), "expired");
        }

        #[test]
        fn truncated_and_overlong_tokens_are_refused() {
            let (a, b) = hosts();
            let (mut at_a, mut at_b) = pair(&a, &b, [1; 16]);
            let t = token(
                a.tokens
                    .prove(&mut at_a, &workload("a", "web"), dst(), NOW)
                    .unwrap(),
            );
            for cut in 0..t.len() {
                let c = code(check(&b, &mut at_b, &t[..cut]));
                assert!(
                    matches!(
                        c,
                        "truncated" | "malformed" | "wrong-session" | "bad-signature"
                    ),
                    "cut at {cut}: {c}"
                );
            }
            for extra in [1, 16, 1024] {
                let mut long = t.clone();
                long.extend(std::iter::repeat_n(0u8, extra));
                let c = code(check(&b, &mut at_b, &long));
                assert!(
                    matches!(c, "malformed" | "oversized" | "bad-signature"),
                    "+{extra}: {c}"
                );
            }
            check(&b, &mut at_b, &t).unwrap();
        }

        #[test]
        fn out_of_scope_labels_on_a_valid_session_are_refused() {
            let (a, b) = hosts();
            let (mut at_a, mut at_b) = pair(&a, &b, [1; 16]);
            let mut claim = workload("a", "web");
            claim.labels =
                tessera_policy::Labels::new(claim.labels.iter().chain([("site", "london")]));
            let t = token(a.tokens.prove(&mut at_a, &claim, dst(), NOW).unwrap());
            // The session vouches that a said it; a's scope says a may not.
            let verified = check(&b, &mut at_b, &t).unwrap();
            let paris: BTreeMap<_, _> = [("site".to_string(), "paris".to_string())].into();
            let e = scope::stamp(verified, &paris).unwrap_err();
            assert_eq!((e.claimed.as_str(), e.scope.as_str()), ("london", "paris"));
        }

        /// A peer may send as many tokens as it likes on a session: the receiver's replay
        /// state stays one counter. Signed tokens, the old default, leave a nonce each in
        /// the verifier's cache for the token's lifetime.
        #[test]
        fn replay_state_stays_bounded_under_a_flood() {
            const FLOOD: usize = 20_000;
            let (a, b) = hosts();
            let (mut at_a, mut at_b) = pair(&a, &b, [1; 16]);
            let web = workload("a", "web");
            for _ in 0..FLOOD {
                let t = token(a.tokens.prove(&mut at_a, &web, dst(), NOW).unwrap());
                check(&b, &mut at_b, &t).unwrap();
            }
            assert_eq!(b.tokens.remembered_nonces(), 0);
            // The same flood of signed tokens (a shorter one: Ed25519 is slow unoptimized).
            let ca = ca();
            let (a, b) = (host("a", &ca, true), host("b", &ca, true));
            let a = Host {
                tokens: a.tokens.with_signed_tunnel_tokens(true),
                cert: a.cert,
            };
            let (mut at_a, mut at_b) = pair(&a, &b, [1; 16]);
            for _ in 0..500 {
                let t = token(a.tokens.prove(&mut at_a, &web, dst(), NOW).unwrap());
                assert_eq!(t[0], VERSION);
                check(&b, &mut at_b, &t).unwrap();
            }
            assert_eq!(b.tokens.remembered_nonces(), 500);
        }

        /// A pooled tunnel lives on after its peer's certificate expired or the peer was
        /// forgotten (left the directory): its session tokens are refused from then on, as
        /// signed ones were.
        #[test]
        fn a_session_ends_with_its_peers_certificate_or_trust() {
            let ca = ca();
            let (a, b) = (host("a", &ca, true), host("b", &ca, true));
            let (mut at_a, mut at_b) = pair(&a, &b, [1; 16]);
            let web = workload("a", "web");
            let t = token(a.tokens.prove(&mut at_a, &web, dst(), NOW).unwrap());
            check(&b, &mut at_b, &t).unwrap();
            // rcgen's certificates end in 4096; a token checked after that (plus skew).
            let (_, not_after) = certified_key(&a.cert, &ca.1).unwrap();
            let late = not_after + 10_000;
            let t = token(a.tokens.prove(&mut at_a, &web, dst(), late).unwrap());
            let err = b
                .tokens
                .check(&mut at_b, &Proof::Token(t), dst(), late)
                .unwrap_err();
            assert_eq!(err.code().as_str(), "untrusted-issuer", "{err}");
            b.tokens.forget_peer(&at_b.peer_key);
            let t = token(a.tokens.prove(&mut at_a, &web, dst(), NOW).unwrap());
            assert_eq!(code(check(&b, &mut at_b, &t)), "untrusted-issuer");
        }

        #[test]
        fn a_session_token_is_refused_outside_its_session() {
            let (a, b) = hosts();
            let (mut at_a, at_b) = pair(&a, &b, [1; 16]);
            let t = token(
                a.tokens
                    .prove(&mut at_a, &workload("a", "web"), dst(), NOW)
                    .unwrap(),
            );
            // Handshake mode checks tokens without a tunnel session.
            let err = b
                .tokens
                .check_token(&t, "a", &at_b.peer_key, dst(), &at_b.binding, NOW)
                .unwrap_err();
            assert_eq!(err.code().as_str(), "wrong-session", "{err}");
        }
    }
}
