//! Workloads that come and go without anyone editing a file: containers a runtime starts,
//! pods Kubernetes schedules on this node.
//!
//! A source watches its runtime's API and says, as [`SourceEvent`]s, which workloads exist
//! now, under which cgroup, with which identity. Everything in a [`Discovered`] comes from
//! the runtime or the API server (labels it was started with, its name, its image and the
//! image's digest, its id), never from inside the workload: a process cannot change its
//! container's labels, and any `tessera.io/` label a container was given is dropped in
//! favour of what the runtime says ([`Discovered::new`]).
//!
//! Capture does not wait for a source. The enforcer attaches its eBPF programs to the
//! *parent* cgroup under which the runtime creates every container (configured), so a
//! container's connections are captured from its first instruction; a connection from a
//! cgroup the source has not reported yet waits (bounded) for the source's answer and is
//! refused if none comes: there is no window in which a new container is unenrolled.
#[cfg(feature = "kube")]
pub mod kube;

use std::{collections::BTreeMap, path::PathBuf};

use tessera_proxy::identity::reserved;

/// One workload a source found, as its runtime describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    /// Stable and unique per source: `podman:<container id>`, `pod:<uid>`.
    pub key: String,
    /// The workload's name in flow records and identities (`tessera.io/workload`).
    pub name: String,
    /// Its cgroup v2 directory (absolute, under the source's configured parent).
    pub cgroup: PathBuf,
    /// Labels it was started with (container labels, pod labels), without any in the
    /// reserved `tessera.io/` namespace.
    pub labels: BTreeMap<String, String>,
    /// What the runtime says of it, under reserved keys (`tessera.io/image-digest`, …).
    pub derived: BTreeMap<&'static str, String>,
    /// TCP ports it serves (what the runtime says it exposes).
    pub ports: Vec<u16>,
    /// A process of the workload, if the workload has a network namespace of its own
    /// (a pod, a container on a bridge): the enforcer serves it in that namespace.
    pub netns_pid: Option<u32>,
}

impl Discovered {
    /// A workload with `labels` as started, minus anything claiming the reserved namespace:
    /// those keys are the enforcer's, and `derived` is what they say.
    pub fn new(
        key: String,
        name: String,
        cgroup: PathBuf,
        labels: impl IntoIterator<Item = (String, String)>,
        derived: BTreeMap<&'static str, String>,
        ports: Vec<u16>,
    ) -> Self {
        let labels = labels
            .into_iter()
            .filter(|(k, _)| !reserved::is_reserved(k))
            .collect();
        Self {
            key,
            name,
            cgroup,
            labels,
            derived,
            ports,
            netns_pid: None,
        }
    }

    /// The workload has a network namespace of its own, the one process `pid` is in.
    pub fn in_netns_of(mut self, pid: u32) -> Self {
        self.netns_pid = Some(pid);
        self
    }
}

/// What a source reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// The workload exists now (new, or changed: the latest report wins).
    Up(Discovered),
    /// The workload with this key is gone.
    Down { key: String },
    /// Not a workload: a node agent on the host's network under the parent (a Kubernetes
    /// `hostNetwork` pod), whose processes are neither captured nor guarded. `Down` ends it.
    Exempt { key: String, cgroup: PathBuf },
}

pub mod dynamic;
pub mod hook;
pub mod podman;
