//! The addresses of the DNS names that policy mentions (`dns:` peers).
//!
//! Policy decides on addresses; a name matches a peer when it currently resolves to that
//! peer's address. [`DnsTable`] holds the resolutions; [`keep_resolved`] resolves every name
//! of the policy in force with hickory and re-resolves each one when its TTL runs out
//! (clamped to [`MIN_TTL`, `MAX_TTL`]). When a resolution changes, decisions are re-made:
//! cached ones dropped, and live connections the change no longer allows closed.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use hickory_resolver::{
    TokioResolver,
    config::{LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolverConfig},
    name_server::TokioConnectionProvider,
    proto::xfer::Protocol,
};

/// What [`keep_resolved`] keeps resolved, and whom it tells when answers change (the
/// connection registry, which re-decides live connections).
pub trait PolicyNames: Send + Sync + 'static {
    /// The DNS names the policy in force mentions.
    fn names(&self) -> Vec<String>;
    /// Resolutions changed: decisions must be re-made. Returns how many live connections
    /// that closed.
    fn resolutions_changed(&self) -> usize;
}

pub const MIN_TTL: Duration = Duration::from_secs(1);
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// After a failed lookup: keep the previous addresses, retry this soon.
const RETRY: Duration = Duration::from_secs(2);
/// How often the task looks for names added by a policy reload.
const TICK: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct DnsTable {
    names: RwLock<HashMap<String, HashSet<IpAddr>>>,
}

impl DnsTable {
    /// Whether `name` currently resolves to `addr`.
    pub fn resolves(&self, name: &str, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
            v4 => v4,
        };
        self.names
            .read()
            .expect("lock")
            .get(name)
            .is_some_and(|a| a.contains(&addr))
    }

    /// Records a resolution; returns whether it changed anything.
    pub fn set(&self, name: &str, addrs: HashSet<IpAddr>) -> bool {
        let mut names = self.names.write().expect("lock");
        if names.get(name) == Some(&addrs) {
            return false;
        }
        names.insert(name.to_owned(), addrs);
        true
    }

    /// The addresses `name` currently resolves to (none if unresolved).
    pub fn addrs(&self, name: &str) -> Vec<IpAddr> {
        let names = self.names.read().expect("lock");
        let mut addrs: Vec<IpAddr> = names
            .get(name)
            .map(|a| a.iter().copied().collect())
            .unwrap_or_default();
        addrs.sort();
        addrs
    }

    /// A policy name that currently resolves to `addr`, if any (for flow records).
    pub fn name_of(&self, addr: IpAddr) -> Option<String> {
        let names = self.names.read().expect("lock");
        let mut found: Vec<&String> = names
            .iter()
            .filter(|(_, a)| a.contains(&addr))
            .map(|(n, _)| n)
            .collect();
        found.sort();
        found.first().map(|n| (*n).clone())
    }

    /// Forgets names the policy no longer mentions.
    pub fn retain(&self, keep: &[String]) {
        self.names
            .write()
            .expect("lock")
            .retain(|n, _| keep.contains(n));
    }
}

/// A resolver using `servers`, or the system's configuration (/etc/resolv.conf) if empty.
pub fn resolver(servers: &[SocketAddr]) -> Result<TokioResolver, hickory_resolver::ResolveError> {
    let mut builder = if servers.is_empty() {
        TokioResolver::builder_tokio()?
    } else {
        let group: Vec<NameServerConfig> = servers
            .iter()
            .flat_map(|s| {
                [
                    NameServerConfig::new(*s, Protocol::Udp),
                    NameServerConfig::new(*s, Protocol::Tcp),
                ]
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], NameServerConfigGroup::from(group)),
            TokioConnectionProvider::default(),
        )
    };
    builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    Ok(builder.build())
}

/// Keeps `table` resolved for the names `policy` mentions, for as long as it runs.
pub async fn keep_resolved(
    resolver: TokioResolver,
    table: Arc<DnsTable>,
    policy: Arc<dyn PolicyNames>,
) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        let names = policy.names();
        table.retain(&names);
        due.retain(|n, _| names.contains(n));
        let mut changed = false;
        for name in &names {
            if due.get(name).is_some_and(|at| Instant::now() < *at) {
                continue;
            }
            // A trailing dot: the name is absolute, no search domains.
            match resolver.lookup_ip(format!("{name}.")).await {
                Ok(lookup) => {
                    let addrs: HashSet<IpAddr> = lookup.iter().collect();
                    let ttl = lookup
                        .valid_until()
                        .saturating_duration_since(Instant::now())
                        .clamp(MIN_TTL, MAX_TTL);
                    tracing::debug!(
                        name,
                        ?addrs,
                        ttl_secs = ttl.as_secs(),
                        "resolved a policy name"
                    );
                    changed |= table.set(name, addrs);
                    due.insert(name.clone(), Instant::now() + ttl);
                }
                Err(e) => {
                    // NXDOMAIN and friends: the name matches nothing. A transient failure
                    // keeps what we had (if anything) until the next try.
                    if e.is_no_records_found() {
                        changed |= table.set(name, HashSet::new());
                    }
                    tracing::warn!(name, error = %e, "cannot resolve a policy name");
                    due.insert(name.clone(), Instant::now() + RETRY);
                }
            }
        }
        if changed {
            let closed = policy.resolutions_changed();
            tracing::info!(
                closed_connections = closed,
                "policy names resolved differently: decisions re-made"
            );
        }
        tokio::time::sleep(TICK).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_matches_current_resolutions_only() {
        let t = DnsTable::default();
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(!t.resolves("registry.test", a));
        assert!(t.set("registry.test", [a].into()));
        assert!(
            !t.set("registry.test", [a].into()),
            "same addresses: no change"
        );
        assert!(t.resolves("registry.test", a));
        assert!(t.resolves("registry.test", "::ffff:192.0.2.7".parse().unwrap()));
        assert!(t.set("registry.test", HashSet::new()));
        assert!(!t.resolves("registry.test", a));
        t.set("gone.test", [a].into());
        t.retain(&["registry.test".to_owned()]);
        assert!(!t.resolves("gone.test", a));
    }
}
