//! Which workload a cgroup id belongs to, and the capture lookup the proxy uses.
//!
//! A cgroup v2 id is the inode number of its directory. A workload is an enrolled directory
//! and everything below it, so the index holds the ids of the whole subtree and rescans it
//! when it meets an id it does not know (a sub-cgroup created after start-up).
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use crate::{
    attest::ProcessAttestor,
    sources::dynamic::{DynamicWorkloads, Entry},
};
use aya::maps::{HashMap as BpfHashMap, MapData};
use tessera_common::{AF_INET, AF_INET6, ClientKey, OrigDst};
use tessera_proxy::{
    capture::{Capture, CaptureLookup, Captured, Origin},
    identity::Identity,
    local::LocalWorkload,
};

pub struct WorkloadIndex {
    roots: Vec<(String, PathBuf)>,
    /// cgroup id -> (workload, the cgroup's directory).
    by_cgroup: RwLock<HashMap<u64, (String, PathBuf)>>,
}

/// Where a connecting process was, by the cgroup id the connect hook recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub workload: String,
    /// The workload's enrolment cgroup (configured).
    pub root: PathBuf,
    /// The cgroup the process was in: the enrolment cgroup or one below it.
    pub dir: PathBuf,
}

/// Depth limit of the rescan: cgroup trees are shallow; this bounds a pathological one.
const MAX_DEPTH: usize = 16;

fn scan(dir: &Path, name: &str, depth: usize, out: &mut HashMap<u64, (String, PathBuf)>) {
    if let Ok(meta) = std::fs::metadata(dir) {
        out.insert(meta.ino(), (name.to_owned(), dir.to_owned()));
    }
    if depth >= MAX_DEPTH {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                scan(&e.path(), name, depth + 1, out);
            }
        }
    }
}

impl WorkloadIndex {
    pub fn new(roots: Vec<(String, PathBuf)>) -> Self {
        let index = Self {
            roots,
            by_cgroup: RwLock::default(),
        };
        index.rescan();
        index
    }

    fn rescan(&self) {
        let mut map = HashMap::new();
        for (name, root) in &self.roots {
            scan(root, name, 0, &mut map);
        }
        *self.by_cgroup.write().expect("lock") = map;
    }

    pub fn workload(&self, cgroup_id: u64) -> Option<String> {
        self.place(cgroup_id).map(|p| p.workload)
    }

    /// The workload a cgroup id (as the kernel recorded it at connect) belongs to, its
    /// enrolment cgroup and the cgroup's own directory.
    pub fn place(&self, cgroup_id: u64) -> Option<Place> {
        let found = |map: &HashMap<u64, (String, PathBuf)>| {
            let (name, dir) = map.get(&cgroup_id)?;
            let root = self.roots.iter().find(|(n, _)| n == name)?.1.clone();
            Some(Place {
                workload: name.clone(),
                root,
                dir: dir.clone(),
            })
        };
        if let Some(p) = found(&self.by_cgroup.read().expect("lock")) {
            return Some(p);
        }
        self.rescan();
        found(&self.by_cgroup.read().expect("lock"))
    }
}

/// The eBPF map key for a client address as the proxy sees it after accept(), in the
/// network namespace with cookie `netns`.
pub fn client_key(client: SocketAddr, netns: u64) -> ClientKey {
    let ip = match client.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => ClientKey {
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            port: client.port(),
            family: AF_INET,
            _pad: 0,
            netns,
        },
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ClientKey {
                addr: [w(0), w(4), w(8), w(12)],
                port: client.port(),
                family: AF_INET6,
                _pad: 0,
                netns,
            }
        }
    }
}

