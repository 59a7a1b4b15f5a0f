//! End-to-end tests of containers enrolled as podman starts them (`[containers]`): real
//! containers from an image imported from Debian's busybox-static, in a test host's
//! network namespace, under a parent cgroup the enforcer captures; their identity from
//! podman's API (labels, name, image, image digest), never from what they claim.
//!
//! * a container's very first instruction connects, and is already under policy (allowed
//!   when its labels say so, denied otherwise), recorded with the image's real digest;
//! * forged `tessera.io/` labels give way to the runtime's truth;
//! * a container without the labels `select` asks for is refused every connection;
//! * a container stopped is unenrolled; one running when the enforcer starts is enrolled;
//! * with the runtime's API away, a new container's connections are refused (fail closed).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tessera_enforcer::config::Containers;
use tessera_proxy::{
    code::Code,
    flow::{Direction, FlowRecord, Verdict},
};
use tessera_tests::{Podman, TestNet, eventually};

const T: Duration = Duration::from_secs(60);

const POLICY: &str = "\
rules:
  - name: clients-to-web
    action: allow
    from: [{labels: [app=client]}]
    to: [{labels: [app=web]}]
  - name: web-to-store
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=store]}]
";

/// host-a: containers under its parent cgroup (those labelled team=blue enrolled); host-b:
/// `web` (app=web) serving http on 8080. Enforcers started with [`POLICY`].
fn setup() -> (TestNet, PathBuf) {
    let net = TestNet::new(&["host-a", "host-b"]).expect("test hosts");
    net.add_workload(net.host("host-b"), "web", &[("app", "web")], &[8080])
        .unwrap();
    let parent = net.cgroup(net.host("host-a"), Some("containers"));
    net.write_policy(None, POLICY).unwrap();
    std::fs::write(net.dir.join("index.html"), "hello from web\n").unwrap();
    net.serve_http(net.host("host-b"), Some("web"), "0.0.0.0", 8080, &net.dir)
        .unwrap();
    (net, parent)
}

/// podman for `net`, and host-a's enforcer following it for containers under `parent`
/// (handshake mode if asked), not yet started.
fn follow_podman(net: &TestNet, parent: &Path, handshake: bool) -> Podman {
    let podman = Podman::start(net).expect("podman");
    let mut opts = net.options.lock().unwrap();
    opts.handshake = handshake;
    opts.containers
        .insert("host-a".into(), containers(&podman, parent));
    podman
}

fn containers(podman: &Podman, parent: &Path) -> Containers {
    Containers {
        select: BTreeMap::from([("team".to_string(), "blue".to_string())]),
        wait_ms: 3_000,
        ports: vec![9000, 9001],
        ..podman.section(parent)
    }
}

/// An HTTP GET of web's page with busybox's `nc` (Debian's busybox `wget` crashes on its
/// own, outside any container too).
const GET: [&str; 3] = [
    "sh",
    "-c",
    "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 10 10.77.0.2 8080",
];

/// The page fetched by the container's first and only process.
fn fetch(
    podman: &Podman,
    net: &TestNet,
    parent: &Path,
    name: &str,
    labels: &[(&str, &str)],
) -> bool {
    let out = podman
        .run(net.host("host-a"), parent, name, labels, &GET, T)
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "container {name}: {} stdout {body:?} stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    body.contains("hello from web")
}

fn of(name: &str) -> impl Fn(&FlowRecord) -> bool + '_ {
    move |f| {
        f.src
            .labels
            .get("tessera.io/container-name")
            .map(String::as_str)
            == Some(name)
    }
}

