//! The Kubernetes pod source: the pods the API server has scheduled on this node, enrolled
//! by pod UID under the kubelet's pod cgroup, with identity from what the API server says.
//!
//! * [`pod_workload`] is the pure part: one `Pod` and this node's [`KubeSettings`] to a
//!   [`Discovered`] (or the reason it is not a workload here, [`Skip`]).
//! * [`Tracker`] turns the watcher's events into [`SourceEvent`]s: an `Up` only when what a
//!   pod is changed, a `Down` when it is deleted, stops running, or is missing from a
//!   re-list, and never more than `max_pods` workloads at once.
//! * [`run`] watches `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>` with kube-rs's
//!   watcher (list, then watch from the list's resource version; on a watch error such as
//!   410 Gone it lists again, with exponential backoff) and feeds the tracker.
//!
//! Identity (every value from the API server, none from inside the pod):
//!
//! | label | from |
//! |---|---|
//! | pod labels | `metadata.labels`, minus `tessera.io/` keys (dropped by [`Discovered::new`]) and keys or values the policy language cannot name |
//! | `tessera.io/namespace`, `tessera.io/pod`, `tessera.io/pod-uid` | `metadata` |
//! | `tessera.io/service-account` | `ns/<namespace>/sa/<spec.serviceAccountName>` |
//! | `tessera.io/image-digest` | `status.containerStatuses[].imageID`, the part after `@` |
//! | `tessera.io/image` | `status.containerStatuses[].image` when every container runs the same one |
//!
//! The service account is in the SPIFFE path form Kubernetes meshes use
//! (`spiffe://<td>/ns/<ns>/sa/<sa>`): a service account's name alone means nothing, since
//! every namespace has a `default`; with its namespace it names one account. A pod with
//! several containers carries the *set* of their digests: distinct digests, sorted, joined
//! by `/` (digests never contain `/`), so `tessera.io/image-digest=sha256:<a>` matches only
//! a pod whose every container runs image `a`. If any container's digest is not known yet
//! (no `@sha256:` in its `imageID`), the label is absent rather than partial: a partial
//! list would let a pod pass for the images it was known to run.
//!
//! Pods skipped (never enrolled): not `Running` (before that the containers have no image
//! digests; capture at the kubelet's parent cgroup holds their connections until the pod is
//! reported — see the module above), and `hostNetwork: true` pods: they share the node's
//! network namespace and are node agents (kube-proxy, CNI daemons, this enforcer itself),
//! whose capture would put the node's own networking behind the policy; they stay outside,
//! as host processes do.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::{Component, Path, PathBuf},
};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use serde::{Deserialize, Serialize};
use tessera_proxy::identity::reserved;
use tokio::sync::mpsc;

use super::{Discovered, SourceEvent};

/// How the kubelet names pod cgroups (its `--cgroup-driver`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// `kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _ for ->.slice` (kubeadm's
    /// default since Kubernetes 1.22).
    #[default]
    Systemd,
    /// `<qos>/pod<uid>`.
    Cgroupfs,
}

/// The optional `[kubernetes]` section of the enforcer's configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubeSettings {
    /// This node's name (`spec.nodeName` of its pods). Default: `$NODE_NAME`, which the
    /// DaemonSet sets from the downward API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The kubelet's pod cgroup root as the enforcer sees it: `kubepods.slice` (systemd) or
    /// `kubepods` (cgroupfs) under the cgroup v2 mount.
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: PathBuf,
    #[serde(default)]
    pub cgroup_driver: CgroupDriver,
    /// Only pods matching this label selector (the API server's syntax) are enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<String>,
    /// At most this many pods are enrolled at once (kubelet's default `--max-pods` is 110);
    /// more are refused with a warning, and stay captured but unenrolled (refused).
    #[serde(default = "default_max_pods")]
    pub max_pods: usize,
}

fn default_cgroup_root() -> PathBuf {
    PathBuf::from("/sys/fs/cgroup/kubepods.slice")
}

fn default_max_pods() -> usize {
    1024
}

impl Default for KubeSettings {
    fn default() -> Self {
        Self {
            node: None,
            cgroup_root: default_cgroup_root(),
            cgroup_driver: CgroupDriver::default(),
            label_selector: None,
            max_pods: default_max_pods(),
        }
    }
}

