//! Policy from the centre: validated, versioned, stored; enforcers watch `policy/current`.
//!
//! `apply` parses the text with the policy crate before anything is written, so a policy
//! with an error (reported with file, line and column) changes nothing; versions only grow,
//! and every applied version is kept under `policy/history/` for audit and rollback.
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

pub const CURRENT: &str = "policy/current";
const HISTORY: &str = "policy/history/";
/// Largest policy text accepted.
pub const MAX_SIZE: usize = 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    pub version: u64,
    pub text: String,
    /// Hex SHA-256 of the text, to compare with what an enforcer reports.
    pub sha256: String,
    pub applied_ms: u64,
    /// Who applied it (the admin credential's name).
    pub by: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(#[from] tessera_policy::PolicyErrors),
    #[error("policy {0}: larger than {MAX_SIZE} bytes")]
    TooLarge(String),
    #[error("stored policy is unreadable: {0}")]
    Corrupt(String),
    #[error("policy changed while being applied; apply again")]
    Contended,
}

fn sha256(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub async fn current(store: &dyn Store) -> Result<Option<PolicyVersion>, PolicyError> {
    match store.get(CURRENT).await? {
        None => Ok(None),
        Some(e) => serde_json::from_slice(&e.value)
            .map(Some)
            .map_err(|err| PolicyError::Corrupt(err.to_string())),
    }
}

/// Validates `text` (errors name `file`) and makes it the current policy.
pub async fn apply(
    store: &dyn Store,
    file: &str,
    text: &str,
    by: &str,
    now_ms: u64,
) -> Result<PolicyVersion, PolicyError> {
    if text.len() > MAX_SIZE {
        return Err(PolicyError::TooLarge(file.to_string()));
    }
    tessera_policy::load(file, text)?;
    let existing = store.get(CURRENT).await?;
    let (prev, expect) = match &existing {
        None => (0, None),
        Some(e) => {
            let p: PolicyVersion = serde_json::from_slice(&e.value)
                .map_err(|err| PolicyError::Corrupt(err.to_string()))?;
            (p.version, Some(e.version))
        }
    };
    let v = PolicyVersion {
        version: prev + 1,
        text: text.to_string(),
        sha256: sha256(text),
        applied_ms: now_ms,
        by: by.to_string(),
    };
    let bytes = serde_json::to_vec(&v).expect("serialisable");
    store
        .put(&format!("{HISTORY}{:020}", v.version), bytes.clone())
        .await?;
    if store.put_if(CURRENT, bytes, expect).await?.is_none() {
        return Err(PolicyError::Contended);
    }
    Ok(v)
}

/// Every applied version, oldest first.
pub async fn history(store: &dyn Store) -> Result<Vec<PolicyVersion>, PolicyError> {
    store
        .list(HISTORY)
        .await?
        .iter()
        .map(|e| {
            serde_json::from_slice(&e.value).map_err(|err| PolicyError::Corrupt(err.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Embedded;

    const GOOD: &str = "rules:\n  - name: web-to-api\n    action: allow\n    from:\n      - labels: [app=web]\n    to:\n      - labels: [app=api]\n    ports: [8080]\n";

    #[tokio::test]
    async fn a_broken_policy_changes_nothing_and_versions_grow() {
        let d = tempfile::tempdir().unwrap();
        let s = Embedded::open(&d.path().join("c.redb")).unwrap();
        assert_eq!(current(&s).await.unwrap(), None);
        let v1 = apply(&s, "p.yaml", GOOD, "admin", 1).await.unwrap();
        assert_eq!(v1.version, 1);
        let bad = GOOD.replace("[8080]", "[nope]");
        let err = apply(&s, "bad.yaml", &bad, "admin", 2).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("bad.yaml:8:"), "{msg}");
        assert_eq!(current(&s).await.unwrap().unwrap(), v1);
        let v2 = apply(&s, "p.yaml", GOOD, "admin", 3).await.unwrap();
        assert_eq!(v2.version, 2);
        assert_eq!(history(&s).await.unwrap().len(), 2);
        assert!(matches!(
            apply(&s, "big.yaml", &"#".repeat(MAX_SIZE + 1), "admin", 4).await,
            Err(PolicyError::TooLarge(_))
        ));
    }
}
