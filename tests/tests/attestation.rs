//! End-to-end tests of the labels an enforcer derives for a workload's connection (root,
//! real eBPF, real cgroups, real programs): what a workload can name itself must never
//! become a label that claims more.
//!
//! With cgroup v2 delegation a workload can create sub-cgroups of its own and move into
//! them; it chooses their names. A container or pod label derived from such a name would
//! be whatever the workload wants.
use std::{fs, os::unix::fs::chown};

use tessera_tests::TestNet;

const PORT: u16 = 7000;

/// Run as `nobody` in a container's cgroup delegated to it: connects to `argv[2]:argv[3]`
/// once from there, then makes the sub-cgroup `argv[1]` (a name of its choosing), moves
/// itself into it and connects again. `argv[4]` is the cgroup v2 mount.
const FORGER: &str = r#"
import os, socket, sys
def v2():
    return [l for l in open("/proc/self/cgroup").read().splitlines() if l.startswith("0::")][0]
def ask(n):
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5)
    s.sendall(b"hello\n")
    print("answer", n, s.recv(100).decode().strip(), flush=True)
    s.close()
ask(1)
sub = os.path.join(sys.argv[4] + v2()[3:], sys.argv[1])
os.mkdir(sub)
with open(os.path.join(sub, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
print("moved to", v2(), flush=True)
ask(2)
"#;

/// The uid and gid of `nobody`.
fn nobody() -> (u32, u32) {
    let name = std::ffi::CString::new("nobody").unwrap();
    // SAFETY: getpwnam with a valid C string; the fields are copied out at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "no user nobody");
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// Threat: `tessera.io/container-id` (and `container-runtime`, `pod-uid`) came from the
/// connecting process's own cgroup path. A workload whose cgroup is delegated to it (cgroup
/// v2 lets it create sub-cgroups and move into them, as systemd's `Delegate=yes` and
/// container runtimes allow) makes `docker-<any id>.scope` and connects from there: the
/// peer's policy saw a container id of the workload's choosing. After: container and pod
/// labels come only from levels the workload cannot create (its enrolment cgroup, or a
/// level whose parent only root can write, as a runtime makes it); the sub-cgroup shows in
/// `tessera.io/cgroup` only, as the path it is.
#[test]
fn a_sub_cgroup_named_like_a_container_does_not_forge_a_container_id() {
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    net.add_web_to_api(PORT).unwrap();
    net.start_enforcers().unwrap();
    net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", PORT)
        .unwrap();

    // A runtime (root) makes the container's cgroup below web's and delegates it to nobody.
    let real = "c".repeat(64);
    let container = net
        .cgroup(net.host("host-a"), Some("web"))
        .join(format!("docker-{real}.scope"));
    fs::create_dir(&container).unwrap();
    let (uid, gid) = nobody();
    for f in [
        "",
        "cgroup.procs",
        "cgroup.threads",
        "cgroup.subtree_control",
    ] {
        chown(container.join(f), Some(uid), Some(gid)).unwrap();
    }
    let forged = "f".repeat(64);
    let scope = format!("docker-{forged}.scope");
    let mount = tessera_tests::cgroup2_mount().unwrap();
    let out = net
        .command(
            net.host("host-a"),
            &container,
            "setpriv",
            &[
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                FORGER,
                &scope,
                "10.77.0.2",
                &PORT.to_string(),
                mount.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("answer 1 hello") && said.contains("answer 2 hello"),
        "web's connections were not let through: {said}{err}"
    );
    assert!(
        said.contains("moved to 0::") && said.contains(&scope),
        "the workload could not make its sub-cgroup: {said}{err}"
    );

    // What host-b's policy saw of the connections' source.
    let uid_s = uid.to_string();
    let flows = net.wait_flows(net.host("host-b"), 2, |f| {
        f.src.labels.get("tessera.io/workload").map(String::as_str) == Some("web")
            && f.src.labels.get("tessera.io/uid") == Some(&uid_s)
    });
    assert_eq!(flows.len(), 2, "{:#?}", net.flows(net.host("host-b")));
    let cgroup = |f: &tessera_proxy::flow::FlowRecord| {
        f.src
            .labels
            .get("tessera.io/cgroup")
            .cloned()
            .unwrap_or_default()
    };
    let from_container = flows
        .iter()
        .find(|f| cgroup(f).ends_with(&format!("/web/docker-{real}.scope")))
        .unwrap_or_else(|| panic!("no connection from the container's cgroup: {flows:#?}"));
    let from_own = flows
        .iter()
        .find(|f| cgroup(f).ends_with(&format!("/docker-{real}.scope/{scope}")))
        .unwrap_or_else(|| panic!("no connection from the sub-cgroup: {flows:#?}"));
    // The runtime's level names the container...
    assert_eq!(
        from_container.src.labels.get("tessera.io/container-id"),
        Some(&real),
        "{:#?}",
        from_container.src.labels
    );
    // ... and the level the workload made names nothing: the container id stays the real one.
    assert_eq!(
        from_own.src.labels.get("tessera.io/container-id"),
        Some(&real),
        "a container id of the workload's choosing: {:#?}",
        from_own.src.labels
    );
    assert_eq!(
        from_own
            .src
            .labels
            .get("tessera.io/container-runtime")
            .map(String::as_str),
        Some("docker")
    );
}
