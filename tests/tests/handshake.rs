//! End-to-end tests of TCP-handshake mode on test hosts (root, real eBPF, real NFQUEUE,
//! unmodified programs): tokens ride in the SYN / SYN-ACK / ACK, the data stays in the kernel.
use std::{fs, time::Duration};

use serde_json::Value;
use tessera_proxy::flow::{Direction, FlowRecord, Mode, Verdict};
use tessera_tests::{EnforcerOptions, PacketCapture, TestNet, handshake_attack};

const SECS_30: Duration = Duration::from_secs(30);
const INDEX: &str = "http://10.77.0.2:8080/index.bin";

/// web@host-a, api@host-b serving 8080 (python3 http.server) and 9000, both enforcers in
/// handshake mode, with `policy` on both if given.
/// host-a with workload web, host-b with workload api serving `api_ports`, both enforcers
/// in handshake mode (not started yet).
fn web_and_api(api_ports: &[u16]) -> TestNet {
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    *net.options.lock().unwrap() = EnforcerOptions {
        handshake: true,
        ..EnforcerOptions::default()
    };
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], api_ports)
        .unwrap();
    net
}

fn handshake_hosts(policy: Option<&str>) -> TestNet {
    let net = web_and_api(&[8080, 9000]);
    if let Some(p) = policy {
        net.write_policy(None, p).unwrap();
    }
    net.start_enforcers().unwrap();
    net
}

/// A file of pseudo-random bytes served at /index.bin.
fn serve_random(net: &TestNet, len: usize) -> Vec<u8> {
    let root = net.dir.join("www");
    fs::create_dir_all(&root).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let content: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(root.join("index.bin"), &content).unwrap();
    net.serve_http(net.host("host-b"), Some("api"), "::", 8080, &root)
        .unwrap();
    content
}

fn curl(net: &TestNet, host: &str, workload: Option<&str>, url: &str) -> std::process::Output {
    net.curl(host, workload, url).unwrap()
}

fn handshake_flows(net: &TestNet, host: &str, n: usize) -> Vec<FlowRecord> {
    net.wait_flows(net.host(host), n, |f| f.mode == Mode::Handshake)
}

#[test]
fn unmodified_http_connects_in_handshake_mode_with_identities_at_both_ends() {
    let net = handshake_hosts(None);
    let content = serve_random(&net, 3 << 20);
    // curl reports what it sent and received on the connection, to check the records' counts.
    let body = net.dir.join("body.bin");
    let body_arg = body.to_str().unwrap();
    let out = net
        .run(
            net.host("host-a"),
            Some("web"),
            "curl",
            &[
                "-sS",
                "-m",
                "5",
                "--fail",
                "-o",
                body_arg,
                "-w",
                "%{size_request} %{size_header} %{size_download}",
                INDEX,
            ],
            Duration::from_secs(30),
        )
        .unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let received = fs::read(&body).unwrap();
    assert!(
        received == content,
        "the application received {} bytes, not the {} sent (or different ones)",
        received.len(),
        content.len()
    );
    let sizes: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let (request, response) = (sizes[0], sizes[1] + sizes[2]);
    // The server saw the client's own address: no proxy in the data path.
    let log = fs::read_to_string(net.dir.join("host-b-api-python3.log")).unwrap();
    assert!(log.contains("10.77.0.1 - -"), "server log: {log}");

    let a = handshake_flows(&net, "host-a", 1);
    let b = handshake_flows(&net, "host-b", 1);
    let (out_flow, in_flow) = (&a[0], &b[0]);
    assert_eq!(out_flow.direction, Direction::Outbound, "{out_flow:?}");
    assert_eq!(out_flow.verdict, Verdict::Allowed, "{out_flow:?}");
    assert_eq!(out_flow.src.workload.as_deref(), Some("web"));
    assert_eq!(
        out_flow.dst.workload.as_deref(),
        Some("api"),
        "{out_flow:?}"
    );
    assert_eq!(in_flow.direction, Direction::Inbound, "{in_flow:?}");
    assert_eq!(in_flow.verdict, Verdict::Allowed, "{in_flow:?}");
    assert_eq!(in_flow.src.workload.as_deref(), Some("web"), "{in_flow:?}");
    assert_eq!(
        in_flow.src.spiffe.as_deref(),
        Some("spiffe://tessera.local/enforcer/host-a/workload/web")
    );
    assert_eq!(
        in_flow
            .src
            .labels
            .get("tessera.io/user")
            .map(String::as_str),
        Some("root"),
        "{in_flow:?}"
    );
    // Written when the connection ended, with its payload bytes as each end's kernel
    // counted them: exactly what curl sent and received, at both ends.
    for f in [out_flow, in_flow] {
        assert_eq!(f.bytes_sent, request, "{f:?}");
        assert_eq!(f.bytes_received, response, "{f:?}");
    }
}

