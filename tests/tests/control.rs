//! The control plane end to end on test hosts: `tessera server` on a host of its own,
//! enforcers that start with only its address and a join token (or a cloud identity
//! document), a policy applied centrally, scope stamped from certificates, revocation cutting
//! live connections, single-use tokens, fail-static restarts without the server, and a
//! renewal under a long-lived connection.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    time::{Duration, Instant},
};

use serde_json::Value;
use tessera_proxy::flow::{Direction, Verdict};
use tessera_tests::{ControlServer, TestNet, eventually};

const T: Duration = Duration::from_secs(30);

/// web may reach api only from the Paris site: `site` is not something a workload or its
/// enforcer can claim, it comes from the enforcer's certificate.
const WEB_PARIS_TO_API: &str = "\
rules:
  - name: paris-web-to-api
    action: allow
    from: [{labels: [app=web, site=paris]}]
    to: [{labels: [app=api]}]
";

/// host-a (web), host-b (api, echo on 7000) and `control` (the server, no enforcer).
fn hosts(server_args: &[&str]) -> (TestNet, ControlServer) {
    let net = TestNet::with_plain_hosts(&["host-a", "host-b"], &["control"]).expect("test hosts");
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[7000])
        .unwrap();
    let srv = net
        .start_control(net.host("control"), server_args)
        .expect("control plane");
    (net, srv)
}

/// [`hosts`], host-a enrolled in `site=paris` and host-b in `site=london`, the echo server
/// up, the central policy applied and web -> api working.
fn working(server_args: &[&str]) -> (TestNet, ControlServer) {
    let (net, srv) = hosts(server_args);
    net.join(net.host("host-a"), &srv, "site=paris").unwrap();
    net.join(net.host("host-b"), &srv, "site=london").unwrap();
    net.start_enforcers().unwrap();
    net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", 7000)
        .unwrap();
    apply_policy(&net, &srv, WEB_PARIS_TO_API).unwrap();
    assert!(eventually(Duration::from_secs(10), || echo_ok(&net)));
    (net, srv)
}

fn echo_ok(net: &TestNet) -> bool {
    let out = net
        .run_tool(
            net.host("host-a"),
            Some("web"),
            &["echo-many", "10.77.0.2", "7000", "1"],
            T,
        )
        .unwrap();
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or(Value::Null);
    v["ok"] == 1
}

fn apply_policy(net: &TestNet, srv: &ControlServer, text: &str) -> anyhow::Result<String> {
    let file = net.dir.join(format!("central-{}.yaml", text.len()));
    fs::write(&file, text).unwrap();
    net.control_admin(srv, &["policy", "apply", file.to_str().unwrap()])
}

fn status(net: &TestNet, srv: &ControlServer) -> Value {
    serde_json::from_str(
        &net.control_admin(srv, &["server", "status", "--json"])
            .unwrap(),
    )
    .unwrap()
}

fn enforcer<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["enforcers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {status}"))
}

