//! A workload identity's labels: `key=value` pairs, sorted by key, keys unique.
use std::fmt;

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    pub fn new<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        let mut v: Vec<(String, String)> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        v.sort();
        v.dedup_by(|a, b| a.0 == b.0);
        Self(v)
    }

    /// Parses `k=v,k2=v2` (the CLI's form).
    pub fn parse(s: &str) -> Result<Self, LabelError> {
        let mut pairs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| LabelError::NotKeyValue(part.to_owned()))?;
            if k.trim().is_empty() {
                return Err(LabelError::EmptyKey(part.to_owned()));
            }
            pairs.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Ok(Self::new(pairs))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why `k=v,...` does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("label {0:?} has an empty key")]
    EmptyKey(String),
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sorts_and_looks_up() {
        let l = Labels::parse("tier=front, app=web").unwrap();
        assert_eq!(l.to_string(), "app=web,tier=front");
        assert_eq!(l.get("tier"), Some("front"));
        assert_eq!(l.get("nope"), None);
        assert!(Labels::parse("app").is_err());
        assert!(Labels::parse("=x").is_err());
    }
}
