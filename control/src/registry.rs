//! The enforcer registry and the directory built from it.
//!
//! One record per enforcer name (`enforcers/<name>` in the store): how it enrolled, its
//! scope, its current certificate, what it serves (tunnel address, destination networks,
//! API), which policy version it enforces and when it was last heard from. The directory
//! that every enforcer watches is the active records' public part; a revoked enforcer
//! leaves it, so its peers drop it, and it can no longer renew.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    scope::Scope,
    store::{Entry, Store, StoreError},
};

pub const PREFIX: &str = "enforcers/";
/// At most this many networks and workloads an enforcer may register.
pub const MAX_SERVES: usize = 256;
pub const MAX_WORKLOADS: usize = 4096;
/// At most this many labels per workload, and this long (keys, values).
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY: usize = 63;
pub const MAX_LABEL_VALUE: usize = 253;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Name reserved while its credential is being checked.
    Enrolling,
    Active,
    Revoked,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// By a join token (its public id).
    Token(String),
    /// By a cloud identity document (its instance id).
    Document(String),
}

/// What an enforcer tells the control plane it serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serves {
    /// Its tunnel listener.
    pub tunnel: Option<SocketAddr>,
    /// Destination networks whose workloads it protects.
    #[serde(default)]
    pub serves: Vec<IpNet>,
    /// Its HTTP API (for the map).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<SocketAddr>,
    /// Its workloads' names.
    #[serde(default)]
    pub workloads: Vec<String>,
    /// Their declared labels, by name (a workload not listed has none). Peers stamp the
    /// enforcer's scope over them (from its certificate): `udp`/`icmp` rules that name
    /// workloads on other enforcers match these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnforcerRecord {
    pub name: String,
    pub scope: Scope,
    pub method: Method,
    pub state: State,
    pub enrolled_ms: u64,
    #[serde(default)]
    pub cert_pem: String,
    #[serde(default)]
    pub cert_serial: String,
    #[serde(default)]
    pub cert_not_after_ms: u64,
    /// Hex of the Ed25519 key the current certificate is for: only that key may renew.
    #[serde(default)]
    pub public_key: String,
    #[serde(default)]
    pub serves: Serves,
    /// The policy version it last reported in force.
    #[serde(default)]
    pub policy_version: u64,
    #[serde(default)]
    pub last_seen_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

/// What every enforcer learns of another: enough to reach it and to check its tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryEntry {
    pub name: String,
    pub scope: Scope,
    pub tunnel: Option<SocketAddr>,
    pub serves: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<SocketAddr>,
    pub cert_pem: String,
    pub cert_not_after_ms: u64,
    /// Its workloads' labels as it registered them (each peer stamps the scope of the
    /// enforcer's certificate over them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<BTreeMap<String, String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("enforcer {0} is not enrolled")]
    Unknown(String),
    #[error("enforcer name {0} is taken")]
    Taken(String),
    #[error("enforcer {0} is revoked")]
    Revoked(String),
    #[error("enforcer {name}: {what}")]
    Invalid { name: String, what: String },
    #[error("enforcer {name}: network {net} is already served by enforcer {by}")]
    Overlap {
        name: String,
        net: IpNet,
        by: String,
    },
    #[error("enforcer record {0} is unreadable: {1}")]
    Corrupt(String, String),
}

pub fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

pub fn decode(e: &Entry) -> Result<EnforcerRecord, RegistryError> {
    serde_json::from_slice(&e.value)
        .map_err(|err| RegistryError::Corrupt(e.key.clone(), err.to_string()))
}

fn encode(r: &EnforcerRecord) -> Vec<u8> {
    serde_json::to_vec(r).expect("serialisable")
}