#[test]
fn containers_are_under_policy_from_their_first_instruction_with_the_runtimes_identity() {
    let (net, parent) = setup();
    let podman = follow_podman(&net, &parent, false);
    net.start_enforcers().unwrap();
    let digest = podman.image_digest().unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let name = |s: &str| format!("{}-{s}", net.id);

    // Allowed: labels app=client, team=blue — and forged tessera.io/ labels.
    let forged = format!("sha256:{}", "0".repeat(64));
    let allowed = name("client");
    assert!(
        fetch(
            &podman,
            &net,
            &parent,
            &allowed,
            &[
                ("app", "client"),
                ("team", "blue"),
                ("tessera.io/image-digest", &forged),
                ("tessera.io/workload", "web"),
                ("tessera.io/container-name", "someone-else"),
            ],
        ),
        "the allowed container's first connection failed; host-a log:\n{}",
        net.enforcer_log(net.host("host-a"))
    );
    // Both ends recorded it with the runtime's truth.
    for host in ["host-a", "host-b"] {
        let recs = net.wait_flows(net.host(host), 1, |f| {
            of(&allowed)(f) && f.verdict == Verdict::Allowed
        });
        assert_eq!(recs.len(), 1, "{host}: {:?}", net.flows(net.host(host)));
        let l = &recs[0].src.labels;
        assert_eq!(l["tessera.io/image-digest"], digest, "{host}: {l:?}");
        assert_eq!(l["tessera.io/image"], podman.image, "{host}");
        assert_eq!(
            l["tessera.io/workload"], allowed,
            "{host}: forged workload name won"
        );
        assert_eq!(l["tessera.io/container-runtime"], "podman", "{host}");
        assert_eq!(l["app"], "client");
        assert_eq!(l["tessera.io/enforcer"], "host-a");
        assert!(
            l["tessera.io/cgroup"].contains("/containers/libpod-"),
            "{l:?}"
        );
        assert_eq!(recs[0].src.workload.as_deref(), Some(allowed.as_str()));
    }
    let inbound = net.wait_flows(net.host("host-b"), 1, of(&allowed));
    assert_eq!(inbound[0].direction, Direction::Inbound);

    // Denied by policy (app=other), at its first instruction too: recorded by host-a with
    // its identity (so it was captured and identified), never let through by web's end.
    let denied = name("other");
    assert!(!fetch(
        &podman,
        &net,
        &parent,
        &denied,
        &[("app", "other"), ("team", "blue")]
    ));
    let recs = net.wait_flows(net.host("host-a"), 1, of(&denied));
    assert_eq!(recs.len(), 1, "{:?}", net.flows(net.host("host-a")));
    assert_eq!(recs[0].verdict, Verdict::Denied);
    assert_eq!(recs[0].code, Code::Policy);
    assert_eq!(recs[0].src.labels["tessera.io/image-digest"], digest);
    assert!(
        net.flows(net.host("host-b"))
            .iter()
            .filter(|f| of(&denied)(f))
            .all(|f| f.verdict == Verdict::Denied),
        "a denied container reached web"
    );

    // Not selected (no team=blue): refused, whatever policy would say of app=client.
    let unselected = name("stranger");
    assert!(!fetch(
        &podman,
        &net,
        &parent,
        &unselected,
        &[("app", "client")]
    ));
    let refused = net.wait_flows(net.host("host-a"), 1, |f| {
        f.code == Code::NoCapture && f.direction == Direction::Outbound
    });
    assert_eq!(refused.len(), 1, "{:?}", net.flows(net.host("host-a")));
    assert_eq!(refused[0].verdict, Verdict::Error);
    assert!(
        refused[0].reason.contains(&unselected)
            && refused[0]
                .reason
                .contains("was not started with the label team=blue"),
        "the record does not say why: {:?}",
        refused[0].reason
    );
    // Labels its image's author set do not count: an image labelled team=blue, app=client
    // run without those labels is not selected.
    let labelled = podman
        .image_with_labels(&net, &[("team", "blue"), ("app", "client")])
        .unwrap();
    let authored = name("authored");
    let out = podman
        .run_image(
            &labelled,
            net.host("host-a"),
            &parent,
            &authored,
            &[],
            &GET,
            T,
        )
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("hello from web"));
    let refused = net.wait_flows(net.host("host-a"), 1, |f| {
        f.code == Code::NoCapture && f.reason.contains(&authored)
    });
    assert_eq!(refused.len(), 1, "{:?}", net.flows(net.host("host-a")));
    assert!(
        refused[0].reason.contains("team=blue"),
        "{}",
        refused[0].reason
    );
    let web_served = net
        .flows(net.host("host-b"))
        .iter()
        .filter(|f| f.verdict == Verdict::Allowed)
        .count();
    assert_eq!(web_served, 1, "only the allowed container reached web");
}

