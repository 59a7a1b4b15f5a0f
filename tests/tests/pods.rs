//! End-to-end tests of the enforcer following Kubernetes pods (`[containers] runtime =
//! "kubernetes"`), as far as these machines allow: no API server can run here, so a small
//! replaying server (`tests/fixtures/kube-api.py`) answers the real kube-rs client with a
//! recorded pod list and an open watch, while everything else is real: the kubelet's cgroup
//! layout (systemd driver, a BestEffort pod's slice and a container scope below it), the
//! pod's own network namespace (10.77.0.3, the `pod` test host, no enforcer of its own),
//! real programs in it, real eBPF and the real daemon, run with exactly the capabilities
//! the DaemonSet gives it (`deploy/kubernetes/enforcer.yaml`).
//!
//! * the pod's first connection is under policy with the API server's identity for it
//!   (namespace, pod UID, SPIFFE-form service account, image digest, labels);
//! * a peer reaches the pod's served port at the pod's own address through the tunnel, and
//!   not around it;
//! * a process in a pod cgroup the API server never reported, even in a namespace the
//!   enforcer serves, gets no identity;
//! * the enforcer runs under the kubelet's root, in a pod cgroup, as the DaemonSet's does,
//!   and a `hostNetwork` pod (a node agent, like kube-proxy) is exempt from capture.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use tessera_enforcer::{
    config::{ContainerRuntime, Containers},
    sources::kube::{CgroupDriver, KubeSettings},
};
use tessera_proxy::{
    code::Code,
    flow::{Direction, Verdict},
};
use tessera_tests::{
    TestNet,
    caps::{capped_binary, check_capped, daemonset_capabilities},
    eventually,
};

const T: Duration = Duration::from_secs(60);
const API_PORT: u16 = 16_443;
const UID: &str = "4f1b2c3d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
/// A node agent's pod (`hostNetwork`), and the enforcer's own.
const AGENT_UID: &str = "a9e6f1c2-0000-4a7b-8c9d-0e1f2a3b4c5d";
const ENFORCER_UID: &str = "e0f0e0f0-0000-4a7b-8c9d-0e1f2a3b4c5d";
const DIGEST: &str = "sha256:7b3ccabffc97de872a30dfd234fd972a66d247c8cfc69b0550f276481852627c";

const POLICY: &str = "\
rules:
  - name: shop-to-web
    action: allow
    from: [{labels: [app=shop]}]
    to: [{labels: [app=web]}]
  - name: web-to-shop
    action: allow
    from: [{labels: [app=web]}]
    to: [{labels: [app=shop, tessera.io/service-account=ns/shop/sa/shop]}]
";

/// The pod list the replaying API server answers: one Running pod on host-a, and one on
/// another node (which the source must not see).
fn pod_list() -> serde_json::Value {
    let pod = |name: &str, uid: &str, node: &str| {
        let host_network = uid == AGENT_UID || uid == ENFORCER_UID;
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": uid, "resourceVersion": "90",
                         "labels": {"app": "shop", "tessera.io/service-account": "forged"}},
            "spec": {"nodeName": node, "serviceAccountName": "shop", "hostNetwork": host_network,
                     "containers": [{"name": "shop", "image": "registry.local/shop:1",
                                     "ports": [{"containerPort": 9000, "protocol": "TCP"}]}]},
            "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": "10.77.0.3",
                       "containerStatuses": [{"name": "shop", "image": "registry.local/shop:1",
                           "imageID": format!("registry.local/shop@{DIGEST}"),
                           "ready": true, "restartCount": 0}]}
        })
    };
    serde_json::json!({
        "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "100"},
        "items": [pod("shop-5d8f7-abcde", UID, "host-a"),
                  pod("kube-proxy-x1", AGENT_UID, "host-a"),
                  pod("tessera-enforcer-x1", ENFORCER_UID, "host-a"),
                  pod("shop-5d8f7-zzzzz", "99999999-5e6f-4a7b-8c9d-0e1f2a3b4c5d", "host-z")]
    })
}

