//! End-to-end tests of flow records, the API and the CLI on test hosts: allowed and refused
//! connections appear with the right identities, verdicts, codes and byte counts; live
//! follow streams them; /metrics counts them; the map of two enforcers merges into one and
//! survives an enforcer restart.
use std::{collections::BTreeSet, fs, thread, time::Duration};

use serde_json::Value;
use tessera_enforcer::map::Map;
use tessera_proxy::flow::{Direction, FlowRecord, Verdict};
use tessera_tests::{API_PORT, TestNet, tessera_bin};

const T: Duration = Duration::from_secs(30);

/// Runs `tessera ARGS --token-file ...` inside `host`'s namespace (the API listens on the
/// host's address, with the test net's token).
fn cli(net: &TestNet, host: &str, args: &[&str]) -> String {
    let bin = tessera_bin().unwrap();
    let token = net.api_token_file().unwrap();
    let mut full = args.to_vec();
    full.extend(["--token-file", token.to_str().unwrap()]);
    let out = net
        .run(net.host(host), None, bin.to_str().unwrap(), &full, T)
        .unwrap();
    assert!(
        out.status.success(),
        "tessera {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn api(net: &TestNet, host: &str) -> String {
    format!("{}:{API_PORT}", net.host(host).addr)
}

/// One blast exchange: `up` bytes (plus the "<back>\n" request line) to the server, which
/// answers a 65-byte hash line and `back` bytes. Returns whether it worked.
fn blast(net: &TestNet, host: &str, workload: Option<&str>, up: usize, back: usize) -> bool {
    let out = net
        .run_tool(
            net.host(host),
            workload,
            &[
                "blast",
                "10.77.0.2",
                "7000",
                &up.to_string(),
                &back.to_string(),
            ],
            T,
        )
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"received_ok\": true")
}