#[test]
fn enrolment_central_policy_scope_and_revocation() {
    let (net, srv) = hosts(&[]);
    net.join(net.host("host-a"), &srv, "site=paris").unwrap();
    net.join(net.host("host-b"), &srv, "site=london").unwrap();
    net.start_enforcers().unwrap();
    net.serve_tool(net.host("host-b"), Some("api"), "serve-echo", 7000)
        .unwrap();

    // Enrolled, but no policy yet: nothing is allowed.
    assert!(!echo_ok(&net), "no central policy yet: default deny");

    // A broken policy is refused with its position and changes nothing.
    let err = apply_policy(
        &net,
        &srv,
        "rules:\n  - name: x\n    action: allow\n    ports: [nope]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(":4:13:"), "{err}");

    // The policy applied centrally reaches both enforcers.
    let out = apply_policy(&net, &srv, WEB_PARIS_TO_API).unwrap();
    assert!(out.contains("version 1"), "{out}");
    assert!(
        eventually(Duration::from_secs(10), || echo_ok(&net)),
        "web@host-a -> api@host-b once the central policy is in force\n{}",
        net.enforcer_log(net.host("host-b"))
    );
    // host-b saw web with the scope of host-a's certificate, stamped: site=paris.
    let allowed = || {
        net.flows(net.host("host-b"))
            .into_iter()
            .find(|f| f.direction == Direction::Inbound && f.verdict == Verdict::Allowed)
    };
    assert!(eventually(Duration::from_secs(10), || allowed().is_some()));
    let seen = allowed().unwrap();
    assert_eq!(
        seen.src.labels.get("site").map(String::as_str),
        Some("paris")
    );
    assert_eq!(seen.rule.as_deref(), Some("paris-web-to-api"));

    // Status: both active, in their scopes, enforcing version 1, certificates valid.
    assert!(eventually(Duration::from_secs(10), || {
        let s = status(&net, &srv);
        ["host-a", "host-b"]
            .iter()
            .all(|n| enforcer(&s, n)["policy_version"] == 1)
    }));
    let s = status(&net, &srv);
    assert_eq!(enforcer(&s, "host-a")["scope"], "site=paris");
    assert_eq!(enforcer(&s, "host-b")["state"], "active");

    // Each enforcer had the directory before it served (its first snapshot comes before
    // start-up ends): a peer that saw it join was never refused as unknown.
    for h in ["host-a", "host-b"] {
        let unknown: Vec<_> = net
            .flows(net.host(h))
            .into_iter()
            .filter(|f| f.code.as_str() == "not-in-directory")
            .collect();
        assert!(unknown.is_empty(), "{h}: {unknown:?}");
    }

    // Revocation: a live connection from host-a is cut within about a second, and no new
    // one gets through.
    let holder = net
        .spawn_holder(net.host("host-a"), "web", "10.77.0.2", 7000)
        .unwrap();
    let t0 = Instant::now();
    net.control_admin(&srv, &["server", "enforcer", "revoke", "host-a"])
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            let log = fs::read_to_string(&holder).unwrap_or_default();
            log.contains("reset") || log.contains("eof")
        }),
        "the live connection of a revoked enforcer is cut:\n{}",
        fs::read_to_string(&holder).unwrap_or_default()
    );
    let cut = t0.elapsed();
    assert!(cut < Duration::from_secs(3), "cut after {cut:?}");
    assert!(
        !echo_ok(&net),
        "a revoked enforcer's connections are refused"
    );
    let refused = net
        .flows(net.host("host-b"))
        .into_iter()
        .filter(|f| f.code.as_str() == "not-in-directory")
        .count();
    assert!(refused > 0, "host-b records why host-a is refused");
    assert_eq!(enforcer(&status(&net, &srv), "host-a")["state"], "revoked");
}

#[test]
fn tokens_work_once_documents_once_per_instance_and_enforcers_fail_static() {
    let provider = std::env::temp_dir().join(format!("tessera-provider-{}", std::process::id()));
    let _ = fs::remove_dir_all(&provider);
    // The demo cloud: a provider key whose certificate the server trusts.
    let bin = tessera_tests::tessera_bin().unwrap();
    tessera_tests::sh(
        bin.to_str().unwrap(),
        &[
            "server",
            "document",
            "provider-init",
            provider.to_str().unwrap(),
        ],
    )
    .unwrap();
    let trust = provider.join("provider.pem");
    let (net, srv) = hosts(&[
        "--document-trust",
        trust.to_str().unwrap(),
        "--scope-tag",
        "site",
    ]);
    let (a, b) = (net.host("host-a"), net.host("host-b"));
    // host-a joins with a token; host-b tries the same token: refused, naming host-a.
    let token = net.join(a, &srv, "site=paris").unwrap();
    net.start_enforcer(a).unwrap();
    net.give_token(b, &fs::read_to_string(&token).unwrap())
        .unwrap();
    let err = net.start_enforcer(b).unwrap_err().to_string();
    assert!(err.contains("already used by enforcer host-a"), "{err}");

    // host-b enrols with a cloud instance identity document instead.
    let doc = net
        .tessera(&[
            "server",
            "document",
            "make",
            "--provider-key",
            provider.join("provider.key").to_str().unwrap(),
            "--instance",
            "i-0b",
            "--account",
            "111122223333",
            "--region",
            "eu-west-3",
            "--tag",
            "site=london",
        ])
        .unwrap();
    let doc_file = net.dir.join("host-b.document.json");
    fs::write(&doc_file, doc.trim()).unwrap();
    {
        let mut o = net.options.lock().unwrap();
        let c = o.control.as_mut().unwrap();
        c.tokens.remove("host-b");
        c.documents
            .insert("host-b".into(), (doc_file.clone(), "i-0b".into()));
    }
    let _ = fs::remove_dir_all(net.control_state(b));
    net.start_enforcer(b).unwrap();
    let s = status(&net, &srv);
    assert_eq!(
        enforcer(&s, "host-b")["scope"],
        "account=111122223333,region=eu-west-3,site=london"
    );
    net.serve_tool(b, Some("api"), "serve-echo", 7000).unwrap();
    apply_policy(&net, &srv, WEB_PARIS_TO_API).unwrap();
    assert!(eventually(Duration::from_secs(10), || echo_ok(&net)));

    // Everything cached is private.
    for host in [a, b] {
        let dir = net.control_state(host);
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o077, 0);
        for f in ["key.pem", "cert.pem", "policy.yaml", "directory.json"] {
            let mode = fs::metadata(dir.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{}/{f}: {mode:o}", dir.display());
        }
    }

    // The server goes away: enforcement goes on, and an enforcer restarted without it
    // comes up from its cache with the same directory and policy.
    net.stop_control(&srv).unwrap();
    assert!(echo_ok(&net), "enforcing while the server is down");
    net.stop_enforcer(b, false).unwrap();
    net.start_enforcer(b).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || echo_ok(&net)),
        "host-b restarted from its cache\n{}",
        net.enforcer_log(b)
    );
    assert!(
        net.enforcer_log(b)
            .contains("starting from the cached identity")
    );
    let _ = fs::remove_dir_all(&provider);
}

