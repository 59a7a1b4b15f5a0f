//! The web map in a real browser: headless Chromium (Debian's) driven by playwright-core
//! loads the page from a running enforcer, merged with its peer's map; the expected nodes
//! and edges are drawn; clicking an edge shows its details; a screenshot is kept in
//! `tests/artifacts/webmap.png`.
use std::{path::Path, time::Duration};

use serde_json::Value;
use tessera_tests::{API_PORT, TestNet};

const T: Duration = Duration::from_secs(60);

const POLICY: &str = "\
rules:
  - name: web-to-api
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=api]}]
";

#[test]
fn the_web_map_draws_the_merged_map_and_shows_an_edge_on_click() {
    let web_tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    assert!(
        web_tests.join("node_modules/playwright-core").exists(),
        "tests/web/node_modules is missing: run `cargo xtask setup`"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "chromium is missing: run `cargo xtask setup`"
    );
    let net = TestNet::web_and_api("serve-echo", Some(POLICY)).expect("test hosts");
    let echo = ["echo-many", "10.77.0.2", "7000", "1"];
    for _ in 0..3 {
        let out = net
            .run_tool(net.host("host-a"), Some("web"), &echo, T)
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"ok\": 1"));
    }
    // A refusal: an unenrolled client straight to the protected port.
    let _ = net.run_tool(net.host("host-a"), None, &echo, T);
    net.wait_flows(net.host("host-b"), 4, |_| true);
    net.wait_flows(net.host("host-a"), 3, |_| true);

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("webmap.png");
    let _ = std::fs::remove_file(&shot);
    let url = format!("http://10.77.0.2:{API_PORT}/?peers=10.77.0.1:{API_PORT}&group=app");
    let out = net
        .run(
            net.host("host-b"),
            None,
            "node",
            &[
                web_tests.join("map_test.mjs").to_str().unwrap(),
                &url,
                shot.to_str().unwrap(),
                "web@host-a",
                "api@host-b",
                // The API's bearer token: the browser sends it with every request.
                net.api_token_file().unwrap().to_str().unwrap(),
            ],
            T,
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser test failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["errors"], serde_json::json!([]), "page errors: {v}");
    let nodes: Vec<&str> = v["drawn"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in ["web@host-a", "api@host-b", "10.77.0.1 (unauthenticated)"] {
        assert!(nodes.contains(&want), "node {want} not drawn: {nodes:?}");
    }
    let edges = v["drawn"]["edges"].as_array().unwrap();
    let allowed = edges
        .iter()
        .find(|e| e["src"] == "web@host-a" && e["verdict"] == "allowed")
        .expect("allowed edge drawn");
    // Merged from both enforcers: one edge, both reporters, three connections.
    assert_eq!(allowed["connections"], 3);
    assert_eq!(
        allowed["reporters"],
        serde_json::json!(["host-a", "host-b"])
    );
    assert!(
        edges
            .iter()
            .any(|e| e["verdict"] == "denied" && e["dst"] == "api@host-b"),
        "denied edge drawn: {edges:?}"
    );
    // The click on the edge showed it: the rule, counts and recent flows.
    let details = v["details"].as_str().unwrap();
    assert!(
        details.contains("web@host-a → api@host-b:7000")
            && details.contains("web-to-api")
            && details.contains("Recent flows"),
        "details after the click: {details}"
    );
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "screenshot saved"
    );
}