/// A `[kubernetes]` setting that cannot work, by field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("kubernetes: {field}: {message}")]
pub struct SettingsError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError {
        field,
        message: message.into(),
    }
}

impl KubeSettings {
    /// Checks every field (not the node name from the environment: [`Self::node_name`]).
    pub fn validate(&self) -> Result<(), SettingsError> {
        if let Some(node) = &self.node {
            check_node_name(node).map_err(|m| bad("node", m))?;
        }
        let root = &self.cgroup_root;
        if !root.is_absolute() || root.components().any(|c| c == Component::ParentDir) {
            return Err(bad(
                "cgroup_root",
                format!("{} must be an absolute path without ..", root.display()),
            ));
        }
        if let Some(sel) = &self.label_selector
            && (sel.trim().is_empty() || sel.len() > 1024 || sel.chars().any(char::is_control))
        {
            return Err(bad(
                "label_selector",
                "must be a non-empty selector of at most 1024 characters",
            ));
        }
        if self.max_pods == 0 || self.max_pods > 65_536 {
            return Err(bad("max_pods", "must be between 1 and 65536"));
        }
        Ok(())
    }

    /// `node`, or else `$NODE_NAME`.
    pub fn node_name(&self) -> Result<String, SettingsError> {
        let node = match &self.node {
            Some(n) => n.clone(),
            None => std::env::var("NODE_NAME").map_err(|_| {
                bad(
                    "node",
                    "not set, and NODE_NAME is not in the environment (the DaemonSet sets it \
                     from spec.nodeName)",
                )
            })?,
        };
        check_node_name(&node).map_err(|m| bad("node", m))?;
        Ok(node)
    }
}

/// A node name is a DNS subdomain: it goes into a field selector as is.
fn check_node_name(node: &str) -> Result<(), String> {
    if node.is_empty()
        || node.len() > 253
        || !node
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err(format!(
            "{node:?} is not a node name (1-253 lowercase letters, digits, '-', '.')"
        ));
    }
    Ok(())
}

/// Why a pod is not a workload of this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Phase other than `Running` (`Pending`, `Succeeded`, `Failed`, `Unknown`).
    NotRunning(String),
    /// `spec.hostNetwork: true`: a node agent in the node's network namespace.
    HostNetwork,
    /// Scheduled elsewhere (the field selector should have kept it away).
    OtherNode(String),
    /// Something the API server always sets is missing or unusable: warn, skip.
    Malformed(String),
}

/// The name of a pod's workload: `<namespace>.<pod>` (a namespace is a DNS label, so the
/// first `.` separates the two), valid as a workload name (1-63 of letters, digits, `-`,
/// `.`, `_`). Longer ones keep their first 54 characters and end in `-` and the first 8
/// characters of the UID, which keeps them apart.
pub fn workload_name(namespace: &str, pod: &str, uid: &str) -> String {
    let full = format!("{namespace}.{pod}");
    if full.len() <= 63 {
        return full;
    }
    let head: String = full.chars().take(54).collect();
    let tail: String = uid.chars().filter(|c| *c != '-').take(8).collect();
    format!("{}-{tail}", head.trim_end_matches(['.', '-']))
}

/// The pod's cgroup v2 directory under the kubelet's root.
pub fn pod_cgroup(
    root: &Path,
    driver: CgroupDriver,
    qos: &str,
    uid: &str,
) -> Result<PathBuf, String> {
    let qos = match qos {
        "Guaranteed" => None,
        "Burstable" => Some("burstable"),
        "BestEffort" => Some("besteffort"),
        other => return Err(format!("status.qosClass {other:?} is not a QoS class")),
    };
    Ok(match (driver, qos) {
        (CgroupDriver::Systemd, None) => {
            root.join(format!("kubepods-pod{}.slice", uid.replace('-', "_")))
        }
        (CgroupDriver::Systemd, Some(q)) => root
            .join(format!("kubepods-{q}.slice"))
            .join(format!("kubepods-{q}-pod{}.slice", uid.replace('-', "_"))),
        (CgroupDriver::Cgroupfs, None) => root.join(format!("pod{uid}")),
        (CgroupDriver::Cgroupfs, Some(q)) => root.join(q).join(format!("pod{uid}")),
    })
}

/// A UID as the API server makes them (a UUID): it becomes a path component.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= 64 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// What a label key or value may be to be named in policy (`policy/src/selector.rs`) and
/// carried in a token (at most 253 bytes).
fn policy_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 253
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn policy_value(v: &str) -> bool {
    v.len() <= 253
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@".contains(c))
}

