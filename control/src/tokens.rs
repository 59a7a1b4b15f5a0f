//! One-time join tokens: how an operator lets one new enforcer in.
//!
//! `tessera server token create` prints a token once; the store keeps only its SHA-256, so
//! reading the store (or a backup of it) does not give anyone a token. A token enrols one
//! enforcer: redeeming it is a conditional write on the token's record, so when two
//! enforcers race with the same token exactly one wins. Used tokens are kept (marked) for a
//! while so that a second use is refused with who used it, rather than "unknown".
use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use crate::{
    scope::Scope,
    store::{Store, StoreError},
};

/// Tokens start with this, so that logs and secret scanners can recognise them.
pub const PREFIX: &str = "tsr1.";
const SECRET_LEN: usize = 32;
const KEY_PREFIX: &str = "tokens/";
/// Used and expired tokens are forgotten this long after they stop working.
pub const KEEP: Duration = Duration::from_secs(24 * 3600);
/// Longest lifetime a token may be given.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("join token is malformed (expected {PREFIX} and 43 characters)")]
    Malformed,
    #[error("join token {0} is unknown to this control plane")]
    Unknown(String),
    #[error("join token {id} expired {ago_s} s ago")]
    Expired { id: String, ago_s: u64 },
    #[error("join token {id} was already used by enforcer {by}")]
    Used { id: String, by: String },
    #[error("join token lifetime {0:?}: must be between 1 s and {MAX_TTL:?}")]
    Ttl(Duration),
    #[error("join token record {0} is unreadable: {1}")]
    Corrupt(String, String),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub scope: Scope,
    pub created_ms: u64,
    pub expires_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<Used>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Used {
    pub by: String,
    pub at_ms: u64,
}

/// A token as `token create` returns it: the secret (shown once) and its public id.
#[derive(Clone, Debug)]
pub struct NewToken {
    pub secret: String,
    /// The first 12 hex digits of the hash: safe to log, names the token in errors.
    pub id: String,
    pub expires_ms: u64,
}

fn hash(secret: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, secret);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The secret bytes of a token, if it is well formed.
fn parse(token: &str) -> Result<Vec<u8>, TokenError> {
    let body = token
        .trim()
        .strip_prefix(PREFIX)
        .ok_or(TokenError::Malformed)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| TokenError::Malformed)?;
    if bytes.len() != SECRET_LEN {
        return Err(TokenError::Malformed);
    }
    Ok(bytes)
}

/// The public id of a token (for logs), or `None` if it is malformed.
pub fn token_id(token: &str) -> Option<String> {
    parse(token).ok().map(|b| hash(&b)[..12].to_string())
}

/// Makes a token for one enforcer in `scope`, valid for `ttl` from `now_ms`.
pub async fn create(
    store: &dyn Store,
    scope: &Scope,
    ttl: Duration,
    now_ms: u64,
) -> Result<NewToken, TokenError> {
    if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
        return Err(TokenError::Ttl(ttl));
    }
    let mut secret = [0u8; SECRET_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| StoreError::Backend("no randomness".into()))?;
    let h = hash(&secret);
    let record = TokenRecord {
        scope: scope.clone(),
        created_ms: now_ms,
        expires_ms: now_ms + ttl.as_millis() as u64,
        used: None,
    };
    store
        .put(
            &format!("{KEY_PREFIX}{h}"),
            serde_json::to_vec(&record).expect("serialisable"),
        )
        .await?;
    Ok(NewToken {
        secret: format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(secret)),
        id: h[..12].to_string(),
        expires_ms: record.expires_ms,
    })
}

/// Uses `token` for enforcer `by`: its scope, if this is the token's first and timely use.
pub async fn redeem(
    store: &dyn Store,
    token: &str,
    by: &str,
    now_ms: u64,
) -> Result<Scope, TokenError> {
    let h = hash(&parse(token)?);
    let id = h[..12].to_string();
    let key = format!("{KEY_PREFIX}{h}");
    let entry = store
        .get(&key)
        .await?
        .ok_or_else(|| TokenError::Unknown(id.clone()))?;
    let mut record: TokenRecord = serde_json::from_slice(&entry.value)
        .map_err(|e| TokenError::Corrupt(id.clone(), e.to_string()))?;
    if let Some(u) = &record.used {
        return Err(TokenError::Used {
            id,
            by: u.by.clone(),
        });
    }
    if now_ms >= record.expires_ms {
        return Err(TokenError::Expired {
            id,
            ago_s: (now_ms - record.expires_ms) / 1000,
        });
    }
    record.used = Some(Used {
        by: by.to_string(),
        at_ms: now_ms,
    });
    let value = serde_json::to_vec(&record).expect("serialisable");
    match store.put_if(&key, value, Some(entry.version)).await? {
        Some(_) => Ok(record.scope),
        // Someone redeemed it between our read and our write: they won.
        None => {
            let by = match store.get(&key).await? {
                Some(e) => serde_json::from_slice::<TokenRecord>(&e.value)
                    .ok()
                    .and_then(|r| r.used)
                    .map(|u| u.by)
                    .unwrap_or_else(|| "another enforcer".into()),
                None => "another enforcer".into(),
            };
            Err(TokenError::Used { id, by })
        }
    }
}

