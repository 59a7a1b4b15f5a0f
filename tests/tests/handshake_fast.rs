//! End-to-end tests of handshake mode's in-kernel fast path (issue 16 item 5;
//! docs/handshake.md, "Fast path"): after a first full handshake between two workloads,
//! their later connections are proven by a SipHash tag in a TCP option, written by
//! `sock_ops` and checked by a tc program, with no packet through the NFQUEUE queues; and
//! what the kernel cannot prove (forged, tampered, replayed, unknown, expired or revoked
//! keys) goes to the engine, which refuses it with its flow record.
use std::{fs, time::Duration};

use tessera_proxy::flow::{Direction, FlowRecord, Mode, Verdict};
use tessera_tests::{EnforcerOptions, TestNet};

const INDEX: &str = "http://10.77.0.2:8080/index.bin";

/// web@host-a, api@host-b serving 8080 (python3 http.server), both in handshake mode.
fn hosts() -> (TestNet, Vec<u8>) {
    hosts_with(&[8080])
}

/// [`hosts`], api declaring `ports` (8080 among them).
fn hosts_with(ports: &[u16]) -> (TestNet, Vec<u8>) {
    hosts_with_from(ports, "[app=web]")
}

/// [`hosts_with`], the rule's client selector `from`.
fn hosts_with_from(ports: &[u16], from: &str) -> (TestNet, Vec<u8>) {
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    *net.options.lock().unwrap() = EnforcerOptions {
        handshake: true,
        ..EnforcerOptions::default()
    };
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], ports)
        .unwrap();
    // A policy file at each end (a reload replaces it).
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    let policy = format!(
        "rules:\n  - name: web-api\n    action: allow\n    from: [{{labels: {from}}}]\n    to: [{{labels: [app=api]}}]\n    ports: [{}]\n",
        list.join(", ")
    );
    for host in ["host-a", "host-b"] {
        net.write_policy(Some(net.host(host)), &policy).unwrap();
    }
    net.start_enforcers().unwrap();
    let root = net.dir.join("www");
    fs::create_dir_all(&root).unwrap();
    let content: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    fs::write(root.join("index.bin"), &content).unwrap();
    net.serve_http(net.host("host-b"), Some("api"), "::", 8080, &root)
        .unwrap();
    (net, content)
}

/// Packets the host's NFQUEUE queues have taken so far.
fn queued(net: &TestNet, host: &str) -> u64 {
    net.queued(net.host(host))
}

/// What one curl from web did: the body received, and the bytes it sent and received on
/// its connection (request; headers and body).
struct Fetched {
    body: Vec<u8>,
    request: u64,
    response: u64,
}

fn fetch(net: &TestNet) -> Option<Fetched> {
    let body = net.dir.join("body.bin");
    let _ = fs::remove_file(&body);
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
                body.to_str().unwrap(),
                "-w",
                "%{size_request} %{size_header} %{size_download}",
                INDEX,
            ],
            Duration::from_secs(30),
        )
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let sizes: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    Some(Fetched {
        body: fs::read(&body).unwrap(),
        request: sizes[0],
        response: sizes[1] + sizes[2],
    })
}

