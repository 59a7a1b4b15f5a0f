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
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    *net.options.lock().unwrap() = EnforcerOptions {
        handshake: true,
        ..EnforcerOptions::default()
    };
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[8080])
        .unwrap();
    net.start_enforcers().unwrap();
    let root = net.dir.join("www");
    fs::create_dir_all(&root).unwrap();
    let content: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    fs::write(root.join("index.bin"), &content).unwrap();
    net.serve_http(net.host("host-b"), Some("api"), "::", 8080, &root)
        .unwrap();
    (net, content)
}

/// Packets the host's NFQUEUE queues have taken so far (the sum of each queue's last
/// packet id, from the kernel's `/proc/net/netfilter/nfnetlink_queue` in its namespace).
fn queued(net: &TestNet, host: &str) -> u64 {
    let out = tessera_tests::sh(
        "ip",
        &[
            "netns",
            "exec",
            net.host(host).netns.as_str(),
            "cat",
            "/proc/net/netfilter/nfnetlink_queue",
        ],
    )
    .unwrap();
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(7)?.parse::<u64>().ok())
        .sum()
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