#[test]
fn a_renewal_under_a_long_connection_keeps_it_and_new_ones_use_the_new_certificate() {
    // 20-second certificates: renewed at about 10 s, the first one expired at 20 s.
    let (net, srv) = working(&["--lifetime", "20s"]);
    let first = enforcer(&status(&net, &srv), "host-a")["cert_serial"].clone();
    // A connection held for 20 s across the renewal (pings every 50 ms).
    let holder = net
        .spawn_holder(net.host("host-a"), "web", "10.77.0.2", 7000)
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || fs::read_to_string(&holder)
            .unwrap_or_default()
            .contains("still open")),
        "held across the renewal:\n{}",
        fs::read_to_string(&holder).unwrap_or_default()
    );
    let log = fs::read_to_string(&holder).unwrap();
    assert!(!log.contains("reset") && !log.contains("eof"), "{log}");
    for h in ["host-a", "host-b"] {
        assert!(
            net.enforcer_log(net.host(h))
                .contains("certificate renewed"),
            "{h} renewed"
        );
    }
    assert_ne!(
        enforcer(&status(&net, &srv), "host-a")["cert_serial"],
        first
    );
    // Past the first certificate's end: new connections work on the renewed one.
    assert!(
        echo_ok(&net),
        "a new connection after the first certificate expired"
    );
}

#[test]
fn a_rogue_enforcer_cannot_claim_outside_its_scope_or_for_another_enforcer() {
    let (net, srv) = hosts(&[]);
    net.join(net.host("host-a"), &srv, "site=paris,tenant=acme")
        .unwrap();
    net.join(net.host("host-b"), &srv, "site=paris,tenant=acme")
        .unwrap();
    net.start_enforcers().unwrap();
    net.serve_tool(net.host("host-b"), Some("api"), "serve-blast", 7000)
        .unwrap();
    apply_policy(&net, &srv, WEB_PARIS_TO_API).unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        enforcer(&status(&net, &srv), "host-b")["policy_version"] == 1
    }));
    // host-a compromised: its own (valid, in scope) certificate and key, speaking the
    // tunnel protocol with claims of its choosing.
    let state = net.control_state(net.host("host-a"));
    let rogue = net
        .rogue_peer(
            env!("CARGO_BIN_EXE_rogue_peer"),
            net.host("host-a"),
            [
                &state.join("ca.pem"),
                &state.join("cert.pem"),
                &state.join("key.pem"),
            ],
            net.host("host-b"),
            7000,
            Some("site=london;tenant=globex;site=paris"),
        )
        .expect("rogue peer");
    let stdout = &rogue.stdout;
    // In scope (and repeating its own scope): accepted.
    assert_eq!(rogue.answer("valid")["status"], "Connected", "{stdout}");
    assert_eq!(
        rogue.answer("claim:site=paris")["status"],
        "Connected",
        "{stdout}"
    );
    // Another site, another tenant: refused as out of scope; another enforcer's workload:
    // refused as foreign.
    for case in ["claim:site=london", "claim:tenant=globex"] {
        let a = rogue.answer(case);
        assert_ne!(a["status"], "Connected", "{case}: {stdout}");
        assert!(
            a["reason"]
                .as_str()
                .is_some_and(|r| r.contains("out-of-scope")),
            "{case}: {a}"
        );
    }
    assert!(
        rogue.answer("foreign")["reason"]
            .as_str()
            .is_some_and(|r| r.contains("foreign-identity"))
    );
    // host-b recorded each refusal with its code (its flow writer batches: wait for them).
    let out_of_scope = net.wait_flows(net.host("host-b"), 2, |f| f.code.as_str() == "out-of-scope");
    let codes: Vec<String> = net
        .flows(net.host("host-b"))
        .iter()
        .map(|f| f.code.as_str().to_string())
        .collect();
    assert_eq!(out_of_scope.len(), 2, "{codes:?}");
}

