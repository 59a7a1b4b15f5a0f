//! Tessera's identity-based policy: a YAML language security teams can read, compiled into
//! an index fast enough to consult on every connection. Pure: no I/O beyond the text it is
//! given (names in `dns:` peers are resolved by the caller).
//!
//! * [`parse`] turns policy text into [`Policy`], reporting every error with line and column.
//! * [`selector`] holds label expressions and their semantics.
//! * [`compile`] builds the [`compile::CompiledPolicy`] index and evaluates decisions.
//! * [`cache`] memoises decisions per (source identity, destination identity, port).
//!
//! Semantics, in order: a matching **deny** rule in enforce mode denies (deny wins); else a
//! matching **allow** rule allows; else the policy's default applies (deny). A deny rule in
//! observe mode never denies: it marks the decision "would deny" with its name.
pub mod cache;
pub mod compile;
pub mod labels;
pub mod parse;
pub mod selector;

pub use compile::{CompiledPolicy, Decision, Subject, Verdict};
pub use labels::Labels;
pub use parse::{Policy, PolicyErrors};

use std::sync::Arc;

/// Parses and compiles policy text; `file` only names it in errors.
pub fn load(file: &str, text: &str) -> Result<Arc<CompiledPolicy>, PolicyErrors> {
    Ok(Arc::new(CompiledPolicy::new(parse::parse(file, text)?)))
}