/// Fetches until one connection goes through without a single packet in either host's
/// queues (the client end installs its key 100 ms after the first handshake); at most 10 s.
/// Returns that fetch.
fn fetch_on_fast_path(net: &TestNet, content: &[u8]) -> Fetched {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let before = (queued(net, "host-a"), queued(net, "host-b"));
        let f = fetch(net).expect("a fetch after the first handshake failed");
        assert!(f.body == content, "the application received other bytes");
        let after = (queued(net, "host-a"), queued(net, "host-b"));
        if before == after {
            return f;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "every connection still went through the queues: {before:?} -> {after:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The fast path's flow record at `host` (its reason says so), once written.
fn fast_flow(net: &TestNet, host: &str) -> FlowRecord {
    net.wait_flows(net.host(host), 1, |f| {
        f.mode == Mode::Handshake && f.reason.contains("kernel fast path")
    })
    .pop()
    .unwrap_or_else(|| panic!("no fast path flow on {host}: {:#?}", flows(net, host)))
}

fn flows(net: &TestNet, host: &str) -> Vec<FlowRecord> {
    net.flows(net.host(host))
        .into_iter()
        .filter(|f| f.mode == Mode::Handshake)
        .collect()
}

#[test]
fn a_second_connection_of_a_pair_is_proven_in_the_kernel_without_the_queues() {
    let (net, content) = hosts();
    let before = (queued(&net, "host-a"), queued(&net, "host-b"));
    // The first connection takes the full handshake, through both hosts' queues.
    let first = fetch(&net).expect("first fetch");
    assert!(first.body == content);
    let after = (queued(&net, "host-a"), queued(&net, "host-b"));
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "the first handshake was queued at both ends: {before:?} -> {after:?}"
    );
    let fast = fetch_on_fast_path(&net, &content);
    // Its records, at both ends, as exact as the full handshake's: identities from the
    // pair's handshake, payload bytes from each kernel, exactly what curl counted.
    let (out_flow, in_flow) = (fast_flow(&net, "host-a"), fast_flow(&net, "host-b"));
    assert_eq!(out_flow.direction, Direction::Outbound, "{out_flow:?}");
    assert_eq!(in_flow.direction, Direction::Inbound, "{in_flow:?}");
    for f in [&out_flow, &in_flow] {
        assert_eq!(f.verdict, Verdict::Allowed, "{f:?}");
        assert_eq!(f.src.workload.as_deref(), Some("web"), "{f:?}");
        assert_eq!(f.dst.workload.as_deref(), Some("api"), "{f:?}");
        assert_eq!(f.dst.addr.to_string(), "10.77.0.2:8080", "{f:?}");
        assert_eq!(f.bytes_sent, fast.request, "{f:?}");
        assert_eq!(f.bytes_received, fast.response, "{f:?}");
    }
    assert_eq!(out_flow.src.addr, in_flow.src.addr, "the same connection");
    // Nothing refused on the way.
    for host in ["host-a", "host-b"] {
        let denied: Vec<_> = flows(&net, host)
            .into_iter()
            .filter(|f| f.verdict == Verdict::Denied)
            .collect();
        assert!(denied.is_empty(), "{host}: {denied:#?}");
    }
}

/// Drops the client host's own resets to the server while it lives (the replay below must
/// be refused by the fast path itself, not by host-a's kernel resetting a SYN-ACK it did
/// not expect).
struct NoResets<'a> {
    net: &'a TestNet,
}

impl<'a> NoResets<'a> {
    fn start(net: &'a TestNet) -> Self {
        Self::rule(net, "-A");
        Self { net }
    }

    fn rule(net: &TestNet, op: &str) {
        let ns = net.host("host-a").netns.clone();
        let _ = tessera_tests::sh(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "iptables",
                "-w",
                op,
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                "10.77.0.2",
                "--tcp-flags",
                "RST",
                "RST",
                "-j",
                "DROP",
            ],
        );
    }
}

impl Drop for NoResets<'_> {
    fn drop(&mut self) {
        Self::rule(self.net, "-D");
    }
}

