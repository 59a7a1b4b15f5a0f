//! Tunnel mode end to end in one process (see [`super::tunnel`]): every refusal the tunnel
//! path can produce, revocation on reload, pool retry, exact byte counts and half-close,
//! checked at both enforcers (their flow records) and at both applications (bytes, EOF,
//! resets).
use std::{
    io::ErrorKind::ConnectionReset,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{apps::*, tunnel::*};
use crate::{
    TUNNEL_ALPN,
    capture::Origin,
    flow::{Direction, FlowRecord, Mode, Verdict, now_ms},
    identity::{Identity, session::Proof, signer::Signer},
    local::LocalAddrs,
    wire::{MAGIC, Request, Status, VERSION},
};

/// A record's refusal code, as text (the field is about to become a typed code).
fn code(rec: &FlowRecord) -> &str {
    rec.code.as_str()
}

/// Both ends' records of one connection: host-a's, then host-b's.
async fn records(fx: &mut Fixture) -> (FlowRecord, FlowRecord) {
    (fx.a.record().await, fx.b.record().await)
}

fn assert_outcome(rec: &FlowRecord, verdict: Verdict, expected: &str) {
    assert_eq!((rec.verdict, code(rec)), (verdict, expected), "{rec:#?}");
}

fn assert_bytes(rec: &FlowRecord, sent: usize, received: usize) {
    assert_eq!(
        (rec.bytes_sent, rec.bytes_received),
        (sent as u64, received as u64),
        "{rec:#?}"
    );
}

const DENY_WEB_TO_API: &str = "rules:\n  - {name: no-web-to-api, action: deny, from: {labels: [app=web]}, to: {labels: [app=api]}}\n";

fn spec_a(a: HostSpec) -> Spec {
    Spec {
        a,
        ..Spec::default()
    }
}

fn spec_b(b: HostSpec) -> Spec {
    Spec {
        b,
        ..Spec::default()
    }
}

#[tokio::test]
async fn byte_counts_are_exact_at_both_ends() {
    const N: usize = 1_000_003;
    let mut fx = Fixture::start(Spec::default()).await;
    let (mut r, mut w) = fx.connect(fx.talk.addr).await.into_split();
    let (sent, (received, read)) = within("the exchange", async {
        tokio::join!(send(&mut w, N), drain(&mut r))
    })
    .await;
    sent.unwrap();
    read.unwrap();
    assert_eq!(received, TALK_LEN as u64);
    let seen = fx.talk.seen().await;
    assert_eq!((seen.received, seen.end), (N as u64, Ok(())));
    assert_eq!(seen.peer.ip(), IpAddr::V4(DELIVERY_SRC));
    let (a, b) = records(&mut fx).await;
    for rec in [&a, &b] {
        assert_outcome(rec, Verdict::Allowed, "");
        assert_eq!(rec.reason, "");
        assert_bytes(rec, N, TALK_LEN);
        assert_eq!(rec.mode, Mode::Tunnel);
        assert_eq!(rec.rule.as_deref(), Some("web-to-api"));
        assert_eq!(rec.src.workload.as_deref(), Some("web"));
        assert_eq!(rec.dst.workload.as_deref(), Some("talk"));
        assert_eq!(
            rec.src.spiffe.as_deref(),
            Some("spiffe://td/enforcer/host-a/workload/web")
        );
        assert_eq!(
            rec.dst.spiffe.as_deref(),
            Some("spiffe://td/enforcer/host-b/workload/talk")
        );
        assert_eq!(
            (rec.src.enforcer.as_deref(), rec.dst.enforcer.as_deref()),
            (Some("host-a"), Some("host-b"))
        );
    }
    assert_eq!(
        (a.reporter.as_str(), a.direction, a.dst.addr),
        ("host-a", Direction::Outbound, fx.talk.addr)
    );
    assert_eq!((a.src.pid, a.src.uid), (Some(4242), Some(1000)));
    assert!(a.pooled.is_some());
    assert_eq!(
        (b.reporter.as_str(), b.direction, b.dst.addr),
        ("host-b", Direction::Inbound, fx.talk.addr)
    );
}

#[tokio::test]
async fn half_close_lets_the_workload_reply_after_eof() {
    let mut fx = Fixture::start(Spec::default()).await;
    let mut c = fx.connect(fx.reply.addr).await;
    c.write_all(b"query").await.unwrap();
    c.shutdown().await.unwrap();
    // The workload replies only once it has seen EOF; the way back stays open.
    assert_eq!(read_all(&mut c).await, pattern(REPLY_LEN));
    let seen = fx.reply.seen().await;
    assert_eq!((seen.received, seen.end), (5, Ok(())));
    let (a, b) = records(&mut fx).await;
    for rec in [&a, &b] {
        assert_outcome(rec, Verdict::Allowed, "");
        assert_bytes(rec, 5, REPLY_LEN);
    }
}

#[tokio::test]
async fn egress_denial_at_the_source_resets_before_any_byte() {
    let a_denies = HostSpec {
        policy: DENY_WEB_TO_API.into(),
        ..HostSpec::default()
    };
    let mut fx = Fixture::start(spec_a(a_denies)).await;
    let mut c = fx.connect(fx.echo.addr).await;
    expect_reset(&mut c).await;
    let (a, b) = records(&mut fx).await;
    assert_outcome(&a, Verdict::Denied, "policy");
    assert_eq!(a.rule.as_deref(), Some("no-web-to-api"));
    assert!(a.reason.starts_with("egress denied"), "{}", a.reason);
    // Egress is decided on host-b's answer, which proves who accepted.
    assert_eq!(a.dst.workload.as_deref(), Some("echo"));
    // host-b allowed and delivered; host-a's reset reached the workload before any byte.
    assert_outcome(&b, Verdict::Allowed, "broken");
    assert_eq!(b.rule.as_deref(), Some("web-to-api"));
    assert_eq!(b.reason, "the peer's connection was reset");
    let seen = fx.echo.seen().await;
    assert_eq!((seen.received, seen.end), (0, Err(ConnectionReset)));
    for rec in [&a, &b] {
        assert_bytes(rec, 0, 0);
    }
}

#[tokio::test]
async fn ingress_denial_at_the_destination_is_recorded_at_both_ends() {
    let b_denies = HostSpec {
        policy: DENY_WEB_TO_API.into(),
        ..HostSpec::default()
    };
    let mut fx = Fixture::start(spec_b(b_denies)).await;
    let mut c = fx.connect(fx.echo.addr).await;
    expect_reset(&mut c).await;
    let (a, b) = records(&mut fx).await;
    for rec in [&a, &b] {
        assert_outcome(rec, Verdict::Denied, "policy");
        assert_bytes(rec, 0, 0);
    }
    assert_eq!(b.rule.as_deref(), Some("no-web-to-api"));
    assert!(b.reason.starts_with("ingress denied"), "{}", b.reason);
    assert!(
        a.reason
            .starts_with("host-b refused: host-b: ingress denied"),
        "{}",
        a.reason
    );
    // host-a's policy did not decide; host-b's answer proves who refused.
    assert_eq!(a.rule, None);
    assert_eq!(a.dst.workload.as_deref(), Some("echo"));
}

#[tokio::test]
async fn unserved_ports_and_addresses_are_not_served() {
    let mut fx = Fixture::start(Spec::default()).await;
    assert!(
        !LocalAddrs::default().contains(NOT_B.into()),
        "precondition: {NOT_B} is not an interface address of this machine"
    );
    let unserved = fx.unserved.addr;
    let not_b = SocketAddr::from((NOT_B, fx.echo.addr.port()));
    let cases = [
        (
            unserved,
            format!("no workload of host-b serves port {}", unserved.port()),
        ),
        (not_b, format!("{NOT_B} is not an address of host-b")),
    ];
    for (dst, reason) in cases {
        let mut c = fx.connect(dst).await;
        expect_reset(&mut c).await;
        let (a, b) = records(&mut fx).await;
        for rec in [&a, &b] {
            assert_outcome(rec, Verdict::Denied, "not-served");
            assert_eq!(rec.dst.addr, dst);
        }
        assert_eq!(b.reason, reason);
        assert_eq!(a.reason, format!("host-b refused: {reason}"));
    }
}

#[tokio::test]
async fn a_connection_without_a_capture_record_is_reset() {
    let mut fx = Fixture::start(Spec::default()).await;
    let mut c = fx.connect_as(None).await;
    let client = c.local_addr().unwrap();
    expect_reset(&mut c).await;
    let a = fx.a.record().await;
    assert_outcome(&a, Verdict::Error, "no-capture");
    assert_eq!(a.reason, "no capture record for this connection");
    assert_eq!((a.direction, a.src.addr), (Direction::Outbound, client));
}

/// An unreachable peer enforcer is `peer-unreachable`, as an unreachable external
/// destination is (see below); no decision was made, so the verdict is `error`.
#[tokio::test]
async fn an_unreachable_peer_enforcer_resets_the_connection() {
    let mut fx = Fixture::start(Spec::default()).await;
    let dst = SocketAddr::from((BEHIND_C, 8080));
    let mut c = fx.connect(dst).await;
    expect_reset(&mut c).await;
    let a = fx.a.record().await;
    assert_outcome(&a, Verdict::Error, "peer-unreachable");
    assert!(
        a.reason.starts_with("peer enforcer host-c unreachable: "),
        "{}",
        a.reason
    );
    assert_eq!(a.dst.enforcer.as_deref(), Some("host-c"));
}

#[tokio::test]
async fn destinations_without_an_enforcer_are_decided_by_egress_policy() {
    let mut fx = Fixture::start(Spec::default()).await;
    let outside = ClosedPort::on(OUTSIDE);
    let mut c = fx.connect(outside.addr).await;
    expect_reset(&mut c).await;
    let a = fx.a.record().await;
    assert_outcome(&a, Verdict::Denied, "policy");
    assert_eq!(
        a.reason,
        format!("no enforcer serves {OUTSIDE}; denied: no rule allows it (default deny)")
    );
    // Allowed by a new policy, but nothing listens there.
    fx.reload(&format!(
        "{WEB_TO_API}  - {{name: web-to-outside, action: allow, from: {{labels: [app=web]}}, to: {{cidr: {OUTSIDE}/32}}}}\n"
    ));
    let mut c = fx.connect(outside.addr).await;
    expect_reset(&mut c).await;
    let a = fx.a.record().await;
    assert_outcome(&a, Verdict::Error, "peer-unreachable");
    assert_eq!(a.rule.as_deref(), Some("web-to-outside"));
    assert!(
        a.reason.starts_with("external destination unreachable: "),
        "{}",
        a.reason
    );
}

#[tokio::test]
async fn a_workload_port_nothing_listens_on_is_workload_unreachable() {
    let mut fx = Fixture::start(Spec::default()).await;
    let mut c = fx.connect(fx.down.addr).await;
    expect_reset(&mut c).await;
    let (a, b) = records(&mut fx).await;
    for rec in [&a, &b] {
        assert_outcome(rec, Verdict::Error, "workload-unreachable");
        assert_eq!(rec.dst.addr, fx.down.addr);
    }
    assert!(
        b.reason.starts_with("workload unreachable: "),
        "{}",
        b.reason
    );
    assert!(
        a.reason
            .starts_with("host-b refused: workload unreachable: "),
        "{}",
        a.reason
    );
}

#[tokio::test]
async fn garbage_after_tls_is_a_bad_header() {
    let mut fx = Fixture::start(Spec::default()).await;
    let header = |version: u8, body: &[u8]| {
        let mut h = MAGIC.to_vec();
        h.push(version);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    };
    let cases = [
        (
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            "bad magic: not a Tessera tunnel",
        ),
        (
            header(99, &[]),
            "the peer speaks tunnel protocol version 99, this enforcer version 6: upgrade both ends",
        ),
        // The version before streams: refused by name, not misparsed.
        (
            header(5, &[]),
            "the peer speaks tunnel protocol version 5, this enforcer version 6: upgrade both ends",
        ),
        (
            header(VERSION, &[9, 9, 9]),
            "malformed header: dst family is neither 4 nor 6",
        ),
    ];
    for (garbage, error) in cases {
        // A certified enforcer: the TLS handshake succeeds, the header does not parse.
        let mut rogue = fx.rogue("host-r").await;
        let answer = rogue.send(&garbage).await;
        assert_eq!(
            (answer.status, answer.code.as_str()),
            (Status::BadRequest, "bad-header")
        );
        let b = fx.b.record().await;
        assert_outcome(&b, Verdict::Denied, "bad-header");
        assert_eq!(b.reason, format!("bad tunnel header from host-r: {error}"));
        assert_eq!(b.src.enforcer.as_deref(), Some("host-r"));
        // The tunnel is not used again.
        rogue.until_closed().await;
    }
}

#[tokio::test]
async fn a_client_without_a_cluster_certificate_fails_the_tls_handshake() {
    let mut fx = Fixture::start(Spec::default()).await;
    // Each client trusts host-b (so that only host-b's checks fail) and presents a
    // certificate of another CA, none, or one of the cluster CA with a key tokens cannot use
    // (P-256, not Ed25519).
    let other_ca = TestCa::new();
    let (key, cert) = other_ca.issue("host-a");
    let foreign = crate::tls::Credentials {
        ca: vec![fx.ca.der.clone().into()],
        ..other_ca.tls(&key, &cert)
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(fx.ca.der.clone().into()).unwrap();
    let mut none = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    none.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
    let (key, cert) = fx.ca.issue_with("host-p", &rcgen::PKCS_ECDSA_P256_SHA256);
    let cases = [
        (foreign.client_config().unwrap(), "invalid peer certificate"),
        (Arc::new(none), "peer sent no certificates"),
        (
            fx.ca.tls(&key, &cert).client_config().unwrap(),
            "host-p: peer certificate: ",
        ),
    ];
    for (config, why) in cases {
        // TLS 1.3: the client may finish its side before host-b refuses; it then reads
        // nothing but the end.
        if let Ok(mut tls) = fx.dial_b(config).await {
            let mut rest = Vec::new();
            let read = within("host-b to close", tls.read_to_end(&mut rest)).await;
            assert!(rest.is_empty(), "{read:?}");
        }
        let b = fx.b.record().await;
        assert_outcome(&b, Verdict::Denied, "tls-handshake");
        assert!(
            b.reason.starts_with("TLS handshake failed: "),
            "{}",
            b.reason
        );
        assert!(b.reason.contains(why), "{}", b.reason);
    }
}

#[tokio::test]
async fn hostile_tokens_are_refused_each_with_its_code() {
    const LIFETIME: u32 = 10_000;
    let mut fx = Fixture::start(Spec::default()).await;
    // Another certified enforcer, whose key host-b therefore trusts.
    let other = fx.rogue("host-s").await;
    let mut rogue = fx.rogue("host-r").await;
    let uncertified = Signer::from_pkcs8(
        &rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .unwrap()
            .serialize_der(),
    )
    .unwrap();
    let own = identity("host-r", "web", "web");
    // Tokens are checked before the port: refusals look the same for any port.
    let (dst, binding, now) = (fx.unserved.addr, rogue.binding, now_ms());
    let sign = |signer: &Signer, id: &Identity, warm: bool, to: SocketAddr, at: u64, life: u32| {
        signer.sign(id, warm, to, binding, at, life)
    };
    let good = sign(&rogue.signer, &own, false, dst, now, LIFETIME);
    let mut flipped = sign(&rogue.signer, &own, false, dst, now, LIFETIME);
    *flipped.last_mut().unwrap() ^= 1;
    let token = Proof::Token;
    let cases = [
        // An honest token passes: the refusal is the port's.
        ("not-served", token(good.clone())),
        ("replay", token(good.clone())),
        (
            "expired",
            token(sign(
                &rogue.signer,
                &own,
                false,
                dst,
                now - 60_000,
                LIFETIME,
            )),
        ),
        (
            "not-yet-valid",
            token(sign(
                &rogue.signer,
                &own,
                false,
                dst,
                now + 60_000,
                LIFETIME,
            )),
        ),
        (
            "lifetime-too-long",
            token(sign(&rogue.signer, &own, false, dst, now, 3_600_000)),
        ),
        (
            "wrong-destination",
            token(sign(
                &rogue.signer,
                &own,
                false,
                fx.echo.addr,
                now,
                LIFETIME,
            )),
        ),
        (
            "wrong-session",
            token(rogue.signer.sign(&own, false, dst, [0; 16], now, LIFETIME)),
        ),
        (
            "unknown-identity",
            token(sign(
                &rogue.signer,
                &identity("host-r", "never-sent", "web"),
                true,
                dst,
                now,
                LIFETIME,
            )),
        ),
        (
            "foreign-identity",
            token(sign(
                &rogue.signer,
                &identity("host-a", "web", "web"),
                false,
                dst,
                now,
                LIFETIME,
            )),
        ),
        ("bad-signature", token(flipped)),
        (
            "untrusted-issuer",
            token(sign(&uncertified, &own, false, dst, now, LIFETIME)),
        ),
        (
            "issuer-not-peer",
            token(sign(&other.signer, &own, false, dst, now, LIFETIME)),
        ),
        ("malformed", token(vec![0xAB; 200])),
        ("truncated", token(good[..20].to_vec())),
        ("no-token", Proof::Unsigned(own.clone())),
    ];
    // A refusal leaves the tunnel clean: every case goes over the same one.
    for (expected, proof) in cases {
        let request = Request {
            dst,
            source: Origin {
                workload: "web".into(),
                ..Origin::default()
            },
            proof,
        };
        let answer = rogue.ask(&request).await;
        let status = match expected {
            "not-served" => Status::NotServed,
            _ => Status::Unauthenticated,
        };
        assert_eq!(
            (answer.status, answer.code.as_str()),
            (status, expected),
            "{}",
            answer.reason
        );
        let b = fx.b.record().await;
        assert_outcome(&b, Verdict::Denied, expected);
        assert_eq!(b.src.enforcer.as_deref(), Some("host-r"));
    }
}

/// Session-sealed tokens (version 3, the default on a tunnel) over real TLS sessions: host-r
/// holds a certificate of the cluster CA and both exporter keys of its own sessions, and
/// still cannot make host-b accept a token outside the one session and direction it was
/// sealed for, a changed claim, or a sequence number it used before.
#[tokio::test]
async fn hostile_session_tokens_are_refused_each_with_its_code() {
    use crate::identity::{
        session::Role,
        signer::{seal_session_claims, sequence_nonce},
        token::{Claim, Claims},
    };
    let mut fx = Fixture::start(Spec::default()).await;
    let other = fx.rogue("host-s").await;
    // Two sessions of the same enforcer: tokens of the first are offered on the second.
    let mut first = fx.rogue("host-r").await;
    let mut rogue = fx.rogue("host-r").await;
    assert_ne!(first.binding, rogue.binding);
    let own = identity("host-r", "web", "web");
    let (dst, now) = (fx.unserved.addr, now_ms());
    let honest = rogue.claims(&own, dst, now);
    let good = rogue.seal(honest.clone());
    let older = rogue.seal_as(1, honest.clone());
    let lifted = first.keys.seal(first.keys.claims(&own, dst, now));
    let mut relabelled = lifted.clone();
    let at = relabelled
        .windows(16)
        .position(|w| w == first.binding)
        .expect("the binding in the token");
    relabelled[at..at + 16].copy_from_slice(&rogue.binding);
    // Resealed for this session's binding with the first session's key.
    let wrong_key = seal_session_claims(
        &first.secrets.key(Role::Client),
        &Claims {
            nonce: sequence_nonce(50),
            ..honest.clone()
        },
    );
    // Sealed with this session's *server* key: what host-b's own answers carry.
    let reflected = seal_session_claims(
        &rogue.secrets.key(Role::Server),
        &Claims {
            nonce: sequence_nonce(51),
            ..honest.clone()
        },
    );
    let mut tampered = rogue.seal(honest.clone());
    let at = tampered.windows(3).rposition(|w| w == b"web").unwrap();
    tampered[at + 2] = b'x';
    let mut flipped = rogue.seal(honest.clone());
    *flipped.last_mut().unwrap() ^= 1;
    let expired = rogue.seal(Claims {
        issued_ms: now - 60_000,
        ..honest.clone()
    });
    let elsewhere = rogue.seal(Claims {
        dst: fx.echo.addr,
        ..honest.clone()
    });
    let not_me = rogue.seal(Claims {
        issuer: other.signer.key_id(),
        ..honest.clone()
    });
    let foreign = rogue.keys.seal(
        rogue
            .keys
            .claims(&identity("host-a", "web", "web"), dst, now),
    );
    let never_sent = rogue.seal(Claims {
        claim: Claim::Warm(crate::identity::signer::identity_digest(&identity(
            "host-r", "never", "web",
        ))),
        ..honest.clone()
    });
    let mut overlong = rogue.seal(honest.clone());
    overlong.push(0);
    let truncated = rogue.seal(honest.clone())[..40].to_vec();
    let token = Proof::Token;
    let cases = [
        // An honest token passes: the refusal is the port's.
        ("not-served", token(good.clone())),
        ("replay", token(good)),
        ("replay", token(older)),
        ("wrong-session", token(lifted)),
        ("bad-signature", token(relabelled)),
        ("bad-signature", token(wrong_key)),
        ("bad-signature", token(reflected)),
        ("bad-signature", token(tampered)),
        ("bad-signature", token(flipped)),
        ("expired", token(expired)),
        ("wrong-destination", token(elsewhere)),
        ("issuer-not-peer", token(not_me)),
        ("foreign-identity", token(foreign)),
        ("unknown-identity", token(never_sent)),
        ("malformed", token(overlong)),
        ("truncated", token(truncated)),
    ];
    for (i, (expected, proof)) in cases.into_iter().enumerate() {
        if let Proof::Token(t) = &proof {
            assert_eq!(t[0], 3, "case {i} is a session token");
        }
        let request = Request {
            dst,
            source: Origin {
                workload: "web".into(),
                ..Origin::default()
            },
            proof,
        };
        let answer = rogue.ask(&request).await;
        let status = match expected {
            "not-served" => Status::NotServed,
            _ => Status::Unauthenticated,
        };
        assert_eq!(
            (answer.status, answer.code.as_str()),
            (status, expected),
            "case {i}: {}",
            answer.reason
        );
        let b = fx.b.record().await;
        assert_outcome(&b, Verdict::Denied, expected);
        assert_eq!(b.src.enforcer.as_deref(), Some("host-r"));
    }
    // The first session is untouched by what was tried on the second: its own token
    // (sequence 2; its first was only ever offered elsewhere) passes there.
    let own_token = first.keys.seal(first.keys.claims(&own, dst, now_ms()));
    let answer = first
        .ask(&Request {
            dst,
            source: Origin::default(),
            proof: Proof::Token(own_token),
        })
        .await;
    assert_eq!(answer.status, Status::NotServed, "{}", answer.reason);
    let _ = fx.b.record().await;
}

/// Real connections carry session tokens both ways (the request's and the answer's), and
/// the verifiers remember no nonce for them.
#[tokio::test]
async fn connections_carry_session_tokens_and_leave_no_replay_cache() {
    let mut fx = Fixture::start(Spec::default()).await;
    for _ in 0..20 {
        let mut c = fx.connect(fx.reply.addr).await;
        c.write_all(b"query").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(read_all(&mut c).await, pattern(REPLY_LEN));
        let (a, b) = records(&mut fx).await;
        for rec in [&a, &b] {
            assert_outcome(rec, Verdict::Allowed, "");
        }
    }
    assert_eq!(fx.a.tokens.remembered_nonces(), 0);
    assert_eq!(fx.b.tokens.remembered_nonces(), 0);
}

#[tokio::test]
async fn source_tokens_are_refused_on_the_real_path() {
    let unsigned = HostSpec {
        tokens: false,
        ..HostSpec::default()
    };
    let long_lived = HostSpec {
        lifetime_ms: 20_000,
        ..HostSpec::default()
    };
    let cases = [
        // host-a sends unsigned identities ([identity] tokens = false).
        (spec_a(unsigned), None, "no-token"),
        // host-a's tokens live longer than host-b accepts.
        (spec_a(long_lived), None, "lifetime-too-long"),
        // host-a vouches for a workload of another enforcer.
        (
            Spec::default(),
            Some(identity("host-c", "web", "web")),
            "foreign-identity",
        ),
    ];
    for (spec, vouched, expected) in cases {
        let mut fx = Fixture::start(spec).await;
        let mut captured = web(fx.echo.addr);
        if let Some(identity) = vouched {
            captured.identity = identity;
        }
        let mut c = fx.connect_as(Some(captured)).await;
        expect_reset(&mut c).await;
        let (a, b) = records(&mut fx).await;
        for rec in [&a, &b] {
            assert_outcome(rec, Verdict::Denied, expected);
            assert!(rec.reason.ends_with(&format!("({expected})")), "{rec:#?}");
        }
        assert!(
            a.reason.starts_with("host-b refused: host-b: "),
            "{}",
            a.reason
        );
    }
}

#[tokio::test]
async fn a_destination_without_a_token_is_refused_at_the_source() {
    let unsigned = HostSpec {
        tokens: false,
        ..HostSpec::default()
    };
    let mut fx = Fixture::start(spec_b(unsigned)).await;
    let mut c = fx.connect(fx.echo.addr).await;
    expect_reset(&mut c).await;
    let (a, b) = records(&mut fx).await;
    assert_outcome(&a, Verdict::Denied, "no-token");
    assert!(
        a.reason.ends_with("in the answer of host-b"),
        "{}",
        a.reason
    );
    // host-b delivered; host-a's reset reached the workload before any byte.
    assert_outcome(&b, Verdict::Allowed, "broken");
    let seen = fx.echo.seen().await;
    assert_eq!((seen.received, seen.end), (0, Err(ConnectionReset)));
}

#[tokio::test]
async fn a_reload_resets_live_connections_it_denies_at_both_ends() {
    let mut fx = Fixture::start(Spec::default()).await;
    let mut c = fx.connect(fx.echo.addr).await;
    c.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    within("the echo", c.read_exact(&mut pong)).await.unwrap();
    assert_eq!(&pong, b"ping");
    // Live at both ends (the echo came back through both splices): revoke.
    fx.reload(DENY_WEB_TO_API);
    expect_reset(&mut c).await;
    let seen = fx.echo.seen().await;
    assert_eq!((seen.received, seen.end), (4, Err(ConnectionReset)));
    let (a, b) = records(&mut fx).await;
    for (rec, side) in [(&a, "egress"), (&b, "ingress")] {
        assert_outcome(rec, Verdict::Denied, "policy-reload");
        assert!(
            rec.reason
                .starts_with(&format!("closed by policy reload ({side}): denied")),
            "{}",
            rec.reason
        );
        assert_bytes(rec, 4, 4);
    }
    // A new connection is refused up front (host-b refuses first).
    let mut c = fx.connect(fx.echo.addr).await;
    expect_reset(&mut c).await;
    let (a, b) = records(&mut fx).await;
    for rec in [&a, &b] {
        assert_outcome(rec, Verdict::Denied, "policy");
    }
}

#[tokio::test]
async fn a_dead_pooled_tunnel_is_retried_on_a_fresh_one_invisibly() {
    let mut fx = Fixture::start(Spec::default()).await;
    async fn echo_once(fx: &mut Fixture) -> (FlowRecord, FlowRecord) {
        let mut c = fx.connect(fx.echo.addr).await;
        c.write_all(b"hello").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(read_all(&mut c).await, b"hello");
        let (a, b) = records(fx).await;
        for rec in [&a, &b] {
            assert_outcome(rec, Verdict::Allowed, "");
            assert_bytes(rec, 5, 5);
        }
        (a, b)
    }
    fx.warm(2).await;
    assert_eq!(echo_once(&mut fx).await.0.pooled, Some(true));
    // Every tunnel between the hosts dies (as when host-b restarts); the pool still holds
    // them. The next connection takes a dead one, fails before sending a byte of the
    // application, and is carried by a fresh tunnel instead.
    fx.link.cut().await;
    assert_eq!(echo_once(&mut fx).await.0.pooled, Some(false));
    // The fresh tunnel stays in the pool for later streams.
    assert_eq!(echo_once(&mut fx).await.0.pooled, Some(true));
}

/// Sequential connections go round the pool's tunnels (the least loaded, ties in turn):
/// none sits unused until it idles out and must be replaced by a new TLS handshake.
#[tokio::test]
async fn sequential_connections_go_round_the_tunnels() {
    let mut fx = Fixture::start(Spec {
        pool_size: 4,
        ..Spec::default()
    })
    .await;
    fx.warm(4).await;
    for _ in 0..8 {
        let mut c = fx.connect(fx.echo.addr).await;
        c.write_all(b"hi").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(read_all(&mut c).await, b"hi");
        let _ = records(&mut fx).await;
    }
    let mut carried = fx.a.pool.carried("host-b");
    carried.sort();
    assert_eq!(carried, [2, 2, 2, 2]);
}

#[tokio::test]
async fn a_tunnel_that_dies_under_a_live_connection_resets_both_applications() {
    let mut fx = Fixture::start(Spec::default()).await;
    let mut c = fx.connect(fx.echo.addr).await;
    c.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    within("the echo", c.read_exact(&mut pong)).await.unwrap();
    fx.link.cut().await;
    expect_reset(&mut c).await;
    let seen = fx.echo.seen().await;
    assert_eq!((seen.received, seen.end), (4, Err(ConnectionReset)));
    let (a, b) = records(&mut fx).await;
    for rec in [&a, &b] {
        assert_outcome(rec, Verdict::Allowed, "broken");
        // 4 bytes went each way before the tunnel died: both ends count them.
        assert_bytes(rec, 4, 4);
    }
    assert!(
        a.reason.starts_with("tunnel to host-b broke: "),
        "{}",
        a.reason
    );
    assert!(
        b.reason.starts_with("tunnel from host-a broke: "),
        "{}",
        b.reason
    );
}

#[tokio::test]
async fn a_direct_connection_to_a_protected_port_is_unauthenticated() {
    let mut fx = Fixture::start(Spec::default()).await;
    let mut c = within("connecting", TcpStream::connect(fx.b.direct))
        .await
        .unwrap();
    let client = c.local_addr().unwrap();
    expect_reset(&mut c).await;
    let b = fx.b.record().await;
    assert_outcome(&b, Verdict::Denied, "unauthenticated");
    assert_eq!((b.direction, b.src.addr), (Direction::Direct, client));
    assert_eq!(b.dst.workload.as_deref(), Some("guarded"));
    assert!(
        b.reason
            .starts_with("unauthenticated: the connection did not come through a Tessera tunnel"),
        "{}",
        b.reason
    );
}

#[test]
fn fixture_addresses_are_loopback() {
    for ip in [NOT_B, BEHIND_C, OUTSIDE, DELIVERY_SRC, Ipv4Addr::LOCALHOST] {
        assert!(ip.is_loopback(), "{ip}");
    }
}
