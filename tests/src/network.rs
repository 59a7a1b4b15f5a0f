//! The network part of the test hosts: a [`TestNet`] is a set of hosts, each a network
//! namespace with one interface on a shared bridge (in a "switch" namespace of its own) and a
//! cgroup subtree; [`PacketCapture`] records a port of that switch. Dropping the `TestNet`
//! removes everything it made (processes, cgroups, namespaces, pinned eBPF objects, files),
//! also when a test panics; [`sweep_leftovers`] removes what killed runs left behind.
//!
//! It exists apart from the enforcer and application parts so that what a host *is* (and
//! how it is torn down) is in one place.
use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::{EnforcerOptions, WorkloadSpec, tessera_bin, which};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs a command on the machine (not in a test host) and fails with its stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or_else(|| anyhow!("no cgroup v2 filesystem is mounted"))
}

/// Fails unless the prerequisites of root tests are here: in CI a missing one is a failure.
pub fn require_root() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "end-to-end tests need root (network namespaces, cgroups, eBPF); run them as root, e.g. `sudo cargo xtask test`"
        );
    }
    for tool in ["ip", "python3", "curl"] {
        if which(tool).is_none() {
            bail!("{tool} is missing: run `cargo xtask setup`");
        }
    }
    Ok(())
}

pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
    /// fd77::<index+1>
    pub addr6: Ipv6Addr,
    pub index: usize,
    pub(crate) workloads: Mutex<Vec<WorkloadSpec>>,
    pub(crate) enforcer: Mutex<Option<Child>>,
    pub with_enforcer: bool,
}

pub struct TestNet {
    pub id: String,
    pub dir: PathBuf,
    pub hosts: Vec<Host>,
    pub(crate) cgroup_root: PathBuf,
    pub(crate) switch: String,
    pub(crate) bin: PathBuf,
    pub(crate) children: Mutex<Vec<Child>>,
    pub options: Mutex<EnforcerOptions>,
}

impl TestNet {
    /// Creates hosts named `names` (10.77.0.1, .2, ... on one bridge), each with an enforcer.
    pub fn new(names: &[&str]) -> Result<Self> {
        Self::with_plain_hosts(names, &[])
    }

    /// The `tessera` binary this net runs from now on (enforcers, servers, administration):
    /// e.g. one a package installed, or a wrapper that runs it as its systemd unit would.
    pub fn set_bin(&mut self, bin: PathBuf) {
        self.bin = bin;
    }

    /// The `tessera` binary this net runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Like [`TestNet::new`], plus `plain` hosts that have no enforcer (outsiders).
    pub fn with_plain_hosts(enforced: &[&str], plain: &[&str]) -> Result<Self> {
        let names: Vec<&str> = enforced.iter().chain(plain).copied().collect();
        require_root()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            sweep_leftovers();
        }
        let id = format!("ts{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("tessera-{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let cgroup_root = cgroup2_mount()?.join(format!("tessera-{id}"));
        let switch = format!("{id}-sw");
        let mut net = Self {
            id: id.clone(),
            dir,
            hosts: Vec::new(),
            cgroup_root,
            switch: switch.clone(),
            bin: tessera_bin()?,
            children: Mutex::default(),
            options: Mutex::default(),
        };
        // From here on, Drop cleans up whatever was made.
        sh("ip", &["netns", "add", &switch])?;
        net.ip(&switch, &["link", "add", "br0", "type", "bridge"])?;
        net.ip(&switch, &["link", "set", "br0", "up"])?;
        net.ip(&switch, &["link", "set", "lo", "up"])?;
        fs::create_dir_all(&net.cgroup_root)?;
        for (i, name) in names.iter().enumerate() {
            let name = *name;
            let netns = format!("{id}-{name}");
            let addr = Ipv4Addr::new(10, 77, 0, i as u8 + 1);
            sh("ip", &["netns", "add", &netns])?;
            let port = format!("p{i}");
            net.ip(
                &switch,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &netns,
                ],
            )?;
            net.ip(&switch, &["link", "set", &port, "master", "br0", "up"])?;
            net.ip(
                &netns,
                &["addr", "add", &format!("{addr}/24"), "dev", "eth0"],
            )?;
            let addr6 = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, i as u16 + 1);
            net.ip(
                &netns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{addr6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
            net.ip(&netns, &["link", "set", "eth0", "up"])?;
            net.ip(&netns, &["link", "set", "lo", "up"])?;
            for cg in ["enforcer", "other"] {
                fs::create_dir_all(net.cgroup_root.join(name).join(cg))?;
            }
            net.hosts.push(Host {
                name: name.to_string(),
                netns,
                addr,
                addr6,
                index: i,
                workloads: Mutex::default(),
                enforcer: Mutex::default(),
                with_enforcer: !plain.contains(&name),
            });
        }
        let ca = net.dir.join("ca");
        net.tessera(&["ca", "init", "--dir", ca.to_str().unwrap()])?;
        for h in &net.hosts {
            net.tessera(&[
                "ca",
                "issue",
                "--ca-dir",
                ca.to_str().unwrap(),
                "--name",
                &h.name,
                "--out-dir",
                ca.to_str().unwrap(),
            ])?;
        }
        Ok(net)
    }

    /// The common two-host set-up: `web` (app=web) on host-a, `api` (app=api) on host-b
    /// running the traffic tool's `server` (`serve-blast`, `serve-echo`) on port 7000,
    /// enforcers started (with `policy` on both, if given).
    pub fn web_and_api(server: &str, policy: Option<&str>) -> Result<Self> {
        let net = Self::new(&["host-a", "host-b"])?;
        net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])?;
        net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[7000])?;
        if let Some(p) = policy {
            net.write_policy(None, p)?;
        }
        net.start_enforcers()?;
        net.serve_tool(net.host("host-b"), Some("api"), server, 7000)?;
        Ok(net)
    }

    /// `web` (app=web) on host-a and `api` (app=api) on host-b taking `port`, and for every
    /// enforcer the policy that web may reach api on `port` and nothing else. The enforcers
    /// are not started: a test sets its options first.
    pub fn add_web_to_api(&self, port: u16) -> Result<()> {
        self.add_workload(self.host("host-a"), "web", &[("app", "web")], &[])?;
        self.add_workload(self.host("host-b"), "api", &[("app", "api")], &[port])?;
        self.write_policy(
            None,
            &format!(
                "rules:\n  - name: web-api\n    action: allow\n    from: [{{labels: [app=web]}}]\n    to: [{{labels: [app=api]}}]\n    ports: [{port}]\n"
            ),
        )?;
        Ok(())
    }

    fn ip(&self, netns: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", netns];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Packets `host`'s NFQUEUE queues have taken so far (handshake mode): the sum of each
    /// queue's last packet id, from the kernel's `/proc/net/netfilter/nfnetlink_queue` in
    /// its namespace.
    pub fn queued(&self, host: &Host) -> u64 {
        let out = sh(
            "ip",
            &[
                "netns",
                "exec",
                host.netns.as_str(),
                "cat",
                "/proc/net/netfilter/nfnetlink_queue",
            ],
        )
        .unwrap_or_else(|e| panic!("{}: nfnetlink_queue unreadable: {e:#}", host.name));
        out.lines()
            .filter_map(|l| l.split_whitespace().nth(7)?.parse::<u64>().ok())
            .sum()
    }

    /// The netns of the bridge that joins the hosts (for packet captures: host i is on port `p{i}`).
    pub fn switch_netns(&self) -> &str {
        &self.switch
    }

    pub fn cgroup(&self, host: &Host, workload: Option<&str>) -> PathBuf {
        self.cgroup_root
            .join(&host.name)
            .join(workload.unwrap_or("other"))
    }

    fn cleanup(&mut self) {
        for h in &self.hosts {
            let _ = self.stop_enforcer(h, false);
        }
        for mut c in self.children.lock().unwrap().drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Anything left in our cgroups (children of children) goes too.
        kill_cgroup_tree(&self.cgroup_root);
        remove_cgroup_tree(&self.cgroup_root);
        for h in &self.hosts {
            let _ = sh("ip", &["netns", "del", &h.netns]);
            let _ = fs::remove_dir_all(self.pin_dir(h));
        }
        let _ = sh("ip", &["netns", "del", &self.switch]);
        if std::env::var_os("TESSERA_KEEP_TEST_DIR").is_none() && !thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("test files kept in {}", self.dir.display());
        }
    }
}

