//! Policy speed and memory at scale: 10,000 rules, 100,000 distinct identities.
//!
//! `cargo bench -p tessera-policy` reports (criterion) the time of a cached decision, an
//! uncached decision and a whole-policy compile, and prints the heap held by the compiled
//! policy and by a cache of 100,000 decisions (counted by a wrapping allocator).
//! Targets: cached <= 100 ns, uncached <= 5 us.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::Arc,
    sync::atomic::{AtomicIsize, Ordering},
};

use criterion::{Criterion, criterion_group, criterion_main};
use tessera_policy::{
    CompiledPolicy, Labels, Subject,
    cache::{DecisionCache, Interner},
    compile::no_dns,
};

struct Counting;
static HELD: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HELD.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HELD.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const RULES: usize = 10_000;
const IDENTITIES: usize = 100_000;
const SERVICES: usize = 1_000;

/// A policy of `RULES` rules over `SERVICES` services: mostly allows between service pairs
/// on a port, some with set expressions, every 50th a deny.
fn policy_text() -> String {
    let mut s = String::from("rules:\n");
    for i in 0..RULES {
        let (from, to) = (i % SERVICES, (i * 7 + 3) % SERVICES);
        let action = if i % 50 == 0 { "deny" } else { "allow" };
        s += &format!(
            "  - name: r{i}\n    action: {action}\n    from:\n      - labels: [app=svc-{from}, \"env in (prod, staging)\"]\n    to:\n      - labels: [app=svc-{to}, tier=t{}]\n    ports: [{}]\n",
            to % 10, // service svc-N runs in tier t(N % 10)
            8000 + i % 100
        );
    }
    s
}

fn identity(j: usize) -> Labels {
    Labels::new([
        ("app", format!("svc-{}", j % SERVICES)),
        ("env", ["prod", "staging", "dev"][j % 3].to_owned()),
        ("tier", format!("t{}", j % 10)),
        ("instance", j.to_string()),
    ])
}

fn bench(c: &mut Criterion) {
    let text = policy_text();
    let before = HELD.load(Ordering::Relaxed);
    let policy = Arc::new(CompiledPolicy::new(
        tessera_policy::parse::parse("bench.yaml", &text).unwrap(),
    ));
    let policy_bytes = HELD.load(Ordering::Relaxed) - before;
    let identities: Vec<Labels> = (0..IDENTITIES).map(identity).collect();
    let interner = Interner::default();
    let ids: Vec<u32> = identities
        .iter()
        .map(|l| interner.intern(Some(l), None))
        .collect();

    // Pairs that exercise the index: half are the source and destination of some rule i
    // (identity j is svc-(j % 1000) in env (j % 3) and tier t(j % 10)), half are random.
    // Computed up front so the benchmarks time decisions, not pair generation.
    let pair = |k: usize| {
        if k.is_multiple_of(2) {
            let i = (k / 2 * 7919) % RULES;
            let (from, to) = (i % SERVICES, (i * 7 + 3) % SERVICES);
            let src = from + SERVICES * ((k / 2) % (IDENTITIES / SERVICES));
            let dst = to + SERVICES * ((k / 2 * 31) % (IDENTITIES / SERVICES));
            (src, dst, 8000 + (i % 100) as u16)
        } else {
            (
                (k * 7919) % IDENTITIES,
                (k * 104_729) % IDENTITIES,
                8000 + (k % 100) as u16,
            )
        }
    };
    let pairs: Vec<(usize, usize, u16)> = (0..IDENTITIES).map(pair).collect();
    let pair = |k: usize| pairs[k % pairs.len()];
    // One uncached decision for pair `k`.
    let decide = |k: usize| {
        let (s, d, p) = pair(k);
        policy.decide(
            &Subject {
                labels: Some(&identities[s]),
                addr: None,
            },
            &Subject {
                labels: Some(&identities[d]),
                addr: None,
            },
            p,
            &no_dns,
        )
    };
    let allowed = (0..10_000).filter(|&k| decide(k).allowed()).count();

    let mut k = 0usize;
    c.bench_function("uncached decision (10k rules)", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            black_box(decide(k))
        })
    });

    let cache = DecisionCache::new(policy.clone(), 1 << 20);
    let before_cache = HELD.load(Ordering::Relaxed);
    for k in 0..IDENTITIES {
        let (s, d, p) = pair(k);
        cache.decide(
            (
                ids[s],
                &Subject {
                    labels: Some(&identities[s]),
                    addr: None,
                },
            ),
            (
                ids[d],
                &Subject {
                    labels: Some(&identities[d]),
                    addr: None,
                },
            ),
            p,
            &no_dns,
        );
    }
    let cache_bytes = HELD.load(Ordering::Relaxed) - before_cache;
    let mut k = 0usize;
    c.bench_function("cached decision", |b| {
        b.iter(|| {
            k = (k + 1) % IDENTITIES;
            let (s, d, p) = pair(k);
            black_box(cache.get(ids[s], ids[d], p))
        })
    });

    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.bench_function("parse + compile 10k rules", |b| {
        b.iter(|| {
            black_box(CompiledPolicy::new(
                tessera_policy::parse::parse("bench.yaml", &text).unwrap(),
            ))
        })
    });
    group.finish();

    println!(
        "\npolicy memory: compiled policy of {RULES} rules holds {:.1} MiB; a cache of {} decisions holds {:.1} MiB ({:.0} B each); \
         {} distinct identities interned; {allowed} of 10000 sampled pairs allowed",
        policy_bytes as f64 / (1 << 20) as f64,
        cache.len(),
        cache_bytes as f64 / (1 << 20) as f64,
        cache_bytes as f64 / cache.len().max(1) as f64,
        interner.len(),
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