#[test]
fn containers_are_enrolled_while_they_run_and_unenrolled_when_they_stop() {
    let (net, parent) = setup();
    let podman = follow_podman(&net, &parent, false);
    // Started before the enforcer: found by listing what runs.
    let early = format!("{}-early", net.id);
    podman
        .start_detached(
            net.host("host-a"),
            &parent,
            &early,
            &[("app", "client"), ("team", "blue")],
            &["sleep", "600"],
        )
        .unwrap();
    net.start_enforcers().unwrap();
    let log = |net: &TestNet| net.enforcer_log(net.host("host-a"));
    assert!(
        eventually(T, || log(&net).contains(&format!("workload=\"{early}\""))
            || log(&net).contains(&format!("workload={early}"))),
        "the running container was not enrolled:\n{}",
        log(&net)
    );
    let out = podman.exec(&early, &GET).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello from web"),
        "exec in the running container: {out:?}"
    );
    let recs = net.wait_flows(net.host("host-b"), 1, of(&early));
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].verdict, Verdict::Allowed);

    // Stopped: unenrolled (the runtime's events say so).
    podman.remove(&early).unwrap();
    assert!(
        eventually(T, || log(&net).contains("workload unenrolled")),
        "not unenrolled:\n{}",
        log(&net)
    );

    // The enforcer restarts while a container runs: enrolled again by the listing.
    let late = format!("{}-late", net.id);
    podman
        .start_detached(
            net.host("host-a"),
            &parent,
            &late,
            &[("app", "client"), ("team", "blue")],
            &["sleep", "600"],
        )
        .unwrap();
    let enrolled = |net: &TestNet| {
        log(net)
            .lines()
            .filter(|l| l.contains("workload enrolled") && l.contains(late.as_str()))
            .count()
    };
    assert!(eventually(T, || enrolled(&net) >= 1), "{}", log(&net));
    let before = enrolled(&net);
    net.stop_enforcer(net.host("host-a"), false).unwrap();
    net.start_enforcer(net.host("host-a")).unwrap();
    // Enrolled by the new run's listing, before any connection of it asks.
    assert!(
        eventually(T, || enrolled(&net) > before),
        "the running container was not enrolled by the listing after the restart:\n{}",
        log(&net)
    );
    let out = podman.exec(&late, &GET).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello from web"),
        "after the enforcer's restart: {out:?}"
    );
    assert_eq!(net.wait_flows(net.host("host-b"), 1, of(&late)).len(), 1);
}

#[test]
fn without_the_runtimes_api_new_containers_are_refused() {
    let (net, parent) = setup();
    let mut podman = follow_podman(&net, &parent, false);
    net.start_enforcers().unwrap();
    podman.stop_service();
    let name = format!("{}-blind", net.id);
    let started = Instant::now();
    assert!(!fetch(
        &podman,
        &net,
        &parent,
        &name,
        &[("app", "client"), ("team", "blue")]
    ));
    let refused = net.wait_flows(net.host("host-a"), 1, |f| f.code == Code::NoCapture);
    assert_eq!(refused.len(), 1, "{:?}", net.flows(net.host("host-a")));
    assert!(
        refused[0].reason.contains("did not say who is in"),
        "{:?}",
        refused[0].reason
    );
    assert!(started.elapsed() < T);
    assert!(
        net.flows(net.host("host-b"))
            .iter()
            .all(|f| f.verdict != Verdict::Allowed),
        "a container nobody could identify reached web"
    );
}

