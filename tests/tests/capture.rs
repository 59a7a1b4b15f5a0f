//! Adversarial end-to-end tests of capture itself (root, real eBPF, real programs): a local
//! user who is not a workload tries to stand where the proxy stands.
//!
//! The connect hooks send an enrolled workload's connections to the proxy's loopback
//! listener. If anyone else could listen there (before the enforcer starts, on an address
//! the enforcer did not bind, or while it restarts), they would receive every workload's
//! connection in plaintext. These tests show that the hooks only ever hand a connection
//! to the proxy's own listener, and fail the connect otherwise.
use std::{fs, thread, time::Duration};

use tessera_tests::TestNet;

/// The proxy's outbound port (the configuration's default, as the harness writes it).
const OUTBOUND_PORT: &str = "15001";

/// A listener as user `nobody` on 127.0.0.1 and [::1] at `port` (whatever it can bind),
/// writing one line per connection it accepts, and "listening" once both are tried.
const SQUATTER: &str = r#"
import select, socket, sys
port = int(sys.argv[1])
socks = []
for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((addr, port)); s.listen(64); socks.append(s)
        print("bound", addr, flush=True)
    except OSError as e:
        print("cannot bind", addr, e, flush=True)
print("listening", flush=True)
while True:
    ready, _, _ = select.select(socks, [], [])
    for s in ready:
        c, peer = s.accept()
        print("accepted", peer, flush=True)
        c.close()
"#;

/// `setpriv`'s arguments that run the system python as `nobody` with `script` and `args`
/// (root's own python may not be runnable by others).
fn python_as_nobody<'a>(script: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        script,
    ];
    all.extend_from_slice(args);
    all
}

/// A listener as `nobody` on [::1] only.
const IPV6_SQUATTER: &str = "import socket,sys,time\ns=socket.socket(socket.AF_INET6)\ns.bind(('::1',int(sys.argv[1])))\ns.listen(8)\nprint('listening',flush=True)\ntime.sleep(600)";

fn two_hosts() -> TestNet {
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[8080])
        .unwrap();
    net
}