#[test]
fn forged_tampered_replayed_and_unknown_fast_path_tags_are_refused_with_their_flows() {
    let (net, content) = hosts_with(&[8080, 7000]);
    net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", 7000)
        .unwrap();
    let dump = tessera_tests::PacketCapture::start(&net, "p0", net.dir.join("fast.pcap")).unwrap();
    assert!(echo_once(&net), "the first (full) handshake");
    warm_echo(&net);
    let pcap = dump.stop();
    // The capture: the option (kind 253) on the full handshake only; the fast one carries
    // kind 254, which the attack below reads from it.
    let conns = tessera_tests::handshake_attack(
        &net,
        net.host("host-a"),
        &["capture", pcap.to_str().unwrap()],
    )
    .unwrap();
    let untagged = conns
        .as_object()
        .unwrap()
        .values()
        .filter(|c| c["tagged"].as_array().unwrap().is_empty())
        .count();
    assert!(
        untagged >= 1,
        "a connection without any kind-253 message: {conns}"
    );

    const FLOOD: usize = 300;
    let results = {
        let _no_resets = NoResets::start(&net);
        tessera_tests::handshake_attack(
            &net,
            net.host("host-a"),
            &[
                "fast",
                pcap.to_str().unwrap(),
                "10.77.0.2",
                "7000",
                &FLOOD.to_string(),
            ],
        )
        .unwrap()
    };
    for attack in ["tampered", "forged"] {
        let answer = results[attack].as_str().unwrap_or("");
        assert!(
            answer.contains('R'),
            "{attack}: the server answered {answer:?} (a SYN-ACK would mean it accepted): {results}"
        );
    }
    // The verbatim replay of a valid SYN gets its SYN-ACK (a SYN's tag cannot know the
    // server's fresh ISN), but the captured ACK's tag does not verify over that ISN: the
    // connection never completes, and the request sent on it is never answered.
    assert!(
        results["replay_synack"]
            .as_str()
            .unwrap_or("")
            .contains('S'),
        "{results}"
    );
    let request = results["replay_request"].as_str().unwrap_or("");
    assert!(
        request.is_empty() || request.contains('R'),
        "the replayed connection answered the request: {results}"
    );
    // Every one refused with its record (beyond the first of a kind, refusals from one
    // source are summarised: "N refusals like: ...").
    let refused = |f: &FlowRecord| -> usize {
        f.reason
            .split_once(" refusals like: ")
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or(1)
    };
    assert!(
        tessera_tests::eventually(Duration::from_secs(20), || {
            flows(&net, "host-b")
                .iter()
                .filter(|f| f.code.as_str() == "bad-proof")
                .map(refused)
                .sum::<usize>()
                >= 3 + FLOOD
        }),
        "not every forged, tampered, replayed and unknown-key packet was refused: {:#?}",
        flows(&net, "host-b")
    );
    let reasons: Vec<String> = flows(&net, "host-b")
        .into_iter()
        .filter(|f| f.code.as_str() == "bad-proof")
        .map(|f| f.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("fast path ACK")),
        "the replayed proof refused with its own record: {reasons:#?}"
    );
    // The flood left no state behind that stops the pair: a new connection still takes the
    // fast path.
    warm_echo(&net);
    let body = fetch(&net).expect("http after the attacks");
    assert!(body.body == content);
}

#[test]
fn an_expired_pair_secret_is_not_used_and_the_next_connection_takes_the_full_handshake() {
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    *net.options.lock().unwrap() = EnforcerOptions {
        handshake: true,
        fast_path_secs: Some(3),
        ..EnforcerOptions::default()
    };
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[8080])
        .unwrap();
    net.start_enforcers().unwrap();
    let root = net.dir.join("www");
    fs::create_dir_all(&root).unwrap();
    let content = vec![7u8; 10_000];
    fs::write(root.join("index.bin"), &content).unwrap();
    net.serve_http(net.host("host-b"), Some("api"), "::", 8080, &root)
        .unwrap();
    fetch(&net).expect("first fetch");
    let granted = std::time::Instant::now();
    fetch_on_fast_path(&net, &content);
    // Past the key's lifetime (the server's key was installed after the client's first
    // handshake began, so it outlives `granted` + 3 s by at most the handshake's time).
    std::thread::sleep(
        (granted + Duration::from_secs(4)).saturating_duration_since(std::time::Instant::now()),
    );
    let before = (queued(&net, "host-a"), queued(&net, "host-b"));
    let f = fetch(&net).expect("a fetch after expiry");
    assert!(f.body == content);
    let after = (queued(&net, "host-a"), queued(&net, "host-b"));
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "after expiry the connection took the full handshake through both queues: {before:?} -> {after:?}"
    );
}

