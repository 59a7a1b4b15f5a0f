//! Both ends run on real packet bytes, honest and hostile.
use super::{fixture::*, *};
use crate::{
    authz::Side,
    flow::{FlowRecord, Mode, Verdict},
};

fn wire(o: &Outcome) -> Vec<u8> {
    assert_eq!(o.verdict, PacketVerdict::Accept, "{o:?}");
    o.packet.clone().expect("a message attached")
}

/// The same packet with its message changed by `f` (checksums right: as an attacker would).
fn tamper(packet: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let (clean, mut message) = packet::detach(packet).unwrap().unwrap();
    f(&mut message);
    packet::attach(&clean, &message).unwrap()
}

/// The record of an allowed connection: kept with the live connection, written when it
/// closes (with its byte counts), never at the handshake.
fn allowed<'a>(end: &End, o: &'a Outcome) -> &'a FlowRecord {
    let written = end.records();
    assert!(
        written.is_empty(),
        "no record before the connection ends: {written:?}"
    );
    let rec = &o.live.as_ref().expect("a live connection").flow;
    assert_eq!(rec.verdict, Verdict::Allowed, "{rec:?}");
    rec
}

/// The refusal `end` recorded for the packet that gave `o`.
fn refused(end: &End, o: &Outcome, code: &str) -> FlowRecord {
    let flow = end
        .records()
        .pop()
        .unwrap_or_else(|| panic!("no flow: {o:?}"));
    assert_eq!(flow.verdict, Verdict::Denied, "{flow:?}");
    assert_eq!(flow.code.as_str(), code, "{flow:?}");
    assert_eq!(flow.mode, Mode::Handshake);
    assert_eq!(o.mark, 0, "a refusal never marks a connection proven");
    flow
}

/// Runs SYN and SYN-ACK through both ends; returns the SYN and SYN-ACK as sent.
fn up_to_synack(p: &Pair) -> (Vec<u8>, Vec<u8>) {
    let syn_wire = wire(&p.a.egress(&syn(), NOW));
    let at_b = p.b.ingress(&syn_wire, NOW);
    assert_eq!(
        wire(&at_b),
        syn(),
        "the server's kernel sees the SYN as sent"
    );
    let synack_wire = wire(&p.b.egress(&synack(), NOW));
    (syn_wire, synack_wire)
}

