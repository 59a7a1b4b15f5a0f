//! Test hosts for end-to-end tests, the demo and the benchmark.
//!
//! A [`TestNet`] is a set of hosts, each a network namespace with one interface on a shared
//! bridge (in a "switch" namespace of its own), and a cgroup subtree. Programs run as real
//! processes inside a host's namespace and in a chosen cgroup: enrolled workloads, the
//! enforcer, or an unenrolled one. Everything (processes, cgroups, namespaces, pinned eBPF
//! objects, files) is removed when the `TestNet` is dropped, also when a test panics.
//!
//! Processes enter only the network namespace (not `ip netns exec`, which remounts /sys and
//! would hide the cgroup and bpf filesystems).
use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    io::Read,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

pub mod tools;

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

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// The `tessera` binary under test: `$TESSERA_BIN`, or the newest of target/{debug,release}.
pub fn tessera_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TESSERA_BIN") {
        return Ok(PathBuf::from(p));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    ["debug", "release"]
        .iter()
        .map(|p| target.join(p).join("tessera"))
        .filter(|p| p.is_file())
        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
        .ok_or_else(|| anyhow!("no tessera binary under {}: build it first (`cargo build -p tessera-enforcer`; `cargo xtask test` does)", target.display()))
}

#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<u16>,
}

/// Settings of the enforcers a test starts.
#[derive(Clone, Debug)]
pub struct EnforcerOptions {
    pub pool_size: usize,
    pub keep_attached: bool,
    /// Policy files by host name; `"*"` applies to hosts without one of their own.
    pub policies: BTreeMap<String, PathBuf>,
    /// `[policy] dns_servers` for every enforcer.
    pub dns_servers: Vec<String>,
    /// `[identity] tokens` (false only to measure what tokens cost).
    pub tokens: bool,
    /// `[handshake] mode = "handshake"`: tokens in the TCP handshake, no tunnels.
    pub handshake: bool,
    /// `[handshake] fail_open`.
    pub fail_open: bool,
    /// `[handshake] pass_through` (benchmark baseline: the queues without the engine).
    pub pass_through: bool,
    /// `[handshake] key_reuse_ms` (None: the default).
    pub key_reuse_ms: Option<u64>,
}

impl Default for EnforcerOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            keep_attached: false,
            policies: BTreeMap::new(),
            dns_servers: Vec::new(),
            tokens: true,
            handshake: false,
            fail_open: false,
            pass_through: false,
            key_reuse_ms: None,
        }
    }
}

pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
    /// fd77::<index+1>
    pub addr6: Ipv6Addr,
    pub index: usize,
    workloads: Mutex<Vec<WorkloadSpec>>,
    enforcer: Mutex<Option<Child>>,
    pub with_enforcer: bool,
}

pub struct TestNet {
    pub id: String,
    pub dir: PathBuf,
    pub hosts: Vec<Host>,
    cgroup_root: PathBuf,
    switch: String,
    bin: PathBuf,
    children: Mutex<Vec<Child>>,
    pub options: Mutex<EnforcerOptions>,
}

pub const TUNNEL_PORT: u16 = 15008;
/// Each enforcer's HTTP API listens on its host's address at this port.
pub const API_PORT: u16 = 15090;