/// `sha256:<64 hex>` from an `imageID` (`docker.io/library/nginx@sha256:…`,
/// `docker-pullable://nginx@sha256:…`). A bare `sha256:` is the local image id, not a
/// manifest digest: not known.
fn image_digest(image_id: &str) -> Option<String> {
    let (_, digest) = image_id.rsplit_once('@')?;
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| format!("sha256:{}", hex.to_ascii_lowercase()))
}

/// The workload a pod is on this node, from what the API server says of it.
pub fn pod_workload(pod: &Pod, node: &str, settings: &KubeSettings) -> Result<Discovered, Skip> {
    let malformed = |m: &str| Skip::Malformed(m.to_owned());
    let meta = &pod.metadata;
    let uid = meta
        .uid
        .as_deref()
        .ok_or_else(|| malformed("no metadata.uid"))?;
    if !valid_uid(uid) {
        return Err(Skip::Malformed(format!(
            "metadata.uid {uid:?} is not a UID"
        )));
    }
    let name = meta
        .name
        .as_deref()
        .ok_or_else(|| malformed("no metadata.name"))?;
    let namespace = meta
        .namespace
        .as_deref()
        .ok_or_else(|| malformed("no metadata.namespace"))?;
    let workload = workload_name(namespace, name, uid);
    if !workload
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
    {
        return Err(Skip::Malformed(format!(
            "{namespace}/{name}: not a namespace and pod name"
        )));
    }
    let spec = pod.spec.as_ref().ok_or_else(|| malformed("no spec"))?;
    let status = pod.status.as_ref().ok_or_else(|| malformed("no status"))?;
    match spec.node_name.as_deref() {
        Some(n) if n == node => {}
        other => return Err(Skip::OtherNode(other.unwrap_or("").to_owned())),
    }
    if spec.host_network == Some(true) {
        return Err(Skip::HostNetwork);
    }
    let phase = status.phase.as_deref().unwrap_or("");
    if phase != "Running" {
        return Err(Skip::NotRunning(phase.to_owned()));
    }
    let qos = status
        .qos_class
        .as_deref()
        .ok_or_else(|| malformed("no status.qosClass"))?;
    let cgroup = pod_cgroup(&settings.cgroup_root, settings.cgroup_driver, qos, uid)
        .map_err(Skip::Malformed)?;

    let mut derived = BTreeMap::new();
    derived.insert(reserved::POD_UID, uid.to_owned());
    derived.insert(reserved::POD_NAME, name.to_owned());
    derived.insert(reserved::NAMESPACE, namespace.to_owned());
    if let Some(sa) = spec.service_account_name.as_deref() {
        let v = format!("ns/{namespace}/sa/{sa}");
        if policy_value(&v) {
            derived.insert(reserved::SERVICE_ACCOUNT, v);
        }
    }
    let statuses = status.container_statuses.as_deref().unwrap_or_default();
    // Every app container's digest, or none: see the module's doc.
    let digests: Option<BTreeSet<String>> = (!statuses.is_empty())
        .then(|| statuses.iter().map(|c| image_digest(&c.image_id)).collect())
        .flatten();
    if let Some(d) = digests {
        let v = d.into_iter().collect::<Vec<_>>().join("/");
        if policy_value(&v) {
            derived.insert(reserved::IMAGE_DIGEST, v);
        } else {
            tracing::warn!(pod = %format!("{namespace}/{name}"), "image digests do not fit one label (253 bytes); tessera.io/image-digest left out");
        }
    }
    let images: BTreeSet<&str> = statuses.iter().map(|c| c.image.as_str()).collect();
    if images.len() == 1 {
        let image = images.into_iter().next().expect("one");
        if policy_value(image) && !image.is_empty() {
            derived.insert(reserved::IMAGE, image.to_owned());
        }
    }

    let labels = meta
        .labels
        .iter()
        .flatten()
        .filter(|(k, v)| {
            let ok = reserved::is_reserved(k) || (policy_key(k) && policy_value(v));
            if !ok {
                tracing::warn!(pod = %format!("{namespace}/{name}"), key = %k, "pod label cannot be named in policy; left out");
            }
            ok
        })
        .map(|(k, v)| (k.clone(), v.clone()));

    let mut ports: Vec<u16> = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| u16::try_from(p.container_port).ok().filter(|p| *p != 0))
        .collect();
    ports.sort_unstable();
    ports.dedup();

    Ok(Discovered::new(
        format!("pod:{uid}"),
        workload,
        cgroup,
        labels,
        derived,
        ports,
    ))
}

