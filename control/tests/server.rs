//! The control plane's API end to end over real TLS on loopback: enrolment, the directory
//! watch, renewal, revocation reaching watchers, and the refusals an attacker meets.
mod support;

use std::{sync::Arc, time::Duration};

use rcgen::{KeyPair, PKCS_ED25519};
use support::{Served, csr};
use tessera_control::{
    admin,
    api::WatchMessage,
    client::{Client, ClientError, Identity},
    plane::{ControlPlane, Credential, EnrolRequest, Enrolment, Settings},
    registry::Serves,
    store::Embedded,
};

/// A server on an embedded store, with its administrator's token.
struct Server {
    served: Served,
    admin: String,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Server {
    type Target = Served;
    fn deref(&self) -> &Served {
        &self.served
    }
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Embedded::open(&dir.path().join("control.redb")).unwrap());
    let plane = Arc::new(ControlPlane::new(store, Settings::new("td")).await.unwrap());
    let admin = admin::create(plane.store(), "test-admin", 0).await.unwrap();
    Server {
        served: Served::start(plane, &["127.0.0.1", "localhost"]).await,
        admin,
        _dir: dir,
    }
}

struct Enforcer {
    key: KeyPair,
    enrolment: Enrolment,
}

impl Enforcer {
    fn client(&self, s: &Server) -> Client {
        Client::new(
            std::slice::from_ref(&s.url),
            &s.ca,
            Some(Identity {
                cert_pem: &self.enrolment.cert,
                key_pkcs8: &self.key.serialize_der(),
            }),
        )
        .unwrap()
    }
}

async fn enrol(s: &Server, name: &str, scope: &str) -> Enforcer {
    let anon = Client::new(std::slice::from_ref(&s.url), &s.ca, None).unwrap();
    let t = anon
        .create_token(&s.admin, &scope.parse().unwrap(), Duration::from_secs(60))
        .await
        .unwrap();
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let enrolment = anon
        .enrol(&EnrolRequest {
            name: name.into(),
            csr: csr(&key),
            credential: Credential::Token(t.token),
        })
        .await
        .unwrap();
    Enforcer { key, enrolment }
}

async fn next(
    w: &mut (impl futures_util::Stream<Item = Result<WatchMessage, ClientError>> + Unpin),
) -> WatchMessage {
    support::next_within(w, Duration::from_secs(10)).await
}

