//! An enforcer's scope: the labels (`site=paris,tenant=acme`) that bound what it may assert.
//!
//! The scope comes from how the enforcer enrolled (its join token, or its cloud identity
//! document), never from the enforcer itself; the identity authority writes it into the
//! enforcer's certificate, and peers stamp it onto every workload identity that enforcer
//! vouches for. So a compromised host can only ever claim workloads in its own scope.
//!
//! The form is deliberately narrow — keys and values of letters, digits, `.`, `_` and `-`,
//! canonical order — so that it survives a certificate field and a command line unchanged
//! and two spellings of one scope cannot differ.
use std::{collections::BTreeMap, fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// At most this many labels in a scope.
pub const MAX_LABELS: usize = 16;
/// At most this many bytes per key or value.
pub const MAX_LEN: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("scope {0:?}: expected key=value pairs separated by commas")]
    Syntax(String),
    #[error("scope label {0:?}: keys and values are 1-{MAX_LEN} letters, digits, '.', '_' or '-'")]
    Label(String),
    #[error("scope: key {0:?} given twice")]
    Duplicate(String),
    #[error("scope: more than {MAX_LABELS} labels")]
    TooMany,
}

/// Labels in canonical (key) order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Scope(BTreeMap<String, String>);

fn valid(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= MAX_LEN
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Scope {
    /// A scope of these labels, checked as [`FromStr`] checks them.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ScopeError> {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            if !valid(k) || !valid(v) {
                return Err(ScopeError::Label(format!("{k}={v}")));
            }
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(ScopeError::Duplicate(k.to_string()));
            }
            if map.len() > MAX_LABELS {
                return Err(ScopeError::TooMany);
            }
        }
        Ok(Self(map))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether every label of `self` is also in `other` with the same value: an enforcer
    /// of scope `other` may act within `self`.
    pub fn within(&self, other: &Scope) -> bool {
        other.iter().all(|(k, v)| self.get(k) == Some(v))
    }
}

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, ScopeError> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::default());
        }
        let mut pairs = Vec::new();
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| ScopeError::Syntax(s.to_string()))?;
            pairs.push((k.trim(), v.trim()));
        }
        Self::from_pairs(pairs)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for Scope {
    type Error = ScopeError;
    fn try_from(s: String) -> Result<Self, ScopeError> {
        s.parse()
    }
}

impl From<Scope> for String {
    fn from(s: Scope) -> String {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_round_trips() {
        let s: Scope = " tenant=acme, site=paris".parse().unwrap();
        assert_eq!(s.to_string(), "site=paris,tenant=acme");
        assert_eq!(s.to_string().parse::<Scope>().unwrap(), s);
        assert_eq!("".parse::<Scope>().unwrap(), Scope::default());
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, "\"site=paris,tenant=acme\"");
        assert_eq!(serde_json::from_str::<Scope>(&j).unwrap(), s);
    }

    #[test]
    fn bad_scopes_are_refused_with_the_label() {
        for (bad, want) in [
            ("site", ScopeError::Syntax("site".into())),
            ("site=", ScopeError::Label("site=".into())),
            ("site=par is", ScopeError::Label("site=par is".into())),
            ("tessera.io/x=1", ScopeError::Label("tessera.io/x=1".into())),
            ("a=1,a=2", ScopeError::Duplicate("a".into())),
            ("site=a,b", ScopeError::Syntax("site=a,b".into())),
        ] {
            assert_eq!(bad.parse::<Scope>().unwrap_err(), want, "{bad}");
        }
        let many = (0..=MAX_LABELS)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(many.parse::<Scope>().unwrap_err(), ScopeError::TooMany);
        let long = format!("k={}", "v".repeat(MAX_LEN + 1));
        assert!(matches!(long.parse::<Scope>(), Err(ScopeError::Label(_))));
        assert!(serde_json::from_str::<Scope>("\"a b=c\"").is_err());
    }

    #[test]
    fn within_means_every_scope_label_matches() {
        let enforcer: Scope = "site=paris".parse().unwrap();
        let ok: Scope = "site=paris,tenant=acme".parse().unwrap();
        let other: Scope = "site=london,tenant=acme".parse().unwrap();
        assert!(ok.within(&enforcer));
        assert!(!other.within(&enforcer));
        assert!(!Scope::default().within(&enforcer));
        assert!(other.within(&Scope::default()));
    }
}