/// One echo connection from web to api's 7000; whether it worked.
fn echo_once(net: &TestNet) -> bool {
    let out = net
        .run_tool(
            net.host("host-a"),
            Some("web"),
            &["echo-many", "10.77.0.2", "7000", "1"],
            Duration::from_secs(30),
        )
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or(serde_json::Value::Null);
    v["ok"] == 1
}

/// Echo connections until one takes the fast path (nothing queued at either end); 10 s.
fn warm_echo(net: &TestNet) {
    assert!(
        tessera_tests::eventually(Duration::from_secs(10), || {
            let before = (queued(net, "host-a"), queued(net, "host-b"));
            assert!(echo_once(net));
            before == (queued(net, "host-a"), queued(net, "host-b"))
        }),
        "no echo connection took the fast path"
    );
}

#[test]
fn a_policy_reload_revokes_the_pair_closes_its_fast_connection_and_refuses_the_next() {
    let (net, _) = hosts_with(&[8080, 7000]);
    net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", 7000)
        .unwrap();
    assert!(echo_once(&net), "the first (full) handshake");
    warm_echo(&net);
    // A held connection of the same workload to the same destination, on the fast path.
    let before = (queued(&net, "host-a"), queued(&net, "host-b"));
    let log = net
        .spawn_holder(net.host("host-a"), "web", "10.77.0.2", 7000)
        .unwrap();
    let after = (queued(&net, "host-a"), queued(&net, "host-b"));
    assert_eq!(before, after, "the held connection took the fast path");
    // host-b's policy now denies everything: host-b closes the live fast connection, and
    // the next connection is refused (the pair's keys are gone: a full handshake, denied).
    net.write_policy(Some(net.host("host-b")), "rules: []\n")
        .unwrap();
    assert!(
        tessera_tests::eventually(Duration::from_secs(10), || {
            let out = fs::read_to_string(&log).unwrap_or_default();
            out.contains("reset") || out.contains("eof")
        }),
        "the live fast connection was not closed"
    );
    let out = fs::read_to_string(&log).unwrap();
    assert!(out.contains("reset"), "closed, but not with a reset: {out}");
    let f = net
        .wait_flows(net.host("host-b"), 1, |f| {
            f.mode == Mode::Handshake && f.code.as_str() == "policy-reload"
        })
        .pop()
        .expect("a revocation record");
    assert!(
        f.reason.contains("kernel fast path") || f.reason.contains("policy reload"),
        "{f:?}"
    );
    // The next connection: host-a still holds its key (its policy did not change), host-b
    // no longer: refused as a revoked key (`bad-proof`), and host-a forgets the key on that
    // refusal; the one after takes the full handshake, which policy denies.
    for _ in 0..2 {
        assert!(
            !echo_once(&net),
            "a new connection got through after the reload"
        );
    }
    let b = flows(&net, "host-b");
    assert!(
        b.iter()
            .any(|f| f.code.as_str() == "bad-proof" && f.reason.starts_with("fast path SYN")),
        "the revoked key refused with its record: {b:#?}"
    );
    let f = net
        .wait_flows(net.host("host-b"), 1, |f| {
            f.mode == Mode::Handshake && f.verdict == Verdict::Denied && f.code.as_str() == "policy"
        })
        .pop()
        .expect("the refusal's record");
    assert_eq!(f.src.workload.as_deref(), Some("web"), "{f:?}");
}

