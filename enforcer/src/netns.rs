//! Serving workloads that have a network namespace of their own: a pod, a container on a
//! bridge. Their connects are captured like the host's (the eBPF programs sit on their
//! cgroups), but the rewritten connect lands on *their* loopback, and a packet they send
//! never passes the host's rules. So, in tunnel mode, the enforcer goes to them, as Istio's
//! in-pod ztunnel does:
//!
//! * **Outbound**: a listener of the proxy's (with its mark) on 127.0.0.1 and ::1 at the
//!   outbound port *inside* the namespace, which the connect hooks check for as they do on
//!   the host; the namespace's cookie goes in `TESSERA_ADOPTED_NETNS` only once that
//!   listener serves, and capture records are keyed by namespace too (two pods' loopback
//!   addresses are the same numbers).
//! * **Inbound**: `guard_adopted` (`sk_lookup`, attached to the namespace, pinned so that it
//!   outlives a restart) drops any connection to a protected port that does not come over
//!   the namespace's loopback; the proxy delivers what its tunnels carry from inside the
//!   namespace ([`tessera_proxy::delivery::Namespaces`]), over that loopback.
//!
//! Sockets belong to the namespace of the thread that makes them, so each namespace served
//! has a thread of its own ([`Worker`]) that has entered it (`setns`, which takes
//! CAP_SYS_ADMIN) and makes its sockets on request. Several workloads may share a namespace
//! (a pod's containers): it is served while any of them is enrolled.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use socket2::{Domain, Socket, Type};
use tessera_proxy::{delivery::Namespaces, outbound::Outbound};

use crate::sources::dynamic::Networks;

type Job = Box<dyn FnOnce() + Send>;

/// A thread that has entered one network namespace and makes sockets there.
struct Worker {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Worker {
    fn start(ns: File, what: &str) -> io::Result<Worker> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready, entered) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(format!("netns {what}"))
            // It makes sockets and nothing else.
            .stack_size(128 * 1024)
            .spawn(move || {
                let entered = nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from);
                let ok = entered.is_ok();
                let _ = ready.send(entered);
                drop(ns);
                if ok {
                    // Ends when the namespace is no longer served (the sender dropped).
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })?;
        entered
            .recv()
            .map_err(|_| io::Error::other("the namespace's thread ended"))?
            .map_err(|e| {
                let hint = if e.kind() == io::ErrorKind::PermissionDenied {
                    " (setns needs CAP_SYS_ADMIN)"
                } else {
                    ""
                };
                io::Error::new(e.kind(), format!("entering it{hint}: {e}"))
            })?;
        Ok(Worker {
            jobs: Mutex::new(jobs),
        })
    }

    /// Runs `f` in the namespace and waits for its result.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .lock()
            .expect("lock")
            .send(job)
            .map_err(|_| io::Error::other("the namespace's thread ended"))?;
        rx.recv()
            .map_err(|_| io::Error::other("the namespace's thread ended"))
    }
}

/// What is made in a namespace when it is first served.
struct Opened {
    v4: std::net::TcpListener,
    v6: Option<std::net::TcpListener>,
    cookie: u64,
    addrs: Vec<IpAddr>,
}

