//! Workload identity tokens: what a source enforcer signs for each connection and what the
//! destination enforcer verifies (see `docs/token.md` for the layout).
//!
//! * [`token`]: the canonical binary layout, encoding and decoding.
//! * [`signer`]: an enforcer's Ed25519 key, certified by the cluster CA, signing tokens.
//! * [`verifier`]: checks a token against certified keys, time, destination, TLS session and
//!   replay, and caches verified identities so later tokens can carry just a digest.
//! * [`session`]: tokens on a tunnel: the TLS session binding, the peer's certified key,
//!   cold-then-warm signing, and the rule that an enforcer vouches only for its workloads.
pub mod session;
pub mod signer;
pub mod token;
pub mod verifier;

use tessera_policy::Labels;

/// A workload's identity as tokens carry it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// SPIFFE form, for interoperability: `spiffe://<trust-domain>/enforcer/<e>/workload/<w>`.
    pub spiffe: String,
    pub labels: Labels,
}

/// The SPIFFE name of a workload.
pub fn spiffe_id(trust_domain: &str, enforcer: &str, workload: &str) -> String {
    format!("spiffe://{trust_domain}/enforcer/{enforcer}/workload/{workload}")
}
