//! The handshake fast path, user-space half (issue 16 item 5; docs/handshake.md, "Fast
//! path"): turns it on in the kernel (settings, the tc verifier on the host's interfaces),
//! installs the pair secret each completed full handshake agrees, at both ends, and
//! revokes those a replaced policy denies, and those whose peer enforcer a directory change
//! concerns (removed, revoked, re-keyed, another scope, no longer serving the address).
//!
//! The kernel half (`ebpf/src/programs/fast.rs`) proves later connections of the same pair
//! with a SipHash tag in a TCP option and never asks user space; what it cannot prove goes
//! to the NFQUEUE engine as before.
use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{SchedClassifier, TcAttachType},
};
use ipnet::IpNet;
use tessera_common::{
    AF_INET, AF_INET6,
    fast::{FastClientKey, FastConn, FastKey, FastServerEntry, FastSettings},
    names,
};
use tessera_proxy::{
    authz::{Attempt, Decisions, Ruling},
    flow::{Direction, FlowTemplate, now_ms},
    handshake::{
        engine::LiveConnection,
        fast::{FastGrant, FastPeer},
    },
    identity::{reserved, token::KeyId},
    peers::{Directory, PeerTable},
};

use super::{closed::monotonic_ns, live::Registered};
use crate::config::HandshakeConfig;

/// The fast path's maps, shared by the NFQUEUE workers (installing) and the reload watch
/// (revoking).
pub struct FastPath {
    client: Mutex<HashMap<MapData, FastClientKey, FastKey>>,
    server: Mutex<HashMap<MapData, u32, FastServerEntry>>,
    /// Destinations whose server refused a fast SYN, until when (monotonic ns).
    nofast: Mutex<HashMap<MapData, FastClientKey, u64>>,
    lifetime: Duration,
    /// Policy replacements seen: a grant decided before one is never installed after it.
    generation: AtomicU64,
    /// The policy in force reads executable labels: no key is granted (C2: another
    /// program of the same cgroup and uid would ride a key its executable was not allowed).
    process_labels: std::sync::atomic::AtomicBool,
    /// Client grants waiting for [`CLIENT_DELAY`].
    delayed: Mutex<Option<mpsc::Sender<(Instant, u64, FastGrant)>>>,
    /// What the full handshake of each installed key decided, by (server end?, key id):
    /// the fast path's connections are recorded and watched with it.
    templates: Mutex<Templates>,
    /// The ring of established fast connections, until the reader takes it.
    events: Mutex<Option<RingBuf<MapData>>>,
    /// When expired keys were last swept ([`FastPath::sweep`]).
    swept: Mutex<Instant>,
    /// Each peer enforcer's standing as the directory last said (what a key agreed with
    /// it relies on): a key is granted only with a peer in it, under the same key, by a
    /// handshake that began after the standing last changed.
    peers: Mutex<Standings>,
}

/// How often expired keys and their templates are swept (at a grant, at most).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The installed keys by (server end?, key id).
type Templates = StdHashMap<(bool, u32), Installed>;

/// An installed key (or one about to be, at the client end).
struct Installed {
    /// Its full handshake's decision, shared by the records of its connections.
    template: Arc<Template>,
    /// Their records' reason (made once).
    reason: String,
    /// The client end's map key (None at the server end).
    client: Option<FastClientKey>,
    /// Until when it can prove a connection (then it and its kernel entry are swept).
    until: Instant,
    /// The peer enforcer its handshake proved, and the other end's address.
    peer: FastPeer,
    remote: IpAddr,
}

/// What the directory says of a peer enforcer that a key agreed with it relies on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standing {
    /// Its certified key.
    key: KeyId,
    /// The scope its certificate stamps on what it vouches for (None: a static directory).
    scope: Option<BTreeMap<String, String>>,
    /// The addresses it serves (sorted).
    nets: Vec<IpNet>,
    /// The directory generation at which this standing began (0: from the start).
    since: u64,
}

/// Peer enforcers' standings, by name.
pub type Standings = StdHashMap<String, Standing>;

