//! The daemon's allocator gives back what it freed (`tessera_enforcer::alloc`): jemalloc,
//! as in the binary, with the process's resident memory read from /proc before and after.
//! One test in its own process, so nothing else allocates while it measures.
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const CHUNK: usize = 64 << 10;
const CHUNKS: usize = 1024; // 64 MiB

fn resident_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096.0 / (1 << 20) as f64
}

/// Allocates 64 MiB in 64 KiB pieces, touches every page, frees it all: jemalloc keeps
/// the pages; returns the resident size with them held.
fn burst() -> f64 {
    let mut held: Vec<Vec<u8>> = (0..CHUNKS).map(|i| vec![i as u8 | 1; CHUNK]).collect();
    assert!(held.iter().all(|c| c[CHUNK - 1] != 0));
    held.clear();
    drop(held);
    resident_mib()
}

#[test]
fn freed_memory_returns_to_the_kernel_at_once_when_asked_and_in_the_background_when_idle() {
    let before = resident_mib();
    let after_burst = burst();
    assert!(
        after_burst - before > 48.0,
        "jemalloc should keep a freed burst ({before:.1} -> {after_burst:.1} MiB)"
    );
    tessera_enforcer::alloc::return_unused().unwrap();
    let returned = resident_mib();
    assert!(
        after_burst - returned > 48.0,
        "return_unused gave back too little: {after_burst:.1} -> {returned:.1} MiB"
    );

    // In the background: nothing allocates after the burst, and the pages still go back
    // (jemalloc's decay spreads them over about 10 s; its background thread may return some
    // while the burst is still being freed, so only most of it is asked to be held here).
    tessera_enforcer::alloc::purge_in_background().unwrap();
    let held = burst();
    assert!(held - returned > 24.0, "{returned:.1} -> {held:.1} MiB");
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut now = held;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        now = resident_mib();
        if now - returned < 16.0 {
            return;
        }
    }
    panic!(
        "an idle process kept its freed burst for 40 s: {returned:.1} -> {held:.1} -> {now:.1} MiB"
    );
}
