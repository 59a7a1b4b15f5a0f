//! What this host serves: its own addresses (so a tunnel can never be used to reach a
//! third host: no open relay) and the ports of its enrolled workloads.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use crate::identity::Identity;

/// The host's interface addresses, refreshed at most every `REFRESH`.
pub struct LocalAddrs {
    cache: RwLock<(Instant, HashSet<IpAddr>)>,
}

const REFRESH: Duration = Duration::from_secs(2);

impl Default for LocalAddrs {
    fn default() -> Self {
        Self {
            cache: RwLock::new((Instant::now(), read_addrs())),
        }
    }
}

fn read_addrs() -> HashSet<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return HashSet::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .collect()
}

impl LocalAddrs {
    pub fn contains(&self, ip: IpAddr) -> bool {
        {
            let cache = self.cache.read().expect("lock");
            if cache.1.contains(&ip) || cache.0.elapsed() < REFRESH {
                return cache.1.contains(&ip);
            }
        }
        let mut cache = self.cache.write().expect("lock");
        *cache = (Instant::now(), read_addrs());
        cache.1.contains(&ip)
    }
}

/// An enrolled workload of this host, as policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalWorkload {
    pub name: String,
    /// Its identity as a destination: declared labels and the ones derived from its cgroup
    /// (a connecting process adds its own, see the enforcer's attestation).
    pub identity: Identity,
    /// Policy denials for this workload are recorded, not enforced.
    pub observe: bool,
}

/// Workloads that come and go (containers a runtime starts): which one serves a port now.
pub trait DynamicServices: Send + Sync + 'static {
    fn workload(&self, port: u16) -> Option<Arc<LocalWorkload>>;
    /// The workload with a network namespace of its own that has `dst`'s address and
    /// serves its port (pods, containers on a bridge: reached at their own address).
    fn at_address(&self, _dst: std::net::SocketAddr) -> Option<Arc<LocalWorkload>> {
        None
    }
}

/// Local workloads by the TCP port they serve: configured ones, then those of a
/// [`DynamicServices`] (whose ports the configuration protects, and whose workloads say
/// which of them they serve).
#[derive(Clone, Default)]
pub struct LocalServices {
    by_port: HashMap<u16, Arc<LocalWorkload>>,
    dynamic: Option<Arc<dyn DynamicServices>>,
}

impl std::fmt::Debug for LocalServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalServices")
            .field("by_port", &self.by_port)
            .field("dynamic", &self.dynamic.is_some())
            .finish()
    }
}

impl LocalServices {
    pub fn new(services: impl IntoIterator<Item = (u16, Arc<LocalWorkload>)>) -> Self {
        Self {
            by_port: services.into_iter().collect(),
            dynamic: None,
        }
    }

    /// These services, and those `dynamic` says are served now.
    pub fn with_dynamic(mut self, dynamic: Arc<dyn DynamicServices>) -> Self {
        self.dynamic = Some(dynamic);
        self
    }

    pub fn workload(&self, port: u16) -> Option<Arc<LocalWorkload>> {
        if let Some(w) = self.by_port.get(&port) {
            return Some(w.clone());
        }
        self.dynamic.as_ref()?.workload(port)
    }

    /// The workload with a network of its own at `dst` (address and port), if any.
    pub fn at_address(&self, dst: std::net::SocketAddr) -> Option<Arc<LocalWorkload>> {
        self.dynamic.as_ref()?.at_address(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_local_and_documentation_address_is_not() {
        let addrs = LocalAddrs::default();
        assert!(addrs.contains("127.0.0.1".parse().unwrap()));
        assert!(!addrs.contains("192.0.2.55".parse().unwrap()));
    }
}
