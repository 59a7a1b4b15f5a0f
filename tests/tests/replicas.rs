//! The control plane as a fleet runs it (issue 14): two `tessera server` replicas on a
//! three-member etcd cluster, on test hosts of their own, with real enforcers that follow
//! a list of servers. A replica crashes, an etcd member dies, etcd loses its quorum and gets
//! it back: enforcers fail over, nothing in the store is lost, the policy in force stays in
//! force while nothing can change it (fail static), and changes flow again once the
//! cluster is whole. Also across replicas: one join token raced through both enrols one
//! enforcer, the fleet's map merges three enforcers, and a policy suggested from that map,
//! applied, keeps what was seen working and refuses what was not.
use std::{fs, time::Duration};

use serde_json::Value;
use tessera_tests::{ControlServer, TestNet, eventually};

const T: Duration = Duration::from_secs(30);
/// How long a change may take to reach every enforcer, through reconnections with backoff
/// (at most 10 s between attempts) on a loaded CI machine.
const CONVERGE: Duration = Duration::from_secs(45);

/// web may reach api (any port) from the Paris site.
const ALLOW: &str = "\
rules:
  - name: paris-web-to-api
    action: allow
    from: [{labels: [app=web, site=paris]}]
    to: [{labels: [app=api]}]
";

/// web may reach api only on 7001: the echo on 7000 is refused.
const ONLY_7001: &str = "\
rules:
  - name: web-to-api-7001
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=api]}]
    ports: [7001]
";

fn echo(net: &TestNet, host: &str, port: u16) -> bool {
    let out = net
        .run_tool(
            net.host(host),
            Some("web"),
            &["echo-many", "10.77.0.2", &port.to_string(), "1"],
            T,
        )
        .unwrap();
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or(Value::Null);
    v["ok"] == 1
}

fn apply(net: &TestNet, srv: &ControlServer, name: &str, text: &str) -> anyhow::Result<String> {
    let file = net.dir.join(format!("{name}.yaml"));
    fs::write(&file, text).unwrap();
    net.control_admin(srv, &["policy", "apply", file.to_str().unwrap()])
}