#[test]
fn honest_handshake_is_proven_at_both_ends_and_restores_every_packet() {
    let p = pair("api");
    let (syn_wire, synack_wire) = up_to_synack(&p);
    // A retransmitted SYN carries the very same message and is accepted again.
    assert_eq!(wire(&p.a.egress(&syn(), NOW)), syn_wire);
    assert_eq!(wire(&p.b.ingress(&syn_wire, NOW)), syn());
    let at_a = p.a.ingress(&synack_wire, NOW);
    assert_eq!(wire(&at_a), synack());
    let flow = allowed(&p.a, &at_a);
    assert_eq!(flow.dst.workload.as_deref(), Some("api"));
    assert_eq!(flow.rule.as_deref(), Some("web-api"));
    // A retransmitted SYN-ACK (same message) still passes.
    assert_eq!(wire(&p.b.egress(&synack(), NOW)), synack_wire);
    assert_eq!(wire(&p.a.ingress(&synack_wire, NOW)), synack());
    let at_a_ack = p.a.egress(&ack(), NOW);
    assert_eq!(at_a_ack.mark, ACKED, "the kernel stops queueing after this");
    let ack_wire = wire(&at_a_ack);
    // Data queued behind the first ACK at the client passes unchanged.
    let data = packet::build(addr(C), addr(S), 1001, 5001, TcpFlags::ACK | TcpFlags::PSH);
    let behind = p.a.egress(&data, NOW);
    assert_eq!(
        (behind.verdict, behind.packet.is_none(), behind.mark),
        (PacketVerdict::Accept, true, ACKED)
    );
    let at_b = p.b.ingress(&ack_wire, NOW);
    assert_eq!(wire(&at_b), ack());
    assert_eq!(at_b.mark, PROVEN);
    // ... and at the server, where it was queued behind the proof.
    let behind = p.b.ingress(&data, NOW);
    assert_eq!(
        (behind.verdict, behind.mark),
        (PacketVerdict::Accept, PROVEN)
    );
    let flow = allowed(&p.b, &at_b);
    assert_eq!(flow.src.workload.as_deref(), Some("web"));
    // Both ends hand the connection over for policy reloads, each from its side.
    let live_b = at_b.live.as_ref().expect("server end live");
    assert_eq!(
        (live_b.attempt.side, live_b.local, live_b.remote),
        (Side::Ingress, addr(S), addr(C))
    );
    let live_a = at_a.live.as_ref().expect("client end live");
    assert_eq!(
        (live_a.attempt.side, live_a.local, live_a.remote),
        (Side::Egress, addr(C), addr(S))
    );
    assert_eq!(
        flow.src.spiffe.as_deref(),
        Some("spiffe://td/enforcer/host-a/workload/web")
    );
    // Both ends agree the fast path's pair secret, and nothing else hands one out.
    let fast_a = at_a.fast.clone().expect("client end: pair secret");
    let fast_b = at_b.fast.clone().expect("server end: pair secret");
    assert_eq!(fast_a.pair, fast_b.pair);
    assert_eq!((fast_a.local, fast_a.remote), (addr(C), addr(S)));
    assert_eq!((fast_b.local, fast_b.remote), (addr(S), addr(C)));
    assert!(fast_a.caller.is_some() && fast_b.caller.is_none());
    assert!(at_a_ack.fast.is_none() && behind.fast.is_none());
}

#[test]
fn a_refused_or_unfinished_handshake_agrees_no_pair_secret() {
    let p = pair("api");
    let (_, synack_wire) = up_to_synack(&p);
    // A tampered SYN-ACK: the client refuses it and derives nothing.
    let bad = tamper(&synack_wire, |m| {
        let n = m.len();
        m[n - 1] ^= 1;
    });
    assert!(p.a.ingress(&bad, NOW).fast.is_none());
    // A wrong ACK proof at the server: nothing either.
    let p = pair("api");
    let (_, synack_wire) = up_to_synack(&p);
    wire(&p.a.ingress(&synack_wire, NOW));
    let ack_wire = wire(&p.a.egress(&ack(), NOW));
    let bad = tamper(&ack_wire, |m| {
        let n = m.len();
        m[n - 1] ^= 1;
    });
    let at_b = p.b.ingress(&bad, NOW);
    assert_eq!(at_b.verdict, PacketVerdict::Drop);
    assert!(at_b.fast.is_none());
}

#[test]
fn a_replayed_syn_is_refused_once_its_handshake_is_over() {
    let p = pair("api");
    let (syn_wire, synack_wire) = up_to_synack(&p);
    p.a.ingress(&synack_wire, NOW);
    let ack_wire = wire(&p.a.egress(&ack(), NOW));
    assert_eq!(p.b.ingress(&ack_wire, NOW).mark, PROVEN);
    let replay = p.b.ingress(&syn_wire, NOW + 10);
    assert_eq!(replay.verdict, PacketVerdict::Drop);
    assert_eq!(replay.send.len(), 1, "the sender gets a reset");
    refused(&p.b, &replay, "replay");
    // Its proof, replayed too, proves nothing.
    let again = p.b.ingress(&ack_wire, NOW + 10);
    assert_eq!(again.verdict, PacketVerdict::Drop);
    refused(&p.b, &again, "no-handshake");
}

