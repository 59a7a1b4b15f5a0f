#!/usr/bin/python3
"""Handshake-mode adversary and capture reader for the end-to-end tests (scapy).

  handshake_attack.py capture PCAP
      What the capture shows: for each TCP connection, which packets carried the Tessera
      option (kind 253, ExID 0x7E55) and how many packets and payload bytes it had.
  handshake_attack.py attack PCAP SERVER PORT
      Takes the first token-bearing SYN to SERVER:PORT from the capture and sends hostile
      variants of it from a raw socket: the SYN replayed verbatim, its signature forged, its
      message truncated, its message replaced by garbage (these four from the captured
      client's address, spoofed), and a SYN without any token (from our own address). Prints,
      for each, the TCP flags of the answer we saw (null when none came back to us: answers to
      spoofed packets go to the spoofed address).
  handshake_attack.py fast PCAP SERVER PORT FLOOD
      Against the in-kernel fast path (kind 254, ExID 0x7E56), run from the client host's own
      address (root there, but without the enforcer's keys): takes the last fast-path SYN to
      SERVER:PORT from the capture and sends: the captured SYN again verbatim, then, on the
      server's fresh SYN-ACK, the captured ACK's tag over it and a request ("replay": must
      never complete); the SYN with its tag altered ("tampered"); a new SYN with the
      captured key id and a random tag ("forged"); FLOOD SYNs with unknown key ids.
      Prints the TCP flags of each answer (null: none) and, for the replay, whether a
      SYN-ACK came and what answered the request.
"""
import json
import random
import sys

from scapy.all import IP, TCP, Raw, conf, rdpcap, sr1

conf.verb = 0
EXID = b"\x7e\x55"


def tessera_option(tcp):
    for kind, value in tcp.options:
        if kind == 253 and isinstance(value, bytes) and value[:2] == EXID:
            return value
    return None


def flags(tcp):
    return str(tcp.flags)


def capture(path):
    conns = {}
    for pkt in rdpcap(path):
        if IP not in pkt or TCP not in pkt:
            continue
        ip, tcp = pkt[IP], pkt[TCP]
        ends = sorted([(ip.src, tcp.sport), (ip.dst, tcp.dport)])
        key = f"{ends[0][0]}:{ends[0][1]}-{ends[1][0]}:{ends[1][1]}"
        c = conns.setdefault(key, {"packets": 0, "payload": 0, "tagged": []})
        c["packets"] += 1
        payload = len(bytes(tcp.payload))
        c["payload"] += payload
        if tessera_option(tcp) is not None:
            c["tagged"].append({"flags": flags(tcp), "payload": payload})
    print(json.dumps(conns))


def fresh(ip, payload=None):
    """The packet from a new source port and sequence number, lengths and checksums redone."""
    p = ip.copy()
    p[TCP].sport = random.randint(20000, 60000)
    p[TCP].seq = random.randint(0, 2**32 - 1)
    if payload is not None:
        p[TCP].remove_payload()
        p = p / Raw(payload)
    del p[IP].len, p[IP].chksum, p[TCP].chksum
    return IP(bytes(p))


def answer(pkt):
    reply = sr1(pkt, timeout=2)
    if reply is None or TCP not in reply:
        return None
    return flags(reply[TCP])


