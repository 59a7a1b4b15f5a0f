//! Adversarial end-to-end tests of issue 12 item 7, "loopback is trusted both ways" (root,
//! real eBPF, real programs).
//!
//! Before: any `::1` source and the delivery address 127.0.0.77 passed the inbound guard,
//! handshake mode's rules skipped `lo`, and every admitted remote client reached the
//! application from 127.0.0.77 or ::1. So a local user reached protected ports around
//! Tessera, and applications that trust localhost (Redis protected mode, admin-from-localhost
//! checks) trusted every remote peer. Now only the proxy's own delivery sockets pass (by
//! registration, never by source address), handshake mode guards `lo` too, and deliveries
//! come from the peer's real address (`localhost` delivery is an option).
use std::{fs, process::Output, time::Duration};

use tessera_tests::{TestNet, which};

const SECS_30: Duration = Duration::from_secs(30);
const PORT: u16 = 8080;

/// Host a (workload "web", the remote client) and host b (workload "api" serving `PORT`
/// and 6379); in handshake mode if `handshake`.
fn two_hosts(handshake: bool, localhost_delivery: bool) -> TestNet {
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    {
        let mut opts = net.options.lock().unwrap();
        opts.handshake = handshake;
        opts.localhost_delivery = localhost_delivery;
    }
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[PORT, 6379])
        .unwrap();
    net.start_enforcers().unwrap();
    net
}

/// `python3 -m http.server` as workload api on host-b, on every address of both families;
/// it logs each request with the client's address.
fn serve(net: &TestNet) {
    let root = net.dir.join("www");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("index.txt"), "api\n").unwrap();
    net.serve_http(net.host("host-b"), Some("api"), "::", PORT, &root)
        .unwrap();
}

fn server_log(net: &TestNet) -> String {
    fs::read_to_string(net.dir.join("host-b-api-python3.log")).unwrap_or_default()
}

/// curl as `nobody` on host-b, outside every workload (an unrelated local user), with
/// `extra` arguments before the URL.
fn curl_as_nobody(net: &TestNet, extra: &[&str], url: &str) -> Output {
    let mut args = vec![
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "/usr/bin/curl",
        "-sS",
        "-g",
        "--fail",
        "-m",
        "5",
    ];
    args.extend_from_slice(extra);
    args.push(url);
    net.run(net.host("host-b"), None, "setpriv", &args, SECS_30)
        .unwrap()
}

/// What a local user tries: the loopback addresses, the host's own addresses (also over
/// `lo`), and the old delivery address as its source.
fn local_attempts() -> Vec<(Vec<&'static str>, &'static str)> {
    vec![
        (vec![], "http://[::1]:8080/index.txt"),
        (vec![], "http://127.0.0.1:8080/index.txt"),
        (vec![], "http://10.77.0.2:8080/index.txt"),
        (vec![], "http://[fd77::2]:8080/index.txt"),
        (
            vec!["--interface", "127.0.0.77"],
            "http://127.0.0.1:8080/index.txt",
        ),
    ]
}