/// Removes what runs killed without unwinding (SIGKILL, a stopped session) left behind:
/// test hosts whose owning process (the pid in `ts<pid>x<n>`) no longer exists.
pub fn sweep_leftovers() {
    let owner_dead = |name: &str| {
        name.strip_prefix("ts")
            .and_then(|r| r.split('x').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let cgroot = cgroup2_mount().ok();
    if let Some(root) = &cgroot {
        for e in fs::read_dir(root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_prefix("tessera-").filter(|id| owner_dead(id)) {
                kill_cgroup_tree(&e.path());
                remove_cgroup_tree(&e.path());
                eprintln!("removed leftover test cgroups of {id}");
            }
        }
    }
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.split('-').next().is_some_and(owner_dead) {
                let _ = sh("ip", &["netns", "del", ns]);
            }
        }
    }
    for e in fs::read_dir("/sys/fs/bpf/tessera")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.split('-').next().is_some_and(owner_dead) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn kill_cgroup_tree(dir: &Path) {
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && cgroup_has_procs(dir) {
        thread::sleep(Duration::from_millis(10));
    }
}

fn cgroup_has_procs(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|e| e.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if thread::panicking() {
            for h in &self.hosts {
                eprintln!(
                    "--- enforcer log of {} ---\n{}",
                    h.name,
                    self.enforcer_log(h)
                );
            }
        }
        self.cleanup();
    }
}

/// A tcpdump capture on a port of the test switch (`p<i>` is host i's link), written to a
/// pcap file; [`PacketCapture::stop`] ends it and returns the file.
pub struct PacketCapture {
    child: Child,
    pub path: PathBuf,
}

impl PacketCapture {
    pub fn start(net: &TestNet, port: &str, path: PathBuf) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", net.switch_netns(), "tcpdump", "-i", port])
            .args(["--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&path)
            .arg("tcp")
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start tcpdump")?;
        // tcpdump prints "listening on" once the capture is open.
        let mut err = std::io::BufReader::new(child.stderr.take().expect("piped"));
        let mut line = String::new();
        while !line.contains("listening") {
            line.clear();
            if std::io::BufRead::read_line(&mut err, &mut line)? == 0 {
                bail!("tcpdump exited before capturing");
            }
        }
        Ok(Self { child, path })
    }

    /// Stops the capture (SIGINT: tcpdump flushes) and returns the pcap's path.
    pub fn stop(mut self) -> PathBuf {
        thread::sleep(Duration::from_millis(300));
        let _ = nix_kill(self.child.id());
        let _ = self.child.wait();
        self.path.clone()
    }
}

fn nix_kill(pid: u32) -> i32 {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: sending SIGINT to our own child process.
    unsafe { kill(pid as i32, 2) }
}
