//! The workloads sources found, by cgroup: what capture asks when a connection comes from a
//! cgroup below a source's parent.
//!
//! A source's report ([`SourceEvent`]) becomes an identity here, built the way a configured
//! workload's is (declared labels, then the enforcer's derived ones, the scope stamped last)
//! with the runtime's facts added under their reserved keys. A container the selector does
//! not take is remembered as refused, with the reason, so its connections fail with words.
//!
//! A connection from a cgroup nobody has reported yet (a container started a moment ago)
//! asks the source about that cgroup and waits, bounded, for the answer ([`Self::resolve`]).
//! State is bounded: one entry per container the runtime says exists, at most
//! [`MAX_ENTRIES`], and a bounded queue of questions.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, OnceLock},
    time::{Duration, Instant},
};

use tessera_policy::Labels;
use tessera_proxy::{identity::Identity, local::LocalWorkload};

use super::{Discovered, SourceEvent};

/// At most this many workloads from sources on one host.
pub const MAX_ENTRIES: usize = 10_000;
/// At most this many unanswered questions to a source.
pub const MAX_QUESTIONS: usize = 256;

/// What an enforcer knows of the workload in one cgroup under a source's parent.
#[derive(Clone, Debug)]
pub enum Entry {
    Enrolled(Arc<LocalWorkload>),
    /// The runtime reported it but it may not connect: the reason.
    Refused(String),
}

/// Where a workload's own cgroup is below the source's parent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// Directly below it (podman's `libpod-<id>`, `--cgroup-parent`).
    #[default]
    Containers,
    /// The kubelet's pod level: `pod<uid>` (cgroupfs) or `kubepods-…-pod<uid>.slice`
    /// (systemd), one level down for Guaranteed pods and two for the others (below the
    /// QoS class's own); the pod's containers are below it.
    Pods,
}

impl Layout {
    /// Whether a directory below the parent, named `name`, is a workload's own cgroup.
    fn is_workload(self, name: &str) -> bool {
        match self {
            Layout::Containers => true,
            Layout::Pods => {
                name.starts_with("pod") || (name.ends_with(".slice") && name.contains("-pod"))
            }
        }
    }
}

/// The facts every identity carries, fixed for a run.
#[derive(Clone, Debug)]
pub struct Base {
    /// Where workloads' cgroups are below the parent.
    pub layout: Layout,
    pub trust_domain: String,
    pub enforcer: String,
    pub host: String,
    /// The enforcer's scope (from its certificate under a control plane), stamped last.
    pub scope: BTreeMap<String, String>,
    /// Labels a workload must carry to be enrolled.
    pub select: BTreeMap<String, String>,
    pub observe: bool,
    /// The ports workloads of this source may serve (`[containers] ports`): a claim of any
    /// other port is ignored.
    pub ports: Vec<u16>,
    /// Names a workload of this source may not take (configured workloads', the parent's).
    pub taken_names: Vec<String>,
}

/// At most this many bytes of labels (keys and values) in a source's workload identity:
/// a token (1,024 bytes) carries them with the rest.
pub const LABEL_BUDGET: usize = 640;
/// At most this many labels of its own.
pub const MAX_LABELS: usize = 32;
/// At most this many bytes in one label value (as configuration allows).
pub const MAX_VALUE: usize = 253;

/// The network namespaces of workloads with a network of their own, served by the
/// enforcer (`crate::netns`): capture, delivery and the inbound guard there.
pub trait Networks: Send + Sync + 'static {
    /// Serves the network namespace process `pid` is in, for workload `key` (again: no
    /// change), provided the process is (still) in `cgroup` or below once its namespace is
    /// held (a pid reused by another container's process is not taken for it): the
    /// namespace's addresses, or why it cannot be served.
    fn adopt(&self, key: &str, pid: u32, cgroup: &Path) -> Result<Vec<IpAddr>, String>;
    /// Workload `key` no longer needs its namespace served.
    fn release(&self, key: &str);
}

