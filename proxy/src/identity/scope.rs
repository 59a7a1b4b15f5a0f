//! Scope: what limits the damage of one compromised enforcer.
//!
//! Under a control plane every enforcer's certificate carries its scope (`site=paris`,
//! `tenant=acme`, …), set by how it enrolled. An identity a peer vouches for gets its
//! scope's labels stamped from the *certificate*: a claim may repeat them, but a claim
//! that contradicts them (a Paris enforcer asserting `site=london`, or another tenant) is
//! refused, never corrected, so that the refusal is recorded and seen.
use std::collections::BTreeMap;

use tessera_policy::Labels;

use super::Identity;

/// A claimed label that contradicts the vouching enforcer's scope.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("claims {key}={claimed}, outside its enforcer's scope {key}={scope}")]
pub struct OutOfScope {
    pub key: String,
    pub claimed: String,
    pub scope: String,
}

/// `identity` with `scope`'s labels stamped on it, or why the claim is out of scope.
pub fn stamp(identity: Identity, scope: &BTreeMap<String, String>) -> Result<Identity, OutOfScope> {
    if scope.is_empty() {
        return Ok(identity);
    }
    for (k, v) in scope {
        if let Some(claimed) = identity.labels.get(k)
            && claimed != v
        {
            return Err(OutOfScope {
                key: k.clone(),
                claimed: claimed.to_string(),
                scope: v.clone(),
            });
        }
    }
    let labels = Labels::new(
        identity
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain(scope.iter().map(|(k, v)| (k.clone(), v.clone()))),
    );
    Ok(Identity {
        spiffe: identity.spiffe,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(labels: &[(&str, &str)]) -> Identity {
        Identity {
            spiffe: "spiffe://td/enforcer/a/workload/web".into(),
            labels: Labels::new(labels.iter().copied()),
        }
    }

    #[test]
    fn scope_labels_come_from_the_certificate_and_contradictions_are_refused() {
        let scope: BTreeMap<_, _> = [("site".to_string(), "paris".to_string())].into();
        // Missing: stamped.
        let s = stamp(id(&[("app", "web")]), &scope).unwrap();
        assert_eq!(s.labels.get("site"), Some("paris"));
        assert_eq!(s.labels.get("app"), Some("web"));
        // Repeated: fine.
        assert!(stamp(id(&[("site", "paris")]), &scope).is_ok());
        // Contradicted: refused, naming both.
        let e = stamp(id(&[("app", "web"), ("site", "london")]), &scope).unwrap_err();
        assert_eq!((e.claimed.as_str(), e.scope.as_str()), ("london", "paris"));
        assert!(e.to_string().contains("site=london"));
        // No scope (static configuration): unchanged.
        let same = id(&[("site", "anything")]);
        assert_eq!(stamp(same.clone(), &BTreeMap::new()).unwrap(), same);
    }
}
