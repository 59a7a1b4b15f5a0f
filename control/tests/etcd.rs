//! Two control plane replicas on one real etcd, each serving its API over TLS on loopback:
//! they share one CA and one state, a join token enrols once across both, and a change
//! made through one reaches the watches opened on the other. Then a three-member etcd
//! loses a member and the replicas keep working.
mod support;

use std::{sync::Arc, time::Duration};

use rcgen::{KeyPair, PKCS_ED25519};
use support::{Served, csr, etcd::Etcd};
use tessera_control::{
    admin,
    api::WatchMessage,
    client::{Client, ClientError, Identity},
    etcd::{EtcdStore, EtcdUrl},
    plane::{ControlPlane, Credential, EnrolRequest, Enrolment, Settings},
};

type Replica = Served;

async fn plane(url: &EtcdUrl) -> Arc<ControlPlane> {
    let store = Arc::new(EtcdStore::connect(url).await.unwrap());
    // Twenty enrolments from loopback in a few seconds are this test's load, not an attack:
    // the per-source limit (tested in `plane::tests`) would refuse some of them.
    let mut settings = Settings::new("td");
    settings.enrol_per_source = std::num::NonZeroU32::new(1000).unwrap();
    Arc::new(ControlPlane::new(store, settings).await.unwrap())
}

async fn serve(plane: Arc<ControlPlane>) -> Replica {
    Served::start(plane, &["127.0.0.1"]).await
}

fn anon(r: &Replica) -> Client {
    r.anonymous()
}

/// A join token in scope `site=SITE`, made through replica `r`.
async fn token(
    r: &Replica,
    admin: &str,
    site: &str,
) -> Result<tessera_control::api::TokenResponse, ClientError> {
    anon(r)
        .create_token(
            admin,
            &format!("site={site}").parse().unwrap(),
            Duration::from_secs(60),
        )
        .await
}

async fn enrol(r: &Replica, name: &str, token: &str) -> Result<(KeyPair, Enrolment), ClientError> {
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let e = anon(r)
        .enrol(&EnrolRequest {
            name: name.into(),
            csr: csr(&key),
            credential: Credential::Token(token.into()),
        })
        .await?;
    Ok((key, e))
}

fn client(r: &Replica, key: &KeyPair, e: &Enrolment) -> Client {
    Client::new(
        std::slice::from_ref(&r.url),
        &r.ca,
        Some(Identity {
            cert_pem: &e.cert,
            key_pkcs8: &key.serialize_der(),
        }),
    )
    .unwrap()
}

async fn next(
    w: &mut (impl futures_util::Stream<Item = Result<WatchMessage, ClientError>> + Unpin),
) -> WatchMessage {
    support::next_within(w, Duration::from_secs(20)).await
}