/// One reported workload.
struct Slot {
    key: String,
    entry: Entry,
    /// The TCP ports its runtime says it serves.
    ports: Vec<u16>,
    /// Its own network namespace's addresses.
    addrs: Vec<IpAddr>,
    /// It has a network namespace of its own (then never served by port on the host's).
    own_netns: bool,
}

#[derive(Default)]
struct State {
    by_dir: HashMap<PathBuf, Slot>,
    by_key: HashMap<String, PathBuf>,
    /// Cgroups the source was asked about and knows nothing of, with when and why: a
    /// waiting connection is refused at once rather than at the end of its wait.
    unknown: HashMap<PathBuf, (Instant, String)>,
    /// When each cgroup was last asked about (at most [`MAX_QUESTIONS`] remembered).
    asked: HashMap<PathBuf, Instant>,
}

/// At most this many answers "unknown" are kept, each for [`UNKNOWN_FOR`].
const MAX_UNKNOWN: usize = 1024;
const UNKNOWN_FOR: Duration = Duration::from_secs(5);

pub struct DynamicWorkloads {
    /// The parent cgroup capture is attached to.
    root: PathBuf,
    base: Base,
    state: Mutex<State>,
    changed: Condvar,
    /// Questions to the source: "who is in this cgroup?".
    ask: tokio::sync::mpsc::Sender<PathBuf>,
    /// Where workloads with a network of their own are served (tunnel mode, once its
    /// proxy runs); without it they are refused.
    networks: OnceLock<Arc<dyn Networks>>,
    /// Cgroups under the parent a source says are not workloads (node agents).
    exempt: OnceLock<Arc<crate::nontcp::Exempt>>,
}

impl DynamicWorkloads {
    /// A registry for the workloads under `root`, and the receiving end of its questions.
    pub fn new(root: PathBuf, base: Base) -> (Arc<Self>, tokio::sync::mpsc::Receiver<PathBuf>) {
        let (ask, questions) = tokio::sync::mpsc::channel(MAX_QUESTIONS);
        let me = Arc::new(Self {
            root,
            base,
            state: Mutex::default(),
            changed: Condvar::new(),
            ask,
            networks: OnceLock::new(),
            exempt: OnceLock::new(),
        });
        (me, questions)
    }

    /// Cgroups a source exempts go into `exempt` from now on.
    pub fn serve_exemptions(&self, exempt: Arc<crate::nontcp::Exempt>) {
        let _ = self.exempt.set(exempt);
    }