#[test]
fn a_container_serves_the_ports_its_runtime_says_it_exposes_under_policy() {
    let (net, parent) = setup();
    let podman = follow_podman(&net, &parent, false);
    net.start_enforcers().unwrap();
    let store = format!("{}-store", net.id);
    podman
        .start_exposing(
            net.host("host-a"),
            &parent,
            &store,
            &[
                ("app", "store"),
                ("team", "blue"),
                ("tessera.ports", "9000"),
            ],
            &[9000],
            &["httpd", "-f", "-p", "9000", "-h", "/www"],
        )
        .unwrap();
    let digest = podman.image_digest().unwrap();
    // web on host-b may reach the store (policy), through Tessera: the record at host-a
    // names the container as the destination, with its image's digest.
    let got = || {
        net.curl("host-b", Some("web"), "http://10.77.0.1:9000/index.html")
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("hello from a container"))
            .unwrap_or(false)
    };
    assert!(
        eventually(T, got),
        "web could not reach the container; host-a log:\n{}",
        net.enforcer_log(net.host("host-a"))
    );
    let recs = net.wait_flows(net.host("host-a"), 1, |f| {
        f.direction == Direction::Inbound && f.verdict == Verdict::Allowed
    });
    assert!(!recs.is_empty(), "{:?}", net.flows(net.host("host-a")));
    let dst = &recs[0].dst.labels;
    assert_eq!(dst["tessera.io/container-name"], store, "{dst:?}");
    assert_eq!(dst["tessera.io/image-digest"], digest);
    assert_eq!(recs[0].dst.workload.as_deref(), Some(store.as_str()));

    // A process of host-b outside any workload: no identity, refused by host-a (the port
    // is protected although no configured workload serves it).
    let out = net
        .curl("host-b", None, "http://10.77.0.1:9000/index.html")
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("hello"),
        "an unauthenticated client reached the container"
    );
    // A protected port no container exposes: not served.
    let out = net
        .curl("host-b", Some("web"), "http://10.77.0.1:9001/")
        .unwrap();
    assert!(!out.status.success());
    let not_served = net.wait_flows(net.host("host-a"), 1, |f| {
        f.code == Code::NotServed && f.dst.addr.port() == 9001
    });
    assert_eq!(not_served.len(), 1, "{:?}", net.flows(net.host("host-a")));

    // Stopped: its port is served by nobody.
    podman.remove(&store).unwrap();
    assert!(eventually(T, || {
        net.enforcer_log(net.host("host-a"))
            .contains("workload unenrolled")
    }));
    let before = net
        .flows(net.host("host-a"))
        .iter()
        .filter(|f| f.code == Code::NotServed)
        .count();
    let _ = net.curl("host-b", Some("web"), "http://10.77.0.1:9000/index.html");
    assert_eq!(
        net.wait_flows(net.host("host-a"), before + 1, |f| f.code
            == Code::NotServed)
            .len(),
        before + 1
    );
}

