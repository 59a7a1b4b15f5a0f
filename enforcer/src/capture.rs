//! Loading, attaching and pinning the eBPF programs.
//!
//! Maps are pinned by name under `<pin_dir>/maps` and links under
//! `<pin_dir>/links/<generation>/`, so capture survives the enforcer: while no proxy listens,
//! a captured connect is refused (nothing listens on the outbound port) and a direct
//! connection to a protected port is dropped (`sk_lookup` finds no listener): fail closed.
//! A restarted enforcer reuses the pinned maps, attaches a new generation of links, then
//! removes the old one, so there is no moment without capture.
use std::{
    fs::{self, File},
    os::fd::{AsFd, AsRawFd},
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
    ClientKey, INBOUND_LISTENER_V4, INBOUND_LISTENER_V6, MODE_HANDSHAKE, MODE_TUNNEL, NonTcpAllow,
    NonTcpFlowCount, NonTcpFlowKey, NonTcpKey, OrigDst, Settings, names,
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
    /// Loads the eBPF object, configures its maps and attaches a new generation of links,
    /// then retires the previous run's links: capture never lapses. If attaching fails, the
    /// previous generation (if any) stays in force; without one, nothing is left behind.
    pub fn start(config: &Config) -> Result<Self> {
        // Before anything is touched: a build without the object changes nothing.
        let object = ebpf_object()?;
        ensure_bpffs()?;
        let pin_dir = config.pin_dir();
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        create_dir(&maps_dir)?;
        create_dir(&links_dir)?;
        let old_generations = pinned_generations(&pin_dir, &links_dir)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(object)
            .context("loading the eBPF object")?;
        write_settings(&mut ebpf, config)?;
        set_protected_ports(&mut ebpf, config)?;

        let generation = new_generation(&links_dir)?;
        let mut links = Vec::new();
        match Self::attach(&mut ebpf, config, &generation, &mut links) {
            Ok(()) => {}
            Err(e) => {
                // Leave things as they were: the previous generation (if any) stays in force.
                drop(links);
                remove_links(&generation);
                if old_generations.is_empty() {
                    drop(ebpf);
                    let _ = fs::remove_dir_all(&pin_dir);
                }
                return Err(e);
            }
        }
        // The new generation is in place: retire the old one.
        for old in old_generations {
            remove_links(&old);
        }
        Ok(Self {
            ebpf,
            pin_dir,
            links,
        })
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
    pub fn set_inbound_listeners(
        &mut self,
        v4: &TcpListener,
        v6: Option<&TcpListener>,
    ) -> Result<()> {
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

    /// The map where `sock_ops` leaves each redirected connection's original destination.
    pub fn take_client_map(&mut self) -> Result<HashMap<MapData, ClientKey, OrigDst>> {
        let map = self
            .ebpf
            .take_map(names::CLIENT_ORIG)
            .context("client map")?;
        Ok(HashMap::try_from(map)?)
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

    /// The ring buffer where `sock_ops` reports closed connections (handshake mode).
    pub fn take_closed_ring(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(names::CLOSED).context("closed ring")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Detaches everything and removes the pins, unless `keep`: then capture stays in force
    /// (failing closed) until an enforcer starts again.
    pub fn shutdown(self, keep: bool) {
        let Self {
            ebpf,
            pin_dir,
            links,
        } = self;
        if keep {
            tracing::info!(pin_dir = %pin_dir.display(), "leaving capture attached (fail closed until restart)");
            return;
        }
        for link in links {
            if let Err(e) = link.unpin() {
                tracing::warn!(error = %e, "cannot unpin a link");
            }
        }
        remove_links(&pin_dir.join("links"));
        drop(ebpf);
        let _ = fs::remove_dir_all(&pin_dir);
        tracing::info!(pin_dir = %pin_dir.display(), "capture detached and unpinned");
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

/// Writes the settings the programs read (ports, marks, delivery source, mode), marking
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
    Ok(())
}

/// Makes the (possibly pinned, reused) protected ports map hold exactly the workload ports
/// `sk_lookup` guards: removes stale ones first, then adds the wanted ones.
fn set_protected_ports(ebpf: &mut Ebpf, config: &Config) -> Result<()> {
    let mut ports: HashMap<_, u32, u32> = HashMap::try_from(
        ebpf.map_mut(names::PROTECTED_PORTS)
            .context("protected ports map")?,
    )?;
    // In handshake mode connections reach workload ports directly (the iptables rules
    // guard them), so sk_lookup steers nothing.
    let wanted: Vec<u32> = match config.mode() {
        DataPathMode::Tunnel => config
            .workloads
            .iter()
            .flat_map(|w| w.ports.iter().map(|&p| u32::from(p)))
            .collect(),
        DataPathMode::Handshake => Vec::new(),
    };
    let stale: Vec<u32> = ports
        .keys()
        .filter_map(Result::ok)
        .filter(|p| !wanted.contains(p))
        .collect();
    for p in stale {
        ports.remove(&p)?;
    }
    for &p in &wanted {
        ports.insert(p, 1, 0)?;
    }
    Ok(())
}

/// `BPF_CGROUP_SETSOCKOPT`, the attach type of `cgroup/setsockopt` programs.
const BPF_CGROUP_SETSOCKOPT: u32 = 22;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// Links `prog` to `cgroup` (`bpf_link_create`) and pins the link at `path`. (aya's
/// `CgroupSockopt` links cannot become pinnable `FdLink`s, so this one is made directly.)
fn link_and_pin(
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