#[test]
fn an_expired_certificate_fails_closed() {
    // 20-second certificates, and the server gone before anyone renews.
    let (net, srv) = working(&["--lifetime", "20s"]);
    net.stop_control(&srv).unwrap();
    let stopped = Instant::now();
    // Fail static while the certificates are valid...
    assert!(echo_ok(&net), "enforcing on while the server is away");
    // ...and closed once they expire without renewal.
    assert!(
        eventually(Duration::from_secs(40), || !echo_ok(&net)),
        "new connections refused after the certificates expired"
    );
    assert!(stopped.elapsed() > Duration::from_secs(2));
    assert!(
        net.enforcer_log(net.host("host-a"))
            .contains("certificate renewal failed")
    );
}

#[test]
fn handshake_mode_follows_the_directory_while_running() {
    let (net, srv) = hosts(&[]);
    net.options.lock().unwrap().handshake = true;
    let (a, b) = (net.host("host-a"), net.host("host-b"));
    // host-b first: it learns of host-a only from the directory, while running.
    net.join(b, &srv, "site=london").unwrap();
    net.start_enforcer(b).unwrap();
    net.serve_tool(b, Some("api"), "serve-echo", 7000).unwrap();
    apply_policy(&net, &srv, WEB_PARIS_TO_API).unwrap();
    net.join(a, &srv, "site=paris").unwrap();
    net.start_enforcer(a).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || echo_ok(&net)),
        "web@host-a -> api@host-b in handshake mode, host-b never restarted\n{}",
        net.enforcer_log(b)
    );
    // (Handshake mode writes a record when its connection ends.)
    let allowed = || {
        net.flows(b)
            .into_iter()
            .find(|f| f.direction == Direction::Inbound && f.verdict == Verdict::Allowed)
    };
    assert!(eventually(Duration::from_secs(10), || allowed().is_some()));
    let seen = allowed().unwrap();
    assert_eq!(
        seen.src.labels.get("site").map(String::as_str),
        Some("paris")
    );
    // Revoked: host-b forgets host-a's routes and keys; its handshakes are refused.
    net.control_admin(&srv, &["server", "enforcer", "revoke", "host-a"])
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !echo_ok(&net)),
        "a revoked enforcer's handshakes are refused"
    );
}

/// Whether `host`'s enforcer put in force the directory change its control agent logged
/// with `event` (`"joined or changed"`, `"removed"`) for `peer`: a "directory in force"
/// line follows the last such event.
fn directory_applied(net: &TestNet, host: &str, event: &str, peer: &str) -> bool {
    let log = net.enforcer_log(net.host(host));
    let lines: Vec<&str> = log.lines().collect();
    let seen = lines
        .iter()
        .rposition(|l| l.contains(&format!("directory: enforcer {event}")) && l.contains(peer));
    seen.is_some_and(|i| lines[i..].iter().any(|l| l.contains("directory in force")))
}