impl EnforcerRecord {
    /// The directory's view of this record, if it belongs in the directory.
    pub fn entry(&self) -> Option<DirectoryEntry> {
        (self.state == State::Active).then(|| DirectoryEntry {
            name: self.name.clone(),
            scope: self.scope.clone(),
            tunnel: self.serves.tunnel,
            serves: self.serves.serves.clone(),
            api: self.serves.api,
            cert_pem: self.cert_pem.clone(),
            cert_not_after_ms: self.cert_not_after_ms,
            workloads: self
                .serves
                .workloads
                .iter()
                .map(|w| self.serves.labels.get(w).cloned().unwrap_or_default())
                .collect(),
        })
    }
}

/// Reserves `name` for an enrolment in progress. A revoked enforcer's name stays taken
/// until an administrator removes it.
pub async fn reserve(
    store: &dyn Store,
    name: &str,
    scope: &Scope,
    method: Method,
    now_ms: u64,
) -> Result<u64, RegistryError> {
    let r = EnforcerRecord {
        name: name.to_string(),
        scope: scope.clone(),
        method,
        state: State::Enrolling,
        enrolled_ms: now_ms,
        cert_pem: String::new(),
        cert_serial: String::new(),
        cert_not_after_ms: 0,
        public_key: String::new(),
        serves: Serves::default(),
        policy_version: 0,
        last_seen_ms: now_ms,
        revoked_ms: None,
    };
    store
        .put_if(&key(name), encode(&r), None)
        .await?
        .ok_or_else(|| RegistryError::Taken(name.to_string()))
}

pub async fn get(store: &dyn Store, name: &str) -> Result<(EnforcerRecord, u64), RegistryError> {
    let e = store
        .get(&key(name))
        .await?
        .ok_or_else(|| RegistryError::Unknown(name.to_string()))?;
    Ok((decode(&e)?, e.version))
}

/// Changes record `name` with `f`, retrying when another writer got in between; `f` may
/// refuse. Returns the record as written.
pub async fn update(
    store: &dyn Store,
    name: &str,
    mut f: impl FnMut(&mut EnforcerRecord) -> Result<(), RegistryError>,
) -> Result<EnforcerRecord, RegistryError> {
    for _ in 0..64 {
        let (mut r, version) = get(store, name).await?;
        f(&mut r)?;
        if store
            .put_if(&key(name), encode(&r), Some(version))
            .await?
            .is_some()
        {
            return Ok(r);
        }
    }
    Err(StoreError::Backend(format!("enforcer {name}: too much contention")).into())
}

/// Every record, in name order.
pub async fn all(store: &dyn Store) -> Result<Vec<EnforcerRecord>, RegistryError> {
    store.list(PREFIX).await?.iter().map(decode).collect()
}

/// Checks what `name` says it serves against itself and the other active enforcers: a
/// network can be served by one enforcer only (first come), so a compromised enforcer
/// cannot draw others' traffic to itself by claiming their addresses.
pub fn check_serves(
    name: &str,
    serves: &Serves,
    others: &[EnforcerRecord],
) -> Result<(), RegistryError> {
    let invalid = |what: String| RegistryError::Invalid {
        name: name.to_string(),
        what,
    };
    if serves.serves.len() > MAX_SERVES {
        return Err(invalid(format!("more than {MAX_SERVES} networks")));
    }
    if serves.workloads.len() > MAX_WORKLOADS {
        return Err(invalid(format!("more than {MAX_WORKLOADS} workloads")));
    }
    for w in &serves.workloads {
        if w.is_empty() || w.len() > 63 || w.contains('/') {
            return Err(invalid(format!("workload name {w:?}")));
        }
    }
    for (w, labels) in &serves.labels {
        if !serves.workloads.contains(w) {
            return Err(invalid(format!(
                "labels of {w:?}, which is not among its workloads"
            )));
        }
        if labels.len() > MAX_LABELS {
            return Err(invalid(format!(
                "workload {w:?}: more than {MAX_LABELS} labels"
            )));
        }
        for (k, v) in labels {
            if k.is_empty() || k.len() > MAX_LABEL_KEY || v.len() > MAX_LABEL_VALUE {
                return Err(invalid(format!("workload {w:?}: label {k:?}={v:?}")));
            }
        }
    }
    for net in &serves.serves {
        if net.prefix_len() == 0 {
            return Err(invalid(format!("network {net} is everything")));
        }
        for o in others
            .iter()
            .filter(|o| o.name != name && o.state == State::Active)
        {
            if let Some(theirs) = o
                .serves
                .serves
                .iter()
                .find(|t| t.contains(net) || net.contains(*t))
            {
                let _ = theirs;
                return Err(RegistryError::Overlap {
                    name: name.to_string(),
                    net: *net,
                    by: o.name.clone(),
                });
            }
        }
    }
    Ok(())
}

