//! Workload attestation: the labels the enforcer derives from what it observes itself, in
//! the reserved `tessera.io/` namespace (a workload can never declare those).
//!
//! * For every enrolled workload: `tessera.io/workload`, `tessera.io/enforcer`,
//!   `tessera.io/host`, `tessera.io/cgroup` (its path below the cgroup v2 root), and the
//!   container and pod facts its **configured** cgroup path reveals (`container-id`,
//!   `container-runtime`, `pod-uid`).
//! * For each connection, from what the eBPF connect hook recorded (pid, uid and cgroup id
//!   at connect): the cgroup the process was in (`cgroup`, found by that id, not read from
//!   /proc after accept), `uid`, `user`, and its executable's path `exe` and `exe-sha256`
//!   (read through /proc/<pid>/exe; hashed once per file version, off the accept path).
//!
//! Container and pod facts are never taken from a cgroup level the workload could have made
//! itself: with cgroup v2 delegation it can create sub-cgroups named as it likes
//! (`docker-<any id>.scope`). A level below the enrolment cgroup counts only if the workload
//! could not have created it: its parent is owned by root and writable by nobody else, and
//! the workload's process is not root ([`trusted_level`]).
//!
//! A value longer than a token can carry (255 bytes) is left out rather than cut: a cut
//! value would claim something that is not true.
use std::{
    collections::HashMap,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use sha2::{Digest, Sha256};
use tessera_policy::Labels;
use tessera_proxy::identity::{Identity, spiffe_id};

use crate::workloads::Place;
use tessera_proxy::identity::reserved;
pub use tessera_proxy::identity::reserved::PREFIX;
const MAX_VALUE: usize = 255;

/// Sets the reserved label `key` (one of [`reserved`]'s names) to `value`.
fn label(out: &mut Vec<(String, String)>, key: &str, value: impl Into<String>) {
    let value = value.into();
    if value.len() <= MAX_VALUE {
        out.retain(|(k, _)| k != key);
        out.push((key.to_owned(), value));
    }
}

/// The cgroup v2 mount points of this host (from /proc/self/mounts).
pub fn cgroup2_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .collect()
}

/// A cgroup directory as the kernel names it in /proc/<pid>/cgroup: relative to the root.
pub fn cgroup_path(dir: &Path) -> String {
    for mount in cgroup2_mounts() {
        if let Ok(rel) = dir.strip_prefix(&mount) {
            return format!("/{}", rel.display());
        }
    }
    dir.display().to_string()
}

/// Container and pod facts in a cgroup path, as their reserved label names (systemd and cgroupfs drivers of docker,
/// containerd, CRI-O, podman; Kubernetes pod slices).
pub fn container_facts(path: &str) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let is_id = |s: &str| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit());
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, seg) in segments.iter().enumerate() {
        let scoped = seg.strip_suffix(".scope").unwrap_or(seg);
        for (prefix, runtime) in [
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
            ("libpod-", "podman"),
        ] {
            if let Some(id) = scoped.strip_prefix(prefix).filter(|id| is_id(id)) {
                out.push((reserved::CONTAINER_ID, id.to_owned()));
                out.push((reserved::CONTAINER_RUNTIME, runtime.to_owned()));
            }
        }
        // cgroupfs driver: /docker/<id>, /kubepods/<qos>/pod<uid>/<id>
        if is_id(seg) && i > 0 {
            let parent = segments[i - 1];
            let runtime = if parent == "docker" {
                "docker"
            } else {
                "unknown"
            };
            if parent == "docker" || parent.starts_with("pod") {
                out.push((reserved::CONTAINER_ID, (*seg).to_owned()));
                out.push((reserved::CONTAINER_RUNTIME, runtime.to_owned()));
            }
        }
        // systemd driver: kubepods-burstable-pod<uid_with_underscores>.slice
        if let Some(rest) = seg.strip_suffix(".slice")
            && rest.starts_with("kubepods")
            && let Some(uid) = rest.rsplit('-').next().and_then(|s| s.strip_prefix("pod"))
        {
            out.push((reserved::POD_UID, uid.replace('_', "-")));
        }
        if let Some(uid) = seg.strip_prefix("pod")
            && segments[..i].iter().any(|s| s.starts_with("kubepods"))
            && !seg.ends_with(".slice")
        {
            out.push((reserved::POD_UID, uid.to_owned()));
        }
    }
    out
}