/// Runs `n` echo connections from web on `from` to api; returns how many succeeded and the
/// packets host-b's and `from`'s NFQUEUE queues took meanwhile.
fn echo_counting(net: &TestNet, from: &str, n: usize) -> (u64, u64, u64) {
    let (f, b) = (net.host(from), net.host("host-b"));
    let before = (net.queued(f), net.queued(b));
    let out = net
        .run_tool(
            f,
            Some("web"),
            &["echo-many", "10.77.0.2", "7000", &n.to_string()],
            T,
        )
        .unwrap();
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or(Value::Null);
    let ok = v["ok"].as_u64().unwrap_or(0);
    (ok, net.queued(f) - before.0, net.queued(b) - before.1)
}

/// Connects web on `from` to api until a connection takes the fast path (no packet through
/// either host's queues), within 15 s.
fn warm(net: &TestNet, from: &str) {
    assert!(
        eventually(Duration::from_secs(15), || echo_counting(net, from, 1)
            == (1, 0, 0)),
        "web@{from} -> api@host-b never took the fast path\n{}",
        net.enforcer_log(net.host("host-b"))
    );
}

/// Handshake mode's fast path under a changing directory: a change that does not concern a
/// warm pair (a third enforcer joining, then revoked) leaves it warm, every connection
/// proven in the kernel with no packet through the queues at either end; the revoked
/// enforcer's own pair loses its keys at once (its next connection is refused) and its live
/// connection is cut. Revoking every key on every directory change (the old way) sent the
/// unconcerned pair back to the full handshake at each change.
#[test]
fn a_directory_change_revokes_only_the_fast_path_keys_of_the_peer_it_concerns() {
    let net = TestNet::with_plain_hosts(&["host-a", "host-b", "host-c"], &["control"])
        .expect("test hosts");
    net.options.lock().unwrap().handshake = true;
    net.add_workload(net.host("host-a"), "web", &[("app", "web")], &[])
        .unwrap();
    net.add_workload(net.host("host-b"), "api", &[("app", "api")], &[7000])
        .unwrap();
    net.add_workload(net.host("host-c"), "web", &[("app", "web")], &[])
        .unwrap();
    let srv = net
        .start_control(net.host("control"), &[])
        .expect("control plane");
    let (a, b, c) = (net.host("host-a"), net.host("host-b"), net.host("host-c"));
    net.join(a, &srv, "site=paris").unwrap();
    net.join(b, &srv, "site=london").unwrap();
    net.start_enforcer(a).unwrap();
    net.start_enforcer(b).unwrap();
    net.serve_tool(b, Some("api"), "serve-echo", 7000).unwrap();
    apply_policy(&net, &srv, WEB_PARIS_TO_API).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || echo_ok(&net)),
        "web@host-a -> api@host-b in handshake mode\n{}",
        net.enforcer_log(b)
    );
    // The first connection took the full handshake through the queues (the counters
    // count); then the pair is warm.
    assert!(net.queued(a) > 0 && net.queued(b) > 0);
    warm(&net, "host-a");

    // A third enforcer joins: a directory change at both ends that concerns not them.
    net.join(c, &srv, "site=paris").unwrap();
    net.start_enforcer(c).unwrap();
    for h in ["host-a", "host-b"] {
        assert!(
            eventually(Duration::from_secs(15), || directory_applied(
                &net,
                h,
                "joined or changed",
                "host-c"
            )),
            "{h} never applied host-c's arrival\n{}",
            net.enforcer_log(net.host(h))
        );
    }
    for round in 0..3 {
        assert_eq!(
            echo_counting(&net, "host-a", 4),
            (4, 0, 0),
            "round {round} after host-c joined: the warm pair's connections went through the \
             queues (its keys were revoked by a change that does not concern it)\n{}",
            net.enforcer_log(b)
        );
    }

    // host-c's own pair gets warm, with a connection held open on it.
    warm(&net, "host-c");
    let holder = net.spawn_holder(c, "web", "10.77.0.2", 7000).unwrap();

    // host-c revoked: its pair's keys go at once (and its live connection is cut); host-a's
    // pair stays warm.
    net.control_admin(&srv, &["server", "enforcer", "revoke", "host-c"])
        .unwrap();
    assert!(
        eventually(Duration::from_secs(15), || directory_applied(
            &net, "host-b", "removed", "host-c"
        )),
        "host-b never applied host-c's revocation\n{}",
        net.enforcer_log(b)
    );
    let (ok, _, _) = echo_counting(&net, "host-c", 1);
    assert_eq!(
        ok,
        0,
        "a revoked enforcer's warm pair was let through after the directory dropped it\n{}",
        net.enforcer_log(b)
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            let log = fs::read_to_string(&holder).unwrap_or_default();
            log.contains("reset") || log.contains("eof")
        }),
        "the revoked enforcer's live connection is still open:\n{}",
        fs::read_to_string(&holder).unwrap_or_default()
    );
    assert!(
        eventually(Duration::from_secs(15), || directory_applied(
            &net, "host-a", "removed", "host-c"
        )),
        "host-a never applied host-c's revocation\n{}",
        net.enforcer_log(a)
    );
    for round in 0..3 {
        assert_eq!(
            echo_counting(&net, "host-a", 4),
            (4, 0, 0),
            "round {round} after host-c was revoked: the warm pair's connections went through \
             the queues\n{}",
            net.enforcer_log(b)
        );
    }
}