/// The store key holding every enforcer's claimed networks, name -> networks (see
/// [`claim_serves`]); outside [`PREFIX`], so the directory's watches never see it.
pub const CLAIMS_KEY: &str = "claims/serves";

/// Checks `serves` for `name` with [`check_serves`] and claims its networks, atomically
/// against every other claim: the check reads the claims key at a version and the claim is
/// a conditional write at that version, so of two enforcers claiming overlapping networks
/// at the same moment (through one server or two replicas) at most one succeeds; the other
/// retries, sees the claim and is refused. Checking records alone could not do this: each
/// claimant would read the other's record before either wrote. A network counts as taken
/// if an active enforcer's record or claim holds it; claims of enforcers whose records are
/// gone or no longer active are dropped on the way. The record itself is written after.
pub async fn claim_serves(
    store: &dyn Store,
    name: &str,
    serves: &Serves,
) -> Result<(), RegistryError> {
    for _ in 0..64 {
        // Claims first, then records: an enforcer's record is active before it can claim,
        // so every claim read here has its record among those read next.
        let (mut claims, version): (BTreeMap<String, Vec<IpNet>>, Option<u64>) =
            match store.get(CLAIMS_KEY).await? {
                Some(e) => (
                    serde_json::from_slice(&e.value).map_err(|err| {
                        RegistryError::Corrupt(CLAIMS_KEY.into(), err.to_string())
                    })?,
                    Some(e.version),
                ),
                None => (BTreeMap::new(), None),
            };
        let mut records = all(store).await?;
        claims.retain(|n, _| {
            n == name
                || records
                    .iter()
                    .any(|r| &r.name == n && r.state == State::Active)
        });
        for r in &mut records {
            if let Some(claimed) = claims.get(&r.name) {
                for net in claimed {
                    if !r.serves.serves.contains(net) {
                        r.serves.serves.push(*net);
                    }
                }
            }
        }
        check_serves(name, serves, &records)?;
        claims.insert(name.to_string(), serves.serves.clone());
        let value = serde_json::to_vec(&claims)
            .map_err(|e| RegistryError::Corrupt(CLAIMS_KEY.into(), e.to_string()))?;
        if store.put_if(CLAIMS_KEY, value, version).await?.is_some() {
            return Ok(());
        }
    }
    Err(StoreError::Backend(format!(
        "enforcer {name}: too much contention claiming networks"
    ))
    .into())
}

/// Marks `name` revoked: it leaves the directory and cannot renew.
pub async fn revoke(
    store: &dyn Store,
    name: &str,
    now_ms: u64,
) -> Result<EnforcerRecord, RegistryError> {
    update(store, name, |r| {
        r.state = State::Revoked;
        r.revoked_ms.get_or_insert(now_ms);
        Ok(())
    })
    .await
}