/// Starts the squatter on `host` (outside any enrolled cgroup) as `nobody`; returns its
/// log (what it bound and accepted).
fn squat(net: &TestNet, host: &str) -> std::path::PathBuf {
    let h = net.host(host);
    net.spawn(
        h,
        None,
        "setpriv",
        &python_as_nobody(SQUATTER, &[OUTBOUND_PORT]),
    )
    .unwrap();
    let log = net.dir.join(format!("{host}-other-setpriv.log"));
    for _ in 0..100 {
        if fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening")
        {
            return log;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("the squatter never started: {:?}", fs::read_to_string(&log));
}

/// web@host-a connects to the api on host-b over IPv4 and over IPv6; returns both outputs.
fn web_connects(net: &TestNet) -> [std::process::Output; 2] {
    ["http://10.77.0.2:8080/", "http://[fd77::2]:8080/"].map(|url| {
        net.run(
            net.host("host-a"),
            Some("web"),
            "curl",
            &["-sS", "-g", "-m", "3", url],
            Duration::from_secs(10),
        )
        .unwrap()
    })
}

#[test]
fn a_local_user_on_the_proxy_port_never_receives_a_workloads_connection() {
    let net = two_hosts();
    net.options.lock().unwrap().keep_attached = true;
    net.start_enforcers().unwrap();
    let root = net.dir.join("www");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("index.html"), "api\n").unwrap();
    net.serve_http(net.host("host-b"), Some("api"), "::", 8080, &root)
        .unwrap();
    for out in web_connects(&net) {
        assert!(
            out.status.success(),
            "through Tessera before the attack: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The enforcer of host-a dies (capture stays pinned, failing closed) and a local user
    // takes its port on both loopback addresses.
    net.stop_enforcer(net.host("host-a"), true).unwrap();
    let log = squat(&net, "host-a");
    let squatted = fs::read_to_string(&log).unwrap();
    assert!(
        squatted.contains("bound 127.0.0.1") && squatted.contains("bound ::1"),
        "{squatted}"
    );
    for out in web_connects(&net) {
        assert!(
            !out.status.success(),
            "a workload's connect went ahead while a stranger held the proxy's port"
        );
        // curl exit 7: the connect itself failed (the hook refused it).
        assert_eq!(
            out.status.code(),
            Some(7),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let squatted = fs::read_to_string(&log).unwrap();
    assert!(
        !squatted.contains("accepted"),
        "the squatter received a workload's connection:\n{squatted}"
    );

    // Nor can the enforcer start next to the squatter: binding every address capture uses
    // is required, and the error names the field and the address.
    let err = net
        .start_enforcer(net.host("host-a"))
        .expect_err("started although its port was taken");
    let err = format!("{err:#}");
    assert!(err.contains("listen.outbound_port"), "{err}");
    assert!(
        !fs::read_to_string(&log).unwrap().contains("accepted"),
        "the squatter received a connection"
    );
}

#[test]
fn an_enforcer_that_cannot_bind_the_ipv6_loopback_does_not_start() {
    let net = two_hosts();
    // Only [::1] is taken (127.0.0.1 is free): the enforcer used to start anyway and leave
    // IPv6 connects to whoever held [::1].
    let log = {
        let h = net.host("host-a");
        net.spawn(
            h,
            None,
            "setpriv",
            &python_as_nobody(IPV6_SQUATTER, &[OUTBOUND_PORT]),
        )
        .unwrap();
        net.dir.join("host-a-other-setpriv.log")
    };
    for _ in 0..100 {
        if fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening")
        {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let err = net
        .start_enforcer(net.host("host-a"))
        .expect_err("started without its IPv6 listener");
    let err = format!("{err:#}");
    assert!(
        err.contains("listen.outbound_port: cannot listen on [::1]:15001"),
        "{err}"
    );
}

/// As `nobody`, outside any workload: connects from 127.0.0.1 at each port of `ports` to
/// the proxy's outbound port and asks for `/`; prints what each got.
const SWEEP: &str = r#"
import socket, sys
lo, hi = int(sys.argv[1]), int(sys.argv[2])
for port in range(lo, hi + 1):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.connect(("127.0.0.1", int(sys.argv[3])))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = s.recv(65536)
        print(port, "got", len(data), data[:40], flush=True)
    except OSError as e:
        print(port, "refused", e, flush=True)
    finally:
        s.close()
"#;

#[test]
fn capture_records_of_failed_connects_cannot_be_claimed_after_a_restart() {
    let net = two_hosts();
    net.options.lock().unwrap().keep_attached = true;
    net.start_enforcers().unwrap();
    let root = net.dir.join("www");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("index.html"), "secret of api\n").unwrap();
    net.serve_http(net.host("host-b"), Some("api"), "0.0.0.0", 8080, &root)
        .unwrap();
    // host-a's enforcer dies; web keeps trying from known ports: every connect fails.
    net.stop_enforcer(net.host("host-a"), true).unwrap();
    for _ in 0..3 {
        let out = net
            .run(
                net.host("host-a"),
                Some("web"),
                "curl",
                &[
                    "-sS",
                    "-m",
                    "2",
                    "--local-port",
                    "40000-40009",
                    "http://10.77.0.2:8080/",
                ],
                Duration::from_secs(10),
            )
            .unwrap();
        assert!(
            !out.status.success(),
            "connected while the enforcer was down"
        );
    }
    // The enforcer comes back; a local user sweeps those ports against the proxy.
    net.start_enforcer(net.host("host-a")).unwrap();
    let out = net
        .run(
            net.host("host-a"),
            None,
            "setpriv",
            &python_as_nobody(SWEEP, &["40000", "40009", OUTBOUND_PORT]),
            Duration::from_secs(60),
        )
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        report.lines().count(),
        10,
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !report.contains("secret of api"),
        "a stranger was tunnelled as the workload:\n{report}"
    );
    let served = fs::read_to_string(net.dir.join("host-b-api-python3.log")).unwrap_or_default();
    assert!(
        !served.contains("GET /"),
        "the api served a request it should never have seen:\n{served}"
    );
    // Each of the stranger's connections was refused for want of a capture record.
    let refused = net
        .wait_flows(net.host("host-a"), 10, |f| f.code.as_str() == "no-capture")
        .len();
    assert!(refused >= 10, "{refused} no-capture records");
}
