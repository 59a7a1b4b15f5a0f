//! The Kubernetes manifests (`deploy/kubernetes/`) checked offline against the Kubernetes
//! schemas: no API server runs on these machines, so each object is read into its typed
//! `k8s-openapi` struct (Kubernetes 1.34's OpenAPI schema, generated) and written back, and
//! the two must be equal — a misspelled or unknown field, a wrong type or a wrong
//! `apiVersion`/`kind` fails. Then what `kubectl apply` would not catch: selectors that
//! match their pods, references to ConfigMaps, Secrets, ServiceAccounts and volumes that
//! exist, the image `cargo xtask image` builds, the enforcer's capabilities and host
//! access, RBAC limited to reading pods, and the enforcer configuration the DaemonSet
//! renders accepted by the enforcer's own configuration loader.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{
            ConfigMap, Namespace, PersistentVolumeClaim, PodSpec, Secret, Service, ServiceAccount,
        },
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tessera_enforcer::config::Config;

const NAMESPACE: &str = "tessera-system";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every object of every manifest, with the file it came from.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", f.display()));
            if !v.is_null() {
                docs.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
            }
        }
    }
    docs
}

/// Reads `doc` as `T` and requires that writing it back gives the same object.
fn typed<T: DeserializeOwned + Serialize>(file: &str, doc: &Value) -> T {
    let what = format!("{file}: {} {}", doc["kind"], doc["metadata"]["name"]);
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what}: does not match the schema: {e}"));
    let back = serde_json::to_value(&t).unwrap();
    if let Some(path) = first_difference(doc, &back, String::new()) {
        panic!("{what}: field {path} is not in the schema (or has the wrong type)");
    }
    t
}

/// Where `a` has something `b` has not (or different), as a path.
fn first_difference(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let at = format!("{at}.{k}");
                match b.get(k) {
                    Some(w) => {
                        if let Some(p) = first_difference(v, w, at) {
                            return Some(p);
                        }
                    }
                    None => return Some(at),
                }
            }
            b.keys()
                .find(|k| !a.contains_key(*k))
                .map(|k| format!("{at}.{k} (added)"))
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{at}[{i}]"))),
        _ => (a != b).then_some(at),
    }
}

/// Every manifest object, typed.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    secrets: Vec<Secret>,
    claims: Vec<PersistentVolumeClaim>,
    daemon_sets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
}

fn objects_of(docs: &[(String, Value)]) -> Objects {
    let mut o = Objects::default();
    for (f, d) in docs {
        match d["kind"].as_str().unwrap_or("") {
            "Namespace" => o.namespaces.push(typed(f, d)),
            "ServiceAccount" => o.service_accounts.push(typed(f, d)),
            "ClusterRole" => o.cluster_roles.push(typed(f, d)),
            "ClusterRoleBinding" => o.bindings.push(typed(f, d)),
            "ConfigMap" => o.config_maps.push(typed(f, d)),
            "Secret" => o.secrets.push(typed(f, d)),
            "PersistentVolumeClaim" => o.claims.push(typed(f, d)),
            "DaemonSet" => o.daemon_sets.push(typed(f, d)),
            "Deployment" => o.deployments.push(typed(f, d)),
            "Service" => o.services.push(typed(f, d)),
            other => panic!("{f}: kind {other:?} is not checked by this test"),
        }
        if d["kind"] != "Namespace" && !d["kind"].as_str().unwrap().starts_with("Cluster") {
            assert_eq!(d["metadata"]["namespace"], NAMESPACE, "{f}: namespace");
        }
    }
    o
}

fn objects() -> Objects {
    objects_of(&documents())
}

fn names<'a>(it: impl IntoIterator<Item = &'a Option<String>>) -> BTreeSet<String> {
    it.into_iter().flatten().cloned().collect()
}