/// Puts a token back after its enforcer's enrolment failed for a reason of ours (the
/// request was bad after the token was taken): only if it is still marked used by `by`.
pub async fn release(store: &dyn Store, token: &str, by: &str) -> Result<(), TokenError> {
    let h = hash(&parse(token)?);
    let key = format!("{KEY_PREFIX}{h}");
    if let Some(e) = store.get(&key).await? {
        let mut r: TokenRecord = serde_json::from_slice(&e.value)
            .map_err(|err| TokenError::Corrupt(h[..12].to_string(), err.to_string()))?;
        if r.used.as_ref().is_some_and(|u| u.by == by) {
            r.used = None;
            store
                .put_if(
                    &key,
                    serde_json::to_vec(&r).expect("serialisable"),
                    Some(e.version),
                )
                .await?;
        }
    }
    Ok(())
}

/// Forgets tokens that stopped working more than [`KEEP`] ago; how many.
pub async fn prune(store: &dyn Store, now_ms: u64) -> Result<usize, TokenError> {
    let keep = KEEP.as_millis() as u64;
    let mut n = 0;
    for e in store.list(KEY_PREFIX).await? {
        let Ok(r) = serde_json::from_slice::<TokenRecord>(&e.value) else {
            continue;
        };
        let stopped = r
            .used
            .as_ref()
            .map_or(r.expires_ms, |u| u.at_ms.min(r.expires_ms));
        if now_ms > stopped + keep && store.delete(&e.key).await? {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Embedded;

    const NOW: u64 = 1_800_000_000_000;

    fn store() -> (tempfile::TempDir, Embedded) {
        let d = tempfile::tempdir().unwrap();
        let s = Embedded::open(&d.path().join("c.redb")).unwrap();
        (d, s)
    }

    #[tokio::test]
    async fn a_token_works_once_within_its_lifetime_and_only_its_hash_is_kept() {
        let (_d, s) = store();
        let scope: Scope = "site=paris".parse().unwrap();
        let t = create(&s, &scope, Duration::from_secs(60), NOW)
            .await
            .unwrap();
        assert!(t.secret.starts_with(PREFIX) && t.secret.len() == PREFIX.len() + 43);
        assert_eq!(token_id(&t.secret).unwrap(), t.id);
        // Nothing in the store contains the secret.
        for e in s.list("").await.unwrap() {
            let body = &t.secret[PREFIX.len()..];
            assert!(!String::from_utf8_lossy(&e.value).contains(body));
            assert!(!e.key.contains(body));
        }
        assert_eq!(
            redeem(&s, &t.secret, "host-a", NOW + 1).await.unwrap(),
            scope
        );
        match redeem(&s, &t.secret, "host-b", NOW + 2).await {
            Err(TokenError::Used { id, by }) => assert_eq!((id, by.as_str()), (t.id, "host-a")),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn expired_unknown_malformed_and_forged_tokens_are_refused_by_name() {
        let (_d, s) = store();
        let t = create(&s, &Scope::default(), Duration::from_secs(60), NOW)
            .await
            .unwrap();
        assert!(matches!(
            redeem(&s, &t.secret, "a", NOW + 61_000).await,
            Err(TokenError::Expired { ago_s: 1, .. })
        ));
        // A well-formed token the server never made (a guess, or one flipped character).
        let mut forged = t.secret.clone().into_bytes();
        let last = forged.len() - 2;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(matches!(
            redeem(&s, &forged, "a", NOW).await,
            Err(TokenError::Unknown(_))
        ));
        for bad in [
            "",
            "tsr1.",
            "tsr2.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            &t.secret[..t.secret.len() - 1],
            &format!("{}A", t.secret),
            "tsr1.!!!!AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(
                matches!(redeem(&s, bad, "a", NOW).await, Err(TokenError::Malformed)),
                "{bad}"
            );
        }
        for ttl in [Duration::ZERO, MAX_TTL * 2] {
            assert!(matches!(
                create(&s, &Scope::default(), ttl, NOW).await,
                Err(TokenError::Ttl(_))
            ));
        }
    }

    #[tokio::test]
    async fn two_enforcers_racing_with_one_token_exactly_one_wins() {
        let (_d, s) = store();
        for round in 0..5 {
            let t = create(&s, &Scope::default(), Duration::from_secs(60), NOW)
                .await
                .unwrap();
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let (s, secret) = (s.clone(), t.secret.clone());
                    tokio::spawn(
                        async move { redeem(&s, &secret, &format!("host-{i}"), NOW).await },
                    )
                })
                .collect();
            let mut won = 0;
            for task in tasks {
                match task.await.unwrap() {
                    Ok(_) => won += 1,
                    Err(TokenError::Used { .. }) => {}
                    Err(e) => panic!("round {round}: {e}"),
                }
            }
            assert_eq!(won, 1, "round {round}");
        }
    }

    #[tokio::test]
    async fn release_and_prune() {
        let (_d, s) = store();
        let t = create(&s, &Scope::default(), Duration::from_secs(60), NOW)
            .await
            .unwrap();
        redeem(&s, &t.secret, "a", NOW).await.unwrap();
        // Only the enforcer that took it can put it back.
        release(&s, &t.secret, "b").await.unwrap();
        assert!(redeem(&s, &t.secret, "b", NOW).await.is_err());
        release(&s, &t.secret, "a").await.unwrap();
        redeem(&s, &t.secret, "b", NOW).await.unwrap();
        create(&s, &Scope::default(), Duration::from_secs(60), NOW)
            .await
            .unwrap();
        let keep = KEEP.as_millis() as u64;
        assert_eq!(prune(&s, NOW + keep / 2).await.unwrap(), 0);
        assert_eq!(prune(&s, NOW + 61_000 + keep).await.unwrap(), 2);
        assert!(s.list(KEY_PREFIX).await.unwrap().is_empty());
    }
}