/// statsd from web (Paris) to api (London) over UDP: workloads on two enforcers, named by
/// labels at both ends. Packets carry no token, so each end turns the other side into the
/// addresses the directory says its enforcer serves, with the scope from certificates.
const UDP_BETWEEN_WORKLOADS: &str = "\
rules:
  - name: paris-web-statsd-to-london-api
    action: allow
    protocol: udp
    from: [{labels: [app=web, site=paris]}]
    to: [{labels: [app=api, site=london]}]
    ports: [8125]
";

/// The same with the sites swapped: neither enforcer's scope fits, whatever its workloads'
/// labels say.
const UDP_WRONG_SITES: &str = "\
rules:
  - name: london-web-statsd-to-paris-api
    action: allow
    protocol: udp
    from: [{labels: [app=web, site=london]}]
    to: [{labels: [app=api, site=paris]}]
    ports: [8125]
";

#[test]
fn udp_between_workloads_follows_the_directory_scopes_and_revocation() {
    let (net, srv) = hosts(&[]);
    let (a, b) = (net.host("host-a"), net.host("host-b"));
    net.join(a, &srv, "site=paris").unwrap();
    net.join(b, &srv, "site=london").unwrap();
    net.start_enforcers().unwrap();
    let log = net.udp_listener("host-b", Some("api"), 8125);
    let arrived = |text: &str| fs::read_to_string(&log).unwrap_or_default().contains(text);
    // Sends `tag N` from web until one arrives (true) or `within` passes (false).
    let send_until = |tag: &str, within: Duration| {
        let mut n = 0;
        eventually(within, || {
            n += 1;
            net.nc_udp(
                "host-a",
                Some("web"),
                "10.77.0.2",
                8125,
                &format!("{tag} {n}"),
            );
            arrived(&format!("got {tag} "))
        })
    };

    // No rule yet: both ends deny.
    assert!(
        !send_until("before", Duration::from_secs(3)),
        "a datagram arrived before any udp rule"
    );
    // The central policy names workloads by labels: in force at both ends.
    apply_policy(&net, &srv, UDP_BETWEEN_WORKLOADS).unwrap();
    assert!(
        send_until("statsd", Duration::from_secs(15)),
        "web's datagram never reached api: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        fs::read_to_string(&log).unwrap().contains("from 10.77.0.1"),
        "api did not see web's host as the sender"
    );
    // Recorded at the receiving end with the rule that allowed it.
    assert!(
        eventually(Duration::from_secs(10), || net.flows(b).iter().any(|f| {
            f.protocol == tessera_proxy::flow::Protocol::Udp
                && f.verdict == Verdict::Allowed
                && f.direction == Direction::Inbound
                && f.rule.as_deref() == Some("paris-web-statsd-to-london-api")
                && f.dst.workload.as_deref() == Some("api")
        })),
        "no allowed inbound udp record on host-b: {:?}",
        net.flows(b)
    );
    // The fleet's map has the UDP edge as UDP, and a policy suggested from it allows it
    // with a udp rule. (Datagrams carry no token: the receiver names the sender by its
    // address, so the suggestion does too.)
    let mut map = Value::Null;
    assert!(
        eventually(Duration::from_secs(20), || {
            map = serde_json::from_str(
                &net.control_admin(&srv, &["map", "--format", "json"])
                    .unwrap(),
            )
            .unwrap();
            map["edges"].as_array().unwrap().iter().any(|e| {
                e["protocol"] == "udp"
                    && e["port"] == 8125
                    && e["dst"] == "api@host-b"
                    && e["verdict"] == "allowed"
            })
        }),
        "no udp edge to api:8125 in the fleet map: {map}"
    );
    let suggested = net
        .control_admin(&srv, &["policy", "suggest", "--group-by", "app"])
        .unwrap();
    assert!(
        suggested.contains("protocol: udp") && suggested.contains("ports: [8125]"),
        "{suggested}\nfrom {map}"
    );
    // A host the directory does not list for web gets nothing through to api.
    net.nc_udp("control", None, "10.77.0.2", 8125, "outsider");
    assert!(
        !tessera_tests::wait_for(&log, "got outsider", Duration::from_secs(2)),
        "a datagram from a host without web reached api"
    );

    // Scopes come from certificates: with the sites swapped nothing matches.
    apply_policy(&net, &srv, UDP_WRONG_SITES).unwrap();
    thread_sleep_for_policy();
    assert!(
        !send_until("swapped", Duration::from_secs(4)),
        "a udp rule for other sites let web's datagram through"
    );

    // Back to the right rule; then revoking host-a takes its addresses out of api's rule.
    apply_policy(&net, &srv, UDP_BETWEEN_WORKLOADS).unwrap();
    assert!(
        send_until("again", Duration::from_secs(15)),
        "the restored rule did not let web's datagram through"
    );
    net.control_admin(&srv, &["server", "enforcer", "revoke", "host-a"])
        .unwrap();
    thread_sleep_for_policy();
    assert!(
        !send_until("revoked", Duration::from_secs(4)),
        "a revoked enforcer's workload still reaches api over udp"
    );
}

