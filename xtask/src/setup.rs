//! `cargo xtask setup`: everything a fresh machine lacks, installed once (idempotent).
use std::process::Command;

use anyhow::{Context, Result, bail};
use tessera_tests::which;

/// (command that must exist, Debian package that provides it)
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    // Handshake mode's peers' lane (an ipset of the directory's addresses).
    ("ipset", "ipset"),
    ("nsenter", "util-linux"),
    ("tcpdump", "tcpdump"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-tools"),
    ("socat", "socat"),
    ("iperf3", "iperf3"),
    ("ps", "procps"),
    ("dnsmasq", "dnsmasq"),
    // The web map is bundled at build time; its browser test drives Debian's Chromium.
    ("node", "nodejs"),
    ("npm", "npm"),
    ("chromium", "chromium"),
    // The handshake-mode adversarial tests craft packets with scapy (Debian's python3).
    ("/usr/lib/python3/dist-packages/scapy", "python3-scapy"),
    // Non-TCP policy is tested with the tools users reach for: dig, nc -u, ping.
    ("dig", "bind9-dnsutils"),
    ("nc", "netcat-openbsd"),
    ("ping", "iputils-ping"),
    // `tessera-enforcer`'s default `etcd` feature generates its etcd client with protoc;
    // the control plane's etcd tests run Debian's etcd.
    ("protoc", "protobuf-compiler"),
    // protoc's well-known types (etcd's protos import google/protobuf/descriptor.proto):
    // only recommended by protobuf-compiler, so never there with --no-install-recommends
    // (or where protoc came without them).
    (
        "/usr/include/google/protobuf/descriptor.proto",
        "libprotobuf-dev",
    ),
    ("etcd", "etcd-server"),
    // Containers enrolled as they start: podman (with runc: crun refuses hybrid cgroups),
    // and busybox-static, the whole root filesystem of the tests' image (no registry).
    ("podman", "podman"),
    ("runc", "runc"),
    // `cargo xtask image` commits the image with buildah (busybox-static, below, is also
    // the image's shell for the Kubernetes start script; podman runs it in the image test).
    ("buildah", "buildah"),
    ("/bin/busybox", "busybox-static"),
    // `cargo xtask package` (dpkg-deb, readelf, objcopy) and its test (systemd-analyze,
    // systemd-sysusers, setpriv).
    ("dpkg-deb", "dpkg"),
    ("readelf", "binutils"),
    ("objcopy", "binutils"),
    ("systemd-analyze", "systemd"),
    ("setpriv", "util-linux"),
];

const BPF_LINKER_VERSION: &str = "0.10.4";

fn status(cmd: &mut Command) -> Result<()> {
    let s = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !s.success() {
        bail!("{cmd:?} failed ({s})");
    }
    Ok(())
}

pub fn run() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(bin, _)| {
            if bin.starts_with('/') {
                !std::path::Path::new(bin).exists()
            } else {
                which(bin).is_none()
            }
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing Debian packages: {}", missing.join(" "));
        status(Command::new("apt-get").arg("update").arg("-q"))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    // The browser test's driver (playwright-core, which uses Debian's Chromium: it never
    // downloads a browser).
    let web_tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/web");
    if !web_tests.join("node_modules/playwright-core").exists() {
        eprintln!("setup: installing the browser test's npm packages (tests/web)");
        status(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&web_tests),
        )?;
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .context("rustup is needed")?;
    if !String::from_utf8_lossy(&components.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        eprintln!("setup: adding rust-src (the eBPF target builds core from source)");
        status(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !linker_ok {
        // 0.10.4: fixes BTF the kernel rejects; 0.11+ needs a system LLVM this machine lacks.
        eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION}");
        status(Command::new("cargo").args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ]))?;
    }
    eprintln!("setup: ok");
    Ok(())
}
