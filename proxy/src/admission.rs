//! The admission core: the steps every connection handler of both data paths takes, in
//! one place.
//!
//! A handler *identifies* the two ends in its own way (a capture record, a verified token,
//! a local service, an address), then [`Admission::decide`] or [`Admission::admit`] asks
//! policy about the [`Attempt`] and writes the ruling into the connection's record (rule,
//! verdict, code, reason: the one place a policy outcome becomes a flow verdict); an
//! admitted connection is registered for re-checks on reload and [`carry`] moves its bytes
//! until it ends or is revoked, recording how it ended. The record itself is owned by a
//! [`FlowTracker`], which writes it exactly once.
use std::{future::Future, io, sync::Arc};

use crate::{
    authz::{Attempt, Decisions, Ruling},
    code::Code,
    copy::{Ended, Transferred, is_disconnect},
    flow::{Direction, Endpoint, FlowLog, FlowRecord, FlowTracker, Mode, now_ms},
    registry::{ConnectionGuard, ConnectionRegistry},
};

/// What one data path of one enforcer decides with and records to.
pub struct Admission {
    name: String,
    mode: Mode,
    registry: Arc<ConnectionRegistry>,
    flows: FlowLog,
}

impl Admission {
    /// `name`: this enforcer (the reporter of its records); `mode`: the data path.
    pub fn new(
        name: String,
        mode: Mode,
        registry: Arc<ConnectionRegistry>,
        flows: FlowLog,
    ) -> Self {
        Self {
            name,
            mode,
            registry,
            flows,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn decisions(&self) -> &Decisions {
        self.registry.decisions()
    }

    pub fn registry(&self) -> &Arc<ConnectionRegistry> {
        &self.registry
    }

    pub fn flows(&self) -> &FlowLog {
        &self.flows
    }

    /// A new record for an attempt starting now (see [`FlowRecord::new`]).
    pub fn record(
        &self,
        direction: Direction,
        src: Endpoint,
        dst: Endpoint,
        now_ms: u64,
    ) -> FlowRecord {
        FlowRecord::new(&self.name, self.mode, direction, src, dst, now_ms)
    }

    /// Starts tracking an attempt: its record is written exactly once from here on.
    pub fn track(&self, direction: Direction, src: Endpoint, dst: Endpoint) -> FlowTracker {
        self.track_at(direction, src, dst, now_ms())
    }

    /// As [`Admission::track`], started at `now_ms` by the caller's clock.
    pub fn track_at(
        &self,
        direction: Direction,
        src: Endpoint,
        dst: Endpoint,
        now_ms: u64,
    ) -> FlowTracker {
        FlowTracker::new(&self.flows, self.record(direction, src, dst, now_ms))
    }

    /// Decides `attempt` and writes the ruling into `rec`; a denial is recorded with
    /// `refused` and the policy's reason as `wording` puts it. The ruling, if it may proceed.
    pub fn decide(
        &self,
        attempt: &Attempt,
        rec: &mut FlowRecord,
        refused: Code,
        wording: impl FnOnce(&str) -> String,
    ) -> Option<Ruling> {
        let ruling = self.decisions().check(attempt);
        rec.ruled(&ruling, refused, wording);
        ruling.allowed.then_some(ruling)
    }

    /// [`Admission::decide`], then registers the admitted connection: its guard resolves
    /// when a policy change revokes it.
    pub fn admit(
        &self,
        attempt: Attempt,
        rec: &mut FlowRecord,
        refused: Code,
        wording: impl FnOnce(&str) -> String,
    ) -> Option<ConnectionGuard> {
        let ruling = self.decide(&attempt, rec, refused, wording)?;
        Some(self.registry.register(attempt, &ruling))
    }
}

/// Which end of a splice is the connection's source (bytes are counted from the source's
/// point of view in every record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Facing {
    /// The spliced application socket is the source (the outbound side).
    Source,
    /// It is the destination (the inbound side delivers to it).
    Destination,
}

impl Facing {
    /// (sent, received) of a record, from a splice's counts.
    pub fn bytes(self, t: Transferred) -> (u64, u64) {
        match self {
            Facing::Source => (t.from_app, t.to_app),
            Facing::Destination => (t.to_app, t.from_app),
        }
    }
}

/// How carrying a connection ended (the caller cleans up accordingly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carried {
    /// Both directions ended cleanly.
    Clean,
    /// Reset by either end: the connection is gone, the tunnel not reusable.
    Reset,
    /// Policy revoked it while it ran: the caller resets both sides and records the bytes
    /// moved so far.
    Revoked,
    /// The transport failed.
    Broken,
}

/// Carries an admitted connection with `splice` until it ends or `guard` is revoked, and
/// records how it ended in `rec` (bytes, reset reason, revocation, failure). `broke` words
/// a transport failure.
pub async fn carry(
    guard: &mut ConnectionGuard,
    rec: &mut FlowRecord,
    facing: Facing,
    splice: impl Future<Output = io::Result<Ended>>,
    broke: impl FnOnce(&io::Error) -> String,
) -> Carried {
    let ended = tokio::select! {
        r = splice => r,
        reason = guard.revoked() => {
            rec.revoked_by(reason);
            return Carried::Revoked;
        }
    };
    // Both ends revoke on a reload; whichever is first resets the other: cite the reload
    // here too if it applies to us.
    if !matches!(ended, Ok(Ended::Clean(_)))
        && let Some(reason) = guard.revocation()
    {
        rec.revoked_by(reason);
    }
    match ended {
        Ok(Ended::Clean(t)) => {
            let (sent, received) = facing.bytes(t);
            rec.transferred(sent, received);
            Carried::Clean
        }
        Ok(Ended::Reset {
            transferred,
            reason,
        }) => {
            let (sent, received) = facing.bytes(transferred);
            rec.transferred(sent, received);
            rec.reset(reason);
            Carried::Reset
        }
        Err(e) => {
            if !is_disconnect(&e) {
                tracing::debug!(error = %e, "a connection's transport failed");
            }
            if rec.code != Code::PolicyReload {
                rec.broke(Code::Broken, broke(&e));
            }
            Carried::Broken
        }
    }
}