/// Each peer's standing as `directory` and `keys` (the peers' certified keys) say, at
/// generation `generation`: a peer without a certified key, or not admitted, has none.
/// A standing equal (but for `since`) to the one in `old` keeps its `since`.
pub fn standings(
    directory: &Directory,
    keys: &StdHashMap<String, KeyId>,
    generation: u64,
    old: &Standings,
) -> Standings {
    let table = directory.table();
    let mut nets: StdHashMap<&str, Vec<IpNet>> = StdHashMap::new();
    for (net, peer) in table.routes() {
        nets.entry(peer.name.as_str()).or_default().push(*net);
    }
    keys.iter()
        .filter_map(|(name, key)| {
            let scope = directory.admit(name).ok()?;
            let mut nets = nets.remove(name.as_str()).unwrap_or_default();
            nets.sort();
            let mut s = Standing {
                key: *key,
                scope,
                nets,
                since: generation,
            };
            if let Some(o) = old.get(name) {
                let same = Standing {
                    since: o.since,
                    ..s.clone()
                };
                if same == *o {
                    s.since = o.since;
                }
            }
            Some((name.clone(), s))
        })
        .collect()
}

/// Whether a key agreed with `peer` (the other end at `remote`) no longer stands under the
/// directory's `new` standings: its peer left (removed, revoked), its key or scope changed,
/// or `remote` is no longer an address it serves (`table`, looked up only if its addresses
/// changed since `old`).
pub fn stale(
    peer: &FastPeer,
    remote: IpAddr,
    old: &Standings,
    new: &Standings,
    table: &PeerTable,
) -> bool {
    let Some(now) = new.get(&peer.name) else {
        return true;
    };
    if now.key != peer.key {
        return true;
    }
    match old.get(&peer.name) {
        // (a key granted under a standing that changed since it was read: `grant` refuses
        // those, but one may have been granted between the change and this call)
        None => true,
        Some(was) => {
            was.key != now.key
                || was.scope != now.scope
                || (was.nets != now.nets
                    && table.lookup(remote).map(|p| p.name.as_str()) != Some(peer.name.as_str()))
        }
    }
}

/// Whether a handshake with `peer` may be granted a key under `standings`: its peer is in
/// the directory with the key the handshake used, and its standing has not changed since
/// the handshake began.
pub fn stands(peer: &FastPeer, standings: &Standings) -> bool {
    standings
        .get(&peer.name)
        .is_some_and(|s| s.key == peer.key && peer.directory >= s.since)
}

/// A full handshake's decision, for the connections its pair secret proves later.
pub struct Template {
    attempt: Arc<Attempt>,
    ruling: Ruling,
    flow: FlowTemplate,
}

impl Template {
    /// The decision of the connection `live` (None once its record was written).
    pub fn of(live: &LiveConnection) -> Option<Self> {
        Some(Self {
            attempt: Arc::new(live.attempt.clone()),
            ruling: live.ruling.clone(),
            flow: live.flow.template()?,
        })
    }
}

/// Templates kept at most (as many as keys at both ends).
const TEMPLATES_KEPT: usize = 2 * tessera_common::fast::FAST_SERVER_ENTRIES as usize;

/// How long a client end waits before it uses a new pair secret: the server end installs
/// its own when the client's proof (the first ACK) arrives, half a round trip and a queue
/// later; a fast SYN that overtook it would be refused (and cost a connection).
const CLIENT_DELAY: Duration = Duration::from_millis(100);

/// An address as the programs store it: network byte order in each u32, IPv4 (also
/// IPv4-mapped) in `[0]`.
fn kernel_addr(a: &SocketAddr) -> ([u32; 4], u16) {
    match a.ip().to_canonical() {
        std::net::IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], AF_INET),
        std::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes(o[i..i + 4].try_into().expect("4 bytes"));
            ([w(0), w(4), w(8), w(12)], AF_INET6)
        }
    }
}

/// The host's interfaces the verifier runs on: all but loopback (connections over `lo`
/// never reach a workload port in handshake mode). Asked of the kernel (`if_nameindex`),
/// so it is this network namespace's list whatever /sys shows.
fn interfaces() -> Result<Vec<String>> {
    let list = nix::net::if_::if_nameindex().context("listing the network interfaces")?;
    let mut out: Vec<String> = list
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    out.sort();
    Ok(out)
}