/// Runs in the namespace: the proxy's outbound listeners there, its cookie, its addresses.
fn open(port: u16, mark: u32) -> io::Result<Opened> {
    let v4_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let v4 = tessera_proxy::socket::listen_std(v4_addr, mark)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {v4_addr}: {e}")))?;
    // Without IPv6 there (or ::1 down) its IPv6 connects find no listener of ours and fail.
    let v6 = tessera_proxy::socket::listen_std(
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
        mark,
    )
    .ok();
    let cookie = netns_cookie(&Socket::from(v4.try_clone()?))?;
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(io::Error::from)?
        .filter_map(|i| {
            let a = i.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| !ip.is_loopback() && !is_link_local(ip))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    Ok(Opened {
        v4,
        v6,
        cookie,
        addrs,
    })
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// The cookie of the network namespace `socket` is in.
fn netns_cookie(socket: &Socket) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a u64.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// One namespace served.
struct Served {
    /// The namespace file's inode: a restarted container gets a new namespace.
    inode: u64,
    cookie: u64,
    keys: HashSet<String>,
    worker: Arc<Worker>,
    addrs: Vec<IpAddr>,
    listeners: Vec<tokio::task::AbortHandle>,
    pin: PathBuf,
}

#[derive(Default)]
struct State {
    by_inode: HashMap<u64, Served>,
    by_key: HashMap<String, u64>,
}

/// The namespaces of workloads with a network of their own that this enforcer serves.
pub struct Adopted {
    port: u16,
    mark: u32,
    map: Mutex<BpfHashMap<MapData, u64, u32>>,
    guard: OwnedFd,
    pins: PathBuf,
    outbound: Arc<Outbound>,
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
    /// Held through one adoption.
    setup: Mutex<()>,
}

impl Adopted {
    /// Serves namespaces with listeners at `port` (marked `mark`) handing their connections
    /// to `outbound`; guard links are pinned under `pins`.
    pub fn new(
        port: u16,
        mark: u32,
        (map, guard): (BpfHashMap<MapData, u64, u32>, OwnedFd),
        pins: PathBuf,
        outbound: Arc<Outbound>,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&pins)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", pins.display()))?;
        // A previous run's namespaces: no listener of ours waits in them any more (their
        // connects failed meanwhile); each is served again when its workload is reported.
        let mut map = map;
        let stale: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for cookie in &stale {
            let _ = map.remove(cookie);
        }
        if !stale.is_empty() {
            tracing::info!(
                namespaces = stale.len(),
                "forgot the namespaces a previous run served"
            );
        }
        let swept = sweep_gone(&pins);
        if swept > 0 {
            tracing::info!(
                guards = swept,
                "removed the pinned guards of namespaces that are gone"
            );
        }
        Ok(Arc::new(Self {
            port,
            mark,
            map: Mutex::new(map),
            guard,
            pins,
            outbound,
            runtime,
            state: Mutex::default(),
            setup: Mutex::default(),
        }))
    }

    /// How many namespaces are served.
    pub fn len(&self) -> usize {
        self.state.lock().expect("lock").by_inode.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Serves the namespace in `ns` (inode `inode`) for the first time.
    fn serve(&self, ns: File, inode: u64, key: &str) -> Result<Served, String> {
        let guard_ns = ns.try_clone().map_err(|e| e.to_string())?;
        let worker = Worker::start(ns, key).map_err(|e| e.to_string())?;
        let (port, mark) = (self.port, self.mark);
        let opened = worker
            .run(move || open(port, mark))
            .and_then(|r| r)
            .map_err(|e| format!("in its network namespace: {e}"))?;
        // The inbound guard first: its served ports are closed to everything but the
        // namespace's loopback before anything of ours runs there.
        let pin = self.pins.join(opened.cookie.to_string());
        // (bpffs refuses names with a dot.)
        let fresh = self.pins.join(format!("{}-new", opened.cookie));
        let _ = std::fs::remove_file(&fresh);
        crate::capture::link_and_pin(
            self.guard.as_fd(),
            &guard_ns,
            crate::capture::BPF_SK_LOOKUP,
            &fresh,
        )
        .map_err(|e| format!("attaching its inbound guard: {e:#}"))?;
        // Replaces a previous run's link (which then detaches) without a gap.
        std::fs::rename(&fresh, &pin).map_err(|e| {
            let _ = std::fs::remove_file(&fresh);
            format!("pinning its inbound guard at {}: {e}", pin.display())
        })?;
        let mut listeners = Vec::new();
        let _entered = self.runtime.enter();
        for l in std::iter::once(opened.v4).chain(opened.v6) {
            let listener = match tokio::net::TcpListener::from_std(l) {
                Ok(l) => l,
                Err(e) => {
                    listeners.iter().for_each(tokio::task::AbortHandle::abort);
                    let _ = std::fs::remove_file(&pin);
                    return Err(format!("its listener: {e}"));
                }
            };
            let outbound = self.outbound.clone();
            let cookie = opened.cookie;
            listeners.push(
                self.runtime
                    .spawn(async move {
                        if let Err(e) = outbound.serve_in(listener, Some(cookie)).await {
                            tracing::warn!(netns = cookie, error = %e, "outbound listener in a workload's namespace ended");
                        }
                    })
                    .abort_handle(),
            );
        }
        // Only now may its connects be captured: our listener waits there.
        if let Err(e) = self.map.lock().expect("lock").insert(opened.cookie, 1, 0) {
            listeners.iter().for_each(tokio::task::AbortHandle::abort);
            let _ = std::fs::remove_file(&pin);
            return Err(format!(
                "registering it for capture (at most {} namespaces): {e}",
                tessera_common::ADOPTED_NETNS_ENTRIES
            ));
        }
        tracing::info!(
            workload = key,
            netns = opened.cookie,
            addresses = ?opened.addrs,
            "serving a workload's own network namespace"
        );
        Ok(Served {
            inode,
            cookie: opened.cookie,
            keys: HashSet::new(),
            worker: Arc::new(worker),
            addrs: opened.addrs,
            listeners,
            pin,
        })
    }

    /// Stops serving a namespace: capture there fails from now on (no listener of ours).
    fn unserve(&self, served: Served) {
        let _ = self.map.lock().expect("lock").remove(&served.cookie);
        served
            .listeners
            .iter()
            .for_each(tokio::task::AbortHandle::abort);
        let _ = std::fs::remove_file(&served.pin);
        tracing::info!(
            netns = served.cookie,
            "no longer serving a workload's network namespace"
        );
    }
}

/// Removes the pins of guard links whose namespace is gone (it ended while no enforcer ran:
/// the kernel detached the link, but its pin would stay for ever) and half-made pins of an
/// interrupted adoption. The guards of namespaces that still exist stay, refusing as
/// before, until their workloads are reported and served again. How many were removed.
fn sweep_gone(pins: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(pins) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let half_made = path.to_string_lossy().ends_with("-new");
        let gone = half_made
            || match pinned_netns_link(&path) {
                Ok(Some(0)) => true,
                Ok(_) => false,
                Err(e) => {
                    tracing::warn!(pin = %path.display(), error = %e, "cannot read a pinned guard link");
                    false
                }
            };
        if gone && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The namespace inode a pinned network-namespace link is attached to (`Some(0)`: its
/// namespace is gone, the link detached), or `None` if the pin is another kind of link.
fn pinned_netns_link(path: &Path) -> io::Result<Option<u32>> {
    use std::os::fd::FromRawFd;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_NETNS: u32 = 5;
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // union bpf_attr, obj_get: pathname (u64), bpf_fd, file_flags; the rest zero.
    let attr = [c_path.as_ptr() as u64, 0, 0, 0];
    // SAFETY: the bpf syscall reads `size_of_val(&attr)` bytes of `attr`; `c_path` lives.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id (u32 each), then a union aligned to 8 whose
    // `netns` member is netns_ino, attach_type (u32 each).
    let mut info = [0u32; 16];
    // union bpf_attr, info: bpf_fd (u32), info_len (u32), info (u64); the rest zero.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
        rest: [u64; 2],
    }
    let attr = InfoAttr {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&link) as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
        rest: [0; 2],
    };
    // SAFETY: the kernel writes at most info_len bytes into `info`, which lives.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info[0] == BPF_LINK_TYPE_NETNS).then_some(info[4]))
}

/// The addresses of the network namespace the calling thread is in.
fn own_addresses() -> Vec<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|i| {
                let a = i.address?;
                a.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            })
            .collect()
        })
        .unwrap_or_default()
}