/// The deepest cgroup from `root` down to `dir` that a process of uid `uid` in it could not
/// have created: each level's parent owned by root and writable by no one else, and `uid`
/// not root (root can make any cgroup). `owner_mode` gives a directory's owner and mode.
/// `root` itself when no level below it counts (or `dir` is not below it).
pub fn trusted_level(
    root: &Path,
    dir: &Path,
    uid: u32,
    owner_mode: impl Fn(&Path) -> Option<(u32, u32)>,
) -> PathBuf {
    let mut trusted = root.to_path_buf();
    let Ok(below) = dir.strip_prefix(root) else {
        return trusted;
    };
    if uid == 0 {
        return trusted;
    }
    for level in below.components() {
        // Whoever can write the parent can create (or rename) this level.
        match owner_mode(&trusted) {
            Some((0, mode)) if mode & 0o022 == 0 => trusted.push(level),
            _ => break,
        }
    }
    trusted
}

/// Container and pod facts of the cgroup levels below `root` down to `dir` that uid `uid`
/// could not have made (see [`trusted_level`]); none from the levels it could.
pub fn trusted_container_facts(root: &Path, dir: &Path, uid: u32) -> Vec<(&'static str, String)> {
    let level = trusted_level(root, dir, uid, |p| {
        std::fs::metadata(p).ok().map(|m| (m.uid(), m.mode()))
    });
    if level == root {
        // The enrolment cgroup's facts are the workload's identity already.
        return Vec::new();
    }
    container_facts(&cgroup_path(&level))
}

/// The identity of an enrolled workload, before any process is known.
pub fn workload_identity(
    trust_domain: &str,
    enforcer: &str,
    host: &str,
    name: &str,
    cgroup: &Path,
    declared: impl IntoIterator<Item = (String, String)>,
) -> Identity {
    let mut labels: Vec<(String, String)> = declared
        .into_iter()
        .filter(|(k, _)| !k.starts_with(PREFIX))
        .collect();
    label(&mut labels, reserved::WORKLOAD, name);
    label(&mut labels, reserved::ENFORCER, enforcer);
    label(&mut labels, reserved::HOST, host);
    let path = cgroup_path(cgroup);
    for (k, v) in container_facts(&path) {
        label(&mut labels, k, v);
    }
    label(&mut labels, reserved::CGROUP, path);
    Identity {
        spiffe: spiffe_id(trust_domain, enforcer, name),
        labels: Labels::new(labels),
    }
}

/// What the enforcer observed of one process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessFacts {
    pub cgroup: Option<String>,
    /// Container and pod facts of levels below the enrolment cgroup the process could not
    /// have made ([`trusted_container_facts`]).
    pub container: Vec<(&'static str, String)>,
    pub user: Option<String>,
    pub exe: Option<String>,
    pub exe_sha256: Option<String>,
}

/// Derives per-process labels; caches executable hashes by file version and user names.
/// One version of a file: (device, inode, size, mtime, mtime_nsec, ctime, ctime_nsec). The
/// ctime is in the key because a file's owner can set its mtime back after rewriting it;
/// the ctime only the kernel sets.
type FileVersion = (u64, u64, u64, i64, i64, i64, i64);

/// What a connection's identity is a function of: the process, its user, its cgroup and
/// the version of the executable it runs.
type ConnectionFacts = (u32, u32, u64, FileVersion);

/// One executable version's hash: computed once, by the first connection that needs it,
/// while others for the same version wait (none while it is being read stays `None`).
type HashSlot = Arc<Mutex<Option<String>>>;

#[derive(Default)]
pub struct ProcessAttestor {
    /// Executable version -> SHA-256 hex. Concurrent first connections of one program (a
    /// load generator's workers, say) would otherwise each read and hash it in full.
    hashes: Mutex<HashMap<FileVersion, HashSlot>>,
    /// Files read and hashed in full so far (the rest came from `hashes`).
    hashed: AtomicU64,
    users: Mutex<HashMap<u32, Option<String>>>,
    /// Identities made for connections lately (a process connecting many times is attested
    /// once per executable it runs; bounded).
    connections: Mutex<HashMap<ConnectionFacts, (Identity, Identity)>>,
}

