//! The handshake fast path, user-space half (issue 16 item 5; docs/handshake.md, "Fast
//! path"): turns it on in the kernel (settings, the tc verifier on the host's interfaces),
//! installs the pair secret each completed full handshake agrees, at both ends, and
//! revokes them all when policy is replaced.
//!
//! The kernel half (`ebpf/src/programs/fast.rs`) proves later connections of the same pair
//! with a SipHash tag in a TCP option and never asks user space; what it cannot prove goes
//! to the NFQUEUE engine as before.
use std::{
    net::SocketAddr,
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
use tessera_common::{
    AF_INET, AF_INET6,
    fast::{FastClientKey, FastConn, FastKey, FastServerEntry, FastSettings},
    names,
};
use tessera_proxy::{
    authz::{Attempt, Decisions, Ruling},
    flow::{Direction, FlowTemplate, now_ms},
    handshake::{engine::LiveConnection, fast::FastGrant},
    identity::reserved,
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
}

/// How often expired keys and their templates are swept (at a grant, at most).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Each installed key's decision and, at the client end, its map key, by (server end?,
/// key id).
/// By (server end?, key id): the decision, the client end's map key, and until when the
/// key can prove a connection (then the template and its kernel entry are swept).
type Templates = std::collections::HashMap<(bool, u32), (Template, Option<FastClientKey>, Instant)>;

/// A full handshake's decision, for the connections its pair secret proves later.
#[derive(Clone)]
pub struct Template {
    attempt: Attempt,
    ruling: Ruling,
    flow: FlowTemplate,
}

impl Template {
    /// The decision of the connection `live` (None once its record was written).
    pub fn of(live: &LiveConnection) -> Option<Self> {
        Some(Self {
            attempt: live.attempt.clone(),
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
            let client = client_key(&grant);
            if let Some(c) = client {
                // A new handshake of the same caller and destination replaces its key
                // (the kernel's entry is by caller and destination): its old template goes.
                templates.retain(|(at_server, _), (_, old, _)| *at_server || *old != Some(c));
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
            templates.insert(
                (grant.caller.is_none(), grant.pair.key_id),
                (template, client, until),
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
                if self.generation.load(Ordering::SeqCst) != generation {
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
                if self.generation.load(Ordering::SeqCst) != generation {
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
            .filter(|(_, (_, _, until))| *until <= now)
            .map(|(k, (_, c, _))| (*k, *c))
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
            .filter(|(_, (t, _, _))| process || !decisions.check(&t.attempt).allowed)
            .map(|(k, (_, c, _))| (*k, *c))
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

    /// The directory changed (a peer revoked, removed, or its certificate replaced): every
    /// key is forgotten at once, since a key outlives nothing its full handshake relied on.
    /// Each pair's next connection takes the full handshake again, under the new directory
    /// (a revoked peer's is refused there). Keys granted while this runs are not installed.
    pub fn revoke_all(&self) {
        let mut client = lock(&self.client);
        let mut server = lock(&self.server);
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut templates = lock(&self.templates);
        let revoked = templates.len();
        for ((_, key_id), (_, c, _)) in templates.drain() {
            let _ = match c {
                Some(c) => client.remove(&c),
                None => server.remove(&key_id),
            };
        }
        tracing::info!(
            revoked,
            "directory changed: every fast path key revoked (pairs take the full handshake again)"
        );
    }

    /// A connection the kernel's fast path let through, as the live-connection watch takes
    /// it: recorded with its key's full handshake's decision (re-decided there if policy
    /// was replaced since). None for a key this run does not know.
    pub fn registered(&self, c: &FastConn) -> Option<Registered> {
        let (t, _, _) = lock(&self.templates)
            .get(&(c.server == 1, c.key_id))
            .cloned()?;
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
        let how = format!("kernel fast path, key {:#010x}", c.key_id);
        let flow = t.flow.start(src, dst, now_ms(), &how);
        debug_assert!(matches!(
            flow.direction,
            Direction::Outbound | Direction::Inbound
        ));
        Some(Registered {
            conn: LiveConnection {
                local,
                remote,
                attempt: t.attempt,
                ruling: t.ruling,
                flow,
            },
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