/// The directory and the policy reach both ends within about a second; the non-TCP maps
/// follow them every 500 ms.
fn thread_sleep_for_policy() {
    std::thread::sleep(Duration::from_secs(2));
}

/// Two enforcers started at the same moment with one join token: exactly one enrols; the
/// other is refused, naming the winner.
#[test]
fn two_enforcers_racing_with_one_token_exactly_one_enrols() {
    let (net, srv) = hosts(&[]);
    let (a, b) = (net.host("host-a"), net.host("host-b"));
    let token = net.join(a, &srv, "site=paris").unwrap();
    net.give_token(b, &fs::read_to_string(&token).unwrap())
        .unwrap();
    let (ra, rb) = net.start_enforcers_racing(a, b);
    let (winner, loser) = match (&ra, &rb) {
        (Ok(()), Err(e)) => ("host-a", e),
        (Err(e), Ok(())) => ("host-b", e),
        _ => panic!("not exactly one enrolment: host-a {ra:?}, host-b {rb:?}"),
    };
    assert!(
        loser.contains(&format!("already used by enforcer {winner}")),
        "{loser}"
    );
    let st = status(&net, &srv);
    assert_eq!(
        st["enforcers"].as_array().unwrap().len(),
        1,
        "two enforcers registered: {st}"
    );
    assert_eq!(enforcer(&st, winner)["state"], "active");
}

