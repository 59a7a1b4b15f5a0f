//! Adversarial end-to-end tests of what is not a plain TCP connect (issue 12 item 6): a
//! privileged workload forging the proxy's mark, raw and ICMP sockets, UDP in and out. Real
//! tools (python3, ping, dig, nc) as workloads, real eBPF on real cgroups, real packets
//! between test hosts.
//!
//! Workloads here run as root with every capability (CAP_NET_ADMIN, CAP_NET_RAW): the
//! guards must hold against what such a process can ask of the kernel, not only against
//! what an unprivileged one cannot.
use std::{fs, path::PathBuf, time::Duration};

use tessera_proxy::flow::Verdict;
use tessera_tests::TestNet;

const T: Duration = Duration::from_secs(30);

/// The proxy's mark (the configuration's default `bpf.proxy_mark`).
const PROXY_MARK: &str = "0x7e550001";

/// Sets SO_MARK (argv[1]) on a TCP socket, reporting whether the kernel took it, then
/// connects to argv[2]:argv[3] and asks for /secret.txt, printing what comes back.
const MARKED_CONNECT: &str = r#"
import socket, sys
mark, host, port = int(sys.argv[1], 0), sys.argv[2], int(sys.argv[3])
s = socket.socket()
try:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    print("mark set", flush=True)
except OSError as e:
    print("mark refused errno", e.errno, flush=True)
s.settimeout(5)
try:
    s.connect((host, port))
    s.sendall(b"GET /secret.txt HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print("reply", data.decode(errors="replace"), flush=True)
except OSError as e:
    print("connect failed", e, flush=True)
"#;

/// host-a (enforced) with workload `web` (app=web), and `outsider` (no enforcer).
/// `policy` applies to host-a.
fn web_and_outsider(policy: &str) -> TestNet {
    let net = TestNet::with_plain_hosts(&["host-a"], &["outsider"]).unwrap();
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.write_policy(None, policy).unwrap();
    net
}

/// Serves `secret.txt` over HTTP on the outsider (10.77.0.2:8000); returns the server's log
/// (one line per request, with the client's address).
fn serve_secret(net: &TestNet) -> PathBuf {
    let root = net.dir.join("www");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("secret.txt"), "outsider-secret\n").unwrap();
    net.serve_http(net.host("outsider"), None, "0.0.0.0", 8000, &root)
        .unwrap();
    net.dir.join("outsider-other-python3.log")
}

/// A policy that lets web reach nothing but an api (which does not exist here).
const NOTHING_FOR_WEB: &str = "\
rules:
  - name: web-to-api
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=api]}]
";

#[test]
fn a_workload_with_cap_net_admin_cannot_forge_the_proxys_mark_to_escape_capture() {
    let net = web_and_outsider(NOTHING_FOR_WEB);
    net.start_enforcers().unwrap();
    let server_log = serve_secret(&net);
    let out = net
        .run(
            net.host("host-a"),
            Some("web"),
            "python3",
            &["-c", MARKED_CONNECT, PROXY_MARK, "10.77.0.2", "8000"],
            T,
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The kernel refuses the option (EPERM) although the workload is root.
    assert!(
        stdout.contains("mark refused errno 1"),
        "a workload set the proxy's mark: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Unmarked, the connect was captured and policy refused it: nothing reached the
    // outsider, and the refusal is on record.
    assert!(!stdout.contains("outsider-secret"), "escaped: {stdout}");
    let served = fs::read_to_string(&server_log).unwrap_or_default();
    assert!(
        !served.contains("secret.txt"),
        "the outsider served the workload directly: {served}"
    );
    let host = net.host("host-a");
    let denied = net.wait_flows(host, 1, |f| {
        f.verdict == Verdict::Denied && f.dst.addr.to_string() == "10.77.0.2:8000"
    });
    assert!(
        !denied.is_empty(),
        "no denied flow record for the captured connect: {:?}",
        net.flows(host)
    );
}