/// The pod spec's references: ConfigMaps, Secrets, claims, service account; volumes mounted.
fn check_pod_references(what: &str, spec: &PodSpec, o: &Objects) {
    let config_maps = names(o.config_maps.iter().map(|c| &c.metadata.name));
    let secrets = names(o.secrets.iter().map(|c| &c.metadata.name));
    let claims = names(o.claims.iter().map(|c| &c.metadata.name));
    let accounts = names(o.service_accounts.iter().map(|c| &c.metadata.name));
    let sa = spec.service_account_name.as_deref().unwrap_or("default");
    assert!(
        accounts.contains(sa),
        "{what}: service account {sa} missing"
    );
    let volumes: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    for v in spec.volumes.iter().flatten() {
        if let Some(c) = &v.config_map {
            assert!(
                config_maps.contains(&c.name),
                "{what}: ConfigMap {} missing",
                c.name
            );
        }
        if let Some(s) = &v.secret {
            let n = s.secret_name.as_deref().unwrap();
            assert!(secrets.contains(n), "{what}: Secret {n} missing");
        }
        if let Some(c) = &v.persistent_volume_claim {
            assert!(
                claims.contains(&c.claim_name),
                "{what}: claim {} missing",
                c.claim_name
            );
        }
    }
    for c in &spec.containers {
        let mut paths = BTreeSet::new();
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains(m.name.as_str()),
                "{what}: volume {} missing",
                m.name
            );
            assert!(
                paths.insert(&m.mount_path),
                "{what}: {} mounted twice",
                m.mount_path
            );
        }
        assert_eq!(
            c.image.as_deref(),
            Some(format!("localhost/tessera:{}", env!("CARGO_PKG_VERSION")).as_str()),
            "{what}: the image `cargo xtask image` builds"
        );
        let sc = c.security_context.as_ref().expect("securityContext");
        assert_ne!(sc.privileged, Some(true), "{what}: privileged");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{what}");
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{what}");
        let caps = sc.capabilities.as_ref().expect("capabilities");
        assert_eq!(
            caps.drop.as_deref(),
            Some(&["ALL".to_owned()][..]),
            "{what}"
        );
        let r = c.resources.as_ref().expect("resources");
        assert!(
            r.requests
                .as_ref()
                .is_some_and(|q| q.contains_key("cpu") && q.contains_key("memory")),
            "{what}: requests"
        );
        assert!(
            r.limits.as_ref().is_some_and(|q| q.contains_key("memory")),
            "{what}: memory limit"
        );
    }
}

fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn every_manifest_matches_the_kubernetes_schema() {
    let o = objects();
    assert_eq!(o.namespaces.len(), 1);
    assert_eq!(o.daemon_sets.len(), 1);
    assert_eq!(o.deployments.len(), 1);
    assert_eq!(o.services.len(), 1);
}

/// A misspelled or unknown field, or a wrong type, is refused: the check above has teeth.
#[test]
fn a_misspelled_field_fails_the_schema_check() {
    let docs = documents();
    let (f, ds) = docs.iter().find(|(_, d)| d["kind"] == "DaemonSet").unwrap();
    let mut bad = ds.clone();
    let c = &mut bad["spec"]["template"]["spec"]["containers"][0];
    c["securityContext"]["capabilites"] = c["securityContext"]["capabilities"].take();
    c["securityContext"]
        .as_object_mut()
        .unwrap()
        .remove("capabilities");
    let r = std::panic::catch_unwind(|| typed::<DaemonSet>(f, &bad));
    assert!(r.is_err(), "a misspelled capabilities field passed");
    let mut bad = ds.clone();
    bad["spec"]["template"]["spec"]["hostNetwork"] = "yes".into();
    assert!(std::panic::catch_unwind(|| typed::<DaemonSet>(f, &bad)).is_err());
    let mut bad = ds.clone();
    bad["apiVersion"] = "extensions/v1beta1".into();
    assert!(std::panic::catch_unwind(|| typed::<DaemonSet>(f, &bad)).is_err());
}

