//! Verifying tokens.
//!
//! Order of checks: size and layout, then the issuer (only keys whose certificate the cluster
//! CA signed are known), the signature, time (with a configured clock skew), destination,
//! TLS session, and last the nonce, so that forged tokens cannot fill the replay cache.
//! Nonces are remembered until their token expires (plus skew): a replay within that window
//! is refused, and after it the token is refused as expired anyway.
//!
//! Session tokens (version 3, [`Verifier::verify_session`]) are checked against one tunnel's
//! TLS session instead: its binding, then the tag under the peer side's session key, time,
//! destination, and last the sequence number, which must exceed the last one accepted on
//! that session. They never touch the nonce cache: their replay state is one counter per
//! session, whatever a peer sends.
use crate::identity::replay::ReplayWindow;
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

/// Verified identities kept for warm tokens at most. Only tokens a certified peer signed
/// get here, but a peer (or a compromised one) with ever-changing identities must not grow
/// it forever. 16,384 is far more workload identities than a cluster's peers vouch for;
/// past it an arbitrary one is evicted (counted): a warm token for it is refused
/// (`unknown-identity`) and its sender goes back to cold tokens.
pub const MAX_IDENTITIES: usize = 16_384;

use ed25519_dalek::{Signature, VerifyingKey};
use ring::hmac;

use super::{
    Identity,
    signer::{identity_digest, key_id, pair_tag},
    token::{Binding, Claim, Claims, Digest, KeyId, Nonce, Seal, TokenError, decode},
};

/// A verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub identity: Identity,
    pub issuer: KeyId,
    /// Whether the token carried the full identity.
    pub cold: bool,
}

/// Nonces of accepted tokens, each with the time after which its token is expired anyway.
#[derive(Default)]
struct SeenNonces {
    nonces: HashMap<Nonce, u64>,
    next_prune_ms: u64,
}

pub struct Verifier {
    /// Trusted keys and until when (their certificate's end of validity, ms).
    /// (Decompressed once here: ring would redo it on every verification.)
    keys: RwLock<HashMap<KeyId, (VerifyingKey, u64)>>,
    /// Pair keys (version-2 tokens) by the other enforcer's key id, and until when.
    pairs: RwLock<HashMap<KeyId, (hmac::Key, u64)>>,
    /// Verified identities by (issuer, digest): a warm token only names an identity that the
    /// same issuer vouched for in full before.
    identities: RwLock<HashMap<(KeyId, Digest), Identity>>,
    /// Identities evicted from `identities` because it was full.
    evicted: AtomicU64,
    seen: Mutex<SeenNonces>,
    skew_ms: u64,
    max_lifetime_ms: u32,
}

/// The Ed25519 public key of `cert_der` and the end of its validity (Unix ms), if the CA
/// certificate `ca_der` signed it and it is valid now.
pub fn certified_key(cert_der: &[u8], ca_der: &[u8]) -> Result<([u8; 32], u64), TokenError> {
    use x509_parser::prelude::*;
    let bad = |e: String| TokenError::Uncertified(e);
    let (_, ca) =
        X509Certificate::from_der(ca_der).map_err(|e| bad(format!("CA certificate: {e}")))?;
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| bad(format!("certificate: {e}")))?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|e| bad(format!("signature: {e}")))?;
    if !cert.validity().is_valid() {
        return Err(bad("outside its validity period".into()));
    }
    if cert.public_key().algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
        return Err(bad("not an Ed25519 key".into()));
    }
    let key = cert
        .public_key()
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| bad("Ed25519 key is not 32 bytes".into()))?;
    let not_after = cert.validity().not_after.timestamp().max(0) as u64 * 1000;
    Ok((key, not_after))
}

impl Verifier {
    pub fn new(skew_ms: u64, max_lifetime_ms: u32) -> Self {
        Self {
            keys: RwLock::default(),
            pairs: RwLock::default(),
            identities: RwLock::default(),
            evicted: AtomicU64::new(0),
            seen: Mutex::default(),
            skew_ms,
            max_lifetime_ms,
        }
    }