/// Every local attempt fails and none reached the application.
fn assert_local_user_refused(net: &TestNet) {
    for (extra, url) in local_attempts() {
        let out = curl_as_nobody(net, &extra, url);
        assert!(
            !out.status.success(),
            "a local user reached the protected port: curl {extra:?} {url} -> {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let log = server_log(net);
    assert!(
        !log.contains("GET /index.txt"),
        "the application served a local user: {log}"
    );
}

/// web@host-a fetches the api's index through Tessera.
fn remote_fetch(net: &TestNet, url: &str) {
    let out = net.curl("host-a", Some("web"), url).unwrap();
    assert_eq!(
        out.stdout,
        b"api\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_local_user_cannot_reach_a_protected_port_over_loopback_in_tunnel_mode() {
    let net = two_hosts(false, false);
    serve(&net);
    assert_local_user_refused(&net);
    // The remote client is served, and the application sees its real address (IPv4 and
    // IPv6), never a loopback one.
    remote_fetch(&net, "http://10.77.0.2:8080/index.txt");
    remote_fetch(&net, "http://[fd77::2]:8080/index.txt");
    let log = server_log(&net);
    let requests: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("GET /index.txt"))
        .collect();
    assert_eq!(requests.len(), 2, "{log}");
    assert!(
        requests[0].starts_with("::ffff:10.77.0.1 - -") || requests[0].starts_with("10.77.0.1 - -"),
        "the application did not see host-a's address: {log}"
    );
    assert!(
        requests[1].starts_with("fd77::1 - -"),
        "the application did not see host-a's IPv6 address: {log}"
    );
}

#[test]
fn a_local_user_cannot_reach_a_protected_port_over_loopback_in_handshake_mode() {
    let net = two_hosts(true, false);
    serve(&net);
    assert_local_user_refused(&net);
    remote_fetch(&net, "http://10.77.0.2:8080/index.txt");
    let log = server_log(&net);
    assert!(
        log.lines()
            .any(|l| l.contains("GET /index.txt") && l.contains("10.77.0.1 - -")),
        "{log}"
    );
}

/// An unmodified `redis-server` with its default safety: protected mode on, no password,
/// no `bind` (it answers only clients from 127.0.0.1 or ::1; the IPv6 delivery address was
/// ::1, so redis took every remote peer reaching it over IPv6 for a local client).
fn redis_protected_mode(net: &TestNet) {
    assert!(
        which("redis-server").is_some() && which("redis-cli").is_some(),
        "redis is missing: run `cargo xtask setup`"
    );
    let b = net.host("host-b");
    let pid = net
        .spawn(
            b,
            Some("api"),
            "redis-server",
            &["--port", "6379", "--save", "", "--appendonly", "no"],
        )
        .unwrap();
    net.wait_listening(pid, 6379).unwrap();
}

/// redis-cli as web@host-a, to the api's redis over IPv6, through Tessera.
fn redis_cli(net: &TestNet, args: &[&str]) -> String {
    let mut full = vec!["-h", "fd77::2", "-p", "6379"];
    full.extend_from_slice(args);
    let out = net
        .run(net.host("host-a"), Some("web"), "redis-cli", &full, SECS_30)
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn redis_in_protected_mode_does_not_take_a_remote_peer_for_a_local_client() {
    let net = two_hosts(false, false);
    redis_protected_mode(&net);
    // Admitted by Tessera, but redis sees host-a's address: not a loopback client.
    let answer = redis_cli(&net, &["SET", "owned", "1"]);
    assert!(
        answer.contains("DENIED") && answer.contains("protected mode"),
        "redis took the remote peer for a local client: {answer}"
    );
}

#[test]
fn localhost_delivery_is_an_option_and_still_guarded_by_registration() {
    let net = two_hosts(false, true);
    redis_protected_mode(&net);
    serve(&net);
    // The old behaviour on request: redis sees the delivery address ::1 (and so trusts
    // the remote peer: this option is for applications that trust no source address).
    assert_eq!(redis_cli(&net, &["SET", "k", "v"]).trim(), "OK");
    let clients = redis_cli(&net, &["CLIENT", "LIST"]);
    assert!(clients.contains("addr=[::1]:"), "{clients}");
    // But the delivery address is no pass: a local user sending from it is refused.
    assert_local_user_refused(&net);
    remote_fetch(&net, "http://10.77.0.2:8080/index.txt");
    assert!(server_log(&net).contains("127.0.0.77 - -"));
}

/// `ip rule` (of `family`, "-4" or "-6") and `iptables -t mangle -S OUTPUT` on host-b.
fn delivery_routing(net: &TestNet, family: &str) -> (String, String) {
    let b = net.host("host-b");
    let run = |program: &str, args: &[&str]| {
        let out = net.run(b, None, program, args, SECS_30).unwrap();
        assert!(out.status.success(), "{program} {args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tables = if family == "-4" {
        "iptables"
    } else {
        "ip6tables"
    };
    (
        run("ip", &[family, "rule"]),
        run(tables, &["-w", "-t", "mangle", "-S", "OUTPUT"]),
    )
}

#[test]
fn the_reply_routing_is_replaced_after_a_crash_and_removed_at_shutdown() {
    let net = two_hosts(false, false);
    serve(&net);
    let b = net.host("host-b");
    // A crash leaves the routing behind; the next start replaces it (no duplicates).
    net.stop_enforcer(b, true).unwrap();
    net.start_enforcer(b).unwrap();
    for family in ["-4", "-6"] {
        let (rules, output) = delivery_routing(&net, family);
        assert_eq!(rules.matches("lookup 7755").count(), 1, "{rules}");
        assert_eq!(output.matches("-j TESSERA-DELIVER").count(), 1, "{output}");
    }
    remote_fetch(&net, "http://10.77.0.2:8080/index.txt");
    remote_fetch(&net, "http://[fd77::2]:8080/index.txt");
    // SIGTERM: nothing of it is left.
    net.stop_enforcer(b, false).unwrap();
    for family in ["-4", "-6"] {
        let (rules, output) = delivery_routing(&net, family);
        assert!(!rules.contains("lookup 7755"), "{rules}");
        assert!(!output.contains("TESSERA-DELIVER"), "{output}");
    }
}

#[test]
fn a_direct_client_that_policy_allows_is_delivered_from_its_own_address() {
    let net = TestNet::with_plain_hosts(&["host-a", "host-b"], &["outsider"]).unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[PORT])
        .unwrap();
    let policy = "rules:\n  - name: outsider-to-api\n    action: allow\n    from: [{cidr: 10.77.0.3/32}, {cidr: \"fd77::3/128\"}]\n    to: [{labels: [app=api]}]\n";
    net.write_policy(None, policy).unwrap();
    net.start_enforcers().unwrap();
    serve(&net);
    // A host without an enforcer, allowed by address: the application sees that address
    // (its replies are routed back through the proxy, which answers from it).
    for url in [
        "http://10.77.0.2:8080/index.txt",
        "http://[fd77::2]:8080/index.txt",
    ] {
        let out = net.curl("outsider", None, url).unwrap();
        assert_eq!(
            out.stdout,
            b"api\n",
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = server_log(&net);
    assert!(log.contains("10.77.0.3 - -"), "{log}");
    assert!(log.contains("fd77::3 - -"), "{log}");
    assert!(
        !log.contains("127.0.0.77") && !log.contains("::1 - -"),
        "{log}"
    );
}