#[test]
fn forged_garbage_and_truncated_syns_are_refused_with_their_reason() {
    let p = pair("api");
    let syn_wire = wire(&p.a.egress(&syn(), NOW));
    // The token's signature is its last bytes, the message's last bytes too.
    let forged = tamper(&syn_wire, |m| *m.last_mut().unwrap() ^= 1);
    let o = p.b.ingress(&forged, NOW);
    assert_eq!(o.verdict, PacketVerdict::Drop);
    refused(&p.b, &o, "bad-signature");
    let garbage = tamper(&syn_wire, |m| m.iter_mut().for_each(|b| *b = 0xA5));
    refused(&p.b, &p.b.ingress(&garbage, NOW), "malformed");
    // Cut inside the message: the option announces more than the packet holds.
    let cut = &syn_wire[..syn_wire.len() - 40];
    let mut cut = cut.to_vec();
    let total = cut.len() as u16;
    cut[2..4].copy_from_slice(&total.to_be_bytes());
    // (with checksums right, as an attacker would send it)
    let cut = packet::with_checksums_fixed(&cut);
    let o = p.b.ingress(&cut, NOW);
    assert_eq!(o.verdict, PacketVerdict::Drop);
    refused(&p.b, &o, "malformed");
    // The honest SYN still gets through afterwards (nothing above consumed its nonce).
    assert_eq!(wire(&p.b.ingress(&syn_wire, NOW)), syn());
}

#[test]
fn a_syn_without_a_token_is_an_external_peer_and_policy_refuses_it() {
    let p = pair("api");
    let o = p.b.ingress(&syn(), NOW);
    assert_eq!(o.verdict, PacketVerdict::Drop);
    assert_eq!(o.send.len(), 1);
    let rec = refused(&p.b, &o, "unauthenticated");
    assert_eq!(rec.direction, Direction::Direct);
}

#[test]
fn a_tampered_synack_turns_into_a_reset_for_the_client() {
    for (what, f) in [
        (
            "proof",
            Box::new(|m: &mut Vec<u8>| m[40] ^= 1) as Box<dyn Fn(&mut Vec<u8>)>,
        ),
        ("token", Box::new(|m: &mut Vec<u8>| m[60] ^= 1)),
        ("key", Box::new(|m: &mut Vec<u8>| m[5] ^= 1)),
    ] {
        let p = pair("api");
        let (_, synack_wire) = up_to_synack(&p);
        let bad = tamper(&synack_wire, f);
        let o = p.a.ingress(&bad, NOW);
        assert_eq!(o.verdict, PacketVerdict::Accept, "{what}");
        let rst = packet::segment(o.packet.as_ref().unwrap()).unwrap();
        assert!(
            rst.flags & TcpFlags::RST != 0,
            "{what}: the workload gets a reset"
        );
        assert_eq!(rst.ack, 1001, "{what}: acknowledging its SYN");
        refused(&p.a, &o, "bad-proof");
        // And nothing proves the connection afterwards.
        assert_eq!(p.a.egress(&ack(), NOW).packet, None, "{what}");
    }
    // A SYN-ACK whose sequence number was changed on the way.
    let p = pair("api");
    let (_, synack_wire) = up_to_synack(&p);
    let (clean, message) = packet::detach(&synack_wire).unwrap().unwrap();
    let mut clean = clean;
    clean[24] ^= 1; // inside the TCP sequence number (IPv4 header of 20 bytes)
    let moved = packet::attach(&clean, &message).unwrap();
    refused(&p.a, &p.a.ingress(&moved, NOW), "bad-proof");
    // A SYN-ACK without any token, for a SYN that carried one.
    let p = pair("api");
    up_to_synack(&p);
    refused(&p.a, &p.a.ingress(&synack(), NOW), "no-token");
}