#[test]
fn in_handshake_mode_a_containers_identity_rides_in_its_handshake() {
    let (net, parent) = setup();
    let podman = follow_podman(&net, &parent, true);
    net.start_enforcers().unwrap();
    let digest = podman.image_digest().unwrap();
    let allowed = format!("{}-hs-client", net.id);
    assert!(
        fetch(
            &podman,
            &net,
            &parent,
            &allowed,
            &[("app", "client"), ("team", "blue")]
        ),
        "host-a log:\n{}",
        net.enforcer_log(net.host("host-a"))
    );
    let recs = net.wait_flows(net.host("host-b"), 1, |f| {
        of(&allowed)(f) && f.verdict == Verdict::Allowed
    });
    assert_eq!(recs.len(), 1, "{:?}", net.flows(net.host("host-b")));
    assert_eq!(recs[0].src.labels["tessera.io/image-digest"], digest);
    let denied = format!("{}-hs-other", net.id);
    assert!(!fetch(
        &podman,
        &net,
        &parent,
        &denied,
        &[("app", "other"), ("team", "blue")]
    ));
    assert!(
        net.flows(net.host("host-b"))
            .iter()
            .filter(|f| of(&denied)(f))
            .all(|f| f.verdict != Verdict::Allowed)
    );
    let unselected = format!("{}-hs-stranger", net.id);
    assert!(!fetch(
        &podman,
        &net,
        &parent,
        &unselected,
        &[("app", "client")]
    ));
    let refused = net.wait_flows(net.host("host-a"), 1, |f| f.code == Code::NoCapture);
    assert_eq!(refused.len(), 1, "{:?}", net.flows(net.host("host-a")));
    assert!(
        refused[0].reason.contains("team=blue"),
        "{}",
        refused[0].reason
    );
}

/// A container in another network namespace than its enforcer's, one with a route to the
/// other hosts (the outsider's): its packets would meet neither the proxy nor the
/// handshake's rules. In both modes its connect is refused at the hook, and the runtime's
/// report of it is refused with the reason.
fn a_container_with_a_network_namespace_of_its_own_is_refused(handshake: bool) {
    let net = TestNet::with_plain_hosts(&["host-a", "host-b"], &["outsider"]).expect("hosts");
    net.write_policy(None, POLICY).unwrap();
    std::fs::write(net.dir.join("index.html"), "hello from web\n").unwrap();
    // A plain server on host-b, on a port no workload serves: reachable by anyone.
    net.serve_http(net.host("host-b"), None, "0.0.0.0", 8000, &net.dir)
        .unwrap();
    let parent = net.cgroup(net.host("host-a"), Some("containers"));
    let podman = follow_podman(&net, &parent, handshake);
    net.start_enforcers().unwrap();
    let get = "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 10.77.0.2 8000";
    // The path works for a container outside the parent (the control).
    let outside = net.cgroup(net.host("outsider"), None);
    let network = format!("ns:/run/netns/{}", net.host("outsider").netns);
    let control = podman
        .run_with_network(
            &outside,
            &format!("{}-free", net.id),
            &[],
            &network,
            &["sh", "-c", get],
            T,
        )
        .unwrap();
    assert!(
        String::from_utf8_lossy(&control.stdout).contains("hello from web"),
        "the control container could not reach host-b: {control:?}"
    );
    let name = format!("{}-elsewhere", net.id);
    let out = podman
        .run_with_network(
            &parent,
            &name,
            &[("app", "client"), ("team", "blue")],
            &network,
            &["sh", "-c", &format!("sleep 1; {get}")],
            T,
        )
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("hello"),
        "a container in another network namespace reached host-b around Tessera: {out:?}"
    );
    assert!(
        eventually(T, || net
            .enforcer_log(net.host("host-a"))
            .contains("it has a network namespace of its own")),
        "{}",
        net.enforcer_log(net.host("host-a"))
    );
}

#[test]
fn in_handshake_mode_a_container_with_a_network_namespace_of_its_own_is_refused() {
    a_container_with_a_network_namespace_of_its_own_is_refused(true);
}

