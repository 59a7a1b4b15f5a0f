//! Label expressions.
//!
//! | form | holds when |
//! |---|---|
//! | `key=value` (or `==`) | the label is present with that value |
//! | `key!=value` | the label is absent or has another value |
//! | `key in (a, b)` | the label's value is one of them |
//! | `key notin (a, b)` | the label is absent or its value is none of them |
//! | `key` | the label is present |
//! | `!key` | the label is absent |
//!
//! A value ending in `*` is a prefix: `app=web-*` holds for `web-1` and `web-`.
//! Several expressions in one selector must all hold (AND).
use crate::labels::Labels;

/// Why a label expression does not parse (the policy's own errors add file, line and
/// column).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    #[error("empty value")]
    EmptyValue,
    #[error("value {0:?} may hold only letters, digits and - _ . / : @ (and a trailing *)")]
    ValueCharacters(String),
    #[error("value {0:?}: '*' is allowed only at the end")]
    Wildcard(String),
    #[error("empty label key")]
    EmptyKey,
    #[error("label key {0:?} may hold only letters, digits and - _ . /")]
    KeyCharacters(String),
    #[error("expected a set like (a, b), found {0:?}")]
    NotASet(String),
    #[error(
        "{0:?} is not a label expression (key=value, key!=value, key in (..), key notin (..), key, !key)"
    )]
    NotAnExpression(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Value {
    Exact(String),
    Prefix(String),
}

impl Value {
    fn parse(s: &str) -> Result<Self, ExprError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ExprError::EmptyValue);
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:*@".contains(c))
        {
            return Err(ExprError::ValueCharacters(s.to_owned()));
        }
        match s.strip_suffix('*') {
            Some(p) if p.contains('*') => Err(ExprError::Wildcard(s.to_owned())),
            Some(p) => Ok(Self::Prefix(p.to_owned())),
            None if s.contains('*') => Err(ExprError::Wildcard(s.to_owned())),
            None => Ok(Self::Exact(s.to_owned())),
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => e == v,
            Self::Prefix(p) => v.starts_with(p.as_str()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Expr {
    Eq(String, Value),
    NotEq(String, Value),
    In(String, Vec<Value>),
    NotIn(String, Vec<Value>),
    Exists(String),
    NotExists(String),
}

fn key(s: &str) -> Result<String, ExprError> {
    let k = s.trim();
    if k.is_empty() {
        return Err(ExprError::EmptyKey);
    }
    if !k
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    {
        return Err(ExprError::KeyCharacters(k.to_owned()));
    }
    Ok(k.to_owned())
}

fn set(s: &str) -> Result<Vec<Value>, ExprError> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| ExprError::NotASet(s.trim().to_owned()))?;
    let values: Vec<Value> = inner
        .split(',')
        .map(Value::parse)
        .collect::<Result<_, _>>()?;
    Ok(values)
}

impl Expr {
    pub fn parse(s: &str) -> Result<Self, ExprError> {
        let s = s.trim();
        if let Some(k) = s.strip_prefix('!') {
            return Ok(Self::NotExists(key(k)?));
        }
        if let Some((k, v)) = s.split_once("!=") {
            return Ok(Self::NotEq(key(k)?, Value::parse(v)?));
        }
        if let Some((k, v)) = s.split_once("==").or_else(|| s.split_once('=')) {
            return Ok(Self::Eq(key(k)?, Value::parse(v)?));
        }
        let mut words = s.splitn(3, char::is_whitespace);
        match (words.next(), words.next(), words.next()) {
            (Some(k), None, None) => Ok(Self::Exists(key(k)?)),
            (Some(k), Some("in"), Some(rest)) => Ok(Self::In(key(k)?, set(rest)?)),
            (Some(k), Some("notin"), Some(rest)) => Ok(Self::NotIn(key(k)?, set(rest)?)),
            _ => Err(ExprError::NotAnExpression(s.to_owned())),
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Self::Eq(k, v) => labels.get(k).is_some_and(|x| v.matches(x)),
            Self::NotEq(k, v) => !labels.get(k).is_some_and(|x| v.matches(x)),
            Self::In(k, vs) => labels
                .get(k)
                .is_some_and(|x| vs.iter().any(|v| v.matches(x))),
            Self::NotIn(k, vs) => !labels
                .get(k)
                .is_some_and(|x| vs.iter().any(|v| v.matches(x))),
            Self::Exists(k) => labels.get(k).is_some(),
            Self::NotExists(k) => labels.get(k).is_none(),
        }
    }
}

/// A conjunction of expressions.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Selector(pub Vec<Expr>);

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|e| e.matches(labels))
    }

    /// The label keys its expressions read.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|e| match e {
            Expr::Eq(k, _)
            | Expr::NotEq(k, _)
            | Expr::In(k, _)
            | Expr::NotIn(k, _)
            | Expr::Exists(k)
            | Expr::NotExists(k) => k.as_str(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn l(s: &str) -> Labels {
        Labels::parse(s).unwrap()
    }

    #[test]
    fn each_form_parses_and_holds_as_documented() {
        let cases = [
            ("app=web", "app=web", true),
            ("app==web", "app=web", true),
            ("app=web", "app=api", false),
            ("app=web", "", false),
            ("app!=web", "app=api", true),
            ("app!=web", "", true),
            ("app!=web", "app=web", false),
            ("env in (prod, staging)", "env=staging", true),
            ("env in (prod, staging)", "env=dev", false),
            ("env in (prod, staging)", "", false),
            ("env notin (prod)", "env=dev", true),
            ("env notin (prod)", "", true),
            ("env notin (prod)", "env=prod", false),
            ("team", "team=x", true),
            ("team", "", false),
            ("!team", "", true),
            ("!team", "team=x", false),
            ("app=web-*", "app=web-1", true),
            ("app=web-*", "app=web-", true),
            ("app=web-*", "app=api-1", false),
            ("env in (prod-*, dev)", "env=prod-eu", true),
        ];
        for (expr, labels, want) in cases {
            let e = Expr::parse(expr).unwrap_or_else(|err| panic!("{expr}: {err}"));
            assert_eq!(e.matches(&l(labels)), want, "{expr} on {{{labels}}}");
        }
    }

    #[test]
    fn malformed_expressions_are_rejected_with_a_reason() {
        for bad in [
            "",
            "=web",
            "app=",
            "app in prod",
            "app in (a,,b)",
            "app=we*b",
            "a pp",
            "app=we b",
            "app in (x",
            "!",
        ] {
            assert!(Expr::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    fn label_key() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["app", "env", "tier", "team"]).prop_map(str::to_owned)
    }
    fn label_value() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["web", "web-1", "api", "prod", "dev", "x"])
            .prop_map(str::to_owned)
    }
    fn labels() -> impl Strategy<Value = Labels> {
        prop::collection::btree_map(label_key(), label_value(), 0..4).prop_map(Labels::new)
    }

    proptest! {
        /// `!=` is the negation of `=`, `notin` of `in`, `!k` of `k`: for every label set.
        #[test]
        fn negations_are_complements(k in label_key(), v in label_value(), w in label_value(), ls in labels()) {
            let eq = Expr::parse(&format!("{k}={v}")).unwrap();
            let ne = Expr::parse(&format!("{k}!={v}")).unwrap();
            prop_assert_eq!(eq.matches(&ls), !ne.matches(&ls));
            let inn = Expr::parse(&format!("{k} in ({v}, {w})")).unwrap();
            let notin = Expr::parse(&format!("{k} notin ({v}, {w})")).unwrap();
            prop_assert_eq!(inn.matches(&ls), !notin.matches(&ls));
            prop_assert_eq!(Expr::Exists(k.clone()).matches(&ls), !Expr::NotExists(k.clone()).matches(&ls));
            // `in` with one value is `=`.
            prop_assert_eq!(Expr::parse(&format!("{k} in ({v})")).unwrap().matches(&ls), eq.matches(&ls));
        }

        /// A selector is the AND of its expressions; the empty selector selects everything.
        #[test]
        fn selectors_are_conjunctions(a in label_key(), v in label_value(), b in label_key(), w in label_value(), ls in labels()) {
            let e1 = Expr::parse(&format!("{a}={v}")).unwrap();
            let e2 = Expr::parse(&format!("{b}!={w}")).unwrap();
            let sel = Selector(vec![e1.clone(), e2.clone()]);
            prop_assert_eq!(sel.matches(&ls), e1.matches(&ls) && e2.matches(&ls));
            prop_assert!(Selector(vec![]).matches(&ls));
        }

        /// A prefix value holds exactly when the value starts with the prefix.
        #[test]
        fn prefix_wildcards(v in label_value(), p in prop::sample::select(vec!["", "w", "web", "web-", "a"])) {
            let e = Expr::parse(&format!("app={p}*")).unwrap();
            prop_assert_eq!(e.matches(&Labels::new([("app", v.clone())])), v.starts_with(p));
        }
    }
}