/// The client end accepts no SYN-ACK its verifier did not prove (fail closed whatever tc
/// saw). host-a's enforcer is killed (SIGKILL): its tc verifiers go with it, while its
/// pinned connect hooks (with the fast keys their maps hold) and its iptables rules stay.
/// The warm client's next connection leaves on the fast path and host-b answers it; nothing
/// at host-a proves that answer. Before the fix the SYN-ACK went to the queue with
/// `--queue-bypass`, unread, so it passed and the connection completed with an
/// unauthenticated server; now mangle PREROUTING drops it (the connection's fast-client
/// connmark, no verified bit). A SYN-ACK that is a fragment, comes in on a device tc does
/// not run on or whose pending entry was evicted meets the same rule.
#[test]
fn a_warm_clients_syn_ack_that_no_verifier_proved_never_completes_the_connection() {
    let (net, content) = hosts();
    fetch(&net).expect("first fetch");
    fetch_on_fast_path(&net, &content);
    net.stop_enforcer(net.host("host-a"), true).unwrap();
    // The server end still answers fast SYNs (its enforcer runs): what reaches host-a is a
    // SYN-ACK no one at host-a checked.
    let before = queued(&net, "host-b");
    assert!(
        fetch(&net).is_none(),
        "a connection completed on a SYN-ACK no verifier proved"
    );
    assert_eq!(
        queued(&net, "host-b"),
        before,
        "the client's SYN was the fast one (host-b queued nothing for it)"
    );
    // The same pair works again once an enforcer runs at host-a.
    net.start_enforcer(net.host("host-a")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(f) = fetch(&net) {
            assert!(f.body == content);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no fetch after host-a's enforcer restarted"
        );
    }
}

/// A fast SYN answered by an untagged SYN-ACK (here: the server's kernel answers every SYN
/// with a syncookie, `tcp_syncookies = 2`, as under a SYN flood; its sock_ops cannot tag
/// one) falls back to the full handshake one RTO later, as after a reset, instead of
/// hanging: before the fix the client dropped the SYN-ACK and retransmitted the same fast
/// SYN until its retries ran out.
#[test]
fn a_fast_syn_answered_by_an_untagged_syncookie_syn_ack_falls_back_to_the_full_handshake() {
    let (net, content) = hosts();
    fetch(&net).expect("first fetch");
    fetch_on_fast_path(&net, &content);
    tessera_tests::sh(
        "ip",
        &[
            "netns",
            "exec",
            net.host("host-b").netns.as_str(),
            "sysctl",
            "-qw",
            "net.ipv4.tcp_syncookies=2",
        ],
    )
    .unwrap();
    let before = (queued(&net, "host-a"), queued(&net, "host-b"));
    let f = fetch(&net).expect("a fetch answered by a syncookie SYN-ACK");
    assert!(f.body == content);
    let after = (queued(&net, "host-a"), queued(&net, "host-b"));
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "it took the full handshake through both queues: {before:?} -> {after:?}"
    );
    // And the pair stays on the full handshake (no key re-used that cannot work here).
    let f = fetch(&net).expect("the next fetch");
    assert!(f.body == content);
}

/// A policy that tells executables apart (`tessera.io/exe`) turns the fast path off: a key
/// is per (cgroup, uid, destination), so another program of the same workload and uid
/// would ride the key an allowed program's full handshake earned. Here only curl may reach
/// api; after curl's connections, python3 in the same workload and uid must still be
/// refused. Before the fix python3's connection carried curl's key and got through.
#[test]
fn a_policy_on_executables_grants_no_fast_key_another_program_could_ride() {
    let curl = fs::canonicalize(
        tessera_tests::sh("sh", &["-c", "command -v curl"])
            .unwrap()
            .trim(),
    )
    .unwrap();
    let (net, content) = hosts_with_from(
        &[8080],
        &format!("[app=web, 'tessera.io/exe={}']", curl.display()),
    );
    for _ in 0..3 {
        let f = fetch(&net).expect("curl is allowed");
        assert!(f.body == content);
        // Past the client end's delay before it uses a key (100 ms).
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = net
        .run(
            net.host("host-a"),
            Some("web"),
            "python3",
            &[
                "-c",
                &format!(
                    "import urllib.request; urllib.request.urlopen('{INDEX}', timeout=5).read()"
                ),
            ],
            Duration::from_secs(30),
        )
        .unwrap();
    assert!(
        !out.status.success(),
        "python3 reached api on curl's fast path key"
    );
    let log = net.enforcer_log(net.host("host-a"));
    assert!(log.contains("fast path off"), "{log}");
}
