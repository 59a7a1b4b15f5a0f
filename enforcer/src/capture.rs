//! Loading, attaching and pinning the eBPF programs.
//!
//! Maps are pinned by name under `<pin_dir>/maps` and links under
//! `<pin_dir>/links/<generation>/`, so capture survives the enforcer: while no proxy listens,
//! a captured connect is refused (nothing listens on the outbound port) and a direct
//! connection to a protected port is dropped (`sk_lookup` finds no listener): fail closed.
//!
//! A start is in two steps, so that a start that fails leaves the previous run's capture
//! exactly as it was:
//! * [`Capture::prepare`] does everything that can fail: loads the object (reusing the
//!   pinned maps), loads the programs and attaches a new generation of links beside the
//!   previous one. The new links run the same programs on the same maps, with the settings
//!   and protected ports still the previous run's: nothing in force changes. Dropped
//!   without a commit, it takes its generation out again.
//! * [`Capture::commit`] puts the new run in force, in an order with no gap: the proxy's
//!   inbound listeners, then the protected ports to add, then the settings, then the ports
//!   to drop (so the protected set is never short of a port both runs protect), then the
//!   previous generation of links is retired.
use std::{
    fs::{self, File},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, RingBuf, SockMap, lpm_trie::LpmTrie},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        CgroupSockopt, SkLookup, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use tessera_common::{
    ClientKey, DeliveryKey, INBOUND_LISTENER_V4, INBOUND_LISTENER_V6, MODE_HANDSHAKE, MODE_TUNNEL,
    NonTcpAllow, NonTcpFlowCount, NonTcpFlowKey, NonTcpKey, OrigDst, PROTECTED_PORT_ENTRIES,
    Settings, names,
};
use tokio::net::TcpListener;

use crate::config::{Config, DataPathMode};

/// The eBPF object built from `ebpf/` by build.rs: the binary is self-contained.
#[cfg(feature = "embed")]
fn ebpf_object() -> Result<&'static [u8]> {
    static EBPF_OBJECT: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tessera-ebpf"));
    Ok(EBPF_OBJECT)
}

/// Built without the `embed` feature (the test harness's build): no eBPF object to load.
#[cfg(not(feature = "embed"))]
fn ebpf_object() -> Result<&'static [u8]> {
    Err(anyhow!(
        "this build has no eBPF object: built without the `embed` feature"
    ))
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_FS: &str = "/sys/fs/bpf";

pub struct Capture {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    links: Vec<PinnedLink>,
    /// Where this run's links are pinned.
    generation: PathBuf,
    /// The generations of links a previous run left, retired at [`Capture::commit`].
    old_generations: Vec<PathBuf>,
    /// The settings a previous run left in force (None: none, or not ready).
    previous: Option<Settings>,
    /// Set by [`Capture::commit`]; until then, dropping undoes [`Capture::prepare`].
    committed: bool,
}

/// Mounts bpffs at /sys/fs/bpf unless it is there already.
fn ensure_bpffs() -> Result<()> {
    let mounted = nix::sys::statfs::statfs(BPF_FS)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if !mounted {
        fs::create_dir_all(BPF_FS).ok();
        nix::mount::mount(
            Some("bpf"),
            BPF_FS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("cannot mount bpffs at {BPF_FS}"))?;
    }
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("eBPF object has no program {name}"))?;
    prog.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

fn pin(link: FdLink, path: &Path) -> Result<PinnedLink> {
    link.pin(path)
        .with_context(|| format!("cannot pin link at {}", path.display()))
}

