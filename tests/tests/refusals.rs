//! How a refusal looks, end to end on test hosts (root, real eBPF, real programs), as
//! `docs/flows.md` ("How refusals look") documents it:
//!
//! * what the application sees: in handshake mode a refused `connect()` fails with
//!   `ECONNREFUSED` (a reset answers its SYN), whether the destination's policy or the
//!   source's refused; in tunnel mode `connect()` succeeds (the local proxy accepted it
//!   before any verdict could be known) and the first read fails with `ECONNRESET`;
//! * what the map shows: in handshake mode one refusal is one denied edge between the two
//!   identities, reported by both enforcers, although the source only saw an address.
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_tests::{API_PORT, EnforcerOptions, TestNet};

/// host-b's policy refuses web on this port (ingress refusal).
const REFUSED_BY_B: u16 = 9000;
/// host-a's policy refuses web on this port (egress refusal).
const REFUSED_BY_A: u16 = 9100;
/// Both allow this one.
const ALLOWED: u16 = 8080;

/// Connects to ADDR PORT and reads: prints how `connect()` ended and, if it succeeded, how
/// the first `recv()` did (`timeout` after 3 s without data: a live connection).
const PROBE: &str = r#"
import errno, socket, sys
s = socket.socket(socket.AF_INET)
s.settimeout(20)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except OSError as e:
    print("connect:" + errno.errorcode.get(e.errno, str(e)))
    sys.exit(0)
s.settimeout(3)
try:
    d = s.recv(1)
    print("connect:ok recv:" + ("eof" if not d else "data"))
except socket.timeout:
    print("connect:ok recv:timeout")
except OSError as e:
    print("connect:ok recv:" + errno.errorcode.get(e.errno, str(e)))
"#;

fn rule(name: &str, ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "rules:\n  - name: {name}\n    action: allow\n    from: [{{labels: [app=web]}}]\n    to: [{{labels: [app=api]}}]\n    ports: [{}]\n",
        ports.join(", ")
    )
}

/// web@host-a and api@host-b (echo servers on the three ports, so nothing is refused for
/// want of a listener), each enforcer with its own policy, in `handshake` mode or not.
fn hosts(handshake: bool) -> TestNet {
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    *net.options.lock().unwrap() = EnforcerOptions {
        handshake,
        ..EnforcerOptions::default()
    };
    let ports = [ALLOWED, REFUSED_BY_B, REFUSED_BY_A];
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &ports)
        .unwrap();
    net.write_policy(
        Some(net.host("host-a")),
        &rule("a-web-api", &[ALLOWED, REFUSED_BY_B]),
    )
    .unwrap();
    net.write_policy(
        Some(net.host("host-b")),
        &rule("b-web-api", &[ALLOWED, REFUSED_BY_A]),
    )
    .unwrap();
    net.start_enforcers().unwrap();
    for port in ports {
        net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", port)
            .unwrap();
    }
    net
}

/// What web on host-a sees connecting to api's `port`.
fn probe(net: &TestNet, port: u16) -> String {
    let out = net
        .run(
            net.host("host-a"),
            Some("web"),
            "python3",
            &["-c", PROBE, "10.77.0.2", &port.to_string()],
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn in_handshake_mode_a_refused_connect_fails_with_econnrefused() {
    let net = hosts(true);
    assert_eq!(probe(&net, ALLOWED), "connect:ok recv:timeout");
    assert_eq!(
        probe(&net, REFUSED_BY_B),
        "connect:ECONNREFUSED",
        "the destination's refusal"
    );
    assert_eq!(
        probe(&net, REFUSED_BY_A),
        "connect:ECONNREFUSED",
        "the source's refusal"
    );
}

#[test]
fn in_tunnel_mode_a_refused_connection_is_accepted_then_reset() {
    let net = hosts(false);
    assert_eq!(probe(&net, ALLOWED), "connect:ok recv:timeout");
    assert_eq!(
        probe(&net, REFUSED_BY_B),
        "connect:ok recv:ECONNRESET",
        "the destination's refusal"
    );
    assert_eq!(
        probe(&net, REFUSED_BY_A),
        "connect:ok recv:ECONNRESET",
        "the source's refusal"
    );
}

/// host-a's API map merged with host-b's (`?peers=host-b`).
fn merged_map(net: &TestNet) -> Value {
    let bearer = format!("Authorization: Bearer {}", net.api_token().unwrap());
    let url = format!("http://10.77.0.1:{API_PORT}/api/map?peers=host-b");
    let out = net
        .run(
            net.host("host-a"),
            None,
            "curl",
            &["-sS", "-m", "20", "--fail", "-H", &bearer, &url],
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn in_handshake_mode_one_refusal_is_one_denied_edge_with_both_reporters() {
    let net = hosts(true);
    assert_eq!(probe(&net, REFUSED_BY_B), "connect:ECONNREFUSED");
    // Each end wrote its record of the refusal: host-a only knows host-b's address.
    let at_a = net.wait_flows(net.host("host-a"), 1, |f| f.code.as_str() == "peer-refused");
    assert_eq!(at_a[0].dst.workload, None, "{:?}", at_a[0]);
    assert_eq!(at_a[0].dst.enforcer.as_deref(), Some("host-b"));
    net.wait_flows(net.host("host-b"), 1, |f| f.code.as_str() == "policy");

    let denied = |m: &Value| -> Vec<Value> {
        m["edges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["verdict"] == "denied")
            .cloned()
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let map = loop {
        let m = merged_map(&net);
        let d = denied(&m);
        if d.iter()
            .any(|e| e["reporters"].as_array().unwrap().len() == 2)
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "no denied edge with both reporters: {m:#}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let d = denied(&map);
    assert_eq!(d.len(), 1, "one refusal, one denied edge: {map:#}");
    let e = &d[0];
    assert_eq!(e["src"], "web@host-a", "{e:#}");
    assert_eq!(e["dst"], "api@host-b", "{e:#}");
    assert_eq!(e["port"], REFUSED_BY_B);
    assert_eq!(e["reporters"], serde_json::json!(["host-a", "host-b"]));
    assert_eq!(e["connections"], 1, "{e:#}");
    let mut codes: Vec<&str> = e["codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        ["peer-refused", "policy"],
        "both ends' reasons: {e:#}"
    );
    let names: Vec<&str> = map["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains("(via")),
        "the address node is gone: {names:?}"
    );
}
