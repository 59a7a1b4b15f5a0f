//! Real etcd servers for tests: Debian's `etcd` on loopback with free ports and a
//! temporary data directory, killed and removed when the guard drops (and killed by the
//! kernel if the test process dies first). Without the binary a test skips, unless
//! `CI=true`, where that is a failure.
#![allow(dead_code)]

use std::{
    net::TcpListener,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tessera_control::etcd::{EtcdStore, EtcdTls, EtcdUrl};

pub const ETCD: &str = "/usr/bin/etcd";

struct Member {
    name: String,
    client: String,
    peer: String,
    child: Option<Child>,
}

/// One etcd member or a cluster of them.
pub struct Etcd {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    /// Client TLS (etcd with `--client-cert-auth`): what a store needs to connect.
    pub tls: Option<EtcdTls>,
}

/// Certificates for an etcd served over TLS: a CA, the member's certificate (for
/// 127.0.0.1), a client certificate of that CA, and one of another CA (a stranger).
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client: EtcdTls,
    pub stranger: EtcdTls,
}

fn make_tls(dir: &std::path::Path) -> TlsFiles {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(p, key))
    };
    let leaf = |issuer: &Issuer<'_, KeyPair>, sans: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(sans).unwrap();
        (
            p.signed_by(&key, issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (ca_pem, issuer) = ca("test etcd CA");
    let (other_pem, other) = ca("another CA");
    let (server_cert, server_key) = leaf(&issuer, vec!["127.0.0.1".into(), "localhost".into()]);
    let (client_cert, client_key) = leaf(&issuer, vec!["tessera-server".into()]);
    let (stranger_cert, stranger_key) = leaf(&other, vec!["tessera-server".into()]);
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client: EtcdTls {
            ca_pem: ca_pem.clone(),
            cert_pem: client_cert,
            key_pem: client_key,
        },
        // Trusts the right CA, but its own certificate is from another.
        stranger: EtcdTls {
            ca_pem: ca_pem.clone(),
            cert_pem: stranger_cert,
            key_pem: stranger_key,
        },
    };
    let _ = other_pem;
    std::fs::write(&files.ca, &ca_pem).unwrap();
    std::fs::write(&files.server_cert, server_cert).unwrap();
    std::fs::write(&files.server_key, server_key).unwrap();
    files
}

/// A directory for members' data: in memory (`/dev/shm`) where there is one, since each
/// member preallocates 64 MB of write-ahead log and syncs it on every write — on a CI
/// machine's small disk, a few clusters at once filled it.
fn data_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().unwrap()
}

/// `n` distinct free loopback ports: all listeners are held until every port is picked, so
/// two members never get the same one. Another process may still take a port before etcd
/// binds it; [`Etcd::cluster`] then starts again on new ports (see [`ATTEMPTS`]).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Starts tried before a port taken between picking and binding fails the test.
const ATTEMPTS: usize = 3;

/// Whether etcd can run here; panics in CI when it cannot.
pub fn available() -> bool {
    let present = std::path::Path::new(ETCD).exists();
    if !present {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{ETCD} is missing (cargo xtask setup installs etcd-server)");
        }
        eprintln!("skipped: {ETCD} is missing (cargo xtask setup installs etcd-server)");
    }
    present
}

impl Etcd {
    /// A single member, serving once this returns; `None` (skip) if etcd is not installed.
    pub async fn start() -> Option<Self> {
        Self::cluster(1).await
    }

    /// `n` members forming one cluster, all serving once this returns.
    pub async fn cluster(n: usize) -> Option<Self> {
        if !available() {
            return None;
        }
        let dir = data_dir();
        let mut etcd = Etcd {
            members: Vec::new(),
            dir,
            tls: None,
        };
        etcd.launch(n, None).await;
        Some(etcd)
    }