/// Tunnel mode serves a container in a network namespace of its own (as a pod has): `pod`
/// is that namespace (10.77.0.3 on the test switch, no enforcer of its own), its containers
/// in host-a's parent cgroup. Outbound, the enforcer listens inside it; inbound, it delivers
/// inside it, and its guard there drops what comes around the tunnel.
#[test]
fn in_tunnel_mode_a_container_with_a_network_namespace_of_its_own_is_served_in_it() {
    let net =
        TestNet::with_plain_hosts(&["host-a", "host-b"], &["pod", "outsider"]).expect("hosts");
    net.add_workload(net.host("host-b"), "web", &[("app", "web")], &[8080])
        .unwrap();
    // Clients may also reach the outsider (no enforcer there) by its address.
    net.write_policy(
        None,
        &format!(
            "{POLICY}  - name: clients-to-outsider\n    action: allow\n    from: [{{labels: [app=client]}}]\n    to: [{{cidr: 10.77.0.4}}]\n"
        ),
    )
    .unwrap();
    std::fs::write(net.dir.join("index.html"), "hello from web\n").unwrap();
    net.serve_http(net.host("host-b"), Some("web"), "0.0.0.0", 8080, &net.dir)
        .unwrap();
    let parent = net.cgroup(net.host("host-a"), Some("containers"));
    let podman = follow_podman(&net, &parent, false);
    {
        let mut opts = net.options.lock().unwrap();
        // host-b reaches the pod's address through host-a's enforcer.
        opts.serves_extra
            .insert("host-a".into(), vec!["10.77.0.3/32".parse().unwrap()]);
        // Capture (and the namespace's guard) stay while host-a's enforcer restarts.
        opts.keep_attached = true;
    }
    net.start_enforcers().unwrap();
    let network = format!("ns:/run/netns/{}", net.host("pod").netns);
    let digest = podman.image_digest().unwrap();

    // A store in the pod on 9000 (a [containers] port: protected).
    let store = format!("{}-pod-store", net.id);
    podman
        .start_on(
            &network,
            &parent,
            &store,
            &[
                ("app", "store"),
                ("team", "blue"),
                ("tessera.ports", "9000"),
            ],
            &[9000],
            &["httpd", "-f", "-p", "9000", "-h", "/www"],
        )
        .unwrap();
    assert!(
        eventually(T, || net
            .enforcer_log(net.host("host-a"))
            .contains("serving a workload's own network namespace")),
        "{}",
        net.enforcer_log(net.host("host-a"))
    );

    // Outbound, from a second container in the same namespace (a pod's second container),
    // its first instruction: allowed with its runtime's identity, recorded by host-b.
    let client = format!("{}-pod-client", net.id);
    let get = "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 10 10.77.0.2 8080";
    let out = podman
        .run_with_network(
            &parent,
            &client,
            &[("app", "client"), ("team", "blue")],
            &network,
            &["sh", "-c", get],
            T,
        )
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello from web"),
        "the pod's client did not reach web: {out:?}\nhost-a log:\n{}",
        net.enforcer_log(net.host("host-a"))
    );
    let recs = net.wait_flows(net.host("host-b"), 1, |f| {
        of(&client)(f) && f.verdict == Verdict::Allowed
    });
    assert_eq!(recs.len(), 1, "{:?}", net.flows(net.host("host-b")));
    assert_eq!(recs[0].src.labels["tessera.io/image-digest"], digest);
    assert_eq!(recs[0].src.labels["app"], "client");
    // Denied by policy: app=other may not reach web.
    let other = format!("{}-pod-other", net.id);
    let out = podman
        .run_with_network(
            &parent,
            &other,
            &[("app", "other"), ("team", "blue")],
            &network,
            &["sh", "-c", get],
            T,
        )
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("hello"),
        "{out:?}"
    );
    let denied = net.wait_flows(net.host("host-a"), 1, |f| {
        of(&other)(f) && f.verdict == Verdict::Denied
    });
    assert_eq!(denied.len(), 1, "{:?}", net.flows(net.host("host-a")));

    // A destination without an enforcer, allowed by policy: reached from the container's
    // own network (its address, 10.77.0.3), never from the host's (10.77.0.1).
    std::fs::write(net.dir.join("outside.html"), "hello from outside\n").unwrap();
    net.serve_http(net.host("outsider"), None, "0.0.0.0", 8000, &net.dir)
        .unwrap();
    let out = podman
        .run_with_network(
            &parent,
            &format!("{}-pod-egress", net.id),
            &[("app", "client"), ("team", "blue")],
            &network,
            &[
                "sh",
                "-c",
                "printf 'GET /outside.html HTTP/1.0\\r\\n\\r\\n' | nc -w 10 10.77.0.4 8000",
            ],
            T,
        )
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello from outside"),
        "{out:?}\nhost-a log:\n{}",
        net.enforcer_log(net.host("host-a"))
    );
    let served = std::fs::read_to_string(net.dir.join("outsider-other-python3.log")).unwrap();
    let line = served
        .lines()
        .find(|l| l.contains("outside.html"))
        .unwrap_or_default();
    assert!(
        line.starts_with("10.77.0.3 "),
        "the outsider saw the request from {line:?}, not from the container's own address"
    );

    // Inbound: web reaches the store at the pod's own address, through the tunnel; host-a
    // records the container as the destination.
    let got = || {
        net.curl("host-b", Some("web"), "http://10.77.0.3:9000/index.html")
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("hello from a container"))
            .unwrap_or(false)
    };
    assert!(
        eventually(T, got),
        "web could not reach the pod's store; host-a log:\n{}",
        net.enforcer_log(net.host("host-a"))
    );
    let recs = net.wait_flows(net.host("host-a"), 1, |f| {
        f.direction == Direction::Inbound && f.verdict == Verdict::Allowed
    });
    assert_eq!(
        recs[0].dst.labels["tessera.io/container-name"], store,
        "{:?}",
        recs[0]
    );
    // Around the tunnel: a process of host-b outside any workload goes straight to the
    // pod's address and is refused by the guard in the pod's namespace (without it, the
    // port's listener would answer: the workload declares the port). The pod's own
    // processes still reach it over their loopback. The control: a server of no workload
    // in the same namespace answers host-b directly (the path is there).
    net.serve_http(net.host("pod"), None, "0.0.0.0", 9005, &net.dir)
        .unwrap();
    let control = net
        .curl("host-b", None, "http://10.77.0.3:9005/index.html")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&control.stdout).contains("hello from web"),
        "the control: {control:?}"
    );
    let direct = net
        .curl("host-b", None, "http://10.77.0.3:9000/index.html")
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&direct.stdout).contains("hello"),
        "a client reached the pod's protected port around the tunnel"
    );
    let inside = podman
        .exec(
            &store,
            &[
                "sh",
                "-c",
                "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 127.0.0.1 9000",
            ],
        )
        .unwrap();
    assert!(
        String::from_utf8_lossy(&inside.stdout).contains("hello from a container"),
        "the pod's own loopback: {inside:?}"
    );

    // host-a's enforcer restarts: while it is down the guard still refuses the direct
    // client (pinned with capture); once up, the running container's namespace is served
    // again (the runtime's listing) and web reaches it through the tunnel.
    let served = |net: &TestNet| {
        net.enforcer_log(net.host("host-a"))
            .matches("serving a workload's own network namespace")
            .count()
    };
    let before = served(&net);
    net.stop_enforcer(net.host("host-a"), false).unwrap();
    let direct = net
        .curl("host-b", None, "http://10.77.0.3:9000/index.html")
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&direct.stdout).contains("hello"),
        "the pod's protected port was reached while its enforcer was down"
    );
    net.start_enforcer(net.host("host-a")).unwrap();
    assert!(
        eventually(T, || served(&net) > before),
        "{}",
        net.enforcer_log(net.host("host-a"))
    );
    assert!(
        eventually(T, got),
        "web could not reach the pod's store after host-a's restart; host-a log:\n{}",
        net.enforcer_log(net.host("host-a"))
    );

    // The pod's last container stops: its namespace is no longer served.
    podman.remove(&store).unwrap();
    assert!(
        eventually(T, || net
            .enforcer_log(net.host("host-a"))
            .contains("no longer serving a workload's network namespace")),
        "{}",
        net.enforcer_log(net.host("host-a"))
    );
}

