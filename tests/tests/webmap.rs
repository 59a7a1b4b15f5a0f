//! The web map in a real browser: headless Chromium (Debian's) driven by playwright-core.
//!
//! * An enforcer's page, merged with its peer's map: the expected nodes and edges are
//!   drawn; clicking an edge shows its details; the verdict filter hides the others.
//! * The fleet's page (`tessera map --server --serve`) against a real `tessera server` with
//!   two enrolled enforcers: the fleet's edges are drawn, each filter (verdict, label, time
//!   window, search) narrows what is drawn, clicking an identity shows its SPIFFE name,
//!   labels, enforcers and recent flows, a new edge is marked new, and the administrator
//!   token never reaches the browser.
//!
//! Screenshots are kept in `tests/artifacts/`.
use std::{fs, path::Path, time::Duration};

use serde_json::Value;
use tessera_tests::{API_PORT, ControlServer, TestNet, eventually};

const T: Duration = Duration::from_secs(60);

const POLICY: &str = "\
rules:
  - name: web-to-api
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=api]}]
";

/// tests/web, checked to have playwright-core and Chromium.
fn web_tests() -> std::path::PathBuf {
    let web_tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    assert!(
        web_tests.join("node_modules/playwright-core").exists(),
        "tests/web/node_modules is missing: run `cargo xtask setup`"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "chromium is missing: run `cargo xtask setup`"
    );
    web_tests
}

/// `tests/artifacts/NAME`, any earlier one removed.
fn artifact(name: &str) -> std::path::PathBuf {
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts");
    fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join(name);
    let _ = fs::remove_file(&shot);
    shot
}

#[test]
fn the_web_map_draws_the_merged_map_and_shows_an_edge_on_click() {
    let web_tests = web_tests();
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

    let shot = artifact("webmap.png");
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
    // The verdict filter on the enforcer's page: only the denied edge is left.
    let denied_only: Vec<&str> = v["denied_only"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["verdict"].as_str().unwrap())
        .collect();
    assert!(
        !denied_only.is_empty() && denied_only.iter().all(|v| *v == "denied"),
        "with the verdict filter on denied: {denied_only:?}"
    );
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "screenshot saved"
    );
}

/// Where the fleet viewer listens, in the control host's namespace.
const VIEWER: &str = "127.0.0.1:15190";
/// The control server's own map page (`tessera server run --map-listen`).
const SERVER_PAGE: &str = "127.0.0.1:15180";

const WEB_PARIS_TO_API: &str = "\
rules:
  - name: paris-web-to-api
    action: allow
    from: [{labels: [app=web, site=paris]}]
    to: [{labels: [app=api]}]
";

/// host-a (web, site=paris) and host-b (api, echo on 7000, site=london) enrolled with a
/// `tessera server` on `control`, the central policy applied and web -> api working.
fn fleet() -> (TestNet, ControlServer) {
    let net = TestNet::with_plain_hosts(&["host-a", "host-b"], &["control"]).expect("test hosts");
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[7000])
        .unwrap();
    let srv = net
        .start_control(net.host("control"), &["--map-listen", SERVER_PAGE])
        .expect("control plane");
    net.join(net.host("host-a"), &srv, "site=paris").unwrap();
    net.join(net.host("host-b"), &srv, "site=london").unwrap();
    net.start_enforcers().unwrap();
    net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", 7000)
        .unwrap();
    let policy = net.dir.join("central.yaml");
    fs::write(&policy, WEB_PARIS_TO_API).unwrap();
    net.control_admin(&srv, &["policy", "apply", policy.to_str().unwrap()])
        .unwrap();
    assert!(
        eventually(
            Duration::from_secs(20),
            || echo(&net, Some("web"), "1")["ok"] == 1
        ),
        "web -> api never worked"
    );
    (net, srv)
}

fn echo(net: &TestNet, workload: Option<&str>, n: &str) -> Value {
    let out = net
        .run_tool(
            net.host("host-a"),
            workload,
            &["echo-many", "10.77.0.2", "7000", n],
            T,
        )
        .unwrap();
    serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or(Value::Null)
}

fn edges(v: &Value) -> Vec<Value> {
    v["edges"].as_array().cloned().unwrap_or_default()
}