#[test]
fn a_missing_or_wrong_ack_proof_never_proves_the_connection() {
    let p = pair("api");
    let (_, synack_wire) = up_to_synack(&p);
    p.a.ingress(&synack_wire, NOW);
    let ack_wire = wire(&p.a.egress(&ack(), NOW));
    let wrong = tamper(&ack_wire, |m| m[3] ^= 1);
    let o = p.b.ingress(&wrong, NOW);
    assert_eq!(o.verdict, PacketVerdict::Drop);
    refused(&p.b, &o, "bad-proof");

    // An ACK without a proof (or data overtaking it) is dropped; the handshake stays
    // open for the proof.
    let p = pair("api");
    let (_, synack_wire) = up_to_synack(&p);
    p.a.ingress(&synack_wire, NOW);
    let o = p.b.ingress(&ack(), NOW);
    assert_eq!(o.verdict, PacketVerdict::Drop);
    assert!(p.b.records().is_empty() && o.mark == 0, "{o:?}");
    assert_eq!(p.b.pending(), (0, 1));

    // An ACK that never comes: the handshake expires and says so.
    let p = pair("api");
    up_to_synack(&p);
    assert_eq!(p.b.expire(NOW + 1_000), 0);
    assert!(p.b.records().is_empty());
    assert_eq!(p.b.expire(NOW + 11_000), 1);
    let expired = p.b.records();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].code, "no-proof");
    assert_eq!(p.b.pending(), (0, 0));
}

#[test]
fn a_lost_ack_proof_is_sent_again_when_the_synack_is_retransmitted() {
    let p = pair("api");
    let (_, synack_wire) = up_to_synack(&p);
    p.a.ingress(&synack_wire, NOW);
    let _lost = wire(&p.a.egress(&ack(), NOW));
    // The server's kernel retransmits; its enforcer attaches the same message.
    let again = wire(&p.b.egress(&synack(), NOW + 1_000));
    let o = p.a.ingress(&again, NOW + 1_000);
    assert_eq!(wire(&o), synack());
    assert_eq!(o.send.len(), 1, "our own ACK with the proof");
    let at_b = p.b.ingress(&o.send[0], NOW + 1_000);
    assert_eq!(at_b.mark, PROVEN);
    allowed(&p.b, &at_b);
}

#[test]
fn a_new_connection_on_a_proven_four_tuple_must_prove_itself_again() {
    let p = pair("api");
    let (_, synack_wire) = up_to_synack(&p);
    p.a.ingress(&synack_wire, NOW);
    let ack_wire = wire(&p.a.egress(&ack(), NOW));
    assert_eq!(p.b.ingress(&ack_wire, NOW).mark, PROVEN);
    // The client reuses the 4-tuple (TIME_WAIT reuse) with a new ISN.
    let syn2 = packet::build(addr(C), addr(S), 9000, 0, TcpFlags::SYN);
    let syn2_wire = wire(&p.a.egress(&syn2, NOW + 1_000));
    wire(&p.b.ingress(&syn2_wire, NOW + 1_000));
    let data = packet::build(addr(C), addr(S), 9001, 7001, TcpFlags::ACK | TcpFlags::PSH);
    let o = p.b.ingress(&data, NOW + 1_000);
    assert_eq!(
        o.verdict,
        PacketVerdict::Drop,
        "the old proof does not cover it"
    );
    assert_eq!(o.mark, 0);
}

#[test]
fn a_reset_answering_a_handshake_is_recorded_as_refused_at_once() {
    // The server refused the SYN (here: a reset as its enforcer sends it).
    let p = pair("db");
    let syn_wire = wire(&p.a.egress(&syn(), NOW));
    let at_b = p.b.ingress(&syn_wire, NOW);
    let o = p.a.ingress(&at_b.send[0], NOW);
    assert_eq!(
        o.verdict,
        PacketVerdict::Accept,
        "the workload gets the reset"
    );
    refused(&p.a, &o, "peer-refused");
    assert_eq!(p.a.pending(), (0, 0));
    // A reset for no handshake of ours is just passed on.
    p.a.ingress(&at_b.send[0], NOW);
    assert!(p.a.records().is_empty());
}