#[test]
fn a_client_without_an_enforcer_never_reaches_the_workload() {
    let net = handshake_hosts(None);
    serve_random(&net, 1000);
    // host-a's unenrolled cgroup: its SYN carries no token.
    let out = curl(&net, "host-a", None, INDEX);
    assert!(
        !out.status.success(),
        "an unauthenticated client got through"
    );
    let b = handshake_flows(&net, "host-b", 1);
    let refused = b
        .iter()
        .find(|f| f.verdict == Verdict::Denied)
        .unwrap_or_else(|| panic!("no denied flow on host-b: {b:?}"));
    assert_eq!(refused.code.as_str(), "unauthenticated", "{refused:?}");
    assert_eq!(refused.direction, Direction::Direct, "{refused:?}");
    let log = fs::read_to_string(net.dir.join("host-b-api-python3.log")).unwrap_or_default();
    assert!(!log.contains("GET"), "the application saw a request: {log}");
}

#[test]
fn tokens_ride_only_on_handshake_packets_and_hostile_syns_are_refused_with_their_reason() {
    // The attacker has a namespace of its own on the same switch.
    let net = TestNet::with_plain_hosts(&["host-a", "host-b"], &["attacker"]).expect("hosts");
    net.options.lock().unwrap().handshake = true;
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[8080, 9000])
        .unwrap();
    net.start_enforcers().unwrap();
    let content = serve_random(&net, 1 << 20);
    let dump = PacketCapture::start(&net, "p0", net.dir.join("handshake.pcap")).unwrap();
    let out = curl(&net, "host-a", Some("web"), INDEX);
    assert!(
        out.status.success() && out.stdout == content,
        "the honest fetch failed"
    );
    let pcap = dump.stop();

    // The capture: one connection; the option on its SYN, SYN-ACK and first ACK only.
    let host_a = net.host("host-a");
    let conns = handshake_attack(&net, host_a, &["capture", pcap.to_str().unwrap()]).unwrap();
    let conns = conns.as_object().unwrap();
    let http = conns
        .iter()
        .find(|(k, _)| k.contains("10.77.0.2:8080"))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no connection to :8080 captured: {conns:?}"));
    let tagged: Vec<&str> = http["tagged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["flags"].as_str().unwrap())
        .collect();
    assert_eq!(tagged, ["S", "SA", "A"], "tagged packets: {http}");
    assert!(
        // (tcpdump may miss some of the 1 MiB of large offloaded segments; enough are there)
        http["packets"].as_u64().unwrap() > 20 && http["payload"].as_u64().unwrap() > 100_000,
        "the data packets are in the capture too: {http}"
    );

    // The adversary in its own namespace, with the captured SYN in hand.
    let results = handshake_attack(
        &net,
        net.host("attacker"),
        &["attack", pcap.to_str().unwrap(), "10.77.0.2", "8080"],
    )
    .unwrap();
    for attack in ["replay", "forged", "truncated", "garbage", "no-token"] {
        let answer = &results[attack];
        assert!(
            answer.is_null() || answer.as_str().unwrap().contains('R'),
            "{attack}: the server answered {answer} (a SYN-ACK would mean it accepted)"
        );
    }
    let flows = net.wait_flows(net.host("host-b"), 6, |f| f.mode == Mode::Handshake);
    let code_of = |code: &str| {
        flows
            .iter()
            .any(|f| f.verdict == Verdict::Denied && f.code.as_str() == code)
    };
    for code in ["replay", "bad-signature", "malformed", "unauthenticated"] {
        assert!(code_of(code), "no denied flow with code {code}: {flows:#?}");
    }
    let log = fs::read_to_string(net.dir.join("host-b-api-python3.log")).unwrap();
    assert_eq!(
        log.matches("GET /index.bin").count(),
        1,
        "only the honest request reached the application: {log}"
    );
}

