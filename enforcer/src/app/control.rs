//! What the control plane's changes do to a running enforcer: the directory replaces the
//! peers (and whoever left loses its tunnels and live connections at once), a policy is put
//! in force like a reloaded file, a renewed certificate is used for new handshakes.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use anyhow::{Context, Result};
use tessera_control::{authority, policy::PolicyVersion};
use tessera_proxy::{
    identity::{session::Tokens, token::KeyId},
    peers::{Directory, Member},
    pool::TunnelPool,
    registry::ConnectionRegistry,
    tls::CertSlot,
};

use tessera_policy::Labels;

use crate::{config::PeerConfig, metrics::Metrics};

/// The directory's members as the data path holds them: each with the scope its
/// certificate carries (a peer whose certificate cannot be read is left out, and said so).
pub fn members(peers: &[PeerConfig]) -> Vec<Member> {
    peers
        .iter()
        .filter_map(|p| {
            let scope = match scope_of(p) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(peer = %p.name, error = format!("{e:#}"), "peer left out of the directory");
                    return None;
                }
            };
            let workloads = p.workloads.iter().map(|l| stamped(l, &scope)).collect();
            Some(Member {
                name: p.name.clone(),
                tunnel: Some(p.tunnel),
                serves: p.serves.clone(),
                scope,
                workloads,
            })
        })
        .collect()
}

/// A peer workload's labels as the directory lists them, with the scope of its enforcer's
/// certificate over whatever they say (a rogue enforcer cannot register a workload in
/// another site or tenant).
fn stamped(labels: &BTreeMap<String, String>, scope: &BTreeMap<String, String>) -> Labels {
    let mut l = labels.clone();
    l.extend(scope.iter().map(|(k, v)| (k.clone(), v.clone())));
    Labels::new(l)
}

/// This enforcer's own scope (under a control plane: from its certificate; else none).
pub fn own_scope(config: &crate::config::Config) -> Result<BTreeMap<String, String>> {
    if config.control.is_none() {
        return Ok(Default::default());
    }
    let path = &config.tls.cert;
    let pem = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let der = authority::pem_der(&pem).map_err(anyhow::Error::msg)?;
    let c = authority::certified(&der)?;
    Ok(c.scope
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn scope_of(p: &PeerConfig) -> Result<BTreeMap<String, String>> {
    let Some(path) = &p.cert else {
        return Ok(Default::default());
    };
    let pem = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let der = authority::pem_der(&pem).map_err(anyhow::Error::msg)?;
    let c = authority::certified(&der)?;
    anyhow::ensure!(
        c.name == p.name,
        "certificate names {:?}, not {:?}",
        c.name,
        p.name
    );
    Ok(c.scope
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

pub struct Live {
    pub registry: Arc<ConnectionRegistry>,
    pub metrics: Arc<Metrics>,
    pub directory: Arc<Directory>,
    pub tokens: Arc<Tokens>,
    pub pool: Option<Arc<TunnelPool>>,
    /// The certificate TLS presents.
    pub cert: Arc<CertSlot>,
    /// Peers' certified keys, trusted for tokens that arrive without TLS (handshake mode);
    /// shared with the handshake engine, which seals and checks with them.
    pub peer_keys: Arc<RwLock<HashMap<String, KeyId>>>,
    /// The flow store: its map goes to the control plane.
    pub flows: Arc<crate::flowstore::FlowStore>,
    /// Handshake mode's fast path, if on: a directory change revokes the keys of the peers
    /// it concerns.
    pub fast: Option<Arc<crate::handshake::fast::FastPath>>,
}

impl Live {
    /// Trusts each peer's current certificate for tokens (a renewal extends the trust) and
    /// forgets the keys of those that left.
    fn trust(&self, peers: &[PeerConfig], gone: &[String]) {
        let mut keys = self.peer_keys.write().unwrap_or_else(|e| e.into_inner());
        for name in gone {
            if let Some(id) = keys.remove(name) {
                self.tokens.forget_peer(&id);
            }
        }
        for p in peers {
            let Some(path) = &p.cert else { continue };
            let der = std::fs::read_to_string(path)
                .ok()
                .and_then(|pem| authority::pem_der(&pem).ok());
            match der.map(|d| self.tokens.trust_peer(&d)) {
                Some(Ok(id)) => {
                    if let Some(old) = keys.insert(p.name.clone(), id)
                        && old != id
                    {
                        self.tokens.forget_peer(&old);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(peer = %p.name, error = %e, "peer certificate not trusted")
                }
                None => tracing::warn!(peer = %p.name, "peer certificate unreadable"),
            }
        }
    }
}

impl crate::control::Apply for Live {
    fn peers(&self, peers: &[PeerConfig]) {
        let members = members(peers);
        let gone = self.directory.replace(members.iter().cloned());
        self.trust(peers, &gone);
        if let Some(fast) = &self.fast {
            // Once both the directory and the peers' keys are in force.
            fast.directory_changed(&self.directory, &self.peer_keys);
        }
        for name in &gone {
            let closed = self.registry.revoke_enforcer(name);
            if let Some(pool) = &self.pool {
                pool.forget(name);
            }
            tracing::warn!(peer = %name, closed_connections = closed, "peer left the directory: its tunnels and connections are closed");
        }
        if let Some(pool) = &self.pool {
            pool.warm(self.directory.table().peers());
        }
        tracing::info!(peers = members.len(), "directory in force");
    }

    fn map(&self) -> tessera_proxy::map::Map {
        self.flows.map()
    }

    fn policy(&self, p: &PolicyVersion) -> Result<()> {
        let policy =
            tessera_policy::load(&format!("control plane policy v{}", p.version), &p.text)?;
        let closed = self.registry.apply(policy);
        self.metrics.policy_reload(true);
        tracing::info!(
            version = p.version,
            closed_connections = closed,
            "policy applied"
        );
        Ok(())
    }

    fn certificate(&self, cert_pem: &str) -> Result<()> {
        let der = authority::pem_der(cert_pem).map_err(anyhow::Error::msg)?;
        self.cert
            .replace(vec![der.into()])
            .context("the renewed certificate is not for our key")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_workloads_scope_labels_come_from_its_certificate_not_its_claim() {
        let pairs = |p: &[(&str, &str)]| -> BTreeMap<String, String> {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let claimed = pairs(&[("app", "api"), ("site", "paris"), ("tenant", "other")]);
        let scope = pairs(&[("site", "london"), ("tenant", "acme")]);
        let l = stamped(&claimed, &scope);
        assert_eq!(l.get("app"), Some("api"));
        assert_eq!(l.get("site"), Some("london"));
        assert_eq!(l.get("tenant"), Some("acme"));
        // Without a scope (a static peer list): as written.
        assert_eq!(
            stamped(&claimed, &BTreeMap::new()).get("site"),
            Some("paris")
        );
    }
}
