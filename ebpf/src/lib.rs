//! Empty library target: it lets `enforcer` name this crate as a build dependency, so cargo
//! rebuilds the enforcer (and its embedded eBPF object) when the programs change.
#![no_std]
