//! The Tessera enforcer as a library: everything the `tessera` binary (`main.rs`, only the
//! command line) runs, and what benches, the test harness and other tools use.
//!
//! * the daemon: [`daemon`] (`tessera run`), [`app`] (the one place that wires an enforcer:
//!   `build(Config) -> Running`), [`config`], [`capture`] (eBPF load, attach,
//!   pin), [`nontcp`] (udp/icmp policy in eBPF maps), [`workloads`], [`attest`] (derived identity labels), [`policy`] (loading and
//!   reloading), [`handshake`] (TCP-handshake mode in the kernel), [`api`] (the local HTTP
//!   API and web map);
//! * flows: [`flowstore`] (recent records and the persisted map), [`map`], [`metrics`],
//!   [`flowlog`] (flow log files and tables), [`client`] (`tessera flows` / `tessera map`);
//! * the control plane: [`server`] (`tessera server`: the daemon and its administration),
//!   [`fleetview`] (`tessera map --server --serve`: the fleet's web map, locally),
//!   [`control`] (an enforcer under a control plane: enrolment, cache, renewal, following);
//! * tools: [`ca`] (the cluster CA), [`identity_show`], [`detach`] (capture off the host).
//!
//! The eBPF object and the web map are built and embedded only with the `embed` feature
//! (default). Without it (the test harness, which needs [`config`]) build.rs builds nothing,
//! so neither bpf-linker nor node is needed, and `tessera run` fails at start-up with "this
//! build has no eBPF object" (the web map's script answers 501).
pub mod alloc;
pub mod api;
pub mod app;
pub mod attest;
pub mod ca;
pub mod capture;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod delivery;
pub mod detach;
pub mod fleetview;
pub mod flowlog;
pub mod flowstore;
pub mod handshake;
pub mod identity_show;
pub use tessera_proxy::map;
pub mod metrics;
pub mod netns;
pub mod nontcp;
pub mod policy;
pub mod server;
pub mod sources;
pub mod workloads;