impl Capture {
    /// Loads the eBPF object (reusing the pinned maps) and its programs and attaches a new
    /// generation of links beside the previous run's: everything that can fail, with nothing
    /// in force changed (the maps' contents are the previous run's until
    /// [`Capture::commit`]). If it fails, or the result is dropped uncommitted, the new
    /// generation is taken out again; without a previous run, nothing is left behind.
    pub fn prepare(config: &Config) -> Result<Self> {
        // Before anything is touched: a build without the object changes nothing.
        let object = ebpf_object()?;
        ensure_bpffs()?;
        let pin_dir = config.pin_dir();
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        create_dir(&maps_dir)?;
        create_dir(&links_dir)?;
        let old_generations = pinned_generations(&pin_dir, &links_dir)?;
        let fresh = || {
            if old_generations.is_empty() {
                let _ = fs::remove_dir_all(&pin_dir);
            }
        };
        replace_changed_maps(&maps_dir)?;
        let loaded = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(object)
            .context("loading the eBPF object");
        let mut ebpf = match loaded {
            Ok(ebpf) => ebpf,
            Err(e) => {
                fresh();
                return Err(e);
            }
        };
        let checked = previous_settings(&mut ebpf)
            .and_then(|previous| check_port_room(&mut ebpf, config).map(|()| previous));
        let previous = match checked {
            Ok(p) => p,
            Err(e) => {
                drop(ebpf);
                fresh();
                return Err(e);
            }
        };
        let generation = match new_generation(&links_dir) {
            Ok(g) => g,
            Err(e) => {
                drop(ebpf);
                fresh();
                return Err(e);
            }
        };
        // From here on, dropping `capture` undoes what was made.
        let mut capture = Self {
            ebpf,
            pin_dir,
            links: Vec::new(),
            generation,
            old_generations,
            previous,
            committed: false,
        };
        let mut links = Vec::new();
        let attached = Self::attach(&mut capture.ebpf, config, &capture.generation, &mut links);
        capture.links = links;
        attached?;
        Ok(capture)
    }

    /// The mode the previous run left in force, if one did.
    pub fn previous_mode(&self) -> Option<DataPathMode> {
        self.previous.map(|s| {
            if s.mode == MODE_HANDSHAKE {
                DataPathMode::Handshake
            } else {
                DataPathMode::Tunnel
            }
        })
    }

    /// Puts this run in force: the proxy's inbound listeners (tunnel mode) into the sockmap
    /// `sk_lookup` steers to, the protected ports this run adds, the settings, then the
    /// removal of the ports it no longer protects, then the previous generation of links is
    /// retired. At no point is a port both runs protect unprotected. In handshake mode the
    /// caller puts the iptables rules in force first: only then are the protected ports
    /// emptied.
    pub fn commit(
        &mut self,
        config: &Config,
        inbound: Option<(&TcpListener, Option<&TcpListener>)>,
    ) -> Result<()> {
        if let Some((v4, v6)) = inbound {
            self.set_inbound_listeners(v4, v6)?;
        }
        let wanted = wanted_ports(config);
        {
            let mut ports = protected_ports(&mut self.ebpf)?;
            for &p in &wanted {
                ports
                    .insert(p, 1, 0)
                    .with_context(|| format!("protecting port {p}"))?;
            }
        }
        write_settings(&mut self.ebpf, config)?;
        {
            let mut ports = protected_ports(&mut self.ebpf)?;
            let stale: Vec<u32> = ports
                .keys()
                .filter_map(Result::ok)
                .filter(|p| !wanted.contains(p))
                .collect();
            for p in stale {
                ports
                    .remove(&p)
                    .with_context(|| format!("unprotecting port {p}"))?;
            }
        }
        self.committed = true;
        // The new generation is in force: retire the old one.
        for old in std::mem::take(&mut self.old_generations) {
            remove_links(&old);
        }
        Ok(())
    }

