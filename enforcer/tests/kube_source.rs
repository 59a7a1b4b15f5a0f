//! The Kubernetes pod source against recorded API responses: the real kube-rs client and
//! watcher talk HTTP to a local server that replays a pod list, a watch stream and a
//! re-list (`tests/fixtures/kube/`, written in the API server's format: a `PodList`, then
//! JSON lines of `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": …}`), and the
//! source must report exactly the pods of its node, as the API server describes them.
//!
//! No Kubernetes API server can run on these machines; this is as close as they allow.
//! The replaying server honours the request's `fieldSelector` as the API server does (it
//! returns only pods whose `spec.nodeName` it names), and records every request so the
//! tests can check that the source asked only for its node's pods.
use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, RawQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use futures_util::StreamExt;
use serde_json::Value;
use tessera_enforcer::sources::{
    SourceEvent,
    kube::{KubeSettings, run},
};
use tessera_proxy::identity::reserved;
use tokio::sync::mpsc;

const NODE: &str = "node-a";

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/kube/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What the replaying server answers, in order.
enum Reply {
    Json(StatusCode, String),
    /// A watch: these JSON lines, then the response ends (`hang`: stays open).
    Watch {
        lines: Vec<String>,
        hang: bool,
    },
}

#[derive(Default)]
struct Script {
    lists: VecDeque<Reply>,
    watches: VecDeque<Reply>,
    /// Every request's query string, as sent.
    requests: Vec<String>,
    /// Every request's `Authorization` header ("" if none).
    auths: Vec<String>,
}

type Shared = Arc<Mutex<Script>>;

/// The node a field selector asks for (`spec.nodeName=<node>`), as the API server reads it.
fn selected_node(q: &HashMap<String, String>) -> Option<String> {
    q.get("fieldSelector")?
        .strip_prefix("spec.nodeName=")
        .map(str::to_owned)
}

fn on_node(pod: &Value, node: Option<&str>) -> bool {
    node.is_none_or(|n| pod["spec"]["nodeName"].as_str() == Some(n))
}

async fn pods(
    State(script): State<Shared>,
    headers: axum::http::HeaderMap,
    RawQuery(raw): RawQuery,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let node = selected_node(&q);
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    let reply = {
        let mut s = script.lock().unwrap();
        s.requests.push(raw.unwrap_or_default());
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
        s.auths.push(auth.unwrap_or_default().to_owned());
        if watch {
            s.watches.pop_front()
        } else {
            s.lists.pop_front()
        }
    };
    match reply {
        Some(Reply::Json(status, body)) => {
            let body = if status.is_success() {
                let mut list: Value = serde_json::from_str(&body).unwrap();
                let items = list["items"].as_array_mut().unwrap();
                items.retain(|p| on_node(p, node.as_deref()));
                list.to_string()
            } else {
                body
            };
            (status, [("content-type", "application/json")], body).into_response()
        }
        Some(Reply::Watch { lines, hang }) => {
            let kept: Vec<Result<Bytes, Infallible>> = lines
                .into_iter()
                .filter(|l| {
                    let e: Value = serde_json::from_str(l).unwrap();
                    !matches!(e["type"].as_str(), Some("ADDED" | "MODIFIED" | "DELETED"))
                        || on_node(&e["object"], node.as_deref())
                })
                .map(|l| Ok(Bytes::from(l + "\n")))
                .collect();
            let events = futures_util::stream::iter(kept);
            let body = if hang {
                Body::from_stream(events.chain(futures_util::stream::pending()))
            } else {
                Body::from_stream(events)
            };
            (StatusCode::OK, [("content-type", "application/json")], body).into_response()
        }
        // Nothing more scripted: a watch that stays open with nothing to say.
        None => Body::from_stream(futures_util::stream::pending::<Result<Bytes, Infallible>>())
            .into_response(),
    }
}

fn app(shared: &Shared) -> Router {
    Router::new()
        .route("/api/v1/pods", get(pods))
        .with_state(shared.clone())
}

/// The replaying API server over HTTPS (its certificate for 127.0.0.1 from a throwaway
/// CA), and a kube-rs client that trusts that CA and presents a bearer token, as a pod's
/// service account does in a cluster.
async fn tls_api_server(script: Script, token: &str) -> (kube::Client, Shared) {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo},
        server::conn::auto,
        service::TowerToHyperService,
    };
    let shared: Shared = Arc::new(Mutex::new(script));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = cert.der().to_vec();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![der.clone().into()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app(&shared);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(router))
                    .await;
            });
        }
    });
    let mut config = kube::Config::new(format!("https://{addr}").parse().unwrap());
    config.root_cert = Some(vec![der]);
    config.auth_info.token = Some(token.to_owned().into());
    (kube::Client::try_from(config).unwrap(), shared)
}

/// The replaying API server on a free loopback port, and a kube-rs client for it.
async fn api_server(script: Script) -> (kube::Client, Shared) {
    let shared: Shared = Arc::new(Mutex::new(script));
    let app = app(&shared);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    (kube::Client::try_from(config).unwrap(), shared)
}

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn uid(n: u32) -> String {
    format!("0b1a2c3d-5e6f-4a7b-8c9d-{n:012}")
}

