//! Adversarial end-to-end tests of what is not a plain TCP connect (issue 12 item 6): a
//! privileged workload forging the proxy's mark, raw and ICMP sockets, UDP in and out. Real
//! tools (python3, ping, dig, nc) as workloads, real eBPF on real cgroups, real packets
//! between test hosts.
//!
//! Workloads here run as root with every capability (CAP_NET_ADMIN, CAP_NET_RAW): the
//! guards must hold against what such a process can ask of the kernel, not only against
//! what an unprivileged one cannot.
use std::{
    fs,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use tessera_proxy::flow::{Protocol, Verdict};
use tessera_tests::{TestNet, wait_for};

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

/// Waits (bounded) for a flow record on host-a matching `pred`; panics with the records.
fn flow_on_a(
    net: &TestNet,
    what: &str,
    pred: impl Fn(&tessera_proxy::flow::FlowRecord) -> bool,
) -> tessera_proxy::flow::FlowRecord {
    let host = net.host("host-a");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(f) = net.flows(host).into_iter().find(|f| pred(f)) {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "no flow record: {what}: {:#?}",
            net.flows(host)
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// host-a (enforced, workload `web`), and two plain hosts: `outsider` (10.77.0.2) and
/// `other` (10.77.0.3).
fn web_and_two_outsiders(policy: &str) -> TestNet {
    let net = TestNet::with_plain_hosts(&["host-a"], &["outsider", "other"]).unwrap();
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.write_policy(None, policy).unwrap();
    net
}

/// `ping -c 1` from web to `ip`: whether a reply came back, and what ping said.
fn ping(net: &TestNet, ip: &str) -> (bool, String) {
    let out = net
        .run(
            net.host("host-a"),
            Some("web"),
            "ping",
            &["-n", "-c", "1", "-W", "3", ip],
            T,
        )
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && said.contains("1 received"), said)
}

/// Opens raw sockets of several kinds and sets IP_HDRINCL, reporting each outcome.
const RAW_SOCKETS: &str = r#"
import socket
for name, proto in (("udp", socket.IPPROTO_UDP), ("raw", socket.IPPROTO_RAW), ("icmp", socket.IPPROTO_ICMP)):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
        print(name, "opened", flush=True)
        try:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
            print(name, "hdrincl set", flush=True)
        except OSError as e:
            print(name, "hdrincl refused", e.errno, flush=True)
    except OSError as e:
        print(name, "refused", e.errno, flush=True)
"#;

const PING_OUTSIDER: &str = "\
rules:
  - name: ping-outsider
    action: allow
    protocol: icmp
    from: [{labels: [app=web]}]
    to: [{cidr: 10.77.0.2}]
";

#[test]
fn icmp_and_raw_sockets_are_denied_unless_an_icmp_rule_allows_the_destination() {
    assert!(
        tessera_tests::which("ping").is_some(),
        "ping is missing: run `cargo xtask setup`"
    );
    let net = web_and_two_outsiders(PING_OUTSIDER);
    net.start_enforcers().unwrap();
    // The rule's destination answers; another host does not, although it is as near.
    let (ok, said) = ping(&net, "10.77.0.2");
    assert!(ok, "ping to the allowed host failed: {said}");
    let (ok, said) = ping(&net, "10.77.0.3");
    assert!(!ok, "ping reached a host no rule allows: {said}");
    // Raw sockets that could carry anything are refused whatever the rules; an ICMP one
    // is allowed (a rule allows icmp) but cannot write its own headers.
    let out = net
        .run(
            net.host("host-a"),
            Some("web"),
            "python3",
            &["-c", RAW_SOCKETS],
            T,
        )
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    for line in [
        "udp refused 1",
        "raw refused 1",
        "icmp opened",
        "icmp hdrincl refused 1",
    ] {
        assert!(said.contains(line), "{line:?} not in: {said}");
    }
    // Each decision is a flow record with its protocol.
    let f = flow_on_a(&net, "allowed icmp", |f| {
        f.protocol == Protocol::Icmp
            && f.verdict == Verdict::Allowed
            && f.dst.addr.ip().to_string() == "10.77.0.2"
    });
    assert_eq!(f.rule.as_deref(), Some("ping-outsider"));
    assert_eq!(f.src.workload.as_deref(), Some("web"));
    flow_on_a(&net, "denied icmp", |f| {
        f.protocol == Protocol::Icmp
            && f.verdict == Verdict::Denied
            && f.dst.addr.ip().to_string() == "10.77.0.3"
    });
    flow_on_a(&net, "refused raw socket", |f| {
        f.protocol == Protocol::Raw && f.verdict == Verdict::Denied
    });

    // A process in a sub-cgroup of the workload's is the workload's: same rules.
    let child = net.cgroup(net.host("host-a"), Some("web")).join("child");
    fs::create_dir_all(&child).unwrap();
    for (ip, allowed) in [("10.77.0.2", true), ("10.77.0.3", false)] {
        let out = net
            .command(
                net.host("host-a"),
                &child,
                "ping",
                &["-n", "-c", "1", "-W", "3", ip],
            )
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.success() && said.contains("1 received"),
            allowed,
            "ping {ip} from a sub-cgroup: {said} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Without an icmp rule, ping cannot even open its socket.
    net.write_policy(None, NOTHING_FOR_WEB).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ok, said) = ping(&net, "10.77.0.2");
        if !ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the icmp rule outlived its removal: {said}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// dnsmasq on `host` answering `sink.test` with 10.77.0.3, logging queries to its log.
fn dnsmasq(net: &TestNet, host: &str) -> PathBuf {
    net.spawn_dnsmasq(
        host,
        &[
            "--log-facility=-",
            "--log-queries",
            "--address=/sink.test/10.77.0.3",
        ],
    );
    let log = net.dir.join(format!("{host}-other-dnsmasq.log"));
    assert!(
        wait_for(&log, "started", Duration::from_secs(10)),
        "dnsmasq on {host} did not start: {:?}",
        fs::read_to_string(&log)
    );
    log
}

/// `dig` from web asking `server` for sink.test: the answer, if any.
fn dig(net: &TestNet, server: &str) -> Option<String> {
    let at = format!("@{server}");
    let out = net
        .run(
            net.host("host-a"),
            Some("web"),
            "dig",
            &[&at, "sink.test", "A", "+short", "+time=2", "+tries=1"],
            T,
        )
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && answer == "10.77.0.3").then_some(answer)
}

const UDP_EGRESS: &str = "\
rules:
  - name: web-to-sink
    action: allow
    protocol: udp
    from: [{labels: [app=web]}]
    to: [{dns: sink.test}]
    ports: [9999]
";

#[test]
fn udp_egress_is_denied_unless_a_rule_or_the_configured_resolver_allows_it() {
    for tool in ["dig", "nc", "dnsmasq"] {
        assert!(
            tessera_tests::which(tool).is_some(),
            "{tool} is missing: run `cargo xtask setup`"
        );
    }
    let net = web_and_two_outsiders(UDP_EGRESS);
    // The outsider is the configured resolver; `other` runs a resolver too.
    net.options.lock().unwrap().dns_servers = vec!["10.77.0.2:53".into()];
    let resolver_log = dnsmasq(&net, "outsider");
    let rogue_log = dnsmasq(&net, "other");
    net.start_enforcers().unwrap();
    // DNS to the configured resolver works; to another server it never leaves.
    assert_eq!(dig(&net, "10.77.0.2").as_deref(), Some("10.77.0.3"));
    assert_eq!(dig(&net, "10.77.0.3"), None, "DNS to an unlisted server");
    let rogue = fs::read_to_string(&rogue_log).unwrap_or_default();
    assert!(
        !rogue.contains("query[A] sink.test from 10.77.0.1"),
        "the unlisted server got the query: {rogue}"
    );
    assert!(
        fs::read_to_string(&resolver_log)
            .unwrap_or_default()
            .contains("query[A] sink.test from 10.77.0.1"),
        "the resolver never saw the query"
    );
    // The rule names sink.test (which resolves to `other`) and port 9999: datagrams there
    // arrive, to another port of the same host they do not.
    let allowed = net.udp_listener("other", None, 9999);
    let denied = net.udp_listener("other", None, 9998);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    while !fs::read_to_string(&allowed)
        .unwrap_or_default()
        .contains("got hello")
    {
        // (The enforcer resolves sink.test, then writes the entries: poll, bounded.)
        assert!(
            Instant::now() < deadline,
            "nc -u to the rule's name and port never arrived"
        );
        n += 1;
        net.nc_udp(
            "host-a",
            Some("web"),
            "10.77.0.3",
            9999,
            &format!("hello {n}"),
        );
        thread::sleep(Duration::from_millis(200));
    }
    net.nc_udp("host-a", Some("web"), "10.77.0.3", 9998, "sneaky");
    assert!(
        !wait_for(&denied, "sneaky", Duration::from_secs(2)),
        "a datagram to a port no rule allows arrived"
    );
    // Decisions are flow records with their protocol (aggregated, not one per packet).
    let f = flow_on_a(&net, "allowed udp to the rule's name", |f| {
        f.protocol == Protocol::Udp
            && f.verdict == Verdict::Allowed
            && f.dst.addr.to_string() == "10.77.0.3:9999"
    });
    assert_eq!(f.rule.as_deref(), Some("web-to-sink"));
    assert!(f.packets.is_some_and(|n| n >= 1), "{f:?}");
    // As the log spells it.
    let json = net.flows_json(net.host("host-a"));
    assert!(
        json.iter()
            .any(|r| r["protocol"] == "udp" && r["dst"]["addr"] == "10.77.0.3:9999"),
        "no record spelled with \"protocol\": \"udp\""
    );
    let f = flow_on_a(&net, "allowed dns", |f| {
        f.protocol == Protocol::Udp && f.dst.addr.to_string() == "10.77.0.2:53"
    });
    assert_eq!(f.rule.as_deref(), Some("policy.dns_servers"));
    for dst in ["10.77.0.3:53", "10.77.0.3:9998"] {
        flow_on_a(&net, dst, |f| {
            f.protocol == Protocol::Udp
                && f.verdict == Verdict::Denied
                && f.dst.addr.to_string() == dst
        });
    }
}

const UDP_INBOUND: &str = "\
rules:
  - name: outsider-to-web-syslog
    action: allow
    protocol: udp
    from: [{cidr: 10.77.0.2}]
    to: [{labels: [app=web]}]
    ports: [5514]
";

#[test]
fn inbound_udp_to_a_workload_is_denied_unless_a_rule_allows_the_source() {
    assert!(
        tessera_tests::which("nc").is_some(),
        "nc is missing: run `cargo xtask setup`"
    );
    let net = web_and_two_outsiders(UDP_INBOUND);
    net.start_enforcers().unwrap();
    let log = net.udp_listener("host-a", Some("web"), 5514);
    // From the rule's source: delivered (poll: the entries follow the enforcer's start).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("got allowed")
    {
        assert!(
            Instant::now() < deadline,
            "the allowed source's datagram never arrived"
        );
        n += 1;
        net.nc_udp("outsider", None, "10.77.0.1", 5514, &format!("allowed {n}"));
        thread::sleep(Duration::from_millis(200));
    }
    // From another host: never delivered to the workload.
    net.nc_udp("other", None, "10.77.0.1", 5514, "intruder");
    assert!(
        !wait_for(&log, "intruder", Duration::from_secs(2)),
        "a datagram from a source no rule allows reached the workload"
    );
    let f = flow_on_a(&net, "allowed inbound udp", |f| {
        f.protocol == Protocol::Udp
            && f.verdict == Verdict::Allowed
            && f.src.addr.ip().to_string() == "10.77.0.2"
    });
    assert_eq!(f.rule.as_deref(), Some("outsider-to-web-syslog"));
    assert_eq!(f.dst.workload.as_deref(), Some("web"));
    assert_eq!(f.dst.addr.port(), 5514);
    flow_on_a(&net, "denied inbound udp", |f| {
        f.protocol == Protocol::Udp
            && f.verdict == Verdict::Denied
            && f.src.addr.ip().to_string() == "10.77.0.3"
    });
}

#[test]
fn a_workloads_undeclared_tcp_port_is_closed_to_other_hosts() {
    let net = web_and_two_outsiders(NOTHING_FOR_WEB);
    net.start_enforcers().unwrap();
    let root = net.dir.join("www");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("index.txt"), "undeclared\n").unwrap();
    // web serves on 8081, a port its [[workload]] does not declare.
    net.serve_http(net.host("host-a"), Some("web"), "0.0.0.0", 8081, &root)
        .unwrap();
    let out = net
        .curl("outsider", None, "http://10.77.0.1:8081/index.txt")
        .unwrap();
    assert!(
        !out.status.success(),
        "another host reached a workload's undeclared port: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Over loopback (local processes, the proxy's deliveries) it stays reachable.
    let out = net
        .curl("host-a", None, "http://127.0.0.1:8081/index.txt")
        .unwrap();
    assert_eq!(
        out.stdout,
        b"undeclared\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = flow_on_a(&net, "refused connection to an undeclared port", |f| {
        f.protocol == Protocol::Tcp
            && f.verdict == Verdict::Denied
            && f.dst.addr.port() == 8081
            && f.src.addr.ip().to_string() == "10.77.0.2"
    });
    assert_eq!(f.dst.workload.as_deref(), Some("web"));
}