/// Whether process `pid` is in `cgroup` or below it now.
fn in_cgroup(pid: u32, cgroup: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    let Some(rel) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return false;
    };
    let rel = rel.trim().trim_start_matches('/');
    crate::attest::cgroup2_mounts()
        .iter()
        .any(|m| m.join(rel).starts_with(cgroup))
}

impl Networks for Adopted {
    fn adopt(&self, key: &str, pid: u32, cgroup: &Path) -> Result<Vec<IpAddr>, String> {
        let path = format!("/proc/{pid}/ns/net");
        let ns = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // Held now: the process must still be the workload's (not a reused pid).
        if !in_cgroup(pid, cgroup) {
            return Err(format!(
                "process {pid} is not in {} (gone, or its pid reused)",
                cgroup.display()
            ));
        }
        let inode = ns.metadata().map_err(|e| format!("{path}: {e}"))?.ino();
        let own = std::fs::metadata("/proc/self/ns/net")
            .map(|m| m.ino())
            .map_err(|e| format!("/proc/self/ns/net: {e}"))?;
        if inode == own {
            return Err("its network is the enforcer's own, not one of its own".into());
        }
        // One adoption at a time (a runtime's hook and its report of the same container
        // may come together; two would both try to listen in the one namespace).
        let _one = self.setup.lock().expect("lock");
        {
            let state = self.state.lock().expect("lock");
            match state.by_key.get(key) {
                Some(old) if *old == inode => {
                    return Ok(state.by_inode[&inode].addrs.clone());
                }
                _ => {}
            }
        }
        // The same workload in another namespace now (restarted): the old one goes.
        self.release(key);
        let mut fresh = None;
        if !self
            .state
            .lock()
            .expect("lock")
            .by_inode
            .contains_key(&inode)
        {
            // Set up outside the lock (deliveries ask it meanwhile).
            let mut served = self.serve(ns, inode, key)?;
            // Never an address of this host's or of another namespace served: a workload
            // that adds one to its interfaces does not draw what is meant for it.
            let host = own_addresses();
            let state = self.state.lock().expect("lock");
            let claimed: HashSet<IpAddr> = state
                .by_inode
                .values()
                .flat_map(|s| s.addrs.iter().copied())
                .collect();
            served.addrs.retain(|a| {
                let ok = !host.contains(a) && !claimed.contains(a);
                if !ok {
                    tracing::warn!(workload = key, address = %a, "an address of the workload's namespace is this host's or another's: not served there");
                }
                ok
            });
            drop(state);
            fresh = Some(served);
        }
        let mut state = self.state.lock().expect("lock");
        if let Some(served) = fresh {
            // (Adoptions are one at a time: nobody served it meanwhile.)
            state.by_inode.entry(inode).or_insert(served);
        }
        let Some(served) = state.by_inode.get_mut(&inode) else {
            return Err("its namespace stopped being served meanwhile".into());
        };
        served.keys.insert(key.to_owned());
        let addrs = served.addrs.clone();
        state.by_key.insert(key.to_owned(), inode);
        Ok(addrs)
    }

