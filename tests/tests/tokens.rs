//! End-to-end tests of identity tokens on test hosts.
//!
//! * A hostile peer holding a real enforcer certificate (`rogue_peer`) sends forged,
//!   tampered, replayed, wrong-session, missing, foreign and truncated tokens: each is
//!   refused with its reason, recorded in the destination's flows, and never reaches the
//!   application.
//! * Policy on derived labels: only the workload's `curl` binary (by its SHA-256) may reach
//!   the API; another program of the same workload is refused. Flows carry SPIFFE names.
use std::{fs, path::Path, time::Duration};

use serde_json::Value;
use tessera_proxy::flow::{Direction, Verdict};
use tessera_tests::TestNet;

const T: Duration = Duration::from_secs(30);

fn blast_connections(net: &TestNet) -> usize {
    fs::read_to_string(net.dir.join("host-b-api-python3.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('{'))
        .count()
}

#[test]
fn hostile_tokens_are_refused_with_their_reason_and_never_reach_the_application() {
    let net = TestNet::web_and_api("serve-blast", None).expect("test hosts");

    let ca = net.dir.join("ca");
    let rogue = net
        .rogue_peer(
            env!("CARGO_BIN_EXE_rogue_peer"),
            net.host("host-a"),
            [
                &ca.join("ca.pem"),
                &ca.join("host-a.pem"),
                &ca.join("host-a.key"),
            ],
            net.host("host-b"),
            7000,
            None,
        )
        .expect("rogue peer");
    let stdout = &rogue.stdout;
    // The control: a genuine token from the same peer is accepted and the bytes flow.
    assert_eq!(rogue.answer("valid")["status"], "Connected", "{stdout}");
    assert!(
        rogue.answer("valid-exchange")["answer"]
            .as_str()
            .is_some_and(|a| a.len() == 65),
        "the application answered the genuine request: {stdout}"
    );
    for (case, reason) in [
        ("replayed", "replay"),
        ("forged", "bad-signature"),
        ("tampered", "bad-signature"),
        ("wrong-session", "wrong-session"),
        ("no-token", "no-token"),
        ("foreign", "foreign-identity"),
        ("truncated", "truncated"),
    ] {
        let a = rogue.answer(case);
        assert_eq!(a["status"], "Unauthenticated", "{case}: {a}");
        assert!(
            a["reason"]
                .as_str()
                .unwrap()
                .contains(&format!("({reason})")),
            "{case}: {a}"
        );
        // The destination recorded the refusal and its reason.
        let flows = net.wait_flows(net.host("host-b"), 1, |f| {
            f.direction == Direction::Inbound
                && f.verdict == Verdict::Denied
                && f.reason.contains(&format!("({reason})"))
        });
        assert!(
            !flows.is_empty(),
            "{case}: no flow with reason {reason} on host-b: {:?}",
            net.flows(net.host("host-b"))
        );
    }
    // Only the genuine request reached the application.
    assert_eq!(blast_connections(&net), 1);
}

fn sha256_hex(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn policy_on_derived_labels_admits_only_the_attested_binary() {
    let curl = fs::canonicalize(tessera_tests::which("curl").expect("curl")).unwrap();
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[8080])
        .unwrap();
    let policy = format!(
        "rules:\n  - name: web-curl-to-api\n    action: allow\n    from: [{{labels: [app=web, tessera.io/exe-sha256={}, tessera.io/uid=0]}}]\n    to: [{{labels: [app=api, tessera.io/enforcer=host-b]}}]\n",
        sha256_hex(&curl)
    );
    net.write_policy(None, &policy).unwrap();
    net.start_enforcers().unwrap();
    let site = net.dir.join("site");
    fs::create_dir_all(&site).unwrap();
    fs::write(site.join("index.html"), "hello through tessera\n").unwrap();
    net.serve_http(net.host("host-b"), Some("api"), "0.0.0.0", 8080, &site)
        .unwrap();

    let out = net
        .run(
            net.host("host-a"),
            Some("web"),
            "curl",
            &["-sS", "--max-time", "10", "http://10.77.0.2:8080/"],
            T,
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello through tessera\n",
        "curl (attested by hash) must pass: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Same workload, another binary: refused at the source by policy.
    let out = net
        .run_tool(
            net.host("host-a"),
            Some("web"),
            &["echo-many", "10.77.0.2", "8080", "1"],
            T,
        )
        .unwrap();
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or(Value::Null);
    assert_ne!(v["ok"], 1, "python3 is not the attested binary: {v}");

    // The destination saw the source's SPIFFE name and the rule, from a verified token.
    let inbound = net.wait_flows(net.host("host-b"), 1, |f| {
        f.direction == Direction::Inbound && f.verdict == Verdict::Allowed
    });
    let f = inbound.first().expect("an allowed inbound flow on host-b");
    assert_eq!(
        f.src.spiffe.as_deref(),
        Some("spiffe://tessera.local/enforcer/host-a/workload/web")
    );
    assert_eq!(
        f.dst.spiffe.as_deref(),
        Some("spiffe://tessera.local/enforcer/host-b/workload/api")
    );
    assert_eq!(f.rule.as_deref(), Some("web-curl-to-api"));
    let denied = net.wait_flows(net.host("host-a"), 1, |f| {
        f.direction == Direction::Outbound && f.verdict == Verdict::Denied
    });
    assert!(!denied.is_empty(), "{:?}", net.flows(net.host("host-a")));

    // The operator view: the API workload's identity and its running server's labels.
    let shown = net
        .tessera(&[
            "identity",
            "show",
            "--config",
            net.config_path(net.host("host-b")).to_str().unwrap(),
        ])
        .unwrap();
    for want in [
        "spiffe://tessera.local/enforcer/host-b/workload/api",
        "tessera.io/enforcer=host-b",
        "tessera.io/uid=0",
        "tessera.io/user=root",
        "tessera.io/exe=",
        "tessera.io/exe-sha256=",
    ] {
        assert!(shown.contains(want), "identity show lacks {want}:\n{shown}");
    }
}