/// With the runtime's `prestart` hook (`tessera oci-hook`), a container with a network
/// namespace of its own (`--network none`: a fresh one, only its loopback) is served in it
/// before it runs: its very first instruction connects, under policy, every time. Without
/// the hook it would race the runtime's report (its connects refused until served).
#[test]
fn the_runtimes_hook_serves_a_containers_own_network_before_its_first_instruction() {
    let (net, parent) = setup();
    let mut podman = follow_podman(&net, &parent, false);
    let socket = net.dir.join("containers-hook.sock");
    net.options
        .lock()
        .unwrap()
        .containers
        .get_mut("host-a")
        .unwrap()
        .hook_socket = Some(socket.clone());
    podman.install_hook(&net.dir, net.bin(), &socket).unwrap();
    // Pins stay while host-a's enforcer restarts (the end of this test).
    net.options.lock().unwrap().keep_attached = true;
    net.start_enforcers().unwrap();
    for i in 0..3 {
        let name = format!("{}-own-{i}", net.id);
        let out = podman
            .run_with_network(
                &parent,
                &name,
                &[("app", "client"), ("team", "blue")],
                "none",
                &GET,
                T,
            )
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("hello from web"),
            "container {i}'s first instruction: {out:?}\nhost-a log:\n{}",
            net.enforcer_log(net.host("host-a"))
        );
        let recs = net.wait_flows(net.host("host-b"), 1, |f| {
            of(&name)(f) && f.verdict == Verdict::Allowed
        });
        assert_eq!(recs.len(), 1, "{:?}", net.flows(net.host("host-b")));
    }
    // Denied by policy, from its first instruction too.
    let name = format!("{}-own-other", net.id);
    let out = podman
        .run_with_network(
            &parent,
            &name,
            &[("app", "other"), ("team", "blue")],
            "none",
            &GET,
            T,
        )
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("hello"),
        "{out:?}"
    );
    let denied = net.wait_flows(net.host("host-a"), 1, |f| {
        of(&name)(f) && f.verdict == Verdict::Denied
    });
    assert_eq!(denied.len(), 1, "{:?}", net.flows(net.host("host-a")));
    // Each container's namespace is released when it ends.
    assert!(
        eventually(T, || {
            let log = net.enforcer_log(net.host("host-a"));
            log.matches("no longer serving a workload's network namespace")
                .count()
                >= 4
        }),
        "{}",
        net.enforcer_log(net.host("host-a"))
    );

    // A namespace that ends while its enforcer is down: the kernel detaches its guard, but
    // the pin would stay for ever; the next start removes it.
    let served = |net: &TestNet| {
        net.enforcer_log(net.host("host-a"))
            .matches("serving a workload's own network namespace")
            .count()
    };
    let before = served(&net);
    let long = format!("{}-own-long", net.id);
    podman
        .start_on(
            "none",
            &parent,
            &long,
            &[("app", "client"), ("team", "blue")],
            &[],
            &["sleep", "600"],
        )
        .unwrap();
    assert!(
        eventually(T, || served(&net) > before),
        "{}",
        net.enforcer_log(net.host("host-a"))
    );
    let adopted = net.pin_dir(net.host("host-a")).join("adopted");
    let pins = || -> Vec<String> {
        std::fs::read_dir(&adopted)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let pinned = pins();
    assert_eq!(
        pinned.len(),
        1,
        "one guard pinned, for the running container"
    );
    net.stop_enforcer(net.host("host-a"), false).unwrap();
    podman.remove(&long).unwrap();
    assert_eq!(
        pins(),
        pinned,
        "the pin outlives its namespace while no enforcer runs"
    );
    net.start_enforcer(net.host("host-a")).unwrap();
    assert!(
        eventually(T, || pins().is_empty()),
        "the gone namespace's pin is still there: {:?}\n{}",
        pins(),
        net.enforcer_log(net.host("host-a"))
    );
    assert!(
        net.enforcer_log(net.host("host-a"))
            .contains("removed the pinned guards of namespaces that are gone")
    );
}
