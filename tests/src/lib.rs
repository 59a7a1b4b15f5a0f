//! Test hosts for end-to-end tests, the demo and the benchmark.
//!
//! A [`TestNet`] is a set of hosts, each a network namespace with one interface on a shared
//! bridge (in a "switch" namespace of its own), and a cgroup subtree. Programs run as real
//! processes inside a host's namespace and in a chosen cgroup: enrolled workloads, the
//! enforcer, or an unenrolled one. Everything (processes, cgroups, namespaces, pinned eBPF
//! objects, files) is removed when the `TestNet` is dropped, also when a test panics.
//!
//! The parts, each a module adding its methods to [`TestNet`]:
//! * [`network`]: the hosts themselves (namespaces, veth, the switch, cgroups), packet
//!   capture, clean-up on drop and of leftovers;
//! * [`enforcer`]: enforcer configurations, start and stop, the flow records they write;
//! * [`apps`]: real programs on the hosts (curl, http servers, redis, the traffic tool, the
//!   handshake adversary), spawned or run to completion;
//! * [`containers`]: podman, its API socket and real containers on the test hosts;
//! * [`control`]: the control plane (`tessera server`) and enforcers that enrol with it;
//! * [`etcd`]: a real etcd cluster on a test host, for the control plane's replicas;
//! * [`rogue`]: the hostile peer with a real enforcer's key material, and its answers;
//! * [`tools`]: the traffic and attack scripts the tests carry.
//!
//! Everything a test uses is re-exported here.
use std::time::{Duration, Instant};

pub mod apps;
pub mod caps;
pub mod containers;
pub mod control;
pub mod enforcer;
pub mod etcd;
pub mod image;
pub mod network;
pub mod rogue;
pub mod tools;

pub use apps::{handshake_attack, which};
pub use containers::Podman;
pub use control::{CONTROL_PORT, ControlOptions, ControlServer};
pub use enforcer::{API_PORT, EnforcerOptions, TUNNEL_PORT, WorkloadSpec, tessera_bin};
pub use etcd::EtcdCluster;
pub use network::{Host, PacketCapture, TestNet, cgroup2_mount, require_root, sh, sweep_leftovers};
pub use rogue::RogueAnswers;

/// Waits until the file at `path` contains `text`, for at most `limit`.
pub fn wait_for(path: &std::path::Path, text: &str, limit: Duration) -> bool {
    poll(limit, Duration::from_millis(50), || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(text)
    })
}

/// Polls `f` every 200 ms until it holds or `within` passes; whether it held.
pub fn eventually(within: Duration, f: impl FnMut() -> bool) -> bool {
    poll(within, Duration::from_millis(200), f)
}

fn poll(within: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}