fn policy(name: &str, ports: &str) -> String {
    format!(
        "rules:\n  - name: {name}\n    action: allow\n    from: [{{labels: [app=web]}}]\n    to: [{{labels: [app=api]}}]\n    ports: [{ports}]\n"
    )
}

fn redis_ping(net: &TestNet) -> bool {
    let out = net
        .run(
            net.host("host-a"),
            Some("web"),
            "redis-cli",
            &["-h", "10.77.0.2", "-p", "9000", "PING"],
            SECS_30,
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "PONG"
}

/// Waits until `cond` holds (a reload takes effect), at most 10 s.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: never happened"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn last_flow(net: &TestNet, host: &str, pred: impl Fn(&FlowRecord) -> bool) -> FlowRecord {
    net.wait_flows(net.host(host), 1, |f| f.mode == Mode::Handshake && pred(f))
        .pop()
        .unwrap_or_else(|| panic!("no such flow on {host}: {:#?}", net.flows(net.host(host))))
}

#[test]
fn each_end_enforces_its_own_policy_and_a_reload_flips_it_without_a_restart() {
    let net = web_and_api(&[8080, 9000]);
    // The client's enforcer lets web reach both ports; the server's only 8080.
    net.write_policy(Some(net.host("host-a")), &policy("a-web-api", "8080, 9000"))
        .unwrap();
    net.write_policy(Some(net.host("host-b")), &policy("b-web-api", "8080"))
        .unwrap();
    net.start_enforcers().unwrap();
    serve_random(&net, 1000);
    net.serve_redis(net.host("host-b"), Some("api"), 9000)
        .unwrap();
    let pid_b = net.enforcer_pid(net.host("host-b"));

    assert!(curl(&net, "host-a", Some("web"), INDEX).status.success());
    let f = last_flow(&net, "host-b", |f| f.verdict == Verdict::Allowed);
    assert_eq!(f.rule.as_deref(), Some("b-web-api"), "{f:?}");
    let f = last_flow(&net, "host-a", |f| f.verdict == Verdict::Allowed);
    assert_eq!(f.rule.as_deref(), Some("a-web-api"), "{f:?}");

    // Ingress: host-b refuses 9000 at the SYN; host-a learns it from the reset at once.
    assert!(
        !redis_ping(&net),
        "redis answered although host-b's policy denies it"
    );
    let f = last_flow(&net, "host-b", |f| f.verdict == Verdict::Denied);
    assert_eq!(f.code.as_str(), "policy", "{f:?}");
    assert_eq!(f.src.workload.as_deref(), Some("web"), "{f:?}");
    let f = last_flow(&net, "host-a", |f| f.code.as_str() == "peer-refused");
    assert_eq!(f.dst.addr.to_string(), "10.77.0.2:9000", "{f:?}");

    // host-b's reload opens 9000: unmodified redis works, no restart.
    net.write_policy(Some(net.host("host-b")), &policy("b-web-api", "8080, 9000"))
        .unwrap();
    eventually("redis reachable after host-b's reload", || redis_ping(&net));
    assert_eq!(net.enforcer_pid(net.host("host-b")), pid_b, "no restart");

    // Egress: host-a's reload closes 8080; host-a refuses when the SYN-ACK names api.
    net.write_policy(Some(net.host("host-a")), &policy("a-web-api", "9000"))
        .unwrap();
    // (fetches before the reload takes effect still succeed: count them)
    let fetched = std::cell::Cell::new(1);
    eventually("8080 refused after host-a's reload", || {
        let ok = curl(&net, "host-a", Some("web"), INDEX).status.success();
        fetched.set(fetched.get() + usize::from(ok));
        !ok
    });
    let f = last_flow(&net, "host-a", |f| {
        f.verdict == Verdict::Denied && f.code.as_str() == "policy"
    });
    assert_eq!(f.dst.workload.as_deref(), Some("api"), "{f:?}");
    assert!(f.reason.starts_with("egress"), "{f:?}");
    let f = last_flow(&net, "host-b", |f| f.code.as_str() == "peer-refused");
    assert_eq!(f.dst.addr.to_string(), "10.77.0.2:8080", "{f:?}");
    let log = fs::read_to_string(net.dir.join("host-b-api-python3.log")).unwrap();
    assert_eq!(
        log.matches("GET /index.bin").count(),
        fetched.get(),
        "a refused fetch reached the application: {log}"
    );
}