#[test]
fn the_daemonset_runs_the_enforcer_on_every_node_with_what_it_needs() {
    let o = objects();
    let ds = &o.daemon_sets[0];
    let spec = ds.spec.as_ref().unwrap();
    let template = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    let selector = spec.selector.match_labels.clone().unwrap();
    assert!(
        matches(&selector, &template),
        "selector {selector:?} vs {template:?}"
    );
    let pod = spec.template.spec.as_ref().unwrap();
    check_pod_references("DaemonSet", pod, &o);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint"
    );
    let c = &pod.containers[0];
    let env: BTreeMap<_, _> = c
        .env
        .iter()
        .flatten()
        .map(|e| {
            let field = e
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.clone());
            (e.name.as_str(), field)
        })
        .collect();
    assert_eq!(env["NODE_NAME"].as_deref(), Some("spec.nodeName"));
    assert_eq!(env["HOST_IP"].as_deref(), Some("status.hostIP"));
    let caps: BTreeSet<&str> = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap()
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(
        caps,
        BTreeSet::from([
            "BPF",
            "PERFMON",
            "NET_ADMIN",
            "NET_RAW",
            "SYS_PTRACE",
            "SYS_RESOURCE",
            "SYS_ADMIN"
        ])
    );
    let mounts: BTreeMap<&str, &str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.as_str(), m.name.as_str()))
        .collect();
    let host: BTreeMap<&str, &str> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    for path in ["/sys/fs/bpf", "/sys/fs/cgroup", "/var/lib/tessera"] {
        assert_eq!(
            host.get(mounts[path]),
            Some(&path),
            "{path}: the node's own"
        );
    }
    // The probes reach the enforcer's API where the configuration puts it.
    let probe = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.host.as_deref(), Some("127.0.0.1"));
    assert_eq!(probe.port, IntOrString::Int(15090));
    let cm = o
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("tessera-enforcer"))
        .unwrap();
    let template = &cm.data.as_ref().unwrap()["enforcer.toml.in"];
    assert!(template.contains("api = \"127.0.0.1:15090\""));
    // The start script reads the files where the DaemonSet mounts them.
    let script = &cm.data.as_ref().unwrap()["start.sh"];
    assert_eq!(
        c.command.as_deref(),
        Some(
            &[
                "/bin/sh".to_owned(),
                "/etc/tessera/config/start.sh".to_owned()
            ][..]
        )
    );
    for path in [
        "/etc/tessera/config/",
        "/etc/tessera/join/",
        "/run/tessera/",
    ] {
        assert!(
            mounts.contains_key(path.trim_end_matches('/')),
            "{path} mounted"
        );
        assert!(
            script.contains(path) || template.contains(path),
            "{path} used"
        );
    }
    assert!(template.contains("/etc/tessera/control-ca/ca.pem"));
    assert!(mounts.contains_key("/etc/tessera/control-ca"));
}

#[test]
fn the_server_is_a_deployment_behind_its_service() {
    let o = objects();
    let d = &o.deployments[0];
    let spec = d.spec.as_ref().unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert!(matches(
        spec.selector.match_labels.as_ref().unwrap(),
        &labels
    ));
    let pod = spec.template.spec.as_ref().unwrap();
    check_pod_references("Deployment", pod, &o);
    let c = &pod.containers[0];
    assert!(
        c.security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap()
            .add
            .is_none()
    );
    assert_eq!(
        pod.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    let svc = &o.services[0];
    let s = svc.spec.as_ref().unwrap();
    assert!(
        matches(s.selector.as_ref().unwrap(), &labels),
        "the Service selects the server"
    );
    let port = &s.ports.as_ref().unwrap()[0];
    let IntOrString::String(target) = port.target_port.clone().unwrap() else {
        panic!("named target port")
    };
    assert!(
        c.ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some(target.as_str()) && p.container_port == 15100)
    );
    // The server's certificate names the address the enforcers dial.
    let host = format!("{}.{NAMESPACE}.svc", svc.metadata.name.as_deref().unwrap());
    let args = c.args.as_ref().unwrap();
    assert!(
        args.windows(2).any(|w| w[0] == "--name" && w[1] == host),
        "{args:?}"
    );
    let cm = o
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("tessera-enforcer"))
        .unwrap();
    let template = &cm.data.as_ref().unwrap()["enforcer.toml.in"];
    assert!(
        template.contains(&format!("servers = [\"https://{host}:{}\"]", port.port)),
        "the enforcers dial the Service"
    );
}

