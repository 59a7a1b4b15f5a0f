//! The enforcer with exactly the capabilities the Kubernetes DaemonSet gives it
//! (`deploy/kubernetes/enforcer.yaml`, read here), and none other, still captures, carries
//! a connection through the tunnel, and attests the connecting binary by its hash (which
//! reads another process's `/proc/<pid>/exe`): the manifest's capability list is enough for
//! what the enforcer does on these test hosts. Every other capability is dropped from the
//! bounding set before the enforcer starts (root uid, as in the pod). Not covered: the
//! container's seccomp and AppArmor profiles (no kubelet here).
use std::{collections::BTreeMap, fs, path::Path, time::Duration};

use tessera_tests::{TestNet, require_root, tessera_bin};

const T: Duration = Duration::from_secs(30);

/// Linux capability numbers (linux/capability.h) of the names a manifest may list.
const CAPS: &[(&str, u32)] = &[
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("SYS_PTRACE", 19),
    ("SYS_RESOURCE", 24),
    ("PERFMON", 38),
    ("BPF", 39),
];

fn daemonset_capabilities() -> Vec<u32> {
    let text = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/enforcer.yaml"),
    )
    .unwrap();
    let ds: serde_json::Value =
        serde::Deserialize::deserialize(serde_yaml::Deserializer::from_str(&text).next().unwrap())
            .unwrap();
    assert_eq!(ds["kind"], "DaemonSet");
    let table: BTreeMap<&str, u32> = CAPS.iter().copied().collect();
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| {
            let name = c.as_str().unwrap();
            *table
                .get(name)
                .unwrap_or_else(|| panic!("capability {name}: add its number to CAPS"))
        })
        .collect()
}

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
    let keep = daemonset_capabilities();
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("tessera-capped");
    let keep_list = keep
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    fs::write(
        &wrapper,
        format!(
            "#!/usr/bin/python3\n\
             import ctypes, os, sys\n\
             keep = {{{keep_list}}}\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             last = int(open('/proc/sys/kernel/cap_last_cap').read())\n\
             for cap in range(last + 1):\n\
             \x20   if cap not in keep and libc.prctl(24, cap, 0, 0, 0) != 0:\n\
             \x20       sys.exit('PR_CAPBSET_DROP %d: %s' % (cap, os.strerror(ctypes.get_errno())))\n\
             os.execv({bin:?}, ['tessera'] + sys.argv[1:])\n",
            bin = tessera_bin().unwrap().display().to_string(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
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
    let want: u64 = keep.iter().map(|c| 1u64 << c).sum();
    for pid in pids {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(eff & !want, 0, "enforcer {pid} has more: {eff:x}");
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