    /// Workloads with a network of their own are served by `networks` from now on.
    pub fn serve_networks(&self, networks: Arc<dyn Networks>) {
        let _ = self.networks.set(networks);
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The workload cgroup below the parent that `dir` is in or below (a container's or
    /// pod's own cgroup holds its processes and any they make: the highest level the
    /// layout names a workload), `None` for the parent itself, a level above the
    /// workloads', or a directory elsewhere.
    pub fn workload_dir(&self, dir: &Path) -> Option<PathBuf> {
        let mut at = self.root.clone();
        for c in dir.strip_prefix(&self.root).ok()?.components().take(3) {
            at.push(c);
            if self
                .base
                .layout
                .is_workload(&c.as_os_str().to_string_lossy())
            {
                return Some(at);
            }
        }
        None
    }

    /// A workload the source found but will not vouch for, and why: its connections are
    /// refused with that reason until it is gone (reported down).
    pub fn refuse(&self, found: Discovered, why: String) {
        let entry = Entry::Refused(format!("{} is not enrolled: {why}", found.name));
        self.release(&found.key);
        let own_netns = found.netns_pid.is_some();
        self.put(found, entry, Vec::new(), own_netns);
    }

    /// Applies a source's report.
    pub fn apply(&self, event: SourceEvent) {
        match event {
            SourceEvent::Up(found) => {
                let mut entry = self.entry(&found);
                let mut addrs = Vec::new();
                match (&entry, found.netns_pid) {
                    (Entry::Enrolled(_), Some(pid)) => match self.networks.get() {
                        Some(networks) => match networks.adopt(&found.key, pid, &found.cgroup) {
                            Ok(a) => addrs = a,
                            Err(why) => {
                                entry = Entry::Refused(format!(
                                    "{} is not enrolled: its network namespace cannot be \
                                     served: {why}",
                                    found.name
                                ))
                            }
                        },
                        None => {
                            entry = Entry::Refused(format!(
                                "{} is not enrolled: it has a network namespace of its own, \
                                 which only tunnel mode serves (handshake mode enforces \
                                 workloads on the host's network)",
                                found.name
                            ))
                        }
                    },
                    _ => self.release(&found.key),
                }
                let key = found.key.clone();
                let own_netns = found.netns_pid.is_some();
                if !self.put(found, entry, addrs, own_netns) {
                    self.release(&key);
                }
            }
            SourceEvent::Exempt { key, cgroup } => {
                if self.workload_dir(&cgroup).as_deref() != Some(cgroup.as_path()) {
                    tracing::warn!(key = %key, cgroup = %cgroup.display(), "a source exempted a cgroup that is no workload's level under the parent: ignored");
                    return;
                }
                tracing::info!(key = %key, cgroup = %cgroup.display(), "exempt from capture (a node agent on the host's network)");
                if let Some(exempt) = self.exempt.get() {
                    exempt.insert(&key, cgroup);
                }
            }
            SourceEvent::Down { key } => {
                if let Some(exempt) = self.exempt.get() {
                    exempt.remove(&key);
                }
                let mut state = self.state.lock().expect("lock");
                if let Some(dir) = state.by_key.remove(&key) {
                    state.by_dir.remove(&dir);
                    tracing::info!(key = %key, cgroup = %dir.display(), "workload unenrolled");
                }
                drop(state);
                self.release(&key);
                self.changed.notify_all();
            }
        }
    }

    fn release(&self, key: &str) {
        if let Some(networks) = self.networks.get() {
            networks.release(key);
        }
    }

    /// Stores a report; false if it was ignored.
    fn put(&self, found: Discovered, entry: Entry, addrs: Vec<IpAddr>, own_netns: bool) -> bool {
        let mut state = self.state.lock().expect("lock");
        if self.workload_dir(&found.cgroup).as_deref() != Some(found.cgroup.as_path()) {
            tracing::warn!(
                key = %found.key,
                cgroup = %found.cgroup.display(),
                parent = %self.root.display(),
                "a source reported a workload outside its parent cgroup: ignored"
            );
            return false;
        }
        let known = state.by_key.get(&found.key).cloned();
        if known.is_none() && state.by_dir.len() >= MAX_ENTRIES {
            tracing::warn!(key = %found.key, limit = MAX_ENTRIES, "too many workloads from sources: not enrolled");
            return false;
        }
        if let Some(old) = known.filter(|d| *d != found.cgroup) {
            state.by_dir.remove(&old);
        }
        match &entry {
            Entry::Enrolled(w) => tracing::info!(
                key = %found.key,
                workload = %found.name,
                cgroup = %found.cgroup.display(),
                identity = %w.identity.labels,
                addresses = ?addrs,
                "workload enrolled"
            ),
            Entry::Refused(why) => tracing::warn!(
                key = %found.key,
                workload = %found.name,
                reason = %why,
                "workload not enrolled"
            ),
        }
        let mut replaced = None;
        if let Some(old) = state.by_dir.get(&found.cgroup)
            && old.key != found.key
        {
            let old_key = old.key.clone();
            state.by_key.remove(&old_key);
            replaced = Some(old_key);
        }
        state.by_key.insert(found.key.clone(), found.cgroup.clone());
        state.by_dir.insert(
            found.cgroup,
            Slot {
                key: found.key,
                entry,
                ports: found.ports,
                addrs,
                own_netns,
            },
        );
        drop(state);
        if let Some(old_key) = replaced {
            self.release(&old_key);
        }
        self.changed.notify_all();
        true
    }

    /// The identity of a reported workload, or why it has none.
    fn entry(&self, found: &Discovered) -> Entry {
        if let Err(why) = self.admissible(found) {
            return Entry::Refused(format!("{} is not enrolled: {why}", found.name));
        }
        if let Some((k, v)) = self
            .base
            .select
            .iter()
            .find(|(k, v)| found.labels.get(*k) != Some(*v))
        {
            return Entry::Refused(format!(
                "{} was not started with the label {k}={v} that [containers] select asks for",
                found.name
            ));
        }
        match self.identity(found) {
            Ok(identity) => Entry::Enrolled(Arc::new(LocalWorkload {
                name: found.name.clone(),
                identity,
                observe: self.base.observe,
            })),
            Err(e) => Entry::Refused(e),
        }
    }

    /// What a token can carry and policy can read: well-formed labels within bounds, and a
    /// name no configured workload has.
    fn admissible(&self, found: &Discovered) -> Result<(), String> {
        if self.base.taken_names.contains(&found.name) {
            return Err(format!(
                "its name {:?} is a configured workload's",
                found.name
            ));
        }
        if found.labels.len() > MAX_LABELS {
            return Err(format!("more than {MAX_LABELS} labels"));
        }
        for (k, v) in &found.labels {
            let key_ok = !k.is_empty()
                && k.len() <= 63
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            if !key_ok {
                return Err(format!(
                    "label key {:?} is not 1-63 letters, digits, '-', '_', '.', '/'",
                    k.escape_debug().to_string()
                ));
            }
            if v.len() > MAX_VALUE || v.chars().any(char::is_control) {
                return Err(format!(
                    "the value of label {k:?} is longer than {MAX_VALUE} bytes or holds control characters"
                ));
            }
        }
        for (k, v) in &found.derived {
            if v.len() > MAX_VALUE || v.chars().any(char::is_control) {
                return Err(format!(
                    "the runtime's {k} is longer than {MAX_VALUE} bytes or holds control characters"
                ));
            }
        }
        let size: usize = found
            .labels
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .chain(found.derived.iter().map(|(k, v)| k.len() + v.len()))
            .sum();
        if size > LABEL_BUDGET {
            return Err(format!(
                "its labels take {size} bytes, more than the {LABEL_BUDGET} an identity token carries"
            ));
        }
        Ok(())
    }

    fn identity(&self, found: &Discovered) -> Result<Identity, String> {
        let b = &self.base;
        let mut id = crate::attest::workload_identity(
            &b.trust_domain,
            &b.enforcer,
            &b.host,
            &found.name,
            &found.cgroup,
            found.labels.clone(),
        );
        let mut labels: BTreeMap<String, String> = id
            .labels
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        for (k, v) in &found.derived {
            labels.insert((*k).to_owned(), v.clone());
        }
        id.labels = Labels::new(labels);
        tessera_proxy::identity::scope::stamp(id, &b.scope)
            .map_err(|e| format!("{}: label {e}", found.name))
    }

    /// The source's answer for a cgroup it knows nothing of: connections waiting on it are
    /// refused now, with `why`.
    pub fn refuse_unknown(&self, dir: &Path, why: &str) {
        let mut state = self.state.lock().expect("lock");
        let now = Instant::now();
        state
            .unknown
            .retain(|_, (at, _)| now.duration_since(*at) < UNKNOWN_FOR);
        if state.unknown.len() < MAX_UNKNOWN {
            state
                .unknown
                .insert(dir.to_owned(), (now, format!("{}: {why}", dir.display())));
        }
        drop(state);
        self.changed.notify_all();
    }

    /// What is known of the workload in `dir` (a directory from [`Self::workload_dir`]).
    pub fn get(&self, dir: &Path) -> Option<Entry> {
        let state = self.state.lock().expect("lock");
        state.by_dir.get(dir).map(|s| s.entry.clone())
    }

    /// The workload in `dir`, asking the source and waiting up to `wait` if nobody has
    /// reported it yet. Blocks: call it where blocking is allowed.
    pub fn resolve(&self, dir: &Path, wait: Duration) -> Entry {
        if let Some(e) = self.get(dir) {
            return e;
        }
        let asked = Instant::now();
        // One question per cgroup a second: a burst of connections from a new container
        // asks once, and all of them wait for the one answer.
        let ask = {
            let mut state = self.state.lock().expect("lock");
            let recent = state
                .asked
                .get(dir)
                .is_some_and(|at| asked.duration_since(*at) < Duration::from_secs(1));
            if !recent {
                if state.asked.len() >= MAX_QUESTIONS {
                    state
                        .asked
                        .retain(|_, at| asked.duration_since(*at) < Duration::from_secs(1));
                }
                if state.asked.len() < MAX_QUESTIONS {
                    state.asked.insert(dir.to_owned(), asked);
                }
            }
            !recent
        };
        if ask && self.ask.try_send(dir.to_owned()).is_err() {
            tracing::debug!(cgroup = %dir.display(), "source busy: waiting for its reports only");
        }
        let deadline = asked + wait;
        let mut state = self.state.lock().expect("lock");
        loop {
            if let Some(s) = state.by_dir.get(dir) {
                return s.entry.clone();
            }
            // An answer to this question, or to one asked for this cgroup just before.
            if let Some((at, why)) = state.unknown.get(dir)
                && *at + Duration::from_secs(1) >= asked
            {
                return Entry::Refused(why.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Entry::Refused(format!(
                    "the container runtime did not say who is in {} within {} ms",
                    dir.display(),
                    wait.as_millis()
                ));
            }
            state = self.changed.wait_timeout(state, left).expect("lock").0;
        }
    }

    /// The enrolled workload on the host's network that serves `port`: the one whose
    /// runtime says it exposes it, if exactly one does (two claiming one port: neither,
    /// refused as not served).
    pub fn serving(&self, port: u16) -> Option<Arc<LocalWorkload>> {
        if !self.base.ports.contains(&port) {
            return None;
        }
        let state = self.state.lock().expect("lock");
        let mut found = state.by_dir.values().filter_map(|s| match &s.entry {
            Entry::Enrolled(w) if !s.own_netns && s.ports.contains(&port) => Some(w.clone()),
            _ => None,
        });
        let first = found.next()?;
        if found.next().is_some() {
            tracing::warn!(
                port,
                "several containers say they serve this port: none is delivered to"
            );
            return None;
        }
        Some(first)
    }

    /// The enrolled workload with a network of its own that has `dst`'s address and says it
    /// serves its port (one of `[containers] ports`).
    pub fn serving_at(&self, dst: SocketAddr) -> Option<Arc<LocalWorkload>> {
        if !self.base.ports.contains(&dst.port()) {
            return None;
        }
        let ip = dst.ip().to_canonical();
        let state = self.state.lock().expect("lock");
        let mut found = state.by_dir.values().filter_map(|s| match &s.entry {
            Entry::Enrolled(w) if s.addrs.contains(&ip) && s.ports.contains(&dst.port()) => {
                Some(w.clone())
            }
            _ => None,
        });
        let first = found.next()?;
        // Two at one address and port (containers sharing a namespace): neither.
        found.next().is_none().then_some(first)
    }

    /// How many workloads are known (enrolled or refused).
    pub fn len(&self) -> usize {
        self.state.lock().expect("lock").by_dir.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies every report from `events` until the sources are gone.
    pub async fn follow(self: Arc<Self>, mut events: tokio::sync::mpsc::Receiver<SourceEvent>) {
        while let Some(event) = events.recv().await {
            self.apply(event);
        }
    }
}

impl tessera_proxy::local::DynamicServices for DynamicWorkloads {
    fn workload(&self, port: u16) -> Option<Arc<LocalWorkload>> {
        self.serving(port)
    }

    fn at_address(&self, dst: SocketAddr) -> Option<Arc<LocalWorkload>> {
        self.serving_at(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proxy::identity::reserved;

    fn base() -> Base {
        Base {
            layout: Layout::Containers,
            trust_domain: "td".into(),
            enforcer: "host-a".into(),
            host: "h".into(),
            scope: BTreeMap::from([("site".to_string(), "paris".to_string())]),
            select: BTreeMap::from([("tier".to_string(), "web".to_string())]),
            observe: false,
            ports: vec![8080, 9090],
            taken_names: vec!["web".into()],
        }
    }

    fn found(key: &str, dir: &str, labels: &[(&str, &str)]) -> Discovered {
        Discovered::new(
            key.into(),
            format!("ctr-{key}"),
            PathBuf::from(dir),
            labels.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            BTreeMap::from([(reserved::IMAGE_DIGEST, "sha256:abc".to_string())]),
            vec![],
        )
    }

    #[test]
    fn runtime_facts_win_over_declared_labels_and_the_scope_is_stamped() {
        let (reg, _q) = DynamicWorkloads::new("/cg/p".into(), base());
        reg.apply(SourceEvent::Up(found(
            "a",
            "/cg/p/libpod-a",
            &[
                ("tier", "web"),
                ("tessera.io/image-digest", "sha256:forged"),
                ("tessera.io/workload", "admin"),
            ],
        )));
        let Some(Entry::Enrolled(w)) = reg.get(Path::new("/cg/p/libpod-a")) else {
            panic!("not enrolled")
        };
        let l = &w.identity.labels;
        assert_eq!(l.get(reserved::IMAGE_DIGEST), Some("sha256:abc"));
        assert_eq!(l.get(reserved::WORKLOAD), Some("ctr-a"));
        assert_eq!(l.get("site"), Some("paris"));
        assert_eq!(l.get("tier"), Some("web"));
    }

    #[test]
    fn unselected_containers_are_refused_with_the_reason_and_go_when_down() {
        let (reg, _q) = DynamicWorkloads::new("/cg/p".into(), base());
        reg.apply(SourceEvent::Up(found("b", "/cg/p/libpod-b", &[])));
        match reg.get(Path::new("/cg/p/libpod-b")) {
            Some(Entry::Refused(why)) => assert!(why.contains("tier=web"), "{why}"),
            other => panic!("{other:?}"),
        }
        reg.apply(SourceEvent::Down { key: "b".into() });
        assert!(reg.is_empty());
        // A declared scope label with another value is out of scope: refused, not enrolled.
        reg.apply(SourceEvent::Up(found(
            "c",
            "/cg/p/libpod-c",
            &[("tier", "web"), ("site", "tokyo")],
        )));
        assert!(matches!(
            reg.get(Path::new("/cg/p/libpod-c")),
            Some(Entry::Refused(_))
        ));
    }

    #[test]
    fn reports_outside_the_parent_are_ignored_and_sub_cgroups_map_to_their_container() {
        let (reg, _q) = DynamicWorkloads::new("/cg/p".into(), base());
        reg.apply(SourceEvent::Up(found(
            "x",
            "/cg/other/libpod-x",
            &[("tier", "web")],
        )));
        reg.apply(SourceEvent::Up(found(
            "y",
            "/cg/p/libpod-y/inner",
            &[("tier", "web")],
        )));
        assert!(reg.is_empty());
        assert_eq!(
            reg.workload_dir(Path::new("/cg/p/libpod-y/inner/deeper")),
            Some(PathBuf::from("/cg/p/libpod-y"))
        );
        assert_eq!(reg.workload_dir(Path::new("/cg/p")), None);
        assert_eq!(reg.workload_dir(Path::new("/cg/q/x")), None);
    }

    #[test]
    fn a_pods_processes_map_to_its_pod_level_whatever_the_qos_class_and_driver() {
        let pods = Base {
            layout: Layout::Pods,
            ..base()
        };
        let (reg, _q) = DynamicWorkloads::new("/cg/kubepods.slice".into(), pods);
        let dir = |p: &str| {
            reg.workload_dir(Path::new(p))
                .map(|d| d.display().to_string())
        };
        // systemd driver: Guaranteed one level down, the others below their QoS class.
        assert_eq!(
            dir("/cg/kubepods.slice/kubepods-pod1_2.slice/cri-containerd-a.scope"),
            Some("/cg/kubepods.slice/kubepods-pod1_2.slice".into())
        );
        assert_eq!(
            dir(
                "/cg/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1_2.slice/cri-containerd-a.scope/sub"
            ),
            Some(
                "/cg/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1_2.slice"
                    .into()
            )
        );
        // cgroupfs driver.
        assert_eq!(
            dir("/cg/kubepods.slice/besteffort/pod1-2/abc"),
            Some("/cg/kubepods.slice/besteffort/pod1-2".into())
        );
        // A QoS class's own cgroup, the root, or a level no pod is at: nobody's.
        assert_eq!(dir("/cg/kubepods.slice/kubepods-besteffort.slice"), None);
        assert_eq!(dir("/cg/kubepods.slice"), None);
        assert_eq!(dir("/cg/kubepods.slice/a/b/c/d"), None);
    }

    /// A network that records what it was asked to serve.
    #[derive(Default)]
    struct Served(Mutex<Vec<String>>);

    impl Networks for Served {
        fn adopt(&self, key: &str, pid: u32, _cgroup: &Path) -> Result<Vec<IpAddr>, String> {
            if pid == 0 {
                return Err("no such process".into());
            }
            self.0.lock().unwrap().push(format!("+{key}"));
            Ok(vec!["10.1.0.7".parse().unwrap()])
        }
        fn release(&self, key: &str) {
            self.0.lock().unwrap().push(format!("-{key}"));
        }
    }

    #[test]
    fn workloads_with_a_network_of_their_own_are_served_there_or_refused() {
        let (reg, _q) = DynamicWorkloads::new("/cg/p".into(), base());
        let tier = [("tier", "web")];
        let mut own = found("x", "/cg/p/libpod-x", &tier).in_netns_of(42);
        own.ports = vec![8080];
        // Without a network server (handshake mode): refused, with the reason.
        reg.apply(SourceEvent::Up(own.clone()));
        match reg.get(Path::new("/cg/p/libpod-x")) {
            Some(Entry::Refused(why)) => assert!(why.contains("only tunnel mode"), "{why}"),
            other => panic!("{other:?}"),
        }
        let served = Arc::new(Served::default());
        reg.serve_networks(served.clone());
        reg.apply(SourceEvent::Up(own.clone()));
        assert!(matches!(
            reg.get(Path::new("/cg/p/libpod-x")),
            Some(Entry::Enrolled(_))
        ));
        // Reached at its own address only, not by port on the host's.
        assert!(reg.serving_at("10.1.0.7:8080".parse().unwrap()).is_some());
        assert!(reg.serving_at("10.1.0.8:8080".parse().unwrap()).is_none());
        assert!(reg.serving(8080).is_none());
        // Its namespace cannot be served: refused.
        let gone = found("z", "/cg/p/libpod-z", &tier).in_netns_of(0);
        reg.apply(SourceEvent::Up(gone));
        assert!(matches!(
            reg.get(Path::new("/cg/p/libpod-z")),
            Some(Entry::Refused(_))
        ));
        // Down: released.
        reg.apply(SourceEvent::Down {
            key: own.key.clone(),
        });
        let log = served.0.lock().unwrap().clone();
        assert_eq!(log.first().map(String::as_str), Some("+x"));
        assert!(log.contains(&"-x".to_string()), "{log:?}");
    }

    #[test]
    fn an_unknown_cgroup_asks_the_source_and_waits_bounded() {
        let (reg, mut q) = DynamicWorkloads::new("/cg/p".into(), base());
        let r = reg.clone();
        let answer = std::thread::spawn(move || {
            let asked = q.blocking_recv().expect("a question");
            r.apply(SourceEvent::Up(found(
                "z",
                asked.to_str().unwrap(),
                &[("tier", "web")],
            )));
            q
        });
        let e = reg.resolve(Path::new("/cg/p/libpod-z"), Duration::from_secs(10));
        assert!(matches!(e, Entry::Enrolled(_)), "{e:?}");
        let _q = answer.join().unwrap();
        // Nobody answers: refused once the wait is over, with the reason.
        let started = Instant::now();
        match reg.resolve(Path::new("/cg/p/libpod-none"), Duration::from_millis(100)) {
            Entry::Refused(why) => assert!(why.contains("did not say"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn a_port_is_served_by_the_one_enrolled_container_that_exposes_it() {
        let (reg, _q) = DynamicWorkloads::new("/cg/p".into(), base());
        let mut a = found("a", "/cg/p/a", &[("tier", "web")]);
        a.ports = vec![8080, 22];
        reg.apply(SourceEvent::Up(a.clone()));
        assert_eq!(reg.serving(8080).unwrap().name, "ctr-a");
        assert!(reg.serving(9090).is_none());
        // A port outside [containers] ports is nobody's to claim.
        assert!(reg.serving(22).is_none());
        // Not selected: serves nothing.
        let mut b = found("b", "/cg/p/b", &[]);
        b.ports = vec![9090];
        reg.apply(SourceEvent::Up(b));
        assert!(reg.serving(9090).is_none());
        // Two claim one port: neither is delivered to.
        let mut c = found("c", "/cg/p/c", &[("tier", "web")]);
        c.ports = vec![8080];
        reg.apply(SourceEvent::Up(c));
        assert!(reg.serving(8080).is_none());
        reg.apply(SourceEvent::Down { key: "c".into() });
        assert_eq!(reg.serving(8080).unwrap().name, "ctr-a");
    }

    #[test]
    fn labels_a_token_cannot_carry_or_a_taken_name_refuse_the_workload() {
        let (reg, _q) = DynamicWorkloads::new("/cg/p".into(), base());
        let refused = |f: Discovered| {
            let dir = f.cgroup.clone();
            reg.apply(SourceEvent::Up(f));
            match reg.get(&dir) {
                Some(Entry::Refused(why)) => why,
                other => panic!("{other:?}"),
            }
        };
        let long = "a".repeat(300);
        let why = refused(found("l", "/cg/p/l", &[("tier", "web"), ("note", &long)]));
        assert!(why.contains("\"note\" is longer than 253"), "{why}");
        let why = refused(found("k", "/cg/p/k", &[("tier", "web"), ("bad key", "x")]));
        assert!(why.contains("label key \"bad key\""), "{why}");
        let why = refused(found(
            "n",
            "/cg/p/n",
            &[("tier", "web"), ("x", "a\nfake log line")],
        ));
        assert!(why.contains("control characters"), "{why}");
        let many: Vec<(String, String)> =
            (0..20).map(|i| (format!("k{i}"), "v".repeat(40))).collect();
        let mut big = found("b", "/cg/p/b", &[("tier", "web")]);
        big.labels.extend(many);
        let why = refused(big);
        assert!(why.contains("more than the 640"), "{why}");
        let mut named = found("w", "/cg/p/w", &[("tier", "web")]);
        named.name = "web".into();
        let why = refused(named);
        assert!(why.contains("is a configured workload's"), "{why}");
    }

    #[test]
    fn a_burst_from_one_cgroup_asks_once() {
        let (reg, q) = DynamicWorkloads::new("/cg/p".into(), base());
        for _ in 0..50 {
            let _ = reg.resolve(Path::new("/cg/p/libpod-burst"), Duration::from_millis(0));
        }
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn a_flood_of_questions_and_reports_stays_bounded() {
        let (reg, q) = DynamicWorkloads::new("/cg/p".into(), base());
        for i in 0..(MAX_QUESTIONS + 50) {
            let _ = reg.resolve(
                Path::new(&format!("/cg/p/libpod-{i}")),
                Duration::from_millis(0),
            );
        }
        assert_eq!(q.len(), MAX_QUESTIONS);
        for i in 0..(MAX_ENTRIES + 10) {
            reg.apply(SourceEvent::Up(found(
                &format!("k{i}"),
                &format!("/cg/p/c{i}"),
                &[("tier", "web")],
            )));
        }
        assert_eq!(reg.len(), MAX_ENTRIES);
        // A known workload's update still applies at the limit.
        reg.apply(SourceEvent::Up(found("k0", "/cg/p/c0", &[])));
        assert!(matches!(
            reg.get(Path::new("/cg/p/c0")),
            Some(Entry::Refused(_))
        ));
    }
}
