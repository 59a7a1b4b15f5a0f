//! Which enforcer serves which destination addresses (longest prefix wins), and — under a
//! control plane — which enforcers exist at all.
//!
//! [`Directory`] is what the data path holds: the routing table and the members, swapped
//! whole when the configuration or the control plane's directory changes, with a watch
//! channel so that holders of live tunnels can re-check them. A *managed* directory (the
//! control plane's) admits tunnels only from its members, in their scope; a static one (a
//! hand-written `[[peer]]` list) admits any enforcer the cluster CA certified, as before.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tessera_policy::Labels;
use tokio::sync::watch;

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

    /// Each address range with the peer that serves it, longest prefix first.
    pub fn routes(&self) -> impl Iterator<Item = (&IpNet, &Peer)> {
        self.routes.iter().map(|(net, peer)| (net, peer))
    }

    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.routes.iter().map(|(_, p)| p)
    }
}

/// An enforcer as the directory knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub tunnel: Option<SocketAddr>,
    pub serves: Vec<IpNet>,
    /// The labels its certificate's scope stamps on every identity it vouches for.
    pub scope: BTreeMap<String, String>,
    /// Its workloads' labels (scope stamped), for `udp`/`icmp` rules that name workloads
    /// on other enforcers: such a rule stands for the addresses this enforcer serves.
    pub workloads: Vec<Labels>,
}

#[derive(Debug)]
struct Snapshot {
    table: Arc<PeerTable>,
    members: HashMap<String, Member>,
    /// Each peer workload's labels with the addresses its enforcer serves.
    served: Vec<(Labels, Arc<[IpNet]>)>,
    managed: bool,
}

fn served_of<'a>(members: impl IntoIterator<Item = &'a Member>) -> Vec<(Labels, Arc<[IpNet]>)> {
    members
        .into_iter()
        .flat_map(|m| {
            let nets: Arc<[IpNet]> = m.serves.clone().into();
            m.workloads.iter().map(move |l| (l.clone(), nets.clone()))
        })
        .collect()
}

/// Why a tunnel's peer is not admitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("enforcer {0} is not in the control plane's directory")]
pub struct NotMember(pub String);

#[derive(Debug)]
pub struct Directory {
    now: ArcSwap<Snapshot>,
    generation: watch::Sender<u64>,
}

fn table_of<'a>(members: impl IntoIterator<Item = &'a Member>) -> PeerTable {
    PeerTable::new(members.into_iter().flat_map(|m| {
        m.tunnel.into_iter().flat_map(move |tunnel| {
            let peer = Peer {
                name: m.name.clone(),
                tunnel,
            };
            m.serves.iter().map(move |net| (*net, peer.clone()))
        })
    }))
}

impl Directory {
    fn with(snapshot: Snapshot) -> Self {
        Self {
            now: ArcSwap::from_pointee(snapshot),
            generation: watch::channel(0).0,
        }
    }

    /// A hand-written peer list: routes (and, for `udp`/`icmp` rules, the labels of the
    /// workloads each route serves, as the operator wrote them); any certified enforcer may
    /// open tunnels.
    pub fn fixed(table: PeerTable, served: Vec<(Labels, Vec<IpNet>)>) -> Self {
        Self::with(Snapshot {
            table: Arc::new(table),
            members: HashMap::new(),
            served: served.into_iter().map(|(l, n)| (l, n.into())).collect(),
            managed: false,
        })
    }

    /// The control plane's directory: routes, and only members may open tunnels.
    pub fn managed(members: impl IntoIterator<Item = Member>) -> Self {
        let members: HashMap<_, _> = members.into_iter().map(|m| (m.name.clone(), m)).collect();
        Self::with(Snapshot {
            table: Arc::new(table_of(members.values())),
            served: served_of(members.values()),
            members,
            managed: true,
        })
    }