impl FastPath {
    /// Turns the fast path on: its settings, the tc verifier on every interface but `lo`
    /// (links held by the loaded object: they go when the enforcer exits), and the maps.
    /// None when `[handshake] fast_path_secs = 0`.
    pub fn start(ebpf: &mut Ebpf, h: &HandshakeConfig) -> Result<Option<Self>> {
        if h.fast_path_secs == 0 {
            return Ok(None);
        }
        let prog: &mut SchedClassifier = ebpf
            .program_mut(names::PROG_VERIFY_FAST)
            .context("the fast path's tc program")?
            .try_into()?;
        prog.load().context("loading the fast path's tc program")?;
        for iface in interfaces()? {
            prog.attach(&iface, TcAttachType::Ingress)
                .with_context(|| format!("attaching the fast path's verifier to {iface}"))?;
            tracing::debug!(interface = iface, "fast path verifier attached");
        }
        let mut settings: Array<_, FastSettings> = Array::try_from(
            ebpf.map_mut(names::FAST_SETTINGS)
                .context("fast path settings map")?,
        )?;
        settings.set(
            0,
            FastSettings {
                socket_mark: h.fast_socket_mark(),
                fast_bit: h.fast_bit(),
                proven_bit: h.proven_bit,
                _pad: 0,
            },
            0,
        )?;
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name).with_context(|| format!("map {name}"))
        };
        Ok(Some(Self {
            client: Mutex::new(HashMap::try_from(take(ebpf, names::FAST_CLIENT)?)?),
            server: Mutex::new(HashMap::try_from(take(ebpf, names::FAST_SERVER)?)?),
            nofast: Mutex::new(HashMap::try_from(take(ebpf, names::FAST_NOFAST)?)?),
            lifetime: Duration::from_secs(h.fast_path_secs),
            generation: AtomicU64::new(0),
            process_labels: std::sync::atomic::AtomicBool::new(false),
            delayed: Mutex::new(None),
            templates: Mutex::default(),
            swept: Mutex::new(Instant::now()),
            events: Mutex::new(Some(RingBuf::try_from(take(ebpf, names::FAST_EVENTS)?)?)),
            peers: Mutex::default(),
        }))
    }

    /// Turns the fast path off in the loaded object (its settings zeroed: the connect
    /// hooks choose no fast mark, the verifiers mark nothing). At shutdown: pinned connect
    /// hooks outlive the enforcer with this run's maps, its tc verifiers do not.
    pub fn disable(ebpf: &mut Ebpf) {
        let Some(map) = ebpf.map_mut(names::FAST_SETTINGS) else {
            return;
        };
        let result = Array::<_, FastSettings>::try_from(map)
            .and_then(|mut a| a.set(0, FastSettings::default(), 0));
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot turn the fast path off");
        }
    }

    /// The ring of established fast connections (once).
    pub fn take_events(&self) -> Option<RingBuf<MapData>> {
        lock(&self.events).take()
    }

    /// Starts the thread that installs client grants once [`CLIENT_DELAY`] passed.
    pub fn run_delayed(self: &Arc<Self>) -> Result<()> {
        let (tx, rx) = mpsc::channel::<(Instant, u64, FastGrant)>();
        *lock(&self.delayed) = Some(tx);
        let this = self.clone();
        std::thread::Builder::new()
            .name("tessera-fast".into())
            .spawn(move || {
                // FIFO with one delay: due times only grow.
                for (due, generation, grant) in rx {
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    this.install(&grant, generation);
                }
            })?;
        Ok(())
    }

    /// A pair secret a full handshake just agreed (called by the NFQUEUE workers right after
    /// the handshake's decision): the server end's now, the client end's after
    /// [`CLIENT_DELAY`].
    pub fn grant(&self, grant: FastGrant, template: Option<Template>) {
        let generation = self.generation.load(Ordering::SeqCst);
        let Some(template) = template else {
            return;
        };
        if self.process_labels.load(Ordering::SeqCst) {
            return;
        }
        let full = lock(&self.templates).len() >= TEMPLATES_KEPT;
        let due = lock(&self.swept).elapsed() >= SWEEP_EVERY;
        if full || due {
            self.sweep();
        }
        {
            let mut templates = lock(&self.templates);
            if !stands(&grant.peer, &lock(&self.peers)) {
                // Its peer left, or changed, since its handshake began: the directory
                // change that did it may already have revoked the pair's keys.
                tracing::debug!(
                    key_id = grant.pair.key_id,
                    peer = grant.peer.name,
                    "fast path key not granted: its peer's standing changed"
                );
                return;
            }
            let client = client_key(&grant);
            if let Some(c) = client {
                // A new handshake of the same caller and destination replaces its key
                // (the kernel's entry is by caller and destination): its old template goes.
                templates.retain(|(at_server, _), old| *at_server || old.client != Some(c));
            }
            if templates.len() >= TEMPLATES_KEPT {
                // Full of live keys: this pair stays on the full handshake (never forget
                // a live key's decision: it is what revocation and records need).
                tracing::debug!(
                    key_id = grant.pair.key_id,
                    "fast path full: key not granted"
                );
                return;
            }
            // Until the key's expiry at the latest (the client end installs it later).
            let until = Instant::now() + self.lifetime + CLIENT_DELAY + Duration::from_secs(1);
            let reason = template.flow.reason_noting(&format!(
                "kernel fast path, key {:#010x}",
                grant.pair.key_id
            ));
            templates.insert(
                (grant.caller.is_none(), grant.pair.key_id),
                Installed {
                    template: Arc::new(template),
                    reason,
                    client,
                    until,
                    peer: grant.peer.clone(),
                    remote: grant.remote.ip().to_canonical(),
                },
            );
        }
        if grant.caller.is_none() {
            self.install(&grant, generation);
            return;
        }
        if let Some(tx) = lock(&self.delayed).as_ref() {
            let _ = tx.send((Instant::now() + CLIENT_DELAY, generation, grant));
        }
    }

    /// Installs the pair secret of a completed full handshake at this end, unless policy
    /// was replaced since it was decided (`generation`).
    fn install(&self, grant: &FastGrant, generation: u64) {
        let key = FastKey {
            secret: grant.pair.secret,
            key_id: grant.pair.key_id,
            epoch: 1,
            expires_ns: monotonic_ns().saturating_add(self.lifetime.as_nanos() as u64),
        };
        let (remote, family) = kernel_addr(&grant.remote);
        // Checked under the map's lock, which revocation takes too.
        let result = match client_key(grant) {
            Some(k) => {
                if lock(&self.nofast)
                    .get(&k, 0)
                    .is_ok_and(|until| until > monotonic_ns())
                {
                    // Its server refused a fast SYN lately: the full handshake it is.
                    return;
                }
                let mut client = lock(&self.client);
                if !self.current(grant, generation) {
                    return;
                }
                client.insert(k, key, 0)
            }
            None => {
                let e = FastServerEntry {
                    key,
                    client: remote,
                    server_port: grant.local.port(),
                    family,
                    _pad: 0,
                };
                let mut server = lock(&self.server);
                if !self.current(grant, generation) {
                    return;
                }
                server.insert(grant.pair.key_id, e, 0)
            }
        };
        match result {
            Ok(()) => tracing::debug!(
                key_id = grant.pair.key_id,
                local = %grant.local,
                remote = %grant.remote,
                client = grant.caller.is_some(),
                "fast path key installed"
            ),
            // A full map: this pair stays on the full handshake.
            Err(e) => tracing::debug!(error = %e, "fast path key not installed"),
        }
    }

    /// Whether `grant` may still be installed (called under its map's lock, which revocation
    /// takes first): no policy replaced since it was decided (`generation`), and its key
    /// not revoked meanwhile (by a directory change, which forgets its template).
    fn current(&self, grant: &FastGrant, generation: u64) -> bool {
        self.generation.load(Ordering::SeqCst) == generation
            && lock(&self.templates)
                .get(&(grant.caller.is_none(), grant.pair.key_id))
                .is_some_and(|i| i.peer == grant.peer)
    }

    /// Reads whether the policy in force has a rule whose selectors read executable
    /// labels (`tessera.io/exe`, `tessera.io/exe-sha256`): then no key is granted, since a
    /// key is per (cgroup, uid, destination), not per executable. Returns it.
    pub fn set_policy(&self, decisions: &Decisions) -> bool {
        let policy = decisions.policy();
        let process = [reserved::EXE, reserved::EXE_SHA256]
            .iter()
            .any(|k| policy.mentions_label(k));
        let was = self.process_labels.swap(process, Ordering::SeqCst);
        if process && !was {
            tracing::warn!(
                "fast path off: the policy has rules on executable labels (tessera.io/exe, tessera.io/exe-sha256), which a per-workload key cannot tell apart"
            );
        }
        process
    }

    /// Forgets the keys past their expiry: their templates, and their kernel entries
    /// (the client's only if it is still that key: a newer handshake may have replaced it).
    fn sweep(&self) {
        let mut client = lock(&self.client);
        let mut server = lock(&self.server);
        let mut templates = lock(&self.templates);
        *lock(&self.swept) = Instant::now();
        let now = Instant::now();
        let expired: Vec<_> = templates
            .iter()
            .filter(|(_, i)| i.until <= now)
            .map(|(k, i)| (*k, i.client))
            .collect();
        for ((at_server, key_id), c) in &expired {
            templates.remove(&(*at_server, *key_id));
            let _ = match c {
                Some(c) => match client.get(c, 0) {
                    Ok(k) if k.key_id == *key_id => client.remove(c),
                    _ => Ok(()),
                },
                None => server.remove(key_id),
            };
        }
        if !expired.is_empty() {
            tracing::debug!(
                swept = expired.len(),
                kept = templates.len(),
                "fast path keys expired"
            );
        }
    }

    /// A policy was replaced: each pair's full-handshake decision is taken again under it,
    /// and the keys of the pairs it no longer allows are forgotten at once (their next
    /// connection is refused at this end). Pairs still allowed keep their keys: a reload
    /// that does not concern them costs them nothing. Keys granted while this runs are not
    /// installed (`generation`).
    pub fn revoke_denied(&self, decisions: &Decisions) {
        let mut client = lock(&self.client);
        let mut server = lock(&self.server);
        self.generation.fetch_add(1, Ordering::SeqCst);
        let process = self.set_policy(decisions);
        let mut templates = lock(&self.templates);
        let denied: Vec<_> = templates
            .iter()
            .filter(|(_, i)| process || !decisions.check(&i.template.attempt).allowed)
            .map(|(k, i)| (*k, i.client))
            .collect();
        for ((at_server, key_id), c) in &denied {
            templates.remove(&(*at_server, *key_id));
            let _ = match c {
                Some(c) => client.remove(c),
                None => server.remove(key_id),
            };
        }
        tracing::info!(
            revoked = denied.len(),
            kept = templates.len(),
            "policy replaced: fast path keys of pairs it denies revoked"
        );
    }

    /// The directory is `directory`, the peers' certified keys `keys` (at start-up, and
    /// after every change: called once both are in force). The keys whose peer the change
    /// concerns are forgotten at once, at both ends ([`stale`]: the peer left, was revoked,
    /// re-keyed, has another scope, or no longer serves the other end's address); their
    /// pairs' next connection takes the full handshake under the new directory (a revoked
    /// peer's is refused there). Every other key stays: a change elsewhere in the fleet (a
    /// peer added, removed or renewed) costs this pair nothing. A renewal keeps the peer's
    /// key and scope, so its own pairs keep theirs too. Returns how many were revoked.
    pub fn directory_changed(
        &self,
        directory: &Directory,
        keys: &std::sync::RwLock<StdHashMap<String, KeyId>>,
    ) -> usize {
        let mut client = lock(&self.client);
        let mut server = lock(&self.server);
        let mut templates = lock(&self.templates);
        let mut peers = lock(&self.peers);
        let generation = directory.generation();
        let new = {
            let keys = keys.read().unwrap_or_else(|e| e.into_inner());
            standings(directory, &keys, generation, &peers)
        };
        let table = directory.table();
        let revoked: Vec<_> = templates
            .iter()
            .filter(|(_, i)| stale(&i.peer, i.remote, &peers, &new, &table))
            .map(|(k, i)| (*k, i.client))
            .collect();
        let mut by_peer: BTreeMap<&str, usize> = BTreeMap::new();
        for ((at_server, key_id), c) in &revoked {
            if let Some(i) = templates.get(&(*at_server, *key_id)) {
                *by_peer.entry(i.peer.name.as_str()).or_default() += 1;
            }
            let _ = match c {
                Some(c) => client.remove(c),
                None => server.remove(key_id),
            };
        }
        let changed: HashSet<_> = peers
            .iter()
            .filter(|(n, s)| new.get(*n).is_none_or(|now| now.since != s.since))
            .map(|(n, _)| n.clone())
            .collect();
        if !revoked.is_empty() || !changed.is_empty() {
            tracing::info!(
                revoked = revoked.len(),
                by_peer = ?by_peer,
                changed_peers = ?changed,
                kept = templates.len() - revoked.len(),
                "directory changed: the fast path keys of the peers it concerns revoked"
            );
        }
        for (k, _) in &revoked {
            templates.remove(k);
        }
        *peers = new;
        revoked.len()
    }

    /// A connection the kernel's fast path let through, as the live-connection watch takes
    /// it: recorded with its key's full handshake's decision (re-decided there if policy
    /// was replaced since). None for a key this run does not know.
    pub fn registered(&self, c: &FastConn) -> Option<Registered> {
        let (t, reason) = lock(&self.templates)
            .get(&(c.server == 1, c.key_id))
            .map(|i| (i.template.clone(), i.reason.clone()))?;
        let addr = |a: [u32; 4], port: u16| -> SocketAddr {
            let ip = if c.tuple.family == AF_INET {
                std::net::IpAddr::from(a[0].to_ne_bytes())
            } else {
                let mut b = [0u8; 16];
                for (i, w) in a.iter().enumerate() {
                    b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
                }
                std::net::IpAddr::from(b)
            };
            SocketAddr::new(ip, port)
        };
        let local = addr(c.tuple.local, c.tuple.local_port);
        let remote = addr(c.tuple.remote, c.tuple.remote_port);
        let (src, dst) = match t.attempt.side {
            tessera_proxy::authz::Side::Egress => (local, remote),
            _ => (remote, local),
        };
        let flow = t.flow.start_as(src, dst, now_ms(), reason);
        debug_assert!(matches!(
            flow.direction,
            Direction::Outbound | Direction::Inbound
        ));
        Some(Registered {
            local,
            remote,
            attempt: t.attempt.clone(),
            ruling: t.ruling.clone(),
            flow,
            at_ns: c.at_ns,
        })
    }
}