fn ip_netns(net: &TestNet, host: &str, args: &[&str]) {
    let mut full = vec!["netns", "exec", net.host(host).netns.as_str()];
    full.extend_from_slice(args);
    tessera_tests::sh("ip", &full).unwrap();
}

#[test]
fn ipv6_iperf3_and_lost_handshake_packets_work_unmodified() {
    let net = handshake_hosts(None);
    let content = serve_random(&net, 100_000);
    // IPv6: the same handshake, tokens and flows.
    let out = curl(
        &net,
        "host-a",
        Some("web"),
        "http://[fd77::2]:8080/index.bin",
    );
    assert!(
        out.status.success() && out.stdout == content,
        "IPv6 fetch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = last_flow(&net, "host-b", |f| {
        f.dst.addr.to_string() == "[fd77::2]:8080"
    });
    assert_eq!(f.verdict, Verdict::Allowed, "{f:?}");
    assert_eq!(f.src.workload.as_deref(), Some("web"), "{f:?}");

    // Lost packets: host-b's kernel drops the first SYN and the first proof (before our
    // rules see them), so the client retransmits its SYN and the server its SYN-ACK.
    let drop_first = |what: &str| {
        format!(
            "-t raw -I PREROUTING 1 -p tcp --dport 8080 {what} -m statistic --mode nth --every 1000 --packet 0 -j DROP"
        )
    };
    for rule in [
        drop_first("--syn"),
        drop_first("--tcp-flags SYN,ACK ACK -m tcp --tcp-option 253"),
    ] {
        let mut a = vec!["iptables", "-w"];
        a.extend(rule.split_whitespace());
        ip_netns(&net, "host-b", &a);
    }
    let out = curl(&net, "host-a", Some("web"), INDEX);
    assert!(
        out.status.success() && out.stdout == content,
        "fetch with a lost SYN and a lost proof: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counters = tessera_tests::sh(
        "ip",
        &[
            "netns",
            "exec",
            &net.host("host-b").netns,
            "iptables",
            "-w",
            "-t",
            "raw",
            "-L",
            "PREROUTING",
            "-v",
            "-x",
            "-n",
        ],
    )
    .unwrap();
    let dropped: Vec<u64> = counters
        .lines()
        .filter(|l| l.contains("statistic"))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        dropped,
        [1, 1],
        "both the first SYN and the first proof were lost:\n{counters}"
    );

    // iperf3, unmodified, in both directions: the data path is the kernel's.
    net.spawn(
        net.host("host-b"),
        Some("api"),
        "iperf3",
        &["-s", "-p", "9000", "-1"],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = net
        .run(
            net.host("host-a"),
            Some("web"),
            "iperf3",
            &["-c", "10.77.0.2", "-p", "9000", "-t", "2", "-J"],
            SECS_30,
        )
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(
        bps > 1e8,
        "iperf3 through handshake mode: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // SIGTERM (without --keep-attached): the enforcer takes its rules with it.
    net.stop_enforcer(net.host("host-b"), false).unwrap();
    for tool in ["iptables", "ip6tables"] {
        for table in ["raw", "mangle"] {
            let rules = tessera_tests::sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &net.host("host-b").netns,
                    tool,
                    "-w",
                    "-t",
                    table,
                    "-S",
                ],
            )
            .unwrap();
            assert!(
                !rules.contains("TESSERA"),
                "{tool} {table} after exit:\n{rules}"
            );
        }
    }
}

