//! Where a captured connection goes, decided from the capture and the peer table alone:
//! a pure function, so every routing case is a unit test with no socket.
//!
//! A destination that an enforcer serves is reached through that enforcer (a tunnel, or a
//! handshake with its tokens); any other is an external destination, which egress policy
//! on its address (or a `dns:` name) decides.
use crate::{
    authz::{Attempt, Party, Side},
    capture::Captured,
    peers::{Peer, PeerTable},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// Through the enforcer that serves the destination.
    Peer(&'a Peer),
    /// No enforcer serves it: reached directly if policy allows.
    External,
}

/// A captured connection's route and the egress decision it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan<'a> {
    pub route: Route<'a>,
    /// The source, as egress policy sees it (labels; no address: it is ours).
    pub src: Party,
    pub port: u16,
    pub observe: bool,
}

impl Plan<'_> {
    /// The egress attempt to decide once the destination is known: the peer's proven
    /// workload, or for an external route, [`Plan::external_party`].
    pub fn attempt(&self, dst: Party) -> Attempt {
        Attempt {
            side: Side::Egress,
            src: self.src.clone(),
            dst,
            port: self.port,
            observe: self.observe,
        }
    }
}

/// The destination of an external route, as policy sees it: its address only.
pub fn external_party(captured: &Captured) -> Party {
    Party::external(captured.dst.ip())
}

pub fn plan<'a>(captured: &Captured, peers: &'a PeerTable) -> Plan<'a> {
    Plan {
        route: peers
            .lookup(captured.dst.ip())
            .map_or(Route::External, Route::Peer),
        src: Party::workload(captured.identity.labels.clone(), None),
        port: captured.dst.port(),
        observe: captured.observe,
    }
}

#[cfg(test)]
mod tests {
    use tessera_policy::Labels;

    use super::*;
    use crate::{capture::Origin, identity::Identity};

    fn captured(dst: &str, observe: bool) -> Captured {
        Captured {
            dst: dst.parse().unwrap(),
            origin: Origin::default(),
            identity: Identity {
                spiffe: "spiffe://td/enforcer/a/workload/web".into(),
                labels: Labels::parse("app=web").unwrap(),
            },
            observe,
        }
    }

    fn peers() -> PeerTable {
        let peer = |name: &str| Peer {
            name: name.into(),
            tunnel: "127.0.0.1:15008".parse().unwrap(),
        };
        PeerTable::new([
            ("10.77.0.0/16".parse().unwrap(), peer("wide")),
            ("10.77.0.2/32".parse().unwrap(), peer("host-b")),
            ("fd77::/64".parse().unwrap(), peer("v6")),
        ])
    }

    #[test]
    fn served_destinations_go_to_the_longest_matching_peer() {
        let table = peers();
        let p = plan(&captured("10.77.0.2:8080", false), &table);
        assert!(matches!(p.route, Route::Peer(peer) if peer.name == "host-b"));
        let p = plan(&captured("10.77.9.9:8080", false), &table);
        assert!(matches!(p.route, Route::Peer(peer) if peer.name == "wide"));
        let p = plan(&captured("[fd77::5]:443", false), &table);
        assert!(matches!(p.route, Route::Peer(peer) if peer.name == "v6"));
    }

    #[test]
    fn a_v4_mapped_destination_is_its_v4_form() {
        let table = peers();
        let p = plan(&captured("[::ffff:10.77.0.2]:8080", false), &table);
        assert!(matches!(p.route, Route::Peer(peer) if peer.name == "host-b"));
    }

    #[test]
    fn unserved_destinations_are_external_and_decided_on_their_address() {
        let table = peers();
        let c = captured("192.0.2.1:443", true);
        let p = plan(&c, &table);
        assert_eq!(p.route, Route::External);
        let a = p.attempt(external_party(&c));
        assert_eq!(a.side, Side::Egress);
        assert_eq!(a.dst, Party::external("192.0.2.1".parse().unwrap()));
        assert_eq!(a.src.labels, Some(Labels::parse("app=web").unwrap()));
        assert_eq!(a.src.addr, None, "our own workload: decided on labels only");
        assert_eq!((a.port, a.observe), (443, true));
        assert_eq!(
            plan(&captured("10.78.0.1:80", false), &PeerTable::default()).route,
            Route::External
        );
    }
}