    /// One member serving clients over TLS only, requiring a client certificate of its CA
    /// (`--client-cert-auth`); `None` (skip) if etcd is not installed.
    pub async fn start_tls() -> Option<(Self, TlsFiles)> {
        if !available() {
            return None;
        }
        let dir = data_dir();
        let files = make_tls(dir.path());
        let mut etcd = Etcd {
            members: Vec::new(),
            dir,
            tls: Some(files.client.clone()),
        };
        etcd.launch(1, Some(&files)).await;
        Some((etcd, files))
    }

    /// Picks ports, starts `n` members and waits until all serve; starts again on new ports
    /// when a member lost its port to another process (etcd exits with "address already in
    /// use"), at most [`ATTEMPTS`] times.
    async fn launch(&mut self, n: usize, tls: Option<&TlsFiles>) {
        for attempt in 1..=ATTEMPTS {
            let ports = free_ports(2 * n);
            self.members = (0..n)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client: format!("127.0.0.1:{}", ports[2 * i]),
                    peer: format!("127.0.0.1:{}", ports[2 * i + 1]),
                    child: None,
                })
                .collect();
            for i in 0..n {
                let _ = std::fs::remove_dir_all(self.dir.path().join(&self.members[i].name));
                self.spawn(i, tls);
            }
            match self.wait_ready().await {
                Ok(()) => return,
                Err(e) if attempt < ATTEMPTS && e.contains("address already in use") => {
                    eprintln!("etcd lost a port to another process, starting again: {e}");
                    for i in 0..n {
                        self.kill(i);
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn spawn(&mut self, i: usize, tls: Option<&TlsFiles>) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect();
        let token = format!(
            "tessera-test-{}-{}",
            std::process::id(),
            self.dir.path().display()
        );
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name))).unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut cmd = Command::new(ETCD);
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &format!("{scheme}://{}", m.client)])
            .args([
                "--advertise-client-urls",
                &format!("{scheme}://{}", m.client),
            ])
            .args(["--listen-peer-urls", &format!("http://{}", m.peer)])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{}", m.peer),
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &token])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(t) = tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        // If the test process dies without dropping the guard, the kernel kills etcd.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {ETCD}: {e}"));
        self.members[i].child = Some(child);
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0..self.members.len() {
            let url = self.url_of(&[i], "/ready/");
            loop {
                if let Some(c) = self.members[i].child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    return Err(format!(
                        "etcd {} exited ({status}): {}",
                        self.members[i].name,
                        self.log(i)
                    ));
                }
                if let Ok(s) = EtcdStore::connect_with(&url, self.tls.as_ref()).await
                    && tessera_control::store::Store::put(&s, "ready", vec![])
                        .await
                        .is_ok()
                {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "etcd {} not ready in 60 s: {}",
                        self.members[i].name,
                        self.log(i)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    pub fn log(&self, i: usize) -> String {
        let text = std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The store URL for some members, with a key prefix.
    pub fn url_of(&self, members: &[usize], prefix: &str) -> EtcdUrl {
        format!(
            "{}://{}{}",
            if self.tls.is_some() { "etcds" } else { "etcd" },
            members
                .iter()
                .map(|&i| self.members[i].client.as_str())
                .collect::<Vec<_>>()
                .join(","),
            prefix.trim_end_matches('/')
        )
        .parse()
        .unwrap()
    }

    /// The store URL for every member.
    pub fn url(&self, prefix: &str) -> EtcdUrl {
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.url_of(&all, prefix)
    }

    pub async fn store(&self, prefix: &str) -> EtcdStore {
        EtcdStore::connect_with(&self.url(prefix), self.tls.as_ref())
            .await
            .unwrap()
    }

    /// Kills member `i` (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The watches etcd holds open, summed over the members that are up (its
    /// `etcd_debugging_mvcc_watcher_total` gauge).
    pub fn watchers(&self) -> u64 {
        use std::io::{Read, Write};
        let mut total = 0;
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let mut s = std::net::TcpStream::connect(&m.client).unwrap();
            write!(s, "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", m.client).unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            total += text
                .lines()
                .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .expect("etcd reports its watchers") as u64;
        }
        total
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