#[test]
fn while_an_enforcer_is_down_its_workloads_fail_closed_and_a_restart_restores_them() {
    let net = handshake_hosts(None);
    net.options.lock().unwrap().keep_attached = true;
    let content = serve_random(&net, 1000);
    assert!(curl(&net, "host-a", Some("web"), INDEX).status.success());
    for host in ["host-b", "host-a"] {
        // Killed: its rules stay, nobody reads the queues, the handshake packets are dropped.
        net.stop_enforcer(net.host(host), true).unwrap();
        let out = curl(&net, "host-a", Some("web"), INDEX);
        assert!(!out.status.success(), "{host} down, yet the fetch worked");
        net.start_enforcer(net.host(host)).unwrap();
        let out = curl(&net, "host-a", Some("web"), INDEX);
        assert!(
            out.status.success() && out.stdout == content,
            "after {host} restarted"
        );
    }
    // The restarted enforcers replaced their rules: one generation each, no leftovers.
    for host in ["host-a", "host-b"] {
        let rules = tessera_tests::sh(
            "ip",
            &[
                "netns",
                "exec",
                &net.host(host).netns,
                "iptables",
                "-w",
                "-t",
                "raw",
                "-S",
                "PREROUTING",
            ],
        )
        .unwrap();
        assert_eq!(
            rules.matches("TESSERA-HS-RAW").count(),
            1,
            "{host}:\n{rules}"
        );
    }
    let log = fs::read_to_string(net.dir.join("host-b-api-python3.log")).unwrap();
    assert_eq!(log.matches("GET /index.bin").count(), 3, "{log}");
}

#[test]
fn a_live_connection_that_a_reload_denies_is_reset_at_the_end_whose_policy_changed() {
    let net = web_and_api(&[7000]);
    for host in ["host-a", "host-b"] {
        net.write_policy(Some(net.host(host)), &policy("web-api", "7000"))
            .unwrap();
    }
    net.start_enforcers().unwrap();
    net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", 7000)
        .unwrap();
    // One connection, a ping every 50 ms; it reports how the connection ended.
    let log = net
        .spawn_holder(net.host("host-a"), "web", "10.77.0.2", 7000)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Only host-b's policy changes: host-b closes the connection, host-a's kernel gets the
    // reset, the application sees it.
    net.write_policy(Some(net.host("host-b")), "rules: []\n")
        .unwrap();
    eventually("the live connection was closed", || {
        let out = fs::read_to_string(&log).unwrap_or_default();
        out.contains("reset") || out.contains("eof")
    });
    let out = fs::read_to_string(&log).unwrap();
    assert!(out.contains("reset"), "closed, but not with a reset: {out}");
    let f = last_flow(&net, "host-b", |f| f.code.as_str() == "policy-reload");
    assert_eq!(f.src.workload.as_deref(), Some("web"), "{f:?}");
    assert!(
        f.reason.starts_with("closed by policy reload (ingress)"),
        "{f:?}"
    );
    // New connections are refused at host-b.
    let out = net
        .run_tool(
            net.host("host-a"),
            Some("web"),
            &["echo-many", "10.77.0.2", "7000", "1"],
            SECS_30,
        )
        .unwrap();
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or(Value::Null);
    assert_ne!(v["ok"], 1, "a new connection got through: {v}");
}

/// An on-path attacker in the test switch: the handshake packets `flags` selects go through
/// `tamper_queue` (`mode`), until the returned guard is dropped.
struct OnPath<'a> {
    net: &'a TestNet,
    rule: String,
    child: std::process::Child,
}

impl<'a> OnPath<'a> {
    fn start(net: &'a TestNet, flags: &str, mode: &[&str]) -> Self {
        let sw = net.switch_netns().to_owned();
        let mut child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &sw,
                env!("CARGO_BIN_EXE_tamper_queue"),
                "99",
            ])
            .args(mode)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut ready,
        )
        .unwrap();
        assert_eq!(ready.trim(), "ready");
        let rule = format!(
            "-t mangle -A FORWARD -p tcp -m tcp --tcp-option 253 --tcp-flags {flags} -j NFQUEUE --queue-num 99"
        );
        let mut args = vec!["netns", "exec", &sw, "iptables", "-w"];
        args.extend(rule.split_whitespace());
        tessera_tests::sh("ip", &args).unwrap();
        Self { net, rule, child }
    }
}