impl TestNet {
    /// Creates hosts named `names` (10.77.0.1, .2, ... on one bridge), each with an enforcer.
    pub fn new(names: &[&str]) -> Result<Self> {
        Self::with_plain_hosts(names, &[])
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

    fn ip(&self, netns: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", netns];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// The traffic tool, written into this net's directory.
    pub fn tool(&self) -> Result<String> {
        Ok(tools::install(&self.dir)?.to_string_lossy().into_owned())
    }

    pub fn tessera(&self, args: &[&str]) -> Result<String> {
        sh(self.bin.to_str().unwrap(), args)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
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

    pub fn pin_dir(&self, host: &Host) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/tessera/{}-{}", self.id, host.name))
    }

    pub fn flow_log(&self, host: &Host) -> PathBuf {
        self.dir.join(format!("{}-flows.jsonl", host.name))
    }

    pub fn log_path(&self, host: &Host) -> PathBuf {
        self.dir.join(format!("{}-enforcer.log", host.name))
    }

    /// Declares a workload on `host`: a cgroup of its own, enrolled when the enforcer starts.
    pub fn add_workload(
        &self,
        host: &Host,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[u16],
    ) -> Result<()> {
        fs::create_dir_all(self.cgroup(host, Some(name)))?;
        host.workloads.lock().unwrap().push(WorkloadSpec {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: ports.to_vec(),
        });
        Ok(())
    }

    /// Writes a policy file for `host` (None: every host without its own) and puts it in the
    /// enforcers' configuration. A running enforcer picks up changes to the file by itself.
    pub fn write_policy(&self, host: Option<&Host>, text: &str) -> Result<PathBuf> {
        let key = host.map(|h| h.name.clone()).unwrap_or_else(|| "*".into());
        let path = self.dir.join(format!(
            "policy-{}.yaml",
            if key == "*" { "all" } else { &key }
        ));
        // Write then rename, as editors and config management do: never a half-written file.
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, &path)?;
        self.options
            .lock()
            .unwrap()
            .policies
            .insert(key, path.clone());
        Ok(path)
    }

    pub fn config_path(&self, host: &Host) -> PathBuf {
        self.dir.join(format!("{}.toml", host.name))
    }

    /// Writes `host`'s enforcer configuration: its workloads, and every other host with an
    /// enforcer as a peer serving that host's address.
    pub fn write_config(&self, host: &Host) -> Result<PathBuf> {
        let opts = self.options.lock().unwrap().clone();
        let mut c = format!(
            "name = \"{name}\"\n\n[listen]\ntunnel = \"{addr}:{TUNNEL_PORT}\"\n\n[tls]\nca = \"ca/ca.pem\"\ncert = \"ca/{name}.pem\"\nkey = \"ca/{name}.key\"\n\n\
             [bpf]\npin_dir = \"{pin}\"\n\n[tunnel]\npool_size = {pool}\n\n[flows]\nlog = \"{flows}\"\napi = \"{addr}:{API_PORT}\"\nmap_db = \"{mapdb}\"\n\n[identity]\ntokens = {tokens}\n",
            name = host.name,
            addr = host.addr,
            pin = self.pin_dir(host).display(),
            pool = opts.pool_size,
            tokens = opts.tokens,
            flows = self.flow_log(host).display(),
            mapdb = self.dir.join(format!("{}-map.redb", host.name)).display(),
        );
        if opts.handshake {
            c += &format!(
                "\n[handshake]\nmode = \"handshake\"\nfail_open = {}\npass_through = {}\n",
                opts.fail_open, opts.pass_through
            );
            if let Some(ms) = opts.key_reuse_ms {
                c += &format!("key_reuse_ms = {ms}\n");
            }
        }
        if let Some(policy) = opts
            .policies
            .get(&host.name)
            .or_else(|| opts.policies.get("*"))
        {
            c += &format!(
                "\n[policy]\nfile = \"{}\"\ndns_servers = {:?}\n",
                policy.display(),
                opts.dns_servers
            );
        }
        for w in host.workloads.lock().unwrap().iter() {
            let labels: Vec<String> = w
                .labels
                .iter()
                .map(|(k, v)| format!("{k:?} = {v:?}"))
                .collect();
            c += &format!(
                "\n[[workload]]\nname = \"{}\"\ncgroup = \"{}\"\nlabels = {{ {} }}\nports = {:?}\n",
                w.name,
                self.cgroup(host, Some(&w.name)).display(),
                labels.join(", "),
                w.ports
            );
        }
        for peer in self
            .hosts
            .iter()
            .filter(|p| p.name != host.name && p.with_enforcer)
        {
            c += &format!(
                "\n[[peer]]\nname = \"{}\"\ntunnel = \"{}:{TUNNEL_PORT}\"\nserves = [\"{}/32\", \"{}/128\"]\ncert = \"ca/{}.pem\"\n",
                peer.name, peer.addr, peer.addr, peer.addr6, peer.name
            );
        }
        let path = self.config_path(host);
        fs::write(&path, c)?;
        Ok(path)
    }

    /// A command that will run inside `host`'s network namespace and the given cgroup.
    pub fn command(&self, host: &Host, cgroup: &Path, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(&self.dir);
        let netns = CString::new(format!("/run/netns/{}", host.netns)).unwrap();
        let procs = CString::new(cgroup.join("cgroup.procs").to_str().unwrap()).unwrap();
        // SAFETY: only async-signal-safe calls (open, setns, write, close) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(netns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        cmd
    }

    /// Starts a long-running program (a server) on `host` in `workload`'s cgroup (None: an
    /// unenrolled cgroup). It is killed when the TestNet is dropped.
    pub fn spawn(
        &self,
        host: &Host,
        workload: Option<&str>,
        program: &str,
        args: &[&str],
    ) -> Result<u32> {
        let log = fs::File::create(self.dir.join(format!(
            "{}-{}-{}.log",
            host.name,
            workload.unwrap_or("other"),
            program.replace('/', "_")
        )))?;
        let child = self
            .command(host, &self.cgroup(host, workload), program, args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {program} on {}", host.name))?;
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        Ok(pid)
    }

    /// Starts `python3 -m http.server` on `host` (in `workload`'s cgroup) serving `dir` on
    /// `bind`:`port`, and waits until it listens.
    pub fn serve_http(
        &self,
        host: &Host,
        workload: Option<&str>,
        bind: &str,
        port: u16,
        dir: &Path,
    ) -> Result<u32> {
        let port_s = port.to_string();
        let args = [
            "-m",
            "http.server",
            &port_s,
            "--bind",
            bind,
            "--directory",
            dir.to_str().unwrap(),
        ];
        let pid = self.spawn(host, workload, "python3", &args)?;
        self.wait_listening(pid, port)?;
        Ok(pid)
    }

    /// Starts one of the traffic tool's servers (`serve-echo`, `serve-blast`) on `host` and
    /// waits until it listens.
    pub fn serve_tool(
        &self,
        host: &Host,
        workload: Option<&str>,
        server: &str,
        port: u16,
    ) -> Result<u32> {
        let tool = self.tool()?;
        let pid = self.spawn(
            host,
            workload,
            "python3",
            &[&tool, server, &port.to_string()],
        )?;
        self.wait_listening(pid, port)?;
        Ok(pid)
    }

    /// Starts an unmodified `redis-server` on `host` (in `workload`'s cgroup), no persistence.
    pub fn serve_redis(&self, host: &Host, workload: Option<&str>, port: u16) -> Result<u32> {
        let port_s = port.to_string();
        let args = [
            "--port",
            &port_s,
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        let pid = self.spawn(host, workload, "redis-server", &args)?;
        self.wait_listening(pid, port)?;
        Ok(pid)
    }

    /// Runs a program to completion on `host`, killing it after `timeout`.
    pub fn run(
        &self,
        host: &Host,
        workload: Option<&str>,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        self.run_with_input(host, workload, program, args, &[], timeout)
    }

    /// `curl -sS -m 5 --fail URL` on `host` (in `workload`'s cgroup).
    pub fn curl(&self, host: &str, workload: Option<&str>, url: &str) -> Result<Output> {
        let args = ["-sS", "-m", "5", "--fail", url];
        self.run(
            self.host(host),
            workload,
            "curl",
            &args,
            Duration::from_secs(30),
        )
    }

    /// Starts a client in `workload` on `host` that holds one connection to `ip:port` and
    /// pings it every 50 ms for 20 s (the traffic tool's `hold`); returns its log once it is
    /// connected. The log ends with how the connection ended: `reset ...`, `eof`, `still open`.
    pub fn spawn_holder(
        &self,
        host: &Host,
        workload: &str,
        ip: &str,
        port: u16,
    ) -> Result<PathBuf> {
        let tool = self.tool()?;
        self.spawn(
            host,
            Some(workload),
            "python3",
            &[&tool, "hold", ip, &port.to_string(), "20"],
        )?;
        let log = self
            .dir
            .join(format!("{}-{workload}-python3.log", host.name));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("open")
        {
            if Instant::now() > deadline {
                bail!("the holding client on {} never connected", host.name);
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(log)
    }

    /// Runs the traffic tool (`tools/tessera_tool.py`: `blast`, `echo-many`, ...) on `host`.
    pub fn run_tool(
        &self,
        host: &Host,
        workload: Option<&str>,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        let tool = self.tool()?;
        let mut full = vec![tool.as_str()];
        full.extend_from_slice(args);
        self.run(host, workload, "python3", &full, timeout)
    }

    pub fn run_with_input(
        &self,
        host: &Host,
        workload: Option<&str>,
        program: &str,
        args: &[&str],
        input: &[u8],
        timeout: Duration,
    ) -> Result<Output> {
        let mut child = self
            .command(host, &self.cgroup(host, workload), program, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {program} on {}", host.name))?;
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut stdin, &input);
        });
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let out_reader = thread::spawn(move || {
            let mut v = Vec::new();
            let _ = stdout.read_to_end(&mut v);
            v
        });
        let err_reader = thread::spawn(move || {
            let mut v = Vec::new();
            let _ = stderr.read_to_end(&mut v);
            v
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{program} {} on {} did not finish within {timeout:?}",
                    args.join(" "),
                    host.name
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        let _ = writer.join();
        Ok(Output {
            status,
            stdout: out_reader.join().unwrap(),
            stderr: err_reader.join().unwrap(),
        })
    }

    /// Starts `host`'s enforcer and waits until it serves.
    pub fn start_enforcer(&self, host: &Host) -> Result<()> {
        let config = self.write_config(host)?;
        let ready = self.dir.join(format!("{}.ready", host.name));
        let _ = fs::remove_file(&ready);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(host))?;
        let mut args = vec![
            "run",
            "--config",
            config.to_str().unwrap(),
            "--ready-file",
            ready.to_str().unwrap(),
        ];
        if self.options.lock().unwrap().keep_attached {
            args.push("--keep-attached");
        }
        let mut child = self
            .command(
                host,
                &self.cgroup(host, Some("enforcer")),
                self.bin.to_str().unwrap(),
                &args,
            )
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "enforcer on {} exited ({status}) during start-up:\n{}",
                    host.name,
                    self.enforcer_log(host)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "enforcer on {} not ready within 30 s:\n{}",
                    host.name,
                    self.enforcer_log(host)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        *host.enforcer.lock().unwrap() = Some(child);
        Ok(())
    }

    pub fn start_enforcers(&self) -> Result<()> {
        for h in self.hosts.iter().filter(|h| h.with_enforcer) {
            self.start_enforcer(h)?;
        }
        // Let the tunnel pools warm (an enforcer that started before its peer retries with
        // backoff), so tests see the steady state, not first handshakes.
        thread::sleep(Duration::from_millis(1000));
        Ok(())
    }

    /// Stops `host`'s enforcer with SIGTERM (or SIGKILL) and waits for it.
    pub fn stop_enforcer(&self, host: &Host, kill: bool) -> Result<()> {
        let Some(mut child) = host.enforcer.lock().unwrap().take() else {
            return Ok(());
        };
        let sig = if kill { libc::SIGKILL } else { libc::SIGTERM };
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("enforcer on {} ignored SIGTERM for 10 s", host.name);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The enforcer's pid (to read its memory, say).
    pub fn enforcer_pid(&self, host: &Host) -> Option<u32> {
        host.enforcer.lock().unwrap().as_ref().map(Child::id)
    }

    pub fn enforcer_log(&self, host: &Host) -> String {
        fs::read_to_string(self.log_path(host)).unwrap_or_default()
    }

    /// Flow records `host`'s enforcer wrote so far.
    pub fn flows(&self, host: &Host) -> Vec<serde_json::Value> {
        fs::read_to_string(self.flow_log(host))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until flow records matching `pred` number at least `n` on `host`.
    pub fn wait_flows(
        &self,
        host: &Host,
        n: usize,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got: Vec<_> = self.flows(host).into_iter().filter(|f| pred(f)).collect();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until something in `host`'s namespace listens on TCP `port` (read from
    /// /proc/<pid>/net/tcp of a process inside it: no traffic is sent).
    pub fn wait_listening(&self, pid: u32, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let needle = format!(":{port:04X} ");
        loop {
            for f in ["tcp", "tcp6"] {
                let table = fs::read_to_string(format!("/proc/{pid}/net/{f}")).unwrap_or_default();
                if table.lines().skip(1).any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3 && format!("{} ", cols[1]).ends_with(&needle) && cols[3] == "0A"
                }) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("nothing listens on port {port} (pid {pid}) after 10 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
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

/// The handshake-mode adversary and capture reader (tests/tools/handshake_attack.py, scapy).
/// Debian's python3 runs it: that is where `cargo xtask setup` installs scapy.
pub fn handshake_attack(net: &TestNet, host: &Host, args: &[&str]) -> Result<serde_json::Value> {
    let script = tools::install_attack(&net.dir)?;
    let mut full = vec![script.to_str().expect("utf-8 path")];
    full.extend_from_slice(args);
    let out = net.run(
        host,
        None,
        "/usr/bin/python3",
        &full,
        Duration::from_secs(60),
    )?;
    if !out.status.success() {
        bail!(
            "handshake_attack.py {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(out.stdout.trim_ascii()).context("handshake_attack.py output")
}