    fn release(&self, key: &str) {
        let mut state = self.state.lock().expect("lock");
        let Some(inode) = state.by_key.remove(key) else {
            return;
        };
        let last = match state.by_inode.get_mut(&inode) {
            Some(served) => {
                served.keys.remove(key);
                served.keys.is_empty()
            }
            None => false,
        };
        if last && let Some(served) = state.by_inode.remove(&inode) {
            debug_assert_eq!(served.inode, inode);
            drop(state);
            self.unserve(served);
        }
    }
}

impl Namespaces for Adopted {
    fn serves(&self, dst: IpAddr) -> bool {
        let dst = dst.to_canonical();
        let state = self.state.lock().expect("lock");
        state.by_inode.values().any(|s| s.addrs.contains(&dst))
    }

    fn socket_in(&self, netns: u64, domain: Domain) -> Option<io::Result<Socket>> {
        let worker = {
            let state = self.state.lock().expect("lock");
            state
                .by_inode
                .values()
                .find(|s| s.cookie == netns)?
                .worker
                .clone()
        };
        Some(
            worker
                .run(move || Socket::new(domain, Type::STREAM, None))
                .and_then(|r| r),
        )
    }

    fn socket_for(&self, dst: IpAddr) -> Option<io::Result<Socket>> {
        let dst = dst.to_canonical();
        let worker = {
            let state = self.state.lock().expect("lock");
            state
                .by_inode
                .values()
                .find(|s| s.addrs.contains(&dst))?
                .worker
                .clone()
        };
        let domain = if dst.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        Some(
            worker
                .run(move || Socket::new(domain, Type::STREAM, None))
                .and_then(|r| r),
        )
    }
}
