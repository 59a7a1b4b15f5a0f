//! The Tessera enforcer as a library: everything the `tessera` binary (`main.rs`, only the
//! command line) runs, and what benches, the test harness and other tools use.
//!
//! * the daemon: [`daemon`] (`tessera run`), [`config`], [`capture`] (eBPF load, attach,
//!   pin), [`workloads`], [`attest`] (derived identity labels), [`policy`] (loading and
//!   reloading), [`handshake`] (TCP-handshake mode in the kernel), [`api`] (the local HTTP
//!   API and web map);
//! * flows: [`flowstore`] (recent records and the persisted map), [`map`], [`metrics`],
//!   [`flowlog`] (flow log files and tables), [`client`] (`tessera flows` / `tessera map`);
//! * tools: [`ca`] (the cluster CA), [`identity_show`].
pub mod api;
pub mod attest;
pub mod ca;
pub mod capture;
pub mod client;
pub mod config;
pub mod daemon;
pub mod flowlog;
pub mod flowstore;
pub mod handshake;
pub mod identity_show;
pub mod map;
pub mod metrics;
pub mod policy;
pub mod workloads;