/// The pods reported so far, and the events that keep a consumer in step with them.
#[derive(Debug)]
pub struct Tracker {
    node: String,
    settings: KubeSettings,
    reported: HashMap<String, Discovered>,
    /// `hostNetwork` pods reported exempt, by key: their cgroups.
    exempt: HashMap<String, PathBuf>,
    /// During a (re-)list: the keys listed so far.
    listing: Option<HashSet<String>>,
}

impl Tracker {
    pub fn new(node: String, settings: KubeSettings) -> Self {
        Self {
            node,
            settings,
            reported: HashMap::new(),
            exempt: HashMap::new(),
            listing: None,
        }
    }

    /// How many workloads are up (at most `max_pods`).
    pub fn len(&self) -> usize {
        self.reported.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reported.is_empty()
    }

    /// One event of the watcher, to what the consumer must hear (at most one event for an
    /// applied or deleted pod; one `Down` per pod gone at the end of a re-list).
    pub fn handle(&mut self, event: watcher::Event<Pod>) -> Vec<SourceEvent> {
        match event {
            watcher::Event::Init => {
                self.listing = Some(HashSet::new());
                vec![]
            }
            watcher::Event::InitApply(pod) => self.apply(&pod, true),
            watcher::Event::Apply(pod) => self.apply(&pod, false),
            watcher::Event::Delete(pod) => self.delete(&pod),
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let mut gone: Vec<String> = self
                    .reported
                    .keys()
                    .chain(self.exempt.keys())
                    .filter(|k| !listed.contains(*k))
                    .cloned()
                    .collect();
                gone.sort();
                gone.into_iter()
                    .map(|key| {
                        self.reported.remove(&key);
                        self.exempt.remove(&key);
                        SourceEvent::Down { key }
                    })
                    .collect()
            }
        }
    }

    fn apply(&mut self, pod: &Pod, listing: bool) -> Vec<SourceEvent> {
        let what = pod_ref(pod);
        match pod_workload(pod, &self.node, &self.settings) {
            Ok(d) => {
                if listing && let Some(l) = self.listing.as_mut() {
                    l.insert(d.key.clone());
                }
                if self.reported.get(&d.key) == Some(&d) {
                    return vec![];
                }
                if !self.reported.contains_key(&d.key)
                    && self.reported.len() >= self.settings.max_pods
                {
                    tracing::warn!(pod = %what, max_pods = self.settings.max_pods, "too many pods on this node; not enrolled");
                    return vec![];
                }
                tracing::debug!(pod = %what, key = %d.key, cgroup = %d.cgroup.display(), "pod up");
                self.reported.insert(d.key.clone(), d.clone());
                vec![SourceEvent::Up(d)]
            }
            Err(Skip::HostNetwork) => self.exempt_host_network(pod, listing),
            Err(skip) => {
                if let Skip::Malformed(why) = &skip {
                    tracing::warn!(pod = %what, reason = %why, "pod skipped: malformed");
                } else {
                    tracing::debug!(pod = %what, reason = ?skip, "pod not enrolled");
                }
                self.forget(pod)
            }
        }
    }

    /// A `hostNetwork` pod of this node: a node agent, exempt from capture (its cgroup is
    /// under the kubelet's root, where capture is attached).
    fn exempt_host_network(&mut self, pod: &Pod, listing: bool) -> Vec<SourceEvent> {
        let on_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&self.node);
        let uid = pod.metadata.uid.as_deref().filter(|u| valid_uid(u));
        let qos = pod.status.as_ref().and_then(|s| s.qos_class.as_deref());
        let (Some(uid), Some(qos), true) = (uid, qos, on_node) else {
            return vec![];
        };
        let Ok(cgroup) = pod_cgroup(
            &self.settings.cgroup_root,
            self.settings.cgroup_driver,
            qos,
            uid,
        ) else {
            return vec![];
        };
        let key = format!("pod:{uid}");
        if listing && let Some(l) = self.listing.as_mut() {
            l.insert(key.clone());
        }
        if self.exempt.get(&key) == Some(&cgroup)
            || (!self.exempt.contains_key(&key) && self.exempt.len() >= self.settings.max_pods)
        {
            return vec![];
        }
        tracing::debug!(pod = %pod_ref(pod), key = %key, "hostNetwork pod: exempt");
        self.exempt.insert(key.clone(), cgroup.clone());
        vec![SourceEvent::Exempt { key, cgroup }]
    }

    fn delete(&mut self, pod: &Pod) -> Vec<SourceEvent> {
        self.forget(pod)
    }

    fn forget(&mut self, pod: &Pod) -> Vec<SourceEvent> {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return vec![];
        };
        let key = format!("pod:{uid}");
        if self.reported.remove(&key).is_some() | self.exempt.remove(&key).is_some() {
            tracing::debug!(pod = %pod_ref(pod), key = %key, "pod down");
            vec![SourceEvent::Down { key }]
        } else {
            vec![]
        }
    }
}

