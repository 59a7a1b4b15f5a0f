//! The application part of the test hosts: running real, unmodified programs inside a
//! host's network namespace and a chosen cgroup (an enrolled workload's or an unenrolled
//! one): servers that live as long as the [`TestNet`] (http.server, redis, the traffic
//! tool's servers) and programs run to completion (curl, the traffic tool, the handshake
//! adversary).
//!
//! Processes enter only the network namespace (not `ip netns exec`, which remounts /sys and
//! would hide the cgroup and bpf filesystems). Every long-running one is the `TestNet`'s
//! child, killed when it is dropped.
use std::{
    ffi::CString,
    fs,
    io::Read,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Host, TestNet, tools};

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

impl TestNet {
    /// A UDP listener (python3) on `host` (in `workload`'s cgroup, or none) at `port`,
    /// logging each datagram and its sender; returns the log.
    pub fn udp_listener(&self, host: &str, workload: Option<&str>, port: u16) -> PathBuf {
        let script = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',int(sys.argv[1])))\nprint('listening',flush=True)\nwhile True:\n    d,a=s.recvfrom(2048)\n    print('got',d.decode(errors='replace').strip(),'from',a[0],flush=True)\n";
        let h = self.host(host);
        let log = self.dir.join(format!("udp-{host}-{port}.log"));
        // Through sh, for a log of its own (several listeners run on one host).
        let wrapper = format!("exec python3 -c \"$0\" {port} >{} 2>&1", log.display());
        self.spawn(h, workload, "sh", &["-c", &wrapper, script])
            .unwrap();
        assert!(
            crate::wait_for(&log, "listening", Duration::from_secs(10)),
            "the UDP listener on {host}:{port} did not start"
        );
        log
    }

    /// A real DNS server (dnsmasq) on `host`'s address, port 53, without any file of the
    /// system's (no resolv.conf, no hosts), answering as `extra` says (`--address=...`);
    /// its pid.
    pub fn spawn_dnsmasq(&self, host: &str, extra: &[&str]) -> u32 {
        let h = self.host(host);
        let listen = format!("--listen-address={}", h.addr);
        let mut args = vec![
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file=",
            "--bind-interfaces",
            listen.as_str(),
            "--port=53",
        ];
        args.extend_from_slice(extra);
        self.spawn(h, None, "dnsmasq", &args).unwrap()
    }

    /// `nc -u` from `workload` on `host` (None: outside any enrolled cgroup) sending `text`
    /// to `ip`:`port`.
    pub fn nc_udp(&self, host: &str, workload: Option<&str>, ip: &str, port: u16, text: &str) {
        let _ = self
            .run_with_input(
                self.host(host),
                workload,
                "nc",
                &["-u", "-w", "1", ip, &port.to_string()],
                format!("{text}\n").as_bytes(),
                Duration::from_secs(30),
            )
            .unwrap();
    }

    /// The traffic tool, written into this net's directory.
    pub fn tool(&self) -> Result<String> {
        Ok(tools::install(&self.dir)?.to_string_lossy().into_owned())
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
        self.spawn_in(host, &self.cgroup(host, workload), program, args)
    }

    /// Like [`Self::spawn`], in cgroup `cgroup` (any directory of this net's cgroups).
    pub fn spawn_in(
        &self,
        host: &Host,
        cgroup: &Path,
        program: &str,
        args: &[&str],
    ) -> Result<u32> {
        let log = fs::File::create(self.dir.join(format!(
            "{}-{}-{}.log",
            host.name,
            cgroup
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            program.replace('/', "_")
        )))?;
        let child = self
            .command(host, cgroup, program, args)
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
