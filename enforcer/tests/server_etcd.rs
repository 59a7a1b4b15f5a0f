//! `tessera server run --store etcd://...` as an operator runs it: two server processes
//! on one real etcd (on loopback) are one control plane — one CA, an administrator token
//! of either works on both, a policy applied through one is what the other serves — and a
//! server whose etcd is unreachable refuses to start, naming the endpoint.
#[path = "../../control/tests/support/etcd.rs"]
mod etcd;

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `tessera server run`, killed when dropped.
struct Server {
    child: Child,
    url: String,
    state: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, name: &str, store: &str) -> Server {
    start_with(dir, name, store, &[])
}

fn start_with(dir: &Path, name: &str, store: &str, extra: &[&str]) -> Server {
    let state = dir.join(name);
    let ready = dir.join(format!("{name}.ready"));
    let log = dir.join(format!("{name}.log"));
    let port = free_port();
    let child = Command::new(BIN)
        .args(["server", "run", "--store", store, "--state-dir"])
        .arg(&state)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--ready-file"])
        .arg(&ready)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
        .spawn()
        .unwrap();
    let mut s = Server {
        child,
        url: format!("https://127.0.0.1:{port}"),
        state,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        if let Ok(Some(status)) = s.child.try_wait() {
            panic!(
                "server {name} exited ({status}): {}",
                std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "server {name} not ready in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

/// An administrator's command against `s` with the credentials in `creds`' state directory.
fn admin(s: &Server, creds: &Server, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--server", &s.url, "--ca"])
        .arg(creds.state.join("ca.pem"))
        .arg("--admin-token-file")
        .arg(creds.state.join("admin.token"))
        .output()
        .unwrap()
}

/// The stderr of a command that must have failed.
fn refused(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

const POLICY: &str = "rules:\n  - name: web-to-api\n    action: allow\n    from:\n      - labels: [app=web]\n    to:\n      - labels: [app=api]\n    ports: [8080]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_etcd_are_one_control_plane() {
    let Some(etcd) = etcd::Etcd::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = etcd.url("/tessera").to_string();
    let a = start(dir.path(), "a", &store);
    let b = start(dir.path(), "b", &store);
    // One CA: each server's ca.pem is the same certificate.
    let ca_a = std::fs::read_to_string(a.state.join("ca.pem")).unwrap();
    assert_eq!(
        ca_a,
        std::fs::read_to_string(b.state.join("ca.pem")).unwrap()
    );
    // Neither keeps a store file: the state is in etcd.
    assert!(!a.state.join("control.redb").exists());
    // a's administrator applies a policy through a; b serves it, and a's token works on b.
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, POLICY).unwrap();
    ok(admin(&a, &a, &["policy", "apply", file.to_str().unwrap()]));
    let status: serde_json::Value =
        serde_json::from_str(&ok(admin(&b, &a, &["server", "status", "--json"]))).unwrap();
    assert_eq!(status["policy_version"], 1, "{status}");
    // A join token made through b with b's administrator token is in the same store.
    let token = ok(admin(
        &b,
        &b,
        &["server", "token", "create", "--scope", "site=paris"],
    ));
    assert!(token.trim().len() > 20, "{token}");
}

#[test]
fn an_unreachable_etcd_stops_the_server_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let t0 = Instant::now();
    let out = Command::new(BIN)
        .args([
            "server",
            "run",
            "--store",
            &format!("etcd://127.0.0.1:{port}/tessera"),
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    let err = refused(&out);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("unreachable"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    // A malformed URL is refused before anything is tried.
    let out = Command::new(BIN)
        .args(["server", "run", "--store", "etcd://nowhere", "--state-dir"])
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    let err = refused(&out);
    assert!(
        err.contains("--store") && err.contains("etcd://nowhere"),
        "{err}"
    );
}

/// `--store etcds://...` with `--etcd-ca/cert/key`: the server keeps its state in an etcd
/// that takes only TLS clients with a certificate of its CA; a world-readable key is refused
/// before anything is sent, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_etcd_over_tls_with_a_client_certificate() {
    use std::os::unix::fs::PermissionsExt;
    let Some((etcd, files)) = etcd::Etcd::start_tls().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("client.pem");
    let key = dir.path().join("client.key");
    std::fs::write(&cert, &files.client.cert_pem).unwrap();
    std::fs::write(&key, &files.client.key_pem).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let store = etcd.url("/tessera").to_string();
    assert!(store.starts_with("etcds://"), "{store}");
    let tls = [
        "--etcd-ca",
        files.ca.to_str().unwrap(),
        "--etcd-cert",
        cert.to_str().unwrap(),
        "--etcd-key",
        key.to_str().unwrap(),
    ];
    let a = start_with(dir.path(), "a", &store, &tls);
    let token = ok(admin(
        &a,
        &a,
        &["server", "token", "create", "--scope", "site=paris"],
    ));
    assert!(token.trim().len() > 20, "{token}");
    // What the server wrote is in that etcd (read over TLS with the same certificate).
    let s = etcd.store("/tessera").await;
    assert!(
        !tessera_control::store::Store::list(&s, "")
            .await
            .unwrap()
            .is_empty(),
        "nothing in etcd"
    );
    // A key others can read: refused, naming it.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(BIN)
        .args([
            "server",
            "run",
            "--store",
            &store,
            "--listen",
            "127.0.0.1:0",
        ])
        .args(tls)
        .arg("--state-dir")
        .arg(dir.path().join("b"))
        .output()
        .unwrap();
    let err = refused(&out);
    assert!(
        err.contains("--etcd-key") && err.contains("chmod 600"),
        "{err}"
    );
}