#[test]
fn egress_and_ingress_policy_each_refuse_at_their_end() {
    // The server's workload is app=db: web may not reach it. host-b refuses at the SYN.
    let p = pair("db");
    let syn_wire = wire(&p.a.egress(&syn(), NOW));
    let o = p.b.ingress(&syn_wire, NOW);
    assert_eq!(o.verdict, PacketVerdict::Drop);
    let rec = refused(&p.b, &o, "policy");
    assert_eq!(rec.src.workload.as_deref(), Some("web"));
}

#[test]
fn a_blind_ack_cannot_end_a_pending_handshake() {
    // An off-path attacker knows the 4-tuple but not the server's ISN: its ACKs (with a
    // garbage option, or a well-formed one) must not discard the handshake it aims at.
    let p = pair("api");
    let (_, synack_wire) = up_to_synack(&p);
    p.a.ingress(&synack_wire, NOW);
    let ack_wire = wire(&p.a.egress(&ack(), NOW));
    let (clean, message) = packet::detach(&ack_wire).unwrap().unwrap();
    let mut blind = clean.clone();
    // A wrong acknowledgment number (IPv4 header of 20 bytes; TCP ack at offset 8).
    blind[28] ^= 0x40;
    let well_formed = packet::attach(&blind, &message).unwrap();
    let garbage = packet::attach(&blind, &[0xA5; 20]).unwrap();
    for spoofed in [&well_formed, &garbage] {
        let o = p.b.ingress(spoofed, NOW);
        assert_eq!(o.verdict, PacketVerdict::Drop);
        assert_eq!(o.mark, 0);
        assert!(o.send.is_empty(), "no reset for a blind packet: {o:?}");
        assert_eq!(p.b.pending(), (0, 1), "the handshake is still pending");
    }
    // The honest proof still completes it.
    let at_b = p.b.ingress(&ack_wire, NOW);
    assert_eq!(at_b.mark, PROVEN);
    assert_eq!(wire(&at_b), ack());
}

#[test]
fn data_in_a_syn_never_reaches_the_server_before_the_proof() {
    // TCP Fast Open: the client's first bytes ride in its SYN. The server's kernel must not
    // get them (and hand them to the application) before the client proved itself.
    let p = pair("api");
    let syn_with_data = packet::with_payload(&syn(), b"GET /secret HTTP/1.1\r\n\r\n");
    let syn_wire = wire(&p.a.egress(&syn_with_data, NOW));
    let at_b = p.b.ingress(&syn_wire, NOW);
    assert_eq!(wire(&at_b), syn(), "the SYN without its data");
    // A retransmission of it, too.
    assert_eq!(wire(&p.b.ingress(&syn_wire, NOW)), syn());
    // The handshake then completes as usual.
    let synack_wire = wire(&p.b.egress(&synack(), NOW));
    p.a.ingress(&synack_wire, NOW);
    let ack_wire = wire(&p.a.egress(&ack(), NOW));
    assert_eq!(p.b.ingress(&ack_wire, NOW).mark, PROVEN);
}

#[test]
fn a_packet_with_wrong_checksums_is_dropped_not_repaired() {
    // Rewriting recomputes checksums: a corrupted packet must be refused as the kernel would
    // refuse it, not turned into a valid one.
    let p = pair("api");
    let syn_wire = wire(&p.a.egress(&syn(), NOW));
    let mut corrupted = syn_wire.clone();
    let last = corrupted.len() - 1;
    corrupted[last] ^= 0x01; // inside the message: the TCP checksum no longer matches
    let o = p.b.ingress(&corrupted, NOW);
    assert_eq!(o.verdict, PacketVerdict::Drop);
    assert_eq!(p.b.pending(), (0, 0), "nothing was taken from it");
    assert!(
        p.b.records().is_empty(),
        "not even a refusal: it never arrived"
    );
    // The intact one still passes.
    assert_eq!(wire(&p.b.ingress(&syn_wire, NOW)), syn());
}