    /// Identities evicted from the warm-token cache because it was full.
    pub fn evicted_identities(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Trusts a public key the cluster CA certified (see [`certified_key`]) until
    /// `until_ms`, the end of its certificate's validity. Keys of a rotated certificate are
    /// added beside the old one, so live peers keep working.
    pub fn trust_until(&self, public_key: &[u8; 32], until_ms: u64) -> Result<KeyId, TokenError> {
        let key = VerifyingKey::from_bytes(public_key)
            .map_err(|_| TokenError::Uncertified("not a valid Ed25519 public key".into()))?;
        let id = key_id(public_key);
        self.keys.write().expect("lock").insert(id, (key, until_ms));
        Ok(id)
    }

    /// Accepts version-2 tokens from the enforcer with key `peer`, sealed with `pair` (the
    /// pair key of that enforcer and this one), until `until_ms`.
    pub fn trust_pair(&self, peer: KeyId, pair: hmac::Key, until_ms: u64) {
        self.pairs
            .write()
            .expect("lock")
            .insert(peer, (pair, until_ms));
    }

    /// The pair key shared with the enforcer whose key id is `peer`, while it is valid.
    pub fn pair(&self, peer: &KeyId, now_ms: u64) -> Result<hmac::Key, TokenError> {
        let pairs = self.pairs.read().expect("lock");
        let (pair, until) = pairs.get(peer).ok_or(TokenError::UnknownIssuer)?;
        if until.saturating_add(self.skew_ms) < now_ms {
            return Err(TokenError::Uncertified(
                "the issuer's certificate expired".into(),
            ));
        }
        Ok(pair.clone())
    }

    /// Trusts a key without an end (this enforcer's own key; tests).
    pub fn trust(&self, public_key: &[u8]) -> KeyId {
        let key: [u8; 32] = public_key.try_into().expect("an Ed25519 public key");
        self.trust_until(&key, u64::MAX)
            .expect("a valid Ed25519 public key")
    }

    /// Stops trusting a key, and forgets the identities it vouched for.
    pub fn forget(&self, id: &KeyId) {
        self.keys.write().expect("lock").remove(id);
        self.pairs.write().expect("lock").remove(id);
        self.identities
            .write()
            .expect("lock")
            .retain(|(issuer, _), _| issuer != id);
    }

    /// Forgets keys whose certificate expired, and the identities they vouched for.
    fn prune_keys(&self, now_ms: u64) {
        let expired: Vec<KeyId> = self
            .keys
            .read()
            .expect("lock")
            .iter()
            .filter(|(_, (_, until))| until.saturating_add(self.skew_ms) < now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.forget(&id);
        }
    }

    /// Verifies `token`, which must be meant for `dst` on the TLS session `binding`.
    ///
    /// The steps run in the order of the module documentation: layout, seal (issuer and
    /// signature or pair tag), time, destination and session, and only then the replay
    /// cache, so that tokens that fail any earlier check never reach it.
    pub fn verify(
        &self,
        token: &[u8],
        now_ms: u64,
        dst: SocketAddr,
        binding: &Binding,
    ) -> Result<Verified, TokenError> {
        let (claims, signed, seal) = decode(token)?;
        // Warm tokens follow cold ones on a tunnel session; pair tokens are always cold.
        let keep_identity = matches!(seal, Seal::Signature(_));
        match seal {
            Seal::Signature(signature) => {
                self.check_signature(&claims.issuer, signed, signature, now_ms)?
            }
            Seal::PairTag(tag) => self.check_pair_tag(&claims.issuer, signed, tag, now_ms)?,
            // Only its own tunnel session can check it (`verify_session`).
            Seal::SessionTag(_) => return Err(TokenError::WrongSession),
        }
        let expires = self.check_time(&claims, now_ms)?;
        check_binding(&claims, dst, binding)?;
        self.remember_nonce(claims.nonce, expires, now_ms)?;
        self.identity_of(claims.issuer, claims.claim, keep_identity)
    }

    /// Verifies a version-3 `token` received on one tunnel session: bound to `binding`,
    /// sealed with `key` (the peer side's key of that session) by `peer` (the key id of the
    /// session's certificate), meant for `dst`, and with a sequence number `window` has
    /// not seen (marked here; see [`ReplayWindow`]). A token lifted from another session names another binding (`wrong-session`)
    /// or, relabelled, fails the tag (`bad-signature`): the key is the session's.
    pub fn verify_session(
        &self,
        token: &[u8],
        now_ms: u64,
        dst: SocketAddr,
        binding: &Binding,
        (peer, key): (&KeyId, &hmac::Key),
        window: &mut ReplayWindow,
    ) -> Result<Verified, TokenError> {
        let (claims, sealed, seal) = decode(token)?;
        let Seal::SessionTag(tag) = seal else {
            return Err(TokenError::Malformed("not a session token"));
        };
        if &claims.binding != binding {
            return Err(TokenError::WrongSession);
        }
        use subtle::ConstantTimeEq;
        if !bool::from(pair_tag(key, sealed).ct_eq(tag)) {
            return Err(TokenError::BadSignature);
        }
        // Checked before the identity is cached under the issuer it names.
        if &claims.issuer != peer {
            return Err(TokenError::IssuerNotPeer);
        }
        // The session outlives neither the peer's certificate nor its being forgotten (it
        // left the directory): as for a signed token, its key must still be trusted.
        self.check_trusted(peer, now_ms)?;
        self.check_time(&claims, now_ms)?;
        check_binding(&claims, dst, binding)?;
        if !window.accept(u128::from_be_bytes(claims.nonce)) {
            return Err(TokenError::Replayed);
        }
        self.identity_of(claims.issuer, claims.claim, true)
    }

    /// Nonces remembered against replays (version-1 and 2 tokens; version 3 keeps none).
    pub fn remembered_nonces(&self) -> usize {
        self.seen.lock().expect("lock").nonces.len()
    }

    /// The Ed25519 seal (version 1): `issuer` is a trusted key whose certificate has not
    /// expired, and `signature` is its signature over `signed`.
    fn check_signature(
        &self,
        issuer: &KeyId,
        signed: &[u8],
        signature: &[u8],
        now_ms: u64,
    ) -> Result<(), TokenError> {
        let key = self.check_trusted(issuer, now_ms)?;
        let signature = Signature::from_slice(signature).map_err(|_| TokenError::BadSignature)?;
        // Plain (not strict) verification: keys are CA-certified, and a re-encoded
        // signature over the same claims would carry the same nonce, so it cannot
        // pass as a new token.
        use ed25519_dalek::Verifier as _;
        key.verify(signed, &signature)
            .map_err(|_| TokenError::BadSignature)
    }

    /// The key of `issuer` if it is trusted and its certificate has not expired (give or
    /// take the skew).
    fn check_trusted(&self, issuer: &KeyId, now_ms: u64) -> Result<VerifyingKey, TokenError> {
        let (key, until) = *self
            .keys
            .read()
            .expect("lock")
            .get(issuer)
            .ok_or(TokenError::UnknownIssuer)?;
        if until.saturating_add(self.skew_ms) < now_ms {
            return Err(TokenError::Uncertified(
                "the issuer's certificate expired".into(),
            ));
        }
        Ok(key)
    }

    /// The pair seal (version 2): `tag` is the HMAC of `signed` under the pair key shared
    /// with `issuer`, compared in constant time.
    fn check_pair_tag(
        &self,
        issuer: &KeyId,
        signed: &[u8],
        tag: &[u8],
        now_ms: u64,
    ) -> Result<(), TokenError> {
        // Only the other enforcer of a pair is an issuer here: this one never seals
        // tokens for itself, so a reflected token of its own finds no pair.
        let pair = self.pair(issuer, now_ms)?;
        use subtle::ConstantTimeEq;
        if !bool::from(pair_tag(&pair, signed).ct_eq(tag)) {
            return Err(TokenError::BadSignature);
        }
        Ok(())
    }

    /// The token's lifetime is within the limit and it is valid at `now_ms` (give or take
    /// the clock skew); returns when it expires (without the skew).
    fn check_time(&self, claims: &Claims, now_ms: u64) -> Result<u64, TokenError> {
        if claims.lifetime_ms > self.max_lifetime_ms {
            return Err(TokenError::LifetimeTooLong);
        }
        if claims.issued_ms > now_ms + self.skew_ms {
            return Err(TokenError::NotYetValid);
        }
        let expires = claims.issued_ms + u64::from(claims.lifetime_ms);
        if now_ms > expires + self.skew_ms {
            return Err(TokenError::Expired);
        }
        Ok(expires)
    }

    /// Refuses a nonce already seen (a replay), else remembers it until its token
    /// `expires` (plus skew). Called only for tokens that passed every other check.
    fn remember_nonce(&self, nonce: Nonce, expires: u64, now_ms: u64) -> Result<(), TokenError> {
        let mut seen = self.seen.lock().expect("lock");
        // Prune at most once a second: pruning on every insert would make each verify
        // O(live nonces) under load.
        if now_ms >= seen.next_prune_ms {
            self.prune(&mut seen, now_ms);
        }
        let seen = &mut seen.nonces;
        if seen.get(&nonce).is_some_and(|until| *until >= now_ms) {
            return Err(TokenError::Replayed);
        }
        seen.insert(nonce, expires + self.skew_ms);
        Ok(())
    }

    /// Forgets expired nonces, keys and pair keys (with the nonce cache locked, as `seen`).
    fn prune(&self, seen: &mut SeenNonces, now_ms: u64) {
        seen.nonces.retain(|_, until| *until >= now_ms);
        seen.next_prune_ms = now_ms + 1_000;
        self.prune_keys(now_ms);
        self.pairs
            .write()
            .expect("lock")
            .retain(|_, (_, until)| until.saturating_add(self.skew_ms) >= now_ms);
    }

    /// The identity a verified token names: a cold token's own (remembered for later warm
    /// tokens if `keep_identity`), or the one a warm token's digest names, which the same
    /// issuer must have vouched for in full before.
    fn identity_of(
        &self,
        issuer: KeyId,
        claim: Claim,
        keep_identity: bool,
    ) -> Result<Verified, TokenError> {
        match claim {
            Claim::Cold(identity) => {
                if keep_identity {
                    let key = (issuer, identity_digest(&identity));
                    let mut known = self.identities.write().expect("lock");
                    if known.len() >= MAX_IDENTITIES
                        && !known.contains_key(&key)
                        && let Some(old) = known.keys().next().copied()
                    {
                        known.remove(&old);
                        self.evicted.fetch_add(1, Ordering::Relaxed);
                    }
                    known.insert(key, identity.clone());
                }
                Ok(Verified {
                    identity,
                    issuer,
                    cold: true,
                })
            }
            Claim::Warm(digest) => {
                let identity = self
                    .identities
                    .read()
                    .expect("lock")
                    .get(&(issuer, digest))
                    .cloned()
                    .ok_or(TokenError::UnknownIdentity)?;
                Ok(Verified {
                    identity,
                    issuer,
                    cold: false,
                })
            }
        }
    }
}

/// The token is meant for this destination and this TLS session.
fn check_binding(claims: &Claims, dst: SocketAddr, binding: &Binding) -> Result<(), TokenError> {
    if claims.dst != dst {
        return Err(TokenError::WrongDestination(claims.dst));
    }
    if &claims.binding != binding {
        return Err(TokenError::WrongSession);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{
        signer::Signer,
        spiffe_id,
        token::{Claims, MAX_TOKEN},
    };
    use rcgen::KeyPair;
    use tessera_policy::Labels;

    const NOW: u64 = 1_800_000_000_000;
    const SKEW: u64 = 2_000;
    const LIFETIME: u32 = 10_000;

    struct Enforcer {
        signer: Signer,
        cert: Vec<u8>,
    }

    use crate::identity::test_ca::ca as new_ca;

    fn ca() -> (KeyPair, Vec<u8>) {
        new_ca()
    }

    fn enforcer(ca_key: &KeyPair, ca_der: &[u8]) -> Enforcer {
        let (key, cert) = crate::identity::test_ca::enforcer("host-a", ca_key, ca_der);
        Enforcer {
            signer: Signer::from_pkcs8(&key).unwrap(),
            cert,
        }
    }

    fn web() -> Identity {
        Identity {
            spiffe: spiffe_id("tessera.local", "host-a", "web"),
            labels: Labels::new([("app", "web"), ("tier", "front")]),
        }
    }

    const DST: &str = "10.77.0.2:8080";
    const SESSION: Binding = [7u8; 16];

    fn setup() -> (Enforcer, Verifier) {
        let (ca_key, ca_der) = ca();
        let e = enforcer(&ca_key, &ca_der);
        let v = Verifier::new(SKEW, 60_000);
        v.trust(&certified_key(&e.cert, &ca_der).unwrap().0);
        (e, v)
    }

    fn cold(e: &Enforcer) -> Vec<u8> {
        e.signer
            .sign(&web(), false, DST.parse().unwrap(), SESSION, NOW, LIFETIME)
    }

    fn verify(v: &Verifier, t: &[u8]) -> Result<Verified, TokenError> {
        v.verify(t, NOW + 1, DST.parse().unwrap(), &SESSION)
    }

    #[test]
    fn a_good_token_verifies_and_sizes_fit() {
        let (e, v) = setup();
        let t = cold(&e);
        assert!(t.len() <= MAX_TOKEN, "cold token is {} bytes", t.len());
        assert_eq!(t.len(), 197, "the size docs/token.md states");
        let got = verify(&v, &t).unwrap();
        assert_eq!((got.identity, got.cold), (web(), true));
        // After first contact a digest suffices.
        let w = e
            .signer
            .sign(&web(), true, DST.parse().unwrap(), SESSION, NOW, LIFETIME);
        assert_eq!(w.len(), 157, "the size docs/token.md states");
        assert_eq!(verify(&v, &w).unwrap().identity, web());
    }

    #[test]
    fn a_forged_signature_is_rejected() {
        let (e, v) = setup();
        let mut t = cold(&e);
        let last = t.len() - 1;
        t[last] ^= 1;
        assert_eq!(verify(&v, &t), Err(TokenError::BadSignature));
    }

    #[test]
    fn labels_tampered_after_signing_are_rejected() {
        let (e, v) = setup();
        let t = cold(&e);
        let pos = t.windows(3).position(|w| w == b"web").unwrap();
        let mut t2 = t.clone();
        t2[pos..pos + 3].copy_from_slice(b"adm");
        assert_eq!(
            verify(&v, &t2).unwrap_err().code().as_str(),
            "bad-signature"
        );
    }

    #[test]
    fn a_key_the_ca_never_certified_is_rejected() {
        let (ca_key, ca_der) = ca();
        let trusted = enforcer(&ca_key, &ca_der);
        let v = Verifier::new(SKEW, 60_000);
        v.trust(&certified_key(&trusted.cert, &ca_der).unwrap().0);
        // Another CA's enforcer: its certificate does not chain to our CA ...
        let (rogue_ca_key, rogue_ca_der) = ca();
        let rogue = enforcer(&rogue_ca_key, &rogue_ca_der);
        assert!(matches!(
            certified_key(&rogue.cert, &ca_der),
            Err(TokenError::Uncertified(_))
        ));
        // ... and its tokens name an issuer we do not know.
        assert_eq!(verify(&v, &cold(&rogue)), Err(TokenError::UnknownIssuer));
        // Claiming to be the trusted issuer does not help: the signature does not verify.
        let (claims, _, _) = decode(&cold(&rogue)).unwrap();
        let forged = rogue.signer.sign_claims(&Claims {
            issuer: trusted.signer.key_id(),
            ..claims
        });
        assert_eq!(verify(&v, &forged), Err(TokenError::BadSignature));
    }

    #[test]
    fn expired_and_future_tokens_are_rejected_within_the_skew_rules() {
        let (e, v) = setup();
        let dst = DST.parse().unwrap();
        let old = e.signer.sign(
            &web(),
            false,
            dst,
            SESSION,
            NOW - u64::from(LIFETIME) - SKEW - 1,
            LIFETIME,
        );
        assert_eq!(v.verify(&old, NOW, dst, &SESSION), Err(TokenError::Expired));
        let barely = e.signer.sign(
            &web(),
            false,
            dst,
            SESSION,
            NOW - u64::from(LIFETIME) - SKEW + 1,
            LIFETIME,
        );
        assert!(
            v.verify(&barely, NOW, dst, &SESSION).is_ok(),
            "within the skew"
        );
        let future = e
            .signer
            .sign(&web(), false, dst, SESSION, NOW + SKEW + 1, LIFETIME);
        assert_eq!(
            v.verify(&future, NOW, dst, &SESSION),
            Err(TokenError::NotYetValid)
        );
        let long = e.signer.sign(&web(), false, dst, SESSION, NOW, 3_600_000);
        assert_eq!(
            v.verify(&long, NOW, dst, &SESSION),
            Err(TokenError::LifetimeTooLong)
        );
    }

    #[test]
    fn a_replayed_token_is_rejected() {
        let (e, v) = setup();
        let t = cold(&e);
        verify(&v, &t).unwrap();
        assert_eq!(verify(&v, &t), Err(TokenError::Replayed));
        // A fresh token (new nonce) for the same identity is fine.
        verify(&v, &cold(&e)).unwrap();
    }

    #[test]
    fn a_token_for_another_destination_or_session_is_rejected() {
        let (e, v) = setup();
        let t = cold(&e);
        assert_eq!(
            v.verify(&t, NOW, "10.77.0.3:8080".parse().unwrap(), &SESSION),
            Err(TokenError::WrongDestination(DST.parse().unwrap()))
        );
        assert_eq!(
            v.verify(&t, NOW, DST.parse().unwrap(), &[8u8; 16]),
            Err(TokenError::WrongSession)
        );
        // Lifted tokens failed before their nonce was spent: the rightful use still works.
        verify(&v, &t).unwrap();
    }

    #[test]
    fn truncated_oversized_and_garbage_tokens_are_rejected() {
        let (e, v) = setup();
        let t = cold(&e);
        for cut in 0..t.len() {
            let err = verify(&v, &t[..cut]).unwrap_err();
            assert!(
                matches!(
                    err.code().as_str(),
                    "truncated" | "malformed" | "bad-signature"
                ),
                "cut at {cut}: {err}"
            );
        }
        let mut big = t.clone();
        big.resize(MAX_TOKEN + 1, 0);
        assert_eq!(verify(&v, &big), Err(TokenError::Oversized(MAX_TOKEN + 1)));
        assert!(matches!(
            verify(&v, &[0xAB; 200]),
            Err(TokenError::Version(0xAB))
        ));
        let mut wrong_kind = t.clone();
        wrong_kind[1] = 9;
        assert_eq!(verify(&v, &wrong_kind), Err(TokenError::Malformed("kind")));
    }

    #[test]
    fn a_warm_token_needs_a_verified_cold_one_first() {
        let (e, v) = setup();
        let w = e
            .signer
            .sign(&web(), true, DST.parse().unwrap(), SESSION, NOW, LIFETIME);
        assert_eq!(verify(&v, &w), Err(TokenError::UnknownIdentity));
    }

    #[test]
    fn key_rotation_keeps_old_and_new_keys_valid() {
        let (ca_key, ca_der) = ca();
        let (old, new) = (enforcer(&ca_key, &ca_der), enforcer(&ca_key, &ca_der));
        let v = Verifier::new(SKEW, 60_000);
        let old_id = v.trust(&certified_key(&old.cert, &ca_der).unwrap().0);
        v.trust(&certified_key(&new.cert, &ca_der).unwrap().0);
        verify(&v, &cold(&old)).unwrap();
        verify(&v, &cold(&new)).unwrap();
        v.forget(&old_id);
        assert_eq!(verify(&v, &cold(&old)), Err(TokenError::UnknownIssuer));
    }

    #[test]
    fn a_key_is_trusted_only_until_its_certificate_expires() {
        let (ca_key, ca_der) = ca();
        let e = enforcer(&ca_key, &ca_der);
        let (key, not_after) = certified_key(&e.cert, &ca_der).unwrap();
        assert!(not_after > NOW, "rcgen's default validity runs past NOW");
        let v = Verifier::new(SKEW, 60_000);
        // The certificate ends just after NOW: the cold token verifies, a later one does not.
        v.trust_until(&key, NOW + 1).unwrap();
        verify(&v, &cold(&e)).unwrap();
        let later = NOW + 1 + SKEW + 1;
        let t = e
            .signer
            .sign(&web(), true, DST.parse().unwrap(), SESSION, later, LIFETIME);
        let err = v
            .verify(&t, later, DST.parse().unwrap(), &SESSION)
            .unwrap_err();
        assert_eq!(err.code().as_str(), "untrusted-issuer", "{err}");
    }

    /// Version-2 tokens: sealed with the pair key of two enforcers (TCP-handshake mode).
    mod pair_tokens {
        use super::*;
        use crate::identity::signer::seal_claims;

        struct Host {
            signer: Signer,
            public: [u8; 32],
            verifier: Verifier,
        }

        fn host(name: &str, ca: &(KeyPair, Vec<u8>)) -> Host {
            let (key, _) = crate::identity::test_ca::enforcer(name, &ca.0, &ca.1);
            let signer = Signer::from_pkcs8(&key).unwrap();
            let public = signer.public_key().try_into().unwrap();
            Host {
                signer,
                public,
                verifier: Verifier::new(SKEW, 60_000),
            }
        }

        /// host-a, host-b and host-c of one CA; b accepts pair tokens from a and from c.
        fn hosts() -> (Host, Host, Host) {
            let ca = ca();
            let (a, b, c) = (
                host("host-a", &ca),
                host("host-b", &ca),
                host("host-c", &ca),
            );
            for peer in [&a, &c] {
                b.verifier.trust_pair(
                    peer.signer.key_id(),
                    b.signer.pair_key(&peer.public).unwrap(),
                    u64::MAX,
                );
            }
            a.verifier.trust_pair(
                b.signer.key_id(),
                a.signer.pair_key(&b.public).unwrap(),
                u64::MAX,
            );
            (a, b, c)
        }

        fn sealed(from: &Host, to: &Host, at: u64) -> Vec<u8> {
            let pair = from.signer.pair_key(&to.public).unwrap();
            from.signer
                .seal_cold(&pair, &web(), DST.parse().unwrap(), SESSION, at, LIFETIME)
        }

        #[test]
        fn both_ends_derive_the_same_pair_key_and_a_sealed_token_verifies() {
            let (a, b, c) = hosts();
            let t = sealed(&a, &b, NOW);
            // A tag of 16 bytes instead of a signature of 64.
            assert_eq!(t.len(), 197 - 64 + 16);
            let got = verify(&b.verifier, &t).unwrap();
            assert_eq!((got.identity, got.issuer), (web(), a.signer.key_id()));
            // Pair keys differ per pair.
            let t_ab = seal_claims(&a.signer.pair_key(&b.public).unwrap(), &claims(&a));
            let t_cb = seal_claims(&c.signer.pair_key(&b.public).unwrap(), &claims(&a));
            assert_ne!(t_ab, t_cb);
        }

        fn claims(issuer: &Host) -> Claims {
            Claims {
                issuer: issuer.signer.key_id(),
                issued_ms: NOW,
                lifetime_ms: LIFETIME,
                nonce: [9; 16],
                dst: DST.parse().unwrap(),
                binding: SESSION,
                claim: Claim::Cold(web()),
            }
        }

        #[test]
        fn a_third_enforcer_cannot_forge_a_token_of_another() {
            let (a, b, c) = hosts();
            // c is certified and paired with b, but claims to be a: its pair key with b is
            // not a's, nor is its pair key with a.
            for key in [
                c.signer.pair_key(&b.public).unwrap(),
                c.signer.pair_key(&a.public).unwrap(),
            ] {
                let forged = seal_claims(&key, &claims(&a));
                assert_eq!(verify(&b.verifier, &forged), Err(TokenError::BadSignature));
            }
            // A random key, a zero tag: the same.
            let random = hmac::Key::new(hmac::HMAC_SHA256, &[1; 32]);
            let forged = seal_claims(&random, &claims(&a));
            assert_eq!(verify(&b.verifier, &forged), Err(TokenError::BadSignature));
            let mut zero = sealed(&a, &b, NOW);
            let n = zero.len();
            zero[n - 16..].fill(0);
            assert_eq!(verify(&b.verifier, &zero), Err(TokenError::BadSignature));
        }

        #[test]
        fn tampered_labels_and_tags_are_rejected() {
            let (a, b, _) = hosts();
            let t = sealed(&a, &b, NOW);
            let pos = t.windows(3).position(|w| w == b"web").unwrap();
            let mut labels = t.clone();
            labels[pos..pos + 3].copy_from_slice(b"adm");
            assert_eq!(verify(&b.verifier, &labels), Err(TokenError::BadSignature));
            let mut tag = t.clone();
            let last = tag.len() - 1;
            tag[last] ^= 1;
            assert_eq!(verify(&b.verifier, &tag), Err(TokenError::BadSignature));
            // A signed (version 1) token relabelled as version 2: its last 16 bytes are no tag.
            let mut v1 = a
                .signer
                .sign(&web(), false, DST.parse().unwrap(), SESSION, NOW, LIFETIME);
            v1[0] = crate::identity::token::VERSION_PAIR;
            assert!(verify(&b.verifier, &v1).is_err());
        }

        #[test]
        fn every_truncation_is_rejected() {
            let (a, b, _) = hosts();
            let t = sealed(&a, &b, NOW);
            for n in 0..t.len() {
                let err = verify(&b.verifier, &t[..n]).unwrap_err();
                assert!(
                    matches!(
                        err.code().as_str(),
                        "truncated" | "malformed" | "bad-signature"
                    ),
                    "cut at {n}: {err}"
                );
            }
        }

        #[test]
        fn replayed_and_expired_tokens_are_rejected() {
            let (a, b, _) = hosts();
            let t = sealed(&a, &b, NOW);
            verify(&b.verifier, &t).unwrap();
            assert_eq!(verify(&b.verifier, &t), Err(TokenError::Replayed));
            let old = sealed(&a, &b, NOW - u64::from(LIFETIME) - SKEW - 2);
            assert_eq!(verify(&b.verifier, &old), Err(TokenError::Expired));
        }

        #[test]
        fn a_token_reflected_to_its_issuer_finds_no_pair() {
            let (a, b, _) = hosts();
            // a's token for b, sent back to a: a never pairs with itself.
            let t = sealed(&a, &b, NOW);
            assert_eq!(verify(&a.verifier, &t), Err(TokenError::UnknownIssuer));
            assert!(a.signer.pair_key(&a.public).is_err());
        }

        #[test]
        fn a_pair_ends_with_the_certificate_and_small_order_keys_are_refused() {
            let (a, b, _) = hosts();
            let v = Verifier::new(SKEW, 60_000);
            v.trust_pair(
                a.signer.key_id(),
                b.signer.pair_key(&a.public).unwrap(),
                NOW - SKEW - 10,
            );
            assert!(matches!(
                verify(&v, &sealed(&a, &b, NOW)),
                Err(TokenError::Uncertified(_))
            ));
            assert!(v.pair(&a.signer.key_id(), NOW).is_err());
            // The identity point encodes a key of small order: no pair key from it.
            let mut identity = [0u8; 32];
            identity[0] = 1;
            assert!(b.signer.pair_key(&identity).is_err());
        }
    }
}
