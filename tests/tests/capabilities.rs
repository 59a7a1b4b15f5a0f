//! The enforcer with exactly the capabilities the Kubernetes DaemonSet gives it
//! (`deploy/kubernetes/enforcer.yaml`, read here), and none other, still captures, carries
//! a connection through the tunnel, and attests the connecting binary by its hash (which
//! reads another process's `/proc/<pid>/exe`): the manifest's capability list is enough for
//! what the enforcer does on these test hosts. Every other capability is dropped from the
//! bounding set before the enforcer starts (root uid, as in the pod). Not covered: the
//! container's seccomp and AppArmor profiles (no kubelet here).
use std::{fs, path::Path, time::Duration};

use tessera_tests::{
    TestNet,
    caps::{capped_binary, check_capped, daemonset_capabilities},
    require_root,
};

const T: Duration = Duration::from_secs(30);

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn the_enforcer_works_with_only_the_daemonsets_capabilities() {
    require_root().unwrap();
    let keep = daemonset_capabilities().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wrapper = capped_binary(dir.path(), &keep).unwrap();
    // The only test in this file: the harness reads the binary from here.
    unsafe { std::env::set_var("TESSERA_BIN", &wrapper) };

    let curl = fs::canonicalize(tessera_tests::which("curl").expect("curl")).unwrap();
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[8080])
        .unwrap();
    let policy = format!(
        "rules:\n  - name: web-curl-to-api\n    action: allow\n    from: [{{labels: [app=web, tessera.io/exe-sha256={}]}}]\n    to: [{{labels: [app=api]}}]\n",
        sha256_hex(&curl)
    );
    net.write_policy(None, &policy).unwrap();
    net.start_enforcers().unwrap();
    // The enforcers run with the capped set.
    let pids: Vec<u32> = ["host-a", "host-b"]
        .iter()
        .map(|h| net.enforcer_pid(net.host(h)).expect("enforcer running"))
        .collect();
    for pid in pids {
        check_capped(pid, &keep).unwrap();
    }
    let site = net.dir.join("site");
    fs::create_dir_all(&site).unwrap();
    fs::write(site.join("index.html"), "hello through tessera\n").unwrap();
    net.serve_http(net.host("host-b"), Some("api"), "0.0.0.0", 8080, &site)
        .unwrap();
    let out = net
        .run(
            net.host("host-a"),
            Some("web"),
            "curl",
            &["-sS", "--max-time", "10", "http://10.77.0.2:8080/"],
            T,
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello through tessera\n",
        "curl, attested by its hash, through the tunnel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