/// The fleet's map at the control plane: both enforcers send their own maps, the server
/// merges them (a connection both ends saw counts once), names every edge's reporters by
/// their certificates, and still serves it after a restart.
#[test]
fn the_fleet_map_merges_both_ends_once_and_survives_a_server_restart() {
    let (net, srv) = working(&[]);
    let out = net
        .run_tool(
            net.host("host-a"),
            Some("web"),
            &["echo-many", "10.77.0.2", "7000", "5"],
            T,
        )
        .unwrap();
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert_eq!(v["ok"], 5, "{v}");
    // Refused at host-b: a connection of an unenrolled process, recorded by host-b only.
    let fleet = |net: &TestNet, srv: &ControlServer| -> Value {
        serde_json::from_str(
            &net.control_admin(srv, &["map", "--format", "json"])
                .unwrap(),
        )
        .unwrap()
    };
    let allowed = |m: &Value| -> Option<Value> {
        m["edges"]
            .as_array()?
            .iter()
            .find(|e| {
                e["src"] == "web@host-a"
                    && e["dst"] == "api@host-b"
                    && e["port"] == 7000
                    && e["verdict"] == "allowed"
            })
            .cloned()
    };
    // Both enforcers report within their report interval (2 s in tests); the echo
    // connections count once, whatever each end counted (echo_ok's own connection too).
    let mut seen = Value::Null;
    assert!(
        eventually(Duration::from_secs(20), || {
            seen = fleet(&net, &srv);
            allowed(&seen).is_some_and(|e| e["reporters"].as_array().map_or(0, Vec::len) == 2)
        }),
        "the fleet map has no edge web -> api reported by both ends: {seen}"
    );
    let edge = allowed(&seen).unwrap();
    let n = edge["connections"].as_u64().unwrap();
    assert!((5..=7).contains(&n), "counted {n} connections: {edge}");
    assert_eq!(edge["reporters"], serde_json::json!(["host-a", "host-b"]));
    assert_eq!(edge["rules"], serde_json::json!(["paris-web-to-api"]));
    // The table form names the same edge.
    let table = net.control_admin(&srv, &["map"]).unwrap();
    assert!(
        table.contains("web@host-a") && table.contains("api@host-b"),
        "{table}"
    );
    // Without the administrator token: refused.
    let bin = tessera_tests::tessera_bin().unwrap();
    let no_token = net
        .run(
            net.host("control"),
            None,
            bin.to_str().unwrap(),
            &[
                "map",
                "--server",
                &srv.url,
                "--ca",
                srv.state.join("ca.pem").to_str().unwrap(),
                "--admin-token-file",
                "/nonexistent",
            ],
            T,
        )
        .unwrap();
    assert!(!no_token.status.success());

    // New edges: a process outside any workload on host-a tries api (refused at host-b),
    // after web's connections. With a baseline of an hour nothing is new; with none, that
    // refusal is (the map's first edge, web -> api, is not).
    std::thread::sleep(Duration::from_millis(20));
    let _ = net.run_tool(
        net.host("host-a"),
        None,
        &["echo-many", "10.77.0.2", "7000", "1"],
        T,
    );
    let refused = |m: &Value| -> Option<Value> {
        m["edges"]
            .as_array()?
            .iter()
            .find(|e| e["dst"] == "api@host-b" && e["verdict"] == "denied")
            .cloned()
    };
    let marked = |window: &str| -> Value {
        serde_json::from_str(
            &net.control_admin(&srv, &["map", "--format", "json", "--new-after", window])
                .unwrap(),
        )
        .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(20), || refused(&marked("1h")).is_some()),
        "host-b's refusal never reached the fleet map: {}",
        marked("1h")
    );
    assert!(
        !marked("1h").to_string().contains("\"new\""),
        "an edge marked new within the first hour"
    );
    let m = marked("0s");
    assert_eq!(refused(&m).unwrap()["new"], true, "{m}");
    assert!(allowed(&m).unwrap().get("new").is_none(), "{m}");

    // A policy suggested from what was seen: it parses, covers web -> api on 7000, and says
    // the policy in force already allows it (rule paris-web-to-api).
    let suggested = net
        .control_admin(&srv, &["policy", "suggest", "--group-by", "app"])
        .unwrap();
    assert!(
        suggested.contains("labels: [\"app=web\"]")
            && suggested.contains("labels: [\"app=api\"]")
            && suggested.contains("ports: [7000]")
            && suggested.contains("in force already: allowed by paris-web-to-api"),
        "{suggested}"
    );
    let file = net.dir.join("suggested.yaml");
    fs::write(&file, &suggested).unwrap();
    net.tessera(&["policy", "check", file.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("the suggested policy does not check: {e}\n{suggested}"));

    // A restart of the server: the map is still there (from the store), unchanged.
    net.stop_control(&srv).unwrap();
    let srv = net.start_control(net.host("control"), &[]).unwrap();
    // (its last-seen may have moved on: a record that closed a connection came later.)
    let stable = |e: &Value| {
        [
            "src",
            "dst",
            "port",
            "verdict",
            "connections",
            "reporters",
            "rules",
            "first_seen_ms",
        ]
        .map(|k| e[k].clone())
    };
    let after = fleet(&net, &srv);
    let again = allowed(&after).unwrap_or_else(|| panic!("gone after a restart: {after}"));
    assert_eq!(stable(&again), stable(&edge), "{after}");
}