#[test]
fn the_enforcer_may_only_read_pods() {
    let o = objects();
    let role = &o.cluster_roles[0];
    let rules = role.rules.as_ref().unwrap();
    assert_eq!(rules.len(), 1);
    let r = &rules[0];
    assert_eq!(r.api_groups.as_deref(), Some(&["".to_owned()][..]));
    assert_eq!(r.resources.as_deref(), Some(&["pods".to_owned()][..]));
    let verbs: BTreeSet<&str> = r.verbs.iter().map(String::as_str).collect();
    assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]));
    let b = &o.bindings[0];
    assert_eq!(b.role_ref.name, role.metadata.name.clone().unwrap());
    let s = &b.subjects.as_ref().unwrap()[0];
    assert_eq!(s.name, "tessera-enforcer");
    assert_eq!(s.namespace.as_deref(), Some(NAMESPACE));
    let ds = &o.daemon_sets[0];
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("tessera-enforcer")
    );
}

/// The configuration the DaemonSet renders for a node is one the enforcer accepts.
#[test]
fn the_rendered_enforcer_configuration_is_valid() {
    let o = objects();
    let cm = o
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("tessera-enforcer"))
        .unwrap();
    let data = cm.data.as_ref().unwrap();
    let rendered = data["enforcer.toml.in"]
        .replace("@NODE_NAME@", "node-a")
        .replace("@ADVERTISE@", "10.0.0.11:15008")
        .replace("@POD_CIDR@", "10.244.1.0/24");
    assert!(!rendered.contains('@'), "every placeholder is filled");
    // The pod cgroup root is checked against the filesystem: a node with the unified
    // hierarchy has cgroup v2 at /sys/fs/cgroup; this machine (hybrid) has it elsewhere.
    let v2 = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_owned())
        })
        .expect("a cgroup v2 mount");
    assert!(rendered.contains("cgroup = \"/sys/fs/cgroup/kubepods.slice\""));
    let rendered = rendered.replace(
        "cgroup = \"/sys/fs/cgroup/kubepods.slice\"",
        &format!("cgroup = \"{v2}/kubepods.slice\""),
    );
    // Loaded as rendered (that one path aside), verbatim.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("enforcer.toml");
    std::fs::write(&path, &rendered).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.name, "node-a");
    let control = config.control.as_ref().unwrap();
    assert_eq!(control.serves, vec!["10.244.1.0/24".parse().unwrap()]);
    assert_eq!(control.advertise, Some("10.0.0.11:15008".parse().unwrap()));
    // This node's pods, followed through the API server.
    let pods = config.containers.as_ref().expect("[containers]");
    assert_eq!(
        pods.runtime,
        tessera_enforcer::config::ContainerRuntime::Kubernetes
    );
    assert_eq!(
        pods.kube_settings().cgroup_driver,
        tessera_enforcer::sources::kube::CgroupDriver::Systemd
    );
    // The Secret holds a token for the example node the pod-cidrs list names.
    let secret = &o.secrets[0];
    let nodes: Vec<&str> = data["pod-cidrs"]
        .lines()
        .filter_map(|l| l.split_once('=').map(|(n, _)| n))
        .collect();
    for n in nodes {
        assert!(
            secret.string_data.as_ref().unwrap().contains_key(n),
            "token for {n}"
        );
    }
}