/// Whether `r` has not been heard from for `after`.
pub fn silent(r: &EnforcerRecord, now_ms: u64, after: Duration) -> bool {
    now_ms.saturating_sub(r.last_seen_ms) > after.as_millis() as u64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::Embedded;

    pub(crate) fn active(name: &str, nets: &[&str]) -> EnforcerRecord {
        EnforcerRecord {
            name: name.into(),
            scope: Scope::default(),
            method: Method::Token("x".into()),
            state: State::Active,
            enrolled_ms: 0,
            cert_pem: String::new(),
            cert_serial: String::new(),
            cert_not_after_ms: 0,
            public_key: String::new(),
            serves: Serves {
                serves: nets.iter().map(|n| n.parse().unwrap()).collect(),
                ..Default::default()
            },
            policy_version: 0,
            last_seen_ms: 0,
            revoked_ms: None,
        }
    }

    #[test]
    fn an_enforcer_cannot_claim_networks_another_serves() {
        let others = [active("a", &["10.0.1.0/24"]), {
            let mut r = active("gone", &["10.0.2.0/24"]);
            r.state = State::Revoked;
            r
        }];
        let claim = |nets: &[&str]| Serves {
            serves: nets.iter().map(|n| n.parse().unwrap()).collect(),
            ..Default::default()
        };
        assert!(matches!(
            check_serves("b", &claim(&["10.0.1.7/32"]), &others),
            Err(RegistryError::Overlap { by, .. }) if by == "a"
        ));
        assert!(matches!(
            check_serves("b", &claim(&["10.0.0.0/16"]), &others),
            Err(RegistryError::Overlap { .. })
        ));
        assert!(matches!(
            check_serves("b", &claim(&["0.0.0.0/0"]), &others),
            Err(RegistryError::Invalid { .. })
        ));
        // Its own networks, and a revoked enforcer's, are free.
        check_serves("a", &claim(&["10.0.1.0/24"]), &others).unwrap();
        check_serves("b", &claim(&["10.0.2.0/24"]), &others).unwrap();
        let many: Vec<String> = (0..=MAX_SERVES)
            .map(|i| format!("10.9.{}.{}/32", i / 256, i % 256))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(check_serves("b", &claim(&many), &others).is_err());
    }

    #[test]
    fn workload_labels_are_bounded_and_only_for_listed_workloads() {
        let label = |n: usize| -> BTreeMap<String, String> {
            (0..n).map(|i| (format!("k{i}"), "v".to_string())).collect()
        };
        let with = |name: &str, labels: BTreeMap<String, String>| Serves {
            serves: vec!["10.0.3.0/24".parse().unwrap()],
            workloads: vec!["api".into()],
            labels: BTreeMap::from([(name.to_string(), labels)]),
            ..Default::default()
        };
        check_serves("b", &with("api", label(MAX_LABELS)), &[]).unwrap();
        for (bad, why) in [
            (with("api", label(MAX_LABELS + 1)), "labels"),
            (with("ghost", label(1)), "not among its workloads"),
            (
                with("api", BTreeMap::from([(String::new(), "v".into())])),
                "label",
            ),
            (
                with(
                    "api",
                    BTreeMap::from([("k".into(), "v".repeat(MAX_LABEL_VALUE + 1))]),
                ),
                "label",
            ),
        ] {
            let e = check_serves("b", &bad, &[]).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("enforcer b"), "{e}");
        }
        // The directory lists each workload's labels, in order, none for a workload without.
        let mut r = active("b", &["10.0.3.0/24"]);
        r.serves.workloads = vec!["api".into(), "db".into()];
        r.serves.labels = BTreeMap::from([("api".into(), label(1))]);
        assert_eq!(
            r.entry().unwrap().workloads,
            vec![label(1), BTreeMap::new()]
        );
    }

    #[tokio::test]
    async fn names_are_reserved_once_and_revocation_removes_from_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let s = Embedded::open(&d.path().join("c.redb")).unwrap();
        reserve(&s, "a", &Scope::default(), Method::Token("t".into()), 1)
            .await
            .unwrap();
        assert!(matches!(
            reserve(&s, "a", &Scope::default(), Method::Token("u".into()), 2).await,
            Err(RegistryError::Taken(_))
        ));
        let r = update(&s, "a", |r| {
            r.state = State::Active;
            Ok(())
        })
        .await
        .unwrap();
        assert!(r.entry().is_some());
        let r = revoke(&s, "a", 5).await.unwrap();
        assert_eq!(
            (r.entry(), r.state, r.revoked_ms),
            (None, State::Revoked, Some(5))
        );
        assert!(matches!(
            revoke(&s, "zz", 5).await,
            Err(RegistryError::Unknown(_))
        ));
    }
}