const POLICY: &str = "rules:\n  - name: web-to-api\n    action: allow\n    from:\n      - labels: [app=web]\n    to:\n      - labels: [app=api]\n    ports: [8080]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_etcd_share_tokens_directory_and_policy() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let url = etcd.url("/tessera");
    // Both start at once on an empty etcd: they must agree on one CA, not make two.
    let (pa, pb) = tokio::join!(plane(&url), plane(&url));
    assert_eq!(pa.authority().ca_pem(), pb.authority().ca_pem());
    let admin_token = admin::create(pa.store(), "test-admin", 0).await.unwrap();
    let (a, b) = (serve(pa).await, serve(pb).await);
    // A token made through one replica is good through the other, exactly once: race
    // two enrolments with it, one through each replica.
    for round in 0..5 {
        let t = token(&a, &admin_token, "paris").await.unwrap();
        let (na, nb) = (format!("via-a-{round}"), format!("via-b-{round}"));
        let (ra, rb) = tokio::join!(enrol(&a, &na, &t.token), enrol(&b, &nb, &t.token));
        let wins = ra.is_ok() as usize + rb.is_ok() as usize;
        assert_eq!(wins, 1, "round {round}: {:?} / {:?}", ra.err(), rb.err());
        let lost = ra.err().or(rb.err()).unwrap();
        assert!(
            matches!(
                lost,
                ClientError::Refused {
                    status: 400..500,
                    ..
                }
            ),
            "round {round}: {lost}"
        );
    }
    // An enforcer enrolled through a watches through b; what a learns reaches it.
    let t = token(&a, &admin_token, "paris").await.unwrap();
    let (key, e) = enrol(&a, "watcher", &t.token).await.unwrap();
    let (_, w) = client(&b, &key, &e).watch().await.unwrap();
    let mut w = Box::pin(w);
    match next(&mut w).await {
        WatchMessage::Snapshot { directory, .. } => {
            assert!(
                directory.iter().any(|d| d.name == "watcher"),
                "{directory:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    anon(&a)
        .apply_policy(&admin_token, "p.yaml", POLICY)
        .await
        .unwrap();
    match next(&mut w).await {
        WatchMessage::Policy { policy, .. } => assert_eq!(policy.version, 1),
        other => panic!("{other:?}"),
    }
    let t = token(&b, &admin_token, "oslo").await.unwrap();
    enrol(&a, "newcomer", &t.token).await.unwrap();
    match next(&mut w).await {
        WatchMessage::Upsert { entry, .. } => assert_eq!(entry.name, "newcomer"),
        other => panic!("{other:?}"),
    }
    // Revoked through a: its own stream on b says so.
    anon(&a).revoke(&admin_token, "watcher").await.unwrap();
    loop {
        match next(&mut w).await {
            WatchMessage::Revoked { name } => {
                assert_eq!(name, "watcher");
                break;
            }
            WatchMessage::Upsert { .. } | WatchMessage::Remove { .. } => continue,
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_etcd_keeps_the_replicas_working_when_one_member_dies() {
    let Some(mut etcd) = Etcd::cluster(3).await else {
        return;
    };
    // Each replica knows every member.
    let url = etcd.url("/tessera");
    let p = plane(&url).await;
    let admin_token = admin::create(p.store(), "test-admin", 0).await.unwrap();
    let a = serve(p).await;
    let t = token(&a, &admin_token, "paris").await.unwrap();
    enrol(&a, "before", &t.token).await.unwrap();
    etcd.kill(0);
    // Writes go on through the two members left (a request may need a retry while the
    // client notices the dead member; bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let t = loop {
        match token(&a, &admin_token, "paris").await {
            Ok(t) => break t,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no write after losing a member: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    enrol(&a, "after", &t.token).await.unwrap();
    // And the token is still single-use.
    assert!(enrol(&a, "again", &t.token).await.is_err());
    let status = anon(&a).status(&admin_token).await.unwrap();
    let names: Vec<_> = status.enforcers.iter().map(|e| e.name.as_str()).collect();
    assert!(
        names.contains(&"before") && names.contains(&"after"),
        "{names:?}"
    );
}

/// A replica follows etcd with a fixed number of watches however many enforcers watch it
/// (issue 14): with one etcd watch per enforcer stream, each sent every write of the whole
/// installation (maps, tokens, reports), the etcd traffic of a fleet grew with N × writes.
/// Twenty streams on one replica add no etcd watch, and every stream still gets the
/// snapshot, the enforcers joining after it, and a policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforcer_streams_share_the_replicas_own_etcd_watches() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let p = plane(&etcd.url("/tessera")).await;
    let admin_token = admin::create(p.store(), "test-admin", 0).await.unwrap();
    let a = serve(p).await;
    let before = etcd.watchers();
    let mut streams = Vec::new();
    for i in 0..20 {
        let t = token(&a, &admin_token, "paris").await.unwrap();
        let (key, e) = enrol(&a, &format!("host-{i}"), &t.token).await.unwrap();
        let (_, w) = client(&a, &key, &e).watch().await.unwrap();
        let mut w = Box::pin(w);
        match next(&mut w).await {
            WatchMessage::Snapshot { directory, .. } => {
                assert!(directory.iter().any(|d| d.name == format!("host-{i}")));
                assert_eq!(directory.len(), i + 1);
            }
            other => panic!("{other:?}"),
        }
        streams.push(w);
    }
    anon(&a)
        .apply_policy(&admin_token, "p.yaml", POLICY)
        .await
        .unwrap();
    for (i, w) in streams.iter_mut().enumerate() {
        // Those who joined later, in order, then the policy.
        for j in i + 1..20 {
            match next(w).await {
                WatchMessage::Upsert { entry, .. } => assert_eq!(entry.name, format!("host-{j}")),
                other => panic!("stream {i}: {other:?}"),
            }
        }
        assert!(matches!(next(w).await, WatchMessage::Policy { .. }));
    }
    let after = etcd.watchers();
    assert!(
        after <= before.max(2),
        "20 enforcer streams: etcd holds {after} watches, {before} before them"
    );
}

/// A list larger than one gRPC message (4 MiB by default) comes back whole and at one
/// revision: a thousand enforcers' maps (26 MB) made the fleet's map fail with "decoded
/// message length too large" when read in one answer (issue 14, fleet bench).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_larger_than_a_grpc_message_is_read_whole() {
    use futures_util::StreamExt;
    use tessera_control::store::Store;
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let s = etcd.store("/tessera").await;
    let value = vec![b'x'; 20_000];
    futures_util::stream::iter(0..600)
        .map(|i| {
            let (s, v) = (s.clone(), value.clone());
            async move { s.put(&format!("fleet/maps/e{i:04}"), v).await.unwrap() }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    s.put("fleet/mapsz", b"not under the prefix".to_vec())
        .await
        .unwrap();
    let all = s.list("fleet/maps/").await.unwrap();
    assert_eq!(all.len(), 600);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));
    assert!(all.iter().all(|e| e.value == value));
    let w = s.watch("fleet/maps/").await.unwrap();
    assert_eq!(w.snapshot.len(), 600);
}
