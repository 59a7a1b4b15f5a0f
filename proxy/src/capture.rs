//! What the eBPF connect hooks captured about an enrolled workload's connection, shared by
//! both data paths: the tunnel's outbound proxy looks it up by the client address it
//! accepted, the handshake engine by the SYN's source address.
//!
//! A lookup must never block the caller: the tunnel path runs on the async workers and the
//! handshake engine on the queue threads. The record itself is a map read; attesting the
//! connecting process (hashing its executable, resolving its user) may not be cheap, so a
//! lookup whose attestation is not cached yet comes back as [`Capture::Pending`], work the
//! caller runs where blocking is allowed (`spawn_blocking`, or outside every lock).
use std::net::SocketAddr;

use crate::identity::Identity;

/// Who opened the connection on the source host, as the source enforcer observed it (the
/// tunnel header carries it to the destination enforcer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    pub workload: String,
    pub pid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
}

/// The original destination of a captured connection and who made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    pub dst: SocketAddr,
    pub origin: Origin,
    /// The source's identity: its workload's, plus what the enforcer derived from the
    /// connecting process (uid, executable).
    pub identity: Identity,
    /// The source workload is in policy observe mode.
    pub observe: bool,
}

/// Attestation work left to do before a capture is complete (may block); `Err` says why
/// the connection has no identity.
pub type Attest = Box<dyn FnOnce() -> Result<Captured, String> + Send>;

/// Why a connection without a capture record is refused.
pub const NO_RECORD: &str = "no capture record for this connection";

/// The result of a lookup.
pub enum Capture {
    /// No capture record: the connection was not captured (or its record is gone).
    Missing,
    /// Captured, but whoever made it has no identity here: why (a container its runtime
    /// does not vouch for, or one not selected).
    Refused(String),
    Ready(Captured),
    /// Found, but attesting the process may block: run it off the async workers and
    /// outside locks ([`Capture::resolve_blocking`] does it on tokio's blocking pool).
    Pending(Attest),
}

impl Capture {
    /// Completes the lookup here (on a thread that may block).
    pub fn resolve(self) -> Result<Captured, String> {
        match self {
            Capture::Missing => Err(NO_RECORD.into()),
            Capture::Refused(why) => Err(why),
            Capture::Ready(c) => Ok(c),
            Capture::Pending(attest) => attest(),
        }
    }

    /// Completes the lookup without blocking an async worker.
    pub async fn resolve_blocking(self) -> Result<Captured, String> {
        match self {
            Capture::Pending(attest) => tokio::task::spawn_blocking(attest)
                .await
                .unwrap_or_else(|e| Err(format!("attestation failed: {e}"))),
            other => other.resolve(),
        }
    }
}

impl From<Option<Captured>> for Capture {
    fn from(c: Option<Captured>) -> Self {
        c.map_or(Capture::Missing, Capture::Ready)
    }
}

/// Finds (and forgets) the capture record of a connection by its client address and the
/// network namespace it was made in (`None`: the enforcer's own; `Some(cookie)`: a pod's or
/// container's own network, where the enforcer keeps a listener).
pub trait CaptureLookup: Send + Sync + 'static {
    fn take(&self, client: SocketAddr, netns: Option<u64>) -> Capture;
}
