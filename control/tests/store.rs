//! The store contract run against both backends — the embedded file and a real etcd on
//! loopback — plus what only etcd has: a network to lose and history to compact.
mod support;

use std::{sync::Arc, time::Duration};

use support::{contract, etcd::Etcd};
use tessera_control::{
    etcd::EtcdStore,
    store::{Embedded, Store, StoreError},
};

fn embedded() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let s = Embedded::open(&dir.path().join("control.redb")).unwrap();
    (dir, Arc::new(s))
}

/// Runs one contract body on each backend.
macro_rules! contract {
    ($name:ident) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn embedded() {
                let (_d, s) = super::embedded();
                contract::$name(s).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                let Some(etcd) = Etcd::start().await else {
                    return;
                };
                contract::$name(Arc::new(etcd.store("/contract").await)).await;
            }
        }
    };
}

contract!(revisions_grow_and_put_if_is_exactly_once);
contract!(racing_conditional_writes_have_one_winner);
contract!(list_is_by_prefix_in_key_order);
contract!(a_watch_misses_nothing_between_snapshot_and_changes);
contract!(a_watch_opened_during_writes_sees_each_write_once);

#[tokio::test]
async fn installations_sharing_an_etcd_do_not_see_each_other() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let a = etcd.store("/site-a").await;
    let b = etcd.store("/site-b/tessera").await;
    let mut wa = a.watch("").await.unwrap();
    a.put("policy/current", b"a".to_vec()).await.unwrap();
    b.put("policy/current", b"b".to_vec()).await.unwrap();
    b.put("enforcers/x", b"b".to_vec()).await.unwrap();
    assert_eq!(a.get("policy/current").await.unwrap().unwrap().value, b"a");
    assert_eq!(b.get("policy/current").await.unwrap().unwrap().value, b"b");
    assert_eq!(a.list("").await.unwrap().len(), 1);
    assert!(a.get("enforcers/x").await.unwrap().is_none());
    let ev = next(&mut wa).await;
    assert_eq!(ev.key(), "policy/current");
    // b's writes never reach a's watch: the next thing it sees is a's own write.
    a.put("last", vec![]).await.unwrap();
    assert_eq!(next(&mut wa).await.key(), "last");
}

#[tokio::test]
async fn an_unreachable_etcd_is_an_error_naming_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("etcd://127.0.0.1:{port}").parse().unwrap();
    let t0 = std::time::Instant::now();
    let err = EtcdStore::connect(&url)
        .await
        .err()
        .expect("nothing listens");
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn losing_etcd_ends_watches_and_fails_requests() {
    let Some(mut etcd) = Etcd::start().await else {
        return;
    };
    let s = etcd.store("/t").await;
    let mut w = s.watch("").await.unwrap();
    s.put("a", vec![]).await.unwrap();
    assert_eq!(next(&mut w).await.key(), "a");
    etcd.kill(0);
    // The watch ends with an error (the caller watches anew) rather than going quiet.
    let ended = tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .expect("the watch ends within 30 s");
    assert!(ended.is_err(), "{ended:?}");
    let err = s.put("b", vec![]).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Unreachable { .. }) && err.to_string().contains("127.0.0.1:"),
        "{err}"
    );
}

#[tokio::test]
async fn a_watch_from_compacted_history_is_lagged() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let s = etcd.store("/t").await;
    let old = s.put("a", b"1".to_vec()).await.unwrap();
    s.put("a", b"2".to_vec()).await.unwrap();
    let now = s.put("a", b"3".to_vec()).await.unwrap();
    // Resuming after the latest revision works...
    let mut w = s.changes("", now).await.unwrap();
    s.put("b", vec![]).await.unwrap();
    assert_eq!(next(&mut w).await.key(), "b");
    // ...but once history is compacted, resuming from before it says "resynchronise".
    let mut c =
        etcd_client::Client::connect([format!("http://{}", etcd.url("/t").endpoints[0])], None)
            .await
            .unwrap();
    c.compact(i64::try_from(now).unwrap(), None).await.unwrap();
    // (etcd may accept the watch and cancel it right after: then the first change is the
    // error.)
    let lagged = match s.changes("", old).await {
        Ok(mut w) => tokio::time::timeout(Duration::from_secs(20), w.next())
            .await
            .expect("an answer within 20 s")
            .map(|ev| ev.key().to_string()),
        Err(e) => Err(e),
    };
    assert!(
        matches!(lagged, Err(StoreError::Lagged(n)) if n > 0),
        "{lagged:?}"
    );
}

async fn next(w: &mut tessera_control::store::Watch) -> tessera_control::store::Event {
    tokio::time::timeout(Duration::from_secs(20), w.next())
        .await
        .expect("a change within 20 s")
        .unwrap()
}

/// etcd over TLS with client certificates (`etcds://`, etcd's `--client-cert-auth`): the
/// store works with a certificate of etcd's CA. In the clear, with a certificate of another
/// CA, without certificates for an `etcds://` URL, or with certificates for an `etcd://`
/// one, it is refused with an error naming the endpoint, and never falls back to plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_needs_a_client_certificate_of_its_ca() {
    let Some((etcd, files)) = Etcd::start_tls().await else {
        return;
    };
    let url = etcd.url("/tls");
    assert!(url.to_string().starts_with("etcds://"), "{url}");
    let s = etcd.store("/tls").await;
    s.put("k", b"v".to_vec()).await.unwrap();
    assert_eq!(s.get("k").await.unwrap().unwrap().value, b"v");
    let endpoint = url.endpoints[0].clone();
    let refused = |r: Result<EtcdStore, StoreError>, what: &str| {
        let err = r.err().unwrap_or_else(|| panic!("{what}: connected"));
        assert!(
            err.to_string().contains(&endpoint),
            "{what}: the error does not name {endpoint}: {err}"
        );
        err.to_string()
    };
    let mut plain = url.clone();
    plain.tls = false;
    refused(EtcdStore::connect(&plain).await, "in the clear");
    refused(
        EtcdStore::connect_with(&url, Some(&files.stranger)).await,
        "another CA's certificate",
    );
    let e = refused(
        EtcdStore::connect(&url).await,
        "etcds:// without certificates",
    );
    assert!(e.contains("--etcd-cert"), "{e}");
    let e = refused(
        EtcdStore::connect_with(&plain, Some(&files.client)).await,
        "certificates for etcd://",
    );
    assert!(e.contains("etcds://"), "{e}");
}
