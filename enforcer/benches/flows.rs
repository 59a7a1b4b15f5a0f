//! Cost of recording a flow (it sits on every connection's path, in the flow writer task)
//! and memory per 10,000 flows. `cargo bench -p tessera-enforcer --bench flows`.
//!
//! Baseline in the same run: serializing the record to a JSON line, which the flow log
//! writer does for every record anyway. Memory is counted exactly by a counting allocator:
//! the bytes still allocated after 10,000 records went into a store (recent buffer, map,
//! metrics), over 100 distinct edges.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicIsize, Ordering::Relaxed},
    },
};

use criterion::{Criterion, criterion_group, criterion_main};
use tessera_enforcer::{flowstore::FlowStore, metrics::Metrics};
use tessera_proxy::flow::{Direction, Endpoint, FlowRecord, Verdict};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn record(i: usize) -> FlowRecord {
    let labels = |app: &str, w: String| {
        [
            ("app".to_string(), app.to_string()),
            ("tessera.io/enforcer".into(), "host-a".into()),
            ("tessera.io/workload".into(), w),
            ("tessera.io/uid".into(), "0".into()),
            ("tessera.io/exe".into(), "/usr/bin/curl".into()),
        ]
        .into_iter()
        .collect()
    };
    let (s, d) = (i % 10, (i / 10) % 10);
    let mut src = Endpoint::addr(
        format!("10.77.0.1:{}", 40_000 + i % 20_000)
            .parse()
            .unwrap(),
    );
    src.workload = Some(format!("web{s}"));
    src.enforcer = Some("host-a".into());
    src.spiffe = Some(format!(
        "spiffe://tessera.local/enforcer/host-a/workload/web{s}"
    ));
    src.labels = labels("web", format!("web{s}"));
    let mut dst = Endpoint::addr("10.77.0.2:8080".parse().unwrap());
    dst.workload = Some(format!("api{d}"));
    dst.enforcer = Some("host-b".into());
    dst.spiffe = Some(format!(
        "spiffe://tessera.local/enforcer/host-b/workload/api{d}"
    ));
    dst.labels = labels("api", format!("api{d}"));
    FlowRecord {
        start_ms: 1_800_000_000_000 + i as u64,
        duration_ms: 3,
        reporter: "host-a".into(),
        direction: Direction::Outbound,
        src,
        dst,
        protocol: Default::default(),
        mode: Default::default(),
        verdict: Verdict::Allowed,
        reason: String::new(),
        code: Default::default(),
        rule: Some("web-to-api".into()),
        bytes_sent: 512,
        bytes_received: 4096,
        pooled: Some(true),
        count: None,
        packets: None,
    }
}

fn bench(c: &mut Criterion) {
    let records: Vec<FlowRecord> = (0..10_000).map(record).collect();

    // Memory: a store holding 10,000 records (its recent-buffer size) and their map.
    let before = LIVE.load(Relaxed);
    let store = FlowStore::open("host-a".into(), None, 10_000, Arc::new(Metrics::new())).unwrap();
    for r in &records {
        tessera_proxy::flow::FlowSink::record(&*store, Arc::new(r.clone()));
    }
    let held = LIVE.load(Relaxed) - before;
    println!(
        "memory: {:.1} KiB per 10,000 flows held by the store ({} B per flow; buffer, map of {} edges, metrics)",
        held as f64 / 1024.0,
        held / 10_000,
        store.map().edges.len()
    );

    let mut i = 0;
    c.bench_function("baseline: flow record to a JSON line", |b| {
        b.iter(|| {
            i += 1;
            black_box(serde_json::to_vec(&records[i % records.len()]).unwrap())
        })
    });
    let shared: Vec<Arc<FlowRecord>> = records.iter().cloned().map(Arc::new).collect();
    let mut j = 0;
    c.bench_function("record a flow (buffer, map, metrics)", |b| {
        b.iter(|| {
            j += 1;
            tessera_proxy::flow::FlowSink::record(
                &*store,
                black_box(shared[j % shared.len()].clone()),
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
