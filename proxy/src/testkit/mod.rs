//! Test kits: whole pieces of the data plane wired together in one process, for unit tests
//! and benchmarks (`--features testkit` outside this crate's own tests).
//!
//! * [`tunnel`]: two enforcers (host-a and host-b) with their real outbound and tunnel
//!   listeners, pool, mutual TLS, tokens, policy and flow log, over loopback, with a test CA,
//!   a fake capture lookup and local workloads. Tunnel mode was otherwise tested only by the
//!   end-to-end tests, which need root, network namespaces and eBPF; this kit needs none of
//!   them (sockets are not marked: mark 0, see [`crate::socket`]).
//! * [`apps`]: the applications at both ends: workloads (TCP servers on loopback that
//!   report what they saw) and client helpers.
pub mod apps;
pub mod tunnel;

#[cfg(test)]
mod mux_tests;
#[cfg(test)]
mod tunnel_tests;