fn up(n: u32) -> String {
    format!("up pod:{}", uid(n))
}

fn down(n: u32) -> String {
    format!("down pod:{}", uid(n))
}

fn exempt(n: u32) -> String {
    format!("exempt pod:{}", uid(n))
}

/// Receives events until `last` (a short form, `up pod:…`/`down pod:…`) arrives.
async fn until(rx: &mut mpsc::Receiver<SourceEvent>, last: &str) -> Vec<SourceEvent> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let e = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {last:?} within 60 s; got {:?}", short(&got)))
            .expect("source ended");
        let done = short(std::slice::from_ref(&e))[0] == last;
        got.push(e);
        if done {
            return got;
        }
    }
}

fn short(events: &[SourceEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            SourceEvent::Up(d) => format!("up {}", d.key),
            SourceEvent::Down { key } => format!("down {key}"),
            SourceEvent::Exempt { key, .. } => format!("exempt {key}"),
        })
        .collect()
}

/// The requests so far, once `done` says they are complete (bounded wait).
async fn requests_until(shared: &Shared, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let requests = shared.lock().unwrap().requests.clone();
        if done(&requests) || tokio::time::Instant::now() > deadline {
            return requests;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn settings() -> KubeSettings {
    KubeSettings {
        node: Some(NODE.into()),
        ..KubeSettings::default()
    }
}

/// A list, a watch with every kind of change, a 410 Gone, a failed list, a re-list.
#[tokio::test]
async fn the_watcher_reports_this_nodes_pods_as_the_api_server_says() {
    let script = Script {
        lists: VecDeque::from([
            Reply::Json(StatusCode::OK, fixture("pods-list.json")),
            Reply::Json(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"etcdserver: request timed out","reason":"InternalError","code":500}"#.into(),
            ),
            Reply::Json(StatusCode::OK, fixture("pods-relist.json")),
        ]),
        watches: VecDeque::from([Reply::Watch {
            lines: lines(&fixture("watch-1.jsonl")),
            hang: false,
        }]),
        ..Script::default()
    };
    let (client, shared) = api_server(script).await;
    let (tx, mut rx) = mpsc::channel(4);
    let source = tokio::spawn(run(client, NODE.into(), settings(), tx));

    let got = until(&mut rx, &down(3)).await;
    assert_eq!(
        short(&got),
        [
            up(1),     // list: web (pending, hostNetwork, no uid, no status: skipped)
            up(2),     // list: api (two containers)
            exempt(4), // list: agent (hostNetwork, Running): a node agent, exempt from capture
            up(8),     // ADDED db
            up(3), // MODIFIED worker: Pending -> Running (web's resourceVersion-only change: nothing)
            up(1), // MODIFIED web: a new label
            down(2), // DELETED api
            down(8), // MODIFIED db: Succeeded
            up(9), // 410 Gone, a failed list, then the re-list: cache is new
            down(3), // ...and worker is gone from it
        ]
    );
    let SourceEvent::Up(web) = &got[0] else {
        unreachable!()
    };
    let digest = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    assert_eq!(web.name, "shop.web-7d4b9c8f6d-x2x9q");
    assert_eq!(
        web.derived[reserved::IMAGE_DIGEST],
        digest('a'),
        "the pod's own tessera.io/image-digest=fake label is ignored"
    );
    assert!(!web.labels.keys().any(|k| k.starts_with("tessera.io/")));
    assert_eq!(web.labels["app"], "web");
    assert_eq!(web.derived[reserved::SERVICE_ACCOUNT], "ns/shop/sa/web");
    assert_eq!(
        web.cgroup.to_str().unwrap(),
        format!(
            "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid(1).replace('-', "_")
        )
    );
    assert_eq!(web.ports, [8080]);
    let SourceEvent::Up(api) = &got[1] else {
        unreachable!()
    };
    assert_eq!(
        api.derived[reserved::IMAGE_DIGEST],
        format!("{}/{}", digest('b'), digest('c'))
    );
    assert_eq!(api.ports, [9000, 15000]);
    assert!(
        api.cgroup
            .to_str()
            .unwrap()
            .contains("kubepods-burstable.slice/")
    );
    let SourceEvent::Exempt { cgroup, .. } = &got[2] else {
        unreachable!()
    };
    assert!(
        cgroup
            .to_str()
            .unwrap()
            .contains(&format!("-pod{}.slice", uid(4).replace('-', "_"))),
        "the node agent's pod cgroup: {}",
        cgroup.display()
    );
    let SourceEvent::Up(db) = &got[3] else {
        unreachable!()
    };
    assert_eq!(
        db.cgroup.to_str().unwrap(),
        format!(
            "/sys/fs/cgroup/kubepods.slice/kubepods-pod{}.slice",
            uid(8).replace('-', "_")
        ),
        "Guaranteed pods sit directly under the root"
    );
    let SourceEvent::Up(web2) = &got[5] else {
        unreachable!()
    };
    assert_eq!(web2.labels["track"], "canary");

    // Every request asked for this node's pods only; it listed three times, and each watch
    // resumed from the list before it (the watch after the re-list may not be sent yet).
    let requests = requests_until(&shared, |r| r.len() >= 5).await;
    for r in &requests {
        assert!(
            r.contains("fieldSelector=spec.nodeName%3Dnode-a"),
            "request without this node's field selector: {r}"
        );
    }
    let lists: Vec<_> = requests.iter().filter(|r| !r.contains("watch=")).collect();
    let watches: Vec<_> = requests.iter().filter(|r| r.contains("watch=")).collect();
    assert_eq!(lists.len(), 3, "{requests:#?}");
    assert!(watches[0].contains("resourceVersion=1000"), "{requests:#?}");
    assert!(
        watches.last().unwrap().contains("resourceVersion=1202"),
        "{requests:#?}"
    );
    source.abort();
}

/// A flood of changes that change nothing, and more pods than `max_pods`: the events stay
/// bounded by what changed and by `max_pods`, and the source stays on one watch.
#[tokio::test]
async fn a_flood_of_events_stays_bounded() {
    let list: Value = serde_json::from_str(&fixture("pods-list.json")).unwrap();
    let web = list["items"][0].clone();
    assert_eq!(web["metadata"]["uid"], uid(1));
    let mut events = Vec::new();
    for rv in 0..5000 {
        let mut p = web.clone();
        p["metadata"]["resourceVersion"] = format!("{}", 2000 + rv).into();
        events.push(serde_json::json!({"type": "MODIFIED", "object": p}).to_string());
    }
    let pod_n = |n: u32| {
        let mut p = web.clone();
        p["metadata"]["uid"] = uid(100 + n).into();
        p["metadata"]["name"] = format!("web-7d4b9c8f6d-f{n:04}").into();
        p
    };
    for n in 0..300 {
        events.push(serde_json::json!({"type": "ADDED", "object": pod_n(n)}).to_string());
    }
    events.push(serde_json::json!({"type": "DELETED", "object": web}).to_string());
    events.push(serde_json::json!({"type": "ADDED", "object": pod_n(999)}).to_string());

    let script = Script {
        lists: VecDeque::from([Reply::Json(StatusCode::OK, fixture("pods-list.json"))]),
        watches: VecDeque::from([Reply::Watch {
            lines: events,
            hang: true,
        }]),
        ..Script::default()
    };
    let (client, shared) = api_server(script).await;
    let (tx, mut rx) = mpsc::channel(4);
    let s = KubeSettings {
        max_pods: 100,
        ..settings()
    };
    let source = tokio::spawn(run(client, NODE.into(), s, tx));
    let got = short(&until(&mut rx, &up(100 + 999)).await);
    let mut expected = vec![up(1), up(2), exempt(4)];
    // web and api are up: 98 more fit under max_pods = 100; the rest are refused.
    expected.extend((0..98).map(|n| up(100 + n)));
    expected.push(down(1));
    expected.push(up(100 + 999));
    assert_eq!(got, expected);
    let requests = shared.lock().unwrap().requests.clone();
    assert_eq!(requests.len(), 2, "one list, one watch: {requests:#?}");
    source.abort();
}

/// The source stops when its consumer hangs up (the enforcer shutting down).
#[tokio::test]
async fn the_source_ends_when_its_consumer_is_gone() {
    let script = Script {
        lists: VecDeque::from([Reply::Json(StatusCode::OK, fixture("pods-list.json"))]),
        ..Script::default()
    };
    let (client, _shared) = api_server(script).await;
    let (tx, mut rx) = mpsc::channel(4);
    let source = tokio::spawn(run(client, NODE.into(), settings(), tx));
    until(&mut rx, &up(2)).await;
    drop(rx);
    let ended = tokio::time::timeout(Duration::from_secs(30), source)
        .await
        .expect("the source did not end");
    assert!(ended.unwrap().is_err());
}

/// In a cluster the source speaks HTTPS to the API server, trusting the cluster's CA and
/// presenting its service account's token: the same watch over TLS (rustls with ring, the
/// enforcer's provider) carries the token on every request.
#[tokio::test]
async fn the_source_speaks_https_with_a_bearer_token() {
    let script = Script {
        lists: VecDeque::from([Reply::Json(StatusCode::OK, fixture("pods-list.json"))]),
        ..Script::default()
    };
    let (client, shared) = tls_api_server(script, "sa-token-0123456789").await;
    let (tx, mut rx) = mpsc::channel(4);
    let source = tokio::spawn(run(client, NODE.into(), settings(), tx));
    let got = until(&mut rx, &up(2)).await;
    assert_eq!(short(&got), [up(1), up(2)]);
    let auths = shared.lock().unwrap().auths.clone();
    assert!(!auths.is_empty());
    assert!(
        auths.iter().all(|a| a == "Bearer sa-token-0123456789"),
        "{auths:?}"
    );
    source.abort();
}