/// Whether, within [`CONVERGE`], every enforcer reports (through `srv`) the policy version
/// the control plane holds, and web -> api:7000 from host-a is `allowed` or not.
fn converges(net: &TestNet, srv: &ControlServer, allowed: bool) -> bool {
    eventually(CONVERGE, || {
        let Ok(text) = net.control_admin(srv, &["server", "status", "--json"]) else {
            return false;
        };
        let st: Value = serde_json::from_str(&text).unwrap();
        let current = &st["policy_version"];
        let everywhere = st["enforcers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| &e["policy_version"] == current);
        everywhere && echo(net, "host-a", 7000) == allowed
    })
}

fn status(net: &TestNet, srv: &ControlServer) -> Value {
    serde_json::from_str(
        &net.control_admin(srv, &["server", "status", "--json"])
            .unwrap(),
    )
    .unwrap()
}

fn names(status: &Value) -> Vec<String> {
    let mut v: Vec<String> = status["enforcers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["state"] == "active")
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn replica(net: &TestNet, host: &str, store: &str) -> ControlServer {
    net.start_control(net.host(host), &["--store", store])
        .unwrap_or_else(|e| panic!("replica on {host}: {e:#}"))
}

/// Replica failover, an etcd member lost, quorum lost (fail static) and regained.
#[test]
fn replicas_on_etcd_survive_a_crashed_replica_a_lost_member_and_a_lost_quorum() {
    let net = TestNet::with_plain_hosts(&["host-a", "host-b"], &["control", "control2"])
        .expect("test hosts");
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[7000])
        .unwrap();
    let mut etcd = net
        .start_etcd(net.host("control"), 3)
        .expect("etcd cluster");
    let store = etcd.store_url("tessera");
    let r1 = replica(&net, "control", &store);
    let r2 = replica(&net, "control2", &store);
    // Both enforcers follow r1 first, then r2; their tokens come from different replicas.
    net.use_replicas(&[&r1, &r2]);
    let token_a = net
        .control_admin(&r1, &["server", "token", "create", "--scope", "site=paris"])
        .unwrap();
    let token_b = net
        .control_admin(
            &r2,
            &["server", "token", "create", "--scope", "site=london"],
        )
        .unwrap();
    net.give_token(net.host("host-a"), token_a.trim()).unwrap();
    net.give_token(net.host("host-b"), token_b.trim()).unwrap();
    net.start_enforcers().unwrap();
    net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", 7000)
        .unwrap();
    apply(&net, &r2, "allow", ALLOW).unwrap();
    assert!(converges(&net, &r2, true), "web -> api never allowed");

    // A replica crashes: the enforcers watching it move to the other, which serves what r1
    // wrote (both enforcers, the policy) and whose changes reach them.
    net.kill_control(&r1).unwrap();
    assert_eq!(names(&status(&net, &r2)), ["host-a", "host-b"]);
    apply(&net, &r2, "only-7001", ONLY_7001).unwrap();
    assert!(
        converges(&net, &r2, false),
        "a policy applied at r2 after r1 crashed never reached the enforcers"
    );
    // r1 comes back on the same store and serves the same control plane.
    let r1 = replica(&net, "control", &store);
    assert_eq!(names(&status(&net, &r1)), ["host-a", "host-b"]);
    apply(&net, &r1, "allow-again", ALLOW).unwrap();
    assert!(converges(&net, &r1, true));

    // One etcd member dies: the replicas carry on (a change through each reaches the fleet).
    net.kill_etcd(&mut etcd, 0).unwrap();
    apply(&net, &r1, "only-7001-b", ONLY_7001)
        .expect("policy apply with one etcd member of three down");
    assert!(
        converges(&net, &r1, false),
        "change lost with a member down"
    );
    apply(&net, &r2, "allow-b", ALLOW).expect("policy apply at r2 with one member down");
    assert!(converges(&net, &r2, true), "change lost with a member down");

    // A second member dies: no quorum. Nothing can change (a clear error), and the
    // enforcers keep enforcing what they have: web -> api still works, also from an
    // enforcer restarted meanwhile (from its cache), and an unenrolled process is still refused.
    net.kill_etcd(&mut etcd, 1).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || !net.etcd_healthy(&etcd, 2)),
        "one member of three still claims quorum"
    );
    let err = apply(&net, &r1, "during-outage", ONLY_7001).unwrap_err();
    assert!(
        format!("{err:#}").contains("store") || format!("{err:#}").contains("etcd"),
        "policy apply without quorum: {err:#}"
    );
    for _ in 0..5 {
        assert!(
            echo(&net, "host-a", 7000),
            "fail static broken without quorum"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    net.stop_enforcer(net.host("host-a"), false).unwrap();
    net.start_enforcer(net.host("host-a"))
        .expect("an enforcer restarted while etcd has no quorum");
    assert!(
        eventually(Duration::from_secs(15), || echo(&net, "host-a", 7000)),
        "a restarted enforcer lost the policy in force while etcd had no quorum"
    );
    let out = net
        .run_tool(
            net.host("host-a"),
            None,
            &["echo-many", "10.77.0.2", "7000", "1"],
            T,
        )
        .unwrap();
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or(Value::Null);
    assert_eq!(v["ok"], 0, "an unenrolled process got through: {v}");

    // Quorum returns: changes flow again to every enforcer, through either replica.
    net.restart_etcd(&mut etcd, 0, false).unwrap();
    net.restart_etcd(&mut etcd, 1, true).unwrap();
    apply(&net, &r2, "only-7001-c", ONLY_7001).expect("policy apply once quorum is back");
    assert!(
        converges(&net, &r1, false),
        "the fleet never followed a change after quorum returned"
    );
    assert_eq!(names(&status(&net, &r1)), ["host-a", "host-b"]);
}

/// Across replicas: one join token raced through two replicas enrols exactly one enforcer;
/// the fleet's map merges what three enforcers saw; the policy suggested from it, applied,
/// keeps every flow that was seen and refuses one that was not.
#[test]
fn across_replicas_one_token_enrols_once_the_map_merges_three_enforcers_and_suggest_applies() {
    let net = TestNet::with_plain_hosts(
        &["host-a", "host-b", "host-c", "host-d"],
        &["control", "control2"],
    )
    .expect("test hosts");
    for h in ["host-a", "host-c", "host-d"] {
        net.add_workload(net.host(h), "web", &[("app", "web")], &[])
            .unwrap();
    }
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[7000, 7001])
        .unwrap();
    let etcd = net.start_etcd(net.host("control"), 1).expect("etcd");
    let store = etcd.store_url("fleet");
    let r1 = replica(&net, "control", &store);
    let r2 = replica(&net, "control2", &store);
    net.use_replicas(&[&r1, &r2]);
    for (h, scope) in [("host-a", "site=paris"), ("host-b", "site=london")] {
        let t = net
            .control_admin(&r1, &["server", "token", "create", "--scope", scope])
            .unwrap();
        net.give_token(net.host(h), t.trim()).unwrap();
    }
    net.start_enforcer(net.host("host-a")).unwrap();
    net.start_enforcer(net.host("host-b")).unwrap();
    net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", 7000)
        .unwrap();
    net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", 7001)
        .unwrap();
    apply(&net, &r1, "allow", ALLOW).unwrap();

    // One token, two enforcers, each enrolling through its own replica at the same moment.
    let token = net
        .control_admin(&r2, &["server", "token", "create", "--scope", "site=paris"])
        .unwrap();
    let (c, d) = (net.host("host-c"), net.host("host-d"));
    net.use_replicas_for(c, &[&r1]);
    net.use_replicas_for(d, &[&r2]);
    net.give_token(c, token.trim()).unwrap();
    net.give_token(d, token.trim()).unwrap();
    let (rc, rd) = net.start_enforcers_racing(c, d);
    let (winner, loser) = match (&rc, &rd) {
        (Ok(()), Err(e)) => ("host-c", e),
        (Err(e), Ok(())) => ("host-d", e),
        _ => panic!("not exactly one enrolment across replicas: host-c {rc:?}, host-d {rd:?}"),
    };
    assert!(
        loser.contains(&format!("already used by enforcer {winner}")),
        "{loser}"
    );
    assert_eq!(names(&status(&net, &r1)), ["host-a", "host-b", winner]);
    assert_eq!(names(&status(&net, &r2)), ["host-a", "host-b", winner]);
    assert!(converges(&net, &r2, true));

    // Traffic from two clients; the fleet map (read through either replica) holds both
    // edges, each reported by both of its ends: three enforcers merged.
    for (h, n) in [("host-a", "4"), (winner, "3")] {
        let out = net
            .run_tool(
                net.host(h),
                Some("web"),
                &["echo-many", "10.77.0.2", "7000", n],
                T,
            )
            .unwrap();
        let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
        assert_eq!(v["ok"].to_string(), n, "{h}: {v}");
    }
    let edge = |m: &Value, src: &str| -> Option<Value> {
        m["edges"]
            .as_array()?
            .iter()
            .find(|e| {
                e["src"] == src
                    && e["dst"] == "api@host-b"
                    && e["port"] == 7000
                    && e["verdict"] == "allowed"
            })
            .cloned()
    };
    let from_a = "web@host-a".to_string();
    let from_w = format!("web@{winner}");
    let mut map = Value::Null;
    assert!(
        eventually(CONVERGE, || {
            map = serde_json::from_str(
                &net.control_admin(&r2, &["map", "--format", "json"])
                    .unwrap(),
            )
            .unwrap();
            [&from_a, &from_w].iter().all(|s| {
                edge(&map, s).is_some_and(|e| e["reporters"].as_array().map_or(0, Vec::len) == 2)
            })
        }),
        "the fleet map lacks an edge reported by both ends: {map}"
    );
    assert_eq!(
        edge(&map, &from_a).unwrap()["reporters"],
        serde_json::json!(["host-a", "host-b"])
    );
    let mut w = vec!["host-b", winner];
    w.sort();
    assert_eq!(
        edge(&map, &from_w).unwrap()["reporters"],
        serde_json::json!(w)
    );
    let n = edge(&map, &from_w).unwrap()["connections"]
        .as_u64()
        .unwrap();
    assert!(
        (3..=4).contains(&n),
        "{winner}'s 3 connections counted {n} times: {map}"
    );

    // The suggested policy: one rule app=web -> app=api on 7000, which `policy explain`
    // agrees allows web -> api on 7000 and not on 7001.
    let suggested = net
        .control_admin(&r1, &["policy", "suggest", "--group-by", "app"])
        .unwrap();
    let file = net.dir.join("suggested.yaml");
    fs::write(&file, &suggested).unwrap();
    let explain = |port: &str| {
        net.tessera(&[
            "policy",
            "explain",
            "--policy",
            file.to_str().unwrap(),
            "--from",
            "app=web,site=paris",
            "--to",
            "app=api",
            "--port",
            port,
        ])
        .unwrap()
    };
    let (on_7000, on_7001) = (explain("7000"), explain("7001"));
    assert!(
        on_7000.contains("decision: allow"),
        "explain 7000: {on_7000}\n{suggested}"
    );
    assert!(
        on_7001.contains("decision: deny"),
        "explain 7001: {on_7001}\n{suggested}"
    );
    // Under the policy in force, 7001 works (seen only now, after the suggestion).
    assert!(
        echo(&net, "host-a", 7001),
        "7001 refused under the broad policy"
    );
    // Applied through the other replica: what was seen still works, 7001 does not.
    apply(&net, &r2, "suggested-applied", &suggested).unwrap();
    assert!(
        converges(&net, &r2, true),
        "the suggested policy broke web -> api on 7000"
    );
    assert!(
        echo(&net, winner, 7000),
        "{winner} lost web -> api under the suggested policy"
    );
    assert!(
        eventually(Duration::from_secs(10), || !echo(&net, "host-a", 7001)),
        "a flow never seen (7001) is still allowed under the suggested policy"
    );
}