/// The original destination recorded by the connect hooks.
pub fn orig_dst(orig: &OrigDst) -> SocketAddr {
    let ip = if orig.family == AF_INET {
        IpAddr::V4(Ipv4Addr::from(orig.addr[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in orig.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    };
    SocketAddr::new(ip, orig.port)
}

pub struct BpfCaptureLookup {
    pub map: Mutex<BpfHashMap<MapData, ClientKey, OrigDst>>,
    pub workloads: WorkloadIndex,
    /// Identities of the enrolled workloads, by name.
    pub identities: HashMap<String, Arc<LocalWorkload>>,
    pub attestor: Arc<ProcessAttestor>,
    /// Containers under an enrolled parent cgroup, with the identities their runtime gave
    /// them, and how long a connection may wait for one it has not reported yet.
    pub containers: Option<(Arc<DynamicWorkloads>, std::time::Duration)>,
    /// The cookie of the enforcer's own network namespace (where the proxy's own listeners
    /// are).
    pub host_netns: u64,
}

impl BpfCaptureLookup {
    /// Forgets the records a previous run left (pinned): their connections died with its
    /// listener, and none may be claimed by whoever connects from the same address and port
    /// later. Done once this run is in force, before it serves.
    pub fn forget_stale(&self) {
        let mut map = self.map.lock().expect("lock");
        let stale: Vec<_> = map.keys().filter_map(Result::ok).collect();
        for key in &stale {
            let _ = map.remove(key);
        }
        if !stale.is_empty() {
            tracing::info!(
                records = stale.len(),
                "forgot the capture records of a previous run"
            );
        }
    }
}

impl CaptureLookup for BpfCaptureLookup {
    fn take(&self, client: SocketAddr, netns: Option<u64>) -> Capture {
        let key = client_key(client, netns.unwrap_or(self.host_netns));
        let orig = {
            let mut map = self.map.lock().expect("lock");
            let Ok(orig) = map.get(&key, 0) else {
                return Capture::Missing;
            };
            let _ = map.remove(&key);
            orig
        };
        // A capture record always comes from an enrolled cgroup; one that vanished between
        // connect and accept leaves nothing to vouch for.
        let Some(place) = self.workloads.place(orig.cgroup_id) else {
            return Capture::Missing;
        };
        // A container under the enrolled parent: its own identity, from its runtime.
        if let Some((containers, wait)) = &self.containers
            && place.root == containers.root()
        {
            let Some(dir) = containers.workload_dir(&place.dir) else {
                tracing::warn!(pid = orig.pid, cgroup = %place.dir.display(), "a process in the containers' parent cgroup itself: refused");
                return Capture::Missing;
            };
            return match containers.get(&dir) {
                Some(entry) => match entry_local(entry, &dir) {
                    Ok(local) => self.attested(Some(local), orig, place, true),
                    Err(why) => Capture::Refused(why),
                },
                None => {
                    let (containers, wait) = (containers.clone(), *wait);
                    let attestor = self.attestor.clone();
                    Capture::Pending(Box::new(move || {
                        let local = entry_local(containers.resolve(&dir, wait), &dir)?;
                        Ok(attest(&attestor, &local, orig, place, true))
                    }))
                }
            };
        }
        let local = self.identities.get(&place.workload).cloned();
        self.attested(local, orig, place, false)
    }
}

/// The identity of an entry, or why it has none.
fn entry_local(entry: Entry, dir: &Path) -> Result<Arc<LocalWorkload>, String> {
    match entry {
        Entry::Enrolled(w) => Ok(w),
        Entry::Refused(why) => {
            tracing::info!(cgroup = %dir.display(), reason = %why, "connection of a container without identity refused");
            Err(format!("container without identity: {why}"))
        }
    }
}

/// The container facts a runtime gave (`runtime`: a source's workload) win over those a
/// process's cgroup path suggests: inside a container, root may make a sub-cgroup named
/// like another container's.
fn runtime_facts_win(id: Identity, local: &Identity, runtime: bool) -> Identity {
    if !runtime {
        return id;
    }
    use tessera_proxy::identity::reserved::{CONTAINER_ID, CONTAINER_RUNTIME, POD_UID};
    let keys = [CONTAINER_ID, CONTAINER_RUNTIME, POD_UID];
    let labels = tessera_policy::Labels::new(
        id.labels
            .iter()
            .filter(|(k, _)| !keys.contains(k))
            .chain(local.labels.iter().filter(|(k, _)| keys.contains(k)))
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    Identity {
        spiffe: id.spiffe,
        labels,
    }
}

/// What a connection of `local`'s process is: its workload's identity and the process's.
fn attest(
    attestor: &ProcessAttestor,
    local: &LocalWorkload,
    orig: OrigDst,
    place: Place,
    runtime: bool,
) -> Captured {
    let origin = Origin {
        workload: local.name.clone(),
        pid: orig.pid,
        uid: orig.uid,
        cgroup_id: orig.cgroup_id,
    };
    let identity =
        attestor.attest_connection(&local.identity, orig.pid, orig.uid, orig.cgroup_id, &place);
    let identity = runtime_facts_win(identity, &local.identity, runtime);
    Captured {
        dst: orig_dst(&orig),
        identity,
        observe: local.observe,
        origin,
    }
}

impl BpfCaptureLookup {
    fn attested(
        &self,
        local: Option<Arc<LocalWorkload>>,
        orig: OrigDst,
        place: Place,
        runtime: bool,
    ) -> Capture {
        let Some(local) = local else {
            return Capture::Missing;
        };
        let origin = Origin {
            workload: local.name.clone(),
            pid: orig.pid,
            uid: orig.uid,
            cgroup_id: orig.cgroup_id,
        };
        let (dst, observe) = (orig_dst(&orig), local.observe);
        let (pid, uid, cgroup) = (orig.pid, orig.uid, orig.cgroup_id);
        if let Some(id) = self.attestor.cached(&local.identity, pid, uid, cgroup) {
            return Capture::Ready(Captured {
                dst,
                identity: runtime_facts_win(id, &local.identity, runtime),
                observe,
                origin,
            });
        }
        // A first contact of this process and executable: hashing and NSS, where the
        // caller may block.
        let attestor = self.attestor.clone();
        Capture::Pending(Box::new(move || {
            Ok(attest(&attestor, &local, orig, place, runtime))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_what_the_ebpf_programs_write() {
        // sock_ops writes local_ip4 as the kernel holds it (network order) and the port in host order.
        let k = client_key("127.0.0.1:40000".parse().unwrap(), 7);
        assert_eq!(k.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!((k.port, k.family, k.netns), (40000, AF_INET, 7));
        // A v4-mapped peer on a v6 socket is the same connection as its v4 form.
        assert_eq!(
            client_key("[::ffff:127.0.0.1]:40000".parse().unwrap(), 7),
            k
        );
        // The same loopback address and port in another namespace is another connection.
        assert_ne!(client_key("127.0.0.1:40000".parse().unwrap(), 8), k);
        let k6 = client_key("[::1]:5".parse().unwrap(), 7);
        assert_eq!(
            (k6.addr[3].to_ne_bytes(), k6.family),
            ([0, 0, 0, 1], AF_INET6)
        );
    }

    #[test]
    fn original_destinations_decode_for_both_families() {
        let v4 = OrigDst {
            addr: [u32::from_ne_bytes([10, 77, 0, 2]), 0, 0, 0],
            port: 8080,
            family: AF_INET,
            ..Default::default()
        };
        assert_eq!(orig_dst(&v4), "10.77.0.2:8080".parse().unwrap());
        let ip: Ipv6Addr = "fd00::2".parse().unwrap();
        let o = ip.octets();
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        let v6 = OrigDst {
            addr: [w(0), w(4), w(8), w(12)],
            port: 443,
            family: AF_INET6,
            ..Default::default()
        };
        assert_eq!(orig_dst(&v6), "[fd00::2]:443".parse().unwrap());
    }

    #[test]
    fn a_containers_runtime_facts_win_over_its_processes_cgroup_path() {
        use tessera_proxy::identity::reserved::{CONTAINER_ID, POD_UID, USER};
        let local = Identity {
            spiffe: "s".into(),
            labels: tessera_policy::Labels::new([(CONTAINER_ID, "real"), ("app", "a")]),
        };
        let attested = Identity {
            spiffe: "s".into(),
            labels: tessera_policy::Labels::new([
                (CONTAINER_ID, "victim"),
                (POD_UID, "made-up"),
                (USER, "root"),
                ("app", "a"),
            ]),
        };
        let out = runtime_facts_win(attested.clone(), &local, true);
        assert_eq!(out.labels.get(CONTAINER_ID), Some("real"));
        assert_eq!(out.labels.get(POD_UID), None);
        assert_eq!(out.labels.get(USER), Some("root"));
        // A configured workload keeps what its process's path says.
        assert_eq!(runtime_facts_win(attested.clone(), &local, false), attested);
    }

    #[test]
    fn the_index_covers_sub_directories_and_finds_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("child")).unwrap();
        let index = WorkloadIndex::new(vec![("web".into(), dir.path().to_owned())]);
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(
            index.place(ino(&dir.path().join("child"))),
            Some(Place {
                workload: "web".into(),
                root: dir.path().to_owned(),
                dir: dir.path().join("child"),
            })
        );
        assert_eq!(
            index.workload(ino(&dir.path().join("child"))).as_deref(),
            Some("web")
        );
        std::fs::create_dir(dir.path().join("later")).unwrap();
        assert_eq!(
            index.workload(ino(&dir.path().join("later"))).as_deref(),
            Some("web")
        );
        assert_eq!(index.workload(1), None);
    }
}