fn pairs(edges: &[Value]) -> Vec<(String, String, String)> {
    let mut p: Vec<_> = edges
        .iter()
        .map(|e| {
            (
                e["src"].as_str().unwrap().to_owned(),
                e["dst"].as_str().unwrap().to_owned(),
                e["verdict"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    p.sort();
    p
}

#[test]
fn the_fleet_page_filters_shows_an_identity_and_marks_new_edges() {
    let web_tests = web_tests();
    let (net, srv) = fleet();
    assert_eq!(echo(&net, Some("web"), "3")["ok"], 3);
    // Later (past the 2 s baseline): a process outside any workload on host-a tries api,
    // refused at host-b.
    std::thread::sleep(Duration::from_secs(4));
    let _ = echo(&net, None, "1");
    let is_allowed = |e: &Value| {
        e["src"] == "web@host-a" && e["dst"] == "api@host-b" && e["verdict"] == "allowed"
    };
    let is_refused = |e: &Value| {
        e["dst"] == "api@host-b"
            && e["verdict"] == "denied"
            && e["src"]
                .as_str()
                .is_some_and(|s| s.contains("(unauthenticated)"))
    };
    let mut map = Value::Null;
    assert!(
        eventually(Duration::from_secs(30), || {
            map = serde_json::from_str(
                &net.control_admin(&srv, &["map", "--format", "json"])
                    .unwrap(),
            )
            .unwrap();
            let e = edges(&map);
            e.iter()
                .any(|e| is_allowed(e) && e["reporters"].as_array().map_or(0, Vec::len) == 2)
                && e.iter().any(is_refused)
        }),
        "the fleet map lacks web -> api from both ends or the refusal: {map}"
    );
    let all = edges(&map);
    let allowed = all.iter().find(|e| is_allowed(e)).unwrap().clone();
    let refused = all.iter().find(|e| is_refused(e)).unwrap().clone();
    let (a_last, r_last) = (
        allowed["last_seen_ms"].as_u64().unwrap(),
        refused["last_seen_ms"].as_u64().unwrap(),
    );
    assert!(r_last > a_last + 2_000, "{allowed} {refused}");
    // The page's clock: five minutes after the middle of the two, so that "last 5 min"
    // keeps the refusal and drops web -> api.
    let now = (a_last + r_last) / 2 + 5 * 60_000;
    let node = |name: &str| -> Value {
        map["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap_or_else(|| panic!("no node {name}: {map}"))
            .clone()
    };
    let web = node("web@host-a");
    let api = node("api@host-b");
    let web_spiffe = web["spiffe"]
        .as_str()
        .expect("web's SPIFFE name")
        .to_owned();
    let api_spiffe = api["spiffe"]
        .as_str()
        .expect("api's SPIFFE name")
        .to_owned();
    assert_eq!(web["labels"]["site"], "paris", "{web}");

    // The viewer, on the server's host, on loopback: the administrator's credentials stay
    // in it.
    let bin = tessera_tests::tessera_bin().unwrap();
    let ca = srv.state.join("ca.pem");
    let admin_token = srv.state.join("admin.token");
    let pid = net
        .spawn(
            net.host("control"),
            None,
            bin.to_str().unwrap(),
            &[
                "map",
                "--server",
                &srv.url,
                "--ca",
                ca.to_str().unwrap(),
                "--admin-token-file",
                admin_token.to_str().unwrap(),
                "--serve",
                VIEWER,
                "--new-after",
                "2s",
            ],
        )
        .unwrap();
    net.wait_listening(pid, 15190).unwrap();
    let curl = |args: &[&str]| -> String {
        let out = net
            .run(
                net.host("control"),
                None,
                "curl",
                &[
                    &["-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}"],
                    args,
                ]
                .concat(),
                T,
            )
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A DNS-rebinding page (its own name in Host) gets nothing; nor does anyone asking the
    // viewer for the control plane's other routes.
    let url = format!("http://{VIEWER}/");
    assert_eq!(
        curl(&["-H", "Host: attacker.example", &format!("{url}api/map")]),
        "403"
    );
    assert_eq!(curl(&[&format!("{url}v1/admin/status")]), "404");
    assert_eq!(curl(&[&format!("{url}api/map?new_after=soon")]), "400");
    // The page may load only its own script and is never framed.
    let head = net
        .run(
            net.host("control"),
            None,
            "curl",
            &["-sS", "-m", "10", "-D", "-", "-o", "/dev/null", &url],
            T,
        )
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).to_ascii_lowercase();
    assert!(
        head.contains("content-security-policy: default-src 'self';")
            && head.contains("frame-ancestors 'none'"),
        "{head}"
    );

    // The control server's own page: the same guard, and the fleet map from its store.
    let page = format!("http://{SERVER_PAGE}/");
    assert_eq!(
        curl(&["-H", "Host: attacker.example", &format!("{page}api/map")]),
        "403"
    );
    assert_eq!(curl(&[&format!("{page}v1/admin/status")]), "404");
    let served = net
        .run(
            net.host("control"),
            None,
            "curl",
            &["-sS", "-m", "10", &format!("{page}api/map")],
            T,
        )
        .unwrap();
    let served: Value = serde_json::from_slice(&served.stdout).unwrap();
    assert_eq!(pairs(&edges(&served)), pairs(&all), "{served}");
    // Off loopback, the server will not serve the page without a token of its own.
    let other = net.dir.join("other-server");
    fs::create_dir_all(&other).unwrap();
    fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let out = net
        .run(
            net.host("control"),
            None,
            bin.to_str().unwrap(),
            &[
                "server",
                "run",
                "--state-dir",
                other.to_str().unwrap(),
                "--listen",
                "127.0.0.1:15101",
                "--map-listen",
                &format!("{}:15180", net.host("control").addr),
            ],
            T,
        )
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--map-token-file"),
        "an off-loopback map page without a token: {err}"
    );

    // The same page and checks twice: through the viewer, and served by the control server
    // itself (`--map-listen`, the map read from its store; the baseline in the address).
    let server_page = format!("http://{SERVER_PAGE}/?new_after=2s");
    for (url, source) in [
        (url.clone(), format!("fleet map ({})", srv.url)),
        (server_page, "fleet map (this server)".to_string()),
    ] {
        let shot = artifact(if source.contains("this server") {
            "webmap-fleet-server.png"
        } else {
            "webmap-fleet.png"
        });
        let steps = serde_json::json!([
            {"select": "#f-verdict", "value": "allowed"},
            {"select": "#f-label", "value": "site=paris"},
            {"select": "#f-window", "value": "5m"},
            {"select": "#f-window", "value": "1h"},
            {"fill": "#f-search", "value": web_spiffe},
            {"fill": "#f-search", "value": "UNAUTHENTICATED"},
        ]);
        let out = net
            .run(
                net.host("control"),
                None,
                "node",
                &[
                    web_tests.join("fleet_test.mjs").to_str().unwrap(),
                    &url,
                    shot.to_str().unwrap(),
                    &now.to_string(),
                    &steps.to_string(),
                    "api@host-b",
                    admin_token.to_str().unwrap(),
                ],
                Duration::from_secs(120),
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
        assert_eq!(
            v["secret_seen"],
            serde_json::json!([]),
            "the administrator token reached the browser"
        );

        // Unfiltered: the fleet's edges, as the control plane merged them.
        let drawn = edges(&v["all"]);
        assert!(
            v["all"]["source"].as_str().unwrap().contains(&source),
            "{}",
            v["all"]
        );
        assert_eq!(pairs(&drawn), pairs(&all), "drawn: {drawn:?}");
        assert_eq!(
            v["all"]["graph"]["edges"],
            all.len().to_string(),
            "{}",
            v["all"]
        );
        let step = |i: usize| -> Vec<Value> { edges(&v["steps"][i]) };
        let has = |edges: &[Value], f: &dyn Fn(&Value) -> bool| edges.iter().any(f);

        // verdict=allowed: the refusal is hidden, web -> api stays, nothing but allowed edges.
        let s = step(0);
        assert!(has(&s, &is_allowed) && !has(&s, &is_refused), "{s:?}");
        assert!(s.iter().all(|e| e["verdict"] == "allowed"), "{s:?}");
        // label site=paris: only edges with an end at the Paris site (web's).
        let s = step(1);
        assert!(has(&s, &is_allowed) && !has(&s, &is_refused), "{s:?}");
        assert!(
            s.iter()
                .all(|e| e["src"] == "web@host-a" || e["dst"] == "web@host-a"),
            "{s:?}"
        );
        // Seen in the last 5 minutes (the page's clock fixed after web -> api's last
        // connection by more than that): only the refusal. The last hour: both.
        let s = step(2);
        assert!(has(&s, &is_refused) && !has(&s, &is_allowed), "{s:?}");
        assert!(
            s.iter()
                .all(|e| e["last_seen_ms"].as_u64().unwrap() + 5 * 60_000 >= now),
            "{s:?}"
        );
        let s = step(3);
        assert!(has(&s, &is_refused) && has(&s, &is_allowed), "{s:?}");
        // Search by web's SPIFFE name: web's edges; by "unauthenticated" (any case): the
        // refusal's source.
        let s = step(4);
        assert!(has(&s, &is_allowed) && !has(&s, &is_refused), "{s:?}");
        let s = step(5);
        assert!(has(&s, &is_refused) && !has(&s, &is_allowed), "{s:?}");
        for i in 0..6 {
            let n = step(i).len();
            assert!(n < drawn.len() || i == 3, "step {i} narrowed nothing");
            assert_eq!(v["steps"][i]["graph"]["edges"], n.to_string());
        }
        // The filters are in the address (a view can be shared).
        assert!(
            v["steps"][0]["address"]
                .as_str()
                .unwrap()
                .contains("verdict=allowed"),
            "{}",
            v["steps"][0]["address"]
        );

        // New edges (baseline: the map's first 2 s): the refusal, made 4 s after web's first
        // connections, is marked and drawn as new; the map's first edge is not; the legend
        // counts what is marked.
        let start = drawn
            .iter()
            .map(|e| e["first_seen_ms"].as_u64().unwrap())
            .min()
            .unwrap();
        let refused_drawn = drawn.iter().find(|e| is_refused(e)).unwrap();
        assert_eq!(refused_drawn["new"], true, "{refused_drawn}");
        assert_eq!(refused_drawn["drawn_new"], true, "{refused_drawn}");
        for e in &drawn {
            let want = e["first_seen_ms"].as_u64().unwrap() > start + 2_000;
            assert_eq!(e["drawn_new"], want, "{e}");
        }
        let marked = drawn.iter().filter(|e| e["drawn_new"] == true).count();
        assert!(marked < drawn.len());
        assert_eq!(v["all"]["new_count"], marked.to_string());
        assert_eq!(v["all"]["graph"]["newEdges"], marked.to_string());

        // The click on api: its SPIFFE name, labels, enforcers, and its flows, most recent
        // first (the refusal, then web's connections).
        let d = &v["details"];
        assert_eq!(d["heading"], "api@host-b");
        assert_eq!(d["rows"]["SPIFFE"], api_spiffe.as_str(), "{d}");
        assert_eq!(d["rows"]["on enforcer"], "host-b", "{d}");
        assert_eq!(d["rows"]["reported by"], "host-a, host-b", "{d}");
        assert_eq!(d["labels"]["app"], "api", "{d}");
        assert_eq!(d["labels"]["site"], "london", "{d}");
        let flows = d["flows"].as_array().unwrap();
        let touching = all
            .iter()
            .filter(|e| e["src"] == "api@host-b" || e["dst"] == "api@host-b")
            .count();
        assert_eq!(flows.len(), touching, "{d}");
        let seen: Vec<u64> = flows
            .iter()
            .map(|f| f["lastSeen"].as_str().unwrap().parse().unwrap())
            .collect();
        assert!(
            seen.windows(2).all(|w| w[0] >= w[1]),
            "not most recent first: {d}"
        );
        let first = &flows[0];
        assert!(
            first["peer"]
                .as_str()
                .unwrap()
                .contains("(unauthenticated)")
                && first["direction"] == "in"
                && first["verdict"] == "denied"
                && first["port"] == "7000"
                && first["new"] == "true",
            "{d}"
        );
        let web_flow = flows
            .iter()
            .find(|f| f["peer"] == "web@host-a" && f["verdict"] == "allowed")
            .unwrap_or_else(|| panic!("web's flows not shown: {d}"));
        assert!(
            web_flow["text"]
                .as_str()
                .unwrap()
                .contains(&format!("×{}", allowed["connections"])),
            "{d}"
        );
        assert!(
            fs::metadata(&shot)
                .map(|m| m.len() > 10_000)
                .unwrap_or(false),
            "screenshot saved"
        );
    }
}