fn pod_ref(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("?"),
        pod.metadata.name.as_deref().unwrap_or("?")
    )
}

/// The watcher's configuration: this node's pods only (and the label selector).
pub fn watch_config(node: &str, settings: &KubeSettings) -> watcher::Config {
    let mut config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    if let Some(sel) = &settings.label_selector {
        config = config.labels(sel);
    }
    config
}

/// The source ended: the consumer hung up.
#[derive(Debug, thiserror::Error)]
#[error("the kubernetes source's consumer is gone")]
pub struct Closed;

/// Follows this node's pods for `registry` (the enforcer's `[containers] runtime =
/// "kubernetes"`): a client for the API server from the environment (in a pod its service
/// account, elsewhere `KUBECONFIG`), the watch ([`run`]), and each pod's network namespace
/// (pods have their own) found from a process in its cgroup. A pod reported before any of
/// its processes is in its cgroup is looked at again every second until one is. Questions
/// about cgroups nobody reported are not answered here: a connection from a pod waits for
/// the watch's report (bounded by `wait_ms`).
pub async fn follow(
    settings: KubeSettings,
    node: String,
    registry: std::sync::Arc<super::dynamic::DynamicWorkloads>,
    questions: &mut mpsc::Receiver<PathBuf>,
) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("kubernetes: no client for the API server: {e}"))?;
    let (tx, mut rx) = mpsc::channel(256);
    let max = settings.max_pods;
    let watching = tokio::spawn(run(client, node, settings, tx));
    let mut waiting: HashMap<String, Discovered> = HashMap::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let apply = |found: Discovered, waiting: &mut HashMap<String, Discovered>| match first_pid(
        &found.cgroup,
    ) {
        Some(pid) => {
            waiting.remove(&found.key);
            registry.apply(SourceEvent::Up(found.in_netns_of(pid)));
        }
        None => {
            if waiting.len() < max {
                waiting.insert(found.key.clone(), found.clone());
            }
            registry.refuse(found, "no process is in its cgroup yet".into());
        }
    };
    let ended = loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(SourceEvent::Up(found)) => apply(found, &mut waiting),
                Some(SourceEvent::Down { key }) => {
                    waiting.remove(&key);
                    registry.apply(SourceEvent::Down { key });
                }
                Some(exempt @ SourceEvent::Exempt { .. }) => registry.apply(exempt),
                None => break "the pod watch ended",
            },
            _ = tick.tick(), if !waiting.is_empty() => {
                for found in waiting.values().cloned().collect::<Vec<_>>() {
                    if first_pid(&found.cgroup).is_some() {
                        apply(found, &mut waiting);
                    }
                }
            }
            Some(dir) = questions.recv() => {
                tracing::debug!(cgroup = %dir.display(), "a connection waits for its pod's report");
            }
        }
    };
    watching.abort();
    Err(anyhow::anyhow!("kubernetes: {ended}"))
}

/// A process in cgroup `dir` or below it (a pod's containers are one level down).
fn first_pid(dir: &Path) -> Option<u32> {
    fn walk(dir: &Path, depth: usize) -> Option<u32> {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
            return Some(pid);
        }
        if depth == 0 {
            return None;
        }
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .find_map(|e| walk(&e.path(), depth - 1))
    }
    walk(dir, 2)
}

