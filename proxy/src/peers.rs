//! Which enforcer serves which destination addresses (from configuration for now; the
//! control plane will distribute it later). Longest prefix wins.
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The peer enforcer's name: the DNS name its certificate must carry.
    pub name: String,
    /// Its tunnel address.
    pub tunnel: SocketAddr,
}

#[derive(Clone, Debug, Default)]
pub struct PeerTable {
    /// Sorted by prefix length, longest first.
    routes: Vec<(IpNet, Peer)>,
}

impl PeerTable {
    pub fn new(routes: impl IntoIterator<Item = (IpNet, Peer)>) -> Self {
        let mut routes: Vec<_> = routes.into_iter().collect();
        routes.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        Self { routes }
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<&Peer> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.routes
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, peer)| peer)
    }

    /// The address of family `v6` that the enforcer `name` serves as a single host (a /32
    /// or /128 among its routes): its own address of that family, when the one its tunnel
    /// came from is of the other.
    pub fn host_address(&self, name: &str, v6: bool) -> Option<IpAddr> {
        self.routes
            .iter()
            .filter(|(net, peer)| peer.name == name && net.addr().is_ipv6() == v6)
            .find(|(net, _)| net.prefix_len() == net.max_prefix_len())
            .map(|(net, _)| net.addr())
    }

    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.routes.iter().map(|(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str) -> Peer {
        Peer {
            name: name.into(),
            tunnel: "10.0.0.1:15008".parse().unwrap(),
        }
    }

    #[test]
    fn longest_prefix_wins_and_unknown_is_none() {
        let table = PeerTable::new([
            ("10.77.0.0/16".parse().unwrap(), peer("wide")),
            ("10.77.0.2/32".parse().unwrap(), peer("b")),
            ("fd00::/64".parse().unwrap(), peer("v6")),
        ]);
        assert_eq!(
            table.lookup("10.77.0.2".parse().unwrap()).unwrap().name,
            "b"
        );
        assert_eq!(
            table.lookup("10.77.9.9".parse().unwrap()).unwrap().name,
            "wide"
        );
        assert_eq!(
            table
                .lookup("::ffff:10.77.0.2".parse().unwrap())
                .unwrap()
                .name,
            "b"
        );
        assert_eq!(table.lookup("fd00::5".parse().unwrap()).unwrap().name, "v6");
        assert!(table.lookup("192.0.2.1".parse().unwrap()).is_none());
    }

    #[test]
    fn a_peers_host_address_is_a_single_address_route_of_the_family() {
        let table = PeerTable::new([
            ("fd00::/64".parse().unwrap(), peer("b")),
            ("10.77.0.2/32".parse().unwrap(), peer("b")),
            ("fd77::2/128".parse().unwrap(), peer("b")),
            ("fd77::3/128".parse().unwrap(), peer("c")),
        ]);
        assert_eq!(
            table.host_address("b", true),
            Some("fd77::2".parse().unwrap())
        );
        assert_eq!(
            table.host_address("b", false),
            Some("10.77.0.2".parse().unwrap())
        );
        assert_eq!(table.host_address("c", false), None);
    }
}