    /// Loads the programs and attaches them (each workload's cgroup, then the network
    /// namespace), pinning each link under `generation`. On error, `links` holds the links
    /// made so far, for the caller to undo.
    fn attach(
        ebpf: &mut Ebpf,
        config: &Config,
        generation: &Path,
        links: &mut Vec<PinnedLink>,
    ) -> Result<()> {
        for name in [names::PROG_CONNECT4, names::PROG_CONNECT6] {
            program::<CgroupSockAddr>(ebpf, name)?
                .load()
                .with_context(|| format!("loading {name}"))?;
        }
        program::<SockOps>(ebpf, names::PROG_SOCKOPS)?
            .load()
            .context("loading sock_ops")?;
        program::<SkLookup>(ebpf, names::PROG_SK_LOOKUP)?
            .load()
            .context("loading sk_lookup")?;
        program::<SkLookup>(ebpf, names::PROG_GUARD_ADOPTED)?
            .load()
            .context("loading the guard of workloads' own networks")?;
        program::<CgroupSockopt>(ebpf, names::PROG_SETSOCKOPT)?
            .load()
            .context("loading the setsockopt guard")?;
        program::<CgroupSock>(ebpf, names::PROG_SOCK_CREATE)?
            .load()
            .context("loading the socket-creation guard")?;
        for name in [names::PROG_EGRESS, names::PROG_INGRESS] {
            program::<CgroupSkb>(ebpf, name)?
                .load()
                .with_context(|| format!("loading {name}"))?;
        }

        // Links (bpf_link_create) always allow other programs beside ours on the cgroup;
        // `Single` only means "no legacy attach flags".
        for w in &config.workloads {
            let cgroup = File::open(&w.cgroup).with_context(|| {
                format!("workload {}: cannot open {}", w.name, w.cgroup.display())
            })?;
            for name in [names::PROG_CONNECT4, names::PROG_CONNECT6] {
                let prog = program::<CgroupSockAddr>(ebpf, name)?;
                let id = prog
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .with_context(|| {
                        format!(
                            "workload {}: attaching {name} to {}",
                            w.name,
                            w.cgroup.display()
                        )
                    })?;
                let link: FdLink = prog.take_link(id)?.try_into()?;
                links.push(pin(link, &generation.join(format!("{}_{name}", w.name)))?);
            }
            let prog = program::<SockOps>(ebpf, names::PROG_SOCKOPS)?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| {
                    format!(
                        "workload {}: attaching sock_ops to {}",
                        w.name,
                        w.cgroup.display()
                    )
                })?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            links.push(pin(
                link,
                &generation.join(format!("{}_{}", w.name, names::PROG_SOCKOPS)),
            )?);
            // A workload must not forge the proxy's mark (or packet headers).
            let prog = program::<CgroupSockopt>(ebpf, names::PROG_SETSOCKOPT)?;
            let path = generation.join(format!("{}_{}", w.name, names::PROG_SETSOCKOPT));
            links.push(
                link_and_pin(prog.fd()?.as_fd(), &cgroup, BPF_CGROUP_SETSOCKOPT, &path)
                    .with_context(|| {
                        format!(
                            "workload {}: attaching the setsockopt guard to {}",
                            w.name,
                            w.cgroup.display()
                        )
                    })?,
            );
            // Raw and ICMP sockets, and every packet that is not TCP: default deny.
            let attaching = |what: &str| {
                format!(
                    "workload {}: attaching {what} to {}",
                    w.name,
                    w.cgroup.display()
                )
            };
            let prog = program::<CgroupSock>(ebpf, names::PROG_SOCK_CREATE)?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| attaching(names::PROG_SOCK_CREATE))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            links.push(pin(
                link,
                &generation.join(format!("{}_{}", w.name, names::PROG_SOCK_CREATE)),
            )?);
            for (name, attach_type) in [
                (names::PROG_EGRESS, CgroupSkbAttachType::Egress),
                (names::PROG_INGRESS, CgroupSkbAttachType::Ingress),
            ] {
                let prog = program::<CgroupSkb>(ebpf, name)?;
                let id = prog
                    .attach(&cgroup, attach_type, CgroupAttachMode::Single)
                    .with_context(|| attaching(name))?;
                let link: FdLink = prog.take_link(id)?.try_into()?;
                links.push(pin(link, &generation.join(format!("{}_{name}", w.name)))?);
            }
        }

        let netns = File::open(&config.bpf.netns)
            .with_context(|| format!("bpf.netns: cannot open {}", config.bpf.netns.display()))?;
        let prog = program::<SkLookup>(ebpf, names::PROG_SK_LOOKUP)?;
        let id = prog
            .attach(&netns)
            .context("attaching sk_lookup to the network namespace")?;
        let link: FdLink = prog.take_link(id)?.into();
        links.push(pin(link, &generation.join(names::PROG_SK_LOOKUP))?);
        Ok(())
    }

    /// Puts the proxy's inbound (direct) listeners into the sockmap `sk_lookup` steers to.
    fn set_inbound_listeners(&mut self, v4: &TcpListener, v6: Option<&TcpListener>) -> Result<()> {
        let mut map: SockMap<_> = SockMap::try_from(
            self.ebpf
                .map_mut(names::INBOUND_LISTENER)
                .context("listener map")?,
        )?;
        map.set(INBOUND_LISTENER_V4, &v4.as_raw_fd(), 0)
            .context("registering the IPv4 inbound listener")?;
        if let Some(v6) = v6 {
            map.set(INBOUND_LISTENER_V6, &v6.as_raw_fd(), 0)
                .context("registering the IPv6 inbound listener")?;
        }
        Ok(())
    }

    /// What serving workloads with a network namespace of their own takes (tunnel mode):
    /// the map of the namespaces served (whose entries a previous run left stay until the
    /// workloads are reported again: their connects fail meanwhile, no listener of ours
    /// waits there), and the inbound guard each such namespace gets.
    pub fn take_adopted(&mut self) -> Result<(HashMap<MapData, u64, u32>, OwnedFd)> {
        let map = self
            .ebpf
            .take_map(names::ADOPTED_NETNS)
            .context("adopted namespaces map")?;
        let guard = program::<SkLookup>(&mut self.ebpf, names::PROG_GUARD_ADOPTED)?
            .fd()?
            .as_fd()
            .try_clone_to_owned()
            .context("the guard program's descriptor")?;
        Ok((HashMap::try_from(map)?, guard))
    }

    /// The map where `sock_ops` leaves each redirected connection's original destination.
    pub fn take_client_map(&mut self) -> Result<HashMap<MapData, ClientKey, OrigDst>> {
        let map = self
            .ebpf
            .take_map(names::CLIENT_ORIG)
            .context("client map")?;
        Ok(HashMap::try_from(map)?)
    }

    /// The map where the proxy registers its deliveries for `sk_lookup` to let through,
    /// emptied: an entry a previous run left (it died mid-connect) would let through
    /// whoever binds that address and port now.
    pub fn take_delivery_map(&mut self) -> Result<HashMap<MapData, DeliveryKey, u32>> {
        let map = self
            .ebpf
            .take_map(names::DELIVERY)
            .context("delivery map")?;
        let mut map: HashMap<MapData, DeliveryKey, u32> = HashMap::try_from(map)?;
        let stale: Vec<DeliveryKey> = map.keys().filter_map(Result::ok).collect();
        for key in &stale {
            map.remove(key)
                .context("forgetting a previous run's delivery")?;
        }
        if !stale.is_empty() {
            tracing::info!(
                count = stale.len(),
                "forgot the deliveries of a previous run"
            );
        }
        Ok(map)
    }

    /// The non-TCP maps: allow entries, workload flags, flow counters.
    #[allow(clippy::type_complexity)]
    pub fn take_nontcp_maps(
        &mut self,
    ) -> Result<(
        LpmTrie<MapData, NonTcpKey, NonTcpAllow>,
        HashMap<MapData, u64, u32>,
        HashMap<MapData, NonTcpFlowKey, NonTcpFlowCount>,
    )> {
        let allow = self
            .ebpf
            .take_map(names::NONTCP_ALLOW)
            .context("non-TCP allow map")?;
        let workloads = self
            .ebpf
            .take_map(names::NONTCP_WORKLOADS)
            .context("non-TCP workloads map")?;
        let flows = self
            .ebpf
            .take_map(names::NONTCP_FLOWS)
            .context("non-TCP flows map")?;
        Ok((
            LpmTrie::try_from(allow)?,
            HashMap::try_from(workloads)?,
            HashMap::try_from(flows)?,
        ))
    }

    /// The loaded object, for the handshake fast path's maps and tc program
    /// (`handshake::fast`).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The ring buffer where `sock_ops` reports closed connections (handshake mode).
    pub fn take_closed_ring(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(names::CLOSED).context("closed ring")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Detaches everything and removes the pins, unless `keep`: then capture stays in force
    /// (failing closed) until an enforcer starts again.
    pub fn shutdown(mut self, keep: bool) {
        // What shutdown decides, the drop does not undo.
        self.committed = true;
        let pin_dir = self.pin_dir.clone();
        if keep {
            tracing::info!(pin_dir = %pin_dir.display(), "leaving capture attached (fail closed until restart)");
            return;
        }
        for link in std::mem::take(&mut self.links) {
            if let Err(e) = link.unpin() {
                tracing::warn!(error = %e, "cannot unpin a link");
            }
        }
        remove_links(&pin_dir.join("links"));
        drop(self);
        let _ = fs::remove_dir_all(&pin_dir);
        tracing::info!(pin_dir = %pin_dir.display(), "capture detached and unpinned");
    }
}

