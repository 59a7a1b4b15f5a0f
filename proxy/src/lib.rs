//! Tessera's data plane.
//!
//! * [`outbound`]: accepts connections the eBPF programs redirected, finds the enforcer that
//!   serves the original destination and carries the bytes there through a tunnel.
//! * [`inbound`]: terminates tunnels from peer enforcers and delivers to local workloads;
//!   refuses connections that tried to reach a protected port around the tunnel;
//!   [`delivery`]: how it connects to the workload (from the peer's own address).
//! * [`pool`]: keeps warm mutual-TLS connections per peer so that a new application
//!   connection does not pay a TLS handshake.
//! * [`wire`]: the tunnel's request/response header, a small versioned binary layout.
//! * [`copy`]: splicing two streams (half-close, backpressure, reset propagation).
//! * [`authz`]: policy decisions (pure, cached); [`registry`]: live connections of both
//!   modes, re-decided when policy or DNS answers change; [`dns`]: `dns:` names' addresses.
//! * [`capture`]: what the eBPF hooks captured; [`route`]: where a captured connection
//!   goes (pure).
//! * [`flow`]: flow records, each written exactly once by its tracker; [`code`]: the closed
//!   set of refusal codes; [`map`]: flow records aggregated into the connectivity map (one
//!   enforcer's, merged across enforcers, and the control plane's fleet map).
//! * [`handshake`]: TCP-handshake mode (tokens in the handshake, data in the kernel).
//! * [`limits`]: bounds on what floods can make us keep or do, and their counters;
//!   [`refusals`]: unauthenticated refusals aggregated per source prefix and interval.
//! * [`tls`], [`peers`], [`socket`], [`local`]: certificates, routing table, socket
//!   options, host-address checks.
pub mod admission;
pub mod authz;
pub mod capture;
pub mod code;
pub mod copy;
pub mod delivery;
pub mod dns;
pub mod flow;
pub mod handshake;
pub mod identity;
pub mod inbound;
pub mod limits;
pub mod local;
pub mod map;
pub mod mux;
pub mod outbound;
pub mod peers;
pub mod pool;
pub mod refusals;
pub mod registry;
pub mod route;
pub mod socket;
#[cfg(any(test, feature = "testkit"))]
#[doc(hidden)]
pub mod testkit;
pub mod tls;
pub mod wire;

/// ALPN protocol spoken on the tunnel port: tunnel protocol 6, application connections as
/// HTTP/2 streams (`docs/wire.md`). An enforcer of another protocol version offers another
/// name, and the TLS handshake fails with `no_application_protocol`.
pub const TUNNEL_ALPN: &[u8] = b"tessera/6";
