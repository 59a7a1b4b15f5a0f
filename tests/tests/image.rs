//! The container image (root, buildah and podman): built the way `cargo xtask image` builds
//! it (from the test's `tessera` binary, under a tag of this test's own), it runs — the
//! binary finds every shared library it links — and the DaemonSet's start script, taken
//! from the manifest as it is, renders a node's configuration inside it with the image's
//! busybox, which the enforcer's configuration loader accepts; a node without a join token
//! or with a name that is not one is refused with a clear message.
use std::{path::Path, process::Command};

use tessera_tests::{image, require_root, tessera_bin, which};

/// The image under a tag of this process, removed on drop (also when the test fails).
struct TestImage(String);

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rmi", "-f", &self.0]).output();
    }
}

fn build() -> TestImage {
    require_root().unwrap();
    for tool in ["buildah", "podman", "ldd"] {
        assert!(
            which(tool).is_some(),
            "{tool} is missing: run `cargo xtask setup`"
        );
    }
    let tag = format!("localhost/tessera-test:{}", std::process::id());
    let work = tempfile::tempdir().unwrap();
    image::build(&tessera_bin().unwrap(), &tag, work.path()).unwrap();
    TestImage(tag)
}

/// `podman run` as the project runs it here (runc, bounded limits, no network).
fn podman_run(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args([
            "run",
            "--rm",
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--network",
            "none",
            "--read-only",
        ])
        .args(args)
        .output()
        .unwrap()
}

/// The enforcer ConfigMap's files, as the DaemonSet mounts them, in `dir`.
fn config_map(dir: &Path) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/enforcer-config.yaml"),
    )
    .unwrap();
    let doc = serde_yaml::Deserializer::from_str(&text).next().unwrap();
    let cm: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
    assert_eq!(cm["metadata"]["name"], "tessera-enforcer");
    for (k, v) in cm["data"].as_object().unwrap() {
        std::fs::write(dir.join(k), v.as_str().unwrap()).unwrap();
    }
}

#[test]
fn the_image_runs_and_renders_a_nodes_configuration() {
    let img = build();
    let out = podman_run(&[&img.0, "--version"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("tessera {}", env!("CARGO_PKG_VERSION"))
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let join = dir.path().join("join");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::create_dir_all(&join).unwrap();
    config_map(&config);
    std::fs::write(join.join("node-a"), "0123456789abcdef0123456789abcdef").unwrap();
    let start = |node: &str, host_ip: &str| {
        podman_run(&[
            "-e",
            &format!("NODE_NAME={node}"),
            "-e",
            &format!("HOST_IP={host_ip}"),
            "-v",
            &format!("{}:/etc/tessera/config:ro", config.display()),
            "-v",
            &format!("{}:/etc/tessera/join:ro", join.display()),
            "--tmpfs",
            "/run/tessera",
            "--entrypoint",
            "/bin/sh",
            &img.0,
            "/etc/tessera/config/start.sh",
            "render",
        ])
    };
    let out = start("node-a", "10.0.0.11");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let rendered = String::from_utf8(out.stdout).unwrap();
    assert!(rendered.contains("name = \"node-a\""), "{rendered}");
    // The rendered configuration is one the enforcer loads, verbatim but for the pod
    // cgroup root, checked against the filesystem: a node with the unified hierarchy has
    // cgroup v2 at /sys/fs/cgroup, this machine elsewhere.
    let pods = "cgroup = \"/sys/fs/cgroup/kubepods.slice\"";
    assert!(rendered.contains(pods), "{rendered}");
    let v2 = tessera_tests::cgroup2_mount().unwrap();
    let rendered = rendered.replace(
        pods,
        &format!("cgroup = \"{}/kubepods.slice\"", v2.display()),
    );
    let path = dir.path().join("enforcer.toml");
    std::fs::write(&path, &rendered).unwrap();
    let c = tessera_enforcer::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let control = c.control.unwrap();
    assert_eq!(control.advertise, Some("10.0.0.11:15008".parse().unwrap()));
    assert_eq!(control.serves, vec!["10.244.1.0/24".parse().unwrap()]);

    // IPv6 node address: bracketed.
    std::fs::write(config.join("pod-cidrs"), "node-a=fd00:10:244:1::/64\n").unwrap();
    let out = start("node-a", "fd00::11");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    assert!(
        rendered.contains("advertise = \"[fd00::11]:15008\""),
        "{rendered}"
    );
    assert!(
        rendered.contains("serves = [\"fd00:10:244:1::/64\"]"),
        "{rendered}"
    );

    // No token for this node; a node name that would write TOML; no pod CIDR.
    let refused = |node: &str, ip: &str, says: &str| {
        let out = start(node, ip);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{node}: started");
        assert!(stderr.contains(says), "{node}: {stderr}");
    };
    std::fs::write(
        config.join("pod-cidrs"),
        "node-a=10.244.1.0/24\nnode-b=10.244.2.0/24\n",
    )
    .unwrap();
    refused("node-b", "10.0.0.12", "no join token for node node-b");
    refused("node-c", "10.0.0.13", "no pod CIDR for node node-c");
    refused("node\"a", "10.0.0.11", "not a DNS name");
    refused("node-a", "10.0.0.11\"", "not an address");
}