/// The kubelet's cgroup for a BestEffort pod (systemd driver) and a container scope in it.
fn pod_scope(root: &Path, uid: &str) -> PathBuf {
    let scope = root
        .join("kubepods-besteffort.slice")
        .join(format!(
            "kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ))
        .join(format!("cri-containerd-{}.scope", "ab".repeat(32)));
    std::fs::create_dir_all(&scope).unwrap();
    scope
}

#[test]
fn pods_the_api_server_reports_are_served_in_their_own_network_with_its_identity() {
    let mut net = TestNet::with_plain_hosts(&["host-a", "host-b"], &["pod"]).expect("hosts");
    let keep = daemonset_capabilities().unwrap();
    net.set_bin(capped_binary(&net.dir, &keep).unwrap());
    net.add_workload(net.host("host-b"), "web", &[("app", "web")], &[8080])
        .unwrap();
    net.write_policy(None, POLICY).unwrap();
    std::fs::write(net.dir.join("index.html"), "hello from web\n").unwrap();
    net.serve_http(net.host("host-b"), Some("web"), "0.0.0.0", 8080, &net.dir)
        .unwrap();
    // A plain server on host-b, no workload's (what a node agent talks to).
    net.serve_http(net.host("host-b"), None, "0.0.0.0", 8000, &net.dir)
        .unwrap();

    // The API server, replayed on host-a's loopback.
    let list = net.dir.join("pods.json");
    std::fs::write(&list, pod_list().to_string()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/kube-api.py");
    net.spawn(
        net.host("host-a"),
        None,
        "python3",
        &[script, list.to_str().unwrap(), &API_PORT.to_string()],
    )
    .unwrap();
    let kubeconfig = net.dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: t\n\
             clusters: [{{name: t, cluster: {{server: \"http://127.0.0.1:{API_PORT}\"}}}}]\n\
             users: [{{name: t, user: {{token: test-token}}}}]\n\
             contexts: [{{name: t, context: {{cluster: t, user: t}}}}]\n"
        ),
    )
    .unwrap();

    // The kubelet's pod cgroup root on host-a, a pod's container with a process in it, in
    // the pod's own network namespace.
    let root = net.cgroup(net.host("host-a"), Some("kubepods.slice"));
    std::fs::create_dir_all(&root).unwrap();
    let scope = pod_scope(&root, UID);
    net.spawn_in(net.host("pod"), &scope, "sleep", &["300"])
        .unwrap();
    // The enforcer in a pod cgroup under the root, as the DaemonSet's runs; a node agent's.
    let agent = pod_scope(&root, AGENT_UID);
    net.options
        .lock()
        .unwrap()
        .enforcer_cgroup
        .insert("host-a".into(), pod_scope(&root, ENFORCER_UID));
    {
        let mut opts = net.options.lock().unwrap();
        opts.containers.insert(
            "host-a".into(),
            Containers {
                runtime: ContainerRuntime::Kubernetes,
                kubernetes: Some(KubeSettings {
                    node: Some("host-a".into()),
                    cgroup_driver: CgroupDriver::Systemd,
                    ..KubeSettings::default()
                }),
                socket: PathBuf::from("/run/podman/podman.sock"),
                hook_socket: None,
                cgroup: root.clone(),
                name: "pods".into(),
                select: BTreeMap::new(),
                observe: false,
                wait_ms: 2_000,
                ports: vec![9000],
            },
        );
        opts.serves_extra
            .insert("host-a".into(), vec!["10.77.0.3/32".parse().unwrap()]);
    }
    net.start_enforcer_with_env(
        net.host("host-a"),
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .unwrap();
    net.start_enforcer(net.host("host-b")).unwrap();
    check_capped(net.enforcer_pid(net.host("host-a")).unwrap(), &keep).unwrap();
    assert!(
        eventually(T, || net
            .enforcer_log(net.host("host-a"))
            .contains("serving a workload's own network namespace")),
        "{}",
        net.enforcer_log(net.host("host-a"))
    );
    let requests = std::fs::read_to_string(format!("{}.requests", list.display())).unwrap();
    assert!(
        requests
            .lines()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dhost-a")),
        "the source asked for other nodes' pods: {requests}"
    );

    // The enforcer under the root exempted itself (else its own listeners and API client
    // would be captured); the node agent is exempt once the API server says it is one.
    assert!(
        net.enforcer_log(net.host("host-a"))
            .contains("exempt from capture"),
        "{}",
        net.enforcer_log(net.host("host-a"))
    );
    let agent_gets = || {
        net.command(
            net.host("host-a"),
            &agent,
            "curl",
            &["-sS", "-m", "5", "http://10.77.0.2:8000/index.html"],
        )
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("hello from web"))
        .unwrap_or(false)
    };
    assert!(
        eventually(T, agent_gets),
        "the node agent (hostNetwork) was captured; host-a log:\n{}",
        net.enforcer_log(net.host("host-a"))
    );
    assert!(
        net.flows(net.host("host-a"))
            .iter()
            .all(|f| f.dst.addr.port() != 8000),
        "the node agent's connection was captured"
    );

    // The pod's connection: allowed with the API server's identity for it.
    let out = net
        .command(
            net.host("pod"),
            &scope,
            "curl",
            &["-sS", "-m", "10", "http://10.77.0.2:8080/index.html"],
        )
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello from web"),
        "the pod did not reach web: {out:?}\nhost-a log:\n{}",
        net.enforcer_log(net.host("host-a"))
    );
    let recs = net.wait_flows(net.host("host-b"), 1, |f| {
        f.direction == Direction::Inbound && f.verdict == Verdict::Allowed
    });
    assert_eq!(recs.len(), 1, "{:?}", net.flows(net.host("host-b")));
    let src = &recs[0].src.labels;
    assert_eq!(src["tessera.io/pod-uid"], UID, "{src:?}");
    assert_eq!(src["tessera.io/namespace"], "shop");
    assert_eq!(src["tessera.io/service-account"], "ns/shop/sa/shop");
    assert_eq!(src["tessera.io/image-digest"], DIGEST);
    assert_eq!(src["app"], "shop");
    assert_eq!(
        recs[0].src.workload.as_deref(),
        Some("shop.shop-5d8f7-abcde")
    );

    // web reaches the pod's port at the pod's address, through the tunnel.
    net.spawn_in(
        net.host("pod"),
        &scope,
        "python3",
        &[
            "-m",
            "http.server",
            "9000",
            "--directory",
            net.dir.to_str().unwrap(),
        ],
    )
    .unwrap();
    let got = || {
        net.curl("host-b", Some("web"), "http://10.77.0.3:9000/index.html")
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("hello from web"))
            .unwrap_or(false)
    };
    assert!(
        eventually(T, got),
        "web could not reach the pod; host-a log:\n{}",
        net.enforcer_log(net.host("host-a"))
    );
    let recs = net.wait_flows(net.host("host-a"), 1, |f| {
        f.direction == Direction::Inbound && f.verdict == Verdict::Allowed
    });
    assert_eq!(recs[0].dst.labels["tessera.io/pod-uid"], UID);
    // Around the tunnel: refused in the pod's namespace.
    let direct = net
        .curl("host-b", None, "http://10.77.0.3:9000/index.html")
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&direct.stdout).contains("hello"),
        "a client reached the pod around the tunnel"
    );

    // A process in the cgroup of a pod the API server never reported (in the same network
    // namespace, which the enforcer serves): no identity, refused.
    let stranger = pod_scope(&root, "00000000-1111-4222-8333-444455556666");
    let out = net
        .command(
            net.host("pod"),
            &stranger,
            "curl",
            &["-sS", "-m", "10", "http://10.77.0.2:8080/index.html"],
        )
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("hello"),
        "an unreported pod reached web: {out:?}"
    );
    // (The node agent's first attempts, before the API server's report of it, may be
    // refused too: fail closed. Only the stranger's record is looked at.)
    let refused = net.wait_flows(net.host("host-a"), 1, |f| {
        f.code == Code::NoCapture && f.reason.contains("pod00000000_1111")
    });
    assert_eq!(refused.len(), 1, "{:?}", net.flows(net.host("host-a")));
    assert!(
        refused[0].reason.contains("did not say who is in"),
        "{}",
        refused[0].reason
    );
}