/// Connection identities (and executable hashes, and user names) kept at most: a full
/// cache starts over rather than growing.
const CONNECTIONS_KEPT: usize = 4096;

fn file_version(m: &std::fs::Metadata) -> FileVersion {
    (
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// Larger executables are not hashed on the connection path (the label is left out).
const MAX_HASHED: u64 = 512 << 20;

impl ProcessAttestor {
    /// What can be observed of process `pid` (uid `uid`) of a workload enrolled at `root`,
    /// which was in the cgroup `dir` when it connected (None: the one it is in now).
    pub fn facts(&self, pid: u32, uid: u32, root: &Path, dir: Option<&Path>) -> ProcessFacts {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        // The cgroup it is in now, if that is the workload's (or below it).
        let now = || {
            let own = std::fs::read_to_string(proc.join("cgroup")).ok()?;
            let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned();
            cgroup2_mounts()
                .into_iter()
                .map(|m| m.join(rel.trim_start_matches('/')))
                .find(|d| d.starts_with(root))
        };
        let now = now();
        // The executable is read after the fact, through the pid: a pid that now belongs
        // to a process outside the workload (the connecting one exited, its pid reused)
        // would describe someone else, so nothing is said of it.
        let ours = now.is_some();
        let dir = dir.map(Path::to_path_buf).or(now);
        let exe = std::fs::read_link(proc.join("exe"))
            .ok()
            .filter(|_| ours)
            .map(|p| p.display().to_string());
        ProcessFacts {
            cgroup: dir.as_deref().map(cgroup_path),
            container: dir
                .as_deref()
                .map(|d| trusted_container_facts(root, d, uid))
                .unwrap_or_default(),
            user: None,
            exe_sha256: if ours {
                self.exe_hash(&proc.join("exe"))
            } else {
                None
            },
            exe,
        }
    }

    fn exe_hash(&self, exe: &Path) -> Option<String> {
        // Opening /proc/<pid>/exe opens the very file the process runs, even if its path
        // was replaced since; its metadata keys the cache.
        let mut file = std::fs::File::open(exe).ok()?;
        let m = file.metadata().ok()?;
        if m.size() > MAX_HASHED {
            return None;
        }
        let key = file_version(&m);
        let slot = {
            let mut hashes = self.hashes.lock().expect("lock");
            if hashes.len() >= CONNECTIONS_KEPT && !hashes.contains_key(&key) {
                hashes.clear();
            }
            hashes.entry(key).or_default().clone()
        };
        // Held while hashing: callers for this version wait for the one result.
        let mut done = slot.lock().expect("lock");
        if let Some(h) = done.as_ref() {
            return Some(h.clone());
        }
        self.hashed.fetch_add(1, Ordering::Relaxed);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                // Left empty: the next caller tries again.
                Err(_) => return None,
            }
        }
        let hex: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        *done = Some(hex.clone());
        Some(hex)
    }

    fn user(&self, uid: u32) -> Option<String> {
        let mut users = self.users.lock().expect("lock");
        if users.len() >= CONNECTIONS_KEPT && !users.contains_key(&uid) {
            users.clear();
        }
        users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }

    /// The identity of a connection made by process `pid` (uid `uid`, in cgroup
    /// `cgroup_id`) of a workload, if the same process, user, cgroup and executable
    /// connected lately: one `stat` of the running executable, never blocking for long.
    pub fn cached(
        &self,
        workload: &Identity,
        pid: u32,
        uid: u32,
        cgroup_id: u64,
    ) -> Option<Identity> {
        let m = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
        let key = (pid, uid, cgroup_id, file_version(&m));
        match self.connections.lock().expect("lock").get(&key) {
            Some((w, id)) if w == workload => Some(id.clone()),
            _ => None,
        }
    }

    /// The identity of a connection made by process `pid` (uid `uid`, in cgroup
    /// `cgroup_id`, at `place`) of a workload: [`ProcessAttestor::cached`], or a full
    /// attestation (which may hash the executable and ask NSS for the user: run it where
    /// blocking is allowed).
    pub fn attest_connection(
        &self,
        workload: &Identity,
        pid: u32,
        uid: u32,
        cgroup_id: u64,
        place: &Place,
    ) -> Identity {
        if let Some(id) = self.cached(workload, pid, uid, cgroup_id) {
            return id;
        }
        let Ok(m) = std::fs::metadata(format!("/proc/{pid}/exe")) else {
            return self.attest(workload, pid, uid, &place.root, Some(&place.dir));
        };
        let key = (pid, uid, cgroup_id, file_version(&m));
        let id = self.attest(workload, pid, uid, &place.root, Some(&place.dir));
        let mut cache = self.connections.lock().expect("lock");
        if cache.len() >= CONNECTIONS_KEPT {
            cache.clear();
        }
        cache.insert(key, (workload.clone(), id.clone()));
        id
    }

    /// The identity of a connection made by process `pid` (uid `uid`) of a workload
    /// enrolled at `root`, from cgroup `dir` (None: the one it is in now).
    pub fn attest(
        &self,
        workload: &Identity,
        pid: u32,
        uid: u32,
        root: &Path,
        dir: Option<&Path>,
    ) -> Identity {
        let mut facts = self.facts(pid, uid, root, dir);
        facts.user = self.user(uid);
        with_process(workload, uid, &facts)
    }
}

