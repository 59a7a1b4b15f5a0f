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


if __name__ == "__main__":
    if sys.argv[1] == "capture":
        capture(sys.argv[2])
    elif sys.argv[1] == "attack":
        attack(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
