//! The control plane's API: the messages, shared by the server and its clients.
//!
//! JSON over HTTPS (HTTP/2 or 1.1). Enforcers authenticate with their certificate (mutual
//! TLS), except to enrol, which they do with a join token or an identity document over TLS
//! that authenticates only the server. Administrators send a bearer token. The watch is a
//! stream of JSON lines: a snapshot, then changes, with pings so that a dead connection is
//! noticed.
use serde::{Deserialize, Serialize};

use crate::{
    policy::PolicyVersion,
    registry::{DirectoryEntry, EnforcerRecord, Serves},
    scope::Scope,
};

pub const ENROL: &str = "/v1/enrol";
pub const RENEW: &str = "/v1/renew";
pub const REPORT: &str = "/v1/report";
pub const WATCH: &str = "/v1/watch";
/// An enforcer's own map (POST, its certificate): see [`crate::fleet`].
pub const MAP: &str = "/v1/map";
/// The fleet's map (GET, administrator).
pub const ADMIN_MAP: &str = "/v1/admin/map";
pub const ADMIN_TOKENS: &str = "/v1/admin/tokens";
pub const ADMIN_POLICY: &str = "/v1/admin/policy";
pub const ADMIN_STATUS: &str = "/v1/admin/status";
/// `/v1/admin/enforcers/{name}/revoke` (POST) and `/v1/admin/enforcers/{name}` (DELETE).
pub const ADMIN_ENFORCERS: &str = "/v1/admin/enforcers";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewRequest {
    pub csr: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReportRequest {
    pub serves: Serves,
    pub policy_version: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRequest {
    #[serde(default)]
    pub scope: Scope,
    pub ttl_s: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub id: String,
    pub expires_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyRequest {
    /// The file name errors are reported against.
    pub file: String,
    pub text: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub enforcers: Vec<EnforcerStatus>,
    pub policy_version: u64,
}

/// An enforcer as `server status` shows it (no certificate body).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnforcerStatus {
    pub name: String,
    pub state: crate::registry::State,
    pub scope: Scope,
    pub method: crate::registry::Method,
    pub serves: Serves,
    pub cert_serial: String,
    pub cert_not_after_ms: u64,
    pub policy_version: u64,
    pub last_seen_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

impl From<&EnforcerRecord> for EnforcerStatus {
    fn from(r: &EnforcerRecord) -> Self {
        Self {
            name: r.name.clone(),
            state: r.state.clone(),
            scope: r.scope.clone(),
            method: r.method.clone(),
            serves: r.serves.clone(),
            cert_serial: r.cert_serial.clone(),
            cert_not_after_ms: r.cert_not_after_ms,
            policy_version: r.policy_version,
            last_seen_ms: r.last_seen_ms,
            revoked_ms: r.revoked_ms,
        }
    }
}

/// One line of the watch stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum WatchMessage {
    /// Everything, first: the directory (every active enforcer) and the policy in force.
    Snapshot {
        revision: u64,
        directory: Vec<DirectoryEntry>,
        policy: Option<PolicyVersion>,
    },
    /// An enforcer joined or changed (address, networks, certificate).
    Upsert {
        revision: u64,
        entry: DirectoryEntry,
    },
    /// An enforcer left (revoked or removed): drop it now.
    Remove { revision: u64, name: String },
    /// A new policy.
    Policy {
        revision: u64,
        policy: PolicyVersion,
    },
    /// Nothing changed; the connection is alive.
    Ping { revision: u64 },
    /// The watching enforcer itself was revoked: the stream ends.
    Revoked { name: String },
}

/// An error body: what went wrong, and whether trying again later may help.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default)]
    pub retryable: bool,
}
