//! Tessera's data plane.
//!
//! * [`outbound`]: accepts connections the eBPF programs redirected, finds the enforcer that
//!   serves the original destination and carries the bytes there through a tunnel.
//! * [`inbound`]: terminates tunnels from peer enforcers and delivers to local workloads;
//!   refuses connections that tried to reach a protected port around the tunnel.
//! * [`pool`]: keeps warm mutual-TLS connections per peer so that a new application
//!   connection does not pay a TLS handshake.
//! * [`wire`]: the tunnel's request/response header, a small versioned binary layout.
//! * [`copy`]: splicing two streams (half-close, backpressure, reset propagation).
//! * [`tls`], [`peers`], [`socket`], [`local`], [`flow`]: certificates, routing table,
//!   socket options, host-address checks, and flow records.
pub mod authz;
pub mod copy;
pub mod dns;
pub mod flow;
pub mod handshake;
pub mod identity;
pub mod inbound;
pub mod local;
pub mod outbound;
pub mod peers;
pub mod pool;
pub mod socket;
#[cfg(any(test, feature = "testkit"))]
#[doc(hidden)]
pub mod testkit;
pub mod tls;
pub mod wire;

/// ALPN protocol spoken on the tunnel port.
pub const TUNNEL_ALPN: &[u8] = b"tessera/1";
