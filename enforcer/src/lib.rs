//! The parts of the enforcer that benches (and other tools) use as a library: the flow
//! store, the connectivity map and the metrics. The `tessera` binary is `main.rs`.
pub mod flowstore;
pub mod map;
pub mod metrics;