impl Drop for Capture {
    /// A capture prepared but never committed (a start that failed later): its generation
    /// of links goes, and the previous one stays in force as it was; without a previous
    /// one, nothing is left behind.
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        self.links.clear();
        remove_links(&self.generation);
        if self.old_generations.is_empty() {
            let _ = fs::remove_dir_all(&self.pin_dir);
        }
        tracing::info!(
            pin_dir = %self.pin_dir.display(),
            "start-up did not complete: the previous capture (if any) stays in force as it was"
        );
    }
}

/// Creates `dir` (and its parents) unless it exists.
fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// The generations of links a previous run left pinned under `links_dir` (to be retired
/// once the new one is attached).
fn pinned_generations(pin_dir: &Path, links_dir: &Path) -> Result<Vec<PathBuf>> {
    let old_generations: Vec<PathBuf> = fs::read_dir(links_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    if !old_generations.is_empty() {
        tracing::info!(pin_dir = %pin_dir.display(), "taking over capture pinned by a previous run");
    }
    Ok(old_generations)
}

/// Writes the settings the programs read (ports, marks, mode), marking
/// them ready.
fn write_settings(ebpf: &mut Ebpf, config: &Config) -> Result<()> {
    let settings = Settings {
        outbound_port: config.listen.outbound_port,
        _pad0: 0,
        proxy_mark: config.bpf.proxy_mark,
        delivery_src4: u32::from_ne_bytes(config.bpf.delivery_source.octets()),
        ready: 1,
        mode: match config.mode() {
            DataPathMode::Tunnel => MODE_TUNNEL,
            DataPathMode::Handshake => MODE_HANDSHAKE,
        },
        handshake_mark: config.handshake.socket_mark,
        // The proxy runs in this process. (Inside a pid namespace of its own this is not
        // the pid eBPF sees, and the enforcer's sockets would be captured should it share
        // an enrolled cgroup: fail closed.)
        proxy_tgid: std::process::id(),
    };
    let mut settings_map: Array<_, Settings> =
        Array::try_from(ebpf.map_mut(names::SETTINGS).context("settings map")?)?;
    settings_map
        .set(0, settings, 0)
        .context("writing eBPF settings")?;
    let mut netns: Array<_, u64> =
        Array::try_from(ebpf.map_mut(names::HOST_NETNS).context("netns map")?)?;
    netns
        .set(0, own_netns_cookie()?, 0)
        .context("writing the enforcer's network namespace")?;
    Ok(())
}

/// The cookie of the network namespace this process (and so its proxy) is in.
pub fn own_netns_cookie() -> Result<u64> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .context("a socket to read the network namespace's cookie")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a u64.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 || cookie == 0 {
        anyhow::bail!(
            "reading the network namespace's cookie (SO_NETNS_COOKIE): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(cookie)
}

/// The protected ports map (pinned, so possibly a previous run's, in force).
fn protected_ports(ebpf: &mut Ebpf) -> Result<HashMap<&mut MapData, u32, u32>> {
    Ok(HashMap::try_from(
        ebpf.map_mut(names::PROTECTED_PORTS)
            .context("protected ports map")?,
    )?)
}

/// The workload ports `sk_lookup` is to guard, in both modes: in tunnel mode it steers
/// connections to them to the inbound proxy; in handshake mode it guards only connections
/// made on this host over `lo` (iptables guards the others) and lets none through (the
/// proxy delivers nothing there).
fn wanted_ports(config: &Config) -> Vec<u32> {
    config
        .workloads
        .iter()
        .flat_map(|w| w.ports.iter().map(|&p| u32::from(p)))
        .collect()
}

/// The commit adds ports before it removes any: both runs' ports must fit the map at once.
fn check_port_room(ebpf: &mut Ebpf, config: &Config) -> Result<()> {
    let ports = protected_ports(ebpf)?;
    let mut all: Vec<u32> = ports.keys().filter_map(Result::ok).collect();
    all.extend(wanted_ports(config));
    all.sort_unstable();
    all.dedup();
    if all.len() > PROTECTED_PORT_ENTRIES as usize {
        anyhow::bail!(
            "workload ports: the {} ports protected now and those configured exceed the {PROTECTED_PORT_ENTRIES} \
             the map holds; stop the enforcer without --keep-attached first",
            all.len()
        );
    }
    Ok(())
}

/// Unpins a previous version's pinned maps whose layout this version changed (the loader
/// would reuse a pin whatever its key and value sizes, and the programs would then read
/// part of each key): the new run makes them afresh. The previous run's programs keep
/// theirs until they are taken off; a connection captured in between has no record here
/// and is refused (fail closed).
fn replace_changed_maps(maps_dir: &Path) -> Result<()> {
    let expected = [(
        names::CLIENT_ORIG,
        std::mem::size_of::<ClientKey>(),
        std::mem::size_of::<OrigDst>(),
    )];
    for (name, key, value) in expected {
        let pin = maps_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let info = aya::maps::MapData::from_pin(&pin)
            .and_then(|m| m.info())
            .with_context(|| format!("reading the pinned map {}", pin.display()))?;
        if (info.key_size() as usize, info.value_size() as usize) != (key, value) {
            tracing::warn!(
                map = name,
                pinned_key = info.key_size(),
                key,
                "a pinned map of another layout (an earlier version): made afresh"
            );
            fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
        }
    }
    Ok(())
}

/// The settings a previous run wrote (pinned), if it did.
fn previous_settings(ebpf: &mut Ebpf) -> Result<Option<Settings>> {
    let settings_map: Array<_, Settings> =
        Array::try_from(ebpf.map_mut(names::SETTINGS).context("settings map")?)?;
    let s = settings_map.get(&0, 0).context("reading eBPF settings")?;
    Ok((s.ready == 1).then_some(s))
}

/// `BPF_CGROUP_SETSOCKOPT`, the attach type of `cgroup/setsockopt` programs.
const BPF_CGROUP_SETSOCKOPT: u32 = 22;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// Links `prog` to `cgroup` (`bpf_link_create`) and pins the link at `path`. (aya's
/// `CgroupSockopt` links cannot become pinnable `FdLink`s, so this one is made directly.)
/// `BPF_SK_LOOKUP`, the attach type of `sk_lookup` programs (on a network namespace).
pub const BPF_SK_LOOKUP: u32 = 36;

/// Attaches `prog` to `target` (a cgroup or network namespace) as `attach_type` through a
/// link, pinned at `path`.
pub fn link_and_pin(
    prog: std::os::fd::BorrowedFd<'_>,
    cgroup: &File,
    attach_type: u32,
    path: &Path,
) -> Result<PinnedLink> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // union bpf_attr, link_create: prog_fd, target_fd, attach_type, flags; the rest zero.
    let mut attr = [0u32; 16];
    attr[0] = prog.as_raw_fd() as u32;
    attr[1] = cgroup.as_raw_fd() as u32;
    attr[2] = attach_type;
    // SAFETY: the bpf syscall reads `size_of_val(&attr)` bytes of `attr`, which lives.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("bpf_link_create");
    }
    // SAFETY: the syscall returned a new file descriptor that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .context("a link path with a NUL byte")?;
    // union bpf_attr, obj_pin: pathname (u64), bpf_fd, file_flags; the rest zero.
    let mut attr = [0u64; 8];
    attr[0] = c_path.as_ptr() as u64;
    attr[1] = link.as_raw_fd() as u64;
    // SAFETY: as above; `c_path` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot pin link at {}", path.display()));
    }
    PinnedLink::from_pin(path)
        .with_context(|| format!("cannot open pinned link {}", path.display()))
}

/// Creates the directory for a new generation of links under `links_dir`, named by the
/// time now (ns).
fn new_generation(links_dir: &Path) -> Result<PathBuf> {
    let generation = links_dir.join(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            .to_string(),
    );
    fs::create_dir_all(&generation)?;
    Ok(generation)
}

/// Takes off the capture a stopped enforcer left pinned in `pin_dir` (`--keep-attached`):
/// its links (detaching the programs), then its maps. `None`: nothing was pinned there.
pub fn remove_pinned(pin_dir: &Path) -> Result<Option<PathBuf>> {
    if !pin_dir.exists() {
        return Ok(None);
    }
    remove_links(&pin_dir.join("links"));
    fs::remove_dir_all(pin_dir).with_context(|| format!("cannot remove {}", pin_dir.display()))?;
    Ok(Some(pin_dir.to_path_buf()))
}

/// Unpins (and so detaches) every link pinned under `dir`, then removes it.
fn remove_links(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            remove_links(&path);
            continue;
        }
        match PinnedLink::from_pin(&path) {
            Ok(link) => drop(link.unpin()),
            Err(_) => drop(fs::remove_file(&path)),
        }
    }
    let _ = fs::remove_dir(dir);
}
