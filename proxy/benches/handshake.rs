//! The handshake engine's own cost per connection: all six packets of one TCP handshake
//! through both ends (client SYN out, server SYN in, server SYN-ACK out, client SYN-ACK in,
//! client ACK out, server ACK in), in user space only (no NFQUEUE, no kernel). Ephemeral
//! keys reused within their window (the default) against a new key per connection.
//! `cargo bench -p tessera-proxy --features testkit --bench handshake`.
use std::{
    hint::black_box,
    sync::atomic::{AtomicU32, Ordering},
};

use criterion::{Criterion, criterion_group, criterion_main};
use tessera_proxy::handshake::engine::fixture::{NOW, connect, pair_with};

fn bench(c: &mut Criterion) {
    for (name, reuse_ms) in [
        ("handshake, keys reused within 1 s", 1_000),
        ("handshake, a new key per connection", 0),
    ] {
        let p = pair_with("api", reuse_ms);
        // Every handshake a new ISN (so a new connection, never a retransmission), at a
        // fixed time inside one key window.
        let isn = AtomicU32::new(1);
        c.bench_function(name, |b| {
            b.iter(|| {
                let n = isn.fetch_add(10_000, Ordering::Relaxed);
                assert!(black_box(connect(&p, n, NOW)), "the handshake failed");
            })
        });
        // Finished handshakes are kept until they expire; keep the state bounded.
        p.a.expire(NOW + 60_000);
        p.b.expire(NOW + 60_000);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
