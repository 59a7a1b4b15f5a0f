//! The control plane on test hosts: `tessera server` on a host of its own, and enforcers
//! that enrol with it (a join token, or a cloud identity document) instead of using the
//! test net's hand-made CA and peer list.
use std::{
    fs,
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Host, TestNet};

/// The port `tessera server` listens on (on its host's address).
pub const CONTROL_PORT: u16 = 15100;

/// How the enforcers of a test net reach the control plane (see [`TestNet::join`]).
#[derive(Clone, Debug, Default)]
pub struct ControlOptions {
    pub servers: Vec<String>,
    /// Hosts that follow other servers than `servers` (by host name).
    pub servers_of: std::collections::BTreeMap<String, Vec<String>>,
    /// The control plane's CA certificate (its `ca.pem`).
    pub ca: PathBuf,
    /// Join token files, by host name.
    pub tokens: std::collections::BTreeMap<String, PathBuf>,
    /// Identity document files and instance ids, by host name.
    pub documents: std::collections::BTreeMap<String, (PathBuf, String)>,
}

/// A running `tessera server`.
#[derive(Clone, Debug)]
pub struct ControlServer {
    pub url: String,
    /// Its state directory (store, `ca.pem`, `admin.token`).
    pub state: PathBuf,
    pub host: String,
    pub pid: u32,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
}

impl TestNet {
    /// Starts `tessera server run` on `host` (extra arguments appended, e.g. a short
    /// `--lifetime` or an etcd `--store`) and waits until it serves. A server on the host
    /// named `control` keeps its state in `control/`, any other (a replica) in
    /// `<host>-server/`; a restart on the same host reuses it.
    pub fn start_control(&self, host: &Host, extra: &[&str]) -> Result<ControlServer> {
        let stem = if host.name == "control" {
            "control".to_string()
        } else {
            format!("{}-server", host.name)
        };
        let state = self.dir.join(&stem);
        let ready = self.dir.join(format!("{stem}.ready"));
        let log_path = self.dir.join(format!("{stem}.log"));
        let _ = fs::remove_file(&ready);
        let listen = format!("{}:{CONTROL_PORT}", host.addr);
        let name = host.addr.to_string();
        let mut args = vec![
            "server",
            "run",
            "--state-dir",
            state.to_str().unwrap(),
            "--listen",
            &listen,
            "--name",
            &name,
            "--ready-file",
            ready.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = self
            .command(
                host,
                &self.cgroup(host, None),
                self.bin.to_str().unwrap(),
                &args,
            )
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start tessera server")?;
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if Instant::now() > deadline {
                bail!(
                    "tessera server on {} not ready within 30 s:\n{}",
                    host.name,
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                bail!(
                    "tessera server on {} exited during start-up:\n{}",
                    host.name,
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(ControlServer {
            url: format!("https://{listen}"),
            state,
            host: host.name.clone(),
            pid,
            log: log_path,
        })
    }

    /// The log of the server on the host named `control`.
    pub fn control_log(&self) -> String {
        fs::read_to_string(self.dir.join("control.log")).unwrap_or_default()
    }

    /// Stops the server (SIGTERM) and waits for it to exit.
    pub fn stop_control(&self, srv: &ControlServer) -> Result<()> {
        self.signal_control(srv, libc::SIGTERM)
    }

    /// Kills the server outright (SIGKILL: a crashed replica) and waits for it to be gone.
    pub fn kill_control(&self, srv: &ControlServer) -> Result<()> {
        self.signal_control(srv, libc::SIGKILL)
    }

    fn signal_control(&self, srv: &ControlServer, signal: i32) -> Result<()> {
        unsafe { libc::kill(srv.pid as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while unsafe { libc::kill(srv.pid as i32, 0) } == 0 {
            let mut children = self.children.lock().unwrap();
            for c in children.iter_mut().filter(|c| c.id() == srv.pid) {
                let _ = c.try_wait();
            }
            drop(children);
            if Instant::now() > deadline {
                bail!("tessera server ignored signal {signal} for 10 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Runs `tessera ARGS --server URL --ca CA --admin-token-file T` on the server's host
    /// (an administrator's command); its stdout, or an error with its stderr.
    pub fn control_admin(&self, srv: &ControlServer, args: &[&str]) -> Result<String> {
        let ca = srv.state.join("ca.pem");
        let token = srv.state.join("admin.token");
        let mut full: Vec<&str> = args.to_vec();
        full.extend_from_slice(&[
            "--server",
            &srv.url,
            "--ca",
            ca.to_str().unwrap(),
            "--admin-token-file",
            token.to_str().unwrap(),
        ]);
        let out = self.run(
            self.host(&srv.host),
            None,
            self.bin.to_str().unwrap(),
            &full,
            Duration::from_secs(30),
        )?;
        if !out.status.success() {
            bail!(
                "tessera {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A new join token for `host` in `scope`, written to its token file (0600); from now on
    /// `host`'s enforcer enrols with `srv` (no `[tls]`, `[[peer]]` or policy file).
    pub fn join(&self, host: &Host, srv: &ControlServer, scope: &str) -> Result<PathBuf> {
        let token = self.control_admin(srv, &["server", "token", "create", "--scope", scope])?;
        self.use_control(srv);
        self.give_token(host, token.trim())
    }

    /// `host`'s enforcer enrols with `token` (written to its token file, 0600), e.g. a token
    /// another host already has.
    pub fn give_token(&self, host: &Host, token: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("{}.join-token", host.name));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        std::io::Write::write_all(&mut f, token.as_bytes())?;
        self.options
            .lock()
            .unwrap()
            .control
            .as_mut()
            .context("give_token: no control plane in use (join or use_control first)")?
            .tokens
            .insert(host.name.clone(), path.clone());
        Ok(path)
    }

    /// Enforcers of this net follow `srv` (its URL and CA).
    pub fn use_control(&self, srv: &ControlServer) {
        self.use_replicas(&[srv]);
    }

    /// Enforcers of this net follow these replicas of one control plane (tried in this
    /// order; the CA is the first one's `ca.pem`, which every replica on one store shares).
    pub fn use_replicas(&self, servers: &[&ControlServer]) {
        let mut opts = self.options.lock().unwrap();
        let c = opts.control.get_or_insert_with(ControlOptions::default);
        c.servers = servers.iter().map(|s| s.url.clone()).collect();
        c.ca = servers[0].state.join("ca.pem");
    }

    /// `host`'s enforcer follows only these servers (after [`TestNet::use_replicas`]).
    pub fn use_replicas_for(&self, host: &Host, servers: &[&ControlServer]) {
        let mut opts = self.options.lock().unwrap();
        let c = opts.control.get_or_insert_with(ControlOptions::default);
        c.servers_of.insert(
            host.name.clone(),
            servers.iter().map(|s| s.url.clone()).collect(),
        );
    }

    /// Where `host`'s enforcer keeps its control-plane cache.
    pub fn control_state(&self, host: &Host) -> PathBuf {
        self.dir.join(format!("{}-control", host.name))
    }
}
