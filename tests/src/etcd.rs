//! A real etcd cluster on a test host, for the control plane's replicas: Debian's `etcd`,
//! each member a process in the host's network namespace listening on the host's address
//! (so replicas on other test hosts reach it across the test switch), with its data in the
//! net's directory. Members can be killed and started again on the same data, to take the
//! cluster's quorum away and give it back. Everything stops with the [`TestNet`].
use std::{
    fs,
    net::SocketAddr,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Host, TestNet};

/// Debian's etcd (package `etcd-server`, installed by `cargo xtask setup`).
pub const ETCD: &str = "/usr/bin/etcd";

#[derive(Clone, Debug)]
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    pid: Option<u32>,
}

/// An etcd cluster on one test host.
#[derive(Debug)]
pub struct EtcdCluster {
    host: String,
    token: String,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// The `--store` URL of `tessera server` for every member, with a key prefix.
    pub fn store_url(&self, prefix: &str) -> String {
        let endpoints: Vec<String> = self.members.iter().map(|m| m.client.to_string()).collect();
        format!("etcd://{}/{}", endpoints.join(","), prefix)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl TestNet {
    /// Starts an `n`-member etcd cluster on `host` (client ports 2379, 2389…, peer ports
    /// 2380, 2390…) and waits until every member reports itself healthy.
    pub fn start_etcd(&self, host: &Host, n: usize) -> Result<EtcdCluster> {
        if !std::path::Path::new(ETCD).exists() {
            bail!("{ETCD} is missing (cargo xtask setup installs etcd-server)");
        }
        let members = (0..n)
            .map(|i| Member {
                name: format!("etcd{i}"),
                client: SocketAddr::from((host.addr, 2379 + 10 * i as u16)),
                peer: SocketAddr::from((host.addr, 2380 + 10 * i as u16)),
                pid: None,
            })
            .collect();
        let mut cluster = EtcdCluster {
            host: host.name.clone(),
            token: format!("tessera-{}", self.id),
            members,
        };
        for i in 0..n {
            self.spawn_etcd(&mut cluster, i)?;
        }
        for i in 0..n {
            self.wait_etcd_healthy(&cluster, i, Duration::from_secs(60))?;
        }
        Ok(cluster)
    }

    fn spawn_etcd(&self, cluster: &mut EtcdCluster, i: usize) -> Result<()> {
        let initial: Vec<String> = cluster
            .members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect();
        let m = cluster.members[i].clone();
        let data = self.dir.join(format!("{}.data", m.name));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", m.name)))?;
        let client = format!("http://{}", m.client);
        let peer = format!("http://{}", m.peer);
        let host = self.host(&cluster.host);
        // A restarted member finds its data directory and ignores the initial-cluster flags.
        let child = self
            .command(
                host,
                &self.cgroup(host, None),
                ETCD,
                &[
                    "--name",
                    &m.name,
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                    "--initial-cluster",
                    &initial.join(","),
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    &cluster.token,
                    "--max-request-bytes",
                    "20971520",
                    "--auto-compaction-retention",
                    "1h",
                ],
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {ETCD}"))?;
        cluster.members[i].pid = Some(child.id());
        self.children.lock().unwrap().push(child);
        Ok(())
    }

    /// The last lines of member `i`'s log.
    pub fn etcd_log(&self, cluster: &EtcdCluster, i: usize) -> String {
        let text = fs::read_to_string(self.dir.join(format!("{}.log", cluster.members[i].name)))
            .unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Whether member `i` answers `/health` with a healthy cluster (it has a leader and
    /// quorum), asked from its own host.
    pub fn etcd_healthy(&self, cluster: &EtcdCluster, i: usize) -> bool {
        let url = format!("http://{}/health", cluster.members[i].client);
        self.run(
            self.host(&cluster.host),
            None,
            "curl",
            &["-s", "--max-time", "2", &url],
            Duration::from_secs(5),
        )
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("\"health\":\"true\""))
    }

    fn wait_etcd_healthy(&self, cluster: &EtcdCluster, i: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while !self.etcd_healthy(cluster, i) {
            if Instant::now() > deadline {
                bail!(
                    "etcd member {} not healthy within {limit:?}:\n{}",
                    cluster.members[i].name,
                    self.etcd_log(cluster, i)
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Kills member `i` (SIGKILL, a crashed machine) and waits until it is gone.
    pub fn kill_etcd(&self, cluster: &mut EtcdCluster, i: usize) -> Result<()> {
        let Some(pid) = cluster.members[i].pid.take() else {
            return Ok(());
        };
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut children = self.children.lock().unwrap();
            let gone = children
                .iter_mut()
                .find(|c| c.id() == pid)
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            drop(children);
            if gone {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd member {} survived SIGKILL", cluster.members[i].name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts member `i` again on its data and, when `quorum` is expected, waits until it
    /// is healthy.
    pub fn restart_etcd(&self, cluster: &mut EtcdCluster, i: usize, quorum: bool) -> Result<()> {
        self.spawn_etcd(cluster, i)?;
        if quorum {
            self.wait_etcd_healthy(cluster, i, Duration::from_secs(60))?;
        }
        Ok(())
    }
}