#[test]
fn flows_follow_map_and_metrics_through_the_api_and_cli() {
    let net = TestNet::web_and_api("serve-blast", None).expect("test hosts");
    // A follower on host-b, started before the traffic.
    let bin = tessera_bin().unwrap();
    let api_b = api(&net, "host-b");
    let token_file = net.api_token_file().unwrap();
    net.spawn(
        net.host("host-b"),
        None,
        bin.to_str().unwrap(),
        &[
            "flows",
            "--api",
            &api_b,
            "--follow",
            "--json",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .unwrap();
    thread::sleep(Duration::from_millis(500));

    let (up, back) = (100_000, 250_000);
    assert!(
        blast(&net, "host-a", Some("web"), up, back),
        "allowed exchange"
    );
    // Unenrolled on host-a: not captured, so it reaches host-b's protected port directly.
    assert!(
        !blast(&net, "host-a", None, 10, 10),
        "direct connection refused"
    );
    net.wait_flows(net.host("host-b"), 2, |_| true);

    // Records with identities, verdicts, codes, exact bytes.
    let lines = cli(&net, "host-b", &["flows", "--api", &api_b, "--json"]);
    let all: Vec<FlowRecord> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let at = all
        .iter()
        .position(|r| r.verdict == Verdict::Allowed)
        .expect("allowed record");
    let allowed = &all[at];
    assert_eq!(allowed.src.workload.as_deref(), Some("web"));
    // The protocol as the JSON spells it (the type would default a missing one).
    let raw: Value = serde_json::from_str(lines.lines().nth(at).unwrap()).unwrap();
    assert_eq!(raw["protocol"], "tcp");
    assert_eq!(
        allowed.src.spiffe.as_deref(),
        Some("spiffe://tessera.local/enforcer/host-a/workload/web")
    );
    assert_eq!(
        allowed.src.labels.get("app").map(String::as_str),
        Some("web")
    );
    assert_eq!(
        allowed
            .dst
            .labels
            .get("tessera.io/workload")
            .map(String::as_str),
        Some("api")
    );
    let request_line = format!("{back}\n").len();
    assert_eq!(allowed.bytes_sent, (request_line + up) as u64);
    assert_eq!(allowed.bytes_received, (65 + back) as u64);
    let denied: Vec<FlowRecord> = cli(
        &net,
        "host-b",
        &["flows", "--api", &api_b, "--json", "--verdict", "denied"],
    )
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0].code.as_str(), "unauthenticated");
    assert_eq!(denied[0].direction, Direction::Direct);
    let table = cli(&net, "host-b", &["flows", "--api", &api_b]);
    assert!(
        table.starts_with("TIME") && table.contains("unauthenticated"),
        "{table}"
    );

    // The follower saw both, live.
    // The harness names a program's log after its path.
    let log = fs::read_dir(&net.dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("host-b-other-") && n.ends_with("tessera.log")
        })
        .expect("the follower's output");
    let followed = fs::read_to_string(log).unwrap();
    let verdicts: Vec<Verdict> = followed
        .lines()
        .filter_map(|l| serde_json::from_str::<FlowRecord>(l).ok())
        .map(|r| r.verdict)
        .collect();
    assert!(
        verdicts.contains(&Verdict::Allowed) && verdicts.contains(&Verdict::Denied),
        "follow output: {followed}"
    );

    // Metrics.
    let out = net
        .run(
            net.host("host-b"),
            None,
            "curl",
            &[
                "-sS",
                "-H",
                &format!("Authorization: Bearer {}", net.api_token().unwrap()),
                &format!("http://{api_b}/metrics"),
            ],
            T,
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "tessera_connections_total{src=\"web@host-a\",dst=\"api@host-b\",verdict=\"allowed\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("tessera_refusals_total{reason=\"unauthenticated\"} 1"),
        "{text}"
    );
    assert!(text.contains("tessera_open_connections 0"), "{text}");

    // One map from two enforcers: both ends of the allowed connection make one edge.
    let api_a = api(&net, "host-a");
    let both = |host: &str| -> Map {
        serde_json::from_str(&cli(
            &net,
            host,
            &["map", "--api", &api_a, "--api", &api_b, "--format", "json"],
        ))
        .unwrap()
    };
    // host-b's namespace reaches both addresses over the bridge.
    let map = both("host-b");
    let edge = map
        .edges
        .iter()
        .find(|e| e.key.src == "web@host-a" && e.key.verdict == "allowed")
        .cloned()
        .expect("allowed edge");
    assert_eq!(edge.stats.connections, 1);
    assert_eq!(
        edge.reporters,
        BTreeSet::from(["host-a".to_owned(), "host-b".to_owned()])
    );
    assert_eq!(edge.stats.bytes_received, (65 + back) as u64);
    let dot = cli(&net, "host-b", &["map", "--api", &api_b, "--format", "dot"]);
    assert!(dot.contains("\"web@host-a\" -> \"api@host-b\""), "{dot}");

    // A restart keeps the aggregated map.
    net.stop_enforcer(net.host("host-b"), false).unwrap();
    net.start_enforcer(net.host("host-b")).unwrap();
    let map: Map = serde_json::from_str(&cli(
        &net,
        "host-b",
        &["map", "--api", &api_b, "--format", "json"],
    ))
    .unwrap();
    assert!(
        map.edges
            .iter()
            .any(|e| e.key.src == "web@host-a" && e.stats.connections == 1),
        "map after restart: {map:?}"
    );
    assert!(
        map.edges.iter().any(|e| e.key.verdict == "denied"
            && e.stats
                .codes
                .iter()
                .map(|c| c.as_str())
                .eq(["unauthenticated"])),
        "map after restart: {map:?}"
    );
}

/// `tessera flows --json` prints JSON lines (the tests above parse it line by line), and
/// its help says so, as the README and docs/flows.md do.
#[test]
fn the_help_says_flows_json_is_one_object_per_line() {
    let out = std::process::Command::new(tessera_bin().unwrap())
        .args(["flows", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    let json = help
        .split("--json")
        .nth(1)
        .unwrap_or_else(|| panic!("no --json in: {help}"));
    let json = json.split("\n  -").next().unwrap();
    let words = json.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(words.contains("one JSON object per line"), "{help}");
    let readme = include_str!("../../README.md");
    assert!(
        readme.contains("`tessera flows --json` prints the same records as JSON lines"),
        "the README's API section says what --json prints"
    );
}
