//! End-to-end tests of identity-based policy on test hosts: both ends decide, refusals never
//! reach the application, a reload takes effect without a restart, a bad policy leaves the
//! previous one in force, and live connections a new policy denies are closed.
use std::{fs, thread, time::Duration};

use serde_json::Value;
use tessera_proxy::flow::{Direction, FlowRecord, Verdict};
use tessera_tests::TestNet;

const T: Duration = Duration::from_secs(30);

const WEB_API_DB: &str = "\
rules:
  - name: web-to-api
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=api]}]
  - name: api-to-db
    action: allow
    from: [{labels: [app=api]}]
    to: [{labels: [app=db]}]
";

/// host-a: web; host-b: api (echo on 7000); host-c: db (blast server on 7100, logs its
/// peers). `policy` applies to every host, `host_c` (if any) to host-c instead.
fn three_tiers(policy: &str) -> TestNet {
    three_tiers_with(policy, None)
}

fn three_tiers_with(policy: &str, host_c: Option<&str>) -> TestNet {
    let net = TestNet::new(&["host-a", "host-b", "host-c"]).expect("test hosts");
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[7000])
        .unwrap();
    net.add_workload(net.host("host-c"), "db", &[("app", "db")], &[7100])
        .unwrap();
    net.write_policy(None, policy).unwrap();
    if let Some(c) = host_c {
        net.write_policy(Some(net.host("host-c")), c).unwrap();
    }
    net.start_enforcers().unwrap();
    net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", 7000)
        .unwrap();
    net.serve_tool(net.host("host-c"), Some("db"), "serve-blast", 7100)
        .unwrap();
    net
}

/// One echo exchange from `workload` on `host` to `addr`; true if it worked.
fn echo(net: &TestNet, host: &str, workload: &str, ip: &str, port: u16) -> bool {
    let out = net
        .run_tool(
            net.host(host),
            Some(workload),
            &["echo-many", ip, &port.to_string(), "1"],
            T,
        )
        .unwrap();
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or(Value::Null);
    v["ok"] == 1
}

/// One blast (1 KiB each way) to the db; true if it worked.
fn to_db(net: &TestNet, host: &str, workload: &str) -> bool {
    let out = net
        .run_tool(
            net.host(host),
            Some(workload),
            &["blast", "10.77.0.3", "7100", "1024", "1024"],
            T,
        )
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"received_ok\": true")
}