/// Watches this node's pods and reports them on `tx` until `tx` closes. Watch errors
/// (API server unreachable, 410 Gone, a response that does not parse) are logged and the
/// watcher lists again with exponential backoff (0.8 s doubling to 30 s); pods deleted
/// meanwhile are reported down when the new list lacks them.
pub async fn run(
    client: Client,
    node: String,
    settings: KubeSettings,
    tx: mpsc::Sender<SourceEvent>,
) -> Result<(), Closed> {
    let pods: Api<Pod> = Api::all(client);
    let config = watch_config(&node, &settings);
    tracing::info!(node = %node, cgroup_root = %settings.cgroup_root.display(), "watching this node's pods");
    let mut tracker = Tracker::new(node, settings);
    let stream = watcher(pods, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    loop {
        tokio::select! {
            () = tx.closed() => return Err(Closed),
            next = stream.next() => match next {
                Some(Ok(event)) => {
                    for e in tracker.handle(event) {
                        tx.send(e).await.map_err(|_| Closed)?;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kubernetes pod watch failed; listing again after backoff");
                }
                None => return Err(Closed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn running(uid: &str, qos: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-7d4b9c-x2x9q", "namespace": "shop", "uid": uid,
                          "labels": {"app": "web", "tessera.io/image-digest": "fake"}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web",
                     "containers": [{"name": "web", "image": "nginx:1.27",
                                     "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "qosClass": qos,
                       "containerStatuses": [{"name": "web", "image": "docker.io/library/nginx:1.27",
                           "imageID": format!("docker.io/library/nginx@sha256:{}", "ab".repeat(32)),
                           "ready": true, "restartCount": 0}]}
        })
    }

    const UID: &str = "5f0c3b7e-1a2b-4c3d-8e9f-0a1b2c3d4e5f";

    #[test]
    fn cgroup_paths_follow_the_kubelets_naming() {
        let root = Path::new("/sys/fs/cgroup/kubepods.slice");
        let sd = |q| pod_cgroup(root, CgroupDriver::Systemd, q, UID).unwrap();
        assert_eq!(
            sd("Burstable"),
            root.join("kubepods-burstable.slice/kubepods-burstable-pod5f0c3b7e_1a2b_4c3d_8e9f_0a1b2c3d4e5f.slice")
        );
        assert_eq!(
            sd("BestEffort"),
            root.join("kubepods-besteffort.slice/kubepods-besteffort-pod5f0c3b7e_1a2b_4c3d_8e9f_0a1b2c3d4e5f.slice")
        );
        assert_eq!(
            sd("Guaranteed"),
            root.join("kubepods-pod5f0c3b7e_1a2b_4c3d_8e9f_0a1b2c3d4e5f.slice")
        );
        let root = Path::new("/sys/fs/cgroup/kubepods");
        let fs = |q| pod_cgroup(root, CgroupDriver::Cgroupfs, q, UID).unwrap();
        assert_eq!(fs("Burstable"), root.join(format!("burstable/pod{UID}")));
        assert_eq!(fs("BestEffort"), root.join(format!("besteffort/pod{UID}")));
        assert_eq!(fs("Guaranteed"), root.join(format!("pod{UID}")));
        assert!(pod_cgroup(root, CgroupDriver::Cgroupfs, "Gold", UID).is_err());
    }

    #[test]
    fn identity_is_what_the_api_server_says() {
        let s = KubeSettings::default();
        let d = pod_workload(&pod(running(UID, "Burstable")), "node-a", &s).unwrap();
        assert_eq!(d.key, format!("pod:{UID}"));
        assert_eq!(d.name, "shop.web-7d4b9c-x2x9q");
        assert_eq!(
            d.labels,
            BTreeMap::from([("app".to_owned(), "web".to_owned())])
        );
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            d.derived[reserved::IMAGE_DIGEST],
            digest,
            "status wins over the pod's label"
        );
        assert_eq!(d.derived[reserved::SERVICE_ACCOUNT], "ns/shop/sa/web");
        assert_eq!(d.derived[reserved::NAMESPACE], "shop");
        assert_eq!(d.derived[reserved::POD_NAME], "web-7d4b9c-x2x9q");
        assert_eq!(d.derived[reserved::POD_UID], UID);
        assert_eq!(d.derived[reserved::IMAGE], "docker.io/library/nginx:1.27");
        assert_eq!(d.ports, vec![8080], "TCP ports only");
    }

    #[test]
    fn several_containers_carry_every_digest_or_none() {
        let s = KubeSettings::default();
        let mut j = running(UID, "Burstable");
        let c = |image: &str, id: &str| serde_json::json!({"name": image, "image": image, "imageID": id, "ready": true, "restartCount": 0});
        let (a, b) = ("cd".repeat(32), "01".repeat(32));
        j["status"]["containerStatuses"] = serde_json::json!([
            c("side", &format!("docker.io/envoy@sha256:{a}")),
            c("main", &format!("docker.io/nginx@sha256:{b}")),
            c("main2", &format!("docker.io/nginx@sha256:{b}")),
        ]);
        let d = pod_workload(&pod(j.clone()), "node-a", &s).unwrap();
        assert_eq!(
            d.derived[reserved::IMAGE_DIGEST],
            format!("sha256:{b}/sha256:{a}")
        );
        assert!(
            !d.derived.contains_key(reserved::IMAGE),
            "several images: no one image"
        );
        // One container whose digest is not known: no digest label at all.
        j["status"]["containerStatuses"][0]["imageID"] =
            serde_json::json!("sha256:".to_owned() + &a);
        let d = pod_workload(&pod(j), "node-a", &s).unwrap();
        assert!(!d.derived.contains_key(reserved::IMAGE_DIGEST));
    }

    #[test]
    fn pods_that_are_not_workloads_here_are_skipped() {
        let s = KubeSettings::default();
        let mut j = running(UID, "BestEffort");
        j["status"]["phase"] = "Pending".into();
        assert_eq!(
            pod_workload(&pod(j), "node-a", &s),
            Err(Skip::NotRunning("Pending".into()))
        );
        let mut j = running(UID, "BestEffort");
        j["spec"]["hostNetwork"] = true.into();
        assert_eq!(pod_workload(&pod(j), "node-a", &s), Err(Skip::HostNetwork));
        let j = running(UID, "BestEffort");
        assert_eq!(
            pod_workload(&pod(j), "node-b", &s),
            Err(Skip::OtherNode("node-a".into()))
        );
        // A UID that would walk out of the cgroup root.
        let j = running("../../../../sys/fs/cgroup", "BestEffort");
        assert!(matches!(
            pod_workload(&pod(j), "node-a", &s),
            Err(Skip::Malformed(_))
        ));
        let mut j = running(UID, "BestEffort");
        j["status"].as_object_mut().unwrap().remove("qosClass");
        assert!(matches!(
            pod_workload(&pod(j), "node-a", &s),
            Err(Skip::Malformed(_))
        ));
    }

    #[test]
    fn long_names_stay_valid_and_apart() {
        let long = "a".repeat(80);
        let one = workload_name("ns", &long, UID);
        let two = workload_name("ns", &long, "9e0c3b7e-1a2b-4c3d-8e9f-0a1b2c3d4e5f");
        assert!(one.len() <= 63 && two.len() <= 63);
        assert_ne!(one, two);
        assert_eq!(workload_name("ns", "p", UID), "ns.p");
    }

    #[test]
    fn settings_errors_name_the_field() {
        let parse = |t: &str| toml::from_str::<KubeSettings>(t).unwrap();
        assert_eq!(parse("").validate(), Ok(()));
        let e = parse("cgroup_root = \"kubepods\"").validate().unwrap_err();
        assert_eq!(e.field, "cgroup_root");
        let e = parse("cgroup_root = \"/sys/fs/cgroup/../etc\"")
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "cgroup_root");
        let e = parse("node = \"Node A\"").validate().unwrap_err();
        assert_eq!(e.field, "node");
        assert!(e.to_string().starts_with("kubernetes: node: "));
        let e = parse("max_pods = 0").validate().unwrap_err();
        assert_eq!(e.field, "max_pods");
        assert!(toml::from_str::<KubeSettings>("cgroup_driver = \"cgroupv1\"").is_err());
        assert!(toml::from_str::<KubeSettings>("nodes = \"a\"").is_err());
        let s = parse(
            "node = \"node-a\"\ncgroup_driver = \"cgroupfs\"\ncgroup_root = \"/sys/fs/cgroup/kubepods\"",
        );
        assert_eq!(s.node_name().unwrap(), "node-a");
        assert_eq!(s.cgroup_driver, CgroupDriver::Cgroupfs);
        // Written back (the enforcer's configuration is serialisable), read the same.
        assert_eq!(parse(&toml::to_string(&s).unwrap()), s);
    }
}