#[tokio::test]
async fn enrol_watch_renew_and_revoke_over_mutual_tls() {
    let s = start().await;
    let a = enrol(&s, "host-a", "site=paris").await;
    assert_eq!(a.enrolment.scope.to_string(), "site=paris");
    let ca = a.client(&s);
    ca.report(
        &Serves {
            tunnel: Some("10.0.0.1:15008".parse().unwrap()),
            serves: vec!["10.0.0.1/32".parse().unwrap()],
            ..Default::default()
        },
        0,
    )
    .await
    .unwrap();
    let (_, w) = ca.watch().await.unwrap();
    let mut w = Box::pin(w);
    match next(&mut w).await {
        WatchMessage::Snapshot { directory, .. } => {
            assert_eq!(directory.len(), 1);
            assert_eq!(directory[0].tunnel, Some("10.0.0.1:15008".parse().unwrap()));
        }
        other => panic!("{other:?}"),
    }
    // A second enforcer appears in the first one's stream.
    let b = enrol(&s, "host-b", "site=london").await;
    match next(&mut w).await {
        WatchMessage::Upsert { entry, .. } => assert_eq!(entry.name, "host-b"),
        other => panic!("{other:?}"),
    }
    // Policy applied centrally reaches it too; a broken one is refused and sends nothing.
    let admin = Client::new(std::slice::from_ref(&s.url), &s.ca, None).unwrap();
    let bad = admin
        .apply_policy(
            &s.admin,
            "p.yaml",
            "rules:\n  - name: x\n    action: allow\n    ports: [nope]\n",
        )
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("p.yaml:4:"), "{bad}");
    let good = "rules:\n  - name: web-to-api\n    action: allow\n    from:\n      - labels: [app=web]\n    to:\n      - labels: [app=api]\n    ports: [8080]\n";
    admin.apply_policy(&s.admin, "p.yaml", good).await.unwrap();
    match next(&mut w).await {
        WatchMessage::Policy { policy, .. } => assert_eq!(policy.version, 1),
        other => panic!("{other:?}"),
    }
    // Renewal keeps the scope from the record.
    let b_client = b.client(&s);
    let renewed = b_client.renew(&csr(&b.key)).await.unwrap();
    assert_eq!(renewed.scope.to_string(), "site=london");
    // The renewal changed b's certificate: a directory update, not a removal.
    assert!(matches!(next(&mut w).await, WatchMessage::Upsert { .. }));
    // b's own watch, then its revocation: a's stream drops it and b's stream says so.
    let b2 = Enforcer {
        key: KeyPair::from_pem(&b.key.serialize_pem()).unwrap(),
        enrolment: renewed,
    };
    let (_, wb) = b2.client(&s).watch().await.unwrap();
    let mut wb = Box::pin(wb);
    assert!(matches!(next(&mut wb).await, WatchMessage::Snapshot { .. }));
    let t0 = std::time::Instant::now();
    admin.revoke(&s.admin, "host-b").await.unwrap();
    match next(&mut w).await {
        WatchMessage::Remove { name, .. } => assert_eq!(name, "host-b"),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(
        next(&mut wb).await,
        WatchMessage::Revoked {
            name: "host-b".into()
        }
    );
    // Revoked: b can neither renew nor watch.
    let err = b2.client(&s).renew(&csr(&b.key)).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Refused { status: 403, .. }),
        "{err}"
    );
    assert!(b2.client(&s).watch().await.is_err());
    let status = admin.status(&s.admin).await.unwrap();
    assert_eq!(status.enforcers.len(), 2);
    assert_eq!(status.policy_version, 1);
}

#[tokio::test]
async fn refusals_without_credentials() {
    let s = start().await;
    let anon = Client::new(std::slice::from_ref(&s.url), &s.ca, None).unwrap();
    // Enforcer routes without a certificate.
    for r in [
        anon.renew("x").await.map(|_| ()),
        anon.report(&Serves::default(), 0).await,
        anon.watch().await.map(|_| ()),
    ] {
        assert!(
            matches!(r, Err(ClientError::Refused { status: 401, .. })),
            "{:?}",
            r.err()
        );
    }
    // Admin routes without, or with a wrong, token.
    for t in ["", "tsa1.forged", &format!("{}x", s.admin)] {
        let r = anon.status(t).await;
        assert!(
            matches!(r, Err(ClientError::Refused { status: 401, .. })),
            "{t}: {:?}",
            r.err()
        );
    }
    // An unknown token, and a client that trusts another CA (a server in the middle).
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let r = anon
        .enrol(&EnrolRequest {
            name: "x".into(),
            csr: csr(&key),
            credential: Credential::Token(format!("tsr1.{}", "A".repeat(43))),
        })
        .await;
    assert!(
        matches!(r, Err(ClientError::Refused { status: 403, ref message, .. }) if message.contains("unknown")),
        "{r:?}"
    );
    let other = start().await;
    let wrong = Client::new(std::slice::from_ref(&s.url), &other.ca, None).unwrap();
    assert!(matches!(
        wrong.status(&s.admin).await,
        Err(ClientError::Unreachable { .. })
    ));
    // A certificate from another control plane's CA is refused at the TLS layer.
    let foreign = enrol(&other, "host-x", "").await;
    let c = Client::new(
        std::slice::from_ref(&s.url),
        &s.ca,
        Some(Identity {
            cert_pem: &foreign.enrolment.cert,
            key_pkcs8: &foreign.key.serialize_der(),
        }),
    )
    .unwrap();
    assert!(c.watch().await.is_err());
}