/// Exchanges the db program completed (it prints one JSON line per finished exchange).
fn db_connections(net: &TestNet) -> usize {
    fs::read_to_string(net.dir.join("host-c-db-python3.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('{'))
        .count()
}

fn last(net: &TestNet, host: &str, pred: impl Fn(&FlowRecord) -> bool) -> FlowRecord {
    net.wait_flows(net.host(host), 1, &pred)
        .pop()
        .unwrap_or_else(|| panic!("no such flow on {host}: {:?}", net.flows(net.host(host))))
}

#[test]
fn both_ends_enforce_identity_policy_and_cite_the_rule() {
    let net = three_tiers(WEB_API_DB);
    assert!(
        echo(&net, "host-a", "web", "10.77.0.2", 7000),
        "web -> api must be allowed"
    );
    assert!(to_db(&net, "host-b", "api"), "api -> db must be allowed");
    assert!(!to_db(&net, "host-a", "web"), "web -> db must be refused");
    // Only api's connection ever reached the database program.
    assert_eq!(db_connections(&net), 1);

    let f = last(&net, "host-a", |f| {
        f.dst.addr.to_string() == "10.77.0.2:7000"
    });
    assert_eq!(
        (f.verdict, f.rule.as_deref()),
        (Verdict::Allowed, Some("web-to-api"))
    );
    let f = last(&net, "host-b", |f| {
        f.direction == Direction::Inbound && f.dst.workload.as_deref() == Some("api")
    });
    assert_eq!(
        (f.verdict, f.rule.as_deref()),
        (Verdict::Allowed, Some("web-to-api"))
    );
    let f = last(&net, "host-c", |f| f.src.workload.as_deref() == Some("web"));
    assert_eq!(f.verdict, Verdict::Denied);
    assert_eq!(f.reason, "ingress denied: no rule allows it (default deny)");
    let f = last(&net, "host-a", |f| {
        f.dst.addr.to_string() == "10.77.0.3:7100"
    });
    assert_eq!(f.verdict, Verdict::Denied);
    assert_eq!(
        f.reason,
        "host-c refused: host-c: ingress denied: no rule allows it (default deny)"
    );
}

#[test]
fn the_source_enforcer_denies_egress_even_when_the_destination_allows() {
    // host-c lets web in; host-a's own policy does not let web out to the db.
    let mut open = WEB_API_DB.to_owned();
    open += "  - name: web-to-db\n    action: allow\n    from: [{labels: [app=web]}]\n    to: [{labels: [app=db]}]\n";
    let net = three_tiers_with(WEB_API_DB, Some(&open));
    assert!(
        !to_db(&net, "host-a", "web"),
        "egress must be refused by host-a"
    );
    let f = last(&net, "host-a", |f| {
        f.dst.addr.to_string() == "10.77.0.3:7100"
    });
    assert_eq!(f.reason, "egress denied: no rule allows it (default deny)");
    // host-c's ingress allowed it and connected to the db (as a TCP handshake would), but
    // the source's refusal reset it before one byte was sent.
    let c = last(&net, "host-c", |f| f.src.workload.as_deref() == Some("web"));
    assert_eq!(c.rule.as_deref(), Some("web-to-db"));
    assert_eq!(c.bytes_sent, 0);
    assert_eq!(c.reason, "the peer's connection was reset");
    assert_eq!(
        db_connections(&net),
        0,
        "the db program completed an exchange that egress denied"
    );
}

#[test]
fn a_reload_flips_a_decision_without_a_restart_and_a_bad_policy_changes_nothing() {
    let net = three_tiers(WEB_API_DB);
    let pid_a = net.enforcer_pid(net.host("host-a"));
    assert!(!to_db(&net, "host-a", "web"));
    let mut open = WEB_API_DB.to_owned();
    open += "  - name: web-to-db\n    action: allow\n    from: [{labels: [app=web]}]\n    to: [{labels: [app=db]}]\n";
    net.write_policy(None, &open).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !to_db(&net, "host-a", "web") {
        assert!(
            std::time::Instant::now() < deadline,
            "the new policy never took effect"
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(net.enforcer_pid(net.host("host-a")), pid_a, "no restart");
    let f = last(&net, "host-c", |f| {
        f.src.workload.as_deref() == Some("web") && f.verdict == Verdict::Allowed
    });
    assert_eq!(f.rule.as_deref(), Some("web-to-db"));

    // A typo: reported with its position, and the policy in force stays.
    net.write_policy(
        None,
        &open.replace(
            "name: web-to-db\n    action: allow",
            "name: web-to-db\n    action: alow",
        ),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !net
        .enforcer_log(net.host("host-c"))
        .contains("previous policy stays in force")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the bad policy was not reported"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        net.enforcer_log(net.host("host-c"))
            .contains("policy-all.yaml:11:13: action must be allow or deny"),
        "{}",
        net.enforcer_log(net.host("host-c"))
    );
    assert!(
        to_db(&net, "host-a", "web"),
        "the previous policy must stay in force"
    );
    assert!(echo(&net, "host-a", "web", "10.77.0.2", 7000));
}

#[test]
fn a_live_connection_that_a_new_policy_denies_is_closed() {
    let net = three_tiers(WEB_API_DB);
    // A client that keeps one connection open and pings every 50 ms; it reports how the
    // connection ended.
    let log = net
        .spawn_holder(net.host("host-a"), "web", "10.77.0.2", 7000)
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    // Remove web-to-api everywhere.
    net.write_policy(None, &WEB_API_DB.replace("  - name: web-to-api\n    action: allow\n    from: [{labels: [app=web]}]\n    to: [{labels: [app=api]}]\n", "")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = fs::read_to_string(&log).unwrap_or_default();
        if out.contains("reset") || out.contains("eof") {
            assert!(out.contains("reset"), "closed, but not with a reset: {out}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the live connection survived the reload: {out}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // Both ends apply the reload; at least one closed it, and both record it as refused.
    let a = last(&net, "host-a", |f| {
        f.dst.addr.to_string() == "10.77.0.2:7000"
    });
    let b = last(&net, "host-b", |f| f.direction == Direction::Inbound);
    let reloaded = |f: &FlowRecord| f.reason.starts_with("closed by policy reload");
    assert!(
        reloaded(&a) || reloaded(&b),
        "neither end cites the reload:\n{a:?}\n{b:?}"
    );
    for f in [&a, &b] {
        assert_ne!(f.verdict, Verdict::Error, "{f:?}");
        assert!(
            f.bytes_sent > 0,
            "the connection carried pings before: {f:?}"
        );
    }
    // New connections are refused too.
    assert!(!echo(&net, "host-a", "web", "10.77.0.2", 7000));
}

/// A real DNS server (dnsmasq) on the outsider host answering `registry.test` with `addr`,
/// TTL 1 s.
fn dns_server(net: &TestNet, addr: &str) -> u32 {
    // The outsider host is 10.77.0.3, the address the tests query.
    let address = format!("--address=/registry.test/{addr}");
    net.spawn_dnsmasq("outsider", &["--local-ttl=1", &address, "--log-queries"])
}

#[test]
fn dns_names_in_policy_follow_the_dns_and_its_ttl() {
    assert!(
        tessera_tests::which("dnsmasq").is_some(),
        "dnsmasq is missing: run `cargo xtask setup`"
    );
    let net = TestNet::with_plain_hosts(&["host-a", "host-b"], &["outsider"]).unwrap();
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.write_policy(
        None,
        "\
rules:
  - name: web-to-registry
    action: allow
    from: [{labels: [app=web]}]
    to: [{dns: registry.test}]
    ports: [8000]
",
    )
    .unwrap();
    net.options.lock().unwrap().dns_servers = vec!["10.77.0.3:53".into()];
    let mut dns = dns_server(&net, "10.77.0.3");
    net.start_enforcers().unwrap();
    let root = net.dir.join("www");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("index.txt"), "registry\n").unwrap();
    net.serve_http(net.host("outsider"), None, "0.0.0.0", 8000, &root)
        .unwrap();
    let curl = |net: &TestNet| {
        net.run(
            net.host("host-a"),
            Some("web"),
            "curl",
            &[
                "-sS",
                "-m",
                "3",
                "--fail",
                "http://10.77.0.3:8000/index.txt",
            ],
            T,
        )
        .unwrap()
    };

    // registry.test resolves to the outsider: the name's rule lets web reach it directly.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = curl(&net);
        if out.status.success() {
            assert_eq!(out.stdout, b"registry\n");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never allowed by the dns rule: {}",
            net.enforcer_log(net.host("host-a"))
        );
        thread::sleep(Duration::from_millis(200));
    }
    let f = last(&net, "host-a", |f| f.verdict == Verdict::Allowed);
    assert_eq!(f.rule.as_deref(), Some("web-to-registry"));
    assert_eq!(f.dst.addr.to_string(), "10.77.0.3:8000");
    // The record names the external peer by the policy's DNS name.
    assert_eq!(f.dst.dns_name.as_deref(), Some("registry.test"));

    // The DNS now says registry.test is elsewhere; after the TTL the rule no longer matches.
    unsafe { libc_kill(dns) };
    thread::sleep(Duration::from_millis(300));
    dns = dns_server(&net, "10.77.0.99");
    let _ = dns;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while curl(&net).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "the old resolution outlived its TTL"
        );
        thread::sleep(Duration::from_millis(200));
    }
    // (A fetch in flight when the new answer arrived is closed as a reload instead; the
    // refusal of a new connection is what this checks.)
    assert!(!curl(&net).status.success());
    let refusal = "no enforcer serves 10.77.0.3; denied: no rule allows it (default deny)";
    let f = last(&net, "host-a", |f| {
        f.verdict == Verdict::Denied && f.reason == refusal
    });
    assert_eq!(f.dst.addr.to_string(), "10.77.0.3:8000");
}

unsafe fn libc_kill(pid: u32) {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    unsafe { kill(pid as i32, 15) };
}
