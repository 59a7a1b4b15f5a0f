//! What every [`Store`] must do, written once and run against each backend (the embedded
//! file and a real etcd): the guarantees enrolment and the directory watch rely on.
#![allow(dead_code)]

use std::sync::Arc;

use tessera_control::store::{Event, Store};

/// Revisions grow; a conditional write succeeds exactly once per version read.
pub async fn revisions_grow_and_put_if_is_exactly_once(s: Arc<dyn Store>) {
    assert_eq!(s.get("a").await.unwrap(), None);
    let r1 = s
        .put_if("a", b"1".to_vec(), None)
        .await
        .unwrap()
        .expect("a create of an absent key wins");
    // A second create of the same key loses.
    assert_eq!(s.put_if("a", b"2".to_vec(), None).await.unwrap(), None);
    let e = s.get("a").await.unwrap().unwrap();
    assert_eq!((e.value.as_slice(), e.version), (b"1".as_slice(), r1));
    // Only the writer that read version r1 wins; the other finds a newer version.
    let r2 = s
        .put_if("a", b"3".to_vec(), Some(r1))
        .await
        .unwrap()
        .expect("the write at the version read wins");
    assert!(r2 > r1, "{r2} > {r1}");
    assert_eq!(s.put_if("a", b"4".to_vec(), Some(r1)).await.unwrap(), None);
    let e = s.get("a").await.unwrap().unwrap();
    assert_eq!((e.value.as_slice(), e.version), (b"3".as_slice(), r2));
    // An unconditional write moves the revision on too.
    let r3 = s.put("b", vec![]).await.unwrap();
    assert!(r3 > r2, "{r3} > {r2}");
    assert!(s.delete("a").await.unwrap());
    assert!(!s.delete("a").await.unwrap());
    // Deleted is absent again: a create wins, a write at the old version does not.
    assert_eq!(s.put_if("a", b"5".to_vec(), Some(r2)).await.unwrap(), None);
    assert!(s.put_if("a", b"6".to_vec(), None).await.unwrap().is_some());
}

/// Sixteen writers race with the version they all read: one wins.
pub async fn racing_conditional_writes_have_one_winner(s: Arc<dyn Store>) {
    let v = s.put("token", b"unused".to_vec()).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.put_if("token", format!("used by {i}").into_bytes(), Some(v))
                    .await
                    .unwrap()
                    .is_some()
            })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        winners += t.await.unwrap() as usize;
    }
    assert_eq!(winners, 1);
}

/// A list is every key with the prefix, in key order, and nothing else.
pub async fn list_is_by_prefix_in_key_order(s: Arc<dyn Store>) {
    s.put("enforcers/b", b"2".to_vec()).await.unwrap();
    s.put("enforcers/a", b"1".to_vec()).await.unwrap();
    s.put("enforcersz", b"x".to_vec()).await.unwrap();
    s.put("policy/current", b"p".to_vec()).await.unwrap();
    let keys: Vec<_> = s
        .list("enforcers/")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["enforcers/a", "enforcers/b"]);
    assert_eq!(s.list("").await.unwrap().len(), 4);
    assert!(s.list("nothing/").await.unwrap().is_empty());
}

/// A watch's snapshot plus its events are every change under the prefix, once, in order.
pub async fn a_watch_misses_nothing_between_snapshot_and_changes(s: Arc<dyn Store>) {
    s.put("dir/a", b"1".to_vec()).await.unwrap();
    let mut w = s.watch("dir/").await.unwrap();
    assert_eq!(w.snapshot.len(), 1);
    assert_eq!(w.snapshot[0].key, "dir/a");
    let at = w.revision;
    assert!(at >= w.snapshot[0].version);
    let rb = s.put("dir/b", b"2".to_vec()).await.unwrap();
    s.put("other", b"-".to_vec()).await.unwrap();
    s.delete("dir/a").await.unwrap();
    let e1 = next(&mut w).await;
    assert!(
        matches!(&e1, Event::Put(e) if e.key == "dir/b" && e.version == rb),
        "{e1:?}"
    );
    let e2 = next(&mut w).await;
    assert!(
        matches!(&e2, Event::Delete { key, revision } if key == "dir/a" && *revision > rb),
        "{e2:?}"
    );
    assert_eq!(w.revision, e2.revision());
    // Many writes while nobody reads: all of them arrive, in order, none twice.
    let mut written = Vec::new();
    for i in 0..200 {
        written.push(s.put(&format!("dir/k{i}"), vec![i as u8]).await.unwrap());
    }
    for want in written {
        assert_eq!(next(&mut w).await.revision(), want);
    }
}

/// A watch opened while another task writes sees every write exactly once: in its
/// snapshot or as a change, never both, never neither.
pub async fn a_watch_opened_during_writes_sees_each_write_once(s: Arc<dyn Store>) {
    const N: usize = 300;
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..N {
                s.put(&format!("w/{i:04}"), vec![]).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    // Open it somewhere in the middle of the writes.
    while s.list("w/").await.unwrap().len() < 20 {
        tokio::task::yield_now().await;
    }
    let mut w = s.watch("w/").await.unwrap();
    let mut seen: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for e in &w.snapshot {
        *seen.entry(e.key.clone()).or_default() += 1;
    }
    assert!(
        w.snapshot.len() < N,
        "the watch opened after the writes: nothing tested"
    );
    let mut last = w.revision;
    for _ in w.snapshot.len()..N {
        let ev = next(&mut w).await;
        assert!(ev.revision() > last, "{} after {last}", ev.revision());
        last = ev.revision();
        *seen.entry(ev.key().to_string()).or_default() += 1;
    }
    writer.await.unwrap();
    assert_eq!(seen.len(), N);
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
}

async fn next(w: &mut tessera_control::store::Watch) -> Event {
    tokio::time::timeout(std::time::Duration::from_secs(20), w.next())
        .await
        .expect("a change within 20 s")
        .unwrap()
}