def attack(path, server, port):
    syn = next(
        p[IP]
        for p in rdpcap(path)
        if IP in p
        and TCP in p
        and p[IP].dst == server
        and p[TCP].dport == port
        and str(p[TCP].flags) == "S"
        and tessera_option(p[TCP]) is not None
    )
    message = bytes(syn[TCP].payload)
    results = {}
    # The captured SYN as it was: same port, same sequence number, same token.
    replay = syn.copy()
    del replay[IP].chksum, replay[TCP].chksum
    results["replay"] = answer(IP(bytes(replay)))
    # The token's signature (the message's last bytes) changed.
    forged = message[:-1] + bytes([message[-1] ^ 1])
    results["forged"] = answer(fresh(syn, forged))
    # The option announces the whole message; half of it is there.
    results["truncated"] = answer(fresh(syn, message[: len(message) // 2]))
    # A message of the announced length, all garbage.
    results["garbage"] = answer(fresh(syn, bytes(random.getrandbits(8) for _ in message)))
    # No option, no token, from the attacker's own address.
    plain = IP(dst=server) / TCP(
        sport=random.randint(20000, 60000), dport=port, flags="S", seq=random.randint(0, 2**32 - 1)
    )
    results["no-token"] = answer(plain)
    print(json.dumps(results))


FAST_EXID = b"\x7e\x56"


def fast_option(tcp):
    for kind, value in tcp.options:
        if kind == 254 and isinstance(value, bytes) and value[:2] == FAST_EXID and len(value) == 14:
            return value
    return None


def with_fast(pkt, value):
    """`pkt` with its fast option's value replaced (other options kept), sums redone."""
    p = pkt.copy()
    opts = []
    for kind, v in p[TCP].options:
        opts.append((254, value) if kind == 254 and isinstance(v, bytes) and v[:2] == FAST_EXID else (kind, v))
    p[TCP].options = opts
    del p[IP].len, p[IP].chksum, p[TCP].chksum, p[TCP].dataofs
    return IP(bytes(p))


def fast(path, server, port, flood):
    pkts = [p[IP] for p in rdpcap(path) if IP in p and TCP in p]
    syn = [p for p in pkts if p.dst == server and p[TCP].dport == port
           and str(p[TCP].flags) == "S" and fast_option(p[TCP]) is not None][-1]
    ack = next(p for p in pkts if p.dst == server and p[TCP].sport == syn[TCP].sport
               and str(p[TCP].flags) == "A" and p[TCP].seq == syn[TCP].seq + 1
               and fast_option(p[TCP]) is not None)
    value = fast_option(syn[TCP])
    results = {}
    # The replay: the server answers the valid old SYN with a fresh ISN; the old ACK's tag
    # (over the old ISN) is sent over the new one, then a request.
    replay = syn.copy()
    del replay[IP].chksum, replay[TCP].chksum
    synack = sr1(IP(bytes(replay)), timeout=2)
    results["replay_synack"] = None if synack is None or TCP not in synack else flags(synack[TCP])
    if synack is not None and TCP in synack and "S" in flags(synack[TCP]):
        a = ack.copy()
        a[TCP].ack = synack[TCP].seq + 1
        del a[IP].chksum, a[TCP].chksum
        send_only(IP(bytes(a)))
        req = a.copy()
        req[TCP].flags = "PA"
        req = req / Raw(b"GET /index.bin HTTP/1.0\r\n\r\n")
        del req[IP].len, req[IP].chksum, req[TCP].chksum
        reply = sr1(IP(bytes(req)), timeout=2)
        results["replay_request"] = None if reply is None or TCP not in reply else flags(reply[TCP])
    tampered = value[:-1] + bytes([value[-1] ^ 1])
    results["tampered"] = answer(with_fast(syn, tampered))
    forged = with_fast(fresh(syn), value[:6] + bytes(random.getrandbits(8) for _ in range(8)))
    results["forged"] = answer(forged)
    # Unknown key ids, each a new SYN from a new port.
    for _ in range(flood):
        key_id = bytes(random.getrandbits(8) for _ in range(4))
        send_only(with_fast(fresh(syn), FAST_EXID + key_id + bytes(random.getrandbits(8) for _ in range(8))))
    results["flood"] = flood
    print(json.dumps(results))


def send_only(pkt):
    from scapy.all import send
    send(pkt)


if __name__ == "__main__":
    if sys.argv[1] == "capture":
        capture(sys.argv[2])
    elif sys.argv[1] == "fast":
        fast(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1] == "attack":
        attack(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