/// The client map's key of a client end's grant (None at the server end).
fn client_key(grant: &FastGrant) -> Option<FastClientKey> {
    let (cgroup_id, uid) = grant.caller?;
    let (addr, family) = kernel_addr(&grant.remote);
    Some(FastClientKey {
        cgroup_id,
        uid,
        family,
        port: grant.remote.port(),
        addr,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use tessera_policy::Labels;
    use tessera_proxy::peers::Member;

    use super::*;

    fn member(name: &str, net: &str, site: &str) -> Member {
        Member {
            name: name.into(),
            tunnel: Some("10.77.0.9:15008".parse().unwrap()),
            serves: vec![net.parse().unwrap()],
            scope: BTreeMap::from([("site".to_string(), site.to_string())]),
            workloads: vec![Labels::new([("app", "web")])],
        }
    }

    fn peer(name: &str, key: u8, directory: u64) -> FastPeer {
        FastPeer {
            name: name.into(),
            key: [key; 8],
            directory,
        }
    }

    fn keys(list: &[(&str, u8)]) -> StdHashMap<String, KeyId> {
        list.iter().map(|(n, k)| (n.to_string(), [*k; 8])).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_directory_change_makes_stale_only_the_keys_of_the_peer_it_concerns() {
        let a = member("host-a", "10.77.0.1/32", "paris");
        let c = member("host-c", "10.77.0.3/32", "paris");
        let d = Directory::managed([a.clone(), c.clone()]);
        let k = keys(&[("host-a", 1), ("host-c", 3)]);
        let old = standings(&d, &k, d.generation(), &Standings::new());
        let key_a = peer("host-a", 1, 0);
        let from_a = ip("10.77.0.1");
        let check = |d: &Directory, k: &StdHashMap<String, KeyId>| {
            let new = standings(d, k, d.generation(), &old);
            (
                stale(&key_a, from_a, &old, &new, &d.table()),
                stands(&key_a, &new),
            )
        };
        // Nothing changed; another peer added; another peer removed; another re-keyed:
        // host-a's key stands.
        assert_eq!(check(&d, &k), (false, true));
        d.replace([a.clone(), c.clone(), member("host-d", "10.77.0.4/32", "x")]);
        assert_eq!(
            check(&d, &keys(&[("host-a", 1), ("host-c", 3), ("host-d", 4)])),
            (false, true)
        );
        d.replace([a.clone()]);
        assert_eq!(check(&d, &keys(&[("host-a", 1)])), (false, true));
        d.replace([a.clone(), c.clone()]);
        assert_eq!(
            check(&d, &keys(&[("host-a", 1), ("host-c", 9)])),
            (false, true)
        );
        // host-a gone (removed or revoked), or without a certified key: stale.
        d.replace([c.clone()]);
        assert_eq!(check(&d, &keys(&[("host-c", 3)])), (true, false));
        d.replace([a.clone(), c.clone()]);
        assert_eq!(check(&d, &keys(&[("host-c", 3)])), (true, false));
        // Re-keyed (enrolled again), or in another scope: stale, and a handshake that
        // began before the change gets no key.
        assert_eq!(
            check(&d, &keys(&[("host-a", 2), ("host-c", 3)])),
            (true, false)
        );
        d.replace([member("host-a", "10.77.0.1/32", "london"), c.clone()]);
        assert_eq!(check(&d, &k), (true, false));
        // Serves other addresses: stale only if the pair's address is no longer its.
        let mut wider = a.clone();
        wider.serves.push("10.77.1.0/24".parse().unwrap());
        d.replace([wider, c.clone()]);
        assert!(!check(&d, &k).0);
        let mut moved = a.clone();
        moved.serves = vec!["10.77.1.0/24".parse().unwrap()];
        d.replace([moved, c.clone()]);
        assert!(check(&d, &k).0);
    }

    #[test]
    fn a_key_is_granted_only_with_a_peer_in_the_directory_since_before_its_handshake() {
        let d = Directory::managed([member("host-a", "10.77.0.1/32", "paris")]);
        let k = keys(&[("host-a", 1)]);
        let first = standings(&d, &k, d.generation(), &Standings::new());
        assert!(stands(&peer("host-a", 1, 0), &first));
        // Not a member, not under its key: no key.
        assert!(!stands(&peer("host-b", 1, 0), &first));
        assert!(!stands(&peer("host-a", 2, 0), &first));
        // A change elsewhere keeps host-a's standing (and its `since`).
        d.replace([
            member("host-a", "10.77.0.1/32", "paris"),
            member("host-c", "10.77.0.3/32", "paris"),
        ]);
        let k = keys(&[("host-a", 1), ("host-c", 3)]);
        let second = standings(&d, &k, d.generation(), &first);
        assert_eq!(second["host-a"].since, 0);
        assert_eq!(second["host-c"].since, 1);
        assert!(stands(&peer("host-a", 1, 0), &second));
        // host-a's scope changes at generation 2: a handshake begun before gets no key,
        // one begun after does.
        d.replace([
            member("host-a", "10.77.0.1/32", "london"),
            member("host-c", "10.77.0.3/32", "paris"),
        ]);
        let third = standings(&d, &k, d.generation(), &second);
        assert!(!stands(&peer("host-a", 1, 1), &third));
        assert!(stands(&peer("host-a", 1, 2), &third));
        // A static directory: every peer with a certified key, no scope.
        let fixed = Directory::fixed(
            PeerTable::new([(
                "10.77.0.2/32".parse().unwrap(),
                tessera_proxy::peers::Peer {
                    name: "host-b".into(),
                    tunnel: "10.77.0.2:15008".parse().unwrap(),
                },
            )]),
            Vec::new(),
        );
        let s = standings(&fixed, &keys(&[("host-b", 2)]), 0, &Standings::new());
        assert_eq!(s["host-b"].scope, None);
        assert!(stands(&peer("host-b", 2, 0), &s));
    }
}