/// `workload`'s identity refined by the facts of one of its processes.
pub fn with_process(workload: &Identity, uid: u32, facts: &ProcessFacts) -> Identity {
    let mut labels: Vec<(String, String)> = workload
        .labels
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    label(&mut labels, reserved::UID, uid.to_string());
    if let Some(user) = &facts.user {
        label(&mut labels, reserved::USER, user.clone());
    }
    for (k, v) in &facts.container {
        label(&mut labels, k, v.clone());
    }
    if let Some(cgroup) = &facts.cgroup {
        label(&mut labels, reserved::CGROUP, cgroup.clone());
    }
    if let Some(exe) = &facts.exe {
        label(&mut labels, reserved::EXE, exe.clone());
    }
    if let Some(h) = &facts.exe_sha256 {
        label(&mut labels, reserved::EXE_SHA256, h.clone());
    }
    Identity {
        spiffe: workload.spiffe.clone(),
        labels: Labels::new(labels),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_facts_from_systemd_and_cgroupfs_paths() {
        let id = "a".repeat(64);
        let k8s = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_ab_cd.slice/cri-containerd-{id}.scope"
        );
        let facts = container_facts(&k8s);
        assert!(
            facts.contains(&(reserved::POD_UID, "1234-ab-cd".into())),
            "{facts:?}"
        );
        assert!(facts.contains(&(reserved::CONTAINER_ID, id.clone())));
        assert!(facts.contains(&(reserved::CONTAINER_RUNTIME, "containerd".into())));
        let docker = container_facts(&format!("/system.slice/docker-{id}.scope"));
        assert!(docker.contains(&(reserved::CONTAINER_RUNTIME, "docker".into())));
        let cgroupfs = container_facts(&format!("/kubepods/besteffort/pod5678/{id}"));
        assert!(
            cgroupfs.contains(&(reserved::POD_UID, "5678".into())),
            "{cgroupfs:?}"
        );
        assert!(cgroupfs.contains(&(reserved::CONTAINER_ID, id.clone())));
        assert!(container_facts("/tessera/host-a/web").is_empty());
        // Not a container id: wrong length.
        assert!(container_facts("/system.slice/docker-abc.scope").is_empty());
    }

    #[test]
    fn declared_reserved_labels_are_dropped_and_derived_ones_win() {
        let id = workload_identity(
            "td",
            "host-a",
            "h",
            "web",
            Path::new("/nonexistent/web"),
            [
                ("app".to_string(), "web".to_string()),
                ("tessera.io/uid".into(), "0".into()),
            ],
        );
        assert_eq!(id.spiffe, "spiffe://td/enforcer/host-a/workload/web");
        assert_eq!(id.labels.get("app"), Some("web"));
        assert_eq!(id.labels.get("tessera.io/uid"), None);
        assert_eq!(id.labels.get("tessera.io/workload"), Some("web"));
        assert_eq!(id.labels.get("tessera.io/enforcer"), Some("host-a"));
        let p = with_process(
            &id,
            1000,
            &ProcessFacts {
                cgroup: Some("/x/web/sub".into()),
                user: Some("alice".into()),
                exe: Some("/usr/bin/curl".into()),
                exe_sha256: Some("00".repeat(32)),
                container: Vec::new(),
            },
        );
        assert_eq!(p.labels.get("tessera.io/uid"), Some("1000"));
        assert_eq!(p.labels.get("tessera.io/user"), Some("alice"));
        assert_eq!(p.labels.get("tessera.io/cgroup"), Some("/x/web/sub"));
        assert_eq!(p.labels.get("tessera.io/exe"), Some("/usr/bin/curl"));
        assert_eq!(p.spiffe, id.spiffe);
        let long = with_process(
            &id,
            0,
            &ProcessFacts {
                exe: Some("/x".repeat(200)),
                ..Default::default()
            },
        );
        assert_eq!(
            long.labels.get("tessera.io/exe"),
            None,
            "too long: left out, not cut"
        );
    }

    #[test]
    fn this_process_is_attested_with_the_hash_of_its_executable() {
        let a = ProcessAttestor::default();
        let facts = a.facts(std::process::id(), 0, Path::new("/"), None);
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let want: String = Sha256::digest(&exe)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(facts.exe_sha256.as_deref(), Some(want.as_str()));
        assert!(facts.cgroup.is_some_and(|c| c.starts_with('/')));
        // Second time from the cache, same answer.
        assert_eq!(
            a.facts(std::process::id(), 0, Path::new("/"), None)
                .exe_sha256,
            Some(want)
        );
        assert_eq!(a.user(0).as_deref(), Some("root"));
    }

    #[test]
    fn a_typical_process_identity_fits_a_512_byte_cold_token() {
        use tessera_proxy::identity::signer::Signer;
        let id = workload_identity(
            "tessera.local",
            "host-a",
            "demo-host",
            "web",
            Path::new("/sys/fs/cgroup/tessera-demo/host-a/web"),
            [("app".to_string(), "web".to_string())],
        );
        let p = with_process(
            &id,
            0,
            &ProcessFacts {
                cgroup: Some("/tessera-demo/host-a/web".into()),
                user: Some("root".into()),
                exe: Some("/usr/bin/curl".into()),
                exe_sha256: Some("ab".repeat(32)),
                container: Vec::new(),
            },
        );
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let signer = Signer::from_pkcs8(&key.serialize_der()).unwrap();
        let dst = "10.77.0.2:8080".parse().unwrap();
        let cold = signer.sign(&p, false, dst, [0; 16], 0, 10_000);
        let warm = signer.sign(&p, true, dst, [0; 16], 0, 10_000);
        assert!(cold.len() <= 512, "cold token of {} bytes", cold.len());
        assert_eq!(warm.len(), 157);
        eprintln!("cold {} bytes, warm {} bytes", cold.len(), warm.len());
    }

    /// A cgroup tree as (path, owner, mode).
    fn tree<'a>(dirs: &'a [(&'a str, u32, u32)]) -> impl Fn(&Path) -> Option<(u32, u32)> + 'a {
        move |p: &Path| {
            dirs.iter()
                .find(|(d, _, _)| Path::new(d) == p)
                .map(|&(_, owner, mode)| (owner, mode))
        }
    }

    #[test]
    fn container_facts_come_only_from_levels_the_workload_could_not_make() {
        let id = "a".repeat(64);
        let forged = "f".repeat(64);
        let root = Path::new("/cg/pods");
        let runtime = format!("/cg/pods/docker-{id}.scope");
        let own = format!("{runtime}/docker-{forged}.scope");
        // The runtime (root) made the container's cgroup and delegated it to uid 1000.
        let delegated = [
            ("/cg/pods", 0, 0o40755),
            (runtime.as_str(), 1000, 0o40755),
            (own.as_str(), 1000, 0o40755),
        ];
        let at = |dir: &str, uid| trusted_level(root, Path::new(dir), uid, tree(&delegated));
        // The container's own level: its parent is root's and no one else can write it.
        assert_eq!(at(&runtime, 1000), PathBuf::from(&runtime));
        // A level below it the workload made itself: not trusted, whatever its name.
        assert_eq!(at(&own, 1000), PathBuf::from(&runtime));
        assert_eq!(
            container_facts(&at(&own, 1000).display().to_string()),
            container_facts(&runtime)
        );
        // A root process could have made any level.
        assert_eq!(at(&runtime, 0), root);
        // The enrolment cgroup itself delegated to the workload, or writable by its group:
        // nothing below it counts.
        let mine = [
            ("/cg/pods", 1000, 0o40755),
            (runtime.as_str(), 1000, 0o40755),
        ];
        assert_eq!(
            trusted_level(root, Path::new(&runtime), 1000, tree(&mine)),
            root
        );
        let group = [("/cg/pods", 0, 0o40775), (runtime.as_str(), 0, 0o40755)];
        assert_eq!(
            trusted_level(root, Path::new(&runtime), 1000, tree(&group)),
            root
        );
        // Not below the enrolment cgroup at all, or unreadable: nothing.
        assert_eq!(at("/elsewhere/docker-x.scope", 1000), root);
        assert_eq!(
            trusted_level(root, Path::new(&runtime), 1000, |_| None),
            root
        );
    }

    #[test]
    fn a_pid_that_is_no_longer_the_workloads_says_nothing_of_its_executable() {
        let a = ProcessAttestor::default();
        let me = std::process::id();
        // This process, as if recorded connecting from a workload enrolled elsewhere: the
        // pid is now someone else's (as a reused pid would be).
        let elsewhere = Path::new("/nonexistent-tessera/web");
        let facts = a.facts(me, 1000, elsewhere, Some(&elsewhere.join("sub")));
        assert_eq!((facts.exe, facts.exe_sha256), (None, None));
        // The recorded cgroup still names where the connect came from.
        assert_eq!(
            facts.cgroup.as_deref(),
            Some("/nonexistent-tessera/web/sub")
        );
        // Its own workload (every cgroup is below the mount): the executable is reported.
        let mount = cgroup2_mounts().into_iter().next().expect("cgroup v2");
        let facts = a.facts(me, 1000, &mount, None);
        assert!(
            facts.exe.is_some() && facts.exe_sha256.is_some(),
            "{facts:?}"
        );
    }

    #[test]
    fn a_process_in_a_sub_cgroup_gets_no_container_facts_from_its_name() {
        let id = workload_identity(
            "td",
            "host-a",
            "h",
            "web",
            Path::new("/nonexistent/web"),
            [],
        );
        let forged = format!("/web/docker-{}.scope", "f".repeat(64));
        let p = with_process(
            &id,
            1000,
            &ProcessFacts {
                cgroup: Some(forged.clone()),
                ..Default::default()
            },
        );
        assert_eq!(p.labels.get("tessera.io/container-id"), None);
        assert_eq!(p.labels.get("tessera.io/cgroup"), Some(forged.as_str()));
    }

    /// Connections of a program not hashed yet arriving together (a load generator's
    /// workers, the first connections after a start): it is read and hashed once, not once
    /// per connection in flight.
    #[test]
    fn concurrent_first_connections_hash_an_executable_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("program");
        std::fs::write(&file, vec![7u8; 8 << 20]).unwrap();
        let a = ProcessAttestor::default();
        let start = std::sync::Barrier::new(8);
        let hashes: Vec<_> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        a.exe_hash(&file)
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        assert!(hashes.iter().all(|h| h.is_some() && *h == hashes[0]));
        assert_eq!(a.hashed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn executable_hashes_are_cached_by_file_version_and_a_rewrite_is_hashed_again() {
        let hex = |b: &[u8]| -> String {
            Sha256::digest(b)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("program");
        std::fs::write(&file, b"version one").unwrap();
        let a = ProcessAttestor::default();
        assert_eq!(a.exe_hash(&file), Some(hex(b"version one")));
        assert_eq!(a.exe_hash(&file), Some(hex(b"version one")));
        assert_eq!(
            a.hashed.load(Ordering::Relaxed),
            1,
            "the second from the cache"
        );
        // Rewritten in place, same size, its mtime set back as its owner can: the ctime
        // (which only the kernel sets) moved, so it is a new version, hashed again.
        let before = std::fs::metadata(&file).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, b"version two").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(before.modified().unwrap())
            .unwrap();
        let after = std::fs::metadata(&file).unwrap();
        assert_eq!(
            (after.len(), after.mtime(), after.mtime_nsec()),
            (before.len(), before.mtime(), before.mtime_nsec())
        );
        assert_eq!(a.exe_hash(&file), Some(hex(b"version two")));
        assert_eq!(a.hashed.load(Ordering::Relaxed), 2);
    }
}