    /// Replaces the members (managed directories); the names that left.
    pub fn replace(&self, members: impl IntoIterator<Item = Member>) -> Vec<String> {
        let members: HashMap<_, _> = members.into_iter().map(|m| (m.name.clone(), m)).collect();
        let old = self.now.load();
        let gone = old
            .members
            .keys()
            .filter(|n| !members.contains_key(*n))
            .cloned()
            .collect();
        self.now.store(Arc::new(Snapshot {
            table: Arc::new(table_of(members.values())),
            served: served_of(members.values()),
            members,
            managed: true,
        }));
        self.generation.send_modify(|g| *g += 1);
        gone
    }

    /// The routing table now.
    pub fn table(&self) -> Arc<PeerTable> {
        self.now.load().table.clone()
    }

    pub fn is_managed(&self) -> bool {
        self.now.load().managed
    }

    /// Whether enforcer `name` may open tunnels to us, and the scope its identities get:
    /// `Ok(None)` for a static directory (no scope), `Ok(Some)` for a member.
    pub fn admit(&self, name: &str) -> Result<Option<BTreeMap<String, String>>, NotMember> {
        let now = self.now.load();
        if !now.managed {
            return Ok(None);
        }
        now.members
            .get(name)
            .map(|m| Some(m.scope.clone()))
            .ok_or_else(|| NotMember(name.to_string()))
    }

    /// The addresses served by enforcers that have a workload whose labels `selects`
    /// (sorted, without repeats): what a `udp`/`icmp` rule naming workloads on other
    /// enforcers stands for.
    pub fn nets_serving(&self, selects: impl Fn(&Labels) -> bool) -> Vec<IpNet> {
        let now = self.now.load();
        let mut nets: Vec<IpNet> = now
            .served
            .iter()
            .filter(|(labels, _)| selects(labels))
            .flat_map(|(_, nets)| nets.iter().copied())
            .collect();
        nets.sort();
        nets.dedup();
        nets
    }

    /// How many times it was replaced. Read before a look-up, it is never newer than what
    /// the look-up saw (the members are stored before the generation moves).
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Changes: a new value after every [`Directory::replace`].
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
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
    fn a_managed_directory_admits_members_only_and_routes_change_with_it() {
        let m = |name: &str, net: &str, scope: &[(&str, &str)]| Member {
            name: name.into(),
            tunnel: Some("10.0.0.9:15008".parse().unwrap()),
            serves: vec![net.parse().unwrap()],
            scope: scope
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            workloads: vec![Labels::new([("app", name)])],
        };
        let fixed = Directory::fixed(PeerTable::default(), Vec::new());
        assert_eq!(fixed.admit("anyone"), Ok(None));
        let d = Directory::managed([m("a", "10.1.0.0/24", &[("site", "paris")])]);
        let changes = d.changes();
        assert_eq!(
            d.admit("a")
                .unwrap()
                .unwrap()
                .get("site")
                .map(String::as_str),
            Some("paris")
        );
        assert_eq!(d.admit("b"), Err(NotMember("b".into())));
        assert_eq!(
            d.table().lookup("10.1.0.5".parse().unwrap()).unwrap().name,
            "a"
        );
        // Workloads on other enforcers stand for the addresses their enforcer serves.
        assert_eq!(
            d.nets_serving(|l| l.get("app") == Some("a")),
            ["10.1.0.0/24".parse::<IpNet>().unwrap()]
        );
        assert!(d.nets_serving(|l| l.get("app") == Some("b")).is_empty());
        let gone = d.replace([m("b", "10.2.0.0/24", &[])]);
        // ...and follow the directory: a member gone takes its addresses with it.
        assert!(d.nets_serving(|l| l.get("app") == Some("a")).is_empty());
        assert_eq!(
            d.nets_serving(|l| l.get("app") == Some("b")),
            ["10.2.0.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(gone, ["a"]);
        assert!(changes.has_changed().unwrap());
        assert!(d.admit("a").is_err());
        assert!(d.table().lookup("10.1.0.5".parse().unwrap()).is_none());
        assert_eq!(
            d.table().lookup("10.2.0.5".parse().unwrap()).unwrap().name,
            "b"
        );
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
