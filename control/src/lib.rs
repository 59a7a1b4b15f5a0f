//! Tessera's control plane, as a library: what `tessera server` runs.
//!
//! * [`store`]: all state behind one trait — an embedded file by default, etcd for a fleet
//!   (`etcd`, with the `etcd` feature).
//! * [`authority`]: the CA; short-lived enforcer certificates carrying name and [`scope`].
//! * [`tokens`] and [`document`]: the two ways an enforcer proves it may join.
//! * [`registry`]: enrolled enforcers, what they serve, and the directory peers receive.
//! * [`policy`]: the central policy, validated and versioned.
//! * [`fleet`]: the fleet's map, merged from every enforcer's own; [`suggest`]: an allow
//!   policy written from it.
//! * [`plane`]: the operations (enrol, renew, report, revoke) tying these together.
//! * [`api`], [`server`] and [`client`]: the HTTPS API over those operations, both ends;
//!   [`feed`]: one store watch per server, fanned out to every enforcer's watch stream.
//! * [`admin`]: administrator tokens.
pub mod admin;
pub mod api;
pub mod authority;
pub mod client;
pub mod document;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod feed;
pub mod fleet;
pub mod plane;
pub mod policy;
pub mod registry;
pub mod scope;
pub mod server;
pub mod store;
pub mod suggest;
pub mod tokens;