impl Drop for OnPath<'_> {
    fn drop(&mut self) {
        let sw = self.net.switch_netns().to_owned();
        let rule = self.rule.replace(" -A ", " -D ");
        let mut args = vec!["netns", "exec", &sw, "iptables", "-w"];
        args.extend(rule.split_whitespace());
        let _ = tessera_tests::sh("ip", &args);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_on_path_attacker_tampering_with_or_dropping_the_proofs_is_refused() {
    // The full handshake's proofs, every connection: the fast path off (its own tags are
    // attacked in tests/tests/handshake_fast.rs).
    let net = web_and_api(&[8080, 9000]);
    net.options.lock().unwrap().fast_path_secs = Some(0);
    net.start_enforcers().unwrap();
    let content = serve_random(&net, 1000);
    let fetch = || curl(&net, "host-a", Some("web"), INDEX);
    assert!(fetch().status.success());
    // The SYN-ACK's proof (message bytes 33..49) altered on the way.
    {
        let _mitm = OnPath::start(&net, "SYN,ACK SYN,ACK", &["flip", "40"]);
        assert!(!fetch().status.success(), "a tampered SYN-ACK was accepted");
    }
    let f = last_flow(&net, "host-a", |f| f.verdict == Verdict::Denied);
    assert_eq!(f.code.as_str(), "bad-proof", "{f:?}");

    // The client's proof (message bytes 1..17) altered.
    {
        let _mitm = OnPath::start(&net, "SYN,ACK,RST ACK", &["flip", "5"]);
        assert!(!fetch().status.success(), "a wrong ACK proof was accepted");
    }
    let f = last_flow(&net, "host-b", |f| f.code.as_str() == "bad-proof");
    assert_eq!(f.src.workload.as_deref(), Some("web"), "{f:?}");

    // The proof never arrives (nor the copies host-a sends when the SYN-ACK comes again):
    // the server end never lets the connection through, and records it when the handshake
    // expires (token lifetime + skew, 15 s), while the attacker is still there.
    {
        let _mitm = OnPath::start(&net, "SYN,ACK,RST ACK", &["drop"]);
        assert!(
            !fetch().status.success(),
            "a connection without its proof got through"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(25);
        let f = loop {
            let found = net
                .flows(net.host("host-b"))
                .into_iter()
                .find(|f| f.code.as_str() == "no-proof");
            if let Some(f) = found {
                break f;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no no-proof record on host-b"
            );
            std::thread::sleep(Duration::from_millis(250));
        };
        assert_eq!(f.verdict, Verdict::Denied, "{f:?}");
    }

    // None of the three reached the application; an honest fetch still works.
    let out = fetch();
    assert!(out.status.success() && out.stdout == content);
    let log = fs::read_to_string(net.dir.join("host-b-api-python3.log")).unwrap();
    assert_eq!(log.matches("GET /index.bin").count(), 2, "{log}");
}

#[test]
fn fail_open_lets_unauthenticated_clients_in_only_while_no_enforcer_runs() {
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    {
        let mut o = net.options.lock().unwrap();
        o.handshake = true;
        o.fail_open = true;
        o.keep_attached = true;
    }
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[8080])
        .unwrap();
    net.start_enforcers().unwrap();
    serve_random(&net, 1000);
    // Running: an unauthenticated client is refused as in the default mode.
    assert!(!curl(&net, "host-a", None, INDEX).status.success());
    // host-b's enforcer gone (rules left in place, as after a crash): the client gets in.
    net.stop_enforcer(net.host("host-b"), true).unwrap();
    let out = curl(&net, "host-a", None, INDEX);
    assert!(
        out.status.success(),
        "fail open did not let it in: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Back: refused again.
    net.start_enforcer(net.host("host-b")).unwrap();
    assert!(!curl(&net, "host-a", None, INDEX).status.success());
}
