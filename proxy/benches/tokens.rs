//! Token cost per connection: signing, and verifying a cold token (full identity, first
//! contact) and a warm one (digest of a cached identity). `cargo bench -p tessera-proxy`.
use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use rcgen::{KeyPair, PKCS_ED25519};
use tessera_policy::Labels;
use tessera_proxy::identity::{Identity, signer::Signer, spiffe_id, verifier::Verifier};

fn bench(c: &mut Criterion) {
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let signer = Signer::from_pkcs8(&key.serialize_der()).unwrap();
    let verifier = Verifier::new(1_000, 600_000);
    verifier.trust(signer.public_key());
    let id = Identity {
        spiffe: spiffe_id("tessera.local", "host-a", "web"),
        labels: Labels::new([
            ("app", "web"),
            ("tier", "front"),
            ("env", "prod"),
            ("team", "payments"),
        ]),
    };
    let dst = "10.77.0.2:8080".parse().unwrap();
    let session = [3u8; 16];
    let now = 1_800_000_000_000u64;

    c.bench_function("sign cold token", |b| {
        b.iter(|| black_box(signer.sign(&id, false, dst, session, now, 10_000)))
    });
    c.bench_function("sign warm token", |b| {
        b.iter(|| black_box(signer.sign(&id, true, dst, session, now, 10_000)))
    });
    // Each verify needs an unseen nonce, so tokens are signed in the (untimed) setup.
    c.bench_function("verify cold token", |b| {
        b.iter_batched(
            || signer.sign(&id, false, dst, session, now, 10_000),
            |t| black_box(verifier.verify(&t, now, dst, &session).expect("valid")),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("verify warm token (cached identity)", |b| {
        b.iter_batched(
            || signer.sign(&id, true, dst, session, now, 10_000),
            |t| black_box(verifier.verify(&t, now, dst, &session).expect("valid")),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
